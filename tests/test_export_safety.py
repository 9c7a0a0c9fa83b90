"""Exports never write outside their folder, over an input, or over an existing file unless asked;
the manifest refuses sample ids that cannot be file names (issue 11, defect 1)."""

from __future__ import annotations

import hashlib
import re

import pytest

from cytopipe.errors import ManifestError, OutputWriteError, StoreError
from cytopipe.export import export_anndata, export_fcs
from cytopipe.fcs import read_fcs
from cytopipe.manifest import check_manifest, load_manifest, unsafe_name
from tests.pipeline_support import cli


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fcs_export_into_the_raw_data_folder_never_replaces_a_raw_file(sim_run, sim_trial):
    """Before: `export fcs --out <trial>/fcs` silently replaced P001_W00.fcs by its Treg events."""
    raw = sim_trial / "fcs"
    before = {p.name: digest(p) for p in raw.glob("*.fcs")}
    with pytest.raises(StoreError, match="is an input of the run") as info:
        export_fcs(sim_run, "Treg", raw, samples=["P001_W00"], scheduler="synchronous", progress=False)
    assert "P001_W00.fcs" in str(info.value)
    assert {p.name: digest(p) for p in raw.glob("*.fcs")} == before
    # the command line says the same, exit 2 (input error), and writes nothing
    proc = cli("export", "fcs", str(sim_run), "--population", "Treg", "--out", str(raw), "--overwrite",
               "--scheduler", "synchronous", "--samples", "P001_W00")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "is an input of the run" in proc.stderr
    assert {p.name: digest(p) for p in raw.glob("*.fcs")} == before


def test_fcs_export_refuses_existing_files_unless_overwrite(sim_run, tmp_path):
    out = tmp_path / "treg"
    out.mkdir()
    mine = out / "P001_W04.fcs"
    mine.write_bytes(b"a file of mine")
    kw = dict(samples=["P001_W00", "P001_W04"], scheduler="synchronous", progress=False)
    with pytest.raises(StoreError, match="exists already; give --overwrite"):
        export_fcs(sim_run, "Treg", out, **kw)
    assert mine.read_bytes() == b"a file of mine"
    assert not (out / "P001_W00.fcs").exists()  # checked before anything is written
    report = export_fcs(sim_run, "Treg", out, overwrite=True, **kw)
    assert read_fcs(mine).n_events == report.counts["P001_W04"]


def test_a_symlink_planted_in_the_output_folder_is_not_followed_out(sim_run, sim_trial, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    raw = sim_trial / "fcs" / "P002_W04.fcs"
    before = digest(raw)
    (out / "P002_W04.fcs").symlink_to(raw)
    with pytest.raises(StoreError, match="outside the output folder|is an input"):
        export_fcs(sim_run, "Treg", out, samples=["P002_W04"], overwrite=True, scheduler="synchronous",
                   progress=False)  # fmt: skip
    assert digest(raw) == before


def test_anndata_export_never_replaces_an_input_or_an_existing_file(sim_run, sim_trial, tmp_path):
    manifest = sim_trial / "manifest.csv"
    before = digest(manifest)
    kw = dict(samples=["P001_W00"], max_events_per_sample=50, scheduler="synchronous", progress=False)
    with pytest.raises(StoreError, match="is an input of the run"):
        export_anndata(sim_run, "T cells", manifest, overwrite=True, **kw)
    assert digest(manifest) == before
    with pytest.raises(StoreError, match="is a file of the run folder"):
        export_anndata(sim_run, "T cells", sim_run / "samples.parquet", overwrite=True, **kw)
    out = tmp_path / "t.h5ad"
    out.write_bytes(b"keep me")
    with pytest.raises(StoreError, match="exists already"):
        export_anndata(sim_run, "T cells", out, **kw)
    assert out.read_bytes() == b"keep me"
    # a file where a folder of the path must be: an input error (exit 2) before any sample is read,
    # not a failed write (exit 4) after the whole export
    with pytest.raises(StoreError, match=f"{re.escape(str(out))} is a file, not a folder") as refused:
        export_anndata(sim_run, "T cells", out / "sub" / "t.h5ad", **kw)
    assert not isinstance(refused.value, OutputWriteError)
    export_anndata(sim_run, "T cells", out, overwrite=True, **kw)
    assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize(
    ("sample_id", "why"),
    [
        ("../../x", "path separator"),
        ("fcs/P001_W00", "path separator"),
        ("a\\b", "path separator"),
        ("..", "names a folder"),
        ("P001\x00W00", "control characters U+0000"),
        ("P001\nW00", "control characters U+000A"),
        ("CON", "reserved device name"),
        ("nul.txt", "reserved device name"),
        ("P001.", "ends with a dot"),
        ("x" * 201, "longer than 200 bytes"),
    ],
)
def test_unsafe_sample_ids_are_named_with_the_reason(sample_id, why):
    assert why in unsafe_name(sample_id)


def test_safe_sample_ids_pass():
    for sid in ("P001_W00", "P-1.2 (repeat)", "Patient 7 visit 4", "ID_äöü", "CONSOLE", "com10"):
        assert unsafe_name(sid) is None, sid


def test_the_manifest_refuses_ids_that_cannot_be_file_names_naming_the_row(tmp_path):
    (tmp_path / "a.fcs").write_bytes(b"x")
    (tmp_path / "b.fcs").write_bytes(b"x")
    (tmp_path / "m.csv").write_text(
        "file,sample_id,patient_id,visit,arm\na.fcs,../../x,P1,0,A\nb.fcs,P2_W00,P2,0,A\n", encoding="utf-8"
    )
    table, problems = check_manifest(tmp_path / "m.csv")
    assert table["ok"].tolist() == [False, True]
    [p] = problems
    assert p.context["row"] == 2 and p.context["column"] == "sample_id"
    assert "cannot be used as a file name" in p.message and "path separator" in p.message
    with pytest.raises(ManifestError, match="row 2.*cannot be used as a file name"):
        load_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("sample_id", ["../../x", "../escape", "sub/dir", "..", "a\x00b"])
def test_an_old_run_with_unsafe_sample_ids_cannot_export_outside_out(tmp_path, sample_id):
    """Runs made before the manifest refused such ids: the export still never leaves --out."""
    from types import SimpleNamespace

    from cytopipe.export import _fcs_target

    run = SimpleNamespace(folder=SimpleNamespace(path=tmp_path / "run"))
    out = tmp_path / "out"
    with pytest.raises(StoreError, match="cannot be used as a file name|outside the output folder"):
        _fcs_target(out, sample_id, run, overwrite=True, inputs=set())
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created
