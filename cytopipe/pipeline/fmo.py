"""FMO controls of the manifest (``control: fmo:<marker>``) in ``cytopipe run`` / ``cytopipe gate``.

Gates with ``control: fmo`` (``auto`` thresholds calibrated on the FMO, ``reference`` thresholds
read on it; see docs/gating.md) take a sample's FMO set. Which set (:func:`cytopipe.gating.command.
assign_fmo_sets`): the FMO rows of the sample's own batch, else of its site (the site's earliest
set), else the study's (FMO rows with neither batch nor site). A sample without one is gated by the
landmark rule and flagged. Here: the plan (:func:`plan_fmo`, after registration: each live job gets
``job["fmo"]``, run.json lists the controls used), the cache-key part (:func:`fmo_key`, the
controls' content hashes: a changed FMO re-gates the samples that use it), and on the workers the
controls read at most once per process (:func:`fmo_controls`, a small bounded cache) and the flags
of gates that wanted an FMO and did not get one (:func:`flag_fmo_fallbacks`).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cytopipe.config import stable_hash
from cytopipe.errors import CytopipeError

logger = logging.getLogger(__name__)

#: control samples kept per worker process (a set is one file per dim marker; a worker gates a
#: batch or a site at a time): the least recently used one is dropped beyond this
MAX_CACHED_CONTROLS = 24
_CACHE: OrderedDict[tuple, Any] = OrderedDict()


def fmo_markers(template: Any) -> set[str]:
    """Markers of the template's gates that ask for an FMO (``control: fmo``)."""
    out: set[str] = set()
    for pop in template:
        for _, fitter in getattr(pop.gate, "fit_items", list)():
            if fitter.options.get("control") == "fmo":
                out.add(fitter.dims[0].name)
    return out


def is_fmo(job: Mapping[str, Any]) -> bool:
    return str(job.get("control") or "").strip().lower().startswith("fmo:")


def plan_fmo(ctx: Any) -> dict[str, Any]:
    """Give every live sample its FMO set (``job["fmo"]``); bad FMO rows are failed controls (named
    in samples.parquet), never a stop. Returns what run.json records under the register step."""
    from cytopipe.gating.command import assign_fmo_sets

    wanted = fmo_markers(ctx.state.template)
    rows = [c for c in ctx.controls if is_fmo(c)]
    if not wanted or not rows:
        if wanted:
            logger.info(
                "gates ask for FMO controls (%s) but the manifest has none", ", ".join(sorted(wanted))
            )
        return {"fmo_controls": [], "fmo_wanted": sorted(wanted)} if wanted else {}
    template_markers = set(ctx.state.template.markers())
    for c in rows:
        marker = str(c["control"]).split(":", 1)[1].strip()
        c["_marker"] = marker
        if c["sample_id"] in ctx.failures:
            continue
        if marker not in template_markers:
            ctx.fail(
                c,
                {
                    "error": f"FMO control of {marker!r}: the template has no such marker "
                    f"(its markers: {', '.join(sorted(template_markers))}); check the control column",
                    "error_type": "ManifestError",
                },  # fmt: skip
                "register",
            )
    good = [c for c in rows if c["sample_id"] not in ctx.failures]
    sets, problems = assign_fmo_sets(good, ctx.alive())
    for c, why in problems:
        ctx.fail(c, {"error": why, "error_type": "ManifestError"}, "register")
    used, n_without = attach_fmo(ctx.alive(), sets)
    listed = [
        {"file": str(c["file"]), "marker": c["_marker"], "batch": c.get("batch"), "site": c.get("site"),
         "sha256": c.get("sha256"), "samples": used.get(c["sample_id"], 0),
         **({"error": ctx.failures[c["sample_id"]]["error"]} if c["sample_id"] in ctx.failures else {})}
        for c in rows
    ]  # fmt: skip
    for c in rows:
        c.pop("_marker", None)
    if n_without:
        logger.info("%d sample(s) have no FMO set (batch, site or study): landmark rule, flagged", n_without)
    return {"fmo_controls": listed, "fmo_wanted": sorted(wanted), "samples_without_fmo": n_without}


