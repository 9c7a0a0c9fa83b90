"""``python -m cytopipe.serve.worker RUN_FOLDER``: one run of the workspace, in its own process.

Runs ``cytopipe run RUN_FOLDER/input/workflow.yaml --out RUN_FOLDER/out`` (the pipeline's own
resumable run: a restarted worker reuses every per-sample result already cached) and writes
``RUN_FOLDER/status.json`` with the exit code when it ends, so a server that was restarted in
between still learns how the run ended.

``RUN_FOLDER/run.log`` (whose tail the run's page shows, and whose last lines are the error of a
failed run) gets what the command says (its warnings, notes, summary, error or traceback), each
line with the time it was said, in the order it was said: the command's standard output and error
are one stream here, written line by line. Output that does not pass through Python's
``sys.stdout``/``sys.stderr`` (Dask's processes, a crash of the interpreter) goes to the process's
own output, ``RUN_FOLDER/console.log`` (:class:`~cytopipe.serve.runs.RunManager` opens it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

RUN_LOG = "run.log"
CONSOLE_LOG = "console.log"


class _TimedLines(io.TextIOBase):
    """A text stream writing each complete line to ``logger`` (one record per line)."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger
        self._pending = ""
        self._lock = threading.Lock()  # the pipeline's threads may write at once

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                self._logger.info(line.rstrip("\r"))
        return len(text)

    def finish(self) -> None:
        """The last line, when it did not end in a newline."""
        with self._lock:
            if self._pending:
                self._logger.info(self._pending)
                self._pending = ""


@contextlib.contextmanager
def timed_output(path: Path) -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` into ``path``, each line as ``<time> <line>``."""
    logger = logging.getLogger("cytopipe_worker_output")  # outside "cytopipe": no handler echoes it
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    stream = _TimedLines(logger)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = stream
    try:
        yield
    finally:
        stream.finish()
        sys.stdout, sys.stderr = saved
        logger.removeHandler(handler)
        handler.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    folder = Path(argv[0]).resolve()
    options = json.loads((folder / "input" / "options.json").read_text(encoding="utf-8"))

    def stop(signum, frame):  # cancel: end like Ctrl-C (the Dask cluster is closed on the way out)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    from cytopipe.cli import main as cli_main
    from cytopipe.store import atomic_write_json

    args = ["run", str(folder / "input" / "workflow.yaml"), "--out", str(folder / "out"), "--no-progress"]
    if options.get("scheduler_address"):
        args += ["--scheduler-address", options["scheduler_address"]]
    t0 = time.time()
    code = 1
    try:
        with timed_output(folder / RUN_LOG):
            code = cli_main(args)
    except KeyboardInterrupt:
        code = 130
    finally:
        atomic_write_json(folder / "status.json", {"exit_code": code, "seconds": round(time.time() - t0, 3)})
    return code


if __name__ == "__main__":
    sys.exit(main())
