"""The finished run that the gate-review tests of the workspace share (tests/test_review_serve*.py):
a real `cytopipe serve` (tests/serve_support.py: ``server``, one per test module and backend) runs
the serve trial's 12 small simulated samples; ``signed`` is that run approved and signed off,
``unsigned`` and ``fresh`` are new versions of it. Import the fixtures into a test module, with
``SERVE_USERS = USERS``: each module gets its own server and run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.pipeline_support import cli
from tests.serve_support import PASSWORD, STUDY, Server, trial_files, trial_manifest

KEY = ["sample_id", "population"]
USERS = {"rita": "reviewer", "sam": "reviewer", "tess": "reviewer", "alan": "analyst", "vera": "viewer"}


def study_with_samples(client, trial: Path, name: str) -> int:
    """A study (report.html on: the reviewed run's report is checked) with the trial's 12 samples mapped."""
    sid = client.post("/api/studies", json={"name": name, **STUDY}, headers=client.h).json()["id"]
    files = trial_files(trial)
    size = sum(f.stat().st_size for f in files)
    batch = client.post(
        f"/api/studies/{sid}/batches", json={"files": len(files), "bytes": size}, headers=client.h
    )
    for f in files:
        r = client.upload(sid, f, batch=batch.json()["batch_id"])
        assert r.status_code == 201 and r.json()["status"] == "ok", r.text
    arms = trial_manifest(trial).set_index("sample_id")["arm"]
    rows = client.get(f"/api/studies/{sid}/mapping").json()
    for row in rows:
        row["arm"] = arms[row["sample_id"]]
    r = client.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=client.h)
    assert r.status_code == 200, r.text
    return sid


@pytest.fixture(scope="module")
def finished(server, serve_trial) -> tuple[int, Path]:
    c = server.client()
    sid = study_with_samples(c, serve_trial, "review study")
    run = c.post(f"/api/studies/{sid}/runs", headers=c.h)
    assert run.status_code == 201, run.text
    status = c.wait_run(run.json()["id"])
    assert status["status"] == "finished", status
    return status["id"], server.data / "runs" / str(status["id"]) / "out"


@pytest.fixture(scope="module")
def signed(server, finished) -> tuple[int, Path]:
    """The finished run, every gate approved and signed off by tess (who changed nothing): a new
    version is made of a signed-off run only, and ``fresh`` and ``unsigned`` are new versions of it.
    Its gates are locked: no test changes it."""
    run_id, _ = finished
    tess = server.client("tess")
    r = tess.post(f"/api/runs/{run_id}/review/approve", json={"scope": "run"}, headers=tess.h)
    assert r.status_code == 200, r.text
    r = tess.post(f"/api/runs/{run_id}/signoff", json={"password": PASSWORD}, headers=tess.h)
    assert r.status_code == 200, r.text
    return finished


@pytest.fixture(scope="module")
def unsigned(server, signed) -> tuple[int, Path]:
    """An unlocked version of the signed-off run on which nothing is ever recorded (the tests of
    refusals, previews and pages)."""
    admin = server.client()
    r = admin.post(f"/api/runs/{signed[0]}/versions", headers=admin.h)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    return run_id, server.data / "runs" / str(run_id) / "out"


@pytest.fixture
def fresh(server, signed) -> tuple[int, Path]:
    """An unlocked copy of the signed-off run for one test to change (review, sign off): a new
    version of it made by the administrator (who cannot sign it: no reviewer is kept from signing by
    having made it). ``signed`` itself is locked, so no test sees another's decisions, whatever the
    order."""
    admin = server.client()
    r = admin.post(f"/api/runs/{signed[0]}/versions", headers=admin.h)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    return run_id, server.data / "runs" / str(run_id) / "out"


def verify(server: Server) -> tuple[int, str]:
    """`cytopipe audit verify` of the server's database: (exit code, its output)."""
    args = ["audit", "verify", "--data", str(server.data)] + (
        ["--database", server.database] if server.database else []
    )
    proc = cli(*args)
    return proc.returncode, proc.stdout + proc.stderr


def changed(a: pd.DataFrame, b: pd.DataFrame) -> set[tuple[str, str]]:
    """The (sample, population) rows of two population_stats tables whose values differ."""
    cols = [c for c in a.columns if c in b.columns and c not in ("gate_source", "audit_entry")]
    x, y = a[cols].reset_index(drop=True), b[cols].reset_index(drop=True)
    same = ((x == y) | (x.isna() & y.isna())).all(axis=1)
    return set(map(tuple, x.loc[~same, KEY].to_numpy()))
