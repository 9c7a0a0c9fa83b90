"""`cytopipe validate` end to end, through a subprocess, on real and corrupt files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cytopipe.fcs import Spillover, write_fcs
from tests.conftest import REPO, shared_path


def cytopipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return cytopipe_cli(*args, cwd=cwd)


def cytopipe_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cytopipe", "validate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.fixture
def folder(tmp_path):
    """Good files (one without extension, one real BD file), and corrupt ones."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    spill = Spillover(np.array([[1, 0.1], [0.02, 1]]), ["BV421-A", "PE-A"])
    write_fcs(
        root / "good.fcs",
        rng.normal(size=(100, 3)).astype(np.float32),
        [("FSC-A", ""), ("BV421-A", "CD4"), ("PE-A", "FOXP3")],
        spillover=spill,
    )
    write_fcs(root / "sub" / "NOEXTENSION", rng.normal(size=(10, 2)).astype(np.float32), ["A", "B"])
    shutil.copy(shared_path("FlowKit", "data", "100715.fcs"), root / "sub" / "bd.fcs")
    good = (root / "good.fcs").read_bytes()
    (root / "truncated.fcs").write_bytes(good[: len(good) - 100])
    (root / "sub" / "garbage.fcs").write_bytes(b"FCS3.1  nonsense " * 6)
    (root / "notes.txt").write_text("not an FCS file, ignored in folders")
    return root


def test_folder_with_good_and_corrupt_files(folder):
    out = cytopipe(str(folder), cwd=folder.parent)
    assert out.returncode == 3, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "STATUS",
        "FILE",
        "VERSION",
        "EVENTS",
        "CH",
        "MARKERS",
        "SPILLOVER",
        "SHA256",
        "ERROR",
    ]
    rows = {line.split()[1]: line for line in lines[1:6]}
    assert set(rows) == {
        "data/good.fcs",
        "data/truncated.fcs",
        "data/sub/NOEXTENSION",
        "data/sub/bd.fcs",
        "data/sub/garbage.fcs",
    }
    good = rows["data/good.fcs"].split()
    sha = hashlib.sha256((folder / "good.fcs").read_bytes()).hexdigest()
    assert good[:7] == ["ok", "data/good.fcs", "FCS3.1", "100", "3", "CD4,FOXP3", "$SPILLOVER"]
    assert good[7] == sha[:12]
    assert rows["data/sub/bd.fcs"].split()[2:4] == ["FCS2.0", "65016"]
    assert "truncated (only" in rows["data/truncated.fcs"] and rows["data/truncated.fcs"].startswith("failed")
    assert "HEADER field" in rows["data/sub/garbage.fcs"]
    assert "5 file(s): 3 ok, 2 failed" in out.stdout


def test_every_fcs_named_file_in_a_folder_is_reported(folder):
    """An empty file or a text file named *.fcs (any case) is an invalid FCS file, reported like the
    others; files neither named *.fcs nor starting like one are ignored, and how many is said."""
    (folder / "empty.fcs").write_bytes(b"")
    (folder / "sub" / "NOTES.FCS").write_text("tube 3 was spilled\n")
    (folder / "._good.fcs").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS resource fork
    out = cytopipe(str(folder), cwd=folder.parent)
    assert out.returncode == 3, out.stderr
    rows = {line.split()[1]: line for line in out.stdout.splitlines()[1:8] if line.strip()}
    assert (
        rows["data/empty.fcs"].startswith("failed")
        and "the file is empty (0 bytes)" in rows["data/empty.fcs"]
    )
    assert rows["data/sub/NOTES.FCS"].startswith("failed") and "not an FCS file" in rows["data/sub/NOTES.FCS"]
    assert "7 file(s): 3 ok, 4 failed" in out.stdout
    assert f"  {folder}: 2 other file(s)" in out.stdout  # notes.txt and the resource fork
    doc = json.loads(cytopipe("--json", str(folder), cwd=folder).stdout)
    assert doc["inputs"] == [{"path": str(folder), "kind": "folder", "fcs_files": 7, "ignored_files": 2}]
    assert {Path(f["file"]).name for f in doc["files"] if f["status"] == "failed"} >= {
        "empty.fcs",
        "NOTES.FCS",
    }


def test_json_output(folder):
    out = cytopipe("--json", str(folder), cwd=folder)
    doc = json.loads(out.stdout)
    assert doc["ok"] is False and doc["summary"] == {
        "files": 5,
        "ok": 3,
        "failed": 2,
        "warned": 0,
        "problems": 0,
    }
    files = {Path(f["file"]).name: f for f in doc["files"]}
    good = files["good.fcs"]
    assert good["sha256"] == hashlib.sha256((folder / "good.fcs").read_bytes()).hexdigest()
    assert good["markers"] == ["CD4", "FOXP3"] and good["spillover"] == "$SPILLOVER"
    assert (good["events"], good["channels"], good["version"], good["datasets"]) == (100, 3, "FCS3.1", 1)
    bad = files["truncated.fcs"]
    assert bad["status"] == "failed" and bad["error_type"] == "FCSDataError" and "truncated" in bad["error"]


