"""What a run tells its user while it works: progress of every phase and notices.

On a terminal the per-sample phases show a tqdm bar; without one (a log file, a server, CI) they
write a line at every tenth of the phase ("gate: 31/48 samples, ETA 12 s"). Notices (a reused
statistics table, the report being written, a warning about the clinical table) go to the run's
log (``RUN_DIR/run.log``) and, when progress is shown, to stderr. The library never prints
anything else: the command prints the run's summary. Under :func:`quiet_console` (``cytopipe run
--quiet``) the console gets none of it, while run.log gets all of it (progress lines included, as
without a terminal): warnings and errors still reach stderr through logging.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

# set by quiet_console() for one command; module state because the console is the process's
_quiet = False


@contextlib.contextmanager
def quiet_console(quiet: bool = True) -> Iterator[None]:
    """While active (``quiet``), no progress bar and no notice on stderr; run.log still gets every
    notice and the progress lines of every phase (warnings reach stderr through logging:
    ``cytopipe.cli``'s console handler)."""
    global _quiet
    before, _quiet = _quiet, bool(quiet) or _quiet
    try:
        yield
    finally:
        _quiet = before


def notice(message: str, show: bool = True, level: int = logging.INFO) -> None:
    """``message`` in run.log, and on stderr when ``show`` (progress on) and the console is not
    quiet (:func:`quiet_console`)."""
    logger.log(level, message)
    if show and not _quiet:
        print(message, file=sys.stderr, flush=True)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal; without one (a log file, a server, CI), progress lines at every
    tenth of the phase ("gate: 31/48 samples, ETA 12 s") in run.log and on stderr (run.log only
    when the console is quiet)."""
    if enabled and (_quiet or not _is_terminal(sys.stderr)):
        return ProgressLines(total, desc)
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"{desc:<10}",
        unit="sample",
        disable=True if not enabled else None,  # None: no bar when stderr is not a terminal
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressLines:
    """Progress of one phase as lines: at every tenth of ``total`` and at the end."""

    def __init__(self, total: int, desc: str, steps: int = 10):
        self.total, self.desc, self.done = total, desc, 0
        self.t0 = time.perf_counter()
        self.marks = {math.ceil(total * k / steps) for k in range(1, steps + 1)} if total else set()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done in self.marks:
            elapsed = time.perf_counter() - self.t0
            line = f"{self.desc}: {self.done}/{self.total} samples"
            if self.done < self.total:
                line += f", ETA {elapsed / self.done * (self.total - self.done):.0f} s"
            else:
                line += f", {elapsed:.0f} s"
            notice(line)

    def close(self) -> None:
        pass
