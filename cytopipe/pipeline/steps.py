"""The steps of ``cytopipe run`` (:data:`STEPS`), in order.

Validation of every input before any work (:mod:`cytopipe.pipeline.validation`), then: register
(hash files, read headers, check markers), compensation from controls, study transforms from
pooled events, gating pass 1 (fits, pooled estimates; fused with everything else a read is needed
for), gating pass 2 (only samples whose gating can depend on the pooled estimates), assembly of
the tables, clustering (:mod:`cytopipe.pipeline.cluster_steps`) and the statistics
(:mod:`cytopipe.pipeline.statistics`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.config import stable_hash
from cytopipe.errors import WorkflowError
from cytopipe.pipeline.assemble import assemble_gate_review, assemble_population_stats, assemble_samples
from cytopipe.pipeline.cluster_steps import step_cluster_map, step_cluster_train, step_umap
from cytopipe.pipeline.context import (
    MAP_INPUTS,
    RunContext,
    Step,
    _as_result,
    _load_result,
    _pooled_key,
    _run_cached_phase,
    _save_result,
)
from cytopipe.pipeline.fmo import is_fmo, plan_fmo
from cytopipe.pipeline.progress import notice
from cytopipe.pipeline.state import (
    _spillover_hash,
    check_study_matrix,
)
from cytopipe.pipeline.statistics import step_statistics
from cytopipe.pipeline.tasks import (
    fit_task,
    gate_task,
    known_qc,
    needs_regating,
    pool_task,
    prepare_sample,
    register_task,
    spillover_task,
)

logger = logging.getLogger(__name__)


def step_register(ctx: RunContext) -> dict[str, Any]:
    """sha256 of every file, read check and template markers (per-file problems recorded)."""
    from cytopipe.gating.loading import preprocessing_note

    note = preprocessing_note(ctx.state.template)  # also in run.json: study_state.fcs_preprocessing
    if note:  # Gating-ML/FlowJo gates: said in run.log (and on stderr) before any file is gated
        notice(f"FCS files read with the usual FCS preprocessing: {note}", show=bool(ctx.progress))
    jobs = [j for j in ctx.jobs + ctx.controls if j["sample_id"] not in ctx.failures]
    for i, res in ctx.executor.map(register_task, jobs, ctx.state, "register", ctx.progress):
        job = jobs[i]
        res = _as_result(res)
        if res.get("ok"):
            ctx.say_reader_notes(job, res.get("notes"))
            job["sha256"] = res["sha256"]
            job["n_events"] = res["n_events"]
            job["_missing"] = (res.get("missing") or [], res.get("channels"))
        else:
            ctx.fail(job, res, "register")
    if ctx.state.compensation == "csv":  # a matrix of another panel: one error now, not one per file
        files = {j["file"]: j["_missing"][1]["pnn"] for j in jobs if "_missing" in j and not j.get("control")}
        check_study_matrix(ctx.state.spillover, ctx.wf.compensation["path"], files)
    registered = [j for j in jobs if "_missing" in j and not j.get("control")]
    skipped = _missing_everywhere(ctx, registered)
    # every marker no file carries: gate markers (skipped) and markers only in the template's `medians:`
    absent = set.intersection(*(set(j["_missing"][0]) for j in registered)) if registered else set()
    for j in jobs:
        j.pop("_missing", None)
    absent |= set(skipped)
    _drop_unmeasured_cluster_markers(ctx, sorted(absent))
    fmo = plan_fmo(ctx)  # each sample's FMO set (batch, else site, else study)
    record = {"files": len(jobs), "failed": len(ctx.failures), "not_measured_markers": skipped, **fmo}
    if absent:  # `cytopipe cluster` leaves them out of the clusters' medians too
        record["markers_in_no_file"] = sorted(absent)
    return record


def _drop_unmeasured_cluster_markers(ctx: RunContext, absent: list[str]) -> None:
    """Default clustering markers (none named, no model) and the clusters' median markers (the
    template's) leave out the markers no file measures (``absent``: gate markers skipped with
    ``missing_markers: skip``, and markers only in the template's ``medians:``); markers named in
    the workflow stay, and a sample without one is left out of the clusters with its reason. A
    median marker that only some files lack has NaN medians in their rows of clusters.parquet."""
    plan = ctx.state.cluster
    if plan is None or not absent:
        return
    dropped = [m for m in plan.medians if m in absent]
    plan.medians = [m for m in plan.medians if m not in absent]
    if dropped:
        logger.info("clustering: median markers measured in no file left out: %s", ", ".join(dropped))
    dropped = [m for m in plan.markers if m in absent]
    if not dropped or ctx.wf.clustering.get("markers") or plan.given_model is not None:
        return
    plan.markers = [m for m in plan.markers if m not in absent]
    plan.transforms = {m: t for m, t in plan.transforms.items() if m not in absent}
    logger.info("clustering: markers measured in no file left out: %s", ", ".join(dropped))
    if len(plan.markers) < 2:
        ctx.state.cluster = None
        ctx.problems.append("clustering: fewer than 2 of its markers are measured in the files; not run")


def _missing_everywhere(ctx: RunContext, jobs: list[dict[str, Any]]) -> list[str]:
    """A template marker absent from EVERY file: one error before any work (``missing_markers:
    stop``), or its populations 'not measured' everywhere (``skip``)."""
    if not jobs or not all(j["_missing"][0] for j in jobs):
        return []
    from cytopipe.gating.check import check_study_markers

    tables = {j["file"]: pd.DataFrame(j["_missing"][1]) for j in jobs}
    skipped = check_study_markers(ctx.state.template, tables, policy=ctx.wf.missing_markers)
    return [m.marker for m in skipped]


def step_compensation(ctx: RunContext) -> dict[str, Any]:
    """The study matrix computed from single-stain controls (AutoSpill-like), when asked."""
    if ctx.state.compensation != "controls":
        return {"source": ctx.state.compensation}
    controls = [c for c in ctx.controls if c["sample_id"] not in ctx.failures and not is_fmo(c)]
    if not controls:
        raise WorkflowError(
            "compensation from controls: no readable control file (see samples.parquet)",
            key="compensation.source",
        )
    from cytopipe.compensation import control_sets

    column, sets = control_sets(pd.DataFrame(controls + ctx.alive()))
    if column is not None:
        return _step_compensation_sets(ctx, controls, column, sets)
    key = stable_hash([sorted((c["sample_id"], c["control"], c["sha256"]) for c in controls), ctx.wf.seed])[
        :32
    ]
    ctx.keep_cache["spillover"] = {key}
    res = _load_result(ctx.folder, "spillover", key)
    if res is None:
        [(_, res)] = list(ctx.executor.map(spillover_task, [controls], ctx.state, "spillover", ctx.progress))
        res = _as_result(res)
        if not res.get("ok"):
            from cytopipe.errors import CompensationError

            raise CompensationError(f"cannot compute the spillover matrix from the controls: {res['error']}")
        _save_result(ctx.folder, "spillover", key, res)
    from cytopipe.fcs import Spillover

    spill = Spillover(
        np.asarray(res["matrix"], dtype=np.float64),
        list(res["channels"]),
        source="controls:study/spillover.csv",
    )
    ctx.state.spillover = spill
    ctx.hashes["compensation"] = _spillover_hash("controls", spill, "file")
    from cytopipe.store import atomic_write_bytes, atomic_write_parquet

    atomic_write_bytes(ctx.folder.study / "spillover.csv", _matrix_csv(spill).encode())
    atomic_write_parquet(ctx.folder.study / "spillover_quality.parquet", res["quality"])
    flagged = res["quality"][res["quality"]["flag"] != "ok"] if "flag" in res["quality"] else []
    return {"source": "controls", "controls": len(controls), "pairs_flagged": int(len(flagged))}


def _step_compensation_sets(
    ctx: RunContext, controls: list[dict[str, Any]], column: str, sets: dict[str, pd.DataFrame]
) -> dict[str, Any]:
    """One matrix per control set (per site or batch); each sample gets its own set's matrix."""
    from cytopipe.errors import CompensationError
    from cytopipe.fcs import Spillover
    from cytopipe.store import atomic_write_bytes, atomic_write_parquet

    groups = {v: [c for c in controls if str(c.get(column)) == v] for v in sets}
    keys = {
        v: stable_hash([sorted((c["sample_id"], c["control"], c["sha256"]) for c in g), ctx.wf.seed])[:32]
        for v, g in groups.items()
    }
    ctx.keep_cache["spillover"] = set(keys.values())
    results = {v: _load_result(ctx.folder, "spillover", k) for v, k in keys.items()}
    todo = [v for v, r in results.items() if r is None]
    for i, res in ctx.executor.map(
        spillover_task, [groups[v] for v in todo], ctx.state, "spillover", ctx.progress
    ):
        res = _as_result(res)
        if not res.get("ok"):
            raise CompensationError(
                f"cannot compute the spillover matrix from the controls of {column} {todo[i]}: {res['error']}"
            )
        _save_result(ctx.folder, "spillover", keys[todo[i]], res)
        results[todo[i]] = res
    spills = {
        v: Spillover(
            np.asarray(r["matrix"], dtype=np.float64),
            list(r["channels"]),
            source=f"controls:study/spillover_{column}_{v}.csv",
        )
        for v, r in results.items()
    }
    ctx.state.spillover_sets, ctx.state.spillover_column = spills, column
    ctx.hashes["compensation"] = stable_hash(
        [column, {v: _spillover_hash("controls", s, "file") for v, s in sorted(spills.items())}]
    )
    quality = []
    for v in sorted(spills):
        atomic_write_bytes(ctx.folder.study / f"spillover_{column}_{v}.csv", _matrix_csv(spills[v]).encode())
        quality.append(results[v]["quality"].assign(**{column: v}))
    quality = pd.concat(quality, ignore_index=True)
    atomic_write_parquet(ctx.folder.study / "spillover_quality.parquet", quality)
    flagged = quality[quality["flag"] != "ok"] if "flag" in quality else []
    return {
        "source": "controls",
        "controls": len(controls),
        "control_sets": {column: sorted(spills)},
        "pairs_flagged": int(len(flagged)),
    }


