"""A user's file kept in a report's tables folder when blinding removes the earlier reports: named
in one warning, once, whichever command blinds the folder and wherever the report is written.

Before, blinding the folder named it in a warning as it removed the earlier report's tables
(cytopipe/report/blinding.py, ``remove_report``), and the new report named it again as it wrote
its tables into the same folder (``write_tables``): twice for a report written with ``--out``
(and for a blinded ``cytopipe run``'s report.html), while a file in another report's tables folder
was named not at all when the new report was report.html."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from cytopipe.report.blinding import folder_record
from tests.blinding_support import visible_text
from tests.pipeline_support import cli
from tests.test_blinded_run_report_tables import ARMS, NOTES, _spec


def _kept(stderr: str, folder: Path) -> int:
    """How many warnings name notes.csv of ``folder`` as kept."""
    return sum(f"{folder}: kept notes.csv" in line for line in stderr.splitlines())


@pytest.mark.slow
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


@pytest.mark.slow
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


class _Warnings(logging.Handler):
    """The warnings cytopipe logs (in this process)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_file_kept_in_report_tables_is_named_once_when_a_blinded_runs_report_fails(sim_trial, tmp_path):
    """The report step of a blinded run fails (here: a folder put where report.html goes, while the
    run works): the user's notes.csv in report_tables/ is still named, once, and the folder left
    shows no arm. Before, blinding removed the earlier report without naming the file (the report
    names it when it writes its tables), and the failed report never got there: named nowhere."""
    from cytopipe.pipeline import EXIT_FAILURES, run_workflow
    from cytopipe.workflow import load_workflow

    out = tmp_path / "run"
    (out / "report_tables").mkdir(parents=True)
    (out / "report_tables" / "notes.csv").write_text(NOTES, encoding="utf-8")

    class InTheWay(logging.Handler):  # the user's act, at a fixed point of the real run
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "writing the report":
                (out / "report.html").mkdir()

    warnings, in_the_way = _Warnings(), InTheWay()
    runner, root = logging.getLogger("cytopipe.pipeline.runner"), logging.getLogger("cytopipe")
    runner.addHandler(in_the_way)
    root.addHandler(warnings)
    try:
        result = run_workflow(load_workflow(_spec(sim_trial, out, tmp_path)), scheduler="synchronous",
                              progress=False)  # fmt: skip
    finally:
        runner.removeHandler(in_the_way)
        root.removeHandler(warnings)
    assert result.exit_code == EXIT_FAILURES, result.summary()
    assert any(p.startswith("report: not written: ") and "in the way" in p for p in result.problems)
    kept = [m for m in warnings.messages if f"{out / 'report_tables'}: kept notes.csv" in m]
    assert len(kept) == 1, warnings.messages  # was 0
    assert (out / "report_tables" / "notes.csv").read_text(encoding="utf-8") == NOTES
    assert folder_record(out) is not None and not (out / "report.html").is_file()
    names = "\n".join(p.relative_to(out).as_posix() for p in out.rglob("*"))
    shown = (visible_text(out) + names).lower()
    assert [arm for arm in ARMS if arm.lower() in shown] == []
