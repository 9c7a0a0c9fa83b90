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

A run of a **blinded study** (its workflow's ``report: {blinded: true}``, :func:`arm_mask`) names no
arm in what the server keeps or shows: every line of ``run.log`` is written with each arm name of
the run's manifest, clinical table and blinding key replaced by the arm's code (the key's: the
codes the study's pages show) or ``[arm]`` (an arm without a code). The command's console names
the arms (its warnings quote the clinical table; a CLI user running a blinded run has its inputs),
so it is masked here, in the worker, where its lines become the server's. ``console.log`` is
masked as it is written too: the worker of a blinded run runs the command in a child process of
its own (``RUN_FOLDER --run``) whose output (the child's, its Dask processes', a crash of the
interpreter) comes through a pipe, and writes each line through the mask into ``console.log``
(:func:`_pump`), so the file never holds an arm name, not for a moment while the run runs, nor
after the server or the worker was killed. The worker outlives the child to write its last words
(a crash's too), and ignores the SIGTERM of a cancel (the child ends the run). An AnnData export
of such a run is started the same way (``RUN_FOLDER --pipe COMMAND...``), its log masked as it is
written. The logs are still masked in place when the worker ends (:func:`mask_logs`, also called
by the server when it finds the worker gone), for those an older version wrote (with the names).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

RUN_LOG = "run.log"
CONSOLE_LOG = "console.log"
#: the option of the worker's child, which runs the command (a blinded run: :func:`_pump`)
CHILD = "--run"
#: ``RUN_FOLDER --pipe COMMAND...``: another command of a blinded study's run (an AnnData export),
#: its output written masked as it is written (:func:`_pump`)
PIPE = "--pipe"
#: seconds the worker still copies output after its child ended (a Dask process left holding the pipe)
LAST_WORDS_S = 10.0


Mask = Callable[[str], str]


def arm_mask(folder: Path) -> Mask | None:
    """For a run of a blinded study (``input/workflow.yaml``: ``report: {blinded: true}``): a function
    writing each arm name of the run's inputs (``input/manifest.csv``, ``input/clinical.csv`` and the
    blinding key ``input/blind_key.csv``, whose codes are the study's) as its code, or ``[arm]`` when
    the key gives it none (case-insensitive, as the report's leak check finds them); ``None`` for a
    run whose arms may be shown."""
    from cytopipe.report.blinding import leak_pattern
    from cytopipe.serve.storage import read_table_rows

    inp = Path(folder) / "input"
    spec = yaml.safe_load((inp / "workflow.yaml").read_text(encoding="utf-8")) or {}
    report = spec.get("report") if isinstance(spec.get("report"), dict) else {}
    if not report.get("blinded"):
        return None

    def rows(name: object) -> list[dict[str, str]]:
        path = inp / str(name or "")
        return read_table_rows(path.read_bytes()) if name and path.is_file() else []

    codes = {r["arm"]: r["code"] for r in rows(report.get("blind_key")) if r.get("arm") and r.get("code")}
    arms = set(codes) | {r["arm"] for name in (spec.get("manifest"), spec.get("clinical"))
                         for r in rows(name) if r.get("arm")}  # fmt: skip
    pattern = leak_pattern(arms)
    lower = {arm.lower(): code for arm, code in codes.items()}
    return lambda text: pattern.sub(lambda m: lower.get(m.group(0).lower(), "[arm]"), text)


def mask_logs(folder: Path, mask: Mask | None = None, *, console: bool = True) -> None:
    """``console.log`` (and ``run.log``, and the logs of the run's AnnData exports,
    ``out/exports/*.log``) of a blinded study's run with its arm names masked in place
    (:func:`arm_mask`); nothing for a run whose arms may be shown. ``console=False``: not
    ``console.log`` (the worker's child: its worker writes the file, masked, meanwhile)."""
    folder = Path(folder)
    try:
        mask = mask or arm_mask(folder)
    except (OSError, ValueError, yaml.YAMLError):  # the run's inputs are gone: nothing to mask with
        return
    if mask is None:
        return
    logs = [folder / RUN_LOG, *folder.glob("out/exports/*.log")]
    for path in [folder / CONSOLE_LOG, *logs] if console else logs:
        mask_file(path, mask)


def mask_file(path: Path, mask: Mask) -> None:
    """``path`` (a log) with ``mask`` applied, in place: a process still holding it open (the worker,
    its Dask processes) keeps writing into the same file."""
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return
    masked = mask(text)
    if masked != text:
        with open(path, "r+b") as fh:
            fh.write(masked.encode("utf-8"))
            fh.truncate()


class _TimedLines(io.TextIOBase):
    """A text stream writing each complete line to ``logger`` (one record per line), each through
    ``mask`` when one is given (a blinded study's run: :func:`arm_mask`)."""

    def __init__(self, logger: logging.Logger, mask: Mask | None = None):
        self._logger = logger
        self._mask = mask or (lambda line: line)
        self._pending = ""
        self._lock = threading.Lock()  # the pipeline's threads may write at once

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                self._logger.info(self._mask(line.rstrip("\r")))
        return len(text)

    def finish(self) -> None:
        """The last line, when it did not end in a newline."""
        with self._lock:
            if self._pending:
                self._logger.info(self._mask(self._pending))
                self._pending = ""


@contextlib.contextmanager
def timed_output(path: Path, mask: Mask | None = None) -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` into ``path``, each line as ``<time> <line>`` (through
    ``mask``: :func:`arm_mask`)."""
    logger = logging.getLogger("cytopipe_worker_output")  # outside "cytopipe": no handler echoes it
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    stream = _TimedLines(logger, mask)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = stream
    try:
        yield
    finally:
        stream.finish()
        sys.stdout, sys.stderr = saved
        logger.removeHandler(handler)
        handler.close()


def _pump(mask: Mask, command: list[str]) -> int:
    """Run ``command`` in a child process and write its output, and its Dask processes' (they
    inherit its descriptors), into this process's own (``console.log``, an export's log) line by
    line through ``mask``: no arm name reaches the file. Returns the child's exit code."""
    # a cancel (SIGTERM to the process group) ends the run in the child; this process stays to
    # copy its last lines. A handler, not SIG_IGN: an ignored signal would stay ignored in the child.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )

    def copy() -> None:
        for raw in iter(proc.stdout.readline, b""):  # a crash's last line comes without its newline
            data = mask(raw.decode("utf-8", "replace")).encode("utf-8")
            while data:
                data = data[os.write(1, data) :]

    reader = threading.Thread(target=copy, name="console", daemon=True)
    reader.start()
    code = proc.wait()
    reader.join(LAST_WORDS_S)  # the pipe ends when the child's Dask processes have ended too
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    folder = Path(argv[0]).resolve()
    if argv[1:2] == [PIPE]:  # fails closed: inputs that cannot be read give no output at all
        return _pump(arm_mask(folder) or (lambda text: text), argv[2:])
    if CHILD not in argv[1:]:
        try:
            mask = arm_mask(folder)
        except (OSError, ValueError, yaml.YAMLError):  # the run below says what is wrong
            mask = None
        if mask is not None:  # a blinded study's run: its console masked as it is written
            mask_file(folder / CONSOLE_LOG, mask)  # what an earlier attempt (an older version) left
            return _pump(mask, [sys.executable, "-m", "cytopipe.serve.worker", str(folder), CHILD])
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
    mask = None
    try:
        mask = arm_mask(folder)  # a blinded study's run: no arm name in what the server keeps or shows
        with timed_output(folder / RUN_LOG, mask):
            code = cli_main(args)
    except KeyboardInterrupt:
        code = 130
    finally:
        mask_logs(folder, mask, console=CHILD not in argv[1:])
        atomic_write_json(folder / "status.json", {"exit_code": code, "seconds": round(time.time() - t0, 3)})
    return code


if __name__ == "__main__":
    sys.exit(main())
