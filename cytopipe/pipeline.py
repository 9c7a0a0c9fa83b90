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

After gating, study-level steps use the per-sample results: FlowSOM clustering (two more cached
per-sample passes, :mod:`cytopipe.cluster_steps`), the statistics, and, once the tables are
written, the report. A study-level step that cannot complete is a *problem* of the run (recorded
in run.json, printed); it never loses the tables written before it.

Exit codes: 0 all samples processed (some may be ``flagged``), 3 completed with failures (failed
files, or problems in the study-level steps), 2 invalid input (nothing run), 130 interrupted,
1 internal error.
"""

from __future__ import annotations

import argparse
import logging
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

from cytopipe import errors
from cytopipe.errors import CytopipeError, ManifestError, WorkflowError
from cytopipe.qc import QCSettings
from cytopipe.schema import STATS_COLUMNS
from cytopipe.store import RunFolder, file_sha256
from cytopipe.workflow import Workflow, load_workflow, stable_hash, workflow_from_options

# exit codes: one meaning per code across every command (defined in cytopipe.errors)
EXIT_OK = errors.EXIT_OK
EXIT_INTERNAL = errors.EXIT_INTERNAL
EXIT_INPUT = errors.EXIT_INPUT
EXIT_FAILURES = errors.EXIT_FAILURES
EXIT_OUTPUT = errors.EXIT_OUTPUT
EXIT_INTERRUPTED = errors.EXIT_INTERRUPTED

logger = logging.getLogger(__name__)
_DEBUG = False  # --debug with --scheduler synchronous: task exceptions propagate

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
        "exit codes: 0 done (samples ok or flagged); 3 completed with failures (failed files: see "
        "samples.parquet; or problems in clustering, statistics or the report: see run.json); "
        "2 invalid input (nothing run); 4 an output could not be written (disk full, read-only "
        "folder) or the run folder is in use by another run; 1 internal error (a bug; full "
        "traceback in RUN_DIR/run.log); 130 interrupted. Rerun the same command to resume an "
        "interrupted or failed run: finished work is reused."
    )
    parser.add_argument("workflow", nargs="?", help="workflow YAML (see workflows/)")
    parser.add_argument("--out", help="run folder (default: the workflow's `output`)")
    parser.add_argument("--manifest", help="manifest CSV, when no workflow file is given")
    parser.add_argument("--template", help="gating template YAML, when no workflow file is given")
    parser.add_argument("--clinical", help="clinical table CSV, when no workflow file is given")
    parser.add_argument("--study", help="study name, when no workflow file is given")
    parser.add_argument("--seed", type=int, help="seed of every random step (default: the workflow's)")
    parser.add_argument(
        "--missing-markers",
        choices=("stop", "skip"),
        help="a template marker absent from every file: stop before any work (default) or gate the "
        "rest and report its populations 'not measured' (default: the workflow's `missing_markers`)",
    )
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
    parser.add_argument(
        "--debug",
        action="store_true",
        help="with --scheduler synchronous: stop at the first error with its full traceback instead "
        "of recording the sample as failed",
    )
    parser.add_argument(
        "--blinded",
        action="store_true",
        help="write the report blinded: arm names replaced by codes (or `report: {blinded: true}`)",
    )
    parser.add_argument(
        "--blind-key", metavar="FILE", help="with --blinded: CSV (arm,code) or JSON {arm: code}"
    )
    parser.add_argument("--no-report", action="store_true", help="do not write report.html at the end")


def run(args: argparse.Namespace) -> int:
    if args.workflow:
        given = [f"--{o}" for o in ("manifest", "template", "clinical", "study") if getattr(args, o)]
        if given:
            raise WorkflowError(
                f"give either a workflow file or {', '.join(given)}, not both (the workflow names them)"
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
    if getattr(args, "missing_markers", None):
        wf.missing_markers = args.missing_markers
    if args.workers is not None:
        if args.workers < 1:
            raise WorkflowError(f"--workers is {args.workers}; it must be at least 1")
        wf.workers = args.workers
    apply_report_options(wf, args)
    if getattr(args, "debug", False):
        if args.scheduler != "synchronous" or args.scheduler_address:
            raise WorkflowError("--debug needs --scheduler synchronous (exceptions propagate in one process)")
        global _DEBUG
        _DEBUG = True
    result = run_workflow(
        wf,
        scheduler="distributed" if args.scheduler_address else args.scheduler,
        address=args.scheduler_address,
        memory_limit=args.memory_limit,
        progress=not args.no_progress,
    )
    print(result.summary())
    return result.exit_code


def apply_report_options(wf: Workflow, args: argparse.Namespace) -> None:
    """--blinded / --blind-key / --no-report over the workflow's `report:` section."""
    report = dict(wf.report or {})
    if getattr(args, "no_report", False):
        report["enabled"] = False
    if getattr(args, "blinded", False):
        report["blinded"] = True
    if getattr(args, "blind_key", None):
        key = Path(args.blind_key).resolve()
        if not key.is_file():
            raise WorkflowError(f"--blind-key: file not found: {key}")
        report["blind_key"] = key
        if not report.get("blinded"):
            raise WorkflowError("--blind-key is used with --blinded (or `report: {blinded: true}`)")
    wf.report = report


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
    def problems(self) -> list[str]:
        """Study-level steps that could not complete (statistics, clustering, report)."""
        return list(self.info.get("problems") or [])

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURES if self.n_failed or self.problems else EXIT_OK

    def summary(self) -> str:
        s = self.samples
        counts = s["status"].value_counts().to_dict() if len(s) else {}
        lines = [
            f"cytopipe run: {len(s)} files: {counts.get('ok', 0)} ok, {counts.get('flagged', 0)} flagged, "
            f"{counts.get('failed', 0)} failed ({self.info.get('cached_samples', 0)} reused from a "
            f"previous run) in {self.info.get('seconds', 0):.1f} s",
        ]
        failed = s[s["status"] == "failed"]
        for _, row in failed.head(50).iterrows():
            lines.append(f"  failed  {row['sample_id']}: {row['error']}")
        if len(failed) > 50:
            lines.append(f"  ... {len(failed) - 50} more failed files (all errors in samples.parquet)")
        for _, row in s[s["status"] == "flagged"].head(20).iterrows():
            lines.append(f"  flagged {row['sample_id']}: {row['flags']}")
        if (s["status"] == "flagged").sum() > 20:
            lines.append("  ... (all flags in samples.parquet)")
        for problem in self.problems:
            lines.append(f"  problem {problem}")
        outputs = [name for name in ("statistics", "clusters") if (self.out / f"{name}.parquet").is_file()]
        report = next((st for st in self.info.get("steps", []) if st.get("step") == "report"), {})
        if report.get("written"):
            outputs.append(report.get("path", "report.html"))
        lines.append(f"results: {self.out}" + (f" ({', '.join(outputs)})" if outputs else ""))
        why = []
        if self.n_failed:
            why.append(f"{self.n_failed} of {len(s)} files failed")
        if self.problems:
            n = len(self.problems)
            why.append(
                f"{n} problem{'s' if n > 1 else ''} in the study-level steps (listed above, and in run.json)"
            )
        if why:
            lines.append(f"completed with failures: {'; '.join(why)} (exit code 3)")
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


