"""A blinded run whose ``report_tables/`` holds a user's CSV that shows an arm: the blinded report
refuses to write its tables beside it, so the run refuses before any work (exit 2, the run folder
untouched; the file, the line and the arm named), not at its report step after all the work with
the folder blinded by then (exit 3, as before). `cytopipe cluster` of a blinded folder the same.
A CSV that appears while the run works: its report step refuses (naming no arm: the message is a
problem of the blinded run.json), leaves no report, and the run ends with exit 3."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from cytopipe.report.blinding import folder_record
from cytopipe.report.tables_folder import MANIFEST, plan_tables
from tests.blinding_support import visible_text
from tests.pipeline_support import SECTIONS, TEMPLATE, cli_in_process

# the commands run in this process (cli_in_process): these tests check what they write and say,
# not the process, whose start-up (~1 s of imports) was most of a refusal's cost

LEAKY = "arm,comment\nplacebo,two samples re-acquired\n"
NOTES = "sample_id,comment\nP001_W00,re-acquired on the second cytometer\n"
ARMS = ("placebo", "IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU")


def _spec(trial: Path, out: Path, folder: Path) -> Path:
    """The simulated trial's workflow with a blinded report (absolute paths)."""
    spec = {"study": "simulated trial", "manifest": str(trial / "manifest.csv"),
            "clinical": str(trial / "clinical.csv"), "template": str(TEMPLATE), "output": str(out),
            **SECTIONS, "report": {"enabled": True, "blinded": True}}  # fmt: skip
    path = folder / "blinded.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(folder.rglob("*"))
    }


