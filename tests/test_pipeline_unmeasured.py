"""Markers and populations not measured in some or every file, through `cytopipe run`.

CytoNorm's six CyTOF files (3 patients x 2 visits, 1,000 events each) gated with the mass-cytometry
template and `missing_markers: skip`: the panel has no CCR6, CXCR5, PD-1 nor CD127, so Th17, Th1,
cTfh and activated cTfh are not measured in any sample and CD127 (only in the template's `medians:`)
is in no file. Three files are written again with their CCR9 channel labelled CD127 (CD127 measured
in some files only). A second study (no clustering) also drops the CD45RA label of both files of
patient PTLG034: Memory CD4 and everything below it are not measured in those two samples only.

Found by a new user: the report was never written (an all-NaN Levey-Jennings panel: "Axis limits
cannot be NaN or Inf", a RuntimeWarning on stderr), and clustering trained a model but mapped no
sample (every sample was asked for CD127). Each test here failed on that code.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cytopipe.arrowfiles import read_arrow
from cytopipe.fcs import read_fcs, write_fcs
from tests.conftest import REPO, shared_path
from tests.pipeline_support import cli

CD127_SAMPLES = ["PTLG021_1", "PTLG028_1", "PTLG034_1"]  # CCR9's channel labelled CD127
NO_CD45RA = ["PTLG034_1", "PTLG034_2"]  # Memory CD4 and its descendants not measured (second study)
EVERYWHERE = ["Th17", "Th1", "cTfh", "activated cTfh"]  # CCR6, CXCR5 are in no file
CLUSTERING = {"enabled": True, "grid": [4, 4], "metaclusters": 5, "embedding": {"enabled": False}}


def _as_older_entry(part: Path, table: pd.DataFrame) -> None:
    """Make the cache entry holding the table part ``part`` (``<key>.<name>.arrow``) one that an
    older version wrote: ``table`` as that part, in Parquet (the format of those versions)."""
    key, name, _ = part.name.split(".")
    meta_path = part.with_name(f"{key}.json")
    meta = json.loads(meta_path.read_text())
    meta["_parts"][name] = "parquet"
    table.to_parquet(part.with_suffix(".parquet"), index=False)
    part.unlink()
    meta_path.write_text(json.dumps(meta))


def _study(folder: Path, no_cd45ra: list[str], clustering: dict, statistics: bool) -> Path:
    """The manifest (files in place, or written again relabelled) and the workflow."""
    rows = []
    for path in sorted(shared_path("CytoNorm", "inst", "extdata").glob("Gates_*.fcs")):
        patient, *_, visit = path.stem.removeprefix("Gates_").split("_")
        sample_id = f"{patient}_{visit}"
        if sample_id in CD127_SAMPLES or sample_id in no_cd45ra:
            sample = read_fcs(path)
            channels = sample.channels.copy()
            if sample_id in CD127_SAMPLES:
                channels.loc[channels["pns"] == "CCR9", "pns"] = "CD127"
            if sample_id in no_cd45ra:
                channels.loc[channels["pns"] == "CD45RA", "pns"] = ""
            path = write_fcs(folder / path.name, sample.events, channels, keywords=sample.keywords)
        arm = "placebo" if patient == "PTLG028" else "IL-2"
        rows.append(dict(file=str(path), sample_id=sample_id, patient_id=patient, visit=4 * (int(visit) - 1),
                         arm=arm, batch=f"B{visit}"))  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    workflow = {
        "study": "cytof not measured",
        "manifest": "manifest.csv",
        "template": str(REPO / "gating" / "sle_il2_cytof.yaml"),
        "missing_markers": "skip",
        "clustering": clustering,
        "statistics": {"enabled": statistics},  # without a clinical table: "auto" is off
    }
    (folder / "workflow.yaml").write_text(yaml.safe_dump(workflow, sort_keys=False), encoding="utf-8")
    return folder / "workflow.yaml"


def _run(folder: Path, no_cd45ra: list[str], clustering: dict, statistics: bool = False) -> tuple[Path, Any]:
    """`cytopipe run` of the study in ``folder`` (one process, no Dask: the files are tiny)."""
    workflow = _study(folder, no_cd45ra, clustering, statistics)
    out = folder / "run"
    return out, cli("run", str(workflow), "--out", str(out), "--scheduler", "synchronous", "--no-progress")


@pytest.fixture(scope="module")
def cytof_run(tmp_path_factory):
    """(run folder, the `cytopipe run` process): the default clustering markers."""
    return _run(tmp_path_factory.mktemp("cytof-unmeasured"), [], CLUSTERING)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """(run folder, process): CD45RA not in two files too; no clustering; the run's statistics (the
    other study's report computes its own)."""
    return _run(tmp_path_factory.mktemp("cytof-mixed"), NO_CD45RA, {"enabled": False}, statistics=True)


