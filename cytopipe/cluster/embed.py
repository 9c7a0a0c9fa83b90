"""2-D embeddings (UMAP) of a subsample, for pictures only.

umap-learn is imported lazily (it takes ~2 s to import). With a seed UMAP runs single-
threaded and gives the same picture every time; PCA initialisation avoids the slow spectral
start (~3x faster on 50k cells), and 10-20k cells are plenty for a figure.

The k nearest neighbours are computed exactly with scikit-learn (a KD-tree) and handed to UMAP
(``precomputed_knn``): below 4096 cells UMAP would otherwise compute all pairwise distances with a
Python-level metric callback (about 20 s for 3000 cells), and above it pynndescent's approximate
search costs about 30 s of compilation in every new process. Exact neighbours take well under a
second for 20k cells and make the embedding independent of pynndescent's randomness.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from cytopipe.cluster.model import EventTable, _as_matrix, subsample_indices
from cytopipe.errors import ClusteringError

logger = logging.getLogger(__name__)


def embedding_subsample(
    sizes: Mapping[str, int], n_total: int = 15_000, seed: int = 42
) -> dict[str, np.ndarray]:
    """Equal-per-sample event indices for an embedding: sample_id -> sorted indices, at most
    ``n_total`` in all. Deterministic per sample (see ``subsample_indices``)."""
    if not sizes:
        return {}
    per = max(1, n_total // len(sizes))
    return {sid: subsample_indices(int(n), per, seed, f"embed:{sid}") for sid, n in sizes.items()}


def umap_embedding(
    events: EventTable,
    markers: Sequence[str],
    columns: Sequence[str] | None = None,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 42,
    init: str = "pca",
    center: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """UMAP coordinates (n x 2, float32) of ``events`` on ``markers`` (optionally scaled
    like the model: pass ``model.center`` / ``model.scale``)."""
    arr, cols = _as_matrix(events, columns, markers, None)
    x = np.asarray(arr[:, cols], dtype=np.float32)
    if center is not None:
        x = (x - np.asarray(center, np.float32)) / np.asarray(scale, np.float32)
    if x.shape[0] <= n_neighbors + 1:
        raise ClusteringError(f"need more than {n_neighbors + 1} cells for a UMAP, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ClusteringError("events contain NaN or infinite values on the embedding markers")
    import warnings

    import umap  # lazy: heavy import
    from sklearn.neighbors import NearestNeighbors

    _cache_umap_kernels()

    # exact neighbours (each cell is its own first neighbour, as UMAP expects)
    dist, idx = NearestNeighbors(n_neighbors=n_neighbors).fit(x).kneighbors(x)
    reducer = umap.UMAP(
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        n_components=2,
        random_state=seed,
        init=init,
        n_jobs=1,
        precomputed_knn=(idx, dist.astype(np.float32), None),
    )
    with warnings.catch_warnings():
        # n_jobs with a seed, and "no search index: transform() unavailable" (never used here)
        warnings.simplefilter("ignore", category=UserWarning)
        return reducer.fit_transform(x).astype(np.float32)


_UMAP_CACHED = False


def _cache_umap_kernels() -> None:
    """Compile umap-learn's numba functions once per machine, not once per run: most are
    declared without ``cache=True``, so every process recompiled them (~10 s of a run's UMAP).
    Caching stores the same machine code numba would compile, so embeddings are unchanged; a
    function numba cannot cache is compiled as before (numba only warns)."""
    global _UMAP_CACHED
    if _UMAP_CACHED:
        return
    _UMAP_CACHED = True
    import importlib
    import warnings

    from numba.core.dispatcher import Dispatcher

    for name in ("umap.umap_", "umap.layouts", "umap.utils", "umap.spectral", "umap.distances"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and obj._cache.__class__.__name__ == "NullCache":
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        obj.enable_caching()
                except Exception as exc:  # e.g. no writable cache location: compile as before
                    logger.debug("numba cache not enabled for %s.%s: %s", name, obj.__name__, exc)
