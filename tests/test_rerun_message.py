"""The closing line of a rerun whose results all came from the cache says what was reused, what was
tried again and what was not computed.

A rerun of a run with a failed file takes the normal path and tries the file again (a failure may
have been transient; cytopipe/rerun.py), yet it closed with "nothing changed since the last run:
every result was reused (samples, statistics, report)", also with the statistics off."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from cytopipe.pipeline import EXIT_FAILURES, run_workflow
from cytopipe.workflow import workflow_from_options
from tests.conftest import REPO, SAMPLE_DATA
from tests.pipeline_support import truncate_fcs

TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"


def test_a_rerun_with_a_failed_file_says_it_was_retried_and_what_is_off(tmp_path, capsys):
    rows = pd.read_csv(SAMPLE_DATA / "manifest.csv", dtype=str, keep_default_na=False).head(2)
    bad = tmp_path / "truncated.fcs"
    shutil.copyfile(SAMPLE_DATA / rows.loc[1, "file"], bad)
    truncate_fcs(bad)
    rows["file"] = [str(SAMPLE_DATA / rows.loc[0, "file"]), str(bad)]
    manifest = tmp_path / "manifest.csv"
    rows.to_csv(manifest, index=False)
    bad_id = rows.loc[1, "sample_id"]

    def run() -> str:  # no clinical table: statistics off; clustering off; the report on
        wf = workflow_from_options(manifest, TEMPLATE, tmp_path / "run", clustering={"enabled": False},
                                   report={"enabled": True})  # fmt: skip
        result = run_workflow(wf, scheduler="synchronous", progress=False)
        assert result.exit_code == EXIT_FAILURES and result.info["failed"] == [bad_id]
        return capsys.readouterr().err

    first = run()
    assert "reused" not in first
    err = run()  # the failed file is tried again; everything else comes from the cache
    assert "report: reused" in err
    assert "nothing changed since the last run" not in err and "statistics, report" not in err
    line = next(line for line in err.splitlines() if line.startswith("reused every result"))
    assert line == (
        "reused every result of the last run (the gating of 1 sample, the report); tried again the 1 "
        f"file that had failed ({bad_id}: failed files are always retried): it failed again (why: in "
        "the summary); not computed: clustering and statistics (off in this run)"
    )
    assert Path(tmp_path / "run" / "report.html").is_file()
