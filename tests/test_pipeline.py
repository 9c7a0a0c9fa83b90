"""`cytopipe run` end to end: real files, a real Dask LocalCluster of processes, real DuckDB.

One small simulated trial (4 patients x 2 visits, 5000 events, one clog, one signal shift,
one margin pile-up; a seed the gating template was not tuned on) is run in-process without
Dask as the reference; every other way of running it must give the same tables. The runs on
Dask workers (killed workers, kill -9, Ctrl-C, the executor) are in tests/test_pipeline_workers.py.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from cytopipe.errors import WorkflowError
from cytopipe.pipeline import EXIT_FAILURES, EXIT_OK, run_workflow
from tests.pipeline_support import (
    REPO,
    TEMPLATE,
    TRIAL,
    assert_same_outputs,
    cli,
    copy_trial,
    drop_marker,
    pct_errors,
    read_outputs,
    truncate_fcs,
    truth_table,
    workflow,
)


# --------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------
def test_run_folder_contents(sim_run, sim_trial):
    out = read_outputs(sim_run)
    stats, samples = out["population_stats"], out["samples"]
    n_samples = TRIAL["n_patients"] * len(TRIAL["visits"])
    assert (samples["control"].fillna("") == "").sum() == n_samples
    assert set(samples.loc[samples["control"].fillna("") == "", "status"]) <= {"ok", "flagged"}
    assert samples["sha256"].str.len().eq(64).all()
    # one row per sample and canonical population, sorted, with the contract columns first
    assert len(stats) == n_samples * 17  # the template's 17 populations (15 canonical + NK's two halves)
    assert not stats.duplicated(["sample_id", "population"]).any()
    assert list(stats.columns[:9]) == [
        "sample_id", "patient_id", "visit", "arm", "population", "parent", "count", "parent_count", "pct_parent",
    ]  # fmt: skip
    assert stats["sample_id"].is_monotonic_increasing
    assert {"median_CD25", "pct_parent_ci_low", "pct_parent_ci_high", "low_parent_count"} <= set(
        stats.columns
    )
    lo, hi, p = stats["pct_parent_ci_low"], stats["pct_parent_ci_high"], stats["pct_parent"]
    assert ((lo <= p) & (p <= hi)).all()
    assert (stats["low_parent_count"] == (stats["parent_count"] < 100)).all()
    info = json.loads((sim_run / "run.json").read_text())
    assert info["study"] and info["seed"] == 0 and info["versions"]["dask"]
    assert {"template", "qc", "compensation", "transforms", "pooled"} <= set(info["hashes"])
    assert [s["step"] for s in info["steps"]][:6] == [
        "register", "compensation", "transforms", "gating-fit", "gating", "assemble",
    ]  # fmt: skip
    assert info["workflow"]["qc"]["time"]["mad"] == 6.0
    assert (sim_run / "study" / "gate_fits.parquet").is_file()
    assert [s["step"] for s in info["steps"]][6:] == [
        "clustering-train",
        "clustering-map",
        "statistics",
        "clustering-umap",
    ]
    assert info["problems"] == []


def test_gate_review_statistics_and_clusters_are_in_the_run_folder(sim_run):
    from cytopipe.report import read_gate_review
    from cytopipe.stats import COLUMNS
    from cytopipe.store import query

    stats = read_outputs(sim_run)["population_stats"]
    # gate review: every sample x population (x panel), sorted by sample, counts equal to population_stats
    review = read_gate_review(sim_run)
    assert review["sample_id"].is_monotonic_increasing
    first = review.drop_duplicates(["sample_id", "population"])
    assert len(first) == len(stats)
    m = first.merge(stats, on=["sample_id", "population"], suffixes=("", "_ps"))
    assert (m["count"] == m["count_ps"]).all() and (m["parent_count"] == m["parent_count_ps"]).all()
    # statistics of the gated populations and (families cluster_*) of the metaclusters, with the clinical tests
    st = pd.read_parquet(sim_run / "statistics.parquet")
    assert list(st.columns) == list(COLUMNS)
    families = set(st["family"])
    assert {"arm_visit", "mixed_arm_visit", "response_rate", "correlation"} <= families
    assert {"cluster_arm_visit", "cluster_mixed_arm_visit", "cluster_correlation"} <= families
    assert "cluster_response_rate" not in families  # clinical-only tests are not repeated
    assert set(st.loc[st["family"] == "arm_visit", "population"]) == set(stats["population"])
    clusters = pd.read_parquet(sim_run / "clusters.parquet")
    mcs = sorted(clusters["population"].unique())
    assert mcs == [f"MC{i:02d}" for i in range(1, 9)]
    assert set(st.loc[st["family"] == "cluster_arm_visit", "population"]) == set(mcs)
    # clusters.parquet: every metacluster of every sample; counts add up to the gated parent (CD4 T)
    assert list(clusters.columns[:10]) == [
        "sample_id", "patient_id", "visit", "arm", "population", "parent", "count", "parent_count", "pct_parent",
        "metacluster",
    ]  # fmt: skip
    assert len(clusters) == 8 * stats["sample_id"].nunique() and (clusters["parent"] == "CD4 T").all()
    per_sample = clusters.groupby("sample_id")["count"].sum()
    cd4 = stats[stats["population"] == "CD4 T"].set_index("sample_id")["count"]
    assert (per_sample == cd4[per_sample.index]).all()
    assert {"median_CD25", "pct_parent_ci_low", "low_parent_count"} <= set(clusters.columns)
    # the clustering folder, and the catalog holds the new tables
    model_file = sim_run / "clustering" / "model.npz"
    from cytopipe.cluster import load_model

    model = load_model(model_file)
    info = json.loads((sim_run / "run.json").read_text())
    assert info["hashes"]["cluster_model"] == model.content_hash and model.parent == "CD4 T"
    nodes = pd.read_parquet(sim_run / "clustering" / "nodes.parquet")
    assert nodes["cells"].sum() == clusters["count"].sum()
    summary = pd.read_parquet(sim_run / "clustering" / "concordance_summary.parquet")
    assert set(summary["population"]) == {"Treg", "Memory CD4", "Th17", "Th1", "cTfh", "activated cTfh"}
    assert summary.set_index("population").loc["Treg", "union_f1"] > 0.9
    n = query(sim_run, "select count(*) as n from statistics")["n"].iloc[0]
    assert n == len(st) and query(sim_run, "select count(*) as n from clusters")["n"].iloc[0] == len(clusters)


def test_pct_parent_matches_the_simulator_truth(sim_run, sim_trial):
    """Held-back trial: pct_parent vs the simulator's truth (issue 3 accuracy: Treg < 0.3 pp)."""
    stats = read_outputs(sim_run)["population_stats"]
    m = pct_errors(stats, truth_table(sim_trial))
    table = m.groupby("population")["abs_error_pp"].agg(["median", "max"]).round(3)
    print("\npct_parent absolute error vs truth (percentage points):\n" + table.to_string())
    assert len(m) == (~stats["population"].isin(["CD3- CD56+", "CD3- CD16+"])).sum()  # NK's halves: no truth
    treg = m[m["population"] == "Treg"]["abs_error_pp"]
    assert treg.median() < 0.3
    assert m.groupby("population")["abs_error_pp"].median().max() < 1.0


