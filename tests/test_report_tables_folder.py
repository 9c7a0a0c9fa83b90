"""The report's tables folder (``<report name>_tables/``): a report removes and replaces only the CSV
files it wrote itself, still as it wrote them (its record: cytopipe/report/tables_folder.py); a user's
file there survives, with a warning. Real `cytopipe report` runs on a small tables-only run folder."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cytopipe.report.tables_folder import MANIFEST, REPORT_TABLES
from tests.report_support import ARMS, REPO, arm_mismatch, build_cohort_run

NOTES = "sample_id,comment\nP01_W0,re-acquired on the second cytometer\n"


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """A tables-only run folder of 8 simulated patients (a report takes seconds) and its report,
    written by `cytopipe report` once for the module: every test begins from it."""
    run, clinical = build_cohort_run(tmp_path_factory.mktemp("tables_folder") / "small", n_patients=8)
    first = _report(run)
    assert first.returncode == 0, first.stderr
    return run, clinical


@pytest.fixture
def small_run(reported_run, tmp_path):
    """A copy of ``reported_run`` for one test to change (its clinical table is only read)."""
    run, clinical = reported_run
    copy = tmp_path / "small"
    shutil.copytree(run, copy)
    return copy, clinical


def _report(run: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "cytopipe", "report", str(run), *args],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip


def _csvs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.csv"))}


def _recorded(folder: Path) -> dict[str, str]:
    return {
        n: e["sha256"]
        for n, e in json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"].items()
    }


def test_a_users_csv_survives_the_report_and_the_reports_old_tables_go(small_run, tmp_path):
    run, clinical = small_run  # its report written
    tables = run / "report_tables"
    written = _csvs(tables)
    notes = tables / "notes.csv"
    notes.write_text(NOTES, encoding="utf-8")
    export = tables / "flowjo_export.csv"
    export.write_bytes(b"Sample:,CD4 T | Freq. of Parent\nP01_W0.fcs,41.2\n")
    # a report without the clinical endpoints writes fewer tables: the old ones it no longer writes go
    proc = _report(run, "--clinical", str(arm_mismatch(clinical, tmp_path)[1]))
    assert proc.returncode == 3, proc.stderr
    # the user's files untouched, and named in a warning
    assert notes.read_text(encoding="utf-8") == NOTES and export.read_bytes().startswith(b"Sample:,")
    for name in ("notes.csv", "flowjo_export.csv"):
        assert f"kept {name} (not written by the report)" in proc.stderr, proc.stderr
    assert "move it elsewhere if it does not belong here" in proc.stderr
    now = _recorded(tables)
    gone = set(written) - set(now)
    assert "response_rates.csv" in gone, sorted(now)
    assert not any((tables / name).exists() for name in gone)
    # the record lists every table of the new report with its content's sha256, and nothing else
    assert {n: hashlib.sha256(b).hexdigest() for n, b in _csvs(tables).items() if n in now} == now
    assert set(_csvs(tables)) == set(now) | {"notes.csv", "flowjo_export.csv"}
    # the report's tables of the complete report are written again (replacing its own)
    again = _report(run, "--rebuild")
    assert again.returncode == 0, again.stderr
    assert (
        set(_recorded(tables)) == set(written)
        and (tables / "response_rates.csv").read_bytes() == written["response_rates.csv"]
    )
    assert notes.read_text(encoding="utf-8") == NOTES


def test_a_table_the_user_edited_is_never_replaced_or_removed(small_run, tmp_path):
    run, clinical = small_run  # its report written
    tables = run / "report_tables"
    page = (run / "report.html").read_bytes()
    samples = tables / "samples.csv"
    edited = samples.read_text(encoding="utf-8").replace("sample_id", "sample_id (checked by AB)", 1)
    samples.write_text(edited, encoding="utf-8")
    proc = _report(run, "--rebuild")
    assert proc.returncode == 2, proc.stderr
    assert "holds samples.csv, a table an earlier report wrote, changed since" in proc.stderr
    assert "Move or rename the file (your changes are kept)" in proc.stderr and str(tables) in proc.stderr
    assert samples.read_text(encoding="utf-8") == edited and (run / "report.html").read_bytes() == page
    # moved aside, the report is written; an edited table the new report does not write is kept
    samples.rename(tmp_path / "samples_checked.csv")
    rates = tables / "response_rates.csv"
    rates.write_text(
        rates.read_text(encoding="utf-8") + "# see the protocol deviation log\n", encoding="utf-8"
    )
    kept = rates.read_bytes()
    proc = _report(run, "--clinical", str(arm_mismatch(clinical, tmp_path)[1]))
    assert proc.returncode == 3, proc.stderr
    assert "kept response_rates.csv (a table an earlier report wrote, changed since)" in proc.stderr
    assert "delete it if the new tables replace it" in proc.stderr
    assert rates.read_bytes() == kept and (tables / "samples.csv").is_file()


def test_blinding_never_keeps_an_edited_unblinded_table_nor_deletes_it(small_run, tmp_path):
    """Blinding a folder whose unblinded report's tables are there: they go, the blinded ones are
    written. An old table the report wrote but the user edited since may show the arms (names, or
    the dose order of its rows): the blinded report refuses (exit 2, nothing written, the folder not
    blinded) until the user moves it; a user's own CSV is checked for arm names."""
    from cytopipe.report.blinding import folder_record

    run, clinical = small_run  # its report written
    tables = run / "report_tables"
    rates = tables / "response_rates.csv"
    edited = rates.read_text(encoding="utf-8") + "# reviewed\n"
    rates.write_text(edited, encoding="utf-8")
    page = (run / "report.html").read_bytes()
    # a blinded report that does not write this table (no clinical endpoints): unblinded, it would be
    # kept with a warning (test above); beside blinded tables it is refused
    proc = _report(run, "--blinded", "--clinical", str(arm_mismatch(clinical, tmp_path)[1]))
    assert proc.returncode == 2, proc.stderr
    # refused after loading the run, before the report is built; the line, not the arm, named (in a
    # run this message is a problem of the blinded run.json, where a code would replace the name)
    error = next(line for line in proc.stderr.splitlines() if "error:" in line)
    assert "holds response_rates.csv (a table an earlier report wrote, changed since), which shows an arm " \
           "name (line 2)" in error and "the tables folder of a blinded report must show no arm" in error  # fmt: skip
    assert "Nothing was written. Move the file out of the folder" in error
    assert not [arm for arm in ARMS if arm.lower() in error.lower()], error
    assert rates.read_text(encoding="utf-8") == edited and (run / "report.html").read_bytes() == page
    assert folder_record(run) is None  # nothing was blinded
    # edited without the arm names (only the arm column's header renamed, say): refused all the same
    rates.write_text(edited.replace("placebo", "P").replace("IL-2", "D"), encoding="utf-8")
    proc = _report(run, "--blinded", "--clinical", str(tmp_path / "arm_mismatch.csv"))
    assert proc.returncode == 2 and "which may show the arms (edited since a report wrote it)" in proc.stderr
    rates.rename(tmp_path / "response_rates_reviewed.csv")
    # a user's CSV that names an arm would sit beside the blinded tables: refused as well
    leaky = tables / "notes_by_arm.csv"
    leaky.write_text("arm,comment\nplacebo,two samples re-acquired\n", encoding="utf-8")
    proc = _report(run, "--blinded")
    assert proc.returncode == 2 and "holds notes_by_arm.csv (not written by the report), which shows an " \
           "arm name (line 2)" in proc.stderr  # fmt: skip
    assert leaky.is_file() and folder_record(run) is None
    leaky.unlink()
    (tables / "notes.csv").write_text(NOTES, encoding="utf-8")
    proc = _report(run, "--blinded")
    assert proc.returncode == 0, proc.stderr
    assert folder_record(run) is not None and "kept notes.csv" in proc.stderr
    texts = {n: b.decode("utf-8") for n, b in _csvs(tables).items()}
    assert set(texts) == set(_recorded(tables)) | {"notes.csv"} and "dynamics_by_arm.csv" in texts
    for name, text in texts.items():
        for arm in ARMS:
            assert arm.lower() not in text.lower(), (arm, name)
    assert texts["notes.csv"] == NOTES


