"""Assembly of the run's tables from the per-sample results (deterministic).

``population_stats``, ``samples`` and ``gate_review`` are built from the cached per-sample
results in a fixed order (sorted by sample_id), so a resumed or re-scheduled run writes exactly
the tables an uninterrupted run writes; run.json's record of versions, settings and the study
state is made here too.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.pipeline.context import RunContext, _version
from cytopipe.pipeline.state import META_COLUMNS
from cytopipe.schema import STATS_COLUMNS, blank_unmeasured_counts

logger = logging.getLogger(__name__)


def assemble_gate_review(ctx: RunContext) -> pd.DataFrame:
    """Every processed sample's gate-review rows, by sample_id (then template order and panel)."""
    from cytopipe.report.gate_review import GATE_REVIEW_COLUMNS

    frames = [
        ctx.results[sid]["review"]
        for sid in sorted(ctx.results)
        if sid not in ctx.failures and "review" in ctx.results[sid]
    ]
    if not frames:
        return pd.DataFrame(columns=GATE_REVIEW_COLUMNS)
    review = pd.concat(frames, ignore_index=True)[GATE_REVIEW_COLUMNS]
    # not measured: missing counts (also in per-sample results cached by versions that stored 0)
    return blank_unmeasured_counts(review, source="source")


def assemble_population_stats(ctx: RunContext) -> pd.DataFrame:
    from cytopipe.qc import add_count_qc

    frames = []
    by_id = {j["sample_id"]: j for j in ctx.jobs}
    for sample_id in sorted(ctx.results):
        if sample_id in ctx.failures:
            continue
        stats = ctx.results[sample_id]["stats"].copy()
        job = by_id[sample_id]
        stats["sample_id"] = sample_id
        for col in ("patient_id", "visit", "arm"):
            stats[col] = job.get(col)
        stats["population_order"] = np.arange(len(stats))
        frames.append(stats)
    if not frames:
        return pd.DataFrame(columns=STATS_COLUMNS)
    df = pd.concat(frames, ignore_index=True, sort=False)
    df = df.sort_values(["sample_id", "population_order"], kind="stable").drop(columns="population_order")
    # not measured: missing counts (also in per-sample results cached by versions that stored 0)
    df = add_count_qc(blank_unmeasured_counts(df.reset_index(drop=True)), ctx.state.qc)
    medians = sorted(c for c in df.columns if c.startswith("median_"))
    rest = [c for c in df.columns if c not in STATS_COLUMNS and c not in medians]
    return df[STATS_COLUMNS + medians + rest].reset_index(drop=True)


# samples.parquet: fixed columns and types, whatever happened to the samples
SAMPLE_COLUMNS: dict[str, str] = {
    "sample_id": "string",
    "file": "string",
    "sha256": "string",
    "status": "string",
    "error": "string",
    "failed_step": "string",
    "patient_id": "string",
    "visit": "Int64",
    "arm": "string",
    "batch": "string",
    "panel": "string",
    "site": "string",
    "acquired_at": "string",
    "control": "string",
    "events_before_qc": "Int64",
    "events_after_qc": "Int64",
    "qc_removed_fraction": "float64",
    "qc_margin_events": "Int64",
    "qc_margin_by_channel": "string",
    "qc_time_events": "Int64",
    "qc_time_bins": "Int64",
    "qc_signal_bins_flagged": "Int64",
    "qc_rate_bins_flagged": "Int64",
    "qc_worst_channel": "string",
    "qc_note": "string",
    "flags": "string",
}


def _flag_identical_files(df: pd.DataFrame, alive: pd.Series) -> None:
    """Samples whose files have the same bytes (one acquisition registered twice, e.g. copied under
    another patient's name) are flagged, each naming the others, and said in run.log."""
    sha = df["sha256"].where(alive & df["sha256"].notna())
    for _, group in df[sha.notna()].groupby(sha[sha.notna()], sort=False):
        if len(group) < 2:
            continue
        for i in group.index:
            others = ", ".join(f"{o.sample_id} ({o.file})" for o in group.itertuples() if o.Index != i)
            df.at[i, "flags"] = df.at[i, "flags"] + [
                f"duplicate_file: the same bytes as sample(s) {others}; one acquisition is registered "
                "as several samples: keep the row whose patient and visit it belongs to"
            ]
        logger.warning(
            "samples %s: their files have identical content (sha256 %s); check which patient and "
            "visit it belongs to",
            ", ".join(group["sample_id"]),
            group["sha256"].iloc[0][:12],
        )