def _matrix_csv(spill: Any) -> str:
    from cytopipe.tabular import csv_text

    df = pd.DataFrame(np.asarray(spill.matrix), index=list(spill.channels), columns=list(spill.channels))
    return csv_text(df, index=True)


def _kept_cofactors(ctx: RunContext) -> tuple[dict[str, dict] | None, str]:
    """The study's cofactors locked by the last run into this folder with the same template, for
    every `cofactor: auto` channel. Locked once per study, they stay when files are added or
    changed (later visits, a re-acquired file), so earlier samples keep their values."""
    markers = ctx.state.pool_markers
    try:
        from cytopipe.store import read_run_info

        info = read_run_info(ctx.folder.path)
    except Exception:  # no earlier run here (or an unreadable one): lock from this run's events
        return None, ""
    if (info.get("hashes") or {}).get("template") != ctx.hashes["template"]:
        return None, ""
    step = next((s for s in info.get("steps") or [] if s.get("step") == "transforms"), {})
    found = {m: (step.get("cofactors") or {}).get(m) or {} for m in markers}
    if not all("cofactor" in f for f in found.values()):
        return None, ""
    return {
        m: {"type": "arcsinh", "cofactor": float(f["cofactor"])} for m, f in found.items()
    }, "the last run"


def _model_cofactors(ctx: RunContext) -> dict[str, dict]:
    """The cofactors of the frozen clustering model this run maps onto (its markers only): a later
    visit is transformed as the study's model was trained."""
    plan = ctx.state.cluster
    if plan is None or not plan.given_model:
        return {}
    from cytopipe.cluster import load_model

    recorded = load_model(plan.given_model).transforms or {}
    return {
        m: recorded[m] for m in ctx.state.pool_markers if (recorded.get(m) or {}).get("type") == "arcsinh"
    }


