"""Statistics on simulated trials with a known truth (cytopipe.simulate, tables only, no FCS).

* effect=1.0: IL-2 raises Treg and lowers Th17 and cTfh with dose; the mixed model must find it with
  the right sign, and its estimate must agree with the truth of a very large simulated trial.
* effect=0.0: every arm is identical; over 200 replicate trials the per-subset arm tests must reject
  at their nominal 5% rate (criteria stated in each test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cytopipe import simulate  # noqa: E402  (a broken simulator must fail these tests, not skip them)
from cytopipe.stats import FAMILIES, baseline_change, run_statistics

ACTIVE = ["IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU"]
EXPECTED_SIGN = {"Treg": +1, "Th17": -1, "cTfh": -1}


@pytest.fixture(scope="module")
def il2_trial():
    cohort = simulate.simulate_cohort(n_patients=100, visits=(0, 4, 12, 24), seed=7, effect=1.0)
    return cohort, run_statistics(cohort.frequencies, cohort.clinical)


def test_mixed_model_finds_il2_effect_with_the_right_sign(il2_trial):
    _, res = il2_trial
    for population, sign in EXPECTED_SIGN.items():
        mine = res[res.population == population]
        # the arm x visit effects of the highest dose: significant at every visit, in the right direction
        top = mine[(mine.family == "mixed_arm_visit") & (mine.comparison == "IL-2 1.0 MIU vs placebo")]
        assert len(top) == 3 and (top["q"] < 0.01).all(), population
        assert (np.sign(top["estimate"]) == sign).all(), population
        # the whole trajectory differs between arms (joint Wald test) ...
        assert mine[mine.family == "mixed_arm"]["p"].iloc[0] < 1e-6
        # ... and the linear dose term has the expected sign: Treg rises with dose, Th17 / cTfh fall
        slope = mine[mine.family == "mixed_dose_trend"].iloc[0]
        assert slope["p"] < 1e-4 and np.sign(slope["estimate"]) == sign, population
        # dose trend at each visit (Jonckheere-Terpstra) agrees
        jt = mine[mine.family == "dose_trend"]
        assert (jt["q"] < 0.01).all() and (np.sign(jt["estimate"]) == sign).all(), population
    # Treg: the effect grows with dose at the end of every-other-day dosing (week 12)
    treg12 = res[(res.family == "mixed_arm_visit") & (res.population == "Treg") & (res.visit == 12)]
    by_arm = treg12.set_index("comparison")["estimate"]
    assert by_arm[[f"{a} vs placebo" for a in ACTIVE]].is_monotonic_increasing


def test_mixed_model_estimate_agrees_with_a_large_trial(il2_trial):
    """Each Treg arm effect (n = 100) agrees with the arm difference in mean change of a 2000-patient
    trial from the same simulator: |estimate - reference| <= 2.58 * sqrt(SE^2 + SE_reference^2)."""
    _, res = il2_trial
    big = simulate.simulate_cohort(n_patients=2000, visits=(0, 4, 12, 24), seed=99, effect=1.0)
    dyn = baseline_change(big.frequencies[big.frequencies.population == "Treg"])
    stats = dyn[dyn.visit > 0].groupby(["arm", "visit"])["change"].agg(["mean", "var", "count"])
    effects = res[(res.family == "mixed_arm_visit") & (res.population == "Treg")]
    for row in effects.itertuples():
        arm = row.comparison.removesuffix(" vs placebo")
        a, p = stats.loc[(arm, row.visit)], stats.loc[("placebo", row.visit)]
        reference = a["mean"] - p["mean"]
        se_reference = np.sqrt(a["var"] / a["count"] + p["var"] / p["count"])
        se = (row.ci_high - row.ci_low) / (2 * 1.959964)
        assert abs(row.estimate - reference) <= 2.58 * np.hypot(se, se_reference), (arm, row.visit)


@pytest.mark.slow
def test_mixed_model_coverage_against_the_truth():
    """Coverage of the 95% CIs of the 9 Treg arm x visit effects over 100 simulated trials (n = 100)
    against the truth of a 20000-patient trial. The model-based covariance assumes equal variances
    in all arms; IL-2 responders make the active arms more variable, so coverage is expected to be
    a little below 95% for 1.0 MIU and above it for 0.2 MIU (measured: ~0.92 and ~1.0); the robust
    (CR3) covariance is near 0.93 for every arm. Criterion: every arm's coverage >= 0.85."""
    big = simulate.simulate_cohort(n_patients=20000, visits=(0, 4, 12, 24), seed=12345, effect=1.0)
    dyn = baseline_change(big.frequencies[big.frequencies.population == "Treg"])
    mean = dyn[dyn.visit > 0].groupby(["arm", "visit"])["change"].mean()
    hits: dict[tuple[str, str], list[bool]] = {}
    for r in range(100):
        cohort = simulate.simulate_cohort(n_patients=100, visits=(0, 4, 12, 24), seed=8000 + r, effect=1.0)
        for covariance in ("model", "robust"):
            res = run_statistics(
                cohort.frequencies,
                None,
                {
                    "families": ["mixed_arm_visit"],
                    "populations": ["Treg"],
                    "mixed_model_covariance": covariance,
                },
            )
            for row in res.itertuples():
                arm = row.comparison.removesuffix(" vs placebo")
                truth = mean[(arm, row.visit)] - mean[("placebo", row.visit)]
                hits.setdefault((covariance, arm), []).append(row.ci_low < truth < row.ci_high)
    coverage = {key: float(np.mean(v)) for key, v in hits.items()}
    assert all(c >= 0.85 for c in coverage.values()), coverage


