"""Shared test fixtures.

Real public data lives *outside* the project at ``../shared/data`` (relative to the
repository root); tests use it in place and skip with a clear reason when it is absent -- except
in CI (``CI=true``), where a missing data set FAILS the test: a suite that silently skips 41% of
itself is not a passing suite.
Never copy those files into the project and never unpickle anything from there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
SAMPLE_DATA = REPO / "sample_data"


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


# --- a small simulated trial and its reference run, shared by the pipeline and export tests ---
@pytest.fixture(scope="session")
def sim_trial(tmp_path_factory) -> Path:
    from tests.pipeline_support import make_trial

    return make_trial(tmp_path_factory.mktemp("trial") / "trial")


@pytest.fixture(scope="session")
def sim_run(sim_trial, tmp_path_factory) -> Path:
    from tests.pipeline_support import reference_run

    return reference_run(sim_trial, tmp_path_factory.mktemp("ref") / "run")


# --- the serve tests' small simulated trial and its reference run (tests/serve_support.py) ---
# Defined here, once: a session fixture imported into several test modules is built once per module.
@pytest.fixture(scope="session")
def serve_trial(tmp_path_factory) -> Path:
    from tests.serve_support import make_trial

    return make_trial(tmp_path_factory.mktemp("serve_trial") / "trial")


@pytest.fixture(scope="session")
def serve_reference(serve_trial, tmp_path_factory) -> Path:
    """`cytopipe run` on the serve trial's files (tests/serve_support.py: reference_run)."""
    from tests.serve_support import reference_run

    return reference_run(serve_trial, tmp_path_factory.mktemp("serve_ref") / "run")


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

    return build_gated_run(SAMPLE_DATA, tmp_path_factory.mktemp("sample_run") / "run", fail=["P005_W12"])


@pytest.fixture(scope="session")
def sample_report(sample_run, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, report.html) of the sample trial: the report written into a copy of the run."""
    import shutil

    from cytopipe.report import write_report

    run = tmp_path_factory.mktemp("sample_report") / "run"
    shutil.copytree(sample_run, run)
    return run, write_report(run)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """`cytopipe run workflows/sle_il2.yaml --out <tmp>` in a fresh process, once per session:
    (run folder, completed process). The run folder holds gate review, clusters, statistics and
    report.html as the README's main command writes them."""
    from tests.pipeline_support import cli

    out = tmp_path_factory.mktemp("pipeline_run") / "sle_il2"
    proc = cli("run", str(REPO / "workflows" / "sle_il2.yaml"), "--out", str(out), "--no-progress")
    print(proc.stdout)
    return out, proc
