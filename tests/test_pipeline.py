"""`cytopipe run` end to end: real files, a real Dask LocalCluster of processes, real DuckDB.

One small simulated trial (4 patients x 2 visits, 5000 events, one clog, one signal shift,
one margin pile-up; a seed the gating template was not tuned on) is run in-process without
Dask as the reference; every other way of running it must give the same tables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from cytopipe.errors import WorkflowError
from cytopipe.pipeline import EXIT_FAILURES, EXIT_OK, run_workflow
from tests.pipeline_support import (
    TEMPLATE,
    TRIAL,
    assert_same_outputs,
    cli,
    cli_env,
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
    assert len(stats) == n_samples * 15
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


def test_pct_parent_matches_the_simulator_truth(sim_run, sim_trial):
    """Held-back trial: pct_parent vs the simulator's truth (issue 3 accuracy: Treg < 0.3 pp)."""
    stats = read_outputs(sim_run)["population_stats"]
    m = pct_errors(stats, truth_table(sim_trial))
    table = m.groupby("population")["abs_error_pp"].agg(["median", "max"]).round(3)
    print("\npct_parent absolute error vs truth (percentage points):\n" + table.to_string())
    assert len(m) == len(stats)
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
# schedulers: the same tables whatever runs them
# --------------------------------------------------------------------------------------------
def test_a_local_cluster_of_one_worker_gives_identical_outputs(sim_run, sim_trial, tmp_path):
    """(Two workers: the killed-worker, kill -9 and failure tests run on two.)"""
    one = tmp_path / "one"
    result = run_workflow(workflow(sim_trial, one, workers=1), scheduler="local", progress=False)
    assert result.info["executor"]["workers"] == 1
    assert result.info["executor"]["scheduler"] == "distributed (local)"
    assert_same_outputs(sim_run, one)
    # a rerun reuses every sample and rewrites identical tables
    again = run_workflow(workflow(sim_trial, one), scheduler="synchronous", progress=False)
    assert again.info["cached_samples"] == 8
    assert_same_outputs(sim_run, one)


# --------------------------------------------------------------------------------------------
# failure isolation
# --------------------------------------------------------------------------------------------
def test_corrupt_and_markerless_files_are_recorded_as_failed(sim_run, sim_trial, tmp_path):
    bad = copy_trial(sim_trial, tmp_path / "bad")
    truncate_fcs(bad / "fcs" / "P004_W04.fcs")
    drop_marker(bad / "fcs" / "P002_W04.fcs", "CD25")
    out = tmp_path / "run"
    proc = cli(
        "run", "--manifest", str(bad / "manifest.csv"), "--template", str(TEMPLATE), "--out", str(out),
        "--workers", "2", "--no-progress",
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == EXIT_FAILURES, proc.stderr[-3000:]
    assert "completed with failures: 2 of" in proc.stdout
    samples = read_outputs(out)["samples"].set_index("sample_id")
    failed = samples[samples["status"] == "failed"]
    assert sorted(failed.index) == ["P002_W04", "P004_W04"]
    assert "P004_W04.fcs" in failed.loc["P004_W04", "error"] and "DATA" in failed.loc["P004_W04", "error"]
    assert "CD25" in failed.loc["P002_W04", "error"] and "P002_W04.fcs" in failed.loc["P002_W04", "error"]
    # the other samples are unaffected... up to pooled gate estimates, which now pool 6 samples
    ref = read_outputs(sim_run)["population_stats"]
    got = read_outputs(out)["population_stats"]
    assert set(got["sample_id"]) == set(ref["sample_id"]) - {"P002_W04", "P004_W04"}
    m = got.merge(ref, on=["sample_id", "population"], suffixes=("", "_ref"))
    assert (m["pct_parent"] - m["pct_parent_ref"]).abs().max() < 1.0


# --------------------------------------------------------------------------------------------
# resumability: kill -9 of the whole run, then rerun
# --------------------------------------------------------------------------------------------
def test_kill_9_mid_run_then_rerun_gives_identical_outputs(sim_run, sim_trial, tmp_path):
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "cytopipe", "run", "--manifest", str(sim_trial / "manifest.csv"),
        "--template", str(TEMPLATE), "--clinical", str(sim_trial / "clinical.csv"), "--out", str(out),
        "--workers", "2", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, env=cli_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    done = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((out / ".cache" / "fit").glob("*.json")) + list(
                (out / ".cache" / "gate").glob("*.json")
            )
            if len(done) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        )
        os.killpg(proc.pid, signal.SIGKILL)  # the client, the scheduler, the nannies and the workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "run.json").exists()
    print(f"\nkilled after {len(done)} cached results")
    assert not _live_processes_in_group(proc.pid), "orphaned worker processes survived the kill"
    rerun = cli(
        "run", "--manifest", str(sim_trial / "manifest.csv"), "--template", str(TEMPLATE),
        "--clinical", str(sim_trial / "clinical.csv"), "--out", str(out), "--workers", "2", "--no-progress",
    )  # fmt: skip
    assert rerun.returncode == EXIT_OK, rerun.stderr[-3000:]
    assert_same_outputs(sim_run, out)
    assert not list(out.rglob("*.tmp"))  # no leftover temporary files either
    info = json.loads((out / "run.json").read_text())
    fit = next(s for s in info["steps"] if s["step"] == "gating-fit")
    assert fit["reused"] >= 1  # work done before the kill was not redone