def test_every_sample_is_clustered_and_medians_of_missing_markers_are_nan(cytof_run, tmp_path):
    out, proc = cytof_run
    info = json.loads((out / "run.json").read_text())
    assert not [p for p in info["problems"] if p.startswith("clustering")], info["problems"]
    clusters = pd.read_parquet(out / "clusters.parquet")
    samples = sorted(pd.read_csv(out.parent / "manifest.csv")["sample_id"])
    assert sorted(clusters["sample_id"].unique()) == samples
    assert len(clusters) == 6 * 5 and clusters["count"].sum() > 1000
    # CD127 is measured in three files: their medians are numbers, the others' NaN (as in population_stats)
    filled = clusters[clusters["count"] > 0].groupby("sample_id")["median_CD127"]
    assert sorted(s for s, v in filled if v.notna().all()) == CD127_SAMPLES
    assert sorted(s for s, v in filled if v.isna().all()) == sorted(set(samples) - set(CD127_SAMPLES))
    ps = pd.read_parquet(out / "population_stats.parquet")
    live = ps[(ps["population"] == "Live")].set_index("sample_id")["median_CD127"]
    assert sorted(live[live.notna()].index) == CD127_SAMPLES
    # a marker in no file has no median column (here a gate marker the template gates Th17 on)
    assert "median_CCR6" not in clusters.columns and "median_CD3" in clusters.columns
    assert "(clusters, report.html)" in proc.stdout
    step = next(s for s in info["steps"] if s["step"] == "clustering-map")
    assert step["samples"] == 6 and step["from_gating"] == 6  # the gating pass wrote every sample's inputs

    # `cytopipe cluster` maps every file again by reading and gating it (no inputs from the gating
    # pass): the same table, the same median columns
    again = tmp_path / "again"
    shutil.copytree(out, again)
    proc2 = cli("cluster", str(again), "--scheduler", "synchronous", "--no-progress", "--no-report")
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(again / "clusters.parquet"), clusters)


def test_no_clusters_are_advertised_when_no_sample_could_be_mapped(cytof_run, tmp_path):
    """The frozen model of the first study (CD45RA among its markers) on files that all lack CD45RA."""
    out, _ = cytof_run
    everyone = sorted(pd.read_csv(out.parent / "manifest.csv")["sample_id"])
    model = {"enabled": True, "model": str(out / "clustering" / "model.npz"), "embedding": {"enabled": False}}
    run, proc = _run(tmp_path, everyone, model)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    problems = json.loads((run / "run.json").read_text())["problems"]
    assert sum("clustering (mapping): sample" in p and "CD45RA" in p for p in problems) == 6
    assert "clustering: no sample could be mapped onto the model (see above); no clusters" in problems
    assert not (run / "clusters.parquet").exists() and not list((run / "clustering").glob("*.parquet"))
    assert f"results: {run} (report.html)\n" in proc.stdout  # no clusters among the results


