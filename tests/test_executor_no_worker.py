"""The Dask executor never waits for ever on a cluster without a live worker: real LocalClusters,
real worker processes killed with SIGKILL, a real scheduler without workers (no mocks).

Each map runs in a thread joined with a generous limit: that is a hang detector (the old code waited
for ever), not a timing assertion."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

from tests.support.threads import in_thread

HANG_GUARD_S = 240  # far above what the maps below need (~15 s); reached only by a hang


def _slow_item(item: int, shared: str) -> dict:
    time.sleep(0.3)
    return {"i": item, "shared": shared, "pid": os.getpid()}


def map_killing_the_worker(ex, func) -> tuple[dict, int]:
    """``ex.map`` of 8 items over ``func`` in a thread, the executor's one worker killed (SIGKILL)
    once the first item is back, with ``lost-worker-timeout`` 0 s (its LocalCluster drops the
    nanny at once): the items' results once the map ends, which it must, with all 8, and the
    killed worker's pid."""
    import dask

    got: dict = {}
    [first_pid] = ex.client.run(os.getpid).values()
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0s"}):
        thread, box = in_thread(lambda: got.update(ex.map(func, list(range(8)), "shared", "dropped", False)))
        deadline = time.monotonic() + HANG_GUARD_S
        while not got and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got, "no sample finished before the worker was to be killed"
        os.kill(first_pid, signal.SIGKILL)
        thread.join(timeout=HANG_GUARD_S)
    assert not thread.is_alive(), "the map hung on a cluster without a worker"
    assert "error" not in box, box.get("error")
    assert sorted(got) == list(range(8))
    return got, first_pid


@pytest.mark.slow
def test_a_local_cluster_that_dropped_its_worker_starts_it_again_and_the_map_ends(caplog):
    """What hung `-n 2` runs: a worker dies, its nanny restarts it, and dask's LocalCluster closes that
    nanny for good when `distributed.deploy.lost-worker-timeout` passes while no worker of its name is
    registered (here 0 s instead of 15 s, so that it happens every time instead of under load). The
    map waited for ever; now the executor notices the cluster has no live worker, starts the
    dropped worker process again and every sample comes back."""

    from cytopipe.pipeline import DaskExecutor

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    ex = DaskExecutor(workers=1)
    try:
        got, first_pid = map_killing_the_worker(ex, _slow_item)
        for i, value in got.items():
            assert value["i"] == i and value["shared"] == "shared", value
        assert any(value["pid"] != first_pid for value in got.values())
        assert "the local cluster dropped it and ran with 0 of its 1 workers" in caplog.text
        assert caplog.text.count("started it again") == 1, caplog.text  # once per restore
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
            thread, box = in_thread(lambda: dict(ex.map(_slow_item, [0, 1, 2], "s", "idle", False)))
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

            thread, box = in_thread(lambda: ex.submit(_slow_item, 5, "s", desc="umap").result())
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
        thread, box = in_thread(lambda: dict(ex.map(_slow_item, list(range(3)), "s", "gone", False)))
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


def _sample_item(item: dict, shared: str) -> dict:
    time.sleep(0.3)
    return {"sample_id": item["sample_id"], "shared": shared, "pid": os.getpid()}


