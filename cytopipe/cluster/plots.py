"""Figures for clustering results. Every function returns a matplotlib ``Figure`` built
without pyplot (safe in worker threads and headless runs); save it with ``fig.savefig``.
matplotlib and networkx are imported inside the functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cytopipe.cluster.model import ClusterModel, metacluster_name

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


#: a label's backdrop: thin (inside the 2-pixel gap the labels keep), so points stay visible
_LABEL_BOX = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.6}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def metacluster_colors(k: int) -> np.ndarray:
    """k distinct RGBA colours (tab10/tab20 families, then a hue wheel)."""
    from matplotlib import colormaps

    if k <= 10:
        return colormaps["tab10"](np.arange(k))
    if k <= 20:
        return colormaps["tab20"](np.arange(k))
    return colormaps["hsv"](np.linspace(0, 1, k, endpoint=False))


def plot_heatmap(medians: pd.DataFrame, title: str = "Metacluster median expression") -> Figure:
    """Metacluster x marker heatmap of medians.

    ``medians``: rows = metaclusters, marker columns (and an optional ``count`` column, shown
    in the row labels), e.g. from ``metacluster_medians`` or ``model_medians``. Colours are
    scaled 0-1 per marker (min to max across metaclusters) so every marker uses the full
    range; the cells show the actual medians."""
    counts = medians["count"] if "count" in medians.columns else None
    values = medians.drop(columns=["count"], errors="ignore")
    v = values.to_numpy(dtype=np.float64)
    lo, hi = np.nanmin(v, axis=0), np.nanmax(v, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = (v - lo) / span
    n_rows, n_cols = v.shape
    fig = _figure(1.0 + 0.6 * n_cols, 1.2 + 0.35 * n_rows)
    ax = fig.add_subplot()
    im = ax.imshow(scaled, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n_cols), values.columns, rotation=60, ha="right")
    labels = [str(i) for i in values.index]
    if counts is not None:
        total = max(float(np.nansum(counts)), 1.0)
        labels = [f"{lab} ({100 * c / total:.1f}%)" for lab, c in zip(labels, counts)]
    ax.set_yticks(range(n_rows), labels)
    if n_rows * n_cols <= 600:
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(v[i, j]):
                    color = "white" if scaled[i, j] < 0.6 else "black"
                    ax.text(j, i, f"{v[i, j]:.2g}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, label="median, scaled per marker (min 0, max 1)", shrink=0.8)
    ax.set_title(title)
    return fig


def mst_layout(model: ClusterModel) -> tuple[np.ndarray, np.ndarray]:
    """Minimum spanning tree of the node codes and a deterministic Kamada-Kawai layout.

    Returns ``(edges (n_edges x 2), positions (n_nodes x 2))``."""
    import networkx as nx
    from scipy.sparse.csgraph import minimum_spanning_tree
    from scipy.spatial.distance import cdist

    codes = np.asarray(model.codes, dtype=np.float64)
    d = cdist(codes, codes)
    # csgraph treats 0 as "no edge": give identical codes a tiny positive distance
    tiny = np.finfo(np.float64).tiny
    d = np.where(d > 0, d, tiny)
    np.fill_diagonal(d, 0.0)
    mst = minimum_spanning_tree(d).tocoo()
    edges = np.column_stack([mst.row, mst.col]).astype(np.int64)
    graph = nx.Graph()
    graph.add_nodes_from(range(model.n_nodes))
    for (a, b), w in zip(edges, mst.data):
        graph.add_edge(int(a), int(b), weight=float(w))
    # fixed initial positions (the SOM grid) make the layout deterministic
    start = {i: (float(i % model.xdim), float(i // model.xdim)) for i in range(model.n_nodes)}
    pos = nx.kamada_kawai_layout(graph, pos=start, weight="weight")
    return edges, np.array([pos[i] for i in range(model.n_nodes)], dtype=np.float64)


def plot_mst(
    model: ClusterModel,
    node_counts: np.ndarray | None = None,
    title: str = "FlowSOM minimum spanning tree",
    max_size: float = 400.0,
    label_nodes: bool = False,
) -> Figure:
    """The SOM as a minimum spanning tree: one circle per node, area proportional to its
    number of cells (default: the training cells), coloured by metacluster."""
    edges, pos = mst_layout(model)
    counts = np.asarray(model.node_counts if node_counts is None else node_counts, dtype=np.float64)
    size = max_size * counts / max(counts.max(), 1.0) + 8.0  # marker area ~ cells
    k = model.n_metaclusters
    colors = metacluster_colors(k)
    fig = _figure(7.5, 6.5)
    ax = fig.add_subplot()
    for a, b in edges:
        ax.plot(pos[[a, b], 0], pos[[a, b], 1], color="0.6", lw=0.8, zorder=1)
    mc = model.node_metacluster.astype(int)
    ax.scatter(pos[:, 0], pos[:, 1], s=size, c=colors[mc - 1], edgecolors="0.2", linewidths=0.5, zorder=2)
    if label_nodes:
        for i, (x, y) in enumerate(pos):
            ax.text(x, y, str(i + 1), fontsize=6, ha="center", va="center", zorder=3)
    handles = [
        ax.scatter([], [], s=60, color=colors[c - 1], label=metacluster_name(c)) for c in range(1, k + 1)
    ]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.set_title(title)
    return fig


def plot_umap(
    embedding: np.ndarray,
    metaclusters: np.ndarray,
    populations: Sequence[str] | np.ndarray | None = None,
    title: str = "UMAP",
) -> Figure:
    """Scatter of an embedding coloured by metacluster and, if given, by gated population
    (one label per cell, e.g. the deepest gate each cell falls in)."""
    emb = np.asarray(embedding)
    panels = 1 if populations is None else 2
    fig = _figure(6.0 * panels + 1.5, 5.5)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    mc = np.asarray(metaclusters).astype(int)
    k = int(mc.max()) if mc.size else 1
    colors = metacluster_colors(k)
    point = max(0.5, min(6.0, 20000.0 / max(len(emb), 1)))
    ax = axes[0]
    ax.scatter(emb[:, 0], emb[:, 1], s=point, c=colors[mc - 1], linewidths=0, rasterized=True)
    anchors, texts = [], []
    for c in range(1, k + 1):  # label each metacluster at its median position
        sel = mc == c
        if sel.any():
            x, y = np.median(emb[sel], axis=0)
            anchors.append((float(x), float(y)))
            texts.append(ax.text(x, y, metacluster_name(c), fontsize=7, ha="center", va="center",
                                 weight="bold", zorder=4, bbox=_LABEL_BOX))  # fmt: skip
    ax.set_title(f"{title}: metaclusters")
    if populations is not None:
        labels = np.asarray(populations).astype(str)
        names = sorted(set(labels.tolist()))
        pcol = metacluster_colors(len(names))
        ax2 = axes[1]
        for i, name in enumerate(names):
            sel = labels == name
            ax2.scatter(
                emb[sel, 0], emb[sel, 1], s=point, color=pcol[i], linewidths=0, label=name, rasterized=True
            )
        ax2.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=4, fontsize=8)
        ax2.set_title(f"{title}: gated populations")
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
        a.set_xlabel("UMAP 1")
        a.set_ylabel("UMAP 2")
    if texts:
        repel_labels(ax, texts, anchors)
    return fig


def repel_labels(ax, texts: Sequence, anchors: Sequence[tuple[float, float]], pad: float = 2.0,
                 iterations: int = 400) -> None:  # fmt: skip
    """Move text labels (centred on their ``anchors``, data coordinates) apart until their boxes,
    measured with the renderer at the figure's final layout, do not overlap (``pad`` pixels
    between them) and stay inside the axes; a label moved off its anchor gets a thin leader line
    to it. Deterministic: pairs are resolved in a fixed order, each pushed apart along the axis
    of its smaller overlap (the first of two labels on one spot goes left or down)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    for t in texts:
        t.set_in_layout(False)  # moving a label never changes the layout it was measured in
    fig.draw_without_rendering()  # the final layout (constrained): positions in pixels hold
    renderer = fig.canvas.get_renderer()
    boxes = np.array([t.get_window_extent(renderer).extents for t in texts], dtype=float)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 + pad / 2
    frame = ax.get_window_extent(renderer).extents
    pos = _repel(centre, half, frame, iterations)
    placed = ax.transData.inverted().transform(pos)
    anchors = np.asarray(anchors, dtype=float)
    for t, p, a, off, h in zip(texts, placed, anchors, pos - centre, half):
        t.set_position((float(p[0]), float(p[1])))
        if (np.abs(off) > h).any():  # moved off its own spot: a leader line to it
            ax.plot([a[0], p[0]], [a[1], p[1]], color="#495057", lw=0.5, zorder=3)


