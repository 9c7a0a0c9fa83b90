"""Render the gate gallery's figures in a helper process while the report's other sections are built.

The gate gallery is a large part of a report's drawing (~17 s of ~36 s of CPU on the 150-file trial
of ``bench/trial.py`` before its text, mosaic and PNG were drawn cheaper, ``report/fastagg.py``:
less than half that since; docs/performance-log.md), and the report is written
after the Dask workers have stopped: one core of a two-core laptop sat idle. The gallery's
sections now queue their figures here (:meth:`FigureQueue.submit` returns a placeholder for the
HTML); a helper process (``python -m cytopipe.report.render_helper``, started on the first figure
and importing the same cytopipe) takes them from the front of the queue, one at a time, while the
report's own process builds the other sections and then takes the rest from the back
(:meth:`FigureQueue.finish`). The figures are the same bytes whoever draws them (same code,
same style, Agg).

The helper is a plain child process talking over its stdin/stdout (pickled frames of figure
data this process made), not :mod:`multiprocessing`: a spawned multiprocessing child re-imports
the caller's ``__main__``, which a script that calls :func:`cytopipe.report.write_report` without
an ``if __name__ == "__main__"`` guard would run again. A helper that cannot start or dies leaves
its figures to this process (logged); nothing is lost and the report is the same.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import warnings
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")
#: fewer queued figures than this are drawn here: starting the helper costs ~1 s of CPU
MIN_FIGURES = 4
#: seconds this process waits, once it has drawn everything else, for the figure the helper is on
#: (one takes well under a second): a helper stuck longer is ended and the figure drawn here
WAIT_SECONDS = 300.0


def _cpus() -> int:
    """The CPUs this process may use (its affinity and a container's cgroup quota, as Dask counts)."""
    from dask.system import CPU_COUNT

    return int(CPU_COUNT or 1)


def draw(job: tuple[str, str, tuple[Any, ...]]) -> Any:
    """Make and render one gallery figure (in the helper or here): ``(name, alt, args)``."""
    from cytopipe.report import figures as F

    name, alt, args = job
    with F.style_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return F.render(F.gallery_figure(*args), name, alt)


def _write(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read(stream: BinaryIO) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the helper's stream ended")
    (n,) = _HEADER.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("the helper's stream ended inside a frame")
    return pickle.loads(data)  # frames this process's own parent made (figure data), never a file


class FigureQueue:
    """Gallery figures to draw; ``helper``: use a helper process (``None``: when >= 2 CPUs)."""

    def __init__(self, helper: bool | None = None):
        self.helper = _cpus() >= 2 if helper is None else bool(helper)
        self.jobs: list[tuple[str, str, tuple[Any, ...]]] = []
        self.done: dict[int, Any] = {}
        self._todo: deque[int] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self.drawn_by_helper = 0
        self.drawn: list[int] = []  # the figures drawn (by the helper or here), not given done

    def submit(self, name: str, alt: str, args: tuple[Any, ...], done: Any = None) -> int:
        """Queue one figure (``gallery_figure(*args)``); returns its number. ``done``: the figure
        already rendered (the previous report's): nothing to draw."""
        n = len(self.jobs)
        self.jobs.append((name, alt, args))
        if done is not None:
            self.done[n] = done
            return n
        self.drawn.append(n)
        with self._lock:
            self._todo.append(n)
            todo = len(self._todo)
        if self.helper and self._thread is None and todo >= MIN_FIGURES:
            self._start()
        return n

    PLACEHOLDER = r"<!--cytopipe-figure-(\d+)-->"  # the pattern of :meth:`placeholder`

    @staticmethod
    def placeholder(n: int) -> str:
        return f"<!--cytopipe-figure-{n}-->"

    # ---- the helper -----------------------------------------------------------------------------
    def _start(self) -> None:
        import cytopipe

        env = dict(os.environ)
        root = str(Path(cytopipe.__file__).resolve().parents[1])  # the helper imports this cytopipe
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cytopipe.report.render_helper"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        except OSError as exc:
            log.warning("report: no helper process for the gate gallery (%s); drawing it here", exc)
            self.helper = False
            return
        self._thread = threading.Thread(target=self._feed, name="cytopipe-report-helper", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        n = None
        try:
            while True:
                with self._lock:
                    if not self._todo:
                        break
                    n = self._todo.popleft()
                _write(proc.stdin, self.jobs[n])
                status, value = _read(proc.stdout)
                if status != "ok":
                    log.warning("report: the helper could not draw figure %s (drawn here instead):\n%s",
                                self.jobs[n][0], value)  # fmt: skip
                    break
                self.done[n] = value
                self.drawn_by_helper += 1
                n = None
        except (OSError, EOFError, pickle.PickleError) as exc:
            log.warning("report: the gate gallery's helper process stopped (%s); drawing the rest here", exc)
        finally:
            if n is not None:  # the figure in flight goes back to the queue
                with self._lock:
                    self._todo.appendleft(n)
            self._stop()

    def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        """Drop what is not drawn yet and end the helper (the report failed before its figures were
        needed)."""
        with self._lock:
            self._todo.clear()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---- here -----------------------------------------------------------------------------------
    def finish(self) -> list[Any]:
        """Draw what the helper has not taken (from the back), wait for it; every figure's
        :class:`~cytopipe.report.figures.Rendered`, in submission order."""
        while True:
            with self._lock:
                n = self._todo.pop() if self._todo else None
            if n is None:
                if self._thread is not None:
                    self._thread.join(WAIT_SECONDS)
                    if self._thread.is_alive() and self._proc is not None:
                        log.warning("report: the gate gallery's helper process did not answer; ending it")
                        self._proc.kill()
                        self._thread.join()
                    self._thread = None
                with self._lock:  # the helper stopped with figures left: they are drawn here
                    if not self._todo:
                        break
                continue
            self.done[n] = draw(self.jobs[n])
        log.debug(
            "report: %d of %d gallery figures drawn by the helper", self.drawn_by_helper, len(self.jobs)
        )
        return [self.done[n] for n in range(len(self.jobs))]


def _serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    import traceback

    while True:
        try:
            job = _read(stdin)
        except EOFError:
            return
        try:
            reply = ("ok", draw(job))
        except Exception:  # the report's own process draws it again and raises it properly
            reply = ("error", traceback.format_exc())
        _write(stdout, reply)


if __name__ == "__main__":
    # frames go over the real stdout; anything a library prints goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, out)