def _live_processes_in_group(pgid: int, wait: float = 10.0) -> list[str]:
    """Processes of the group that are still alive (zombies waiting to be reaped do not count)."""
    deadline = time.monotonic() + wait
    while True:
        ps = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True)
        alive = [
            line for line in ps.stdout.splitlines() if line.split() and not line.split()[1].startswith("Z")
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# a worker process killed while it processes a sample
# --------------------------------------------------------------------------------------------
def _run_and_kill_a_busy_worker(sim_trial, out, allowed_failures: int):
    """Run the trial on a 2-worker LocalCluster (via its address) and SIGKILL a worker while it
    processes a sample. Returns (result, (worker address, task key))."""
    import dask
    from dask.distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        pids = client.run(os.getpid)  # worker address -> pid
        box: dict = {}

        def target():
            try:
                box["result"] = run_workflow(
                    workflow(sim_trial, out),
                    scheduler="distributed",
                    address=cluster.scheduler_address,
                    progress=False,
                )
            except BaseException as exc:  # pragma: no cover - reported below
                box["error"] = exc

        thread = threading.Thread(target=target)
        thread.start()
        victim = None
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and thread.is_alive():
            for addr, keys in client.processing().items():
                busy = [k for k in keys if str(k).startswith(("fit-", "gate-"))]
                if busy and addr in pids:
                    victim = (addr, busy[0])
                    os.kill(pids[addr], signal.SIGKILL)
                    break
            time.sleep(0.005)
        thread.join(timeout=600)
    assert victim is not None, "no task was seen running on a worker"
    assert "error" not in box, box.get("error")
    print(f"\nkilled worker {victim[0]} while it ran {victim[1]}")
    return box["result"], victim


def test_a_killed_worker_is_survived(sim_run, sim_trial, tmp_path):
    """The scheduler retries the sample on a live worker (the nanny restarts the dead one)."""
    out = tmp_path / "run"
    result, _ = _run_and_kill_a_busy_worker(sim_trial, out, allowed_failures=3)
    assert result.exit_code == EXIT_OK, result.summary()
    assert_same_outputs(sim_run, out)


def test_a_sample_whose_worker_keeps_dying_is_recorded_as_failed(sim_trial, tmp_path):
    """With no retries left (allowed-failures 0), the sample is given up, the batch goes on."""
    out = tmp_path / "run"
    result, (_, key) = _run_and_kill_a_busy_worker(sim_trial, out, allowed_failures=0)
    assert result.exit_code == EXIT_FAILURES
    # the samples the dead worker held (the one it ran, and any queued on it) are failed
    failed = result.samples[result.samples["status"] == "failed"]
    assert 1 <= len(failed) <= 4, result.summary()
    assert failed["error"].str.contains("worker died while processing this sample").all()
    assert set(failed["failed_step"]) == {key.split("-")[0]}
    done = result.population_stats["sample_id"].unique()
    assert len(done) == 8 - len(failed) and not set(done) & set(failed["sample_id"])


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


def test_unreachable_scheduler_is_a_clear_error():
    from cytopipe.pipeline import DaskExecutor

    with pytest.raises(WorkflowError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        DaskExecutor(address="tcp://127.0.0.1:9", connect_timeout=1.0)


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
def test_the_committed_sample_data_workflow(tmp_path):
    """`cytopipe run workflows/sle_il2.yaml` (to a temporary --out): the whole run folder."""
    from tests.pipeline_support import REPO

    out = tmp_path / "sle_il2"
    proc = cli("run", str(REPO / "workflows" / "sle_il2.yaml"), "--out", str(out), "--no-progress")
    print(proc.stdout)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {
        "population_stats.parquet", "samples.parquet", "run.json", "catalog.duckdb", "study",
    }  # fmt: skip
    tables = read_outputs(out)
    assert len(tables["samples"]) == 47 and (tables["samples"]["status"] != "failed").all()
    assert len(tables["population_stats"]) == 32 * 15
    m = pct_errors(tables["population_stats"], truth_table(REPO / "sample_data"))
    per_pop = m.groupby("population")["abs_error_pp"].median()
    print("median |pct_parent - truth| (pp):\n" + per_pop.round(3).to_string())
    assert per_pop["Treg"] < 0.3 and per_pop.max() < 1.0


def test_the_clinical_table_is_checked_before_any_work(sim_trial, tmp_path, capsys):
    from cytopipe.errors import ClinicalDataError
    from cytopipe.pipeline import RunContext, validate_inputs
    from cytopipe.store import RunFolder

    bad = tmp_path / "clinical.csv"
    table = pd.read_csv(sim_trial / "clinical.csv")
    table[table["patient_id"] != "P003"].to_csv(bad, index=False)  # a patient without clinical data
    wf = workflow(sim_trial, tmp_path / "o")
    wf.clinical = bad
    ctx = RunContext(wf=wf, folder=RunFolder(tmp_path / "o"), executor=None, progress=False)
    validate_inputs(ctx)  # gating does not need it: reported, recorded, not fatal
    assert "P003" in ctx.clinical_problem and "warning: clinical table" in capsys.readouterr().err
    wf_stats = wf
    wf_stats.statistics = dict(wf.statistics, enabled=True)
    with pytest.raises(ClinicalDataError, match="P003"):
        validate_inputs(
            RunContext(wf=wf_stats, folder=RunFolder(tmp_path / "o"), executor=None, progress=False)
        )
