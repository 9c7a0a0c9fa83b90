"""Everything a report reads from a run folder, loaded once (and blinded once, when asked).

A run folder (docs/pipeline.md, "The run folder") holds ``population_stats.parquet``
(required), and optionally ``samples.parquet``, ``run.json``, ``statistics.parquet``,
``gate_review.parquet`` and ``clusters.parquet``. The clinical table is the one named in
``run.json`` (the workflow's ``clinical``) unless another is given. When ``statistics.parquet``
is absent the report computes the statistics with :func:`cytopipe.stats.run_statistics` and says
so.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from cytopipe.errors import CytopipeError, ReportError
from cytopipe.report.blinding import (
    arm_codes,
    blind_frame,
    codes_of_record,
    hide_arm_order,
    recode_obj,
    run_record,
    unblind_frame,
)

# settings of the workflow's `statistics:` section that StatsSettings understands
_STATS_KEYS = ("populations", "baseline_visit", "reference_arm", "alpha")


@dataclass
class RunData:
    """The tables of one run, ready for the report (blinded if ``codes`` is set)."""

    run_dir: Path
    info: dict[str, Any]
    study: str
    population_stats: pd.DataFrame
    samples: pd.DataFrame | None = None
    statistics: pd.DataFrame | None = None
    clinical: pd.DataFrame | None = None
    endpoints: pd.DataFrame | None = None
    gate_review: pd.DataFrame | None = None
    clusters: pd.DataFrame | None = None
    arms: list[str] = field(default_factory=list)  # display order (dose order when known)
    reference_arm: str | None = None
    dose_ordered: bool = False
    codes: dict[str, str] | None = None  # arm -> code when blinded
    folder_codes: dict[str, str] | None = None  # arm -> code when the run folder itself is blinded
    notes: list[str] = field(default_factory=list)  # what the report did on its own (shown)
    problems: list[str] = field(default_factory=list)  # run.json `problems`: study-level steps that failed
    clinical_error: str = ""
    #: every problem of the clinical table, one per entry (`cytopipe report` prints them, exit code 3)
    clinical_problems: list[str] = field(default_factory=list)
    baseline_visit: int = 0
    folder_name: str = ""  # the run folder's name, as shown

    @property
    def blinded(self) -> bool:
        return self.codes is not None

    @property
    def populations(self) -> list[str]:
        """Populations in template order (their order in the first sample)."""
        return list(dict.fromkeys(self.population_stats["population"]))

    @cached_property
    def measured_populations(self) -> list[str]:
        """:attr:`populations` with a frequency in at least one sample: the ones figures can draw
        (a population not measured in any sample, or empty everywhere, has only NaN)."""
        ps = self.population_stats
        pct = pd.to_numeric(ps["pct_parent"], errors="coerce")
        some = set(ps.loc[pct.notna(), "population"])
        return [p for p in self.populations if p in some]

    @cached_property
    def not_measured(self) -> pd.DataFrame:
        """:func:`not_measured` of the run's population statistics."""
        return not_measured(self.population_stats)


NOT_MEASURED = "not measured"  # a population's gate_source when a marker it needs is not in the file
NOT_MEASURED_COLUMNS = ["population", "samples_not_measured", "samples", "reason"]


def not_measured(population_stats: pd.DataFrame) -> pd.DataFrame:
    """The populations not measured in some or every sample (a marker their gate needs is not in
    the file; docs/gating.md, "Missing markers"), in template order: ``samples_not_measured`` of
    ``samples``, and ``reason`` (the gate's flag without its "not measured: " prefix, e.g.
    "marker CCR6 is not in the file"). Empty for run folders without ``gate_source``."""
    ps = population_stats
    if "gate_source" not in ps.columns or ps.empty:
        return pd.DataFrame(columns=NOT_MEASURED_COLUMNS)
    hit = ps[ps["gate_source"].astype(str) == NOT_MEASURED]
    if hit.empty:
        return pd.DataFrame(columns=NOT_MEASURED_COLUMNS)
    flags = hit["gate_flags"] if "gate_flags" in hit.columns else pd.Series("", index=hit.index)
    reasons = flags.fillna("").astype(str).map(_not_measured_reason)
    by_pop = hit.groupby("population", sort=False)
    out = pd.DataFrame(
        {
            "samples_not_measured": by_pop["sample_id"].nunique(),
            "samples": ps[ps["population"].isin(by_pop.groups)].groupby("population")["sample_id"].nunique(),
            "reason": reasons.groupby(hit["population"], sort=False).agg(
                lambda r: "; ".join(dict.fromkeys(r))
            ),
        }
    )
    order = [p for p in dict.fromkeys(ps["population"]) if p in out.index]
    return out.loc[order].rename_axis("population").reset_index()[NOT_MEASURED_COLUMNS]


