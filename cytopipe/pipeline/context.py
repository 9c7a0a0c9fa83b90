"""The run's context and its cached per-sample phases.

:class:`RunContext` carries one run's inputs, study state, per-sample results and problems
from step to step; :class:`Step` is one named step. :func:`_run_cached_phase` runs a task on
every live sample whose (file sha256, settings) result is not in ``RUN_DIR/.cache`` yet and
stores the new results (tables as Parquet, arrays as .npy, the rest as JSON written last), so a
killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.arrowfiles import ARROW
from cytopipe.config import stable_hash
from cytopipe.pipeline.executors import TaskFailure
from cytopipe.pipeline.state import StudyState
from cytopipe.store import RunFolder
from cytopipe.workflow import Workflow

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    wf: Workflow
    folder: RunFolder
    executor: Any
    progress: bool
    manifest: pd.DataFrame | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)  # samples to gate (not controls)
    controls: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample_id -> failure
    state: StudyState | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample_id -> gate result
    hashes: dict[str, str] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    cached: int = 0
    clinical_problem: str | None = None
    reused: dict[str, int] = field(default_factory=dict)  # phase -> results taken from the cache
    reused_ids: dict[str, set[str]] = field(default_factory=dict)  # phase -> their sample_ids
    keep_cache: dict[str, set[str]] = field(default_factory=dict)  # phase -> keys in use
    result_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # phase -> sample_id -> key
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # Parquet + catalog.duckdb
    # failures of study-level steps (statistics, clustering, report): the data outputs stand
    problems: list[str] = field(default_factory=list)
    soft_failures: dict[str, dict[str, str]] = field(default_factory=dict)  # phase -> sample_id -> error
    noted: set[tuple[str, str]] = field(default_factory=set)  # (sample_id, FCS reader note) said
    cluster_model: Any = None  # the frozen FlowSOM model of this run
    fused: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample_id -> fused pass-1 result
    stats_settings: Any = None  # cytopipe.stats.StatsSettings when the statistics step runs
    blinding: Any = None  # (codes, record) when the run folder's outputs are blinded
    rerun: dict[str, Any] | None = None  # the inputs' fingerprint (cytopipe/rerun.py)
    writer: Any = None  # CacheWriter of the per-sample cache entries while the steps run
    umap: Any = None  # the UMAP computed on a worker beside the statistics (cluster_steps.step_umap)

    def alive(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs if j["sample_id"] not in self.failures]

    def gate_key(self) -> str:
        """Settings key of the gating pass; later passes that re-gate a sample extend it."""
        key = _settings_key(self, "qc", "compensation", "template", "transforms") + GATE_TASK_VERSION
        # gates on preprocessed values (Gating-ML/FlowJo templates): never a result of raw values
        return key + "p" if getattr(self.state.template, "preprocess", False) else key

    def run_phase(
        self,
        phase: str,
        fn: Callable,
        settings_key: str,
        soft: bool = False,
        ready: Mapping[str, dict[str, Any]] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """A cached per-sample phase that gates its samples as the gating pass does (so its key
        includes the pooled gate estimates each sample can use). ``soft``: a failure is recorded
        in ``soft_failures`` instead of failing the sample."""
        return _run_cached_phase(
            self, phase, fn, settings_key, extra_key=_pooled_key(self), soft=soft, ready=ready
        )

    def result_key(self, phase: str, sample_id: str) -> str:
        return self.result_keys[phase][sample_id]

    def say_reader_notes(self, job: Mapping[str, Any], notes: Sequence[str] | None) -> None:
        """What the FCS reader noted about a file (a quirk it handled: HEADER and TEXT offsets
        that disagree, bits above $PnR masked off, ...): once per file and run, a warning on
        stderr and in run.log (the workers read with ``warn=False``: their Python warnings were
        printed raw, once per pass, and never reached run.log)."""
        for note in notes or ():
            if (job["sample_id"], note) not in self.noted:
                self.noted.add((job["sample_id"], note))
                logger.warning("sample %s (file %s): %s", job["sample_id"], job.get("file"), note)

    def fail(self, job: Mapping[str, Any], result: Mapping[str, Any], step: str) -> None:
        if job["sample_id"] not in self.failures:  # run.log: the one-line error and the full traceback
            logger.error(
                "sample %s (file %s) failed at step %s: %s%s",
                job["sample_id"],
                job.get("file"),
                step,
                result.get("error", "unknown error"),
                "\n" + result["traceback"].rstrip() if result.get("traceback") else "",
            )
        self.failures.setdefault(
            job["sample_id"],
            {
                "error": result.get("error", "unknown error"),
                "error_type": result.get("error_type", ""),
                "step": step,
            },
        )


def run_steps(ctx: RunContext, steps: Sequence[Step]) -> None:
    """Run the steps; their per-sample cache entries are written in the background
    (:class:`~cytopipe.pipeline.cachewriter.CacheWriter`) and all on disk when this returns."""
    from cytopipe.pipeline.cachewriter import CacheWriter

    own = ctx.writer is None
    if own:
        ctx.writer = CacheWriter(ctx.folder)
    try:
        for step in steps:
            s0 = time.perf_counter()
            logger.info("step %s", step.name)
            info = step.run(ctx) or {}
            ctx.steps.append({"step": step.name, "seconds": round(time.perf_counter() - s0, 3), **info})
    except BaseException:
        if own:
            try:  # the entries already computed are kept (a rerun resumes from them)
                ctx.writer.close()
            except Exception as exc:  # the step's error is the one to report
                logger.warning("cache entries not all written: %s", exc)
        raise
    else:
        if own:
            ctx.writer.close()
    finally:
        if own:
            ctx.writer = None


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[RunContext], dict[str, Any] | None]
    doc: str = ""


def _settings_key(ctx: RunContext, *names: str) -> str:
    return stable_hash([ctx.hashes.get(n) for n in names] + [ctx.wf.seed])


# the gating pass's per-sample result changed shape (gate-review data): older cache entries are redone
GATE_TASK_VERSION = "g3"  # g3: gate-review panels carry their parent's background


def _pooled_key(ctx: RunContext) -> Callable[[Mapping[str, Any]], str]:
    """Per-sample cache-key part: only the pooled estimates this sample can use (its patient,
    batch, cohort), so adding another patient's samples does not redo this one."""
    pooled = ctx.state.pooled
    # (patient, batch) -> key part, kept with the estimates: once per run, not once per phase
    known: dict[tuple[str, str], str] = {} if pooled is None else vars(pooled).setdefault("_key_parts", {})

    def extra(job: Mapping[str, Any]) -> str:
        if pooled is None:
            return ""
        patient, batch = str(job.get("patient_id")), str(job.get("batch"))
        part = (patient, batch)
        if part not in known:
            known[part] = stable_hash(pooled.table.iloc[pooled.rows_for(patient, batch)].to_json())[:8]
        return known[part]

    return extra


