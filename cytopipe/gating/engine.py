"""The gating engine: applies a template's hierarchy to one sample's events.

Design (why it is fast and exact):

* Each gated dimension (channel x compensation x transform) is computed once over all
  events and cached; nothing copies the event matrix per gate.
* A population is stored as the sorted indices of its events. A gate is evaluated only on
  its parent's events (gathered per dimension), so deep populations cost what they hold.
* Data-driven gates are fitted on the parent's events, checked against their bounds, and
  replaced by the pooled estimate (flagged with the reason) when they fail.
* Medians for ``population_stats`` are of compensated, untransformed (linear) values.

Why one module: :class:`Engine` is one walk of the population tree (values, fits, pooled
fallbacks, memberships, medians) over one sample's cached compensated/transformed columns;
its methods share that cache. Fitting lives in :mod:`~cytopipe.gating.fitters` and
:mod:`~cytopipe.gating.landmarks`, parsing in :mod:`~cytopipe.gating.template`.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cytopipe.errors import CompensationError, CytopipeError, GatingError, PanelError
from cytopipe.gating import _adapters
from cytopipe.gating._median import MedianScratch, median
from cytopipe.gating.fitters import DataDrivenGate, FitFailure, Fitter, subsample_index
from cytopipe.gating.gates import BooleanGate, Dim, Gate
from cytopipe.gating.landmarks import LandmarkFailure
from cytopipe.gating.template import ROOT, Population, Template
from cytopipe.qc import saturation_limits
from cytopipe.schema import STATS_COLUMNS, with_count_dtypes

if TYPE_CHECKING:  # pragma: no cover
    from cytopipe.gating.values import EventValues

logger = logging.getLogger(__name__)

NOT_MEASURED = "not measured"  # PopulationResult.source of a population a file cannot measure
DEFAULT_FIT_EVENTS = 20_000
ALIGN_EVENTS = 20_000  # events of the align_on population read for its negative-peak landmark
ALIGN_PERCENTILE = 99.5  # that landmark: the negative's mirrored percentile (scales with the gain)
SCALE_EVENTS = 5_000  # a cofactor (a scale choice, 2 significant digits) needs no more
FIT_COLUMNS = ["sample_id", "key", "population", "method", "pool", "status", "reason", "n_parent", "params"]


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class PopulationResult:
    name: str
    parent: str
    count: int
    parent_count: int
    gate: Gate | None  # the gate actually applied (fitted gates realized as fixed geometry)
    medians: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    source: str = "fixed"  # fixed | fitted | control | reference | pooled | mixed | boolean | not measured

    @property
    def pct_parent(self) -> float:
        if self.source == NOT_MEASURED:
            return float("nan")
        return 100.0 * self.count / self.parent_count if self.parent_count else float("nan")


@dataclass
class FitRecord:
    """One fitter's own result on one sample (pass 1 of pooled gating)."""

    key: str
    population: str
    method: str
    pool: str
    status: str  # ok | failed
    reason: str
    n_parent: int
    params: list[float] | None


