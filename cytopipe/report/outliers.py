"""The gate outlier rule: which samples' gates look unusual (docs/reports.md, "The outlier rule").

Every gate's numbers (thresholds, ellipse centres, singlet ratios) and its frequency are compared
with the same gate of the cohort and of the patient's other visits by robust z-scores, on the
gate-review table (:mod:`cytopipe.report.gate_review`).

Like is compared with like: a number on a *linear* axis (the scatter channels, in the detector's
raw units) is divided by the sample's own landmark on that axis, the median of the parent's events
there (from the panel's histogram), before it is compared. Cytometers record scatter in units of
their own range (an 18-bit instrument's FSC-A is some 8-24 times smaller than a 22-bit one's), so
in raw units an ordinary sample of another instrument in a multi-site study looked like an
outlier; relative to its own events it does not, while a gate moved away from the events still is.
The singlet wedge's area/height ratios likewise are divided by the sample's own median
FSC-A/FSC-H of the parent's events (:func:`ratio_landmarks`, from the panel's histogram): the
ratio of single cells depends on the instrument's pulse shape and detector electronics (1.06 on
one site, 1.30 and 1.39 on the others of one simulated study), so in raw ratios every ordinary
wedge of a site was an outlier (|z| up to 9).

A number on a *transformed* (arcsinh, logicle: fluorescence) axis is an outlier only when it is
unusual both in display units and relative to the sample's own events on that axis: its position
between the parent's negative peak (0) and the parent's 98th percentile (1), both from the panel's
histogram (:func:`fluorescence_landmarks`). Each instrument has its own brightness, negative spread
and transform scale, so an ordinary threshold of another instrument is unusual in display units
but not relative to its events; in one instrument's study the display units are the steadier
frame (the 98th percentile moves with a rare population's share, e.g. dead cells on the viability
dye), and relative to the events a gate that moved with them (a sample whose whole distribution
sits lower) is not an outlier. A gate moved away from its events (by hand, into another valley) is
unusual in both and still flagged.

On a study of several sites (the manifest's ``site``: where a file was measured, so its
instrument), a fluorescence threshold's display-unit z is taken against the files of its own site
when the site has at least ``MIN_SITE`` (4) of them (:func:`_site_z`; :func:`with_site` adds the
site from samples.parquet): the instruments' display units differ, and against the whole study a
CD4 threshold moved by hand stayed inside their spread (seed 11: 8 of 36 moves flagged, now 36).
The other frames still compare the whole study.

A threshold set in the negative's tail (on the cohort's median at most ``TAIL_K`` = 4 robust SDs of
the parent's negative above its peak, e.g. an FMO's 99.5th percentile or a shoulder of the
negative: where a Gaussian negative ends) is also judged as a cytometrist judges it: how far into
the tail, in SDs of the sample's own negative (:func:`fluorescence_landmarks`; linear units of the
axis, so whatever the file's arcsinh cofactor). Such a threshold is an outlier only when it is
unusual in that frame too. On an instrument whose negative is wide, a correct threshold sits
further from the negative peak in display units and between the negative and the 98th percentile
(multi-instrument study seed 7, site S3: CXCR3 |z| 5.3) while it is as many of its negative's SDs
above the peak as everyone's; a threshold moved by hand is unusual in all three frames. A
threshold further out (a valley between populations: CD4, CD3) is placed against the positive
population, not the negative's width, and keeps the two frames above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cytopipe.report.gate_review import DIAGONAL_MARK, panel_arrays, panel_background

OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut-off for robust (modified) z-scores
MAD_TO_SD = 1.4826  # MAD of a normal distribution x 1.4826 = its SD
PARAM_FLOOR = 0.02  # scale floor of a gate parameter: 2% of its axis span
FREQ_FLOOR = 0.1  # scale floor of a frequency, on the logit scale (about 10% relative)
BRIGHT_QUANTILE = 0.98  # the parent's bright end on a fluorescence axis (the landmark at 1)
TAIL_K = 4.0  # a threshold at most this many negative SDs above the negative peak sits in its tail
TAIL_FLOOR = 0.25  # scale floor of a threshold's place in the negative's tail, in its SDs
MIN_SITE = 4  # files of a site needed to judge its thresholds against the site alone
MIN_BELOW = 20  # events below the negative peak needed to read the negative's robust SD

__all__ = ["FREQ_FLOOR", "MAD_TO_SD", "OUTLIER_Z", "PARAM_FLOOR", "TAIL_K", "FluorescenceMarks",
           "fluorescence_landmarks", "gate_outliers", "linear_landmarks", "ratio_landmarks", "with_site"]  # fmt: skip


def with_site(meta: pd.DataFrame, samples: pd.DataFrame | None) -> pd.DataFrame:
    """``meta`` (sample_id, patient_id, visit) with each sample's ``site`` from the run's samples
    table (the manifest's), when it has one: :func:`gate_outliers` judges a fluorescence threshold
    in display units against the files of its own site (its instrument)."""
    if samples is None or "site" not in samples.columns or "site" in meta.columns:
        return meta
    sites = samples[["sample_id", "site"]].drop_duplicates("sample_id")
    return meta.merge(sites, on="sample_id", how="left")


def gate_outliers(
    review: pd.DataFrame, samples: pd.DataFrame | None = None, z: float = OUTLIER_Z
) -> pd.DataFrame:
    """Flagged and outlying gates, one row per sample x population.

    ``samples`` maps ``sample_id`` to ``patient_id`` and ``visit`` (e.g. population_stats), and to
    ``site`` when it has that column (:func:`with_site`); without it only the cohort comparison is
    made. For each gate, each of its numbers (every fitted
    threshold, ellipse centre or singlet ratio, and the frequency as logit of
    ``(count + 0.5) / (parent_count + 1)``) gets two robust z-scores:

    * vs the cohort: ``(v - median) / s``, ``s = max(1.4826 MAD, floor)`` over all samples;
    * vs the patient's other visits: ``(v - median of the patient's other visits) / s_w``, where
      ``s_w = max(1.4826 median |v - median of other visits|, floor)`` over all samples (needs >= 2
      other visits of the patient).

    Floors: 2% of the axis span for gate numbers, 0.1 on the logit scale for frequencies. A number
    on a linear (scatter) axis is compared relative to the parent's median there, a singlet ratio
    relative to the parent's median area/height ratio; one on a
    transformed (fluorescence) axis gets each z-score twice, in display units and relative to the
    parent's landmarks there (negative peak 0, 98th percentile 1), and keeps the smaller |z| (the
    display one where the panel gives no landmarks); a threshold in the negative's tail (cohort
    median at most ``TAIL_K`` negative SDs above the peak) gets it a third time, in SDs of the
    sample's negative above its peak, and keeps the smallest. The display-unit cohort z of such a
    number is taken within the sample's ``site`` when it has at least ``MIN_SITE`` samples and the
    study has two or more sites. A gate is an outlier when any |z| > ``z``
    (3.5). A population not measured in a sample (``source``
    "not measured") is neither flagged nor an outlier there and takes no part in the others'
    z-scores (its ``pct_parent`` and ``score`` are NaN). Columns: ``sample_id, population, patient_id,
    visit, pct_parent, flagged, flags, outlier, score`` (largest |z|), ``reasons``.
    """
    first = review[review["panel"] == 0].copy()
    first = first.drop_duplicates(["sample_id", "population"])
    if samples is not None and len(samples):
        columns = ["sample_id", "patient_id", "visit"] + (["site"] if "site" in samples.columns else [])
        meta = samples[columns].drop_duplicates("sample_id")
        first = first.merge(meta, on="sample_id", how="left")
    else:
        first["patient_id"] = None
        first["visit"] = np.nan
    later = review[review["panel"] != 0]  # e.g. Treg's FOXP3 panel: its axis's landmarks
    out = []
    for population, g in first.groupby("population", sort=False):
        g = g.reset_index(drop=True)
        quantities = _quantities(g, later[later["population"] == population])
        score = np.zeros(len(g))
        reasons: list[list[str]] = [[] for _ in range(len(g))]
        unmeasured = (g["source"].astype(str) == "not measured").to_numpy() if "source" in g else False
        for label, values, floor, text, relative in quantities:
            values = np.where(unmeasured, np.nan, values)  # no number: a marker is not in the file
            zc = _cohort_z(values, floor)
            by_site = np.zeros(len(g), dtype=bool)
            if relative and "site" in g:  # fluorescence: display units vs the sample's own instrument
                zc, by_site = _site_z(values, g["site"], floor, zc)
            zp = _patient_z(values, g["patient_id"], g["visit"], floor)
            for rel, rel_floor in relative:  # fluorescence: unusual in display units AND vs its events
                rel = np.where(unmeasured, np.nan, rel)
                zc = _in_both(zc, _cohort_z(rel, rel_floor))
                zp = _in_both(zp, _patient_z(rel, g["patient_id"], g["visit"], rel_floor))
            for kind, zz in (("cohort", zc), ("patient's other visits", zp)):
                hit = np.abs(zz) > z
                score = np.fmax(score, np.nan_to_num(np.abs(zz)))
                for i in np.flatnonzero(hit):
                    # the display-unit comparison was with the sample's own site's files: say so
                    where = (
                        f", in display units vs site {g['site'].iloc[i]}'s files"
                        if kind == "cohort" and by_site[i]
                        else ""
                    )
                    reasons[i].append(
                        f"{label} {text(i)} is an outlier vs the {kind}{where} (z={zz[i]:+.1f})"
                    )
        flagged = (g["flags"].fillna("").astype(str) != "") & ~unmeasured
        score = np.where(unmeasured, np.nan, score)  # not measured: no score, not 0 (not outlying)
        out.append(
            pd.DataFrame(
                {
                    "sample_id": g["sample_id"],
                    "population": population,
                    "patient_id": g["patient_id"],
                    "visit": g["visit"],
                    "pct_parent": g["pct_parent"],
                    "flagged": flagged.to_numpy(),
                    "flags": g["flags"].fillna(""),
                    "outlier": [bool(r) for r in reasons],
                    "score": score,
                    "reasons": ["; ".join(r) for r in reasons],
                }
            )
        )
    if not out:
        cols = ["sample_id", "population", "patient_id", "visit", "pct_parent", "flagged", "flags",
                "outlier", "score", "reasons"]  # fmt: skip
        return pd.DataFrame(columns=cols)
    return pd.concat(out, ignore_index=True)


Quantity = tuple[str, np.ndarray, float, Any, "list[tuple[np.ndarray, float]]"]


def _quantities(g: pd.DataFrame, later: pd.DataFrame | None = None) -> list[Quantity]:
    """(label, values compared, scale floor, text of sample i's value, relative) of every number
    compared for one gate (``g``: its panel-0 rows; ``later``: its other panels). A number on a
    linear axis is compared relative to the sample's own landmark there
    (:func:`linear_landmarks`), a ratio relative to the sample's median ratio
    (:func:`ratio_landmarks`), and its text says so; one on a transformed axis also gets
    ``relative`` frames = [(its position between the parent's landmarks there,
    :func:`fluorescence_landmarks`, and that frame's floor)], and a threshold in the negative's tail
    also [(its place in the tail, in negative SDs, and ``TAIL_FLOOR``)]; else []."""
    out: list[Quantity] = []
    count = g["count"].astype("float64").to_numpy()  # not measured: NaN (a nullable Int64 NA)
    parent = g["parent_count"].astype("float64").to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (count + 0.5) / (parent + 1.0)
        logit = np.log(frac / (1 - frac))
    out.append(("frequency", logit, FREQ_FLOOR, lambda i: f"{100 / (1 + np.exp(-logit[i])):.2f}%", []))
    lengths = g["params"].map(len)
    k = int(lengths.max()) if len(g) else 0
    if k == 0:
        return out
    names = g["param_names"].iloc[int(np.argmax(lengths.to_numpy()))]
    rows = g.to_dict("records")
    # each panel's histogram arrays once (the three kinds of landmarks read them; 66,519 panels of
    # 3,501 files: the arrays made again for each kind were a third of the report's outlier check)
    arrays = [_panel_arrays(row) for row in rows]
    marginals = [_marginals(row, a) for row, a in zip(rows, arrays)]
    landmarks = [linear_landmarks(row, m) for row, m in zip(rows, marginals)]
    ratios = [ratio_landmarks(row, a) for row, a in zip(rows, arrays)]
    fluorescence = _fluorescence_marks(rows, later, marginals)
    for j in range(k):
        if str(names[j]).endswith(DIAGONAL_MARK):
            continue
        vals = np.array([p[j] if len(p) > j else np.nan for p in g["params"]], dtype=float)
        spans = np.array([s[j] if len(s) > j else np.nan for s in g["param_spans"]], dtype=float)
        label = f"threshold {names[j]}"
        floor = PARAM_FLOOR * _median_span(spans, vals)
        dim = _axis_of(str(names[j]), ratios)
        if dim is not None:  # a singlet ratio: relative to the sample's own median ratio
            marks = np.array([lm.get(dim, np.nan) for lm in ratios], dtype=float)
            raw = vals
            vals = vals / marks
            out.append(
                (label, vals, PARAM_FLOOR * _median_span(spans, vals), _relative_text(raw, vals, dim), [])
            )
            continue
        dim = _axis_of(str(names[j]), landmarks)
        if dim is not None:  # raw detector units: relative to the sample's own events
            marks = np.array([lm.get(dim, np.nan) for lm in landmarks], dtype=float)
            raw = vals
            vals, spans = vals / marks, spans / marks
            out.append((label, vals, PARAM_FLOOR * _median_span(spans, vals),
                        _relative_text(raw, vals, dim), []))  # fmt: skip
            continue
        dim = _axis_of(str(names[j]), fluorescence)
        if dim is not None:  # transformed units: also relative to the sample's negative and bright end
            marks = [lm.get(dim) for lm in fluorescence]
            negative = np.array([m.negative if m else np.nan for m in marks])
            unit = np.array([m.bright if m else np.nan for m in marks]) - negative
            with np.errstate(divide="ignore", invalid="ignore"):
                rel, rel_spans = (vals - negative) / unit, spans / unit
            tail = np.array([m.tail(v) if m else np.nan for m, v in zip(marks, vals)])
            if np.isfinite(rel).sum() >= 3:
                frames = [(rel, PARAM_FLOOR * _median_span(rel_spans, rel))]
                if np.isfinite(tail).sum() >= 3 and np.nanmedian(tail) <= TAIL_K:  # in the negative's tail
                    frames.append((tail, TAIL_FLOOR))
                else:
                    tail = None
                out.append((label, vals, floor, _between_text(vals, rel, dim, tail), frames))
                continue
        out.append((label, vals, floor, _plain_text(vals), []))
    return out


def _in_both(display: np.ndarray, relative: np.ndarray) -> np.ndarray:
    """z of a number that must be unusual in display units and relative to its sample's events:
    the one of the two with the smaller |z|; the display z where the relative one is missing
    (no landmarks)."""
    smaller = np.abs(relative) < np.abs(display)  # False where either is NaN
    return np.where(smaller, relative, display)


def _median_span(spans: np.ndarray, vals: np.ndarray) -> float:
    """The median axis span; without spans (e.g. singlet ratios) the median |value|."""
    if np.isfinite(spans).any():
        return float(np.nanmedian(spans))
    return float(np.nanmedian(np.abs(vals))) if np.isfinite(vals).any() else 1.0


def _plain_text(vals: np.ndarray) -> Any:
    return lambda i: f"{vals[i]:.3g}"


def _relative_text(raw: np.ndarray, rel: np.ndarray, dim: str) -> Any:
    return lambda i: f"{raw[i]:.3g} ({rel[i]:.3g} x the sample's median {dim})"


def _between_text(vals: np.ndarray, rel: np.ndarray, dim: str, tail: np.ndarray | None = None) -> Any:
    def text(i: int) -> str:
        if not np.isfinite(rel[i]):
            return f"{vals[i]:.3g}"
        where = f"{rel[i]:.2f} of the way from the sample's negative {dim} peak to its 98th percentile"
        if tail is not None and np.isfinite(tail[i]):
            where += f", {tail[i]:.2f} SDs of that negative above its peak"
        return f"{vals[i]:.3g} ({where})"

    return text


def _axis_of(name: str, landmarks: list[Mapping[str, Any]]) -> str | None:
    """The axis a gate number belongs to (``"FSC-A centre"`` -> ``"FSC-A"``, ``"CD4 >="`` ->
    ``"CD4"``), when the samples' panels have landmarks on it; else None."""
    dims = {d for lm in landmarks for d in lm}
    found = [d for d in dims if name.startswith(d + " ")]
    return max(found, key=len) if found else None


def linear_landmarks(
    row: Mapping[str, Any], marginals: Mapping[str, tuple] | None = None
) -> dict[str, float]:
    """Axis name -> the median of the parent's events on that axis, for every *linear* axis of a
    gate-review panel (from its histogram: every parent event when the panel shows part of
    them); an axis without events (or a median not above 0) has none. ``marginals``: the row's
    :func:`_marginals`, when the caller has them."""
    out: dict[str, float] = {}
    for name, (marginal, edges, scale) in (_marginals(row) if marginals is None else marginals).items():
        if scale != "linear":
            continue
        median = _histogram_median(marginal, edges)
        if np.isfinite(median) and median > 0:
            out[name] = median
    return out


def ratio_landmarks(row: Mapping[str, Any], arrays: tuple | None = None) -> dict[str, float]:
    """``"x/y"`` (e.g. ``"FSC-A/FSC-H"``) -> the median x/y ratio of the parent's events, for a 2-D
    gate-review panel (from its histogram: every parent event when the panel shows part of them;
    each bin's events at its centre's ratio, bins whose y centre is not above 0 left out); a panel
    without such events has none. The singlet wedge's area/height ratios are compared relative
    to it: the ratio of single cells depends on the instrument (pulse shape, detector
    electronics), so on a multi-instrument study every ordinary wedge of one site looked like an
    outlier in raw ratios. ``arrays``: the row's :func:`_panel_arrays`, when the caller has them."""
    if not row.get("x") or not row.get("y") or not len(row.get("x_range", [])) or not int(row["y_bins"]):
        return {}
    xe, ye, counts = _panel_arrays(row) if arrays is None else arrays
    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
    ratio = xc[None, :] / np.where(yc > 0, yc, np.nan)[:, None]
    ok = np.isfinite(ratio) & (counts > 0)
    if not ok.any():
        return {}
    r, w = ratio[ok], counts[ok].astype(float)
    order = np.argsort(r, kind="stable")
    cum = np.cumsum(w[order])
    median = float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])
    return {f"{row['x']}/{row['y']}": median} if median > 0 else {}


def _panel_arrays(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(x edges, y edges, the parent's events per bin)`` of one panel: its counts, or every parent
    event when the panel shows part of them; None for a panel without an axis."""
    if not row.get("x") or not len(row.get("x_range", [])):
        return None
    xe, ye, counts = panel_arrays(row)
    background = panel_background(row)
    return xe, ye, (background if background.size else counts)


def _marginals(
    row: Mapping[str, Any], arrays: tuple | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Axis name -> (the parent's events per bin on that axis, bin edges, scale) of one panel
    (every parent event when the panel shows part of them). ``arrays``: the row's
    :func:`_panel_arrays`, when the caller has them."""
    out: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    if not row.get("x") or not len(row.get("x_range", [])):
        return out
    xe, ye, counts = _panel_arrays(row) if arrays is None else arrays
    for axis, edges in (("x", xe), ("y", ye)):
        name, scale = row.get(axis), str(row.get(f"{axis}_scale") or "")
        if not name or not len(edges):
            continue
        marginal = counts if counts.ndim == 1 else counts.sum(axis=0 if axis == "x" else 1)
        out[str(name)] = (np.asarray(marginal, dtype=float), edges, scale)
    return out


class FluorescenceMarks(NamedTuple):
    """Landmarks of the parent's events on one transformed axis of a sample."""

    negative: float  # the negative peak, display units
    bright: float  # the 98th percentile, display units
    scale: str  # the axis's transform, e.g. "arcsinh(x/640)"
    spread: float  # the negative's robust SD in the axis's linear units (NaN: unknown)

    def tail(self, value: float) -> float:
        """How far ``value`` (display units) is above the negative peak, in the negative's SDs."""
        linear = _to_linear(self.scale)
        return float((linear(value) - linear(self.negative)) / self.spread)


def fluorescence_landmarks(
    rows: list[Mapping[str, Any]], marginals: Mapping[str, tuple] | None = None
) -> dict[str, FluorescenceMarks]:
    """Axis name -> the landmarks of the parent's events (:class:`FluorescenceMarks`), for every
    *transformed* axis of one sample's panels of a gate (``rows``; the first panel showing an axis
    gives it). The negative peak is the lowest density peak at least a tenth as tall as the
    tallest (the gating engine's ``negative`` landmark), on the histogram smoothed over one bin;
    an axis with too few events, or whose 98th percentile is not above that peak, has none.

    The negative's robust SD is read from the events below its peak (the mirror of its lower half,
    where no positive cells are, as the engine reads an arcsinh cofactor): their median distance
    below the peak / 0.6745, in the axis's linear units (an ``arcsinh(x/c)`` axis back-transformed,
    so it does not depend on the file's cofactor; another transform: display units); NaN with fewer
    than ``MIN_BELOW`` events below the peak. ``marginals``: the first row's :func:`_marginals`,
    when the caller has them."""
    out: dict[str, FluorescenceMarks] = {}
    for i, row in enumerate(rows):
        for name, (counts, edges, scale) in (
            _marginals(row) if i or marginals is None else marginals
        ).items():
            if name in out or scale in ("", "linear"):
                continue
            marks = _negative_and_bright(counts, edges)
            if marks is not None:
                out[name] = FluorescenceMarks(*marks, scale, _negative_spread(counts, edges, marks[0], scale))
    return out


def _to_linear(scale: str) -> Any:
    """Display -> linear units of an ``arcsinh(x/c)`` axis (the gate-review's scale text); on
    another transform the display units themselves."""
    m = re.fullmatch(r"arcsinh\(x/([0-9.eE+-]+)\)", scale)
    if m is None:
        return lambda t: t
    cofactor = float(m.group(1))
    return lambda t: cofactor * np.sinh(t)


def _negative_spread(counts: np.ndarray, edges: np.ndarray, negative: float, scale: str) -> float:
    """The negative's robust SD in linear units (see :func:`fluorescence_landmarks`)."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    below = float(np.interp(negative, edges, cum))
    if below < MIN_BELOW:
        return float("nan")
    linear = _to_linear(scale)
    half = float(np.interp(0.5 * below, cum, edges))  # the median of the events below the peak
    sd = float(linear(negative) - linear(half)) / 0.6745
    return sd if sd > 0 else float("nan")


def _negative_and_bright(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float] | None:
    from cytopipe.peaks import find_peaks  # not the gating package: the report does not import its engine

    if counts.sum() < 20 or len(counts) < 3:
        return None
    kernel = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    dens = np.convolve(counts, kernel / kernel.sum(), mode="same")
    peaks = find_peaks(dens, 0.05)
    if not len(peaks):
        return None
    i = int(next(p for p in peaks if dens[p] >= 0.1 * dens[peaks].max()))
    width = float(edges[1] - edges[0])
    centre = float(edges[i]) + 0.5 * width
    if 0 < i < len(dens) - 1:  # the vertex of the parabola through the peak's three bins
        a, b, c = dens[i - 1], dens[i], dens[i + 1]
        if a - 2 * b + c < 0:
            centre += 0.5 * (a - c) / (a - 2 * b + c) * width
    bright = _histogram_quantile(counts, edges, BRIGHT_QUANTILE)
    return (centre, bright) if bright > centre else None


def _fluorescence_marks(
    rows: list[Mapping[str, Any]], later: pd.DataFrame | None, marginals: list[Mapping[str, tuple]]
) -> list[dict[str, FluorescenceMarks]]:
    """:func:`fluorescence_landmarks` of each sample of ``rows`` (panel 0; ``marginals``: theirs),
    with its other panels."""
    more: dict[str, list[Mapping[str, Any]]] = {}
    if later is not None and len(later):
        for row in later.sort_values("panel", kind="stable").to_dict("records"):
            more.setdefault(str(row["sample_id"]), []).append(row)
    return [
        fluorescence_landmarks([row, *more.get(str(row["sample_id"]), [])], m)
        for row, m in zip(rows, marginals)
    ]


def _histogram_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The ``q``-quantile of binned values (linear within each bin)."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    return float(np.interp(q * cum[-1], cum, edges)) if cum[-1] > 0 else float("nan")


def _histogram_median(counts: np.ndarray, edges: np.ndarray) -> float:
    """The median of binned values (linear within the bin that holds it)."""
    total = counts.sum()
    if total <= 0:
        return float("nan")
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, total / 2))
    before = cum[i - 1] if i else 0.0
    share = (total / 2 - before) / counts[i] if counts[i] else 0.0
    return float(edges[i] + share * (edges[i + 1] - edges[i]))


def _cohort_z(values: np.ndarray, floor: float) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if len(finite) < 3:
        return np.full(len(values), np.nan)
    med = np.median(finite)
    scale = max(MAD_TO_SD * float(np.median(np.abs(finite - med))), floor)
    return (values - med) / scale


def _site_z(
    values: np.ndarray, sites: pd.Series, floor: float, study_z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Robust z of each value vs the other files of its own site (its instrument), for the sites
    with at least ``MIN_SITE`` values; ``study_z`` for the others (and a one-site study). Also
    which values were judged against their site."""
    z = study_z.copy()
    by_site = np.zeros(len(values), dtype=bool)
    keys = sites.fillna("").astype(str).to_numpy()
    named = sorted(set(keys) - {""})
    if len(named) < 2:
        return z, by_site
    for key in named:
        idx = np.flatnonzero(keys == key)
        finite = values[idx][np.isfinite(values[idx])]
        if len(finite) < MIN_SITE:
            continue
        med = np.median(finite)
        scale = max(MAD_TO_SD * float(np.median(np.abs(finite - med))), floor)
        z[idx] = (values[idx] - med) / scale
        by_site[idx] = True
    return z, by_site


def _patient_z(values: np.ndarray, patients: pd.Series, visits: pd.Series, floor: float) -> np.ndarray:
    """Robust z of each value vs the median of the same patient's other visits."""
    z = np.full(len(values), np.nan)
    if patients.isna().all():
        return z
    frame = pd.DataFrame({"p": patients.astype(str), "v": visits, "x": values, "i": np.arange(len(values))})
    frame = frame[patients.notna().to_numpy()]
    frame["slot"] = frame.groupby("p").cumcount()
    wide = frame.pivot(index="p", columns="slot", values="x").to_numpy(float)
    pos = frame.pivot(index="p", columns="slot", values="i").to_numpy(float)
    loo = np.full(wide.shape, np.nan)
    for j in range(wide.shape[1]):
        others = np.delete(wide, j, axis=1)
        enough = np.isfinite(others).sum(axis=1) >= 2
        if enough.any():
            loo[enough, j] = np.nanmedian(others[enough], axis=1)
    dev = wide - loo
    finite = np.abs(dev[np.isfinite(dev)])
    if not len(finite):
        return z
    scale = max(MAD_TO_SD * float(np.median(finite)), floor)
    ok = np.isfinite(pos)
    z[pos[ok].astype(int)] = (dev / scale)[ok]
    return z
