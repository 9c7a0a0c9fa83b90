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
Transformed (arcsinh, logicle) axes are compared as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.report.gate_review import DIAGONAL_MARK, panel_arrays, panel_background

OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut-off for robust (modified) z-scores
MAD_TO_SD = 1.4826  # MAD of a normal distribution x 1.4826 = its SD
PARAM_FLOOR = 0.02  # scale floor of a gate parameter: 2% of its axis span
FREQ_FLOOR = 0.1  # scale floor of a frequency, on the logit scale (about 10% relative)

__all__ = ["FREQ_FLOOR", "MAD_TO_SD", "OUTLIER_Z", "PARAM_FLOOR", "gate_outliers", "linear_landmarks"]


def gate_outliers(
    review: pd.DataFrame, samples: pd.DataFrame | None = None, z: float = OUTLIER_Z
) -> pd.DataFrame:
    """Flagged and outlying gates, one row per sample x population.

    ``samples`` maps ``sample_id`` to ``patient_id`` and ``visit`` (e.g. population_stats); without
    it only the cohort comparison is made. For each gate, each of its numbers (every fitted
    threshold, ellipse centre or singlet ratio, and the frequency as logit of
    ``(count + 0.5) / (parent_count + 1)``) gets two robust z-scores:

    * vs the cohort: ``(v - median) / s``, ``s = max(1.4826 MAD, floor)`` over all samples;
    * vs the patient's other visits: ``(v - median of the patient's other visits) / s_w``, where
      ``s_w = max(1.4826 median |v - median of other visits|, floor)`` over all samples (needs >= 2
      other visits of the patient).

    Floors: 2% of the axis span for gate numbers, 0.1 on the logit scale for frequencies. A gate
    is an outlier when any |z| > ``z`` (3.5). A population not measured in a sample (``source``
    "not measured") is neither flagged nor an outlier there and takes no part in the others'
    z-scores (its ``pct_parent`` and ``score`` are NaN). Columns: ``sample_id, population, patient_id,
    visit, pct_parent, flagged, flags, outlier, score`` (largest |z|), ``reasons``.
    """
    first = review[review["panel"] == 0].copy()
    first = first.drop_duplicates(["sample_id", "population"])
    if samples is not None and len(samples):
        meta = samples[["sample_id", "patient_id", "visit"]].drop_duplicates("sample_id")
        first = first.merge(meta, on="sample_id", how="left")
    else:
        first["patient_id"] = None
        first["visit"] = np.nan
    out = []
    for population, g in first.groupby("population", sort=False):
        g = g.reset_index(drop=True)
        quantities = _quantities(g)
        score = np.zeros(len(g))
        reasons: list[list[str]] = [[] for _ in range(len(g))]
        unmeasured = (g["source"].astype(str) == "not measured").to_numpy() if "source" in g else False
        for label, values, floor, text in quantities:
            values = np.where(unmeasured, np.nan, values)  # no number: a marker is not in the file
            zc = _cohort_z(values, floor)
            zp = _patient_z(values, g["patient_id"], g["visit"], floor)
            for kind, zz in (("cohort", zc), ("patient's other visits", zp)):
                hit = np.abs(zz) > z
                score = np.fmax(score, np.nan_to_num(np.abs(zz)))
                for i in np.flatnonzero(hit):
                    reasons[i].append(f"{label} {text(i)} is an outlier vs the {kind} (z={zz[i]:+.1f})")
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


def _quantities(g: pd.DataFrame) -> list[tuple[str, np.ndarray, float, Any]]:
    """(label, values compared, scale floor, text of sample i's value) of every number compared
    for one gate. A number on a linear axis is compared relative to the sample's own landmark
    there (:func:`linear_landmarks`), and its text says so."""
    out: list[tuple[str, np.ndarray, float, Any]] = []
    count = g["count"].astype("float64").to_numpy()  # not measured: NaN (a nullable Int64 NA)
    parent = g["parent_count"].astype("float64").to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (count + 0.5) / (parent + 1.0)
        logit = np.log(frac / (1 - frac))
    out.append(("frequency", logit, FREQ_FLOOR, lambda i: f"{100 / (1 + np.exp(-logit[i])):.2f}%"))
    lengths = g["params"].map(len)
    k = int(lengths.max()) if len(g) else 0
    if k == 0:
        return out
    names = g["param_names"].iloc[int(np.argmax(lengths.to_numpy()))]
    landmarks = [linear_landmarks(row) for row in g.to_dict("records")]
    for j in range(k):
        if str(names[j]).endswith(DIAGONAL_MARK):
            continue
        vals = np.array([p[j] if len(p) > j else np.nan for p in g["params"]], dtype=float)
        spans = np.array([s[j] if len(s) > j else np.nan for s in g["param_spans"]], dtype=float)
        label = f"threshold {names[j]}"
        dim = _linear_dim(str(names[j]), landmarks)
        if dim is not None:  # raw detector units: relative to the sample's own events
            marks = np.array([lm.get(dim, np.nan) for lm in landmarks], dtype=float)
            raw = vals
            vals, spans = vals / marks, spans / marks
            out.append((label, vals, PARAM_FLOOR * _median_span(spans, vals),
                        _relative_text(raw, vals, dim)))  # fmt: skip
            continue
        out.append((label, vals, PARAM_FLOOR * _median_span(spans, vals), _plain_text(vals)))
    return out


def _median_span(spans: np.ndarray, vals: np.ndarray) -> float:
    """The median axis span; without spans (e.g. singlet ratios) the median |value|."""
    if np.isfinite(spans).any():
        return float(np.nanmedian(spans))
    return float(np.nanmedian(np.abs(vals))) if np.isfinite(vals).any() else 1.0


def _plain_text(vals: np.ndarray) -> Any:
    return lambda i: f"{vals[i]:.3g}"


def _relative_text(raw: np.ndarray, rel: np.ndarray, dim: str) -> Any:
    return lambda i: f"{raw[i]:.3g} ({rel[i]:.3g} x the sample's median {dim})"


def _linear_dim(name: str, landmarks: list[dict[str, float]]) -> str | None:
    """The linear axis a gate number belongs to (``"FSC-A centre"`` -> ``"FSC-A"``), when the
    samples' panels have a landmark on it; else None."""
    dims = {d for lm in landmarks for d in lm}
    found = [d for d in dims if name.startswith(d + " ")]
    return max(found, key=len) if found else None


def linear_landmarks(row: Mapping[str, Any]) -> dict[str, float]:
    """Axis name -> the median of the parent's events on that axis, for every *linear* axis of a
    gate-review panel (from its histogram: every parent event when the panel shows part of
    them); an axis without events (or a median not above 0) has none."""
    out: dict[str, float] = {}
    if not row.get("x") or not len(row.get("x_range", [])):
        return out
    xe, ye, counts = panel_arrays(row)
    background = panel_background(row)
    if background.size:
        counts = background
    for axis, edges in (("x", xe), ("y", ye)):
        name, scale = row.get(axis), row.get(f"{axis}_scale")
        if not name or scale != "linear" or not len(edges):
            continue
        marginal = counts if counts.ndim == 1 else counts.sum(axis=0 if axis == "x" else 1)
        median = _histogram_median(np.asarray(marginal, dtype=float), edges)
        if np.isfinite(median) and median > 0:
            out[str(name)] = median
    return out


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
