"""FlowSOM clustering inside ``cytopipe run`` (and ``cytopipe cluster``): two per-sample passes.

1. ``clustering-train`` (skipped when ``clustering.model`` names a frozen model): every sample is
   re-read and gated on a worker exactly as in the gating pass, and returns a seeded, balanced
   subsample of its parent population's events on the clustering markers (transformed values,
   ``cells_per_sample`` rows: :func:`cytopipe.cluster.subsample_indices`). The client trains one
   model on them (:func:`cytopipe.cluster.train_model`) and writes the frozen model
   ``RUN_DIR/clustering/model.npz``. The subsample is drawn per sample with the draw
   ``train_model`` itself makes, so the model is the one ``train_model`` gives on the full
   parent populations.
2. ``clustering-map``: every sample again; the worker maps EVERY event of its parent population
   onto the frozen model (loaded once per worker process from the model file) and returns only
   small tables: its abundance rows, its cells per SOM node, the contingency counts of
   metaclusters x gated populations (for the concordance F-measures) and a few embedding rows
   (transformed values, metacluster, gated population) for the UMAP. The client adds them up.

Results are cached like the gating pass (file sha256 + every setting that affects them + the
model's content hash), so reruns and resumed runs redo nothing that is done, and the outputs do
not depend on the scheduler or the number of workers.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cytopipe.config import stable_hash
from cytopipe.errors import ClusteringError, CytopipeError, WorkflowError

if TYPE_CHECKING:  # pragma: no cover
    from cytopipe.pipeline import RunContext

CLUSTER_DIR = "clustering"
MODEL_FILE = "model.npz"
#: files of RUN_DIR/clustering/ (besides the model) and what they hold
FILES = {
    "nodes": "nodes.parquet",  # node, metacluster, grid position, cells mapped, training cells
    "metaclusters": "metaclusters.parquet",  # metacluster, cells, % of clustered cells, training medians
    "concordance": "concordance.parquet",  # population x metacluster: counts, precision, recall, F1
    "concordance_summary": "concordance_summary.parquet",  # per population: best match, best union
    "umap": "umap.parquet",  # sample_id, x, y, metacluster, population (a seeded subsample)
}


# ================================================================================================
# the plan shipped to the workers (small)
# ================================================================================================
@dataclass
class ClusterPlan:
    """What the clustering tasks do; part of the study state broadcast to the workers."""

    population: str  # the gated parent population whose events are clustered
    markers: list[str]  # clustering markers, in model order
    medians: list[str]  # markers of the median_<marker> columns of clusters.parquet (linear)
    settings: Any  # cytopipe.cluster.ClusterSettings
    transforms: dict[str, Any]  # marker -> transform spec (recorded in the model)
    concordance: list[str]  # gated populations below the parent, template order
    given_model: str | None = None  # clustering.model: map onto it, no training
    model_path: str | None = None  # the model the map pass uses (set by the train step)
    n_train: int = 0  # training cells per sample
    n_embed: int = 0  # embedding cells per sample (0: no embedding)
    embedding: dict[str, Any] = field(default_factory=dict)
    inputs_dir: str | None = None  # where the gating passes write each sample's mapping inputs
    inputs_key: str = ""  # names them: gating settings, pooled estimates and this plan

    def train_key(self) -> str:
        return stable_hash(["train", self.population, self.markers, self.n_train, self.settings.seed])

    def map_key(self, model_hash: str) -> str:
        return stable_hash(
            [
                "map",
                model_hash,
                self.population,
                self.medians,
                self.concordance,
                self.n_embed,
                self.settings.seed,
            ]
        )


def plan_clustering(wf: Any, template: Any, transforms: Mapping[str, Any]) -> ClusterPlan | None:
    """Validate the workflow's ``clustering:`` section against the template (and the frozen model,
    when one is given); None when clustering is off. Errors are WorkflowErrors naming the key."""
    from cytopipe.cluster import ClusterSettings, load_model
    from cytopipe.gating import is_scatter_or_time

    c = wf.clustering
    if not c.get("enabled"):
        return None
    file = wf.spec_path
    names = list(template.names)
    population = c.get("population") or "Live"
    if population not in names:
        near = difflib.get_close_matches(population, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; populations are {', '.join(names)}"
        raise WorkflowError(
            f"the template has no population {population!r}{hint}", file=file, key="clustering.population"
        )
    markers = list(c.get("markers") or [])
    given = c.get("model")
    if given is not None:
        try:
            model = load_model(given)
        except ClusteringError as exc:
            raise WorkflowError(exc.message, file=file, key="clustering.model") from None
        if markers and markers != list(model.markers):
            raise WorkflowError(
                f"the model was trained on markers {model.markers}, not {markers}; remove clustering.markers "
                "(the model's are used) or retrain",
                file=file,
                key="clustering.markers",
            )
        if model.parent and model.parent != population:
            raise WorkflowError(
                f"the model was trained on the events of {model.parent!r}, not {population!r}; set "
                f"clustering.population: {model.parent}",
                file=file,
                key="clustering.population",
            )
        markers = list(model.markers)
    if not markers:
        markers = [m for m in template.markers() if not is_scatter_or_time(m)]
    if len(set(markers)) != len(markers):
        raise WorkflowError(f"clustering markers repeat: {markers}", file=file, key="clustering.markers")
    if len(markers) < 2:
        raise WorkflowError("clustering needs at least 2 markers", file=file, key="clustering.markers")
    grid = list(c.get("grid") or [10, 10])
    if len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] < 2:
        raise WorkflowError(
            f"grid must be [x, y] with at least 2 nodes, not {grid}", file=file, key="clustering.grid"
        )
    k = c.get("metaclusters", 10)
    k = None if k == "auto" else int(k)
    if k is not None and k > grid[0] * grid[1]:
        raise WorkflowError(
            f"{k} metaclusters need at least as many SOM nodes (the grid has {grid[0] * grid[1]})",
            file=file,
            key="clustering.metaclusters",
        )
    seed = c.get("seed")
    try:
        settings = ClusterSettings(
            xdim=int(grid[0]),
            ydim=int(grid[1]),
            rlen=int(c.get("rlen") or 10),
            n_metaclusters=k,
            k_max=min(int(c.get("k_max") or 20), grid[0] * grid[1]),
            linkage=c.get("linkage") or "average",
            cells_per_sample=c.get("cells_per_sample"),
            max_training_cells=int(c.get("max_training_cells") or 200_000),
            scale=bool(c.get("scale")),
            seed=int(wf.seed if seed is None else seed),
        )
    except ClusteringError as exc:
        raise WorkflowError(exc.message, file=file, key="clustering") from None
    embedding = dict(c.get("embedding") or {})
    return ClusterPlan(
        population=population,
        markers=markers,
        medians=list(template.median_markers()),
        settings=settings,
        transforms=marker_transforms(template, transforms, markers),
        concordance=template.descendants(population),
        given_model=None if given is None else str(given),
        embedding=embedding,
    )


def marker_transforms(template: Any, transforms: Mapping[str, Any], markers: list[str]) -> dict[str, Any]:
    """The transform of each clustering marker (recorded in the model): a run-level (e.g.
    study-locked) transform, else the template's axis transform; None = linear."""
    import json

    out = {}
    for m in markers:
        dim = template.dimension(m)
        spec = transforms.get(m) or (template.transforms.get(dim.transform) if dim.transform else None)
        out[m] = json.loads(json.dumps(spec)) if spec is not None else None  # as a model file stores it
    return out