def test_qc_removes_the_injected_faults(sim_run, sim_trial):
    samples = read_outputs(sim_run)["samples"].set_index("sample_id")
    faults = pd.read_csv(sim_trial / "truth" / "faults.csv")
    for _, f in faults.iterrows():
        row = samples.loc[f["sample_id"]]
        removed = row["events_before_qc"] - row["events_after_qc"]
        print(f"\n{f['sample_id']} {f['fault']}: {f['n_events']} injected, QC removed {removed}")
        assert removed >= 0.9 * f["n_events"]
        assert removed <= 1.3 * f["n_events"] + 60
        if f["fault"] == "margin":
            assert row["qc_margin_by_channel"] == f"{f['channels']}={f['n_events']}"
    clean = samples[~samples.index.isin(faults["sample_id"]) & (samples["control"].fillna("") == "")]
    assert (clean["qc_removed_fraction"] < 0.01).all()


# --------------------------------------------------------------------------------------------
# failure isolation
# --------------------------------------------------------------------------------------------
def test_corrupt_and_markerless_files_are_recorded_as_failed(sim_run, sim_trial, tmp_path):
    bad = copy_trial(sim_trial, tmp_path / "bad")
    truncate_fcs(bad / "fcs" / "P004_W04.fcs")
    drop_marker(bad / "fcs" / "P002_W04.fcs", "CD25")
    out = tmp_path / "run"
    # the trial's workflow (the reference run's settings; no UMAP, ~8 s of CPU this test never read)
    proc = cli("run", str(bad / "workflow.yaml"), "--out", str(out), "--workers", "2", "--no-progress")
    print(proc.stdout)
    assert proc.returncode == EXIT_FAILURES, proc.stderr[-3000:]
    # issue 10: a file lacking a marker is no longer failed; only its populations needing the
    # marker (Treg, for CD25) are "not measured" in it
    assert "completed with failures: 1 of" in proc.stdout
    samples = read_outputs(out)["samples"].set_index("sample_id")
    failed = samples[samples["status"] == "failed"]
    assert sorted(failed.index) == ["P004_W04"]
    assert "P004_W04.fcs" in failed.loc["P004_W04", "error"] and "DATA" in failed.loc["P004_W04", "error"]
    # the other samples are unaffected... up to pooled gate estimates, which now pool 6 samples
    ref = read_outputs(sim_run)["population_stats"]
    got = read_outputs(out)["population_stats"]
    assert set(got["sample_id"]) == set(ref["sample_id"]) - {"P004_W04"}
    no_cd25 = got[got["sample_id"] == "P002_W04"].set_index("population")
    assert (
        pd.isna(no_cd25.loc["Treg", "pct_parent"]) and no_cd25.drop(index="Treg")["pct_parent"].notna().all()
    )
    m = got.merge(ref, on=["sample_id", "population"], suffixes=("", "_ref")).dropna(subset=["pct_parent"])
    assert (m["pct_parent"] - m["pct_parent_ref"]).abs().max() < 1.0


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_cli_input_errors_exit_2_before_any_work(tmp_path, sim_trial):
    proc = cli("run")
    assert proc.returncode == 2 and "give a workflow file, or --manifest, --template and --out" in proc.stderr
    spec = tmp_path / "w.yaml"
    spec.write_text(
        f"study: x\nmanifest: {sim_trial / 'manifest.csv'}\ntemplate: {TEMPLATE}\nqc: {{tim: {{}}}}\n"
    )
    proc = cli("run", str(spec), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "key 'qc.tim': unknown key; did you mean 'time'?" in proc.stderr
    assert not (tmp_path / "o" / "run.json").exists()
    proc = cli("run", str(spec), "--manifest", "m.csv")
    assert proc.returncode == 2 and "not both" in proc.stderr


# --------------------------------------------------------------------------------------------
# study-level phases and partial reruns
# --------------------------------------------------------------------------------------------
def test_spillover_from_controls_and_transforms_locked_from_pooled_events(sim_run, sim_trial, tmp_path):
    out = tmp_path / "run"
    wf = workflow(
        sim_trial,
        out,
        compensation={"source": "controls"},
        # arcsinh/150 is the template's own display scale: the gates keep their meaning
        transforms={"estimate": "study", "method": "arcsinh", "cofactor": 150.0, "events_per_sample": 500},
    )
    result = run_workflow(wf, scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_OK, result.summary()
    steps = {s["step"]: s for s in result.info["steps"]}
    assert steps["compensation"]["source"] == "controls" and steps["compensation"]["controls"] == 15
    assert steps["transforms"]["samples_pooled"] == 8 and "CD25" in steps["transforms"]["markers"]
    # the computed matrix is close to the simulator's true one, and recorded with the run
    computed = pd.read_csv(out / "study" / "spillover.csv", index_col=0)
    true = pd.read_csv(sim_trial / "truth" / "spillover.csv")
    true.index = true.columns
    err = (computed.loc[true.index, true.columns] - true).abs().to_numpy().max()
    print(f"\nspillover from controls: max abs error vs truth {err:.4f}")
    assert err < 0.02
    state = result.info["study_state"]
    assert state["compensation"] == "controls" and len(state["spillover"]["channels"]) == 14
    locked = json.loads((out / "study" / "transforms.json").read_text())
    assert locked["transforms"]["CD25"] == {"type": "arcsinh", "cofactor": 150.0}
    assert result.info["hashes"]["transforms"] == locked["hash"]
    # population frequencies stay close to the run with each file's (true) matrix
    ref = read_outputs(sim_run)["population_stats"]
    m = result.population_stats.merge(ref, on=["sample_id", "population"], suffixes=("", "_ref"))
    assert (m["pct_parent"] - m["pct_parent_ref"]).abs().median() < 0.3


def test_a_changed_file_is_redone_and_the_others_reused(sim_trial, tmp_path):
    from cytopipe.fcs import read_fcs, write_fcs

    trial = copy_trial(sim_trial, tmp_path / "trial")
    out = tmp_path / "run"
    first = run_workflow(workflow(trial, out), scheduler="synchronous", progress=False)
    path = trial / "fcs" / "P004_W04.fcs"
    s = read_fcs(path)
    write_fcs(path, s.events[:-500], s.channels, s.keywords, spillover=s.spillover)
    second = run_workflow(workflow(trial, out), scheduler="synchronous", progress=False)
    steps = {s["step"]: s for s in second.info["steps"]}
    assert steps["gating-fit"]["reused"] == 7  # only the changed file's fits were redone
    before = first.samples.set_index("sample_id")
    after = second.samples.set_index("sample_id")
    assert before.loc["P004_W04", "sha256"] != after.loc["P004_W04", "sha256"]
    assert after.loc["P004_W04", "events_before_qc"] == before.loc["P004_W04", "events_before_qc"] - 500
    assert (before.drop(index="P004_W04")["sha256"] == after.drop(index="P004_W04")["sha256"]).all()
    # the cache holds only what the current files and settings need
    fits = list((out / ".cache" / "fit").glob("*.json"))
    assert len(fits) == 8


# --------------------------------------------------------------------------------------------
# the README's main command
# --------------------------------------------------------------------------------------------
# issue 10's accuracy targets (median |error| of % of parent, pp); scatter, Live and Memory CD4
# have none in the issue: they are held to the T-cell target
SAMPLE_DATA_TARGETS = {
    "Lymphocytes": 1.0, "Singlets": 1.0, "Live": 1.0, "T cells": 1.0, "CD4 T": 1.0, "CD8 T": 1.0, "Treg": 0.3,
    "Memory CD4": 1.0, "Th1": 1.5, "activated cTfh": 2.0, "NK": 1.0, "CD56bright NK": 1.5, "CD56dim NK": 1.5,
}  # fmt: skip
# measured 1.15 and 1.80 pp (2026-12-04, CXCR3/CCR6/CXCR5/PD-1 aligned on memory CD4, CD4 T and
# T cells with `align: affine`; 1.41 / 1.85 on CD4 T and T cells only, 1.03 / 1.86 before)
# with sample_data's FMO controls used by `cytopipe run` (one set per site, 10k events per FMO);
# 2.5 and 1.8 pp without FMOs: issue 10 open
SAMPLE_DATA_MISSES = {"Th17": 1.0, "cTfh": 1.0}


@pytest.mark.xfail(
    strict=True,
    reason="issue 10: on the fortessa profile Th17 and cTfh miss their 1.0 pp targets (1.15 / 1.80 pp with "
    "the FMO controls, one 10k-event set per site). Not the FMO percentile (within 0.02 arcsinh of the true "
    "one for CXCR5/CCR6): each file's drift since the batch's compensation mis-compensates it (CD4 spill on "
    "CXCR5 ~0.14 arcsinh); even a gate at each file's true drifted threshold is off by 1.22 / 2.04 pp",
)
def test_sample_data_th17_and_ctfh_meet_their_targets(pipeline_run):

    out, _ = pipeline_run
    m = pct_errors(read_outputs(out)["population_stats"], truth_table(REPO / "sample_data"))
    per_pop = m.groupby("population")["abs_error_pp"].median()
    assert all(per_pop[p] <= t for p, t in SAMPLE_DATA_MISSES.items()), per_pop


def test_the_committed_sample_data_workflow(pipeline_run):
    """`cytopipe run workflows/sle_il2.yaml` (to a temporary --out): the whole run folder, with the
    gate-review data, FlowSOM clusters, statistics and the report."""

    out, proc = pipeline_run
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert "statistics, clusters, report.html" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {
        "population_stats.parquet", "samples.parquet", "run.json", "catalog.duckdb", "study", "gate_review.parquet",
        "statistics.parquet", "clusters.parquet", "clustering", "report.html", "report_tables",
    }  # fmt: skip
    tables = read_outputs(out)
    manifest = pd.read_csv(REPO / "sample_data" / "manifest.csv")
    assert len(tables["samples"]) == len(manifest) and (tables["samples"]["status"] != "failed").all()
    n_samples = int(manifest["control"].isna().sum())
    assert len(tables["population_stats"]) == n_samples * 17  # 15 canonical + NK's two halves
    # the manifest's FMO controls (one set per site) set the T-helper thresholds of every sample
    info = json.loads((out / "run.json").read_text())
    register = next(s for s in info["steps"] if s["step"] == "register")
    n_fmo = int(manifest["control"].fillna("").str.startswith("fmo:").sum())
    assert n_fmo == 12 and len(register["fmo_controls"]) == n_fmo and register["samples_without_fmo"] == 0
    ps = tables["population_stats"]
    assert (ps.loc[ps["population"].isin(["Th17", "Th1", "cTfh"]), "gate_source"] == "control").mean() > 0.9
    m = pct_errors(tables["population_stats"], truth_table(REPO / "sample_data"))
    per_pop = m.groupby("population")["abs_error_pp"].median()
    print("median |pct_parent - truth| (pp):\n" + per_pop.round(3).to_string())
    # issue 10's targets on sample_data's (realistic, fortessa) profile; Th17 and cTfh miss them
    # (see the strict xfail below), every other population meets its own
    targets = {**SAMPLE_DATA_TARGETS, **dict.fromkeys(SAMPLE_DATA_MISSES)}
    met = {p: t for p, t in targets.items() if t is not None}
    assert set(targets) == set(per_pop.index)
    assert all(per_pop[p] <= t for p, t in met.items()), per_pop
    review = pd.read_parquet(out / "gate_review.parquet")
    assert review["sample_id"].nunique() == n_samples
    assert set(review["population"]) == set(m["population"]) | {"CD3- CD56+", "CD3- CD16+"}  # + NK's halves
    st = pd.read_parquet(out / "statistics.parquet")
    assert {"mixed_arm_visit", "response_rate", "cluster_mixed_arm_visit", "cluster_arm_visit"} <= set(
        st["family"]
    )
    clusters = pd.read_parquet(out / "clusters.parquet")
    assert clusters["population"].nunique() == 15 and clusters["sample_id"].nunique() == n_samples
    # FlowSOM on Live cells finds the canonical populations (a metacluster or a union, F1 >= 0.9)
    summary = pd.read_parquet(out / "clustering" / "concordance_summary.parquet").set_index("population")
    print(summary[["best_metacluster", "best_f1", "union_metaclusters", "union_f1"]].round(3).to_string())
    for population in ("Treg", "CD8 T", "NK", "CD56bright NK", "CD56dim NK", "Memory CD4"):
        assert summary.loc[population, "union_f1"] >= 0.9, population
    umap = pd.read_parquet(out / "clustering" / "umap.parquet")
    assert len(umap) == n_samples * (4000 // n_samples) and set(umap["metacluster"]) <= set(
        clusters["population"]
    )
    info = json.loads((out / "run.json").read_text())
    report = next(s for s in info["steps"] if s["step"] == "report")
    assert report["written"] and info["problems"] == []
    # the report shows QC at work on the files with injected acquisition faults, and only there
    faults = pd.read_csv(REPO / "sample_data" / "truth" / "faults.csv")
    removed = pd.read_csv(out / "report_tables" / "qc_removed.csv")
    removed = removed[removed["removed"] > 0]
    print(
        f"QC removed events from {sorted(removed['sample_id'])}; faults injected in:\n{faults[['sample_id', 'fault']]}"
    )
    assert set(removed["sample_id"]) <= set(faults["sample_id"])  # no clean file loses events
    # clogs, the drifting detector and the margin pile-up are found (three short flow spikes of
    # ~70 events each in a 5,500-event file are below what the time bins can resolve)
    assert set(faults.loc[faults["fault"] != "spike", "sample_id"]) <= set(removed["sample_id"])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert f"Event QC removed {int(removed['removed'].sum()):,} of" in html


def test_a_clinical_table_that_does_not_fit_is_a_run_problem_not_a_lost_run(
    sim_run, sim_trial, tmp_path, caplog
):
    """Reported at once, recorded in run.json, printed; the statistics leave out the clinical tests and
    every data output of the run is there (exit code 3: completed with failures)."""
    import shutil

    bad = tmp_path / "clinical.csv"
    table = pd.read_csv(sim_trial / "clinical.csv")
    table[table["patient_id"] != "P003"].to_csv(bad, index=False)  # a patient without clinical data
    out = tmp_path / "run"
    shutil.copytree(sim_run, out)  # reuse the per-sample results
    wf = workflow(sim_trial, out, statistics={"enabled": True})
    wf.clinical = bad
    with caplog.at_level(logging.WARNING, logger="cytopipe"):
        result = run_workflow(wf, scheduler="synchronous", progress=False)
    # one warning, without a prefix of its own: the command adds "cytopipe run: warning: " (it was
    # logged with that prefix too, so the terminal showed it twice)
    warned = [r.getMessage() for r in caplog.records if "P003" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("clinical table: "), warned
    assert result.exit_code == EXIT_FAILURES and result.n_failed == 0
    assert any("P003" in p and p.startswith("statistics") for p in result.problems), result.problems
    summary = result.summary()
    assert "problem statistics: the clinical table was not used" in summary
    assert "completed with failures: 1 problem in the study-level steps" in summary
    info = json.loads((out / "run.json").read_text())
    assert info["problems"] == result.problems and "P003" in info["clinical_problem"]
    st = pd.read_parquet(out / "statistics.parquet")
    assert "mixed_arm_visit" in set(st["family"]) and "response_rate" not in set(st["family"])
    assert_same_outputs_except(sim_run, out, "statistics.parquet")


def test_clinical_patients_without_flow_data_are_named_in_a_warning(sim_run, sim_trial, tmp_path):
    """A patient of the clinical table with no FCS data stays in the response rates (intention to
    treat, docs/statistics.md) but is never silent: one warning naming the patient on stderr
    (single prefix), in run.log and in run.json; the run ends normally (exit 0). A clinical table that
    does not fit the flow data is one warning with a single prefix too."""
    import shutil

    import yaml

    table = pd.read_csv(sim_trial / "clinical.csv")
    extra = table[table["patient_id"] == table["patient_id"].iloc[0]].head(1).assign(patient_id="P099")
    clinical = tmp_path / "clinical.csv"
    pd.concat([table, extra]).to_csv(clinical, index=False)
    spec = yaml.safe_load((sim_trial / "workflow.yaml").read_text())
    spec.update(manifest=str(sim_trial / "manifest.csv"), clinical=str(clinical))
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "run"
    shutil.copytree(sim_run, out)  # reuse the per-sample results
    # in this process (the warnings are the main process's): four Dask clusters started for nothing
    # were most of this test's ~30 s of CPU
    sync = ("--scheduler", "synchronous", "--no-progress", "--no-report")
    proc = cli("run", str(tmp_path / "wf.yaml"), "--out", str(out), *sync)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = (
        "cytopipe run: warning: clinical table: 1 patient(s) of the clinical table have no flow data ('P099')"
    )
    assert proc.stderr.count(warning) == 1, proc.stderr[-3000:]
    assert "intention to treat" in proc.stderr
    assert (out / "run.log").read_text().count("have no flow data ('P099')") == 1
    info = json.loads((out / "run.json").read_text())
    stats = next(s for s in info["steps"] if s["step"] == "statistics")
    assert stats["clinical_patients_without_flow_data"] == ["P099"] and info["problems"] == []

    # statistics cached by versions that did not record these patients (simulated: the key taken
    # out of the cache entry and of run.json): the rerun that reuses them still names them
    entries = list((out / ".cache" / "statistics").glob("*.json"))
    assert entries
    for entry in entries:
        cached = json.loads(entry.read_text())
        cached["info"].pop("clinical_patients_without_flow_data", None)
        entry.write_text(json.dumps(cached))
    stats.pop("clinical_patients_without_flow_data")
    (out / "run.json").write_text(json.dumps(info, indent=2))
    proc = cli("run", str(tmp_path / "wf.yaml"), "--out", str(out), *sync)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(warning) == 1, proc.stderr[-3000:]
    record = (out / "run.json").read_bytes()
    stats = next(s for s in json.loads(record)["steps"] if s["step"] == "statistics")
    assert stats["reused"] and stats["clinical_patients_without_flow_data"] == ["P099"]
    # nothing changed at all (no step runs, nothing is written): the warning still holds, and is given
    proc = cli("run", str(tmp_path / "wf.yaml"), "--out", str(out), *sync)
    assert proc.returncode == 0 and (out / "run.json").read_bytes() == record, proc.stderr[-3000:]
    assert proc.stderr.count(warning) == 1, proc.stderr[-3000:]

    # an arm that differs: one line with a single prefix (it was printed twice, once doubled)
    table.loc[table["patient_id"] == "P002", "arm"] = "IL-2 9.9 MIU"
    table.to_csv(clinical, index=False)
    proc = cli("run", str(tmp_path / "wf.yaml"), "--out", str(out), *sync)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "warning: cytopipe run" not in proc.stderr
    start = "cytopipe run: warning: clinical table: file "
    assert proc.stderr.count(start) == 1 and "patient 'P002' is in arm 'IL-2 9.9 MIU'" in proc.stderr


def assert_same_outputs_except(a, b, *names):
    from tests.pipeline_support import OUTPUT_FILES

    for name in OUTPUT_FILES:
        if name not in names and (a / name).is_file():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_blind_key_missing_arms_is_an_input_error_before_any_work(sim_run, sim_trial, tmp_path):
    """Blinding is a property of the run folder, applied when the tables are written: a key that
    cannot code every arm would stop the run after all its work. It is found before any (exit 2)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(sim_run, out)
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    key = tmp_path / "key.csv"
    key.write_text("arm,code\nplacebo,Arm A\n")  # arms missing
    wf = workflow(sim_trial, out, report={"enabled": True, "blinded": True, "blind_key": str(key)})
    with pytest.raises(WorkflowError, match=r"report\.blind_key.*no code for arm") as err:
        run_workflow(wf, scheduler="synchronous", progress=False)
    assert str(key) in str(err.value)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before  # untouched
    assert_same_outputs(sim_run, out)
    # from the command line: exit 2 and the message, no traceback
    proc = cli("run", str(sim_trial / "workflow.yaml"), "--out", str(tmp_path / "cli"), "--no-progress",
               "--blinded", "--blind-key", str(key))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no code for arm" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cli" / "run.json").exists()


def test_a_report_that_fails_does_not_fail_the_data(sim_run, sim_trial, tmp_path):
    """A real obstacle to the report (a file of the user's where its tables folder goes, which is
    never written over): the report is not written and says why, every table is there, exit 3;
    with the obstacle moved away the next run writes the report."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(sim_run, out)
    obstacle = out / "report_tables"
    obstacle.write_text("the user's notes\n", encoding="utf-8")
    wf = workflow(sim_trial, out, report={"enabled": True})
    result = run_workflow(wf, scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_FAILURES and result.n_failed == 0
    assert len(result.problems) == 1 and result.problems[0].startswith("report: not written:")
    assert "report_tables is in the way" in result.problems[0] and "move or rename it" in result.problems[0]
    assert not (out / "report.html").exists()
    assert obstacle.read_text(encoding="utf-8") == "the user's notes\n"  # left as it was
    step = next(s for s in result.info["steps"] if s["step"] == "report")
    assert step["written"] is False and "report_tables" in step["error"]
    assert_same_outputs(sim_run, out)  # every table is there, as in the reference run
    # the obstacle moved away: the same run writes the report, nothing to complain about
    obstacle.rename(tmp_path / "notes.txt")
    again = run_workflow(wf, scheduler="synchronous", progress=False)
    assert again.exit_code == EXIT_OK and again.problems == []
    assert (out / "report.html").is_file() and (out / "report_tables").is_dir()


# --------------------------------------------------------------------------------------------
# clustering: a frozen model for new visits, and `cytopipe cluster`
# --------------------------------------------------------------------------------------------
def test_a_later_visit_is_mapped_onto_the_frozen_model(sim_run, sim_trial, tmp_path):
    """Train on the week-0 visits; a second run over the manifest with week 4 added maps onto that
    model (no training): the week-0 samples get exactly their first-run assignments and the new
    visit is mapped."""
    from tests.pipeline_support import CLUSTERING

    manifest = pd.read_csv(sim_trial / "manifest.csv", dtype=str, keep_default_na=False)
    week0 = tmp_path / "manifest_week0.csv"  # not in the session's trial folder, which tests only read
    rows = manifest[(manifest["visit"] == "0") | (manifest["control"] != "")].copy()
    rows["file"] = [str(sim_trial / f) for f in rows["file"]]
    rows.to_csv(week0, index=False)
    first = workflow(sim_trial, tmp_path / "w0")
    first.manifest = week0
    r1 = run_workflow(first, scheduler="synchronous", progress=False)
    assert r1.exit_code == EXIT_OK, r1.summary()
    model = tmp_path / "w0" / "clustering" / "model.npz"
    frozen = dict(CLUSTERING, model=str(model))
    r2 = run_workflow(
        workflow(sim_trial, tmp_path / "all", clustering=frozen), scheduler="synchronous", progress=False
    )
    assert r2.exit_code == EXIT_OK, r2.summary()
    train = next(s for s in r2.info["steps"] if s["step"] == "clustering-train")
    assert train["model"] == "given" and "training_cells" not in train
    assert (tmp_path / "all" / "clustering" / "model.npz").read_bytes() == model.read_bytes()
    c1 = pd.read_parquet(tmp_path / "w0" / "clusters.parquet")
    c2 = pd.read_parquet(tmp_path / "all" / "clusters.parquet")
    assert set(c2["sample_id"]) == set(manifest.loc[manifest["control"] == "", "sample_id"])
    old = c2[c2["sample_id"].isin(c1["sample_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, c1)  # counts, % and medians of every metacluster
    new = c2[c2["sample_id"].str.endswith("W04")]
    assert len(new) == 4 * 8 and new["count"].sum() > 0
    # the model records the transforms it was trained with; a run that transforms differently is told
    from dataclasses import replace

    from cytopipe.cluster import load_model
    from cytopipe.gating import load_template
    from cytopipe.pipeline.state import _transform_mismatch, plan_clustering

    frozen_model = load_model(model)
    study = r1.info["study_state"]["transforms"]  # the cofactors the first run locked for the study
    assert frozen_model.transforms["CD25"] == study["CD25"] and study["CD25"]["type"] == "arcsinh"
    # the later run transforms the model's markers with the model's (the study's) cofactors
    step = next(s for s in r2.info["steps"] if s["step"] == "transforms")
    assert step["cofactors"]["CD25"]["cofactor"] == study["CD25"]["cofactor"]
    plan = plan_clustering(
        workflow(sim_trial, tmp_path / "x", clustering=frozen), load_template(TEMPLATE), study
    )
    assert _transform_mismatch(frozen_model, plan) == ""
    locked = {**plan.transforms, "CD25": {"type": "arcsinh", "cofactor": 500.0}}
    assert "trained on CD25 transformed with" in _transform_mismatch(
        frozen_model, replace(plan, transforms=locked)
    )


def test_cluster_command_remaps_and_retrains_a_run_folder(sim_run, sim_trial, tmp_path):
    import shutil

    import yaml

    out = tmp_path / "run"
    shutil.copytree(sim_run, out)
    # re-mapping onto the run's own model reproduces its clusters and statistics exactly
    from cytopipe.pipeline.cluster_command import cluster_run

    result = cluster_run(out, scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_OK, result.summary()
    train = next(s for s in result.info["steps"] if s["step"] == "clustering-train")
    assert train["model"] == "given" and train["source"] == str(out / "clustering" / "model.npz")
    assert_same_outputs(sim_run, out)
    # retrain with other settings (a workflow file): a new model, k = 5, statistics and report rewritten
    spec = yaml.safe_load((sim_trial / "workflow.yaml").read_text())
    spec["clustering"].update(metaclusters=5, grid=[5, 5])
    spec.update(manifest=str(sim_trial / "manifest.csv"), clinical=str(sim_trial / "clinical.csv"))
    spec["report"] = {"enabled": True}
    other = tmp_path / "w.yaml"
    other.write_text(yaml.safe_dump(spec))
    proc = cli(
        "cluster",
        str(out),
        "--retrain",
        "--workflow",
        str(other),
        "--scheduler",
        "synchronous",
        "--no-progress",
    )
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    clusters = pd.read_parquet(out / "clusters.parquet")
    assert sorted(clusters["population"].unique()) == [f"MC0{i}" for i in range(1, 6)]
    info = json.loads((out / "run.json").read_text())
    assert info["cluster_command"]["retrain"] is True and info["workflow"]["clustering"]["metaclusters"] == 5
    assert [s["step"] for s in info["steps"]][-5:] == [
        "clustering-train",
        "clustering-map",
        "statistics",
        "clustering-umap",
        "report",
    ]
    st = pd.read_parquet(out / "statistics.parquet")
    assert set(st.loc[st["family"] == "cluster_arm_visit", "population"]) == set(clusters["population"])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert '<section id="clusters">' in html and "fig-cluster-concordance" in html
    # the population results were not touched
    for name in ("population_stats.parquet", "samples.parquet", "gate_review.parquet"):
        assert (out / name).read_bytes() == (sim_run / name).read_bytes()
    # a run folder that is not one: a clear error
    proc = cli("cluster", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "run folder not found" in proc.stderr


def test_one_control_set_per_site_compensates_each_sample_with_its_own_sites_matrix(tmp_path):
    """A multi-site trial with one set of controls per site (as sample_data has): the run computes
    one matrix per site, each sample is compensated with its site's, the matrices are recorded in
    run.json, and a finished run re-applies them (exports)."""
    from cytopipe.pipeline import load_run
    from cytopipe.simulate import simulate_trial

    trial = tmp_path / "trial"
    simulate_trial(
        trial, n_patients=3, visits=(0,), events=3000, control_events=1500, seed=5151, instrument="fortessa"
    )
    manifest = pd.read_csv(trial / "manifest.csv")
    sites = sorted(manifest["site"].unique())
    assert len(sites) >= 2 and (manifest["control"] == "unstained").sum() == len(sites)
    out = tmp_path / "run"
    wf = workflow(trial, out, compensation={"source": "controls"}, clustering={"enabled": False})
    result = run_workflow(wf, scheduler="synchronous", progress=False)
    assert result.exit_code in (EXIT_OK, EXIT_FAILURES) and result.n_failed == 0, result.summary()
    steps = {s["step"]: s for s in result.info["steps"]}
    assert steps["compensation"]["control_sets"] == {"site": sites}
    for site in sites:
        computed = pd.read_csv(out / "study" / f"spillover_site_{site}.csv", index_col=0)
        true = pd.read_csv(trial / "truth" / f"spillover_{site}.csv")
        true.index = true.columns
        err = (computed.loc[true.index, true.columns] - true).abs().to_numpy().max()
        print(f"\nsite {site}: max abs error vs the true matrix {err:.4f}")
        assert err < 0.02
    record = result.info["study_state"]["spillover_sets"]
    assert record["column"] == "site" and sorted(record["sets"]) == sites
    # each sample's frequencies are those of a run with its file's (true) matrix
    ref = run_workflow(
        workflow(trial, tmp_path / "ref", clustering={"enabled": False}),
        scheduler="synchronous",
        progress=False,
    )
    m = result.population_stats.merge(
        ref.population_stats, on=["sample_id", "population"], suffixes=("", "_ref")
    )
    assert (m["pct_parent"] - m["pct_parent_ref"]).abs().median() < 0.3
    loaded = load_run(out)
    assert loaded.state.spillover_column == "site" and sorted(loaded.state.spillover_sets) == sites