def _repel(centre: np.ndarray, half: np.ndarray, frame: np.ndarray, iterations: int) -> np.ndarray:
    """Box centres (pixels) moved so that no two boxes (half sizes ``half``) overlap and each
    stays inside ``frame`` (x0, y0, x1, y1) where it fits."""
    n = len(centre)
    lo, hi = frame[:2] + half, frame[2:] - half
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    pos = np.clip(centre, lo, hi)
    for _ in range(iterations):
        moved = False
        for i in range(n):
            for j in range(i + 1, n):
                d = pos[j] - pos[i]
                overlap = half[i] + half[j] - np.abs(d)
                if (overlap <= 0).any():
                    continue
                axis = int(overlap[1] < overlap[0])  # push along the smaller overlap
                sign = 1.0 if d[axis] >= 0 else -1.0
                shift = overlap[axis] / 2 + 0.01
                pos[i, axis] -= sign * shift
                pos[j, axis] += sign * shift
                moved = True
        if not moved:
            break
        pos = np.clip(pos, lo, hi)
    return pos


def plot_consensus_curve(curve: pd.DataFrame, chosen_k: int | None = None) -> Figure:
    """Consensus CDF area gain (delta area) and PAC against k, with the chosen k marked."""
    fig = _figure(8.0, 3.5)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(curve["k"], curve["delta_area"], "o-")
    ax1.set_xlabel("k (metaclusters)")
    ax1.set_ylabel("relative gain in CDF area")
    ax2.plot(curve["k"], curve["pac"], "o-", color="C1")
    ax2.set_xlabel("k (metaclusters)")
    ax2.set_ylabel("PAC (ambiguous pairs; lower is crisper)")
    if chosen_k is not None:
        for a in (ax1, ax2):
            a.axvline(chosen_k, color="0.5", ls="--", lw=1)
    fig.suptitle("Choosing the number of metaclusters")
    return fig


def plot_concordance(table: pd.DataFrame, title: str = "Metacluster vs gate F1") -> Figure:
    """Heatmap of F1 between each population (rows) and cluster (columns) from
    ``f_measure_table``."""
    pivot = table.pivot(index="population", columns="cluster", values="f1")
    v = pivot.to_numpy(dtype=np.float64)
    fig = _figure(1.5 + 0.45 * v.shape[1], 1.2 + 0.4 * v.shape[0])
    ax = fig.add_subplot()
    im = ax.imshow(v, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(v.shape[1]), [str(c) for c in pivot.columns])
    ax.set_yticks(range(v.shape[0]), pivot.index)
    ax.set_xlabel("metacluster")
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            if v[i, j] >= 0.05:
                ax.text(
                    j, i, f"{v[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v[i, j] > 0.6 else "white",
                )  # fmt: skip
    fig.colorbar(im, ax=ax, label="F1", shrink=0.8)
    ax.set_title(title)
    return fig
