"""BLAS/OpenMP thread limits: the one helper behind every "run this on one thread" in cytopipe.

Small products (a 16 x 16 compensation over a million events, a Gaussian-mixture fit on a few
thousand events) only contend when BLAS spreads them over threads: measured 3-10x slower with
2 threads on a busy 2-core machine, and samples run in parallel processes anyway. Results do
not depend on the limit; the time does.

:func:`one_thread` is a context manager built on threadpoolctl (which comes with scikit-learn):

* the threadpoolctl controller is cached (building one scans every loaded library, ~5 ms) and
  rebuilt only when the process has loaded new shared libraries since (counted from
  ``/proc/self/maps``), e.g. scikit-learn bringing its own OpenMP. Counting them costs ~2 ms
  (the maps of a process with numpy, scipy and numba run to thousands of lines), so they are
  recounted only when a module was imported since the last count: extension modules and the
  libraries they link are loaded by imports (a Dask worker entered this block ~3 times per
  sample, ~4 % of its CPU, before);
* it is safe from several threads and when nested: the limit is set when the first block
  enters and the original pools are restored when the last one leaves (threadpoolctl's own
  limiter restores on every exit, which would lift the limit under a block still running in
  another thread). threadpoolctl (>= 3.6) lets only one live thread set OpenBLAS's shared pool
  size, the first that tried; this helper hands that right back after each change, so the
  thread that leaves last (not necessarily the one that entered first) can restore the pools.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_CONTROLLER: tuple[int | None, Any] | None = None  # (loaded-library count, ThreadpoolController)
_ACTIVE = 0  # blocks inside one_thread(), over all threads
_LIMITER: Any = None  # what restores the original pool sizes when the last block leaves


def _library_counter():
    """A function counting the shared libraries mapped in this process, or None where
    ``/proc/self/maps`` is not available (then the controller is rebuilt on every entry).

    Read from ``/proc/self/maps`` (as threadpoolctl >= 3.8 lists libraries on Linux), never with
    ``dl_iterate_phdr`` and a Python callback: that holds the dynamic loader's lock while waiting
    for the GIL, and deadlocks against a thread importing an extension module (``dlopen`` under
    the GIL) - seen in ``cytopipe serve``, a review request against a report thread importing
    matplotlib."""
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/self/maps"):
        return None

    def count() -> int:
        with open("/proc/self/maps", "rb") as fh:
            maps = fh.read()
        return len({line.rsplit(b" ", 1)[-1] for line in maps.splitlines() if b".so" in line})

    return count


_COUNT_LIBRARIES = _library_counter()
_COUNTED: tuple[int, int] | None = None  # (len(sys.modules), library count) at the last count


def _loaded_libraries() -> int | None:
    """The number of shared libraries mapped in this process (None where it cannot be told),
    recounted only when ``sys.modules`` has grown or shrunk since the last count."""
    global _COUNTED
    if _COUNT_LIBRARIES is None:
        return None
    modules = len(sys.modules)
    if _COUNTED is None or _COUNTED[0] != modules:
        _COUNTED = (modules, _COUNT_LIBRARIES())
    return _COUNTED[1]


def _controller():
    """The cached ThreadpoolController, rebuilt when new shared libraries were loaded."""
    global _CONTROLLER
    from threadpoolctl import ThreadpoolController

    loaded = _loaded_libraries()
    if _CONTROLLER is None or loaded is None or _CONTROLLER[0] != loaded:
        _CONTROLLER = (loaded, ThreadpoolController())
    return _CONTROLLER[1]


def _release_control() -> None:
    """Give up threadpoolctl's OpenBLAS "controlling thread" if this thread holds it."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # pragma: no cover - older threadpoolctl: no controlling thread
        return
    release = getattr(OpenBLASController, "clear_controlling_thread", None)
    if release is not None:
        release()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Limit the BLAS and OpenMP thread pools to one thread for the enclosed block.

    Re-entrant and thread-safe (see the module docstring); a no-op without threadpoolctl.
    """
    global _ACTIVE, _LIMITER
    with _LOCK:
        if _ACTIVE == 0:
            try:
                _LIMITER = _controller().limit(limits=1)
                _release_control()
            except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
                _LIMITER = None
        _ACTIVE += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE -= 1
            if _ACTIVE == 0 and _LIMITER is not None:
                _LIMITER.restore_original_limits()
                _release_control()
                _LIMITER = None


def limit_process_to_one_thread() -> Any:
    """Limit the BLAS and OpenMP pools of the whole process to one thread, for good (a Dask
    worker: its samples run in parallel processes). Returns the threadpoolctl limiter, or None
    without threadpoolctl."""
    try:
        return _controller().limit(limits=1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        logger.debug("threadpoolctl is not installed: BLAS thread pools left as they are")
        return None


def pool_sizes() -> dict[str, int]:
    """``{internal_api: threads}`` of the thread pools loaded now (for logs and tests)."""
    sizes: dict[str, int] = {}
    for info in _controller().info():
        sizes[info["internal_api"]] = max(sizes.get(info["internal_api"], 0), int(info["num_threads"]))
    return sizes