@pytest.mark.slow
def test_a_local_cluster_that_dropped_one_of_its_workers_starts_it_again(caplog):
    """With `--workers 2`, a worker that a sample killed and whose nanny the cluster dropped was not
    started again while the other worker lived: the run went on with one worker. Now the executor
    notices the cluster has fewer workers than it asked for, starts the dropped one again (through
    dask's public `scale`, which tests/test_executor_no_worker.py relies on) and says once which
    worker and why (the sample it was running when it died)."""
    import dask

    from cytopipe.pipeline import DaskExecutor

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    ex = DaskExecutor(workers=2)
    try:
        pids = ex.client.run(os.getpid)  # worker address -> pid
        names = {a: str(w["name"]) for a, w in ex.client.scheduler_info(n_workers=-1)["workers"].items()}
        items = [{"sample_id": f"S{i:02d}"} for i in range(40)]
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "0s"}):
            thread, box = in_thread(lambda: dict(ex.map(_sample_item, items, "s", "gate", False)))
            victim = None
            deadline = time.monotonic() + HANG_GUARD_S
            while victim is None and thread.is_alive() and time.monotonic() < deadline:
                for addr, keys in ex.client.processing().items():
                    if any(str(k).startswith("gate-") for k in keys) and addr in pids:
                        victim = addr
                        os.kill(pids[addr], signal.SIGKILL)
                        break
                time.sleep(0.005)
            assert victim is not None, "no sample was seen running on a worker"
            thread.join(timeout=HANG_GUARD_S)
            assert not thread.is_alive(), "the map hung"
            assert "error" not in box, box.get("error")
            assert sorted(box["result"]) == list(range(40))
            # more phases until the dropped worker is back (the first one usually sees it): on the
            # old code the cluster stayed at one worker and the guard below ended the test
            while ex.n_workers < 2 and time.monotonic() < deadline:
                got = dict(ex.map(_sample_item, items[:8], "s", "gate", False))
                assert all(value["shared"] == "s" for value in got.values()), got
        assert ex.n_workers == 2, "the dropped worker was not started again"
        assert set(ex.client.run(os.getpid).values()) - set(pids.values())  # a new worker process
        restored = [r.getMessage() for r in caplog.records if "started it again" in r.getMessage()]
        assert len(restored) == 1, restored  # once per restore
        assert restored[0].startswith(f"Dask worker {names[victim]} ({victim}) died while running sample S")
        assert "the local cluster dropped it and ran with 1 of its 2 workers" in restored[0]
    finally:
        ex.close()


class _KeysSeen(SchedulerPlugin):
    """A scheduler plugin: the keys of every task the scheduler is given."""

    name = "keys-seen"

    def __init__(self):
        self.keys: list = []

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "released" and finish == "waiting":  # a new task (a cancelled one goes on to forgotten)
            self.keys.append(key)


def test_after_giving_up_on_a_cluster_without_workers_later_work_fails_at_once(caplog):
    """Once a phase has failed for lack of workers, the run's later phases and submitted tasks (the
    clustering map, the UMAP, the mixed models) fail at once with the same message while the cluster
    still has no worker; they reach no scheduler and wait no timeout again (before, each waited its
    own: up to 30 min on an existing scheduler). When workers are back, the work runs again."""
    from dask.distributed import LocalCluster

    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.executors import NoWorkerError, TaskFailure

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        ex = DaskExecutor(address=cluster.scheduler_address, no_worker_timeout=4)
        try:
            early = ex.submit(_slow_item, 4, "s", desc="fit")  # waits beside the phase (the UMAP)
            thread, box = in_thread(lambda: dict(ex.map(_slow_item, [0, 1], "s", "gate", False)))
            thread.join(timeout=HANG_GUARD_S)
            assert not thread.is_alive() and "error" not in box, box
            [first] = {value.error for value in box["result"].values()}
            with pytest.raises(NoWorkerError) as raised:
                early.result()  # submitted before the executor gave up: it waits no timeout of its own
            assert str(raised.value) == first
            seen = _KeysSeen()
            cluster.scheduler.add_plugin(seen)

            thread, box = in_thread(lambda: dict(ex.map(_slow_item, [0, 1, 2], "s", "cluster", False)))
            thread.join(timeout=HANG_GUARD_S)
            assert not thread.is_alive() and "error" not in box, box
            assert sorted(box["result"]) == [0, 1, 2]
            for value in box["result"].values():
                assert isinstance(value, TaskFailure) and value.error_type == "NoWorker", value
                assert value.error == first
            deferred = ex.submit(_slow_item, 5, "s", desc="umap")
            thread, box = in_thread(deferred.result)
            thread.join(timeout=HANG_GUARD_S)
            assert not thread.is_alive()
            assert isinstance(box.get("error"), NoWorkerError) and str(box["error"]) == first, box
            assert not seen.keys, f"later work reached the scheduler: {seen.keys}"
            assert "cluster: not started, the Dask cluster still has no worker" in caplog.text
            for desc in ("fit", "cluster", "umap"):  # none waited: none said it waits, none gave up again
                assert f"{desc}: the Dask scheduler" not in caplog.text, caplog.text
                assert f"{desc}: the samples still waiting fail" not in caplog.text, caplog.text

            cluster.scale(1)  # a worker is back: the next phase runs
            cluster.wait_for_workers(1, timeout=HANG_GUARD_S)
            got = dict(ex.map(_slow_item, [0, 1], "s", "stats", False))
            assert [got[i]["i"] for i in sorted(got)] == [0, 1], got
            assert ex.submit(_slow_item, 5, "s", desc="umap").result()["i"] == 5
        finally:
            ex.close()


