"""Blinding as a property of the run folder: once blinded, every command that writes into the run
(report, cluster --retrain, export, the statistics of a rerun) writes only arm codes, until
`cytopipe unblind RUN --key ...` (logged in run.json)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from cytopipe.errors import ReportError
from tests.test_report import png_texts


def _arm_labels(trial: Path) -> list[str]:
    arms = pd.read_csv(trial / "manifest.csv", dtype=str, keep_default_na=False)["arm"]
    return sorted({a for a in arms if a})


def _texts_of(path: Path) -> list[str]:
    """Every piece of text a file holds, decoded by its kind."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = pd.read_parquet(path)
        out = [" ".join(map(str, df.columns))]
        for col in df.columns:
            if (
                df[col].dtype == object
                or pd.api.types.is_string_dtype(df[col])
                or str(df[col].dtype) == "category"
            ):
                out += [v for v in df[col].astype(str).unique()]
        return out
    if suffix == ".duckdb":
        con = duckdb.connect(str(path), read_only=True)
        try:
            out = []
            for (name,) in con.execute("select table_name from information_schema.tables").fetchall():
                out += [df.to_csv() for df in [con.execute(f'select * from "{name}"').df()]]
            return out
        finally:
            con.close()
    if suffix == ".h5ad":
        import anndata as ad

        a = ad.read_h5ad(path)
        return [
            a.obs.to_csv(),
            json.dumps(a.uns["cytopipe"], default=str),
            path.read_bytes().decode("latin-1"),
        ]
    if suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            return [str(z[k]) for k in z.files if z[k].dtype.kind in "US"]
    raw = path.read_bytes()
    out = [raw.decode("utf-8", errors="replace")]
    if suffix == ".html":
        import base64

        for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", out[0]):
            out += png_texts(base64.b64decode(data))
    if suffix == ".png":
        out += png_texts(raw)
    return out


def _leaks(root: Path, arms: list[str], since: float) -> dict[str, list[str]]:
    """{file: [arm labels]} for every file written under ``root`` at or after ``since``, the
    private cache .cache/ included."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path.stat().st_mtime < since:
            continue
        text = "\n".join(_texts_of(path)).lower()
        hit = [a for a in arms if a.lower() in text]
        if hit:
            found[str(rel)] = hit
    return found


@pytest.fixture()
def blinded_run(sim_run, sim_trial, tmp_path):
    from cytopipe.report import write_report

    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    write_report(run, blinded=True)
    return run


def test_every_command_writes_a_blinded_run_blinded(blinded_run, sim_trial, tmp_path):
    import time

    from cytopipe.export import export_anndata, export_fcs
    from cytopipe.pipeline import run_workflow
    from cytopipe.pipeline.cluster_command import cluster_run
    from cytopipe.report import write_report
    from tests.pipeline_support import workflow

    run = blinded_run
    arms = _arm_labels(sim_trial)
    assert len(arms) == 4
    # the act of blinding rewrote the whole folder: no arm label in any file of it
    assert _leaks(run, arms, since=0) == {}
    info = json.loads((run / "run.json").read_text())
    assert info["blinding"]["blinded"] and info["blinding"]["log"][-1]["action"] == "blinded"
    codes = set(info["blinding"]["codes"])
    assert set(pd.read_parquet(run / "population_stats.parquet")["arm"]) == codes

    walk = {}
    t = time.time() - 1
    write_report(run)  # no --blinded: the folder is blinded, so is its report
    walk["report"] = _leaks(run, arms, t)
    assert "Arm " in (run / "report.html").read_text()
    t = time.time() - 1
    result = cluster_run(run, retrain=True, scheduler="synchronous", progress=False)
    assert result.exit_code == 0, result.summary()
    walk["cluster --retrain"] = _leaks(run, arms, t)
    t = time.time() - 1
    export_anndata(run, "CD4 T", run / "exports" / "cd4.h5ad", scheduler="synchronous", progress=False,
                   max_events_per_sample=200)  # fmt: skip
    export_fcs(run, "Treg", run / "exports" / "treg", scheduler="synchronous", progress=False)
    walk["export"] = _leaks(run, arms, t)
    t = time.time() - 1
    wf = workflow(sim_trial, run, report={"enabled": True})  # a rerun: statistics, tables, report
    result = run_workflow(wf, scheduler="synchronous", progress=False)
    assert result.exit_code == 0, result.summary()
    walk["run (statistics)"] = _leaks(run, arms, t)
    assert walk == {k: {} for k in walk}
    assert _leaks(run, arms, since=0) == {}  # every file of the folder, .cache/ included
    # ... and the statistics are still computed against the reference arm (in memory, with the arms)
    st = pd.read_parquet(run / "statistics.parquet")
    assert st["comparison"].str.contains(" vs Arm ").any()
    assert json.loads((run / "run.json").read_text())["blinding"]["codes"] == info["blinding"]["codes"]


def test_unblind_needs_the_key_and_is_logged(blinded_run, sim_trial, sim_run, tmp_path):
    from cytopipe.cli import main

    run = blinded_run
    arms = _arm_labels(sim_trial)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"arm": arms, "code": ["Arm W", "Arm X", "Arm Y", "Arm Z"]}).to_csv(bad, index=False)
    from cytopipe.report.unblind import unblind_run

    with pytest.raises(ReportError, match="does not match"):
        unblind_run(run, bad)
    assert json.loads((run / "run.json").read_text())["blinding"]["blinded"]
    assert main(["unblind", str(run), "--key", str(sim_trial / "manifest.csv")]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["blinding"]["blinded"] is False
    assert [e["action"] for e in info["blinding"]["log"]] == ["blinded", "unblinded"]
    assert info["blinding"]["log"][-1]["key"] == "manifest.csv"
    # the tables are the run's own again
    pd.testing.assert_frame_equal(pd.read_parquet(run / "population_stats.parquet"),
                                  pd.read_parquet(sim_run / "population_stats.parquet"))  # fmt: skip
    a, b = pd.read_parquet(run / "statistics.parquet"), pd.read_parquet(sim_run / "statistics.parquet")
    assert list(a["comparison"].fillna("")) == list(b["comparison"].fillna(""))
    with pytest.raises(ReportError, match="not blinded"):
        unblind_run(run, sim_trial / "manifest.csv")
