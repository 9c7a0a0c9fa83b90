"""Aligning one sample's axis to another's, and moving gates through the alignment.

The 1-D alignment of :mod:`cytopipe.gating.learn` (the flowLearn / ElastiGate idea): a monotone
piecewise-linear :class:`Warp` of an axis from an example sample's parent population to a target
sample's, through the landmarks of their densities (:func:`landmark_warp`: matched peaks, and the
robust half-widths of the outermost ones, or a single peak's widths at half and a tenth of its
height, or for a threshold on a single peak a shift of the middle of its upper half); :func:`overlap` scores how well two densities agree; :func:`warp_gate` moves a
geometric gate through per-axis warps. The learner (examples, combining them, the engine) stays
in :mod:`cytopipe.gating.learn`; nothing here knows about examples or templates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cytopipe.errors import GatingError
from cytopipe.gating.fitters import FitFailure
from cytopipe.gating.gates import Dim, EllipsoidGate, Gate, PolygonGate, RectangleGate
from cytopipe.gating.landmarks import GAP_DEPTH, AllOfGate, find_landmarks
from cytopipe.peaks import local_maxima, peak_prominences

_PEAK_SHARE = 0.1  # a landmark peak is at least this tall relative to the tallest (not noise)
_HALF_WIDTHS = 2.0  # outer landmarks: this many robust half-widths outside the outermost peaks
# valleys between matched peaks as landmarks too: off, as in flowStats warpSet (peaks only); the
# minimum of a flat valley is ill-defined and moved a HLADR gate off its population when tried
VALLEYS = False
# An axis whose density has one peak (the negative of a dim marker such as CXCR3, CCR6 or PD-1,
# whose positives are a continuum or a shoulder) is aligned by where the density falls to half and
# to a tenth of that peak's height on either side: its own full widths at half and tenth maximum
# follow the negative's width and skew, where a threshold on its upper tail lies (tuning studies
# 5151 and 5152: Th17 0.913 -> 0.929 and 0.914 -> 0.946, Th1 0.928 -> 0.953 and 0.922 -> 0.971,
# activated cTfh 0.910 -> 0.926 and 0.876 -> 0.931 pooled F1). With several matched peaks (or on
# every axis) it moved gs_DC_auto's HLADR+ gate 1.4 pp further from the stored one: kept to one peak.
# A side whose walk meets another peak before the level is not used (tuning studies 5151-5156,
# pooled F1 mean over the six: Th17 0.931 -> 0.945, Th1 0.934 -> 0.945, cTfh 0.932 -> 0.949,
# activated cTfh 0.905 -> 0.910, Treg 0.979 unchanged).
LEVELS = (0.5, 0.1)
# A threshold that the example set on a valley floor means the valley: it keeps its place relative
# to the middle of the target's valley floor (the warp of peaks and widths moves a cut in a flat,
# wide valley by where the peaks go, not by where the valley goes). The floor: the points whose
# density is within VALLEY_SE standard errors of the valley's minimum, which sampling noise
# cannot order (on a flat floor the minimum itself wanders: gs_DC_auto's CD16 valley of CD14-
# Lineage- cells is within 2 % of its minimum over ~360 of the 0-4096 scale); a hump bounding a
# valley rises above its base by more than VALLEY_SE standard errors of the difference. Two: the
# usual bound of sampling noise, not fitted (tuning studies 5151-5153: every pooled F1 within 0.001).
VALLEY_SE = 2.0
# A threshold's axis with one peak (a dim marker's negative, whose positives are a continuum) is
# instead shifted, not scaled: so that the middle of the peak's upper half (halfway between its
# mode and where the density falls to half the peak's height above it) lands on the target's.
# The widths at a tenth of the height, and the scale, follow the positives as much as the negative
# (the upper side widens with the parent's share of positives) and added scatter: on tuning studies
# 5151-5160 (21 targets each, mean pooled F1) Th17 0.9447 -> 0.9492, Th1 0.9496 -> 0.9570, cTfh
# 0.9596 -> 0.9614, activated cTfh 0.9110 -> 0.9141, every other population within 0.0001 (2026-12-06).
# Shapes (polygons, ellipses, diagonals: Treg 0.9774 -> 0.9713 when shifted) keep the widths' warp.
# The same shift when the matched peaks are humps of one population (the density between each two
# stays above landmarks.GAP_DEPTH x the lower: CXCR5 positives as a shoulder hump on memory CD4):
# the hump's place follows the positives' share and brightness, not the file's alignment. Tuning
# studies 5151-5155 | 5156-5160 (mean pooled F1, 2026-12-06): cTfh +0.0020 | +0.0002, activated
# cTfh +0.0013 | +0.0005, Th17 +0.0050 | +0.0104, Th1 +0.0027 | +0.0100, every other population
# unchanged. Peaks with a gap between them (CD45RA, CD3, CD4) keep the peaks' warp.
THRESHOLD_SHIFT_LEVEL = 0.5


# --------------------------------------------------------------------------------------------
# 1-D alignment
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Warp:
    """Monotone piecewise-linear map from an example sample's axis to a target's: through the
    knots ``src -> dst``, linear beyond them with the end segments' slopes."""

    src: tuple[float, ...]
    dst: tuple[float, ...]

    def _slopes(self) -> tuple[float, float]:
        s, d = self.src, self.dst
        if len(s) < 2:
            return 1.0, 1.0
        return (d[1] - d[0]) / (s[1] - s[0]), (d[-1] - d[-2]) / (s[-1] - s[-2])

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        s, d = np.asarray(self.src), np.asarray(self.dst)
        lo, hi = self._slopes()
        y = np.interp(x, s, d)
        y = np.where(x < s[0], d[0] + (x - s[0]) * lo, y)
        y = np.where(x > s[-1], d[-1] + (x - s[-1]) * hi, y)
        return np.where(np.isfinite(x), y, x)  # +-inf (open bounds) stay open

    def slope(self, x: float) -> float:
        s, d = self.src, self.dst
        lo, hi = self._slopes()
        if len(s) < 2 or x <= s[0]:
            return lo
        if x >= s[-1]:
            return hi
        k = int(np.searchsorted(s, x, side="right")) - 1
        return (d[k + 1] - d[k]) / (s[k + 1] - s[k])


