"""Trial edge cases of the statistics, each checked against an independent reference
(statsmodels / scipy called directly on the same data, or a closed form)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from cytopipe.stats import baseline_change, fit_mixed_model, run_statistics

ARMS = ["placebo", "IL-2 0.5 MIU", "IL-2 1.0 MIU"]


def _trial(per_arm=(6, 6, 6), visits=(0, 4, 12), seed=0, effect=(0.0, 1.5, 3.0)):
    """One population, ``per_arm`` patients per arm of ARMS, normal changes with arm effects."""
    rng = np.random.default_rng(seed)
    rows = []
    pid = 0
    for arm, n, eff in zip(ARMS, per_arm, effect):
        for _ in range(n):
            pid += 1
            base = rng.normal(8, 2)
            patient = rng.normal(0, 1)
            for v in visits:
                value = base if v == 0 else base + eff * v / max(visits) + patient + rng.normal(0, 1)
                rows.append(
                    {
                        "patient_id": f"P{pid:03d}",
                        "visit": v,
                        "arm": arm,
                        "population": "Treg",
                        "pct_parent": value,
                    }
                )
    return pd.DataFrame(rows)


def _statsmodels_effects(post: pd.DataFrame, arms: list[str], formula: str = "+ bc") -> pd.Series:
    """Arm x visit effects of change ~ C(visit) + C(visit):arm + baseline, random intercept (REML)."""
    import statsmodels.formula.api as smf

    data = post.copy()
    data["bc"] = data["baseline"] - data["baseline"].mean()
    data["arm"] = pd.Categorical(data["arm"], categories=arms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smf.mixedlm(f"change ~ C(visit) + C(visit):arm {formula}", data, groups=data["patient_id"])
        fit = model.fit(reml=True)
    out = {}
    for name, value in fit.fe_params.items():
        if ":arm[T." in name:
            visit = int(name.split("[")[1].split("]")[0])
            arm = name.split("arm[T.")[1].rstrip("]")
            out[(arm, visit)] = value
    return pd.Series(out)


def test_mixed_model_leaves_a_thin_arm_out_instead_of_pooling_it_with_placebo():
    # one patient in the 0.5 MIU arm: its cells are not estimable (min_group_size 3); its
    # observations must not be counted as placebo observations (they used to be, biasing every
    # other arm's effect): the remaining effects equal statsmodels' fit without that patient
    table = _trial(per_arm=(6, 1, 6), seed=4)
    dyn = baseline_change(table)
    post = dyn[dyn["visit"] > 0]
    fit = fit_mixed_model(post, "change", ARMS, "placebo")
    eff = fit.effects.set_index(["arm", "visit"])
    assert eff.loc[("IL-2 0.5 MIU", 4), "p"] != eff.loc[("IL-2 0.5 MIU", 4), "p"]  # NaN
    assert "too few patients" in eff.loc[("IL-2 0.5 MIU", 12), "note"]
    reference = _statsmodels_effects(post[post["arm"] != "IL-2 0.5 MIU"], ["placebo", "IL-2 1.0 MIU"])
    for visit in (4, 12):
        assert eff.loc[("IL-2 1.0 MIU", visit), "estimate"] == pytest.approx(
            reference[("IL-2 1.0 MIU", visit)], rel=1e-4
        )
    assert fit.n_patients == 12 and fit.n_obs == 24  # the thin arm's patient is not in the fit


def _clinical(table: pd.DataFrame, seed=0) -> pd.DataFrame:
    """A valid clinical table for the patients and visits of ``table`` (SLEDAI falls in ~half)."""
    rng = np.random.default_rng(seed)
    rows = []
    for (pid, arm), g in table.groupby(["patient_id", "arm"], sort=True):
        start = int(rng.integers(6, 16))
        drop = int(rng.choice([0, 6]))
        for v in sorted(g["visit"].unique()):
            rows.append(
                dict(patient_id=pid, visit=int(v), arm=arm, sledai=start - (drop if v else 0), pga=1.0,
                     bilag_new_a=0, bilag_new_b=0, anti_dsdna=50.0, c3=80.0, c4=12.0,
                     proteinuria=0.2, prednisone_mg=10.0)
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_a_differently_named_placebo_arm_is_named_and_never_counted_as_active():
    from scipy import stats as sps

    table = _trial(per_arm=(8, 8, 8), seed=2).replace({"arm": {"placebo": "Placebo"}})
    clinical = _clinical(table, seed=2)
    out = run_statistics(table, clinical, {"families": ["responder_change", "response_rate", "arm_visit"]})
    resp = out[out["family"] == "responder_change"]
    # "active" = the arms other than the reference: undefined when the reference arm is absent
    # (it used to hold every arm, "Placebo" included, and give p-values)
    active = resp[resp["subgroup"] == "active"]
    assert len(active) == 2 and active["p"].isna().all()
    assert active["note"].str.contains("did you mean 'Placebo'").all()
    assert out.loc[out["family"] == "arm_visit", "note"].str.contains("did you mean 'Placebo'").all()
    rates = out[out["family"] == "response_rate"]
    assert rates["p"].isna().all() and rates["note"].str.contains("reference arm 'placebo' not among").all()
    # the "all" subgroup is well defined: scipy's Mann-Whitney of responders vs non-responders
    dyn = baseline_change(table)
    sri = clinical.set_index(["patient_id", "visit"])["sledai"]
    responders = {p for p in clinical["patient_id"].unique() if sri[(p, 0)] - sri[(p, 12)] >= 4}
    for visit in (4, 12):
        got = resp[(resp["subgroup"] == "all") & (resp["visit"] == visit)].iloc[0]
        d = dyn[dyn["visit"] == visit]
        x = d[d["patient_id"].isin(responders)]["change"]
        y = d[~d["patient_id"].isin(responders)]["change"]
        assert got["p"] == pytest.approx(sps.mannwhitneyu(x, y).pvalue, rel=1e-12)


def test_response_rates_never_test_an_arm_made_only_of_imputed_non_responders():
    from scipy import stats as sps

    table = _trial(per_arm=(6, 6, 6), seed=3)
    clinical = _clinical(table, seed=3)
    # week 4: only the placebo arm was seen (the active arms' week-4 rows are missing);
    # week 12: two 1.0 MIU patients missed the visit
    missed = clinical["arm"].ne("placebo") & clinical["visit"].eq(4)
    missed |= clinical["patient_id"].isin(["P013", "P014"]) & clinical["visit"].eq(12)
    clinical = clinical[~missed]
    out = run_statistics(table, clinical, {"families": ["response_rate"]})
    sri4 = out[out["measure"] == "sri4"].set_index(["visit", "comparison"])
    # every active patient at week 4 would be an NRI non-responder: no test, and the note says why
    week4 = sri4.loc[4]
    assert week4["p"].isna().all()
    assert week4["note"].str.contains("no observed patient in an arm").all()
    assert "IL-2 0.5 MIU 6/6" in week4.loc["IL-2 0.5 MIU vs placebo", "note"]
    # week 12: the two missed visits are non-responders (NRI), counted and said in the note;
    # the p-value is scipy's on the NRI table: Fisher's exact test, as an expected count is < 5
    got = sri4.loc[(12, "IL-2 1.0 MIU vs placebo")]
    sl = clinical.set_index(["patient_id", "visit"])["sledai"]
    arm_of = clinical.groupby("patient_id")["arm"].first()

    def responders(arm):
        ids = arm_of[arm_of == arm].index
        return sum((p, 12) in sl.index and sl[(p, 0)] - sl[(p, 12)] >= 4 for p in ids), len(ids)

    (x1, n1), (x0, n0) = responders("IL-2 1.0 MIU"), responders("placebo")
    assert "NRI-imputed non-responders: IL-2 1.0 MIU 2/6, placebo 0/6" in got["note"]
    counts = np.array([[x1, n1 - x1], [x0, n0 - x0]])
    assert (counts.sum(axis=0) > 0).all()  # a testable table
    assert sps.contingency.expected_freq(counts).min() < 5
    assert got["method"] == "Fisher exact (two-sided)"
    assert got["p"] == pytest.approx(sps.fisher_exact(counts).pvalue, rel=1e-12)
    assert got["estimate"] == pytest.approx(x1 / n1 - x0 / n0)


def test_a_patient_in_two_arms_is_an_error_not_counted_twice():
    from cytopipe.errors import StatisticsError

    table = _trial(per_arm=(6, 6, 6), seed=1)
    table.loc[(table["patient_id"] == "P001") & (table["visit"] == 12), "arm"] = "IL-2 1.0 MIU"
    # it used to split P001 silently: placebo at baseline and week 4, 1.0 MIU at week 12
    # (7 patients in a 6-patient arm), with or without a clinical table
    for clinical in (None, _clinical(table[table["visit"] < 12], seed=1)):
        with pytest.raises(
            StatisticsError, match="patient 'P001' is in arm 'placebo' and in arm 'IL-2 1.0 MIU'"
        ):
            run_statistics(table, clinical, {"families": ["arm_visit"]})
    with pytest.raises(StatisticsError, match="visit 12"):
        baseline_change(table)


def test_a_requested_population_absent_from_the_table_gets_rows_saying_so(caplog):
    from scipy import stats as sps
    from statsmodels.stats.multitest import multipletests

    table = _trial(per_arm=(6, 6, 6), seed=1)
    settings = {"populations": ["Treg", "Tregs"], "families": ["arm_visit", "mixed_arm"]}
    with caplog.at_level("WARNING", logger="cytopipe.stats"):
        out = run_statistics(table, None, settings)
    # 'Tregs' (a typo) used to vanish without a word; now one row per family, p NaN, did-you-mean
    typo = out[out["population"] == "Tregs"]
    assert sorted(typo["family"]) == ["arm_visit", "mixed_arm"]
    assert typo["p"].isna().all() and typo["note"].str.contains("did you mean 'Treg'").all()
    assert "'Tregs'" in caplog.text
    # the real population's tests are untouched: scipy's Mann-Whitney on the same changes
    dyn = baseline_change(table)
    got = out[(out["population"] == "Treg") & (out["family"] == "arm_visit")]
    for r in got.itertuples():
        d = dyn[dyn["visit"] == r.visit]
        arm = r.comparison.split(" vs ")[0]
        ref = sps.mannwhitneyu(d[d["arm"] == arm]["change"], d[d["arm"] == "placebo"]["change"]).pvalue
        assert r.p == pytest.approx(ref, rel=1e-12)
    # q: BH within the family over the tests that ran (the typo's NaN row is not a test)
    assert np.allclose(got["q"], multipletests(got["p"], method="fdr_bh")[1], rtol=1e-12)


def test_mixed_model_fits_a_population_at_zero_in_every_baseline_sample():
    # a population absent before treatment (0 % at baseline in every patient) made the design
    # singular ("model not fitted"): the constant baseline adjusts nothing and is left out
    table = _trial(per_arm=(6, 6, 6), seed=1)
    table.loc[table["visit"] == 0, "pct_parent"] = 0.0
    out = run_statistics(table, None, {"families": ["mixed_arm_visit"]}).set_index(["comparison", "visit"])
    assert out["note"].str.fullmatch("baseline 0 in every patient: not adjusted for baseline").all()
    dyn = baseline_change(table)
    reference = _statsmodels_effects(dyn[dyn["visit"] > 0], ARMS, formula="")
    for (arm, visit), value in reference.items():
        assert out.loc[(f"{arm} vs placebo", visit), "estimate"] == pytest.approx(value, rel=1e-4)
    assert out["p"].notna().all()


def test_a_patient_id_with_a_trailing_space_keeps_its_clinical_rows():
    from scipy import stats as sps

    table = _trial(per_arm=(8, 8, 8), seed=1)
    clinical = _clinical(table, seed=1)
    spaced = table.assign(patient_id=table["patient_id"].where(table["patient_id"] != "P001", "P001 "))
    # the clinical check matches 'P001 ' with 'P001' (it strips ids), but the responder and
    # correlation tests then silently left P001 out (n 23 of 24)
    out = run_statistics(spaced, clinical, {"families": ["correlation"]})
    got = out[(out["visit"] == 12) & (out["endpoint"] == "sledai_change")].iloc[0]
    dyn = baseline_change(table)
    d = dyn[dyn["visit"] == 12].set_index("patient_id")["change"]
    sl = clinical.set_index(["patient_id", "visit"])["sledai"]
    y = [sl[(p, 12)] - sl[(p, 0)] for p in d.index]
    ref = sps.spearmanr(d.to_numpy(), y)
    assert got["n"] == 24
    assert got["estimate"] == pytest.approx(ref.statistic, rel=1e-12)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_exact_rank_tests_on_tied_data_fall_back_with_a_note_instead_of_crashing():
    from scipy import stats as sps

    from cytopipe.stats import jonckheere_terpstra, mann_whitney

    # rounded percentages tie: "exact" in the settings used to raise ValueError out of
    # run_statistics (an internal error in a run)
    table = _trial(per_arm=(6, 6, 6), seed=1)
    table["pct_parent"] = table["pct_parent"].round(0)
    settings = {
        "mann_whitney_method": "exact",
        "jonckheere_method": "exact",
        "families": ["arm_visit", "dose_trend"],
    }
    out = run_statistics(table, None, settings)
    assert out["p"].notna().all() and out["note"].str.contains("data have ties").all()
    dyn = baseline_change(table)
    d = dyn[dyn["visit"] == 12]
    x, y = d[d["arm"] == "IL-2 1.0 MIU"]["change"], d[d["arm"] == "placebo"]["change"]
    got = out[(out["family"] == "arm_visit") & (out["visit"] == 12)]
    got = got[got["comparison"] == "IL-2 1.0 MIU vs placebo"].iloc[0]
    assert got["p"] == pytest.approx(sps.mannwhitneyu(x, y, method="asymptotic").pvalue, rel=1e-12)
    # two groups: J is U and the normal approximation is scipy's without continuity correction
    jt = jonckheere_terpstra([y.to_numpy(), x.to_numpy()], method="exact")
    ref = sps.mannwhitneyu(x, y, method="asymptotic", use_continuity=False).pvalue
    assert jt.p == pytest.approx(ref, rel=1e-9) and "ties" in jt.note
    assert "ties" in mann_whitney(x, y, method="exact").note


def test_a_baseline_visit_without_samples_is_one_clear_error():
    from cytopipe.errors import StatisticsError

    table = _trial(per_arm=(6, 6, 6), seed=1)
    table["visit"] = table["visit"].replace({0: -1})  # baseline coded as week -1
    # it used to give a row per test saying "too few patients (need 3 per arm)" with 0 patients
    with pytest.raises(StatisticsError, match=r"baseline visit 0 has no sample .*visits: \[-1, 4, 12\]"):
        run_statistics(table, None, {"families": ["arm_visit"]})
    out = run_statistics(table, None, {"families": ["arm_visit"], "baseline_visit": -1})
    assert out["p"].notna().all()


def _at_ceiling_trial(seed: int = 3) -> pd.DataFrame:
    """ARMS with 4 patients each; the IL-2 1.0 MIU arm near 100 % at baseline, the others 40-60 %."""
    rng = np.random.default_rng(seed)
    rows = []
    for a, arm in enumerate(ARMS):
        for p in range(4):
            base = 99.0 + rng.uniform(0, 1) if arm == "IL-2 1.0 MIU" else rng.uniform(40, 60)
            for v in (0, 4, 12):
                value = base if v == 0 else min(100.0, base + rng.normal(0, 2))
                rows.append({"patient_id": f"P{a}{p}", "visit": v, "arm": arm, "population": "Treg",
                             "pct_parent": value})  # fmt: skip
    return pd.DataFrame(rows)


def test_a_baseline_adjusted_effect_that_extrapolates_beyond_the_other_arms_baselines_is_flagged():
    """An arm at 100 % at baseline, the others at 40-60 %: its baseline-adjusted effects rest on the
    common baseline slope where no other arm has a baseline. Its rows (and the joint tests') say so
    in `note`, with the two ranges; the other arm's rows do not. Overlapping baselines: no flag."""
    data = _at_ceiling_trial()
    families = ["mixed_arm_visit", "mixed_arm", "mixed_interaction", "mixed_dose_trend"]
    out = run_statistics(data, None, {"families": families, "reference_arm": "placebo"})
    baseline = data[data["visit"] == 0]
    high = baseline[baseline["arm"] == "IL-2 1.0 MIU"]["pct_parent"]
    rest = baseline[baseline["arm"] != "IL-2 1.0 MIU"]["pct_parent"]
    assert high.min() > rest.max()  # the premise: no overlap
    ranges = f"({high.min():.3g} to {high.max():.3g}) lies above the other arms' ({rest.min():.3g} to {rest.max():.3g})"
    effects = out[out["family"] == "mixed_arm_visit"]
    flagged = effects[effects["comparison"] == "IL-2 1.0 MIU vs placebo"]
    assert len(flagged) == 2 and flagged["estimate"].notna().all()
    for note in flagged["note"]:
        assert "extrapolates" in note and ranges in note, note
    other = effects[effects["comparison"] == "IL-2 0.5 MIU vs placebo"]
    assert not other["note"].fillna("").str.contains("extrapolat").any()
    for fam in ("mixed_arm", "mixed_interaction", "mixed_dose_trend"):
        assert ranges in out.loc[out["family"] == fam, "note"].iloc[0], fam
    # the same trial with the high arm's baselines inside the others' range: nothing flagged
    moved = data.copy()
    moved.loc[moved["arm"] == "IL-2 1.0 MIU", "pct_parent"] -= 45.0
    again = run_statistics(moved, None, {"families": families, "reference_arm": "placebo"})
    assert not again["note"].fillna("").str.contains("extrapolat").any()


def test_a_thin_arm_makes_the_dose_trend_note_say_it_has_too_few_patients_not_no_data():
    """One arm with 2 patients (need 3 per arm and visit): every visit has its data, but no
    arm x visit effect of that arm is estimable, so neither is the linear dose term. The note names
    the arm and its patients per visit; it does not say the arm has no visit with data."""
    data = _trial(per_arm=(5, 2, 5), seed=4)
    out = run_statistics(data, None, {"families": ["mixed_arm_visit", "mixed_dose_trend"]})
    dose = out[out["family"] == "mixed_dose_trend"].iloc[0]
    assert np.isnan(dose["p"])
    note = dose["note"]
    assert "no visit with data" not in note
    n = data.groupby(["arm", "visit"])["patient_id"].nunique()
    for v in (4, 12):
        assert f"week {v}: {n['IL-2 0.5 MIU', v]} vs {n['placebo', v]}" in note, note
    assert (
        "IL-2 0.5 MIU has too few patients at every visit" in note
        and "needs 3 patients in the arm and in placebo" in note
    )
    # the estimable arm's effects are there: the note is about the thin arm only
    fitted = out[(out["family"] == "mixed_arm_visit") & (out["comparison"] == "IL-2 1.0 MIU vs placebo")]
    assert fitted["p"].notna().all()


def test_a_population_table_with_text_visits_gives_the_same_statistics():
    """Visits written BL / W04 / Week 12 are weeks 0 / 4 / 12: the same table as with numbers; a
    month is one clear error naming the value and the accepted forms."""
    from cytopipe.errors import StatisticsError

    numbers = _trial(seed=5)
    words = numbers.assign(visit=numbers["visit"].map({0: "BL", 4: "W04", 12: "Week 12"}))
    families = {"families": ["arm_visit", "mixed_arm_visit"]}
    pd.testing.assert_frame_equal(
        run_statistics(words, None, families), run_statistics(numbers, None, families)
    )
    words.loc[3, "visit"] = "M3"
    with pytest.raises(StatisticsError, match=r"visit is 'M3': months .* write a study week .* Week 4"):
        run_statistics(words, None, families)