class GatingResult:
    """What the engine returns for one sample."""

    def __init__(self, template: Template, n_events: int, file: str | None = None):
        self.template = template
        self.n_events = n_events
        self.file = file
        self.populations: dict[str, PopulationResult] = {}
        self.fits: list[FitRecord] = []
        self.sources: list[tuple[str, str]] = []  # (population, which control/reference set a threshold)
        self.compensation: dict | None = None  # {"channels": [...], "matrix": [[...]]} actually applied
        self.transforms: dict[str, dict] = {}  # channel -> transform spec actually applied
        self.channel_of: dict[str, str] = {}  # marker -> $PnN used for this file
        self.overrides: dict[str, dict] = {}  # run-level transforms by marker or $PnN (e.g. study-locked)
        self._idx: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}

    # ---- membership ------------------------------------------------------------------------
    def indices(self, name: str) -> np.ndarray:
        """Sorted event indices of a population (``root`` = all events)."""
        if name == ROOT:
            return np.arange(self.n_events)
        self._check(name)
        return self._idx[name]

    def mask(self, name: str) -> np.ndarray:
        """Boolean membership of every event in a population."""
        if name == ROOT:
            return np.ones(self.n_events, dtype=bool)
        if name not in self._masks:
            m = np.zeros(self.n_events, dtype=bool)
            m[self.indices(name)] = True
            self._masks[name] = m
        return self._masks[name]

    def membership(self) -> dict[str, np.ndarray]:
        """``{population: boolean mask}`` for every population."""
        return {name: self.mask(name) for name in self.populations}

    # ---- values ------------------------------------------------------------------------------
    def event_values(self, sample) -> EventValues:
        """Values on the gates' axes (compensated, transformed) for any population's events,
        rebuilt from ``sample`` (the :class:`cytopipe.Sample` this result gated) exactly as the
        engine computed them: ``result.event_values(sample).values("CD25", "CD4 T")``."""
        from cytopipe.gating.values import EventValues

        return EventValues(sample, self)

    def values(self, sample, dim, population: str = ROOT) -> np.ndarray:
        """Values of a gate dimension (a :class:`Dim` or a marker name) at the events of
        ``population``: shortcut for ``event_values(sample).values(dim, population)``."""
        return self.event_values(sample).values(dim, population)

    def _check(self, name: str) -> None:
        if name not in self._idx:
            raise GatingError(
                f"no such population; populations are {list(self.populations)}", population=name
            )

    # ---- tables ----------------------------------------------------------------------------
    @property
    def flags(self) -> list[tuple[str, str]]:
        return [(p.name, f) for p in self.populations.values() for f in p.flags]

    def to_population_stats(self, sample_meta: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """One row per population with exactly the ``population_stats`` columns. A population not
        measured in this file has a missing ``count`` (and ``parent_count`` when its parent is not
        measured either): those columns are then pandas' nullable ``Int64``, else ``int64``."""
        meta = _meta(sample_meta, self.file)
        markers = self.template.median_markers()
        rows = []
        for p in self.populations.values():
            # not measured (a marker its gates need is not in the file): no count, not 0 events;
            # its parent count too when the parent is not measured either
            parent = self.populations.get(p.parent)
            parent_unmeasured = parent is not None and parent.source == NOT_MEASURED
            row = {
                "sample_id": meta["sample_id"],
                "patient_id": meta["patient_id"],
                "visit": meta["visit"],
                "arm": meta["arm"],
                "population": p.name,
                "parent": p.parent,
                "count": None if p.source == NOT_MEASURED else p.count,
                "parent_count": None if parent_unmeasured else p.parent_count,
                "pct_parent": p.pct_parent,
            }
            for m in markers:
                row[f"median_{m}"] = p.medians.get(m, float("nan"))
            row["population_path"] = self.template.path_of(p.name)
            rows.append(row)
        # population_path (identity across branches) is an extra column after the medians
        df = pd.DataFrame(
            rows, columns=STATS_COLUMNS + [f"median_{m}" for m in markers] + ["population_path"]
        )
        with_count_dtypes(df)  # int64, or Int64 with missing values where not measured
        df["pct_parent"] = df["pct_parent"].astype("float64")
        return df

    def flags_table(self, sample_meta: Mapping[str, Any] | None = None) -> pd.DataFrame:
        meta = _meta(sample_meta, self.file)
        return pd.DataFrame(
            [{"sample_id": meta["sample_id"], "population": p, "flag": f} for p, f in self.flags],
            columns=["sample_id", "population", "flag"],
        )

    def fit_records(self, sample_id: str | None = None) -> pd.DataFrame:
        """The sample's own fits (pass 1 of pooled gating): a small table."""
        sid = sample_id if sample_id is not None else _meta(None, self.file)["sample_id"]
        return pd.DataFrame([{"sample_id": sid, **r.__dict__} for r in self.fits], columns=FIT_COLUMNS)

    def fitted_template(self) -> Template:
        """The template with every gate as applied to this sample (fitted gates made fixed)."""
        pops = {
            p.name: Population(p.name, p.parent, self.populations[p.name].gate, p.description, p.path)
            for p in self.template
        }
        t = Template(
            name=f"{self.template.name} (fitted)",
            populations=pops,
            transforms=dict(self.template.transforms),
            compensation=self.template.compensation,
            matrices=dict(self.template.matrices),
            panel=dict(self.template.panel),
            medians=list(self.template.medians),
            seed=self.template.seed,
            description=self.template.description,
        )
        return t

    def summary(self) -> str:
        lines = [f"{'population':<24}{'parent':<20}{'count':>10}{'% parent':>10}  flags"]
        for p in self.populations.values():
            lines.append(
                f"{p.name:<24}{p.parent:<20}{'-' if p.source == NOT_MEASURED else p.count:>10}"
                f"{p.pct_parent:>10.2f}  {'; '.join(p.flags)}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"GatingResult({len(self.populations)} populations, {self.n_events} events)"


def _meta(sample_meta: Mapping[str, Any] | None, file: str | None) -> dict[str, Any]:
    meta = dict(sample_meta or {})
    if meta.get("sample_id") is None:
        meta["sample_id"] = Path(file).stem if file else "sample"
    for key in ("patient_id", "visit", "arm"):
        meta.setdefault(key, None)
    return meta


# --------------------------------------------------------------------------------------------
# pooled estimates
# --------------------------------------------------------------------------------------------
class PooledEstimates:
    """Pooled fit parameters per gate: cohort-wide and per group (patient or batch).

    Built by :func:`pool_estimates` from every sample's fit records; only a small table.
    """

    def __init__(self, table: pd.DataFrame, sample_groups: pd.DataFrame):
        self.table = table  # key, level, group, n, params
        self.sample_groups = sample_groups  # sample_id, patient_id, batch

    def lookup(self, key: str, level: str, sample_meta: Mapping[str, Any]) -> tuple[np.ndarray, str] | None:
        """The estimate for ``key`` at ``level`` for this sample, falling back to cohort."""
        first, groups = self._index()
        if level in ("patient", "batch"):
            col = "patient_id" if level == "patient" else "batch"
            group = sample_meta.get(col)
            if group is None:
                group = groups.get((col, sample_meta.get("sample_id")))
            if group is not None and not pd.isna(group):
                row = first.get((key, level, str(group)))
                if row is not None:
                    return np.asarray(row[0]), f"{level} {group} estimate (median of {_n(row[1])})"
        row = first.get((key, "cohort"))
        if row is not None:
            return np.asarray(row[0]), f"cohort estimate (median of {_n(row[1])})"
        return None

    def _index(self) -> tuple[dict[tuple, tuple[Any, Any]], dict[tuple, Any]]:
        """(params, n) of the first estimate per (key, level, group) and per (key, "cohort"), and
        each sample's patient / batch: built once per table (the engine and the pipeline look up
        every gate of every sample; a boolean filter of the table per lookup cost ~1 s per 150
        files, and a row taken with ``iloc`` ~50 us per lookup)."""
        cached = getattr(self, "_lookup_index", None)
        if cached is not None and cached[0] is self.table and cached[1] is self.sample_groups:
            return cached[2], cached[3]
        first: dict[tuple, tuple[Any, Any]] = {}
        t = self.table
        for k, lev, grp, params, n in zip(t["key"], t["level"], t["group"], t["params"], t["n"]):
            first.setdefault((k, "cohort") if lev == "cohort" else (k, lev, grp), (params, n))
        groups: dict[tuple, Any] = {}
        sg = self.sample_groups
        for col in ("patient_id", "batch"):
            if col in sg:
                for sid, g in zip(sg["sample_id"], sg[col]):
                    groups.setdefault((col, sid), g)
        self._lookup_index = (t, self.sample_groups, first, groups)
        return first, groups

    def rows_for(self, patient: str, batch: str) -> list[int]:
        """Positions (ascending) of the table rows a sample of ``patient`` and ``batch`` can use:
        the cohort's, its patient's and its batch's. The (level, group) index is built once per
        table (a boolean filter of the whole table per patient was quadratic in the study's size:
        16 s of the gating step for 3,500 files)."""
        cached = getattr(self, "_rows_index", None)
        if cached is None or cached[0] is not self.table:
            cohort: list[int] = []
            by_group: dict[tuple[str, Any], list[int]] = {}
            for i, (level, group) in enumerate(zip(self.table["level"], self.table["group"])):
                if level == "cohort":
                    cohort.append(i)
                elif level in ("patient", "batch"):
                    by_group.setdefault((level, group), []).append(i)
            cached = self._rows_index = (self.table, cohort, by_group)
        _, cohort, by_group = cached
        return sorted(cohort + by_group.get(("patient", patient), []) + by_group.get(("batch", batch), []))


def _n(k: int) -> str:
    return f"{k} sample" if k == 1 else f"{k} samples"


def _outside(bounds: tuple[float, float]) -> str:
    """A gate's plausible fraction of its parent, as its flags state it: 0.002 reads '0.2%' (it read
    '0%', and 'keeps 0.0% of the parent, outside [0%, 40%]' contradicted itself)."""
    lo, hi = bounds
    return f"outside [{lo * 100:g}%, {hi * 100:g}%]"


def _share(frac: float, bounds: tuple[float, float]) -> str:
    """``frac`` of the parent, outside ``bounds``, with the digits that show it is outside (4.99% of
    [5%, 98%] reads '4.99%', not '5.0%'); one decimal when that shows it."""
    lo, hi = bounds
    text = f"{frac:.1%}"
    for digits in (1, 2, 3, 4):
        text = f"{frac:.{digits}%}"
        if not lo * 100 <= round(frac * 100, digits) <= hi * 100:
            break
    return text


def pool_estimates(
    records: pd.DataFrame,
    manifest: pd.DataFrame | None = None,
    level: str | None = None,
) -> PooledEstimates:
    """Combine per-sample fit records (pass 1) into pooled estimates.

    ``manifest`` supplies ``patient_id`` and ``batch`` per ``sample_id``. Each gate is pooled
    at the level its template asks for (``pool:``) unless ``level`` overrides it; a cohort
    estimate is always made too, as the fallback of the fallback. Pooling is the
    component-wise median of the fits that passed their bounds.
    """
    records = pd.DataFrame(records, columns=FIT_COLUMNS) if not isinstance(records, pd.DataFrame) else records
    groups = pd.DataFrame({"sample_id": records["sample_id"].astype(str).unique()})
    if manifest is not None and len(manifest):
        cols = [c for c in ("sample_id", "patient_id", "batch") if c in manifest.columns]
        m = manifest[cols].copy()
        m["sample_id"] = m["sample_id"].astype(str)
        groups = groups.merge(m.drop_duplicates("sample_id"), on="sample_id", how="left")
    for col in ("patient_id", "batch"):
        if col not in groups:
            groups[col] = None
    ok = records[records["status"] == "ok"].copy()
    ok["sample_id"] = ok["sample_id"].astype(str)
    ok = ok.merge(groups, on="sample_id", how="left")
    rows = []
    for key, sub in ok.groupby("key", sort=True):
        rows.append(_pooled_row(key, "cohort", "", sub))
        lvl = level or sub["pool"].iloc[0]
        if lvl in ("patient", "batch"):
            col = "patient_id" if lvl == "patient" else "batch"
            for g, gsub in sub.groupby(sub[col].astype(str), sort=True):
                if g in ("None", "nan"):
                    continue
                rows.append(_pooled_row(key, lvl, g, gsub))
    table = pd.DataFrame(rows, columns=["key", "level", "group", "n", "params"])
    return PooledEstimates(table, groups)


def _pooled_row(key, level, group, sub) -> dict:
    params = np.array([np.asarray(p, dtype=np.float64) for p in sub["params"]])
    med = np.median(params, axis=0)
    return {"key": key, "level": level, "group": group, "n": len(sub), "params": med.tolist()}


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------
def gate(
    sample,
    template: Template | str | Path,
    *,
    pooled: PooledEstimates | None = None,
    sample_meta: Mapping[str, Any] | None = None,
    mapping: Mapping[str, str] | None = None,
    transforms: Mapping[str, Mapping] | None = None,
    medians: bool = True,
    controls: Mapping[str, Any] | None = None,
    keep_values: bool = False,
) -> GatingResult:
    """Gate one sample with a template.

    ``sample`` is a :class:`cytopipe.Sample` (raw, uncompensated events). ``pooled`` holds
    pooled estimates for data-driven gates (from :func:`pool_estimates`); without it the
    template's ``default`` values are the fallback. ``mapping`` adds marker -> channel
    entries to the template's ``panel``; ``transforms`` overrides per-marker transforms
    (e.g. the ones locked for a study). ``medians=False`` skips the per-population medians.
    ``controls`` maps a marker to its FMO control sample (``reference`` gates with ``control: fmo``).
    ``keep_values=True`` keeps the engine's compensated matrix on the result, so that
    :meth:`GatingResult.event_values` of the same sample does not compensate it again (it is as
    large as the compensated channels of the event matrix: keep the result only while needed).
    """
    if not isinstance(template, Template):
        from cytopipe.gating.loading import load_template

        template = load_template(template)
    if template.preprocess and not getattr(sample, "preprocessed", True):
        _warn_unpreprocessed(sample)
    engine = Engine(
        events=sample.events,
        channels=sample.channels,
        spillover=getattr(sample, "spillover", None),
        template=template,
        file=getattr(sample, "path", None),
        mapping=mapping,
        transforms=transforms,
        controls=controls,
        saturated=not getattr(sample, "margins_removed", False),
    )
    return engine.run(pooled=pooled, sample_meta=sample_meta, medians=medians, keep_values=keep_values)


def _warn_unpreprocessed(sample) -> None:
    """A Gating-ML/FlowJo template on raw values of a file whose raw values differ from the
    preprocessed ones: the counts would be wrong, say so loudly."""
    from cytopipe.fcs import needs_preprocessing

    channels = needs_preprocessing(sample.channels)
    if channels:
        logger.warning(
            "file %s: the template's gates (imported from Gating-ML or FlowJo) are defined on "
            "preprocessed FCS values, but the sample was read without preprocessing and %s %s "
            "log-encoded or scaled by a gain: the counts will be wrong; read it with "
            "read_fcs(path, preprocess=True)",
            getattr(sample, "path", None),
            ", ".join(channels),
            "is" if len(channels) == 1 else "are",
        )


def unmeasured_reason(pop: Population, not_measured: Mapping[str, str], missing: Collection[str]) -> str:
    """Why ``pop`` cannot be gated in a file lacking the markers ``missing`` ('' when it can), given
    the earlier populations ``not_measured`` (name -> reason). An ``or`` of populations is measured
    when its parent and one of its operands are (the union of what was measured, flagged);
    ``and`` and ``not`` need every operand."""
    operands = set(pop.gate.union_of) if isinstance(pop.gate, BooleanGate) else set()
    if operands and operands <= set(not_measured):
        return " and ".join(f"{o} is not measured" for o in sorted(operands))
    for dep in pop.depends_on:
        if dep in not_measured and dep not in operands:
            return f"{dep} is not measured"
    optional = set(getattr(pop.gate, "optional", ()))
    for d in _all_dims(pop.gate):
        for name in (d.ratio.numerator, d.ratio.denominator) if d.ratio else (d.name,):
            if name in missing and name not in optional:
                return f"marker {name} is not in the file"
    return ""


def not_measured_populations(template: Template, missing: Collection[str]) -> dict[str, str]:
    """The populations a file lacking the markers ``missing`` cannot measure, each with its reason
    (what :func:`gate` reports as "not measured"), in template order."""
    out: dict[str, str] = {}
    for pop in template:
        reason = unmeasured_reason(pop, out, missing)
        if reason:
            out[pop.name] = reason
    return out


def no_spillover_message(template: Template) -> str:
    """The problem of a template asking for the file's own spillover matrix (``compensation:
    file``) in a file that has none: what to change, and where."""
    name = f"the template {str(template.source)!r}" if template.source else "the template"
    return (
        "the template asks for the file's spillover matrix (compensation: file) but the file has "
        f"none. Copy {name}, set its `compensation:` key to `none` (or to the path of a CSV "
        "spillover matrix) and gate with the copy (`cytopipe gate` has no option for this; in a "
        "workflow, `compensation: {source: none}` does it)"
    )


def needs_file_spillover(template: Template) -> bool:
    """Whether gating reads the file's own spillover matrix (``compensation: file`` and a gate
    dimension compensated as the template says)."""
    if template.compensation != "file":
        return False
    return any(d.compensation == "template" for pop in template for d in _all_dims(pop.gate))


class Engine:
    """Applies one template to one event matrix."""

    def __init__(
        self,
        events: np.ndarray,
        channels: pd.DataFrame,
        template: Template,
        spillover=None,
        file=None,
        mapping: Mapping[str, str] | None = None,
        transforms: Mapping[str, Mapping] | None = None,
        controls: Mapping[str, Any] | None = None,
        saturated: bool = True,
    ):
        """``saturated=False``: the events hold none at a detector's maximum (margin QC removed
        them), so the fits need not look for them (:meth:`_fit_positions`)."""
        if events.ndim != 2 or events.shape[1] != len(channels):
            raise GatingError(
                f"event matrix has shape {events.shape} but the channel table has {len(channels)} rows",
                file=file,
            )
        self.events = events
        self.channels = channels
        self.template = template
        self.spillover = spillover
        self.file = str(file) if file is not None else None
        self.panel = {**template.panel, **(mapping or {})}
        self.transform_specs = dict(template.transforms)
        # run-level (e.g. study-locked) transforms by marker or $PnN; a TransformSet works too
        self.overrides = {
            str(name): _adapters.check_transform(
                spec.to_dict() if hasattr(spec, "to_dict") else spec,
                {"marker": str(name), "key": "transforms"},
            )
            for name, spec in (transforms or {}).items()
        }
        self.pnn = [str(v) for v in channels["pnn"]]
        self._col: dict[str, int] = {}  # name -> column
        self._resolved: dict[str, str] = {}  # marker -> $PnN from the panel
        self._comp: dict[str, tuple[dict[int, int], np.ndarray] | None] = {}  # comp key -> (col -> j, block)
        self._values: dict[tuple, np.ndarray] = {}  # dimension over all events
        self._transformed: list[tuple] = []  # (linear column, spec, rows or None, transformed values)
        self._subset_values: dict[tuple, np.ndarray] = {}  # dimension inside one population
        self._fits: dict[tuple, tuple] = {}  # memoised fits
        self.applied_transforms: dict[str, dict] = {}  # $PnN -> transform actually applied
        # FMO controls by marker (a Sample each): `reference` gates with `control: fmo` take that
        # marker's threshold from the control's events of the same parent
        self.controls = dict(controls or {})
        self._calibration: dict[tuple, tuple[float, str] | None] = {}
        self.fmo_notes: dict[tuple[str, str], str] = {}  # (parent, marker) -> FMO that calibrated it
        self._scales: dict[tuple, dict] = {}  # (column, compensation) -> estimated transform
        # per column: its saturation limit (qc.saturation_limits); none after margin QC
        self._limits: np.ndarray | None = None if saturated else np.full(events.shape[1], np.inf, np.float32)
        self.missing: dict[str, str] = {}  # marker -> why it is not measured in this file
        self._resolve_all()

    # ---- resolution ------------------------------------------------------------------------
    def _resolve_all(self) -> None:
        uses: list[tuple[str, Dim, str | None, str]] = []
        for pop in self.template:
            for d in _all_dims(pop.gate):
                for name in (d.ratio.numerator, d.ratio.denominator) if d.ratio else (d.name,):
                    uses.append((name, d, pop.name, "markers"))
        for m in self.template.median_markers():
            uses.append((m, Dim(m), None, "medians"))
        # one panel lookup for every marker that is not a plain channel name (cached per panel)
        plain = set(self.pnn) - set(self.panel)
        fluoro = {f for m in self.template.matrices.values() for f in m.fluorochromes}
        wanted = sorted({n for n, *_ in uses if n not in plain and n not in fluoro})
        if wanted:
            try:
                self._resolved = _resolve_cached(self.channels, wanted, self.panel, self.file)
            except PanelError:
                self._resolved = {}  # resolve one by one below, to name the population
        for name, d, population, key in uses:
            if name in self.missing:
                continue
            try:
                self._column(name, d, population, key=key)
            except PanelError as exc:
                # a marker the file does not carry drops only the populations that need it
                # (reported "not measured"); an ambiguous or mis-mapped marker is still an error
                if "no channel carries marker" not in exc.message:
                    raise
                self.missing[name] = exc.message

    def _column(self, name: str, dim: Dim, population: str | None, key: str = "markers") -> int:
        if name in self._col:
            return self._col[name]
        if name in self.pnn and name not in self.panel:
            col = self.pnn.index(name)
        else:
            matrix = self.template.matrices.get(dim.compensation or "")
            if matrix is not None and name in matrix.fluorochromes:
                detector = matrix.detectors[matrix.fluorochromes.index(name)]
                if detector not in self.pnn:
                    raise PanelError(
                        f"compensation matrix {dim.compensation!r} maps {name!r} to detector {detector!r}, "
                        f"which the file lacks; channels are {self.pnn}",
                        file=self.file,
                        population=population,
                        marker=name,
                    )
                col = self.pnn.index(detector)
            elif name in self._resolved:
                col = self.pnn.index(self._resolved[name])
            else:
                try:
                    pnn = _adapters.resolve_markers(
                        self.channels, [name], mapping=self.panel, file=self.file
                    )[name]
                except PanelError as exc:
                    raise PanelError(
                        exc.message,
                        **{
                            **exc.context,
                            "file": self.file,
                            "population": population,
                            "marker": name,
                            "key": key,
                        },
                    ) from None
                col = self.pnn.index(pnn)
        twins = [i + 1 for i, n in enumerate(self.pnn) if n == self.pnn[col]]
        if len(twins) > 1:  # never pick one of several same-named channels silently
            raise PanelError(
                f"channel name {self.pnn[col]!r} is ambiguous: parameters {twins} of the file all have "
                f"this $PnN, so which one carries {name!r} cannot be told; correct the file's $PnN "
                "keywords (each channel's name must be unique) and run again",
                file=self.file,
                population=population,
                marker=name,
                key=key,
            )
        self._col[name] = col
        return col

    # ---- compensation ----------------------------------------------------------------------
    def _comp_key(self, dim: Dim) -> str | None:
        c = dim.compensation
        if c in (None, "uncompensated", "none"):
            return None
        if c == "template":
            return None if self.template.compensation == "none" else "template"
        return c

    def _comp_block(self, key: str):
        """``(column -> block index, compensated block)`` for a compensation key, or None."""
        if key in self._comp:
            return self._comp[key]
        comp = self._compensation(key)
        if comp is None:
            self._comp[key] = None
            return None
        cols = [int(c) for c in comp.columns_in(self.pnn, self.file)]
        block = _adapters.compensate_block(self.events, cols, comp)  # channel-major (k x n)
        self._comp[key] = ({c: j for j, c in enumerate(cols)}, block)
        self.applied_compensation = comp.to_dict()
        self._applied_block = self._comp[key]  # what EventValues would compute from result.compensation
        return self._comp[key]

    def _compensation(self, key: str):
        """The :class:`cytopipe.compensation.Compensation` behind a compensation key (None =
        uncompensated); it validates the matrix (square, finite, invertible)."""
        from cytopipe.compensation import Compensation

        if key in ("template", "FCS"):
            source = self.template.compensation if key == "template" else "file"
            if source != "file":
                return Compensation.from_csv(source)
            if self.spillover is None:
                if key == "FCS":  # Gating-ML: 'FCS' without a spillover means uncompensated
                    return None
                raise CompensationError(no_spillover_message(self.template), file=self.file)
            try:
                return Compensation.from_spillover(self.spillover)
            except CompensationError as exc:
                raise CompensationError(exc.message, **{**exc.context, "file": self.file}) from None
        m = self.template.matrices.get(key)
        if m is None:
            raise CompensationError(f"unknown compensation matrix {key!r}", file=self.file)
        return Compensation(m.matrix, tuple(m.detectors), source=f"template:{key}")

    def linear(self, col: int, comp_key: str | None) -> np.ndarray:
        """Channel ``col`` compensated with ``comp_key`` (a contiguous row of the compensated
        block, or the raw column when the channel is not compensated)."""
        if comp_key is not None:
            blk = self._comp_block(comp_key)
            if blk is not None and col in blk[0]:
                return blk[1][blk[0][col]]
        return self.events[:, col]

    # ---- dimension values ------------------------------------------------------------------
    def _dim_key(self, dim: Dim) -> tuple:
        comp = self._comp_key(dim)
        if dim.ratio is not None:
            return ("ratio", dim.ratio, comp, dim.transform)
        return (self._col[dim.name], comp, dim.transform)

    def _compute(self, dim: Dim, idx: np.ndarray | None) -> np.ndarray:
        """Compensated, transformed values of ``dim`` at events ``idx`` (None = all)."""
        comp = self._comp_key(dim)
        if dim.ratio is not None:
            r = dim.ratio
            # Gating-ML/FlowKit compute ratio dimensions from the uncompensated channels
            x = self.events[:, self._col[r.numerator]]
            y = self.events[:, self._col[r.denominator]]
            if idx is not None:
                x, y = x[idx], y[idx]
            with np.errstate(divide="ignore", invalid="ignore"):
                v = r.A * ((x - r.B) / (y - r.C))
        else:
            lin = v = self.linear(self._col[dim.name], comp)
            if idx is not None:
                v = v[idx]
        spec = self._transform_spec(dim)
        if spec is not None and dim.ratio is None:
            self.applied_transforms[self.pnn[self._col[dim.name]]] = dict(spec)
        out = _adapters.apply_transform(spec, v)
        if spec is not None and dim.ratio is None and out is not v:  # for EventValues (keep_values)
            self._transformed.append((lin, dict(spec), idx, out))
        return out

    def values(self, dim: Dim, idx: np.ndarray | None = None, scope: str | None = None) -> np.ndarray:
        """Values of a dimension at events ``idx`` (None = all events).

        A dimension needed over most events is transformed once over all of them and cached;
        one needed only inside a small population (``scope``, whose events ``idx`` are) is
        transformed just there, so e.g. FOXP3 is only ever transformed on CD4 T cells.
        """
        key = self._dim_key(dim)
        full = self._values.get(key)
        if full is None and (idx is None or 2 * len(idx) > self.events.shape[0]):
            full = self._values[key] = self._compute(dim, None)
        if full is not None:
            return full if idx is None else full[idx]
        skey = (key, scope)
        if scope is not None and skey in self._subset_values:
            return self._subset_values[skey]
        v = self._compute(dim, idx)
        if scope is not None:
            self._subset_values[skey] = v
        return v

    def _transform_spec(self, dim: Dim):
        if dim.transform is None:
            return None
        if self.overrides and dim.compensation == "template" and dim.ratio is None:
            # template markers whose transform is set per study: the locked one wins
            for key in (dim.name, self.pnn[self._col[dim.name]]):
                if key in self.overrides:
                    return self.overrides[key]
        spec = self.transform_specs.get(dim.transform)
        if getattr(spec, "auto", False) and dim.ratio is None:
            return self._auto_scale(dim, spec)
        return spec

    def _auto_scale(self, dim: Dim, spec: dict) -> dict:
        """``cofactor: auto``: this channel's arcsinh cofactor from its negative population
        (estimated once per file here; lock it per study with ``scale.estimate_cofactors``)."""
        from cytopipe.gating.cofactor import estimate_cofactor

        col = self._col[dim.name]
        key = (col, self._comp_key(dim))
        if key not in self._scales:
            x = self.linear(col, self._comp_key(dim))
            rng = np.random.default_rng([self.template.seed, col])
            pos = subsample_index(len(x), SCALE_EVENTS, rng)
            c = estimate_cofactor(x if pos is None else x[pos], default=float(spec["cofactor"]))
            self._scales[key] = {"type": "arcsinh", "cofactor": c}
        return self._scales[key]

    def gather(
        self,
        dims: Sequence[Dim],
        idx: np.ndarray | None,
        scope: str | None = None,
        pos: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Values of ``dims`` at the events ``idx`` of population ``scope`` (optionally only at
        positions ``pos`` within them)."""
        if pos is None:
            return [self.values(d, idx, scope) for d in dims]
        # a fit's subsample of a large parent: gather only its events from the cached column
        # (full[idx[pos]] is full[idx][pos] without the parent-sized copy)
        sub = pos if idx is None else idx[pos]
        out = []
        for d in dims:
            full = self._values.get(self._dim_key(d))
            if full is None and (idx is None or 2 * len(idx) > self.events.shape[0]):
                full = self.values(d)
            out.append(full[sub] if full is not None else self.values(d, idx, scope)[pos])
        return out

    # ---- run -------------------------------------------------------------------------------
    def run(
        self,
        pooled: PooledEstimates | None = None,
        sample_meta: Mapping[str, Any] | None = None,
        medians: bool = True,
        keep_values: bool = False,
    ) -> GatingResult:
        n = self.events.shape[0]
        meta = _meta(sample_meta, self.file)
        result = GatingResult(self.template, n, file=self.file)
        idx: dict[str, np.ndarray | None] = {ROOT: None}
        counts: dict[str, int] = {ROOT: n}
        full_masks: dict[str, np.ndarray] = {}

        def full_mask(name: str) -> np.ndarray:
            if name not in full_masks:
                m = np.zeros(n, dtype=bool)
                m[idx[name]] = True
                full_masks[name] = m
            return full_masks[name]

        self._idx_now = idx
        not_measured: dict[str, str] = {}
        for pop in self.template:
            reason = self._unmeasured(pop, not_measured)
            if reason:
                not_measured[pop.name] = reason
                idx[pop.name] = np.zeros(0, dtype=np.int64)
                counts[pop.name] = 0
                result.populations[pop.name] = PopulationResult(
                    name=pop.name,
                    parent=pop.parent,
                    count=0,
                    parent_count=counts[pop.parent],
                    gate=None,
                    flags=[f"not measured: {reason}"],
                    source=NOT_MEASURED,
                )
                continue
            pidx = idx[pop.parent]
            flags: list[str] = []
            source = "fixed"
            g = pop.gate
            if isinstance(g, BooleanGate):
                combined = g.combine([full_mask(o.population) for o in g.operands])
                inside = combined if pidx is None else combined[pidx]
                applied: Gate = g
                source = "boolean"
                missing = [o.population for o in g.operands if o.population in not_measured]
                if missing:  # an `or` whose other operands were measured: their union, flagged
                    flags.append(
                        f"{pop.name}: {', '.join(missing)} not measured ({not_measured[missing[0]]}); "
                        "gated as the union of the other operands"
                    )
            elif isinstance(g, DataDrivenGate):
                applied, inside, source = self._fit_gate(pop, pidx, pooled, meta, flags, result)
            else:
                inside = g.contains(self.gather(g.dims, pidx, pop.parent))
                applied = g
            mine = np.flatnonzero(inside) if pidx is None else pidx[inside]
            idx[pop.name] = mine
            counts[pop.name] = len(mine)
            result.populations[pop.name] = PopulationResult(
                name=pop.name,
                parent=pop.parent,
                count=len(mine),
                parent_count=counts[pop.parent],
                gate=applied,
                flags=flags,
                source=source,
            )
        result._idx = {k: (np.arange(n) if v is None else v) for k, v in idx.items() if k != ROOT}
        result._masks = {k: v for k, v in full_masks.items()}
        result.channel_of = {name: self.pnn[c] for name, c in self._col.items()}
        result.overrides = dict(self.overrides)
        result.compensation = getattr(self, "applied_compensation", None)
        result.transforms = dict(self.applied_transforms)
        kept = getattr(self, "_applied_block", None)
        if keep_values and kept is not None:  # read by EventValues (the same events only)
            result._kept_block = (self.events, *kept)
        if keep_values:  # the values transformed here: EventValues reuses them
            result._kept_transformed = (self.events, list(self._transformed))
        if medians:
            self._medians(result)
        return result

    def _unmeasured(self, pop: Population, not_measured: Mapping[str, str]) -> str:
        """Why ``pop`` cannot be gated in this file ('' when it can): :func:`unmeasured_reason`."""
        return unmeasured_reason(pop, not_measured, self.missing)

    # ---- data-driven gates -----------------------------------------------------------------
    def _fit_gate(self, pop: Population, pidx, pooled, meta, flags, result):
        g: DataDrivenGate = pop.gate
        n_parent = self.events.shape[0] if pidx is None else len(pidx)
        fallback: dict[str, tuple[np.ndarray, str] | None] = {}
        chosen: dict[str, np.ndarray] = {}
        used_own: dict[str, bool] = {}
        sources: set[str] = set()
        # a diagonal pre-gate for an optional marker the file lacks is fitted as a gate of its own
        items = g.fit_items_for(self.missing) if hasattr(g, "fit_items_for") else g.fit_items()
        fitters = dict(items)
        # a quadrant threshold fitted `within: quadrant` comes after the others: it is fitted among
        # the parent's events on the gate's side of them (sequential gating: CD56 among CD3- events)
        for suffix, fitter in sorted(items, key=lambda item: _within_quadrant(g, item[1])):
            key = pop.name + suffix
            if any(d.name in self.missing for d in fitter.dims):  # an optional marker the file lacks
                flags.append(f"{key}: marker {fitter.dims[0].name} is not in the file; gated without it")
                continue
            scope, fit_idx = pop.parent, pidx
            if _within_quadrant(g, fitter):
                scope, fit_idx = self._quadrant_side(g, fitter, chosen, pidx, pop.parent)
            n_fit = n_parent if fit_idx is None else len(fit_idx)
            params, reason, relative, how = self._fit(fitter, scope, fit_idx, n_fit)
            if params is not None and not reason:
                reason = fitter.out_of_bounds(params) or ""
            status = "ok" if params is not None and not reason else "failed"
            result.fits.append(
                FitRecord(
                    key=key,
                    population=pop.name,
                    method=fitter.method,
                    pool=fitter.pool,
                    status=status,
                    reason=reason,
                    n_parent=n_parent,
                    params=None if params is None else params.tolist(),
                )
            )
            ref = self._reference(key, fitter, pooled, meta, relative, how)
            fallback[suffix] = ref
            if status == "ok" and ref is not None and fitter.bounds.max_shift is not None and ref[2]:
                # only a pooled estimate of the same study can overrule a sample's own fit; a
                # typed default or a landmark-relative fallback never does
                shift = fitter.shift(params, ref[0])
                if shift > fitter.bounds.max_shift:
                    status = "shifted"
                    reason = (
                        f"fit {fitter.describe(params)} is {shift:.3g} away from the {ref[1]} "
                        f"{fitter.describe(ref[0])} (max_shift {fitter.bounds.max_shift})"
                    )
            used_own[suffix] = status == "ok"
            if status == "ok":
                chosen[suffix] = params
                if fitter.method == "reference":
                    sources.add("control" if how.startswith("FMO") else "reference")
                    flags_note = f"{key}: threshold {fitter.describe(params)} set by the {how}"
                    result.sources.append((pop.name, flags_note))
                elif (pop.parent, fitter.dims[0].name) in self.fmo_notes:
                    sources.add("control")
                    note = self.fmo_notes[(pop.parent, fitter.dims[0].name)]
                    result.sources.append(
                        (pop.name, f"{key}: threshold {fitter.describe(params)} set by the {note}")
                    )
                else:
                    sources.add("fitted")
            else:
                if ref is None and n_parent < fitter.bounds.min_events:
                    # too few parent events to fit anything: an empty gate, flagged
                    flags.append(f"{key}: {reason}; no fallback, the population is left empty")
                    return None, np.zeros(n_parent, dtype=bool), "not fitted"
                if ref is None:
                    raise GatingError(
                        f"gate {key!r} could not be fitted ({reason}) and there is no pooled estimate or "
                        "template `default` to fall back on; add `default:` to the gate",
                        file=self.file,
                        population=pop.name,
                    )
                chosen[suffix] = ref[0]
                flags.append(f"{key}: {reason}; used the {ref[1]} {fitter.describe(ref[0])}")

        applied = g.realize(chosen)
        inside = applied.contains(self.gather(applied.dims, pidx, pop.parent))
        if g.fraction is not None and n_parent:
            frac = float(inside.mean())
            lo, hi = g.fraction
            if not lo <= frac <= hi and any(used_own.values()):
                applied, inside, frac = self._fraction_fallback(
                    pop, pidx, chosen, used_own, fallback, fitters, (applied, inside, frac), flags, result
                )
                frac = min(max(frac, lo), hi)  # flagged there when still outside
            if not lo <= frac <= hi:
                # whatever the gate now is (own fit, pooled, fallback), say it is implausible
                flags.append(
                    f"{pop.name}: the gate keeps {_share(frac, g.fraction)} of the parent, "
                    f"{_outside(g.fraction)}"
                )
        if used_own and all(used_own.values()):
            source = sources.pop() if len(sources) == 1 else "fitted"
        elif not any(used_own.values()):
            source = "pooled"
        else:
            source = "mixed"
        return applied, inside, source

    def _fraction_fallback(self, pop, pidx, chosen, used_own, fallback, fitters, own_gate, flags, result):
        """The gate's own fits keep an implausible fraction of the parent: replace only what failed.

        Candidates, least replaced first: one own-fitted part at a time, each by what its fitter
        allows (:meth:`Fitter.replacements`: a diagonal's cut alone, relative to this file's own
        cloud, before its whole pooled geometry), then every part. The first level with a candidate
        inside the bounds wins; of several, the one that changes the fewest of the own gate's
        events. When none is inside, the full fallback unless the own gate lies nearer the bounds;
        flagged. ``chosen`` and ``used_own`` are updated; returns ``(gate, inside, fraction)``."""
        g = pop.gate
        lo, hi = g.fraction
        own_applied, own_inside, own_frac = own_gate
        parts = [s for s in chosen if used_own[s] and fallback[s] is not None]
        options = {s: fitters[s].replacements(chosen[s], fallback[s][0]) for s in parts}
        levels = [[{s: r} for s in parts for r in options[s]]]
        if len(parts) > 1:
            levels.append([{s: options[s][k] for s in parts} for k in (0, -1)])
        elif not parts:
            levels = []

        def realize(reps):
            applied = g.realize({**chosen, **reps})
            inside = applied.contains(self.gather(applied.dims, pidx, pop.parent))
            return applied, inside, float(inside.mean())

        def outside(f: float) -> float:  # how far outside the bounds, in log units of the fraction
            f = max(f, 1e-4)
            return max(math.log(lo / f) if lo > 0 else 0.0, math.log(f / hi), 0.0)

        pick, last = None, None
        for cands in levels:
            tried = [(reps, *realize(reps)) for reps in cands]
            last = tried[-1]
            ok = [t for t in tried if lo <= t[3] <= hi]
            if ok:
                pick = min(ok, key=lambda t: int(np.count_nonzero(t[2] != own_inside)))
                break
        reason = f"the fitted gate keeps {_share(own_frac, g.fraction)} of the parent, {_outside(g.fraction)}"
        if pick is None and last is not None and outside(last[3]) <= outside(own_frac):
            pick = last  # nothing plausible: the fallback lies no farther from the bounds
        # the parts replaced stay out of the pooled estimates; all own parts do when no
        # replacement made the gate plausible (which of them failed is then unknown)
        plausible = pick is not None and lo <= pick[3] <= hi
        out = set(pick[0]) if plausible else set(chosen)
        for rec in result.fits:
            if rec.population == pop.name and rec.status == "ok" and rec.key[len(pop.name) :] in out:
                rec.status = "failed"
                rec.reason = reason
        if pick is None:
            flags.append(
                f"{pop.name}: {reason}; its fallback keeps {_share(last[3], g.fraction)}, farther outside: kept the fit"
                if last is not None
                else f"{pop.name}: {reason}; no fallback to use"
            )
            return own_applied, own_inside, own_frac
        for s, params in pick[0].items():
            chosen[s] = params
            used_own[s] = False
            ref = fallback[s]
            what = "" if np.array_equal(params, ref[0]) else "'s cut on this file's own landmarks"
            flags.append(f"{pop.name + s}: {reason}; used the {ref[1]}{what} {fitters[s].describe(params)}")
        flags[-1] += (
            f" (the gate keeps {pick[3]:.1%})"
            if plausible
            else f" (which keeps {_share(pick[3], g.fraction)}, also outside)"
        )
        return pick[1], pick[2], pick[3]

    def _quadrant_side(self, g: DataDrivenGate, fitter: Fitter, chosen: Mapping, pidx, parent: str):
        """``(scope, events)``: the parent's events on the quadrant's side of its other thresholds
        (fixed, or already chosen for this sample), for a threshold fitted ``within: quadrant``; the
        scope names them (e.g. ``Live & CD3 < 2.41``) for the fit's memo and cached values."""
        mask, names = None, []
        for d, t, sign in zip(g.dims, g.thresholds, g.signs):
            if d in fitter.dims:
                continue
            if isinstance(t, Fitter):
                if f"[{d.name}]" not in chosen:  # not fitted (an optional marker the file lacks)
                    continue
                t = chosen[f"[{d.name}]"][0]
            x = self.values(d, pidx, parent)
            m = x >= float(t) if sign == "+" else x < float(t)
            mask = m if mask is None else mask & m
            names.append(f"{d.name} {'>=' if sign == '+' else '<'} {float(t):.6g}")
        if mask is None:
            return parent, pidx
        idx = np.flatnonzero(mask) if pidx is None else pidx[mask]
        return f"{parent} & {' & '.join(names)}", idx

    def _fit(self, fitter: Fitter, parent: str, pidx, n_parent: int):
        """Fit one fitter on the parent's events: ``(params, reason, fallback, how)``; ``params`` is
        None when the fit failed (``reason`` says why); ``fallback`` is a landmark-relative value
        (``how`` describes it) or None.

        Fits are memoised on (parent, dimensions, method, options), and their random subsample
        is seeded from that key: a threshold shared by two gates (e.g. CD4 in the CD4 T and
        CD8 T quadrants) is fitted once and is the same in both.
        """
        out = self._fit_own(fitter, parent, pidx, n_parent)
        if fitter.method != "reference" and fitter.options.get("control") == "fmo":
            if "align_on" in fitter.options:
                own = None if out[0] is None else self._fmo_calibrated(fitter, parent, out[0])
                spec = self._transform_spec(fitter.dims[0])
                reads = [self._fmo_aligned(fitter, parent, pop) for pop in fitter.options["align_on"]]
                reads = [r for r in reads if r is not None]
                if reads:
                    if own is not None and own is not out[0]:
                        t_own = _inverse(spec, float(own[0]))
                        if t_own > 0:
                            reads.append((t_own, n_parent, f"{parent}'s own landmark", reads[0][3]))
                    how = "median" if len(reads) >= 3 else "mean weighted by events"
                    self.fmo_notes[(parent, fitter.dims[0].name)] = (
                        f"FMO control {reads[0][3]} moved by this file's drift (read on "
                        f"{', '.join(r[2] for r in reads)}; {how})"
                    )
                    if len(reads) >= 3:
                        # the drift read on three populations: the median, so that one whose
                        # shape differs from the controls' (another donor) cannot move the gate
                        t = float(np.median([r[0] for r in reads]))
                    else:
                        # geometric mean weighted by events (a percentile's variance ~ 1/n)
                        w = np.array([r[1] for r in reads], dtype=np.float64)
                        t = float(np.exp(np.sum(w * np.log([r[0] for r in reads])) / w.sum()))
                    return (
                        np.array([float(_adapters.apply_transform(spec, np.array([t]))[0])]),
                        "",
                        *out[2:],
                    )
            if out[0] is not None:
                out = (self._fmo_calibrated(fitter, parent, out[0]), *out[1:])
        return out

    def _fit_key(self, fitter: Fitter, parent: str) -> tuple:
        """The fit's memo key: (parent, dimensions, method, options, min_events)."""
        # `control` only says whether an FMO calibrates the fit afterwards: not part of the key
        opts = {k: v for k, v in fitter.options.items() if k != "control"}
        return (
            parent,
            tuple(self._dim_key(d) for d in fitter.dims),
            fitter.method,
            json.dumps(opts, sort_keys=True, default=str),
            fitter.bounds.min_events,
        )

    def _fit_rng(self, fitter: Fitter, memo_key: tuple) -> np.random.Generator:
        """The generator of the fit's seeded subsample (and of any randomness of the fit)."""
        opts = {k: v for k, v in fitter.options.items() if k != "control"}
        # the subsample's seed ignores `scatter` (it only decides whether a hump is live): the
        # same events, and landmarks, as the gate without it
        seed_key = (
            *memo_key[:3],
            json.dumps({k: v for k, v in opts.items() if k != "scatter"}, sort_keys=True, default=str),
            *memo_key[4:],
        )
        seed = zlib.crc32(repr(seed_key).encode())
        return np.random.default_rng([self.template.seed, seed])

    def fit_event_count(self, fitter: Fitter) -> int:
        """How many events a fit of ``fitter`` on all events (a gate whose parent is ``root``)
        reads: its seeded subsample less the events saturated on a channel of its dimensions, the
        count its ``min_events`` is checked against (``cytopipe template check``)."""
        n = self.events.shape[0]
        rng = self._fit_rng(fitter, self._fit_key(fitter, "root"))
        pos = self._fit_positions(fitter.dims, None, n, fitter.events_needed, rng)
        return n if pos is None else len(pos)

    def _fit_own(self, fitter: Fitter, parent: str, pidx, n_parent: int):
        memo_key = self._fit_key(fitter, parent)
        if memo_key in self._fits:
            return self._fits[memo_key]
        rng = self._fit_rng(fitter, memo_key)
        out: tuple
        try:
            if fitter.method == "reference":
                out = self._fit_reference(fitter, parent, pidx, rng)
            else:
                if n_parent < fitter.bounds.min_events:
                    raise FitFailure(
                        f"only {n_parent} events in the parent (need >= {fitter.bounds.min_events})"
                    )
                pos = self._fit_positions(fitter.dims, pidx, n_parent, fitter.events_needed, rng)
                values = self.gather(fitter.dims, pidx, parent, pos)
                if getattr(fitter, "wants_linear", False) and fitter.dims[0].ratio is None:
                    params, fb, how = fitter.fit_full(
                        values, rng, *self._linear_values(fitter.dims[0], pidx, pos)
                    )
                    out = (np.asarray(params, dtype=np.float64), "", fb, how)
                elif hasattr(fitter, "fit_full") and fitter.options.get("scatter"):
                    scatter = self._scatter_values(fitter.options["scatter"], pidx, parent, pos)
                    params, fb, how = fitter.fit_full(values, rng, scatter=scatter)
                    out = (np.asarray(params, dtype=np.float64), "", fb, how)
                elif hasattr(fitter, "fit_full"):
                    params, fb, how = fitter.fit_full(values, rng)
                    out = (np.asarray(params, dtype=np.float64), "", fb, how)
                else:
                    out = (np.asarray(fitter.fit(values, rng), dtype=np.float64), "", None, "")
        except FitFailure as exc:
            out = (None, str(exc), getattr(exc, "fallback", None), getattr(exc, "how", ""))
        except (ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:  # numeric trouble
            out = (None, f"fit failed: {exc}", None, "")
        self._fits[memo_key] = out
        return out

    def _fit_positions(self, dims: Sequence[Dim], pidx, n_parent: int, needed: int, rng) -> np.ndarray | None:
        """Positions within the parent of the events a fit reads (None = all of them): the seeded
        random subsample of ``needed`` as before, less its events saturated on a channel of ``dims``.

        A saturated event (at the detector's maximum, as margin QC calls it) carries no position:
        left in, it stretches the events' range that landmarks are taken relative to (e.g. the
        debris part of the FSC range). Which events are inside the gate is decided on all of them.
        Only the subsample's raw values are read (not a pass over the file's columns), and a file
        without saturated events draws exactly the subsample it drew before."""
        return self.unsaturated(dims, pidx, subsample_index(n_parent, needed, rng))

    def unsaturated(self, dims: Sequence[Dim], idx, pos: np.ndarray | None = None) -> np.ndarray | None:
        """Positions within the events ``idx`` (None = all events), or within their positions
        ``pos`` (None = all of them), of the events not saturated on a channel of ``dims`` (None =
        every one): what a data-driven fit reads (:meth:`_fit_positions`); learned gates' and
        alignment's densities read the same events (:meth:`fit_values`)."""
        if self._limits is None:
            self._limits = saturation_limits(self.events, self.channels)
        cols = [
            c for c in sorted({c for d in dims for c in self._dim_columns(d)}) if np.isfinite(self._limits[c])
        ]
        if not cols:
            return pos
        rows = None if pos is None else (pos if idx is None else idx[pos])  # event rows read
        bad = None
        for c in cols:
            values = (
                self.events[:, c]
                if rows is None and idx is None
                else self.events[idx if rows is None else rows, c]
            )
            limit = self._limits[c]
            saturated = values >= limit
            if saturated.any() and not (values > limit + 1).any():  # else: data beyond the declared range
                bad = saturated if bad is None else bad | saturated
        if bad is None:
            return pos
        keep = np.flatnonzero(~bad)
        return keep if pos is None else pos[keep]

    def fit_values(self, dims: Sequence[Dim], idx, scope: str | None = None) -> list[np.ndarray]:
        """Values of ``dims`` at the events ``idx`` of ``scope``, less those saturated on a channel
        of ``dims``: the events a fit reads (a saturated event carries no position on the axis)."""
        return self.gather(dims, idx, scope, self.unsaturated(dims, idx))

    def _dim_columns(self, dim: Dim) -> list[int]:
        """The event-matrix columns a dimension's values come from."""
        if dim.ratio is not None:
            return [self._col[dim.ratio.numerator], self._col[dim.ratio.denominator]]
        return [self._col[dim.name]]

    def _scatter_values(self, names, pidx, parent: str, pos) -> list[np.ndarray] | None:
        """The fit's events on the scatter channels ``names`` (None when the file or the template
        lacks one)."""
        if any(n not in self._col or n in self.missing for n in names):
            return None
        try:
            return self.gather([Dim(n) for n in names], pidx, parent, pos)
        except CytopipeError:
            return None

    def _linear_values(self, dim: Dim, pidx, pos):
        """Compensated linear values of ``dim`` at the fit's events, and the map to its display
        scale (for fits that work in linear units)."""
        v = self.linear(self._col[dim.name], self._comp_key(dim))
        if pidx is not None:
            v = v[pidx if pos is None else pidx[pos]]
        elif pos is not None:
            v = v[pos]
        spec = self._transform_spec(dim)

        def to_display(t: float) -> float:
            return float(_adapters.apply_transform(spec, np.array([t], dtype=np.float64))[0])

        return v, to_display

    def _control_engine(self, ctl) -> tuple[Engine, GatingResult]:
        """A control sample gated with this template (no medians), once per control object."""
        key = (id(ctl), id(self.template), tuple(sorted(self.panel.items())), repr(self.overrides))
        hit = _CONTROL_RUNS.get(key)
        if hit is not None and hit[0] is ctl:
            return hit[1], hit[2]
        sub = Engine(
            ctl.events,
            ctl.channels,
            self.template,
            spillover=getattr(ctl, "spillover", None),
            file=getattr(ctl, "path", None),
            mapping=self.panel,
            transforms=self.overrides,
        )
        res = sub.run(medians=False)
        if len(_CONTROL_RUNS) >= 64:  # a study's controls: a few per batch or site
            _CONTROL_RUNS.pop(next(iter(_CONTROL_RUNS)))
        _CONTROL_RUNS[key] = (ctl, sub, res)
        return sub, res

    def _control_linear(self, ctl, parent: str, dim: Dim) -> tuple[Engine, np.ndarray | None, np.ndarray]:
        """(engine, parent indices, compensated linear values of ``dim``) of a control sample."""
        sub, res = self._control_engine(ctl)
        if parent != ROOT and res.populations[parent].source == NOT_MEASURED:
            raise FitFailure(f"the control {Path(str(getattr(ctl, 'path', 'control'))).name} has no {parent}")
        cidx = None if parent == ROOT else res.indices(parent)
        lin = sub.linear(sub._col[dim.name], sub._comp_key(dim))
        return sub, cidx, (lin if cidx is None else lin[cidx]).astype(np.float64)

    def _fmo_and_references(
        self, fitter: Fitter, marker: str, others: list[str], parent: str, ref_pop: str, pct: float
    ) -> tuple[float, np.ndarray]:
        """The FMO's ``pct`` percentile of ``marker`` on ``parent`` (linear units) and the events of
        ``ref_pop`` pooled over the set's other FMOs (each carries this marker's stain)."""
        dim = fitter.dims[0]
        fmo = self._control_linear(self.controls[marker], parent, dim)[2]
        ref = np.concatenate([self._control_linear(self.controls[m], ref_pop, dim)[2] for m in others])
        if len(fmo) < fitter.bounds.min_events or len(ref) < fitter.bounds.min_events:
            where = parent if ref_pop == parent else f"{parent} / {ref_pop}"
            raise FitFailure(f"too few {where} events in the controls")
        return float(np.percentile(fmo, pct)), ref

    def _stained_references(self, marker: str, parent: str) -> list[str]:
        """The markers whose FMO controls carry ``marker``'s stain and have ``parent``: a control
        missing a stain the parent is gated on has no such parent (e.g. CXCR5's FMO for the cTfh
        of PD-1), so only the FMOs of other markers serve as stained references."""
        upstream, p = set(), parent
        while p in self.template.populations:
            upstream |= {d.name for d in _all_dims(self.template.populations[p].gate)}
            p = self.template.populations[p].parent
        return [m for m in sorted(self.controls) if m != marker and m not in upstream]

    def _negative_landmark(self, dim: Dim, lin: np.ndarray, rng) -> tuple[float, float]:
        """:func:`landmarks.negative_mode_and_landmark` of compensated linear values (this file's
        display scale locates the peak), on at most ALIGN_EVENTS of them."""
        from cytopipe.gating.landmarks import negative_mode_and_landmark

        lin = lin[np.isfinite(lin)]
        if len(lin) > ALIGN_EVENTS:
            lin = lin[rng.choice(len(lin), ALIGN_EVENTS, replace=False)]
        x = _adapters.apply_transform(self._transform_spec(dim), lin)
        return negative_mode_and_landmark(x, lin, ALIGN_PERCENTILE)

    def _fmo_aligned(self, fitter: Fitter, parent: str, ref_pop: str) -> tuple[float, int, str, str] | None:
        """An ``auto ... control: fmo`` threshold with ``align_on: POP``: the FMO's ``percentile``
        on the parent (the convention), moved by this file's drift on the axis, which is the ratio
        of the negative-peak landmark of POP (a large population negative for the marker, e.g.
        CD4 T for PD-1) in this file to the same landmark in the stained controls of the FMO's
        set-up. A small parent (cTfh: a few hundred events) cannot place its own percentile; a
        large negative population reads the file's gain well. Returns (threshold in linear units,
        events of POP, a label of the reading, the FMO's file name), or None without the controls
        (the caller then uses the landmark rule)."""
        dim = fitter.dims[0]
        marker = dim.name
        others = self._stained_references(marker, parent)
        if marker not in self.controls or not others or ref_pop not in self._idx_now:
            return None
        pct = fitter.options.get("percentile", 99.5)
        memo = ("align", parent, ref_pop, self._dim_key(dim), pct)
        rng = np.random.default_rng([self.template.seed, zlib.crc32(repr(memo).encode())])
        if memo not in self._calibration:
            self._calibration[memo] = None
            try:
                fmo_t, ref = self._fmo_and_references(fitter, marker, others, parent, ref_pop, pct)
                ref_m, ref_l = self._negative_landmark(dim, ref, rng)
                if fmo_t > 0 and ref_l > 0:
                    name = Path(str(getattr(self.controls[marker], "path", "FMO"))).name
                    self._calibration[memo] = (fmo_t, ref_l, name, ref_m)
            except (FitFailure, KeyError, ValueError):
                pass
        hit = self._calibration[memo]
        ridx = self._idx_now[ref_pop]
        if hit is None or ridx is None or len(ridx) < fitter.bounds.min_events:
            return None
        try:
            own_m, own = self._negative_landmark(
                dim, self.linear(self._col[marker], self._comp_key(dim))[ridx], rng
            )
        except (FitFailure, ValueError):
            return None
        if not own > 0:
            return None
        if fitter.options.get("align") == "affine":
            # negatives' values v -> g v + c: g from the width (landmark - mode), c from the mode
            fmo_t, ref_l, name, ref_m = hit
            if not (own > own_m and ref_l > ref_m):
                return None
            g = (own - own_m) / (ref_l - ref_m)
            t = own_m + g * (fmo_t - ref_m)
            return (t, len(ridx), f"{ref_pop} x{g:.3g} {own_m - g * ref_m:+.4g}", name) if t > 0 else None
        return hit[0] * own / hit[1], len(ridx), f"{ref_pop} x{own / hit[1]:.3g}", hit[2]

    def _fmo_calibrated(self, fitter: Fitter, parent: str, params: np.ndarray) -> np.ndarray:
        """An ``auto`` threshold calibrated on the marker's FMO control (``control: fmo``).

        The landmark rule is applied to a fully stained control of the same set-up (another
        marker's FMO: it carries this marker's stain) and the FMO's ``percentile`` on the same
        parent is read; their ratio (linear units) is the rule's offset from the FMO convention
        on that set-up (non-specific staining lifts a stained negative above the FMO). This
        sample's own landmark threshold times that ratio follows its own drift (CytoNorm /
        warpSet idea: the control sets the level, the file's landmark the alignment). Without
        the controls the threshold is the landmark rule's (recorded as such)."""
        dim = fitter.dims[0]
        marker = dim.name
        others = self._stained_references(marker, parent)
        if marker not in self.controls or not others:
            return params
        memo = (parent, self._dim_key(dim), json.dumps(fitter.options, sort_keys=True, default=str))
        if memo not in self._calibration:
            self._calibration[memo] = None
            rng = np.random.default_rng([self.template.seed, zlib.crc32(repr(memo).encode())])
            try:
                fmo_t, ref_lin = self._fmo_and_references(
                    fitter, marker, others, parent, parent, fitter.options.get("percentile", 99.5)
                )
                spec = self._transform_spec(dim)
                t_ref = fitter.fit_full(
                    [_adapters.apply_transform(spec, ref_lin)],
                    rng,
                    ref_lin,
                    lambda t: float(_adapters.apply_transform(spec, np.array([t]))[0]),
                )[0]
                ref_t = float(_inverse(spec, float(t_ref[0])))
                if fmo_t > 0 and ref_t > 0:
                    name = Path(str(getattr(self.controls[marker], "path", "FMO"))).name
                    self._calibration[memo] = (fmo_t / ref_t, name)
            except (FitFailure, KeyError, ValueError):
                pass
        hit = self._calibration[memo]
        if hit is None:
            return params
        spec = self._transform_spec(dim)
        t = _inverse(spec, float(params[0])) * hit[0]
        self.fmo_notes[(parent, marker)] = f"FMO control {hit[1]} (x{hit[0]:.3g} on this file's landmark)"
        return np.array([float(_adapters.apply_transform(spec, np.array([t]))[0])])

    def _fit_reference(self, fitter: Fitter, parent: str, pidx, rng):
        """``reference`` thresholds: an FMO control's events of the same parent, else another
        population of this sample; without either, the parent's own landmarks (flagged)."""
        marker = fitter.dims[0].name
        opts = fitter.options
        values = None
        if opts.get("control") == "fmo" and marker in self.controls:
            ctl = self.controls[marker]
            # the control lacks (or has blank) the marker's stain but has its channel; its
            # percentile in compensated linear units, put on THIS sample's display scale (the
            # control's own estimated cofactor may differ)
            dim = fitter.dims[0]
            lin = self._control_linear(ctl, parent, dim)[2]
            t_lin = float(fitter.fit([lin], rng)[0])
            t = _adapters.apply_transform(self._transform_spec(dim), np.array([t_lin], dtype=np.float64))
            source = f"FMO control {Path(str(getattr(ctl, 'path', 'control'))).name}"
            return (np.asarray(t, dtype=np.float64), "", None, source)
        elif opts.get("population"):
            ref = opts["population"]
            ridx = self._idx_now.get(ref)
            values = self.gather(fitter.dims, ridx, ref)
            source = f"population {ref}"
        if values is None:
            from cytopipe.gating.landmarks import RelativeThresholdFitter

            auto = RelativeThresholdFitter("auto", fitter.dims, {}, fitter.bounds, fitter.pool)
            n = self.events.shape[0] if pidx is None else len(pidx)
            pos = subsample_index(n, DEFAULT_FIT_EVENTS, rng)
            try:
                params = auto.fit_full(self.gather(fitter.dims, pidx, parent, pos), rng)[0]
            except FitFailure as exc:
                params = getattr(exc, "fallback", None)
                if params is None:
                    raise
            raise LandmarkFailure(
                f"no FMO control of {marker} was given", params, "auto threshold of the parent (no control)"
            )
        t = fitter.fit(values, rng)
        return (np.asarray(t, dtype=np.float64), "", None, source)

    def _reference(
        self, key: str, fitter: Fitter, pooled: PooledEstimates | None, meta, relative=None, how: str = ""
    ) -> tuple | None:
        """What a failed fit falls back on, best first: ``(params, description, is_pooled)``:
        the study's pooled estimate, the landmark-relative fallback of this sample, the
        template's typed ``default``."""
        if pooled is not None:
            hit = pooled.lookup(key, fitter.pool, meta)
            if hit is not None:
                return (*hit, True)
        if relative is not None:
            return np.asarray(relative, dtype=np.float64), f"landmark fallback ({how})", False
        if fitter.default is not None:
            return fitter.default, "template default", False
        return None

    # ---- medians ---------------------------------------------------------------------------
    def _medians(self, result: GatingResult) -> None:
        markers = self.template.median_markers()
        cols = []
        present = [m for m in markers if m not in self.missing]
        for m in present:
            col = self._column(m, Dim(m), None, key="medians")
            cols.append(self.linear(col, "template" if self.template.compensation != "none" else None))
        cols = [np.ascontiguousarray(v) for v in cols]
        nans = [bool(np.isnan(v).any()) for v in cols]
        scratch = MedianScratch(len(self.events))
        for name, p in result.populations.items():
            ix = np.asarray(result._idx[name], dtype=np.int64)
            for m, v, has_nan in zip(present, cols, nans):
                p.medians[m] = median(v, ix, has_nan, scratch)


_RESOLVE_CACHE: dict[tuple, dict[str, str]] = {}
_CONTROL_RUNS: dict[tuple, tuple] = {}  # (control, template, panel, transforms) -> (control, engine, result)


def _inverse(spec: Mapping | None, t: float) -> float:
    """A display value back in compensated linear units."""
    if spec is None or spec["type"] == "identity":
        return t
    if spec["type"] == "arcsinh":
        return float(spec["cofactor"] * np.sinh(t))
    return float(_adapters._transform_object(spec).inverse(np.array([t], dtype=np.float64))[0])


def _resolve_cached(
    channels: pd.DataFrame, markers: list[str], panel: Mapping[str, str], file
) -> dict[str, str]:
    """Marker resolution memoised on the channel table: a batch of files from one panel
    resolves once per worker, not once per file."""
    key = (
        tuple(map(str, channels["pnn"])),
        tuple(map(str, channels["pns"])),
        tuple(markers),
        tuple(sorted(panel.items())),
    )
    hit = _RESOLVE_CACHE.get(key)
    if hit is None:
        hit = _adapters.resolve_markers(channels, markers, mapping=panel, file=file)
        if len(_RESOLVE_CACHE) > 256:
            _RESOLVE_CACHE.clear()
        _RESOLVE_CACHE[key] = dict(hit)
    return dict(hit)


def _within_quadrant(g: Gate, fitter: Fitter) -> bool:
    """Whether ``fitter`` is a quadrant threshold fitted ``within: quadrant``."""
    return fitter.options.get("within") == "quadrant" and hasattr(g, "thresholds") and hasattr(g, "signs")


def _all_dims(g: Gate) -> list[Dim]:
    dims = list(g.dims)
    if isinstance(g, DataDrivenGate):
        for _, f in g.fit_items():
            dims += [d for d in f.dims if d not in dims]
    return dims
