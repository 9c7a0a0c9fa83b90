"""Numba kernels behind :mod:`cytopipe.peaks` (imported lazily: numba is a heavy import).

Ports of SciPy's ``scipy.signal._peak_finding_utils._local_maxima_1d`` and
``_peak_prominences`` (wlen unset), with the same comparisons in float64, so the peaks, bases and
prominences are identical (tests/test_peaks.py compares them with SciPy on random and flat-topped
arrays). Importing ``scipy.signal`` costs ~0.9 s of CPU per process (it imports ``scipy.stats``),
which every Dask worker paid on its first data-driven gate; numba is already loaded there.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def local_maxima(x: np.ndarray) -> np.ndarray:
    """Indices of the local maxima of ``x`` (a flat top counts once, at its middle, rounded down),
    never the first or last value."""
    n = x.shape[0]
    out = np.empty(max(n // 2, 1), dtype=np.intp)
    m = 0
    i = 1
    i_max = n - 1
    while i < i_max:
        if x[i - 1] < x[i]:
            i_ahead = i + 1
            while i_ahead < i_max and x[i_ahead] == x[i]:
                i_ahead += 1
            if x[i_ahead] < x[i]:
                out[m] = (i + i_ahead - 1) // 2
                m += 1
                i = i_ahead
        i += 1
    return out[:m]


@numba.njit(cache=True, nogil=True)
def prominences(x: np.ndarray, peaks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each peak's prominence and its left and right bases (SciPy's definitions)."""
    k = peaks.shape[0]
    prom = np.empty(k, dtype=np.float64)
    left = np.empty(k, dtype=np.intp)
    right = np.empty(k, dtype=np.intp)
    i_max = x.shape[0] - 1
    for j in range(k):
        peak = peaks[j]
        i = peak
        left[j] = peak
        left_min = x[peak]
        while 0 <= i and x[i] <= x[peak]:
            if x[i] < left_min:
                left_min = x[i]
                left[j] = i
            i -= 1
        i = peak
        right[j] = peak
        right_min = x[peak]
        while i <= i_max and x[i] <= x[peak]:
            if x[i] < right_min:
                right_min = x[i]
                right[j] = i
            i += 1
        prom[j] = x[peak] - max(left_min, right_min)
    return prom, left, right
