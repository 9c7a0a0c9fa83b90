"""``cytopipe gate``: gate the files of a manifest through the pipeline's plan, in one process.

``cytopipe gate --manifest M.csv --template T.yaml --out DIR`` runs the steps of ``cytopipe run``
(:data:`cytopipe.pipeline.steps.STEPS`) on the synchronous executor, with clustering, statistics
and the report off: the same event QC, two-pass pooling of data-driven gates and atomic writes,
so its ``population_stats.parquet`` is the one ``cytopipe run`` writes for the same files and
template. The gate command's own files are added: ``gate_flags.parquet`` (per sample and
population, the flags of its gate, e.g. a fallback and its reason) and ``gate_fits.parquet``
(every sample's own fits of the data-driven gates, before pooling).

What the pipeline does not do yet stays on the single-process gating of
:mod:`cytopipe.gating.command`: FCS files listed without a manifest (or a selection of the
manifest's files), ``--no-pool``, ``--gatingml``/``--flowjo`` per-sample exports, ``--examples``,
Gating-ML/FlowJo templates (Cytobank gates tailored per file). FMO controls of the manifest
(``control: fmo:<marker>``) are used as ``cytopipe run`` uses them (:mod:`cytopipe.pipeline.fmo`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from cytopipe.gating.command import add_arguments  # noqa: F401 - the command's options, one place
from cytopipe.pipeline.progress import quiet_console
from cytopipe.pipeline.runner import run_workflow
from cytopipe.store import atomic_write_parquet
from cytopipe.workflow import workflow_from_options

logger = logging.getLogger(__name__)

OFF = {"clustering": {"enabled": False}, "statistics": {"enabled": False}, "report": {"enabled": False}}


def not_through_pipeline(args: argparse.Namespace) -> str | None:
    """Why these arguments need the single-process gating (None: the pipeline runs them)."""
    if not getattr(args, "manifest", None):
        return "FCS files without a manifest"
    if getattr(args, "files", None):
        return "a selection of the manifest's files"
    for option in ("no_pool", "gatingml", "flowjo", "examples"):
        if getattr(args, option, None):
            return "--" + option.replace("_", "-")
    if Path(args.template).suffix.lower() not in (".yaml", ".yml"):
        return "a Gating-ML or FlowJo template"
    return None


def run(args: argparse.Namespace) -> int:
    reason = not_through_pipeline(args)
    if reason is not None:
        from cytopipe.gating.command import run as gate_in_one_process

        logger.info("cytopipe gate: single-process gating (%s)", reason)
        return gate_in_one_process(args)
    wf = workflow_from_options(args.manifest, args.template, args.out, **OFF)
    wf.missing_markers = args.missing_markers
    with quiet_console(args.quiet):  # run.log as complete as without --quiet
        result = run_workflow(wf, scheduler="synchronous")
    out = result.out
    stats = result.population_stats
    flagged = stats[stats["gate_flags"].fillna("") != ""] if "gate_flags" in stats else stats.iloc[:0]
    flags = pd.DataFrame(
        {
            "sample_id": flagged["sample_id"],
            "population": flagged["population"],
            "flag": flagged["gate_flags"],
        }
    ).reset_index(drop=True)
    atomic_write_parquet(out / "gate_flags.parquet", flags)
    fits = out / "study" / "gate_fits.parquet"
    table = pd.read_parquet(fits) if fits.is_file() else pd.DataFrame(columns=["sample_id", "key", "status"])
    atomic_write_parquet(out / "gate_fits.parquet", table)
    if not args.quiet:
        print(result.summary("gate"))
    elif errors := result.summary("gate", errors_only=True):  # as the single-process gating's
        print(errors, file=sys.stderr)
    return result.exit_code
