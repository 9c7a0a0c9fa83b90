"""The analysis families: each function turns dynamics (and clinical endpoints) into result rows.

Every family reports every test it was asked for: when a test cannot run (too few patients,
constant values, a failed fit) its row carries p = NaN and a note, so nothing disappears silently.

Why one module: the statistical families share the per-arm grouping, the reference-visit rows
and the "every requested test gets a row" rule above; each family is one function, and the
models themselves live in :mod:`cytopipe.stats.models`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import numpy as np
import pandas as pd

from cytopipe.stats.fitmemo import remembered
from cytopipe.stats.models import fit_logistic, fit_mixed_model, roc_auc
from cytopipe.stats.nonparametric import jonckheere_terpstra, mann_whitney, spearman
from cytopipe.stats.rate_tests import response_rate_tests  # noqa: F401 - re-exported
from cytopipe.stats.settings import StatsSettings, arm_doses, missing_reference_note
from cytopipe.stats.table import row

_SCALE_LABEL = {"change": "change from baseline", "log2fc": "log2 fold change from baseline"}
#: the per-population families that need no clinical table
FLOW_ONLY_FAMILIES = (
    "arm_visit", "dose_trend", "auc_arm", "auc_dose_trend",
    "mixed_arm_visit", "mixed_arm", "mixed_interaction", "mixed_dose_trend",
)  # fmt: skip


def _n_detail(groups: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in groups.items())


def _by_arm(table: pd.DataFrame, keys: Sequence[str], value: str):
    """Yield (key values, {arm: finite values}) per group of ``keys``, in order of first appearance.

    numpy grouping (one factorisation, one sort) instead of nested pandas groupbys: the per-visit tests
    run thousands of times in the null-simulation tests.
    """
    if table.empty:
        return
    codes = table.groupby(list(keys), sort=False, dropna=False).ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    values = table[value].to_numpy(dtype=float)
    arms = table["arm"].to_numpy(dtype=object)
    key_cols = [table[k].to_numpy(dtype=object) for k in keys]
    for idx in np.split(order, bounds):
        v, a = values[idx], arms[idx]
        ok = np.isfinite(v)
        groups = {arm: v[ok & (a == arm)] for arm in dict.fromkeys(a)}
        yield tuple(col[idx[0]] for col in key_cols), groups


def _population_meta(dyn: pd.DataFrame) -> dict[str, object]:
    parents = dyn.groupby("population", sort=False)["parent"].first()
    return {p: (None if pd.isna(v) else v) for p, v in parents.items()}


def _mwu_vs_reference(common: dict, x: np.ndarray, ref: np.ndarray, s: StatsSettings, too_few: str) -> dict:
    """One Mann-Whitney row of an active arm vs the reference arm (or a NaN row saying why not)."""
    if len(x) < s.min_group_size or len(ref) < s.min_group_size:
        return row(**common, method="Mann-Whitney U", note=f"{too_few} (need {s.min_group_size} per arm)")
    r = mann_whitney(x, ref, alpha=s.alpha, method=s.mann_whitney_method)
    return row(
        **common,
        estimate=r.estimate,
        ci_low=r.ci_low,
        ci_high=r.ci_high,
        statistic=r.statistic,
        p=r.p,
        method=r.method,
        note=r.note,
    )


def _joined(*notes: str) -> str:
    return "; ".join(dict.fromkeys(n for n in notes if n))


def _where(by: str, key: object) -> dict:
    """The column that locates a test: a post-baseline visit, or an AUC window."""
    return {"visit": int(key)} if by == "visit" else {"window": key}


def _no_reference_rows(parents: dict, base: dict, note: str) -> list[dict]:
    """One not-estimable row per population when the reference arm is absent."""
    return [
        row(
            **base,
            population=pop,
            parent=parents[pop],
            comparison="active arms vs reference",
            method="Mann-Whitney U",
            note=note,
        )
        for pop in parents
    ]


def _arms_vs_reference(
    data: pd.DataFrame,
    by: str,
    outcome: str,
    base: dict,
    label: str,
    active: Sequence[str],
    s: StatsSettings,
    too_few: str,
) -> list[dict]:
    """Mann-Whitney U of each ``active`` arm vs the reference arm, per population and ``by`` key
    (an arm without values in a group still gets its row, saying so)."""
    parents = _population_meta(data)
    rows = []
    for (pop, key), values in _by_arm(data, ["population", by], outcome):
        ref = values.get(s.reference_arm, np.empty(0))
        for a in active:
            x = values.get(a, np.empty(0))
            common = dict(
                **base,
                **_where(by, key),
                population=pop,
                parent=parents[pop],
                comparison=f"{a} vs {s.reference_arm}",
                effect_label=label,
                n=len(x) + len(ref),
                n_detail=_n_detail({a: len(x), s.reference_arm: len(ref)}),
            )
            rows.append(_mwu_vs_reference(common, x, ref, s, too_few))
    return rows


# ------------------------------------------------------------------------------------------------
# arm comparisons at each visit
# ------------------------------------------------------------------------------------------------
def arm_visit_tests(
    dyn: pd.DataFrame, measure: str, arms: Sequence[str] | None, reason: str, s: StatsSettings
) -> list[dict]:
    """Family ``arm_visit``: Mann-Whitney U of each active arm vs the reference arm, per population
    and post-baseline visit, on the patients' change (or log2 fold change) from baseline."""
    outcome = s.change_scale
    base = {"family": "arm_visit", "measure": measure, "scale": outcome, "subgroup": "all"}
    if arms is None and s.reference_arm not in set(dyn["arm"]):
        return _no_reference_rows(_population_meta(dyn), base, reason)
    active = [a for a in (arms or sorted(set(dyn["arm"]))) if a != s.reference_arm]
    label = f"Hodges-Lehmann shift in {_SCALE_LABEL[outcome]} (arm - {s.reference_arm})"
    post = dyn[dyn["visit"] > s.baseline_visit]
    return _arms_vs_reference(post, "visit", outcome, base, label, active, s, "too few patients")