@pytest.mark.slow  # default suite: the other tests of this module (a user's files in the tables folder are kept)
def test_a_folder_without_the_record_loses_only_files_named_as_report_tables(small_run):
    """Tables folders written before the record existed: only CSV files named exactly as the
    report's tables are its own (nothing else can be told apart from a user's file)."""
    run, _ = small_run  # its report written
    tables = run / "report_tables"
    (tables / MANIFEST).unlink(missing_ok=True)  # as an older version left the folder
    old = tables / "dynamics_by_arm.csv"
    old.write_text("an older version's table\n", encoding="utf-8")  # replaced: its name is the report's
    (tables / "notes.csv").write_text(NOTES, encoding="utf-8")
    proc = _report(run, "--rebuild")
    assert proc.returncode == 0, proc.stderr
    assert "an older version" not in old.read_text(encoding="utf-8")
    assert (tables / "notes.csv").read_text(encoding="utf-8") == NOTES and "kept notes.csv" in proc.stderr
    assert "notes.csv" not in _recorded(tables) and "dynamics_by_arm.csv" in _recorded(tables)


@pytest.mark.slow  # default suite: test_a_users_csv_survives_the_report_and_the_reports_old_tables_go
def test_removing_a_stale_report_keeps_a_users_files(small_run):
    """`cytopipe run` with the report switched off removes the run folder's earlier report: only
    the tables that report wrote, the folder itself only when nothing else is in it."""
    from cytopipe.pipeline import _remove_stale_report

    run, _ = small_run  # its report written
    tables = run / "report_tables"
    (tables / "notes.csv").write_text(NOTES, encoding="utf-8")
    _remove_stale_report(run)
    assert not (run / "report.html").exists()
    assert [p.name for p in tables.iterdir()] == ["notes.csv"]
    assert (tables / "notes.csv").read_text(encoding="utf-8") == NOTES
    # without a user's file the folder goes too
    assert _report(run).returncode == 0
    (tables / "notes.csv").unlink()
    _remove_stale_report(run)
    assert not tables.exists()


def test_every_table_the_report_writes_is_named_in_report_tables():
    """A folder without the record loses only files named in REPORT_TABLES: every name the report
    code registers (``b.table(df, "name", ...)``, ``b.csv(df, "name")``) must be there."""
    names, patterns = set(), []
    for src in sorted((REPO / "cytopipe" / "report").glob("*.py")):
        for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("table", "csv") or len(node.args) < 2:
                continue
            arg = node.args[1]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(f"{arg.value}.csv")
            elif isinstance(arg, ast.JoinedStr):
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else r"\w+" for v in arg.values]
                patterns.append("".join(parts) + r"\.csv")
    assert len(names) > 20 and names <= REPORT_TABLES, sorted(names - REPORT_TABLES)
    for pattern in patterns:
        assert any(re.fullmatch(pattern, n) for n in REPORT_TABLES), pattern