IDENTITY = Warp((0.0, 1.0), (0.0, 1.0))


# A threshold on a small parent (one aligned on an ancestor in an example: activated cTfh's PD-1 cut
# on ~300-2000 cTfh) from the example recorded on the target's own cytometer: the mean of the
# learned threshold and the example's moved by the affine map that matches the quartiles of the
# parent's parent (Memory CD4's PD-1; :func:`drift_threshold`). On one instrument only the file's
# drift (offset and gain) separates two files, and thousands of events place two quartiles far
# better than a density's landmarks place a tail. Tuning studies 5151-5160 (mean pooled F1 of
# activated cTfh, 21 targets each, 2026-12-06): 5151-5155 0.9384 -> 0.9442, 5156-5160 0.9172 ->
# 0.9314, every other population within 0.00001 (docs/gating.md section 6b).
QUARTILES = (25.0, 75.0)


def quartile_warp(x_example: np.ndarray, x_target: np.ndarray, levels: Sequence[float] = QUARTILES) -> Warp:
    """The affine map that sends the example's percentiles ``levels`` of a (large) population to
    the target's (its offset and gain); :data:`IDENTITY` when either spread is empty."""
    xe = np.asarray(x_example, dtype=np.float64)
    xt = np.asarray(x_target, dtype=np.float64)
    xe, xt = xe[np.isfinite(xe)], xt[np.isfinite(xt)]
    if len(xe) < 2 or len(xt) < 2:
        return IDENTITY
    ae, be = (float(v) for v in np.percentile(xe, levels))
    at, bt = (float(v) for v in np.percentile(xt, levels))
    if not (be > ae and bt > at):
        return IDENTITY
    return Warp((ae, be), (at, bt))


