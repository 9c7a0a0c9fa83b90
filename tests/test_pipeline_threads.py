"""Two studies run at once from two threads of one process (as the server runs them) give the
results each gives alone, and each run.log holds only its own run's lines."""

from __future__ import annotations

import threading

import pandas as pd

from cytopipe.pipeline import EXIT_OK, run_workflow
from tests.pipeline_support import assert_same_outputs, workflow


def _half_study(trial, folder):
    """The trial's first two patients, another study (its own manifest, no clustering)."""
    folder.mkdir()
    manifest = pd.read_csv(trial / "manifest.csv", dtype=str, keep_default_na=False)
    keep = manifest[manifest["patient_id"].isin(sorted(set(manifest["patient_id"]) - {""})[:2])]
    keep = keep.assign(file=[str(trial / f) for f in keep["file"]])
    keep.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_two_studies_in_two_threads_give_what_each_gives_alone(sim_run, sim_trial, tmp_path):
    from cytopipe.workflow import workflow_from_options
    from tests.pipeline_support import SECTIONS, TEMPLATE

    manifest_b = _half_study(sim_trial, tmp_path / "b")

    def study_b(out):
        return workflow_from_options(
            manifest_b, TEMPLATE, out, seed=7, **{**SECTIONS, "clustering": {"enabled": False}}
        )

    wf_a, wf_b = workflow(sim_trial, tmp_path / "a_run"), study_b(tmp_path / "b_run")
    results, errors = {}, []

    def go(name, wf):
        try:  # B shows progress (lines: stderr is no terminal here), A does not
            results[name] = run_workflow(wf, scheduler="synchronous", progress=name == "b")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=go, args=("a", wf_a)), threading.Thread(target=go, args=("b", wf_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results["a"].exit_code == EXIT_OK and results["b"].exit_code == EXIT_OK

    alone_b = run_workflow(study_b(tmp_path / "b_alone"), scheduler="synchronous", progress=False)
    assert alone_b.exit_code == EXIT_OK
    assert_same_outputs(sim_run, tmp_path / "a_run")  # study A alone: the session's reference run
    assert_same_outputs(tmp_path / "b_alone", tmp_path / "b_run")
    n_b = len(pd.read_csv(manifest_b))
    assert len(results["b"].samples) == n_b < len(results["a"].samples)

    # each run.log has its own run's lines only
    log_a = (tmp_path / "a_run" / "run.log").read_text()
    log_b = (tmp_path / "b_run" / "run.log").read_text()
    assert f"run started in {tmp_path / 'a_run'}" in log_a and str(tmp_path / "b_run") not in log_a
    assert f"run started in {tmp_path / 'b_run'}" in log_b and str(tmp_path / "a_run") not in log_b
    assert log_a.count("run finished") == 1 and log_b.count("run finished") == 1
    # B's progress lines: every tenth of each per-sample phase, in B's run.log only
    n_files = len(results["b"].samples)
    assert f"register: {n_files}/{n_files} samples" in log_b and f"fit: {n_b}/{n_b} samples" in log_b
    assert "samples, ETA" in log_b and "samples, ETA" not in log_a
