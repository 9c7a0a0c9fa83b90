"""Running a call in a daemon thread, so that a test can join it with a hang guard."""

from __future__ import annotations

import threading
from collections.abc import Callable


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    """Start ``fn`` in a daemon thread; the box gets ``result`` or the ``error`` it raised."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # pragma: no cover - reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box
