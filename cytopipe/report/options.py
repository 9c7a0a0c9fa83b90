"""Command-line options shared by ``cytopipe run``, ``cluster`` and ``report``.

A module of its own (argparse only) so that importing :mod:`cytopipe.report` for these stays
light: the gate gallery's helper process imports the package to draw and needs no pandas.
"""

from __future__ import annotations

import argparse


def add_blinding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--blinded`` and ``--blind-key``: the same options for ``cytopipe run``, ``cluster`` and ``report``."""
    parser.add_argument(
        "--blinded",
        action="store_true",
        help="write the report blinded: arm names replaced by codes (Arm A, Arm B, ...) in every "
        "figure, table and file of the report (in a workflow: `report: {blinded: true}`)",
    )
    parser.add_argument(
        "--blind-key",
        metavar="FILE",
        help="with --blinded: CSV (columns arm,code) or JSON {arm: code} giving the codes, so they stay "
        "the same from one report to the next; keep it outside the run folder",
    )
