"""One channel's arcsinh cofactor from its negative population (see :mod:`cytopipe.gating.scale`).

Used per file by the engine (``cofactor: auto``) and per study by :mod:`~cytopipe.gating.scale`,
which builds on the engine: this estimate sits below both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cytopipe.gating.fitters import FitFailure

if TYPE_CHECKING:
    from cytopipe.gating.landmarks import Landmarks, Peak

COFACTOR_K = 3.0  # cofactor = 3 robust SDs of the negative: the negative stays on the linear part
MIN_COFACTOR = 5.0  # mass cytometry's usual cofactor: nothing smaller makes sense
#: a hump whose density per linear unit does not fall below this x its own on the way to the next
#: peak is one side of a population the provisional scale split, not a population of its own
SPLIT_DEPTH = 0.8  # as find_landmarks merges neighbouring peaks without a real dip


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
    mode = 150.0 * np.sinh(_negative(lm).position)
    below = mode - x[x < mode]
    if len(below) < 50:
        return float(default)
    sd = float(np.median(below)) / 0.6745
    if not np.isfinite(sd) or sd <= 0:
        return float(default)
    # two significant digits: a cofactor is a scale choice, not a measurement (and a round number
    # keeps exported Gating-ML transforms exact)
    return float(f"{max(MIN_COFACTOR, k * sd):.2g}")


def _negative(lm: Landmarks) -> Peak:
    """The negative population's peak on the provisional arcsinh/150 scale: the lowest peak a
    tenth as tall as the main one (``Landmarks.negative``) that is a population of its own.

    A negative population much wider than 150 units (a 22-bit instrument's) has its density on
    arcsinh/150 split at zero into two humps, the one below zero often just tall and prominent
    enough to count as a peak: then whether it is "the negative" depends on the subsample's noise
    (the estimate jumped 2-3 fold between subsamples of one file). Divided by the transform's slope
    (``cosh``) the density is per linear unit, where such a hump is no peak: it keeps rising (no
    dip below ``SPLIT_DEPTH`` x its own height) to the next peak, which is taken instead.
    """
    per_unit = lm.dens / np.cosh(lm.centers)
    top = lm.main.height
    tall = [p for p in lm.peaks if p.height >= 0.1 * top]
    for p in tall[:-1]:
        nxt = next(q for q in lm.peaks if q.position > p.position)
        if per_unit[p.index : nxt.index + 1].min() <= SPLIT_DEPTH * per_unit[p.index]:
            return p
    return tall[-1]
