"""Statistics on hand-computed examples, published reference values and small synthetic tables."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cytopipe.errors import ClinicalDataError, StatisticsError
from cytopipe.stats import (
    COLUMNS,
    FAMILIES,
    StatsSettings,
    add_qvalues,
    add_wilson_ci,
    arm_order,
    baseline_change,
    bh_qvalues,
    compare_rates,
    fit_mixed_model,
    hodges_lehmann,
    jonckheere_terpstra,
    mann_whitney,
    newcombe_interval,
    roc_auc,
    run_statistics,
    spearman,
    summarise_by_arm,
    time_averaged_auc,
    wilson_interval,
)
from cytopipe.stats.analyses import response_rate_tests
from cytopipe.stats.nonparametric import _order_counts
from cytopipe.stats.settings import parse_dose

ARMS = ["placebo", "IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU"]
DOSE = {"placebo": 0.0, "IL-2 0.2 MIU": 0.2, "IL-2 0.5 MIU": 0.5, "IL-2 1.0 MIU": 1.0}


def synthetic_trial(n=60, visits=(0, 4, 12, 24), seed=0, effect=1.0):
    """A small trial with known truth: Treg and NK rise with dose, Th17 falls; SLEDAI falls with dose."""
    rng = np.random.default_rng(seed)
    pops = {"Treg": (5.0, +1, "CD4 T"), "Th17": (2.0, -1, "Memory CD4"), "NK": (10.0, +1, "Live")}
    flow, clinical = [], []
    for i in range(n):
        pid, arm = f"P{i:03d}", ARMS[i % 4]
        dose = DOSE[arm]
        level = {p: rng.normal(0, 0.3) for p in pops}
        sledai0 = int(rng.integers(8, 20))
        for v in visits:
            on = float(v > 0)
            for p, (base, sign, parent) in pops.items():
                pct = base * np.exp(level[p] + sign * effect * dose * on * 0.6 + rng.normal(0, 0.15))
                parent_count = 10000
                count = int(round(pct / 100 * parent_count))
                flow.append(
                    dict(sample_id=f"{pid}_W{v:02d}", patient_id=pid, visit=v, arm=arm, population=p,
                         parent=parent, count=count, parent_count=parent_count,
                         pct_parent=100 * count / parent_count, median_CD25=rng.normal(1000, 50))
                )  # fmt: skip
            drop = rng.normal(3 + 4 * effect * dose, 3) * on
            clinical.append(
                dict(patient_id=pid, visit=v, arm=arm, sledai=max(0, int(sledai0 - drop)),
                     pga=float(np.clip(round(2.0 - 0.1 * drop + rng.normal(0, 0.2), 1), 0, 3)),
                     bilag_new_a=0, bilag_new_b=int(on and rng.random() < 0.1),
                     anti_dsdna=float(rng.lognormal(4, 1)), c3=float(abs(rng.normal(85, 15))),
                     c4=float(abs(rng.normal(15, 4))), proteinuria=float(abs(rng.normal(0.8, 0.5))),
                     prednisone_mg=10.0)
            )  # fmt: skip
    return pd.DataFrame(flow), pd.DataFrame(clinical)


@pytest.fixture(scope="module")
def trial():
    return synthetic_trial()


@pytest.fixture(scope="module")
def result(trial):
    flow, clinical = trial
    return run_statistics(flow, clinical)


# ------------------------------------------------------------------------------------------------
# response rates: He et al. 2020 and published interval examples
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("counts", "chi2_p", "fisher_p"),
    [((16, 29, 9, 30), 0.050, 0.067), ((19, 29, 11, 30), 0.027, 0.038)],
    ids=["week12", "week24"],
)
def test_he_2020_sri4_p_values(counts, chi2_p, fisher_p):
    """He et al., Ann Rheum Dis 2020: SRI-4 16/29 vs 9/30 (week 12), 19/29 vs 11/30 (week 24)."""
    chi2 = compare_rates(*counts)
    assert round(chi2.p, 3) == chi2_p
    assert chi2.method == "Pearson chi-square (no continuity correction)"
    assert round(compare_rates(*counts, method="fisher").p, 3) == fisher_p
    assert chi2.risk_difference == pytest.approx(counts[0] / counts[1] - counts[2] / counts[3])
    assert chi2.ci_low < chi2.risk_difference < chi2.ci_high


def test_he_2020_through_the_endpoint_table():
    """The same p-values from an endpoint table via the response-rate family of run_statistics."""
    rows = []
    for visit, (x1, x0) in ((12, (16, 9)), (24, (19, 11))):
        rows += [dict(patient_id=f"I{i}", arm="IL-2 1.0 MIU", visit=visit, sri4=i < x1) for i in range(29)]
        rows += [dict(patient_id=f"P{i}", arm="placebo", visit=visit, sri4=i < x0) for i in range(30)]
    endpoints = pd.DataFrame(rows)
    for col in ("renal_any", "renal_complete", "anti_dsdna_normalised", "c3_normalised", "c4_normalised"):
        endpoints[col] = pd.NA
    out = pd.DataFrame(response_rate_tests(endpoints, ["placebo", "IL-2 1.0 MIU"], StatsSettings()))
    sri = out[out["measure"] == "sri4"].set_index("visit")
    assert round(sri.loc[12, "p"], 3) == 0.050 and round(sri.loc[24, "p"], 3) == 0.027
    assert sri.loc[12, "n_detail"] == "IL-2 1.0 MIU 16/29, placebo 9/30"
    fisher = pd.DataFrame(
        response_rate_tests(endpoints, ["placebo", "IL-2 1.0 MIU"], StatsSettings(rate_test="fisher"))
    )
    assert fisher[fisher["measure"] == "sri4"]["p"].round(3).tolist() == [0.067, 0.038]
    # endpoints with no evaluable patients still get a row saying so
    assert (out[out["measure"] == "renal_any"]["note"] == "no evaluable patients in an arm").all()


def test_wilson_and_newcombe_match_published_examples():
    # Newcombe, Stat Med 1998;17:857 (single proportion) and 17:873 (difference, method 10)
    assert np.round(wilson_interval(81, 263), 4).tolist() == [0.2553, 0.3662]
    assert np.round(wilson_interval(15, 148), 4).tolist() == [0.0624, 0.1605]
    assert np.round(newcombe_interval(56, 70, 48, 80), 4).tolist() == [0.0524, 0.3339]
    assert np.round(newcombe_interval(9, 10, 3, 10), 4).tolist() == [0.1705, 0.8090]
    # 0/10 by hand: upper = z^2 / (n + z^2)
    z2 = sps.norm.ppf(0.975) ** 2
    assert wilson_interval(0, 10)[1] == pytest.approx(z2 / (10 + z2))
    low, high = wilson_interval([5, 0], [0, 4])
    assert np.isnan(low[0]) and high[1] > 0


def test_newcombe_matches_statsmodels():
    from statsmodels.stats.proportion import confint_proportions_2indep

    rng = np.random.default_rng(3)
    for _ in range(50):
        n1, n0 = (int(v) for v in rng.integers(1, 60, 2))
        x1, x0 = int(rng.integers(0, n1 + 1)), int(rng.integers(0, n0 + 1))
        ref = confint_proportions_2indep(x1, n1, x0, n0, method="newcomb", compare="diff")
        np.testing.assert_allclose(newcombe_interval(x1, n1, x0, n0), ref, rtol=1e-9, atol=1e-12)


def test_degenerate_rates_do_not_crash():
    assert np.isnan(compare_rates(0, 10, 0, 12, method="chi2").p)  # chi-square undefined
    assert compare_rates(0, 10, 0, 12, method="fisher").p == 1.0
    nobody = compare_rates(0, 10, 0, 12)  # expected counts of 0: the exact test, p = 1
    assert nobody.p == 1.0 and "no responder in either arm" in nobody.note
    assert "expected count" in compare_rates(1, 4, 3, 4).note
    assert np.isnan(compare_rates(0, 0, 3, 4).p)


def test_a_tiny_arm_gets_fishers_exact_test_not_a_chi_square_p():
    """Small expected counts (a one-patient arm, 3-patient arms): the default rate test is
    Fisher's exact (scipy's p), with a note saying why; large arms keep Pearson's chi-square
    (scipy's chi2_contingency without correction). Through the response-rate family as well."""
    for counts in ((1, 1, 0, 3), (0, 1, 2, 3), (3, 3, 0, 3), (2, 3, 1, 4)):
        x1, n1, x0, n0 = counts
        table = [[x1, n1 - x1], [x0, n0 - x0]]
        r = compare_rates(*counts)
        assert r.method == "Fisher exact (two-sided)"
        assert r.p == pytest.approx(sps.fisher_exact(table).pvalue, rel=1e-12)
        expected = sps.contingency.expected_freq(table).min()
        assert f"smallest expected count {expected:.1f} < 5" in r.note
        # the chi-square is still there on request, with its warning
        forced = compare_rates(*counts, method="chi2")
        assert forced.p == pytest.approx(sps.chi2_contingency(table, correction=False).pvalue)
        assert "consider" in forced.note
    big = compare_rates(16, 29, 9, 30)  # every expected count >= 5: the chi-square
    assert big.method == "Pearson chi-square (no continuity correction)" and big.note == ""
    assert big.p == pytest.approx(sps.chi2_contingency([[16, 13], [9, 21]], correction=False).pvalue)

    rows = [dict(patient_id="I0", arm="IL-2 1.0 MIU", visit=4, sri4=True)]
    rows += [dict(patient_id=f"P{i}", arm="placebo", visit=4, sri4=i < 1) for i in range(5)]
    endpoints = pd.DataFrame(rows)
    for col in ("renal_any", "renal_complete", "anti_dsdna_normalised", "c3_normalised", "c4_normalised"):
        endpoints[col] = pd.NA
    out = pd.DataFrame(response_rate_tests(endpoints, ["placebo", "IL-2 1.0 MIU"], StatsSettings()))
    sri = out[out["measure"] == "sri4"].iloc[0]
    assert sri["method"] == "Fisher exact (two-sided)" and np.isnan(sri["df"])
    assert sri["p"] == pytest.approx(sps.fisher_exact([[1, 0], [1, 4]]).pvalue)
    assert sri["statistic"] == pytest.approx(sps.fisher_exact([[1, 0], [1, 4]]).statistic)
    assert "Fisher exact test: smallest expected count" in sri["note"]


# ------------------------------------------------------------------------------------------------
# rank tests
# ------------------------------------------------------------------------------------------------
def test_mann_whitney_equals_scipy_and_hodges_lehmann_by_hand():
    rng = np.random.default_rng(3)
    for i in range(200):
        x = rng.normal(size=rng.integers(1, 14))
        y = rng.normal(0.7, size=rng.integers(1, 14))
        if i % 3 == 0:
            x, y = np.round(x), np.round(y)
        ours, ref = mann_whitney(x, y), sps.mannwhitneyu(x, y)
        if np.isnan(ours.p):
            assert np.unique(np.concatenate([x, y])).size == 1
            continue
        assert ours.statistic == ref.statistic
        assert ours.p == pytest.approx(ref.pvalue, rel=1e-12, abs=1e-15)
    # HL: pairwise differences of [1,2,3] - [0,0] are 1,1,2,2,3,3 -> median 2
    assert hodges_lehmann([1, 2, 3], [0, 0])[0] == 2.0
    r = mann_whitney(np.arange(20) + 5.0, np.arange(20))
    assert r.estimate == 5.0 and r.ci_low < 5.0 < r.ci_high
    assert np.isnan(mann_whitney([1, 1, 1], [1, 1]).p)  # constant values: no test
    assert mann_whitney([1.0, np.nan, 2.0], [3.0, 4.0]).n_x == 2  # NaNs removed


def test_exact_null_distribution_equals_enumeration():
    for sizes in ((2, 2, 3), (1, 3), (3, 3), (2, 3, 2, 1)):
        labels = [g for g, n in enumerate(sizes) for _ in range(n)]
        counts = Counter()
        for perm in set(itertools.permutations(labels)):
            counts[sum(a < b for i, a in enumerate(perm) for b in perm[i + 1 :])] += 1
        assert _order_counts(sizes) == tuple(counts[j] for j in range(max(counts) + 1))


def test_jonckheere_terpstra_known_example():
    """Bewick, Cheek & Ball, Crit Care 2004;8:R131 (statistics review 10): ICU length of stay,
    cardiothoracic < medical < neurosurgical: U12 = 23, U13 = 34.5, U23 = 19.5, J = 77, P = 0.005."""
    cardiothoracic = [7, 1, 2, 6, 11, 8]
    medical = [4, 7, 16, 11, 21]
    neurosurgical = [20, 25, 13, 9, 14, 11]
    r = jonckheere_terpstra([cardiothoracic, medical, neurosurgical], alternative="increasing")
    assert r.statistic == 77 and r.mean == 48
    assert round(r.p, 3) == 0.005
    # untied variance (N^2(2N+3) - sum n^2(2n+3)) / 72 = 129; ties (7 twice, 11 three times) reduce it
    assert r.variance < 129 and r.variance == pytest.approx(128.1397, abs=1e-4)
    assert r.tau > 0
    perm = jonckheere_terpstra(
        [cardiothoracic, medical, neurosurgical], alternative="increasing", method="permutation", seed=1
    )
    assert perm.p == pytest.approx(r.p, abs=0.003)
    down = jonckheere_terpstra([neurosurgical, medical, cardiothoracic], alternative="decreasing")
    assert down.p == pytest.approx(r.p) and down.tau == pytest.approx(-r.tau)


def test_jonckheere_two_groups_is_mann_whitney_and_exact_is_exact():
    rng = np.random.default_rng(5)
    for _ in range(30):
        a, b = np.round(rng.normal(size=12), 1), np.round(rng.normal(0.5, size=15), 1)
        jt = jonckheere_terpstra([a, b], method="asymptotic")
        mw = sps.mannwhitneyu(b, a, use_continuity=False, method="asymptotic")
        assert jt.statistic == mw.statistic  # J = #(a < b) + ties/2 = U of b
        assert jt.p == pytest.approx(mw.pvalue, rel=1e-10)
    x = [[1.1, 2.3], [0.7, 3.9, 4.2], [5.5, 2.8]]
    exact = jonckheere_terpstra(x, alternative="increasing", method="exact")
    # by hand: J = #(g1<g2)=4 + #(g1<g3)=4 + #(g2<g3)=4 (0.7 < both; 3.9, 4.2 < 5.5) = 12 of 16 pairs
    counts = _order_counts((2, 3, 2))
    assert exact.statistic == 12 and exact.tau == pytest.approx(2 * 12 / 16 - 1)
    assert exact.p == pytest.approx(sum(counts[12:]) / sum(counts))


def test_spearman_ci_by_hand():
    rng = np.random.default_rng(2)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    r = spearman(x, y)
    rho = sps.spearmanr(x, y).statistic
    half = sps.norm.ppf(0.975) * np.sqrt(1.06 / 27)
    assert r.rho == pytest.approx(rho)
    assert (r.ci_low, r.ci_high) == pytest.approx(
        (np.tanh(np.arctanh(rho) - half), np.tanh(np.arctanh(rho) + half))
    )
    assert np.isnan(spearman([1, 2, 3], [3, 2, 1]).p)  # too few pairs
    assert "constant" in spearman(np.ones(10), np.arange(10)).note


def test_roc_auc_is_the_mann_whitney_probability():
    pos, neg = np.array([3.0, 4, 5, 6]), np.array([1.0, 2, 3.5, 0])
    r = roc_auc(np.concatenate([pos, neg]), [1] * 4 + [0] * 4)
    # pairs with pos > neg: 3 beats 1,2,0 (3); 4,5,6 beat all four (12) -> 15/16
    assert r.auc == pytest.approx(15 / 16)
    assert 0 <= r.ci_low < r.auc <= r.ci_high <= 1


# ------------------------------------------------------------------------------------------------
# multiplicity
# ------------------------------------------------------------------------------------------------
def test_bh_q_values_equal_hand_computation():
    # sorted p .01 .03 .04 .2 -> raw p*m/rank .04 .06 .0533 .2 -> cumulative minimum from the top
    q = bh_qvalues([0.01, 0.04, 0.03, 0.2, np.nan])
    assert q[:4] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert np.isnan(q[4])
    # Holm-Sidak (the statsmodels default) would differ: make sure we are not using it
    from statsmodels.stats.multitest import multipletests

    assert not np.allclose(q[:4], multipletests([0.01, 0.04, 0.03, 0.2])[1])
    table = pd.DataFrame({"family": ["a", "a", "b", "b"], "measure": ["m"] * 4, "p": [0.01, 0.02, 0.01, 0.5]})
    assert add_qvalues(table)["q"].tolist() == pytest.approx([0.02, 0.02, 0.02, 0.5])


def test_q_values_in_results_are_bh_within_family_and_measure(result):
    from statsmodels.stats.multitest import multipletests

    for (family, _measure), group in result.groupby(["family", "measure"]):
        ok = group["p"].notna()
        # the reference: statsmodels' Benjamini-Hochberg on the family's finite p-values
        expected = multipletests(group.loc[ok, "p"], method="fdr_bh")[1]
        assert np.allclose(group.loc[ok, "q"], expected), family
        assert group.loc[~ok, "q"].isna().all(), family


# ------------------------------------------------------------------------------------------------
# dynamics
# ------------------------------------------------------------------------------------------------
def _pop_rows(values, visits=(0, 4, 12, 24), patient="P1", arm="placebo", counts=None):
    rows = []
    for i, (v, x) in enumerate(zip(visits, values)):
        if x is None:
            continue
        row = dict(patient_id=patient, visit=v, arm=arm, population="Treg", parent="CD4 T", pct_parent=x)
        if counts is not None:
            row.update(count=counts[i], parent_count=1000)
        rows.append(row)
    return rows


def test_change_log2_fold_and_haldane_pseudocount():
    dyn = baseline_change(pd.DataFrame(_pop_rows([2.0, 4.0, 1.0, 0.0]))).set_index("visit")
    assert dyn["change"].tolist() == [0.0, 2.0, -1.0, -2.0]
    # no counts: log2((x + 0.01) / (2 + 0.01))
    assert dyn.loc[4, "log2fc"] == pytest.approx(np.log2(4.01 / 2.01))
    assert np.isfinite(dyn.loc[24, "log2fc"])
    # with counts: Haldane-Anscombe 100 (count + 0.5) / (parent_count + 1)
    counted = baseline_change(
        pd.DataFrame(_pop_rows([2.0, 4.0, 1.0, 0.0], counts=[20, 40, 10, 0]))
    ).set_index("visit")
    assert counted.loc[24, "log2fc"] == pytest.approx(np.log2(0.5 / 20.5))
    assert counted.loc[4, "log2fc"] == pytest.approx(np.log2(40.5 / 20.5))
    # a patient without a baseline sample keeps its rows, with missing changes
    nobase = baseline_change(pd.DataFrame(_pop_rows([None, 4.0, 1.0, 2.0])))
    assert len(nobase) == 3 and nobase["change"].isna().all()


def test_duplicate_samples_are_an_error_unless_averaged():
    rows = _pop_rows([2.0, 4.0, 1.0, 3.0]) + _pop_rows([2.0, 6.0], visits=(0, 4))[1:]
    with pytest.raises(StatisticsError, match="share a patient, population and visit"):
        baseline_change(pd.DataFrame(rows))
    dyn = baseline_change(pd.DataFrame(rows), duplicates="mean").set_index("visit")
    assert dyn.loc[4, "value"] == 5.0 and dyn.loc[4, "n_samples"] == 2


def test_population_table_errors_name_the_column():
    with pytest.raises(StatisticsError, match="lacks column") as info:
        baseline_change(pd.DataFrame(_pop_rows([1.0, 2.0])), measure="median_CD25")
    assert info.value.context["column"] == "median_CD25"
    bad = pd.DataFrame(_pop_rows([1.0, 2.0]))
    bad["visit"] = bad["visit"].astype(object)
    bad.loc[1, "visit"] = "Month 1"  # (wk4 is week 4 since text visits are read)
    with pytest.raises(StatisticsError, match="visit is .Month 1.: months are no whole number of weeks"):
        baseline_change(bad)


def test_time_averaged_auc_by_hand():
    dyn = baseline_change(pd.DataFrame(_pop_rows([1.0, 3.0, 5.0, 5.0])))
    auc = time_averaged_auc(dyn).set_index("window")
    # 0-12: (4 * (1+3)/2 + 8 * (3+5)/2) / 12 = 40/12; 0-24 adds 12 * 5 = 60 -> 100/24
    assert auc.loc["0-12", "auc_value"] == pytest.approx(40 / 12)
    assert auc.loc["0-24", "auc_value"] == pytest.approx(100 / 24)
    assert auc.loc["0-24", "auc_change"] == pytest.approx(100 / 24 - 1)
    assert auc.loc["all", "auc_value"] == pytest.approx(100 / 24) and auc.loc["all", "end"] == 24
    # week 4 missing: bridged linearly (trapezoid 0 -> 12); week 24 missing: no 0-24, "all" ends at 12
    gap = time_averaged_auc(baseline_change(pd.DataFrame(_pop_rows([1.0, None, 5.0, None])))).set_index(
        "window"
    )
    assert gap.loc["0-12", "auc_value"] == pytest.approx(3.0)
    assert np.isnan(gap.loc["0-24", "auc_value"])
    assert gap.loc["all", "auc_value"] == pytest.approx(3.0) and gap.loc["all", "end"] == 12


def test_add_wilson_ci_in_percent(trial):
    flow, _ = trial
    out = add_wilson_ci(flow.head(3))
    low, high = wilson_interval(flow["count"].head(3), flow["parent_count"].head(3))
    assert np.allclose(out["pct_ci_low"], 100 * low) and np.allclose(out["pct_ci_high"], 100 * high)
    assert (out["pct_ci_low"] <= out["pct_parent"]).all() and (out["pct_parent"] <= out["pct_ci_high"]).all()
    with pytest.raises(StatisticsError, match="event counts"):
        add_wilson_ci(flow.drop(columns=["count"]))


def test_arm_order_from_names_and_settings():
    s = StatsSettings()
    assert parse_dose("IL-2 0.5 MIU") == 0.5 and parse_dose("IL-2 high") is None
    assert arm_order(ARMS[::-1], s) == (ARMS, "")
    order, reason = arm_order(["placebo", "A", "B"], s)
    assert order is None and "arm_doses" in reason
    assert arm_order(["placebo", "A", "B"], StatsSettings(arm_doses={"placebo": 0, "A": 2, "B": 1}))[0] == [
        "placebo",
        "B",
        "A",
    ]


# ------------------------------------------------------------------------------------------------
# run_statistics on a synthetic trial with planted effects
# ------------------------------------------------------------------------------------------------
def test_result_table_contract(result, tmp_path):
    assert list(result.columns) == list(COLUMNS)
    assert set(result["family"]) == set(FAMILIES) - set()  # every family is produced
    path = tmp_path / "statistics.parquet"
    result.to_parquet(path)
    again = pd.read_parquet(path)
    pd.testing.assert_frame_equal(again, result)


def test_planted_effects_are_found_with_the_right_sign(result):
    r = result
    arm = r[(r.family == "arm_visit") & (r.comparison == "IL-2 1.0 MIU vs placebo")]
    for pop, sign in (("Treg", 1), ("NK", 1), ("Th17", -1)):
        sub = arm[arm.population == pop]
        assert (sub["q"] < 0.01).all() and (np.sign(sub["estimate"]) == sign).all(), pop
        trend = r[(r.family == "dose_trend") & (r.population == pop)]
        assert (trend["q"] < 0.01).all() and (np.sign(trend["estimate"]) == sign).all()
        slope = r[(r.family == "mixed_dose_trend") & (r.population == pop)].iloc[0]
        assert slope["p"] < 1e-6 and np.sign(slope["estimate"]) == sign
        mixed = r[(r.family == "mixed_arm_visit") & (r.population == pop) & (r.visit == 12)].set_index(
            "comparison"
        )
        effects = [mixed.loc[f"{a} vs placebo", "estimate"] for a in ARMS[1:]]
        assert np.all(np.diff(sign * np.array(effects)) > 0)  # monotone in dose
    # no planted change over time within an arm: the interaction test stays quiet
    assert (r[r.family == "mixed_interaction"]["p"] > 0.001).all()
    # SLEDAI falls with dose, so SRI-4 response is higher on 1.0 MIU than on placebo at week 12
    rate = r[(r.family == "response_rate") & (r.measure == "sri4") & (r.visit == 12)].set_index("comparison")
    assert rate.loc["IL-2 1.0 MIU vs placebo", "estimate"] > 0.2


def test_run_statistics_is_deterministic_and_measure_agnostic(trial, result):
    flow, clinical = trial
    pd.testing.assert_frame_equal(run_statistics(flow, clinical), result)
    # an MFI measure and cluster names work the same way (no effect planted on median_CD25)
    clusters = flow.assign(population=flow["population"].map({"Treg": "MC01", "Th17": "MC02", "NK": "MC03"}))
    mfi = run_statistics(clusters, None, {"measures": ["median_CD25"], "change_scale": "log2fc"})
    assert set(mfi["population"].dropna()) == {"MC01", "MC02", "MC03"}
    assert set(mfi["measure"]) == {"median_CD25"} and set(mfi["scale"].dropna()) <= {"log2fc", "auc_log2fc"}
    assert mfi[mfi.family == "arm_visit"]["p"].notna().all()
    assert "response_rate" not in set(mfi["family"])  # no clinical table, no clinical families


def test_too_few_patients_give_rows_with_notes_not_crashes(trial):
    flow, clinical = trial
    keep = set(flow[flow.arm == "IL-2 0.2 MIU"]["patient_id"].unique()[:2]) | set(
        flow[flow.arm != "IL-2 0.2 MIU"]["patient_id"]
    )
    small = flow[flow.patient_id.isin(keep)]
    res = run_statistics(small, clinical[clinical.patient_id.isin(keep)])
    thin = res[(res.family == "arm_visit") & (res.comparison == "IL-2 0.2 MIU vs placebo")]
    assert len(thin) == 9 and thin["p"].isna().all()
    assert thin["note"].str.contains("too few patients").all()
    assert res[res.family == "dose_trend"]["note"].str.contains("too few patients").all()
    mixed = res[(res.family == "mixed_arm_visit") & (res.comparison == "IL-2 0.2 MIU vs placebo")]
    assert mixed["p"].isna().all() and mixed["note"].str.contains("too few patients").all()
    # the other arms are still analysed
    assert res[(res.family == "mixed_arm_visit") & res.p.notna()].shape[0] == 18


def test_constant_values_and_singular_models_give_nan_with_a_note():
    flow, _ = synthetic_trial(n=24, seed=4)
    flow.loc[flow.population == "NK", "pct_parent"] = 7.0  # constant: no rank test, no model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # statsmodels warnings must be caught and turned into notes
        res = run_statistics(flow.drop(columns=["count", "parent_count"]), None)
    nk = res[res.population == "NK"]
    for family in ("arm_visit", "mixed_arm_visit", "mixed_arm", "dose_trend"):
        rows = nk[nk.family == family]
        assert len(rows) and rows["p"].isna().all() and rows["note"].str.len().gt(0).all(), family
    assert res[(res.population == "Treg") & (res.family == "mixed_arm_visit")]["p"].notna().all()


def test_boundary_random_effect_keeps_valid_inference():
    """No patient-level correlation at all: the random-intercept variance is 0 (statsmodels warns);
    the fixed effects then equal OLS and keep their inference, with a note."""
    rng = np.random.default_rng(11)
    rows = []
    for i in range(40):
        arm = ARMS[i % 2 * 3]  # placebo / 1.0 MIU
        for v in (4, 12):
            rows.append(dict(patient_id=f"P{i}", arm=arm, visit=v, baseline=rng.normal(), y=rng.normal()))
    data = pd.DataFrame(rows)
    fit = fit_mixed_model(data, "y", ["placebo", "IL-2 1.0 MIU"], "placebo")
    assert fit.converged and fit.effects["p"].notna().all()
    assert "random-intercept variance estimated at 0" in fit.note  # seed 11 lands on the boundary
    import statsmodels.api as sm

    x = np.column_stack(
            [data.visit == 4, data.visit == 12, (data.arm != "placebo") & (data.visit == 4),
             (data.arm != "placebo") & (data.visit == 12), data.baseline - data.baseline.mean()]
    ).astype(float)  # fmt: skip
    ols = sm.OLS(data["y"].to_numpy(), x).fit()
    assert fit.effects["estimate"].tolist() == pytest.approx(ols.params[2:4].tolist(), rel=1e-4)
    assert fit.effects["se"].tolist() == pytest.approx(ols.bse[2:4].tolist(), rel=1e-3)


def test_missing_reference_arm_is_reported_not_dropped(trial):
    flow, _ = trial
    res = run_statistics(flow, None, {"reference_arm": "vehicle", "mixed_model": False})
    arm = res[res.family == "arm_visit"]
    assert len(arm) == 3 and arm["note"].str.contains("reference arm 'vehicle'").all()


def test_clinical_problems_surface_from_run_statistics(trial):
    flow, clinical = trial
    with pytest.raises(ClinicalDataError, match="no clinical rows"):
        run_statistics(flow, clinical[clinical.patient_id != "P001"], {"mixed_model": False})


def test_settings_validation():
    with pytest.raises(StatisticsError, match="unknown statistics setting"):
        StatsSettings.from_any({"measure": "pct_parent"})
    with pytest.raises(StatisticsError, match="change_scale"):
        StatsSettings(change_scale="percent")
    s = StatsSettings.from_any(
        {"measures": "pct_parent", "clinical": {"sri_thresholds": [4, 6]}, "baseline_visit": 2}
    )
    assert s.measures == ("pct_parent",) and s.clinical.sri_thresholds == (4, 6)
    assert s.clinical.baseline_visit == 2  # one baseline for flow and clinic


def test_robust_mixed_model_covariance_is_clustered_hc3():
    """With one post-baseline visit per patient the patient-clustered CR3 sandwich is the HC3
    heteroscedasticity-consistent covariance of the same (OLS) fit, times (G - 1) / G."""
    import statsmodels.api as sm

    rng = np.random.default_rng(8)
    arm = np.array(["placebo", "IL-2 1.0 MIU"] * 30)
    base = rng.normal(size=60)
    y = 1.0 * (arm != "placebo") + 0.5 * base + rng.normal(size=60) * np.where(arm == "placebo", 0.5, 2.0)
    data = pd.DataFrame(
        {"patient_id": [f"P{i}" for i in range(60)], "arm": arm, "visit": 12, "baseline": base, "y": y}
    )
    model = fit_mixed_model(data, "y", ["placebo", "IL-2 1.0 MIU"], "placebo")
    robust = fit_mixed_model(data, "y", ["placebo", "IL-2 1.0 MIU"], "placebo", covariance="robust")
    x = np.column_stack([np.ones(60), arm != "placebo", base - base.mean()]).astype(float)
    hc3 = sm.OLS(y, x).fit(cov_type="HC3")
    assert robust.effects["estimate"].iloc[0] == pytest.approx(hc3.params[1], rel=1e-4)
    assert robust.effects["se"].iloc[0] == pytest.approx(hc3.bse[1] * np.sqrt(59 / 60), rel=1e-3)
    assert robust.effects["estimate"].iloc[0] == pytest.approx(model.effects["estimate"].iloc[0])
    # t(G - 1) reference for the robust p-value
    t = robust.effects["estimate"].iloc[0] / robust.effects["se"].iloc[0]
    assert robust.effects["p"].iloc[0] == pytest.approx(2 * sps.t.sf(abs(t), 59))


def test_summarise_by_arm_by_hand():
    rows = _pop_rows([1.0, 3.0], visits=(0, 4), patient="A") + _pop_rows(
        [3.0, 7.0], visits=(0, 4), patient="B"
    )
    summary = summarise_by_arm(baseline_change(pd.DataFrame(rows)), percent=False).set_index("visit")
    week4 = summary.loc[4]
    assert (week4["n"], week4["mean"], week4["mean_change"], week4["median"]) == (2, 5.0, 3.0, 5.0)
    # t interval with 1 df: mean +- t(0.975, 1) * sd / sqrt(2); sd of (3, 7) = 2 sqrt(2)
    assert week4["ci_high"] - 5.0 == pytest.approx(sps.t.ppf(0.975, 1) * 2.0)
    # percentages (the default for pct_parent): the same half-width moved to the logit scale by the
    # delta method, so the interval stays inside 0-100 (the t interval above reaches below 0)
    pct = summarise_by_arm(baseline_change(pd.DataFrame(rows))).set_index("visit").loc[4]
    half = sps.t.ppf(0.975, 1) * 2.0 / 100 / (0.05 * 0.95)
    logit = np.log(0.05 / 0.95)
    assert pct["ci_low"] == pytest.approx(100 / (1 + np.exp(-(logit - half))))
    assert pct["ci_high"] == pytest.approx(100 / (1 + np.exp(-(logit + half))))
    assert week4["ci_low"] < 0 < pct["ci_low"] < 5.0 < pct["ci_high"] < 100


def test_blind_arms_leaves_no_arm_name(result):
    from cytopipe.stats import blind_arms

    codes = {arm: f"Arm {letter}" for arm, letter in zip(ARMS, "ABCD")}
    blinded = blind_arms(result, codes)
    text = " ".join(blinded.select_dtypes(include=["string", "object"]).astype(str).to_numpy().ravel())
    for arm in ARMS:
        assert arm not in text
    assert "Arm D vs Arm A" in set(blinded["comparison"])
    pd.testing.assert_frame_equal(blinded[["p", "q", "estimate"]], result[["p", "q", "estimate"]])
