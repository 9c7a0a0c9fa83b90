"""Rank tests: Mann-Whitney U with a Hodges-Lehmann shift, Jonckheere-Terpstra, Spearman with a CI.

Small and exact on purpose: the Mann-Whitney U and Jonckheere-Terpstra exact null distributions
are both the distribution of "pairs in increasing order" over all arrangements of the pooled
sample, i.e. the coefficients of a q-multinomial coefficient, computed here in exact integer
arithmetic (and cached by group sizes). The Mann-Whitney p-values reproduce
``scipy.stats.mannwhitneyu`` (``method='auto'``, continuity correction) to float precision; ours
is used because it is several times faster per call (no input-validation layers), which matters
for 200-replicate null simulations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as sps

#: the note of an exact test asked for on tied data, which gets the normal approximation instead
TIES_NOTE = (
    "exact null distribution requested, but the data have ties: normal approximation with tie correction"
)


# ------------------------------------------------------------------------------------------------
# exact null distribution (no ties)
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _order_counts(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Number of arrangements of groups of these sizes with J = 0, 1, ..., D ordered pairs.

    The generating function is the q-multinomial coefficient
    [N]_q! / prod_g [n_g]_q! = prod_{i=n_max+1..N} (1-q^i) / prod_{g != max} prod_{i=1..n_g} (1-q^i),
    evaluated as a power series truncated at degree D = sum_{g<h} n_g n_h (exact: Python ints).
    """
    sizes = tuple(sorted(int(n) for n in sizes if n > 0))
    total = sum(sizes)
    degree = (total * total - sum(n * n for n in sizes)) // 2
    poly = np.zeros(degree + 1, dtype=object)
    poly[:] = 0
    poly[0] = 1
    for n in sizes[:-1]:  # divide by (1 - q^b): b[j] = a[j] + b[j-b], one cumulative sum per residue class
        for b in range(1, n + 1):
            if b > degree:
                break
            for r in range(b):
                poly[r::b] = np.cumsum(poly[r::b])
    for a in range(sizes[-1] + 1, total + 1):  # multiply by (1 - q^a)
        if a > degree:
            break
        poly[a:] = poly[a:] - poly[:-a]
    return tuple(int(c) for c in poly)


def _exact_tail(sizes: tuple[int, ...], j: float, upper: bool) -> float:
    """P(J >= j) (upper) or P(J <= j) under H0 without ties."""
    counts = _order_counts(tuple(sorted(sizes)))
    total = sum(counts)
    k = int(np.ceil(j - 1e-9)) if upper else int(np.floor(j + 1e-9))
    k = min(max(k, 0), len(counts)) if upper else min(max(k, -1), len(counts) - 1)
    tail = sum(counts[k:]) if upper else sum(counts[: k + 1])
    return tail / total


# ------------------------------------------------------------------------------------------------
# Mann-Whitney U and Hodges-Lehmann
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MannWhitneyResult:
    statistic: float  # U of x: #(x > y) + 0.5 #(x == y)
    p: float  # two-sided
    estimate: float  # Hodges-Lehmann shift, median of x_i - y_j
    ci_low: float
    ci_high: float
    n_x: int
    n_y: int
    method: str
    note: str = ""


def mann_whitney(x, y, alpha: float = 0.05, method: str = "auto") -> MannWhitneyResult:
    """Two-sided Mann-Whitney U test of x vs y with the Hodges-Lehmann shift (x - y) and its CI.

    NaNs are removed. ``method``: "auto" (exact when min(n) <= 8 and no ties, as scipy), "exact"
    (no ties only) or "asymptotic" (normal approximation with tie correction and continuity
    correction). CI: Moses' distribution-free interval, order statistics of the n_x*n_y pairwise
    differences at the normal-approximation critical value. All values identical -> p NaN.
    """
    x = _clean(x)
    y = _clean(y)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return MannWhitneyResult(
            np.nan, np.nan, np.nan, np.nan, np.nan, n1, n2, "Mann-Whitney U", "empty group"
        )
    xy = np.concatenate([x, y])
    ranks, tie_counts = _midranks(xy)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    has_ties = bool((tie_counts > 1).any())
    est, lo, hi = hodges_lehmann(x, y, alpha)
    if len(tie_counts) == 1:
        return MannWhitneyResult(
            u1, np.nan, est, lo, hi, n1, n2, "Mann-Whitney U", "all values identical: no rank test possible"
        )
    if method == "auto":  # scipy's rule
        method = "asymptotic" if (n1 > 8 and n2 > 8) or has_ties else "exact"
    u = max(u1, n1 * n2 - u1)
    note = ""
    if method == "exact" and has_ties:  # tied values (rounded %, zero counts): no exact null
        method, note = "asymptotic", TIES_NOTE
    if method == "exact":
        p = 2 * _exact_tail((n1, n2), u, upper=True)
        label = "Mann-Whitney U (exact)"
    else:
        n = n1 + n2
        tie_term = float(np.sum(tie_counts.astype(float) ** 3 - tie_counts))
        sd = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
        z = (u - n1 * n2 / 2 - 0.5) / sd
        p = 2 * float(special.ndtr(-z))
        label = "Mann-Whitney U (normal approx., tie- and continuity-corrected)"
    return MannWhitneyResult(u1, float(min(p, 1.0)), est, lo, hi, n1, n2, label, note)


