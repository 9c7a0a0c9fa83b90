"""The ``cytopipe`` command.

Each sub-command lives in its own module, which provides ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command runs, so
``cytopipe --help`` stays fast (heavy libraries such as FlowKit or Dask load lazily).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from cytopipe.errors import (
    EXIT_CODES_HELP,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT,
    CytopipeError,
    OutputWriteError,
    exit_code_for,
)

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("cytopipe.validate", "check FCS files (or a manifest) and print one row per file"),
    "simulate": ("cytopipe.simulate", "write a simulated IL-2 trial with ground truth"),
    "gate": ("cytopipe.gating.command", "gate FCS files with a template (single process)"),
    "template": (
        "cytopipe.gating.check",
        "check a gating template against FCS files (markers, gates, fallbacks)",
    ),
    "run": ("cytopipe.pipeline", "run a whole study workflow in parallel with Dask"),
    "cluster": ("cytopipe.cluster_command", "train or re-map FlowSOM clusters on a run folder"),
    "report": ("cytopipe.report", "write report.html for a run folder"),
    "export": ("cytopipe.export", "export events of a run as AnnData or FCS"),
    "reconcile": ("cytopipe.gating.reconcile", "compare cytopipe's counts with a FlowJo workspace's"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from cytopipe import __version__

    parser = argparse.ArgumentParser(
        prog="cytopipe",
        description="Flow-cytometry immunophenotyping for longitudinal clinical trials.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"cytopipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES_HELP)
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
        return EXIT_INPUT
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except CytopipeError as exc:
        if _debugging(args):
            raise
        print(f"cytopipe {args.command}: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print(f"cytopipe {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if _debugging(args) or exit_code_for(exc) != EXIT_OUTPUT:
            return _internal(args, exc)
        # a disk that filled up or a folder turned read-only outside cytopipe's own writers
        error = OutputWriteError.from_oserror(Path(exc.filename or "?"), exc)
        print(f"cytopipe {args.command}: error: {error}", file=sys.stderr)
        return EXIT_OUTPUT
    except Exception as exc:
        return _internal(args, exc)


def _debugging(args: argparse.Namespace) -> bool:
    """``--debug`` accepted by the command (``cytopipe run`` checks it needs the synchronous
    scheduler): exceptions propagate with their traceback."""
    pipeline = sys.modules.get("cytopipe.pipeline")
    return bool(getattr(args, "debug", False) and pipeline is not None and getattr(pipeline, "_DEBUG", False))


def _internal(args: argparse.Namespace, exc: BaseException) -> int:
    """A bug: the full traceback on stderr (and in run.log for `cytopipe run`), exit 1."""
    if _debugging(args):
        raise exc
    traceback.print_exception(exc, file=sys.stderr)
    print(
        f"cytopipe {args.command}: internal error (a bug in cytopipe; please report it with the "
        f"traceback above): {type(exc).__name__}: {exc}",
        file=sys.stderr,
    )
    return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