def test_all_valid_exits_zero_and_multiple_paths(folder, tmp_path):
    out = cytopipe(str(folder / "good.fcs"), str(folder / "sub" / "NOEXTENSION"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 file(s): 2 ok, 0 failed" in out.stdout


def test_channels_sharing_a_pnn_are_a_warning_that_the_run_will_fail_the_file(tmp_path):
    """`cytopipe validate` called such a file "ok" with a note among the handled quirks, while
    `cytopipe run` / `cytopipe gate` fail it (PanelError) when the template uses the channel."""
    import warnings

    import cytopipe
    from cytopipe.errors import PanelError

    raw = (REPO / "sample_data" / "fcs" / "P006_W00.fcs").read_bytes()
    assert raw.count(b"|BV650-A|") == 1  # CXCR5's channel takes CD4's name (same length: offsets hold)
    path = tmp_path / "TWIN.fcs"
    path.write_bytes(raw.replace(b"|BV650-A|", b"|BV605-A|"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = cytopipe.read_fcs(path)
    with pytest.raises(PanelError, match="'BV605-A' is ambiguous"):  # what the run does with it
        cytopipe.gate(sample, cytopipe.load_template(REPO / "gating" / "sle_il2_tcell_nk.yaml"))

    out = cytopipe_cli(str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr  # the file reads: still valid FCS
    _, _, rest = out.stdout.partition("Warnings (the files read, but a run will fail them as said):")
    line = rest.lstrip("\n").splitlines()[0]
    assert line.startswith(f"  {path}: channel 'BV605-A' is named by 2 parameters ($P8N, $P9N)")
    assert "`cytopipe run` and `cytopipe gate` will fail this file" in line
    assert "Give each channel a unique $PnN" in line and "cytopipe template check" in line
    assert "duplicate channel names" not in out.stdout  # no longer a note among the handled quirks
    assert "1 ok file(s) with a warning a run will fail on" in out.stdout
    doc = json.loads(cytopipe_cli("--json", str(path), cwd=tmp_path).stdout)
    assert doc["summary"]["warned"] == 1 and doc["files"][0]["status"] == "ok"
    assert not any("duplicate" in n for n in doc["files"][0]["notes"])
    assert len(doc["files"][0]["warnings"]) == 1 and "'BV605-A'" in doc["files"][0]["warnings"][0]


def test_multi_dataset_file_and_notes():
    path = shared_path(
        "cytoflow", "cytoflow", "tests", "data", "instruments", "Beckman Coulter - Gallios.LMD"
    )
    out = cytopipe("--json", str(path), cwd=path.parent)
    assert out.returncode == 0
    report = json.loads(out.stdout)["files"][0]
    assert report["datasets"] == 2 and report["status"] == "ok"
    assert any("data set 1:" in note and "parameter number" in note for note in report["notes"])


def test_manifest_rows_and_files(folder):
    (folder / "manifest.csv").write_text(
        "file,sample_id,patient_id,visit,arm,control\n"
        "good.fcs,S1,P1,0,placebo,\n"
        "truncated.fcs,S2,P1,4,placebo,\n"
        "missing.fcs,S3,P2,M2,placebo,\n"  # W8 is week 8 since text visits are read; M2 is no week
        "sub/NOEXTENSION,C1,,,,unstained\n"
    )
    out = cytopipe(str(folder / "manifest.csv"), cwd=folder)
    assert out.returncode == 3
    assert "Problems:" in out.stdout and "row 4, column 'visit'" in out.stdout
    doc = json.loads(cytopipe("--json", "manifest.csv", cwd=folder).stdout)
    by_sample = {f["sample_id"]: f for f in doc["files"]}
    assert by_sample["S1"]["status"] == "ok" and by_sample["C1"]["status"] == "ok"
    assert by_sample["S2"]["status"] == "failed" and by_sample["S3"]["error"].startswith("not found")
    assert by_sample["S3"]["manifest_row"] == 4
    assert [(p["row"], p["column"]) for p in doc["problems"]] == [(4, "visit")]


def test_a_good_manifest_passes(folder):
    (folder / "ok.csv").write_text("file,sample_id,patient_id,visit,arm\ngood.fcs,S1,P1,0,placebo\n")
    out = cytopipe("ok.csv", cwd=folder)
    assert out.returncode == 0, out.stdout
    assert "1 file(s): 1 ok, 0 failed" in out.stdout


def test_nothing_to_validate_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    out = cytopipe(str(tmp_path / "empty"), cwd=tmp_path)
    assert out.returncode == 3 and "no FCS files found" in out.stdout
    out = cytopipe(str(tmp_path / "missing.fcs"), cwd=tmp_path)
    assert out.returncode == 3 and "cannot read the file" in out.stdout


def test_every_shared_fcs_file_is_validated_without_crashing(shared_data, tmp_path):
    """The whole shared corpus in one command: only the three broken files fail (fcsparser's
    `corrupted.fcs`, 10 bytes of text, is named *.fcs: it is reported, not skipped)."""
    out = cytopipe("--json", str(shared_data), cwd=tmp_path)
    doc = json.loads(out.stdout)
    failed = sorted(Path(f["file"]).name for f in doc["files"] if f["status"] == "failed")
    assert failed == ["AriaFile1.fcs", "corrupted.fcs", "sample_header.fcs"]
    assert doc["summary"]["files"] >= 200 and out.returncode == 3
    assert not [f for f in doc["files"] if "unexpected error" in f["error"]]


def test_a_reader_that_stops_early_ends_the_command_quietly(folder, tmp_path):
    """`cytopipe validate --json | head`: the reader closes the pipe before the output is written;
    the command stops quietly (exit 0, no traceback), as command-line tools do."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first byte
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cytopipe", "validate", str(folder), "--json"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
