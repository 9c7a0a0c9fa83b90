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


@pytest.fixture(scope="module")
def blinded_once(sim_run, tmp_path_factory):
    """The reference run blinded by `cytopipe report --blinded` (write_report), once for the module."""
    from cytopipe.report import write_report

    run = tmp_path_factory.mktemp("blinded") / "run"
    shutil.copytree(sim_run, run)
    write_report(run, blinded=True)
    return run


@pytest.fixture()
def blinded_run(blinded_once, tmp_path):
    """A copy of ``blinded_once`` for one test to change (file times kept: ``_leaks(since=...)``)."""
    run = tmp_path / "run"
    shutil.copytree(blinded_once, run)
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
    # the same tests, numbers and texts in the same order as the unblinded run wrote them: the
    # blinded folder listed each test's rows, and the arms in a text, in code order (dose order told
    # the codes' doses); unblinding puts them back in the run's order
    pd.testing.assert_frame_equal(pd.read_parquet(run / "statistics.parquet"),
                                  pd.read_parquet(sim_run / "statistics.parquet"))  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_parquet(run / "clusters.parquet"),
                                  pd.read_parquet(sim_run / "clusters.parquet"))  # fmt: skip
    with pytest.raises(ReportError, match="not blinded"):
        unblind_run(run, sim_trial / "manifest.csv")


def test_a_blinded_folder_lists_its_tests_in_code_order(sim_run, sim_trial, tmp_path):
    """statistics.parquet is computed in dose order ('0.2 MIU vs placebo', '0.5 MIU vs placebo',
    ...). Coded in place, as `cytopipe report --blinded` and a blinded run write it, that order told
    each code's dose (the report and its CSVs were already in code order). Codes given here in
    reverse dose order: every test's coded rows, and every list of codes, must come in code order,
    after blinding the folder and after a rerun that writes the statistics blinded."""
    from cytopipe.pipeline import run_workflow
    from cytopipe.report import write_report
    from tests.pipeline_support import workflow

    orig = pd.read_parquet(sim_run / "statistics.parquet")
    names = set(pd.read_parquet(sim_run / "population_stats.parquet")["arm"].dropna())
    pairs = [c.split(" vs ") for c in orig["comparison"].dropna() if " vs " in c]
    pairs = [pair for pair in pairs if set(pair) <= names]  # not 'responders vs non-responders'

    arms = list(dict.fromkeys(a for a, _ in pairs)) + [pairs[0][1]]  # dose order, reference last
    assert len(arms) == 4
    key = {a: f"Arm {'DCBA'[i]}" for i, a in enumerate(arms)}
    run = tmp_path / "run"
    shutil.copytree(sim_run, run)

    def in_code_order(table: pd.DataFrame) -> None:
        keys = [c for c in ("family", "population", "parent", "measure", "scale", "visit", "window", "endpoint",
                            "subgroup") if c in table.columns]  # fmt: skip
        coded = table[table["comparison"].fillna("").str.match(r"Arm [A-D] vs ")]
        assert len(coded) > 10
        for _, rows in coded.groupby(keys, sort=False, dropna=False):
            assert rows["comparison"].tolist() == sorted(rows["comparison"])
        for column in table.columns:
            for text in table[column].dropna().astype(str):
                for m in re.finditer(r"Arm [A-D](?:=\d+)?'?(?:, '?Arm [A-D](?:=\d+)?'?)+", text):
                    found = re.findall(r"Arm ([A-D])", m.group(0))
                    assert found == sorted(found), (column, text)

    write_report(run, blinded=True, blind_key=key)
    in_code_order(pd.read_parquet(run / "statistics.parquet"))
    result = run_workflow(workflow(sim_trial, run), scheduler="synchronous", progress=False)
    assert result.exit_code == 0, result.summary()
    in_code_order(pd.read_parquet(run / "statistics.parquet"))


