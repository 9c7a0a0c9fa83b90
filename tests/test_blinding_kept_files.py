"""A user's file kept in a report's tables folder when blinding removes the earlier reports: named
in one warning, once, whichever command blinds the folder and wherever the report is written.

Before, blinding the folder named it in a warning as it removed the earlier report's tables
(cytopipe/report/blinding.py, ``remove_report``), and the new report named it again as it wrote
its tables into the same folder (``write_tables``): twice for a report written with ``--out``
(and for a blinded ``cytopipe run``'s report.html), while a file in another report's tables folder
was named not at all when the new report was report.html."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.pipeline_support import cli
from tests.test_blinded_run_report_tables import NOTES, _spec


def _kept(stderr: str, folder: Path) -> int:
    """How many warnings name notes.csv of ``folder`` as kept."""
    return sum(f"{folder}: kept notes.csv" in line for line in stderr.splitlines())


def test_a_file_kept_in_a_reports_tables_folder_is_named_once_when_a_report_blinds_the_folder(
    sim_run, tmp_path
):
    run = tmp_path / "run"  # the reference run with an unblinded report written with --out
    shutil.copytree(sim_run, run)
    proc = cli("report", str(run), "--out", str(run / "sub" / "x.html"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [Path("report_tables"), Path("sub", "x_tables")]
    for folder in folders:  # the user's notes beside the tables of either report
        (run / folder).mkdir(exist_ok=True)
        (run / folder / "notes.csv").write_text(NOTES, encoding="utf-8")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)

    kept = {}
    for folder, out in ((run, run / "sub" / "x.html"), (copy, copy / "report.html")):
        proc = cli("report", str(folder), "--blinded", "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        kept[out.name] = [_kept(proc.stderr, folder / f) for f in folders]
    # was {"x.html": [1, 2], "report.html": [1, 0]}: named twice where the report was written
    # again, not at all in the other report's folder when the report was report.html
    assert kept == {"x.html": [1, 1], "report.html": [1, 1]}, proc.stderr[-3000:]
    for folder in (run, copy):
        for f in folders:
            assert (folder / f / "notes.csv").read_text(encoding="utf-8") == NOTES


def test_a_file_kept_in_report_tables_is_named_once_when_a_run_blinds_the_folder(
    sim_run, sim_trial, tmp_path
):
    out = tmp_path / "run"  # an unblinded run folder, run again blinded (its report.html after blinding)
    shutil.copytree(sim_run, out)
    (out / "report_tables").mkdir()
    (out / "report_tables" / "notes.csv").write_text(NOTES, encoding="utf-8")
    proc = cli("run", str(_spec(sim_trial, out, tmp_path)), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _kept(proc.stderr, out / "report_tables") == 1, proc.stderr[-3000:]  # was 2
    assert (out / "report_tables" / "notes.csv").read_text(encoding="utf-8") == NOTES
