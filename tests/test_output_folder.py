"""`--out`: a file, or a folder holding someone else's files, is refused before any work (exit 2,
one clear message, nothing replaced); a new, empty or cytopipe folder is written (and rewritten)."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.conftest import REPO, SAMPLE_DATA, shared_path
from tests.pipeline_support import cli

TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"
SIMPLE = ("FlowKit", "data", "simple_line_example")


def _donor1() -> str:
    return str(shared_path("CytoPipeline", "inst", "extdata", "Donor1.fcs"))


def _foreign_folder(tmp_path):
    """A lab's own folder: notes and a table named like cytopipe's."""
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "population_stats.parquet").write_bytes(b"the lab's own table")
    return folder


def _assert_refused(proc, command: str, text: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert f"cytopipe {command}: error: " in proc.stderr and text in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["gate", "DONOR1", "--template", str(TEMPLATE), "--missing-markers", "skip"],
        ["gate", "--manifest", str(SAMPLE_DATA / "manifest.csv"), "--template", str(TEMPLATE)],
        ["run", "--manifest", str(SAMPLE_DATA / "manifest.csv"), "--template", str(TEMPLATE)],
        ["reconcile", "WORKSPACE", "FCS_DIR"],
        ["simulate", "--patients", "2"],
    ],
    ids=["gate", "gate-manifest", "run", "reconcile", "simulate"],
)
def test_out_that_is_a_file_is_refused(command, tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("hi\n")
    swap = {"DONOR1": _donor1, "WORKSPACE": lambda: str(shared_path(*SIMPLE, "simple_poly_and_rect.wsp")),
            "FCS_DIR": lambda: str(shared_path(*SIMPLE))}  # fmt: skip
    args = [swap[a]() if a in swap else a for a in command]
    proc = cli(*args, "--out", str(afile), timeout=120)
    _assert_refused(proc, command[0], "exists and is not a folder; choose another --out")
    assert afile.read_text() == "hi\n"


@pytest.mark.parametrize("command", ["gate", "run"])
def test_a_folder_with_someone_elses_files_is_not_written_into(command, tmp_path):
    folder = _foreign_folder(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    if command == "gate":
        args = ["gate", _donor1(), "--template", str(TEMPLATE), "--missing-markers", "skip"]
    else:
        args = ["run", "--manifest", str(SAMPLE_DATA / "manifest.csv"), "--template", str(TEMPLATE)]
    proc = cli(*args, "--out", str(folder), timeout=120)
    _assert_refused(proc, command, "is not empty and is not a cytopipe run folder")
    assert "notes.txt" in proc.stderr and "Choose a new or an empty folder" in proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing replaced or added


def test_gate_writes_a_new_folder_then_the_same_folder_again(tmp_path):
    out = tmp_path / "gated"
    args = ["gate", _donor1(), "--template", str(TEMPLATE), "--missing-markers", "skip", "--quiet"]
    first = cli(*args, "--out", str(out), timeout=300)
    assert first.returncode == 0, first.stderr
    table = pd.read_parquet(out / "population_stats.parquet")
    again = cli(*args, "--out", str(out), timeout=300)  # its own folder (the lock file marks it)
    assert again.returncode == 0, again.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out / "population_stats.parquet"), table)
    # a folder of an earlier gate (its own files only, no lock file) is cytopipe's too
    (out / ".cytopipe.lock").unlink()
    assert cli(*args, "--out", str(out), timeout=300).returncode == 0
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(*args, "--out", str(empty), timeout=300).returncode == 0
    assert (empty / "population_stats.parquet").is_file()


def test_an_output_path_through_a_file_says_so(tmp_path):
    """`export anndata --out afile.txt/x.h5ad` and every atomic write: the path needs a folder where
    a file is; the message says that and what to do (not 'fix the cause')."""
    from cytopipe.errors import OutputWriteError
    from cytopipe.store import atomic_write_bytes

    afile = tmp_path / "afile.txt"
    afile.write_text("hi\n")
    with pytest.raises(
        OutputWriteError, match="a file stands where a folder is needed; choose another --out"
    ):
        atomic_write_bytes(afile / "x.h5ad", b"data")
    with pytest.raises(OutputWriteError, match="a part of this path is a file, not a folder"):
        atomic_write_bytes(afile / "sub" / "x.h5ad", b"data")
    assert afile.read_text() == "hi\n"


def test_a_folder_given_as_the_file_to_write_says_so(tmp_path):
    """`cytopipe audit export --out FOLDER`: the message says to name a file in it, and nothing
    about a run resuming (it is not a run)."""
    from cytopipe.errors import OutputWriteError
    from cytopipe.store import atomic_write_bytes

    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(OutputWriteError, match="this is a folder; give the path of a file to write") as info:
        atomic_write_bytes(folder, b"id,at\n")
    assert "resumes" not in str(info.value)
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize(
    "command",
    [
        ["gate", "DONOR1", "--template", str(TEMPLATE), "--missing-markers", "skip"],
        ["run", "--manifest", str(SAMPLE_DATA / "manifest.csv"), "--template", str(TEMPLATE)],
        ["reconcile", "WORKSPACE", "FCS_DIR"],
        ["simulate", "--patients", "2"],
    ],
    ids=["gate", "run", "reconcile", "simulate"],
)
def test_an_out_through_a_file_is_a_usage_error(command, tmp_path):
    """`--out afile.txt/sub`: the path given is wrong (exit 2, usage or input error, as an --out that
    is a file), not a failed write (exit 4: disk full, read-only; `test_run_safety.py`) nor a bug
    (exit 1: `simulate` and `reconcile` gave a traceback, `gate` and `run` exit 4)."""
    afile = tmp_path / "afile.txt"
    afile.write_text("hi\n")
    swap = {"DONOR1": _donor1, "WORKSPACE": lambda: str(shared_path(*SIMPLE, "simple_poly_and_rect.wsp")),
            "FCS_DIR": lambda: str(shared_path(*SIMPLE))}  # fmt: skip
    args = [swap[a]() if a in swap else a for a in command]
    proc = cli(*args, "--out", str(afile / "sub"), timeout=120)
    _assert_refused(proc, command[0], "a part of this path is a file, not a folder; choose another --out")
    assert afile.read_text() == "hi\n"
