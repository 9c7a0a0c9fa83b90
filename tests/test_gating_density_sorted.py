"""The density and the landmarks read off one sort of the parent's values give numpy's numbers:
the same ``np.quantile`` range, the same ``np.histogram`` counts (values on a bin edge included),
the same per-peak ``np.median`` half-widths and masses as the straightforward code below, which
is what cytopipe ran before (so every fitted gate stays where it was)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import find_peaks, peak_prominences

from cytopipe.gating.fitters import density
from cytopipe.gating.landmarks import _merge_shallow, find_landmarks
from tests.test_gating_quantile import _cases as quantile_cases


def _reference_density(x, bandwidth=None, bins=512):
    lo, q25, q75, hi = np.quantile(x, [0.001, 0.25, 0.75, 0.999])
    pad = 0.1 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    counts = np.histogram(x, bins=bins, range=(lo, hi))[0].astype(np.float64)
    width = (hi - lo) / bins
    if bandwidth is None:
        s = min(np.std(x), (q75 - q25) / 1.349) or np.std(x) or width
        bandwidth = 0.9 * s * min(len(x), 20_000) ** (-0.2)
    sigma = max(bandwidth / width, 1.0)
    half = min(int(math.ceil(4 * sigma)), (bins - 1) // 2)
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return lo + (np.arange(bins) + 0.5) * width, np.convolve(counts, k / k.sum(), mode="same"), counts


def _half_sd(d):
    d = d[d >= 0]
    return float(np.median(d)) / 0.6745 if len(d) >= 3 else float("nan")


def _reference_peaks(x, min_peak=0.05):
    """(index, position, height, prominence, sd_left, sd_right, mass) of every peak, masks and
    medians over the unsorted values."""
    centers, dens, _ = _reference_density(x)
    padded = np.concatenate([[0.0], dens, [0.0]])
    idx = find_peaks(padded, prominence=min_peak * dens.max())[0] - 1
    idx = _merge_shallow(idx, dens, 0.8)
    proms = peak_prominences(padded, idx + 1)[0]
    out = []
    for i, prom in zip(idx, proms):
        mode = float(centers[i])
        lo_b = (
            centers[0] if i == idx[0] else centers[idx[idx < i][-1] + np.argmin(dens[idx[idx < i][-1] : i])]
        )
        hi_b = centers[-1] if i == idx[-1] else centers[i + np.argmin(dens[i : idx[idx > i][0]])]
        left = mode - x[(x < mode) & (x >= lo_b)]
        right = x[(x > mode) & (x <= hi_b)] - mode
        out.append(
            (
                int(i),
                mode,
                float(dens[i]),
                float(prom),
                _half_sd(left),
                _half_sd(right),
                len(left) + len(right),
            )
        )
    return out


def _cases():
    """The quantiles' cases (order keys' traps) that have a finite range, in float32 and float64,
    and values sitting exactly on bin edges."""
    for name, x in quantile_cases():
        if np.isfinite(x).all() and np.ptp(x) > 0:
            yield name, x
            yield name + " (float64)", x.astype(np.float64)
    rng = np.random.default_rng(5)
    # integers 0..10: range -1..11 after the pad, so 2, 5 and 8 are bin edges (k * 12/512 = 3)
    yield "values on bin edges", rng.integers(0, 11, 20_000).astype(np.float32)
    three = [rng.normal(0.2, 0.25, 12_000), rng.normal(2.5, 0.4, 6_000), rng.normal(4.5, 0.3, 2_000)]
    yield "three populations (arcsinh)", np.concatenate(three).astype(np.float32)
    yield "small float64 (cofactor estimate)", np.arcsinh(rng.normal(30, 200, 5_000) / 150.0)


@pytest.mark.parametrize("name,x", list(_cases()), ids=[c[0] for c in _cases()])
def test_density_and_landmarks_equal_the_straightforward_numbers(name, x):
    with np.errstate(over="ignore"):  # "tiny and huge": np.std overflows float32 the same way
        centers, dens = density(x)
        want_centers, want_dens, counts = _reference_density(x)
    assert centers.tobytes() == want_centers.tobytes(), name
    assert dens.tobytes() == want_dens.tobytes(), name
    assert counts.sum() > 0.99 * len(x)  # the range holds the values (not an empty comparison)
    for min_peak in (0.05, 0.01, 0.003):
        with np.errstate(over="ignore"):
            lm = find_landmarks(x, min_peak)
        got = [(p.index, p.position, p.height, p.prominence, p.sd_left, p.sd_right, p.mass) for p in lm.peaks]
        with np.errstate(over="ignore"):
            want = _reference_peaks(x, min_peak)
        # find_landmarks drops noise peaks afterwards; every peak it keeps is the reference's
        assert got, name
        for g in got:
            match = [w for w in want if w[0] == g[0]]
            assert len(match) == 1, (name, g)
            assert np.array_equal(
                np.array(g, dtype=float), np.array(match[0], dtype=float), equal_nan=True
            ), (
                name,
                g,
                match[0],
            )


def test_random_parents_equal_the_straightforward_numbers():
    rng = np.random.default_rng(17)
    checked = 0
    for _ in range(60):
        parts = [
            rng.normal(rng.uniform(-1, 5), rng.uniform(0.05, 1.0), int(rng.integers(200, 8_000)))
            for _ in range(int(rng.integers(1, 4)))
        ]
        x = np.concatenate(parts).astype(rng.choice([np.float32, np.float64]))
        x = x.round(int(rng.integers(1, 6)))  # ties, and values on bin edges now and then
        rng.shuffle(x)
        want = _reference_peaks(x, 0.01)
        got = find_landmarks(x, 0.01)
        for p in got.peaks:
            w = next(w for w in want if w[0] == p.index)
            g = (p.index, p.position, p.height, p.prominence, p.sd_left, p.sd_right, p.mass)
            assert np.array_equal(np.array(g, dtype=float), np.array(w, dtype=float), equal_nan=True), (g, w)
            checked += 1
    assert checked >= 100


def test_nan_is_refused_as_before():
    x = np.random.default_rng(0).normal(0, 1, 10_000).astype(np.float32)
    x[3] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        np.histogram(x, bins=512, range=tuple(np.quantile(x, [0.001, 0.999])))
    with pytest.raises(ValueError, match="not finite"):
        density(x)
