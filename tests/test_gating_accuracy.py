"""Accuracy of the canonical template across simulated instruments (issue 10).

Twenty random instrument profiles (``cytopipe simulate --instrument random``), seeds fixed here and
never used while developing the gates (development used seeds 1001-1005 and 11), 24 files each,
gated through the real engine with pooled fallbacks as ``cytopipe run`` does. The figures are
printed; the assertions state what the gates achieve today (see docs/gating.md for the table):
lineage populations meet the issue's targets, the dim chemokine-receptor populations do not yet.
"""

from __future__ import annotations

import numpy as np
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
    # what holds today: scatter/viability clean-up and the lineage populations
    for pop in ("Lymphocytes", "Singlets", "T cells", "CD4 T", "CD8 T", "Memory CD4"):
        assert acc.loc[pop, "mae_pp"] <= 1.0, acc
        assert acc.loc[pop, "ccc"] >= 0.9, acc
    assert acc.loc["NK", "mae_pp"] <= TARGETS["NK"], acc
    assert acc.loc["Treg", "mae_pp"] <= 1.0, acc
    assert (acc["failed"] == 0).all(), acc
    # every fallback is flagged (gate_trial counts a flagged gate as a fallback)
    assert not (gated["source"].isin(["pooled", "mixed"]) & ~gated["fallback"]).any()
    assert np.isfinite(acc["mae_pp"]).all()
