"""Per-channel scale locked per study (issue 10 item 3): ``cytopipe run`` estimates each
``cofactor: auto`` channel's arcsinh cofactor once for the whole study from the pooled events
(each sample's negative population, their median) and records it in run.json, so that every file
of the study is gated on the same scale; a study mixing detector ranges is not forced onto one."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

import cytopipe
from cytopipe.compensation import compensate
from cytopipe.gating import load_template
from cytopipe.gating.scale import auto_markers, estimate_cofactor, lock_cofactors, sample_cofactors
from cytopipe.panel import resolve_markers
from tests.pipeline_support import TEMPLATE


def _pools(trial, markers, n=2000):
    """Each sample file's compensated events (a seeded subsample) on ``markers``, as the run pools them."""
    manifest = pd.read_csv(trial / "manifest.csv")
    out = []
    for i, f in enumerate(manifest.loc[manifest["control"].isna(), "file"]):
        s = compensate(cytopipe.read_fcs(trial / f))
        mapping = resolve_markers(s.channels, markers)
        pnn = list(s.channels["pnn"])
        rows = np.random.default_rng(i).choice(s.n_events, size=min(n, s.n_events), replace=False)
        out.append(s.events[np.sort(rows)][:, [pnn.index(mapping[m]) for m in markers]])
    return out


def test_run_locks_one_cofactor_per_channel_for_the_study(sim_run, sim_trial):
    template = load_template(TEMPLATE)
    markers = auto_markers(template)
    assert "CD25" in markers and "FSC-A" not in markers and len(markers) == 14
    info = json.loads((sim_run / "run.json").read_text())
    step = next(s for s in info["steps"] if s["step"] == "transforms")
    locked = info["study_state"]["transforms"]
    assert step["samples_pooled"] == 8 and set(step["cofactors"]) == set(markers)
    # what each file alone would use (on another subsample of its events): the study's one
    # recorded value lies among them, near their median
    per_file = {
        m: [estimate_cofactor(p[:, j]) for p in _pools(sim_trial, markers)] for j, m in enumerate(markers)
    }
    for m in markers:
        c = step["cofactors"][m]["cofactor"]
        assert locked[m] == {"type": "arcsinh", "cofactor": c}
        median = float(np.median(per_file[m]))
        print(f"{m}: locked {c:g}, per file {min(per_file[m]):g}-{max(per_file[m]):g}")
        assert min(per_file[m]) <= c <= max(per_file[m]) and abs(c - median) <= 0.25 * median


def test_a_study_mixing_detector_ranges_is_not_forced_onto_one_cofactor(sim_trial):
    markers = ["CD25", "CXCR5"]
    pools = _pools(sim_trial, markers)
    locked, record = lock_cofactors(pools, markers)
    assert set(locked) == set(markers) and all(r["spread"] < 1.5 for r in record.values())
    # the same cells measured by a detector with 16x the range (an 18-bit and a 22-bit instrument)
    mixed = pools[:4] + [p * 16 for p in pools[4:]]
    locked, record = lock_cofactors(mixed, markers)
    assert locked == {}
    for m in markers:
        assert "differ more than 3-fold" in record[m]["reason"] and record[m]["spread"] > 8


def test_per_sample_estimates_lock_exactly_as_the_pooled_events(sim_trial):
    """The run's workers send each sample's cofactor estimates instead of its pooled events: the
    study locks the same values either way (and a column without 200 finite events counts for
    nothing, as before)."""
    markers = ["CD25", "CXCR5", "PD-1"]
    pools = _pools(sim_trial, markers)
    pools[0][:, 2] = np.nan  # a file without that channel
    assert sample_cofactors(pools[0])[2] is None and sample_cofactors(pools[1])[2] > 0
    from_events = lock_cofactors(pools, markers)
    from_estimates = lock_cofactors([sample_cofactors(p) for p in pools], markers)
    assert from_events == from_estimates
    assert from_events[1]["PD-1"]["samples"] == len(pools) - 1
