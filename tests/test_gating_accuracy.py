"""Accuracy of the canonical template across simulated instruments (issue 10).

Twenty random instrument profiles (``cytopipe simulate --instrument random``, drawn per site), 24
files each, with one FMO control set per site (``fmo="site"``: the seven dim markers' FMOs in
each site's first batch, 50,000 events each), gated through the real engine with pooled
fallbacks as ``cytopipe run`` does, and compared with the simulator's per-event truth. The
T-helper thresholds (CXCR3, CCR6, CXCR5, PD-1) are the landmark rule calibrated on the site's
FMO (``auto ... control: fmo``); cTfh and activated cTfh also read each file's drift on T cells
and CD8 T (``align_on``, median of three readings; added after the 9701-9720 run, tuned on
3001-3010, 7001-7010 and 8101-8120); every other gate does not use controls.

Held-out sets, each run once after tuning: 9501-9520 for the landmark rule without controls (no
FMOs in the trials), 9701-9720 for the FMO-calibrated rule, 9801-9820 (2026-12-04, the marks
below are from that run) for the current gates (aligned cTfh / activated cTfh / Th17 / Th1
thresholds, ``align: affine``; Live cut at the first valley above the live cells' humps, ``of:
bulk``, with a scatter rule for humps; Treg diagonal cut at the conventional cloud's edge, ``cut:
edge``; a failed fit replaces only the failed part; tuned on 1001-1011, 3001-3020, 7001-7020,
8001-8040 and 8401-8440). 9901-9920 are reserved, not yet run, for the next change to the gates.
9101-9120 were started once and stopped unread when a regression elsewhere forced a change.
Earlier tuning: 1001-1005/11, 7001-7020 and 3001-3020 (the FMO calibration: diagnosed on
3001-3012 and 7001-7008, checked on 3013-3017).
The assertions are the issue's targets (not the achieved values); a population that missed its
target on that run is marked ``xfail(strict=True)`` with the measured figure, so the test turns
red the day it starts to pass and the mark must go.

The gating of the 20 trials runs once per session (``-m slow``: ~10 min on 2 cores).
"""

from __future__ import annotations

import pandas as pd
import pytest

from tests.accuracy_support import accuracy_table, gate_trial

SEEDS = list(range(9801, 9821))
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
CCC_TARGET = 0.9  # Lin's concordance, every population
# populations that missed a target on the one held-out run (measured figure in the reason)
# (9801-9820, 2026-12-04: 480 files, every one gated, 2 gates = 0.03 % fell back, all flagged;
# Treg 0.098 pp / 0.982, Th17 0.81 / 0.830, Th1 0.93 / 0.951, cTfh 0.98 / 0.953, activated
# cTfh 1.33 / 0.904, CD56bright NK 0.024 / 0.999. On 9701-9720 before the changes: Treg 0.334 pp,
# cTfh 1.24, activated cTfh 2.18 / 0.754, CD56bright NK concordance 0.688)
MISSED_MAE: dict[str, str] = {}
MISSED_CCC: dict[str, str] = {
    "Th17": "held-out 9801-9820 concordance 0.830 (median |error| 0.81 pp meets its 1.0 pp target)",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> pd.DataFrame:
    from cytopipe.simulate import instrument_trial

    root = tmp_path_factory.mktemp("accuracy")
    frames = []
    for seed in SEEDS:
        folder = root / f"inst{seed}"
        instrument_trial(folder, instrument="random", seed=seed, patients=6, events=10_000, fmo="site")
        frames.append(gate_trial(folder).assign(seed=seed))
    out = pd.concat(frames, ignore_index=True)
    acc = accuracy_table(out).set_index("population")
    acc["target_pp"] = pd.Series(TARGETS)
    print("\n" + acc.round(3).to_string())
    print(f"gates falling back (or flagged): {out['fallback'].mean():.2%}")
    return out


@pytest.fixture(scope="module")
def acc(gated) -> pd.DataFrame:
    return accuracy_table(gated).set_index("population")


def _mark(pop: str, missed: dict[str, str]):
    return (
        pytest.param(pop, marks=pytest.mark.xfail(strict=True, reason=missed[pop])) if pop in missed else pop
    )


@pytest.mark.parametrize("pop", [_mark(p, MISSED_MAE) for p in TARGETS])
def test_median_error_within_target(acc, pop):
    assert acc.loc[pop, "mae_pp"] <= TARGETS[pop], acc.loc[pop]


@pytest.mark.parametrize("pop", [_mark(p, MISSED_CCC) for p in TARGETS])
def test_concordance_at_least_0_9(acc, pop):
    assert acc.loc[pop, "ccc"] >= CCC_TARGET, acc.loc[pop]


def test_every_sample_gated_and_every_fallback_flagged(gated):
    errors = gated.loc[gated["error"] != "", ["seed", "sample_id", "error"]].drop_duplicates()
    assert errors.empty, errors.to_string()  # a sample is never dropped
    data_driven = ~gated["source"].isin(["fixed", "boolean", "not measured"])
    fallbacks = gated[data_driven & ~gated["source"].isin(["fitted", "control"])]
    assert fallbacks["flagged"].all(), fallbacks  # every fallback carries a flag
    rate = float(gated.loc[data_driven, "fallback"].mean())
    print(f"fallback rate {rate:.2%} ({int(gated.loc[data_driven, 'fallback'].sum())} gates)")
    assert rate < 0.05
