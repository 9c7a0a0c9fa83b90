"""``cytopipe run``: a whole study, one Dask task per sample, resumable and fault-isolated.

The run is a list of steps (:data:`STEPS`). Per-sample steps run as whole-sample tasks on a
local Dask cluster of processes (1 thread each, BLAS limited to 1 thread), on an existing
cluster (``--scheduler-address``) or in-process (``--scheduler synchronous``); study-level
steps (spillover from controls, transforms locked from pooled events, pooled gate
estimates) run in between as small phases on the client. Tasks receive file paths and send
back only small tables; event matrices never leave the worker.

Every per-sample result is cached in ``RUN_DIR/.cache`` under a key made of the file's
sha256 and a hash of every setting that affects it. A rerun recomputes only what is missing
or changed, so a run killed at any moment (even ``kill -9``) and started again ends with the
same tables as an uninterrupted run. A sample that cannot be processed (corrupt file, marker
missing, a worker that keeps dying) is recorded as ``failed`` with its error; the others go on.

Exit codes: 0 all samples processed (some may be ``flagged``), 3 completed with failures,
2 invalid input (nothing run), 130 interrupted, 1 internal error.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.errors import CytopipeError, ManifestError, WorkflowError
from cytopipe.qc import QCSettings
from cytopipe.store import RunFolder, file_sha256
from cytopipe.workflow import Workflow, load_workflow, stable_hash, workflow_from_options

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_FAILURES = 3
EXIT_INTERRUPTED = 130

# population_stats leading columns (ARCHITECTURE.md), then median_<marker> and QC extras
STATS_COLUMNS = [
    "sample_id",
    "patient_id",
    "visit",
    "arm",
    "population",
    "parent",
    "count",
    "parent_count",
    "pct_parent",
]
META_COLUMNS = ["patient_id", "visit", "arm", "batch", "panel", "site", "acquired_at", "control"]


# ================================================================================================
# command line
# ================================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "cytopipe run WORKFLOW.yaml [--out DIR] [options]\n"
        "       cytopipe run --manifest M.csv --template gating/X.yaml [--clinical C.csv] --out DIR"
    )
    parser.epilog = (
        "exit codes: 0 done (samples ok or flagged), 3 completed with failures (see samples.parquet), "
        "2 invalid input, 130 interrupted. Rerun the same command to resume an interrupted run."
    )
    parser.add_argument("workflow", nargs="?", help="workflow YAML (see workflows/)")
    parser.add_argument("--out", help="run folder (default: the workflow's `output`)")
    parser.add_argument("--manifest", help="manifest CSV, when no workflow file is given")
    parser.add_argument("--template", help="gating template YAML, when no workflow file is given")
    parser.add_argument("--clinical", help="clinical table CSV, when no workflow file is given")
    parser.add_argument("--study", help="study name, when no workflow file is given")
    parser.add_argument("--seed", type=int, help="seed of every random step (default: the workflow's)")
    parser.add_argument(
        "--workers",
        type=int,
        help="number of worker processes (default: the workflow's `workers`, else one per core)",
    )
    parser.add_argument(
        "--scheduler",
        choices=("local", "synchronous"),
        default="local",
        help="'local': a Dask cluster of worker processes (default); 'synchronous': one process, "
        "no Dask (debugging)",
    )
    parser.add_argument(
        "--scheduler-address",
        metavar="tcp://HOST:PORT",
        help="use an existing dask.distributed scheduler (its workers must see the same file paths)",
    )
    parser.add_argument(
        "--memory-limit",
        help="memory limit per local worker, e.g. '4GB' (default: 90%% of the machine's memory / workers)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.workflow:
        if args.manifest or args.template:
            raise WorkflowError(
                "give either a workflow file or --manifest/--template, not both (the workflow names them)"
            )
        wf = load_workflow(args.workflow, output=args.out)
        if args.seed is not None:
            wf.seed = args.seed
    else:
        missing = [opt for opt in ("manifest", "template", "out") if not getattr(args, opt)]
        if missing:
            raise WorkflowError(
                "give a workflow file, or --manifest, --template and --out; missing "
                + ", ".join("--" + m for m in missing)
            )
        wf = workflow_from_options(
            args.manifest,
            args.template,
            args.out,
            clinical=args.clinical,
            study=args.study,
            seed=args.seed or 0,
        )
    if args.workers is not None:
        if args.workers < 1:
            raise WorkflowError(f"--workers is {args.workers}; it must be at least 1")
        wf.workers = args.workers
    result = run_workflow(
        wf,
        scheduler="distributed" if args.scheduler_address else args.scheduler,
        address=args.scheduler_address,
        memory_limit=args.memory_limit,
        progress=not args.no_progress,
    )
    print(result.summary())
    return result.exit_code


# ================================================================================================
# result of a run
# ================================================================================================
@dataclass
class RunResult:
    out: Path
    samples: pd.DataFrame
    population_stats: pd.DataFrame
    info: dict[str, Any]

    @property
    def n_failed(self) -> int:
        return int((self.samples["status"] == "failed").sum()) if len(self.samples) else 0

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURES if self.n_failed else EXIT_OK

    def summary(self) -> str:
        s = self.samples
        counts = s["status"].value_counts().to_dict() if len(s) else {}
        lines = [
            f"cytopipe run: {len(s)} files: {counts.get('ok', 0)} ok, {counts.get('flagged', 0)} flagged, "
            f"{counts.get('failed', 0)} failed ({self.info.get('cached_samples', 0)} reused from a "
            f"previous run) in {self.info.get('seconds', 0):.1f} s",
        ]
        for _, row in s[s["status"] == "failed"].iterrows():
            lines.append(f"  failed  {row['sample_id']}: {row['error']}")
        for _, row in s[s["status"] == "flagged"].head(20).iterrows():
            lines.append(f"  flagged {row['sample_id']}: {row['flags']}")
        if (s["status"] == "flagged").sum() > 20:
            lines.append("  ... (all flags in samples.parquet)")
        lines.append(f"results: {self.out}")
        if self.n_failed:
            lines.append(f"completed with failures: {self.n_failed} of {len(s)} files failed (exit code 3)")
        return "\n".join(lines)


# ================================================================================================
# executors: the same per-sample function, in-process or on Dask
# ================================================================================================
@dataclass
class TaskFailure:
    """A task that did not return (worker died too often, cancelled, ...)."""

    error: str
    error_type: str


class SyncExecutor:
    """Runs tasks one after the other in this process (debugging, tests, baseline)."""

    name = "synchronous"
    n_workers = 1
    dashboard = None

    def map(
        self, fn: Callable, items: Sequence, shared: Any, desc: str, progress: bool
    ) -> Iterator[tuple[int, Any]]:
        bar = _progress(len(items), desc, progress)
        try:
            for i, item in enumerate(items):
                yield i, fn(item, shared)
                bar.update(1)
        finally:
            bar.close()

    def info(self) -> dict[str, Any]:
        return {"scheduler": self.name, "workers": 1}

    def close(self) -> None:
        pass


class DaskExecutor:
    """Whole-sample tasks on dask.distributed: a LocalCluster of processes or a given scheduler."""

    name = "distributed"

    def __init__(
        self, workers: int | None = None, address: str | None = None, memory_limit: str | None = None
    ):
        import dask
        from dask.distributed import Client, LocalCluster

        self.cluster = None
        if address:
            try:
                self.client = Client(address, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise WorkflowError(
                    f"cannot reach the Dask scheduler at {address}: {exc}; check the address "
                    "(tcp://HOST:PORT) and that the scheduler is running"
                ) from None
            self.kind = "existing"
        else:
            n = workers or os.cpu_count() or 1
            # whole-sample tasks are compute-dense: 1 thread per process, and BLAS/numba
            # limited to 1 thread so processes do not fight over the cores
            env = {
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1",
                "NUMBA_NUM_THREADS": "1",
                "MALLOC_TRIM_THRESHOLD_": "65536",
            }
            with dask.config.set({"distributed.worker.daemon": False}):
                self.cluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    memory_limit=memory_limit or _default_memory_limit(n),
                    dashboard_address=":0" if _has_bokeh() else None,
                    silence_logs=50,  # logging.CRITICAL: a killed worker is reported by us
                    env=env,
                )
            self.client = Client(self.cluster)
            self.kind = "local"
        self.dashboard = self.client.dashboard_link if _has_bokeh() else None

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def map(
        self, fn: Callable, items: Sequence, shared: Any, desc: str, progress: bool
    ) -> Iterator[tuple[int, Any]]:
        from dask.distributed import as_completed

        if not items:
            return
        [shared_f] = self.client.scatter([shared], broadcast=True, hash=False)
        token = stable_hash([desc, time.time_ns()])[:10]
        futures = {}
        for i, item in enumerate(items):
            fut = self.client.submit(fn, item, shared_f, key=f"{desc}-{i}-{token}", pure=False, retries=0)
            futures[fut] = i
        bar = _progress(len(items), desc, progress)
        try:
            for fut in as_completed(list(futures)):
                i = futures.pop(fut)
                try:
                    value = fut.result()
                except Exception as exc:  # KilledWorker, CancelledError, comm errors
                    value = TaskFailure(_task_failure_message(exc), type(exc).__name__)
                fut.release()
                bar.update(1)
                yield i, value
        finally:
            bar.close()
            for fut in futures:
                fut.cancel()
            shared_f.release()

    def info(self) -> dict[str, Any]:
        return {
            "scheduler": f"distributed ({self.kind})",
            "workers": self.n_workers,
            "address": self.client.scheduler.address,
            "threads_per_worker": 1 if self.kind == "local" else None,
        }

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def _task_failure_message(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return (
            "the worker processing this sample died repeatedly (out of memory? a crash in a "
            "native library?); the sample was retried and then given up"
        )
    return f"the task did not complete ({name}: {exc})"


def _default_memory_limit(n_workers: int) -> str:
    from dask.distributed.system import MEMORY_LIMIT

    return str(int(0.9 * MEMORY_LIMIT / max(n_workers, 1)))


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"{desc:<10}",
        unit="sample",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )


def make_executor(
    scheduler: str, workers: int | None, address: str | None, memory_limit: str | None
) -> SyncExecutor | DaskExecutor:
    if scheduler == "synchronous":
        return SyncExecutor()
    if scheduler in ("local", "distributed"):
        return DaskExecutor(workers=workers, address=address, memory_limit=memory_limit)
    raise WorkflowError(f"unknown scheduler {scheduler!r}; use 'local', 'synchronous' or an address")


# ================================================================================================
# the study state shipped to workers (small: settings, template, matrix, locked transforms)
# ================================================================================================
@dataclass
class StudyState:
    qc: QCSettings
    template_path: str
    template: Any
    compensation: dict[str, Any]  # {"source": ..., "matrix": Spillover | None}
    seed: int
    transforms: Any = None  # locked TransformSet (None until estimated)
    transforms_spec: dict[str, Any] = field(default_factory=dict)
    pooled: Any = None  # pooled gate estimates (None until pooled)
    pool_events: int = 2000


@dataclass
class Prepared:
    """A sample after QC, compensation (and transforms when available): lives on the worker."""

    events: np.ndarray
    channels: pd.DataFrame
    markers: dict[str, str]
    metrics: dict[str, Any]
    sample: Any  # cytopipe.fcs.Sample without its event matrix (keywords, spillover, path)


# ================================================================================================
# per-sample task functions (run on the workers; return small, picklable results)
# ================================================================================================
def register_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Hash the file and check it can be read and carries every template marker."""

    def body() -> dict[str, Any]:
        from cytopipe.fcs import read_fcs

        path = Path(job["path"])
        sha = file_sha256(path)
        sample = read_fcs(path)
        _resolve_markers(sample, state, job)
        return {"sha256": sha, "n_events": sample.n_events, "n_channels": int(sample.events.shape[1])}

    return _guard(job, body)


