"""``cytopipe export``: the events of one population from every sample of a finished run.

A run folder stores tables, not events. An export re-reads each sample's FCS file on the
workers and re-applies exactly what the run did (the same QC, compensation, locked
transforms and pooled gate estimates, all recorded in run.json and ``study/``), then keeps
the events of the requested population::

    cytopipe export anndata RUN_DIR --population "CD4 T" --out cd4.h5ad
    cytopipe export fcs RUN_DIR --population Treg --out treg_fcs/

AnnData layout (readfcs / pytometry conventions): ``X`` = compensated intensities (linear,
float32) of the template's markers, ``layers["transformed"]`` = the same on the display scale
the gates used; ``var`` indexed by marker name with ``channel`` and ``signal_type``
(``area``/``height``/``width``); ``obs`` = one row per event with the sample metadata
(``sample_id``, ``patient_id``, ``visit``, ``arm``, ``batch``) and ``event`` (the event's index
in its FCS file); ``uns["cytopipe"]`` = run, population, transforms and compensation.

Markers the files do not carry (as the run gates them, e.g. with ``missing_markers: skip``): a
template marker no exported file carries is left out of ``var`` (named in a note and in
``uns["cytopipe"]["markers_left_out"]``); one that some files carry is kept, NaN for the samples
whose file lacks it. Every sample has the same ``var`` columns.

FCS export writes, per sample, the raw (uncompensated) events of the population with every
keyword and the spillover matrix of the source file, so it can be re-analysed anywhere.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.errors import StoreError, TemplateError
from cytopipe.files import atomic_write
from cytopipe.manifest import input_folders, refuse_output_in_input_folder
from cytopipe.pipeline import (
    EXIT_FAILURES,
    EXIT_OK,
    LoadedRun,
    StudyState,
    TaskFailure,
    _compensate_events,
    _guard,
    gate_prepared,
    load_run,
    make_executor,
    prepare_sample,
)
from cytopipe.pipeline.executors import add_executor_arguments

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name, help_text in (
        ("anndata", "one .h5ad with the population's events from every sample"),
        ("fcs", "one FCS file per sample with the population's raw events"),
    ):
        # (the help text stays inside add_arguments: `cytopipe export --help` compiles this function
        # from its source without importing the module, see cli._add_arguments_source)
        markers_help = (
            "Columns (var): the template's markers. A marker no exported file carries (e.g. a run with "
            "`missing_markers: skip`) is left out and named in a note; a marker some files lack is NaN "
            "for those samples, so every sample has the same columns."
        )
        description = f"{help_text}. {markers_help}" if name == "anndata" else help_text
        p = sub.add_parser(name, help=help_text, description=description)
        p.add_argument("run_dir", metavar="RUN_DIR", help="a finished `cytopipe run` folder")
        p.add_argument("--population", required=True, help='population name as in the template, e.g. "CD4 T"')
        p.add_argument(
            "--out", required=True, help="output .h5ad file" if name == "anndata" else "output folder"
        )
        p.add_argument("--samples", help="comma-separated sample_ids (default: every ok/flagged sample)")
        p.add_argument(
            "--max-events-per-sample",
            type=int,
            help="keep at most this many events per sample (seeded random subsample)",
        )
        add_executor_arguments(p, memory_limit=False)
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace existing output files (never an input file or a file of the run folder)",
        )


def run(args: argparse.Namespace) -> int:
    samples = [s.strip() for s in args.samples.split(",") if s.strip()] if args.samples else None
    kwargs = dict(
        samples=samples,
        max_events_per_sample=args.max_events_per_sample,
        workers=args.workers,
        scheduler="distributed" if args.scheduler_address else args.scheduler,
        address=args.scheduler_address,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if args.format == "anndata":
        report = export_anndata(args.run_dir, args.population, args.out, **kwargs)
    else:
        report = export_fcs(args.run_dir, args.population, args.out, **kwargs)
    print(report.summary())
    return EXIT_FAILURES if report.failed else EXIT_OK


@dataclass
class ExportReport:
    out: Path
    population: str
    counts: dict[str, int]  # sample_id -> events exported
    failed: dict[str, str]  # sample_id -> error
    notes: list[str] = field(default_factory=list)  # markers left out or NaN for some samples

    def summary(self) -> str:
        lines = [
            f"cytopipe export: {sum(self.counts.values())} events of {self.population!r} from "
            f"{len(self.counts)} samples -> {self.out}"
        ]
        lines += [f"  note: {note}" for note in self.notes]
        for sid, err in sorted(self.failed.items()):
            lines.append(f"  failed  {sid}: {_short_error(err)}")
        if self.failed:
            lines.append(f"completed with failures: {len(self.failed)} samples not exported (exit code 3)")
        return "\n".join(lines)


@dataclass
class ExportSpec:
    """Shipped to the workers with the study state."""

    state: StudyState
    population: str
    markers: list[str]
    mode: str  # "anndata" | "fcs"
    out: str
    max_events: int | None
    seed: int
    targets: dict[str, str] = field(default_factory=dict)  # fcs: sample_id -> checked output path
    codes: dict[str, str] | None = None  # arm -> code: the run folder is blinded


def _prepare_export(run_dir, population: str, samples: list[str] | None) -> tuple[LoadedRun, list[dict]]:
    run = load_run(run_dir)
    names = list(run.state.template.names)
    if population not in names:
        near = difflib.get_close_matches(population, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; populations are {names}"
        raise TemplateError(
            f"the run's template has no population {population!r}{hint}", population=population
        )
    jobs = run.jobs
    if samples is not None:
        known = {j["sample_id"] for j in jobs}
        unknown = [s for s in samples if s not in known]
        if unknown:
            raise StoreError(
                f"samples {unknown} are not among the run's ok/flagged samples", file=run.folder.path
            )
        jobs = [j for j in jobs if j["sample_id"] in set(samples)]
    if not jobs:
        raise StoreError("the run has no ok/flagged samples to export", file=run.folder.path)
    return run, jobs


def _markers(state: StudyState) -> list[str]:
    t = state.template
    out = list(t.markers())
    for m in t.median_markers():
        if m not in out:
            out.append(m)
    return out


def _export_many(run: LoadedRun, jobs, spec: ExportSpec, workers, scheduler, address, progress):
    executor = make_executor(scheduler, workers or run.wf.workers, address, None)
    results: dict[str, Any] = {}
    try:
        for i, res in executor.map(export_task, jobs, spec, f"export-{spec.mode}", progress):
            if isinstance(res, TaskFailure):
                res = {"ok": False, "error": res.error}
            results[jobs[i]["sample_id"]] = res
    finally:
        executor.close()
    return results


def export_task(job: dict[str, Any], spec: ExportSpec) -> dict[str, Any]:
    """On a worker: re-process one sample as the run did and keep the population's events."""

    def body() -> dict[str, Any]:
        prep = prepare_sample(job, spec.state)
        result = gate_prepared(prep, spec.state, medians=False)
        idx = result.indices(spec.population)
        if spec.max_events is not None and len(idx) > spec.max_events:
            rng = np.random.default_rng([spec.seed, int(job["sha256"][:15], 16)])
            idx = np.sort(rng.choice(idx, size=spec.max_events, replace=False))
        out = (
            _write_fcs(prep, result, idx, job, spec)
            if spec.mode == "fcs"
            else _population_matrix(prep, idx, job, spec)
        )
        out["not_measured"] = result.populations[spec.population].source == "not measured"
        return out

    return _guard(body)


