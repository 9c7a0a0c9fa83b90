"""SOM kernels: mapping is the exact nearest code, chunk-invariant, seeded training."""

import numpy as np
import pytest

from cytopipe.cluster.som import default_radius, grid_distances, map_to_codes, train_som
from cytopipe.errors import ClusteringError


def blobs(n_per: int, centers: np.ndarray, sd: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + rng.normal(scale=sd, size=(n_per, centers.shape[1])) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(len(centers)), n_per)


CENTERS = np.array([[0, 0, 0, 0], [5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 5]], dtype=np.float64)


def test_grid_and_default_radius_follow_flowsom():
    d = grid_distances(10, 10)
    assert d.shape == (100, 100)
    # node i sits at (i % xdim, i // xdim); Chebyshev distance
    assert d[0, 99] == 9 and d[0, 11] == 1 and d[0, 12] == 2 and d[5, 50] == 5
    r0, r1 = default_radius(10, 10)
    assert r1 == 0.0
    assert r0 == pytest.approx(np.quantile(d, 0.67))


def test_mapping_is_the_exact_nearest_code_and_chunk_invariant():
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(49, 6)).astype(np.float32)
    events = rng.normal(size=(20_000, 9)).astype(np.float32)
    cols = [8, 0, 3, 2, 5, 7]
    nodes = map_to_codes(events, codes, cols)
    d = ((events[:, cols][:, None, :] - codes[None]) ** 2).sum(-1)
    assert np.array_equal(nodes, d.argmin(axis=1))
    for chunk in (1, 7, 4096):
        assert np.array_equal(map_to_codes(events, codes, cols, chunk_size=chunk), nodes)
    # any split of the events (e.g. per sample, any order) gives the same per-event nodes
    parts = [events[5000:], events[:1234], events[1234:5000]]
    again = np.concatenate([map_to_codes(p, codes, cols) for p in parts])
    assert np.array_equal(again, np.concatenate([nodes[5000:], nodes[:1234], nodes[1234:5000]]))
    # float64 input and scaling give the same as scaling by hand in float32
    center = rng.normal(size=6).astype(np.float32)
    scale = rng.uniform(0.5, 2, size=6).astype(np.float32)
    scaled = (events[:, cols] - center) / scale
    assert np.array_equal(
        map_to_codes(events.astype(np.float64), codes, cols, center, scale), map_to_codes(scaled, codes)
    )


def test_mapping_refuses_non_finite_events():
    codes = np.zeros((4, 2), np.float32)
    events = np.ones((10, 2), np.float32)
    events[3, 1] = np.nan
    with pytest.raises(ClusteringError, match="1 of 10 events have NaN"):
        map_to_codes(events, codes)


def test_som_is_seeded_and_learns_the_data():
    x, truth = blobs(2000, CENTERS)
    a = train_som(x, xdim=6, ydim=6, seed=7)
    b = train_som(x, xdim=6, ydim=6, seed=7)
    c = train_som(x, xdim=6, ydim=6, seed=8)
    assert a.dtype == np.float32 and a.shape == (36, 4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    nodes = map_to_codes(x, a)
    # every node sits in one blob: nodes are pure, and every blob owns some nodes
    for node in np.unique(nodes):
        assert np.bincount(truth[nodes == node]).max() / (nodes == node).sum() > 0.99
    owners = {int(np.bincount(truth[nodes == node]).argmax()) for node in np.unique(nodes)}
    assert owners == {0, 1, 2, 3}
    # quantisation error far below the spread of the data (4 blobs 5 apart, sd 0.3)
    qe = np.sqrt(((x - a[nodes]) ** 2).sum(1)).mean()
    assert qe < 0.6


def test_som_topology_neighbours_are_similar():
    """A 1-D curve should unfold along the grid: adjacent nodes have nearby codes."""
    t = np.linspace(0, 1, 5000)
    x = np.column_stack([t, np.zeros_like(t)]).astype(np.float32)
    codes = train_som(x, xdim=10, ydim=1, rlen=20, seed=3)
    steps = np.abs(np.diff(codes[:, 0]))
    assert np.all(steps < 0.2)
    assert np.all(np.diff(codes[:, 0]) > 0) or np.all(np.diff(codes[:, 0]) < 0)


def test_som_input_errors():
    with pytest.raises(ClusteringError, match="only 5 training cells"):
        train_som(np.zeros((5, 2), np.float32), xdim=3, ydim=3)
    bad = np.ones((100, 2), np.float32)
    bad[0, 0] = np.inf
    with pytest.raises(ClusteringError, match="NaN or infinite"):
        train_som(bad, xdim=2, ydim=2)