def _visit_trial(seed: int = 7) -> pd.DataFrame:
    """A population table of 4 arms x 3 patients at weeks 0, 4 and 12 (two populations)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for a, arm in enumerate(["placebo", "IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU"]):
        for p in range(3):
            pid = f"P{a}{p}"
            for pop, base in (("Treg", 5.0), ("NK", 10.0)):
                level = base + rng.normal(0, 1)
                for visit in (0, 4, 12):
                    rows.append(dict(sample_id=f"{pid}_W{visit}", patient_id=pid, visit=visit, arm=arm,
                                     population=pop, parent="Live",
                                     pct_parent=level + a * visit / 6 + rng.normal(0, 0.5)))  # fmt: skip
    return pd.DataFrame(rows)


def test_blinding_hides_the_dose_order_of_every_test_and_unblinding_restores_the_run_order():
    """With several post-baseline visits the mixed model's rows come arm by arm (every visit of
    one arm, then the next arm), and the per-arm logistic/subgroup rows each form a test of their
    own: coded in place, their order told the codes' doses. Every test's coded rows must come in
    code order whatever the key, and unblinding must give back the table the run wrote."""
    from cytopipe.report.blinding import blind_frame, hide_arm_order, in_run_order, unblind_frame
    from cytopipe.stats import run_statistics

    table = run_statistics(_visit_trial(), None, {"families": ["arm_visit", "dose_trend", "mixed_arm_visit",
                                                               "mixed_arm"]})  # fmt: skip
    arms = ["placebo", "IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU"]  # dose order
    mixed = table[table["family"] == "mixed_arm_visit"]
    assert mixed["visit"].nunique() == 2 and mixed["estimate"].notna().all()
    info = {"workflow": {"statistics": {"reference_arm": "placebo", "arm_doses": None}}}
    for letters in ("DCBA", "ABCD", "BDAC"):
        codes = {a: f"Arm {c}" for a, c in zip(arms, letters)}
        blinded = hide_arm_order(blind_frame(table, codes), codes)
        keys = ["family", "population", "measure", "scale", "visit"]
        coded = blinded[blinded["comparison"].str.match(r"Arm [A-D] vs ")]
        for _, rows in coded.groupby(keys, sort=False, dropna=False):
            assert rows["comparison"].tolist() == sorted(rows["comparison"]), letters
        # the mixed model's arms, in the order the rows name them: code order
        order = list(dict.fromkeys(blinded.loc[blinded["family"] == "mixed_arm_visit", "comparison"]))
        assert order == sorted(order), (letters, order)
        for text in blinded["n_detail"].dropna():
            found = re.findall(r"Arm ([A-D])=", text)
            assert found == sorted(found), (letters, text)
        back = in_run_order(unblind_frame(blinded, codes), codes, info)
        pd.testing.assert_frame_equal(back, table)


@pytest.mark.slow  # default suite: test_every_command_writes_a_blinded_run_blinded checks every file of a blinded folder, .cache/ included
def test_blinding_a_folder_keeps_none_of_its_unblinded_figure_cache(sim_run, tmp_path):
    """The report's figure cache (.cache/report-figures) names each figure by a hash of the data it
    was drawn from: before blinding that data holds the arms, so one guess per arm could match an
    entry even where the figure shows no arm. Blinding the folder drops every such entry."""
    import os
    import time

    from cytopipe.report import write_report

    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    write_report(run)  # unblinded: its figures are cached
    cache = run / ".cache" / "report-figures"
    old = sorted(p for p in cache.rglob("*") if p.is_file())
    assert old, "the unblinded run's report cached its figures"
    past = time.time() - 1000
    for p in old:
        os.utime(p, (past, past))
    write_report(run, blinded=True)
    kept = [p.name for p in cache.rglob("*") if p.is_file() and p.stat().st_mtime <= past + 1]
    assert kept == []
    write_report(run)  # the folder is blinded now: its next report caches its (coded) figures
    assert any(p.is_file() for p in cache.rglob("*"))
