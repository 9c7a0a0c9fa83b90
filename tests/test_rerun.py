"""Reruns (issue 15): a rerun of a finished run with nothing changed reuses every output without
starting an executor (cytopipe/rerun.py), any change takes the normal path, and the per-sample
cache never gives a relabelled sample its old labels."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cytopipe.pipeline import EXIT_OK, run_workflow
from tests.pipeline_support import copy_trial, workflow

REUSED = "nothing changed: reused every output"


def _run(trial: Path, out: Path, capsys) -> tuple[dict, str]:
    result = run_workflow(workflow(trial, out), scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_OK, result.summary()
    return result.info, capsys.readouterr().err


def _outputs(run: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of the run folder but the cache, the log and the lock: (mtime_ns, bytes)."""
    return {
        str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.relative_to(run).parts[0] not in (".cache", "run.log", ".cytopipe.lock")
    }


def _swap_arms(trial: Path, a: str, b: str) -> dict[str, str]:
    """Relabel: patients ``a`` and ``b`` exchange their arms in the manifest and the clinical
    table (the FCS files stay as they are). Returns the new {patient: arm}."""
    manifest = pd.read_csv(trial / "manifest.csv", dtype=str, keep_default_na=False)
    arms = manifest.groupby("patient_id")["arm"].first().to_dict()
    assert arms[a] != arms[b]
    new = {**arms, a: arms[b], b: arms[a]}
    for name in ("manifest.csv", "clinical.csv"):
        df = pd.read_csv(trial / name, dtype=str, keep_default_na=False)
        is_patient = df["patient_id"] != ""
        df.loc[is_patient, "arm"] = df.loc[is_patient, "patient_id"].map(new)
        df.to_csv(trial / name, index=False)
    return new


