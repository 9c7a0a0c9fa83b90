"""Smoke test of bench/cluster.py (deselected by default: run with -m bench)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, shared_path


@pytest.mark.bench
def test_cluster_benchmark_quick_run():
    shared_path("FlowSOM", "inst", "extdata", "68983.fcs")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cluster.py"), "--quick", "--only", "68983", "--seeds", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("68983 (FlowSOM)")]
    assert any("cytopipe" in r for r in rows) and any("MiniBatchKMeans" in r for r in rows)
