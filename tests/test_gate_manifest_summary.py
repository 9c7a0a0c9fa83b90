"""`cytopipe gate --manifest` runs the pipeline's steps; its closing summary is the gate
command's own (it said 'cytopipe run: ...' after the user typed `cytopipe gate`), and the run
folder it writes is not overwritten by a later `cytopipe gate FILES --out` the same folder."""

from __future__ import annotations

import shutil

from tests.conftest import shared_path

TEMPLATE = "gating/sle_il2_tcell_nk.yaml"


def test_gate_with_a_manifest_names_itself_in_its_summary(tmp_path, capsys):
    from cytopipe.cli import main

    folder = shared_path("CytoPipeline", "inst", "extdata")
    (tmp_path / "fcs").mkdir()
    for name in ("Donor1.fcs", "Donor2.fcs"):
        shutil.copyfile(folder / name, tmp_path / "fcs" / name)
    (tmp_path / "manifest.csv").write_text(
        "file,sample_id,patient_id,visit,arm\n"
        "fcs/Donor1.fcs,D1_W0,P01,0,placebo\n"
        "fcs/Donor2.fcs,D2_W0,P02,0,IL-2\n"
        "fcs/Donor3.fcs,D3_W0,P03,0,IL-2\n"  # a row naming a file not there: failed, exit 3
    )
    out = tmp_path / "gated"
    rc = main(["gate", "--manifest", str(tmp_path / "manifest.csv"), "--template", TEMPLATE,
               "--out", str(out), "--missing-markers", "skip"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 3, captured.err
    text = captured.out + captured.err
    assert "cytopipe gate: 3 files: 0 ok, 2 flagged, 1 failed" in text
    assert "cytopipe run:" not in text
    assert "file 'fcs/Donor3.fcs' not found" in text
    # `cytopipe gate FILE` into that run folder: it replaced population_stats.parquet with one
    # sample's table (exit 0) while samples.parquet and run.json still described the run
    before = (out / "population_stats.parquet").read_bytes()
    rc = main(["gate", str(tmp_path / "fcs" / "Donor2.fcs"), "--template", TEMPLATE, "--out", str(out),
               "--missing-markers", "skip", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"file '{out}': this is the run folder of a `cytopipe run`" in err and "--out" in err
    assert (out / "population_stats.parquet").read_bytes() == before
