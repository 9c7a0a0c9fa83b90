"""Figures: heatmap, MST view, consensus curve, concordance, UMAP."""

import numpy as np
import pytest

from cytopipe import cluster
from tests.test_cluster_model import CHANNELS, MARKERS, make_sample


@pytest.fixture(scope="module")
def fitted():
    data = {f"S{i}": make_sample(2500, seed=i) for i in range(3)}
    settings = cluster.ClusterSettings(xdim=5, ydim=5, n_metaclusters=5, seed=3)
    model = cluster.train_model({k: v[0] for k, v in data.items()}, MARKERS, settings, columns=CHANNELS)
    return model, data


def test_heatmap_shows_every_metacluster_and_marker(fitted):
    model, data = fitted
    ev, _ = data["S0"]
    _, mc = cluster.map_events(model, ev, CHANNELS)
    med = cluster.metacluster_medians(model, ev, mc, CHANNELS)
    fig = cluster.plot_heatmap(med)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == MARKERS
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert len(rows) == 5 and rows[0].startswith("MC01 (")
    image = ax.images[0].get_array()
    assert image.shape == (5, 6) and np.nanmin(image) == 0 and np.nanmax(image) == 1
    # the annotated numbers are the medians themselves
    texts = {t.get_text() for t in ax.texts}
    assert f"{med.iloc[0, 1]:.2g}" in texts
    fig2 = cluster.plot_heatmap(cluster.model_medians(model))
    assert len(fig2.axes[0].get_yticklabels()) == 5


def test_mst_is_a_tree_with_a_deterministic_layout(fitted):
    model, _ = fitted
    edges, pos = cluster.mst_layout(model)
    assert edges.shape == (model.n_nodes - 1, 2)
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(model.n_nodes))
    g.add_edges_from(edges.tolist())
    assert nx.is_tree(g)
    edges2, pos2 = cluster.mst_layout(model)
    assert np.array_equal(edges, edges2) and np.array_equal(pos, pos2)
    fig = cluster.plot_mst(model)
    ax = fig.axes[0]
    assert len(ax.lines) == model.n_nodes - 1
    sizes = ax.collections[0].get_sizes()
    # marker area grows with the node's cell count
    counts = model.node_counts
    assert sizes[np.argmax(counts)] == sizes.max() and sizes[np.argmin(counts)] == sizes.min()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == model.metacluster_labels()


def test_consensus_and_concordance_figures(fitted, tmp_path):
    model, data = fitted
    fig = cluster.plot_consensus_curve(model.consensus_curve, chosen_k=model.n_metaclusters)
    assert len(fig.axes) == 2
    ev, truth = data["S1"]
    _, mc = cluster.map_events(model, ev, CHANNELS)
    fig = cluster.plot_concordance(cluster.f_measure_table(mc, truth))
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (5, 5)
    out = tmp_path / "concordance.png"
    fig.savefig(out)
    assert out.stat().st_size > 1000


def test_umap_of_a_subsample_coloured_by_metacluster_and_gate(fitted):
    model, data = fitted
    idx = cluster.embedding_subsample({sid: len(v[0]) for sid, v in data.items()}, n_total=1500, seed=1)
    assert sum(len(i) for i in idx.values()) == 1500
    ev = np.concatenate([data[sid][0][i] for sid, i in idx.items()])
    truth = np.concatenate([data[sid][1][i] for sid, i in idx.items()])
    emb = cluster.umap_embedding(ev, MARKERS, CHANNELS, seed=1, n_neighbors=10)
    assert emb.shape == (1500, 2) and emb.dtype == np.float32
    again = cluster.umap_embedding(ev, MARKERS, CHANNELS, seed=1, n_neighbors=10)
    assert np.array_equal(emb, again)
    # cells of one type sit together: nearest neighbour in the embedding shares the label
    d = ((emb[:, None, :] - emb[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (truth[d.argmin(1)] == truth).mean() > 0.95
    _, mc = cluster.map_events(model, ev, CHANNELS)
    fig = cluster.plot_umap(emb, mc, truth)
    assert len(fig.axes) == 2
    assert sorted(t.get_text() for t in fig.axes[1].get_legend().get_texts()) == sorted(set(truth))


def _label_boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    return ax, {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}


def test_umap_metacluster_labels_do_not_overlap_when_clusters_are_close():
    """Five metaclusters whose centres lie within 0.4 of each other (and two more pairs) on a
    13-unit-wide embedding: their labels were drawn on top of each other at the medians."""
    rng = np.random.default_rng(0)
    centres = np.array(
        [[0, 0], [0.3, 0.1], [0.1, 0.35], [0.4, 0.4], [-0.2, 0.2], [8, 8], [8.2, 8.1], [-5, 6]]
    )
    emb = np.concatenate([c + 0.3 * rng.standard_normal((300, 2)) for c in centres]).astype(np.float32)
    mc = np.repeat(np.arange(1, len(centres) + 1), 300)
    fig = cluster.plot_umap(emb, mc, np.where(mc < 6, "T cells", "NK cells"))
    ax, boxes = _label_boxes(fig)
    assert sorted(boxes) == [f"MC{i:02d}" for i in range(1, 9)]
    names = sorted(boxes)
    hits = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if boxes[a].overlaps(boxes[b])]
    assert not hits, hits
    frame = ax.get_window_extent()
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
               for b in boxes.values())  # fmt: skip
    # a moved label points at its cluster's median with a leader line; a lone cluster's stays put
    assert len(ax.lines) >= 3
    lone = boxes["MC08"]
    x, y = ax.transData.transform(np.median(emb[mc == 8], axis=0))
    assert lone.x0 <= x <= lone.x1 and lone.y0 <= y <= lone.y1
    # deterministic: the same figure twice puts every label at the same place
    _, again = _label_boxes(cluster.plot_umap(emb, mc, np.where(mc < 6, "T cells", "NK cells")))
    assert all(np.allclose(boxes[n].extents, again[n].extents) for n in names)
