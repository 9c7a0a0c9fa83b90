"""The Dask executor's watch on its cluster's workers (:class:`~cytopipe.pipeline.executors.DaskExecutor`).

A LocalCluster can lose worker processes for good: when the scheduler reports a worker lost, the
cluster (distributed.deploy.SpecCluster) waits `distributed.deploy.lost-worker-timeout` (15 s) and
then closes that worker's nanny for good if no worker of that name is registered at that moment; a
nanny restarting a worker that a sample kills again and again (4 s per restart on a loaded machine)
is often caught between two workers, and nothing starts it again (dask 2026.8.0). With one worker
the executor's tasks waited for ever; with several the run went on with fewer workers.

:class:`WorkerKeeper` (one per executor): whenever a local cluster has had fewer live workers than
its specification names for NO_WORKER_RESTORE_S, the nannies it dropped are started again (a
warning per restore, naming the worker, its latest addresses, also one a restart gave it that died
before the next check (read from the scheduler's event log, where the WorkerAddresses plugin writes
each worker's address as it joins), and why it died). A worker restarted again and again gets a new
address each time: the warning names SHOW_ADDRESSES of them and how many more (each is in the debug
log as it is learned), and :class:`AddressHistory` keeps KEEP_ADDRESSES per worker.
:class:`WorkerWatch` (one per phase or submitted task): after ``no_worker_timeout`` seconds with
no live worker the waiting tasks are given up (an existing scheduler, ``--scheduler-address``: a
warning every NO_WORKER_WARN_EVERY_S meanwhile, while a lab may be starting workers). Once given
up, later phases and submitted tasks fail at once while the cluster still has no worker, instead of
each waiting its own timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

logger = logging.getLogger("cytopipe.pipeline.executors")  # one logger for the executor's messages

NO_WORKER_RESTORE_S = 10.0
NO_WORKER_TIMEOUT_LOCAL_S = 120.0
NO_WORKER_TIMEOUT_EXISTING_S = 1800.0
NO_WORKER_WARN_EVERY_S = 60.0
WATCH_EVERY_S = 2.0  # how often the scheduler is asked for its workers while the executor waits
SHOW_ADDRESSES = 3  # addresses of a worker a restore's warning names (its latest ones)
KEEP_ADDRESSES = 50  # addresses kept per worker name (its latest): bounded however often it restarts


class AddressHistory:
    """The addresses one worker name had, in the order they were learned: the latest ``keep`` of
    them, and how many older ones were forgotten (a nanny restarting its worker without end gives
    it a new address each time)."""

    def __init__(self, keep: int = KEEP_ADDRESSES):
        self.keep = keep
        self.latest: dict[str, None] = {}  # a dict keeps the order of insertion
        self.forgotten = 0

    def add(self, address: str) -> bool:
        """Record ``address``; False when it is already among the latest."""
        if address in self.latest:
            return False
        self.latest[address] = None
        if len(self.latest) > self.keep:
            del self.latest[next(iter(self.latest))]
            self.forgotten += 1
        return True

    def __len__(self) -> int:
        """How many addresses the worker had (forgotten ones included)."""
        return len(self.latest) + self.forgotten

    def __iter__(self) -> Iterator[str]:
        return iter(self.latest)

    def shown(self, n: int = SHOW_ADDRESSES) -> str:
        """The latest ``n`` addresses and how many others (``"tcp://a, tcp://b and 7 earlier addresses"``)."""
        if not self.latest:
            return "address unknown"
        latest = list(self.latest)[-n:]
        more = len(self) - len(latest)
        if not more:
            return ", ".join(latest)
        return f"{', '.join(latest)} and {more} earlier address{'es' if more > 1 else ''}"


class WorkerKeeper:
    """The executor's view of its cluster's workers, kept across phases: which names had which
    addresses (to say which worker died and why), the dropped workers being started again, and
    whether the executor has given up on the cluster (:attr:`given_up`)."""

    def __init__(self, client: Any, cluster: Any, timeout: float):
        self.client = client
        self.cluster = cluster  # None: an existing scheduler (nothing to restore)
        self.timeout = timeout
        self.grace = min(NO_WORKER_RESTORE_S, timeout / 2)
        self.addresses: dict[str, AddressHistory] = {}  # worker name -> the addresses it had
        self.learned_until = float("-inf")  # the time of the newest WorkerAddresses event read
        self.labels: dict[str, str] = {}  # task key -> the sample it computes (for the messages)
        self.short_since: float | None = None  # when the local cluster was first seen short of workers
        self.restoring: set[str] = set()  # names started again and not seen back yet
        self.given_up: str | None = None  # why the executor gave up on a cluster without workers
        self.told: set[str] = set()  # the phases told so (one error line each)
        self.live_workers()  # the first workers' addresses: a sample can kill one before any check

    def live_workers(self) -> int:
        """The workers the scheduler has now (0 when it does not answer); on a local cluster short
        of workers for ``grace`` seconds, its dropped nannies are started again."""
        try:
            if self.cluster is None:  # an existing scheduler: only how many (it may have hundreds)
                return len(self.client.nthreads())
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        except Exception as exc:  # noqa: BLE001 - a scheduler that does not answer has no worker for us
            logger.debug("the Dask scheduler did not say which workers it has: %s", exc)
            return 0
        for address, info in workers.items():
            self.learn(str(info.get("name", address)), str(address))
        if self.cluster is not None:
            self._keep_local(len(workers))
        return len(workers)

    def _keep_local(self, live: int) -> None:
        now = time.monotonic()
        if live >= len(self.cluster.worker_spec):
            self.short_since = None
            self.restoring.clear()  # every worker is back
            return
        if self.short_since is None:
            self.short_since = now
        elif now - self.short_since >= self.grace:  # at every check: a restored one can be dropped too
            self.restore(live)

    def restore(self, live: int) -> None:
        """Start again the nannies the local cluster dropped (or that closed themselves).

        Public API: ``SpecCluster.scale(n)`` with the number its specification already names keeps
        the specification (a dropped worker's entry stays in ``worker_spec``; only ``workers`` loses
        it) and starts every worker the specification names that the cluster does not run (dask
        2026.8.0, deploy/spec.py: scale -> _correct_state). A nanny that closed itself (its worker
        failed to start) stays in the ``workers`` dict and would not be started again: it is
        removed there first, on the cluster's event loop (before scale's own callback).
        tests/test_executor_no_worker.py fails if dask stops doing this."""
        from distributed.core import Status

        cluster = self.cluster

        def forget_closed() -> None:
            for name, nanny in list(cluster.workers.items()):
                if nanny.status in (Status.closed, Status.failed):
                    del cluster.workers[name]

        running = {
            str(name) for name, nanny in list(cluster.workers.items())
            if nanny.status not in (Status.closed, Status.failed)
        }  # fmt: skip
        self.restoring &= set(map(str, cluster.worker_spec)) - running  # the others are back
        missing = sorted(set(map(str, cluster.worker_spec)) - running)
        if not missing:
            return  # their nannies are (re)starting them
        try:
            cluster.loop.add_callback(forget_closed)
            cluster.scale(len(cluster.worker_spec))
        except Exception as exc:  # noqa: BLE001 - reported; the watch fails the phase if no worker comes
            logger.warning("starting the dropped Dask workers %s again failed: %s", ", ".join(missing), exc)
            return
        self.learn_addresses()
        for name in missing:
            if name in self.restoring:
                continue  # logged when its restore began; still starting
            self.restoring.add(name)
            history = self.addresses.get(name, AddressHistory())
            logger.warning(
                "Dask worker %s (%s) %s; the local cluster dropped it and ran with %d of its %d "
                "workers for %.0f s; started it again",
                name, history.shown(), self.why(name), live, len(cluster.worker_spec),
                time.monotonic() - (self.short_since or 0),
            )  # fmt: skip
            logger.debug(
                "Dask worker %s had %d address(es); the latest %d: %s", name, len(history),
                len(history.latest), ", ".join(history),
            )  # fmt: skip

    def learn_addresses(self) -> None:
        """Every address the local cluster's workers had, from the scheduler's event log (the
        WorkerAddresses plugin): :meth:`live_workers` sees only the workers alive when it asks, and
        a worker restarted by its nanny can die again before it asks."""
        from cytopipe._dask_plugins import WorkerAddresses

        try:
            events = self.client.get_events(WorkerAddresses.topic)
        except Exception as exc:  # noqa: BLE001 - only the messages are poorer
            logger.debug("the Dask scheduler's event log did not answer: %s", exc)
            return
        for stamp, event in events:
            # the scheduler returns its whole log each time: events read before are skipped, or an
            # address a long history forgot would come back as new (the same time: added once)
            if stamp < self.learned_until:
                continue
            self.learned_until = stamp
            if isinstance(event, Mapping) and event.get("name") is not None and event.get("worker"):
                self.learn(str(event["name"]), str(event["worker"]))

    def learn(self, name: str, address: str) -> None:
        """Record that the worker ``name`` had ``address`` (each new one in the debug log)."""
        if self.addresses.setdefault(name, AddressHistory()).add(address):
            logger.debug("Dask worker %s has address %s", name, address)

    def why(self, name: str) -> str:
        """Why the worker of that name died, from the cluster's event logs (public Client.get_events)."""
        addresses = set(self.addresses.get(name, ()))  # its latest KEEP_ADDRESSES
        try:
            memory = [
                m for _, m in self.client.get_events("worker-restart-memory") if m.get("worker") in addresses
            ]
            removed = [
                m for _, m in self.client.get_events("all")
                if isinstance(m, Mapping) and m.get("action") == "remove-worker" and m.get("worker") in addresses
            ]  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - only the message is poorer
            logger.debug("the Dask scheduler's event log did not answer: %s", exc)
            return "died repeatedly"
        if memory:
            return (
                f"was killed {len(memory)} time(s) by its nanny for using more memory than its limit "
                "allows (see --memory-limit)"
            )
        keys = sorted({str(k) for m in removed for k in m.get("processing-tasks") or ()})
        shared = any(k.startswith("shared-") for k in keys)  # a phase's shared state: no sample
        running = [self.labels.get(k, k) for k in keys if not k.startswith("shared-")]
        if running:
            return (
                f"died while running {', '.join(running[:5])}{' ...' if len(running) > 5 else ''} "
                "(a sample that kills its worker: a crash in a native library, or the machine's "
                "memory; see dmesg)"
            )
        if shared:
            return (
                "died while it computed a phase's shared state (the gates or the model the samples "
                "share; too large for its memory limit, see --memory-limit? the machine's memory? see dmesg)"
            )
        if removed:
            return "died while it ran no sample (killed from outside? the machine's memory? see dmesg)"
        return "died (the scheduler's event log does not say how)"