def _transform_mismatch(model: Any, plan: ClusterPlan) -> str:
    """Why the frozen model's values are not this run's (markers whose transform differs), or ''."""
    recorded = model.transforms or {}
    diff = [m for m in model.markers if m in recorded and recorded[m] != plan.transforms.get(m)]
    if not diff:
        return ""
    m = diff[0]
    return (
        f"the frozen model was trained on {m} transformed with {recorded[m]}, this run transforms it with "
        f"{plan.transforms.get(m)} (markers that differ: {', '.join(diff)}); its clusters would not mean the "
        "same cells. Use the model's transforms (transforms.params) or retrain"
    )


# ================================================================================================
# per-sample tasks (on the workers)
# ================================================================================================
def _gated(job: Mapping[str, Any], state: Any) -> tuple[Any, Any]:
    """The sample after event QC and its gating, exactly as in the gating pass."""
    from cytopipe.pipeline import gate_prepared, prepare_sample

    prep = prepare_sample(job, state)
    return prep, gate_prepared(prep, state, medians=False)


def sample_cluster_inputs(job: Mapping[str, Any], state: Any, prep: Any, result: Any) -> dict[str, Any]:
    """From a sample's gating pass (on its worker): its training cells (as :func:`train_task`
    draws them) and its mapping inputs, written to ``plan.inputs_dir`` (parent events x
    clustering markers, transformed; x median markers, linear; membership of the concordance
    populations), so that neither clustering pass reads and gates the file again. A problem
    here is not the sample's failure: the clustering passes then do the work themselves."""
    plan: ClusterPlan = state.cluster
    out: dict[str, Any] = {}
    try:
        idx = result.indices(plan.population)
        values = result.event_values(prep.sample)
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
# (compensated, untransformed) values of the median markers and then of the clustering markers
# not among them, with the transform of each clustering marker, and the concordance memberships
# as bits. The transformed values are recomputed from the linear ones on load: the transforms
# are elementwise, so they are the bytes the gating pass would have written (half the bytes per
# event of storing both; a quantised copy would change the clusters, so none is kept).
_MAP_CHUNK = 1 << 16  # events per written block: the file is written without a full matrix in memory


