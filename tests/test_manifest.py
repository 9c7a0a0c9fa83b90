"""Manifest loading: schema, per-row problems collected, encodings and line endings."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from cytopipe.errors import ManifestError
from cytopipe.fcs import write_fcs
from cytopipe.manifest import check_manifest, load_manifest, parse_control, parse_visit
from tests.conftest import shared_path

HEADER = "file,sample_id,patient_id,visit,arm,panel,batch,site,acquired_at,control"


@pytest.fixture
def study(tmp_path):
    """A folder with four FCS files (two samples, two controls)."""
    (tmp_path / "fcs").mkdir()
    for name in ("P01_W00", "P01_W04", "CTRL_unstained", "CTRL_CD4"):
        write_fcs(tmp_path / "fcs" / f"{name}.fcs", np.ones((3, 2), np.float32), ["FSC-A", "CD4"])
    return tmp_path


def write_csv(folder, text: str, name="manifest.csv", encoding="utf-8", newline="\n"):
    path = folder / name
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


GOOD = f"""{HEADER}
fcs/P01_W00.fcs,S001,001,0,placebo,SLE-IL2,B1,Paris,2021-03-04T09:30,
fcs/P01_W04.fcs,S002,001,4,placebo,SLE-IL2,B2,Paris,2021-04-01,
fcs/CTRL_unstained.fcs,C1,,,,SLE-IL2,B1,Paris,,unstained
fcs/CTRL_CD4.fcs,C2,,,,SLE-IL2,B1,Paris,,single:CD4
"""


def test_good_manifest(study):
    path = write_csv(study, GOOD)
    table = load_manifest(path)
    assert list(table.columns[:10]) == HEADER.split(",")
    assert list(table.columns[10:]) == ["path", "row"]
    assert table["sample_id"].tolist() == ["S001", "S002", "C1", "C2"]
    assert table["patient_id"].tolist() == ["001", "001", "", ""]  # ids stay strings
    assert str(table["visit"].dtype) == "Int64" and table["visit"].tolist()[:2] == [0, 4]
    assert table["visit"].isna().tolist() == [False, False, True, True]
    assert table["path"].tolist()[0] == str((study / "fcs" / "P01_W00.fcs").resolve())
    assert table["row"].tolist() == [2, 3, 4, 5]
    assert table["control"].tolist() == ["", "", "unstained", "single:CD4"]


def test_problems_are_collected_per_row_and_column(study):
    text = f"""{HEADER}
