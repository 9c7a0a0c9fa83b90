"""A phase's shared state on Dask (:meth:`cytopipe.pipeline.executors.DaskExecutor.map`).

The shared state is a task's result, not scattered data: dask's active memory manager trims a
broadcast's replicas to one worker, and scattered data lost with that worker cannot be recomputed
(every task of the phase would be cancelled). A task's result is computed again by the scheduler
when the worker holding it dies.

But the scheduler counts the deaths of the workers computing a task: a worker that dies while it
computes the shared state again (the worker that held it died, say a sample killed it, and the one
computing it again dies too) counts against the shared-state task, and after
`distributed.scheduler.allowed-failures` such deaths (3 by dask's default; cytopipe does not change
it, a lab's scheduler or dask config may set 0) the scheduler gives it up with KilledWorker, and
every sample of the phase still waiting on it fails with it, although the cluster comes back.
:class:`SharedState` computes it again under a new key instead (a warning naming the worker) and
the executor runs the samples that waited on it again; after SHARED_STATE_ATTEMPTS computations
given up, those samples fail with a message that says why.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("cytopipe.pipeline.executors")  # one logger for the executor's messages

SHARED_STATE_ATTEMPTS = 4  # computations of a phase's shared state the executor asks for, at most


class RunAgain:
    """What the executor gets instead of a task's value when the task failed because its phase's
    shared state was given up, and the shared state is being computed again: run the task again."""


RUN_AGAIN = RunAgain()


def _shared(state: Any) -> Any:
    """The phase's shared state, as a task result the scheduler can recompute."""
    return state


class SharedState:
    """One phase's shared state as a Dask task: :attr:`future` (the current one), :attr:`tag`
    (for the keys of the tasks that depend on it)."""

    def __init__(self, client: Any, state: Any, desc: str, token: str):
        self.client = client
        self.state = state
        self.desc = desc
        self.token = token
        self.attempt = 1
        self.keys: set[str] = set()  # every key the shared state had in this phase
        self.last_worker = ""  # the last worker that died computing it, as the messages name it
        self.future = self._submit()

    @property
    def tag(self) -> str:
        """Marks the key of a task run again after the shared state was computed again."""
        return "" if self.attempt == 1 else f"-r{self.attempt}"

    def _submit(self) -> Any:
        key = f"shared-{self.desc}{self.tag}-{self.token}"
        self.keys.add(key)
        return self.client.submit(_shared, self.state, key=key, pure=False)

    def lost(self, exc: BaseException) -> bool:
        """Whether a task failed because the scheduler gave up this phase's shared state (a task
        that waits on it gets the shared state's own KilledWorker)."""
        return type(exc).__name__ == "KilledWorker" and str(getattr(exc, "task", "")) in self.keys

    def again(self, exc: BaseException) -> bool:
        """After ``exc`` (a :meth:`lost` task's): True when the task is to run again (on the
        shared state computed again, now or after an earlier task's loss); False when the shared
        state was given up SHARED_STATE_ATTEMPTS times."""
        if str(exc.task) != self.future.key:  # type: ignore[attr-defined]
            return True  # the loss of an earlier computation: computed again already
        worker = exc.last_worker  # type: ignore[attr-defined]
        self.last_worker = f"Dask worker {getattr(worker, 'name', '?')} ({getattr(worker, 'address', '?')})"
        if self.attempt >= SHARED_STATE_ATTEMPTS:
            return False
        logger.warning(
            "%s: %s died while it computed the phase's shared state, and the scheduler gave that "
            "task up (distributed.scheduler.allowed-failures is %s); computing it again (attempt %d "
            "of %d) and running the samples that waited on it again",
            self.desc, self.last_worker, exc.allowed_failures,  # type: ignore[attr-defined]
            self.attempt + 1, SHARED_STATE_ATTEMPTS,
        )  # fmt: skip
        self.future.release()
        self.attempt += 1
        self.future = self._submit()
        return True

    def failure_message(self) -> str:
        return (
            f"not processed: the phase's shared state could not be computed; the scheduler gave it "
            f"up {self.attempt} time(s), each time after the worker computing it died (the last: "
            f"{self.last_worker}); too large for a worker's memory (see --memory-limit, and the "
            "system's OOM killer in dmesg)? a crash in a native library? Run again (the samples "
            "already done are kept)"
        )

    def release(self) -> None:
        self.future.release()