@pytest.fixture()
def rerun_setup(sim_trial, sim_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the simulated trial and of its finished run (the copy's paths differ, so its
    first run here takes the normal path and reuses the per-sample cache)."""
    trial = copy_trial(sim_trial, tmp_path / "trial")
    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    return trial, run


def test_a_rerun_with_nothing_changed_reuses_every_output_and_any_change_runs(rerun_setup, sim_run, capsys):
    trial, run = rerun_setup
    first, err = _run(trial, run, capsys)
    assert REUSED not in err and not first.get("reused_everything")
    assert json.loads((run / "run.json").read_text())["rerun"]["outputs"]
    before = _outputs(run)

    # nothing changed: no executor, nothing written, the recorded tables and exit code
    info, err = _run(trial, run, capsys)
    n = int(pd.read_csv(trial / "manifest.csv")["control"].isna().sum())  # samples, not controls
    assert f"{REUSED} ({n} samples)" in err
    assert info["reused_everything"] and "executor" in info  # the finished run's record
    assert _outputs(run) == before

    # a file touched (same bytes, new modification time): the normal path, every sample reused
    fcs = sorted((trial / "fcs").glob("*.fcs"))[0]
    st = fcs.stat()
    os.utime(fcs, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    info, err = _run(trial, run, capsys)
    assert REUSED not in err and not info.get("reused_everything")
    assert info["cached_samples"] == n
    # run.log says why (it was logged before run.log existed, and lost)
    why = [x for x in (run / "run.log").read_text().splitlines() if "rerun: running the steps (" in x]
    assert why and fcs.name in why[-1] and "changed (size or modification time)" in why[-1], why
    pd.testing.assert_frame_equal(pd.read_parquet(run / "population_stats.parquet"),
                                  pd.read_parquet(sim_run / "population_stats.parquet"))  # fmt: skip
    assert REUSED in _run(trial, run, capsys)[1]  # ... and recorded again

    # an output damaged after the run: the normal path writes it again
    stats = run / "population_stats.parquet"
    good = stats.read_bytes()
    stats.write_bytes(good[:-100])
    info, err = _run(trial, run, capsys)
    assert REUSED not in err and stats.read_bytes() == good

    # a setting changed: the normal path
    result = run_workflow(workflow(trial, run, statistics={"enabled": False}), scheduler="synchronous",
                          progress=False)  # fmt: skip
    assert not result.info.get("reused_everything") and not (run / "statistics.parquet").exists()


def test_a_relabelled_arm_reaches_every_output(rerun_setup, capsys):
    """Swapping two patients' arms reuses their gating (same files) but every table shows the new
    arms and the statistics follow them; nothing stale from the cache."""
    trial, run = rerun_setup
    _run(trial, run, capsys)
    old_ps = pd.read_parquet(run / "population_stats.parquet")
    old_st = pd.read_parquet(run / "statistics.parquet")
    new = _swap_arms(trial, "P001", "P002")

    info, err = _run(trial, run, capsys)
    assert REUSED not in err
    assert info["cached_samples"] == old_ps["sample_id"].nunique()  # gating reused: same files
    for name in ("population_stats", "samples", "clusters"):
        df = pd.read_parquet(run / f"{name}.parquet")
        df = df[df["patient_id"].fillna("") != ""]
        assert (df["arm"].astype(str) == df["patient_id"].map(new)).all(), name
    ps = pd.read_parquet(run / "population_stats.parquet")
    pd.testing.assert_frame_equal(ps.drop(columns="arm"), old_ps.drop(columns="arm"))  # same numbers
    assert not ps["arm"].equals(old_ps["arm"])
    st = pd.read_parquet(run / "statistics.parquet")
    assert not st.equals(old_st)  # the arm comparisons were computed again on the new arms

    # a renamed sample: its gate-review rows (cached per sample) carry the new name, not the old
    manifest = pd.read_csv(trial / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["sample_id"] = manifest["sample_id"].replace({"P003_W00": "P003_V00"})
    manifest.to_csv(trial / "manifest.csv", index=False)
    info, err = _run(trial, run, capsys)
    samples = set(manifest.loc[manifest["control"] == "", "sample_id"])
    assert set(pd.read_parquet(run / "gate_review.parquet")["sample_id"]) == samples
    assert set(pd.read_parquet(run / "population_stats.parquet")["sample_id"]) == samples
    assert info["cached_samples"] == len(samples) - 1  # only the renamed sample was gated again


def test_a_resumed_run_counts_the_samples_whose_pass_1_results_it_reused(tmp_path):
    """A run killed after gating pass 1 (its fits cached, no pass-2 entries, no run.json) and
    rerun: the samples whose cached pass-1 result stands (not read again) are reused, and the summary
    line says so (it said "0 reused from a previous run" while run.json showed the fits reused)."""
    import yaml

    from tests.pipeline_support import REPO, TEMPLATE, cli

    manifest = pd.read_csv(REPO / "sample_data" / "manifest.csv", dtype=str, keep_default_na=False)
    manifest = manifest[manifest["sample_id"].str.startswith("P001_")].copy()
    manifest["file"] = [str(REPO / "sample_data" / f) for f in manifest["file"]]
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    spec = {"study": "resume", "manifest": "manifest.csv", "template": str(TEMPLATE),
            "clustering": {"enabled": False}, "statistics": {"enabled": False},
            "report": {"enabled": False}}  # fmt: skip
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = tmp_path / "run"
    args = ("run", str(tmp_path / "w.yaml"), "--out", str(out), "--scheduler", "synchronous", "--no-progress")
    first = cli(*args)
    assert first.returncode == EXIT_OK, first.stderr
    assert "(0 reused from a previous run)" in first.stdout
    # what a kill -9 between the two gating passes leaves: pass 1's entries, no pass 2, no run.json
    shutil.rmtree(out / ".cache" / "gate")
    (out / "run.json").unlink()
    again = cli(*args)
    assert again.returncode == EXIT_OK, again.stderr
    steps = {s["step"]: s for s in json.loads((out / "run.json").read_text())["steps"]}
    assert steps["gating-fit"]["reused"] == 4 and steps["gating"]["reused"] == 0
    stood = steps["gating"]["from_pass_1"]  # pass-1 results that stand: not read again
    assert stood >= 1
    assert f"({stood} reused from a previous run)" in again.stdout, again.stdout
    assert json.loads((out / "run.json").read_text())["cached_samples"] == stood