def step_transforms(ctx: RunContext) -> dict[str, Any]:
    """Transform parameters estimated once from events pooled over every sample, then locked."""
    spec = ctx.wf.transforms
    if not ctx.state.pool_markers:
        ctx.hashes["transforms"] = stable_hash(ctx.state.transforms)
        return {"estimate": "template", "overrides": sorted(ctx.state.transforms)}
    if spec.get("estimate") != "study":
        kept, source = _kept_cofactors(ctx)
        if kept is not None:  # locked once per study: a later run keeps the study's cofactors
            kept.update(_model_cofactors(ctx))
            ctx.state.transforms = {**kept, **ctx.state.transforms}  # explicit params win
            ctx.hashes["transforms"] = stable_hash(ctx.state.transforms)
            return {"estimate": "template", "samples_pooled": 0, "cofactors_from": source,
                    "cofactors": {m: {"cofactor": s["cofactor"]} for m, s in sorted(kept.items())}}  # fmt: skip
    settings_key = stable_hash(
        [
            ctx.hashes["qc"],
            ctx.hashes["compensation"],
            ctx.hashes["template"],
            ctx.state.pool_markers,
            ctx.state.pool_events,
            ctx.wf.seed,
        ]
    )
    results = _run_cached_phase(ctx, "pool", pool_task, settings_key)
    pools = [results[j["sample_id"]] for j in ctx.alive()]
    for job in ctx.alive():  # later passes over the file take its event QC from here
        job["qc"] = known_qc(results[job["sample_id"]])
    if not pools:
        return {"estimate": spec.get("estimate"), "samples_pooled": 0}
    if spec.get("estimate") != "study":  # one arcsinh cofactor per `cofactor: auto` channel per study
        from cytopipe.gating.scale import lock_cofactors

        # each sample's estimates (a cache entry of an older run may hold its pooled events instead)
        per_sample = [p["cofactors"] if "cofactors" in p else p["pool"] for p in pools]
        locked, cofactors = lock_cofactors(per_sample, ctx.state.pool_markers)
        for m, s in _model_cofactors(ctx).items():  # the frozen model's markers keep the study's
            locked[m] = s
            cofactors[m] = {**cofactors.get(m, {}), "cofactor": s["cofactor"], "from": "the frozen model"}
        ctx.state.transforms = {**locked, **ctx.state.transforms}  # explicit params win
        ctx.hashes["transforms"] = stable_hash(ctx.state.transforms)
        return {"estimate": "template", "samples_pooled": len(pools), "cofactors": cofactors}
    from cytopipe.transforms import estimate_transforms

    top = max(max(p["pnr"]) for p in pools)
    tset = estimate_transforms(
        [p["pool"] for p in pools],
        ctx.state.pool_markers,
        method=spec["method"],
        channel_names=ctx.state.pool_markers,
        T=top if top > 1 else 262144.0,
        cofactor=spec["cofactor"] if spec.get("cofactor") is not None else 150.0,
        max_events_per_sample=ctx.state.pool_events,
        seed=ctx.wf.seed,
    )
    locked = {m: _to_engine_spec(tset[m].to_dict()) for m in ctx.state.pool_markers}
    ctx.state.transforms = {**locked, **ctx.state.transforms}  # explicit params win
    ctx.hashes["transforms"] = stable_hash(ctx.state.transforms)
    from cytopipe.store import atomic_write_json

    atomic_write_json(
        ctx.folder.study / "transforms.json",
        {"transforms": ctx.state.transforms, "estimated": tset.to_dict(), "hash": ctx.hashes["transforms"]},
    )
    return {
        "estimate": "study",
        "samples_pooled": len(pools),
        "markers": ctx.state.pool_markers,
        "reused": ctx.reused.get("pool", 0),
    }


