"""FlowSOM clustering inside ``cytopipe run`` (and ``cytopipe cluster``): two per-sample passes.

1. ``clustering-train`` (skipped when ``clustering.model`` names a frozen model): every sample's
   seeded, balanced subsample of its parent population's events on the clustering markers
   (drawn by the gating pass: :func:`cytopipe.pipeline.mapinputs.sample_cluster_inputs`, or by
   :func:`cytopipe.pipeline.tasks.train_task`). The client trains one model on them
   (:func:`cytopipe.cluster.train_model`) and writes the frozen model
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

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.config import stable_hash
from cytopipe.errors import ClusteringError, CytopipeError
from cytopipe.pipeline.context import RunContext
from cytopipe.pipeline.state import ClusterPlan, _transform_mismatch, marker_transforms
from cytopipe.pipeline.tasks import map_task, train_task
from cytopipe.schema import COUNT_COLUMNS, NOT_MEASURED, STATS_COLUMNS
from cytopipe.store import CLUSTER_DIR, MODEL_FILE
from cytopipe.store import CLUSTER_FILES as FILES

logger = logging.getLogger(__name__)


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
    if not order:  # no clusters.parquet (nor clustering tables): the run has no clusters to show
        ctx.problems.append("clustering: no sample could be mapped onto the model (see above); no clusters")
        return {"samples": 0, "events": 0, "metaclusters": model.n_metaclusters}
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
    from cytopipe.qc import add_count_qc

    table = abundance_table(frames)
    if table.empty:
        return pd.DataFrame(columns=STATS_COLUMNS + ["metacluster"])
    by_id = {j["sample_id"]: j for j in ctx.jobs}
    for col in ("patient_id", "visit", "arm"):
        table[col] = [by_id[s].get(col) for s in table["sample_id"]]
    table = add_count_qc(_blank_unmeasured_parent(ctx, table), ctx.state.qc)
    medians = sorted(c for c in table.columns if c.startswith("median_"))
    rest = [c for c in table.columns if c not in STATS_COLUMNS and c not in medians and c != "metacluster"]
    return table[STATS_COLUMNS + ["metacluster"] + medians + rest].reset_index(drop=True)


def _blank_unmeasured_parent(ctx: RunContext, table: pd.DataFrame) -> pd.DataFrame:
    """A sample whose clustered population is not measured (a marker its gate needs is not in the
    file) mapped no event: its metaclusters get a missing count and parent count (not 0 of 0 events),
    as the population has in population_stats."""
    ps = ctx.tables.get("population_stats")
    plan = ctx.state.cluster
    if ps is None or plan is None or "gate_source" not in ps.columns:
        return table
    mine = ps[(ps["population"] == plan.population) & (ps["gate_source"].astype(str) == NOT_MEASURED)]
    absent = table["sample_id"].isin(set(mine["sample_id"]))
    if not absent.any():  # a fully measured study: the table as it always was
        return table
    for column in COUNT_COLUMNS:
        table[column] = table[column].astype("Int64").mask(absent)
    table["pct_parent"] = table["pct_parent"].mask(absent)
    return table


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
    """One UMAP of the embedding rows (all samples, sorted), cached by its inputs. When it is not
    cached it is computed on a worker while this process computes the statistics; the
    ``clustering-umap`` step (:func:`step_umap`) then writes it."""
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
    if xy is not None:
        _umap_table(folder, rows, xy)
        return
    kwargs = dict(n_neighbors=n_neighbors, min_dist=float(emb.get("min_dist", 0.1)), seed=plan.settings.seed,
                  center=model.center, scale=model.scale)  # fmt: skip
    ctx.umap = (
        ctx.executor.submit(umap_task, x, list(model.markers), kwargs, desc="umap"),
        key,
        rows,
        folder,
    )


def umap_task(x: np.ndarray, markers: list[str], kwargs: dict[str, Any]) -> tuple[np.ndarray, float]:
    """The UMAP coordinates of ``x`` and the seconds they took (on a worker)."""
    import time

    from cytopipe.cluster import umap_embedding

    t0 = time.perf_counter()
    return umap_embedding(x, markers, **kwargs), time.perf_counter() - t0


def step_umap(ctx: RunContext) -> dict[str, Any]:
    """Wait for the UMAP started by the clustering-map step (computed beside the statistics), cache
    it and write ``clustering/umap.parquet``."""
    if ctx.umap is None:
        return {}
    pending, key, rows, folder = ctx.umap
    ctx.umap = None
    try:
        xy, seconds = pending.result()
    except CytopipeError as exc:
        ctx.problems.append(f"clustering: no UMAP: {exc}")
        return {}
    except Exception as exc:  # the worker died: the run's tables stand without the embedding
        logger.error("the UMAP task failed", exc_info=exc)
        ctx.problems.append(f"clustering: no UMAP: {type(exc).__name__}: {exc}")
        return {}
    ctx.folder.save_cached("umap", key, "npy", xy)
    _umap_table(folder, rows, xy)
    return {"umap_seconds": round(seconds, 3)}


def _umap_table(folder: Path, rows: pd.DataFrame, xy: np.ndarray) -> None:
    from cytopipe.cluster.model import metacluster_name
    from cytopipe.store import atomic_write_parquet

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