def test_a_blinded_run_refuses_a_csv_showing_an_arm_before_any_work(sim_trial, tmp_path):
    out = tmp_path / "run"
    leaky = out / "report_tables" / "notes_by_arm.csv"
    leaky.parent.mkdir(parents=True)
    leaky.write_text(LEAKY, encoding="utf-8")
    spec = _spec(sim_trial, out, tmp_path)
    before = _snapshot(out)
    proc = cli_in_process("run", str(spec), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"file '{leaky.parent}': holds notes_by_arm.csv (not written by the report), which shows an " \
           "arm name (line 2: 'placebo')" in proc.stderr, proc.stderr[-3000:]  # fmt: skip
    assert "nothing was done. Move the file out of the run folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(out) == before  # no run.json, run.log, .cache: nothing done, nothing blinded

    # moved out (a user's CSV without arm names stays beside the blinded tables): the run is written
    leaky.rename(tmp_path / leaky.name)
    notes = out / "report_tables" / "notes.csv"
    notes.write_text(NOTES, encoding="utf-8")
    proc = cli_in_process("run", str(spec), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.html").is_file() and folder_record(out) is not None
    assert notes.read_text(encoding="utf-8") == NOTES and "kept notes.csv" in proc.stderr

    # the folder is blinded: `cytopipe cluster` (no --blinded) writes a blinded report, so it refuses
    # the same file before it clusters
    (out / "report_tables" / "arms.csv").write_text(
        LEAKY.replace("placebo", "IL-2 0.5 MIU"), encoding="utf-8"
    )
    before = _snapshot(out)
    proc = cli_in_process("cluster", str(out), "--retrain", "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "holds arms.csv (not written by the report), which shows an arm name (line 2: 'IL-2 0.5 MIU')" \
        in proc.stderr and "nothing was done" in proc.stderr  # fmt: skip
    assert _snapshot(out) == before


def test_a_csv_that_appears_during_a_blinded_run_stops_only_its_report(sim_trial, tmp_path):
    """The check before the work found nothing; the user's file is put there while the run works
    (here: when the run starts its report). The report refuses; the run's tables are written
    (blinded), no report is left, the problem names the file and the line but no arm."""
    from cytopipe.pipeline import EXIT_FAILURES, run_workflow
    from cytopipe.workflow import load_workflow

    out = tmp_path / "run"
    leaky = out / "report_tables" / "notes_by_arm.csv"

    class PutFileAtReport(logging.Handler):  # the user's act, at a fixed point of the real run
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "writing the report":
                leaky.parent.mkdir(parents=True, exist_ok=True)
                leaky.write_text(LEAKY, encoding="utf-8")

    handler = PutFileAtReport()
    runner = logging.getLogger("cytopipe.pipeline.runner")
    runner.addHandler(handler)
    try:
        wf = load_workflow(_spec(sim_trial, out, tmp_path))
        result = run_workflow(wf, scheduler="synchronous", progress=False)
    finally:
        runner.removeHandler(handler)
    sys.stderr.flush()
    assert result.exit_code == EXIT_FAILURES, result.summary()
    [problem] = [p for p in result.problems if p.startswith("report")]
    assert "holds notes_by_arm.csv (not written by the report), which shows an arm name (line 2)" in problem
    assert "Nothing was written. Move the file out of the folder" in problem
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert [p for p in info["problems"] if p.startswith("report")] == [problem]  # no arm in it to code
    # the state left: the tables written and blinded, no report, the user's file alone in report_tables
    assert folder_record(out) is not None and (out / "population_stats.parquet").is_file()
    assert not (out / "report.html").exists()
    assert sorted(p.name for p in (out / "report_tables").iterdir()) == ["notes_by_arm.csv"]
    shown = visible_text(out).replace(LEAKY, "").lower()
    assert not [arm for arm in ARMS if arm.lower() in shown]


@pytest.mark.slow  # default suite: tests/test_pipeline.py::test_a_report_that_fails_does_not_fail_the_data
def test_a_run_whose_report_fails_leaves_no_earlier_report(sim_trial, tmp_path):
    """An earlier run's report.html must not stay beside a run whose own report step failed (here:
    a report table edited while the run works, which the new report would replace; edited before
    the run, it is refused before any work: tests/test_blinding_folder_kinds.py): run.json says
    "report: not written", and the page left would describe the earlier run. It is removed with
    the tables that report wrote; the edited table is kept."""
    from cytopipe.pipeline import EXIT_FAILURES, run_workflow
    from cytopipe.workflow import load_workflow

    out = tmp_path / "run"
    spec = _spec(sim_trial, out, tmp_path)
    plain = yaml.safe_load(spec.read_text(encoding="utf-8"))
    plain["report"] = {"enabled": True, "blinded": False}
    first = tmp_path / "plain.yaml"
    first.write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")
    proc = cli_in_process("run", str(first), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = out / "report_tables" / "samples.csv"
    edited = samples.read_text(encoding="utf-8").replace("sample_id", "sample_id (checked by AB)", 1)
    plain["report"]["max_gallery"] = 3  # another report of the same tables: the earlier one is not current
    second = tmp_path / "gallery.yaml"
    second.write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")

    class EditAtReport(logging.Handler):  # the user's act, at a fixed point of the real run
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "writing the report":
                samples.write_text(edited, encoding="utf-8")

    handler = EditAtReport()
    runner = logging.getLogger("cytopipe.pipeline.runner")
    runner.addHandler(handler)
    try:
        result = run_workflow(load_workflow(second), scheduler="synchronous", progress=False)
    finally:
        runner.removeHandler(handler)
    assert result.exit_code == EXIT_FAILURES, result.summary()
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert any(p.startswith("report: not written: ") and "holds samples.csv" in p for p in info["problems"])
    assert not (out / "report.html").exists()
    assert "removed the run folder's earlier report.html" in (out / "run.log").read_text(encoding="utf-8")
    assert sorted(p.name for p in (out / "report_tables").glob("*.csv")) == ["samples.csv"]
    assert samples.read_text(encoding="utf-8") == edited


def test_a_report_reads_no_csv_it_cannot_have_written(tmp_path):
    """Before a report, only a CSV that may be its own (a name its record lists, at a size it
    recorded) is hashed; a user's file, or a table edited to another size, is not read (unblinded).
    The outcome is the same: the user's file and the edited table are kept."""
    folder = tmp_path / "report_tables"
    folder.mkdir()
    own, edited, users = folder / "flags.csv", folder / "samples.csv", folder / "notes.csv"
    own.write_text("sample_id,flag\n", encoding="utf-8")
    edited.write_text("sample_id\nP001_W00\n", encoding="utf-8")

    def entry(text: str) -> dict:
        return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "bytes": len(text.encode())}

    record = {"files": {"flags.csv": entry("sample_id,flag\n"), "samples.csv": entry("sample_id\n")}}
    (folder / MANIFEST).write_text(json.dumps(record), encoding="utf-8")
    users.write_text(NOTES, encoding="utf-8")
    opened: list[str] = []
    active = [True]

    def audit(event: str, args: tuple) -> None:
        if active and event == "open" and args and str(args[0]).endswith(".csv"):
            opened.append(Path(str(args[0])).name)

    sys.addaudithook(audit)  # cannot be removed: it records only while this test is active
    try:
        plan = plan_tables(folder, {"flags.csv": "sample_id,flag\n"})
    finally:
        active.clear()
    assert opened == ["flags.csv"]
    assert set(plan.remove) == {"flags.csv"} and set(plan.keep) == {"notes.csv", "samples.csv"}
    assert plan.changed == {"samples.csv": entry("sample_id\n")["sha256"]}
