"""FlowJo and Gating-ML exports of files where some populations are not measured.

`cytopipe gate --missing-markers skip --flowjo --gatingml` on two of CytoNorm's CyTOF files with the
mass-cytometry template: neither carries CCR6 nor CXCR5 (Th17, Th1, cTfh, activated cTfh not
measured), and one is written again without its CD45RA label (Memory CD4 not measured either).
Both exports stopped with an internal error (AttributeError on the missing gate); a not-measured
population now has no gate and no stored count in them (never 0 events), the others are exported
with the run's counts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cytopipe.fcs import read_fcs, write_fcs
from cytopipe.gating import read_gatingml
from cytopipe.gating.flowjo import FlowJoWorkspace
from tests.conftest import REPO, shared_path
from tests.pipeline_support import cli


def test_flowjo_and_gatingml_exports_leave_out_what_is_not_measured(tmp_path):
    folder = shared_path("CytoNorm", "inst", "extdata")
    plain = folder / "Gates_PTLG021_Unstim_Control_1.fcs"
    sample = read_fcs(folder / "Gates_PTLG034_Unstim_Control_1.fcs")
    channels = sample.channels.copy()
    channels.loc[channels["pns"] == "CD45RA", "pns"] = ""
    relabelled = write_fcs(
        tmp_path / "Gates_PTLG034_noCD45RA.fcs", sample.events, channels, keywords=sample.keywords
    )
    out = tmp_path / "gated"
    proc = cli(
        "gate", str(plain), str(relabelled), "--template", str(REPO / "gating" / "sle_il2_cytof.yaml"),
        "--missing-markers", "skip", "--flowjo", "--gatingml", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ps = pd.read_parquet(out / "population_stats.parquet")
    unmeasured = ps["count"].isna()  # not measured: no count (population_stats)
    assert unmeasured.sum() == 4 + 5

    wsp = FlowJoWorkspace(out / "gates.wsp")
    for sid, rows in ps.groupby("sample_id"):
        stored = wsp.sample(f"{sid}.fcs").counts
        measured = rows[rows["count"].notna()]
        # (an AND gate's intermediate populations, "Treg [CD25 CD127]", are not the run's)
        by_name = {Path(p).name: n for p, n in stored.items() if p != "root" and " [" not in Path(p).name}
        assert set(by_name) == set(measured["population"]), sid  # nothing stored for the others
        assert all(by_name[p] == n for p, n in zip(measured["population"], measured["count"])), sid

        imported = read_gatingml(out / "gatingml" / f"{sid}.xml")
        assert set(imported.names) == set(measured["population"]), sid
    assert not [p for p in wsp.sample("Gates_PTLG034_noCD45RA.fcs").counts if "Memory CD4" in p]