def _peaks(x: np.ndarray):
    lm = find_landmarks(x)
    top = lm.main.height
    peaks = [p for p in lm.peaks if p.height >= _PEAK_SHARE * top]
    if len(peaks) > 3:  # the three most prominent, in position order
        peaks = sorted(sorted(peaks, key=lambda p: -p.prominence)[:3], key=lambda p: p.position)
    return lm, peaks


def _valley(lm, a, b) -> float:
    """Position of the density minimum between two peaks."""
    i, j = sorted((a.index, b.index))
    return float(lm.centers[i + int(np.argmin(lm.dens[i : j + 1]))])


def _match(pe: list, pt: list) -> list[tuple[Any, Any]]:
    """Order-preserving pairs of example and target peaks: all of them when both have as many,
    otherwise the order-preserving choice of min(len) peaks closest in position."""
    if len(pe) == len(pt):
        return list(zip(pe, pt))
    from itertools import combinations

    k = min(len(pe), len(pt))
    best, cost = None, math.inf
    for a in combinations(range(len(pe)), k):
        for b in combinations(range(len(pt)), k):
            c = sum(abs(pe[i].position - pt[j].position) for i, j in zip(a, b))
            if c < cost:
                best, cost = list(zip([pe[i] for i in a], [pt[j] for j in b])), c
    return best or []


def _half(p, side: str) -> float:
    """A peak's robust half-width on one side (the other side's when that one is unusable)."""
    a, b = (p.sd_left, p.sd_right) if side == "left" else (p.sd_right, p.sd_left)
    for v in (a, b):
        if math.isfinite(v) and v > 0:
            return float(v)
    return float("nan")


def _quantile_warp(xe: np.ndarray, xt: np.ndarray) -> Warp:
    """Fallback when a density has no usable peak: median and quartiles aligned."""
    qe = np.quantile(xe, [0.25, 0.5, 0.75])
    qt = np.quantile(xt, [0.25, 0.5, 0.75])
    return _monotone([float(v) for v in qe], [float(v) for v in qt])


def _monotone(src: list[float], dst: list[float]) -> Warp:
    """Knots kept only where both sides strictly increase (a warp must not fold an axis)."""
    s_out, d_out = [], []
    for s, d in sorted(zip(src, dst)):
        if not (math.isfinite(s) and math.isfinite(d)):
            continue
        if s_out and (s <= s_out[-1] or d <= d_out[-1]):
            continue
        s_out.append(s)
        d_out.append(d)
    if not s_out:
        return Warp((0.0,), (0.0,))
    if len(s_out) == 1:  # a shift only
        return Warp((s_out[0], s_out[0] + 1.0), (d_out[0], d_out[0] + 1.0))
    return Warp(tuple(s_out), tuple(d_out))