def _write_fcs(prep, result, idx, job, spec: ExportSpec) -> dict[str, Any]:
    from cytopipe.fcs import write_fcs

    sample = prep.sample
    keywords = dict(sample.keywords)
    keywords["CYTOPIPE_POPULATION"] = spec.population
    keywords["CYTOPIPE_SOURCE"] = str(job["file"])
    if spec.codes:  # a blinded run: no arm name in any keyword of the exported file
        from cytopipe.report.blinding import blind_text

        keywords = {k: blind_text(v, spec.codes) if isinstance(v, str) else v for k, v in keywords.items()}
    path = Path(spec.targets[job["sample_id"]])  # checked on the client: inside --out, not an input
    events = sample.events[idx]
    if getattr(sample, "preprocessed", False):
        # gated on preprocessed values (a Gating-ML / FlowJo template): the file's keywords ($PnE,
        # $PnG, $TIMESTEP) describe its raw values, so those are what the export holds
        from cytopipe.fcs import read_fcs

        rows = idx if prep.kept is None else prep.kept[idx]
        events = read_fcs(job["file"]).events[rows]
    write_fcs(path, events, sample.channels, keywords=keywords, spillover=sample.spillover)
    return {"count": int(len(idx)), "path": str(path)}


def _population_matrix(prep, idx, job, spec: ExportSpec) -> dict[str, Any]:
    """Compensated (linear) and transformed values for ``idx`` of the template markers the file
    carries (``markers``, in template order; a marker no channel carries is left out, as the
    gating engine leaves it out: its populations are 'not measured')."""
    from cytopipe.panel import Panel

    sample = prep.sample
    panel = Panel(spec.markers, mapping=spec.state.template.panel or None)
    mapping, _ = panel.resolve_carried(sample.channels, file=job["file"])
    markers = [m for m in spec.markers if m in mapping]
    pnn = list(sample.channels["pnn"])
    cols = [pnn.index(mapping[m]) for m in markers]
    # the compensation the gating engine applies, on the population's events only
    comp = _compensate_events(np.ascontiguousarray(sample.events[idx]), sample, spec.state)
    linear = np.ascontiguousarray(comp[:, cols], dtype=np.float32)
    shown = linear.copy()
    for k, marker in enumerate(markers):
        tspec = _transform_spec(spec.state, marker)
        if tspec is not None:
            shown[:, k] = _apply(tspec, linear[:, k])
    event = idx if prep.kept is None else prep.kept[idx]
    return {"linear": linear, "transformed": shown, "event": event.astype(np.int64), "markers": markers,
            "channels": [pnn[c] for c in cols], "count": int(len(idx))}  # fmt: skip


