"""Workflow specs: one YAML file describing a study run.

A workflow names the study's inputs (manifest, clinical table, gating template), how to
compensate and transform, the QC settings, the clustering and statistics settings used by
later steps, where to write the run folder, how many workers and the random seed::

    study: SLE IL-2 (simulated sample data)
    manifest: ../sample_data/manifest.csv
    template: ../gating/sle_il2_tcell_nk.yaml
    output: ../runs/sle_il2

Paths are relative to the spec file. :func:`load_workflow` validates everything up front:
an unknown key (with a did-you-mean), a wrong type or a missing file is a
:class:`~cytopipe.errors.WorkflowError` naming the key or path, before any work starts.
The same :class:`Workflow` is built from command-line options by :func:`workflow_from_options`.

The schema is a table (:data:`SCHEMA`): later steps add their keys there.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cytopipe.config import MAX_GALLERY, Field, Schema, jsonable, stable_hash, validate_section
from cytopipe.errors import WorkflowError
from cytopipe.qc import QC_SCHEMA

# --- sections -------------------------------------------------------------------------------
COMPENSATION: Schema = {
    "source": Field(
        str,
        "template",
        "where the spillover matrix comes from: 'template' (as the gating template says), 'file' "
        "($SPILLOVER/SPILL of each FCS file), 'csv' (one matrix for the study, `path`), 'controls' "
        "(computed from the manifest's single-stain + unstained controls) or 'none'",
        choices=("template", "file", "csv", "controls", "none"),
        nullable=False,
    ),
    "path": Field("path", None, "spillover matrix CSV (FlowJo/FlowKit layout) when source is 'csv'"),
}

TRANSFORMS: Schema = {
    "estimate": Field(
        str,
        "template",
        "'template': the transforms written in the gating template; 'study': parameters estimated "
        "once from events pooled over every sample, then locked (every visit uses the same "
        "transform) for `markers`",
        choices=("template", "study"),
        nullable=False,
    ),
    "method": Field(
        str,
        "logicle",
        "estimated transform: 'logicle' (width W per marker from the negative events) or 'arcsinh'",
        choices=("logicle", "arcsinh"),
        nullable=False,
    ),
    "markers": Field(
        "list[str]", None, "markers whose transform is estimated (default: every gated fluorescence marker)"
    ),
    "cofactor": Field(float, 150.0, "arcsinh cofactor when method is 'arcsinh'", positive=True),
    "events_per_sample": Field(
        int, 2000, "events drawn from each sample for the pooled estimate", minimum=100, nullable=False
    ),
    "max_pooled_events": Field(
        int, 1_000_000, "cap on the pooled events (fewer per sample in big studies)", minimum=1000
    ),
    "params": Field(
        "mapping",
        None,
        "per-marker transforms that win over both, e.g. {CD25: {type: arcsinh, cofactor: 150}}",
    ),
}

CLUSTERING: Schema = {
    "enabled": Field(bool, True, "run FlowSOM clustering after gating", nullable=False),
    "method": Field(str, "flowsom", "clustering method", choices=("flowsom",), nullable=False),
    "population": Field(
        str,
        "Live",
        "the gated population whose events are clustered (the parent of the metaclusters)",
        nullable=False,
    ),
    "markers": Field(
        "list[str]",
        None,
        "markers clustered on (default: every fluorescence marker of the template that the files "
        "measure; with `model`, the model's)",
    ),
    "grid": Field("list[int]", [10, 10], "SOM grid (x, y): nodes = x * y"),
    "metaclusters": Field(
        "int|auto", 15, "number of metaclusters k, or 'auto' (chosen from the consensus curve)", minimum=2
    ),
    "k_max": Field(int, 20, "largest k considered with metaclusters: auto", minimum=3),
    "linkage": Field(
        str, "average", "linkage of the consensus metaclustering", choices=("average", "ward", "complete")
    ),
    "cells_per_sample": Field(
        int,
        None,
        "cells drawn from every sample to train the SOM (default: max_training_cells / samples)",
        minimum=1,
    ),
    "max_training_cells": Field(
        int, 200_000, "training cells in all, when cells_per_sample is not given", minimum=100
    ),
    "rlen": Field(int, 10, "SOM training passes over the training cells", minimum=1),
    "scale": Field(bool, False, "centre and scale each marker before the SOM (FlowSOM's scale=TRUE)"),
    "seed": Field(
        int, None, "seed of the training subsample, SOM and metaclustering (default: `seed`)", minimum=0
    ),
    "model": Field(
        "path",
        None,
        "an existing frozen model (.npz from a previous run's clustering/model.npz): map onto it "
        "instead of training (new visits of a trial)",
    ),
    "embedding": {
        "enabled": Field(bool, True, "a UMAP of a subsample of cells for the report", nullable=False),
        "cells": Field(int, 4000, "cells in the UMAP in all (equal per sample)", minimum=100),
        "neighbors": Field(int, 15, "UMAP n_neighbors", minimum=2),
        "min_dist": Field(float, 0.1, "UMAP min_dist", minimum=0.0, maximum=1.0),
    },
}

STATISTICS: Schema = {
    "enabled": Field(
        "bool|auto",
        "auto",
        "run the statistics (statistics.parquet) after gating; 'auto': when a clinical table is given",
    ),
    "clusters": Field(
        bool,
        True,
        "also test the metacluster abundances (families cluster_*) when clustering ran",
        nullable=False,
    ),
    "measures": Field("list[str]", ["pct_parent"], "measure columns analysed: pct_parent, median_<marker>"),
    "populations": Field("list[str]", None, "gated populations analysed (default: all)"),
    "baseline_visit": Field(int, 0, "visit (study week) used as baseline", nullable=False),
    "reference_arm": Field(str, "placebo", "arm the active arms are compared with", nullable=False),
    "arm_doses": Field(
        "mapping", None, "dose per arm for trend tests, e.g. {placebo: 0, 'IL-2 1.0 MIU': 1.0}"
    ),
    "change_scale": Field(str, "change", "per-patient outcome", choices=("change", "log2fc")),
    "pseudocount": Field(float, None, "pseudo-count of log2 fold changes without event counts", minimum=0.0),
    "duplicates": Field(
        str, "error", "several samples of one patient and visit: 'error' or 'mean'", choices=("error", "mean")
    ),
    "min_group_size": Field(int, 3, "fewest patients per compared group", minimum=2),
    "alpha": Field(float, 0.05, "1 - confidence level of every interval", minimum=0.0, maximum=1.0),
    "auc_windows": Field("list[pair]", [[0, 12], [0, 24]], "time-averaged AUC windows [start, end] in weeks"),
    "auc_all_visits": Field(bool, True, "also the AUC from baseline to each patient's last visit"),
    "mann_whitney_method": Field(
        str, "auto", "Mann-Whitney p-values", choices=("auto", "exact", "asymptotic")
    ),
    "jonckheere_method": Field(
        str, "auto", "Jonckheere-Terpstra p-values", choices=("auto", "exact", "asymptotic", "permutation")
    ),
    "mixed_model": Field(bool, True, "fit the mixed model change ~ arm x visit + baseline"),
    "mixed_model_covariance": Field(
        str, "model", "covariance of the mixed-model estimates", choices=("model", "robust")
    ),
    "rate_test": Field(str, "auto", "response-rate test", choices=("auto", "chi2", "fisher")),
    "response_endpoint": Field(str, "sri4", "binary endpoint of the responder analyses"),
    "response_visit": Field(int, None, "visit defining responders (default: week 12, else the last)"),
    "correlation_items": Field(
        "list[str]",
        ["sledai", "anti_dsdna", "c3", "c4", "proteinuria"],
        "clinical items whose change is correlated with each population's change",
    ),
    "min_correlation_n": Field(int, 5, "fewest patients for a correlation", minimum=3),
    "responder_subgroups": Field(
        "list[str]", ["all", "active"], "patient subgroups of the responder analyses"
    ),
    "families": Field("list[str]", None, "test families computed (default: all; see docs/statistics.md)"),
    "seed": Field(int, None, "seed of permutation tests (default: `seed`)", minimum=0),
    "clinical": Field(
        "mapping",
        None,
        "endpoint definitions, e.g. {sri_thresholds: [4, 6], imputation: nri, renal_entry: 0.5}",
    ),
}

REPORT: Schema = {
    "enabled": Field(bool, True, "write report.html at the end of the run", nullable=False),
    "blinded": Field(bool, False, "replace arm names by codes everywhere in the report", nullable=False),
    "blind_key": Field("path", None, "CSV (arm,code) or JSON {arm: code} fixing the blinded codes"),
    "max_gallery": Field(int, MAX_GALLERY, "samples drawn per gate in the gate review gallery", minimum=1),
}


SCHEMA: Schema = {
    "study": Field(str, None, "study name (used in reports and run.json)", required=True, nullable=False),
    "manifest": Field("path", None, "manifest CSV (one row per FCS file)", required=True, nullable=False),
    "clinical": Field("path", None, "clinical table CSV (one row per patient and visit)"),
    "template": Field("path", None, "gating template YAML", required=True, nullable=False),
    "examples": Field(
        "path",
        None,
        "reviewed gates of a few of the study's samples (cytopipe examples .yaml/.json, FlowJo .wsp or "
        "Gating-ML .xml): every other sample gets them by density-landmark alignment ('learned' gates)",
    ),
    "output": Field("outpath", None, "run folder (default: runs/<study> next to the spec)"),
    "workers": Field("int|auto", "auto", "Dask worker processes ('auto': one per core)"),
    "seed": Field(int, 0, "seed of every random step (an integer >= 0)", minimum=0, nullable=False),
    "missing_markers": Field(
        str,
        "stop",
        "a template marker absent from every file: 'stop' before any work, or 'skip' (its "
        "populations are reported 'not measured')",
        choices=("stop", "skip"),
        nullable=False,
    ),
    "compensation": COMPENSATION,
    "transforms": TRANSFORMS,
    "qc": QC_SCHEMA,  # owned by cytopipe.qc, next to the code that uses it
    "clustering": CLUSTERING,
    "statistics": STATISTICS,
    "report": REPORT,
}


@dataclass
class Workflow:
    """A validated study workflow. Paths are absolute."""

    study: str
    manifest: Path
    template: Path
    output: Path
    clinical: Path | None = None
    examples: Path | None = None  # reviewed gates to learn from (cytopipe.gating.learn)
    workers: int | None = None  # None = one per core
    seed: int = 0
    missing_markers: str = "stop"
    compensation: dict[str, Any] = field(default_factory=dict)
    transforms: dict[str, Any] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    clustering: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    spec_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings), as recorded in run.json."""
        out: dict[str, Any] = {}
        for name in (
            "study",
            "manifest",
            "clinical",
            "template",
            "examples",
            "output",
            "workers",
            "seed",
            "missing_markers",
            "compensation",
            "transforms",
            "qc",
            "clustering",
            "statistics",
            "report",
            "spec_path",
        ):
            out[name] = jsonable(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workflow:
        """Inverse of :meth:`to_dict` (as recorded in run.json)."""
        paths = {"manifest", "template", "output", "clinical", "spec_path", "examples"}
        kwargs = {k: (Path(v) if k in paths and v is not None else v) for k, v in data.items()}
        comp = dict(kwargs.get("compensation") or {})
        if comp.get("path"):
            comp["path"] = Path(comp["path"])
        kwargs["compensation"] = comp
        for section, key in (("clustering", "model"), ("report", "blind_key")):
            sub = dict(kwargs.get(section) or {})
            if sub.get(key):
                sub[key] = Path(sub[key])
            kwargs[section] = sub
        return cls(**kwargs)

    def settings_hash(self, *sections: str) -> str:
        """Stable hash of the named settings sections (e.g. ``"qc"``), for cache keys."""
        payload = {name: jsonable(getattr(self, name)) for name in sections}
        return stable_hash(payload)


# --- loading ----------------------------------------------------------------------------------
def load_workflow(path: str | Path, output: str | Path | None = None) -> Workflow:
    """Read and validate a workflow YAML. ``output`` (e.g. from ``--out``) overrides the spec's."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise WorkflowError(
            "workflow file not found; give the path of a workflow YAML (see workflows/)", file=path
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise WorkflowError(f"not valid YAML{where}: {problem}", file=path) from None
    except UnicodeDecodeError:
        raise WorkflowError("not a text file (expected UTF-8 YAML)", file=path) from None
    if raw is None:
        raise WorkflowError("workflow file is empty; it needs at least study, manifest, template", file=path)
    if not isinstance(raw, Mapping):
        raise WorkflowError(
            f"a workflow is a mapping of keys (study:, manifest:, ...), not a {type(raw).__name__}",
            file=path,
        )
    base = path.resolve().parent
    values = validate_section(raw, SCHEMA, base, prefix="", file=path)
    if output is not None:
        values["output"] = Path(output).resolve()
    return _build(values, spec_path=path.resolve(), base=base, file=path)


def workflow_from_options(
    manifest: str | Path,
    template: str | Path,
    output: str | Path,
    clinical: str | Path | None = None,
    study: str | None = None,
    workers: int | None = None,
    seed: int | None = None,
    **sections: Mapping[str, Any],
) -> Workflow:
    """Build a workflow from command-line style options (paths relative to the working directory)."""
    raw: dict[str, Any] = {
        "study": study or Path(manifest).resolve().parent.name or "study",
        "manifest": str(manifest),
        "template": str(template),
        "output": str(output),
    }
    if seed is not None:  # else the schema's default, as for a workflow file without `seed`
        raw["seed"] = seed
    if workers is not None:
        raw["workers"] = workers
    if clinical is not None:
        raw["clinical"] = str(clinical)
    raw.update({k: dict(v) for k, v in sections.items() if v is not None})
    base = Path.cwd()
    values = validate_section(raw, SCHEMA, base, prefix="", file=None)
    return _build(values, spec_path=None, base=base, file=None)


def _build(values: dict[str, Any], spec_path: Path | None, base: Path, file: Path | None) -> Workflow:
    comp = values["compensation"]
    if comp["source"] == "csv" and comp.get("path") is None:
        raise WorkflowError(
            "compensation source is 'csv' but no `path` to the matrix CSV is given",
            file=file,
            key="compensation.path",
        )
    if comp["source"] != "csv" and comp.get("path") is not None:
        raise WorkflowError(
            f"compensation `path` is only used with source 'csv' (source is {comp['source']!r}); "
            "set source: csv or remove path",
            file=file,
            key="compensation.path",
        )
    output = values.get("output")
    if output is None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", values["study"]).strip("_") or "study"
        output = base / "runs" / slug
    workers = values.get("workers")
    return Workflow(
        study=values["study"],
        manifest=values["manifest"],
        template=values["template"],
        output=Path(output),
        clinical=values.get("clinical"),
        examples=values.get("examples"),
        workers=None if workers in (None, "auto") else int(workers),
        seed=int(values["seed"]),
        missing_markers=str(values.get("missing_markers") or "stop"),
        compensation=comp,
        transforms=values["transforms"],
        qc=values["qc"],
        clustering=values["clustering"],
        statistics=values["statistics"],
        report=values["report"],
        spec_path=spec_path,
    )


def describe_schema(schema: Schema | None = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, help) rows of every setting, for documentation."""
    schema = SCHEMA if schema is None else schema
    rows: list[tuple[str, Any, str]] = []
    for key, spec in schema.items():
        if isinstance(spec, dict):
            rows.extend(describe_schema(spec, prefix + key + "."))
        else:
            rows.append((prefix + key, spec.default, spec.help))
    return rows


# --- the statistics section as cytopipe.stats settings -----------------------------------------
_STATS_WORKFLOW_ONLY = ("enabled", "clusters")


def statistics_enabled(wf: Workflow) -> bool:
    """``statistics.enabled``, with 'auto' meaning: when the workflow has a clinical table."""
    enabled = wf.statistics.get("enabled", "auto")
    return wf.clinical is not None if enabled in ("auto", None) else bool(enabled)


def statistics_settings(wf: Workflow) -> Any:
    """The workflow's ``statistics:`` section as a :class:`cytopipe.stats.StatsSettings`.

    Keys are :class:`~cytopipe.stats.StatsSettings` fields (``enabled`` and ``clusters`` are the
    run's own); ``seed`` defaults to the workflow's seed. A bad value (an unknown family or clinical
    setting, an inconsistent combination) is a WorkflowError naming ``statistics.<key>``."""
    from dataclasses import fields

    from cytopipe.clinical import ClinicalSettings
    from cytopipe.errors import CytopipeError
    from cytopipe.stats import FAMILIES, StatsSettings

    file = wf.spec_path
    # (keys outside the schema can only come from an older run.json: they are ignored)
    section = {
        k: v
        for k, v in wf.statistics.items()
        if k in STATISTICS and k not in _STATS_WORKFLOW_ONLY and v is not None
    }
    if section.get("seed") is None:
        section["seed"] = wf.seed
    for family in section.get("families") or ():
        if family not in FAMILIES:
            near = difflib.get_close_matches(family, list(FAMILIES), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; families are {', '.join(FAMILIES)}"
            raise WorkflowError(f"unknown family {family!r}{hint}", file=file, key="statistics.families")
    known = [f.name for f in fields(ClinicalSettings)]
    for key in section.get("clinical") or {}:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known settings: {', '.join(known)}"
            raise WorkflowError(f"unknown key{hint}", file=file, key=f"statistics.clinical.{key}")
    if section.get("clinical") is not None:
        section["clinical"] = {"baseline_visit": section.get("baseline_visit", 0), **section["clinical"]}
    try:
        return StatsSettings.from_any(section)
    except CytopipeError as exc:
        key = exc.context.get("key")
        raise WorkflowError(
            exc.message, file=file, key=f"statistics.{key}" if key else "statistics"
        ) from None
    except (TypeError, ValueError) as exc:
        raise WorkflowError(f"invalid setting: {exc}", file=file, key="statistics") from None
