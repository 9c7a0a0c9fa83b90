"""The fast quantiles (density ranges of the data-driven fits, gate-review axes) equal
np.quantile bit for bit, on the cases that trip order keys."""

from __future__ import annotations

import numpy as np
import pytest

from cytopipe.gating._quantile import quantile_like_numpy
from tests.test_gating_median import _cases as median_cases

QUANTILE_SETS = [
    (0.001, 0.25, 0.75, 0.999),
    (0.005, 0.995),
    (0.0, 1.0),
    (0.5,),
    (0.1, 0.1, 0.9),
    (1e-9, 1 - 1e-9),
]


def _cases():
    """The median's cases (order keys' traps), then the quantiles' own."""
    yield from median_cases()
    rng = np.random.default_rng(11)
    n = 30_000
    yield (
        "two peaks (arcsinh)",
        np.concatenate([rng.normal(0, 0.3, n // 2), rng.normal(4, 1, n // 2)]).astype(np.float32),
    )
    w = rng.normal(0, 1, n).astype(np.float32)
    w[5] = np.nan
    yield "a NaN", w
    yield "strided", rng.normal(0, 1, 10 * n).astype(np.float32)[::10]
    yield "odd size", rng.normal(0, 1, 8193).astype(np.float32)
    yield "large", rng.lognormal(2, 1, 100_001).astype(np.float32)
    yield "small (numpy's own)", rng.normal(0, 1, 100).astype(np.float32)


@pytest.mark.parametrize("name,values", list(_cases()), ids=[c[0] for c in _cases()])
def test_quantiles_equal_numpy_bit_for_bit(name, values):
    for q in QUANTILE_SETS:
        with np.errstate(invalid="ignore"):  # infinities: numpy's interpolation warns the same
            want = np.quantile(values, q)
            got = quantile_like_numpy(values, q)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), (name, q, got, want)


def test_quantiles_of_random_arrays_equal_numpy():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(8192, 40_000))
        x = (
            (rng.normal(0, 1, n) * rng.choice([1e-3, 1.0, 1e4]))
            .round(int(rng.integers(0, 4)))
            .astype(np.float32)
        )
        q = np.sort(rng.random(int(rng.integers(1, 5))))
        assert quantile_like_numpy(x, q).tobytes() == np.quantile(x, q).tobytes()