def pool_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """QC + compensation, then a seeded subsample of template-marker events for the study transforms."""

    def body() -> dict[str, Any]:
        prep = prepare_sample(job, state, transform=False)
        k = min(state.pool_events, prep.events.shape[0])
        rng = np.random.default_rng([state.seed, int(job["sha256"][:15], 16)])
        rows = np.sort(rng.choice(prep.events.shape[0], size=k, replace=False))
        cols = [prep.channels.index[prep.channels["pnn"] == ch][0] for ch in prep.markers.values()]
        return {
            "pool": np.ascontiguousarray(prep.events[np.ix_(rows, cols)], dtype=np.float32),
            "markers": list(prep.markers),
            "metrics": prep.metrics,
        }

    return _guard(job, body)


def fit_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Gating pass 1: per-sample fits of the data-driven gates (for pooled estimates)."""

    def body() -> dict[str, Any]:
        prep = prepare_sample(job, state)
        return {"fits": _gate_fit(prep, state, job), "metrics": prep.metrics}

    return _guard(job, body)


def gate_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Gating pass 2: the population statistics of one sample."""

    def body() -> dict[str, Any]:
        prep = prepare_sample(job, state)
        stats, flags = _gate_stats(prep, state, job)
        return {"stats": stats, "gate_flags": flags, "metrics": prep.metrics}

    return _guard(job, body)


