"""``np.quantile`` of a float32 array, bit for bit, by histogram selection instead of a partition.

The data-driven fits take four quantiles of each density's events and the gate-review data two
of each plotted axis: ~30 + ~20 calls per sample on 5k-20k events, where numpy's copy,
``unique`` and introselect cost ~180-250 us a call. Here each value maps to an order-preserving
16-bit key (as in :mod:`cytopipe.gating._median`); a 65 536-bin histogram (located through a
256-bin coarse one) gives the bin of every wanted order statistic, and only the values in those
bins are sorted. The interpolation between the order statistics is numpy's own (``linear``
method, the same operations in the same dtypes), so the result is the same float64 array.

Where numpy's answer depends on its partition's order -- a value is NaN, or a zero is ``-0.0``
(it ties with ``0.0``) -- :func:`quantile_like_numpy` calls ``np.quantile`` itself.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numba
import numpy as np

from cytopipe.gating._median import _COARSE, _FINE, locate

_LOCAL = threading.local()  # per-thread scratch: the server gates studies in threads
_MIN_SIZE = 8192  # below this numpy's own partition is as fast (~30 us for 5k values)


@numba.njit(cache=True, nogil=True)
def _order_stats_f32(values, ranks, hist, coarse, buf, bits, keys, out):  # pragma: no cover - numba
    """``out[j]``: the ``ranks[j]``-th smallest value (ranks ascending). False (and ``out``
    unset) when a value is NaN or -0.0."""
    m = values.shape[0]
    hist[:] = 0
    coarse[:] = 0
    for r in range(m):
        buf[r] = values[r]
    for r in range(m):
        b = np.int64(bits[r])
        if (b & 0x7FFFFFFF) > 0x7F800000 or b == 0x80000000:  # NaN, -0.0
            return False
        # order-preserving key: flip all bits of negatives, set the sign bit of positives
        k = (b ^ (0x80000000 | ((b >> 31) * 0x7FFFFFFF))) >> 16
        keys[r] = k
        hist[k] += 1
        coarse[k >> 8] += 1
    nr = ranks.shape[0]
    bins = np.empty(nr, np.int64)
    before = np.empty(nr, np.int64)
    for j in range(nr):
        bins[j], before[j] = locate(hist, coarse, ranks[j])
    c = 0
    for r in range(m):  # the values of the wanted bins, in place at the front of buf
        kb = keys[r]
        for j in range(nr):
            if kb == bins[j]:
                buf[c] = buf[r]
                c += 1
                break
    sub = buf[:c]
    sub.sort()
    for j in range(nr):
        offset = 0  # candidates of the wanted bins below this one (bins ascend with the ranks)
        for i in range(j):
            if bins[i] < bins[j] and (i == 0 or bins[i] != bins[i - 1]):
                offset += hist[bins[i]]
        out[j] = sub[offset + ranks[j] - before[j]]
    return True


_KEPT = 1 << 16  # values the per-thread scratch holds (640 kB with the histograms); larger calls
# get temporary buffers, so a 5M-event column leaves no 30 MB behind in a worker


def _scratch(n: int) -> tuple[np.ndarray, ...]:
    s = getattr(_LOCAL, "scratch", None)
    if s is None:
        buf = np.empty(_KEPT, dtype=np.float32)
        s = _LOCAL.scratch = (
            np.zeros(_FINE, dtype=np.int32),
            np.zeros(_COARSE, dtype=np.int32),
            buf,
            buf.view(np.uint32),
            np.empty(_KEPT, dtype=np.uint16),
        )
    if n > _KEPT:
        buf = np.empty(n, dtype=np.float32)
        return s[0], s[1], buf, buf.view(np.uint32), np.empty(n, dtype=np.uint16)
    return s


def _plan(n: int, q: Sequence[float]):
    """numpy's ``_get_indexes`` / ``_get_gamma`` for the linear method: (ranks wanted, ascending;
    lower and upper rank of each quantile; gamma). None when a quantile is NaN."""
    qs = np.asarray(q, dtype=np.float64)
    virtual = (n - 1) * qs
    previous = np.floor(virtual)
    following = previous + 1
    above = virtual >= n - 1
    previous[above] = -1
    following[above] = -1
    below = virtual < 0
    previous[below] = 0
    following[below] = 0
    if np.isnan(virtual).any():
        return None
    previous = previous.astype(np.intp)
    following = following.astype(np.intp)
    gamma = virtual - previous
    ranks = np.unique(np.concatenate([previous, following]) % n)  # -1 is the last
    return ranks, previous % n, following % n, gamma


def _lerp(stats: np.ndarray, ranks, previous, following, gamma) -> np.ndarray:
    """numpy's ``_lerp``, operation for operation, between the order statistics ``stats`` (of
    ``ranks``)."""
    a = stats[np.searchsorted(ranks, previous)]
    b = stats[np.searchsorted(ranks, following)]
    diff_b_a = b - a
    result = np.add(a, diff_b_a * gamma)
    np.subtract(b, diff_b_a * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe",
                dtype=type(result.dtype))  # fmt: skip
    return result


def quantile_of_sorted(ordered: np.ndarray, q: Sequence[float]) -> np.ndarray | None:
    """``np.quantile(x, q)`` read off ``ordered`` = ``np.sort(x)`` (1-D float); None where numpy
    would answer from its own partition (a NaN, a NaN quantile). A zero's sign may differ from
    numpy's (``-0.0`` ties with ``0.0``)."""
    n = ordered.size
    if n == 0 or np.isnan(ordered[-1]):  # NaN sorts last
        return None
    plan = _plan(n, q)
    if plan is None:
        return None
    ranks = plan[0]
    return _lerp(ordered[ranks], *plan)


def quantile_like_numpy(x: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.quantile(x, q)`` for a 1-D array and a sequence of quantiles (float64 array)."""
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim != 1 or x.size < _MIN_SIZE:
        return np.quantile(x, q)
    plan = _plan(x.size, q)
    if plan is None:
        return np.quantile(x, q)
    ranks = plan[0]
    hist, coarse, buf, bits, keys = _scratch(x.size)
    stats = np.empty(ranks.size, dtype=np.float32)
    if not _order_stats_f32(x, ranks.astype(np.int64), hist, coarse, buf, bits, keys, stats):
        return np.quantile(x, q)
    return _lerp(stats, *plan)
