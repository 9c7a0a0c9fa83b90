"""The package installs, exposes its CLI and its error hierarchy."""

import pickle
import subprocess
import sys

import cytopipe
from cytopipe import errors


def test_version_and_cli_help():
    out = subprocess.run([sys.executable, "-m", "cytopipe", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("validate", "simulate", "gate", "run", "report"):
        assert command in out.stdout
    assert cytopipe.__version__


def test_every_error_is_a_cytopipe_error_and_names_its_context():
    subclasses = [
        obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, Exception)
    ]
    assert len(subclasses) > 10
    for cls in subclasses:
        assert issubclass(cls, errors.CytopipeError)
    exc = errors.FCSKeywordError("$PAR is not an integer", file="a.fcs", keyword="$PAR")
    assert str(exc) == "file 'a.fcs', keyword '$PAR': $PAR is not an integer"
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is errors.FCSKeywordError and str(again) == str(exc)
    assert again.context["keyword"] == "$PAR"


def test_code_is_ruff_clean():
    """The lint the project promises (ruff) holds on the whole tree."""
    import shutil
    from pathlib import Path

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    out = subprocess.run([ruff, "check", "."], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stdout + out.stderr