def dose_trend_tests(
    dyn: pd.DataFrame,
    measure: str,
    arms: Sequence[str] | None,
    reason: str,
    s: StatsSettings,
    *,
    family: str = "dose_trend",
    outcome: str | None = None,
    by: str = "visit",
) -> list[dict]:
    """Family ``dose_trend``: Jonckheere-Terpstra across the arms in dose order, per population and
    visit (or AUC window with ``by='window'``). Estimate: tau_JT = 2J/M - 1 (> 0: rises with dose)."""
    outcome = outcome or s.change_scale
    data = dyn[dyn["visit"] > s.baseline_visit] if by == "visit" else dyn
    parents = _population_meta(dyn)
    base = {
        "family": family,
        "measure": measure,
        "scale": outcome,
        "subgroup": "all",
        "comparison": "dose trend",
        "effect_label": "JT concordance tau = 2J/M - 1 (> 0: rises with dose)",
    }
    rows: list[dict] = []
    if arms is None:
        for pop in parents:
            rows.append(
                row(**base, population=pop, parent=parents[pop], method="Jonckheere-Terpstra", note=reason)
            )
        return rows
    for (pop, key), values in _by_arm(data, ["population", by], outcome):
        sizes = {a: len(values.get(a, ())) for a in arms}
        common = dict(
            **base,
            **_where(by, key),
            population=pop,
            parent=parents[pop],
            n=sum(sizes.values()),
            n_detail=_n_detail(sizes),
        )
        thin = [a for a in arms if sizes[a] < s.min_group_size]
        if thin:
            rows.append(
                row(
                    **common,
                    method="Jonckheere-Terpstra",
                    note=f"too few patients in {thin} (need {s.min_group_size} per arm)",
                )
            )
            continue
        r = jonckheere_terpstra([values[a] for a in arms], method=s.jonckheere_method, seed=s.seed)
        rows.append(row(**common, estimate=r.tau, statistic=r.statistic, p=r.p, method=r.method, note=r.note))
    return rows