def _map_columns(plan: ClusterPlan) -> list[str]:
    return list(plan.medians) + [m for m in plan.markers if m not in plan.medians]


def _write_map_inputs(path: Path, plan: ClusterPlan, values: Any, result: Any, idx: np.ndarray) -> None:
    import json
    import os

    cols = _map_columns(plan)
    specs = [values.transform_spec(m) for m in plan.markers]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # renamed when complete
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, np.array(json.dumps({"columns": cols, "specs": specs}, default=float)))
            shape = (len(idx), len(cols))
            np.lib.format.write_array_header_1_0(
                fh,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                    "fortran_order": False,
                    "shape": shape,
                },
            )
            for s in range(0, len(idx), _MAP_CHUNK):  # peak memory: one block, not the matrix
                block = values.matrix(cols, events=idx[s : s + _MAP_CHUNK], transformed=False)
                fh.write(block.astype("<f4", copy=False).tobytes())
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
        with open(Path(plan.inputs_dir) / name, "rb") as fh:
            meta = json.loads(str(np.load(fh, allow_pickle=False)))
            values = np.load(fh, allow_pickle=False)
            bits = np.load(fh, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    cols, n = meta.get("columns"), len(values)
    if cols != _map_columns(plan) or values.shape != (n, len(cols)) or bits.shape[0] != len(plan.concordance):
        return None
    masks = np.unpackbits(bits, axis=1, count=n).astype(bool) if len(plan.concordance) else None
    x = np.empty((n, len(plan.markers)), dtype=np.float32)
    for j, (m, spec) in enumerate(zip(plan.markers, meta["specs"])):
        # a contiguous column, as the gating pass transformed it (numpy's SIMD loops see the same input)
        x[:, j] = apply_transform(spec, np.ascontiguousarray(values[:, cols.index(m)]))
    k = len(plan.medians)
    linear = values[:, :k] if k == len(cols) or k == 0 else np.ascontiguousarray(values[:, :k])
    return x, linear, {p: masks[i] for i, p in enumerate(plan.concordance)}


def train_task(job: dict[str, Any], state: Any) -> dict[str, Any]:
    """The sample's training cells: a seeded subsample of its parent population (transformed
    values of the clustering markers; at most ``n_train`` rows)."""
    from cytopipe.pipeline import _guard

    def body() -> dict[str, Any]:
        from cytopipe.cluster import subsample_indices

        plan: ClusterPlan = state.cluster
        prep, result = _gated(job, state)
        idx = result.indices(plan.population)
        pick = subsample_indices(len(idx), plan.n_train, plan.settings.seed, str(job["sample_id"]))
        values = result.event_values(prep.sample).matrix(plan.markers, events=idx[pick])
        return {"train": values, "n_parent": int(len(idx)), "metrics": prep.metrics}

    return _guard(body)


def map_task(job: dict[str, Any], state: Any) -> dict[str, Any]:
    """Every parent-population event of the sample mapped onto the frozen model; only small
    tables come back (abundance rows, node counts, concordance counts, embedding rows)."""
    from cytopipe.pipeline import _guard

    def body() -> dict[str, Any]:
        from cytopipe.cluster import contingency_counts, load_model_cached, map_events, sample_abundance
        from cytopipe.cluster.model import subsample_indices

        plan: ClusterPlan = state.cluster
        sid = str(job["sample_id"])
        model = load_model_cached(plan.model_path)
        inputs = _load_map_inputs(job, plan, model)
        if inputs is not None:  # written by the gating pass: no read, no gating
            x, linear, masks = inputs
        else:
            prep, result = _gated(job, state)
            idx = result.indices(plan.population)
            values = result.event_values(prep.sample)
            x = values.matrix(model.markers, events=idx)  # parent events x clustering markers
            linear = values.matrix(plan.medians, events=idx, transformed=False)
            masks = {p: result.mask(p)[idx] for p in plan.concordance}
            del prep, result, values
        nodes, mc = map_events(model, x, model.markers, sample_id=sid)
        abundance = sample_abundance(
            model, sid, mc, linear, plan.medians, markers=plan.medians, parent=plan.population
        )
        k = model.n_metaclusters
        counts = contingency_counts(mc, masks, cluster_ids=range(1, k + 1)) if masks else None
        n_parent = len(x)
        out: dict[str, Any] = {
            "abundance": abundance,
            "nodes": np.bincount(nodes, minlength=model.n_nodes).astype(np.int64),
            "n_parent": int(n_parent),
            "inputs": "read" if inputs is None else "gating",
        }
        if counts is not None:
            out["concordance"] = counts
        if plan.n_embed:
            pick = subsample_indices(n_parent, plan.n_embed, plan.settings.seed, f"embed:{sid}")
            label = np.full(len(pick), plan.population, dtype=object)
            for p in plan.concordance:  # template order: the deepest (last) gate containing the cell wins
                label[masks[p][pick]] = p
            emb = pd.DataFrame(x[pick], columns=list(model.markers))
            emb["metacluster"] = mc[pick].astype(np.int16)
            emb["population"] = label.astype(str)
            out["embedding"] = emb
        return out

    return _guard(body)


# ================================================================================================
# the steps (on the client)
# ================================================================================================
def step_cluster_train(ctx: RunContext) -> dict[str, Any]:
    """Train the FlowSOM model on balanced subsamples (or take the frozen model given)."""
    from cytopipe.cluster import load_model

    plan: ClusterPlan | None = ctx.state.cluster
    if plan is None:
        return {"enabled": False}
    folder = ctx.folder.path / CLUSTER_DIR
    target = folder / MODEL_FILE
    # the transforms are final now (a study estimate is locked by the transforms step)
    plan.transforms = marker_transforms(ctx.state.template, ctx.state.transforms, plan.markers)
    if plan.given_model is not None:
        from cytopipe.store import atomic_write_bytes

        given = load_model(plan.given_model)
        why = _transform_mismatch(given, plan)
        if why:
            ctx.problems.append(f"clustering: {why}")
            ctx.state.cluster = None
            return {"model": None}
        data = Path(plan.given_model).read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
        model = load_model(target)
        plan.model_path = str(target)
        ctx.cluster_model = model
        ctx.hashes["cluster_model"] = model.content_hash
        return {"model": "given", "source": plan.given_model, "model_hash": model.content_hash}
    alive = ctx.alive()
    if not alive:
        ctx.problems.append("clustering: no sample to train on")
        ctx.state.cluster = None
        return {"model": None}
    from cytopipe.cluster import training_cells_per_sample

    plan.n_train = training_cells_per_sample(plan.settings, len(alive))
    plan.settings = replace(plan.settings, cells_per_sample=plan.n_train)
    key = ctx.gate_key() + plan.train_key()[:16]
    ready = {  # drawn by the gating pass, when it drew as many cells as are needed now
        sid: {"train": res["train"], "n_parent": res["train_n_parent"], "metrics": res["metrics"]}
        for sid, res in ctx.results.items()
        if res.get("train_key") == plan.train_key() and "train" in res
    }
    results = _soft_phase(
        ctx, "cluster-train", train_task, stable_hash(key), "clustering (training)", ready=ready
    )
    data = {sid: results[sid]["train"] for sid in sorted(results)}
    if not data or sum(len(v) for v in data.values()) < plan.settings.xdim * plan.settings.ydim:
        n = sum(len(v) for v in data.values())
        ctx.problems.append(
            f"clustering: only {n} training cells of {plan.population!r} for a "
            f"{plan.settings.xdim}x{plan.settings.ydim} SOM; no clusters (check the gating, or use a smaller grid)"
        )
        ctx.state.cluster = None
        return {"model": None, "training_cells": n}
    model_key = stable_hash([sorted((sid, ctx.result_key("cluster-train", sid)) for sid in data), plan.train_key(),
                             plan.settings.to_dict(), plan.transforms])[:32]  # fmt: skip
    ctx.keep_cache["cluster-model"] = {model_key}
    cached = ctx.folder.cached("cluster-model", model_key, "npz")
    model = None
    if cached.is_file():
        try:
            model = load_model(cached)
        except ClusteringError:
            model = None  # a damaged cache entry is retrained
    trained = model is None
    if model is None:
        from cytopipe.cluster import save_model, train_model

        try:
            model = train_model(
                data, plan.markers, plan.settings, parent=plan.population, transforms=plan.transforms
            )
        except ClusteringError as exc:
            ctx.problems.append(f"clustering: training failed: {exc}")
            ctx.state.cluster = None
            return {"model": None}
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, cached)
    folder.mkdir(parents=True, exist_ok=True)
    from cytopipe.store import atomic_write_bytes

    atomic_write_bytes(target, cached.read_bytes())
    plan.model_path = str(target)
    ctx.cluster_model = model
    ctx.hashes["cluster_model"] = model.content_hash
    return {
        "model": "trained" if trained else "trained (reused)",
        "model_hash": model.content_hash,
        "training_cells": int(sum(len(v) for v in data.values())),
        "cells_per_sample": plan.n_train,
        "metaclusters": model.n_metaclusters,
        "reused": ctx.reused.get("cluster-train", 0),
        "from_gating": ctx.reused.get("cluster-train-ready", 0),  # drawn by the gating pass
    }