class WorkerWatch:
    """Notices, while a phase (or a submitted task) waits, a cluster with no live worker for too
    long; ``since`` is reset by the executor whenever a task ends."""

    def __init__(self, executor: Any, desc: str):
        self.executor = executor
        self.keeper: WorkerKeeper = executor.keeper
        self.desc = desc
        self.timeout = self.keeper.timeout
        self.checked = time.monotonic()
        self.since: float | None = None  # when the cluster was first seen without a worker
        self.acted = 0.0  # when the last warning was logged (existing scheduler)
        self.gave_up = False

    def failure(self) -> str | None:
        """None while the cluster has a worker (or may get one soon); else why the phase ends."""
        now = time.monotonic()
        if now - self.checked < min(WATCH_EVERY_S, self.keeper.grace):
            return None
        self.checked = now
        if self.keeper.live_workers() > 0:
            self.since = None
            return None
        if self.keeper.given_up is not None:  # a task waiting since before the executor gave up
            return self.keeper.given_up
        if self.since is None:
            self.since = now
            return None
        idle = now - self.since
        if idle >= self.timeout:
            message = self.executor.no_worker_message(idle)
            if not self.gave_up:
                logger.error("%s: the samples still waiting fail: %s", self.desc, message)
                self.gave_up = True
                self.keeper.given_up = message
            return message
        if self.executor.kind == "existing" and idle >= self.keeper.grace:
            if self.acted < self.since or now - self.acted >= NO_WORKER_WARN_EVERY_S:
                self.acted = now
                address = self.executor.client.scheduler.address
                logger.warning(
                    "%s: the Dask scheduler %s has had no worker for %.0f s; waiting for workers "
                    "(start them, e.g. `dask worker %s`); the samples still waiting fail after %.0f s",
                    self.desc, address, idle, address, self.timeout,
                )  # fmt: skip
        return None
