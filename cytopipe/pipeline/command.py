"""``cytopipe run``: the command-line wiring (arguments -> :class:`~cytopipe.workflow.Workflow`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cytopipe.config import seed_argument
from cytopipe.errors import WorkflowError
from cytopipe.pipeline.executors import add_executor_arguments
from cytopipe.pipeline.progress import quiet_console
from cytopipe.pipeline.runner import run_workflow
from cytopipe.report.options import add_blinding_arguments
from cytopipe.workflow import Workflow, load_workflow, workflow_from_options

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "cytopipe run WORKFLOW.yaml [--out DIR] [options]\n"
        "       cytopipe run --manifest M.csv --template gating/X.yaml [--clinical C.csv] --out DIR"
    )
    parser.epilog = (
        "exit codes: 0 done (samples ok or flagged); 3 completed with failures (failed files: see "
        "samples.parquet; or problems in clustering, statistics or the report: see run.json); "
        "2 invalid input (nothing run); 4 an output could not be written (disk full, read-only "
        "folder) or the run folder is in use by another run; 1 internal error (a bug; full "
        "traceback in RUN_DIR/run.log); 130 interrupted. Rerun the same command to resume an "
        "interrupted or failed run: finished work is reused."
    )
    parser.add_argument("workflow", nargs="?", help="workflow YAML (see workflows/)")
    parser.add_argument("--out", help="run folder (default: the workflow's `output`)")
    parser.add_argument("--manifest", help="manifest CSV, when no workflow file is given")
    parser.add_argument("--template", help="gating template YAML, when no workflow file is given")
    parser.add_argument("--clinical", help="clinical table CSV, when no workflow file is given")
    parser.add_argument("--study", help="study name, when no workflow file is given")
    parser.add_argument(
        "--seed", type=seed_argument, help="seed of every random step (default: the workflow's)"
    )
    parser.add_argument(
        "--missing-markers",
        choices=("stop", "skip"),
        help="a template marker absent from every file: stop before any work (default) or gate the "
        "rest and report its populations 'not measured' (default: the workflow's `missing_markers`)",
    )
    add_executor_arguments(parser, "the workflow's `workers`, else one per core")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="with --scheduler synchronous: stop at the first error with its full traceback instead "
        "of recording the sample as failed",
    )
    add_blinding_arguments(parser)
    parser.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only warnings and errors on the terminal (failed files, problems): no progress, notices "
        "or summary; RUN_DIR/run.log is as complete as without it",
    )


def workflow_from_args(args: argparse.Namespace) -> Workflow:
    """The workflow of ``cytopipe run``'s arguments: a workflow file, or --manifest/--template/
    --out with every other setting at the workflow schema's defaults (those of the shipped
    workflows/*.yaml), then the command-line overrides."""
    if args.workflow:
        given = [f"--{o}" for o in ("manifest", "template", "clinical", "study") if getattr(args, o)]
        if given:
            raise WorkflowError(
                f"give either a workflow file or {', '.join(given)}, not both (the workflow names them)"
            )
        wf = load_workflow(args.workflow, output=args.out)
        if args.seed is not None:
            wf.seed = args.seed
    else:
        missing = [opt for opt in ("manifest", "template", "out") if not getattr(args, opt)]
        if missing:
            raise WorkflowError(
                "give a workflow file, or --manifest, --template and --out; missing "
                + ", ".join("--" + m for m in missing)
            )
        wf = workflow_from_options(
            args.manifest,
            args.template,
            args.out,
            clinical=args.clinical,
            study=args.study,
            seed=args.seed,
        )
    if getattr(args, "missing_markers", None):
        wf.missing_markers = args.missing_markers
    if args.workers is not None:
        if args.workers < 1:
            raise WorkflowError(f"--workers is {args.workers}; it must be at least 1")
        wf.workers = args.workers
    apply_report_options(wf, args)
    if getattr(args, "debug", False):
        if args.scheduler != "synchronous" or args.scheduler_address:
            raise WorkflowError("--debug needs --scheduler synchronous (exceptions propagate in one process)")
        from cytopipe.pipeline import tasks

        tasks._DEBUG = True
    return wf


def run(args: argparse.Namespace) -> int:
    wf = workflow_from_args(args)
    with quiet_console(args.quiet):
        result = run_workflow(
            wf,
            scheduler="distributed" if args.scheduler_address else args.scheduler,
            address=args.scheduler_address,
            memory_limit=args.memory_limit,
            progress=not args.no_progress,
        )
    if not args.quiet:
        print(result.summary())
    elif errors := result.summary(errors_only=True):  # a script's or cron's run: errors only
        print(errors, file=sys.stderr)
    return result.exit_code


def apply_report_options(wf: Workflow, args: argparse.Namespace) -> None:
    """--blinded / --blind-key / --no-report over the workflow's `report:` section."""
    report = dict(wf.report or {})
    if getattr(args, "no_report", False):
        report["enabled"] = False
    if getattr(args, "blinded", False):
        report["blinded"] = True
    if getattr(args, "blind_key", None):
        key = Path(args.blind_key).resolve()
        if not key.is_file():
            raise WorkflowError(f"--blind-key: file not found: {key}")
        report["blind_key"] = key
        if not report.get("blinded"):
            raise WorkflowError("--blind-key is used with --blinded (or `report: {blinded: true}`)")
    wf.report = report
