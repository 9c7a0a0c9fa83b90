"""A sample's clustering inputs, drawn on its worker from its gating pass: the training cells and
the mapping-inputs file (``RUN_DIR/.cache/map-inputs/``), written by the gating task and read by
:func:`cytopipe.pipeline.tasks.map_task`, so that neither clustering pass reads and gates the file
again."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cytopipe.directio import DirectReader, DirectWriter
from cytopipe.errors import CytopipeError
from cytopipe.pipeline.state import ClusterPlan


def sample_cluster_inputs(
    job: Mapping[str, Any], state: Any, prep: Any, result: Any, values: Any = None
) -> dict[str, Any]:
    """From a sample's gating pass (on its worker): its training cells (as :func:`train_task`
    draws them) and its mapping inputs, written to ``plan.inputs_dir`` (parent events x
    clustering markers, transformed; x median markers, linear; membership of the concordance
    populations), so that neither clustering pass reads and gates the file again. A problem
    here is not the sample's failure: the clustering passes then do the work themselves."""
    plan: ClusterPlan = state.cluster
    out: dict[str, Any] = {}
    try:
        idx = result.indices(plan.population)
        values = values if values is not None else result.event_values(prep.sample)
        if plan.n_train:
            from cytopipe.cluster import subsample_indices

            pick = subsample_indices(len(idx), plan.n_train, plan.settings.seed, str(job["sample_id"]))
            out["train"] = values.matrix(plan.markers, events=idx[pick])
            out["train_key"] = plan.train_key()
            out["train_n_parent"] = int(len(idx))
        if plan.inputs_dir:
            name = f"{job['sha256'][:32]}-{plan.inputs_key}.npy"
            _write_map_inputs(Path(plan.inputs_dir) / name, plan, values, result, idx)
            out["map_inputs"] = name
    except (CytopipeError, OSError, MemoryError):
        return {}
    return out


# Mapping inputs on disk (RUN_DIR/.cache/map-inputs/, removed when mapping ends): the linear
# (compensated, untransformed) values of the median markers the file carries and then of the
# clustering markers not among them, with the transform of each clustering marker, and the
# concordance memberships as bits. The transformed values are recomputed on load: the transforms
# are elementwise, so they are the bytes the gating pass would have written (half the bytes per
# event of storing both; a quantised copy would change the clusters, so none is kept). Stored
# markers x events (layout "columns"): each marker's values are contiguous, as the engine
# compensates them, so writing is one gather per marker and block, and the mapping pass
# transforms and summarises contiguous columns with no transposed copy of the matrix.
_MAP_CHUNK = 1 << 16  # events per written block: the file is written without a full matrix in memory
_LAYOUT = "columns"  # markers x events (an older run's file of events x markers is not read: redone)


def _map_columns(plan: ClusterPlan, measured: list[str] | None = None) -> list[str]:
    """The median markers (``measured``: those the file carries), then the other clustering markers."""
    medians = plan.medians if measured is None else measured
    return list(medians) + [m for m in plan.markers if m not in plan.medians]


def _write_map_inputs(path: Path, plan: ClusterPlan, values: Any, result: Any, idx: np.ndarray) -> None:
    import json
    import os

    cols = _map_columns(plan, plan.measured_medians(result.channel_of))
    specs = [values.transform_spec(m) for m in plan.markers]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # renamed when complete
    try:
        with DirectWriter(tmp) as fh:  # no page-cache copy: see cytopipe.directio
            header = {"columns": cols, "specs": specs, "layout": _LAYOUT}
            np.save(fh, np.array(json.dumps(header, default=float)))
            np.lib.format.write_array_header_1_0(
                fh,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                    "fortran_order": False,
                    "shape": (len(cols), len(idx)),
                },
            )
            for m in cols:  # peak memory: one block of one marker, not the matrix
                for s in range(0, len(idx), _MAP_CHUNK):
                    block = values.linear(m, events=idx[s : s + _MAP_CHUNK])
                    fh.write(memoryview(block.astype("<f4", copy=False)).cast("B"))  # no bytes copy
            masks = np.zeros((len(plan.concordance), len(idx)), dtype=bool)
            for i, p in enumerate(plan.concordance):
                masks[i] = result.mask(p)[idx]
            np.save(fh, np.packbits(masks, axis=1))
        os.replace(tmp, path)
    except BaseException:
        # a full disk (or any failure) leaves no partial file behind: the run's orphan
        # cleanup only runs at the next run's start
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_map_inputs(job: Mapping[str, Any], plan: ClusterPlan, model: Any):
    """(x, linear, masks) written by the sample's gating pass, or None (then: read and gate)."""
    import json

    from cytopipe.gating import apply_transform

    name = job.get("map_inputs")
    if not name or not plan.inputs_dir or list(model.markers) != list(plan.markers):
        return None
    try:
        with DirectReader(Path(plan.inputs_dir) / name) as fh:  # written with direct I/O: read so
            meta = json.loads(str(np.load(fh, allow_pickle=False)))
            values = np.load(fh, allow_pickle=False)
            bits = np.load(fh, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    cols = meta.get("columns")
    n = values.shape[1] if values.ndim == 2 else -1
    measured = [c for c in cols if c in plan.medians] if isinstance(cols, list) else []
    cols_ok = cols == _map_columns(plan, measured)  # the median markers the file lacks are not in it
    if meta.get("layout") != _LAYOUT or not cols_ok or values.shape != (len(cols), n):
        return None
    if bits.shape[0] != len(plan.concordance):
        return None
    masks = np.unpackbits(bits, axis=1, count=n).view(bool) if len(plan.concordance) else None
    # each clustering marker's contiguous column transformed as the gating pass transformed it
    # (the same elementwise code on contiguous values); x and linear are returned as views,
    # events x markers, of markers x events arrays (no transposed copy)
    x = np.empty((len(plan.markers), n), dtype=np.float32)
    for j, spec in enumerate(meta["specs"]):
        x[j] = apply_transform(spec, values[cols.index(plan.markers[j])])
    linear = values[: len(measured)].T
    return x.T, plan.median_matrix(linear, measured), {p: masks[i] for i, p in enumerate(plan.concordance)}