def landmark_warp(x_example: np.ndarray, x_target: np.ndarray, threshold: bool = False) -> Warp:
    """The warp of one axis from the example parent's values to the target parent's: matched
    density peaks, plus a landmark ``_HALF_WIDTHS`` robust half-widths outside each outermost
    matched peak; with one matched peak, instead, where the density falls to each of
    :data:`LEVELS` x its height on either side (a shift, and a scale per side and level), or, for
    a ``threshold`` (a rectangle's bounds), a shift matching the middle of the peak's upper half
    (:data:`THRESHOLD_SHIFT_LEVEL`; also on the first peak when the matched peaks are humps of one
    population, without a gap between them)."""
    xe = np.asarray(x_example, dtype=np.float64)
    xt = np.asarray(x_target, dtype=np.float64)
    xe, xt = xe[np.isfinite(xe)], xt[np.isfinite(xt)]
    try:
        (le, pe), (lt, pt) = _peaks(xe), _peaks(xt)
        pairs = _match(pe, pt)
    except FitFailure:
        pairs = []
    if not pairs:
        return _quantile_warp(xe, xt)
    src = [a.position for a, _ in pairs]
    dst = [b.position for _, b in pairs]
    if VALLEYS:
        for (a0, b0), (a1, b1) in zip(pairs, pairs[1:]):  # the valley between two matched peaks
            src.append(_valley(le, a0, a1))
            dst.append(_valley(lt, b0, b1))
    (a0, b0), (a1, b1) = pairs[0], pairs[-1]
    one = len(pairs) == 1 or _humps(le, [a for a, _ in pairs]) and _humps(lt, [b for _, b in pairs])
    if one and threshold:  # a threshold above a dim marker's negative (or its humps): a shift
        me, mt = (_crossing(le, a0, THRESHOLD_SHIFT_LEVEL, 1), _crossing(lt, b0, THRESHOLD_SHIFT_LEVEL, 1))
        if math.isfinite(me) and math.isfinite(mt):
            return _monotone([0.5 * (a0.position + me)], [0.5 * (b0.position + mt)])
    if len(pairs) == 1:  # one peak (a dim marker's negative, a continuum): its own shape
        ks = [(_crossing(le, a0, v, side), _crossing(lt, b0, v, side)) for v in LEVELS for side in (-1, 1)]
        ks = [(a, b) for a, b in ks if math.isfinite(a) and math.isfinite(b)]
        if len(ks) >= 2:  # else (a peak cut by the grid's end): the robust half-widths below
            return _monotone(src + [a for a, _ in ks], dst + [b for _, b in ks])
    src += [a0.position - _HALF_WIDTHS * _half(a0, "left"), a1.position + _HALF_WIDTHS * _half(a1, "right")]
    dst += [b0.position - _HALF_WIDTHS * _half(b0, "left"), b1.position + _HALF_WIDTHS * _half(b1, "right")]
    return _monotone(src, dst)


def _humps(lm, peaks: list) -> bool:
    """Whether consecutive ``peaks`` are humps of one population: the density between each two
    stays above ``GAP_DEPTH`` x the lower of them (:meth:`Landmarks.bulk`'s test)."""
    return all(lm._joined(a, b, GAP_DEPTH) for a, b in zip(peaks, peaks[1:]))


def _crossing(lm, peak, level: float, step: int) -> float:
    """Where the density first falls below ``level`` x the peak's height, walking away from the
    peak (``step`` -1: left, +1: right); nan when it never does on the grid, or when the density
    rises again first (the walk reached the valley to another population: beyond it the level
    measures that population, not this peak's width; e.g. a CXCR3 negative whose positives form a
    second peak in one file and a tail in the other)."""
    d, i = lm.dens, peak.index
    h = level * d[i]
    j = i
    while 0 <= j + step < len(d) and d[j + step] >= h:
        if d[j + step] > d[j]:
            return float("nan")
        j += step
    k = j + step
    if not 0 <= k < len(d):
        return float("nan")
    t = (
        (d[j] - h) / (d[j] - d[k]) if d[j] != d[k] else 0.0
    )  # between the last point above and the first below
    return float(lm.centers[j] + t * (lm.centers[k] - lm.centers[j]))


@dataclass(frozen=True)
class Valleys:
    """The valleys of one sample's density on an axis (:func:`valleys`): the significant humps'
    grid positions, and each valley's floor (first and last grid point within VALLEY_SE standard
    errors of its minimum) or None where the dip between two humps is within noise."""

    humps: np.ndarray
    floors: tuple[tuple[float, float] | None, ...]

    def around(self, t: float) -> tuple[float, float] | None:
        """The floor of the valley between the two humps that enclose ``t`` (None: no valley)."""
        k = int(np.searchsorted(self.humps, t))
        return self.floors[k - 1] if 0 < k < len(self.humps) else None