def _report_checks(out: Path, proc) -> str:
    """The run's report was written without a warning; its page."""
    assert proc.returncode == 0, proc.stdout + proc.stderr  # samples flagged, no failure, no problem
    assert "warning" not in proc.stderr.lower(), proc.stderr
    assert "report.html" in proc.stdout
    html = (out / "report.html").read_text(encoding="utf-8")
    for figure in ("levey-jennings", "dynamics", "dynamics-change", "gate-cd4-t-0", "gate-nk-0"):
        assert f'<figure id="fig-{figure}">' in html, figure
    return html


def test_report_is_written_with_populations_not_measured_anywhere(cytof_run):
    out, proc = cytof_run
    html = _report_checks(out, proc)
    assert "Not measured in any sample: Th17 (marker CCR6 is not in the file); Th1 (marker CCR6" in html
    assert (
        "Not charted, no frequency in any sample (e.g. not measured): Th17, Th1, cTfh, activated cTfh."
        in html
    )
    tables = out / "report_tables"
    nm = pd.read_csv(tables / "not_measured.csv").set_index("population")
    assert list(nm.index) == EVERYWHERE and (nm["samples_not_measured"] == 6).all()
    # not measured is a missing value, never 0%: no such row in the frequencies or the tests
    for name in ("dynamics_per_sample", "dynamics_by_arm", "model_joint_tests"):
        table = pd.read_csv(tables / f"{name}.csv")
        assert len(table) and not table["population"].isin(EVERYWHERE).any(), name
    review = pd.read_csv(tables / "gate_review.csv")
    unmeasured = review["population"].isin(EVERYWHERE)
    assert unmeasured.sum() == 4 * 6 and not review.loc[unmeasured, ["flagged", "outlier"]].any().any()
    assert review.loc[~unmeasured, "pct_parent"].notna().any()

    # the report again from the run folder: no warning, no traceback
    proc = cli("report", str(out), "--rebuild")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_report_is_written_with_a_population_not_measured_in_some_samples(mixed_run):
    out, proc = mixed_run
    html = _report_checks(out, proc)
    assert "Not measured in some samples: Memory CD4 in 2 of 6 (marker CD45RA is not in the file)" in html
    assert '<figure id="fig-gate-memory-cd4-0">' in html
    tables = out / "report_tables"
    nm = pd.read_csv(tables / "not_measured.csv").set_index("population")
    assert list(nm.index) == ["Memory CD4", *EVERYWHERE]
    assert nm.loc["Memory CD4", "samples_not_measured"] == 2
    per_sample = pd.read_csv(tables / "dynamics_per_sample.csv")
    memory = per_sample[per_sample["population"] == "Memory CD4"]
    assert sorted(memory["sample_id"]) == sorted(set(per_sample["sample_id"]) - set(NO_CD45RA))
    assert memory["pct_parent"].notna().all()
    statistics = pd.read_parquet(out / "statistics.parquet")  # the run's: the report shows them
    assert not statistics["population"].isin(EVERYWHERE).any()
    mixed = statistics[
        (statistics["population"] == "Memory CD4") & (statistics["family"] == "mixed_arm_visit")
    ]
    # patients PTLG021 and PTLG028 (PTLG034's Memory CD4 is not measured): one per arm, too few to
    # fit (`n` counts the patients fitted: 0, since the mixed model leaves thin cells out)
    assert len(mixed) and mixed["n_detail"].str.startswith("IL-2=1, placebo=1;").all(), mixed["n_detail"]
    assert (mixed["n"] == 0).all() and mixed["note"].str.contains("too few patients").all()
    assert statistics["population"].nunique() == 15 - len(EVERYWHERE)
    review = pd.read_csv(tables / "gate_review.csv")
    memory = review[review["population"] == "Memory CD4"].set_index("sample_id")
    assert not memory.loc[NO_CD45RA, ["flagged", "outlier"]].any().any()
    # the frequencies where it is measured are compared among themselves (no 0% "outlier" from a gap)
    assert memory.drop(index=NO_CD45RA)["pct_parent"].between(1, 100).all()


