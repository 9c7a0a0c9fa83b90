"""`cytopipe export`: a population's events, re-processed on the workers exactly as the run did."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cytopipe.errors import StoreError, TemplateError
from cytopipe.export import export_anndata, export_fcs
from cytopipe.fcs import read_fcs
from tests.pipeline_support import cli, read_outputs


def population_counts(run, population):
    stats = read_outputs(run)["population_stats"]
    return stats[stats["population"] == population].set_index("sample_id")["count"].sort_index()


def test_anndata_export_matches_population_stats(sim_run, sim_trial, tmp_path):
    out = tmp_path / "cd4.h5ad"
    report = export_anndata(sim_run, "CD4 T", out, workers=2, progress=False)
    assert not report.failed
    a = ad.read_h5ad(out)
    counts = a.obs["sample_id"].value_counts().sort_index()
    expected = population_counts(sim_run, "CD4 T")
    assert counts.astype(int).tolist() == expected.tolist()
    assert list(counts.index) == list(expected.index)
    # readfcs/pytometry layout: markers as var, sample metadata in obs, float32 matrices
    assert {"CD4", "CD8", "CD25", "FOXP3", "FSC-A"} <= set(a.var_names)
    assert a.var.loc["CD4", "channel"] == "BV605-A" and a.var.loc["FSC-A", "signal_type"] == "area"
    assert {"sample_id", "patient_id", "visit", "arm", "batch", "event"} <= set(a.obs.columns)
    assert a.X.dtype == np.float32 and a.layers["transformed"].shape == a.X.shape
    assert a.uns["cytopipe"]["population"] == "CD4 T"
    # X is compensated linear: per-sample medians equal the run's median_CD4 of CD4 T
    stats = read_outputs(sim_run)["population_stats"]
    med = stats[stats["population"] == "CD4 T"].set_index("sample_id")["median_CD4"].sort_index()
    got = pd.Series(a[:, "CD4"].X.ravel(), index=a.obs["sample_id"].astype(str)).groupby(level=0).median()
    np.testing.assert_allclose(got.sort_index().to_numpy(), med.to_numpy(), rtol=1e-4)
    # the transformed layer is the template's display scale (arcsinh, cofactor 150)
    spec = json.loads(a.var.loc["CD4", "transform"])
    assert spec["type"] == "arcsinh"
    np.testing.assert_allclose(
        a[:, "CD4"].layers["transformed"].ravel(),
        np.arcsinh(a[:, "CD4"].X.ravel() / spec["cofactor"]),
        rtol=1e-5,
    )
    # `event` indexes the original FCS file: its raw row, compensated, is the exported row
    from cytopipe.compensation import compensate

    first = a.obs["sample_id"].astype(str).iloc[0]
    sub = a[a.obs["sample_id"].astype(str) == first]
    src = read_fcs(sim_trial / "fcs" / f"{first}.fcs")
    rows = src.events[sub.obs["event"].to_numpy()]
    comp = compensate(rows, src.spillover, list(src.channels["pnn"]))
    j = list(src.channels["pnn"]).index("BV605-A")
    np.testing.assert_allclose(sub[:, "CD4"].X.ravel(), comp[:, j], rtol=1e-5, atol=1e-3)


def test_subsample_and_selected_samples(sim_run, tmp_path):
    out = tmp_path / "treg.h5ad"
    report = export_anndata(
        sim_run, "T cells", out, samples=["P001_W00", "P002_W04"], max_events_per_sample=100,
        scheduler="synchronous", progress=False,
    )  # fmt: skip
    a = ad.read_h5ad(out)
    assert report.counts == {"P001_W00": 100, "P002_W04": 100}
    assert a.n_obs == 200
    again = tmp_path / "again.h5ad"
    export_anndata(
        sim_run, "T cells", again, samples=["P002_W04", "P001_W00"], max_events_per_sample=100,
        scheduler="synchronous", progress=False,
    )  # fmt: skip
    b = ad.read_h5ad(again)
    assert (a.obs_names == b.obs_names).all() and np.array_equal(a.X, b.X)  # seeded: same events


def test_fcs_export_writes_each_samples_raw_population_events(sim_run, sim_trial, tmp_path):
    out = tmp_path / "treg"
    report = export_fcs(sim_run, "Treg", out, workers=2, progress=False)
    expected = population_counts(sim_run, "Treg")
    assert report.counts == {k: int(v) for k, v in expected.items()}
    for sid, n in expected.items():
        s = read_fcs(out / f"{sid}.fcs")
        assert s.n_events == n
        assert s.keywords["CYTOPIPE_POPULATION"] == "Treg"
        src = read_fcs(sim_trial / "fcs" / f"{sid}.fcs")
        assert list(s.channels["pnn"]) == list(src.channels["pnn"])
        np.testing.assert_array_equal(s.spillover.matrix, src.spillover.matrix)
        # raw values: every exported event is a row of the source file
        rows = {tuple(r) for r in src.events[:, :4].tolist()}
        assert all(tuple(r) in rows for r in s.events[:, :4].tolist())


def test_export_errors(sim_run, tmp_path):
    with pytest.raises(TemplateError, match="did you mean 'CD4 T'"):
        export_anndata(sim_run, "CD4T", tmp_path / "x.h5ad", scheduler="synchronous", progress=False)
    with pytest.raises(StoreError, match="not among the run's ok/flagged samples"):
        export_fcs(sim_run, "Treg", tmp_path / "o", samples=["nope"], scheduler="synchronous", progress=False)
    with pytest.raises(StoreError, match="not a finished cytopipe run"):
        export_fcs(tmp_path, "Treg", tmp_path / "o", scheduler="synchronous", progress=False)
    proc = cli("export", "anndata", str(sim_run), "--population", "Tregs", "--out", str(tmp_path / "y.h5ad"))
    assert proc.returncode == 2 and "did you mean 'Treg'" in proc.stderr
