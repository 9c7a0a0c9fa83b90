"""The gate-review histograms' numba kernels (:func:`cytopipe.report.gate_review.gate_review_data`).

Apart from gate_review so that reading and drawing the gate-review table (``cytopipe report``, the
gallery's helper process) does not import numba (~0.1 s of CPU per process): only the per-sample
task that bins events does.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _bin(v, lo, scale, n):
    """Bin of ``v`` on ``n`` equal bins from ``lo`` (``scale`` = n / span): -1 when outside
    or not finite; the upper edge belongs to the last bin. float64 arithmetic throughout."""
    f = (np.float64(v) - lo) * scale
    if not np.isfinite(f) or f < 0.0 or f >= n + 1.0:
        return -1
    i = np.int64(np.floor(f))
    if i == n:
        return n - 1
    return i


@numba.njit(cache=True, nogil=True)
def hist2d_kernel(x, y, xlo, xscale, nx, ylo, yscale, ny, counts):
    for r in range(x.shape[0]):
        ix = _bin(x[r], xlo, xscale, nx)
        iy = _bin(y[r], ylo, yscale, ny)
        if ix >= 0 and iy >= 0:
            counts[iy * nx + ix] += 1


@numba.njit(cache=True, nogil=True)
def hist1d_kernel(x, xlo, xscale, nx, counts):
    for r in range(x.shape[0]):
        ix = _bin(x[r], xlo, xscale, nx)
        if ix >= 0:
            counts[ix] += 1
