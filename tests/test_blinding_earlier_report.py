"""`cytopipe report --blinded --out X.html` over an earlier report X.html (inside the run folder)
whose tables folder has no record of its tables (a version that kept none, or the record lost):
the command writes its report there, so the earlier X.html and the tables it wrote (told by
their names, as for any tables folder without a record) go, like every earlier report blinding
removes, and the blinded report replaces them. Blinding still fails closed: an earlier report at
another place (not the one the command writes), or a user's CSV showing an arm in X_tables/,
is a user's file and refused, nothing done.

Before, X.html and its tables counted as a user's files showing arm names: refused (exit 2)."""

from __future__ import annotations

import re
import shutil

import pytest

from cytopipe.report.blinding import folder_record
from cytopipe.report.tables_folder import MANIFEST
from tests.pipeline_support import cli
from tests.test_blinded_run_report_tables import ARMS, LEAKY, NOTES, _snapshot

# slow suite: edge cases of blinding (the default suite keeps blinding's broad tests: test_report_blinding,
# test_blinding_folder_kinds, ...), moved there for the default suite's time budget (2026-12-07)
pytestmark = pytest.mark.slow


def _arms_in(text: str) -> list[str]:
    """The arm names (and doses) ``text`` shows, its figures' base64 data aside (any short string
    occurs there by chance)."""
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).lower()
    return [a for a in (*ARMS, "MIU") if a.lower() in text]


def test_a_blinded_report_replaces_its_earlier_report_without_a_tables_record_and_refuses_users_files(
    sim_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    sub = run / "sub"
    proc = cli("report", str(run), "--out", str(sub / "x.html"))  # unblinded, arm names and all
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sub / "x_tables" / MANIFEST).unlink()  # as an older version wrote it: no record of its tables
    old_tables = sorted(p.name for p in (sub / "x_tables").glob("*.csv"))
    assert old_tables and _arms_in((sub / "x.html").read_text(encoding="utf-8"))

    # a copy of it elsewhere is not the report the command writes: a user's file, refused
    shutil.copy(sub / "x.html", sub / "interim.html")
    before = _snapshot(run)
    proc = cli("report", str(run), "--blinded", "--out", str(sub / "x.html"))
    assert proc.returncode == 2 and "sub/interim.html (line" in proc.stderr, proc.stderr[-3000:]
    assert "sub/x.html" not in proc.stderr and "x_tables/" not in proc.stderr, proc.stderr[-3000:]
    assert _snapshot(run) == before and folder_record(run) is None
    (sub / "interim.html").rename(tmp_path / "interim.html")

    # a user's CSV showing an arm in its tables folder: refused too
    (sub / "x_tables" / "arms.csv").write_text(LEAKY, encoding="utf-8")
    before = _snapshot(run)
    proc = cli("report", str(run), "--blinded", "--out", str(sub / "x.html"))
    assert proc.returncode == 2 and "arms.csv (not written by the report)" in proc.stderr, proc.stderr[-3000:]
    assert _snapshot(run) == before and folder_record(run) is None
    (sub / "x_tables" / "arms.csv").unlink()

    # was refused: x.html and its tables taken for a user's files showing arm names
    (sub / "x_tables" / "notes.csv").write_text(NOTES, encoding="utf-8")
    proc = cli("report", str(run), "--blinded", "--out", str(sub / "x.html"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert folder_record(run) is not None
    page = (sub / "x.html").read_text(encoding="utf-8")
    assert "run report (blinded)" in page and _arms_in(page) == []
    tables = {p.name: p.read_text(encoding="utf-8") for p in (sub / "x_tables").glob("*.csv")}
    assert tables.pop("notes.csv") == NOTES and (sub / "x_tables" / MANIFEST).is_file()
    assert {n: _arms_in(t) for n, t in tables.items() if _arms_in(t)} == {}
    assert proc.stderr.count("kept notes.csv") == 1, proc.stderr[-3000:]
    assert "removed sub/x.html" not in proc.stderr  # replaced, not removed: no warning that it was
