"""Numba kernels behind :mod:`cytopipe.transforms` (imported lazily: numba is a heavy import).

Logicle and hyperlog have no closed form in the forward direction (flowutils finds a root per
event). We tabulate the *exact* flowutils forward transform once per parameter set at bin edges
that follow the float32 bit pattern: the bin of ``|x|`` is its exponent plus the top
``MANTISSA_BITS`` mantissa bits, i.e. 1024 bins per octave, each 0.1 % wide. Within a bin the
transform is linear to ~1e-8, and the bin index is two integer operations, so the kernel is one
pass over the events with no search and no transcendental function.

Both transforms are odd-symmetric about ``x1`` (flowutils reflects negative values:
``f(-x) = 2*x1 - f(x)``), so the table only covers ``|x|``. Values below the first bin edge
(``|x| < 2**EXP_MIN``) use the slope from zero, where the transform is linear (its second
derivative vanishes at zero by the Logicle condition). Values above the last edge
(``|x| >= 2**EXP_MAX``) are solved by Newton's method on the explicit inverse; NaN stays NaN and
+-inf stays +-inf.
"""

from __future__ import annotations

import math

import numba
import numpy as np

MANTISSA_BITS = 10
SHIFT = 23 - MANTISSA_BITS
EXP_MIN = -24  # 2**-24 ~ 6e-8
EXP_MAX = 40  # 2**40 ~ 1.1e12
K0 = (127 + EXP_MIN) << MANTISSA_BITS  # bin number of 2**EXP_MIN
N_BINS = (EXP_MAX - EXP_MIN) << MANTISSA_BITS

KIND_LOGICLE = 0
KIND_HYPERLOG = 1


def bin_edges() -> np.ndarray:
    """Left edges of all bins plus the final right edge (float32 values, as float64)."""
    k = np.arange(K0, K0 + N_BINS + 1, dtype=np.int64)
    return (k << SHIFT).astype(np.int32).view(np.float32).astype(np.float64)


@numba.njit(cache=True, nogil=True)
def _solve_large(v, kind, p):
    """y with B(y) = v for large v (|v| >= 2**EXP_MAX): Newton from the logarithmic start.

    p = (a, b, c, d, f). Logicle: B = a e^(by) - c e^(-dy) - f. Hyperlog: B = a e^(by) + c y - f.
    """
    a, b, c, d, f = p[0], p[1], p[2], p[3], p[4]
    y = math.log((v + f) / a) / b
    for _ in range(50):
        e = a * math.exp(b * y)
        if kind == 0:
            g = c * math.exp(-d * y)
            fy = e - g - f - v
            dfy = b * e + d * g
        else:
            fy = e + c * y - f - v
            dfy = b * e + c
        step = fy / dfy
        y -= step
        if abs(step) <= 4e-16 * abs(y):
            break
    return y


@numba.njit(cache=True, nogil=True)
def table_transform(src, dst, cols, tab, xb, x1, slope0, kinds, params, scales):
    """dst[:, cols[j]] = f_j(src[:, cols[j]]) for 2-D float32 arrays (dst may be src).

    Row-major traversal: one pass over a C-contiguous event matrix whatever the number of
    transformed columns. ``tab`` (n_cols x N_BINS x 2) holds value and slope at each left edge
    ``xb`` side by side (one cache line per lookup); ``x1`` the symmetry centre, ``slope0`` the slope from zero to the first edge
    (all already multiplied by the output scale ``scales[j]``, which only the Newton branch uses).
    """
    bits = src.view(np.int32)
    n_rows = src.shape[0]
    n_cols = cols.shape[0]
    n_bins = tab.shape[1]
    for i in range(n_rows):
        for j in range(n_cols):
            c = cols[j]
            v = src[i, c]
            b = bits[i, c]
            k = ((b & 0x7FFFFFFF) >> SHIFT) - K0
            av = abs(np.float64(v))
            if k < 0:
                y = x1[j] + av * slope0[j]
            elif k < n_bins:
                y = tab[j, k, 0] + tab[j, k, 1] * (av - xb[k])
            elif math.isfinite(av):
                y = _solve_large(av, kinds[j], params[j]) * scales[j]
            else:
                y = av  # +inf stays inf (reflected below for -inf); NaN stays NaN
            if b < 0:
                y = 2.0 * x1[j] - y
            dst[i, c] = y
