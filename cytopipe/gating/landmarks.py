"""Landmark-relative data-driven gates: every threshold stated relative to the parent's own peaks.

A gate written on one instrument's absolute scale (``search: [2.0, 4.0]``) fails on another
instrument, voltage or fluorochrome. The fitters here first find *landmarks* in the parent's
events on the gate's axis -- the negative (lowest) and positive (highest) density peaks, the main
(tallest) peak, each with a robust width taken from its outer half -- and state their threshold
relative to them, so the canonical template holds no instrument-scale numbers:

``auto``      the deepest valley between the two most prominent peaks when there is one (deeper
              than ``max_depth`` x the lower peak), else the ``shoulder`` of the negative peak,
              kept below the first peak above the negative one (at the density's floor between
              them): a population joined by a shallow valley is not cut through or skipped.
              With ``percentile`` (dim markers, FMO convention): a valley deeper than ``gap``
              (0.2) x the lower peak is a gap between two populations and is used; a shallower
              one (humps of a continuum) only where it lies below the negative population's
              mirrored ``percentile``, which is the threshold otherwise. With ``of: bulk`` (Live):
              the first valley above the main population (the main peak with the humps joined
              to it without a gap, :meth:`Landmarks.bulk`), else its upper shoulder, never above
              the end of its highest peak (density under 0.1 % of the peak)
              ``split: mixture``: instead of valley/shoulder, the boundary (equal posterior) of a
              two-component Gaussian mixture of the parent on the axis, between its two means
              (openCyto's ``flowClust`` K=2 cut, without its study-wide priors): for two
              populations joined by a flat stretch with no valley (CD16 of CD14- Lineage- cells)
``shoulder``  where the parent's density first reaches ``ratio`` x the mirror image of the
              negative peak's outer half (``of: negative``, going up) or of the main peak's upper
              half (``of: main``, going down). With ``ratio: 2`` that is where the excess over the
              peak equals the peak itself: the equal-density (Bayes) boundary between the peak and
              what lies beyond it, for a continuum as well as for a separate population.
``diagonal``  2-D: the main cloud's landmarks on both axes (mode and robust SD) standardise the
              axes, events are projected on the diagonal ``s1*z1 + s2*z2`` (signs from
              ``signs:``), and the projection is gated at its shoulder (e.g. CD25+ CD127lo Treg,
              CD56hi CD16lo NK); extra markers of the gate are ANDed with ``auto`` thresholds
              (e.g. FOXP3+), and a marker listed under ``optional:`` that a file lacks is left out
              (flagged) instead of dropping the population. ``cut: edge``: the projection is cut
              at the main cloud's edge (``min_offset`` robust SDs) and the extra markers decide
              (at the shoulder when the file lacks one of them).
``lymphocytes`` scatter: the lowest-SSC dense cluster of FSC-A/SSC-A that is not debris, found on the
              events' own range (no absolute box), refined on its trimmed core; a dense debris
              cluster below it ends at the FSC valley between them, which the gate does not cross.
``reference`` the ``q``-quantile of the marker on another population (``population: CD8 T``) or, when
              an FMO control of the marker is given to the engine, on the control's events of the
              same parent.

Each fit also computes a landmark-relative *fallback* (e.g. "negative peak + 3 robust SD") that the
engine uses, flagged, when the fit fails or is implausible and no pooled estimate exists. Sanity
bounds are plausibility checks (``fraction`` of parent inside the gate, ``min_separation`` of the two
peaks in robust SDs), never a distance from a typed number.

Why one module: the landmark search (peaks, valleys, shoulders, robust SDs) and the fitters and
gates built on it (relative thresholds, references/FMO, diagonals, lymphocytes) change together:
each fitter is a few lines over the shared landmarks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from cytopipe.gating.fitters import (
    DEFAULT_MAX_EVENTS,
    DataDrivenGate,
    DensestClusterFitter,
    EllipseFitGate,
    FitFailure,
    Fitter,
    ThresholdFitter,
    _finite,
    _subsample,
    chi2_quantile,
    density_sorted,
    refine_core,
    subsample_index,
)
from cytopipe.gating.gates import Dim, Gate, PolygonGate, RectangleGate
from cytopipe.peaks import peak_prominences, prominent_peaks


class LandmarkFailure(FitFailure):
    """A fit failed but the landmarks still give a relative fallback value."""

    def __init__(self, message: str, fallback: np.ndarray | None = None, how: str = ""):
        super().__init__(message)
        self.fallback = fallback
        self.how = how


# --------------------------------------------------------------------------------------------
# landmarks
# --------------------------------------------------------------------------------------------
@dataclass
class Peak:
    index: int
    position: float
    height: float
    prominence: float
    sd_left: float
    sd_right: float
    mass: int = 0  # events in the peak's basin


@dataclass
class Landmarks:
    """Density peaks of one marker in the parent (positions ascending) and the density itself."""

    centers: np.ndarray
    dens: np.ndarray
    peaks: list[Peak]

    @property
    def negative(self) -> Peak:
        """The lowest peak at least a tenth as tall as the main one (not a speck of noise)."""
        top = self.main.height
        return next(p for p in self.peaks if p.height >= 0.1 * top)

    @property
    def positive(self) -> Peak:
        return self.peaks[-1]

    @property
    def main(self) -> Peak:
        return max(self.peaks, key=lambda p: p.height)

    def bulk(self, gap: float | None = None) -> list[Peak]:
        """The main peak and every neighbouring peak joined to it without a gap (the density
        between them stays above ``gap`` x the lower of the two): one population with humps,
        e.g. live T and non-T cells a little apart on a viability dye, not two populations."""
        gap = GAP_DEPTH if gap is None else gap
        i = self.peaks.index(self.main)
        lo = hi = i
        while lo > 0 and self._joined(self.peaks[lo - 1], self.peaks[lo], gap):
            lo -= 1
        while hi + 1 < len(self.peaks) and self._joined(self.peaks[hi], self.peaks[hi + 1], gap):
            hi += 1
        return self.peaks[lo : hi + 1]

    def _joined(self, a: Peak, b: Peak, gap: float) -> bool:
        return float(self.dens[a.index : b.index + 1].min()) > gap * min(a.height, b.height)

    def two_most_prominent(self) -> tuple[Peak, Peak] | None:
        if len(self.peaks) < 2:
            return None
        a, b = sorted(sorted(self.peaks, key=lambda p: -p.prominence)[:2], key=lambda p: p.position)
        return a, b


def _median_gap(ordered: np.ndarray, start: int, stop: int, mode, below: bool) -> float:
    """``float(np.median(d))`` of d = ``mode - v`` (``below``) or ``v - mode`` for the sorted
    values v = ``ordered[start:stop]``, without forming d: d is monotone in v, so its middle
    element(s) are v's, and the subtraction and the mean of two are numpy's, in v's dtype."""
    n = stop - start
    if below:
        mid = [mode - ordered[stop - 1 - k] for k in {n // 2, (n - 1) // 2}]
    else:
        mid = [ordered[start + k] - mode for k in {n // 2, (n - 1) // 2}]
    if len(mid) == 1:
        return float(mid[0])
    return float((min(mid) + max(mid)) / 2)


def _merge_shallow(idx: np.ndarray, dens: np.ndarray, depth: float) -> np.ndarray:
    """Merge neighbouring peaks whose dip is shallower than ``depth`` x the lower of the two: one
    population with a bumpy top (e.g. a negative split by the display transform), not two."""
    out = [int(idx[0])]
    for i in idx[1:]:
        j = out[-1]
        dip = dens[j : i + 1].min()
        if dip > depth * min(dens[j], dens[i]):
            if dens[i] > dens[j]:
                out[-1] = int(i)
        else:
            out.append(int(i))
    return np.asarray(out)


def find_landmarks(
    x: np.ndarray, min_peak: float = 0.05, bandwidth: float | None = None, merge_depth: float = 0.8
) -> Landmarks:
    """Peaks whose prominence is >= ``min_peak`` x the tallest (neighbours without a real dip
    between them merged), with robust half-widths."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    ordered = np.sort(x)  # one sort: the density's quantiles and histogram, and every peak's width
    keys = ordered if ordered.dtype == np.float64 else ordered.astype(np.float64)
    centers, dens = density_sorted(x, ordered, bandwidth)
    padded = np.concatenate([[0.0], dens, [0.0]])
    idx = prominent_peaks(padded, min_peak * dens.max()) - 1
    if not len(idx):
        raise FitFailure("no density peak found")
    idx = _merge_shallow(idx, dens, merge_depth)
    peaks = []
    proms = peak_prominences(padded, idx + 1)[0]
    for i, prom in zip(idx, proms):
        mode = float(centers[i])
        # the half-width of a peak from its outer halves, limited to the events near it (one
        # neighbouring peak must not widen it): events within the nearest minima on each side
        lo_b = (
            centers[0] if i == idx[0] else centers[idx[idx < i][-1] + np.argmin(dens[idx[idx < i][-1] : i])]
        )
        hi_b = centers[-1] if i == idx[-1] else centers[i + np.argmin(dens[i : idx[idx > i][0]])]
        # events lo_b <= v < mode and mode < v <= hi_b, compared as numpy compares ``x < mode``:
        # in x's dtype (the mode rounded to it); the bounds are float64
        m = x.dtype.type(mode)
        start, below = np.searchsorted(keys, [lo_b, float(m)], side="left")
        above, stop = np.searchsorted(keys, [float(m), hi_b], side="right")
        n_left, n_right = max(below - start, 0), max(stop - above, 0)
        sd_left = _median_gap(ordered, start, below, m, True) / 0.6745 if n_left >= 3 else float("nan")
        sd_right = _median_gap(ordered, above, stop, m, False) / 0.6745 if n_right >= 3 else float("nan")
        peak = Peak(int(i), mode, float(dens[i]), float(prom), sd_left, sd_right)
        peak.mass = int(n_left + n_right)
        peaks.append(peak)
    # a "peak" of a handful of events (< 0.5 % of them, or < 3 on both sides) is noise, not a population
    real = [
        p
        for p in peaks
        if (math.isfinite(p.sd_left) or math.isfinite(p.sd_right)) and p.mass >= max(6, 0.005 * len(x))
    ]
    return Landmarks(centers, dens, real or [max(peaks, key=lambda p: p.height)])


def _robust_sd(p: Peak, side: str) -> float:
    """The peak's robust SD from one half, falling back to the other half."""
    a, b = (p.sd_left, p.sd_right) if side == "left" else (p.sd_right, p.sd_left)
    v = a if math.isfinite(a) and a > 0 else b
    if not (math.isfinite(v) and v > 0):
        raise FitFailure(f"cannot estimate the width of the peak at {p.position:.3g}")
    return v


def shoulder(lm: Landmarks, of: str = "negative", ratio: float = 2.0, min_offset: float = 1.0) -> float:
    """Where the density first reaches ``ratio`` x the mirrored outer half of a peak.

    ``of: negative``: mirror the left half of the negative peak to the right and walk up;
    ``of: main``: mirror the right half of the main peak to the left and walk down;
    ``of: bulk``: mirror the left half of the bulk's highest peak (:meth:`Landmarks.bulk`) to the
    right and walk up (the upper edge of a population with humps, e.g. live cells).
    The walk starts ``min_offset`` robust SDs from the mode (noise at the top of the peak; for
    ``bulk`` the SD of the peak's wider half, so a right-skewed peak's own flank is not taken for
    what lies beyond it).
    """
    c, f = lm.centers, lm.dens
    if of in ("negative", "bulk"):
        p = lm.negative if of == "negative" else lm.bulk()[-1]
        sd = _robust_sd(p, "left")
        step = 1
        # the walk of a population's upper edge starts beyond its own upper flank, however skewed
        # (live cells: T and non-T cells a little apart on the dye make one right-skewed peak); a
        # negative peak's upper half holds the positives' foot, so it keeps its lower half's width
        start = max(sd, _robust_sd(p, "right")) if of == "bulk" else sd
    else:
        p = lm.main
        sd = start = _robust_sd(p, "right")
        step = -1
    width = c[1] - c[0]
    k0 = max(1, int(math.ceil(min_offset * start / width)))
    n = len(c)
    for k in range(k0, n):
        j = p.index + step * k
        m = p.index - step * k  # mirror point
        if j < 0 or j >= n:
            break
        g = f[m] if 0 <= m < n else 0.0
        if f[j] >= ratio * g and f[j] > 0:
            # interpolate the crossing between this grid point and the previous one
            jp = j - step
            mp = m + step
            gp = f[mp] if 0 <= mp < n else 0.0
            d1 = f[j] - ratio * g
            d0 = f[jp] - ratio * gp
            t = 1.0 if d1 == d0 else float(np.clip(-d0 / (d1 - d0), 0.0, 1.0))
            return float(c[jp] + step * t * width)
    # nothing but the peak on this axis (e.g. no dead cells): the threshold is where the peak's
    # mirrored outer half ends (its density falls below 0.1 % of the peak)
    side = f[: p.index + 1][::-1] if step == 1 else f[p.index :]
    below = np.flatnonzero(side < 1e-3 * p.height)
    k_end = int(below[0]) if len(below) else len(side) - 1
    return float(c[p.index] + step * k_end * width)


def mirrored_percentile(x: np.ndarray, mode: float, percentile: float) -> float:
    """The ``percentile`` of the negative population, taken as the mirror image of the events
    below its mode (the lowest peak): what an FMO control's percentile on the same parent gives
    when the negative population is symmetric on the display scale."""
    below = x[x < mode]
    if len(below) < 20:
        raise FitFailure(f"only {len(below)} events below the negative peak at {mode:.3g}")
    q = (1.0 - percentile / 100.0) * 2.0 * len(below) / len(x)  # share of all events
    return float(2.0 * mode - np.quantile(x, q))


def negative_landmark(x: np.ndarray, linear: np.ndarray, percentile: float) -> float:
    """The negative population's mirrored ``percentile`` in linear units: its mode (the lowest
    peak) found on the display scale ``x``, the events below it mirrored in ``linear`` units
    (where the negative is symmetric). It scales with the detector's gain: a file's drift on the
    axis is this landmark's ratio to the same landmark of a control."""
    return negative_mode_and_landmark(x, linear, percentile)[1]


def negative_mode_and_landmark(x: np.ndarray, linear: np.ndarray, percentile: float) -> tuple[float, float]:
    """(mode, :func:`negative_landmark`) of the negative population in linear units: two
    landmarks that register a gain and an offset on the axis."""
    lm = find_landmarks(x, 0.01)
    near = np.argpartition(np.abs(x - lm.negative.position), min(50, len(x) - 1))[:50]
    mode = float(np.median(linear[near]))
    return mode, mirrored_percentile(linear, mode, percentile)


def deepest_valley(lm: Landmarks, max_depth: float = 0.8) -> float:
    """The lowest density between the two most prominent peaks (failing when it is shallow)."""
    pair = lm.two_most_prominent()
    if pair is None:
        raise FitFailure("only one density peak: no valley")
    a, b = pair
    seg = lm.dens[a.index : b.index + 1]
    i = a.index + int(np.argmin(seg))
    if lm.dens[i] > max_depth * min(a.height, b.height):
        raise FitFailure(f"the valley at {lm.centers[i]:.3g} is too shallow to separate two populations")
    # the middle of a flat bottom (an empty gap between well separated populations)
    level = lm.dens[i] + 0.02 * (min(a.height, b.height) - lm.dens[i])
    lo, hi = i, i
    while lo - 1 > a.index and lm.dens[lo - 1] <= level:
        lo -= 1
    while hi + 1 < b.index and lm.dens[hi + 1] <= level:
        hi += 1
    return float(0.5 * (lm.centers[lo] + lm.centers[hi]))


def mixture_boundary(x: np.ndarray) -> float:
    """Where the posterior of a two-component 1-D Gaussian mixture passes from the lower to the
    upper component, between the two means (the Bayes boundary of the two populations)."""
    from sklearn.mixture import GaussianMixture

    from cytopipe.threads import one_thread

    x = _finite(np.asarray(x, dtype=np.float64))
    if len(x) < 50:
        raise FitFailure(f"only {len(x)} events: too few for a two-component mixture")
    # k-means start (a start from the quartiles stops in a poor local optimum when one component
    # is much smaller); random_state fixes the k-means seeding, so the boundary is deterministic
    gm = GaussianMixture(2, random_state=0, reg_covar=1e-6 * float(np.var(x)) + 1e-12)
    with one_thread():
        gm.fit(x[:, None])
    if not gm.converged_:
        raise FitFailure("the two-component mixture did not converge")
    if gm.weights_.min() < 0.01:
        raise FitFailure(f"one mixture component holds only {gm.weights_.min():.1%} of events")
    hi = int(np.argmax(gm.means_[:, 0]))
    grid = np.linspace(gm.means_[:, 0].min(), gm.means_[:, 0].max(), 2049)
    post = gm.predict_proba(grid[:, None])[:, hi]
    up = np.flatnonzero(post >= 0.5)
    if not len(up) or up[0] == 0:
        raise FitFailure("the mixture's upper component dominates below its lower mean")
    k = int(up[0])
    t = (0.5 - post[k - 1]) / (post[k] - post[k - 1])
    return float(grid[k - 1] + t * (grid[k] - grid[k - 1]))


GAP_DEPTH = 0.2  # valley density / lower peak height under which two peaks are separate populations


def _valley_depth(lm: Landmarks, t: float) -> float:
    """Density at ``t`` relative to the lower of the two most prominent peaks."""
    pair = lm.two_most_prominent()
    if pair is None:
        return 1.0
    return float(np.interp(t, lm.centers, lm.dens)) / min(pair[0].height, pair[1].height)


def _valley_beyond_main(lm: Landmarks, max_depth: float = 0.5) -> float | None:
    """The deepest valley between the main peak and the most prominent peak above it, or None."""
    main = lm.main
    above = [p for p in lm.peaks if p.position > main.position]
    if not above:
        return None
    other = max(above, key=lambda p: p.prominence)
    sub = Landmarks(lm.centers, lm.dens, [main, other])
    try:
        return deepest_valley(sub, max_depth)
    except FitFailure:
        return None


# --------------------------------------------------------------------------------------------
# 1-D relative thresholds
# --------------------------------------------------------------------------------------------
class RelativeThresholdFitter(ThresholdFitter):
    """``auto`` and ``shoulder`` (and ``valley`` without a ``search`` range)."""

    def fit(self, values, rng):
        return self.fit_full(values, rng)[0]

    @property
    def wants_linear(self) -> bool:
        """A ``tail`` percentile mirrors the negative population in linear (compensated) units,
        where it is symmetric whatever the display scale; the engine then passes those too."""
        return self.method == "tail" or (self.method == "auto" and "percentile" in self.options)

    def fit_full(self, values, rng, linear=None, to_display=None, scatter=None):
        """``(params, fallback, how)``; raises LandmarkFailure (with the fallback) on failure.
        ``scatter``: the same events' scatter values (``of: bulk`` with ``scatter:``), which tell
        a live hump beyond a gap from dying or dead cells."""
        self._linear = None
        self._scatter = None
        if scatter is not None and linear is None:
            x0 = np.asarray(values[0])  # its own dtype: the same landmarks as without scatter
            sc = np.column_stack([np.asarray(v, dtype=np.float64) for v in scatter])
            ok = np.isfinite(x0) & np.isfinite(sc).all(axis=1)
            x0, sc = x0[ok], sc[ok]
            if len(x0) >= self.bounds.min_events:
                pos = subsample_index(len(x0), self.options.get("max_events", DEFAULT_MAX_EVENTS), rng)
                if pos is not None:
                    x0, sc = x0[pos], sc[pos]
                self._scatter = (x0, sc)
                values = [x0]
        if linear is not None and to_display is not None:
            ok = np.isfinite(np.asarray(values[0])) & np.isfinite(np.asarray(linear))
            values = [np.asarray(values[0])[ok]]
            linear = np.asarray(linear, dtype=np.float64)[ok]
        x = self._prepare(values, rng)
        if (
            linear is not None
            and to_display is not None
            and len(x) > self.options.get("max_events", DEFAULT_MAX_EVENTS)
        ):
            pos = rng.integers(0, len(x), size=self.options.get("max_events", DEFAULT_MAX_EVENTS))
            xs, lin = x[pos], linear[pos]
        else:
            xs = _subsample(x, self.options.get("max_events", DEFAULT_MAX_EVENTS), rng)
            lin = linear if linear is not None and len(xs) == len(x) else None
        lm = find_landmarks(xs, self.options.get("min_peak", 0.01), self.options.get("bandwidth"))
        valley = None
        if self.method == "auto" and "percentile" in self.options:
            # a valley between two populations when there is one; else (a continuum) the FMO-like
            # percentile of the negative population
            try:
                valley = self._threshold(lm, xs)
            except FitFailure:
                pass
            # a deep valley (density under ``gap`` x the lower of the two peaks) is a gap between
            # two populations: the gate goes there. A shallower one separates humps of a
            # continuum, where the FMO convention below decides.
            if valley is not None and (
                lin is None or _valley_depth(lm, float(valley[0])) <= self.options.get("gap", GAP_DEPTH)
            ):
                return valley, *self._fallback(lm)
        if self.method in ("tail", "auto") and "percentile" in self.options and lin is not None:
            # the negative's mode on the display scale, its mirror image in linear units
            mode = lm.negative.position
            near = np.argpartition(np.abs(xs - mode), min(50, len(xs) - 1))[:50]
            mode_lin = float(np.median(lin[near]))
            try:
                t_lin = mirrored_percentile(lin, mode_lin, self.options["percentile"])
            except FitFailure as exc:
                if valley is not None:
                    return valley, *self._fallback(lm)
                raise LandmarkFailure(str(exc), *self._fallback(lm)) from None
            t = float(to_display(t_lin))
            # FMO convention: a cell above the negative population's percentile is positive, so a
            # valley counts only where it lies below that point (a dip inside a smeared positive
            # continuum, higher up, would cut positives off)
            if valley is not None and float(valley[0]) < t:
                return valley, *self._fallback(lm)
            return np.array([t]), *self._fallback(lm)
        of = self.options.get("of", "negative")
        z = self.options.get("fallback_z", 3.0)
        if of == "negative":
            fb = lm.negative.position + z * _robust_sd(lm.negative, "left")
            how = f"negative peak + {z:g} robust SD"
        elif of == "bulk":
            top = lm.bulk()[-1]
            fb = top.position + z * _robust_sd(top, "right")
            how = f"main population's highest peak + {z:g} robust SD"
        else:
            fb = lm.main.position - z * _robust_sd(lm.main, "right")
            how = f"main peak - {z:g} robust SD"
        fallback = np.array([fb])
        try:
            t = self._threshold(lm, xs)
        except FitFailure as exc:
            raise LandmarkFailure(str(exc), fallback, how) from None
        return t, fallback, how

    def _dead_like(self, lm: Landmarks, peak: Peak) -> bool:
        """Whether ``peak``'s events have a scatter other than the live main peak's (by more than
        two standard errors of a difference of medians, in robust SDs of the live cells' scatter)."""
        if getattr(self, "_scatter", None) is None or peak is lm.main:
            return False
        x, sc = self._scatter
        main = sc[
            np.abs(x - lm.main.position) <= max(_robust_sd(lm.main, "left"), _robust_sd(lm.main, "right"))
        ]
        other = sc[np.abs(x - peak.position) <= max(_robust_sd(peak, "left"), _robust_sd(peak, "right"))]
        if min(len(main), len(other)) < 20:
            return False
        med = np.median(main, axis=0)
        sd = 1.4826 * np.median(np.abs(main - med), axis=0)
        if not np.all(sd > 0):
            return False
        dist = np.linalg.norm((np.median(other, axis=0) - med) / sd)
        return bool(dist > 2.0 * 1.2533 * math.sqrt(1.0 / len(main) + 1.0 / len(other)))

    def _live_hump(self, lm: Landmarks, hump: Peak, brightest: Peak) -> bool:
        """Whether ``hump`` (beyond a gap above the live cells, below a brighter peak) is live:
        its events' median scatter (FSC, SSC) lies nearer the live main peak's than the brightest
        peak's (dead cells shrink: lower FSC, higher SSC), in robust SDs of the live cells'
        scatter, by more than two standard errors. Without scatter, or too few events to tell, it
        is not (the cut stays below it)."""
        if getattr(self, "_scatter", None) is None:
            return False
        x, sc = self._scatter

        def core(p: Peak) -> np.ndarray:
            return sc[np.abs(x - p.position) <= max(_robust_sd(p, "left"), _robust_sd(p, "right"))]

        main, mid, dead = core(lm.main), core(hump), core(brightest)
        if min(len(main), len(mid), len(dead)) < 20:
            return False
        med = np.median(main, axis=0)
        sd = 1.4826 * np.median(np.abs(main - med), axis=0)
        if not np.all(sd > 0):
            return False
        to_live = np.linalg.norm((np.median(mid, axis=0) - med) / sd)
        to_dead = np.linalg.norm((np.median(mid, axis=0) - np.median(dead, axis=0)) / sd)
        # nearer by more than two standard errors of a difference of medians (a median's SE is
        # 1.25 SD / sqrt(n)): a sliver of a few dozen dying cells cannot be told apart, stays out
        se = 1.2533 * math.sqrt(1.0 / len(mid) + 1.0 / len(dead))
        return bool(to_dead - to_live > 2.0 * se)

    def _fallback(self, lm: Landmarks) -> tuple[np.ndarray, str]:
        z = self.options.get("fallback_z", 3.0)
        fb = lm.negative.position + z * _robust_sd(lm.negative, "left")
        return np.array([fb]), f"negative peak + {z:g} robust SD"

    def _threshold(self, lm: Landmarks, xs: np.ndarray | None = None) -> np.ndarray:
        method = self.method
        if method == "tail":
            return np.array([mirrored_percentile(xs, lm.negative.position, self.options["percentile"])])
        if method == "auto" and self.options.get("of") == "bulk":
            # the first valley above the main population (with its humps): below the nearest
            # peak beyond a gap (dying cells' intermediate dye uptake, or the dead cells), else
            # the population's upper shoulder
            bulk = lm.bulk()
            bright = lm.peaks[-1]
            if bulk[-1] is not lm.main and self._dead_like(lm, bright):
                # with scatter and a brightest peak of shrunken (dead) cells, a hump joined above
                # the main peak is live only when its scatter is the live cells' (small humps of
                # dying and dead cells can be joined to the live cells' flank and to each other)
                i = bulk.index(lm.main)
                while (
                    i + 1 < len(bulk)
                    and bulk[i + 1] is not bright
                    and self._live_hump(lm, bulk[i + 1], bright)
                ):
                    i += 1
                trimmed = i + 1 < len(bulk)
                bulk = bulk[: i + 1]
            else:
                trimmed = False
            top = bulk[-1]
            # ... and never above the end of its highest peak (its density under 0.1 % of the
            # peak, as in `shoulder`): dying cells smeared between live and dead cells lie in
            # the valley's floor, not in the live population
            ends = np.flatnonzero(lm.dens[top.index :] < 1e-3 * top.height)
            end = float(lm.centers[top.index + ends[0]]) if len(ends) else math.inf
            above = [p for p in lm.peaks if p.position > top.position]
            while len(above) > 1 and self._live_hump(lm, above[0], above[-1]):
                # a hump beyond a gap whose scatter is the live cells', not the brightest
                # (dead) peak's: live cells a little brighter on the dye (spillover from a
                # lineage marker's fluorochrome), part of the live population
                top, above = above[0], above[1:]
                ends = np.flatnonzero(lm.dens[top.index :] < 1e-3 * top.height)
                end = float(lm.centers[top.index + ends[0]]) if len(ends) else math.inf
            if above:
                try:
                    sub = Landmarks(lm.centers, lm.dens, [top, above[0]])
                    return np.array([min(deepest_valley(sub, self.options.get("max_depth", 0.5)), end)])
                except FitFailure:
                    if trimmed:  # the joined hump above is not live: cut at the density's floor
                        a, b = top.index, above[0].index
                        return np.array([min(float(lm.centers[a + int(np.argmin(lm.dens[a : b + 1]))]), end)])
            ratio, offset = self.options.get("ratio", 2.0), self.options.get("min_offset", 1.0)
            return np.array([min(shoulder(lm, of="bulk", ratio=ratio, min_offset=offset), end)])
        if method == "auto" and self.options.get("split") == "mixture":
            return np.array([mixture_boundary(xs)])
        if method in ("auto", "valley"):
            try:
                if method == "auto" and "percentile" in self.options and len(lm.peaks) < 2:
                    raise FitFailure("one peak")
                t = deepest_valley(lm, self.options.get("max_depth", 0.8 if method == "valley" else 0.5))
                pair = lm.two_most_prominent()
                sep = self.options.get("min_separation")
                if sep is not None:
                    a, b = pair
                    spread = 0.5 * (_robust_sd(a, "left") + _robust_sd(b, "right"))
                    if (b.position - a.position) / spread < sep:
                        raise FitFailure(
                            f"the peaks at {a.position:.3g} and {b.position:.3g} are only "
                            f"{(b.position - a.position) / spread:.2g} robust SDs apart (need >= {sep:g})"
                        )
                return np.array([t])
            except FitFailure:
                if method == "valley" or "percentile" in self.options:
                    raise
        of = self.options.get("of", "negative")
        t = shoulder(
            lm, of=of, ratio=self.options.get("ratio", 2.0), min_offset=self.options.get("min_offset", 1.0)
        )
        if method == "auto" and of == "negative":
            # a peak between the negative one and its shoulder is a population of its own, joined
            # to the negative by a shallow valley (CD56dim NK beside a wide CD3- negative whose
            # mirrored flank covers them): the threshold stays below it, at the density's floor
            neg = lm.negative
            inner = [p for p in lm.peaks if neg.position < p.position < t]
            if inner:
                a, b = neg.index, inner[0].index
                t = min(t, float(lm.centers[a + int(np.argmin(lm.dens[a : b + 1]))]))
        return np.array([t])


# --------------------------------------------------------------------------------------------
# thresholds from another population or from an FMO control
# --------------------------------------------------------------------------------------------
class ReferenceFitter(ThresholdFitter):
    """``reference``: the ``q``-quantile of the marker on ``population`` (an internal negative
    reference, e.g. CD8 T for CXCR5) or on an FMO control's events of the same parent. The
    engine supplies those values; without them the fit fails (and falls back, flagged)."""

    events_needed = None

    def fit(self, values, rng):
        x = _finite(np.asarray(values[0]))
        if len(x) < self.bounds.min_events:
            raise FitFailure(
                f"only {len(x)} events in the reference {self.source_name} (need >= {self.bounds.min_events})"
            )
        return np.array([float(np.quantile(x, self.options["q"]))])

    @property
    def source_name(self) -> str:
        pop = self.options.get("population")
        return f"population {pop!r}" if pop else "FMO control"


# --------------------------------------------------------------------------------------------
# 2-D diagonal gates
# --------------------------------------------------------------------------------------------
BIG = 1e6  # beyond any transformed value: the half-plane polygon is open-ended in practice


class DiagonalFitter(Fitter):
    """params = [m1, s1, m2, s2, t]: the main cloud's modes and robust SDs on the two axes
    and the shoulder threshold of the projection ``sign1*(x1-m1)/s1 + sign2*(x2-m2)/s2``."""

    def fit(self, values, rng):
        return self.fit_full(values, rng)[0]

    def fit_full(self, values, rng):
        x1, x2 = (np.asarray(v, dtype=np.float64) for v in values[:2])
        ok = np.isfinite(x1) & np.isfinite(x2)
        x1, x2 = x1[ok], x2[ok]
        if len(x1) < self.bounds.min_events:
            raise FitFailure(f"only {len(x1)} events in the parent (need >= {self.bounds.min_events})")
        signs = self.options["signs"]
        params = []
        for x, s in zip((x1, x2), signs):
            lm = find_landmarks(x, self.options.get("min_peak", 0.05))
            p = lm.main
            # the width on the side the gate looks at (where the population of interest is not)
            sd = _robust_sd(p, "left" if s == "+" else "right")
            params += [p.position, sd]
        u = self.project(params, x1, x2)
        lm = find_landmarks(u, self.options.get("min_peak", 0.01))
        z = self.options.get("fallback_z", 4.0)
        how = f"main cloud + {z:g} SD along the diagonal"
        fallback = np.array([*params, lm.main.position + z * _robust_sd(lm.main, "left")])
        try:
            floor = lm.main.position + self.options.get("min_offset", 2.0) * _robust_sd(lm.main, "left")
            if self.options.get("cut") == "edge":
                # a pre-gate for a defining marker ANDed with it (FOXP3): only the main cloud's
                # bulk is cut off, the marker decides on what lies beyond (a shoulder would drop
                # the CD25-dim / CD127-int part of the Treg tail that FOXP3 would have kept)
                return np.array([*params, floor]), fallback, how
            t = _valley_beyond_main(lm)
            if t is not None and t < floor:  # a noise dip inside the main cloud
                t = None
            if t is None:
                lm.peaks = [lm.main]
                t = shoulder(
                    lm,
                    of="negative",
                    ratio=self.options.get("ratio", 2.0),
                    min_offset=self.options.get("min_offset", 2.0),
                )
        except FitFailure as exc:
            raise LandmarkFailure(str(exc), fallback, how) from None
        return np.array([*params, t]), fallback, how

    def project(self, params, x1, x2):
        m1, s1, m2, s2 = params[:4]
        k1, k2 = (1.0 if s == "+" else -1.0 for s in self.options["signs"])
        return k1 * (x1 - m1) / s1 + k2 * (x2 - m2) / s2

    def polygon(self, params) -> list[list[float]]:
        """The half-plane ``projection >= t`` as a (large) polygon in data coordinates."""
        m1, s1, m2, s2, t = (float(v) for v in params)
        k1, k2 = (1.0 if s == "+" else -1.0 for s in self.options["signs"])
        # boundary line: k1 (x - m1)/s1 + k2 (y - m2)/s2 = t  ->  y = m2 + s2 k2 (t - k1 (x - m1)/s1)
        xa, xb = m1 - BIG, m1 + BIG

        def y_at(x):
            return m2 + s2 * k2 * (t - k1 * (x - m1) / s1)

        ya, yb = y_at(xa), y_at(xb)
        # the side to keep: direction (k1/s1, k2/s2) from the line
        dx, dy = k1 / s1, k2 / s2
        norm = math.hypot(dx, dy)
        off = 4 * BIG * max(s1, s2)
        ox, oy = dx / norm * off, dy / norm * off
        return [[xa, ya], [xb, yb], [xb + ox, yb + oy], [xa + ox, ya + oy]]

    def describe(self, params):
        m1, s1, m2, s2, t = params
        a, b = (d.name for d in self.dims[:2])
        return f"{a} mode {m1:.3g} (SD {s1:.2g}), {b} mode {m2:.3g} (SD {s2:.2g}), diagonal >= {t:.3g} SD"

    def shift(self, params, reference):
        return float(abs(params[4] - reference[4]))

    def replacements(self, own, reference):
        # the modes and SDs are this file's landmarks (with its drift); another file's (a pooled
        # median) put the cut elsewhere on this one: first only the cut, relative to them
        ref = np.asarray(reference, dtype=np.float64)
        if own is None or len(own) != len(ref) or np.array_equal(own[:4], ref[:4]):
            return [ref]
        return [np.array([*np.asarray(own, dtype=np.float64)[:4], ref[4]]), ref]

    def default_spec(self):
        return None


class AllOfGate(Gate):
    """Events inside every part (a realized diagonal gate with extra thresholds)."""

    type = "all_of"

    def __init__(self, parts: list[Gate]):
        dims: list[Dim] = []
        for p in parts:
            dims += [d for d in p.dims if d not in dims]
        super().__init__(dims)
        self.parts = parts

    def contains(self, values):
        by_dim = dict(zip(self.dims, values))
        inside = None
        for p in self.parts:
            m = p.contains([by_dim[d] for d in p.dims])
            inside = m if inside is None else inside & m
        return inside

    def geometry(self) -> dict:
        from cytopipe.gating.spec import gate_to_dict

        return {"parts": [{"markers": p.markers, **gate_to_dict(p)} for p in self.parts]}

    def to_spec(self) -> dict:
        return {"type": "all_of", **self.geometry()}


class DiagonalGate(DataDrivenGate):
    """``diagonal``: a fitted half-plane on the first two markers AND ``auto`` thresholds on the
    others (``signs`` gives the side per marker)."""

    type = "diagonal"

    def __init__(self, dims, fitter: DiagonalFitter, extra: list, signs, optional=(), fraction=None):
        super().__init__(dims)
        self.fitter = fitter
        self.extra = extra  # one fitter per marker after the first two
        self.signs = list(signs)
        self.optional = tuple(optional)
        self.fraction = fraction

    def fit_items(self):
        return [("", self.fitter)] + [(f"[{f.dims[0].name}]", f) for f in self.extra]

    def fit_items_for(self, missing) -> list:
        """:meth:`fit_items` for a file lacking the markers ``missing``: without an optional extra
        marker, a diagonal cut at the main cloud's edge (``cut: edge``, a pre-gate for that marker)
        is cut at its shoulder instead, as the diagonal alone must then separate the population."""
        items = self.fit_items()
        if self.fitter.options.get("cut") == "edge" and any(f.dims[0].name in missing for f in self.extra):
            alone = dataclasses.replace(
                self.fitter, options={k: v for k, v in self.fitter.options.items() if k != "cut"}
            )
            items[0] = ("", alone)
        return items

    def realize(self, params):
        parts: list[Gate] = [PolygonGate(self.dims[:2], self.fitter.polygon(params[""]))]
        for f, s in zip(self.extra, self.signs[2:]):
            key = f"[{f.dims[0].name}]"
            if key not in params:  # an optional marker the file lacks
                continue
            t = float(params[key][0])
            parts.append(
                RectangleGate(f.dims, [t] if s == "+" else [None], [None] if s == "+" else [t], "range")
            )
        return parts[0] if len(parts) == 1 else AllOfGate(parts)

    def number_names(self) -> list[str]:
        """The names of the gate's numbers as a reviewer sees them: ``CD56 mode``, ``CD56 SD``,
        ``CD16 mode``, ``CD16 SD``, ``diagonal >=`` (offset along the diagonal, in robust SDs) and
        one threshold per extra marker (``FOXP3 >=``)."""
        a, b = (d.name for d in self.dims[:2])
        extra = [f"{f.dims[0].name} {'>=' if s == '+' else '<'}" for f, s in zip(self.extra, self.signs[2:])]
        return [f"{a} mode", f"{a} SD", f"{b} mode", f"{b} SD", "diagonal >=", *extra]

    def params_from_numbers(self, numbers) -> dict[str, np.ndarray]:
        """``realize()``'s params from the named numbers (see :meth:`number_names`; an extra
        marker's threshold may be missing: an optional marker the file lacked). ValueError when
        a diagonal number is missing or an SD is not > 0."""
        names = self.number_names()
        missing = [n for n in names[:5] if n not in numbers]
        if missing:
            raise ValueError(f"the diagonal gate's numbers {missing} are missing")
        chosen = {"": np.array([float(numbers[n]) for n in names[:5]])}
        if not min(chosen[""][1], chosen[""][3]) > 0:
            raise ValueError("the SDs of a diagonal gate must be > 0")
        for f, name in zip(self.extra, names[5:]):
            if name in numbers:
                chosen[f"[{f.dims[0].name}]"] = np.array([float(numbers[name])])
        return chosen

    def to_spec(self):
        spec = {"type": "diagonal", "signs": "".join(self.signs), **self.fitter.options_spec()}
        spec.pop("signs", None)
        spec["signs"] = "".join(self.signs)
        spec["bounds"] = self.fitter.bounds.to_spec()
        if self.fraction is not None:
            spec["bounds"]["fraction"] = list(self.fraction)
        if self.optional:
            spec["optional"] = list(self.optional)
        spec["pool"] = self.fitter.pool
        if self.extra:
            spec["thresholds"] = [f.to_spec() for f in self.extra]
        return spec


# --------------------------------------------------------------------------------------------
# scatter: the lymphocyte cluster relative to the events' own range
# --------------------------------------------------------------------------------------------
class LymphocyteFitter(DensestClusterFitter):
    """``lymphocytes``: among the dense clusters of FSC-A/SSC-A (2-D density peaks >= ``min_peak`` x
    the densest one above the debris range, on the events' 0.5-99.5 % range), not debris (FSC below
    ``debris`` of the FSC range), the one with the lowest SSC; refined on its trimmed core. With a
    dense debris cluster, the core and the gate stay above the FSC valley between it and the cells
    (as a lymphocyte gate is drawn above the debris)."""

    def fit(self, values, rng):
        from scipy.ndimage import gaussian_filter, maximum_filter

        x = np.column_stack([np.asarray(v, dtype=np.float64) for v in values])
        x = x[np.isfinite(x).all(axis=1)]
        if len(x) < self.bounds.min_events:
            raise FitFailure(f"only {len(x)} events in the parent (need >= {self.bounds.min_events})")
        xs = _subsample(x, self.options.get("max_events", 10_000), rng)
        box = [tuple(np.quantile(xs[:, j], [0.005, 0.995])) for j in range(2)]
        if any(b <= a for a, b in box):
            raise FitFailure("scatter values have no spread")
        hist, ex, ey = np.histogram2d(xs[:, 0], xs[:, 1], bins=64, range=box)
        hist = gaussian_filter(hist, 2.0)
        debris = box[0][0] + self.options.get("debris", 0.1) * (box[0][1] - box[0][0])
        cells = (ex[:-1] + ex[1:]) / 2 > debris  # histogram rows (FSC bins) above the debris range
        if not hist[cells].any():
            raise FitFailure("every event lies in the debris range (lowest FSC)")
        # "dense" is measured against the densest cluster of cells, not against the debris: where
        # debris dominates a file (56-79 % of SDY736's Ki67 tubes), its peak is 10x the lymphocytes'
        # and would leave no cluster of cells dense enough.
        local = (hist == maximum_filter(hist, size=7)) & (
            hist >= self.options.get("min_peak", 0.15) * hist[cells].max()
        )
        cand = np.argwhere(local)
        fx = (ex[cand[:, 0]] + ex[cand[:, 0] + 1]) / 2
        fy = (ey[cand[:, 1]] + ey[cand[:, 1] + 1]) / 2
        keep = fx > debris
        if not keep.any():
            raise FitFailure("every dense scatter cluster lies in the debris range (lowest FSC)")
        k = np.flatnonzero(keep)[np.argmin(fy[keep])]
        mean = np.array([fx[k], fy[k]])
        cov = np.diag([(ex[1] - ex[0]) * 3, (ey[1] - ey[0]) * 3]) ** 2
        if not (~keep).any():
            mean, cov = refine_core(xs, mean, cov, self.options.get("trim", 2.5), iterations=50)
            return np.concatenate([mean, cov.ravel()])
        # A dense debris cluster: the debris ends at the FSC valley between it and the chosen
        # cluster. Its events are left out of the core (a core growing to the cluster's size would
        # reach the far denser debris and slide onto it), and the gate's ellipse is narrowed along
        # FSC (correlation kept) so that it does not reach across the valley into the debris.
        lo = int(cand[~keep, 0].max())
        valley = lo + int(np.argmin(hist.sum(axis=1)[lo : cand[k, 0] + 1]))  # (already smoothed)
        cut = (ex[valley] + ex[valley + 1]) / 2
        mean, cov = refine_core(xs[xs[:, 0] > cut], mean, cov, self.options.get("trim", 2.5), iterations=50)
        if mean[0] <= cut:
            raise FitFailure("the lymphocyte cluster's centre lies in the debris (below the FSC valley)")
        reach = self._distance() * math.sqrt(cov[0, 0])
        if mean[0] - reach < cut:
            d = np.diag([(mean[0] - cut) / reach, 1.0])
            cov = d @ cov @ d
        return np.concatenate([mean, cov.ravel()])

    def _distance(self) -> float:
        """The gate's Mahalanobis distance (``distance``, or that of ``probability``)."""
        if "distance" in self.options:
            return float(self.options["distance"])
        return math.sqrt(chi2_quantile(self.options.get("probability", 0.95), 2))

    def shift(self, params, reference):
        # relative to the cluster's own width, not in instrument units
        k = len(self.dims)
        sd = np.sqrt(np.diag(np.asarray(reference[k:]).reshape(k, k)))
        return float(np.max(np.abs(params[:k] - reference[:k]) / sd))


def realize_threshold_gate(dims, t: float, side: str) -> RectangleGate:
    if side == "above":
        return RectangleGate(dims, [t], [None], style="range")
    return RectangleGate(dims, [None], [t], style="range")


__all__ = [
    "AllOfGate",
    "DiagonalFitter",
    "DiagonalGate",
    "Landmarks",
    "LandmarkFailure",
    "LymphocyteFitter",
    "ReferenceFitter",
    "RelativeThresholdFitter",
    "EllipseFitGate",
    "find_landmarks",
]