def _transform_spec(state: StudyState, marker: str) -> dict | None:
    from cytopipe.gating import is_scatter_or_time

    if marker in state.transforms:
        return state.transforms[marker]
    t = state.template.transforms
    if marker in t:
        return t[marker]
    if not is_scatter_or_time(marker) and "default" in t:
        return t["default"]
    return None


def _apply(tspec: dict, values: np.ndarray) -> np.ndarray:
    from cytopipe.gating import apply_transform

    return np.asarray(apply_transform(tspec, values), dtype=np.float32)


# ------------------------------------------------------------------------------------------------
def export_population(
    run_dir: str | Path,
    population: str,
    out: str | Path,
    format: str = "fcs",
    samples: list[str] | None = None,
    max_events_per_sample: int | None = None,
    workers: int | None = None,
    scheduler: str = "local",
    address: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> ExportReport:
    """Export a population of a finished run: ``format="fcs"`` writes one FCS file per sample
    into the folder ``out`` (raw events); ``"anndata"`` writes one ``.h5ad`` file (linear values
    in ``X``, transformed ones in ``layers["transformed"]``). ``samples`` limits the samples,
    ``max_events_per_sample`` subsamples (seeded), ``workers``/``scheduler``/``address`` choose
    where the samples are re-gated, ``overwrite`` allows replacing an earlier export."""
    if format not in ("fcs", "anndata"):
        raise StoreError(f"unknown export format {format!r}; use 'fcs' or 'anndata'")
    run, jobs = _prepare_export(run_dir, population, samples)
    where = (workers, scheduler, address, progress)
    write = _export_h5ad if format == "anndata" else _export_fcs_files
    return write(run, jobs, population, Path(out).resolve(), max_events_per_sample, overwrite, where)


def export_anndata(run_dir: str | Path, population: str, out: str | Path, **options: Any) -> ExportReport:
    """Write the population's events from every sample as one AnnData ``.h5ad`` (options: those
    of :func:`export_population`)."""
    return export_population(run_dir, population, out, format="anndata", **options)


def export_fcs(run_dir: str | Path, population: str, out: str | Path, **options: Any) -> ExportReport:
    """Write one FCS file per sample (``OUT/<sample_id>.fcs``) with the population's raw events
    (options: those of :func:`export_population`)."""
    return export_population(run_dir, population, out, format="fcs", **options)


def _export_h5ad(
    run: LoadedRun,
    jobs: list[dict[str, Any]],
    population: str,
    out: Path,
    max_events_per_sample: int | None,
    overwrite: bool,
    where: tuple,
) -> ExportReport:
    import anndata as ad

    if out.is_dir():
        raise StoreError("is a folder; give the path of the .h5ad file to write", file=out)
    _check_target(out, run, overwrite)
    _refuse_input_folder(out, run)
    markers = _markers(run.state)
    spec = ExportSpec(run.state, population, markers, "anndata", str(out), max_events_per_sample, run.wf.seed)
    results = _export_many(run, jobs, spec, *where)
    failed = {sid: r["error"] for sid, r in results.items() if not r.get("ok")}
    parts = [(j, results[j["sample_id"]]) for j in sorted(jobs, key=lambda j: j["sample_id"])]
    parts = [(j, r) for j, r in parts if r.get("ok")]
    if not parts:
        raise StoreError(
            f"no sample could be exported:\n{_failure_lines(failed)}",
            file=run.folder.path,
            population=population,
        )
    left_out = [m for m in markers if not any(m in r["markers"] for _, r in parts)]
    markers = [m for m in markers if m not in left_out]
    notes = _population_notes(results, population) + _marker_notes(parts, markers, left_out, run.wf.template)
    for note in notes:
        logger.info("export of %r: %s", population, note)
    X = np.concatenate([_all_markers(r, "linear", markers) for _, r in parts])
    layer = np.concatenate([_all_markers(r, "transformed", markers) for _, r in parts])
    obs = _obs(parts)
    if run.codes is not None:  # a blinded run folder: its exports carry the codes
        from cytopipe.report.blinding import blind_frame

        obs = blind_frame(obs, run.codes)
    channels = _channels_per_marker(parts, markers)
    transforms = {m: _transform_spec(run.state, m) for m in markers}
    var = pd.DataFrame(
        {
            "channel": [channels[m] for m in markers],
            "marker": markers,
            "signal_type": [_signal_type(channels[m]) for m in markers],
            "transform": [json.dumps(transforms[m]) for m in markers],
        },
        index=pd.Index(markers, name="marker_name"),
    )
    adata = ad.AnnData(X=X, obs=obs, var=var, layers={"transformed": layer})
    adata.uns["cytopipe"] = {
        "run": str(run.folder.path),
        "study": run.info.get("study"),
        "population": population,
        "template": str(run.wf.template),
        "compensation": run.state.compensation,
        "transforms": json.dumps(transforms),
        "X": "compensated intensities (linear)",
        "layers_transformed": "display scale of the gates",
        "max_events_per_sample": -1 if max_events_per_sample is None else int(max_events_per_sample),
    }
    if left_out:  # template markers no exported file carries (only then: earlier exports unchanged)
        adata.uns["cytopipe"]["markers_left_out"] = left_out
    if run.codes is not None:
        from cytopipe.report.blinding import recode_obj

        adata.uns["cytopipe"] = recode_obj(adata.uns["cytopipe"], run.codes)
    _check_target(out, run, overwrite)  # again: a file may have appeared while the workers ran
    n_obs = adata.n_obs

    def verify(tmp: Path) -> None:
        back = ad.read_h5ad(tmp, backed="r")
        try:
            if back.n_obs != n_obs:
                raise StoreError(
                    f"the written file has {back.n_obs} of {n_obs} events (disk full?)", file=out
                )
        finally:
            back.file.close()

    atomic_write(out, lambda tmp: adata.write_h5ad(tmp), verify)
    counts = {j["sample_id"]: int(r["count"]) for j, r in parts}
    return ExportReport(out=out, population=population, counts=counts, failed=failed, notes=notes)


def _all_markers(result: dict[str, Any], key: str, markers: list[str]) -> np.ndarray:
    """A sample's ``key`` matrix with one column per exported marker: NaN where its file lacks one."""
    values = result[key]
    if result["markers"] == markers:
        return values
    full = np.full((values.shape[0], len(markers)), np.nan, dtype=np.float32)
    for k, m in enumerate(result["markers"]):
        full[:, markers.index(m)] = values[:, k]
    return full


def _population_notes(results: dict[str, dict[str, Any]], population: str) -> list[str]:
    """The samples where the population is 'not measured' (its gates need a marker the file lacks)."""
    lacking = sorted(sid for sid, r in results.items() if r.get("ok") and r.get("not_measured"))
    if not lacking:
        return []
    return [
        f"population {population!r} is not measured in {', '.join(lacking)}: its gates need a marker "
        "their files lack (the `flags` column of samples.parquet names it); 0 events exported for them"
    ]


def _marker_notes(parts, markers: list[str], left_out: list[str], template: Any) -> list[str]:
    """In words: the template markers no exported file carries, and those some files lack."""
    notes = []
    if left_out:
        notes.append(
            f"markers left out (no exported file carries them): {', '.join(left_out)}. If a file carries "
            "one under another label, map it to its channel in the template's `panel:` section "
            f"(`cytopipe template check FILES --template {template}` shows how each marker resolves)"
        )
    for m in markers:
        lacking = [j["sample_id"] for j, r in parts if m not in r["markers"]]
        if lacking:
            notes.append(
                f"marker {m} is NaN for the samples whose file does not carry it: {', '.join(lacking)}"
            )
    return notes


def _short_error(error: str, limit: int = 200) -> str:
    """A sample's error on one short line: without the list of every channel of the file."""
    text = re.sub(r";? channels (seen|are):? .*?(?=\. [A-Z]|$)", "", " ".join(error.split()))
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _failure_lines(failed: dict[str, str]) -> str:
    """One line per failed sample, sorted by sample_id."""
    return "\n".join(f"  {sid}: {_short_error(err)}" for sid, err in sorted(failed.items()))


def _obs(parts) -> pd.DataFrame:
    frames = []
    for job, r in parts:
        n = r["count"]
        frames.append(
            pd.DataFrame(
                {
                    "sample_id": job["sample_id"],
                    "patient_id": job.get("patient_id"),
                    "visit": job.get("visit"),
                    "arm": job.get("arm"),
                    "batch": job.get("batch"),
                    "event": r["event"],
                },
                index=[f"{job['sample_id']}:{e}" for e in r["event"]] if n else [],
            )
        )
    obs = pd.concat(frames)
    for col in ("sample_id", "patient_id", "arm", "batch"):
        obs[col] = obs[col].astype(str).astype("category")
    obs["visit"] = pd.to_numeric(obs["visit"], errors="coerce").astype("Int64")
    obs.index = obs.index.astype(str)
    return obs


def _channels_per_marker(parts, markers) -> dict[str, str]:
    """The $PnN of each marker; several channel names across files are joined with '|'."""
    out = {}
    for m in markers:
        names = sorted({r["channels"][r["markers"].index(m)] for _, r in parts if m in r["markers"]})
        out[m] = "|".join(names)
    return out


def _signal_type(channel: str) -> str:
    c = channel.upper()
    return {"-A": "area", "-H": "height", "-W": "width"}.get(c[-2:], "other")


def _export_fcs_files(
    run: LoadedRun,
    jobs: list[dict[str, Any]],
    population: str,
    out: Path,
    max_events_per_sample: int | None,
    overwrite: bool,
    where: tuple,
) -> ExportReport:
    if out.exists() and not out.is_dir():
        raise StoreError("is a file; give the folder to write the FCS files into", file=out)
    inputs = _inputs(run)
    targets = {j["sample_id"]: str(_fcs_target(out, j["sample_id"], run, overwrite, inputs)) for j in jobs}
    _refuse_input_folder(out, run)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the output folder: {exc.strerror}", file=out) from None
    spec = ExportSpec(
        run.state,
        population,
        [],
        "fcs",
        str(out),
        max_events_per_sample,
        run.wf.seed,
        targets=targets,
        codes=run.codes,
    )
    results = _export_many(run, jobs, spec, *where)
    failed = {sid: r["error"] for sid, r in results.items() if not r.get("ok")}
    counts = {sid: int(r["count"]) for sid, r in sorted(results.items()) if r.get("ok")}
    notes = _population_notes(results, population)
    for note in notes:
        logger.info("export of %r: %s", population, note)
    return ExportReport(out=out, population=population, counts=counts, failed=failed, notes=notes)


# --- where an export may write -------------------------------------------------------------------
def _input_fcs(run: LoadedRun) -> set[Path]:
    """The FCS files the run read: every file of its manifest (controls too), as listed there."""
    from cytopipe.pipeline import _load_manifest

    return {Path(p) for p in _load_manifest(run.wf.manifest)["path"] if p}


def _inputs(run: LoadedRun) -> set[Path]:
    """Every file the run read: the manifest's FCS files (controls too), manifest, template, clinical."""
    paths = _input_fcs(run) | {Path(p) for p in (run.wf.manifest, run.wf.template, run.wf.clinical) if p}
    return {p.resolve() for p in paths}


def _refuse_input_folder(out: Path, run: LoadedRun) -> None:
    """Not into (or inside) a folder the run's FCS files are read from (run.json's manifest)."""
    refuse_output_in_input_folder(out, input_folders(_input_fcs(run)))


def _check_target(target: Path, run: LoadedRun, overwrite: bool, inputs: set[Path] | None = None) -> None:
    """Refuse to write over an input, a file of the run folder, or (without ``overwrite``) any file."""
    real = target.resolve()  # a symlink planted at the target is judged by where it points
    inputs = _inputs(run) if inputs is None else inputs
    if real in inputs:
        raise StoreError(
            "is an input of the run (an FCS file, the manifest, template or clinical table); "
            "an export never replaces an input: choose another --out",
            file=target,
        )
    if real.is_relative_to(run.folder.path) and real.exists():
        raise StoreError("is a file of the run folder; choose another --out", file=target)
    if real.exists() and not overwrite:
        raise StoreError(
            "exists already; give --overwrite to replace it, or choose another --out", file=target
        )
    for folder in real.parents:  # a file where a folder of the path must be: refused before any work
        if folder.exists():
            if not folder.is_dir():
                raise StoreError(f"{folder} is a file, not a folder; choose another --out", file=target)
            break


def _fcs_target(out: Path, sample_id: str, run: LoadedRun, overwrite: bool, inputs: set[Path]) -> Path:
    """``OUT/<sample_id>.fcs``, checked: a plain file name, inside ``out``, not an input."""
    from cytopipe.manifest import unsafe_name

    why = unsafe_name(sample_id)
    if why:
        raise StoreError(
            f"sample_id {sample_id!r} cannot be used as a file name ({why}); nothing was exported",
            file=out,
            sample=sample_id,
        )
    target = out / f"{sample_id}.fcs"
    if target.resolve().parent != out.resolve():
        raise StoreError(
            f"sample_id {sample_id!r} would write outside the output folder; nothing was exported",
            file=out,
            sample=sample_id,
        )
    _check_target(target, run, overwrite, inputs)
    return target


__all__ = ["ExportReport", "export_anndata", "export_fcs"]
