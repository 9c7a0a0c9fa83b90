"""One read per file: the fused gating pass gives exactly the tables of separate passes.

The fused pass (fits, statistics, gate review, clustering training cells and mapping inputs from
one gating of each sample) is checked against the same run with every pass doing its own read and
gating (every sample gated again with the pooled estimates, training and mapping re-reading the
files): byte-identical outputs, and far fewer data-driven fits computed.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import yaml

import cytopipe.pipeline.steps as steps_module
import cytopipe.pipeline.tasks as tasks
from cytopipe.gating import load_template, pool_estimates
from cytopipe.gating.engine import Engine
from cytopipe.pipeline import run_workflow
from tests.pipeline_support import TEMPLATE, assert_same_outputs, workflow


def _count_fits(monkeypatch) -> list[int]:
    calls = [0]
    real = Engine._fit

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_fit", counted)
    return calls


def _count_time_qc(monkeypatch) -> list[int]:
    from cytopipe import qc

    calls = [0]
    real = qc.time_qc

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(qc, "time_qc", counted)
    return calls


def test_one_pass_gives_the_tables_of_separate_passes(sim_run, sim_trial, tmp_path, monkeypatch):
    info = json.loads((sim_run / "run.json").read_text())
    steps = {s["step"]: s for s in info["steps"]}
    n = info["samples"] - len(info["failed"])
    # the reference run took its statistics, training cells and mapping inputs from one gating
    assert 0 < steps["gating"]["from_pass_1"] <= n
    assert steps["clustering-train"]["from_gating"] == n
    assert steps["clustering-map"]["from_gating"] == n
    assert not (sim_run / ".cache" / steps_module.MAP_INPUTS).exists()  # removed after mapping

    counted = fused_fits = _count_fits(monkeypatch)
    qc_runs = _count_time_qc(monkeypatch)
    fused = run_workflow(workflow(sim_trial, tmp_path / "fused"), scheduler="synchronous", progress=False)
    assert_same_outputs(sim_run, tmp_path / "fused")
    # event QC once per file: in the pooling pass; the gating pass takes it from there
    pooled = {s["step"]: s for s in fused.info["steps"]}["transforms"]["samples_pooled"]
    assert pooled == n and qc_runs[0] == n

    monkeypatch.setattr(steps_module, "needs_regating", lambda *a, **k: True)
    monkeypatch.setattr(tasks, "sample_cluster_inputs", lambda *a, **k: {})
    fused_fits, before = fused_fits[0], fused_fits[0]
    separate = run_workflow(
        workflow(sim_trial, tmp_path / "separate"), scheduler="synchronous", progress=False
    )
    steps = {s["step"]: s for s in separate.info["steps"]}
    assert steps["gating"]["from_pass_1"] == 0 and steps["clustering-map"]["from_gating"] == 0
    assert_same_outputs(sim_run, tmp_path / "separate")
    assert fused.exit_code == separate.exit_code
    # four gatings per sample (fit, gate, train, map) against one (plus the samples gated again)
    regated = n - {s["step"]: s for s in fused.info["steps"]}["gating"]["from_pass_1"]
    separate_fits = counted[0] - before
    assert fused_fits * 4 * n == separate_fits * (n + regated)


def test_needs_regating_follows_the_engines_use_of_references(sim_run, sim_trial):
    template = load_template(TEMPLATE)
    fits = pd.read_parquet(sim_run / "study" / "gate_fits.parquet")
    manifest = pd.read_csv(sim_trial / "manifest.csv", dtype=str)
    pooled = pool_estimates(fits, manifest)
    sid = sorted(fits["sample_id"].unique())[0]
    own = fits[fits["sample_id"] == sid].reset_index(drop=True)
    job = manifest[manifest["sample_id"] == sid].iloc[0].to_dict()
    ok = own.assign(status="ok")
    # a fit that failed is replaced by a reference: the pooled one differs from the default
    failed = ok.copy()
    failed.loc[0, "status"] = "failed"
    assert tasks.needs_regating(failed, job, template, pooled)
    # a failed fit with no pooled estimate falls back on the same reference in both passes
    assert not tasks.needs_regating(failed, job, template, None)
    # a fit moved beyond max_shift from the pooled estimate is replaced by it (the canonical
    # template sets no max_shift: the same template with one on its first data-driven gate)
    data = yaml.safe_load(TEMPLATE.read_text())
    shifted = next(p for p in data["populations"] if p["gate"].get("type") == "auto")
    shifted["gate"].setdefault("bounds", {})["max_shift"] = 0.25
    capped = load_template(data)
    key = next(k for k in ok["key"] if template_fitter(capped, k).bounds.max_shift is not None)
    fitter = template_fitter(capped, key)
    row = ok.index[ok["key"] == key][0]
    ref = np.asarray(pooled.lookup(key, fitter.pool, job)[0], dtype=float)
    far = ok.copy()
    far.at[row, "params"] = (ref + 10 * fitter.bounds.max_shift).tolist()
    assert tasks.needs_regating(far, job, capped, pooled)
    assert not tasks.needs_regating(far, job, template, pooled)  # no max_shift: own fit kept
    # the sample's own fits, all ok and close to the pooled estimates: nothing to redo, however far
    # they are from the template's typed defaults (a default never overrules an ok fit)
    near = ok.copy()
    for i, k in enumerate(near["key"]):
        near.at[i, "params"] = np.asarray(
            pooled.lookup(k, template_fitter(template, k).pool, job)[0]
        ).tolist()
    assert not tasks.needs_regating(near, job, template, pooled)
    assert not tasks.needs_regating(near, job, capped, pooled)
    near.at[row, "params"] = (ref + 0.5 * fitter.bounds.max_shift).tolist()
    assert not tasks.needs_regating(near, job, capped, pooled)


def template_fitter(template, key):
    from cytopipe.gating.fitters import DataDrivenGate

    for pop in template:
        if isinstance(pop.gate, DataDrivenGate):
            for suffix, fitter in pop.gate.fit_items():
                if pop.name + suffix == key:
                    return fitter
    raise KeyError(key)
