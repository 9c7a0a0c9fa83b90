"""Accuracy of the canonical template across simulated instruments (issue 10).

Twenty random instrument profiles (``cytopipe simulate --instrument random``), seeds fixed here and
never used while developing the gates (development used seeds 1001-1005 and 11), 24 files each,
gated through the real engine with pooled fallbacks as ``cytopipe run`` does. The figures are
printed; the assertions state what the gates achieved when last measured (see docs/gating.md):
lineage, NK, CD56bright and Th1 populations meet the issue's median-error targets; Treg, Th17, cTfh
and activated cTfh do not yet, and Lin's concordance is below 0.9 for most populations.
"""

from __future__ import annotations

import pandas as pd
import pytest

from tests.accuracy_support import accuracy_table, gate_trial

SEEDS = list(range(7001, 7021))
TARGETS = {  # median |error| of % of parent, percentage points (issue 10)
    "Treg": 0.3,
    "Th17": 1.0,
    "Th1": 1.5,
    "cTfh": 1.0,
    "activated cTfh": 2.0,
    "NK": 1.0,
    "CD56bright NK": 1.5,
    "T cells": 1.0,
    "CD4 T": 1.0,
    "CD8 T": 1.0,
}


@pytest.mark.slow
def test_accuracy_across_random_instruments(tmp_path):
    from cytopipe.simulate import instrument_trial

    gated = []
    for seed in SEEDS:
        folder = tmp_path / f"inst{seed}"
        instrument_trial(folder, instrument="random", seed=seed, patients=6, events=10_000)
        g = gate_trial(folder)
        g["seed"] = seed
        gated.append(g)
    gated = pd.concat(gated, ignore_index=True)
    acc = accuracy_table(gated).set_index("population")
    acc["target_pp"] = pd.Series(TARGETS)
    print("\n" + acc.round(3).to_string())
    fallback_rate = float(gated["fallback"].mean())
    print(f"gates falling back (or flagged): {fallback_rate:.1%}")
    errors = gated.loc[gated["error"] != "", ["sample_id", "seed", "error"]].drop_duplicates()
    if len(errors):
        print(f"{len(errors)} sample(s) could not be gated:\n" + errors.to_string())
    # What holds (measured 2026-12-03 on these seeds: median |error| T 0.02, CD4 0.04, CD8 0.03,
    # Treg 0.34, Th17 1.04, Th1 1.49, cTfh 2.12, activated cTfh 2.81, NK 0.04, CD56bright 0.07 pp;
    # Lin's concordance >= 0.9 only for Lymphocytes/Singlets, 0.4-0.88 elsewhere because a few
    # files per trial are gated badly; 2.5 % of gates fell back; 8 of 480 samples not gated).
    for pop in ("Lymphocytes", "Singlets", "T cells", "CD4 T", "CD8 T", "Memory CD4"):
        assert acc.loc[pop, "mae_pp"] <= 1.0, acc
    for pop in ("Lymphocytes", "Singlets"):
        assert acc.loc[pop, "ccc"] >= 0.9, acc
    for pop in ("NK", "CD56bright NK", "Th1"):
        assert acc.loc[pop, "mae_pp"] <= TARGETS[pop], acc
    # not yet at target (issue 10): Treg 0.3, Th17 1.0, cTfh 1.0, activated cTfh 2.0
    assert acc.loc["Treg", "mae_pp"] <= 0.5 and acc.loc["Th17", "mae_pp"] <= 1.5, acc
    assert acc.loc["cTfh", "mae_pp"] <= 3.0 and acc.loc["activated cTfh", "mae_pp"] <= 4.0, acc
    assert fallback_rate < 0.05
    assert len(errors) <= 0.02 * gated["sample_id"].nunique() * len(SEEDS)
    # every fallback is flagged (gate_trial counts a flagged gate as a fallback)
    assert not (gated["source"].isin(["pooled", "mixed"]) & ~gated["fallback"]).any()