def test_clinical_families_on_a_simulated_trial(il2_trial, tmp_path):
    cohort, res = il2_trial
    assert set(res["family"]) == set(FAMILIES)
    # SRI-4 is more frequent on IL-2 (the drug acts on the clinic through the Treg response)
    sri = res[(res.family == "response_rate") & (res.measure == "sri4") & (res.visit == 24)]
    pooled = sri[sri.comparison == "all active arms vs placebo"].iloc[0]
    assert pooled["estimate"] > 0 and pooled["p"] < 0.05
    # larger Treg rises go with larger SLEDAI falls (negative rho)
    cor = res[(res.family == "correlation") & (res.population == "Treg") & (res.endpoint == "sledai_change")]
    assert (cor[cor.visit >= 12]["estimate"] < 0).all()
    # every row that could not be computed says why
    assert res.loc[res.p.isna(), "note"].str.len().gt(0).all()
    path = tmp_path / "statistics.parquet"
    res.to_parquet(path)
    pd.testing.assert_frame_equal(pd.read_parquet(path), res)


def _binomial_upper(n: int, p: float = 0.05, level: float = 0.999) -> int:
    """Largest count of rejections out of n independent tests compatible with rate p (one-sided)."""
    return int(sps.binom.ppf(level, n, p))


def test_null_false_positive_rate_of_per_visit_arm_tests():
    """200 null trials (effect = 0, 80 patients, 15 populations x 3 visits x 3 arm comparisons).

    Criteria (all deterministic: trial r uses seed 1000 + r):
    1. per-test false-positive rate (p < 0.05 over all 200 x 135 tests) within 0.05 +- 3 SE, where
       SE comes from the 200 per-trial rates (trials are independent; tests within a trial are not:
       they share the placebo group and nested populations);
    2. one prespecified test (Treg, 1.0 MIU vs placebo, week 12): rejections in 200 independent
       trials <= the 99.9% binomial upper bound for rate 0.05 (22 of 200);
    3. family-wise: trials with any BH q < 0.05 in the family <= the same bound (under the global
       null, BH's FDR is its family-wise error rate, <= 5% under positive dependence).
    """
    rates, any_q, treg = [], [], []
    for r in range(200):
        cohort = simulate.simulate_cohort(n_patients=80, visits=(0, 4, 12, 24), seed=1000 + r, effect=0.0)
        res = run_statistics(cohort.frequencies, None, {"families": ["arm_visit"]})
        assert len(res) == 135 and res["p"].notna().all()
        rates.append(float(np.mean(res["p"] < 0.05)))
        any_q.append(bool((res["q"] < 0.05).any()))
        pick = res[
            (res.population == "Treg") & (res.visit == 12) & (res.comparison == "IL-2 1.0 MIU vs placebo")
        ]
        treg.append(bool(pick["p"].iloc[0] < 0.05))
    rates = np.asarray(rates)
    rate, se = rates.mean(), rates.std(ddof=1) / np.sqrt(len(rates))
    assert abs(rate - 0.05) <= 3 * se, f"per-test false-positive rate {rate:.4f} (SE {se:.4f})"
    bound = _binomial_upper(200)
    assert sum(treg) <= bound, f"Treg week-12 test rejected in {sum(treg)}/200 null trials"
    assert sum(any_q) <= bound, f"{sum(any_q)}/200 null trials had a BH discovery"


@pytest.mark.slow
def test_null_false_positive_rate_of_the_mixed_model():
    """200 null trials, Treg, Th17 and cTfh: the mixed model's arm x visit effects (p < 0.05) reject at
    0.05 +- 3 SE (SE from the per-trial rates) and its joint Wald test (mixed_arm) and linear dose
    term each reject in at most the 99.9% binomial upper bound of 200 x 3 trials-populations."""
    rates, overall, slope = [], [], []
    for r in range(200):
        cohort = simulate.simulate_cohort(n_patients=80, visits=(0, 4, 12, 24), seed=5000 + r, effect=0.0)
        res = run_statistics(
            cohort.frequencies,
            None,
            {
                "families": ["mixed_arm_visit", "mixed_arm", "mixed_dose_trend"],
                "populations": list(EXPECTED_SIGN),
            },
        )
        effects = res[res.family == "mixed_arm_visit"]
        assert effects["p"].notna().all()
        rates.append(float(np.mean(effects["p"] < 0.05)))
        overall += list(res[res.family == "mixed_arm"]["p"] < 0.05)
        slope += list(res[res.family == "mixed_dose_trend"]["p"] < 0.05)
    rates = np.asarray(rates)
    rate, se = rates.mean(), rates.std(ddof=1) / np.sqrt(len(rates))
    assert abs(rate - 0.05) <= 3 * se, f"mixed-model false-positive rate {rate:.4f} (SE {se:.4f})"
    # populations of one trial share patients, so this binomial bound is approximate (conservative
    # only for the independent part); it still catches an anti-conservative Wald test
    bound = _binomial_upper(len(overall))
    assert sum(overall) <= bound and sum(slope) <= bound


def test_docs_quick_start_runs(tmp_path, monkeypatch, capsys):
    """The Quick start of docs/statistics.md runs as written and prints the He 2020 p-values."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "statistics.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/statistics.md", "exec"), {})
    out = capsys.readouterr().out
    assert "0.0504" in out and "0.0672" in out
    assert (tmp_path / "statistics.parquet").is_file()