def hodges_lehmann(x, y, alpha: float = 0.05) -> tuple[float, float, float]:
    """Hodges-Lehmann shift (median of all x_i - y_j) and Moses' (1 - alpha) CI."""
    x = _clean(x)
    y = _clean(y)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return np.nan, np.nan, np.nan
    diffs = np.sort((x[:, None] - y[None, :]).ravel())
    est = float(np.median(diffs))
    z = float(special.ndtri(1 - alpha / 2))
    c = int(np.floor(n1 * n2 / 2 - z * np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)))
    if c < 1:
        return est, np.nan, np.nan
    return est, float(diffs[c - 1]), float(diffs[n1 * n2 - c])


# ------------------------------------------------------------------------------------------------
# Jonckheere-Terpstra
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JonckheereResult:
    statistic: float  # J = sum over ordered group pairs g < h of #(x_g < x_h) + 0.5 #(x_g == x_h)
    mean: float
    variance: float  # tie-corrected null variance
    z: float
    p: float
    tau: float  # 2 J / M - 1 in [-1, 1], M = number of between-group pairs; > 0 = increasing
    sizes: tuple[int, ...]
    method: str
    note: str = ""


def jonckheere_terpstra(
    groups: Sequence,
    alternative: str = "two-sided",
    method: str = "auto",
    n_permutations: int = 10000,
    seed: int = 0,
    exact_max_n: int = 100,
) -> JonckheereResult:
    """Jonckheere-Terpstra test for an ordered alternative across ``groups`` (in dose order).

    ``alternative``: "two-sided", "increasing" or "decreasing". ``method``: "auto" (exact when there
    are no ties and N <= ``exact_max_n``, else normal approximation), "exact", "asymptotic" (normal
    approximation with the tie-corrected variance of Hollander & Wolfe, no continuity correction)
    or "permutation" (Monte Carlo over ``n_permutations`` relabellings with ``seed``; p = (1 + #
    as extreme) / (1 + n_permutations)). NaNs are removed; empty groups are an error.
    """
    if alternative not in ("two-sided", "increasing", "decreasing"):
        raise ValueError(
            f"alternative must be 'two-sided', 'increasing' or 'decreasing', not {alternative!r}"
        )
    data = [_clean(g) for g in groups]
    sizes = tuple(len(g) for g in data)
    if len(data) < 2 or min(sizes) == 0:
        raise ValueError(f"need at least two non-empty groups, got sizes {sizes}")
    values = np.concatenate(data)
    labels = np.repeat(np.arange(len(data)), sizes)
    n = len(values)
    j = _jt_statistic(values, labels)
    nn = np.asarray(sizes, dtype=float)
    pairs = float((n * n - np.sum(nn * nn)) / 2)
    mean = pairs / 2
    _, t = np.unique(values, return_counts=True)
    t = t.astype(float)
    has_ties = bool((t > 1).any())
    var = (
        (n * (n - 1) * (2 * n + 5) - np.sum(nn * (nn - 1) * (2 * nn + 5)) - np.sum(t * (t - 1) * (2 * t + 5)))
        / 72
        + np.sum(nn * (nn - 1) * (nn - 2)) * np.sum(t * (t - 1) * (t - 2)) / (36 * n * (n - 1) * (n - 2))
        + np.sum(nn * (nn - 1)) * np.sum(t * (t - 1)) / (8 * n * (n - 1))
    )
    tau = 2 * j / pairs - 1
    if len(t) == 1:
        return JonckheereResult(
            j, mean, 0.0, np.nan, np.nan, tau, sizes, "Jonckheere-Terpstra", "all values identical"
        )
    z = (j - mean) / np.sqrt(var)
    if method == "auto":
        method = "exact" if (not has_ties and n <= exact_max_n) else "asymptotic"
    note = ""
    if method == "exact" and has_ties:  # tied values (rounded %, zero counts): no exact null
        method, note = "asymptotic", TIES_NOTE
    if method == "exact":
        upper = _exact_tail(sizes, j, upper=True)
        lower = _exact_tail(sizes, j, upper=False)
        p = {"increasing": upper, "decreasing": lower, "two-sided": min(1.0, 2 * min(upper, lower))}[
            alternative
        ]
        label = "Jonckheere-Terpstra (exact)"
    elif method == "asymptotic":
        p = {
            "increasing": float(special.ndtr(-z)),
            "decreasing": float(special.ndtr(z)),
            "two-sided": float(2 * special.ndtr(-abs(z))),
        }[alternative]
        label = "Jonckheere-Terpstra (normal approx., tie-corrected variance)"
    elif method == "permutation":
        rng = np.random.default_rng(seed)
        perm_j = np.empty(n_permutations)
        for start in range(0, n_permutations, 256):
            stop = min(start + 256, n_permutations)
            batch = np.stack([rng.permutation(labels) for _ in range(stop - start)])
            perm_j[start:stop] = _jt_batch(values, batch)
        tol = 1e-9
        if alternative == "increasing":
            extreme = np.sum(perm_j >= j - tol)
        elif alternative == "decreasing":
            extreme = np.sum(perm_j <= j + tol)
        else:
            extreme = np.sum(np.abs(perm_j - mean) >= abs(j - mean) - tol)
        p = float((1 + extreme) / (1 + n_permutations))
        label = f"Jonckheere-Terpstra (permutation, {n_permutations} draws, seed {seed})"
    else:
        raise ValueError(f"method must be 'auto', 'exact', 'asymptotic' or 'permutation', not {method!r}")
    return JonckheereResult(j, mean, float(var), float(z), float(p), float(tau), sizes, label, note)


