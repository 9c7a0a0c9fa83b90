"""Validation of a run's inputs before any work (:func:`validate_inputs`, the first thing
``cytopipe run`` does): the workflow, template, matrix, manifest and clinical table, a blinding
key, and a blinded run's refusals (arm names in populations, markers, ids or files the run would
blind), so that a run stops with exit 2 before a worker starts, not after all its work."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import pandas as pd

from cytopipe import errors
from cytopipe.config import stable_hash
from cytopipe.errors import ManifestError, WorkflowError
from cytopipe.pipeline.context import RunContext
from cytopipe.pipeline.fmo import is_fmo
from cytopipe.pipeline.state import _load_manifest, _spillover_hash, build_state, plan_clustering, split_jobs
from cytopipe.store import file_sha256
from cytopipe.workflow import Workflow

logger = logging.getLogger(__name__)


def validate_inputs(ctx: RunContext) -> None:
    """Spec, template, matrix and manifest: fatal errors now; per-file problems recorded later."""
    wf = ctx.wf
    ctx.manifest = _load_manifest(wf.manifest)
    ctx.jobs, ctx.controls = split_jobs(ctx.manifest)
    for job in ctx.jobs + ctx.controls:
        if not job.get("ok", True):
            ctx.fail(
                job,
                {
                    "error": f"manifest row {job.get('row')}: {job.get('problem')}",
                    "error_type": "ManifestError",
                },
                "manifest",
            )
    if not ctx.jobs:
        raise ManifestError("the manifest lists no samples to analyse (only controls)", file=wf.manifest)
    if wf.compensation["source"] == "controls" and not [c for c in ctx.controls if not is_fmo(c)]:
        raise WorkflowError(
            "compensation source is 'controls' but the manifest has no control rows "
            "(`control` column: unstained, single:CD4, ...)",
            key="compensation.source",
            file=wf.manifest,
        )
    ctx.state = build_state(wf, n_samples=len(ctx.jobs), jobs=ctx.jobs)
    from cytopipe.workflow import statistics_enabled, statistics_settings

    ctx.state.cluster = plan_clustering(wf, ctx.state.template, ctx.state.transforms)
    if statistics_enabled(wf):
        ctx.stats_settings = statistics_settings(wf)
    if wf.clinical is not None:
        ctx.clinical_problem = _check_clinical(wf, ctx.manifest)
    _check_blind_key(wf)
    from cytopipe.report.armcheck import template_names

    check_report_tables(wf, Path(wf.output), [str(a) for a in ctx.manifest["arm"].dropna() if str(a).strip()],
                        template_names(ctx.state.template))  # fmt: skip
    ctx.hashes["template"] = file_sha256(wf.template)
    ctx.hashes["qc"] = stable_hash(ctx.state.qc.to_dict())
    ctx.hashes["compensation"] = _spillover_hash(
        ctx.state.compensation, ctx.state.spillover, ctx.state.template.compensation
    )


def _check_blind_key(wf: Workflow) -> None:
    """A blinding key must code every arm of the run's inputs. Blinding is a property of the run
    folder applied when the tables are written, so a bad key would stop the run after all its work:
    found here instead, before any (exit 2)."""
    key = wf.report.get("blind_key")
    if not wf.report.get("blinded") or key is None:
        return
    from cytopipe.report.blinding import arm_codes, source_arms

    arms = source_arms({"manifest": str(wf.manifest or ""), "clinical": str(wf.clinical or "")})
    try:
        arm_codes(arms, key)
    except errors.ReportError as exc:
        raise WorkflowError(exc.message, key="report.blind_key", file=Path(str(key))) from None


def check_report_tables(
    wf: Workflow, run_dir: Path, arms: list[str] | tuple[str, ...] = (), names: Iterable[str] = ()
) -> None:
    """A report refuses to write a table over one an earlier report wrote and the user edited
    since (:func:`~cytopipe.report.tables_folder.check_edited_tables`). A blinded report refuses to
    write its tables beside a CSV in ``report_tables/`` that shows an arm (a user's file, or a table an earlier report wrote and the user edited since), and a run
    that blinds its folder refuses a file kept there that cytopipe did not write and that shows an
    arm (blinding never rewrites a user's file: cytopipe/report/blindfiles.py). Checked here, before
    any work (exit 2, nothing done), not after all of it (the folder blinded by then). ``arms``:
    besides those of the run's manifest and clinical table. ``names``: the run's populations and
    markers, which must not show an arm name when the run blinds
    (:func:`~cytopipe.report.armcheck.refuse_uncodable`)."""
    from cytopipe.report.armcheck import refuse_study_names, refuse_uncodable
    from cytopipe.report.blindfiles import check_user_files
    from cytopipe.report.blinding import find_leaks, folder_record, source_arms
    from cytopipe.report.tables_folder import check_blinded_folder, check_edited_tables

    if not wf.report.get("blinded") and folder_record(run_dir) is None:
        if wf.report.get("enabled", True):
            check_edited_tables(run_dir / "report_tables", todo="Nothing was done. Move or rename the file "
                                "(your changes are kept), then run the command again")  # fmt: skip
        return
    inputs = {"manifest": str(wf.manifest or ""), "clinical": str(wf.clinical or "")}
    arms = [*arms, *source_arms(inputs)]
    stop = "The run would blind the folder after all its work; nothing was done."
    refuse_uncodable(arms, names, inputs, stop)  # arms named by numbers, ids with an arm's letter, ...
    refuse_study_names(arms, str(wf.study or ""), run_dir.resolve().name, stop)  # the report's title
    todo = (f"{stop} Move the file out of the run folder (or take the arm names out of it, or delete it), "
            "then run the command again")  # fmt: skip
    if wf.report.get("enabled", True):
        # not written anywhere (name_arms): the run stops before its folder is touched
        check_blinded_folder(run_dir / "report_tables", partial(find_leaks, arms=arms), name_arms=True,
                             todo="The run's report is blinded, so it would stop there after all the "
                             "work, the run folder blinded by then; nothing was done. Move the file out "
                             "of the run folder (or take the arm names out of it, or delete it), then "
                             "run the command again")  # fmt: skip
    check_user_files(run_dir, partial(find_leaks, arms=arms), name_arms=True, todo=todo)


def _check_clinical(wf: Workflow, manifest: pd.DataFrame) -> str | None:
    """Check the clinical table now and say so at once. Gating does not need it: a problem is never
    fatal; it is recorded in run.json and the statistics step leaves out the clinical tests."""
    from cytopipe.clinical import load_clinical
    from cytopipe.errors import ClinicalDataError

    samples = manifest[(manifest["control"] == "") & manifest["ok"]]
    try:
        load_clinical(
            wf.clinical,
            patients=samples[["patient_id", "arm"]].drop_duplicates(),
            baseline_visit=int(wf.statistics.get("baseline_visit") or 0),
        )
    except ClinicalDataError as exc:
        # once, through logging: the command shows warnings as "cytopipe run: warning: ..." on stderr
        # and the run keeps them for run.log (a prefix here was printed twice, with a second copy)
        logger.warning("clinical table: %s", exc)
        return str(exc)
    return None