def assemble_samples(ctx: RunContext) -> pd.DataFrame:
    """One row per manifest file (samples, then controls), sorted by sample_id."""
    from cytopipe.qc import flag_loss_outliers

    rows = []
    for job in ctx.jobs + ctx.controls:
        sid = job["sample_id"]
        res = ctx.results.get(sid, {})
        failure = ctx.failures.get(sid)
        metrics = dict(res.get("metrics") or {})
        qc_flags = list(metrics.pop("qc_flags", []))
        metrics.pop("reader_notes", None)  # said in run.log and on stderr (RunContext.say_reader_notes)
        row = {
            "sample_id": sid,
            "file": job.get("file"),
            "sha256": job.get("sha256"),
            "status": "failed" if failure else "ok",
            "error": failure["error"] if failure else "",
            "failed_step": failure["step"] if failure else "",
            "events_before_qc": job.get("n_events"),
        }
        for col in META_COLUMNS:
            row[col] = job.get(col)
        row.update(metrics)
        row["flags"] = qc_flags + list(res.get("gate_flags") or [])
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in SAMPLE_COLUMNS:
        if col not in df:
            df[col] = None
    alive = (df["status"] == "ok") & (df["control"].fillna("") == "")
    outlier = flag_loss_outliers(df["qc_removed_fraction"].where(alive), ctx.state.qc)
    for i in np.flatnonzero(outlier.to_numpy()):
        df.at[df.index[i], "flags"] = df.at[df.index[i], "flags"] + [
            "qc_loss_outlier: lost an unusual share of events compared with the study's samples"
        ]
    _flag_identical_files(df, alive)
    df["status"] = [
        "failed" if s == "failed" else ("flagged" if f else "ok") for s, f in zip(df["status"], df["flags"])
    ]
    df["flags"] = ["; ".join(f) for f in df["flags"]]
    extra = [c for c in df.columns if c not in SAMPLE_COLUMNS]
    df = df[list(SAMPLE_COLUMNS) + extra]
    for col, dtype in SAMPLE_COLUMNS.items():
        if dtype == "string":
            df[col] = df[col].map(
                lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            )
        df[col] = df[col].astype(dtype)
    is_control = df["control"].fillna("") != ""
    df = df.assign(_is_control=is_control).sort_values(["_is_control", "sample_id"], kind="stable")
    return df.drop(columns="_is_control").reset_index(drop=True)


def _run_info(ctx: RunContext, executor: Any, seconds: float) -> dict[str, Any]:
    return {
        "cytopipe_version": _version("cytopipe"),
        "versions": {
            "python": platform.python_version(),
            **{
                m: _version(m)
                for m in (
                    "numpy",
                    "pandas",
                    "pyarrow",
                    "dask",
                    "distributed",
                    "duckdb",
                    "flowkit",
                    "flowutils",
                )
            },
        },
        "study": ctx.wf.study,
        "workflow": ctx.wf.to_dict(),
        "hashes": dict(ctx.hashes),
        "study_state": _study_record(ctx),
        "clinical_problem": ctx.clinical_problem,
        "problems": list(ctx.problems),
        "seed": ctx.wf.seed,
        "executor": executor.info(),
        "steps": ctx.steps,
        "samples": len(ctx.jobs),
        "controls": len(ctx.controls),
        "failed": sorted(ctx.failures),
        "cached_samples": ctx.cached,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _study_record(ctx: RunContext) -> dict[str, Any]:
    """What the study-level steps decided, so a run can be re-applied (exports) exactly."""
    from cytopipe.gating.loading import preprocessing_note

    st = ctx.state
    spill = st.spillover
    fits = ctx.folder.study / "gate_fits.parquet"
    record = {
        "compensation": st.compensation,
        "spillover": None
        if spill is None
        else {"channels": list(spill.channels), "matrix": np.asarray(spill.matrix).tolist()},
        "spillover_sets": None
        if not st.spillover_sets
        else {
            "column": st.spillover_column,
            "sets": {
                v: {"channels": list(s.channels), "matrix": np.asarray(s.matrix).tolist()}
                for v, s in sorted(st.spillover_sets.items())
            },
        },
        "transforms": st.transforms,
        # null: raw values (a YAML template); else why the FCS preprocessing was applied
        "fcs_preprocessing": preprocessing_note(st.template),
        "gate_fits": "study/gate_fits.parquet" if st.pooled is not None and fits.is_file() else None,
    }
    if st.workspace is not None:  # a FlowJo workspace: which sample's gates each file got
        record["flowjo_workspace"] = st.workspace
    return record


# tables a run writes only when their step ran (a rerun without the step removes the old file)
OPTIONAL_TABLES = ("clusters", "statistics")
