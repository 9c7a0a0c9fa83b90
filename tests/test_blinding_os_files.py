"""Files an operating system writes into a run folder by itself, when the folder is blinded
(cytopipe/report/filecheck.py, docs/reports.md "Blinded run folders").

A macOS ``.DS_Store`` (Finder writes one into every folder it opens, network shares too) holds the
folder's entry names in UTF-16BE and its view settings: it is checked (its bytes read as UTF-16 at
both byte alignments, UTF-8 and Latin-1) instead of refused as a binary file it cannot read, which
made every blinding of a folder opened in Finder refuse. One naming an arm (a file named after the
arm, at an odd byte offset) is refused; one that does not stays byte for byte. An AppleDouble
``._NAME`` (resource fork and extended attributes: a custom icon is a picture) and a Windows
``Thumbs.db`` (pictures of the folder's images) cannot be checked: refused, saying what they are."""

from __future__ import annotations

import shutil
import struct
from functools import partial

import pytest

from tests.pipeline_support import cli
from tests.test_blinded_run_report_tables import ARMS, _snapshot


def _ds_store(names: list[str], pad: int = 0) -> bytes:
    """A .DS_Store as Finder writes it: the buddy allocator's header (``Bud1``), then records of
    the tree's leaf block, each ``<length><UTF-16BE name><code><type><value>`` (``pad`` bytes before
    the records: the names at an odd byte offset when odd)."""
    records = b""
    for name in names:
        utf16 = name.encode("utf-16-be")
        records += (
            struct.pack(">I", len(name)) + utf16 + b"Iloc" + b"blob" + struct.pack(">I", 16) + bytes(16)
        )
        records += (
            struct.pack(">I", len(name)) + utf16 + b"modD" + b"dutc" + struct.pack(">Q", 0x1D2E3F4050607)
        )
    header = b"\x00\x00\x00\x01" + b"Bud1" + struct.pack(">III", 0x1000, 0x800, 0x1000) + bytes(16)
    block = struct.pack(">II", 0, len(names) * 2)  # a leaf: no next block, the number of records
    body = header + b"\x00" * pad + block + records
    return body + bytes(-len(body) % 4096)  # blocks are powers of two


def test_ds_store_strings_are_read_at_both_alignments(tmp_path):
    from cytopipe.report.blinding import find_leaks
    from cytopipe.report.filecheck import shown_arm

    leaks = partial(find_leaks, arms=list(ARMS))
    for pad in (0, 1, 2, 3):
        path = tmp_path / f"{pad}.DS_Store"
        path.write_bytes(_ds_store(["gates.png", "placebo_notes.txt"], pad))
        assert shown_arm(path, leaks) == "the file (UTF-16BE): 'placebo'", pad
        path.write_bytes(_ds_store(["gates.png", "notes.txt", "exports"], pad))
        assert shown_arm(path, leaks) == "", pad
    # a view setting's binary property list with a UTF-8 string (a window's title, an alias path)
    path = tmp_path / "bplist.DS_Store"
    path.write_bytes(_ds_store(["a"], 1) + b"bplist00\x5fIL-2 0.5 MIU/scans\x08")
    assert shown_arm(path, leaks) == "the file (UTF-8): 'IL-2 0.5 MIU'"


@pytest.mark.slow  # default suite: the .DS_Store reading and the thumbnail refusal in the other tests of this module; a user's file refused in tests/test_blinding_folder_kinds.py
def test_a_ds_store_is_checked_and_other_system_files_refused_saying_what_they_are(sim_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sim_run, out)
    (out / "exports").mkdir()
    (out / "exports" / ".DS_Store").write_bytes(_ds_store(["IL-2 1.0 MIU.h5ad", "Treg.h5ad"], pad=1))
    (out / "._notes.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64))
    (out / "scans").mkdir()
    (out / "scans" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    before = _snapshot(out)
    proc = cli("report", str(out), "--blinded")
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr
    assert "holds a file cytopipe did not write that shows an arm name: exports/.DS_Store (the file " \
           "(UTF-16BE))." in message, message[-3000:]  # fmt: skip
    assert (
        "._notes.txt (an AppleDouble file macOS writes beside a file on a volume that is not a Mac's"
        in message
    )
    assert "dot_clean FOLDER" in message
    assert (
        "scans/Thumbs.db (a Windows thumbnail cache, which holds small pictures of the folder's images"
        in message
    )
    assert "Traceback" not in message
    assert _snapshot(out) == before  # nothing done

    # Finder's file of a folder without arm names (and Windows' desktop.ini, text): kept, byte for byte
    (out / "._notes.txt").unlink()
    (out / "scans" / "Thumbs.db").unlink()
    kept = {
        "exports/.DS_Store": _ds_store(["Treg.h5ad", "CD4.h5ad"], pad=1),
        ".DS_Store": _ds_store(["exports", "report.html", "scans"]),
        "scans/desktop.ini": "\ufeff[.ShellClassInfo]\r\nIconResource=scan.ico,0\r\n".encode("utf-16-le"),
    }
    for rel, data in kept.items():
        (out / rel).write_bytes(data)
    proc = cli("report", str(out), "--blinded")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    assert {rel: (out / rel).read_bytes() for rel in kept} == kept
    assert "Arm " in (out / "report_tables" / "samples.csv").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["Thumbs.db", "ehthumbs.db"])
def test_a_thumbnail_cache_is_refused_by_name_and_header(tmp_path, name):
    from cytopipe.report.blinding import find_leaks
    from cytopipe.report.filecheck import CannotCheck, shown_arm

    path = tmp_path / name
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    with pytest.raises(CannotCheck, match="Windows thumbnail cache"):
        shown_arm(path, partial(find_leaks, arms=list(ARMS)))
    legacy = tmp_path / "old.doc"  # an old Office file: the usual message
    legacy.write_bytes(path.read_bytes())
    with pytest.raises(CannotCheck, match="not text"):
        shown_arm(legacy, partial(find_leaks, arms=list(ARMS)))
