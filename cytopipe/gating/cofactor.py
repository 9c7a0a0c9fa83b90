"""One channel's arcsinh cofactor from its negative population (see :mod:`cytopipe.gating.scale`).

Used per file by the engine (``cofactor: auto``) and per study by :mod:`~cytopipe.gating.scale`,
which builds on the engine: this estimate sits below both.
"""

from __future__ import annotations

import numpy as np

from cytopipe.gating.fitters import FitFailure

COFACTOR_K = 3.0  # cofactor = 3 robust SDs of the negative: the negative stays on the linear part
MIN_COFACTOR = 5.0  # mass cytometry's usual cofactor: nothing smaller makes sense


def estimate_cofactor(x: np.ndarray, default: float = 150.0, k: float = COFACTOR_K) -> float:
    """Arcsinh cofactor of one channel (compensated linear values); ``default`` when the channel has
    no usable negative population (e.g. mass-cytometry counts piled up at zero)."""
    from cytopipe.gating.landmarks import find_landmarks

    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 200:
        return float(default)
    try:
        lm = find_landmarks(np.arcsinh(x / 150.0), 0.05)
    except FitFailure:
        return float(default)
    mode = 150.0 * np.sinh(lm.negative.position)
    below = mode - x[x < mode]
    if len(below) < 50:
        return float(default)
    sd = float(np.median(below)) / 0.6745
    if not np.isfinite(sd) or sd <= 0:
        return float(default)
    # two significant digits: a cofactor is a scale choice, not a measurement (and a round number
    # keeps exported Gating-ML transforms exact)
    return float(f"{max(MIN_COFACTOR, k * sd):.2g}")
