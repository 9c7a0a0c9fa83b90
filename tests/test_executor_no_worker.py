"""The Dask executor never waits for ever on a cluster without a live worker: real LocalClusters,
real worker processes killed with SIGKILL, a real scheduler without workers (no mocks).

Each map runs in a thread joined with a generous limit: that is a hang detector (the old code waited
for ever), not a timing assertion."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

HANG_GUARD_S = 240  # far above what the maps below need (~15 s); reached only by a hang


def _slow_item(item: int, shared: str) -> dict:
    time.sleep(0.3)
    return {"i": item, "shared": shared, "pid": os.getpid()}


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # pragma: no cover - reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_a_local_cluster_that_dropped_its_worker_starts_it_again_and_the_map_ends(caplog):
    """What hung `-n 2` runs: a worker dies, its nanny restarts it, and dask's LocalCluster closes that
    nanny for good when `distributed.deploy.lost-worker-timeout` passes while no worker of its name is
    registered (here 0 s instead of 15 s, so that it happens every time instead of under load). The
    map waited for ever; now the executor notices the cluster has no live worker, starts the
    dropped worker process again and every sample comes back."""
    import dask

    from cytopipe.pipeline import DaskExecutor

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    ex = DaskExecutor(workers=1)
    got: dict = {}
    try:
        [first_pid] = ex.client.run(os.getpid).values()
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "0s"}):
            thread, box = _in_thread(
                lambda: got.update(ex.map(_slow_item, list(range(8)), "shared", "dropped", False))
            )
            deadline = time.monotonic() + HANG_GUARD_S
            while not got and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert got, "no sample finished before the worker was to be killed"
            os.kill(first_pid, signal.SIGKILL)
            thread.join(timeout=HANG_GUARD_S)
        assert not thread.is_alive(), "the map hung on a cluster without a worker"
        assert "error" not in box, box.get("error")
        assert sorted(got) == list(range(8))
        for i, value in got.items():
            assert value["i"] == i and value["shared"] == "shared", value
        assert any(value["pid"] != first_pid for value in got.values())
        assert "no Dask worker alive" in caplog.text and "started them again" in caplog.text
        assert ex.n_workers == 1
    finally:
        ex.close()


def test_an_existing_scheduler_without_workers_warns_then_fails_the_waiting_samples(caplog):
    """On an existing scheduler (`--scheduler-address`) with no worker the executor waits (a lab may
    be starting workers) and says so, then after its timeout every waiting sample fails with a
    message that says what happened and what to do; a submitted task raises TaskError."""
    from dask.distributed import LocalCluster

    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.executors import TaskError, TaskFailure

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        ex = DaskExecutor(address=cluster.scheduler_address, no_worker_timeout=4)
        try:
            thread, box = _in_thread(lambda: dict(ex.map(_slow_item, [0, 1, 2], "s", "idle", False)))
            thread.join(timeout=HANG_GUARD_S)
            assert not thread.is_alive(), "the map hung on a scheduler without workers"
            assert "error" not in box, box.get("error")
            got = box["result"]
            assert sorted(got) == [0, 1, 2]
            for value in got.values():
                assert isinstance(value, TaskFailure) and value.error_type == "NoWorker", value
                assert f"the Dask scheduler {cluster.scheduler_address} had no worker for" in value.error
                assert "start workers for it" in value.error
            assert "has had no worker for" in caplog.text and "waiting for workers" in caplog.text

            thread, box = _in_thread(lambda: ex.submit(_slow_item, 5, "s", desc="umap").result())
            thread.join(timeout=HANG_GUARD_S)
            assert not thread.is_alive(), "a submitted task's result hung on a scheduler without workers"
            assert isinstance(box.get("error"), TaskError), box
            assert "had no worker for" in str(box["error"])
        finally:
            ex.close()


def test_a_local_cluster_that_cannot_get_a_worker_back_fails_the_waiting_samples():
    """When starting the local workers again does not bring one back, the phase ends: every
    waiting sample is a TaskFailure naming what happened and what to do (here the cluster's
    specification is emptied, so there is nothing to start again)."""
    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.executors import TaskFailure

    ex = DaskExecutor(workers=1, no_worker_timeout=6)
    try:
        ex.cluster.scale(0)
        deadline = time.monotonic() + HANG_GUARD_S
        while ex.n_workers and time.monotonic() < deadline:
            time.sleep(0.05)
        thread, box = _in_thread(lambda: dict(ex.map(_slow_item, list(range(3)), "s", "gone", False)))
        thread.join(timeout=HANG_GUARD_S)
        assert not thread.is_alive(), "the map hung on a local cluster without workers"
        assert "error" not in box, box.get("error")
        got = box["result"]
        assert sorted(got) == list(range(3))
        for value in got.values():
            assert isinstance(value, TaskFailure) and value.error_type == "NoWorker", value
            assert "no Dask worker alive for" in value.error and "--memory-limit" in value.error
    finally:
        ex.close()
