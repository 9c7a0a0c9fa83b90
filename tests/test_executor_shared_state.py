"""A phase's shared state lost with the workers that compute it: real LocalClusters, real worker
processes killed with SIGKILL (no mocks).

The kills are made deterministic, not timed: the test's shared state kills the worker process that
unpickles it (which a worker does while it computes the phase's shared-state task) when a flag file
in the test's folder asks for it, and a sample kills its own worker the first time it runs. Each map
runs in a thread joined with a generous limit: a hang detector, not a timing assertion."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

# dask's `distributed` config section exists before a test sets a value in it: a dask.config.set of
# a key whose section is not there yet removes the whole section when it ends
import distributed  # noqa: F401
import pytest

from tests.support.threads import in_thread

HANG_GUARD_S = 300  # far above what the maps below need (~30 s); reached only by a hang


def _load_state(value: dict, flags: str, test_pid: int) -> dict | _StateThatKillsItsWorker:
    """Unpickles the test's shared state. In a worker process, each load is counted (a file per
    load) and the worker process is killed at the loads the flag files name (``kill-load-N``); it
    gives the plain value. In the test's process (where a LocalCluster's scheduler unpickles the
    task graph) the state stays as it is, for the workers."""
    if os.getpid() == test_pid:
        return _StateThatKillsItsWorker(value, Path(flags))
    folder = Path(flags)
    n = len(list(folder.glob("load-*"))) + 1
    (folder / f"load-{n}-{os.getpid()}").touch()
    if (folder / f"kill-load-{n}").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    return value


class _StateThatKillsItsWorker:
    """A phase's shared state whose unpickling on a worker can kill that worker (see _load_state);
    what the workers hold once it is loaded is the plain ``value``."""

    def __init__(self, value: dict, flags: Path):
        self.value = value
        self.flags = flags

    def __reduce__(self):
        return _load_state, (self.value, str(self.flags), os.getpid())


def _item(item: dict, shared: dict) -> dict:
    """A sample's task: the first sample kills its worker the first time it runs (a file says so)."""
    if item.get("kill_once"):
        flag = Path(item["kill_once"])
        if not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    if item.get("kill_always"):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"sample_id": item["sample_id"], "shared": shared["tag"], "n": item["n"] * shared["factor"]}


def _map(ex, items: list, shared, desc: str) -> dict:
    thread, box = in_thread(lambda: dict(ex.map(_item, items, shared, desc, False)))
    thread.join(timeout=HANG_GUARD_S)
    assert not thread.is_alive(), "the map hung"
    assert "error" not in box, box.get("error")
    return box["result"]


@pytest.mark.parametrize("allowed_failures", [0, 3])
def test_a_worker_dying_while_it_recomputes_the_shared_state_does_not_fail_the_phase(
    allowed_failures, tmp_path, caplog
):
    """One worker holds the phase's shared state; a sample kills it; the scheduler computes the
    shared state again on the restarted worker, and that worker dies while it does. With
    `distributed.scheduler.allowed-failures` 0 the scheduler gave the shared-state task up at once
    (KilledWorker) and every sample still waiting failed with it, although the cluster came back;
    with dask's default, 3, four such deaths in a row did the same. Now the executor computes the shared state
    again under a new key, runs the samples that waited on it again, and says which worker died:
    every sample comes back with the right result."""
    import dask

    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.executors import TaskFailure

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    for n in range(2, allowed_failures + 3):  # the recomputations the scheduler allows, and one more, die
        (tmp_path / f"kill-load-{n}").touch()
    shared = _StateThatKillsItsWorker({"tag": "shared", "factor": 3}, tmp_path)
    items = [{"sample_id": f"S{i:02d}", "n": i} for i in range(12)]
    items[0]["kill_once"] = str(tmp_path / "sample-killed")
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
        ex = DaskExecutor(workers=1)
        try:
            got = _map(ex, items, shared, "gate")
            after = _map(ex, items[1:4], {"tag": "next", "factor": 1}, "stats")  # the executor goes on
        finally:
            ex.close()
    assert (tmp_path / "sample-killed").exists()
    failed = {i: v for i, v in got.items() if isinstance(v, TaskFailure)}
    assert not failed, failed
    loads = sorted(p.name for p in tmp_path.glob("load-*"))
    # computed, killed while computed again (allowed_failures + 1 times), computed under a new key
    assert len(loads) == allowed_failures + 3, loads
    assert got == {i: {"sample_id": f"S{i:02d}", "shared": "shared", "n": 3 * i} for i in range(12)}
    assert after == {i - 1: {"sample_id": f"S{i:02d}", "shared": "next", "n": i} for i in range(1, 4)}
    lost = [r for r in caplog.records if "shared state" in r.getMessage()]
    assert len(lost) == 1, caplog.text
    assert lost[0].levelno == logging.WARNING
    message = lost[0].getMessage()
    assert message.startswith("gate: Dask worker ") and "tcp://" in message, message
    assert "died while it computed the phase's shared state" in message, message


