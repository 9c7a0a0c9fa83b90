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
"""

from __future__ import annotations

from cytopipe.gating.engine import (
    STATS_COLUMNS,
    Engine,
    GatingResult,
    PooledEstimates,
    PopulationResult,
    gate,
    pool_estimates,
)
from cytopipe.gating.template import Population, Template, load_template, parse_template, template_to_dict

__all__ = [
    "STATS_COLUMNS",
    "Engine",
    "GatingResult",
    "PooledEstimates",
    "Population",
    "PopulationResult",
    "Template",
    "fit_records",
    "gate",
    "load_template",
    "parse_template",
    "pool_estimates",
    "read_flowjo_workspace",
    "read_gatingml",
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
        from cytopipe.gating.gatingml import read_gatingml

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