def _jt_statistic(values: np.ndarray, labels: np.ndarray) -> float:
    less = values[:, None] < values[None, :]
    equal = values[:, None] == values[None, :]
    ordered = labels[:, None] < labels[None, :]
    return float(np.sum(less & ordered) + 0.5 * np.sum(equal & ordered))


def _jt_batch(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    score = (values[:, None] < values[None, :]).astype(float) + 0.5 * (values[:, None] == values[None, :])
    ordered = labels[:, :, None] < labels[:, None, :]
    return np.einsum("pab,ab->p", ordered, score)


# ------------------------------------------------------------------------------------------------
# Spearman
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpearmanResult:
    rho: float
    p: float
    ci_low: float
    ci_high: float
    n: int
    method: str
    note: str = ""


def spearman(x, y, alpha: float = 0.05, min_n: int = 5) -> SpearmanResult:
    """Spearman rank correlation on pairs where both values are present.

    p: scipy's t approximation (n - 2 df). CI: Fisher z with the Fieller-Hartley-Pearson standard
    error sqrt(1.06 / (n - 3)). Fewer than ``min_n`` pairs or a constant variable -> p NaN.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(len(x))
    label = "Spearman rank correlation (t approx.; Fisher-z CI)"
    if n < max(min_n, 4):
        return SpearmanResult(
            np.nan, np.nan, np.nan, np.nan, n, label, f"only {n} complete pairs (< {max(min_n, 4)})"
        )
    if np.all(x == x[0]) or np.all(y == y[0]):
        return SpearmanResult(
            np.nan, np.nan, np.nan, np.nan, n, label, "a variable is constant: no correlation defined"
        )
    res = sps.spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
    zc = sps.norm.ppf(1 - alpha / 2)
    fz = np.arctanh(np.clip(rho, -1 + 1e-12, 1 - 1e-12))
    se = np.sqrt(1.06 / (n - 3))
    return SpearmanResult(rho, p, float(np.tanh(fz - zc * se)), float(np.tanh(fz + zc * se)), n, label)


def _midranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) and the sizes of the tie groups."""
    order = np.argsort(values, kind="mergesort")
    v = values[order]
    new = np.concatenate([[True], v[1:] != v[:-1]])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(v)))
    avg = starts + (counts + 1) / 2.0  # mean of 1-based ranks start+1 .. start+count
    ranks = np.empty(len(v))
    ranks[order] = np.repeat(avg, counts)
    return ranks, counts


def _clean(values) -> np.ndarray:
    a = np.asarray(values, dtype=float).ravel()
    return a[np.isfinite(a)]