def _to_engine_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A cytopipe.transforms dict as the gating engine's transform spec."""
    from cytopipe.gating import check_transform

    return check_transform(dict(spec), {"key": "transforms"})


def step_gate_fit(ctx: RunContext) -> dict[str, Any]:
    """Per-sample fits of the data-driven gates, pooled per patient / batch / cohort."""
    if ctx.wf.examples is not None:  # learned gates (cytopipe.gating.learn), from prepared examples
        from cytopipe.gating.learn import study_learner

        ctx.state.learner, ctx.hashes["template"] = study_learner(
            ctx.wf.examples, ctx.state, ctx.alive(), prepare_sample, ctx.hashes["template"]
        )
    template = ctx.state.template
    if not template.data_driven:
        ctx.hashes["pooled"] = stable_hash(None)
        return {"data_driven_gates": 0}
    settings_key = stable_hash(ctx.gate_key())  # its results stand for the gating pass's (fused)
    _plan_cluster_inputs(ctx, "fit")
    results = _run_cached_phase(ctx, "fit", fit_task, settings_key)
    ctx.fused = results
    records = [results[j["sample_id"]]["fits"] for j in ctx.alive()]
    from cytopipe.gating import pool_estimates
    from cytopipe.store import atomic_write_parquet

    fits = pd.concat(records, ignore_index=True) if records else pd.DataFrame()
    if len(fits):
        fits = fits.sort_values(["sample_id", "key"], kind="stable").reset_index(drop=True)
        ctx.state.pooled = pool_estimates(fits, ctx.manifest)
        atomic_write_parquet(ctx.folder.study / "gate_fits.parquet", fits)
        atomic_write_parquet(ctx.folder.study / "pooled_gates.parquet", ctx.state.pooled.table)
    ctx.hashes["pooled"] = stable_hash(ctx.state.pooled.table.to_json() if ctx.state.pooled else None)
    n_bad = int((fits["status"] != "ok").sum()) if len(fits) else 0
    return {
        "data_driven_gates": len(template.data_driven),
        "fits": len(fits),
        "fits_not_ok": n_bad,
        "reused": ctx.reused.get("fit", 0),
    }


