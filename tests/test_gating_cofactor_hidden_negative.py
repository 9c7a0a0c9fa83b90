"""The per-file arcsinh cofactor when the negative population is no peak on the provisional scale.

A 22-bit instrument's negative is a few hundred units wide: on arcsinh(x/150) it is a plateau from
about -2 to +2 whose humps may both be too shallow to count as peaks, the upper one merged into the
flank of a bright positive population (CD127: B, NK cells and monocytes under the CD127+ T cells).
The lowest peak was then the positive one and every event below it, the whole negative included,
was read as the negative's spread: seed 5187's P003_W00 got a CD127 cofactor of 12,000 where its
cytometer's other files got 730-2,700.
"""

from __future__ import annotations

import numpy as np


def _channel(seed: int) -> np.ndarray:
    """5,000 events (as the engine estimates from): 40 % negative, N(0, 300) (compensated units),
    60 % positive, log-normal around 2,500 (sd 0.6) with the same measurement noise."""
    rng = np.random.default_rng(seed)
    negative = rng.normal(0.0, 300.0, 2000)
    positive = np.exp(rng.normal(np.log(2500.0), 0.6, 3000)) + rng.normal(0.0, 300.0, 3000)
    return np.concatenate([negative, positive])


def test_a_negative_that_is_no_peak_on_the_provisional_scale_sets_the_cofactor():
    """30 draws of one channel: every estimate within 2x of the negative's three SDs (900) and all
    within 3x of each other. Before: 12 of 30 draws read the positive peak (9,700-10,000), the
    others 530-1,400; now 530-1,400 (the hump of the split negative taken as before)."""
    from cytopipe.gating.cofactor import estimate_cofactor

    est = [estimate_cofactor(_channel(seed)) for seed in range(30)]
    assert all(450 <= c <= 1800 for c in est), sorted(est)
    assert max(est) / min(est) < 3.0, sorted(est)


def test_a_negative_found_as_a_peak_is_kept():
    """The same positives over a narrow negative (N(0, 60), an 18-bit instrument's): its own peak
    is the negative, and the estimate stays its three SDs (~180)."""
    from cytopipe.gating.cofactor import estimate_cofactor

    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        x = np.concatenate([rng.normal(0.0, 60.0, 2000), np.exp(rng.normal(np.log(2500.0), 0.6, 3000))])
        assert 120 <= estimate_cofactor(x) <= 270, seed