def measured_rows(population_stats: pd.DataFrame) -> pd.DataFrame:
    """``population_stats`` without the rows of populations not measured in their sample: those are
    missing values, not empty gates (their ``count`` is missing; tables of older versions hold 0,
    and a Wilson interval or a fold change made from it would be an empty gate's). The table itself
    when every row is measured."""
    ps = population_stats
    if "gate_source" not in ps.columns:
        return ps
    keep = ps["gate_source"].astype(str) != NOT_MEASURED
    return ps if keep.all() else ps[keep]


def _not_measured_reason(flags: str) -> str:
    """The reason in a gate's flags: "marker CCR6 is not in the file" from "not measured: marker
    CCR6 is not in the file"."""
    for flag in flags.split("; "):
        if flag.startswith(f"{NOT_MEASURED}: "):
            return flag[len(NOT_MEASURED) + 2 :]
    return "a marker its gate needs is not in the file"


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # a damaged table: name it and say what to do
        raise ReportError(f"cannot read {path.name} ({exc}); rerun `cytopipe run`", file=path) from None


def load_run(
    run_dir: str | Path,
    *,
    blinded: bool = False,
    blind_key: Mapping[str, str] | str | Path | None = None,
    clinical: str | Path | pd.DataFrame | None = None,
    statistics: pd.DataFrame | None = None,
) -> RunData:
    """Read a run folder for the report. See the module docstring for what is read."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError("run folder not found; give the --out folder of `cytopipe run`", file=run_dir)
    ps = _read_parquet(run_dir / "population_stats.parquet")
    if ps is None:
        raise ReportError(
            "no population_stats.parquet: this is not a finished cytopipe run folder "
            "(run `cytopipe run` to completion first)",
            file=run_dir,
        )
    info: dict[str, Any] = {}
    if (run_dir / "run.json").is_file():
        try:
            info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportError(f"run.json is damaged ({exc}); rerun `cytopipe run`", file=run_dir) from None
    folder_codes = None
    record = run_record(info)
    if record is not None:  # a blinded run folder: its tables hold codes; the arms come from its inputs
        folder_codes = codes_of_record(record, run_dir, info.get("workflow"), clinical, key=blind_key)
        if blind_key is not None and arm_codes(list(folder_codes), blind_key) != folder_codes:
            raise ReportError(
                "this run folder is blinded with other codes than the blinding key gives; use the key it "
                "was blinded with (or `cytopipe unblind` it first)",
                file=run_dir,
            )
        info = recode_obj(info, folder_codes, unblind=True)
        ps = unblind_frame(ps, folder_codes)
        blinded, blind_key = True, folder_codes
    workflow = info.get("workflow") or {}
    data = RunData(
        run_dir=run_dir,
        info=info,
        study=str(info.get("study") or workflow.get("study") or run_dir.name),
        population_stats=ps,
        folder_name=run_dir.resolve().name,
        samples=_read_parquet(run_dir / "samples.parquet"),
        clusters=_read_parquet(run_dir / "clusters.parquet"),
    )
    from cytopipe.report.gate_review import read_gate_review

    data.gate_review = read_gate_review(run_dir)
    data.folder_codes = folder_codes
    if folder_codes is not None:
        data.samples = unblind_frame(data.samples, folder_codes)
        data.clusters = unblind_frame(data.clusters, folder_codes)
    data.problems = [str(p) for p in info.get("problems") or []]
    stats_settings = {k: workflow["statistics"][k] for k in _STATS_KEYS if (workflow.get("statistics") or {}).get(k) is not None}  # fmt: skip
    data.baseline_visit = int(stats_settings.get("baseline_visit", 0))
    _load_clinical(data, clinical, workflow)
    _arm_order(data, stats_settings)
    codes = (
        arm_codes(data.arms, blind_key, secret=None if blind_key is not None else _secret(data))
        if blinded
        else None
    )  # fail fast on a bad key
    if statistics is not None:
        data.statistics = statistics
    else:
        data.statistics = _read_parquet(run_dir / "statistics.parquet")
        if folder_codes is not None:
            data.statistics = unblind_frame(data.statistics, folder_codes)
        if data.statistics is None:
            _compute_statistics(data, stats_settings, _statistics_were_off(info))
    if codes is not None:
        _blind(data, codes)
    return data


def _load_clinical(data: RunData, clinical: Any, workflow: Mapping[str, Any]) -> None:
    """The clinical table, checked as `cytopipe run` checks it: against the patients and arms of the
    flow data (a patient of the run without clinical rows, an arm that differs), so the report never
    moves a patient to another arm; a problem leaves the clinical table out (``clinical_error``,
    every problem in ``clinical_problems``)."""
    from cytopipe.clinical import (
        derive_endpoints,
        load_clinical,
        patients_without_flow_data,
        validate_clinical,
        without_flow_data_message,
    )

    source = clinical if clinical is not None else workflow.get("clinical")
    if source is None:
        return
    patients = data.population_stats[["patient_id", "arm"]]
    try:
        if isinstance(source, pd.DataFrame):
            table = validate_clinical(source, patients, baseline_visit=data.baseline_visit)
        else:
            path = Path(source)
            if not path.is_file():
                data.clinical_error = f"the clinical table {path} named by the run is not there"
                data.clinical_problems = [data.clinical_error]
                return
            table = load_clinical(path, patients, baseline_visit=data.baseline_visit)
        data.clinical = table
        # the endpoint definitions of the run's statistics (workflow `statistics.clinical`), if any
        defs = dict((workflow.get("statistics") or {}).get("clinical") or {})
        data.endpoints = derive_endpoints(table, {**defs, "baseline_visit": data.baseline_visit})
        if missing := patients_without_flow_data(table, patients):
            data.notes.append(f"Clinical table: {without_flow_data_message(missing)}.")
    except CytopipeError as exc:
        _clinical_failed(data, exc)


def _clinical_failed(data: RunData, exc: CytopipeError) -> None:
    """The clinical table is left out: the error shown, each of its problems kept."""
    data.clinical_error = data.clinical_error or str(exc)
    listed = [str(p) for p in getattr(exc, "problems", None) or []] or [str(exc)]
    data.clinical_problems += [p for p in listed if p not in data.clinical_problems]
    data.clinical = None
    data.endpoints = None


def _statistics_were_off(info: Mapping[str, Any]) -> bool:
    """Whether run.json records a statistics step that did not run (the workflow's ``statistics:
    enabled`` false, or ``auto`` without a clinical table)."""
    return any(s.get("step") == "statistics" and s.get("enabled") is False for s in info.get("steps") or [])


def _compute_statistics(data: RunData, settings: Mapping[str, Any], off: bool = False) -> None:
    from cytopipe.stats import run_statistics

    ps = data.population_stats
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fit warnings are recorded in the table's notes
            data.statistics = run_statistics(measured_rows(ps), data.clinical, dict(settings))
        what = "with" if data.clinical is not None else "without"
        why = (
            "the run's statistics were off (the workflow's `statistics: enabled` is false, or `auto` "
            "without a clinical table)"
            if off
            else "statistics.parquet was not in the run folder"
        )
        data.notes.append(
            f"{why}: the report computed the statistics itself (cytopipe.stats.run_statistics, default "
            f"settings but the workflow's baseline visit, reference arm, alpha and populations, {what} "
            f"the clinical table)."
        )
    except CytopipeError as exc:
        if data.clinical is not None:  # e.g. the clinical table disagrees with the flow data
            _clinical_failed(data, exc)
            _compute_statistics(data, settings, off)
            return
        data.notes.append(f"statistics could not be computed: {exc}")


def _arm_order(data: RunData, settings: Mapping[str, Any]) -> None:
    from cytopipe.stats import StatsSettings, arm_order

    arms = [a for a in dict.fromkeys(data.population_stats["arm"].dropna().astype(str)) if a]
    if data.clinical is not None:
        arms += [a for a in dict.fromkeys(data.clinical["arm"].astype(str)) if a and a not in arms]
    s = StatsSettings.from_any({k: v for k, v in settings.items() if k == "reference_arm"})
    order, _ = arm_order(arms, s)
    data.reference_arm = s.reference_arm if s.reference_arm in arms else None
    data.dose_ordered = order is not None
    data.arms = order if order is not None else sorted(arms)


def _secret(data: RunData) -> bytes | None:
    """The seed of the blinding permutation: the run folder's secret (made now when missing) and
    its file hashes. The hashes alone would not do: samples.parquet shows them to every reader."""
    from cytopipe.store import run_secret

    s = data.samples
    hashes = sorted(str(h) for h in s["sha256"].dropna() if str(h)) if s is not None and "sha256" in s.columns else []  # fmt: skip
    return run_secret(data.run_dir, create=True) + "\n".join(hashes).encode()


def _blind(data: RunData, codes: dict[str, str]) -> None:
    from cytopipe.report.armcheck import refuse_study_names, refuse_uncodable

    markers = []
    if data.gate_review is not None:
        markers = [  # each axis name once (the table has a row per sample, population and panel)
            str(v)
            for c in ("x", "y")
            if c in data.gate_review.columns
            for v in data.gate_review[c].dropna().unique()
        ]
    inputs = {"manifest": data.samples, "clinical": data.clinical}  # their ids, not yet coded
    refuse_uncodable(codes, [*data.populations, *markers], inputs, "Nothing was written.")
    refuse_study_names(codes, data.study, data.folder_name, "Nothing was written.")
    data.codes = codes
    for name in (
        "population_stats",
        "samples",
        "statistics",
        "clinical",
        "endpoints",
        "clusters",
        "gate_review",
    ):
        setattr(data, name, blind_frame(getattr(data, name), codes))
    data.statistics = hide_arm_order(data.statistics, codes)  # computed in dose order
    data.arms = sorted(codes.values())
    data.reference_arm = None  # the display does not single out the reference arm when blinded
    data.dose_ordered = False
    data.clinical_error = _blind_str(data.clinical_error, codes)
    data.clinical_problems = [_blind_str(p, codes) for p in data.clinical_problems]
    data.notes = [_blind_str(n, codes) for n in data.notes]
    data.problems = [_blind_str(p, codes) for p in data.problems]
    data.study = _blind_str(data.study, codes)
    data.folder_name = _blind_str(data.folder_name, codes)


def _blind_str(text: str, codes: Mapping[str, str]) -> str:
    from cytopipe.report.blinding import blind_text

    return blind_text(text, codes) if text else text


#: a metacluster is left out of heatmaps and tests below this share of all clustered events ...
TINY_SHARE = 0.001
#: ... or below this many events in the whole study
TINY_EVENTS = 50


def tiny_metaclusters(clusters: pd.DataFrame | None) -> dict[str, str]:
    """``{metacluster: reason}`` for the empty or nearly empty metaclusters of ``clusters.parquet``
    (fewer than :data:`TINY_EVENTS` events in the study or less than :data:`TINY_SHARE` of the
    clustered events): their abundances are zeros and noise, so the report leaves them out of the
    heatmaps and the statistics leave them out of the tests, saying so."""
    if clusters is None or clusters.empty or "count" not in clusters.columns:
        return {}
    name = "population" if "population" in clusters.columns else "metacluster"
    events = (
        pd.to_numeric(clusters["count"], errors="coerce").fillna(0).groupby(clusters[name].astype(str)).sum()
    )
    total = float(events.sum())
    out = {}
    for mc, n in events.items():
        share = n / total if total else 0.0
        if n == 0:
            out[mc] = "empty (no event in any sample)"
        elif n < TINY_EVENTS or share < TINY_SHARE:
            out[mc] = f"{int(n):,} events in all samples ({100 * share:.2g}% of the clustered events)"
    return out


def group_problems(problems: list[str], sample_ids: Iterable[str]) -> list[tuple[str, list[str]]]:
    """The run's problems with those that differ only in the one sample they name grouped:
    ``[(text, [sample ids])]`` in the order of first appearance. A group of two or more samples
    has its text with the sample left out (``sample P001_W04 left out: ...`` -> ``samples left out:
    ...``); a problem naming no sample, or several, stands alone (``[]``)."""
    ids = sorted({str(s) for s in sample_ids if str(s)}, key=len, reverse=True)
    if not ids:
        return [(p, []) for p in problems]
    name = re.compile(rf"(?<![A-Za-z0-9_.-])(?:{'|'.join(re.escape(i) for i in ids)})(?![A-Za-z0-9_-])")
    groups: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for problem in problems:
        found = list(dict.fromkeys(name.findall(problem)))
        key = name.sub("\x00", problem) if len(found) == 1 else problem
        texts.setdefault(key, problem)
        groups.setdefault(key, [])
        if len(found) == 1 and found[0] not in groups[key]:
            groups[key].append(found[0])
    out = []
    for key, members in groups.items():
        if len(members) < 2:
            out.append((texts[key], members))
            continue
        text = re.sub(r"\bsample \x00", "samples", key).replace("\x00", "the sample")
        out.append((text, members))
    return out
