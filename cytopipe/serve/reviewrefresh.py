"""The background refresh of a reviewed run's statistics, catalog and report.

A gate-review save (:mod:`cytopipe.serve.reviewops`) writes the run's tables before it answers;
the statistics and the report follow here, in a background thread that does not hold the run's
lock: one refresh per run folder at a time, and requests made meanwhile collapse into one more
refresh, which reads the latest state.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cytopipe.review.decisions import read_review

logger = logging.getLogger(__name__)

_refreshers: dict[Path, Refresher] = {}  # by run folder: unique even across two databases
_guard = threading.Lock()
_asked_again: set[Path] = set()  # run folders whose missing report this process asked for again


def refresh(out: Path) -> None:
    """Statistics, catalog and report of a run folder from its tables and review.json as they are now."""
    from cytopipe.review.regate import apply_review

    apply_review(out, read_review(out), samples=[], statistics=True, report=True, write_tables=False)


class Refresher:
    """The statistics and report refresh of one run: one running, at most one queued.

    Every request gets a ticket; a refresh reads the run's state when it starts and completes every
    ticket issued before that. Requests made while one runs collapse into one more refresh, which
    starts after it and so takes the latest state.
    """

    def __init__(self, run_id: int, out: Path):
        self.run_id, self.out = run_id, out
        self._cond = threading.Condition()
        self._issued = 0  # tickets handed out
        self._done = 0  # every ticket up to this one is refreshed
        self._running = False

    def request(self) -> int:
        with self._cond:
            self._issued += 1
            ticket = self._issued
            if not self._running:
                self._running = True
                threading.Thread(target=self._loop, name=f"review-{self.run_id}", daemon=True).start()
            return ticket

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._done >= self._issued:
                    self._running = False
                    self._cond.notify_all()
                    return
                target = self._issued  # this refresh reads the state after every request so far
            try:
                refresh(self.out)
            except Exception:
                logger.exception(
                    "run %s: refreshing statistics and report after a review failed", self.run_id
                )
            with self._cond:
                self._done = target
                self._cond.notify_all()

    def busy(self) -> bool:
        """A refresh is running or requested."""
        with self._cond:
            return self._running or self._done < self._issued

    def wait(self, ticket: int | None = None) -> None:
        """Until ``ticket`` (default: every request so far) is refreshed and nothing runs."""
        with self._cond:
            goal = self._issued if ticket is None else ticket
            self._cond.wait_for(lambda: self._done >= goal and (ticket is not None or not self._running))


def refresher(run_id: int, out: Path) -> Refresher:
    """The refresher of the run folder ``out`` (one per folder in this process)."""
    with _guard:
        key = Path(out).resolve()
        got = _refreshers.get(key)
        if got is None:
            got = _refreshers[key] = Refresher(run_id, out)
        return got


def report_pending(run_id: int, out: Path) -> bool:
    """Whether the report.html of run folder ``out`` is missing while its refresh is requested or
    running (a new version's own report, written in the background after the version is made).

    A reviewed run (review.json) whose report is missing with no refresh running -- the server was
    stopped while writing it, so a version had no report until its first save -- has its refresh
    asked for again here, once per server process (a report that cannot be built is not retried
    on every page view; its error is in the server's log)."""
    if (out / "report.html").is_file():
        return False
    key = Path(out).resolve()
    with _guard:
        got = _refreshers.get(key)
        if got is not None and got.busy():
            return True
        if key in _asked_again or not (out / "review.json").is_file():
            return False
        _asked_again.add(key)
    refresher(run_id, out).request()
    return True
