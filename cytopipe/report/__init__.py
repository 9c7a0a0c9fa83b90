"""Reports of a run folder: one offline ``report.html`` with embedded figures, and its tables as CSV.

::

    cytopipe report RUN_DIR                 # RUN_DIR/report.html + RUN_DIR/report_tables/*.csv
    cytopipe report RUN_DIR --blinded       # arm names replaced by codes everywhere

    from cytopipe.report import write_report
    write_report("runs/sle_il2")            # what `cytopipe run` calls at its end

Sections: overview, run summary and QC, gate review gallery, dynamics, clinical endpoints,
correlations with clinical change, model tables, clusters (when the run has them), tables and
methods. What each shows and how to read it: docs/reports.md. The gate-review data the gallery
draws is computed per sample by :func:`cytopipe.report.gate_review.gate_review_data`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cytopipe.config import MAX_GALLERY
from cytopipe.report.options import add_blinding_arguments

if TYPE_CHECKING:  # pragma: no cover
    from cytopipe.report.gate_review import (
        GATE_REVIEW_FILE,
        gate_review_data,
        read_gate_review,
        write_gate_review,
    )
    from cytopipe.report.outliers import gate_outliers

#: imported on first use (PEP 562): the gate gallery's helper process imports this package to
#: draw, and these modules import pandas, which it does not need (~0.3 s of CPU per report)
_LAZY = {
    "GATE_REVIEW_FILE": "cytopipe.report.gate_review",
    "gate_review_data": "cytopipe.report.gate_review",
    "read_gate_review": "cytopipe.report.gate_review",
    "write_gate_review": "cytopipe.report.gate_review",
    "gate_outliers": "cytopipe.report.outliers",
}

__all__ = [
    "GATE_REVIEW_FILE",
    "add_arguments",
    "gate_outliers",
    "gate_review_data",
    "read_gate_review",
    "run",
    "write_gate_review",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cytopipe.report' has no attribute {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder written by `cytopipe run`")
    add_blinding_arguments(parser)
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="where to write the report (default RUN_DIR/report.html); its CSV tables go to a folder "
        "beside it named <name>_tables",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="write the report even when its inputs have not changed since the last one (default: reuse it)",
    )
    parser.add_argument(
        "--clinical",
        metavar="CSV",
        help="clinical table to use (default: the one named in the run's workflow)",
    )


def run(args: argparse.Namespace) -> int:
    from cytopipe.report.build import report_is_current

    options = dict(
        blinded=args.blinded,
        out=args.out,
        blind_key=getattr(args, "blind_key", None),
        clinical=getattr(args, "clinical", None),
    )
    from cytopipe.errors import EXIT_FAILURES, EXIT_OK, ReportError

    if options["clinical"] is not None and not Path(options["clinical"]).is_file():
        raise ReportError(
            "clinical table not found; check the --clinical path", file=Path(options["clinical"])
        )
    reused = not args.rebuild and report_is_current(args.run_dir, **options)
    problems: list[str] = []
    path = write_report(args.run_dir, reuse=not args.rebuild, problems=problems, **options)
    print(f"report reused (its inputs are unchanged): {path}" if reused else f"report written: {path}")
    for problem in problems[:50]:  # written, but without the clinical table: as `cytopipe run` ends (exit 3)
        print(f"cytopipe report: warning: clinical table not used: {problem}", file=sys.stderr)
    if len(problems) > 50:
        print(f"cytopipe report: warning: ... and {len(problems) - 50} more problems", file=sys.stderr)
    if problems:
        print(
            f"completed with problems: the report has no clinical endpoints ({len(problems)} problem(s) "
            f"in the clinical table, listed above and at the top of the report) (exit code {EXIT_FAILURES})",
            file=sys.stderr,
        )
        return EXIT_FAILURES
    return EXIT_OK


def write_report(
    run_dir: str | Path,
    blinded: bool = False,
    out: str | Path | None = None,
    *,
    blind_key: Mapping[str, str] | str | Path | None = None,
    clinical: Any = None,
    max_gallery: int = MAX_GALLERY,
    reuse: bool = True,
    problems: list[str] | None = None,
) -> Path:
    """Write the report of a run folder; returns the path of the HTML file.

    ``out`` defaults to ``RUN_DIR/report.html``; the CSV tables go to ``<out stem>_tables/`` beside
    it (``RUN_DIR/report_tables/``), replacing the CSV files a previous report wrote there (only
    those, and only while unchanged: :mod:`cytopipe.report.tables_folder`; any other CSV is kept).
    ``blinded`` replaces every arm name by a code (``blind_key`` fixes the codes); the report is
    checked for any arm name before anything is written (:class:`~cytopipe.errors.ReportError`
    if one would leak). ``clinical``: a clinical CSV path or table instead of the run's.
    ``max_gallery``: samples shown per gate in the gallery (flagged and outlying first).
    ``reuse``: when the report there was made from the same inputs (tables, run.json without its
    timings, clinical table, options, the report's code), it is kept as it is (seconds instead of a
    rebuild).
    ``problems``: a list the clinical table's problems are appended to (each problem once; empty when
    the table was used): the report is written without the clinical endpoints then.
    """
    from cytopipe.report.build import build_report

    return build_report(
        run_dir,
        blinded=blinded,
        out=out,
        blind_key=blind_key,
        clinical=clinical,
        max_gallery=max_gallery,
        reuse=reuse,
        problems=problems,
    )
