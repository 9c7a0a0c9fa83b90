"""The statistics step: ``statistics.parquet`` from the population and cluster tables.

Cached by a hash of everything it reads (tables, clinical file, settings, code version), so a
rerun with nothing changed reuses it. A clinical table that does not fit the flow data, or too
few samples, is a *problem* of the run (recorded, printed); it never loses the population
results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from cytopipe.config import stable_hash
from cytopipe.errors import CytopipeError
from cytopipe.pipeline.context import RunContext, _version
from cytopipe.pipeline.progress import notice
from cytopipe.store import file_sha256

logger = logging.getLogger(__name__)


def step_statistics(ctx: RunContext) -> dict[str, Any]:
    """run_statistics on population_stats (and, in families cluster_*, on clusters.parquet)."""
    from cytopipe.workflow import statistics_enabled

    if not statistics_enabled(ctx.wf):
        return {"enabled": False}
    # cached by the hash of its inputs: a rerun with nothing changed reuses the table in seconds
    key = _statistics_key(ctx)
    ctx.keep_cache.setdefault("statistics", set()).add(key)
    cached = ctx.folder.load_cached("statistics", key, "json")
    table = ctx.folder.load_cached("statistics", key + ".table", "parquet") if cached else None
    if cached is not None and (table is not None or not cached.get("rows")):
        notice("statistics: reused (population and cluster tables, clinical table and settings unchanged)",
               ctx.progress)  # fmt: skip
        ctx.problems.extend(cached.get("problems") or [])
        if table is not None:
            ctx.tables["statistics"] = table
        info = dict(cached["info"])
        if "clinical_patients_without_flow_data" not in info:  # none, or a cache of older versions
            if missing := patients_without_flow_data_of(ctx):  # (they did not record them): from the inputs
                info["clinical_patients_without_flow_data"] = missing
        _warn_without_flow_data(info)
        return {**info, "reused": True}
    n = ctx.tables["population_stats"]["population"].nunique() if "population_stats" in ctx.tables else 0
    notice(f"statistics: computing the tests of {n} populations ...", ctx.progress)
    before = len(ctx.problems)
    table, info = compute_statistics(ctx)
    if table is not None:
        ctx.tables["statistics"] = table
        ctx.folder.save_cached("statistics", key + ".table", "parquet", table)
    ctx.folder.save_cached("statistics", key, "json", {"info": info, "problems": ctx.problems[before:],
                                                        "rows": 0 if table is None else len(table)})  # fmt: skip
    _warn_without_flow_data(info)
    return info


def _warn_without_flow_data(info: dict[str, Any]) -> None:
    """Patients of the clinical table without flow data: a warning on stderr and in run.log (also
    in run.json, the statistics step's ``clinical_patients_without_flow_data``), not a problem: the
    response rates count them by design (intention to treat, docs/statistics.md)."""
    from cytopipe.clinical import without_flow_data_message

    if missing := info.get("clinical_patients_without_flow_data"):
        logger.warning("clinical table: %s", without_flow_data_message(list(missing)))


def patients_without_flow_data_of(ctx: RunContext) -> list[str]:
    """The patients of the workflow's clinical table without flow data (none when the table is not
    usable: that is a problem of the run, recorded with the statistics)."""
    from cytopipe.clinical import load_clinical, patients_without_flow_data
    from cytopipe.errors import ClinicalDataError

    ps = ctx.tables.get("population_stats")
    if ctx.wf.clinical is None or ps is None or ps.empty:
        return []
    try:
        clinical = load_clinical(
            ctx.wf.clinical,
            patients=ps[["patient_id", "arm"]],
            baseline_visit=ctx.stats_settings.baseline_visit,
        )
    except ClinicalDataError:
        return []
    return patients_without_flow_data(clinical, ps[["patient_id"]])


#: bump when the statistics change for the same inputs (cached statistics are then recomputed).
#: 3: a fold change from or to a missing value (not measured, % of an empty parent) is missing
#: (it was a number when the row had event counts)
#: 4: mixed model leaves thin arm x visit cells out of the fit (they were pooled with the reference
#: arm); response rates of an arm made only of NRI-imputed non-responders are not tested, and the
#: imputed counts are in the note; a missing reference arm is named with a did-you-mean; a patient
#: whose samples name two arms is an error (the patient counted in both); a requested population
#: absent from the table gets rows saying so; the mixed model fits a constant baseline (unadjusted);
#: patient ids and arms are stripped of spaces, as in the clinical table
#: 5: response rates with an expected count below 5 use Fisher's exact test (rate_test "auto", the
#: new default); one arm order in every table (rows and lists of arms in texts, stats/armorder.py);
#: mixed-model notes for baseline extrapolation and thin arms
STATISTICS_VERSION = "5"


def _statistics_key(ctx: RunContext) -> str:
    """Hash of everything the statistics read: the population and cluster tables, the clinical
    file, the settings and the code's version."""
    import hashlib

    h = hashlib.sha256(f"statistics {STATISTICS_VERSION} {_version('cytopipe')}\n".encode())
    for name in ("population_stats", "clusters"):
        df = ctx.tables.get(name)
        if df is not None:
            h.update(f"{name} {list(df.columns)} {list(map(str, df.dtypes))}".encode())
            try:
                h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
            except TypeError:  # a column of unhashable values: its text
                h.update(df.to_csv(index=False).encode())
    clinical = ctx.wf.clinical
    if clinical is not None and Path(clinical).is_file():
        h.update(file_sha256(clinical).encode())
    h.update(repr(ctx.stats_settings).encode())
    h.update(stable_hash({"statistics": ctx.wf.statistics, "clinical": str(clinical)}).encode())
    return h.hexdigest()[:32]