def step_cluster_map(ctx: RunContext) -> dict[str, Any]:
    """Map every parent event of every sample; clusters.parquet and RUN_DIR/clustering/ tables."""
    plan: ClusterPlan | None = ctx.state.cluster
    model = ctx.cluster_model
    if plan is None or model is None:
        return {"enabled": plan is not None}
    alive = ctx.alive()
    emb = plan.embedding
    plan.n_embed = (
        max(1, int(emb.get("cells", 5000)) // max(len(alive), 1)) if emb.get("enabled", True) else 0
    )
    key = stable_hash(ctx.gate_key() + plan.map_key(model.content_hash)[:16])
    for job in alive:  # the inputs the sample's gating pass wrote (if any)
        job["map_inputs"] = ctx.results.get(job["sample_id"], {}).get("map_inputs")
    results = _soft_phase(ctx, "cluster-map", map_task, key, "clustering (mapping)")
    order = sorted(results)
    folder = ctx.folder.path / CLUSTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ctx.tables["clusters"] = assemble_clusters(ctx, [results[s]["abundance"] for s in order])
    write_cluster_tables(ctx, model, plan, [results[s] for s in order], order)
    return {
        "samples": len(order),
        "events": int(sum(results[s]["n_parent"] for s in order)),
        "metaclusters": model.n_metaclusters,
        "reused": ctx.reused.get("cluster-map", 0),
        "from_gating": sum(1 for s in order if results[s].get("inputs") == "gating"),
    }


def _soft_phase(
    ctx: RunContext, phase: str, fn: Any, key: str, what: str, ready: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """A cached per-sample phase whose failures do not fail the sample (its gating stands): they
    are recorded as run problems and the sample is left out of the clusters."""
    results = ctx.run_phase(phase, fn, key, soft=True, ready=ready)
    for sid, failure in sorted(ctx.soft_failures.get(phase, {}).items()):
        ctx.problems.append(f"{what}: sample {sid} left out: {failure}")
    return results


def assemble_clusters(ctx: RunContext, frames: list[pd.DataFrame]) -> pd.DataFrame:
    """clusters.parquet: the population_stats columns (population = metacluster), then
    metacluster, median_<marker> (compensated, linear) and the count QC columns."""
    from cytopipe.cluster import abundance_table
    from cytopipe.pipeline import STATS_COLUMNS
    from cytopipe.qc import add_count_qc

    table = abundance_table(frames)
    if table.empty:
        return pd.DataFrame(columns=STATS_COLUMNS + ["metacluster"])
    by_id = {j["sample_id"]: j for j in ctx.jobs}
    for col in ("patient_id", "visit", "arm"):
        table[col] = [by_id[s].get(col) for s in table["sample_id"]]
    table = add_count_qc(table, ctx.state.qc)
    medians = sorted(c for c in table.columns if c.startswith("median_"))
    rest = [c for c in table.columns if c not in STATS_COLUMNS and c not in medians and c != "metacluster"]
    return table[STATS_COLUMNS + ["metacluster"] + medians + rest].reset_index(drop=True)


def write_cluster_tables(
    ctx: RunContext, model: Any, plan: ClusterPlan, results: list[dict[str, Any]], order: list[str]
) -> None:
    """RUN_DIR/clustering/: nodes, metaclusters, concordance (+ summary) and the UMAP."""
    from cytopipe.cluster import concordance_from_counts, f_measure_from_counts, model_medians, sum_counts
    from cytopipe.cluster.model import metacluster_name
    from cytopipe.store import atomic_write_parquet

    folder = ctx.folder.path / CLUSTER_DIR
    k = model.n_metaclusters
    cells = np.zeros(model.n_nodes, dtype=np.int64)
    for r in results:
        cells += np.asarray(r["nodes"], dtype=np.int64)
    node_mc = model.node_metacluster.astype(np.int64)
    nodes = pd.DataFrame(
        {
            "node": np.arange(model.n_nodes, dtype=np.int64),
            "metacluster": [metacluster_name(c) for c in node_mc],
            "grid_x": np.arange(model.n_nodes) % model.xdim,
            "grid_y": np.arange(model.n_nodes) // model.xdim,
            "cells": cells,
            "training_cells": np.asarray(
                model.node_counts if model.node_counts is not None else np.zeros(model.n_nodes),
                dtype=np.int64,
            ),
        }
    )
    atomic_write_parquet(folder / FILES["nodes"], nodes)
    per_mc = np.bincount(node_mc - 1, weights=cells, minlength=k).astype(np.int64)
    medians = model_medians(model).drop(columns="count")
    mcs = pd.DataFrame(
        {
            "metacluster": model.metacluster_labels(),
            "cells": per_mc,
            "pct_cells": 100.0 * per_mc / max(per_mc.sum(), 1),
        }
    )
    for m in medians.columns:
        mcs[f"median_{m}"] = medians[m].to_numpy()
    atomic_write_parquet(folder / FILES["metaclusters"], mcs)
    counts = sum_counts(r["concordance"] for r in results if "concordance" in r)
    for name in ("concordance", "concordance_summary", "umap"):
        (folder / FILES[name]).unlink(missing_ok=True)  # a previous run's tables must not linger
    if len(counts):
        f = f_measure_from_counts(counts)
        f.insert(1, "metacluster", [metacluster_name(c) for c in f["cluster"]])
        atomic_write_parquet(folder / FILES["concordance"], f.drop(columns="cluster"))
        summary = concordance_from_counts(counts)
        summary["best_cluster"] = [metacluster_name(c) for c in summary["best_cluster"]]
        summary["union_clusters"] = [
            "+".join(metacluster_name(int(c)) for c in str(u).split("+") if c)
            for u in summary["union_clusters"]
        ]
        summary = summary.rename(
            columns={"best_cluster": "best_metacluster", "union_clusters": "union_metaclusters"}
        )
        atomic_write_parquet(folder / FILES["concordance_summary"], summary)
    frames = [r["embedding"].assign(sample_id=sid) for r, sid in zip(results, order) if "embedding" in r]
    if frames:
        _write_umap(ctx, model, plan, pd.concat(frames, ignore_index=True), folder)


def _write_umap(ctx: RunContext, model: Any, plan: ClusterPlan, rows: pd.DataFrame, folder: Path) -> None:
    """One UMAP of the embedding rows (all samples, sorted), cached by its inputs."""
    from cytopipe.cluster.model import metacluster_name
    from cytopipe.store import atomic_write_parquet

    emb = plan.embedding
    n_neighbors = int(emb.get("neighbors", 15))
    if len(rows) <= n_neighbors + 1:
        ctx.problems.append(f"clustering: only {len(rows)} cells for the UMAP; no embedding drawn")
        return
    x = rows[list(model.markers)].to_numpy(dtype=np.float32)
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
    key = stable_hash(
        [model.content_hash, digest, n_neighbors, emb.get("min_dist", 0.1), plan.settings.seed]
    )[:32]
    ctx.keep_cache["umap"] = {key}
    xy = ctx.folder.load_cached("umap", key, "npy")
    if xy is None:
        from cytopipe.cluster import umap_embedding

        try:
            xy = umap_embedding(
                x,
                list(model.markers),
                n_neighbors=n_neighbors,
                min_dist=float(emb.get("min_dist", 0.1)),
                seed=plan.settings.seed,
                center=model.center,
                scale=model.scale,
            )
        except CytopipeError as exc:
            ctx.problems.append(f"clustering: no UMAP: {exc}")
            return
        ctx.folder.save_cached("umap", key, "npy", xy)
    out = pd.DataFrame(
        {
            "sample_id": rows["sample_id"].astype(str),
            "x": xy[:, 0].astype(np.float32),
            "y": xy[:, 1].astype(np.float32),
            "metacluster": [metacluster_name(int(c)) for c in rows["metacluster"]],
            "population": rows["population"].astype(str),
        }
    )
    atomic_write_parquet(folder / FILES["umap"], out)