def auc_tests(
    auc: pd.DataFrame, measure: str, arms: Sequence[str] | None, reason: str, s: StatsSettings
) -> list[dict]:
    """Families ``auc_arm`` (Mann-Whitney, each active arm vs reference) and ``auc_dose_trend``
    (Jonckheere-Terpstra) on the time-averaged AUC of the change (or log2 fold change)."""
    outcome = "auc_change" if s.change_scale == "change" else "auc_log2fc"
    base = {"family": "auc_arm", "measure": measure, "scale": outcome, "subgroup": "all"}
    if s.reference_arm not in set(auc["arm"]):
        note = reason or f"reference arm {s.reference_arm!r} absent"
        rows = _no_reference_rows(_population_meta(auc), base, note)
    else:
        label = f"Hodges-Lehmann shift in time-averaged AUC of the {_SCALE_LABEL[s.change_scale]} (arm - reference)"
        active = [a for a in (arms or sorted(set(auc["arm"]))) if a != s.reference_arm]
        too_few = "too few patients with this window"
        rows = _arms_vs_reference(auc, "window", outcome, base, label, active, s, too_few)
    rows += dose_trend_tests(
        auc, measure, arms, reason, s, family="auc_dose_trend", outcome=outcome, by="window"
    )
    return rows


# ------------------------------------------------------------------------------------------------
# mixed model
# ------------------------------------------------------------------------------------------------
def mixed_model_tests(
    dyn: pd.DataFrame,
    measure: str,
    arms: Sequence[str] | None,
    reason: str,
    s: StatsSettings,
    map_fits: Callable[[Callable, list], Iterable] | None = None,
) -> list[dict]:
    """Families ``mixed_arm_visit`` (arm x visit effects), ``mixed_arm`` (joint Wald test of all of
    them), ``mixed_interaction`` (Wald test that the arm effects are equal across visits) and
    ``mixed_dose_trend`` (linear dose term: slope of the visit-averaged arm effects on dose).
    ``map_fits(fn, items)``: runs the per-population fits (each independent of the others) and
    gives their results in the order of ``items``; default: one after another, here."""
    doses, dose_reason = arm_doses(list(arms) if arms is not None else list(set(dyn["arm"])), s)
    outcome = s.change_scale
    post = dyn[dyn["visit"] > s.baseline_visit]
    parents = _population_meta(dyn)
    method = (
        f"linear mixed model (statsmodels MixedLM, REML, random intercept per patient): "
        f"{outcome} ~ arm * visit + baseline"
    )
    robust = s.mixed_model_covariance == "robust"
    if robust:
        method += "; patient-clustered CR3 sandwich covariance"
    t_ref = "Wald t, df = patients - 1" if robust else "Wald t, Satterthwaite df"
    rows: list[dict] = []
    common_all = {"measure": measure, "scale": outcome, "subgroup": "all"}
    if arms is None:
        arm_list = sorted(set(dyn["arm"]))
        if s.reference_arm not in arm_list:
            for pop in parents:
                for fam in ("mixed_arm_visit", "mixed_arm", "mixed_interaction", "mixed_dose_trend"):
                    rows.append(
                        row(
                            family=fam,
                            **common_all,
                            population=pop,
                            parent=parents[pop],
                            comparison="arm x visit",
                            method=method,
                            note=reason,
                        )
                    )
            return rows
        arms = [s.reference_arm] + [a for a in arm_list if a != s.reference_arm]
    groups = list(post.groupby("population", sort=False))
    fit_one = partial(
        fit_mixed_model,
        outcome=outcome,
        arms=arms,
        reference=s.reference_arm,
        min_group_size=s.min_group_size,
        alpha=s.alpha,
        doses=doses,
        covariance=s.mixed_model_covariance,
    )
    # a population whose rows did not move since a fit in this process (a review's refresh) is not
    # fitted again (cytopipe/stats/fitmemo.py)
    fits = remembered(map_fits)(fit_one, [group for _, group in groups])
    for (pop, _group), fit in zip(groups, fits):
        detail = _n_detail(fit.group_sizes) + f"; observations={fit.n_obs}"
        label = f"difference in mean {_SCALE_LABEL[outcome]} vs {s.reference_arm}, adjusted for baseline"
        for e in fit.effects.itertuples(index=False):
            note = "; ".join(dict.fromkeys(x for x in (e.note, fit.note) if x))
            rows.append(
                row(
                    family="mixed_arm_visit",
                    **common_all,
                    population=pop,
                    parent=parents[pop],
                    visit=int(e.visit),
                    comparison=f"{e.arm} vs {s.reference_arm}",
                    estimate=e.estimate,
                    ci_low=e.ci_low,
                    ci_high=e.ci_high,
                    effect_label=label,
                    statistic=e.z,
                    df=e.df,
                    p=e.p,
                    method=method + "; " + t_ref,
                    n=fit.n_patients,
                    n_detail=detail,
                    note=note,
                )
            )
        for fam, (stat, df, p), what, why in (
            ("mixed_arm", fit.overall, "all arm x visit effects = 0", "not estimable"),
            (
                "mixed_interaction",
                fit.interaction,
                "arm effects equal at every visit (arm x visit interaction)",
                fit.interaction_note or "not estimable (no arm has an effect at 2 or more visits)",
            ),
        ):
            rows.append(
                row(
                    family=fam,
                    **common_all,
                    population=pop,
                    parent=parents[pop],
                    comparison=what,
                    statistic=stat,
                    df=df if df else np.nan,
                    p=p,
                    method=method
                    + (
                        "; Wald, Hotelling F"
                        if robust
                        else "; Wald F, Satterthwaite (Fai-Cornelius) denominator df"
                    ),
                    n=fit.n_patients,
                    n_detail=detail,
                    note=_joined(
                        fit.note, "" if np.isfinite(p) or not fit.converged else why, fit.baseline_note
                    ),
                )
            )
        est, _, z, p, lo, hi = fit.dose_slope
        why = dose_reason or fit.dose_note or "not estimable (an arm has no effect)"
        note = _joined(
            fit.note, "" if np.isfinite(p) or (fit.note and not fit.converged) else why, fit.baseline_note
        )
        rows.append(
            row(
                family="mixed_dose_trend",
                **common_all,
                population=pop,
                parent=parents[pop],
                comparison="linear dose term",
                estimate=est,
                ci_low=lo,
                ci_high=hi,
                effect_label=f"slope of the visit-averaged arm effect on dose ({_SCALE_LABEL[outcome]} per dose unit)",
                statistic=z,
                df=fit.dose_slope_df,
                p=p,
                method=method + "; linear contrast of arm x visit effects, " + t_ref,
                n=fit.n_patients,
                n_detail=detail,
                note=note,
            )
        )
    return rows