def step_gate(ctx: RunContext) -> dict[str, Any]:
    """Pass 2: the fused pass's results stand for every sample whose gating cannot depend on the
    pooled estimates; only the others (fits that fell back or moved) are read and gated again."""
    _plan_cluster_inputs(ctx, "gate")
    ready = {}
    for job in ctx.alive():
        res = ctx.fused.get(job["sample_id"])
        if res is not None and "stats" in res and "fits" in res:
            template = ctx.state.template_for(job["sample_id"])  # a FlowJo workspace: the file's own gates
            if not needs_regating(res["fits"], job, template, ctx.state.pooled):
                ready[job["sample_id"]] = {k: v for k, v in res.items() if k != "fits"}
    ctx.results = _run_cached_phase(
        ctx,
        "gate",
        gate_task,
        stable_hash(ctx.gate_key()),
        extra_key=_pooled_key(ctx),
        ready=ready,
        ready_from="fit",
    )
    return {
        "samples": len(ctx.results),
        "reused": ctx.reused.get("gate", 0),
        "from_pass_1": ctx.reused.get("gate-ready", 0),  # gated once: the fused pass's result stands
    }


def _plan_cluster_inputs(ctx: RunContext, phase: str) -> None:
    """Let the gating passes also draw the clustering training cells and write the mapping inputs
    (so neither clustering pass reads the files again). Mapping inputs go to a temporary cache
    folder, named by everything that determines them, and are removed after mapping."""
    plan = ctx.state.cluster
    if plan is None:
        return
    if plan.given_model is None:
        from cytopipe.cluster import training_cells_per_sample

        plan.n_train = training_cells_per_sample(plan.settings, len(ctx.alive()))
    parts = [ctx.gate_key(), plan.population, plan.markers, plan.medians, plan.concordance]
    if phase == "gate":
        parts.append(ctx.hashes.get("pooled"))
    plan.inputs_dir = str(ctx.folder.cache / MAP_INPUTS)
    plan.inputs_key = stable_hash(parts)[:16] + phase[0]


def step_assemble(ctx: RunContext) -> dict[str, Any]:
    from cytopipe.report.gate_review import write_gate_review

    ctx.tables["population_stats"] = assemble_population_stats(ctx)
    ctx.tables["samples"] = assemble_samples(ctx)
    review = assemble_gate_review(ctx)
    # not in catalog.duckdb: it is a store of small pictures (histograms), read by the report
    # (after the steps): written by the cache writer's thread while the clustering steps run,
    # not between the phases while the workers wait (compressing it takes ~1 s per 150 files)
    if ctx.writer is not None:
        ctx.writer.call(partial(write_gate_review, ctx.folder.path, review))
    else:
        write_gate_review(ctx.folder.path, review)
    return {"rows": len(ctx.tables["population_stats"]), "gate_review_rows": len(review)}


def _cluster_train(ctx: RunContext) -> dict[str, Any]:

    return step_cluster_train(ctx)


def _cluster_map(ctx: RunContext) -> dict[str, Any]:
    import shutil

    try:
        return step_cluster_map(ctx)
    finally:  # the mapping inputs are only needed by this step
        shutil.rmtree(ctx.folder.cache / MAP_INPUTS, ignore_errors=True)


STEPS: list[Step] = [
    Step("register", step_register, "hash files, read headers, check template markers"),
    Step("compensation", step_compensation, "study spillover matrix (from controls, when asked)"),
    Step("transforms", step_transforms, "transform parameters estimated from pooled events, then locked"),
    Step("gating-fit", step_gate_fit, "pass 1: data-driven gate fits, pooled estimates"),
    Step("gating", step_gate, "pass 2: per-sample population statistics"),
    Step("assemble", step_assemble, "population_stats, samples and gate_review tables"),
    Step(
        "clustering-train",
        _cluster_train,
        "FlowSOM model from balanced subsamples (or the frozen model given)",
    ),
    Step("clustering-map", _cluster_map, "every parent event mapped: clusters.parquet, clustering/"),
    Step("statistics", step_statistics, "statistics.parquet (gated populations and metaclusters)"),
    Step(
        "clustering-umap", step_umap, "clustering/umap.parquet (computed on a worker beside the statistics)"
    ),
    # then, once the tables are written: the report (finish_run)
]