def _hog(item: int, shared: str) -> dict:
    if item == 2:  # far above the worker's memory limit: its nanny kills it within a second
        import numpy as np

        block = np.ones(1_500_000_000 // 8)
        time.sleep(HANG_GUARD_S)
        return {"i": item, "size": block.size}
    time.sleep(0.3)
    return {"i": item, "shared": shared}


def test_a_worker_killed_for_its_memory_limit_is_named_with_that_reason():
    """A sample that takes more memory than the worker's limit: its nanny kills the worker; that
    sample fails, the others come back, and what a restore of that worker would log says it was
    killed for its memory limit (read from the nannies' real event log: whether the cluster drops
    the nanny too is a race, which test_a_local_cluster_that_dropped_one_of_its_workers_starts_it_again
    forces). The sample is the last: with allowed-failures 0 a worker that dies while it recomputes
    the phase's shared state fails that too, and with it every sample run again after it."""
    import dask

    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.executors import TaskFailure

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        ex = DaskExecutor(workers=1, memory_limit="1GB")
        try:
            [name] = {str(w["name"]) for w in ex.client.scheduler_info(n_workers=-1)["workers"].values()}
            thread, box = in_thread(lambda: dict(ex.map(_hog, [0, 1, 2], "s", "hog", False)))
            thread.join(timeout=HANG_GUARD_S)
            assert not thread.is_alive(), "the map hung"
            assert "error" not in box, box.get("error")
            got = box["result"]
            why = ex.keeper.why(name)
        finally:
            ex.close()
    assert sorted(got) == [0, 1, 2]
    assert isinstance(got[2], TaskFailure) and got[2].error_type == "KilledWorker", got[2]
    assert got[0] == {"i": 0, "shared": "s"} and got[1] == {"i": 1, "shared": "s"}, got
    assert (
        why.startswith("was killed ") and "time(s) by its nanny for using more memory than its limit" in why
    )


@pytest.mark.slow
def test_a_worker_restarted_and_killed_between_two_checks_is_named_by_its_last_address(caplog):
    """The executor learns its workers' addresses when it asks the scheduler for them (every 2 s
    while it waits): a worker that its nanny restarted and that died again before the next check
    was named in the restore's warning by its old address only, and why it died was read for that
    address only. Now the scheduler logs each worker's name and address as it joins, and the
    warning names every address the worker had. Here the executor is idle while the worker is
    killed, restarted, and killed again (its nanny then dropped by the cluster: lost-worker-timeout
    0 s); the next map restores it."""
    import dask

    from cytopipe.pipeline import DaskExecutor

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    ex = DaskExecutor(workers=1)
    try:
        [(first, first_pid)] = ex.client.run(os.getpid).items()  # the executor has seen this one
        [name] = list(ex.cluster.workers)
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + HANG_GUARD_S
        second = None
        while second is None and time.monotonic() < deadline:  # its nanny starts it again
            time.sleep(0.05)
            workers = ex.client.scheduler_info(n_workers=-1)["workers"]  # not through the executor
            second = next((a for a in workers if a != first), None)
        assert second is not None, "the nanny did not start the worker again"
        second_pid = ex.client.run(os.getpid, workers=[second])[second]
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "0s"}):
            os.kill(second_pid, signal.SIGKILL)
            while ex.cluster.workers and time.monotonic() < deadline:  # the cluster drops the nanny
                time.sleep(0.05)
        assert not ex.cluster.workers, "the cluster did not drop the nanny"
        thread, box = in_thread(lambda: dict(ex.map(_slow_item, list(range(3)), "s", "again", False)))
        thread.join(timeout=HANG_GUARD_S)
        assert not thread.is_alive(), "the map hung"
        assert "error" not in box, box.get("error")
        assert [box["result"][i]["i"] for i in range(3)] == [0, 1, 2]
    finally:
        ex.close()
    restored = [r.getMessage() for r in caplog.records if "started it again" in r.getMessage()]
    assert len(restored) == 1, restored
    assert restored[0].startswith(f"Dask worker {name} ("), restored[0]
    assert first in restored[0] and second in restored[0], restored[0]
    # why it died: while it ran no sample; or, when its nanny started it a third time just as the
    # cluster dropped the nanny (seen once under a load average of ~10), that last start took the
    # map's shared-state task and died with it, which the warning then says, rightly
    assert ("died while it ran no sample" in restored[0]
            or "died while it computed a phase's shared state" in restored[0]), restored[0]  # fmt: skip
