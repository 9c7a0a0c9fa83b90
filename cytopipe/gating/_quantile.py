"""``np.quantile`` of a 1-D float array, bit for bit, read off its sorted values.

The data-driven fits take four quantiles of each density's events and the gate-review data two
of each plotted axis: ~30 + ~20 calls per sample on 5k-40k events, where numpy's copy, ``unique``
and introselect cost ~180-300 us a call. numpy's SIMD sort of the same values costs ~30-85 us, and
the fits need the sorted values anyway (:func:`cytopipe.gating.fitters.density_sorted`); the order
statistics are then elements of the sorted array and the interpolation between them is numpy's
own (``linear`` method, the same operations in the same dtypes), so the result is numpy's.

Where numpy's answer depends on its partition's order -- a value is NaN, or a zero (``-0.0`` ties
with ``0.0``) is in the result -- :func:`quantile_like_numpy` calls ``np.quantile`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
    """``np.quantile(x, q)`` for a 1-D float array and a sequence of quantiles."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.ndim != 1:
        return np.quantile(x, q)
    out = quantile_of_sorted(np.sort(x), q)
    if out is None or not out.all():  # NaN, or a zero: numpy's partition picks its sign
        return np.quantile(x, q)
    return out
