"""Shared test fixtures.

Real public data lives *outside* the project at ``../shared/data`` (relative to the
repository root); tests use it in place and skip with a clear reason when it is absent -- except
in CI (``CI=true``), where a missing data set FAILS the test: a suite that silently skips 41% of
itself is not a passing suite.
Never copy those files into the project and never unpickle anything from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
SAMPLE_DATA = REPO / "sample_data"


def pytest_configure(config) -> None:
    """The package's bytecode, written once before the tests start. The suite starts hundreds of
    Python processes (command-line runs, Dask workers, report helpers); with
    ``PYTHONDONTWRITEBYTECODE`` set (as in some CI images) none of them writes its bytecode, so
    each compiled every cytopipe module it imported again (~0.2 s of CPU per process). Python writes
    these files itself when the variable is unset; ``__pycache__`` is ignored by git."""
    if not sys.dont_write_bytecode or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import compileall

    compileall.compile_dir(REPO / "cytopipe", quiet=1)


def in_ci() -> bool:
    """True on a CI runner (``CI=true``, as GitHub Actions, GitLab CI and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_data(reason: str) -> None:
    """Skip the calling test, or fail it in CI, where the shared data must be present."""
    if in_ci():
        pytest.fail(f"{reason}; in CI (CI=true) the shared test data must be present", pytrace=False)
    pytest.skip(reason)


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the calling test when it is absent (fail in CI)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        missing_data(
            f"shared test data not available: {path} (expected ../shared/data next to the repository)"
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        missing_data(f"shared test data folder not available: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> object:
    """``build(folder)`` (its result JSON-serialisable) once per test session, also under
    pytest-xdist: the first worker to ask builds it in a folder of the session's temporary folder,
    which the workers share, while the other waits on a lock; then both read its result. Before,
    each of the two workers simulated and ran the same trials itself (~100 s of CPU of the default
    suite). Only for what tests read: a test that changes a built folder copies it first."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    import fcntl

    # xdist gives each worker <session's basetemp>/popen-gwN: the parent is this session's alone
    root = tmp_path_factory.getbasetemp().parent / "built_once"
    root.mkdir(exist_ok=True)
    done = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also if build fails
        if not done.is_file():
            result = build(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)))
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(result), encoding="utf-8")
            tmp.rename(done)
        return json.loads(done.read_text(encoding="utf-8"))


# --- a small simulated trial and its reference run, shared by the pipeline and export tests ---
@pytest.fixture(scope="session")
def sim_trial(tmp_path_factory) -> Path:
    from tests.pipeline_support import make_trial

    return Path(built_once(tmp_path_factory, "trial", lambda d: str(make_trial(d / "trial"))))


@pytest.fixture(scope="session")
def sim_run(sim_trial, tmp_path_factory) -> Path:
    from tests.pipeline_support import reference_run

    return Path(built_once(tmp_path_factory, "ref", lambda d: str(reference_run(sim_trial, d / "run"))))


# --- the serve tests' small simulated trial and its reference run (tests/serve_support.py) ---
# Defined here, once: a session fixture imported into several test modules is built once per module.
@pytest.fixture(scope="session")
def serve_trial(tmp_path_factory) -> Path:
    from tests.serve_support import make_trial

    return Path(built_once(tmp_path_factory, "serve_trial", lambda d: str(make_trial(d / "trial"))))


@pytest.fixture(scope="session")
def serve_reference(serve_trial, tmp_path_factory) -> Path:
    """`cytopipe run` on the serve trial's files (tests/serve_support.py: reference_run)."""
    from tests.serve_support import reference_run

    return Path(
        built_once(tmp_path_factory, "serve_ref", lambda d: str(reference_run(serve_trial, d / "run")))
    )


@pytest.fixture
def review_run_dir(serve_reference, tmp_path):
    """A copy of the serve trial's reference run to review, with no gate state kept in this process
    from another test (before and after)."""
    import shutil

    from cytopipe.review.regate import forget

    out = tmp_path / "run"
    shutil.copytree(serve_reference, out)
    forget()
    yield out
    forget()


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory) -> Path:
    """A run folder of the committed sample trial, gated with the real engine and template (one
    sample recorded as failed), laid out as `cytopipe run` writes it (see tests/report_support.py)."""
    from tests.report_support import build_gated_run

    def build(folder: Path) -> str:
        return str(build_gated_run(SAMPLE_DATA, folder / "run", fail=["P005_W12"]))

    return Path(built_once(tmp_path_factory, "sample_run", build))


@pytest.fixture(scope="session")
def sample_report(sample_run, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, report.html) of the sample trial: the report written into a copy of the run."""
    import shutil

    from cytopipe.report import write_report

    def build(folder: Path) -> list[str]:
        run = folder / "run"
        shutil.copytree(sample_run, run)
        return [str(run), str(write_report(run))]

    run, report = built_once(tmp_path_factory, "sample_report", build)
    return Path(run), Path(report)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """`cytopipe run workflows/sle_il2.yaml --out <tmp>` in a fresh process, once per session:
    (run folder, completed process). The run folder holds gate review, clusters, statistics and
    report.html as the README's main command writes them."""
    from tests.pipeline_support import cli

    def build(folder: Path) -> dict:
        out = folder / "sle_il2"
        proc = cli("run", str(REPO / "workflows" / "sle_il2.yaml"), "--out", str(out), "--no-progress")
        return {"out": str(out), "args": proc.args, "returncode": proc.returncode,
                "stdout": proc.stdout, "stderr": proc.stderr}  # fmt: skip

    done = built_once(tmp_path_factory, "pipeline_run", build)
    proc = subprocess.CompletedProcess(done["args"], done["returncode"], done["stdout"], done["stderr"])
    print(proc.stdout)
    return Path(done["out"]), proc
