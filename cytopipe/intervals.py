"""Binomial-proportion intervals shared by QC, clinical endpoints and statistics.

One implementation, low in the layers so that ``qc`` (per-sample frequencies) and ``stats``
(arm-level rates) use the same arithmetic; both are tested against statsmodels
(``proportion_confint(method="wilson")`` and ``confint_proportions_2indep(method="newcomb")``).
Ours is kept because it is vectorised over whole ``population_stats`` tables and returns NaN,
not an error or a warning, where a proportion is undefined (``n == 0``, a count above ``n``).
"""

from __future__ import annotations

import numpy as np


def wilson_interval(count, n, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for ``count`` successes out of ``n`` (vectorised; proportions 0-1).

    ``n == 0``, a negative or non-finite count, or a count above ``n`` give NaN. Unlike the Wald
    interval it stays inside [0, 1] and keeps its coverage for rare populations.
    """
    from scipy.stats import norm  # here: importing scipy.stats costs ~1.5 s, and qc imports this module

    x = np.asarray(count, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = float(norm.ppf(1 - alpha / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = x / n
        denom = 1 + z * z / n
        center = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        # the interval contains p (it does exactly; rounding can put an end 1 ulp past p = 0 or 1,
        # which a figure's error bar would then refuse as negative)
        low = np.clip(np.minimum(center - half, p), 0.0, 1.0)
        high = np.clip(np.maximum(center + half, p), 0.0, 1.0)
    bad = ~(n > 0) | ~np.isfinite(x) | (x < 0) | (x > n)
    return np.where(bad, np.nan, low), np.where(bad, np.nan, high)


def newcombe_interval(x1: int, n1: int, x0: int, n0: int, alpha: float = 0.05) -> tuple[float, float]:
    """CI of the risk difference p1 - p0 by Newcombe's hybrid score method (Newcombe 1998, method 10),
    built from the two Wilson intervals."""
    if n1 <= 0 or n0 <= 0:
        return np.nan, np.nan
    p1, p0 = x1 / n1, x0 / n0
    l1, u1 = (float(v) for v in wilson_interval(x1, n1, alpha))
    l0, u0 = (float(v) for v in wilson_interval(x0, n0, alpha))
    d = p1 - p0
    return d - np.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2), d + np.sqrt((u1 - p1) ** 2 + (p0 - l0) ** 2)
