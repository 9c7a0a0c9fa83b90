"""cytopipe.peaks gives SciPy's peaks, bases and prominences exactly (it replaced
``scipy.signal.find_peaks`` / ``peak_prominences`` in the gating engine so that a Dask worker does
not import scipy.signal), and the chi-square quantile used by ellipse gates is scipy.stats'."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal, stats

from cytopipe.gating.fitters import chi2_quantile
from cytopipe.peaks import find_peaks, local_maxima, peak_prominences, prominent_peaks


def _arrays(seed: int, count: int):
    """Noise, flat tops (small integers), rounded smooth curves (ties at peaks and bases),
    zero-padded densities, and arrays of 0-2 values."""
    rng = np.random.default_rng(seed)
    for t in range(count):
        n = int(rng.integers(0, 90))
        kind = t % 5
        if kind == 0:
            yield rng.normal(size=n)
        elif kind == 1:
            yield rng.integers(0, 4, size=n).astype(float)
        elif kind == 2:
            yield np.round(np.convolve(rng.random(n + 10), np.ones(5), "same")[:n], 1)
        elif kind == 3:
            yield np.concatenate([[0.0], rng.integers(0, 3, size=n).astype(float), [0.0]])
        else:
            yield np.concatenate([[0.0], np.abs(rng.normal(size=n)) ** 3, [0.0]])


def test_local_maxima_and_prominences_equal_scipys():
    checked = 0
    for x in _arrays(11, 6000):
        expected = signal.find_peaks(x)[0]
        got = local_maxima(x)
        np.testing.assert_array_equal(got, expected)
        if len(expected):
            for ours, theirs in zip(peak_prominences(x, expected), signal.peak_prominences(x, expected)):
                np.testing.assert_array_equal(ours, theirs)
            checked += 1
    assert checked > 3000


@pytest.mark.parametrize("level", [0.0, 0.05, 0.2, 0.6])
def test_peaks_by_prominence_equal_scipys(level):
    for x in _arrays(12, 2000):
        if not len(x):
            continue
        p = level * float(np.max(np.abs(x)))
        np.testing.assert_array_equal(prominent_peaks(x, p), signal.find_peaks(x, prominence=p)[0])


def test_density_peaks_at_the_edges_count():
    """A density whose tallest value is its first bin: find_peaks pads it so that peak counts."""
    dens = np.exp(-0.5 * (np.linspace(0, 6, 200) ** 2)) + 0.5 * np.exp(
        -0.5 * ((np.linspace(0, 6, 200) - 4) / 0.3) ** 2
    )
    np.testing.assert_array_equal(find_peaks(dens, 0.05), [0, 133])
    padded = np.concatenate([[0.0], dens, [0.0]])
    np.testing.assert_array_equal(find_peaks(dens, 0.05), signal.find_peaks(padded, prominence=0.05)[0] - 1)


def test_chi2_quantile_is_scipy_stats():
    for df in (1, 2, 3):
        for p in (0.5, 0.9, 0.95, 0.99, 0.999, 0.999999):
            assert chi2_quantile(p, df) == float(stats.chi2.ppf(p, df=df))
