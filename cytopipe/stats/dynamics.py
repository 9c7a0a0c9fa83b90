"""Per-patient dynamics of any population measure: change from baseline, log2 fold, time-averaged AUC,
and Wilson intervals for gated frequencies.

Works on any table shaped like ``population_stats`` (gated populations, or FlowSOM metacluster
abundances with ``population`` = metacluster name): ``patient_id, visit, arm, population`` and the
measure column (``pct_parent`` or a ``median_<marker>`` column); ``parent``, ``count``,
``parent_count`` and ``sample_id`` are used when present.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cytopipe.errors import StatisticsError
from cytopipe.intervals import wilson_interval

KEY_COLUMNS = ("patient_id", "visit", "arm", "population")
#: default pseudo-count added before log2 for measures without event counts (same units as the measure)
DEFAULT_PSEUDOCOUNT = {"pct": 0.01, "other": 1.0}


def check_population_table(table: pd.DataFrame, measures: Sequence[str] = ("pct_parent",)) -> pd.DataFrame:
    """A typed copy (text ids, integer visits, float measures) or :class:`StatisticsError` naming the
    missing column or the first bad row."""
    if not isinstance(table, pd.DataFrame):
        raise StatisticsError(
            f"expected a pandas DataFrame of population statistics, got {type(table).__name__}"
        )
    missing = [c for c in (*KEY_COLUMNS, *measures) if c not in table.columns]
    if missing:
        hint = ""
        if any(m.startswith("median_") for m in missing):
            have = [c for c in table.columns if c.startswith("median_")]
            hint = f"; median columns present: {have}"
        raise StatisticsError(
            f"population table lacks column(s) {missing}; it needs {list(KEY_COLUMNS)} and each measure{hint}",
            column=missing[0],
        )
    out = table.copy()
    for column in ("patient_id", "arm", "population"):
        bad = out[column].isna()
        if bad.any():
            raise StatisticsError(f"{column} is empty", row=_label(out, bad), column=column)
        # ids and arms without surrounding spaces, as the clinical table reads them ("P001 " is
        # "P001" there): otherwise the patient would silently miss its clinical rows
        out[column] = out[column].astype(str).str.strip()
    from cytopipe.clinical import visit_weeks

    visit, refused = visit_weeks(out["visit"])  # numbers, or W4 / Day 28 / BL (manifest.parse_visit)
    bad = visit.isna()
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise StatisticsError(
            refused.get(first) or "visit is empty; every row needs its study week",
            row=_label(out, bad),
            column="visit",
        )
    out["visit"] = visit.round().astype("int64")
    arms = out.groupby("patient_id", sort=True)["arm"].unique()
    changed = arms[arms.map(len) > 1]
    if len(changed):  # a mislabelled sample: the patient would count in two arms
        patient, names = changed.index[0], list(changed.iloc[0])
        where = out[(out["patient_id"] == patient) & (out["arm"] == names[1])]
        raise StatisticsError(
            f"patient {patient!r} is in arm {names[0]!r} and in arm {names[1]!r} (visit "
            f"{int(where['visit'].iloc[0])}); the randomised arm must be the same in every sample "
            f"({len(changed)} patient(s) affected: {list(changed.index[:10])}); fix the manifest's arm",
            row=_label(out, (out["patient_id"] == patient) & (out["arm"] == names[1])),
            column="arm",
        )
    for measure in measures:
        values = pd.to_numeric(out[measure], errors="coerce")
        bad = values.isna() & out[measure].notna()
        if bad.any():
            raise StatisticsError(
                f"{out[measure][bad].iloc[0]!r} is not a number", row=_label(out, bad), column=measure
            )
        out[measure] = values.astype("float64")
    if "parent" in out.columns:
        out["parent"] = out["parent"].astype(object).where(out["parent"].notna(), None)
    return out


def _label(table: pd.DataFrame, mask: pd.Series):
    label = table.index[np.flatnonzero(mask.to_numpy())[0]]
    return int(label) if isinstance(label, (int, np.integer)) else label


def add_wilson_ci(population_stats: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Copy of the table with ``pct_ci_low`` / ``pct_ci_high``: the Wilson (1 - alpha) interval of
    ``count / parent_count`` in percent (NaN where ``parent_count`` is 0 or missing)."""
    for column in ("count", "parent_count"):
        if column not in population_stats.columns:
            raise StatisticsError(
                "Wilson intervals need event counts; the table lacks this column", column=column
            )
    out = population_stats.copy()
    low, high = wilson_interval(out["count"].to_numpy(float), out["parent_count"].to_numpy(float), alpha)
    out["pct_ci_low"] = 100 * low
    out["pct_ci_high"] = 100 * high
    return out


