"""Closing the Dask executor while a nanny is starting its worker process again: a real
LocalCluster, real worker processes that die as soon as they have started (no mocks).

What failed once under `pytest -n 3`: the cluster closed a nanny whose worker process had just
died and been replaced by one not yet started; dask's Nanny.kill joined that process and raised
`AssertionError: can only join a started process` out of `ex.close()` (the run's end), leaving the
new worker process to exit on its own. The race (dask 2026.8.0, nanny.py): a worker process that
dies right after it has sent its address to its nanny, before the nanny reads it (it looks every
50 ms), is restarted at once; the old start then reads the dead process's address and marks the
nanny's worker "running" while the new process is still being spawned. Two real mechanisms make
it happen here within a few restarts instead of once in a while under load:

- a worker plugin makes every worker process kill itself (SIGKILL) as soon as its address has
  been written to its nanny (a worker crashing right after it starts, restarted again and again);
- a 100 kB dask config value: a spawned process gets the dask config through a pipe (64 KiB
  buffer), so the nanny's spawn waits until the new interpreter has started and read it (~1 s
  on this 2-core VM), as a loaded machine makes it wait.

The test watches the nanny (read only) for that state, then closes the executor.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
from distributed.diagnostics.plugin import WorkerPlugin

RACE_WAIT_S = 120  # the state comes within a few restarts (~2 s each here); a budget, not a timing


class _DiesOnceItsNannyKnowsIt(WorkerPlugin):
    """Each worker process kills itself once it has told its nanny its address (the nanny's
    multiprocessing queue has a feeder thread, which ends once the message is written)."""

    name = "cytopipe-test-dies-once-its-nanny-knows-it"

    def setup(self, worker) -> None:
        from distributed.core import Status

        def die() -> None:
            while worker.status != Status.running:  # the address is sent right after
                time.sleep(0.001)
            seen = False
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                feeding = any(t.name == "QueueFeederThread" for t in threading.enumerate())
                if seen and not feeding:
                    break
                seen = seen or feeding
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=die, daemon=True).start()


def _worker_processes() -> set[int]:
    """This process's live worker processes (multiprocessing's spawned children)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _restarting_with_a_stale_running_state(nanny) -> bool:
    """The nanny's worker marked running while the process replacing it is not started yet."""
    from distributed.core import Status

    worker_process = nanny.process
    process = worker_process.process if worker_process is not None else None
    return process is not None and process.pid is None and worker_process.status == Status.running


def test_closing_while_a_nanny_starts_its_worker_again_raises_nothing_and_leaves_no_process(caplog):
    """The executor closes without an error, its cluster and nanny are closed, the worker process
    being started is stopped (none of the cluster's processes runs on), and the log says so."""
    import logging

    import dask
    from distributed.core import Status

    from cytopipe.pipeline import DaskExecutor

    caplog.set_level(logging.INFO, logger="cytopipe._dask_plugins")
    before = _worker_processes()
    ex = DaskExecutor(workers=1)
    closed = False
    try:
        [nanny] = ex.cluster.workers.values()
        with dask.config.set(
            {"distributed.deploy.lost-worker-timeout": "1h", "cytopipe-test-ballast": "x" * 100_000}
        ):  # the cluster keeps the nanny while it restarts; the spawns wait for their new process
            ex.client.register_plugin(_DiesOnceItsNannyKnowsIt())
            deadline = time.monotonic() + RACE_WAIT_S
            while not _restarting_with_a_stale_running_state(nanny) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert _restarting_with_a_stale_running_state(nanny), "the race was not produced"
            closed = True
            ex.close()  # the old code: AssertionError: can only join a started process
        assert ex.cluster.status == Status.closed and ex.cluster.scheduler.status == Status.closed
        assert nanny.status == Status.closed
        assert not _worker_processes() - before, "a worker process of the closed cluster still runs"
        assert "(nanny-close) while it is starting a worker process" in caplog.text, caplog.text
    finally:
        if not closed:
            ex.close()
