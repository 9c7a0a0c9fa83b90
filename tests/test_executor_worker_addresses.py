"""A worker restarted again and again gets a new address each time: the executor's restore warning
named every one (an unbounded message) and its history of them grew without limit. Real
LocalClusters, real worker restarts and a real worker killed with SIGKILL (no mocks).

The map runs in a thread joined with a generous limit: a hang detector, not a timing assertion."""

from __future__ import annotations

import logging
import os
import time

import pytest

from tests.test_executor_no_worker import map_killing_the_worker


def _slow_item(item: int, shared: str) -> dict:
    time.sleep(0.3)
    return {"i": item, "pid": os.getpid()}


def test_the_address_history_of_a_worker_is_bounded_and_read_once():
    """Hundreds of addresses of one worker in the scheduler's event log (what the WorkerAddresses
    plugin writes at each restart): the keeper keeps the latest KEEP_ADDRESSES and counts the
    others; the scheduler's whole log, read again at the next restore, adds nothing twice."""
    from dask.distributed import Client, LocalCluster

    from cytopipe._dask_plugins import WorkerAddresses
    from cytopipe.pipeline.worker_watch import KEEP_ADDRESSES, WorkerKeeper

    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        keeper = WorkerKeeper(client, cluster, timeout=60)
        [live] = client.scheduler_info(n_workers=-1)["workers"]  # learned when the keeper started
        logged = [f"tcp://127.0.0.1:{20000 + i}" for i in range(3 * KEEP_ADDRESSES)]
        for address in logged:
            client.log_event(WorkerAddresses.topic, {"worker": address, "name": "0"})
        keeper.learn_addresses()
        history = keeper.addresses["0"]
        assert list(history) == logged[-KEEP_ADDRESSES:]  # the latest, in the order they came
        assert len(history) == 1 + len(logged)  # the live one first, then every logged one
        keeper.learn_addresses()  # the same log again: the forgotten ones do not come back
        assert list(history) == logged[-KEEP_ADDRESSES:] and len(history) == 1 + len(logged)
        client.log_event(WorkerAddresses.topic, {"worker": live, "name": "0"})  # a later one
        client.log_event(WorkerAddresses.topic, {"worker": "tcp://127.0.0.1:30000", "name": "0"})
        keeper.learn_addresses()
        assert list(history) == [*logged[-KEEP_ADDRESSES + 2 :], live, "tcp://127.0.0.1:30000"]
        assert len(history) == 3 + len(logged)


def test_address_history_shown():
    from cytopipe.pipeline.worker_watch import AddressHistory

    history = AddressHistory(keep=4)
    assert history.shown() == "address unknown"
    for port in range(1, 4):
        history.add(f"tcp://h:{port}")
    assert history.shown() == "tcp://h:1, tcp://h:2, tcp://h:3"
    assert not history.add("tcp://h:2")  # known: nothing changes
    history.add("tcp://h:4")
    assert history.shown() == "tcp://h:2, tcp://h:3, tcp://h:4 and 1 earlier address"
    for port in range(5, 9):
        history.add(f"tcp://h:{port}")
    assert list(history) == ["tcp://h:5", "tcp://h:6", "tcp://h:7", "tcp://h:8"] and len(history) == 8
    assert history.shown(2) == "tcp://h:7, tcp://h:8 and 6 earlier addresses"


@pytest.mark.slow
def test_a_restored_worker_restarted_many_times_is_named_by_its_latest_addresses(caplog):
    """A worker restarted by its nanny several times (a new address each time), then killed and
    dropped by the LocalCluster (`distributed.deploy.lost-worker-timeout` 0 s, as in
    test_executor_no_worker.py): the restore's warning names its latest SHOW_ADDRESSES addresses
    and how many earlier ones it had; the debug log has every one."""

    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.worker_watch import SHOW_ADDRESSES

    caplog.set_level(logging.DEBUG, logger="cytopipe.pipeline.executors")
    ex = DaskExecutor(workers=1)
    try:
        for _ in range(SHOW_ADDRESSES):  # the nanny restarts its worker: a new address each time
            [address] = ex.client.scheduler_info(n_workers=-1)["workers"]
            ex.client.restart_workers([address])
        map_killing_the_worker(ex, _slow_item)
    finally:
        ex.close()
    records = [r for r in caplog.records if r.name == "cytopipe.pipeline.executors"]
    [at] = [
        i
        for i, r in enumerate(records)
        if r.levelno == logging.WARNING and "started it again" in r.getMessage()
    ]
    warning = records[at].getMessage()
    # the addresses learned before the warning, each once in the debug log: the first one and one
    # per restart at least (a restart's worker can die before the keeper asks; the event log has it)
    learned = [
        r.getMessage().rsplit(" ", 1)[1]
        for r in records[:at]
        if r.getMessage().startswith("Dask worker 0 has address ")
    ]
    assert len(learned) == len(set(learned)) >= SHOW_ADDRESSES + 1, learned
    assert all(a.startswith("tcp://") for a in learned), learned
    n = len(learned) - SHOW_ADDRESSES
    expected = f"{', '.join(learned[-SHOW_ADDRESSES:])} and {n} earlier address{'es' if n > 1 else ''}"
    assert warning.startswith(f"Dask worker 0 ({expected}) "), warning
