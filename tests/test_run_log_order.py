"""run.log reads in time order: the warnings of the input checks, logged before the run folder and
its run.log exist, are kept and written first. They were written after "run started", with their
earlier times."""

from __future__ import annotations

import re
from datetime import datetime

import pandas as pd

from cytopipe.pipeline import EXIT_OK, run_workflow
from cytopipe.workflow import workflow_from_options
from tests.conftest import REPO, SAMPLE_DATA

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
WARNING = "column 'bacth' is not a known manifest column; did you mean 'batch'?"


def test_run_log_is_in_time_order_with_the_input_checks_warnings_first(tmp_path):
    rows = pd.read_csv(SAMPLE_DATA / "manifest.csv", dtype=str, keep_default_na=False).head(1)
    rows["file"] = [str(SAMPLE_DATA / f) for f in rows["file"]]
    manifest = tmp_path / "manifest.csv"
    rows.rename(columns={"batch": "bacth"}).to_csv(manifest, index=False)  # warned before run.log exists
    wf = workflow_from_options(manifest, REPO / "gating" / "sle_il2_tcell_nk.yaml", tmp_path / "run",
                               clustering={"enabled": False}, report={"enabled": False})  # fmt: skip
    result = run_workflow(wf, scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_OK, result.summary()

    lines = (tmp_path / "run" / "run.log").read_text(encoding="utf-8").splitlines()
    records = [(m.group(1), line) for line in lines if (m := STAMP.match(line))]
    times = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t, _ in records]
    assert times == sorted(times), "\n".join(line for _, line in records)
    warned = [i for i, (_, line) in enumerate(records) if WARNING in line]
    started = [i for i, (_, line) in enumerate(records) if "run started in" in line]
    assert len(warned) == 1 and len(started) == 1  # not lost, not written twice
    assert " WARNING cytopipe.manifest: " in records[warned[0]][1]
    assert warned[0] < started[0] < len(records) - 1 and records[-1][1].endswith("run finished")
