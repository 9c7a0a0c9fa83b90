"""Soak: `cytopipe run` killed with SIGKILL at random moments, over and over, in every phase (reading,
gating, clustering, the tables, the DuckDB catalog, the report), then resumed. At the end: outputs
identical to an uninterrupted run and no temporary file left (issue 11). Slow: ~3-6 minutes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.disk_support import temp_files
from tests.pipeline_support import assert_same_outputs, cli_env

KILLS = 24
TARGETS = [  # lines of run.log that start each phase
    "run started", "step register", "step gating-fit", "step gating", "step clustering-train",
    "step clustering-map", "step statistics", "step clustering-umap", "writing the tables, catalog.duckdb", "writing the report",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_repeated_kill_9_and_resume_gives_identical_outputs(sim_run, sim_trial, tmp_path):
    spec = yaml.safe_load((sim_trial / "workflow.yaml").read_text())
    for key in ("manifest", "clinical"):
        spec[key] = str(sim_trial / spec[key])
    spec["report"] = {"enabled": True}  # the report's writes are killed too
    workflow = tmp_path / "workflow.yaml"
    workflow.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cytopipe", "run", str(workflow), "--out", str(out),
           "--scheduler", "synchronous", "--no-progress"]  # fmt: skip
    rng = np.random.default_rng(11)
    log = out / "run.log"
    kills, completed = [], 0
    # each kill waits for a phase to start (its line in run.log), then a random moment more: so the
    # kills land in every phase, including the short ones at the end (tables + catalog, report)
    targets = [TARGETS[i % len(TARGETS)] for i in range(KILLS)]
    for target in targets:
        start = log.stat().st_size if log.exists() else 0
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)  # fmt: skip
        extra = float(rng.uniform(0.0, 0.4))
        seen = None
        while proc.poll() is None:
            text = log.read_bytes()[start:].decode("utf-8", "replace") if log.exists() else ""
            if seen is None and re.search(rf": {re.escape(target)}($| )", text, re.M):
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen >= extra:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills.append((target, round(extra, 3)))
                break
            time.sleep(0.002)
        else:
            stderr = proc.stderr.read()
            assert proc.returncode == 0, stderr[-3000:]
            completed += 1  # the phase had nothing to do (cached) and the run finished first
        proc.stderr.close()
    final = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"\nsoak: {len(kills)} kill -9 survived ({completed} runs completed in between); killed in:")
    for target in TARGETS:
        when = [f"+{d:.2f}s" for t, d in kills if t == target]
        print(f"  {target:<50} {len(when)} kills ({', '.join(when)})")
    assert len(kills) >= 20
    assert {t for t, _ in kills} >= {"writing the tables, catalog.duckdb", "writing the report"}
    assert_same_outputs(sim_run, out)
    assert (out / "report.html").is_file()
    assert temp_files(out) == []
    assert not [p for p in out.rglob("*.wal")]
