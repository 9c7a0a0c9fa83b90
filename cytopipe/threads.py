"""BLAS/OpenMP thread limits: the one helper behind every "run this on one thread" in cytopipe.

Small products (a 16 x 16 compensation over a million events, a Gaussian-mixture fit on a few
thousand events) only contend when BLAS spreads them over threads: measured 3-10x slower with
2 threads on a busy 2-core machine, and samples run in parallel processes anyway. Results do
not depend on the limit; the time does.

:func:`one_thread` is a context manager built on threadpoolctl (which comes with scikit-learn):

* the threadpoolctl controller is cached (building one scans every loaded library, ~5 ms) and
  rebuilt only when the process has loaded new shared libraries since (counted with
  ``dl_iterate_phdr``, ~0.1 ms), e.g. scikit-learn bringing its own OpenMP;
* it is safe from several threads and when nested: the limit is set when the first block
  enters and the original pools are restored when the last one leaves (threadpoolctl's own
  limiter restores on every exit, which would lift the limit under a block still running in
  another thread). threadpoolctl (>= 3.6) lets only one live thread set OpenBLAS's shared pool
  size, the first that tried; this helper hands that right back after each change, so the
  thread that leaves last (not necessarily the one that entered first) can restore the pools.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
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
    """A function counting the shared libraries loaded in this process, or None where
    ``dl_iterate_phdr`` is not available (then the controller is rebuilt on every entry)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        iterate = libc.dl_iterate_phdr
    except (OSError, AttributeError):  # pragma: no cover - musl without the symbol, etc.
        return None
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)

    def count() -> int:
        n = 0

        def one(_info, _size, _data) -> int:
            nonlocal n
            n += 1
            return 0

        iterate(callback_type(one), None)
        return n

    return count


_COUNT_LIBRARIES = _library_counter()


def _controller():
    """The cached ThreadpoolController, rebuilt when new shared libraries were loaded."""
    global _CONTROLLER
    from threadpoolctl import ThreadpoolController

    loaded = _COUNT_LIBRARIES() if _COUNT_LIBRARIES is not None else None
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
