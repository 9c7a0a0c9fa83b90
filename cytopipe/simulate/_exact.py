"""Small linear algebra for the simulator, in elementwise numpy: the same bits on every CPU.

BLAS and LAPACK choose their kernels by CPU (OpenBLAS's SkylakeX and Haswell ``sgemm`` kernels
accumulate in different orders), so ``a @ b`` and ``np.linalg.inv`` can differ in the last bit
from one machine to the next, and a simulated trial would not regenerate byte-identically
everywhere. Elementwise ufuncs round each element once (IEEE 754) whatever SIMD width runs
them, so products accumulated in a fixed order give the same result on every machine.
"""

from __future__ import annotations

import math

import numpy as np


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (2-D), accumulated over the inner dimension in order, in their result dtype."""
    dtype = np.result_type(a, b)
    out = np.zeros((a.shape[0], b.shape[1]), dtype=dtype)
    term = np.empty_like(out)
    for k in range(a.shape[1]):
        np.multiply(a[:, k, None], b[k][None, :], out=term, dtype=dtype)
        out += term
    return out


def inv(a: np.ndarray) -> np.ndarray:
    """Inverse of a small square matrix (float64; Gauss-Jordan with partial pivoting)."""
    a = np.array(a, dtype=np.float64)
    n = a.shape[0]
    aug = np.concatenate([a, np.eye(n)], axis=1)
    for c in range(n):
        p = c + int(np.argmax(np.abs(aug[c:, c])))
        if aug[p, c] == 0.0:
            raise np.linalg.LinAlgError("singular matrix")
        if p != c:
            aug[[c, p]] = aug[[p, c]]
        aug[c] /= aug[c, c]
        factors = aug[:, c].copy()
        factors[c] = 0.0
        aug -= np.multiply.outer(factors, aug[c])
    return aug[:, n:]


def cholesky2(cov: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a 2 x 2 covariance matrix."""
    l11 = math.sqrt(cov[0, 0])
    l21 = cov[1, 0] / l11
    return np.array([[l11, 0.0], [l21, math.sqrt(cov[1, 1] - l21 * l21)]])
