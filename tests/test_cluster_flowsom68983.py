"""FlowSOM's own benchmark set (68983.fcs, mouse, manual labels in gatingResult.csv).

Preprocessing as FlowSOM's vignette: compensate with the file's SPILL, logicle on the
fluorescence channels, cluster CD8, TCRyd, TCRb, NK1.1, CD4, CD19, CD3 (scaled), 10x10 grid,
10 metaclusters. Agreement is the mean over the 6 labelled populations of the best single
metacluster's F1, events labelled "Unlabeled" excluded (Weber & Robinson 2016 style).

Floors (side-by-side numbers from bench/cluster.py, identical z-scored input, seeds 1-20):
FlowSOM_Python 0.2.2 reached a mean best-F1 of 0.915 (min 0.808) and a mean ARI of 0.963;
cytopipe 0.934 (min 0.860) and 0.982. Both swing with the seed (0.83-0.97), mainly through
whether the small NK (312 cells) and NKT (535) populations get their own metacluster and
whether a large population is split in two (the union then still matches it). This test
scales inside cytopipe (scale=True), where seeds 1-10 give a mean of 0.936 (min 0.855) and a
mean ARI of 0.986 (min 0.95). So we assert: over seeds 1-10, mean F1 at least FlowSOM_Python's
mean (0.915), no seed below FlowSOM_Python's worst (0.80), mean ARI at least FlowSOM_Python's
(0.963); for the single default seed, the four large populations matched by a metacluster or a
union with F1 >= 0.97, ARI >= 0.93 and mean F1 >= 0.80.
"""

import numpy as np
import pandas as pd
import pytest

import cytopipe
from cytopipe import cluster
from tests.conftest import shared_path

MARKERS = ["CD8", "TCRyd", "TCRb", "NK1/1", "CD4", "CD19", "CD3"]


@pytest.fixture(scope="module")
def data68983():
    from cytopipe.compensation import compensate
    from cytopipe.transforms import TransformSet

    fcs = shared_path("FlowSOM", "inst", "extdata", "68983.fcs")
    labels_csv = shared_path("FlowSOM", "inst", "extdata", "gatingResult.csv")
    s = compensate(cytopipe.read_fcs(fcs))  # with the file's SPILL
    logicle = {"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0}
    TransformSet({c: logicle for c in s.spillover.channels}).apply(s.events, s.pnn)
    labels = pd.read_csv(labels_csv, header=None)[0].to_numpy().astype(str)
    assert len(labels) == len(s.events) == 19225
    return s.events, s.markers, labels


def _run(data, seed):
    ev, columns, labels = data
    settings = cluster.ClusterSettings(xdim=10, ydim=10, n_metaclusters=10, scale=True, seed=seed)
    model = cluster.train_model({"68983": ev}, MARKERS, settings, columns=columns)
    _, mc = cluster.map_events(model, ev, columns)
    return model, mc


def test_metaclusters_match_the_manual_gating(data68983):
    from sklearn.metrics import adjusted_rand_score

    _, _, labels = data68983
    model, mc = _run(data68983, seed=42)
    f1 = cluster.mean_best_f1(mc, labels, exclude=["Unlabeled"])
    keep = labels != "Unlabeled"
    ari = adjusted_rand_score(labels[keep], mc[keep])
    assert f1 >= 0.80, f1
    assert ari >= 0.93, ari
    summary = cluster.concordance_summary(mc, labels, exclude=["Unlabeled"]).set_index("population")
    # the large, well-separated populations are each a metacluster or a union of metaclusters
    for pop in ("B cells", "CD4 T cells", "CD8 T cells", "gd T cells"):
        assert summary.loc[pop, "union_f1"] > 0.97, summary
    assert (summary["union_f1"] >= summary["best_f1"]).all()
    # the training used every cell once (one sample, fewer cells than the cap)
    assert model.training["n_cells"] == 19225


def test_agreement_holds_across_seeds(data68983):
    from sklearn.metrics import adjusted_rand_score

    _, _, labels = data68983
    keep = labels != "Unlabeled"
    f1, ari = [], []
    for seed in range(1, 11):
        mc = _run(data68983, seed)[1]
        f1.append(cluster.mean_best_f1(mc, labels, exclude=["Unlabeled"]))
        ari.append(adjusted_rand_score(labels[keep], mc[keep]))
    assert np.mean(f1) >= 0.915, f1
    assert min(f1) >= 0.80, f1
    assert np.mean(ari) >= 0.963, ari


def test_same_seed_same_clusters(data68983):
    a_model, a = _run(data68983, seed=5)
    b_model, b = _run(data68983, seed=5)
    assert np.array_equal(a, b) and a_model.content_hash == b_model.content_hash