# environment of local worker processes (given to the nannies; this process's is not changed)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class DaskExecutor:
    """Whole-sample tasks on dask.distributed: a LocalCluster of processes or a given scheduler."""

    name = "distributed"

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        memory_limit: str | None = None,
        connect_timeout: float = 20.0,
    ):
        import dask
        from dask.distributed import Client, LocalCluster

        self.cluster = None
        if address:
            try:
                self.client = Client(address, timeout=connect_timeout)
            except (OSError, TimeoutError) as exc:
                raise WorkflowError(
                    f"cannot reach the Dask scheduler at {address}: {exc}; check the address "
                    "(tcp://HOST:PORT) and that the scheduler is running"
                ) from None
            self.kind = "existing"
        else:
            n = workers or os.cpu_count() or 1
            if memory_limit is not None:
                from dask.utils import parse_bytes

                try:
                    memory_limit = str(parse_bytes(memory_limit))
                except ValueError:
                    raise WorkflowError(
                        f"--memory-limit {memory_limit!r} is not a size; write e.g. 4GB or 3500MB"
                    ) from None
            # Whole-sample tasks are compute-dense: 1 thread per process, and BLAS limited to 1
            # thread so that processes do not fight over the cores. The limits go to the workers
            # only: through the nanny's `env` (set in the worker process) and a worker plugin
            # (threadpoolctl: the worker has imported numpy before its `env` applies). Nothing is
            # written into this process's environment: dask's `pre-spawn-environ` (which the
            # nannies apply by rewriting the parent's os.environ, also when they restart a worker
            # mid-run) is emptied. That also leaves MALLOC_TRIM_THRESHOLD_ unset on purpose:
            # dask's default (65536) makes every large array a fresh mmap, which on this kind of
            # machine costs ~40x the page faults and +40% CPU per sample; glibc's adaptive
            # threshold reuses the freed matrices. (No NUMBA_NUM_THREADS: tasks run no parallel
            # numba code, and a changed NUMBA_NUM_THREADS in the client would make numba refuse to
            # compile once its thread pool has started, e.g. after a UMAP.)
            # the nannies still set PYTHONHASHSEED (and dask __DASK_PARENT_PID) here: restored
            touched = ["PYTHONHASHSEED", "__DASK_PARENT_PID"]
            self._environ = {k: os.environ.get(k) for k in touched}
            try:
                with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
                    self.cluster = LocalCluster(
                        n_workers=n,
                        threads_per_worker=1,
                        processes=True,
                        memory_limit=memory_limit or _default_memory_limit(n),
                        dashboard_address=":0" if _has_bokeh() else None,
                        silence_logs=50,  # logging.CRITICAL: a killed worker is reported by us
                        env=dict(WORKER_ENV),
                    )
            finally:
                self._restore_environ()
            self.client = Client(self.cluster)
            from cytopipe._dask_plugins import OneThreadBLAS

            self.client.register_plugin(OneThreadBLAS(), name=OneThreadBLAS.name)
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
            fut = self.client.submit(
                fn,
                item,
                shared_f,
                key=f"{desc}-{i}-{token}",
                pure=False,
                retries=0,
                priority=_task_priority(item),
            )
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

    def _restore_environ(self) -> None:
        """Undo what the nannies wrote into this process's environment (they set the workers'
        variables in the parent before spawning, also when they restart a dead worker)."""
        for key, value in getattr(self, "_environ", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            self._restore_environ()


def _task_priority(item: Any) -> int:
    """Largest files first (longest-processing-time order): the last tasks of a phase are short,
    so workers do not idle at the barrier while one worker finishes a big file."""
    if isinstance(item, Mapping):
        n = item.get("n_events")
        if isinstance(n, int | float) and n == n:
            return int(n) // 1000
    return 0


def _task_failure_message(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return (
            "a worker died while processing this sample, more often than the scheduler allows "
            "(distributed.scheduler.allowed-failures); out of memory (see --memory-limit)? "
            "a crash in a native library? The other samples were not affected"
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
        disable=True if not enabled else None,  # None: no bar when stderr is not a terminal
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
    template: Any  # cytopipe.gating.Template, compensation set as the workflow asks
    compensation: str  # template | file | csv | controls | none
    spillover: Any = None  # cytopipe.fcs.Spillover of the study (csv / controls), else None
    seed: int = 0
    transforms: dict[str, dict] = field(default_factory=dict)  # marker -> locked spec (overrides)
    pooled: Any = None  # cytopipe.gating.PooledEstimates (None until pooled)
    pool_markers: list[str] = field(default_factory=list)  # markers whose transform is estimated
    pool_events: int = 2000
    cluster: Any = None  # cytopipe.cluster_steps.ClusterPlan when clustering is on


@dataclass
class Prepared:
    """A sample after event QC (raw values, margins and anomalies removed): lives on the worker."""

    sample: Any  # cytopipe.fcs.Sample; .events holds only the events kept by QC
    metrics: dict[str, Any]
    meta: dict[str, Any]
    kept: np.ndarray | None = None  # original index of every kept event (None: all kept)


# ================================================================================================
# per-sample task functions (run on the workers; return small, picklable results)
# ================================================================================================
def register_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Hash the file, read its HEADER and TEXT (not the events) and check the template's markers."""

    def body() -> dict[str, Any]:
        from cytopipe.errors import FCSDataError
        from cytopipe.fcs import read_fcs_header

        _check_regular(job)
        with _manifest_path(job):
            sha = file_sha256(job["path"])
            info = read_fcs_header(job["path"])
        if info.data_error:
            raise FCSDataError(info.data_error, file=job["file"])
        missing: list[str] = []
        if not job.get("control"):
            missing = _check_markers(info, state, job["file"])
        return {
            "sha256": sha,
            "n_events": int(info.n_events),
            "n_channels": int(info.n_channels),
            "missing": missing,
            "channels": info.channels[["pnn", "pns"]].astype(str).to_dict("list") if missing else None,
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


class _manifest_path:
    """Errors about the file name it as the manifest does, with the resolved path added."""

    def __init__(self, job: Mapping[str, Any]):
        self.job = job

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, CytopipeError) and str(exc.context.get("file")) == str(self.job["path"]):
            exc.context["file"] = self.job["file"]
            if str(self.job["file"]) != str(self.job["path"]) and "resolved path" not in exc.message:
                exc.message += f" (resolved path {self.job['path']})"
            exc.args = (exc._render(),)
        return False


def pool_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Event QC + compensation of a seeded subsample: pooled events for the study transforms."""

    def body() -> dict[str, Any]:
        from cytopipe.panel import resolve_markers

        prep = prepare_sample(job, state)
        sample = prep.sample
        n = sample.n_events
        k = min(state.pool_events, n)
        rng = np.random.default_rng([state.seed, int(job["sha256"][:15], 16)])
        rows = np.sort(rng.choice(n, size=k, replace=False))
        sub = _compensate_events(sample.events[rows], sample, state)
        mapping = resolve_markers(sample.channels, state.pool_markers, mapping=state.template.panel or None)
        pnn = list(sample.channels["pnn"])
        cols = [pnn.index(mapping[m]) for m in state.pool_markers]
        return {
            "pool": np.ascontiguousarray(sub[:, cols], dtype=np.float32),
            "pnr": [float(sample.channels["pnr"].iloc[c]) for c in cols],
            "metrics": prep.metrics,
        }

    return _guard(body)


def fit_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Gating pass 1, fused with everything else a sample's one read is needed for: its fits of
    the data-driven gates (for pooled estimates) and, from the same gating, its population
    statistics, gate-review data, clustering training cells and mapping inputs. A sample whose
    gating cannot depend on the pooled estimates (:func:`needs_regating`) keeps these as its
    pass-2 result; only the others are gated again by :func:`gate_task`."""

    def body() -> dict[str, Any]:
        from cytopipe import gating

        prep = prepare_sample(job, state)
        result = gating.gate(
            prep.sample, state.template, sample_meta=prep.meta, transforms=state.transforms, medians=True
        )
        return {"fits": result.fit_records(job["sample_id"]), **_gated_outputs(job, state, prep, result)}

    return _guard(body)


def gate_task(job: dict[str, Any], state: StudyState) -> dict[str, Any]:
    """Gating pass 2: the population statistics of one sample (small table)."""

    def body() -> dict[str, Any]:
        prep = prepare_sample(job, state)
        result = gate_prepared(prep, state)
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
    from cytopipe.report.gate_review import gate_review_data

    out = {
        "stats": stats,
        "review": gate_review_data(prep.sample, result, job["sample_id"]),  # a few kB, no events
        "gate_flags": [f"gate {p}: {f}" for p, f in result.flags],
        "metrics": prep.metrics,
    }
    if state.cluster is not None:
        from cytopipe.cluster_steps import sample_cluster_inputs

        out.update(sample_cluster_inputs(job, state, prep, result))
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


def _guard(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
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
    return out


def sample_meta(job: Mapping[str, Any]) -> dict[str, Any]:
    meta = {"sample_id": job["sample_id"]}
    for key in ("patient_id", "visit", "arm", "batch"):
        meta[key] = job.get(key)
    return meta


def gate_prepared(prep: Prepared, state: StudyState, medians: bool = True) -> Any:
    """Gating pass 2 of a prepared sample: the study's template with its pooled estimates and
    transforms. Statistics, clustering and export all gate through here, so they see the same
    populations."""
    from cytopipe import gating

    return gating.gate(
        prep.sample,
        state.template,
        pooled=state.pooled,
        sample_meta=prep.meta,
        transforms=state.transforms,
        medians=medians,
    )


def prepare_sample(job: Mapping[str, Any], state: StudyState) -> Prepared:
    """read -> event QC on raw values (margins, then time anomalies) -> the kept events.

    Compensation and transforms are applied by the gating engine, once per gated dimension.
    Peak memory: the raw matrix plus one filtered copy.
    """
    from cytopipe import qc
    from cytopipe.fcs import read_fcs

    with _manifest_path(job):
        sample = read_fcs(job["path"])
    sample.path = Path(job["file"])  # errors and results name the manifest's file
    if state.spillover is not None:
        sample.spillover = state.spillover
    events = sample.events
    n_raw = events.shape[0]
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
        sample.events = events[kept]  # the one copy of the matrix; the raw one is freed
    del events
    metrics = qc.qc_metrics(n_raw, int(margin.bad.sum()), int(tres.bad.sum()), margin.counts, tres, state.qc)
    return Prepared(sample=sample, metrics=metrics, meta=sample_meta(job), kept=kept)


def _check_markers(info: Any, state: StudyState, file: str) -> list[str]:
    """PanelError (naming file, population, marker) when a template marker is ambiguous; the
    markers the file lacks (their populations are 'not measured' in it)."""
    from cytopipe.gating import Engine

    return sorted(
        Engine(
            events=np.empty((0, len(info.channels)), dtype=np.float32),
            channels=info.channels,
            template=state.template,
            spillover=info.spillover,
            file=file,
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
    if comp == "file":
        if sample.spillover is None:
            from cytopipe.errors import CompensationError

            raise CompensationError(
                "compensation is 'file' but the file has no spillover keyword; give a CSV matrix, "
                "compute one from controls, or set compensation source 'none'",
                file=sample.path,
            )
        return compensate(events, sample.spillover, names)
    return compensate(events, comp, names)  # a CSV matrix named by the template


# ================================================================================================
# the run
# ================================================================================================
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
    keep_cache: dict[str, set[str]] = field(default_factory=dict)  # phase -> keys in use
    result_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # phase -> sample_id -> key
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # Parquet + catalog.duckdb
    # failures of study-level steps (statistics, clustering, report): the data outputs stand
    problems: list[str] = field(default_factory=list)
    soft_failures: dict[str, dict[str, str]] = field(default_factory=dict)  # phase -> sample_id -> error
    cluster_model: Any = None  # the frozen FlowSOM model of this run
    fused: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample_id -> fused pass-1 result
    stats_settings: Any = None  # cytopipe.stats.StatsSettings when the statistics step runs
    blinding: Any = None  # (codes, record) when the run folder's outputs are blinded
    rerun: dict[str, Any] | None = None  # the inputs' fingerprint (cytopipe/rerun.py)

    def alive(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs if j["sample_id"] not in self.failures]

    def gate_key(self) -> str:
        """Settings key of the gating pass; later passes that re-gate a sample extend it."""
        return _settings_key(self, "qc", "compensation", "template", "transforms") + GATE_TASK_VERSION

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


def run_workflow(
    wf: Workflow,
    scheduler: str = "local",
    address: str | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
) -> RunResult:
    """Run every step of the study; returns the assembled tables (also written to ``wf.output``)."""
    t0 = time.perf_counter()
    folder = RunFolder(wf.output)
    from cytopipe import rerun  # nothing changed since the last run: nothing to run at all

    if (reused := rerun.reuse_finished_run(wf, folder)) is not None:
        return RunResult(out=folder.path, **reused)
    ctx = RunContext(wf=wf, folder=folder, executor=None, progress=progress)
    validate_inputs(ctx)  # fail fast, before any worker starts or any folder is made
    ctx.rerun = rerun.start_fingerprint(wf, ctx.jobs + ctx.controls)
    with _run_folder_session(folder):
        executor = make_executor(scheduler, wf.workers, address, memory_limit)
        ctx.executor = executor
        try:
            if executor.dashboard and progress:
                print(f"Dask dashboard: {executor.dashboard}", file=sys.stderr)
            run_steps(ctx, STEPS)
            info = _run_info(ctx, executor, time.perf_counter() - t0)
        finally:
            executor.close()
        finish_run(ctx, info, t0)
    return RunResult(
        out=folder.path,
        samples=ctx.tables["samples"],
        population_stats=ctx.tables["population_stats"],
        info=info,
    )


class _RunLogHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """A full disk loses log lines, not the run's error message (no 'Logging error' traceback)."""


class _run_folder_session:
    """Create the run folder, hold its lock for the whole run, remove the temporary files a killed
    or failed earlier run left, and log to ``RUN_DIR/run.log`` (full tracebacks of failed samples
    and of an internal error)."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.lock = None
        self.handler = None

    def __enter__(self) -> None:
        from cytopipe.store import RunLock, remove_orphan_temps

        self.folder.create()
        self.lock = RunLock(self.folder.path, "run").acquire()
        try:
            self.handler = _RunLogHandler(self.folder.path / "run.log", encoding="utf-8")
        except OSError as exc:
            self.lock.release()
            from cytopipe.errors import OutputWriteError

            raise OutputWriteError.from_oserror(self.folder.path / "run.log", exc) from None
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("cytopipe")
        root.addHandler(self.handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        logger.info("run started in %s (pid %d)", self.folder.path, os.getpid())
        if self.lock.stale:
            logger.warning(
                "took over a stale lock of an earlier run that no longer runs: %s", self.lock.stale
            )
        removed = remove_orphan_temps(self.folder.path)
        if removed:
            logger.info("removed %d temporary files left by an interrupted run: %s", len(removed),
                        ", ".join(str(p.relative_to(self.folder.path)) for p in removed))  # fmt: skip

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is not None and not isinstance(exc, CytopipeError | KeyboardInterrupt):
                logger.error("the run stopped with an internal error", exc_info=(kind, exc, tb))
            elif exc is not None:
                logger.error("the run stopped: %s", exc)
            else:
                logger.info("run finished")
        finally:
            if self.handler is not None:
                logging.getLogger("cytopipe").removeHandler(self.handler)
                self.handler.close()
            self.lock.release()
        return False


def run_steps(ctx: RunContext, steps: Sequence[Step]) -> None:
    for step in steps:
        s0 = time.perf_counter()
        logger.info("step %s", step.name)
        info = step.run(ctx) or {}
        ctx.steps.append({"step": step.name, "seconds": round(time.perf_counter() - s0, 3), **info})


def finish_run(
    ctx: RunContext, info: dict[str, Any], t0: float, parquet: Sequence[str] | None = None
) -> None:
    """Write the tables (``parquet``: only those), the catalog and run.json, then the report (which
    reads them), then run.json and the catalog's run record again with the report's outcome; prune
    the cache."""
    folder = ctx.folder
    stale = [n for n in OPTIONAL_TABLES if n not in ctx.tables]
    for name in stale:  # e.g. clustering switched off since the last run of this folder
        folder.table_path(name).unlink(missing_ok=True)
    if "clusters" not in ctx.tables:  # the clustering tables of an earlier run (a model file stays)
        for path in (folder.path / "clustering").glob("*.parquet"):
            path.unlink()
    tables, blind = _blinded_outputs(ctx, info)
    logger.info("writing the tables, catalog.duckdb and run.json")
    folder.write_outputs(tables, blind(info), parquet=parquet)
    if ctx.blinding is not None:  # the folder's other files (earlier tables, study/) coded too
        from cytopipe.report.blinding import recode_folder

        recode_folder(folder.path, ctx.blinding[0], blind(info))
    if not ctx.wf.report.get("enabled", True):
        _remove_stale_report(folder.path)
    else:
        s0 = time.perf_counter()
        logger.info("writing the report")
        step = write_run_report(folder.path, ctx.wf, ctx.problems, progress=ctx.progress)
        ctx.steps.append({"step": "report", "seconds": round(time.perf_counter() - s0, 3), **step})
        if step.get("reused") and _all_reused(ctx):
            print("nothing changed since the last run: every result was reused (samples, statistics, report)",
                  file=sys.stderr)  # fmt: skip
        info.update(steps=ctx.steps, problems=list(ctx.problems), seconds=round(time.perf_counter() - t0, 3))
        from cytopipe.store import atomic_write_json, write_catalog

        write_catalog(folder.catalog, tables, blind(info))
        atomic_write_json(folder.run_json, blind(info))
    for phase, keys in ctx.keep_cache.items():
        folder.prune_cache(phase, keys)  # results of older settings/files are no longer needed
    from cytopipe.rerun import record_finished_run

    record_finished_run(
        folder.path, ctx.rerun, {str(j.get("path")): j.get("sha256") for j in ctx.jobs + ctx.controls}
    )


def _all_reused(ctx: RunContext) -> bool:
    """Every per-sample result came from the cache and the statistics were reused."""
    stats = next((st for st in ctx.steps if st.get("step") == "statistics"), {})
    samples_reused = ctx.cached >= len(ctx.alive()) if ctx.jobs else True
    return samples_reused and (stats.get("reused") or stats.get("enabled") is False)


def _blinded_outputs(
    ctx: RunContext, info: dict[str, Any]
) -> tuple[Mapping[str, pd.DataFrame], Callable[[dict[str, Any]], dict[str, Any]]]:
    """The tables and a run.json maker as they are written: arm names coded when the run folder is
    blinded (or the workflow blinds it now; docs/reports.md). ``ctx.blinding`` = (codes, record)."""
    from cytopipe.report.blinding import blind_frame, blinded_info, resolve_blinding

    arms: list[str] = []
    for name in ("population_stats", "samples"):
        if name in ctx.tables and "arm" in ctx.tables[name].columns:
            arms += [a for a in ctx.tables[name]["arm"].dropna().astype(str).unique() if a]
    samples = ctx.tables.get("samples")
    hashes = sorted(str(h) for h in samples["sha256"].dropna()) if samples is not None and "sha256" in samples else []  # fmt: skip
    ctx.blinding = resolve_blinding(
        ctx.folder.path,
        want=bool(ctx.wf.report.get("blinded")),
        arms=arms,
        key=ctx.wf.report.get("blind_key"),
        workflow={"manifest": str(ctx.wf.manifest or ""), "clinical": str(ctx.wf.clinical or "")},
        secret="\n".join(hashes).encode() or None,
        by="cytopipe "
        + (" ".join(sys.argv[1:2]) or "run")
        + " (workflow `report: {blinded: true}` or --blinded)",
    )
    if ctx.blinding is None:
        return ctx.tables, lambda i: i
    codes, record = ctx.blinding
    tables = {name: blind_frame(df, codes) for name, df in ctx.tables.items()}
    return tables, lambda i: blinded_info(i, codes, record)


def _remove_stale_report(run_dir: Path) -> None:
    """A report of an earlier state of this run folder would contradict the new tables: remove it
    (``cytopipe report RUN_DIR`` writes it again)."""
    import shutil

    if (run_dir / "report.html").is_file():
        (run_dir / "report.html").unlink()
        shutil.rmtree(run_dir / "report_tables", ignore_errors=True)
        print(
            "cytopipe run: removed the run folder's earlier report.html (it described the previous run); "
            "`cytopipe report RUN_DIR` writes a new one",
            file=sys.stderr,
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
    ctx.manifest = _load_manifest(wf.manifest)
    ctx.jobs, ctx.controls = split_jobs(ctx.manifest)
    for job in ctx.jobs + ctx.controls:
        if not job.get("ok", True):
            ctx.fail(
                job,
                {
                    "error": f"manifest row {job.get('row')}: {job.get('problem')}",
                    "error_type": "ManifestError",
                },
                "manifest",
            )
    if not ctx.jobs:
        raise ManifestError("the manifest lists no samples to analyse (only controls)", file=wf.manifest)
    if wf.compensation["source"] == "controls" and not ctx.controls:
        raise WorkflowError(
            "compensation source is 'controls' but the manifest has no control rows "
            "(`control` column: unstained, single:CD4, ...)",
            key="compensation.source",
            file=wf.manifest,
        )
    ctx.state = build_state(wf, n_samples=len(ctx.jobs))
    from cytopipe.cluster_steps import plan_clustering
    from cytopipe.workflow import statistics_enabled, statistics_settings

    ctx.state.cluster = plan_clustering(wf, ctx.state.template, ctx.state.transforms)
    if statistics_enabled(wf):
        ctx.stats_settings = statistics_settings(wf)
    if wf.clinical is not None:
        ctx.clinical_problem = _check_clinical(wf, ctx.manifest)
    _check_blind_key(wf)
    ctx.hashes["template"] = file_sha256(wf.template)
    ctx.hashes["qc"] = stable_hash(ctx.state.qc.to_dict())
    ctx.hashes["compensation"] = _spillover_hash(
        ctx.state.compensation, ctx.state.spillover, ctx.state.template.compensation
    )


def _check_blind_key(wf: Workflow) -> None:
    """A blinding key must code every arm of the run's inputs. Blinding is a property of the run
    folder applied when the tables are written, so a bad key would stop the run after all its work:
    found here instead, before any (exit 2)."""
    key = wf.report.get("blind_key")
    if not wf.report.get("blinded") or key is None:
        return
    from cytopipe.report.blinding import arm_codes, source_arms

    arms = source_arms({"manifest": str(wf.manifest or ""), "clinical": str(wf.clinical or "")})
    try:
        arm_codes(arms, key)
    except errors.ReportError as exc:
        raise WorkflowError(exc.message, key="report.blind_key", file=Path(str(key))) from None


def _check_clinical(wf: Workflow, manifest: pd.DataFrame) -> str | None:
    """Check the clinical table now and say so at once. Gating does not need it: a problem is never
    fatal; it is recorded in run.json and the statistics step leaves out the clinical tests."""
    from cytopipe.clinical import load_clinical
    from cytopipe.errors import ClinicalDataError

    samples = manifest[(manifest["control"] == "") & manifest["ok"]]
    try:
        load_clinical(
            wf.clinical,
            patients=samples[["patient_id", "arm"]].drop_duplicates(),
            baseline_visit=int(wf.statistics.get("baseline_visit") or 0),
        )
    except ClinicalDataError as exc:
        print(f"cytopipe run: warning: clinical table: {exc}", file=sys.stderr)
        return str(exc)
    return None


def split_jobs(manifest: pd.DataFrame) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Manifest rows as plain dicts: (samples to gate, compensation controls).

    Rows with a problem (missing file, blank column, bad visit...) are kept, with their
    ``problem``; the run records them as failed without processing them."""
    jobs: list[dict[str, Any]] = []
    controls: list[dict[str, Any]] = []
    for record in manifest.to_dict("records"):
        job = {k: _plain(v) for k, v in record.items()}
        (controls if job.get("control") else jobs).append(job)
    return jobs, controls


def build_state(wf: Workflow, n_samples: int) -> StudyState:
    """The study state before the study-level steps (template, QC, matrix, fixed transforms)."""
    import dataclasses

    from cytopipe.gating import load_template

    template = load_template(wf.template)
    source = wf.compensation["source"]
    spillover = None
    if source == "csv":
        from cytopipe.compensation import Compensation

        spillover = Compensation.from_csv(wf.compensation["path"]).to_spillover()
    if source in ("file", "csv", "controls"):
        template = dataclasses.replace(template, compensation="file")  # the engine reads sample.spillover
    elif source == "none":
        template = dataclasses.replace(template, compensation="none")
    return StudyState(
        qc=QCSettings.from_mapping(wf.qc),
        template=template,
        compensation=source,
        spillover=spillover,
        seed=wf.seed,
        transforms=_transform_params(wf.transforms.get("params") or {}),
        pool_markers=_pool_markers(template, wf.transforms),
        pool_events=_pool_size(wf.transforms, n_samples),
    )


def _transform_params(params: Mapping[str, Any]) -> dict[str, dict]:
    from cytopipe.gating import check_transform

    return {
        str(m): check_transform(spec, {"marker": str(m), "key": "transforms.params"})
        for m, spec in params.items()
    }


def _pool_markers(template: Any, transforms: Mapping[str, Any]) -> list[str]:
    if transforms.get("estimate") != "study":
        return []
    if transforms.get("markers"):
        return list(transforms["markers"])
    from cytopipe.gating import is_scatter_or_time

    fixed = set(transforms.get("params") or {})
    return [m for m in template.markers() if not is_scatter_or_time(m) and m not in fixed]


def _pool_size(transforms: Mapping[str, Any], n_samples: int) -> int:
    per = int(transforms.get("events_per_sample") or 2000)
    cap = transforms.get("max_pooled_events")
    if cap:
        per = min(per, max(100, int(cap) // max(n_samples, 1)))
    return per


def _load_manifest(path: Path) -> pd.DataFrame:
    """Every manifest row, with ``ok``/``problem`` per row (a bad row is recorded, not fatal)."""
    from cytopipe.manifest import load_manifest

    df = load_manifest(path, strict=False)
    df["control"] = df["control"].fillna("").astype(str).str.strip()
    # a row without a usable sample_id still gets a unique name, so its problem can be reported
    sid = df["sample_id"].fillna("").astype(str).str.strip()
    blank = sid == ""
    sid[blank] = [f"(manifest row {r})" for r in df.loc[blank, "row"]]
    dup = sid.duplicated(keep="first")
    sid[dup] = [f"{s} (manifest row {r})" for s, r in zip(sid[dup], df.loc[dup, "row"])]
    df["sample_id"] = sid
    return df


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _spillover_hash(source: str, spillover: Any, template_comp: str) -> str:
    if spillover is None:
        return stable_hash({"source": source, "template": template_comp})
    return stable_hash(
        {
            "source": source,
            "channels": list(spillover.channels),
            "matrix": np.asarray(spillover.matrix).tolist(),
        }
    )


# --- step: register -----------------------------------------------------------------------------
def step_register(ctx: RunContext) -> dict[str, Any]:
    """sha256 of every file, read check and template markers (per-file problems recorded)."""
    jobs = [j for j in ctx.jobs + ctx.controls if j["sample_id"] not in ctx.failures]
    for i, res in ctx.executor.map(register_task, jobs, ctx.state, "register", ctx.progress):
        job = jobs[i]
        res = _as_result(res)
        if res.get("ok"):
            job["sha256"] = res["sha256"]
            job["n_events"] = res["n_events"]
            job["_missing"] = (res.get("missing") or [], res.get("channels"))
        else:
            ctx.fail(job, res, "register")
    skipped = _missing_everywhere(ctx, [j for j in jobs if "_missing" in j and not j.get("control")])
    for j in jobs:
        j.pop("_missing", None)
    return {"files": len(jobs), "failed": len(ctx.failures), "not_measured_markers": skipped}


def _missing_everywhere(ctx: RunContext, jobs: list[dict[str, Any]]) -> list[str]:
    """A template marker absent from EVERY file: one error before any work (``missing_markers:
    stop``), or its populations 'not measured' everywhere (``skip``)."""
    if not jobs or not all(j["_missing"][0] for j in jobs):
        return []
    from cytopipe.gating.check import check_study_markers

    tables = {j["file"]: pd.DataFrame(j["_missing"][1]) for j in jobs}
    skipped = check_study_markers(ctx.state.template, tables, policy=ctx.wf.missing_markers)
    return [m.marker for m in skipped]


# --- step: study spillover from controls --------------------------------------------------------
def step_compensation(ctx: RunContext) -> dict[str, Any]:
    """The study matrix computed from single-stain controls (AutoSpill-like), when asked."""
    if ctx.state.compensation != "controls":
        return {"source": ctx.state.compensation}
    controls = [c for c in ctx.controls if c["sample_id"] not in ctx.failures]
    if not controls:
        raise WorkflowError(
            "compensation from controls: no readable control file (see samples.parquet)",
            key="compensation.source",
        )
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

    spill = Spillover(np.asarray(res["matrix"], dtype=np.float64), list(res["channels"]))
    ctx.state.spillover = spill
    ctx.hashes["compensation"] = _spillover_hash("controls", spill, "file")
    from cytopipe.store import atomic_write_bytes, atomic_write_parquet

    atomic_write_bytes(ctx.folder.study / "spillover.csv", _matrix_csv(spill).encode())
    atomic_write_parquet(ctx.folder.study / "spillover_quality.parquet", res["quality"])
    flagged = res["quality"][res["quality"]["flag"] != "ok"] if "flag" in res["quality"] else []
    return {"source": "controls", "controls": len(controls), "pairs_flagged": int(len(flagged))}


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


def _matrix_csv(spill: Any) -> str:
    from cytopipe.tabular import csv_text

    df = pd.DataFrame(np.asarray(spill.matrix), index=list(spill.channels), columns=list(spill.channels))
    return csv_text(df, index=True)


# --- step: study transforms from pooled events --------------------------------------------------
def step_transforms(ctx: RunContext) -> dict[str, Any]:
    """Transform parameters estimated once from events pooled over every sample, then locked."""
    spec = ctx.wf.transforms
    if spec.get("estimate") != "study" or not ctx.state.pool_markers:
        ctx.hashes["transforms"] = stable_hash(ctx.state.transforms)
        return {"estimate": "template", "overrides": sorted(ctx.state.transforms)}
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
    if not pools:
        return {"estimate": "study", "samples_pooled": 0}
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


# --- step: gating pass 1 + pooled estimates -----------------------------------------------------
def step_gate_fit(ctx: RunContext) -> dict[str, Any]:
    """Per-sample fits of the data-driven gates, pooled per patient / batch / cohort."""
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


def _settings_key(ctx: RunContext, *names: str) -> str:
    return stable_hash([ctx.hashes.get(n) for n in names] + [ctx.wf.seed])


# --- step: gating pass 2 ------------------------------------------------------------------------
# the gating pass's per-sample result changed shape (gate-review data): older cache entries are redone
GATE_TASK_VERSION = "g3"  # g3: gate-review panels carry their parent's background


def _pooled_key(ctx: RunContext) -> Callable[[Mapping[str, Any]], str]:
    """Per-sample cache-key part: only the pooled estimates this sample can use (its patient,
    batch, cohort), so adding another patient's samples does not redo this one."""
    pooled = ctx.state.pooled

    def extra(job: Mapping[str, Any]) -> str:
        if pooled is None:
            return ""
        t = pooled.table
        sel = (
            (t["level"] == "cohort")
            | ((t["level"] == "patient") & (t["group"] == str(job.get("patient_id"))))
            | ((t["level"] == "batch") & (t["group"] == str(job.get("batch"))))
        )
        return stable_hash(t[sel].to_json())[:8]

    return extra


def step_gate(ctx: RunContext) -> dict[str, Any]:
    """Pass 2: the fused pass's results stand for every sample whose gating cannot depend on the
    pooled estimates; only the others (fits that fell back or moved) are read and gated again."""
    _plan_cluster_inputs(ctx, "gate")
    ready = {}
    for job in ctx.alive():
        res = ctx.fused.get(job["sample_id"])
        if res is not None and "stats" in res and "fits" in res:
            if not needs_regating(res["fits"], job, ctx.state.template, ctx.state.pooled):
                ready[job["sample_id"]] = {k: v for k, v in res.items() if k != "fits"}
    ctx.results = _run_cached_phase(
        ctx, "gate", gate_task, stable_hash(ctx.gate_key()), extra_key=_pooled_key(ctx), ready=ready
    )
    return {
        "samples": len(ctx.results),
        "reused": ctx.cached,
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


# temporary per-sample mapping inputs (parent events x clustering and median markers)
MAP_INPUTS = "map-inputs"


# --- step: assemble the tables ------------------------------------------------------------------
def step_assemble(ctx: RunContext) -> dict[str, Any]:
    from cytopipe.report.gate_review import write_gate_review

    ctx.tables["population_stats"] = assemble_population_stats(ctx)
    ctx.tables["samples"] = assemble_samples(ctx)
    review = assemble_gate_review(ctx)
    # not in catalog.duckdb: it is a store of small pictures (histograms), read by the report
    write_gate_review(ctx.folder.path, review)
    return {"rows": len(ctx.tables["population_stats"]), "gate_review_rows": len(review)}


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
    return pd.concat(frames, ignore_index=True)[GATE_REVIEW_COLUMNS]


# --- step: statistics ---------------------------------------------------------------------------
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
        if ctx.progress:
            print("statistics: reused (population and cluster tables, clinical table and settings unchanged)",
                  file=sys.stderr)  # fmt: skip
        ctx.problems.extend(cached.get("problems") or [])
        if table is not None:
            ctx.tables["statistics"] = table
        return {**cached["info"], "reused": True}
    if ctx.progress:
        n = ctx.tables["population_stats"]["population"].nunique() if "population_stats" in ctx.tables else 0
        print(f"statistics: computing the tests of {n} populations ...", file=sys.stderr)
    before = len(ctx.problems)
    table, info = compute_statistics(ctx)
    if table is not None:
        ctx.tables["statistics"] = table
        ctx.folder.save_cached("statistics", key + ".table", "parquet", table)
    ctx.folder.save_cached("statistics", key, "json", {"info": info, "problems": ctx.problems[before:],
                                                        "rows": 0 if table is None else len(table)})  # fmt: skip
    return info


#: bump when the statistics change for the same inputs (cached statistics are then recomputed)
STATISTICS_VERSION = "1"


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
    gated = _statistics_of(ctx, ps, clinical, settings, "gated populations")
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
    if not parts:
        return None, {"enabled": True, "rows": 0}
    out = pd.concat(parts, ignore_index=True)
    return out, {
        "enabled": True,
        "rows": len(out),
        "cluster_rows": n_cluster_rows,
        "metaclusters_not_tested": tiny,
        "clinical": clinical is not None,
    }


def _statistics_of(
    ctx: RunContext, table: pd.DataFrame, clinical: pd.DataFrame | None, settings: Any, what: str
) -> pd.DataFrame | None:
    import warnings

    from cytopipe.errors import ClinicalDataError
    from cytopipe.stats import run_statistics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model-fit warnings are in the table's `note` column
        try:
            try:
                return run_statistics(table, clinical, settings)
            except ClinicalDataError as exc:
                if clinical is None:
                    raise
                ctx.problems.append(
                    f"statistics of the {what}: the clinical table does not fit the flow data ({exc}); "
                    "the clinical tests were left out"
                )
                return run_statistics(table, None, settings)
        except CytopipeError as exc:
            ctx.problems.append(f"statistics of the {what} could not be computed: {exc}")
            return None


# --- the report (after the data outputs are written) ----------------------------------------------
def write_run_report(
    run_dir: Path, wf: Workflow, problems: list[str], progress: bool = True
) -> dict[str, Any]:
    """``report.html`` of the finished run folder. A failure is recorded in ``problems`` (and the
    step's record), never raised: the run's data outputs stand without a report."""
    settings = wf.report
    if not settings.get("enabled", True):
        return {"enabled": False}
    from cytopipe.report import write_report
    from cytopipe.report.build import report_is_current

    options = dict(
        blinded=bool(settings.get("blinded")),
        blind_key=settings.get("blind_key"),
        max_gallery=int(settings.get("max_gallery") or 36),
    )
    try:
        if report_is_current(run_dir, **options):
            logger.info("report: reused (its inputs are unchanged)")
            print("report: reused (its inputs are unchanged)", file=sys.stderr)
            return {"enabled": True, "written": True, "reused": True, "path": "report.html",
                    "blinded": bool(settings.get("blinded"))}  # fmt: skip
        if progress:
            print("report: writing report.html ...", file=sys.stderr)
        path = write_report(run_dir, **options)
    except errors.OutputWriteError:
        raise  # a full disk or read-only folder stops the run (exit 4): the rerun resumes
    except CytopipeError as exc:
        problems.append(f"report: not written: {exc}")
        return {"enabled": True, "written": False, "error": str(exc)}
    except Exception as exc:  # a bug in the report must not cost the run's tables
        if isinstance(exc, OSError) and errors.exit_code_for(exc) == EXIT_OUTPUT:
            raise  # disk full / read-only while writing the report: exit 4, the rerun resumes
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        problems.append(
            f"report: not written: internal error {type(exc).__name__}: {exc}{where} (please report this)"
        )
        return {"enabled": True, "written": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"enabled": True, "written": True, "path": path.name, "blinded": bool(settings.get("blinded"))}


# ================================================================================================
# cached phases
# ================================================================================================
def _run_cached_phase(
    ctx: RunContext,
    phase: str,
    fn: Callable,
    settings_key: str,
    extra_key: Callable[[Mapping[str, Any]], str] | None = None,
    soft: bool = False,
    ready: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``fn`` on every live sample whose (sha256, settings) result is not cached yet.

    ``ready``: results already computed (by a fused earlier pass) for some samples; they are
    cached and used instead of running ``fn``. A failed sample is failed for the whole run
    (``ctx.fail``), or with ``soft`` only left out of this phase's results
    (``ctx.soft_failures[phase]``)."""
    from cytopipe.rerun import manifest_key

    results: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    keys: dict[str, str] = {}
    for job in ctx.alive():
        key = f"{job['sha256'][:32]}-{settings_key[:16]}{manifest_key(job)}"
        if extra_key is not None:
            key += extra_key(job)
        keys[job["sample_id"]] = key
        cached = _load_result(ctx.folder, phase, key)
        if cached is not None:
            results[job["sample_id"]] = cached
        else:
            todo.append(job)
    ctx.reused[phase] = len(results)
    if phase == "gate":
        ctx.cached = len(results)
    if ready:
        given = [j for j in todo if j["sample_id"] in ready]
        for job in given:
            _save_result(ctx.folder, phase, keys[job["sample_id"]], ready[job["sample_id"]])
            results[job["sample_id"]] = ready[job["sample_id"]]
        todo = [j for j in todo if j["sample_id"] not in ready]
        ctx.reused[f"{phase}-ready"] = len(given)
    ctx.keep_cache.setdefault(phase, set()).update(keys.values())
    ctx.result_keys[phase] = keys
    for i, res in ctx.executor.map(fn, todo, ctx.state, phase, ctx.progress):
        job = todo[i]
        res = _as_result(res)
        if res.get("ok"):
            _save_result(ctx.folder, phase, keys[job["sample_id"]], res)
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


def _save_result(folder: RunFolder, phase: str, key: str, res: Mapping[str, Any]) -> None:
    """Tables as Parquet, arrays as .npy, the rest as JSON written last (it marks the entry complete)."""
    meta: dict[str, Any] = {"_parts": {}}
    for name, value in res.items():
        if name in ("pid", "seconds"):
            continue
        if isinstance(value, pd.DataFrame):
            folder.save_cached(phase, f"{key}.{name}", "parquet", value)
            meta["_parts"][name] = "parquet"
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
    st = ctx.state
    spill = st.spillover
    fits = ctx.folder.study / "gate_fits.parquet"
    return {
        "compensation": st.compensation,
        "spillover": None
        if spill is None
        else {"channels": list(spill.channels), "matrix": np.asarray(spill.matrix).tolist()},
        "transforms": st.transforms,
        "gate_fits": "study/gate_fits.parquet" if st.pooled is not None and fits.is_file() else None,
    }


@dataclass
class LoadedRun:
    """A finished run, ready to re-process its samples exactly as it did (for exports)."""

    folder: RunFolder
    info: dict[str, Any]
    wf: Workflow
    state: StudyState
    jobs: list[dict[str, Any]]  # samples processed ok/flagged, with their manifest fields
    samples: pd.DataFrame
    codes: dict[str, str] | None = None  # arm -> code when the run folder is blinded


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a finished run's study state from run.json and its study/ folder."""
    from cytopipe.errors import StoreError
    from cytopipe.store import read_run_info, read_table

    folder = RunFolder(run_dir)
    info = read_run_info(folder.path)
    codes = _folder_codes(folder.path, info)
    if codes is not None:  # a blinded folder: its arms as the manifest names them, in memory only
        from cytopipe.report.blinding import recode_obj

        info = recode_obj(info, codes, unblind=True)
    wf = Workflow.from_dict(info["workflow"])
    for key, path in (("template", wf.template), ("manifest", wf.manifest)):
        if not Path(path).is_file():
            raise StoreError(
                f"the run's {key} {path} is gone; it is needed to re-process the samples", file=folder.path
            )
    if file_sha256(wf.template) != info["hashes"]["template"]:
        raise StoreError(
            f"the gating template {wf.template} changed since this run; rerun `cytopipe run` first "
            "so that exported populations match population_stats",
            file=folder.path,
        )
    manifest = _load_manifest(wf.manifest)
    jobs, _ = split_jobs(manifest)
    state = build_state(wf, n_samples=len(jobs))
    record = info.get("study_state") or {}
    if record.get("spillover"):
        from cytopipe.fcs import Spillover

        sp = record["spillover"]
        state.spillover = Spillover(np.asarray(sp["matrix"], dtype=np.float64), list(sp["channels"]))
    state.transforms = dict(record.get("transforms") or {})
    if record.get("gate_fits"):
        from cytopipe.gating import pool_estimates

        state.pooled = pool_estimates(pd.read_parquet(folder.path / record["gate_fits"]), manifest)
    samples = read_table(folder.path, "samples")
    if codes is not None:
        from cytopipe.report.blinding import unblind_frame

        samples = unblind_frame(samples, codes)
    usable = samples[samples["status"].isin(["ok", "flagged"]) & samples["control"].fillna("").eq("")]
    sha = dict(zip(usable["sample_id"], usable["sha256"]))
    jobs = [dict(j, sha256=sha[j["sample_id"]]) for j in jobs if j["sample_id"] in sha]
    return LoadedRun(folder=folder, info=info, wf=wf, state=state, jobs=jobs, samples=samples, codes=codes)


def _folder_codes(path: Path, info: Mapping[str, Any]) -> dict[str, str] | None:
    """``{arm: code}`` of a blinded run folder (from its manifest's arms), else ``None``."""
    from cytopipe.report.blinding import codes_of_record, run_record, source_arms

    record = run_record(info)
    if record is None:
        return None
    return codes_of_record(record, source_arms(info.get("workflow")), path)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _cluster_train(ctx: RunContext) -> dict[str, Any]:
    from cytopipe.cluster_steps import step_cluster_train

    return step_cluster_train(ctx)


def _cluster_map(ctx: RunContext) -> dict[str, Any]:
    import shutil

    from cytopipe.cluster_steps import step_cluster_map

    try:
        return step_cluster_map(ctx)
    finally:  # the mapping inputs are only needed by this step
        shutil.rmtree(ctx.folder.cache / MAP_INPUTS, ignore_errors=True)


# tables a run writes only when their step ran (a rerun without the step removes the old file)
OPTIONAL_TABLES = ("clusters", "statistics")

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
    # then, once the tables are written: the report (finish_run)
]
