"""`cytopipe export` of a run whose files lack some template markers (CytoNorm's CyTOF files with
gating/sle_il2_cytof.yaml and `missing_markers: skip`: no CCR6, CXCR5, PD-1 or CD127 channel).

The run: two real files of one patient, the second re-written with its CD16 label blanked (so CD16
is carried by one file only). AnnData export keeps the markers the files carry (the same columns
for every sample, NaN where one file lacks a marker), names the markers left out, and lists a
sample that cannot be exported on one short line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

import cytopipe
from cytopipe.errors import PanelError
from cytopipe.export import _short_error
from cytopipe.fcs import write_fcs
from cytopipe.panel import resolve_markers
from tests.conftest import REPO, shared_path
from tests.pipeline_support import cli

TEMPLATE = REPO / "gating" / "sle_il2_cytof.yaml"
NOT_CARRIED = ["CCR6", "CXCR5", "PD-1", "CD127"]  # template markers no CytoNorm file carries


def cytonorm(name: str) -> Path:
    return shared_path("CytoNorm", "inst", "extdata", f"Gates_{name}.fcs")


@pytest.fixture(scope="module")
def cytof_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cytof_export")
    s = cytopipe.read_fcs(cytonorm("PTLG021_Unstim_Control_2"))
    channels = s.channels.copy()
    assert (channels["pns"] == "CD16").sum() == 1
    channels.loc[channels["pns"] == "CD16", "pns"] = ""  # this file no longer carries CD16
    write_fcs(root / "no_cd16.fcs", s.events, channels, keywords=s.keywords, spillover=s.spillover)
    pd.DataFrame(
        {
            "file": [str(cytonorm("PTLG021_Unstim_Control_1")), "no_cd16.fcs"],
            "sample_id": ["S1", "S2"],
            "patient_id": ["P1", "P1"],
            "visit": [0, 4],
            "arm": ["IL-2", "IL-2"],
        }
    ).to_csv(root / "manifest.csv", index=False)
    spec = {"study": "cytof export", "manifest": "manifest.csv", "template": str(TEMPLATE),
            "output": "run", "missing_markers": "skip", "clustering": {"enabled": False},
            "statistics": {"enabled": False}, "report": {"enabled": False}}  # fmt: skip
    (root / "workflow.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    proc = cli("run", str(root / "workflow.yaml"), "--workers", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def test_anndata_export_leaves_out_the_markers_no_file_carries(cytof_run, tmp_path):
    out = tmp_path / "cd4.h5ad"
    proc = cli(
        "export", "anndata", str(cytof_run), "--population", "CD4 T", "--out", str(out), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    assert "markers left out (no exported file carries them): " + ", ".join(NOT_CARRIED) in proc.stdout
    assert "`panel:`" in proc.stdout and "cytopipe template check" in proc.stdout
    assert "marker CD16 is NaN for the samples whose file does not carry it: S2" in proc.stdout
    a = ad.read_h5ad(out)
    assert not set(NOT_CARRIED) & set(a.var_names)
    assert {"CD3", "CD4", "CD8", "CD25", "FOXP3", "CD16", "Viability"} <= set(a.var_names)
    assert list(a.uns["cytopipe"]["markers_left_out"]) == NOT_CARRIED
    stats = pd.read_parquet(cytof_run / "population_stats.parquet")
    cd4 = stats[stats["population"] == "CD4 T"].set_index("sample_id").sort_index()
    sid = a.obs["sample_id"].astype(str).to_numpy()
    assert pd.Series(sid).value_counts().sort_index().tolist() == cd4["count"].tolist()
    # X is compensated linear (no compensation on CyTOF): per-sample medians are the run's medians
    for s in ("S1", "S2"):
        got = np.median(a[sid == s, "CD4"].X)
        np.testing.assert_allclose(got, cd4.loc[s, "median_CD4"], rtol=1e-4)
    cd16 = a[:, "CD16"].X.ravel()
    assert np.isnan(cd16[sid == "S2"]).all() and np.isfinite(cd16[sid == "S1"]).all()
    assert np.isnan(a[:, "CD16"].layers["transformed"].ravel()[sid == "S2"]).all()
    assert a.var.loc["CD16", "channel"] == "Ho165Di"
    assert np.isfinite(a[:, "CD4"].layers["transformed"]).all()


def test_a_population_not_measured_in_a_sample_is_named(cytof_run, tmp_path):
    # CD56dim NK's gates need CD16, which S2's file lacks: 0 events for S2, said so
    proc = cli("export", "fcs", str(cytof_run), "--population", "CD56dim NK", "--out", str(tmp_path / "nk"),
               "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "population 'CD56dim NK' is not measured in S2" in proc.stdout
    assert cytopipe.read_fcs(tmp_path / "nk" / "S2.fcs").n_events == 0
    assert cytopipe.read_fcs(tmp_path / "nk" / "S1.fcs").n_events > 0


def test_samples_that_cannot_be_exported_are_listed_one_line_each(cytof_run, tmp_path):
    src = cytof_run.parent / "no_cd16.fcs"
    away = cytof_run.parent / "moved.fcs"
    shutil.move(src, away)
    try:
        out = tmp_path / "x.h5ad"
        only = cli("export", "anndata", str(cytof_run), "--population", "CD4 T", "--out", str(out),
                   "--samples", "S2", "--no-progress")  # fmt: skip
        both = cli("export", "anndata", str(cytof_run), "--population", "CD4 T", "--out", str(out),
                   "--no-progress")  # fmt: skip
    finally:
        shutil.move(away, src)
    assert only.returncode == 2 and not out.with_name("x.h5ad.tmp").exists()
    lines = only.stderr.strip().splitlines()
    assert "no sample could be exported:" in lines[0] and "{" not in only.stderr
    assert lines[1].startswith("  S2: file 'no_cd16.fcs': cannot open the file")
    assert both.returncode == 3 and out.exists()  # S1 exported, S2 listed
    assert "  failed  S2: file 'no_cd16.fcs': cannot open the file" in both.stdout


def test_a_long_marker_error_is_shortened_to_one_line():
    # the message that was printed once per sample, with the file's 55 channels
    with pytest.raises(PanelError) as info:
        resolve_markers(cytopipe.read_fcs(cytonorm("PTLG021_Unstim_Control_2")), ["CCR6"], file="a.fcs")
    assert "channels seen:" in str(info.value) and len(str(info.value)) > 1000
    short = _short_error(str(info.value))
    assert short.startswith("file 'a.fcs', marker 'CCR6': no channel carries marker 'CCR6'")
    assert "channels seen" not in short and "Nd145Di" not in short and len(short) <= 200