fcs/P01_W00.fcs,S001,001,0,placebo,,,,,
fcs/P01_W04.fcs,S001,001,M1,placebo,,,,04/03/2021,
fcs/missing.fcs,S003,,12,IL-2 0.5,,,,,
fcs/CTRL_CD4.fcs,C2,,,,,,,,single:
fcs/P01_W00.fcs,S005,002,24,placebo,,,,,
"""
    path = write_csv(study, text)
    table, problems = check_manifest(path)
    found = {(p.context["row"], p.context.get("column")) for p in problems}
    assert found == {
        (3, "sample_id"),
        (3, "visit"),
        (3, "acquired_at"),
        (4, "patient_id"),
        (4, "file"),
        (5, "control"),
        (6, "file"),
    }
    assert table["ok"].tolist() == [True, False, False, False, False]
    by_key = {(p.context["row"], p.context.get("column")): str(p) for p in problems}
    assert "sample_id 'S001' is already used on row 2" in by_key[(3, "sample_id")]
    assert "visit is 'M1': months are no whole number of weeks" in by_key[(3, "visit")]
    assert "Week 4" in by_key[(3, "visit")] and "Day 28" in by_key[(3, "visit")]  # the accepted forms
    assert "not found" in by_key[(4, "file")] and str(study) in by_key[(4, "file")]
    assert "also listed on row 2" in by_key[(6, "file")]
    assert str(path) in by_key[(3, "visit")] and "row 3, column 'visit'" in by_key[(3, "visit")]
    good = load_manifest(path, strict=False)
    assert good[good.ok]["sample_id"].tolist() == ["S001"]
    assert "visit is 'M1'" in good.loc[1, "problem"]
    with pytest.raises(ManifestError, match="7 problems") as exc:
        load_manifest(path)
    assert len(exc.value.problems) == 7 and "row 5, column 'control'" in str(exc.value)


def test_a_single_problem_raises_with_its_row_and_column(study):
    text = GOOD.replace("S002,001,4,", "S002,001,4.5,")
    with pytest.raises(ManifestError) as exc:
        load_manifest(write_csv(study, text))
    assert exc.value.context["row"] == 3 and exc.value.context["column"] == "visit"
    assert "visit is '4.5'" in str(exc.value)


def test_whole_file_problems_always_raise(study, tmp_path):
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['visit', 'arm'\]"):
        load_manifest(write_csv(study, "file,sample_id,patient_id\nfcs/P01_W00.fcs,S1,P1\n"), strict=False)
    with pytest.raises(ManifestError, match="appears twice in the header"):
        load_manifest(write_csv(study, HEADER + ",visit\n"), strict=False)
    with pytest.raises(ManifestError, match="header but no rows"):
        load_manifest(write_csv(study, HEADER + "\n,,,\n"))
    with pytest.raises(ManifestError, match="the manifest is empty"):
        load_manifest(write_csv(study, "\n\n"))
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        load_manifest(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("encoding", "newline", "bom"),
    [("utf-8", "\r", ""), ("utf-8", "\r\n", "\ufeff"), ("utf-16", "\r\n", ""), ("cp1252", "\n", "")],
)
def test_encodings_line_endings_and_bom(study, encoding, newline, bom, caplog):
    text = bom + GOOD.replace("Paris", "Créteil")
    with caplog.at_level("WARNING", logger="cytopipe.manifest"):
        table = load_manifest(write_csv(study, text, encoding=encoding, newline=newline))
    assert len(table) == 4 and table["site"].tolist()[0] == "Créteil"
    assert table["row"].tolist() == [2, 3, 4, 5]
    # a guessed encoding is said (in run.log and on the terminal), a known one is not
    said = [r.getMessage() for r in caplog.records if r.name == "cytopipe.manifest"]
    assert (said != []) == (encoding == "cp1252")
    assert all("manifest.csv is not UTF-8; read it as Windows-1252" in m for m in said)


def test_header_spelling_separators_extra_columns_and_windows_paths(study):
    text = (
        "File;Sample ID;Patient-ID;VISIT;Arm;Operator\n"
        "fcs\\P01_W00.fcs;S001;P01;+0;placebo;Ann\n"
        "fcs/P01_W04.fcs;S002;P01;4.0;placebo;Bob\n"
    )
    table = load_manifest(write_csv(study, text))
    assert table["visit"].tolist() == [0, 4] and table["operator"].tolist() == ["Ann", "Bob"]
    assert table["path"][0].endswith("P01_W00.fcs") and table["control"].tolist() == ["", ""]


def test_check_files_can_be_skipped(study):
    text = f"{HEADER}\nelsewhere/x.fcs,S1,P1,0,placebo,,,,,\n"
    assert load_manifest(write_csv(study, text), check_files=False)["path"][0].endswith("x.fcs")


def test_parse_control():
    assert parse_control("unstained") == ("unstained", None)
    assert parse_control(" Single:CD4 ") == ("single", "CD4")
    assert parse_control("fmo:CD25") == ("fmo", "CD25")
    for bad in ("stained", "single:", "iso:CD4"):
        with pytest.raises(ValueError, match="write 'unstained'"):
            parse_control(bad)


def test_old_mac_cr_file_from_metacyto():
    """MetaCyto's CSVs use bare CR line endings: the header is found (and is not a manifest)."""
    path = shared_path("MetaCyto", "inst", "extdata", "fcs_info.csv")
    assert b"\r" in path.read_bytes() and b"\n" not in path.read_bytes()
    with pytest.raises(ManifestError, match=r"the header has \['fcs_files', 'study_id'\]"):
        load_manifest(path)
    frame = pd.read_csv(path)  # the same file, read by pandas for comparison
    assert list(frame.columns) == ["fcs_files", "study_id"]


def test_a_misspelt_optional_column_is_warned_about_not_refused(study, caplog):
    """`bacth`: the batch would be lost silently; a warning names the column and the known one. A
    lab's own columns (notes, operator, plate) are kept without a word."""
    text = GOOD.replace(",batch,", ",bacth,", 1).replace(",control\n", ",control,notes,operator,plate\n", 1)
    path = write_csv(study, text)
    with caplog.at_level("WARNING", logger="cytopipe.manifest"):
        table = load_manifest(path)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert "column 'bacth' is not a known manifest column; did you mean 'batch'?" in warned[0]
    assert str(path) in warned[0]
    assert list(table["bacth"][:2]) == ["B1", "B2"] and (table["batch"] == "").all()  # kept, not batch


def test_a_misspelt_required_column_is_named_in_the_error(study):
    path = write_csv(study, GOOD.replace(",sample_id,", ",sampel_id,", 1))
    with pytest.raises(
        ManifestError,
        match=r"missing required column\(s\) \['sample_id'\].*Is 'sampel_id' meant to be 'sample_id'\?",
    ):
        load_manifest(path)


