"""The study plan and state: what every per-sample task receives (small and picklable).

The manifest as job dicts (:func:`split_jobs`), the study state built from the workflow
(:func:`build_state`: template, QC settings, compensation choice, fixed transforms, pooling
sizes) and the clustering plan (:func:`plan_clustering`). Nothing here reads events or runs
tasks; the study-level steps (:mod:`cytopipe.pipeline.steps`) fill in the locked transforms,
the spillover matrix and the pooled gate estimates as the run goes.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.config import stable_hash
from cytopipe.errors import ClusteringError, WorkflowError
from cytopipe.qc import QCSettings
from cytopipe.workflow import Workflow

logger = logging.getLogger(__name__)


META_COLUMNS = ["patient_id", "visit", "arm", "batch", "panel", "site", "acquired_at", "control"]


@dataclass
class StudyState:
    qc: QCSettings
    template: Any  # cytopipe.gating.Template, compensation set as the workflow asks
    compensation: str  # template | file | csv | controls | none
    spillover: Any = None  # cytopipe.fcs.Spillover of the study (csv / controls), else None
    spillover_sets: dict[str, Any] | None = None  # controls per site/batch: value -> Spillover
    spillover_column: str | None = None  # the manifest column naming a sample's control set
    seed: int = 0
    transforms: dict[str, dict] = field(default_factory=dict)  # marker -> locked spec (overrides)
    pooled: Any = None  # cytopipe.gating.PooledEstimates (None until pooled)
    pool_markers: list[str] = field(default_factory=list)  # markers whose transform is estimated
    pool_events: int = 2000
    pool_kind: str = "study"  # study: transforms estimated; cofactor: `cofactor: auto` locked per study
    cluster: Any = None  # ClusterPlan when clustering is on
    learner: Any = None  # cytopipe.gating.learn.Learner when the workflow has `examples:`
    # a FlowJo workspace of several samples (cytopipe.pipeline.workspace): each file's own sample's gates
    gates_of: dict[str, str] = field(default_factory=dict)  # sample_id -> workspace sample
    own_templates: dict[str, Any] = field(default_factory=dict)  # workspace sample -> its template
    workspace: dict[str, Any] | None = None  # run.json's record: which sample's gates each file got

    def template_for(self, sample_id: str) -> Any:
        """The template ``sample_id`` is gated with: its own workspace sample's, else the study's."""
        name = self.gates_of.get(sample_id)
        return self.template if name is None else self.own_templates[name]

    def template_key(self, sample_id: str) -> str:
        """Cache-key part: the workspace sample whose gates ``sample_id`` gets ('' for the study's)."""
        name = self.gates_of.get(sample_id)
        return "" if name is None else "w" + stable_hash(name)[:8]


@dataclass
class Prepared:
    """A sample after event QC (raw values, margins and anomalies removed): lives on the worker."""

    sample: Any  # cytopipe.fcs.Sample; .events holds only the events kept by QC
    metrics: dict[str, Any]
    meta: dict[str, Any]
    kept: np.ndarray | None = None  # original index of every kept event (None: all kept)
    fmo: dict[str, Any] | None = None  # the sample's FMO set (job["fmo"]; cytopipe.pipeline.fmo)


def sample_meta(job: Mapping[str, Any]) -> dict[str, Any]:
    meta = {"sample_id": job["sample_id"]}
    for key in ("patient_id", "visit", "arm", "batch"):
        meta[key] = job.get(key)
    return meta


def split_jobs(manifest: pd.DataFrame) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Manifest rows as plain dicts: (samples to gate, compensation controls).

    Rows with a problem (missing file, blank column, bad visit...) are kept, with their
    ``problem``; the run records them as failed without processing them."""
    jobs: list[dict[str, Any]] = []
    controls: list[dict[str, Any]] = []
    for record in manifest.to_dict("records"):
        job = {k: _plain(v) for k, v in record.items()}
        (controls if job.get("control") else jobs).append(job)
    return jobs, controls


def build_state(
    wf: Workflow, n_samples: int, jobs: list[dict[str, Any]] | None = None, warn: bool = True
) -> StudyState:
    """The study state before the study-level steps (template, QC, matrix, fixed transforms).

    A FlowJo workspace of several samples as template: each of ``jobs`` gets its own sample's gates
    (:mod:`cytopipe.pipeline.workspace`; ``warn``: say which files the workspace does not list)."""
    import dataclasses

    from cytopipe.gating import load_template
    from cytopipe.pipeline.workspace import is_workspace, workspace_templates

    source = wf.compensation["source"]

    def adjust(template: Any) -> Any:
        if source in ("file", "csv", "controls"):  # the engine reads sample.spillover
            return dataclasses.replace(template, compensation="file")
        if source == "none":
            return dataclasses.replace(template, compensation="none")
        return template

    gates_of: dict[str, str] = {}
    own: dict[str, Any] = {}
    record = None
    if is_workspace(wf.template):
        template, gates_of, own, record = workspace_templates(wf.template, jobs or [], adjust, warn=warn)
    else:
        template = adjust(load_template(wf.template))
    spillover = None
    if source == "csv":
        from cytopipe.compensation import Compensation

        spillover = Compensation.from_csv(wf.compensation["path"]).to_spillover()
    return StudyState(
        gates_of=gates_of,
        own_templates=own,
        workspace=record,
        qc=QCSettings.from_mapping(wf.qc),
        template=template,
        compensation=source,
        spillover=spillover,
        seed=wf.seed,
        transforms=_transform_params(wf.transforms.get("params") or {}),
        pool_markers=_pool_markers(template, wf.transforms),
        pool_events=_pool_size(wf.transforms, n_samples),
        pool_kind="study" if wf.transforms.get("estimate") == "study" else "cofactor",
    )


def check_study_matrix(spillover: Any, path: Any, channels: Mapping[str, list[str]]) -> None:
    """A study matrix (``compensation: {source: csv}``) whose channels are in NONE of the files
    (``channels``: file -> its $PnN names) stops the run before any work, naming the CSV, its
    channels and the files'; a matrix that fits some files leaves the others to fail one by one."""
    from cytopipe.errors import CompensationError

    wanted = list(spillover.channels)
    if not channels or any(set(wanted) <= set(names) for names in channels.values()):
        return
    kinds: dict[tuple[str, ...], list[str]] = {}
    for file, names in channels.items():
        kinds.setdefault(tuple(names), []).append(Path(file).name)
    shown = []
    for names, files in list(kinds.items())[:3]:
        more = f" and {len(files) - 2} more" if len(files) > 2 else ""
        shown.append(f"{list(names)} ({len(files)} file(s): {', '.join(files[:2])}{more})")
    every = sorted({n for names in channels.values() for n in names})
    near = [(m, difflib.get_close_matches(m, every, n=1, cutoff=0.85)) for m in wanted if m not in every]
    hints = [f"{c[0]!r} instead of {m!r}" for m, c in near if c]
    raise CompensationError(
        f"the spillover matrix's channels {wanted} are not all in any of the {len(channels)} file(s)"
        f"{' (did you mean ' + ', '.join(hints) + '?)' if hints else ''}; the files' channels are "
        f"{'; '.join(shown)}{' (more panels not shown)' if len(kinds) > 3 else ''}. Set compensation.path "
        "to the matrix of this panel/instrument, or use `source: file` (each file's own $SPILLOVER); no "
        "sample was gated",
        file=path,
    )


def _transform_params(params: Mapping[str, Any]) -> dict[str, dict]:
    from cytopipe.gating import check_transform

    return {
        str(m): check_transform(spec, {"marker": str(m), "key": "transforms.params"})
        for m, spec in params.items()
    }


def _pool_markers(template: Any, transforms: Mapping[str, Any]) -> list[str]:
    if transforms.get("estimate") != "study":  # `cofactor: auto` channels are locked per study
        from cytopipe.gating.scale import auto_markers

        return auto_markers(template, fixed=transforms.get("params") or {})
    if transforms.get("markers"):
        return list(transforms["markers"])
    from cytopipe.gating import is_scatter_or_time

    fixed = set(transforms.get("params") or {})
    return [m for m in template.markers() if not is_scatter_or_time(m) and m not in fixed]


def _pool_size(transforms: Mapping[str, Any], n_samples: int) -> int:
    per = int(transforms.get("events_per_sample") or 2000)
    cap = transforms.get("max_pooled_events")
    if cap:
        per = min(per, max(100, int(cap) // max(n_samples, 1)))
    return per


def _load_manifest(path: Path) -> pd.DataFrame:
    """Every manifest row, with ``ok``/``problem`` per row (a bad row is recorded, not fatal)."""
    from cytopipe.manifest import load_manifest

    df = load_manifest(path, strict=False)
    df["control"] = df["control"].fillna("").astype(str).str.strip()
    # a row without a usable sample_id still gets a unique name, so its problem can be reported
    sid = df["sample_id"].fillna("").astype(str).str.strip()
    blank = sid == ""
    sid[blank] = [f"(manifest row {r})" for r in df.loc[blank, "row"]]
    dup = sid.duplicated(keep="first")
    sid[dup] = [f"{s} (manifest row {r})" for s, r in zip(sid[dup], df.loc[dup, "row"])]
    df["sample_id"] = sid
    return df


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _spillover_hash(source: str, spillover: Any, template_comp: str) -> str:
    if spillover is None:
        return stable_hash({"source": source, "template": template_comp})
    return stable_hash(
        {
            "source": source,
            "channels": list(spillover.channels),
            "matrix": np.asarray(spillover.matrix).tolist(),
        }
    )


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

    def measured_medians(self, channel_of: Mapping[str, str]) -> list[str]:
        """The median markers one file carries (``channel_of``: the markers its gating resolved,
        ``GatingResult.channel_of``)."""
        return [m for m in self.medians if m in channel_of]

    def median_matrix(self, linear: np.ndarray, measured: list[str]) -> np.ndarray:
        """``linear`` (events x ``measured``) as events x ``medians``: a marker the file lacks is a
        NaN column, so its medians are NaN in every metacluster, as in population_stats."""
        if measured == self.medians:
            return linear
        # markers x events, seen as events x markers: each marker's column contiguous (the medians
        # are taken column by column)
        out = np.full((len(self.medians), len(linear)), np.nan, dtype=np.float32).T
        for j, m in enumerate(measured):
            out[:, self.medians.index(m)] = linear[:, j]
        return out

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
