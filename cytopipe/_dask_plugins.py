"""Dask plugins of :class:`cytopipe.pipeline.executors.DaskExecutor`, and the nanny of its local
worker processes (imported only with Dask)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import platform
import time
from typing import Any

from distributed import Nanny
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

logger = logging.getLogger(__name__)

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold (64-bit)
TRIM_THRESHOLD = 128 << 10  # glibc's default before it adapts
# Free memory glibc keeps at the top of a heap when it trims (default 128 KiB), also the extra it
# asks for when a heap grows. With 128 KiB a worker's task thread gave back and faulted in again
# ~5 MB per 200k-event sample (28-40k minor page faults per 24 samples, against ~0 in a plain loop
# in one process): ~4 % of the worker's CPU. With 8 MiB: 1.4-9k faults; worker CPU per 24 samples
# -0.058 s median (-3.5 %; 7 of 8 rounds, pads alternated in one worker, 1.51-1.75 s a round) on
# 2026-12-06 18:49 UTC, load average 1.1-1.2 (AMD EPYC VM, 2 cores). Memory: bench/trial.py worst
# phase 2.68x the matrix (statistics, with the UMAP task) against 2.17-2.25x, its 5M-event run
# 1.97x both; bench/scaling.py 2.75-2.76x against 2.79-2.81x (goal <= 3x). 16 MiB removed the
# faults altogether but took bench/trial.py to 2.79x; 4 MiB left 18k faults.
TOP_PAD = 8 << 20


class OneThreadBLAS(WorkerPlugin):
    """BLAS/OpenMP thread pools of a local worker limited to one thread. The nanny's ``env``
    sets OMP/MKL/OPENBLAS_NUM_THREADS in the worker process, but only after it has imported
    numpy (whose OpenBLAS has sized its pool by then): threadpoolctl resizes the pools."""

    name = "cytopipe-one-thread-blas"

    def setup(self, worker: Any) -> None:
        from cytopipe.threads import limit_process_to_one_thread

        self._limits = limit_process_to_one_thread()


class ReturnFreedMemory(WorkerPlugin):
    """A local worker gives freed event matrices back to the system between samples.

    glibc adapts its thresholds to the program: when a block it had mapped on its own (above the
    mmap threshold) is freed, the mmap threshold rises to that block's size and the trim threshold
    (free memory kept at the top of the heap) to twice that. After a worker's first freed event
    matrix of a 200k-event file (~18 MB), every later matrix comes from the heap and up to ~36 MB of
    freed heap stays with the worker: peak RSS 3.6-4.9x the matrix in ``bench/trial.py``. Fixed
    thresholds -- mmap at 32 MiB, the most the adaptive one reaches anyway, so arrays below it still
    reuse heap memory without fresh page faults; trim at glibc's default 128 KiB -- keep that reuse
    and return the freed top of the heap: 2.2x, at the same CPU per event (2026-12-04, AMD EPYC VM).
    The top pad (8 MiB, see TOP_PAD) is what a trim leaves: the next sample's smaller arrays reuse
    those pages instead of faulting them in again (worker CPU -3.5 %; peak 2.7x in bench/trial.py).
    Dask's own remedy (``MALLOC_TRIM_THRESHOLD_=65536`` in the environment) also pins the mmap
    threshold at 128 KiB, so every array is a fresh mapping: ~40x the page faults, +40% CPU.
    A no-op where the C library is not glibc."""

    name = "cytopipe-return-freed-memory"

    def setup(self, worker: Any) -> None:
        self.applied = set_malloc_thresholds()


def set_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds and its top pad in this process (see
    :class:`ReturnFreedMemory`); False (nothing changed) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        ok = libc.mallopt(_M_TOP_PAD, TOP_PAD) == 1 and ok
    except (OSError, AttributeError):
        ok = False
    if not ok:
        logger.debug("could not set glibc's malloc thresholds; freed memory is returned as glibc decides")
    return ok


class WorkerAddresses(SchedulerPlugin):
    """Each worker's name and address, logged to the scheduler's event log (topic :attr:`topic`)
    as it joins: the executor asks the scheduler which workers it has only every few seconds, and
    names a dead worker by every address it had, also one that a nanny's restart gave it and that
    died before the executor asked (see pipeline/worker_watch.py). A local cluster's only: its
    scheduler runs in cytopipe's process."""

    name = "cytopipe-worker-addresses"
    topic = "cytopipe-worker-addresses"

    async def start(self, scheduler: Any) -> None:
        for address, ws in list(scheduler.workers.items()):
            scheduler.log_event(self.topic, {"worker": address, "name": str(ws.name)})

    def add_worker(self, scheduler: Any, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        name = str(ws.name) if ws is not None else worker
        scheduler.log_event(self.topic, {"worker": worker, "name": name})


SPAWN_POLL_S = 0.01  # how often a closing nanny looks whether its new worker process has started


class RestartSafeNanny(Nanny):
    """dask's Nanny, whose ``kill`` (what closing it does) first waits for a worker process it is
    spawning to be started.

    dask 2026.8.0 (nanny.py, WorkerProcess): a worker process that dies right after sending its
    address to its nanny, before the nanny has read it (it looks every 50 ms), is restarted at
    once; the old start then reads the dead process's address and marks the worker "running"
    while the new process is still being spawned. Closing the nanny then (the cluster closing, or
    dropping a nanny whose worker is gone) joined that process: ``AssertionError: can only join a
    started process`` out of ``LocalCluster.close()``, which stopped half-way (its scheduler left
    open), and the new worker process ran on until it read its stop message. Once the process is
    started, dask's own ``kill`` stops it (its stop message; SIGKILL after ``0.8 * timeout``) and
    joins it. Any other error of ``kill`` surfaces unchanged; so does this one if the process is
    still not started after ``timeout``. tests/test_executor_close.py produces the race."""

    async def kill(self, timeout: float = 5, reason: str = "nanny-kill") -> None:
        worker_process = self.process
        if _spawning(worker_process):
            logger.info(
                "Dask nanny %s is to stop its worker (%s) while it is starting a worker process; "
                "waiting for that process to start, to stop it", self.address_safe, reason,
            )  # fmt: skip
            deadline = time.monotonic() + timeout
            while _spawning(worker_process) and time.monotonic() < deadline:
                await asyncio.sleep(SPAWN_POLL_S)
            logger.debug("Dask nanny %s: its new worker process started: %s", self.address_safe,
                         not _spawning(worker_process))  # fmt: skip
        await super().kill(timeout=timeout, reason=reason)


def _spawning(worker_process: Any) -> bool:
    """True while the nanny's worker process object exists but its process is not started yet."""
    process = getattr(worker_process, "process", None)  # None: no process (not yet made, or stopped)
    return process is not None and process.pid is None