def baseline_change(
    population_stats: pd.DataFrame,
    measure: str = "pct_parent",
    *,
    baseline_visit: int = 0,
    pseudocount: float | None = None,
    duplicates: str = "error",
) -> pd.DataFrame:
    """One row per patient, population and visit with the value, its baseline and changes.

    Columns: ``patient_id, arm, population, parent, visit, value, baseline, change, log2fc`` (+
    ``n_samples``). ``change = value - baseline``. ``log2fc = log2((value + c) / (baseline + c))``;
    for ``pct_parent`` with ``count``/``parent_count`` present, the Haldane-Anscombe form
    ``100 (count + 0.5) / (parent_count + 1)`` replaces ``value + c`` (half an event, so an empty gate
    still has a finite fold change scaled to its own denominator). Otherwise ``c = pseudocount``
    (default 0.01 for percentage measures, 1.0 for others); negative values give NaN (log of a
    transformed MFI has no meaning). A missing value (a population not measured in the sample, or
    a % of an empty parent) has a missing ``change`` and ``log2fc``, and so does every change from
    a missing baseline: never a number. A patient without a baseline sample keeps its rows with NaN
    changes. ``duplicates``: several samples of one patient, population and visit are an error
    ("error", default: usually a mislabelled visit) or averaged ("mean").
    """
    if duplicates not in ("error", "mean"):
        raise StatisticsError(f"duplicates must be 'error' or 'mean', not {duplicates!r}", key="duplicates")
    table = check_population_table(population_stats, [measure])
    keys = ["patient_id", "population", "visit"]
    has_counts = measure == "pct_parent" and {"count", "parent_count"} <= set(table.columns)
    cols = [*keys, "arm", measure] + (["parent"] if "parent" in table.columns else [])
    cols += ["count", "parent_count"] if has_counts else []
    work = table[cols].rename(columns={measure: "value"})
    if has_counts:  # no counts behind a missing value (e.g. not measured: counts of an older table)
        missing = work["value"].isna()
        for column in ("count", "parent_count"):
            counts = pd.to_numeric(work[column], errors="coerce")
            if missing.any():
                counts = (counts.astype("Int64") if counts.dtype.kind in "iu" else counts).mask(missing)
            work[column] = counts
    dup = work.duplicated(keys, keep=False)
    if dup.any():
        first = work[dup].iloc[0]
        n_dup = int(dup.sum())
        if duplicates == "error":
            raise StatisticsError(
                f"{n_dup} rows share a patient, population and visit (first: patient {first['patient_id']!r}, "
                f"visit {int(first['visit'])}); each patient-visit needs one sample. Fix the manifest's "
                f"visit labels, or pass duplicates='mean' to average replicate samples",
                population=first["population"],
                key="duplicates",
            )
    agg = {"value": "mean", "arm": "first"}
    if "parent" in work.columns:
        agg["parent"] = "first"
    grouped = work.groupby(keys, sort=True, dropna=False)
    out = grouped.agg(agg)
    if has_counts:  # the replicates' events (missing when none has a count)
        for column in ("count", "parent_count"):
            out[column] = grouped[column].sum(min_count=1)
    out["n_samples"] = grouped.size()
    out = out.reset_index()
    if "parent" not in out.columns:
        out["parent"] = None

    # log-scale value used for fold changes
    if has_counts:
        count = out["count"].to_numpy(dtype=float, na_value=np.nan)
        parent_count = out["parent_count"].to_numpy(dtype=float, na_value=np.nan)
        usable = np.isfinite(count) & np.isfinite(parent_count)
        haldane = 100 * (count + 0.5) / (parent_count + 1)
        c = DEFAULT_PSEUDOCOUNT["pct"] if pseudocount is None else pseudocount
        logbase = np.where(usable, haldane, out["value"] + c)
    else:
        kind = "pct" if measure.startswith("pct") else "other"
        c = DEFAULT_PSEUDOCOUNT[kind] if pseudocount is None else pseudocount
        logbase = out["value"] + c
    logbase = np.asarray(logbase, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["_log2"] = np.where(logbase > 0, np.log2(np.where(logbase > 0, logbase, 1.0)), np.nan)
    # a missing value (not measured, or an empty parent: no % of parent) has no fold change,
    # whatever counts the row carries; a negative one (a transformed MFI) none either
    out.loc[out["value"].isna() | (out["value"] < 0), "_log2"] = np.nan

    base = out[out["visit"] == baseline_visit].set_index(["patient_id", "population"])
    idx = pd.MultiIndex.from_frame(out[["patient_id", "population"]])
    out["baseline"] = base["value"].reindex(idx).to_numpy()
    out["change"] = out["value"] - out["baseline"]
    out["log2fc"] = out["_log2"] - base["_log2"].reindex(idx).to_numpy()
    out = out.drop(columns=["_log2"])
    front = ["patient_id", "arm", "population", "parent", "visit", "value", "baseline", "change", "log2fc"]
    out = out[front + [c for c in out.columns if c not in front]]
    out.attrs["measure"] = measure  # summarise_by_arm: percentages get intervals within 0-100
    return out


AUC_COLUMNS = [
    "patient_id", "arm", "population", "parent", "window", "start", "end", "n_visits",
    "auc_value", "auc_change", "auc_log2fc", "baseline",
]  # fmt: skip


def time_averaged_auc(
    dynamics: pd.DataFrame,
    windows: Sequence[tuple[int, int]] = ((0, 12), (0, 24)),
    *,
    all_visits: bool = True,
    baseline_visit: int = 0,
) -> pd.DataFrame:
    """Time-averaged AUC per patient and population: trapezoid area over a window / its duration.

    For a window (a, b) the patient needs observed values at a and b; missed visits inside the
    window are bridged linearly (the trapezoid over the visits present), nothing is extrapolated.
    ``all_visits`` adds the window "all": from the baseline visit to the patient's last visit
    (needs >= 2 visits). ``auc_value`` averages the measure; ``auc_change`` averages the change from
    baseline (= ``auc_value - baseline``); ``auc_log2fc`` averages the log2 fold change.
    Columns: ``patient_id, arm, population, parent, window, start, end, n_visits, auc_value,
    auc_change, auc_log2fc, baseline``.
    """
    if dynamics.empty:
        return pd.DataFrame(columns=AUC_COLUMNS)
    meta = dynamics.groupby(["patient_id", "population"], sort=True)[["arm", "parent", "baseline"]].first()
    frames = []
    specs = [(f"{a}-{b}", a, b) for a, b in windows] + ([("all", baseline_visit, None)] if all_visits else [])
    wide = {
        col: dynamics.pivot_table(
            index=["patient_id", "population"], columns="visit", values=col, dropna=False
        ).reindex(meta.index)
        for col in ("value", "change", "log2fc")
    }
    for label, start, end in specs:
        result = meta.copy()
        result["window"] = label
        result["start"] = start
        for col in ("value", "change", "log2fc"):
            auc, n_visits, stop = _window_auc(wide[col], start, end)
            result[f"auc_{col}"] = auc
            if col == "value":
                result["n_visits"] = n_visits
                result["end"] = stop
        frames.append(result.reset_index())
    out = pd.concat(frames, ignore_index=True)
    return out[AUC_COLUMNS]


def _window_auc(wide: pd.DataFrame, start: int, end: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised time-averaged trapezoid per row of a patient x visit matrix."""
    times = np.asarray(wide.columns, dtype=float)
    values = wide.to_numpy(dtype=float)
    rows = values.shape[0]
    nan = np.full(rows, np.nan)
    if end is None:
        in_window = times >= start
    else:
        in_window = (times >= start) & (times <= end)
    t = times[in_window]
    v = values[:, in_window]
    if len(t) < 2 or t[0] != start or (end is not None and t[-1] != end):
        return nan, np.zeros(rows, dtype=int), nan
    observed = np.isfinite(v)
    n_visits = observed.sum(axis=1)
    cols = np.arange(len(t))
    first = np.where(observed.any(axis=1), np.argmax(observed, axis=1), -1)
    last = np.where(observed.any(axis=1), len(t) - 1 - np.argmax(observed[:, ::-1], axis=1), -1)
    # linear bridging of inner gaps (only rows that have one need the per-row interpolation)
    inner = (cols[None, :] > first[:, None]) & (cols[None, :] < last[:, None])
    filled = v.copy()
    for i in np.flatnonzero((inner & ~observed).any(axis=1)):
        ok = observed[i]
        span = slice(first[i], last[i] + 1)
        filled[i, span] = np.interp(t[span], t[ok], v[i, ok])
    seg = np.diff(t)[None, :] * (filled[:, 1:] + filled[:, :-1]) / 2
    if end is None:
        # window "all": baseline to each patient's last visit
        stop = np.where(last > 0, t[np.maximum(last, 0)], np.nan)
        valid = observed[:, 0] & (last > 0)
        area = np.nansum(np.where(cols[None, :-1] < last[:, None], seg, 0.0), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = np.where(valid, area / (stop - t[0]), np.nan)
        return auc, n_visits, np.where(valid, stop, np.nan)
    valid = observed[:, 0] & observed[:, -1]
    auc = np.where(valid, seg.sum(axis=1) / (t[-1] - t[0]), np.nan)
    return auc, n_visits, np.full(rows, float(end))


def summarise_by_arm(
    dynamics: pd.DataFrame, alpha: float = 0.05, percent: bool | None = None
) -> pd.DataFrame:
    """Arm-level summary of :func:`baseline_change` output, one row per population, arm and visit.

    Columns: ``population, parent, arm, visit, n, mean, sd, median, ci_low, ci_high`` (interval of
    the mean value), ``mean_change, change_ci_low, change_ci_high`` and ``median_log2fc``: what the
    report draws as "arm mean with CI" over the patients' lines.

    ``percent`` (default: the measure of :func:`baseline_change` starts with ``pct``): the values
    are percentages, so the interval of the mean is a t interval on the logit scale (delta method:
    ``expit(logit(m) +- t SE / (m (1 - m)))``), which always lies inside 0-100 and contains the
    mean; the change interval (a t interval in percentage points) is clipped to -100..100.
    Otherwise both are plain t intervals.
    """
    from scipy import stats as sps

    if percent is None:
        percent = str(dynamics.attrs.get("measure", "")).startswith("pct")
    rows = []
    for (pop, arm, visit), g in dynamics.groupby(["population", "arm", "visit"], sort=True):
        v = g["value"].to_numpy(dtype=float)
        c = g["change"].to_numpy(dtype=float)
        v, c = v[np.isfinite(v)], c[np.isfinite(c)]
        out = {"population": pop, "parent": g["parent"].iloc[0], "arm": arm, "visit": int(visit), "n": len(v)}
        for prefix, x in (("", v), ("change_", c)):
            mean = float(np.mean(x)) if len(x) else np.nan
            half = (
                float(sps.t.ppf(1 - alpha / 2, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x)))
                if len(x) > 1
                else np.nan
            )
            out["mean" if not prefix else "mean_change"] = mean
            low, high = mean - half, mean + half
            if percent and not prefix:
                low, high = _logit_interval(mean, half)
            elif percent:
                low, high = max(low, -100.0), min(high, 100.0)
            out[f"{prefix}ci_low"] = low
            out[f"{prefix}ci_high"] = high
        out["sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else np.nan
        out["median"] = float(np.median(v)) if len(v) else np.nan
        out["median_log2fc"] = float(np.nanmedian(g["log2fc"])) if g["log2fc"].notna().any() else np.nan
        rows.append(out)
    cols = ["population", "parent", "arm", "visit", "n", "mean", "sd", "median", "ci_low", "ci_high",
            "mean_change", "change_ci_low", "change_ci_high", "median_log2fc"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def _logit_interval(mean_pct: float, half_pct: float) -> tuple[float, float]:
    """The t interval ``mean +- half`` (percent) moved to the logit scale by the delta method and
    back: inside 0-100, around the mean. A mean of exactly 0 or 100 (every patient at the bound)
    gives the one-sided interval of the plain t interval clipped to the range."""
    if not (np.isfinite(mean_pct) and np.isfinite(half_pct)):
        return np.nan, np.nan
    m = mean_pct / 100
    if m <= 0 or m >= 1 or half_pct == 0:
        return max(mean_pct - half_pct, 0.0), min(mean_pct + half_pct, 100.0)
    centre, half = np.log(m / (1 - m)), (half_pct / 100) / (m * (1 - m))
    return float(100 / (1 + np.exp(-(centre - half)))), float(100 / (1 + np.exp(-(centre + half))))
