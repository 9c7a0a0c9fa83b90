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


# Exceptions that never leave the module that raises them: a fit's signal to fall back, the
# configuration hash's "cannot hash this", the upload check's "need more bytes", a reader's warning.
INTERNAL_SIGNALS = {
    "cytopipe.config.Unhashable",
    "cytopipe.fcs.FCSWarning",
    "cytopipe.gating.fitters.FitFailure",
    "cytopipe.gating.landmarks.LandmarkFailure",
    "cytopipe.serve.streamcheck._NeedMore",
}


def test_every_exception_the_package_defines_is_in_the_one_hierarchy():
    """Not only errors.py: every exception class of every module is a CytopipeError (so the CLI maps
    it to an exit code and the server to an HTTP answer), but the internal signals above."""
    import importlib
    import pkgutil

    outside = []
    for info in pkgutil.walk_packages(cytopipe.__path__, "cytopipe."):
        if info.name.endswith("__main__") or ".migrations" in info.name:  # alembic's env runs on import
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                qualified = f"{module.__name__}.{name}"
                if not issubclass(obj, errors.CytopipeError) and qualified not in INTERNAL_SIGNALS:
                    outside.append(qualified)
    assert not outside, outside
    from cytopipe.pipeline.executors import NoWorkerError
    from cytopipe.serve.auth import AuthError

    assert errors.exit_code_for(NoWorkerError("no Dask worker alive for 120 s")) == errors.EXIT_FAILURES
    refused = pickle.loads(pickle.dumps(AuthError(403, "your role does not allow this")))
    assert (type(refused), refused.status, str(refused)) == (AuthError, 403, "your role does not allow this")


def test_code_is_ruff_clean():
    """The lint the project promises (ruff) holds on the whole tree."""
    import shutil
    from pathlib import Path

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    out = subprocess.run([ruff, "check", "."], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_the_readmes_test_command_verbatim():
    """.ci/run ends with the README's install-and-test command, as written (CI runs what a reader
    runs), and the test extra installs every plugin that command uses (pytest-xdist for -n)."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split("Install and run the tests:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) == 1, block
    command = block.strip().split(" && ", 2)[2]  # after creating and activating the virtual environment
    assert command.startswith("pip install -e '.[test]' && python -m pytest"), command
    ci = (root / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == command
    if " -n " in command:
        pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
        extra = pyproject.split("\ntest = [", 1)[1].split("]", 1)[0]
        assert '"pytest-xdist' in extra