def valleys(x: np.ndarray) -> Valleys:
    """The density's valleys on the density :func:`find_landmarks` uses (Silverman's bandwidth,
    n capped at 20 000): a value d of that smoothed histogram of counts has variance d x the sum
    of the squared kernel weights (Poisson counts), which sets the noise of humps and floors."""
    from cytopipe.gating.fitters import density

    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    none = Valleys(np.empty(0), ())
    if len(x) < 3:
        return none
    q25, q75 = np.quantile(x, [0.25, 0.75])
    spread = min(float(np.std(x)), float(q75 - q25) / 1.349) or float(np.std(x))
    if not spread > 0:
        return none
    bw = 0.9 * spread * min(len(x), 20_000) ** -0.2
    c, d = density(x, bw)
    ss = 1.0 / (2.0 * math.sqrt(math.pi) * max(bw / float(c[1] - c[0]), 1.0))  # Gaussian kernel
    idx = local_maxima(d)
    if len(idx) < 2:
        return none
    prom = peak_prominences(d, idx)[0]
    idx = idx[prom > VALLEY_SE * np.sqrt(ss * (2.0 * d[idx] - prom))]
    floors: list[tuple[float, float] | None] = []
    for i, j in zip(idx, idx[1:]):
        m = float(d[i : j + 1].min())
        level = m + VALLEY_SE * math.sqrt(m * ss)
        on = c[i : j + 1][d[i : j + 1] <= level]
        floors.append((float(on[0]), float(on[-1])) if level < min(d[i], d[j]) else None)
    return Valleys(c[idx], tuple(floors))


def at_valley(t: float, warped: float, example: Valleys, target: Valleys, slope: float) -> float | None:
    """A threshold ``t`` on the floor of one of the example's valleys, moved to the target's valley
    whose humps enclose its ``warped`` position: the floors' middles matched, ``t``'s offset from
    the middle scaled by the warp's ``slope``. None for any other threshold (on a flank, on a
    continuum, or no valley in the target there): it stays where the warp put it."""
    fe = example.around(t)
    if fe is None or not fe[0] <= t <= fe[1]:
        return None
    ft = target.around(warped)
    if ft is None:
        return None
    return 0.5 * (ft[0] + ft[1]) + (t - 0.5 * (fe[0] + fe[1])) * slope


# An arcsinh axis re-expressed with another cofactor is a fixed monotone map, tabulated as a warp
# at these knots (beyond them its slope is ~1: asinh(k sinh v) -> v +- log k; between knots the
# chord is within ~0.01 of the curve).
_RESCALE_KNOTS = np.linspace(-8.0, 16.0, 193)


def rescale_warp(cofactor_from: float, cofactor_to: float) -> Warp:
    """The map from ``arcsinh(x / cofactor_from)`` to ``arcsinh(x / cofactor_to)`` (same linear x)
    as a piecewise-linear warp: an example file and a target file whose ``cofactor: auto`` scales
    differ see one cell at different places, and a gate drawn on one scale is first put on the
    other's before the densities are aligned."""
    k = float(cofactor_from) / float(cofactor_to)
    v = _RESCALE_KNOTS
    # asinh(k sinh v) without overflow: for |v| > 20, sinh v ~ sign(v) e^|v| / 2
    big = np.abs(v) > 20
    mid = np.arcsinh(k * np.sinh(np.where(big, 0.0, v)))
    far = np.sign(v) * (np.abs(v) + math.log(k))
    return Warp(tuple(map(float, v)), tuple(map(float, np.where(big, far, mid))))


def compose(outer: Warp, inner: Warp) -> Warp:
    """``outer(inner(x))`` as one warp (knots: the inner's and where the inner reaches the
    outer's)."""
    s_in, d_in = np.asarray(inner.src), np.asarray(inner.dst)
    back = np.interp(np.asarray(outer.src), d_in, s_in)  # within the inner's knots
    src = np.unique(np.concatenate([s_in, back]))
    return _monotone([float(x) for x in src], [float(y) for y in outer(inner(src))])