def test_an_internal_error_of_the_report_step_leaves_its_traceback_in_the_log(cytof_run, tmp_path, caplog):
    """A report that fails on a bug is a run problem (the tables stand) whose traceback goes to the
    log (run.log in `cytopipe run`). Here: a population table without `pct_parent`, which the report
    does not expect."""
    from cytopipe.pipeline.runner import write_run_report
    from cytopipe.workflow import load_workflow

    out, _ = cytof_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("report*", ".cache"))
    ps = pd.read_parquet(folder / "population_stats.parquet")
    ps.drop(columns="pct_parent").to_parquet(folder / "population_stats.parquet")
    problems: list[str] = []
    with caplog.at_level(logging.ERROR, logger="cytopipe"):
        step = write_run_report(folder, load_workflow(out.parent / "workflow.yaml"), problems, progress=False)
    assert step["written"] is False and problems and "internal error KeyError" in problems[0]
    records = [r for r in caplog.records if r.exc_info and r.name == "cytopipe.pipeline.runner"]
    assert records and records[0].exc_info[0] is KeyError
    assert "Traceback" in caplog.text and "pct_parent" in caplog.text


def _old_style(ps: pd.DataFrame) -> pd.DataFrame:
    """The table as versions before 2026-12-05 wrote it: a not-measured population had count 0 (and
    parent count 0 under a parent not measured either)."""
    old = ps.copy()
    unmeasured = old["gate_source"] == "not measured"
    for column in ("count", "parent_count"):
        old[column] = old[column].fillna(0).astype("int64")
    assert (old.loc[unmeasured, "count"] == 0).all()
    return old


def test_a_population_not_measured_has_no_count_in_any_output(mixed_run, tmp_path):
    """Not measured is a missing count, parent count (when the parent is not measured either) and
    interval, never 0 events with an empty gate's interval: in population_stats.parquet, the
    catalog, the CSV download of `cytopipe serve`; the measured rows keep their integer counts. A
    rerun over per-sample results cached by older versions (they stored 0) writes the same table."""
    import duckdb

    from cytopipe.serve.results import csv_download

    out, proc = mixed_run
    assert proc.returncode == 0, proc.stderr
    ps = pd.read_parquet(out / "population_stats.parquet")
    assert str(ps["count"].dtype) == "Int64" and str(ps["parent_count"].dtype) == "Int64"
    unmeasured = ps["gate_source"] == "not measured"
    keys = set(zip(ps.loc[unmeasured, "sample_id"], ps.loc[unmeasured, "population"]))
    parent_unmeasured = pd.Series(
        [(s, p) in keys for s, p in zip(ps["sample_id"], ps["parent"])], index=ps.index
    )
    assert unmeasured.sum() == 4 * 6 + 2  # Th17, Th1, cTfh, activated cTfh everywhere; Memory CD4 twice
    assert ps.loc[unmeasured, "count"].isna().all() and ps.loc[~unmeasured, "count"].notna().all()
    assert ps["parent_count"].isna().equals(parent_unmeasured)  # e.g. activated cTfh (of cTfh)
    memory = ps[(ps["population"] == "Memory CD4") & ps["sample_id"].isin(NO_CD45RA)]
    assert (memory["parent_count"] > 0).all()  # CD4 T is measured there: its count stands
    for column in ("pct_parent", "pct_parent_ci_low", "pct_parent_ci_high"):
        assert ps.loc[unmeasured, column].isna().all(), column
        assert ps.loc[~unmeasured & (ps["parent_count"] > 0), column].notna().all(), column
    assert not ps.loc[unmeasured & parent_unmeasured, "low_parent_count"].any()

    with duckdb.connect(str(out / "catalog.duckdb"), read_only=True) as db:
        nulls = db.execute("select count(*) from population_stats where count is null").fetchone()[0]
        zeros = db.execute(
            "select count(*) from population_stats where gate_source = 'not measured' and count = 0"
        ).fetchone()[0]
    assert (nulls, zeros) == (int(unmeasured.sum()), 0)
    csv = pd.read_csv(io.BytesIO(csv_download(out, "population_stats.csv")))
    assert csv["count"].isna().equals(unmeasured) and (csv.loc[~unmeasured, "count"] % 1 == 0).all()

    # per-sample results cached by an older version (count 0): the rerun's table has no 0 either
    again = tmp_path / "run"
    shutil.copytree(out, again)
    for part in (again / ".cache").glob("*/*.stats.arrow"):
        old = read_arrow(part)
        if "gate_source" in old and (old["gate_source"] == "not measured").any():
            _as_older_entry(part, _old_style(old))
    _old_style(ps).to_parquet(again / "population_stats.parquet", index=False)
    workflow = out.parent / "workflow.yaml"
    rerun = cli("run", str(workflow), "--out", str(again), "--scheduler", "synchronous", "--no-progress")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    info = json.loads((again / "run.json").read_text())
    assert info["cached_samples"] == 6  # nothing was gated again
    pd.testing.assert_frame_equal(pd.read_parquet(again / "population_stats.parquet"), ps)