def _guard(job: dict[str, Any], body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body``; any error becomes a failure record (one bad sample never stops the batch)."""
    t0 = time.perf_counter()
    try:
        out = body()
        out["ok"] = True
    except CytopipeError as exc:
        out = {"ok": False, "error": str(exc), "error_type": type(exc).__name__}
    except MemoryError:
        out = {
            "ok": False,
            "error": "out of memory while processing this sample",
            "error_type": "MemoryError",
        }
    except Exception as exc:  # a bug or an unforeseen file: record it, keep the batch going
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        out = {
            "ok": False,
            "error": f"internal error {type(exc).__name__}: {exc}{where} (please report this)",
            "error_type": type(exc).__name__,
        }
    out["seconds"] = time.perf_counter() - t0
    out["pid"] = os.getpid()
    return out


def prepare_sample(job: Mapping[str, Any], state: StudyState, transform: bool = True) -> Prepared:
    """read -> margin QC -> compensate -> time QC -> (transform), on the worker."""
    from cytopipe import qc
    from cytopipe.fcs import read_fcs

    sample = read_fcs(job["path"])
    markers = _resolve_markers(sample, state, job)
    events = sample.events
    sample.events = np.empty((0, events.shape[1]), dtype=np.float32)  # drop the reference
    channels = sample.channels
    n_raw = events.shape[0]
    margin = qc.margin_qc(events, channels, state.qc)
    events = _compensate(events, sample, state, job)
    rows = np.flatnonzero(~margin.bad) if margin.bad.any() else None
    tres = qc.time_qc(events, channels, state.qc, rows=rows)
    keep = ~margin.bad
    if rows is None:
        keep = ~tres.bad
    else:
        keep[rows[tres.bad]] = False
    if not keep.all():
        events = events[keep]  # the one copy of the matrix
    metrics = qc.qc_metrics(n_raw, int(margin.bad.sum()), int(tres.bad.sum()), margin.counts, tres, state.qc)
    if transform and state.transforms is not None:
        events = _transform(events, channels, markers, state)
    return Prepared(events=events, channels=channels, markers=markers, metrics=metrics, sample=sample)


# ================================================================================================
# adapters to compensation / transforms / gating (the only places the pipeline calls them)
# ================================================================================================
def _template_markers(state: StudyState) -> list[str]:
    return list(state.template.markers) if state.template is not None else []


def _resolve_markers(sample: Any, state: StudyState, job: Mapping[str, Any]) -> dict[str, str]:
    """{template marker: $PnN} for this file; PanelError when a marker is missing."""
    from cytopipe.panel import resolve_markers

    markers = _template_markers(state)
    if not markers:
        return {}
    return resolve_markers(sample.channels, markers, file=job.get("file"))


def _compensate(events: np.ndarray, sample: Any, state: StudyState, job: Mapping[str, Any]) -> np.ndarray:
    from cytopipe.compensation import compensate

    source = state.compensation.get("source", "file")
    if source == "none":
        return events
    matrix = state.compensation.get("matrix") if source != "file" else sample.spillover
    return compensate(events, sample.channels, matrix, file=job.get("file"))


def _transform(events: np.ndarray, channels: pd.DataFrame, markers: dict[str, str], state: StudyState):
    return state.transforms.apply(events, list(channels["pnn"]), list(channels["pns"]))


def _gate_fit(prep: Prepared, state: StudyState, job: Mapping[str, Any]) -> Any:
    from cytopipe import gating

    return gating.fit_sample(prep.events, prep.channels, state.template, sample_id=job["sample_id"])


def _gate_stats(prep: Prepared, state: StudyState, job: Mapping[str, Any]) -> tuple[pd.DataFrame, list[str]]:
    from cytopipe import gating

    result = gating.gate_events(
        prep.events, prep.channels, state.template, pooled=state.pooled, sample_id=job["sample_id"]
    )
    return result.stats, list(result.flags)


# ================================================================================================
# the run
# ================================================================================================
@dataclass
class RunContext:
    wf: Workflow
    folder: RunFolder
    executor: Any
    progress: bool
    jobs: list[dict[str, Any]] = field(default_factory=list)  # gated samples (not controls)
    controls: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample_id -> failure
    registered: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: StudyState | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample_id -> gate result
    hashes: dict[str, str] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    cached: int = 0
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def alive(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs if j["sample_id"] not in self.failures]

    def fail(self, job: Mapping[str, Any], result: Mapping[str, Any], step: str) -> None:
        self.failures.setdefault(
            job["sample_id"],
            {
                "error": result.get("error", "unknown error"),
                "error_type": result.get("error_type", ""),
                "step": step,
            },
        )


def run_workflow(
    wf: Workflow,
    scheduler: str = "local",
    address: str | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
) -> RunResult:
    """Run every step of the study; returns the assembled tables (also written to ``wf.output``)."""
    t0 = time.perf_counter()
    folder = RunFolder(wf.output).create()
    ctx = RunContext(wf=wf, folder=folder, executor=None, progress=progress)
    validate_inputs(ctx)  # fail fast, before any worker starts
    executor = make_executor(scheduler, wf.workers, address, memory_limit)
    ctx.executor = executor
    try:
        if executor.dashboard and progress:
            print(f"Dask dashboard: {executor.dashboard}", file=sys.stderr)
        for step in STEPS:
            s0 = time.perf_counter()
            info = step.run(ctx) or {}
            ctx.steps.append({"step": step.name, "seconds": round(time.perf_counter() - s0, 3), **info})
        info = _run_info(ctx, executor, time.perf_counter() - t0)
    finally:
        executor.close()
    folder.write_outputs(ctx.tables, info)
    return RunResult(
        out=folder.path,
        samples=ctx.tables["samples"],
        population_stats=ctx.tables["population_stats"],
        info=info,
    )


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[RunContext], dict[str, Any] | None]
    doc: str = ""


# --- validation ---------------------------------------------------------------------------------
def validate_inputs(ctx: RunContext) -> None:
    """Spec, template, matrix and manifest: fatal errors now; per-file problems recorded later."""
    wf = ctx.wf
    from cytopipe.gating import load_template

    template = load_template(wf.template)
    manifest = _load_manifest(wf.manifest)
    comp = {"source": wf.compensation["source"], "matrix": None}
    if comp["source"] == "csv":
        from cytopipe.compensation import read_matrix_csv

        comp["matrix"] = read_matrix_csv(wf.compensation["path"])
    if comp["source"] == "controls" and not any(manifest["control"].astype(str).str.strip() != ""):
        raise WorkflowError(
            "compensation source is 'controls' but the manifest has no control rows "
            "(`control` column: unstained, single:CD4, ...)",
            key="compensation.source",
            file=wf.manifest,
        )
    for record in manifest.to_dict("records"):
        job = {k: _plain(v) for k, v in record.items()}
        if str(job.get("control") or "").strip():
            ctx.controls.append(job)
        else:
            ctx.jobs.append(job)
    if not ctx.jobs:
        raise ManifestError("the manifest lists no samples to analyse (only controls)", file=wf.manifest)
    ctx.state = StudyState(
        qc=QCSettings.from_mapping(wf.qc),
        template_path=str(wf.template),
        template=template,
        compensation=comp,
        seed=wf.seed,
        transforms_spec=dict(wf.transforms),
        pool_events=_pool_size(wf.transforms, len(ctx.jobs)),
    )
    ctx.hashes["template"] = _file_hash(wf.template)
    ctx.hashes["qc"] = stable_hash(ctx.state.qc.to_dict())
    ctx.hashes["compensation"] = _matrix_hash(comp)


def _pool_size(transforms: Mapping[str, Any], n_samples: int) -> int:
    per = int(transforms.get("events_per_sample") or 2000)
    cap = transforms.get("max_pooled_events")
    if cap:
        per = min(per, max(100, int(cap) // max(n_samples, 1)))
    return per


def _load_manifest(path: Path) -> pd.DataFrame:
    from cytopipe.manifest import load_manifest

    df = load_manifest(path)
    if "control" not in df:
        df["control"] = ""
    df["control"] = df["control"].fillna("").astype(str)
    return df


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _file_hash(path: Path) -> str:
    return file_sha256(path)


def _matrix_hash(comp: Mapping[str, Any]) -> str:
    matrix = comp.get("matrix")
    if matrix is None:
        return stable_hash({"source": comp.get("source")})
    return stable_hash(
        {
            "source": comp.get("source"),
            "channels": list(matrix.channels),
            "matrix": np.asarray(matrix.matrix).tolist(),
        }
    )


# --- step: register -----------------------------------------------------------------------------
def step_register(ctx: RunContext) -> dict[str, Any]:
    """sha256 of every file, header check and template markers (per-file problems recorded)."""
    jobs = ctx.jobs + ctx.controls
    for i, res in ctx.executor.map(register_task, jobs, ctx.state, "register", ctx.progress):
        job = jobs[i]
        res = _as_result(res)
        if res.get("ok"):
            job["sha256"] = res["sha256"]
            ctx.registered[job["sample_id"]] = res
        else:
            job["sha256"] = res.get("sha256")
            ctx.fail(job, res, "register")
    return {"files": len(jobs), "failed": len(ctx.failures)}


# --- step: study spillover from controls --------------------------------------------------------
def step_compensation(ctx: RunContext) -> dict[str, Any]:
    if ctx.state.compensation["source"] != "controls":
        return {"source": ctx.state.compensation["source"]}
    raise WorkflowError("compensation from controls is not wired yet", key="compensation.source")


# --- step: study transforms from pooled events --------------------------------------------------
def step_transforms(ctx: RunContext) -> dict[str, Any]:
    spec = ctx.state.transforms_spec
    if spec.get("estimate") != "study":
        ctx.state.transforms = _fixed_transforms(ctx)
        ctx.hashes["transforms"] = _transforms_hash(ctx.state.transforms)
        return {"estimate": "fixed"}
    settings_key = stable_hash(
        [
            ctx.hashes["qc"],
            ctx.hashes["compensation"],
            ctx.hashes["template"],
            ctx.state.pool_events,
            ctx.wf.seed,
        ]
    )
    results = _run_cached_phase(ctx, "pool", pool_task, settings_key, ext="npz")
    pools = [results[j["sample_id"]] for j in ctx.alive() if j["sample_id"] in results]
    ctx.state.transforms = _estimate_transforms(ctx, pools)
    ctx.hashes["transforms"] = _transforms_hash(ctx.state.transforms)
    return {"estimate": "study", "samples_pooled": len(pools)}


def _fixed_transforms(ctx: RunContext) -> Any:
    return None  # TODO: template transforms


def _estimate_transforms(ctx: RunContext, pools: list[dict[str, Any]]) -> Any:
    raise NotImplementedError


def _transforms_hash(transforms: Any) -> str:
    if transforms is None:
        return stable_hash(None)
    return transforms.hash() if callable(getattr(transforms, "hash", None)) else stable_hash(repr(transforms))


# --- step: gating pass 1 + pooled estimates -----------------------------------------------------
def step_gate_fit(ctx: RunContext) -> dict[str, Any]:
    ctx.state.pooled = None
    ctx.hashes["pooled"] = stable_hash(None)
    return {"pooled": False}


# --- step: gating pass 2 ------------------------------------------------------------------------
def step_gate(ctx: RunContext) -> dict[str, Any]:
    settings_key = stable_hash(
        [
            ctx.hashes["qc"],
            ctx.hashes["compensation"],
            ctx.hashes["template"],
            ctx.hashes.get("transforms"),
            ctx.hashes.get("pooled"),
            ctx.wf.seed,
        ]
    )
    ctx.results = _run_cached_phase(ctx, "gate", gate_task, settings_key, ext="json")
    return {"samples": len(ctx.results)}


# --- step: assemble the tables ------------------------------------------------------------------
def step_assemble(ctx: RunContext) -> dict[str, Any]:
    ctx.tables["population_stats"] = assemble_population_stats(ctx)
    ctx.tables["samples"] = assemble_samples(ctx)
    return {"rows": len(ctx.tables["population_stats"])}


# ================================================================================================
# cached phases
# ================================================================================================
def _run_cached_phase(
    ctx: RunContext, phase: str, fn: Callable, settings_key: str, ext: str
) -> dict[str, dict[str, Any]]:
    """Run ``fn`` on every live sample whose (sha256, settings) result is not cached yet."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    keys: dict[str, str] = {}
    for job in ctx.alive():
        key = f"{job['sha256'][:32]}-{settings_key[:16]}"
        keys[job["sample_id"]] = key
        cached = _load_result(ctx.folder, phase, key, ext)
        if cached is not None:
            results[job["sample_id"]] = cached
            if phase == "gate":
                ctx.cached += 1
        else:
            todo.append(job)
    for i, res in ctx.executor.map(fn, todo, ctx.state, phase, ctx.progress):
        job = todo[i]
        res = _as_result(res)
        if res.get("ok"):
            _save_result(ctx.folder, phase, keys[job["sample_id"]], ext, res)
            results[job["sample_id"]] = res
        else:
            ctx.fail(job, res, phase)
    return results


def _as_result(res: Any) -> dict[str, Any]:
    if isinstance(res, TaskFailure):
        return {"ok": False, "error": res.error, "error_type": res.error_type}
    return res


def _save_result(folder: RunFolder, phase: str, key: str, ext: str, res: Mapping[str, Any]) -> None:
    """Stats as Parquet, everything else as JSON, all under one key (atomic writes)."""
    if phase == "gate":
        folder.save_cached(phase, key, "parquet", res["stats"])
        meta = {k: v for k, v in res.items() if k not in ("stats", "pid", "seconds")}
        folder.save_cached(phase, key, "json", meta)  # written last: marks the entry complete
    elif phase == "pool":
        folder.save_cached(phase, key, "npy", res["pool"])
        meta = {k: v for k, v in res.items() if k not in ("pool", "pid", "seconds")}
        folder.save_cached(phase, key, "json", meta)
    else:
        folder.save_cached(phase, key, "json", {k: v for k, v in res.items() if k not in ("pid", "seconds")})


def _load_result(folder: RunFolder, phase: str, key: str, ext: str) -> dict[str, Any] | None:
    meta = folder.load_cached(phase, key, "json")
    if meta is None:
        return None
    if phase == "gate":
        stats = folder.load_cached(phase, key, "parquet")
        if stats is None:
            return None
        meta["stats"] = stats
    elif phase == "pool":
        pool = folder.load_cached(phase, key, "npy")
        if pool is None:
            return None
        meta["pool"] = pool
    return meta


# ================================================================================================
# assembly (deterministic: sorted, from cached per-sample results)
# ================================================================================================
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
    df = add_count_qc(df, ctx.state.qc)
    medians = sorted(c for c in df.columns if c.startswith("median_"))
    rest = [c for c in df.columns if c not in STATS_COLUMNS and c not in medians]
    return df[STATS_COLUMNS + medians + rest].reset_index(drop=True)


def assemble_samples(ctx: RunContext) -> pd.DataFrame:
    from cytopipe.qc import flag_loss_outliers

    rows = []
    for job in ctx.jobs + ctx.controls:
        sid = job["sample_id"]
        res = ctx.results.get(sid, {})
        failure = ctx.failures.get(sid)
        metrics = dict(res.get("metrics") or {})
        qc_flags = list(metrics.pop("qc_flags", []))
        row = {
            "sample_id": sid,
            "file": job.get("file"),
            "sha256": job.get("sha256"),
            "status": "failed" if failure else "ok",
            "error": failure["error"] if failure else "",
            "failed_step": failure["step"] if failure else "",
        }
        for col in META_COLUMNS:
            if col in job:
                row[col] = job[col]
        row.update(metrics)
        row["flags"] = qc_flags + list(res.get("gate_flags") or [])
        rows.append(row)
    df = pd.DataFrame(rows)
    if "qc_removed_fraction" in df:
        outlier = flag_loss_outliers(df["qc_removed_fraction"].where(df["status"] == "ok"), ctx.state.qc)
        for i in np.flatnonzero(outlier.to_numpy()):
            df.at[df.index[i], "flags"] = df.at[df.index[i], "flags"] + [
                "qc_loss_outlier: lost an unusual share of events compared with the study's samples"
            ]
    df["status"] = [
        "failed" if s == "failed" else ("flagged" if f else "ok") for s, f in zip(df["status"], df["flags"])
    ]
    df["flags"] = ["; ".join(f) for f in df["flags"]]
    control = df["control"].fillna("").astype(str) if "control" in df else pd.Series("", index=df.index)
    df = df.assign(_is_control=control != "").sort_values(["_is_control", "sample_id"], kind="stable")
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


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


STEPS: list[Step] = [
    Step("register", step_register, "hash files, read headers, check template markers"),
    Step("compensation", step_compensation, "study spillover matrix (from controls, when asked)"),
    Step("transforms", step_transforms, "transform parameters estimated from pooled events, then locked"),
    Step("gating-fit", step_gate_fit, "pass 1: data-driven gate fits, pooled estimates"),
    Step("gating", step_gate, "pass 2: per-sample population statistics"),
    Step("assemble", step_assemble, "population_stats and samples tables"),
    # later issues add: clustering, statistics, report
]