def overlap(a: np.ndarray, b: np.ndarray, bins: int = 256) -> float:
    """Overlap of two samples' smoothed densities on a common grid (1 = identical, 0 = disjoint)."""
    from scipy.ndimage import gaussian_filter1d

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return 0.0
    lo = min(np.quantile(a, 0.005), np.quantile(b, 0.005))
    hi = max(np.quantile(a, 0.995), np.quantile(b, 0.995))
    if not hi > lo:
        return 1.0
    ha = gaussian_filter1d(np.histogram(np.clip(a, lo, hi), bins, (lo, hi))[0].astype(float), 2.0)
    hb = gaussian_filter1d(np.histogram(np.clip(b, lo, hi), bins, (lo, hi))[0].astype(float), 2.0)
    return float(np.minimum(ha / ha.sum(), hb / hb.sum()).sum())


# --------------------------------------------------------------------------------------------
# moving gates through warps
# --------------------------------------------------------------------------------------------
def _split_edges(v: np.ndarray, xs: Sequence[float], ys: Sequence[float]) -> np.ndarray:
    """Polygon vertices with extra vertices where a finite edge crosses x = xs or y = ys, so that
    each piece lies in one linear cell of both warps (and stays straight when warped)."""
    out = []
    n = len(v)
    for i in range(n):
        p, q = v[i], v[(i + 1) % n]
        out.append(p)
        if not (np.isfinite(p).all() and np.isfinite(q).all()):
            continue
        ts = []
        for k, cuts in ((0, xs), (1, ys)):
            if q[k] != p[k]:
                for c in cuts:
                    t = (c - p[k]) / (q[k] - p[k])
                    if 0.0 < t < 1.0:
                        ts.append(t)
        for t in sorted(ts):
            out.append(p + t * (q - p))
    return np.asarray(out, dtype=np.float64)


def warp_gate(gate: Gate, warps: Mapping[Dim, Warp]) -> Gate:
    """The gate moved through per-axis warps (rectangle, polygon, ellipse, all-of)."""
    if isinstance(gate, RectangleGate):
        lower = [None if b is None else float(warps[d](b)) for d, b in zip(gate.dims, gate.lower)]
        upper = [None if b is None else float(warps[d](b)) for d, b in zip(gate.dims, gate.upper)]
        return RectangleGate(gate.dims, lower, upper, style=gate.style)
    if isinstance(gate, PolygonGate):
        wx, wy = warps[gate.dims[0]], warps[gate.dims[1]]
        v = _split_edges(gate.vertices, wx.src, wy.src)
        return PolygonGate(gate.dims, np.column_stack([wx(v[:, 0]), wy(v[:, 1])]))
    if isinstance(gate, EllipsoidGate):
        center = np.array([float(warps[d](c)) for d, c in zip(gate.dims, gate.center)])
        jac = np.diag([warps[d].slope(float(c)) for d, c in zip(gate.dims, gate.center)])
        return EllipsoidGate(gate.dims, center, jac @ gate.covariance @ jac, gate.distance_square)
    if isinstance(gate, AllOfGate):
        return AllOfGate([warp_gate(p, warps) for p in gate.parts])
    raise GatingError(f"a {type(gate).__name__} cannot be learned (only geometric gates move)")


def drift_threshold(
    learned: RectangleGate,
    examples: Sequence[RectangleGate],
    x_examples: Sequence[np.ndarray],
    x_target: np.ndarray,
) -> RectangleGate:
    """The mean of a learned 1-D threshold (or interval) and the median of the example gates
    moved by :func:`quartile_warp` from each example's reference values to the target's."""
    moved = [warp_gate(g, {g.dims[0]: quartile_warp(xe, x_target)}) for g, xe in zip(examples, x_examples)]

    def mean(bounds, own):
        return [None if b is None else 0.5 * (b + float(np.median(o))) for b, o in zip(bounds, own)]

    lower = mean(learned.lower, zip(*[m.lower for m in moved]))
    upper = mean(learned.upper, zip(*[m.upper for m in moved]))
    return RectangleGate(learned.dims, lower, upper, style=learned.style)


__all__ = [
    "IDENTITY",
    "LEVELS",
    "VALLEY_SE",
    "Valleys",
    "Warp",
    "at_valley",
    "drift_threshold",
    "landmark_warp",
    "overlap",
    "quartile_warp",
    "valleys",
    "warp_gate",
]
