"""Response-rate comparisons between two arms (the Wilson and Newcombe intervals: cytopipe.intervals)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from cytopipe.intervals import newcombe_interval


@dataclass(frozen=True)
class RateComparison:
    """Result of :func:`compare_rates` (arm 1 vs arm 0)."""

    x1: int
    n1: int
    x0: int
    n0: int
    rate1: float
    rate0: float
    risk_difference: float
    ci_low: float
    ci_high: float
    statistic: float
    p: float
    method: str
    note: str = ""


def compare_rates(
    x1: int, n1: int, x0: int, n0: int, method: str = "chi2", alpha: float = 0.05
) -> RateComparison:
    """Compare two response rates, x1/n1 (e.g. an IL-2 arm) vs x0/n0 (placebo).

    ``method="chi2"``: Pearson chi-square on the 2x2 table **without** continuity correction
    (statistic = chi-square, 1 df). ``method="fisher"``: two-sided Fisher exact test (statistic =
    odds ratio). The estimate is the risk difference rate1 - rate0 with Newcombe's hybrid-score CI.
    He et al. 2020 (SRI-4, 16/29 vs 9/30 at week 12): chi2 p = 0.050, Fisher p = 0.067.
    """
    if method not in ("chi2", "fisher"):
        raise ValueError(f"method must be 'chi2' or 'fisher', not {method!r}")
    x1, n1, x0, n0 = int(x1), int(n1), int(x0), int(n0)
    if not (0 <= x1 <= n1 and 0 <= x0 <= n0):
        raise ValueError(f"counts must satisfy 0 <= x <= n, got {x1}/{n1} and {x0}/{n0}")
    label = (
        "Pearson chi-square (no continuity correction)" if method == "chi2" else "Fisher exact (two-sided)"
    )
    if n1 == 0 or n0 == 0:
        return RateComparison(
            x1,
            n1,
            x0,
            n0,
            np.nan,
            np.nan,
            np.nan,
            np.nan,
            np.nan,
            np.nan,
            np.nan,
            label,
            note="an arm has no evaluable patients",
        )
    r1, r0 = x1 / n1, x0 / n0
    lo, hi = newcombe_interval(x1, n1, x0, n0, alpha)
    table = np.array([[x1, n1 - x1], [x0, n0 - x0]])
    note = ""
    if method == "fisher":
        res = sps.fisher_exact(table, alternative="two-sided")
        stat, p = float(res.statistic), float(res.pvalue)
    elif (x1 + x0) in (0, n1 + n0):
        stat, p = np.nan, np.nan
        note = "all patients are responders, or none is: the chi-square test is undefined"
    else:
        chi2, p, _, expected = sps.chi2_contingency(table, correction=False)
        stat, p = float(chi2), float(p)
        if expected.min() < 5:
            note = f"smallest expected count {expected.min():.1f} < 5: consider method='fisher'"
    return RateComparison(x1, n1, x0, n0, r1, r0, r1 - r0, float(lo), float(hi), stat, p, label, note)
