"""Self-organising map (SOM) as FlowSOM uses it, written for cytopipe.

The algorithm is Kohonen's online SOM as described for FlowSOM (Van Gassen et al. 2015,
Cytometry A 87:636) and the R function ``FlowSOM::SOM``:

* a rectangular grid of ``xdim x ydim`` nodes; node ``i`` sits at ``(i % xdim, i // xdim)``
  and grid distances are Chebyshev distances (``max(|dx|, |dy|)``);
* node codes start as distinct cells drawn from the data (seeded);
* ``rlen`` passes over the data; at step ``t`` of ``T = rlen * n`` the learning rate falls
  linearly from ``alpha[0]`` to ``alpha[1]`` and the neighbourhood radius from ``radius[0]``
  (default: the 2/3 quantile of all grid distances) to ``radius[1]`` (default 0);
* each step takes one cell, finds its best-matching unit (BMU, smallest squared Euclidean
  distance, lowest index on ties) and moves every node whose grid distance to the BMU is
  within the radius towards the cell by ``alpha * (cell - code)`` (a "bubble" neighbourhood).

One deliberate difference from the R code: cells are visited in a fresh seeded permutation
on each pass (every training cell is seen exactly ``rlen`` times) instead of being drawn with
replacement. This lowers run-to-run variance without changing the algorithm.

The two hot loops (training and mapping) are numba kernels. The mapping kernel computes each
event on its own, in a fixed order of operations, so the node an event gets never depends on
how the events are chunked, which sample it came with, or how many workers ran.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from cytopipe.errors import ClusteringError

DEFAULT_CHUNK = 262_144  # events per mapping chunk (~1 MB of node ids)


def grid_coordinates(xdim: int, ydim: int) -> np.ndarray:
    """``(xdim*ydim, 2)`` grid positions; node ``i`` is at ``(i % xdim, i // xdim)``."""
    idx = np.arange(xdim * ydim)
    return np.column_stack([idx % xdim, idx // xdim]).astype(np.float64)


def grid_distances(xdim: int, ydim: int) -> np.ndarray:
    """Chebyshev distances between all pairs of grid nodes (``n_nodes x n_nodes``)."""
    g = grid_coordinates(xdim, ydim)
    return np.abs(g[:, None, :] - g[None, :, :]).max(axis=2)


def default_radius(xdim: int, ydim: int) -> tuple[float, float]:
    """FlowSOM's default radius schedule: 2/3 quantile of the grid distances down to 0."""
    return float(np.quantile(grid_distances(xdim, ydim), 0.67)), 0.0


@njit(cache=True, nogil=True, inline="always")
def _nearest(x, codes_t, dist):  # pragma: no cover - compiled
    """Best-matching node of one cell ``x`` (markers): (index, squared distance), lowest index on
    ties. Nodes are the innermost loop so the compiler vectorises it without reordering sums."""
    n_markers, n_nodes = codes_t.shape
    for j in range(n_nodes):
        dist[j] = 0.0
    for m in range(n_markers):
        xm = x[m]
        for j in range(n_nodes):
            d = xm - codes_t[m, j]
            dist[j] += d * d
    # the smallest distance by its bits: sums of squares are >= +0.0, and such floats order as
    # their bit patterns do, so an integer minimum (which vectorises; a float one does not
    # without reordering rules) finds it; then the first node with it. The same node as a
    # scan with `<` (lowest index on ties); a NaN distance (a NaN in the cell: every node's is
    # NaN) is returned as the best distance, which callers treat as "not < inf".
    bits = dist.view(np.int32)
    low = bits[0]
    for j in range(1, n_nodes):
        b = bits[j]
        low = b if b < low else low
    best = 0
    while bits[best] != low:
        best += 1
    return best, dist[best]


@njit(cache=True, nogil=True)
def _som_steps(data, codes_t, order, nhbr, alpha0, alpha1, radius0, radius1, step0, n_steps):
    """Run ``len(order)`` online SOM updates in place on ``codes_t`` (markers x nodes)."""
    n_markers, n_nodes = codes_t.shape
    dist = np.empty(n_nodes, dtype=np.float32)
    weight = np.empty(n_nodes, dtype=np.float32)
    for t in range(order.shape[0]):
        i = order[t]
        frac = (step0 + t) / n_steps
        alpha = np.float32(alpha0 - (alpha0 - alpha1) * frac)
        radius = radius0 - (radius0 - radius1) * frac
        best, _ = _nearest(data[i], codes_t, dist)
        for j in range(n_nodes):
            weight[j] = alpha if nhbr[best, j] <= radius else np.float32(0.0)
        for m in range(n_markers):
            x = data[i, m]
            for j in range(n_nodes):
                codes_t[m, j] += weight[j] * (x - codes_t[m, j])


@njit(cache=True, nogil=True)
def _map_rows(events, start, stop, cols, center, scale, codes_t, out_nodes, out_dist):
    """Nearest node of rows ``start:stop`` of ``events`` (columns ``cols``, scaled).

    Writes ``out_nodes[r - start]``; returns the number of rows with a non-finite value
    (those get node -1)."""
    n_markers, n_nodes = codes_t.shape
    dist = np.empty(n_nodes, dtype=np.float32)
    x = np.empty(n_markers, dtype=np.float32)
    n_bad = 0
    for r in range(start, stop):
        for m in range(n_markers):
            x[m] = (np.float32(events[r, cols[m]]) - center[m]) / scale[m]
        best, best_d = _nearest(x, codes_t, dist)
        if not best_d < np.inf:  # NaN or inf somewhere in the event
            best = -1
            n_bad += 1
        out_nodes[r - start] = best
        out_dist[r - start] = best_d
    return n_bad


def train_som(
    data: np.ndarray,
    xdim: int = 10,
    ydim: int = 10,
    rlen: int = 10,
    alpha: tuple[float, float] = (0.05, 0.01),
    radius: tuple[float, float] | None = None,
    seed: int = 42,
) -> np.ndarray:
    """Train a SOM on ``data`` (cells x markers) and return the codes (nodes x markers, float32).

    ``data`` must already be the training subsample in the space the SOM works in
    (transformed, and scaled if scaling is used). Seeded: the same inputs give the same codes.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != 2 or data.shape[1] == 0:
        raise ClusteringError(f"training data must be a cells x markers matrix, got shape {data.shape}")
    n_nodes = xdim * ydim
    if xdim < 1 or ydim < 1 or rlen < 1:
        raise ClusteringError(f"xdim, ydim and rlen must be >= 1 (got {xdim}, {ydim}, {rlen})")
    n = data.shape[0]
    if n < n_nodes:
        raise ClusteringError(
            f"only {n} training cells for a {xdim}x{ydim} grid ({n_nodes} nodes): "
            "use a smaller grid or more cells per sample"
        )
    if not np.isfinite(data).all():
        raise ClusteringError("training data contains NaN or infinite values: check the transforms")
    if radius is None:
        radius = default_radius(xdim, ydim)
    rng = np.random.default_rng(seed)
    init = np.sort(rng.choice(n, size=n_nodes, replace=False))
    codes_t = np.ascontiguousarray(data[init].T)  # markers x nodes
    nhbr = grid_distances(xdim, ydim).astype(np.float32)
    n_steps = rlen * n
    for p in range(rlen):
        order = rng.permutation(n).astype(np.int64)
        _som_steps(
            data, codes_t, order, nhbr, float(alpha[0]), float(alpha[1]),
            float(radius[0]), float(radius[1]), p * n, n_steps,
        )  # fmt: skip
    return np.ascontiguousarray(codes_t.T)


def map_to_codes(
    events: np.ndarray,
    codes: np.ndarray,
    cols: Sequence[int] | None = None,
    center: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    return_distance: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Nearest code (BMU) of every event: ``int16`` node ids (``int32`` above 32767 nodes).

    ``events`` is any 2-D float array (e.g. a whole sample's event matrix); ``cols`` picks the
    model markers' columns in model order, so no copy of the event matrix is made. Each event
    is mapped independently, so chunking, ordering and parallelism never change the result.
    Raises :class:`ClusteringError` if an event has a non-finite value on a model marker.
    """
    if events.ndim != 2:
        raise ClusteringError(f"events must be a 2-D matrix, got shape {events.shape}")
    codes = np.asarray(codes, dtype=np.float32)
    n_markers = codes.shape[1]
    cols_arr = np.arange(n_markers) if cols is None else np.asarray(cols, dtype=np.int64)
    if cols_arr.shape != (n_markers,):
        raise ClusteringError(f"{len(cols_arr)} columns given for a model with {n_markers} markers")
    if events.dtype not in (np.float32, np.float64):
        events = events.astype(np.float32)
    center_arr = np.zeros(n_markers, np.float32) if center is None else np.asarray(center, np.float32)
    scale_arr = np.ones(n_markers, np.float32) if scale is None else np.asarray(scale, np.float32)
    codes_t = np.ascontiguousarray(codes.T)
    n = events.shape[0]
    node_dtype = np.int16 if codes.shape[0] <= np.iinfo(np.int16).max else np.int32
    nodes = np.empty(n, dtype=node_dtype)
    dist = np.empty(n, dtype=np.float32)
    n_bad = 0
    for start in range(0, n, max(int(chunk_size), 1)):
        stop = min(start + int(chunk_size), n)
        n_bad += _map_rows(
            events, start, stop, cols_arr, center_arr, scale_arr, codes_t, nodes[start:stop], dist[start:stop]
        )
    if n_bad:
        raise ClusteringError(
            f"{n_bad} of {n} events have NaN or infinite values on the clustering markers: "
            "check compensation and transforms (cytopipe never drops events silently)"
        )
    return (nodes, dist) if return_distance else nodes
