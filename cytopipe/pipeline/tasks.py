"""Per-sample tasks: pure functions of (job, study state) that run on the workers.

Each reads one file (or only its header), does its work and returns a small dict of tables and
numbers, never an event matrix. :func:`_guard` turns any error into a failure record (one bad
sample never stops the batch). The gating tasks also draw what clustering needs from the same
gating (training cells, mapping inputs), so no later pass reads the file again; the two
clustering tasks (:func:`train_task`, :func:`map_task`) are here too.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.errors import CytopipeError, GatingError
from cytopipe.pipeline.fmo import _manifest_path, fit_records, gate_with_fmo
from cytopipe.pipeline.mapinputs import _load_map_inputs, sample_cluster_inputs
from cytopipe.pipeline.state import ClusterPlan, Prepared, StudyState, sample_meta
from cytopipe.pipeline.taskresult import TaskResult
from cytopipe.store import file_sha256

logger = logging.getLogger(__name__)


_DEBUG = False  # --debug with --scheduler synchronous: task exceptions propagate


def register_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Hash the file, read its HEADER and TEXT (not the events) and check the template's markers."""

    def body() -> dict[str, Any]:
        from cytopipe.errors import FCSDataError
        from cytopipe.fcs import read_fcs_header

        _check_regular(job)
        with _manifest_path(job):
            sha = file_sha256(job["path"])
            info = read_fcs_header(job["path"], warn=False)  # notes: said once, by the run
        if info.data_error:
            raise FCSDataError(info.data_error, file=job["file"])
        missing: list[str] = []
        if not job.get("control"):
            missing = _check_markers(info, state, job)
        return {
            "sha256": sha,
            "n_events": int(info.n_events),
            "n_channels": int(info.n_channels),
            "missing": missing,
            "channels": info.channels[["pnn", "pns"]].astype(str).to_dict("list"),  # the matrix check too
            "notes": list(info.warnings),
        }

    return _guard(body)


def _check_regular(job: Mapping[str, Any]) -> None:
    """A missing file, a FIFO, a device or a folder: a clear error naming the manifest's path and
    the resolved one (nothing is opened: a FIFO would block, /dev/zero never ends)."""
    import stat

    from cytopipe.errors import FCSError, NotRegularFileError
    from cytopipe.files import describe_kind

    path = Path(job["path"])
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FCSError(
            f"file not found (resolved path {path}); check the manifest's `file` column", file=job["file"]
        ) from None
    except OSError as exc:
        raise FCSError(
            f"cannot open the file: {exc.strerror} (resolved path {path})", file=job["file"]
        ) from None
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(
            f"not a regular file: {describe_kind(mode)} (resolved path {path}); the manifest's `file` "
            "must name an FCS file",
            file=job["file"],
        )


