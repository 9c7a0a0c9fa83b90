"""Small-sample inference of the mixed model (Satterthwaite t / F references, cytopipe.stats.smallsample).

* exact cases with a known answer: one post-baseline visit per patient (the mixed model is then an
  ordinary regression: its t and F tests must equal OLS's, df = n - k), and a between-patient
  contrast in a balanced trial (exactly t(G - arms - 1), the regression of the patient means);
* type-I error on null trials from the simulator (tables only, no FCS) with 4-20 patients per arm:
  p < 0.05 in no more trials than the binomial bound of a 5 % test allows (a few hundred trials in
  the default suite, thousands with ``-m slow``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cytopipe import simulate
from cytopipe.stats import baseline_change, fit_mixed_model

ARMS = ["placebo", "IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU"]
DOSE = {"placebo": 0.0, "IL-2 0.2 MIU": 0.2, "IL-2 0.5 MIU": 0.5, "IL-2 1.0 MIU": 1.0}


def _dose_weights(active: list[str]) -> np.ndarray:
    """The dose slope's weights on the active arms' effects (reference effect 0)."""
    d = np.array([DOSE[a] for a in ARMS])
    return np.array([(DOSE[a] - d.mean()) / np.sum((d - d.mean()) ** 2) for a in active])


def _trial(rng, per_arm: int, visits, patient_sd: float, noise_sd: float) -> pd.DataFrame:
    rows = []
    for i in range(per_arm * len(ARMS)):
        arm, u, base = ARMS[i % len(ARMS)], rng.normal(0, patient_sd), rng.normal(5, 1)
        for v in visits:
            y = 0.3 * (base - 5) + u + rng.normal(0, noise_sd)
            rows.append(dict(patient_id=f"P{i:02d}", arm=arm, visit=v, baseline=base, y=y))
    return pd.DataFrame(rows)


def test_one_visit_per_patient_gives_the_exact_ols_t_and_f_tests():
    """16 patients, one post-baseline visit: y = X b + e exactly (the patient effect is not separable
    from the residual), so each effect, the dose slope and the joint test are OLS t / F tests with
    n - k = 16 - 5 = 11 df (the normal reference would claim p = 0.05 where t(11) gives 0.077)."""
    import statsmodels.api as sm

    data = _trial(np.random.default_rng(3), 4, [12], patient_sd=1.0, noise_sd=0.7)
    fit = fit_mixed_model(data, "y", ARMS, "placebo", doses=DOSE)
    assert fit.converged
    active = ARMS[1:]
    x = np.column_stack(
        [np.ones(len(data))]
        + [(data["arm"] == a).to_numpy(float) for a in active]
        + [data["baseline"] - data["baseline"].mean()]
    )
    ols = sm.OLS(data["y"].to_numpy(), x).fit()
    effects = fit.effects.set_index("arm").loc[active]
    assert effects["estimate"].tolist() == pytest.approx(ols.params[1:4].tolist(), rel=1e-5)
    assert effects["df"].tolist() == pytest.approx([11.0] * 3, rel=1e-6)
    assert effects["p"].tolist() == pytest.approx(ols.pvalues[1:4].tolist(), rel=1e-4)
    lo, hi = ols.conf_int()[1:4].T
    assert effects["ci_low"].tolist() == pytest.approx(lo.tolist(), rel=1e-4)
    assert effects["ci_high"].tolist() == pytest.approx(hi.tolist(), rel=1e-4)
    r = np.r_[0.0, _dose_weights(active), 0.0]
    slope = ols.t_test(r)
    assert fit.dose_slope[0] == pytest.approx(float(slope.effect[0]), rel=1e-5)
    assert fit.dose_slope_df == pytest.approx(11.0, rel=1e-6)
    assert fit.dose_slope[3] == pytest.approx(float(slope.pvalue), rel=1e-4)
    joint = ols.f_test(np.eye(5)[1:4])
    assert fit.overall[2] == pytest.approx(float(joint.pvalue), rel=1e-4)


def test_a_between_patient_contrast_in_a_balanced_trial_has_the_exact_df():
    """24 patients (6 per arm) at 3 visits, all present: the dose slope averages each arm's effect
    over the visits, a contrast between patients. Its exact reference is the regression of the
    patient means on arm and baseline: t with G - arms - 1 = 19 df, whatever the variances."""
    import statsmodels.api as sm

    data = _trial(np.random.default_rng(5), 6, [4, 12, 24], patient_sd=1.0, noise_sd=0.5)
    fit = fit_mixed_model(data, "y", ARMS, "placebo", doses=DOSE)
    assert fit.converged and not fit.note  # an interior fit (not the boundary)
    means = data.groupby("patient_id").agg(
        arm=("arm", "first"), baseline=("baseline", "first"), y=("y", "mean")
    )
    active = ARMS[1:]
    x = np.column_stack(
        [np.ones(len(means))]
        + [(means["arm"] == a).to_numpy(float) for a in active]
        + [means["baseline"] - means["baseline"].mean()]
    )
    test = sm.OLS(means["y"].to_numpy(), x).fit().t_test(np.r_[0.0, _dose_weights(active), 0.0])
    assert fit.dose_slope[0] == pytest.approx(float(test.effect[0]), rel=1e-4)
    assert fit.dose_slope[1] == pytest.approx(float(test.sd[0, 0]), rel=1e-3)
    assert fit.dose_slope_df == pytest.approx(19.0, rel=1e-3)
    assert fit.dose_slope[3] == pytest.approx(float(test.pvalue), rel=1e-3)


def _null_rejections(n_trials: int, per_arm: int, visits, seed: int) -> dict[str, np.ndarray]:
    """p < 0.05 of the Treg mixed model in ``n_trials`` null trials (effect 0) of ``per_arm`` patients
    per arm: consecutive blocks of one large simulated cohort (arms in permuted blocks of four, every
    patient from its own random stream, so the blocks are independent trials)."""
    n = 4 * per_arm
    cohort = simulate.simulate_cohort(n_patients=n * n_trials, visits=visits, seed=seed, effect=0.0)
    dyn = baseline_change(cohort.frequencies[cohort.frequencies["population"] == "Treg"])
    post = dyn[dyn["visit"] > 0].copy()
    post["trial"] = post["patient_id"].str.extract(r"(\d+)", expand=False).astype(int).sub(1) // n
    out: dict[str, list] = {"slope": [], "overall": [], "effect": []}
    for _, trial in post.groupby("trial", sort=True):
        assert (trial.groupby("arm")["patient_id"].nunique() == per_arm).all()
        fit = fit_mixed_model(trial, "change", ARMS, "placebo", doses=DOSE)
        assert fit.converged and np.isfinite(fit.dose_slope[3]), fit.note
        out["slope"].append(fit.dose_slope[3] < 0.05)
        out["overall"].append(fit.overall[2] < 0.05)
        out["effect"].append(np.mean(fit.effects["p"] < 0.05))
    return {k: np.asarray(v) for k, v in out.items()}


def _band(n: int, level: float = 0.999) -> tuple[int, int]:
    """Counts of rejections out of n independent 5 % tests outside which the rate is not 5 %
    (two-sided, ``level``)."""
    return int(sps.binom.ppf((1 - level) / 2, n, 0.05)), int(sps.binom.ppf((1 + level) / 2, n, 0.05))


def test_null_type_one_error_with_four_patients_per_arm():
    """200 null trials of 16 patients (4 per arm, as the random-instrument trials), 2 post-baseline
    visits: the dose trend and the joint test reject in at most the 99.9 % binomial upper bound of a
    5 % test (20 of 200), the per-effect rate likewise (rate from the per-trial means)."""
    got = _null_rejections(200, 4, (0, 4, 12), seed=61000)
    low, high = _band(200)
    print(f"\ndose slope {got['slope'].sum()}/200, joint {got['overall'].sum()}/200, "
          f"per effect {got['effect'].mean():.4f}; band {low}-{high}")  # fmt: skip
    assert got["slope"].sum() <= high and got["overall"].sum() <= high
    assert got["effect"].mean() <= high / 200


@pytest.mark.slow
@pytest.mark.parametrize(
    "per_arm,visits", [(4, (0, 12)), (4, (0, 4, 12, 24)), (8, (0, 4, 12, 24)), (20, (0, 4, 12))]
)
def test_null_type_one_error_within_the_binomial_band(per_arm, visits):
    """1000 null trials per design: the dose trend's and the joint test's rejections lie inside the
    two-sided 99.9 % binomial band of a 5 % test (neither anti-conservative nor far too strict)."""
    got = _null_rejections(1000, per_arm, visits, seed=62000 + per_arm * 10 + len(visits))
    low, high = _band(1000)
    print(f"\n{per_arm}/arm {visits}: dose slope {got['slope'].sum()}/1000, joint "
          f"{got['overall'].sum()}/1000, per effect {got['effect'].mean():.4f}; band {low}-{high}")  # fmt: skip
    assert low <= got["slope"].sum() <= high
    assert low <= got["overall"].sum() <= high
