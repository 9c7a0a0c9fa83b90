"""The ``cytopipe`` command.

Each sub-command lives in its own module, which provides ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command runs, so
``cytopipe --help`` stays fast (heavy libraries such as FlowKit or Dask load lazily).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cytopipe.errors import CytopipeError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("cytopipe.validate", "check FCS files (or a manifest) and print one row per file"),
    "simulate": ("cytopipe.simulate", "write a simulated IL-2 trial with ground truth"),
    "gate": ("cytopipe.gating.command", "gate FCS files with a template (single process)"),
    "run": ("cytopipe.pipeline", "run a whole study workflow in parallel with Dask"),
    "cluster": ("cytopipe.cluster_command", "train or re-map FlowSOM clusters on a run folder"),
    "report": ("cytopipe.report", "write report.html for a run folder"),
    "export": ("cytopipe.export", "export events of a run as AnnData or FCS"),
    "serve": ("cytopipe.serve", "a study workspace in the browser: uploads, runs, results"),
    "review": ("cytopipe.serve.review_command", "approve or override a workspace run's gates, sign off"),
    "audit": ("cytopipe.serve.audit_command", "verify or export the workspace's audit trail"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from cytopipe import __version__

    parser = argparse.ArgumentParser(
        prog="cytopipe",
        description="Flow-cytometry immunophenotyping for longitudinal clinical trials.",
    )
    parser.add_argument("--version", action="version", version=f"cytopipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Find the sub-command first so only its module is imported.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except CytopipeError as exc:
        print(f"cytopipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cytopipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