# ------------------------------------------------------------------------------------------------
# clinical response
# ------------------------------------------------------------------------------------------------
def response_visit(endpoints: pd.DataFrame, s: StatsSettings) -> int | None:
    visits = sorted(int(v) for v in endpoints["visit"].unique())
    if not visits:
        return None
    if s.response_visit is not None:
        return int(s.response_visit)
    return 12 if 12 in visits else visits[-1]


def _subgroups(arms: Sequence[str], s: StatsSettings) -> list[tuple[str, list[str]]]:
    out = []
    for sub in s.responder_subgroups:
        if sub == "all":
            out.append(("all", list(arms)))
        elif sub == "active":
            out.append(("active", [a for a in arms if a != s.reference_arm]))
        else:
            out.append((sub, [sub]))
    return out


def responder_tests(
    dyn: pd.DataFrame, endpoints: pd.DataFrame, measure: str, arms: Sequence[str], s: StatsSettings
) -> list[dict]:
    """Families ``responder_change`` (Mann-Whitney of each subset's change, responders vs
    non-responders, at every post-baseline visit), ``roc`` (baseline value as predictor of response),
    ``logistic_prognostic``, ``logistic_terms`` and ``logistic_interaction`` (response ~ arm x
    standardised baseline)."""
    ep = s.response_endpoint
    rv = response_visit(endpoints, s)
    parents = _population_meta(dyn)
    rows: list[dict] = []
    if ep not in endpoints.columns or rv is None:
        for pop in parents:
            rows.append(
                row(
                    family="responder_change",
                    measure=measure,
                    population=pop,
                    parent=parents[pop],
                    endpoint=ep,
                    method="Mann-Whitney U",
                    note=f"response endpoint {ep!r} not available at visit {rv}",
                )
            )
        return rows
    status = endpoints[endpoints["visit"] == rv].set_index("patient_id")[ep]
    status = status.dropna().astype(bool)
    ep_label = f"{ep}@{rv}"
    outcome = s.change_scale
    post = dyn[dyn["visit"] > s.baseline_visit]
    subgroups = _subgroups(arms, s)
    no_ref = "" if s.reference_arm in set(arms) else missing_reference_note(arms, s.reference_arm)
    # responders vs non-responders on change, per visit
    label = f"Hodges-Lehmann shift in {_SCALE_LABEL[outcome]} (responders - non-responders)"
    for (pop, visit), group in post.groupby(["population", "visit"], sort=False):
        g = group[group["patient_id"].isin(status.index)]
        resp = status.reindex(g["patient_id"]).to_numpy(dtype=bool)
        val = g[outcome].to_numpy(dtype=float)
        arm = g["arm"].to_numpy()
        for sub, members in subgroups:
            common = dict(
                family="responder_change",
                measure=measure,
                scale=outcome,
                population=pop,
                parent=parents[pop],
                visit=int(visit),
                endpoint=ep_label,
                subgroup=sub,
                comparison="responders vs non-responders",
            )
            if sub == "active" and no_ref:
                note = f"subgroup 'active' (the arms other than the reference) undefined: {no_ref}"
                rows.append(row(**common, method="Mann-Whitney U", note=note))
                continue
            m = np.isin(arm, members) & np.isfinite(val)
            x, y = val[m & resp], val[m & ~resp]
            common.update(
                effect_label=label,
                n=len(x) + len(y),
                n_detail=_n_detail({"responders": len(x), "non-responders": len(y)}),
            )
            if len(x) < s.min_group_size or len(y) < s.min_group_size:
                rows.append(
                    row(
                        **common,
                        method="Mann-Whitney U",
                        note=f"too few patients (need {s.min_group_size} per group)",
                    )
                )
                continue
            r = mann_whitney(x, y, alpha=s.alpha, method=s.mann_whitney_method)
            rows.append(
                row(
                    **common,
                    estimate=r.estimate,
                    ci_low=r.ci_low,
                    ci_high=r.ci_high,
                    statistic=r.statistic,
                    p=r.p,
                    method=r.method,
                    note=r.note,
                )
            )
    # baseline value as predictor
    base = dyn[dyn["visit"] == s.baseline_visit]
    for pop, group in base.groupby("population", sort=False):
        g = group[group["patient_id"].isin(status.index)]
        resp = status.reindex(g["patient_id"]).to_numpy(dtype=float)
        val = g["value"].to_numpy(dtype=float)
        arm = g["arm"].to_numpy()
        common = dict(
            measure=measure, scale="baseline", population=pop, parent=parents[pop], endpoint=ep_label
        )
        roc_groups = [("all", list(arms))] + [(a, [a]) for a in arms]
        for sub, members in roc_groups:
            m = np.isin(arm, members)
            r = roc_auc(val[m], resp[m], alpha=s.alpha, min_group_size=s.min_group_size)
            rows.append(
                row(
                    family="roc",
                    **common,
                    subgroup=sub,
                    comparison="baseline value: responders vs non-responders",
                    estimate=r.auc,
                    ci_low=r.ci_low,
                    ci_high=r.ci_high,
                    effect_label="ROC AUC of the baseline value for response (< 0.5: low baseline predicts response)",
                    p=r.p,
                    method="ROC AUC, DeLong CI; p from Mann-Whitney U",
                    n=r.n_pos + r.n_neg,
                    n_detail=_n_detail({"responders": r.n_pos, "non-responders": r.n_neg}),
                    note=r.note,
                )
            )
        fit = fit_logistic(
            resp, val, arm, arms, s.reference_arm, alpha=s.alpha, min_group_size=s.min_group_size
        )
        detail = _n_detail({"responders": fit.n_responders, "non-responders": fit.n - fit.n_responders})
        method = "logistic regression (statsmodels Logit); baseline standardised to SD units"
        or_label = "odds ratio of response per SD of baseline value"
        est, lo, hi, p, note = fit.prognostic
        rows.append(
            row(
                family="logistic_prognostic",
                **common,
                subgroup="all",
                comparison="baseline (per SD), adjusted for arm",
                estimate=est,
                ci_low=lo,
                ci_high=hi,
                effect_label=or_label,
                p=p,
                method=method + f": {ep} ~ arm + baseline; Wald",
                n=fit.n,
                n_detail=detail,
                note=note or fit.note,
            )
        )
        for a, (est, lo, hi, p, note) in fit.per_arm.items():
            rows.append(
                row(
                    family="logistic_terms",
                    **common,
                    subgroup=a,
                    comparison=f"baseline (per SD) within {a}",
                    estimate=est,
                    ci_low=lo,
                    ci_high=hi,
                    effect_label=or_label,
                    p=p,
                    method=method + f": {ep} ~ arm * baseline; Wald",
                    n=fit.n,
                    n_detail=detail,
                    note=note,
                )
            )
        stat, df, p, note = fit.interaction
        rows.append(
            row(
                family="logistic_interaction",
                **common,
                subgroup="all",
                comparison="arm x baseline (is the baseline effect arm-specific?)",
                statistic=stat,
                df=df if df else np.nan,
                p=p,
                method=method + ": likelihood-ratio test of arm x baseline",
                n=fit.n,
                n_detail=detail,
                note=note,
            )
        )
    return rows


