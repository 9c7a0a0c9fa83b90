"""Per-population mixed-model fits kept in this process, named by the content of what they fit.

After a review action in ``cytopipe serve`` the statistics are computed again (the run's, or the
report's own when the run has none) although most populations' rows did not move: a gate change
on one sample changes that population and the ones below it. The mixed model is the statistics'
cost (~1.5 s per population with 1,167 patients, fitted one after another in a review), so a fit
of the same function on the same data (:func:`cytopipe.config.content_hash` of the rows, every
setting of the fit) is given back from here instead of fitted again: the same result, as the fit
is deterministic. Kept in memory only (the server's process, where the refreshes run), at most
:data:`MAX_FITS` of them, the least recently used dropped first.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from cytopipe.config import Unhashable, content_hash

#: fits kept (a few per population and measure of the runs a server has refreshed lately)
MAX_FITS = 2000

_fits: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()
counts = {"reused": 0, "fitted": 0}  # since the process started (tests read them)


def _key(fn: Callable[[Any], Any], item: Any) -> str | None:
    try:
        if isinstance(fn, partial):
            what = (fn.func.__module__, fn.func.__qualname__, fn.args, dict(fn.keywords or {}), item)
        else:
            what = (fn.__module__, fn.__qualname__, item)
        return content_hash(what)
    except (Unhashable, AttributeError):
        return None


def remembered(
    map_fits: Callable[[Callable, list], Iterable] | None = None,
) -> Callable[[Callable, list], list]:
    """A ``map_fits`` (see :func:`cytopipe.stats.run_statistics`) that gives back the fits of data
    fitted before in this process and fits the others with ``map_fits`` (default: here, in turn)."""

    def run(fn: Callable[[Any], Any], items: list) -> list:
        keys = [_key(fn, item) for item in items]
        out: list[Any] = [None] * len(items)
        todo = []
        with _lock:
            for i, key in enumerate(keys):
                if key is not None and key in _fits:
                    _fits.move_to_end(key)
                    out[i] = copy.deepcopy(_fits[key])  # the caller may change its copy
                else:
                    todo.append(i)
            counts["reused"] += len(items) - len(todo)
        fitted = list((map_fits or map)(fn, [items[i] for i in todo]))
        with _lock:
            counts["fitted"] += len(todo)
            for i, fit in zip(todo, fitted):
                out[i] = fit
                if keys[i] is not None:
                    _fits[keys[i]] = copy.deepcopy(fit)
                    while len(_fits) > MAX_FITS:
                        _fits.popitem(last=False)
        return out

    return run


def forget() -> None:
    """Drop every kept fit."""
    with _lock:
        _fits.clear()
