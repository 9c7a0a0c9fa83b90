"""Density peaks, shared by the data-driven gates (:mod:`cytopipe.gating.fitters`) and the report's
outlier rule (:mod:`cytopipe.report.outliers`).

A module of its own, outside the gating package, so that the report can find peaks without
importing the gating engine (and numba with it: ~0.2 s of CPU per ``cytopipe report``).
"""

from __future__ import annotations

import numpy as np


def find_peaks(dens: np.ndarray, min_peak: float) -> np.ndarray:
    """Indices of density peaks whose prominence is >= ``min_peak`` x the tallest peak."""
    from scipy.signal import find_peaks as _fp

    padded = np.concatenate([[0.0], dens, [0.0]])  # a peak at the edge still counts
    idx, _ = _fp(padded, prominence=min_peak * dens.max())
    return idx - 1