def pool_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Event QC + compensation of a seeded subsample: pooled events for the study transforms (for
    `cofactor: auto` channels only the sample's cofactor estimates from them, a few numbers)."""

    def body() -> dict[str, Any]:
        from cytopipe.panel import resolve_markers

        prep = prepare_sample(job, state, copy_kept=False)  # only k rows are needed: no kept copy
        sample = prep.sample
        n = sample.n_events if prep.kept is None else len(prep.kept)
        n_raw = int(prep.metrics["events_before_qc"])
        k = min(state.pool_events, n)
        rng = np.random.default_rng([state.seed, int(job["sha256"][:15], 16)])
        rows = np.sort(rng.choice(n, size=k, replace=False))
        sub = _compensate_events(sample.events[rows if prep.kept is None else prep.kept[rows]], sample, state)
        pnn = list(sample.channels["pnn"])
        if state.pool_kind == "cofactor":  # a marker this file lacks: a NaN column, not a failure
            from cytopipe.gating.scale import pool_columns, sample_cofactors

            pool, cols = pool_columns(sub, sample.channels, state.pool_markers, state.template.panel)
            pnr = [float(sample.channels["pnr"].iloc[c]) if c is not None else 0.0 for c in cols]
            # the sample's cofactor estimates, here on its worker (the study only takes their medians)
            return {
                "cofactors": sample_cofactors(pool),
                "pnr": pnr,
                "metrics": prep.metrics,
                **_qc_record(prep, n_raw),
            }
        mapping = resolve_markers(sample.channels, state.pool_markers, mapping=state.template.panel or None)
        cols = [pnn.index(mapping[m]) for m in state.pool_markers]
        return {
            "pool": np.ascontiguousarray(sub[:, cols], dtype=np.float32),
            "pnr": [float(sample.channels["pnr"].iloc[c]) for c in cols],
            "metrics": prep.metrics,
            **_qc_record(prep, n_raw),
        }

    return _guard(body)


def _qc_record(prep: Prepared, n_raw: int) -> dict[str, Any]:
    """The sample's event QC as a few bytes (one bit per dropped event), so that the later
    passes over the file (given it as ``job["qc"]``) do not redo it."""
    drop = None
    if prep.kept is not None:
        mask = np.ones(n_raw, dtype=bool)
        mask[prep.kept] = False
        drop = np.packbits(mask)
    return {"qc_events": int(n_raw), "qc_drop": drop}


def known_qc(results: Mapping[str, Any]) -> tuple[int, Any, dict[str, Any]] | None:
    """``job["qc"]`` from a result of :func:`pool_task` (None when it has no QC record)."""
    if "qc_events" not in results:
        return None
    return int(results["qc_events"]), results.get("qc_drop"), dict(results["metrics"])


def fit_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Gating pass 1, fused with everything else a sample's one read is needed for: its fits of
    the data-driven gates (for pooled estimates) and, from the same gating, its population
    statistics, gate-review data, clustering training cells and mapping inputs. A sample whose
    gating cannot depend on the pooled estimates (:func:`needs_regating`) keeps these as its
    pass-2 result; only the others are gated again by :func:`gate_task`."""

    def body() -> dict[str, Any]:
        from cytopipe import gating

        prep = prepare_sample(job, state)
        gate = gating.gate if state.learner is None else state.learner.gate  # `examples:` (learned gates)
        try:
            result = gate_with_fmo(
                gate,
                prep,
                state,
                state.template_for(job["sample_id"]),  # a FlowJo workspace: the file's own sample's gates
                sample_meta=prep.meta,
                transforms=state.transforms,
                medians=True,
                keep_values=True,  # one compensated matrix, shared by review data and clustering inputs
            )
        except GatingError as exc:
            # a gate this file cannot fit, with nothing to fall back on before the pooled
            # estimates exist: no fits of its own, and no result, so pass 2 gates it with them
            from cytopipe.gating.engine import FIT_COLUMNS

            logger.info("%s: gated in pass 2, with the pooled estimates: %s", job["sample_id"], exc)
            return {"fits": pd.DataFrame(columns=FIT_COLUMNS), "deferred": str(exc)}
        fits = fit_records(result, job["sample_id"], prep.fmo)
        return {"fits": fits, **_gated_outputs(job, state, prep, result)}

    return _guard(body)


def gate_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Gating pass 2: the population statistics of one sample (small table)."""

    def body() -> dict[str, Any]:
        prep = prepare_sample(job, state)
        result = gate_prepared(prep, state, keep_values=True)
        return _gated_outputs(job, state, prep, result)

    return _guard(body)


def _gated_outputs(job: Mapping[str, Any], state: StudyState, prep: Prepared, result: Any) -> dict[str, Any]:
    """Everything later steps need from one gated sample (small tables; the clustering inputs
    when clustering is on), so that no later pass reads the file again."""
    stats = result.to_population_stats(prep.meta)
    flags: dict[str, list[str]] = {}
    for population, flag in result.flags:
        flags.setdefault(population, []).append(flag)
    stats["gate_flags"] = ["; ".join(flags.get(p, [])) for p in stats["population"]]
    # what set the population's gate: fitted, control (an FMO), pooled, fixed, ... (per sample)
    stats["gate_source"] = [result.populations[p].source for p in stats["population"]]
    from cytopipe.report.gate_review import gate_review_data

    # the engine's compensated matrix (kept on the result), shared by the review data and the
    # clustering inputs: the sample is compensated once per task
    values = result.event_values(prep.sample)
    out = {
        "stats": stats,
        "review": gate_review_data(prep.sample, result, job["sample_id"], values=values),  # a few kB
        "gate_flags": [f"gate {p}: {f}" for p, f in result.flags],
        "metrics": prep.metrics,
    }
    values.forget()  # the review's per-population values: not needed by the clustering inputs
    if state.cluster is not None:
        out.update(sample_cluster_inputs(job, state, prep, result, values=values))
    return out


def needs_regating(fits: pd.DataFrame, job: Mapping[str, Any], template: Any, pooled: Any) -> bool:
    """Whether gating with the pooled estimates can differ from the gating without them (pass 1).

    The engine puts a pooled estimate in place of a sample's own fit only when the fit failed
    (its bounds, its fraction check: both give a ``failed`` record) and the study has a pooled
    estimate for it, or when an ok fit moved more than ``max_shift`` from that pooled estimate; a
    typed ``default`` or a landmark-relative fallback never overrules an ok fit, and a failed fit
    with no pooled estimate falls back on the same reference in both passes."""
    from cytopipe.gating.fitters import DataDrivenGate

    fitters = {}
    for pop in template:
        if isinstance(pop.gate, DataDrivenGate):
            for suffix, fitter in pop.gate.fit_items():
                fitters[pop.name + suffix] = fitter
    meta = sample_meta(job)
    for rec in fits.itertuples(index=False):
        if rec.key not in fitters:
            return True
        fitter = fitters[rec.key]
        hit = pooled.lookup(rec.key, fitter.pool, meta) if pooled is not None else None
        if rec.status != "ok" or rec.params is None:
            if hit is not None:
                return True
            continue
        if hit is None or fitter.bounds.max_shift is None:
            continue
        params = np.asarray(rec.params, dtype=np.float64)
        if fitter.shift(params, np.asarray(hit[0], dtype=np.float64)) > fitter.bounds.max_shift:
            return True
    return False


def _guard(body: Callable[[], dict[str, Any]]) -> TaskResult:
    """Run ``body``; any error becomes a failure record (one bad sample never stops the batch)."""
    t0 = time.perf_counter()
    try:
        out = body()
        out["ok"] = True
    except CytopipeError as exc:
        if _DEBUG:
            raise
        out = {"ok": False, "error": str(exc), "error_type": type(exc).__name__}
        out["traceback"] = traceback.format_exc()  # for run.log; the one-line error goes to the tables
    except MemoryError:
        if _DEBUG:
            raise
        out = {
            "ok": False,
            "error": "out of memory while processing this sample (see --memory-limit and --workers)",
            "error_type": "MemoryError",
            "traceback": traceback.format_exc(),
        }
    except Exception as exc:  # a bug or an unforeseen file: record it, keep the batch going
        if _DEBUG:
            raise
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        out = {
            "ok": False,
            "error": f"internal error {type(exc).__name__}: {exc}{where} (please report this; the "
            "full traceback is in run.log)",
            "error_type": type(exc).__name__,
            "traceback": traceback.format_exc(),
        }
    out["seconds"] = time.perf_counter() - t0
    out["pid"] = os.getpid()
    return TaskResult(out)


def gate_prepared(prep: Prepared, state: StudyState, medians: bool = True, keep_values: bool = False) -> Any:
    """Gating pass 2 of a prepared sample: the study's template with its pooled estimates and
    transforms. Statistics, clustering and export all gate through here, so they see the same
    populations."""
    from cytopipe import gating

    return gate_with_fmo(
        gating.gate if state.learner is None else state.learner.gate,  # learner: `examples:`
        prep,
        state,
        state.template_for(prep.meta["sample_id"]),  # a FlowJo workspace: the file's own sample's gates
        pooled=state.pooled,
        sample_meta=prep.meta,
        transforms=state.transforms,
        medians=medians,
        keep_values=keep_values,
    )


def prepare_sample(job: Mapping[str, Any], state: StudyState, copy_kept: bool = True) -> Prepared:
    """read -> event QC on raw values (margins, then time anomalies) -> the kept events.

    ``copy_kept=False``: ``sample.events`` stays the raw matrix and ``kept`` says which rows
    passed QC (for a caller that needs only a few rows: no copy of the kept matrix).

    Compensation and transforms are applied by the gating engine, once per gated dimension.
    Peak memory: the raw matrix plus one filtered copy. ``job["qc"]`` (:func:`known_qc`: the QC
    of an earlier pass over the same file, with the same settings) is used instead of redoing it.
    """
    from cytopipe import qc
    from cytopipe.fcs import read_fcs

    with _manifest_path(job):
        sample = read_fcs(job["path"], warn=False)  # its notes go up with the QC metrics
    sample.path = Path(job["file"])  # errors and results name the manifest's file
    if state.spillover_sets:
        sample.spillover = set_spillover(job, state)
    elif state.spillover is not None:
        sample.spillover = state.spillover
    events = sample.events
    n_raw = events.shape[0]
    known = job.get("qc")
    if known is not None and int(known[0]) == n_raw:
        kept = None
        if known[1] is not None:
            drop = np.unpackbits(np.asarray(known[1], dtype=np.uint8), count=n_raw).astype(bool)
            kept = np.flatnonzero(~drop)
            if copy_kept:
                sample.events = events[kept]
        sample.margins_removed = bool(state.qc.margins) and (copy_kept or kept is None)
        return Prepared(
            sample=sample, metrics=dict(known[2]), meta=sample_meta(job), kept=kept, fmo=job.get("fmo")
        )
    margin = qc.margin_qc(events, sample.channels, state.qc)
    rows = np.flatnonzero(~margin.bad) if margin.bad.any() else None
    tres = qc.time_qc(events, sample.channels, state.qc, rows=rows)
    keep = ~margin.bad
    if rows is None:
        keep = ~tres.bad
    else:
        keep[rows[tres.bad]] = False
    kept = None
    if not keep.all():
        kept = np.flatnonzero(keep)
        if copy_kept:
            sample.events = events[kept]  # the one copy of the matrix; the raw one is freed
    sample.margins_removed = bool(state.qc.margins) and (copy_kept or kept is None)
    del events
    metrics = qc.qc_metrics(n_raw, int(margin.bad.sum()), int(tres.bad.sum()), margin, tres, state.qc)
    metrics.update({"reader_notes": list(sample.warnings)} if sample.warnings else {})
    return Prepared(sample=sample, metrics=metrics, meta=sample_meta(job), kept=kept, fmo=job.get("fmo"))


def _check_markers(info: Any, state: StudyState, job: Mapping[str, Any]) -> list[str]:
    """PanelError (naming file, population, marker) when a template marker is ambiguous; the
    markers the file lacks (their populations are 'not measured' in it)."""
    from cytopipe.gating import Engine

    return sorted(
        Engine(
            events=np.empty((0, len(info.channels)), dtype=np.float32),
            channels=info.channels,
            template=state.template_for(job["sample_id"]),
            spillover=info.spillover,
            file=job["file"],
            transforms=state.transforms,
        ).missing
    )


def _compensate_events(events: np.ndarray, sample: Any, state: StudyState) -> np.ndarray:
    """The compensation the gating engine applies, for a block of events (pooled transforms)."""
    from cytopipe.compensation import compensate

    comp = state.template.compensation
    names = list(sample.channels["pnn"])
    if comp == "none":
        return events
    from cytopipe.errors import CompensationError

    if comp == "file" and sample.spillover is None:
        raise CompensationError(
            "compensation is 'file' but the file has no spillover keyword; give a CSV matrix, "
            "compute one from controls, or set compensation source 'none'",
            file=sample.path,
        )
    try:  # the file's (or the study's) matrix, or a CSV matrix named by the template
        return compensate(events, sample.spillover if comp == "file" else comp, names)
    except CompensationError as exc:  # an event block knows no file: name the sample's
        raise CompensationError(exc.message, **{"file": sample.path, **exc.context}) from None


def set_spillover(job: Mapping[str, Any], state: StudyState) -> Any:
    """The matrix of the sample's own control set (one set of controls per site or batch)."""
    col = state.spillover_column
    value = str(job.get(col)) if col and job.get(col) is not None else None
    if value not in (state.spillover_sets or {}):
        from cytopipe.errors import CompensationError

        raise CompensationError(
            f"the sample's {col} {value!r} has no control set (sets: {sorted(state.spillover_sets or {})}); "
            f"give it the {col} of the controls it was acquired with",
            file=job.get("file"),
            column=col,
        )
    return state.spillover_sets[value]


def spillover_task(controls: list[dict[str, Any]], state: StudyState) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        from cytopipe.compensation import compute_spillover

        manifest = pd.DataFrame([{"file": c["path"], "control": c["control"]} for c in controls])
        comp, quality = compute_spillover(manifest, seed=state.seed)
        return {
            "matrix": np.asarray(comp.matrix).tolist(),
            "channels": list(comp.channels),
            "quality": quality,
        }

    return _guard(body)


def _gated(job: Mapping[str, Any], state: Any) -> tuple[Any, Any]:
    """The sample after event QC and its gating, exactly as in the gating pass."""

    prep = prepare_sample(job, state)
    return prep, gate_prepared(prep, state, medians=False)


def train_task(job: dict[str, Any], state: Any) -> dict[str, Any]:
    """The sample's training cells: a seeded subsample of its parent population (transformed
    values of the clustering markers; at most ``n_train`` rows)."""

    def body() -> dict[str, Any]:
        from cytopipe.cluster import subsample_indices

        plan: ClusterPlan = state.cluster
        prep, result = _gated(job, state)
        idx = result.indices(plan.population)
        pick = subsample_indices(len(idx), plan.n_train, plan.settings.seed, str(job["sample_id"]))
        values = result.event_values(prep.sample).matrix(plan.markers, events=idx[pick])
        return {"train": values, "n_parent": int(len(idx)), "metrics": prep.metrics}

    return _guard(body)


def map_task(job: dict[str, Any], state: Any) -> dict[str, Any]:
    """Every parent-population event of the sample mapped onto the frozen model; only small
    tables come back (abundance rows, node counts, concordance counts, embedding rows)."""

    def body() -> dict[str, Any]:
        from cytopipe.cluster import contingency_counts, load_model_cached, map_events, sample_abundance
        from cytopipe.cluster.model import subsample_indices

        plan: ClusterPlan = state.cluster
        sid = str(job["sample_id"])
        model = load_model_cached(plan.model_path)
        inputs = _load_map_inputs(job, plan, model)
        if inputs is not None:  # written by the gating pass: no read, no gating
            x, linear, masks = inputs
        else:
            prep, result = _gated(job, state)
            idx = result.indices(plan.population)
            values = result.event_values(prep.sample)
            x = values.matrix(model.markers, events=idx)  # parent events x clustering markers
            measured = plan.measured_medians(result.channel_of)  # a marker the file lacks: NaN medians
            linear = plan.median_matrix(values.matrix(measured, events=idx, transformed=False), measured)
            masks = {p: result.mask(p)[idx] for p in plan.concordance}
            del prep, result, values
        nodes, mc = map_events(model, x, model.markers, sample_id=sid)
        abundance = sample_abundance(
            model, sid, mc, linear, plan.medians, markers=plan.medians, parent=plan.population
        )
        k = model.n_metaclusters
        counts = contingency_counts(mc, masks, cluster_ids=range(1, k + 1)) if masks else None
        n_parent = len(x)
        out: dict[str, Any] = {
            "abundance": abundance,
            "nodes": np.bincount(nodes, minlength=model.n_nodes).astype(np.int64),
            "n_parent": int(n_parent),
            "inputs": "read" if inputs is None else "gating",
        }
        if counts is not None:
            out["concordance"] = counts
        if plan.n_embed:
            pick = subsample_indices(n_parent, plan.n_embed, plan.settings.seed, f"embed:{sid}")
            label = np.full(len(pick), plan.population, dtype=object)
            for p in plan.concordance:  # template order: the deepest (last) gate containing the cell wins
                label[masks[p][pick]] = p
            emb = pd.DataFrame(x[pick], columns=list(model.markers))
            emb["metacluster"] = mc[pick].astype(np.int16)
            emb["population"] = label.astype(str)
            out["embedding"] = emb
        return out

    return _guard(body)