def correlation_tests(
    dyn: pd.DataFrame, endpoints: pd.DataFrame, measure: str, s: StatsSettings
) -> list[dict]:
    """Family ``correlation``: Spearman of each subset's change with the change of each clinical item
    (SLEDAI, anti-dsDNA, C3, C4, proteinuria) at the same visit, all arms pooled."""
    outcome = s.change_scale
    post = dyn[dyn["visit"] > s.baseline_visit]
    parents = _population_meta(dyn)
    clin = endpoints.set_index(["patient_id", "visit"])
    rows: list[dict] = []
    for (pop, visit), group in post.groupby(["population", "visit"], sort=False):
        idx = pd.MultiIndex.from_arrays([group["patient_id"], group["visit"]])
        x = group[outcome].to_numpy(dtype=float)
        for item in s.correlation_items:
            col = f"{item}_change"
            common = dict(
                family="correlation",
                measure=measure,
                scale=outcome,
                population=pop,
                parent=parents[pop],
                visit=int(visit),
                endpoint=col,
                subgroup="all",
                comparison=f"{outcome} vs {col}",
                effect_label="Spearman rho",
            )
            if col not in clin.columns:
                rows.append(row(**common, method="Spearman", note=f"clinical item {item!r} not available"))
                continue
            y = clin[col].reindex(idx).to_numpy(dtype=float)
            r = spearman(x, y, alpha=s.alpha, min_n=s.min_correlation_n)
            rows.append(
                row(
                    **common,
                    estimate=r.rho,
                    ci_low=r.ci_low,
                    ci_high=r.ci_high,
                    statistic=r.rho,
                    p=r.p,
                    method=r.method,
                    n=r.n,
                    note=r.note,
                )
            )
    return rows