# temporary per-sample mapping inputs (parent events x clustering and median markers)
MAP_INPUTS = "map-inputs"


def _run_cached_phase(
    ctx: RunContext,
    phase: str,
    fn: Callable,
    settings_key: str,
    extra_key: Callable[[Mapping[str, Any]], str] | None = None,
    soft: bool = False,
    ready: Mapping[str, dict[str, Any]] | None = None,
    ready_from: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``fn`` on every live sample whose (sha256, settings) result is not cached yet.

    ``ready``: results already computed (by a fused earlier pass) for some samples; they are
    cached and used instead of running ``fn``; ``ready_from``: the phase whose cache entries of
    these samples hold the same tables and arrays (hard-linked instead of written again). A failed sample is failed for the whole run
    (``ctx.fail``), or with ``soft`` only left out of this phase's results
    (``ctx.soft_failures[phase]``)."""
    from cytopipe.pipeline.fmo import fmo_key
    from cytopipe.rerun import manifest_key

    results: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    keys: dict[str, str] = {}
    for job in ctx.alive():
        key = f"{job['sha256'][:32]}-{settings_key[:16]}{manifest_key(job)}{fmo_key(job)}"
        key += ctx.state.template_key(job["sample_id"])  # a FlowJo workspace: whose gates the file gets
        if extra_key is not None:
            key += extra_key(job)
        keys[job["sample_id"]] = key
        cached = _load_result(ctx.folder, phase, key)
        if cached is not None:
            results[job["sample_id"]] = cached
        else:
            todo.append(job)
    ctx.reused[phase] = len(results)
    ctx.reused_ids[phase] = set(results)
    given: list[dict[str, Any]] = []
    if ready:
        given = [j for j in todo if j["sample_id"] in ready]
        sources = ctx.result_keys.get(ready_from or "", {})
        for job in given:
            sid = job["sample_id"]
            source = (ready_from, sources[sid]) if sid in sources else None
            _save(ctx, phase, keys[sid], ready[sid], source)
            results[sid] = ready[sid]
        todo = [j for j in todo if j["sample_id"] not in ready]
        ctx.reused[f"{phase}-ready"] = len(given)
    if phase == "gate":  # samples gated by a previous run: this pass's cache, or their pass-1 result reused
        earlier = ctx.reused_ids.get(ready_from or "", set())
        ctx.cached = len(results) - len(given) + sum(j["sample_id"] in earlier for j in given)
    ctx.keep_cache.setdefault(phase, set()).update(keys.values())
    ctx.result_keys[phase] = keys
    for i, res in ctx.executor.map(fn, todo, ctx.state, phase, ctx.progress):
        job = todo[i]
        res = _as_result(res)
        if res.get("ok"):
            ctx.say_reader_notes(job, (res.get("metrics") or {}).get("reader_notes"))
            _save(ctx, phase, keys[job["sample_id"]], res)
            results[job["sample_id"]] = res
        elif soft:
            ctx.soft_failures.setdefault(phase, {})[job["sample_id"]] = res.get("error", "unknown error")
        else:
            ctx.fail(job, res, phase)
    return results


def _as_result(res: Any) -> dict[str, Any]:
    if isinstance(res, TaskFailure):
        return {"ok": False, "error": res.error, "error_type": res.error_type}
    return res


def _save(ctx: RunContext, phase: str, key: str, res: Mapping[str, Any], source=None) -> None:
    """Through the run's background writer when the steps run, else at once."""
    if ctx.writer is not None:
        ctx.writer.save(phase, key, res, source)
    else:
        _save_result(ctx.folder, phase, key, res)


def _save_result(folder: RunFolder, phase: str, key: str, res: Mapping[str, Any]) -> None:
    """Tables as Arrow IPC files, arrays as .npy, the rest as JSON written last (it marks the entry
    complete)."""
    meta: dict[str, Any] = {"_parts": {}}
    for name, value in res.items():
        if name in ("pid", "seconds"):
            continue
        if isinstance(value, pd.DataFrame):
            folder.save_cached(phase, f"{key}.{name}", ARROW, value)
            meta["_parts"][name] = ARROW
        elif isinstance(value, np.ndarray):
            folder.save_cached(phase, f"{key}.{name}", "npy", value)
            meta["_parts"][name] = "npy"
        else:
            meta[name] = value
    folder.save_cached(phase, key, "json", meta)


def _load_result(folder: RunFolder, phase: str, key: str) -> dict[str, Any] | None:
    meta = folder.load_cached(phase, key, "json")
    if meta is None:
        return None
    for name, ext in meta.pop("_parts", {}).items():
        value = folder.load_cached(phase, f"{key}.{name}", ext)
        if value is None:
            return None
        meta[name] = value
    return meta


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None
