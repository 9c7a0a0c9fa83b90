"""Template-driven hierarchical gating.

::

    import cytopipe
    template = cytopipe.load_template("gating/sle_il2_tcell_nk.yaml")
    result = cytopipe.gate(cytopipe.read_fcs("sample.fcs"), template)
    result.to_population_stats({"sample_id": "P01_W00", "patient_id": "P01", "visit": 0, "arm": "placebo"})

Pooled data-driven gating for a batch (e.g. on Dask, whole samples per task)::

    records = [gate(read_fcs(f), template).fit_records(sid) for sid, f in samples]   # pass 1
    pooled = pool_estimates(pd.concat(records), manifest)                           # small table
    results = [gate(read_fcs(f), template, pooled=pooled, sample_meta=m) for ...]   # pass 2

Values on the gates' axes for any population's events, after gating (the engine does not keep its
compensated, transformed copies)::

    values = result.event_values(sample)              # cytopipe.gating.EventValues
    values.values("CD25", "CD4 T")                    # display scale (e.g. arcsinh), per CD4 T event
    values.matrix(["CD3", "CD4", "CD8"], "Live")      # events x markers, float32

Helpers for code that builds on gating: ``check_transform(spec, where)`` validates a transform
spec (``{type: arcsinh, cofactor: 150}``) into its normalised dict, ``apply_transform(spec, x)``
applies one to a 1-D array exactly as the engine does, ``is_scatter_or_time(name)`` tells scatter
and time channels (never transformed by ``default``) from fluorescence markers, and
``scale_label(spec)`` names a scale for axis labels.
"""

from __future__ import annotations

from cytopipe.gating._adapters import apply_transform, check_transform, is_scatter_or_time
from cytopipe.gating.engine import (
    STATS_COLUMNS,
    Engine,
    GatingResult,
    PooledEstimates,
    PopulationResult,
    gate,
    pool_estimates,
)
from cytopipe.gating.gates import Dim
from cytopipe.gating.loading import load_template
from cytopipe.gating.template import Population, Template, parse_template, template_to_dict
from cytopipe.gating.values import EventValues, scale_label

__all__ = [
    "STATS_COLUMNS",
    "Dim",
    "Engine",
    "EventValues",
    "GatingResult",
    "PooledEstimates",
    "Population",
    "PopulationResult",
    "Template",
    "apply_transform",
    "check_transform",
    "fit_records",
    "gate",
    "is_scatter_or_time",
    "load_template",
    "parse_template",
    "pool_estimates",
    "read_flowjo_workspace",
    "read_gatingml",
    "scale_label",
    "template_to_dict",
    "write_gatingml",
    "write_population_fcs",
]


def fit_records(sample, template, sample_id: str | None = None, **kwargs):
    """Pass 1 of pooled gating: the sample's own fits as a small table (no medians)."""
    return gate(sample, template, medians=False, **kwargs).fit_records(sample_id)


def __getattr__(name: str):
    # Gating-ML and FCS export pull in lxml / the FCS writer: import on first use.
    if name == "read_gatingml":
        from cytopipe.gating.loading import read_gatingml

        return read_gatingml
    if name == "read_flowjo_workspace":
        from cytopipe.gating.flowjo import read_flowjo_workspace

        return read_flowjo_workspace
    if name == "write_gatingml":
        from cytopipe.gating.export import write_gatingml

        return write_gatingml
    if name == "write_population_fcs":
        from cytopipe.gating.export import write_population_fcs

        return write_population_fcs
    raise AttributeError(f"module 'cytopipe.gating' has no attribute {name!r}")
