"""The ``cytopipe`` command.

Each sub-command lives in its own module, which provides ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command runs, so
``cytopipe --help`` stays fast (heavy libraries such as FlowKit or Dask load lazily).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
    "gate": ("cytopipe.pipeline.gate_command", "gate FCS files with a template (single process)"),
    "template": (
        "cytopipe.gating.check",
        "check a gating template against FCS files (markers, gates, fallbacks)",
    ),
    "run": ("cytopipe.pipeline.command", "run a whole study workflow in parallel with Dask"),
    "cluster": ("cytopipe.pipeline.cluster_command", "train or re-map FlowSOM clusters on a run folder"),
    "report": ("cytopipe.report", "write report.html for a run folder"),
    "unblind": ("cytopipe.report.unblind", "unblind a blinded run folder with its key (logged in run.json)"),
    "export": ("cytopipe.export", "export events of a run as AnnData or FCS"),
    "reconcile": ("cytopipe.gating.reconcile", "compare cytopipe's counts with a FlowJo workspace's"),
    "serve": ("cytopipe.serve", "a study workspace in the browser: uploads, runs, results"),
    "review": ("cytopipe.serve.review_command", "approve or override a workspace run's gates, sign off"),
    "audit": ("cytopipe.serve.audit_command", "verify or export the workspace's audit trail"),
}


def _add_arguments_source(
    module_name: str, depth: int = 0, name: str = "add_arguments"
) -> Callable[[argparse.ArgumentParser], None]:
    """A command module's ``add_arguments``, compiled from its source without importing the module
    (nor its package): ``cytopipe run --help`` then costs milliseconds instead of importing
    pandas, Dask or the gating engine. The function (and the module's own functions it calls) may
    use only ``argparse`` and ``Path``; a module that re-exports it (``from cytopipe.x import
    add_arguments``, or ``add_x as add_arguments``) is followed. Anything else raises, and the
    caller imports the module instead."""
    import __future__

    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent
    parts = module_name.split(".")[1:]
    path = root.joinpath(*parts).with_suffix(".py")
    if not path.is_file():
        path = root.joinpath(*parts, "__init__.py")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if name in functions:
        needed, todo = [], [name]
        while todo:  # the function and the module's functions it calls (e.g. shared option groups)
            fn = functions[todo.pop()]
            if fn in needed:
                continue
            needed.append(fn)
            todo += [n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in functions]
        code = compile(
            ast.Module(body=needed, type_ignores=[]),
            str(path),
            "exec",
            flags=__future__.annotations.compiler_flag,
            dont_inherit=True,
        )
        namespace: dict[str, Any] = {"argparse": argparse, "Path": Path, "__name__": module_name}
        # shared option groups imported from another cytopipe module (e.g. the blinding options
        # of run, cluster and report): compiled from that module's source in the same way
        used = {n.id for fn in needed for n in ast.walk(fn) if isinstance(n, ast.Name)}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cytopipe."):
                for alias in node.names:
                    if (alias.asname or alias.name) in used and depth < 2:
                        namespace[alias.asname or alias.name] = _add_arguments_source(
                            node.module, depth + 1, alias.name
                        )
        exec(code, namespace)
        return namespace[name]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and depth < 2 and node.module:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _add_arguments_source(node.module, depth + 1, alias.name)
    raise LookupError(f"no {name} in {module_name}")


def build_parser(only: str | None = None, light: bool = False) -> argparse.ArgumentParser:
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
            if light:  # help only: the arguments without importing the command's module
                _add_arguments_source(module_name)(p)
            else:
                importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Find the sub-command first so only its module is imported.
    command = next((a for a in argv if not a.startswith("-")), None)
    only = command if command in COMMANDS else None
    if only and ("-h" in argv or "--help" in argv):
        try:
            build_parser(only=only, light=True).parse_args(argv)  # prints the help and exits
        except SystemExit:
            raise
        except Exception:
            pass  # an add_arguments that needs its module: import it (slower help, same text)
    parser = build_parser(only=only)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    module = importlib.import_module(COMMANDS[args.command][0])
    console = _console_warnings(args.command)
    try:
        with _fcs_notes(args.command):
            return int(module.run(args) or 0)
    except CytopipeError as exc:
        if _debugging(args):
            raise
        print(f"cytopipe {args.command}: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print(f"cytopipe {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as exc:
        if not _stdout_reader_gone():  # a broken connection elsewhere (a worker, a socket): a bug
            return _internal(args, exc)
        # whoever read our output has stopped (`cytopipe validate --json | head`): stop quietly,
        # as command-line tools do; the output was cut short by the reader, not by an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as exc:
        if _debugging(args) or exit_code_for(exc) not in (EXIT_OUTPUT, EXIT_INPUT):
            return _internal(args, exc)
        # a disk that filled up or a folder turned read-only outside cytopipe's own writers (4), or
        # an output path through a file (2: choose another --out)
        error = OutputWriteError.from_oserror(Path(exc.filename or "?"), exc)
        print(f"cytopipe {args.command}: error: {error}", file=sys.stderr)
        return exit_code_for(error)
    except Exception as exc:
        return _internal(args, exc)
    finally:
        if console is not None:
            logging.getLogger("cytopipe").removeHandler(console)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end has been closed."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or no real stdout
        return False


def _console_warnings(command: str) -> logging.Handler | None:
    """Library warnings (``logger.warning`` anywhere under ``cytopipe``) on stderr while a command
    runs, as ``cytopipe <command>: warning: ...``. Errors are the command's to report (message and
    exit code; ``cytopipe run`` keeps them with tracebacks in run.log), so only WARNING shows here.
    ``serve`` configures its own logging."""
    if command == "serve":
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(lambda record: record.levelno == logging.WARNING)
    handler.setFormatter(logging.Formatter(f"cytopipe {command}: warning: %(message)s"))
    logging.getLogger("cytopipe").addHandler(handler)
    return handler


@contextlib.contextmanager
def _fcs_notes(command: str):
    """FCS quirks the reader handled (``FCSWarning``) on stderr while a command runs, one line
    each, ``cytopipe <command>: note: <file>: <what was done>``, once per file and quirk. Python's
    own display printed each with a line of cytopipe's source under it, and again from every
    place that read the file (``cytopipe gate``: its header, then its events). ``serve`` logs."""
    if command == "serve":
        yield
        return
    import warnings

    from cytopipe.fcs import FCSWarning

    shown: set[str] = set()
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, FCSWarning):
            default(message, category, filename, lineno, file, line)
        elif str(message) not in shown:
            shown.add(str(message))
            print(f"cytopipe {command}: note: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", FCSWarning)  # every file's quirk once (deduplicated above)
        warnings.showwarning = show
        yield


def _debugging(args: argparse.Namespace) -> bool:
    """``--debug`` accepted by the command (``cytopipe run`` checks it needs the synchronous
    scheduler): exceptions propagate with their traceback."""
    tasks = sys.modules.get("cytopipe.pipeline.tasks")
    return bool(getattr(args, "debug", False) and tasks is not None and getattr(tasks, "_DEBUG", False))


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
