"""Consensus hierarchical metaclustering of SOM nodes (ConsensusClusterPlus-style).

As in FlowSOM's ``metaClustering_consensus`` (Monti et al. 2003; Wilkerson & Hayes 2010):

1. ``reps`` times, draw a fraction ``p_item`` of the nodes without replacement (seeded),
   cluster them hierarchically (Euclidean distances, ``linkage`` = average by default), and
   cut the tree into every k of interest;
2. the consensus of two nodes at k is the fraction of the resamples containing both in which
   they landed in the same cluster;
3. the final metaclusters at k come from a hierarchical clustering (same linkage) of
   ``1 - consensus`` cut into exactly k groups.

Choosing k: for each k the empirical CDF of the consensus values is summarised by the area
under it; the relative gain in area from k-1 to k (``delta_area``) flattens once extra clusters
stop splitting stable groups. ``PAC`` (proportion of ambiguous clustering, the share of pairs
with consensus strictly between 0.1 and 0.9; Senbabaoglu et al. 2014) is given too: lower
means crisper clusters. ``suggest_k`` applies a simple, documented rule to the curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba as nb
import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import linkage as _linkage
from scipy.spatial.distance import squareform

from cytopipe.errors import ClusteringError

LINKAGES = ("average", "ward", "complete")


@nb.njit(cache=True)
def _merge_steps(children: np.ndarray, m: int) -> np.ndarray:  # pragma: no cover - compiled
    """Condensed (i < j) array of the merge step that first joins items i and j of a linkage.

    Equals ``cophenet`` of the linkage with heights replaced by merge order, without scipy's
    per-call validation (this runs once per consensus resample).
    """
    out = np.empty(m * (m - 1) // 2, dtype=np.int64)
    head = np.empty(2 * m - 1, dtype=np.int64)  # first item of each cluster (linked lists)
    tail = np.empty(2 * m - 1, dtype=np.int64)
    nxt = np.full(m, -1, dtype=np.int64)
    for i in range(m):
        head[i] = i
        tail[i] = i
    for step in range(m - 1):
        c1, c2 = children[step, 0], children[step, 1]
        i = head[c1]
        while i != -1:
            j = head[c2]
            while j != -1:
                a, b = (i, j) if i < j else (j, i)
                out[m * a - a * (a + 1) // 2 + (b - a - 1)] = step
                j = nxt[j]
            i = nxt[i]
        nxt[tail[c1]] = head[c2]  # concatenate the two member lists
        head[m + step] = head[c1]
        tail[m + step] = tail[c2]
    return out


def cut_tree_exact(z: np.ndarray, n_items: int, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Cut a scipy linkage into exactly k groups for each k (like R's ``cutree``).

    Applies the first ``n_items - k`` merges in order, so ties in merge height never give
    fewer than k groups (``fcluster(..., 'maxclust')`` can). Labels are 0..k-1 numbered by
    first appearance in item order.
    """
    wanted = {int(k) for k in ks if 1 <= k <= n_items}
    current = np.arange(n_items, dtype=np.int64)  # cluster id (scipy numbering) of each item
    members: dict[int, np.ndarray] = {i: np.array([i]) for i in range(n_items)}
    out: dict[int, np.ndarray] = {}

    def labels_now() -> np.ndarray:
        _, first, inverse = np.unique(current, return_index=True, return_inverse=True)
        rank = np.empty(first.size, dtype=np.int64)
        rank[np.argsort(first)] = np.arange(first.size)  # number groups by first appearance
        return rank[inverse]

    if n_items in wanted:
        out[n_items] = np.arange(n_items, dtype=np.int64)
    for step in range(n_items - 1):
        new = n_items + step
        joined = np.concatenate([members.pop(int(z[step, 0])), members.pop(int(z[step, 1]))])
        members[new] = joined
        current[joined] = new
        if n_items - step - 1 in wanted:
            out[n_items - step - 1] = labels_now()
    return out


def _check(codes: np.ndarray, linkage: str) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or codes.shape[0] < 2:
        raise ClusteringError(f"need at least 2 SOM nodes to metacluster, got shape {codes.shape}")
    if linkage not in LINKAGES:
        raise ClusteringError(f"unknown linkage {linkage!r}: use one of {', '.join(LINKAGES)}")
    return codes


