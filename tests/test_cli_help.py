"""Sub-command help without importing the command's module (fast `cytopipe run --help`)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest

from cytopipe.cli import COMMANDS, build_parser


def _help(command: str, light: bool) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser(only=command, light=light).parse_args([command, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "simulate"])
def test_light_help_is_the_help_of_the_imported_module(command):
    assert _help(command, light=True) == _help(command, light=False)


def test_simulate_help_falls_back_to_importing_its_module():
    # its add_arguments uses the simulator's defaults: the light path refuses, main() imports
    with pytest.raises(NameError):
        _help("simulate", light=True)
    proc = subprocess.run([sys.executable, "-m", "cytopipe", "simulate", "--help"], capture_output=True,
                          text=True, env=dict(os.environ), timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "--patients" in proc.stdout


@pytest.mark.parametrize("command", ["run", "gate", "report", "export"])
def test_subcommand_help_imports_no_heavy_library(command):
    code = (
        "import sys\nfrom cytopipe.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('numpy', 'pandas', 'dask', 'flowkit', 'numba') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
