"""Executors: the same per-sample function run in this process or on Dask.

:class:`SyncExecutor` (one after the other, no Dask; ``--scheduler synchronous``, tests,
``cytopipe gate``) and :class:`DaskExecutor` (a LocalCluster of 1-thread worker processes, or an
existing scheduler). Both have ``map(fn, items, shared, desc, progress)`` yielding
``(index, result)`` as tasks finish; a task that never returns comes back as a
:class:`TaskFailure`, and so does every task still waiting when the cluster has had no live
worker for too long (a local cluster's dropped workers are started again first: see
:mod:`cytopipe.pipeline.worker_watch`). Worker settings
(BLAS threads) go to the workers through the nanny's environment and a worker plugin; this
process's ``os.environ`` is not changed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cytopipe.config import stable_hash
from cytopipe.errors import ExecutionError, WorkflowError
from cytopipe.pipeline.progress import _progress
from cytopipe.pipeline.shared_state import RUN_AGAIN, SharedState
from cytopipe.pipeline.worker_watch import (
    NO_WORKER_TIMEOUT_EXISTING_S,
    NO_WORKER_TIMEOUT_LOCAL_S,
    WATCH_EVERY_S,
    WorkerKeeper,
    WorkerWatch,
)

logger = logging.getLogger(__name__)


def add_executor_arguments(
    parser: argparse.ArgumentParser, workers_default: str = "one per core", memory_limit: bool = True
) -> None:
    """Where the work runs: the same options for ``cytopipe run``, ``cluster`` and ``export``."""
    parser.add_argument(
        "--workers", type=int, help=f"number of worker processes (default: {workers_default})"
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
    if memory_limit:
        parser.add_argument(
            "--memory-limit",
            help="memory limit per local worker, e.g. '4GB' (default: 90%% of the machine's memory / workers)",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class Deferred:
    """The result of one task started with ``executor.submit``: :meth:`result` waits for it and
    returns it, or raises what the task raised (a task that never returned: :class:`TaskError`)."""

    def __init__(self, get: Callable[[], Any]):
        self._get = get

    def result(self) -> Any:
        return self._get()


class TaskError(ExecutionError, RuntimeError):
    """A submitted task that did not return (its worker died, it was cancelled, ...)."""


class NoWorkerError(TaskError):
    """A task given up on: the Dask cluster had no live worker for too long."""


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

    def submit(self, fn: Callable, *args: Any, desc: str = "task") -> Deferred:
        """``fn(*args)`` computed when its result is asked for (nothing runs beside this process)."""
        return Deferred(lambda: fn(*args))

    def info(self) -> dict[str, Any]:
        return {"scheduler": self.name, "workers": 1}

    def close(self) -> None:
        pass


_SPAWN_LOCK = threading.Lock()

# Dask's periodic housekeeping, made less frequent on a local cluster: on 2 cores every wake-up
# takes CPU from the tasks. Idle, with 2 workers, these cost 106 ms of CPU per second (scheduler,
# nannies and client 38, each worker 33-35); with these settings 13 ms/s. Busy, on 24 files of
# 200k events with fixed gates on 1 worker (interleaved with the defaults, 4 rounds each, AMD EPYC
# VM, 2026-12-04): CPU inside the tasks 1.92 s against 2.09 s (the 10 ms profiler samples the
# task's stack under the GIL), the worker's CPU outside them 0.07 s against 0.16 s, wall 1.97 s
# against 2.22 s; bench/scaling.py's client + scheduler + nannies 0.15 s against 0.25-0.30 s
# per run. What they cost: the event-loop watchdog (`tick`, default every 20 ms) notices a
# blocked loop within a second instead of 20 ms (it only logs); the dashboard shows no per-task
# profile (sampled every 10 ms in each worker) and system plots every 5 s instead of 0.5 s; memory
# limits are checked every 0.5 s instead of 0.1 s (a sample's matrix is allocated in steps well
# below a worker's limit). Applied when the scheduler and nannies are created (a nanny hands its
# config to the workers it starts, also on a restart); an existing cluster
# (`--scheduler-address`) keeps its own settings.
QUIET_LOCAL_CLUSTER = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "500ms",
}

# environment of local worker processes (given to the nannies; this process's is not changed)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# A cluster with no live worker, or fewer than asked for: see worker_watch.py (dropped local
# nannies started again; waiting tasks given up after `no_worker_timeout` without a worker).


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Worker processes started inside ignore SIGINT (a disposition a spawned process inherits):
    Ctrl-C in a terminal reaches every process of the group, and each worker printed its own
    KeyboardInterrupt traceback; this process handles it and closes the cluster. Only from the
    main thread (signal handlers cannot be set elsewhere; a server's run threads are left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


class DaskExecutor:
    """Whole-sample tasks on dask.distributed: a LocalCluster of processes or a given scheduler."""

    name = "distributed"

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        memory_limit: str | None = None,
        connect_timeout: float = 20.0,
        no_worker_timeout: float | None = None,
    ):
        """``no_worker_timeout``: seconds without a live worker after which the samples still
        waiting fail (default NO_WORKER_TIMEOUT_LOCAL_S, or NO_WORKER_TIMEOUT_EXISTING_S with
        ``address``)."""
        import dask
        from dask.distributed import Client, LocalCluster

        self.cluster = None
        self.no_worker_timeout = no_worker_timeout or (
            NO_WORKER_TIMEOUT_EXISTING_S if address else NO_WORKER_TIMEOUT_LOCAL_S
        )
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
            from dask.system import CPU_COUNT  # the CPUs this process may use (affinity, cgroup quota)

            n = workers or CPU_COUNT or 1
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
            # machine costs ~40x the page faults and +40% CPU per sample; the ReturnFreedMemory
            # plugin fixes glibc's thresholds instead. (No NUMBA_NUM_THREADS: tasks run no parallel
            # numba code, and a changed NUMBA_NUM_THREADS in the client would make numba refuse to
            # compile once its thread pool has started, e.g. after a UMAP.)
            # the nannies still set PYTHONHASHSEED (and dask __DASK_PARENT_PID) here: restored
            # (one cluster starts at a time: two studies started together from two threads would
            # otherwise save and restore each other's values)
            touched = ["PYTHONHASHSEED", "__DASK_PARENT_PID"]
            _SPAWN_LOCK.acquire()
            self._environ = {k: os.environ.get(k) for k in touched}
            try:
                with dask.config.set({"distributed.nanny.pre-spawn-environ": {}, **QUIET_LOCAL_CLUSTER}):
                    # a nanny keeps a shallow merge of the global config for the workers it
                    # (re)starts: its `distributed` section would be the very dict this `with`
                    # restores on leaving, so a restarted worker got dask's defaults; a copy
                    worker_config = {"distributed": copy.deepcopy(dask.config.get("distributed"))}
                    from cytopipe._dask_plugins import RestartSafeNanny

                    with _workers_ignore_ctrl_c():
                        self.cluster = LocalCluster(
                            n_workers=n,
                            threads_per_worker=1,
                            processes=True,
                            memory_limit=memory_limit or _default_memory_limit(n),
                            dashboard_address=":0" if _has_bokeh() else None,
                            silence_logs=50,  # logging.CRITICAL: a killed worker is reported by us
                            env=dict(WORKER_ENV),
                            config=worker_config,
                            worker_class=RestartSafeNanny,  # closable while it restarts a worker
                        )
            finally:
                self._restore_environ()
                _SPAWN_LOCK.release()
            # results fetched straight from the worker that holds them, not relayed by the
            # scheduler (which runs in this process: each result crossed it twice)
            self.client = Client(self.cluster, direct_to_workers=True)
            from cytopipe._dask_plugins import OneThreadBLAS, ReturnFreedMemory, WorkerAddresses

            self.client.register_plugin(OneThreadBLAS(), name=OneThreadBLAS.name)
            self.client.register_plugin(ReturnFreedMemory(), name=ReturnFreedMemory.name)
            self.client.register_plugin(WorkerAddresses(), name=WorkerAddresses.name)
            self.kind = "local"
        self.keeper = WorkerKeeper(self.client, self.cluster, self.no_worker_timeout)
        self.dashboard = self.client.dashboard_link if _has_bokeh() else None

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def map(
        self, fn: Callable, items: Sequence, shared: Any, desc: str, progress: bool
    ) -> Iterator[tuple[int, Any]]:
        if not items:
            return
        if (message := self._given_up(desc)) is not None:
            for i in range(len(items)):
                yield i, TaskFailure(message, "NoWorker")
            return
        token = stable_hash([desc, time.time_ns()])[:10]
        # a task's result, computed again when lost, also when the scheduler gave it up (shared_state.py)
        state = SharedState(self.client, shared, desc, token)
        futures: dict[Any, int] = {}

        def submit(i: int, tag: str = ""):
            fut = self.client.submit(
                fn,
                items[i],
                state.future,
                key=f"{desc}-{i}{tag}{state.tag}-{token}",
                pure=False,
                retries=0,
                priority=_task_priority(items[i]),
            )
            futures[fut] = i
            self.keeper.labels[fut.key] = _label(items[i], fut.key)  # to say what a dead worker ran
            return fut

        # One graph for the whole phase (one update-graph message, one scheduler pass) instead of a
        # submit per sample: each submit cost the scheduler's process ~0.5-1 ms (its message, a
        # hop to the offload thread, the client's call-stack capture), on a machine whose cores
        # the workers need. Largest files first: the order of the list is the tasks' priority.
        order = sorted(range(len(items)), key=lambda i: -_task_priority(items[i]))
        batch = self.client.map(
            fn,
            [items[i] for i in order],
            [state.future] * len(order),
            key=[f"{desc}-{i}{state.tag}-{token}" for i in order],
            pure=False,
            retries=0,
        )
        for i, fut in zip(order, batch):
            futures[fut] = i
            self.keeper.labels[fut.key] = _label(items[i], fut.key)
        bar = _progress(len(items), desc, progress)
        # A task whose worker died too often (KilledWorker) runs again at the end of the phase,
        # alone on the cluster: a worker holds two tasks at a time, so a file that kills its
        # worker takes the task queued next to it down too, and that one must not fail for it.
        again: list[int] = []
        more: list = []  # tasks run again on the shared state computed again: waited for too
        watch = WorkerWatch(self, desc)
        try:
            for fut, failure in self._finished(list(futures), watch, more):
                i = futures.pop(fut)
                value = failure or self._value(fut, watch, state)
                if value is RUN_AGAIN:
                    more.append(submit(i))
                    continue
                if isinstance(value, TaskFailure) and value.error_type == "KilledWorker":
                    again.append(i)
                    continue
                bar.update(1)
                yield i, value
            if again:
                logger.warning(
                    "%s: %d sample(s) were on a worker that died too often; running each again alone",
                    desc, len(again),
                )  # fmt: skip
            for n, i in enumerate(sorted(again)):
                value = RUN_AGAIN
                while value is RUN_AGAIN:  # as often as the shared state is computed again (bounded)
                    fut = submit(i, "-again")
                    futures.pop(fut)
                    value = self._value(fut, watch, state)
                if isinstance(value, TaskFailure) and value.error_type == "NoWorker":
                    for j in sorted(again)[n:]:  # no worker left: the rest are not tried
                        bar.update(1)
                        yield j, value
                    return
                bar.update(1)
                yield i, value
        finally:
            bar.close()
            for fut in futures:
                fut.cancel()
            state.release()
            for key in [k for k in self.keeper.labels if str(k).endswith(token)]:
                del self.keeper.labels[key]

    def submit(self, fn: Callable, *args: Any, desc: str = "task") -> Deferred:
        """``fn(*args)`` started on a worker now, beside what this process does next (the UMAP
        while the statistics are computed)."""
        # the key must be unique: tasks submitted with one key are one task to dask (each future
        # would get the first one's result); the clock alone can repeat within a tight loop
        if (message := self._given_up(desc)) is not None:

            def fail() -> Any:
                raise NoWorkerError(message)

            return Deferred(fail)
        self._submitted = getattr(self, "_submitted", 0) + 1
        token = stable_hash([desc, time.time_ns(), os.getpid(), id(self), self._submitted])[:10]
        fut = self.client.submit(fn, *args, key=f"{desc}-{self._submitted}-{token}", pure=False)

        def get() -> Any:
            try:
                if (message := self._given_up(desc)) is not None:  # given up since it was submitted
                    fut.cancel()
                    raise NoWorkerError(message)
                return self._result(fut, WorkerWatch(self, desc))
            except TaskError:
                raise  # no worker for too long
            except Exception as exc:
                if type(exc).__module__.startswith(("distributed", "asyncio", "concurrent")):
                    raise TaskError(_task_failure_message(exc)) from exc
                raise  # the task's own error, as it raised it
            finally:
                fut.release()

        return Deferred(get)

    def _finished(
        self, futs: list, watch: WorkerWatch, more: list
    ) -> Iterator[tuple[Any, TaskFailure | None]]:
        """``futs`` as they finish (``as_completed``), each with None; when the cluster has had no
        live worker for ``no_worker_timeout`` seconds, the ones still waiting are cancelled and
        come at once (in the order given), each with the TaskFailure that says so. Futures the
        caller appends to ``more`` meanwhile are waited for too."""
        from dask.distributed import as_completed

        done = as_completed(futs)
        waiting = dict.fromkeys(futs)  # ordered
        while waiting or more:
            for fut in more:
                done.add(fut)
                waiting[fut] = None
            more.clear()
            if done.has_ready():
                fut = next(done)
                waiting.pop(fut, None)
                watch.since = None  # a task ended: the cluster is not stuck (a worker may be starting)
                if self.kind == "local":  # also while tasks end: a cluster short of workers is restored
                    watch.failure()
                yield fut, None
                continue
            message = watch.failure()
            if message is not None:
                self.client.cancel(list(waiting))
                failure = TaskFailure(message, "NoWorker")
                for fut in list(waiting):
                    yield fut, failure
                return
            with done.thread_condition:  # woken when a task finishes (as as_completed does)
                done.thread_condition.wait(timeout=0.1)

    def _result(self, fut: Any, watch: WorkerWatch) -> Any:
        """``fut.result()``, or NoWorkerError when the watch gives up on the cluster. A finished
        task's result can still be lost with its worker before it is fetched (the scheduler then
        computes it again): the wait goes on under the watch."""
        from dask.distributed import TimeoutError as DaskTimeoutError
        from dask.distributed import wait

        limit = 2 * WATCH_EVERY_S
        while True:
            while fut.status in ("pending", "lost"):
                with contextlib.suppress(DaskTimeoutError):
                    wait([fut], timeout=1.0)
                if fut.status in ("pending", "lost") and (message := watch.failure()) is not None:
                    fut.cancel()
                    raise NoWorkerError(message)
            if fut.status == "error":  # its own error: raised at once (its own TimeoutError too)
                return fut.result()
            try:
                return fut.result(timeout=limit)
            except DaskTimeoutError:
                if fut.status == "finished":
                    limit *= 2  # a large result on its way: a fetch cut short is started again
                # else lost with its worker on the way (the scheduler computes it again), or it ended
                # in an error after this wait timed out (a KilledWorker when its worker died
                # meanwhile): round again, so that error is raised, not this wait's TimeoutError,
                # which hid it from the retries (a sample failed "timed out after 4 s" on a busy machine)

    def _value(self, fut: Any, watch: WorkerWatch, state: SharedState) -> Any:
        """A task's result, or a TaskFailure when it did not return, or RUN_AGAIN when it failed
        because the scheduler gave up the phase's shared state, which is computed again; the
        future is released."""
        try:
            value = self._result(fut, watch)
        except NoWorkerError as exc:
            value = TaskFailure(str(exc), "NoWorker")
        except Exception as exc:  # KilledWorker, CancelledError, comm errors
            if state.lost(exc) and state.again(exc):
                value = RUN_AGAIN
            elif state.lost(exc):
                value = TaskFailure(state.failure_message(), "SharedStateLost")
            else:
                value = TaskFailure(_task_failure_message(exc), type(exc).__name__)
        fut.release()
        if not (isinstance(value, TaskFailure) and value.error_type == "NoWorker"):
            watch.since = None  # a task ended: the cluster is not stuck
        return value

    def _given_up(self, desc: str) -> str | None:
        """Why the executor gave up on its cluster (an earlier phase's waiting tasks failed for lack
        of a worker) when the cluster still has no live worker; else None (workers back: the work
        runs). The later phases then fail at once, with the same message, instead of each waiting
        ``no_worker_timeout`` again: their samples are failed (rerun to do them), a submitted
        task raises NoWorkerError (the UMAP becomes a problem of the run; the mixed models, which
        fit on workers only with two or more of them, are fitted in this process)."""
        message = self.keeper.given_up
        if message is None or self.keeper.live_workers() > 0:
            self.keeper.given_up = None
            self.keeper.told.clear()
            return None
        if desc not in self.keeper.told:
            self.keeper.told.add(desc)
            logger.error("%s: not started, the Dask cluster still has no worker: %s", desc, message)
        return message

    def no_worker_message(self, idle: float) -> str:
        if self.kind == "local":
            return (
                f"not processed: no Dask worker alive for {idle:.0f} s, and starting the local "
                "workers again did not bring one back; the workers were killed repeatedly, possibly "
                "by memory limits (see --memory-limit, and the system's OOM killer in dmesg) or a "
                "crash in a native library; run again with fewer --workers or a larger "
                "--memory-limit (the samples already done are kept)"
            )
        return (
            f"not processed: the Dask scheduler {self.client.scheduler.address} had no worker for "
            f"{idle:.0f} s; start workers for it (`dask worker {self.client.scheduler.address}`), "
            "or check why they died (memory limits, a crash in a native library), and run again "
            "(the samples already done are kept)"
        )

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
        """The client, then the local cluster: its nannies stop their worker processes and join
        them, also one a nanny is just starting again (RestartSafeNanny: dask raised
        ``AssertionError: can only join a started process`` here, at the end of a finished run)."""
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


def _label(item: Any, key: str) -> str:
    """A task's item as the messages name it: its sample, else the task's key."""
    if isinstance(item, Mapping) and item.get("sample_id") is not None:
        return f"sample {item['sample_id']}"
    return str(key)


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


def make_executor(
    scheduler: str, workers: int | None, address: str | None, memory_limit: str | None
) -> SyncExecutor | DaskExecutor:
    if scheduler == "synchronous":
        return SyncExecutor()
    if scheduler in ("local", "distributed"):
        return DaskExecutor(workers=workers, address=address, memory_limit=memory_limit)
    raise WorkflowError(f"unknown scheduler {scheduler!r}; use 'local', 'synchronous' or an address")
