"""Blinding leaves no arm name anywhere in the run folder (docs/reports.md, "Blinded run folders").

Every file of a folder to be blinded is either cytopipe's (recoded, or removed with the report it
belongs to) or the user's, checked wherever it is (hidden folders, other tables folders, any
extension) and whatever it is (text, Parquet, zip-based office files through their members, HDF5);
a file that cannot be checked (an image, a PDF) is refused before any work like one that shows an
arm. A user's ``study/spillover_*.csv`` is the user's unless run.json records the run wrote it.
run.log of a blinded run names no arm (a clinical table's problem quotes two). The last check: a
scan of every file under the blinded run folder, its text, Parquet cells, DuckDB tables, zip
members and HDF5 strings, finds no arm name at all."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.pipeline_support import SECTIONS, TEMPLATE, cli, cli_in_process
from tests.test_blinded_run_report_tables import ARMS, _snapshot

#: what the scan looks for: every arm name, and the doses alone (``0.5 MIU`` tells the arm too)
WANTED = re.compile("|".join(re.escape(a) for a in (*ARMS, "0.2 MIU", "0.5 MIU", "1.0 MIU")), re.IGNORECASE)


def _trial(sim_trial: Path, folder: Path) -> Path:
    """The simulated trial with a clinical table that puts patient P001 in another arm than the
    manifest: the run's problem (and its log line) quotes both arm names."""
    folder.mkdir()
    for entry in sim_trial.iterdir():
        if entry.name != "clinical.csv":
            (folder / entry.name).symlink_to(entry)
    rows = list(csv.reader(io.StringIO((sim_trial / "clinical.csv").read_text(encoding="utf-8"))))
    first = next(r[2] for r in rows[1:] if r[0] == "P001")
    other = next(a for a in ARMS if a != first)
    for row in rows[1:]:
        if row[0] == "P001":
            row[2] = other
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    (folder / "clinical.csv").write_text(buf.getvalue(), encoding="utf-8")
    return folder