def test_validate_and_run_show_the_misspelt_column(tmp_path):
    from tests.conftest import REPO, SAMPLE_DATA
    from tests.pipeline_support import cli

    rows = (SAMPLE_DATA / "manifest.csv").read_text().splitlines()
    header = rows[0].replace(",batch,", ",bacth,")
    body = [r.replace("fcs/", f"{SAMPLE_DATA}/fcs/", 1) for r in rows[1:3]]  # two samples, absolute paths
    manifest = tmp_path / "m_typo.csv"
    manifest.write_text("\n".join([header, *body]) + "\n")
    warning = "column 'bacth' is not a known manifest column; did you mean 'batch'?"
    proc = cli("validate", str(manifest), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a warning, not a problem
    assert f"cytopipe validate: warning: manifest {manifest}: {warning}" in proc.stderr
    # a workflow without clustering: its UMAP of two 100k-event files was ~20 s of CPU, of nothing
    # this test looks at (the manifest is read, and the warning given, before any step)
    spec = tmp_path / "wf.yaml"
    spec.write_text(f"study: typo\nmanifest: {manifest}\ntemplate: {REPO / 'gating' / 'sle_il2_tcell_nk.yaml'}\n"
                    "clustering: {enabled: false}\nreport: {enabled: false}\n")  # fmt: skip
    proc = cli("run", str(spec), "--out", str(tmp_path / "run"), "--scheduler", "synchronous", "--no-progress",
               timeout=300)  # fmt: skip
    assert proc.stderr.count(warning) == 1 and "cytopipe run: warning: " in proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "population_stats.parquet").is_file()
    # and in run.log, though it was logged before the run folder existed
    assert (tmp_path / "run" / "run.log").read_text().count(warning) == 1


def test_two_files_claiming_one_patient_and_visit_are_warned_about_by_validate(tmp_path):
    from tests.conftest import SAMPLE_DATA
    from tests.pipeline_support import cli

    rows = (SAMPLE_DATA / "manifest.csv").read_text().splitlines()
    body = [r.replace("fcs/", f"{SAMPLE_DATA}/fcs/", 1) for r in rows[1:3]]  # P001 weeks 0 and 4
    body[1] = body[1].replace(",P001_W04,P001,4,", ",P001_W04,P001,0,")  # week 4's file says week 0
    manifest = tmp_path / "m_twice.csv"
    manifest.write_text("\n".join([rows[0], *body]) + "\n")
    proc = cli("validate", str(manifest), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a warning (replicates can be meant)
    assert (
        f"cytopipe validate: warning: manifest {manifest}: patient 'P001', visit 0 is claimed by 2 samples: "
        f"P001_W00 (row 2, {SAMPLE_DATA}/fcs/P001_W00.fcs), P001_W04 (row 3, {SAMPLE_DATA}/fcs/P001_W04.fcs)"
    ) in proc.stderr
    # --json: the same warning in the manifest's entry of "inputs" (it was only on stderr, so a
    # script reading the document never saw it); still valid
    proc = cli("validate", "--json", str(manifest), timeout=120)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"], proc.stdout + proc.stderr
    (entry,) = [i for i in doc["inputs"] if i["kind"] == "manifest"]
    assert len(entry["warnings"]) == 1
    assert entry["warnings"][0].startswith(
        f"manifest {manifest}: patient 'P001', visit 0 is claimed by 2 samples"
    )


@pytest.mark.parametrize(
    ("text", "week"),
    [("4", 4), ("4.0", 4), ("-2", -2), ("W04", 4), ("w4", 4), ("Wk 4", 4), ("Week 12", 12), ("week_12", 12),
     ("4 weeks", 4), ("W-2", -2), ("Week -2", -2), ("D28", 4), ("Day 28", 4), ("Day 0", 0), ("day 84", 12),
     ("BL", 0), ("Baseline", 0), ("baseline", 0)],
)  # fmt: skip
def test_visits_written_as_weeks_days_or_baseline_are_study_weeks(text, week):
    assert parse_visit(text) == week


@pytest.mark.parametrize(
    ("text", "why"),
    [("M3", "months are no whole number of weeks"), ("Month 3", "months are no whole number of weeks"),
     ("Day 1", "day 1 is not a whole study week (if day 1 is your baseline, write BL or 0)"),
     ("D29", "day 29 is not a whole study week"), ("V2", "a visit number"), ("Screening", "screening"),
     ("4.5", "not a whole study week"), ("next", "not a study week")],
)  # fmt: skip
def test_an_ambiguous_visit_is_an_error_naming_the_value_why_and_the_accepted_forms(study, text, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_visit(text)
    path = write_csv(study, GOOD.replace("S002,001,4,", f"S002,001,{text},"))
    with pytest.raises(ManifestError) as exc:
        load_manifest(path)
    message = str(exc.value)
    assert exc.value.context["row"] == 3 and exc.value.context["column"] == "visit"
    assert str(path) in message and f"visit is {text!r}: {why}" in message
    assert "W4 / Wk 4 / Week 4" in message and "Day 28" in message and "BL" in message


def test_a_manifest_with_text_visits_reads_as_the_one_with_weeks(study):
    text = GOOD.replace("S001,001,0,", "S001,001,BL,").replace("S002,001,4,", "S002,001,Week 4,")
    words = load_manifest(write_csv(study, text, name="words.csv"))
    numbers = load_manifest(write_csv(study, GOOD))
    pd.testing.assert_frame_equal(words.drop(columns="path"), numbers.drop(columns="path"))
    assert words["visit"].tolist()[:2] == [0, 4]
