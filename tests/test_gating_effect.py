"""Effect detection through the gates on instruments the template was not tuned to (issue 10):
a random-instrument trial with the IL-2 dose effect on Treg, gated with the canonical template
(pooled fallbacks, as ``cytopipe run``), gives statistics that find the effect (q < 0.05, Treg
rising with dose); null trials on random instruments keep the false-positive rate at 5 %
(``-m slow``: many gated trials)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cytopipe.stats import run_statistics
from tests.accuracy_support import gate_trial


def _gated_frequencies(folder, seed: int, effect: float, patients: int, events: int) -> pd.DataFrame:
    """population_stats-like rows (patient_id, visit, arm, population, pct_parent) of a gated
    random-instrument trial, and the same from the simulator's truth (``truth`` column)."""
    from cytopipe.simulate import instrument_trial

    instrument_trial(folder, instrument="random", seed=seed, patients=patients, visits=(0, 12),
                     events=events, effect=effect, control_events=100)  # fmt: skip
    gated = gate_trial(folder)
    manifest = pd.read_csv(folder / "manifest.csv", dtype={"sample_id": str, "patient_id": str})
    meta = manifest[manifest["control"].isna()][["sample_id", "patient_id", "visit", "arm"]]
    assert (gated["error"] == "").all(), gated[gated["error"] != ""]
    return gated.merge(meta, on="sample_id")


def test_il2_effect_on_treg_is_found_through_the_gates_on_a_random_instrument(tmp_path):
    freq = _gated_frequencies(tmp_path / "trial", seed=9301, effect=1.0, patients=16, events=6000)
    settings = {"families": ["mixed_arm_visit", "mixed_dose_trend"], "populations": ["Treg"]}
    measured = run_statistics(freq, None, settings)
    truth = run_statistics(freq.assign(pct_parent=freq["pct_parent_true"]), None, settings)
    cols = ["family", "comparison", "estimate", "p", "q"]
    print(
        "\nmeasured:\n"
        + measured[cols].round(4).to_string()
        + "\ntruth:\n"
        + truth[cols].round(4).to_string()
    )
    slope = measured[measured["family"] == "mixed_dose_trend"].iloc[0]
    assert slope["q"] < 0.05 and slope["estimate"] > 0  # Treg rises with the IL-2 dose
    top = measured[
        (measured["family"] == "mixed_arm_visit") & (measured["comparison"] == "IL-2 1.0 MIU vs placebo")
    ]
    assert top["q"].iloc[0] < 0.05 and top["estimate"].iloc[0] > 0


# measured 2026-12-03: per-test rate 0.026 (SE 0.005); Treg dose trend p < 0.05 in 4/20 trials (at
# the bound), with the mixed model's normal reference, which was anti-conservative with 16 patients
# (8.6 % in 1000 null table-level trials); it now uses t with Satterthwaite df
# (tests/test_stats_smallsample.py). The effect test above then gave dose-trend q = 0.0004 (was < 1e-4).
NULL_SEEDS = list(range(9401, 9421))


@pytest.mark.slow
def test_null_false_positive_rate_through_the_gates_across_random_instruments(tmp_path):
    """20 null trials (effect 0), each on its own random instrument profiles, gated: the per-visit
    arm tests (Mann-Whitney, 15 populations x 3 arms) reject at p < 0.05 in at most 5 % + 3 SE of
    tests (SE from the per-trial rates), and the Treg dose trend in at most 4 of 20 trials."""
    rates, treg = [], []
    for seed in NULL_SEEDS:
        freq = _gated_frequencies(tmp_path / f"null{seed}", seed=seed, effect=0.0, patients=16, events=4000)
        res = run_statistics(freq, None, {"families": ["arm_visit", "mixed_dose_trend"]})
        av = res[res["family"] == "arm_visit"]
        rates.append(float(np.mean(av["p"] < 0.05)))
        t = res[(res["family"] == "mixed_dose_trend") & (res["population"] == "Treg")]
        treg.append(bool(t["p"].iloc[0] < 0.05))
    rates = np.asarray(rates)
    rate, se = rates.mean(), rates.std(ddof=1) / np.sqrt(len(rates))
    print(
        f"\nper-test false-positive rate {rate:.4f} (SE {se:.4f}); Treg dose trend p < 0.05 in {sum(treg)}/20"
    )
    assert rate <= 0.05 + 3 * se
    assert sum(treg) <= 4  # binomial(20, 0.05): P(>= 5 rejections) = 0.3 %