def attach_fmo(jobs: list[dict[str, Any]], sets: list) -> tuple[dict[str, int], int]:
    """Put each job's FMO set (from :func:`~cytopipe.gating.command.assign_fmo_sets`) in
    ``job["fmo"]``: ``(samples per control, samples without a set)``."""
    used: dict[str, int] = {}
    n_without = 0
    for job, chosen in zip(jobs, sets):
        if chosen is None:  # the study has FMOs, this sample's batch/site none: flagged fallback
            job["fmo"] = {"set": None, "controls": {}}
            n_without += 1
            continue
        label, members = chosen
        job["fmo"] = {
            "set": label,
            "controls": {
                m: {
                    "file": str(c["file"]),
                    "path": str(c["path"]),
                    "sha256": c["sha256"],
                    "batch": c.get("batch"),
                    "site": c.get("site"),
                }
                for m, c in sorted(members.items())
            },
        }
        for c in members.values():
            used[c["sample_id"]] = used.get(c["sample_id"], 0) + 1
    return used, n_without


def attach_loaded_fmo(
    template: Any, jobs: list[dict[str, Any]], controls: list[dict[str, Any]], sha: Mapping
) -> None:
    """The FMO sets of a finished run's samples, as the run assigned them (its usable controls,
    ``sha``: sample_id -> sha256 from samples.parquet), so that re-gating (export, review) gates
    as the run did."""
    if not fmo_markers(template):
        return
    from cytopipe.gating.command import assign_fmo_sets

    rows = [dict(c, sha256=sha[c["sample_id"]]) for c in controls if is_fmo(c) and c["sample_id"] in sha]
    if rows:
        attach_fmo(jobs, assign_fmo_sets(rows, jobs)[0])


def fmo_key(job: Mapping[str, Any]) -> str:
    """Cache-key part: the content hashes of the sample's FMO controls ('' without any)."""
    fmo = job.get("fmo")
    if not fmo:
        return ""
    return "f" + stable_hash(sorted((m, c["sha256"]) for m, c in fmo["controls"].items()))[:8]


def fmo_controls(
    fmo: Mapping[str, Any] | None, state: Any, spillover: Any, template: Any = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """``({marker: Sample}, {marker: problem})`` of a sample's FMO set, read at most once per worker process.

    A control is read as the samples it sets thresholds for are (:func:`cytopipe.gating.loading.
    read_sample`: with the usual FCS preprocessing for a ``template`` imported from Gating-ML,
    FlowJo or Cytobank, default ``state.template``; raw for a YAML template) and compensated as the
    sample is (its own control set's matrix when the study computes one per set, else the
    sample's); an unreadable control is left out with its reason (its gates fall back on the
    landmark rule and are flagged)."""
    if not fmo:
        return {}, {}
    from cytopipe.errors import CytopipeError

    template = state.template if template is None else template
    preprocess = bool(getattr(template, "preprocess", False))
    out: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for marker, c in fmo["controls"].items():
        spill = _control_spillover(c, state, spillover)
        key = (c["path"], c["sha256"], _spill_key(spill), preprocess)
        hit = _CACHE.get(key)
        if hit is None:
            try:
                hit = _read_control(c, spill, template)
            except CytopipeError as exc:
                problems[marker] = f"the FMO control {c['file']} of {marker} is unreadable ({exc})"
                continue
            _CACHE[key] = hit
            while len(_CACHE) > MAX_CACHED_CONTROLS:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        out[marker] = hit
    return out, problems


class _manifest_path:
    """Errors about the file name it as the manifest does, with the resolved path added."""

    def __init__(self, job: Mapping[str, Any]):
        self.job = job

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, CytopipeError) and str(exc.context.get("file")) == str(self.job["path"]):
            exc.context["file"] = self.job["file"]
            if str(self.job["file"]) != str(self.job["path"]) and "resolved path" not in exc.message:
                exc.message += f" (resolved path {self.job['path']})"
            exc.args = (exc._render(),)
        return False


def _read_control(c: Mapping[str, Any], spill: Any, template: Any) -> Any:
    from cytopipe.gating.loading import read_sample

    with _manifest_path(c):
        sample = read_sample(c["path"], template)  # preprocessed when the template's gates need it
    sample.path = Path(c["file"])  # notes and errors name the manifest's file
    if spill is not None:
        sample.spillover = spill
    return sample