def consensus_matrices(
    codes: np.ndarray,
    ks: Sequence[int],
    reps: int = 100,
    p_item: float = 0.9,
    linkage: str = "average",
    seed: int = 42,
) -> dict[int, np.ndarray]:
    """Consensus matrix (nodes x nodes, values in [0, 1]) for each k in ``ks``."""
    codes = _check(codes, linkage)
    n = codes.shape[0]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 2 or ks[-1] > n:
        raise ClusteringError(f"k must be between 2 and the number of nodes ({n}), got {ks}")
    if not 0 < p_item <= 1 or reps < 1:
        raise ClusteringError(f"need 0 < p_item <= 1 and reps >= 1 (got {p_item}, {reps})")
    m = max(int(round(p_item * n)), ks[-1])
    top = ks[-1]
    n_pairs = n * (n - 1) // 2
    # hist[pair, j]: resamples in which the pair was drawn and stayed together down to
    # min(j, top) clusters; together at k  <=>  the pair merged within the first m - k merges.
    hist = np.zeros(n_pairs * (top + 1), dtype=np.int64)
    a, b = np.triu_indices(m, 1)
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        idx = np.sort(rng.choice(n, size=m, replace=False))
        z = _linkage(codes[idx], method=linkage, metric="euclidean")
        step = _merge_steps(z[:, :2].astype(np.int64), m)  # the merge step joining each pair
        last_k = np.minimum(m - 1 - step, top)  # the pair is together for every k <= last_k
        i, j = idx[a], idx[b]
        pair = n * i - i * (i + 1) // 2 + (j - i - 1)  # condensed index of (i, j), i < j
        hist += np.bincount(pair * (top + 1) + last_k, minlength=hist.size)
    hist = hist.reshape(n_pairs, top + 1)
    sampled = hist.sum(axis=1)
    together_at_least = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [:, k] = together at k
    out = {}
    for k in ks:
        cons = np.where(sampled > 0, together_at_least[:, k] / np.maximum(sampled, 1), 0.0)
        mat = squareform(cons, checks=False)
        np.fill_diagonal(mat, 1.0)
        out[k] = mat
    return out


def final_clustering(consensus: np.ndarray, k: int, linkage: str = "average") -> np.ndarray:
    """Cut a hierarchical clustering of ``1 - consensus`` into exactly ``k`` groups (1..k)."""
    d = 1.0 - np.asarray(consensus, dtype=np.float64)
    np.fill_diagonal(d, 0.0)
    d = np.clip((d + d.T) / 2.0, 0.0, 1.0)
    z = _linkage(squareform(d, checks=False), method=linkage)
    return cut_tree_exact(z, d.shape[0], [k])[k] + 1


def consensus_curve(consensus: dict[int, np.ndarray]) -> pd.DataFrame:
    """Per k: area under the consensus CDF, its relative gain (``delta_area``) and PAC."""
    rows = []
    prev_area = None
    for k in sorted(consensus):
        c = consensus[k]
        vals = np.sort(c[np.triu_indices_from(c, k=1)])
        # area under the empirical CDF between the smallest and largest consensus value
        xs, counts = np.unique(vals, return_counts=True)
        cdf = np.cumsum(counts) / vals.size
        area = float(np.sum(np.diff(xs) * cdf[:-1])) if xs.size > 1 else 0.0
        if prev_area is None:
            delta = area
        else:
            delta = (area - prev_area) / prev_area if prev_area > 0 else np.nan
        pac = float(np.mean((vals > 0.1) & (vals < 0.9)))
        rows.append({"k": k, "cdf_area": area, "delta_area": float(delta), "pac": pac})
        prev_area = area
    return pd.DataFrame(rows, columns=["k", "cdf_area", "delta_area", "pac"])


def suggest_k(curve: pd.DataFrame, min_gain: float = 0.05) -> int:
    """The elbow of the consensus CDF: the smallest k after which adding a metacluster
    raises the CDF area by less than ``min_gain`` (relative), i.e. ``delta_area(k+1) < min_gain``.

    Falls back to the largest k on the curve when the area keeps growing. Look at the curve
    (and at the heatmap) rather than trusting any single rule blindly.
    """
    c = curve.sort_values("k").reset_index(drop=True)
    for i in range(len(c) - 1):
        nxt = c.loc[i + 1, "delta_area"]
        if np.isfinite(nxt) and nxt < min_gain:
            return int(c.loc[i, "k"])
    return int(c["k"].iloc[-1])


def consensus_metacluster(
    codes: np.ndarray,
    k: int | None = 10,
    k_max: int | None = None,
    reps: int = 100,
    p_item: float = 0.9,
    linkage: str = "average",
    seed: int = 42,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Metacluster SOM node codes; returns (labels 1..k per node, consensus curve).

    ``k=None`` picks k with :func:`suggest_k` on the curve for 2..k_max (default 20). The curve
    always spans ``2..max(k, k_max)`` so it can be shown next to the chosen k.
    """
    codes = _check(codes, linkage)
    n = codes.shape[0]
    top = k_max if k_max is not None else (max(k, 20) if k is not None else 20)
    top = min(max(top, k or 2), n)
    if k is not None and not 2 <= k <= n:
        raise ClusteringError(f"number of metaclusters must be between 2 and {n} (the SOM nodes), got {k}")
    cons = consensus_matrices(codes, range(2, top + 1), reps=reps, p_item=p_item, linkage=linkage, seed=seed)
    curve = consensus_curve(cons)
    if k is None:
        k = suggest_k(curve)
    return final_clustering(cons[k], k, linkage=linkage), curve