def compute_statistics(ctx: RunContext) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The statistics table of the run; problems (a clinical table that does not fit the flow data,
    too few samples) are recorded in ``ctx.problems`` and never lose the population results."""
    import dataclasses

    from cytopipe.clinical import load_clinical
    from cytopipe.errors import ClinicalDataError
    from cytopipe.stats import FAMILIES

    settings = ctx.stats_settings
    parts = []
    ps = ctx.tables.get("population_stats")
    if ps is None or ps.empty:
        ctx.problems.append("statistics: no population statistics to analyse (every sample failed?)")
        return None, {"enabled": True, "rows": 0}
    clinical = None
    if ctx.wf.clinical is not None:
        try:  # the file, and its patients and arms against the flow data
            clinical = load_clinical(
                ctx.wf.clinical, patients=ps[["patient_id", "arm"]], baseline_visit=settings.baseline_visit
            )
        except ClinicalDataError as exc:
            ctx.problems.append(f"statistics: the clinical table was not used (no clinical tests): {exc}")
    without_flow: list[str] = []
    if clinical is not None:  # in the response rates (intention to treat), in no flow-based test
        from cytopipe.clinical import patients_without_flow_data

        without_flow = patients_without_flow_data(clinical, ps[["patient_id"]])
    from cytopipe.report.data import measured_rows  # not measured in a sample: a missing value, not 0%

    gated = _statistics_of(ctx, measured_rows(ps), clinical, settings, "gated populations")
    if gated is not None:
        parts.append(gated)
    clusters = ctx.tables.get("clusters")
    n_cluster_rows = 0
    tiny: dict[str, str] = {}
    if clusters is not None and len(clusters):  # empty or nearly empty metaclusters: not tested
        from cytopipe.report.data import tiny_metaclusters

        tiny = tiny_metaclusters(clusters)
        clusters = clusters[~clusters["population"].astype(str).isin(tiny)]
    if clusters is not None and len(clusters) and ctx.wf.statistics.get("clusters", True):
        flow = [f for f in FAMILIES if f not in ("response_rate", "serology_rate")]  # clinical-only: once
        wanted = [f for f in flow if settings.families is None or f in settings.families]
        if wanted:
            cs = dataclasses.replace(settings, populations=None, families=tuple(wanted))
            table = _statistics_of(ctx, clusters, clinical, cs, "metaclusters")
            if table is not None:
                table["family"] = "cluster_" + table["family"].astype(str)
                n_cluster_rows = len(table)
                parts.append(table)
    extra = {"clinical_patients_without_flow_data": without_flow} if without_flow else {}
    if not parts:
        return None, {"enabled": True, "rows": 0, **extra}
    out = pd.concat(parts, ignore_index=True)
    return out, {
        "enabled": True,
        "rows": len(out),
        "cluster_rows": n_cluster_rows,
        "metaclusters_not_tested": tiny,
        "clinical": clinical is not None,
        **extra,
    }


def _statistics_of(
    ctx: RunContext, table: pd.DataFrame, clinical: pd.DataFrame | None, settings: Any, what: str
) -> pd.DataFrame | None:
    import warnings

    from cytopipe.errors import ClinicalDataError
    from cytopipe.stats import run_statistics

    map_fits = _fits_on_workers(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model-fit warnings are in the table's `note` column
        try:
            try:
                return run_statistics(table, clinical, settings, map_fits=map_fits)
            except ClinicalDataError as exc:
                if clinical is None:
                    raise
                ctx.problems.append(
                    f"statistics of the {what}: the clinical table does not fit the flow data ({exc}); "
                    "the clinical tests were left out"
                )
                return run_statistics(table, None, settings, map_fits=map_fits)
        except CytopipeError as exc:
            ctx.problems.append(f"statistics of the {what} could not be computed: {exc}")
            return None


def _fits_on_workers(ctx: RunContext) -> Any:
    """``map_fits`` for :func:`run_statistics`: the per-population mixed models (most of the
    step's time; ~1.5 s each with 1,167 patients) fitted on the run's Dask workers, in parallel,
    instead of one after another here. Only with two or more workers: the UMAP may hold one.
    Same results: each fit is the same function of the same table, whatever process runs it (the
    tables are byte-identical; ``tests/test_output_hashes.py``). A fit whose worker died is done here."""
    executor = getattr(ctx, "executor", None)  # a review's re-computation has none: fit here
    if executor is None or getattr(executor, "name", "") != "distributed":
        return None
    try:
        if executor.n_workers < 2:
            return None
    except Exception:  # noqa: BLE001 - the scheduler did not answer: fit here
        return None

    def map_fits(fn: Any, items: list) -> list:
        from cytopipe.pipeline.executors import TaskError

        pending = [executor.submit(_quietly, fn, item, desc="mixed-model") for item in items]
        out, lost = [], 0
        for item, task in zip(items, pending):
            try:
                out.append(task.result())
            except TaskError as exc:
                if not lost:  # one line, not one per fit (a cluster without workers loses them all)
                    logger.warning("a mixed-model fit was lost with its worker (%s); fitting it here", exc)
                lost += 1
                out.append(fn(item))
        if lost > 1:
            logger.warning(
                "%d of %d mixed-model fits were lost with their workers and fitted here", lost, len(items)
            )
        return out

    return map_fits


def _quietly(fn: Any, item: Any) -> Any:
    """``fn(item)`` on a worker with warnings ignored, as here (they are in the table's notes)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(item)