def test_no_fold_change_from_or_to_a_value_not_measured(mixed_run):
    """baseline_change on the study's table, and on the table as older versions wrote it (count 0
    for a population not measured, so % of parent NaN beside event counts): the change and the
    log2 fold change of Memory CD4 of patient PTLG034 (not measured at either visit) are missing,
    never the fold change of an empty gate; the measured patients' are numbers."""
    from cytopipe.stats import baseline_change

    out, _ = mixed_run
    ps = pd.read_parquet(out / "population_stats.parquet")
    for table in (ps, _old_style(ps)):
        dyn = baseline_change(table).set_index(["population", "patient_id", "visit"])
        memory = dyn.loc["Memory CD4"]
        assert memory.loc["PTLG034", ["change", "log2fc"]].isna().all().all()
        assert memory.drop(index="PTLG034").loc[(slice(None), 4), ["change", "log2fc"]].notna().all().all()
        assert dyn.loc[EVERYWHERE, ["change", "log2fc"]].isna().all().all()


def _old_style_review(review: pd.DataFrame) -> pd.DataFrame:
    """The gate-review table as versions before 2026-12-06 wrote it: count 0 for a population not
    measured (and parent count 0 under a parent not measured either)."""
    old = review.copy()
    for column in ("count", "parent_count"):
        old[column] = old[column].fillna(0).astype("int64")
    return old


