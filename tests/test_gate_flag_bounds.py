"""A gate's flag states its plausible fraction of the parent as the template has it: CytoNorm's
PTLG028 file keeps almost no Treg, and its flag read 'keeps 0.0% of the parent, outside [0%, 40%]'
(the template's lower bound 0.002 rounded to 0%), which contradicts itself."""

from __future__ import annotations

import re

import pandas as pd

from tests.conftest import REPO, shared_path


def test_flags_state_bounds_below_one_percent(tmp_path, capsys):
    from cytopipe.cli import main

    path = shared_path("CytoNorm", "inst", "extdata", "Gates_PTLG028_Unstim_Control_1.fcs")
    out = tmp_path / "gated"
    rc = main(["gate", str(path), "--template", str(REPO / "gating" / "sle_il2_cytof.yaml"),
               "--out", str(out), "--missing-markers", "skip", "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    flags = list(pd.read_parquet(out / "gate_flags.parquet")["flag"])
    treg = [f for f in flags if f.startswith("Treg[CD25]: the fitted gate keeps")]
    assert treg and "of the parent, outside [0.2%, 40%]" in treg[0], flags
    assert not any(re.search(r"outside \[0%", f) for f in flags), flags


def test_a_share_just_outside_its_bounds_is_shown_outside():
    from cytopipe.gating.engine import _outside, _share

    assert _share(0.0499, (0.05, 0.98)) == "4.99%"  # not '5.0%' of [5%, 98%]
    assert _share(0.0, (0.002, 0.4)) == "0.0%" and _outside((0.002, 0.4)) == "outside [0.2%, 40%]"
    assert _share(0.95, (0.05, 0.9)) == "95.0%" and _outside((0.05, 0.9)) == "outside [5%, 90%]"
