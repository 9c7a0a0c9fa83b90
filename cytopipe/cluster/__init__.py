"""Unsupervised clustering: FlowSOM (SOM + consensus metaclustering), a frozen model for
new visits, abundances, concordance with gates, embeddings and figures.

Typical use (events already compensated, transformed and gated to the parent population)::

    from cytopipe import cluster

    model = cluster.train_model({"P01_W00": ev1, "P02_W00": ev2}, markers, cluster.ClusterSettings(seed=1),
                                columns=marker_names, parent="CD4 T", transforms=transform_settings)
    cluster.save_model(model, "run/clustering_model.npz")
    model = cluster.load_model("run/clustering_model.npz")       # later, anywhere
    nodes, mc = cluster.map_events(model, ev3, columns=marker_names, sample_id="P03_W24")
    rows = cluster.sample_abundance(model, "P03_W24", mc, ev3, marker_names)

Names are imported lazily so ``import cytopipe.cluster`` does not load matplotlib or umap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # model: training, file, mapping
    "ClusterSettings": "cytopipe.cluster.model",
    "ClusterModel": "cytopipe.cluster.model",
    "train_model": "cytopipe.cluster.model",
    "save_model": "cytopipe.cluster.model",
    "load_model": "cytopipe.cluster.model",
    "map_events": "cytopipe.cluster.model",
    "marker_columns": "cytopipe.cluster.model",
    "subsample_indices": "cytopipe.cluster.model",
    "training_cells_per_sample": "cytopipe.cluster.model",
    "metacluster_name": "cytopipe.cluster.model",
    # building blocks
    "train_som": "cytopipe.cluster.som",
    "map_to_codes": "cytopipe.cluster.som",
    "consensus_metacluster": "cytopipe.cluster.metacluster",
    "consensus_curve": "cytopipe.cluster.metacluster",
    "suggest_k": "cytopipe.cluster.metacluster",
    # outputs
    "sample_abundance": "cytopipe.cluster.abundance",
    "abundance_table": "cytopipe.cluster.abundance",
    "metacluster_medians": "cytopipe.cluster.abundance",
    "model_medians": "cytopipe.cluster.abundance",
    "map_sample": "cytopipe.cluster.abundance",
    "SampleClusters": "cytopipe.cluster.abundance",
    "load_model_cached": "cytopipe.cluster.abundance",
    "f_measure_table": "cytopipe.cluster.concordance",
    "best_matches": "cytopipe.cluster.concordance",
    "best_unions": "cytopipe.cluster.concordance",
    "concordance_summary": "cytopipe.cluster.concordance",
    "contingency_counts": "cytopipe.cluster.concordance",
    "sum_counts": "cytopipe.cluster.concordance",
    "f_measure_from_counts": "cytopipe.cluster.concordance",
    "concordance_from_counts": "cytopipe.cluster.concordance",
    "mean_best_f1": "cytopipe.cluster.concordance",
    "embedding_subsample": "cytopipe.cluster.embed",
    "umap_embedding": "cytopipe.cluster.embed",
    "plot_heatmap": "cytopipe.cluster.plots",
    "plot_mst": "cytopipe.cluster.plots",
    "mst_layout": "cytopipe.cluster.plots",
    "plot_umap": "cytopipe.cluster.plots",
    "plot_consensus_curve": "cytopipe.cluster.plots",
    "plot_concordance": "cytopipe.cluster.plots",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cytopipe.cluster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
