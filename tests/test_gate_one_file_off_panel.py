"""One file of a batch that the template cannot gate at all (its `panel:` sends Viability to
Pt195Di, which the CyTOF workshop's example.fcs lacks; or a file that is not FCS) is a failure
of that file, as in `cytopipe run`: `cytopipe gate` stopped the whole batch (exit 2, nothing
gated) and `cytopipe template check` stopped before checking the other files (exit 2)."""

from __future__ import annotations

import pandas as pd

from tests.conftest import REPO, shared_path

CYTOF = str(REPO / "gating" / "sle_il2_cytof.yaml")


def _files(tmp_path):
    good = shared_path("CytoNorm", "inst", "extdata", "Gates_PTLG021_Unstim_Control_1.fcs")
    off_panel = shared_path("CyTOF-workshop-2017-07-10", "data", "example.fcs")
    not_fcs = tmp_path / "notes.fcs"
    not_fcs.write_text("acquisition notes, not an FCS file\n")
    return good, off_panel, not_fcs


def test_gate_fails_only_the_file_the_template_cannot_gate(tmp_path, capsys):
    from cytopipe.cli import main

    good, off_panel, _ = _files(tmp_path)
    out = tmp_path / "gated"
    rc = main(["gate", str(good), str(off_panel), "--template", CYTOF, "--out", str(out),
               "--missing-markers", "skip", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"cytopipe gate: example: file '{off_panel}', population 'Live', marker 'Viability'" in err
    assert "sends marker 'Viability' to channel 'Pt195Di', but the file has no such $PnN" in err
    stats = pd.read_parquet(out / "population_stats.parquet")
    assert set(stats["sample_id"]) == {"Gates_PTLG021_Unstim_Control_1"}
    assert stats.loc[stats["population"] == "T cells", "count"].iloc[0] > 0


def test_template_check_lists_files_it_cannot_use_and_checks_the_rest(tmp_path, capsys):
    from cytopipe.cli import main

    good, off_panel, not_fcs = _files(tmp_path)
    rc = main(["template", "check", str(good), str(off_panel), str(not_fcs), "--template", CYTOF])
    captured = capsys.readouterr()
    assert rc == 3, captured.err
    text = captured.out
    lines = text.splitlines()
    for path, why in ((off_panel, "sends marker 'Viability' to channel 'Pt195Di'"),
                      (not_fcs, "not an FCS file")):  # fmt: skip
        at = lines.index(f"file {path}")
        assert lines[at + 1].startswith("  PROBLEM: `cytopipe gate` and `cytopipe run` would fail this file")
        assert why in lines[at + 1]
    assert f"file {good}" in lines and "  T cells         CD3 -> Er170Di" in text  # the good file checked
    assert lines[-1].startswith("3 of 3 file(s) with problems")