def _control_spillover(c: Mapping[str, Any], state: Any, spillover: Any) -> Any:
    if state.spillover_sets:
        value = c.get(state.spillover_column) if state.spillover_column else None
        if value is not None and str(value) in state.spillover_sets:
            return state.spillover_sets[str(value)]
        return spillover
    return state.spillover if state.spillover is not None else None


def _spill_key(spill: Any) -> str:
    if spill is None:
        return ""
    return stable_hash(
        [list(map(str, spill.channels)), np.asarray(spill.matrix, dtype=np.float64).tobytes().hex()]
    )


def gate_with_fmo(gate: Any, prep: Any, state: Any, template: Any, **kwargs: Any) -> Any:
    """``gate(prep.sample, template, controls=<the sample's FMO set>, **kwargs)``, with the FMO
    gates that got no FMO flagged (:func:`flag_fmo_fallbacks`).

    Every gating of a prepared sample comes through here: a template imported from Gating-ML or
    FlowJo gets the sample's events with the usual FCS preprocessing (once; event QC looked at the
    raw values), a YAML template the raw values (:func:`cytopipe.gating.loading.preprocess_for`);
    its FMO controls are read the same way (:func:`fmo_controls`)."""
    from cytopipe.gating.loading import preprocess_for

    preprocess_for(prep.sample, template)
    controls, problems = fmo_controls(prep.fmo, state, getattr(prep.sample, "spillover", None), template)
    result = gate(prep.sample, template, controls=controls, **kwargs)
    flag_fmo_fallbacks(result, template, prep.fmo, problems)
    return result


def fit_records(result: Any, sample_id: str, fmo: Mapping[str, Any] | None) -> Any:
    """The sample's fit records; in a study with FMO controls with a ``control`` column: the FMO
    file that set (or calibrated) each threshold ('' for none)."""
    fits = result.fit_records(sample_id)
    if fmo is not None:
        by_key = fit_controls(result)
        fits["control"] = [by_key.get(k, "") for k in fits["key"]]
    return fits


_NOTE = re.compile(r"FMO control (\S+)")


def fit_controls(result: Any) -> dict[str, str]:
    """Gate fit key -> the FMO control file that set (or calibrated) its threshold."""
    out: dict[str, str] = {}
    for _, note in getattr(result, "sources", []):
        key, _, text = note.partition(": ")
        hit = _NOTE.search(text)
        if hit:
            out[key] = hit.group(1)
    return out


def flag_fmo_fallbacks(
    result: Any, template: Any, fmo: Mapping[str, Any] | None, problems: Mapping[str, str]
) -> None:
    """Flag every gate that asks for an FMO but whose threshold no FMO set, in a study that has FMO
    controls (the sample's batch, site and study have no set, the set lacks the marker, or the
    control could not be used): its threshold is the landmark rule's."""
    if fmo is None:  # no FMO controls in the study: the landmark rule is the template's own
        return
    from cytopipe.gating.engine import NOT_MEASURED

    by_key = fit_controls(result)
    # a fit that failed fell back on a pooled estimate or default, flagged by the engine already
    failed = {f.key for f in getattr(result, "fits", []) if f.status != "ok"}
    for pop in template:
        items = [
            (s, f) for s, f in getattr(pop.gate, "fit_items", list)() if f.options.get("control") == "fmo"
        ]
        p = result.populations.get(pop.name)
        if not items or p is None or p.source == NOT_MEASURED:
            continue
        for suffix, fitter in items:
            if (pop.name + suffix) in by_key or (pop.name + suffix) in failed:
                continue
            marker = fitter.dims[0].name
            if marker in problems:
                why = problems[marker]
            elif not fmo["set"]:
                why = "the study has FMO controls, but none for this sample's batch or site"
            elif marker in fmo["controls"]:
                why = f"the FMO control {fmo['controls'][marker]['file']} of {marker} could not be used"
            else:
                why = f"the sample's FMO set ({fmo['set']}) has no control of {marker}"
            p.flags.append(f"{pop.name + suffix}: {why}; threshold by the landmark rule")
