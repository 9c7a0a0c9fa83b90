"""Sub-command help without importing the command's module (fast `cytopipe run --help`)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest

from cytopipe.cli import COMMANDS, build_parser

# what `cytopipe <command> --help` must not import (each costs 0.1-2 s of start-up)
HEAVY = ("numpy", "pandas", "dask", "distributed", "flowkit", "numba", "scipy", "sklearn", "matplotlib",
         "fastapi", "sqlalchemy", "umap")  # fmt: skip


def _help(command: str, light: bool) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser(only=command, light=light).parse_args([command, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_light_help_is_the_help_of_the_imported_module(command):
    assert _help(command, light=True) == _help(command, light=False)


def test_simulate_help_default_visits_are_the_simulators():
    # the light help path cannot import the simulator's params: the default is a string parsed by
    # the option's type, which must give exactly the simulator's default visits
    from cytopipe.simulate import params

    parser = build_parser(only="simulate", light=True)
    assert parser.parse_args(["simulate", "--out", "x"]).visits == tuple(params.DEFAULT_VISITS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_subcommand_help_imports_no_heavy_library(command):
    code = (
        f"import sys\nfrom cytopipe.cli import main\nHEAVY = {HEAVY!r}\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in HEAVY if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
