"""cytopipe: flow-cytometry immunophenotyping for longitudinal clinical trials.

The public API is small and flat; names are imported lazily so that
``import cytopipe`` stays fast::

    import cytopipe
    sample = cytopipe.read_fcs("sample_data/fcs/P001_W00.fcs")
    cytopipe.write_fcs("copy.fcs", sample.events, sample.channels, sample.keywords)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "read_fcs": "cytopipe.fcs",
    "read_fcs_header": "cytopipe.fcs",
    "write_fcs": "cytopipe.fcs",
    "Sample": "cytopipe.fcs",
    "Spillover": "cytopipe.fcs",
    "resolve_markers": "cytopipe.panel",
    "Panel": "cytopipe.panel",
    "load_manifest": "cytopipe.manifest",
    "simulate_trial": "cytopipe.simulate",
    "simulate_cohort": "cytopipe.simulate",
    "compensate": "cytopipe.compensation",
    "Compensation": "cytopipe.compensation",
    "compute_spillover": "cytopipe.compensation",
    "TransformSet": "cytopipe.transforms",
    "estimate_transforms": "cytopipe.transforms",
    "load_template": "cytopipe.gating",
    "gate": "cytopipe.gating",
    "load_clinical": "cytopipe.clinical",
    "derive_endpoints": "cytopipe.clinical",
    "run_statistics": "cytopipe.stats",
    "load_workflow": "cytopipe.workflow",
    "run_workflow": "cytopipe.pipeline",
    "export_anndata": "cytopipe.export",
    "export_fcs": "cytopipe.export",
    "export_population": "cytopipe.export",
}

# subpackages reachable as attributes (imported on first use)
_SUBMODULES = ("errors", "cluster")

__all__ = sorted(_LAZY) + ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"cytopipe.{name}")
    raise AttributeError(f"module 'cytopipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
