"""Per-sample metacluster abundances and medians (the rows of ``clusters.parquet``).

One row per sample and metacluster, every metacluster present (zero counts included, so
differential-abundance statistics see the zeros)::

    sample_id, population, parent, metacluster, count, parent_count, pct_parent, median_<marker>...

``population`` is the metacluster's name (``MC01``...) and ``parent`` the population that was
clustered, so the table can be stacked with ``population_stats`` and fed to the same statistics.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cytopipe.cluster.model import (
    ClusterModel,
    EventTable,
    _as_matrix,
    load_model,
    map_events,
    marker_columns,
    metacluster_name,
)
from cytopipe.errors import ClusteringError

ABUNDANCE_COLUMNS = [
    "sample_id",
    "population",
    "parent",
    "metacluster",
    "count",
    "parent_count",
    "pct_parent",
]


def group_medians(
    events: np.ndarray, cols: np.ndarray, labels: np.ndarray, n_groups: int, first_label: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Counts (n_groups,) and medians (n_groups x len(cols), NaN for empty groups) of the
    events in each group ``first_label .. first_label + n_groups - 1``.

    One stable sort of the labels; each group's rows are gathered once (never the whole
    matrix at a time)."""
    lab = np.asarray(labels).astype(np.int64) - first_label
    if lab.size and (lab.min() < 0 or lab.max() >= n_groups):
        raise ClusteringError(f"labels outside {first_label}..{first_label + n_groups - 1}")
    counts = np.bincount(lab, minlength=n_groups)
    # the same stable order; numpy radix-sorts 16-bit keys (1.4 ms for 200k events, 6.4 as int64)
    order = np.argsort(lab.astype(np.uint16) if n_groups <= 1 << 16 else lab, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    med = np.full((n_groups, len(cols)), np.nan, dtype=np.float64)
    if events.dtype == np.float32 and events.size:
        # float32 columns without NaN: a histogram selection instead of gather + partition
        # (equal to np.median bit for bit, which the columns with a NaN still use)
        from cytopipe.gating._median import MedianScratch, median_like_numpy

        scratch = MedianScratch(int(counts.max()) if counts.size else 1)
        fast = [not np.isnan(events[:, c]).any() for c in cols]
        for j, c in enumerate(cols):
            if not fast[j]:
                continue
            column = np.ascontiguousarray(events[:, c])
            for g in range(n_groups):
                if counts[g]:
                    med[g, j] = median_like_numpy(column, order[bounds[g] : bounds[g + 1]], scratch)
        slow = [c for j, c in enumerate(cols) if not fast[j]]
    else:
        slow = list(cols)
    if slow:
        at = [j for j, c in enumerate(cols) if c in set(slow)]
        for g in range(n_groups):
            if counts[g]:
                rows = order[bounds[g] : bounds[g + 1]]
                med[g, at] = np.median(events[np.ix_(rows, slow)], axis=0)
    return counts, med


def sample_abundance(
    model: ClusterModel,
    sample_id: str,
    metaclusters: np.ndarray,
    events: EventTable | None = None,
    columns: Sequence[str] | None = None,
    *,
    markers: Sequence[str] | None = None,
    parent: str | None = None,
) -> pd.DataFrame:
    """Abundance rows of one sample: one per metacluster of ``model``.

    ``metaclusters`` are the per-event metaclusters of the sample's parent-population events
    (from :func:`map_events`), ``events`` the same events (columns named by ``columns``) for
    the ``median_<marker>`` columns of ``markers`` (default: the model's markers; any other
    marker present in the events, e.g. a functional marker not used for clustering, works
    too). ``parent`` defaults to the model's parent population.
    """
    k = model.n_metaclusters
    mc = np.asarray(metaclusters)
    markers = list(model.markers if markers is None else markers)
    if events is not None:
        arr, cols = _as_matrix(events, columns, markers, sample_id)
        if arr.shape[0] != mc.shape[0]:
            raise ClusteringError(
                f"{mc.shape[0]} metacluster labels for {arr.shape[0]} events", sample=sample_id
            )
        counts, med = group_medians(arr, cols, mc, k)
    else:
        counts = np.bincount(mc.astype(np.int64) - 1, minlength=k) if mc.size else np.zeros(k, np.int64)
        med = None
    n = int(mc.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = 100.0 * counts / n if n else np.full(k, np.nan)
    columns = {
        "sample_id": str(sample_id),
        "population": [metacluster_name(c) for c in range(1, k + 1)],
        "parent": parent if parent is not None else (model.parent or ""),
        "metacluster": np.arange(1, k + 1, dtype=np.int64),
        "count": counts.astype(np.int64),
        "parent_count": np.int64(n),
        "pct_parent": pct.astype(np.float64),
    }
    if med is not None:  # built at once: a column inserted per marker cost ~0.2 ms each
        for j, m in enumerate(markers):
            columns[f"median_{m}"] = med[:, j]
    return pd.DataFrame(columns)


def abundance_table(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Stack per-sample abundance tables in a stable order (sample_id, metacluster)."""
    frames = list(frames)
    if not frames:
        return pd.DataFrame(columns=ABUNDANCE_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["sample_id", "metacluster"], kind="stable").reset_index(drop=True)


def metacluster_medians(
    model: ClusterModel,
    events: EventTable,
    metaclusters: np.ndarray,
    columns: Sequence[str] | None = None,
    markers: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Median of each marker per metacluster (rows ``MC01``..; NaN rows for empty ones),
    e.g. over the pooled cells of an embedding subsample, for :func:`plot_heatmap`."""
    markers = list(model.markers if markers is None else markers)
    arr, cols = _as_matrix(events, columns, markers, None)
    counts, med = group_medians(arr, cols, np.asarray(metaclusters), model.n_metaclusters)
    out = pd.DataFrame(med, columns=markers, index=model.metacluster_labels())
    out.index.name = "metacluster"
    out.insert(0, "count", counts)
    return out


def model_medians(model: ClusterModel) -> pd.DataFrame:
    """The training cells' medians per metacluster stored in the model (same layout as
    :func:`metacluster_medians`, with the training counts)."""
    if model.metacluster_medians is None:
        raise ClusteringError("this model has no stored medians")
    out = pd.DataFrame(
        np.asarray(model.metacluster_medians, dtype=np.float64),
        columns=model.markers,
        index=model.metacluster_labels(),
    )
    out.index.name = "metacluster"
    counts = np.zeros(model.n_metaclusters, dtype=np.int64)
    if model.node_counts is not None:
        np.add.at(counts, model.node_metacluster.astype(np.int64) - 1, model.node_counts)
    out.insert(0, "count", counts)
    return out


@dataclass
class SampleClusters:
    """One sample mapped onto a model: per parent-population event node and metacluster (in
    event order), the sample's abundance rows and its cells per SOM node (small: a Dask task
    can return ``abundance`` and ``node_counts`` and keep the per-event arrays local)."""

    sample_id: str
    nodes: np.ndarray
    metaclusters: np.ndarray
    abundance: pd.DataFrame
    node_counts: np.ndarray


def map_sample(
    model: ClusterModel,
    sample_id: str,
    events: np.ndarray,
    columns: Sequence[str],
    *,
    parent_mask: np.ndarray | None = None,
    markers: Sequence[str] | None = None,
    parent: str | None = None,
) -> SampleClusters:
    """Map one whole sample (one Dask task): pick the parent population's events
    (``parent_mask``, default all), assign nodes and metaclusters, and compute its abundance
    rows with medians of ``markers`` (default the model's markers).

    ``events`` is the sample's compensated, transformed event matrix with ``columns`` naming
    its columns by marker. Only the needed columns of the parent events are gathered, never a
    full copy of the sample.
    """
    markers = list(model.markers if markers is None else markers)
    wanted = list(dict.fromkeys([*model.markers, *markers]))
    cols = marker_columns(columns, wanted, sample_id)
    if parent_mask is None:
        sub = events[:, cols]
    else:
        mask = np.asarray(parent_mask, dtype=bool)
        if mask.shape != (events.shape[0],):
            raise ClusteringError(
                f"parent mask has {mask.shape[0]} entries for {events.shape[0]} events", sample=sample_id
            )
        sub = events[np.ix_(np.flatnonzero(mask), cols)]
    nodes, mc = map_events(model, sub, wanted, sample_id=sample_id)
    rows = sample_abundance(model, sample_id, mc, sub, wanted, markers=markers, parent=parent)
    counts = np.bincount(nodes, minlength=model.n_nodes).astype(np.int64)
    return SampleClusters(str(sample_id), nodes, mc, rows, counts)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> ClusterModel:
    return load_model(path)


def load_model_cached(path: str | os.PathLike) -> ClusterModel:
    """``load_model`` once per process and file version (for Dask workers that map many
    samples with the same model: send the path, not the model)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return load_model(p)  # raises the usual "not found" error
    return _load_cached(str(p), st.st_mtime_ns, st.st_size)
