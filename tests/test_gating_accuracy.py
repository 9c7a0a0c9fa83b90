"""Accuracy of the canonical template across simulated instruments (issue 10).

Twenty random instrument profiles (``cytopipe simulate --instrument random``, drawn per site), 24
files each, with one FMO control set per site (``fmo="site"``: the seven dim markers' FMOs in
each site's first batch, 50,000 events each), gated through the real engine with pooled
fallbacks as ``cytopipe run`` does, and compared with the simulator's per-event truth. The
T-helper thresholds (CXCR3, CCR6, CXCR5, PD-1) are the landmark rule calibrated on the site's
FMO (``auto ... control: fmo``), moved by each file's drift (gain and offset, ``align: affine``)
read on memory CD4, CD4 T and T cells (``align_on``; the median of those readings and the
parent's own landmark); every other gate does not use controls.

Held-out sets, each run once after tuning: 9501-9520 for the landmark rule without controls (no
FMOs in the trials), 9701-9720 for the FMO-calibrated rule, 9801-9820 (2026-12-04) for the
aligned thresholds read on CD4 T and T cells (``align: affine``), the Live ``of: bulk`` cut with
its scatter rule, the Treg ``cut: edge`` and the partial fraction fallback (every target met
except Th17's concordance, 0.830: one file whose CD4 T and T cells carried a residual spill that
memory CD4 did not), and 9901-9920 (2026-12-04, the marks below are from that run) for the
same gates with memory CD4 as a third drift reading (``align_on: [Memory CD4, CD4 T, T cells]``,
chosen on 8401-8420, checked on 8421-8440, 7001-7020 and 3001-3020), then 10001-10020 (run once
right after, the gates unchanged: Live's concordance 0.84 and CD56bright / CD56dim NK's 0.72, one
file each). Those two files were diagnosed (a right-skewed live peak whose own upper flank was
taken for a shoulder; CD56dim NK skipped by the shoulder of a wide CD3- negative), the rules
changed (the Live gate's shoulder sought beyond 2.5 robust SDs of the peak's wider half; ``auto``
kept below the first peak above the negative), checked on tuning seeds 8001-8040, 7001-7020 and
3001-3020, and measured once on 10301-10320 and 10401-10420 (2026-12-04 16:00 UTC: every median
target met, Live 0.949, but CD56bright / CD56dim NK 0.883: three W12 files whose CD56dim NK sat
within ~0.5 arcsinh units of the CD3- negatives on CD56). Those files were diagnosed; NK became
CD3- CD56+ *or* CD3- CD16+ (two quadrants, each threshold fitted among the CD3- events, and a
boolean ``or``), checked on tuning seeds 8001-8040, 7001-7020 and 3001-3020 (NK and CD56bright NK
improved on each, nothing else moved), and measured once on 10501-10520 and 10601-10620
(2026-12-04 17:36 UTC; the marks below are from that run). 10101-10120 and 10201-10220 were
started once and stopped unread (the session found it had more time to check the Live rule
first); 9101-9120 likewise when a regression elsewhere forced a change. Earlier tuning:
1001-1011, 3001-3020, 7001-7020, 8001-8040 and 8401-8440. The next change to the gates is
measured on 10701-10720 and 10801-10820.

The assertions are the issue's targets (not the achieved values); a population that missed its
target on that run is marked ``xfail(strict=True)`` with the measured figure, so the test turns
red the day it starts to pass and the mark must go.

The gating of the 40 trials runs once per session (``-m slow``: ~6 min on a quiet 2-core machine,
~20 under load).
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from tests.accuracy_support import accuracy_table, gate_trial

SEEDS = [*range(10501, 10521), *range(10601, 10621)]
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
CCC_POPULATIONS = [  # every canonical population of the template
    "Lymphocytes", "Singlets", "Live", "T cells", "CD4 T", "CD8 T", "Treg", "Memory CD4", "Th17", "Th1",
    "cTfh", "activated cTfh", "NK", "CD56bright NK", "CD56dim NK",
]  # fmt: skip
# populations that missed a target on the held-out run (measured figure in the reason): none on
# 10501-10520 + 10601-10620 (2026-12-04: 960 files, every one gated, 5 gates fell back, all flagged.
# Median |error| pp / concordance: Treg 0.106 / 0.917, Th17 0.729 / 0.962, Th1 0.801 / 0.972, cTfh
# 0.953 / 0.952, activated cTfh 1.235 / 0.941, NK 0.010 / 1.000, CD56bright NK 0.021 / 0.999, T / CD4
# T / CD8 T <= 0.023 / 1.000, Live 0.119 / 0.938. On 10301-10320 + 10401-10420, before NK used CD16:
# CD56bright / CD56dim NK 0.883; on 9901-9920 + 10001-10020, before the Live rule: Live 0.896)
MISSED_MAE: dict[str, str] = {}
MISSED_CCC: dict[str, str] = {}

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
        shutil.rmtree(folder)  # ~0.3 GB per trial: 40 of them would fill a small disk
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


@pytest.mark.parametrize("pop", [_mark(p, MISSED_CCC) for p in CCC_POPULATIONS])
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
