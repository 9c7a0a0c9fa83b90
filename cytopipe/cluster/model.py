"""Training FlowSOM models, the frozen model file, and mapping events onto a model.

A :class:`ClusterModel` is everything needed to assign new events: the markers (in order),
optional per-marker centring/scaling, the SOM node codes and the node -> metacluster map.
It is written as one ``.npz`` file holding plain arrays plus a JSON header (no pickle), with
a SHA-256 content hash over both, so a model trained at week 0 can be loaded on any machine
and maps a week-24 sample exactly as it would have mapped it in the first run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.cluster.metacluster import LINKAGES, consensus_metacluster
from cytopipe.cluster.som import DEFAULT_CHUNK, default_radius, map_to_codes, train_som
from cytopipe.errors import ClusteringError

MODEL_KIND = "cytopipe.flowsom"
FORMAT_VERSION = 1

EventTable = np.ndarray | pd.DataFrame


@dataclass(frozen=True)
class ClusterSettings:
    """How a FlowSOM model is trained. Defaults follow FlowSOM (10x10 grid, rlen 10,
    alpha 0.05 -> 0.01, consensus metaclustering with average linkage, 100 resamples of 90%).

    ``n_metaclusters=None`` chooses k from the consensus CDF (see ``suggest_k``).
    ``cells_per_sample``: cells drawn from each sample for training (equal for all samples);
    ``None`` means ``max_training_cells // n_samples``. ``scale``: centre and scale each marker
    to unit variance on the training cells before the SOM (FlowSOM's ``scale=TRUE``).
    """

    xdim: int = 10
    ydim: int = 10
    rlen: int = 10
    alpha: tuple[float, float] = (0.05, 0.01)
    radius: tuple[float, float] | None = None
    n_metaclusters: int | None = 10
    k_max: int | None = None
    linkage: str = "average"
    consensus_reps: int = 100
    consensus_p_item: float = 0.9
    cells_per_sample: int | None = None
    max_training_cells: int = 200_000
    scale: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        if self.linkage not in LINKAGES:
            raise ClusteringError(f"unknown linkage {self.linkage!r}: use one of {', '.join(LINKAGES)}")
        for name in ("xdim", "ydim", "rlen", "consensus_reps", "max_training_cells"):
            if int(getattr(self, name)) < 1:
                raise ClusteringError(f"clustering setting {name} must be >= 1, got {getattr(self, name)}")
        if self.cells_per_sample is not None and self.cells_per_sample < 1:
            raise ClusteringError(f"cells_per_sample must be >= 1, got {self.cells_per_sample}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alpha"] = list(self.alpha)
        d["radius"] = None if self.radius is None else list(self.radius)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterSettings:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ClusteringError(f"unknown clustering settings: {', '.join(unknown)}")
        if known.get("alpha") is not None:
            known["alpha"] = tuple(known["alpha"])
        if known.get("radius") is not None:
            known["radius"] = tuple(known["radius"])
        return cls(**known)


@dataclass(frozen=True, eq=False)
class ClusterModel:
    """A trained (frozen) FlowSOM model. Codes live in the scaled space when ``center`` /
    ``scale`` are set; ``metacluster_medians`` are in the data's own (transformed) units."""

    markers: list[str]
    codes: np.ndarray  # float32, nodes x markers
    node_metacluster: np.ndarray  # int16, metacluster (1..k) of each node
    center: np.ndarray | None
    scale: np.ndarray | None
    settings: ClusterSettings
    parent: str | None = None
    transforms: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    node_counts: np.ndarray | None = None  # training cells per node
    metacluster_medians: np.ndarray | None = None  # k x markers, training cells
    consensus_curve: pd.DataFrame | None = None
    cytopipe_version: str = ""
    content_hash: str = ""

    @property
    def n_nodes(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_metaclusters(self) -> int:
        return int(self.node_metacluster.max())

    @property
    def xdim(self) -> int:
        return self.settings.xdim

    @property
    def ydim(self) -> int:
        return self.settings.ydim

    def metacluster_labels(self) -> list[str]:
        """Population-style names of the metaclusters: ``MC01`` .. ``MCkk``."""
        return [metacluster_name(i) for i in range(1, self.n_metaclusters + 1)]

    def map(self, events: EventTable, columns: Sequence[str] | None = None, **kw: Any):
        """Shortcut for :func:`map_events`."""
        return map_events(self, events, columns, **kw)


def metacluster_name(i: int) -> str:
    return f"MC{int(i):02d}"


# --- selecting markers and subsampling -----------------------------------------------------------
def marker_columns(
    available: Sequence[str], markers: Sequence[str], sample_id: str | None = None
) -> np.ndarray:
    """Column index of each of ``markers`` among ``available`` (exact name first, then a
    unique case-insensitive match). Raises ClusteringError naming the missing marker."""
    available = [str(a) for a in available]
    lower: dict[str, list[int]] = {}
    for i, a in enumerate(available):
        lower.setdefault(a.strip().lower(), []).append(i)
    idx = []
    for m in markers:
        if available.count(m) == 1:
            idx.append(available.index(m))
            continue
        hits = lower.get(str(m).strip().lower(), [])
        if len(hits) != 1:
            problem = "is missing" if not hits else "matches several columns"
            raise ClusteringError(
                f"clustering marker {m!r} {problem}; the events have columns {available}. "
                "Use the same panel (marker names) as the model was trained on, or retrain.",
                sample=sample_id,
                marker=m,
            )
        idx.append(hits[0])
    return np.asarray(idx, dtype=np.int64)


def _as_matrix(
    events: EventTable, columns: Sequence[str] | None, markers: Sequence[str], sample_id: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """(2-D array, column indices of ``markers``) without copying the events."""
    if isinstance(events, pd.DataFrame):
        cols = marker_columns(list(events.columns), markers, sample_id)
        arr = events.iloc[:, cols].to_numpy(dtype=np.float32)
        return arr, np.arange(len(markers))
    arr = np.asarray(events)
    if arr.ndim != 2:
        raise ClusteringError(f"events must be a 2-D matrix, got shape {arr.shape}", sample=sample_id)
    if columns is None:
        if arr.shape[1] != len(markers):
            raise ClusteringError(
                f"events have {arr.shape[1]} columns but {len(markers)} markers are expected "
                f"({list(markers)}); pass columns= to name them",
                sample=sample_id,
            )
        return arr, np.arange(len(markers))
    if len(columns) != arr.shape[1]:
        raise ClusteringError(
            f"{len(columns)} column names given for events with {arr.shape[1]} columns", sample=sample_id
        )
    return arr, marker_columns(columns, markers, sample_id)


def _sample_seed(seed: int, sample_id: str) -> np.random.Generator:
    digest = hashlib.sha256(str(sample_id).encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def subsample_indices(n_events: int, n: int, seed: int, sample_id: str) -> np.ndarray:
    """Sorted indices of ``n`` events drawn from a sample (all of them if it has <= n).

    The draw depends only on (seed, sample_id, n_events), never on other samples or on the
    order samples are processed, so it can run per sample in parallel.
    """
    if n_events <= n:
        return np.arange(n_events, dtype=np.int64)
    return np.sort(_sample_seed(seed, sample_id).choice(n_events, size=n, replace=False))


def training_cells_per_sample(settings: ClusterSettings, n_samples: int) -> int:
    """Cells drawn per sample for training (equal for every sample)."""
    if settings.cells_per_sample is not None:
        return int(settings.cells_per_sample)
    return max(1, settings.max_training_cells // max(n_samples, 1))


# --- training --------------------------------------------------------------------------------------
def train_model(
    data: Mapping[str, EventTable],
    markers: Sequence[str],
    settings: ClusterSettings | None = None,
    *,
    columns: Sequence[str] | None = None,
    parent: str | None = None,
    transforms: Mapping[str, Any] | None = None,
) -> ClusterModel:
    """Train a FlowSOM model on a balanced subsample of the samples in ``data``.

    ``data`` maps sample_id -> events of the parent population (already compensated and
    transformed): a float array whose columns are ``columns`` (default: ``markers``) or a
    DataFrame with marker columns. Equal numbers of cells are drawn from every sample
    (seeded per sample id; samples with fewer cells give all of them); samples are used in
    sorted sample_id order, so the result never depends on dict order. ``transforms`` (the
    transform settings used upstream) and ``parent`` are recorded in the model.
    """
    from cytopipe import __version__

    settings = settings or ClusterSettings()
    markers = [str(m) for m in markers]
    if not markers:
        raise ClusteringError("no clustering markers given")
    if len(set(markers)) != len(markers):
        raise ClusteringError(f"clustering markers repeat: {markers}")
    if not data:
        raise ClusteringError("no samples to train on")
    n_per = training_cells_per_sample(settings, len(data))
    order = sorted(data, key=str)
    picks = {str(sid): subsample_indices(len(data[sid]), n_per, settings.seed, str(sid)) for sid in order}
    used = {sid: int(idx.size) for sid, idx in picks.items()}
    # gather the training cells column by column into one array (no full-size temporaries)
    train = np.empty((sum(used.values()), len(markers)), dtype=np.float32)
    start = 0
    for sid in order:
        arr, cols = _as_matrix(data[sid], columns, markers, str(sid))
        idx = picks[str(sid)]
        block = train[start : start + idx.size]
        for j, c in enumerate(cols):
            block[:, j] = arr[idx, c]
        if block.size and not np.isfinite(block).all():
            raise ClusteringError(
                "events contain NaN or infinite values on the clustering markers: check transforms",
                sample=str(sid),
            )
        start += idx.size
    if settings.scale:
        center = train.mean(axis=0, dtype=np.float64).astype(np.float32)
        sd = train.std(axis=0, ddof=1, dtype=np.float64).astype(np.float32)
        if np.any(sd == 0):
            flat = [m for m, s in zip(markers, sd) if s == 0]
            raise ClusteringError(f"markers {flat} are constant in the training cells: cannot scale them")
        scaled = (train - center) / sd
    else:
        center, sd, scaled = None, None, train
    codes = train_som(
        scaled,
        xdim=settings.xdim,
        ydim=settings.ydim,
        rlen=settings.rlen,
        alpha=settings.alpha,
        radius=settings.radius,
        seed=settings.seed,
    )
    node_mc, curve = consensus_metacluster(
        codes,
        k=settings.n_metaclusters,
        k_max=settings.k_max,
        reps=settings.consensus_reps,
        p_item=settings.consensus_p_item,
        linkage=settings.linkage,
        seed=settings.seed,
    )
    node_mc = node_mc.astype(np.int16)
    nodes = map_to_codes(train, codes, center=center, scale=sd)
    k = int(node_mc.max())
    mc = node_mc[nodes]
    medians = np.full((k, len(markers)), np.nan, dtype=np.float32)
    for c in range(1, k + 1):
        sel = mc == c
        if sel.any():
            medians[c - 1] = np.median(train[sel], axis=0)
    radius = settings.radius or default_radius(settings.xdim, settings.ydim)
    model = ClusterModel(
        markers=markers,
        codes=codes,
        node_metacluster=node_mc,
        center=center,
        scale=sd,
        settings=settings,
        parent=parent,
        transforms=dict(transforms or {}),
        training={
            "cells_per_sample": n_per,
            "n_cells": int(train.shape[0]),
            "samples": used,
            "radius_used": [float(radius[0]), float(radius[1])],
            "n_metaclusters_chosen": k,
        },
        node_counts=np.bincount(nodes, minlength=codes.shape[0]).astype(np.int64),
        metacluster_medians=medians,
        consensus_curve=curve,
        cytopipe_version=__version__,
    )
    return _with_hash(model)


# --- mapping ---------------------------------------------------------------------------------------
def map_events(
    model: ClusterModel,
    events: EventTable,
    columns: Sequence[str] | None = None,
    *,
    sample_id: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Assign every event to its SOM node and metacluster: returns ``(nodes, metaclusters)``,
    ``int16`` arrays with one entry per event (nodes 0-based, metaclusters 1..k).

    ``events`` may be a whole sample's matrix with ``columns`` naming its columns (marker
    names); the model's markers are picked by name without copying the matrix. Each event is
    mapped on its own, so chunking, order and the number of workers never change the result.
    """
    arr, cols = _as_matrix(events, columns, model.markers, sample_id)
    try:
        nodes = map_to_codes(arr, model.codes, cols, model.center, model.scale, chunk_size=chunk_size)
    except ClusteringError as exc:
        raise ClusteringError(exc.message, **{**exc.context, "sample": sample_id}) from None
    return nodes, model.node_metacluster[nodes]


# --- model file ------------------------------------------------------------------------------------
_ARRAYS = ("codes", "node_metacluster", "center", "scale", "node_counts", "metacluster_medians")


def _header(model: ClusterModel) -> dict[str, Any]:
    curve = None
    if model.consensus_curve is not None:
        curve = {c: [float(v) for v in model.consensus_curve[c]] for c in model.consensus_curve.columns}
    header = {
        "kind": MODEL_KIND,
        "format_version": FORMAT_VERSION,
        "cytopipe_version": model.cytopipe_version,
        "markers": list(model.markers),
        "parent": model.parent,
        "transforms": model.transforms,
        "settings": model.settings.to_dict(),
        "grid": {"xdim": model.xdim, "ydim": model.ydim, "topology": "rectangular", "distance": "chebyshev"},
        "n_metaclusters": model.n_metaclusters,
        "seed": model.settings.seed,
        "training": model.training,
        "consensus_curve": curve,
    }
    # a JSON round trip makes the header exactly what load_model will read (tuples -> lists)
    try:
        return json.loads(json.dumps(header, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ClusteringError(
            f"model metadata (transforms, training) must be plain JSON data: {exc}"
        ) from None


def _arrays(model: ClusterModel) -> dict[str, np.ndarray]:
    out = {}
    for name in _ARRAYS:
        value = getattr(model, name)
        if value is not None:
            out[name] = np.ascontiguousarray(value)
    return out


def _hash(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _with_hash(model: ClusterModel) -> ClusterModel:
    digest = _hash(_header(model), _arrays(model))
    object.__setattr__(model, "content_hash", digest)
    return model


def save_model(model: ClusterModel, path: str | os.PathLike) -> Path:
    """Write the model as one ``.npz`` (plain arrays + JSON header, no pickle); returns the path."""
    path = Path(path)
    header = _header(model)
    arrays = _arrays(model)
    header["content_hash"] = _hash(header, arrays)
    text = json.dumps(header, sort_keys=True, indent=1)
    from cytopipe.files import atomic_write_bytes

    buf = io.BytesIO()  # a file object keeps numpy from appending ".npz"
    np.savez(buf, header=np.array(text), **arrays)
    return atomic_write_bytes(path, buf.getvalue())  # temporary file, fsync, size check, rename


def _curve_frame(curve: Mapping[str, list]) -> pd.DataFrame:
    frame = pd.DataFrame(curve)[["k", "cdf_area", "delta_area", "pac"]]
    return frame.astype({"k": np.int64})


def load_model(path: str | os.PathLike) -> ClusterModel:
    """Read a model file, checking its kind, format version and content hash."""
    path = Path(path)
    if not path.is_file():
        raise ClusteringError("model file not found: train a model first or check the path", file=path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "header" not in npz.files:
                raise ClusteringError("not a cytopipe clustering model (no header)", file=path)
            header = json.loads(str(npz["header"]))
            arrays = {name: npz[name] for name in npz.files if name != "header"}
    except ClusteringError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError, KeyError) as exc:
        raise ClusteringError(
            f"model file is corrupt or unreadable ({type(exc).__name__}: {exc}); retrain or restore it",
            file=path,
        ) from None
    if not isinstance(header, dict) or header.get("kind") != MODEL_KIND:
        raise ClusteringError("not a cytopipe clustering model", file=path)
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ClusteringError(
            f"model format version {version!r} is newer than this cytopipe supports ({FORMAT_VERSION}); "
            "upgrade cytopipe",
            file=path,
        )
    stored = header.pop("content_hash", None)
    if stored != _hash(header, arrays):
        raise ClusteringError(
            "model content hash does not match: the file was modified or damaged; retrain or restore it",
            file=path,
        )
    try:
        curve = header.get("consensus_curve")
        model = ClusterModel(
            markers=list(header["markers"]),
            codes=arrays["codes"],
            node_metacluster=arrays["node_metacluster"],
            center=arrays.get("center"),
            scale=arrays.get("scale"),
            settings=ClusterSettings.from_dict(header["settings"]),
            parent=header.get("parent"),
            transforms=header.get("transforms") or {},
            training=header.get("training") or {},
            node_counts=arrays.get("node_counts"),
            metacluster_medians=arrays.get("metacluster_medians"),
            consensus_curve=None if curve is None else _curve_frame(curve),
            cytopipe_version=header.get("cytopipe_version", ""),
            content_hash=stored,
        )
    except (KeyError, TypeError) as exc:
        raise ClusteringError(f"model file lacks a required field ({exc})", file=path) from None
    if model.codes.shape != (model.n_nodes, len(model.markers)) or model.node_metacluster.shape != (
        model.n_nodes,
    ):
        raise ClusteringError("model arrays do not match its markers / grid", file=path)
    return model