def test_gate_review_has_no_count_for_a_population_not_measured(mixed_run, tmp_path):
    """gate_review.parquet (the review data of the report and `cytopipe serve`) holds what
    population_stats holds for a population not measured: a missing count (and parent count under
    a parent not measured), never 0 events; the report's gate_review.csv has no outlier score for it
    (no number was compared, not "0, not outlying"). A table or per-sample results written by older
    versions (count 0) read and assemble to the same table."""
    from cytopipe.report.gate_review import read_gate_review

    out, proc = mixed_run
    assert proc.returncode == 0, proc.stderr
    ps = pd.read_parquet(out / "population_stats.parquet")
    review = pd.read_parquet(out / "gate_review.parquet")
    assert str(review["count"].dtype) == "Int64" and str(review["parent_count"].dtype) == "Int64"
    unmeasured = review["source"] == "not measured"
    assert unmeasured.sum() == 4 * 6 + 2
    assert review.loc[unmeasured, "count"].isna().all() and review.loc[~unmeasured, "count"].notna().all()
    # the same counts as population_stats, missing where it has none (e.g. activated cTfh of cTfh)
    keyed = review[review["panel"] == 0].merge(ps, on=["sample_id", "population"], suffixes=("", "_ps"))
    assert len(keyed) == len(ps)
    for column in ("count", "parent_count"):
        assert keyed[column].isna().equals(keyed[f"{column}_ps"].isna()), column
        both = keyed[column].notna()
        assert (keyed.loc[both, column] == keyed.loc[both, f"{column}_ps"]).all(), column
    # a parent not measured: activated cTfh (of cTfh) everywhere, Th17, Th1, cTfh in two samples
    assert keyed["parent_count"].isna().sum() == 6 + 2 * 3
    memory = keyed[(keyed["population"] == "Memory CD4") & keyed["sample_id"].isin(NO_CD45RA)]
    assert (memory["parent_count"] > 0).all()  # CD4 T is measured there

    csv = pd.read_csv(out / "report_tables" / "gate_review.csv")
    gone = [(s, p) in set(zip(ps.loc[ps["gate_source"] == "not measured", "sample_id"],
                              ps.loc[ps["gate_source"] == "not measured", "population"]))
            for s, p in zip(csv["sample_id"], csv["population"])]  # fmt: skip
    gone = pd.Series(gone, index=csv.index)
    assert gone.sum() == 4 * 6 + 2
    assert csv.loc[gone, ["pct_parent", "score"]].isna().all().all()
    assert csv.loc[~gone, "score"].notna().all()

    # a run folder of an older version (0 events stored): read as missing
    old = tmp_path / "old"
    old.mkdir()
    _old_style_review(review).to_parquet(old / "gate_review.parquet", index=False)
    pd.testing.assert_frame_equal(read_gate_review(old), read_gate_review(out))

    # per-sample review rows cached by an older version: the rerun writes the same table
    again = tmp_path / "run"
    shutil.copytree(out, again)
    touched = 0
    for part in (again / ".cache").glob("*/*.review.arrow"):
        rows = read_arrow(part)
        if (rows["source"] == "not measured").any():
            _as_older_entry(part, _old_style_review(rows))
            touched += 1
    assert touched >= 6  # every sample (the fitting pass may cache its own too)
    rerun = cli("run", str(out.parent / "workflow.yaml"), "--out", str(again), "--scheduler", "synchronous",
                "--no-progress")  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert json.loads((again / "run.json").read_text())["cached_samples"] == 6
    pd.testing.assert_frame_equal(pd.read_parquet(again / "gate_review.parquet"), review)


@pytest.mark.slow  # default suite: test_every_sample_is_clustered_and_medians_of_missing_markers_are_nan
def test_clusters_of_a_population_not_measured_have_no_count(tmp_path):
    """Clustering Memory CD4 (on markers every file has) in the study where two files lack CD45RA:
    those samples map no event because Memory CD4 is not measured there; their metaclusters have
    a missing count and parent count in clusters.parquet (as Memory CD4 in population_stats), not
    0 of 0 events; `cytopipe cluster` writes the same table; the report is written."""
    clustering = {"enabled": True, "population": "Memory CD4", "markers": ["CD3", "CD4", "CD8", "CD25", "FOXP3"],
                  "grid": [3, 3], "metaclusters": 3, "embedding": {"enabled": False}}  # fmt: skip
    out, proc = _run(tmp_path, NO_CD45RA, clustering)
    assert proc.returncode == 0 and "warning" not in proc.stderr.lower(), proc.stdout + proc.stderr
    clusters = pd.read_parquet(out / "clusters.parquet")
    assert str(clusters["count"].dtype) == "Int64" and str(clusters["parent_count"].dtype) == "Int64"
    absent = clusters["sample_id"].isin(NO_CD45RA)
    assert absent.sum() == 2 * 3 and len(clusters) == 6 * 3
    assert clusters.loc[absent, ["count", "parent_count", "pct_parent"]].isna().all().all()
    assert clusters.loc[absent, ["pct_parent_ci_low", "pct_parent_ci_high"]].isna().all().all()
    assert (clusters.loc[~absent, "count"] >= 0).all() and (clusters.loc[~absent, "parent_count"] > 0).all()
    ps = pd.read_parquet(out / "population_stats.parquet")
    memory = ps[ps["population"] == "Memory CD4"].set_index("sample_id")["count"]
    totals = clusters[~absent].groupby("sample_id")["count"].sum()
    assert (totals == memory[totals.index]).all()  # every Memory CD4 event in one metacluster

    again = tmp_path / "again"
    shutil.copytree(out, again)
    proc2 = cli("cluster", str(again), "--scheduler", "synchronous", "--no-progress", "--no-report")
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(again / "clusters.parquet"), clusters)