def test_a_shared_state_that_kills_every_worker_fails_the_phase_after_a_few_tries(tmp_path, caplog):
    """A shared state whose computation kills every worker that computes it (too large for a
    worker, say) is computed again a bounded number of times; then the samples waiting on it fail,
    each with a message that says so, and the executor does not loop for ever."""
    import dask

    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.executors import TaskFailure
    from cytopipe.pipeline.shared_state import SHARED_STATE_ATTEMPTS

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    for n in range(1, 20):
        (tmp_path / f"kill-load-{n}").touch()
    shared = _StateThatKillsItsWorker({"tag": "shared", "factor": 3}, tmp_path)
    items = [{"sample_id": f"S{i:02d}", "n": i} for i in range(3)]
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        ex = DaskExecutor(workers=1)
        try:
            got = _map(ex, items, shared, "gate")
            ex.keeper.learn_addresses()  # every address worker 0 had, restarts included
            why = ex.keeper.why("0")  # what a restore's warning would say of it
        finally:
            ex.close()
    assert "died while it computed a phase's shared state" in why, why  # was: "while it ran no sample"
    assert sorted(got) == [0, 1, 2]
    for value in got.values():
        assert isinstance(value, TaskFailure) and value.error_type == "SharedStateLost", value
        assert "the phase's shared state" in value.error, value.error
    assert len(list(tmp_path.glob("load-*"))) == SHARED_STATE_ATTEMPTS


def test_a_sample_that_kills_its_worker_every_time_still_fails_alone_when_the_shared_state_is_lost(
    tmp_path, caplog
):
    """The shared state computed again does not hide a sample that kills its worker every time it
    runs (here it kills the worker that holds the shared state, and the worker computing that again
    dies too): that sample fails with the message that says so (after its run alone at the end of
    the phase); every other sample comes back with the right result."""
    import dask

    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.executors import TaskFailure

    caplog.set_level(logging.WARNING, logger="cytopipe.pipeline.executors")
    (tmp_path / "kill-load-2").touch()
    shared = _StateThatKillsItsWorker({"tag": "shared", "factor": 2}, tmp_path)
    items = [{"sample_id": f"S{i:02d}", "n": i} for i in range(10)]
    items[6]["kill_always"] = True
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        ex = DaskExecutor(workers=1)
        try:
            got = _map(ex, items, shared, "gate")
        finally:
            ex.close()
    assert sorted(got) == list(range(10))
    assert isinstance(got[6], TaskFailure) and got[6].error_type == "KilledWorker", got[6]
    assert "a worker died while processing this sample" in got[6].error
    for i in set(range(10)) - {6}:
        assert got[i] == {"sample_id": f"S{i:02d}", "shared": "shared", "n": 2 * i}, (i, got[i])
    assert "died while it computed the phase's shared state" in caplog.text
