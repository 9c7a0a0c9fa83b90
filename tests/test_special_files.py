"""FIFOs, devices and folders are refused as "not a regular file" without blocking, and errors never
quote a file's content (issue 11, defects 7 and 8). Real FIFOs and a real /dev/zero symlink; the
timeouts are hang guards (before the fix, validate hashed /dev/zero forever and a FIFO blocked)."""

from __future__ import annotations

import json
import os

import pytest

from cytopipe.errors import EXIT_FAILURES, FCSHeaderError, NotRegularFileError
from cytopipe.fcs import is_fcs_file, read_fcs, read_fcs_header
from cytopipe.validate import validate_file
from tests.pipeline_support import cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def specials(tmp_path):
    fifo = tmp_path / "pipe.fcs"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.fcs"
    zero.symlink_to("/dev/zero")
    folder = tmp_path / "folder.fcs"
    folder.mkdir()
    return {"a FIFO (named pipe)": fifo, "a character device": zero, "a folder": folder}


def test_read_fcs_refuses_fifos_devices_and_folders(specials):
    for kind, path in specials.items():
        for reader in (read_fcs, read_fcs_header):
            with pytest.raises(NotRegularFileError) as info:
                reader(path)
            assert f"not a regular file ({kind})" in str(info.value)
            assert info.value.context["file"] == path
        assert not is_fcs_file(path)


def test_validate_refuses_them_without_hanging(specials):
    for kind, path in specials.items():
        report = validate_file(path)
        assert report.status == "failed"
        assert report.error_type == "NotRegularFileError"
        assert f"not a regular file ({kind})" in report.error


def test_validate_command_on_a_fifo_a_dev_zero_symlink_and_a_manifest_naming_them(specials, tmp_path):
    proc = cli("validate", str(specials["a FIFO (named pipe)"]), str(specials["a character device"]), "--json",
               timeout=120)  # fmt: skip
    assert proc.returncode == EXIT_FAILURES, proc.stderr
    doc = json.loads(proc.stdout)
    errors = [f["error"] for f in doc["files"]]
    assert errors == [
        "not a regular file (a FIFO (named pipe)); give the path of an FCS file",
        "not a regular file (a character device); give the path of an FCS file",
    ]
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,sample_id,patient_id,visit,arm\npipe.fcs,S1,P1,0,A\nzero.fcs,S2,P1,4,A\n")
    proc = cli("validate", str(manifest), "--json", timeout=120)
    assert proc.returncode == EXIT_FAILURES
    doc = json.loads(proc.stdout)
    assert [f["sample_id"] for f in doc["files"]] == ["S1", "S2"]
    assert all("not a regular file" in f["error"] for f in doc["files"])


def test_errors_never_quote_the_content_of_a_file_that_is_not_fcs(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(FCSHeaderError) as info:
        read_fcs(secret)
    assert "not an FCS file (no FCS header)" in str(info.value)
    assert "root" not in str(info.value).replace(str(tmp_path), "")
    report = validate_file(secret)
    assert "not an FCS file (no FCS header)" in report.error and "root:x" not in report.error


def test_non_utf8_file_names_keep_their_bytes_in_json(tmp_path):
    name = os.fsdecode(b"caf\xe9.fcs")  # Latin-1 name on a UTF-8 system
    (tmp_path / name).write_bytes(b"not fcs")
    proc = cli("validate", str(tmp_path / name), "--json", timeout=120)
    doc = json.loads(proc.stdout)
    assert doc["files"][0]["file"].endswith("caf\\xe9.fcs")
    assert "?" not in doc["files"][0]["file"]


@pytest.mark.parametrize(
    ("extra", "note"),
    [
        ({"$P1B": "0"}, "$P1B is '0'"),
        ({"$P1B": "7"}, "$P1B is '7'"),
        ({"$P1B": "999999999"}, "$P1B is '999999999'"),
        ({"$P1R": "nan"}, "$P1R is 'nan': expected a positive range"),
        ({"$P2R": "-1"}, "$P2R is '-1': expected a positive range"),
        ({"$P1E": "nan,nan"}, "$P1E is 'nan,nan'"),
        ({"$PAR": "\uff13"}, "not written in ASCII digits"),
        ({"$BYTEORD": "1,2"}, "$BYTEORD is '1,2' (2 bytes) but the values are 4-byte numbers"),
    ],
)
def test_validate_notes_odd_keywords_the_reader_accepts(tmp_path, extra, note):
    import numpy as np

    from tests.fcs_builder import build_fcs, float_keywords

    path = tmp_path / "odd.fcs"
    path.write_bytes(
        build_fcs(float_keywords(5, ["A", "B", "C"], **extra), np.ones((5, 3), np.float32).tobytes())
    )
    report = validate_file(path)
    assert report.status == "ok"
    assert any(note in n for n in report.notes), report.notes
    clean = tmp_path / "clean.fcs"
    clean.write_bytes(build_fcs(float_keywords(5, ["A", "B", "C"]), np.ones((5, 3), np.float32).tobytes()))
    assert validate_file(clean).notes == []


def test_a_manifest_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    from cytopipe.errors import ManifestError
    from cytopipe.manifest import load_manifest

    fifo = tmp_path / "manifest.csv"
    os.mkfifo(fifo)
    with pytest.raises(
        ManifestError, match=r"not a regular file \(a FIFO \(named pipe\)\); give the path of a manifest"
    ):
        load_manifest(fifo)
