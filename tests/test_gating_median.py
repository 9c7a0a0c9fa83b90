"""The fast population median equals np.median (in float64) exactly, on the cases that trip
order keys."""

from __future__ import annotations

import numpy as np
import pytest

from cytopipe.gating._median import MedianScratch, median


def _cases():
    rng = np.random.default_rng(7)
    n = 50_000
    yield "lognormal", rng.lognormal(8, 1.5, n).astype(np.float32)
    yield "compensated (negatives)", rng.normal(50, 400, n).astype(np.float32)
    yield "ties", rng.integers(-3, 4, n).astype(np.float32)
    yield "signed zeros", np.where(rng.random(n) < 0.5, -0.0, 0.0).astype(np.float32)
    v = rng.normal(0, 1, n).astype(np.float32)
    v[:100] = np.inf
    v[100:200] = -np.inf
    yield "infinities", v
    yield "one value repeated", np.full(n, 1234.5, dtype=np.float32)
    yield "tiny and huge", (rng.choice([-1, 1], n) * 10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)


@pytest.mark.parametrize("name,values", list(_cases()), ids=[c[0] for c in _cases()])
def test_median_equals_numpy_on_subsets(name, values):
    rng = np.random.default_rng(1)
    scratch = MedianScratch(len(values))
    for size in (1, 2, 3, 10, 101, 1000, 25_000, len(values)):
        for _ in range(3):
            idx = np.sort(rng.choice(len(values), size, replace=False))
            want = float(np.median(values[idx].astype(np.float64)))
            assert median(values, idx, False, scratch) == want, (name, size)


def test_median_without_scratch_nan_and_empty():
    v = np.array([3, 1, 2, 5], dtype=np.float32)
    assert median(v, np.array([0, 1, 2, 3])) == 2.5
    assert np.isnan(median(v, np.array([], dtype=np.int64)))
    v[1] = np.nan
    assert np.isnan(median(v, np.array([0, 1, 2])))
    assert median(v, np.array([0, 2, 3])) == 3.0
    assert median(v.astype(np.float64), np.array([0, 2, 3])) == 3.0
    small = MedianScratch(2)  # a subset larger than the scratch gets its own buffers
    assert median(np.arange(9, dtype=np.float32), np.arange(9), False, small) == 4.0
