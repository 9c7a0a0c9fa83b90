"""Consensus metaclustering against a brute-force reference, and the choice of k."""

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

from cytopipe.cluster.metacluster import (
    consensus_curve,
    consensus_matrices,
    consensus_metacluster,
    cut_tree_exact,
    final_clustering,
    suggest_k,
)
from cytopipe.errors import ClusteringError


def _reference_consensus(codes, ks, reps, p_item, seed, method="average"):
    """Plain ConsensusClusterPlus loop: same resamples, explicit co-clustering counts."""
    n = len(codes)
    m = max(int(round(p_item * n)), max(ks))
    rng = np.random.default_rng(seed)
    together = {k: np.zeros((n, n)) for k in ks}
    sampled = np.zeros((n, n))
    for _ in range(reps):
        idx = np.sort(rng.choice(n, size=m, replace=False))
        z = linkage(codes[idx], method)
        sampled[np.ix_(idx, idx)] += 1
        for k in ks:
            lab = fcluster(z, k, "maxclust")  # no height ties with continuous random codes
            together[k][np.ix_(idx, idx)] += lab[:, None] == lab[None, :]
    out = {}
    for k in ks:
        c = np.where(sampled > 0, together[k] / np.maximum(sampled, 1), 0.0)
        np.fill_diagonal(c, 1.0)
        out[k] = c
    return out


def test_cut_tree_gives_exactly_k_groups_even_with_ties():
    rng = np.random.default_rng(0)
    z = linkage(rng.normal(size=(25, 3)), "average")
    cuts = cut_tree_exact(z, 25, range(1, 26))
    for k in range(2, 25):
        assert len(np.unique(cuts[k])) == k
        # same partition as scipy's maxclust when there are no ties
        ref = fcluster(z, k, "maxclust")
        assert len({(a, b) for a, b in zip(cuts[k], ref)}) == k
    # all-equal points: every merge at height 0, maxclust collapses, we still get k groups
    z0 = linkage(np.zeros((6, 2)), "average")
    assert len(np.unique(fcluster(z0, 3, "maxclust"))) == 1
    assert len(np.unique(cut_tree_exact(z0, 6, [3])[3])) == 3


@pytest.mark.parametrize("method", ["average", "complete", "ward"])
def test_consensus_matches_the_brute_force_definition(method):
    codes = np.random.default_rng(2).normal(size=(40, 4))
    ks = [2, 3, 5, 8]
    fast = consensus_matrices(codes, ks, reps=30, p_item=0.8, linkage=method, seed=5)
    ref = _reference_consensus(codes, ks, 30, 0.8, 5, method)
    for k in ks:
        np.testing.assert_allclose(fast[k], ref[k], atol=1e-12)
        assert np.allclose(fast[k], fast[k].T)


def test_metaclusters_recover_separated_groups_and_k_is_suggested():
    rng = np.random.default_rng(3)
    centers = rng.normal(scale=10, size=(5, 6))
    codes = np.concatenate([c + rng.normal(scale=0.5, size=(20, 6)) for c in centers])
    truth = np.repeat(np.arange(5), 20)
    labels, curve = consensus_metacluster(codes, k=5, seed=1)
    assert sorted(np.unique(labels)) == [1, 2, 3, 4, 5]
    assert len({(a, b) for a, b in zip(labels, truth)}) == 5  # a perfect relabelling
    assert list(curve.columns) == ["k", "cdf_area", "delta_area", "pac"]
    assert curve["k"].tolist() == list(range(2, 21))
    # consensus is crisp at the true k (PAC 0) and the elbow rule finds it
    assert curve.set_index("k").loc[5, "pac"] == 0.0
    assert suggest_k(curve) == 5
    auto, _ = consensus_metacluster(codes, k=None, seed=1)
    assert len(np.unique(auto)) == 5
    # labels are numbered by first appearance over the nodes
    assert labels[0] == 1
    # seeded
    again, curve2 = consensus_metacluster(codes, k=5, seed=1)
    assert np.array_equal(again, labels) and curve2.equals(curve)


def test_final_clustering_of_a_block_consensus():
    c = np.zeros((6, 6))
    for block in ([0, 1, 2], [3, 4], [5]):
        c[np.ix_(block, block)] = 1
    assert final_clustering(c, 3).tolist() == [1, 1, 1, 2, 2, 3]


def test_cdf_area_of_a_crisp_consensus():
    c = np.zeros((4, 4))
    c[:2, :2] = c[2:, 2:] = 1
    curve = consensus_curve({2: c})
    # 4 of 6 pairs are 0, 2 are 1: CDF is 2/3 on [0, 1)
    assert curve.loc[0, "cdf_area"] == pytest.approx(2 / 3)
    assert curve.loc[0, "pac"] == 0.0


def test_bad_arguments():
    codes = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ClusteringError, match="between 2 and 10"):
        consensus_metacluster(codes, k=11)
    with pytest.raises(ClusteringError, match="unknown linkage"):
        consensus_metacluster(codes, k=3, linkage="single")


@pytest.mark.parametrize("method", ["average", "ward", "complete"])
def test_merge_steps_equal_scipy_cophenet_of_merge_order(method):
    from scipy.cluster.hierarchy import cophenet, linkage

    from cytopipe.cluster.metacluster import _merge_steps

    rng = np.random.default_rng(3)
    for m in (2, 3, 17, 90):
        z = linkage(rng.normal(size=(m, 4)), method=method)
        ordered = z.copy()
        ordered[:, 2] = np.arange(m - 1)
        expected = cophenet(ordered).astype(np.int64)
        assert np.array_equal(_merge_steps(z[:, :2].astype(np.int64), m), expected)