def _spec(trial: Path, out: Path, path: Path, blinded: bool, **report: object) -> Path:
    spec = {"study": "simulated trial", "manifest": str(trial / "manifest.csv"),
            "clinical": str(trial / "clinical.csv"), "template": str(TEMPLATE), "output": str(out),
            **SECTIONS, "report": {"enabled": True, "blinded": blinded, **report}}  # fmt: skip
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _zip(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in members.items():
            z.writestr(name, text)
    return buf.getvalue()


def _xlsx(cell: str) -> bytes:
    """The parts of a spreadsheet that hold its text (a cell's string in sharedStrings.xml)."""
    return _zip({"[Content_Types].xml": "<Types/>", "xl/workbook.xml": "<workbook/>",
                 "xl/sharedStrings.xml": f'<?xml version="1.0"?>\n<sst><si><t>{cell}</t></si></sst>'})  # fmt: skip


def _docx(first: str, second: str) -> bytes:
    """A Word paragraph written in two runs (Word splits a phrase wherever its formatting changes)."""
    body = f"<w:document><w:body><w:p><w:r><w:t>{first}</w:t></w:r><w:r><w:t>{second}</w:t></w:r></w:p></w:body></w:document>"  # fmt: skip
    return _zip({"[Content_Types].xml": "<Types/>", "word/document.xml": body})


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"

#: a user's files that show an arm (or cannot be checked): each refused before any work
REFUSED = {
    ".notes/arms.txt": b"placebo: re-acquired\n",
    "old_tables/by_arm.csv": b"arm,n\nIL-2 0.5 MIU,4\n",
    "summary_arms.xlsx": _xlsx("IL-2 1.0 MIU"),
    "letter.docx": _docx("the IL-2 0.", "2 MIU arm"),
    "study/spillover_site_S1.csv": b"arm,CD4\nplacebo,0.1\n",
    "notes.dat": b"sample,arm\nP001_W00,placebo\n",
    "figure.png": PNG,
}
#: a user's files without arm names: kept as they are, byte for byte
KEPT = {
    ".notes/plan.txt": b"re-check the gates of site S3\n",
    "old_tables/notes.csv": b"sample_id,comment\nP001_W00,fine\n",
    "summary.xlsx": _xlsx("gates checked"),
    "letter2.docx": _docx("gates ", "checked"),
    "study/spillover_mine.csv": b"CD4,CD8\n1,0.1\n0.1,1\n",
    "notes.dat": b"sample,comment\nP001_W00,fine\n",
}


def _put(out: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)


def _texts(path: Path) -> dict[str, str]:
    """Everything a file holds as text: its bytes, a table's cells, a zip's members, HDF5 strings."""
    data = path.read_bytes()
    texts = {"bytes": data.decode("latin-1")}
    if data[:4] == b"PAR1":
        texts["table"] = pd.read_parquet(path).to_csv()
    if path.suffix == ".duckdb":
        import duckdb

        con = duckdb.connect(str(path), read_only=True)
        try:
            for (name,) in con.execute("select table_name from information_schema.tables").fetchall():
                texts[name] = con.execute(f'select * from "{name}"').df().to_csv()
        finally:
            con.close()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            texts |= {m: z.read(m).decode("latin-1") for m in z.namelist()}
    return texts


def _arms_in(run: Path) -> dict[str, list[str]]:
    """``{file: [where it names an arm]}`` of every file under ``run``."""
    found = {}
    for path in sorted(run.rglob("*")):
        if path.is_file():
            hits = [where for where, text in _texts(path).items() if WANTED.search(text)]
            if hits:
                found[str(path.relative_to(run))] = hits
    return found


def test_a_blinded_run_leaves_no_arm_name_anywhere_in_its_folder(sim_trial, tmp_path):
    trial = _trial(sim_trial, tmp_path / "trial")
    out = tmp_path / "run"
    plain = _spec(trial, out, tmp_path / "plain.yaml", blinded=False)
    blinded = _spec(trial, out, tmp_path / "blinded.yaml", blinded=True)
    proc = cli("run", str(plain), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 3 and "in arm" in proc.stderr, proc.stderr[-3000:]  # the clinical problem

    # an unblinded run refuses, before any work, a report table edited since its report wrote it
    samples = out / "report_tables" / "samples.csv"
    edited = samples.read_bytes().replace(b"sample_id", b"sample_id (checked)", 1)
    samples.write_bytes(edited)
    before = _snapshot(out)
    gallery = _spec(trial, out, tmp_path / "gallery.yaml", blinded=False, max_gallery=3)  # not reused
    # the refusals and the reports below: `cytopipe` in this process (cli_in_process): what they
    # write and say is checked, not the process; the two runs around them are real processes
    proc = cli_in_process("run", str(gallery), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"file '{samples.parent}': holds samples.csv (a table an earlier report wrote, changed since), " \
           "named as a table the run's report writes there" in proc.stderr, proc.stderr[-3000:]  # fmt: skip
    assert "Nothing was done. Move or rename the file" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(out) == before
    samples.unlink()

    # reports written elsewhere in the run folder (unblinded): cytopipe's, removed when it is blinded
    for report in (out / "interim.html", out / "old" / "interim.html"):
        proc = cli_in_process("report", str(out), "--out", str(report))
        assert proc.returncode == 3, proc.stderr[-3000:]  # written; the clinical table's problem
        assert "placebo" in (report.parent / "interim_tables" / "samples.csv").read_text(encoding="utf-8")

    # a user's files that show an arm or cannot be checked, wherever they are: refused before any work
    _put(out, REFUSED | {"interim_tables/mine.csv": b"arm\nplacebo\n"})
    before = _snapshot(out)
    proc = cli_in_process("run", str(blinded), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr
    assert "holds a file cytopipe did not write that shows an arm name: .notes/arms.txt (line 1: 'placebo'); " \
           "interim_tables/mine.csv (line 2: 'placebo'); letter.docx (word/document.xml, its text without " \
           "tags: 'IL-2 0.2 MIU'); notes.dat (line 2: 'placebo'); old_tables/by_arm.csv (line 2: 'IL-2 0.5 MIU'); " \
           "study/spillover_site_S1.csv (line 2: 'placebo'); summary_arms.xlsx (xl/sharedStrings.xml, line 2: " \
           "'IL-2 1.0 MIU')." in message, message[-3000:]  # fmt: skip
    assert "It also holds a file cytopipe did not write whose content it cannot check for arm names: " \
           "figure.png (not text, nor a kind of file cytopipe can read for arm names)." in message  # fmt: skip
    assert "nothing was done. Move the file out of the run folder" in message and "Traceback" not in message
    assert _snapshot(out) == before
    for rel in [*REFUSED, "interim_tables/mine.csv"]:
        (out / rel).unlink()

    # a user's files without arm names stay as they are; cytopipe's files are blinded (or removed)
    import h5py

    with h5py.File(out / "cells.h5", "w") as f:
        f["obs/sample_id"] = ["P001_W00", "P001_W04"]
        f["obs"].attrs["note"] = "gates checked"
    kept = KEPT | {"cells.h5": (out / "cells.h5").read_bytes()}
    _put(out, KEPT)
    proc = cli("run", str(blinded), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 3, proc.stderr[-3000:]  # the clinical problem again (coded in run.json)
    assert {rel: (out / rel).read_bytes() for rel in kept} == kept
    assert not (out / "interim.html").exists() and not (out / "old" / "interim.html").exists()
    assert not (out / "old" / "interim_tables").exists() and not (out / "interim_tables").exists()
    assert "is in arm '[arm]' in the clinical table but in arm '[arm]'" in (out / "run.log").read_text()
    assert set(pd.read_parquet(out / "samples.parquet")["arm"]) - {""} == {f"Arm {c}" for c in "ABCD"}
    # no arm name anywhere: text, Parquet cells, the catalog's tables, zip members (the clustering
    # model), .cache/ and run.secret (random hex) included
    assert _arms_in(out) == {}


@pytest.mark.slow  # default suite: test_a_blinded_run_leaves_no_arm_name_anywhere_in_its_folder (every kind of file checked)
def test_large_files_are_read_in_chunks_and_an_arm_at_a_chunk_border_is_found(tmp_path):
    """A user's file larger than what is read whole (a copy of raw data kept in the run folder) is
    read in chunks; an arm name cut by a chunk's end is still found; a binary one is refused."""
    from functools import partial

    from cytopipe.report.blinding import find_leaks
    from cytopipe.report.filecheck import _WHOLE, CannotCheck, shown_arm

    leaks = partial(find_leaks, arms=list(ARMS))
    text = tmp_path / "export.txt"
    text.write_bytes(b"x" * (_WHOLE - 3) + b"IL-2 0.5 MIU\n" + b"y" * 1000)
    assert shown_arm(text, leaks) == "the file: 'IL-2 0.5 MIU'"
    fcs = tmp_path / "copy.fcs"
    fcs.write_bytes(b"FCS3.1    " + b"\x00\x01" * (_WHOLE // 2) + b"$SRC placebo ")
    assert shown_arm(fcs, leaks) == "the file: 'placebo'"
    clean = tmp_path / "clean.txt"
    clean.write_bytes(b"z" * (_WHOLE + 10))
    assert shown_arm(clean, leaks) == ""
    binary = tmp_path / "image.raw"
    binary.write_bytes(b"a" * (_WHOLE + 10) + b"\x00")
    with pytest.raises(CannotCheck, match="not text"):
        shown_arm(binary, leaks)
