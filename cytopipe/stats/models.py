"""Regression models: the longitudinal mixed model, logistic response prediction, ROC AUC.

Each function returns plain numbers/rows and never raises on data it cannot fit: the rows carry
p = NaN and a note saying why (too few patients, no variation, separation, failed convergence).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special
from scipy import stats as sps

from cytopipe.stats.nonparametric import mann_whitney
from cytopipe.stats.smallsample import SatterthwaiteDF


# ------------------------------------------------------------------------------------------------
# mixed model
# ------------------------------------------------------------------------------------------------
@dataclass
class MixedModelFit:
    """Arm-by-visit effects of ``y ~ arm * visit + baseline`` with a random intercept per patient.

    ``effects``: one row per (arm, visit) with estimate, se, z (the Wald ratio), df (of its t
    reference), p, ci_low, ci_high, n (patients of that arm with data at that visit) and note; ``overall`` / ``interaction``: Wald chi-square,
    df and p of the joint tests (NaN when not estimable); ``note``: fit warnings or failure reason.
    """

    effects: pd.DataFrame
    overall: tuple[float, int, float]
    interaction: tuple[float, int, float]
    #: (slope, se, z, p, ci_low, ci_high): OLS slope of the arms' visit-averaged effects on dose
    dose_slope: tuple[float, float, float, float, float, float]
    n_patients: int
    n_obs: int
    converged: bool
    note: str
    group_sizes: dict[str, int]
    #: t degrees of freedom of the dose slope (Satterthwaite; G - 1 with the robust covariance)
    dose_slope_df: float = np.nan
    #: why the dose slope / the interaction test is not estimable ("" when it is)
    dose_note: str = ""
    interaction_note: str = ""
    #: arms whose every baseline lies outside the other arms' baselines (the adjusted effects
    #: extrapolate the baseline slope): arm -> note; and all of them in one note
    extrapolated: dict[str, str] | None = None
    baseline_note: str = ""


def fit_mixed_model(
    data: pd.DataFrame,
    outcome: str,
    arms: Sequence[str],
    reference: str,
    *,
    min_group_size: int = 3,
    alpha: float = 0.05,
    doses: dict[str, float] | None = None,
    covariance: str = "model",
) -> MixedModelFit:
    """Fit the longitudinal model on post-baseline rows of one population.

    ``data`` columns: ``patient_id, arm, visit, baseline`` and ``outcome`` (change or log2fc).
    The model is ``outcome ~ C(visit) * C(arm) + baseline`` with a random intercept per patient,
    fitted by REML (statsmodels ``MixedLM``), written in the equivalent cell-means form
    ``outcome ~ C(visit) + C(visit):C(arm)[active arms] + baseline_centered`` so that each arm x visit
    coefficient *is* the arm-vs-reference difference in mean outcome at that visit (adjusted for
    baseline). Because the outcome is a change from baseline, these are the treatment-by-time
    effects. Joint Wald tests: ``overall`` (all arm x visit effects = 0, df = arms x visits) and
    ``interaction`` (arm effects equal at every visit, df = arms x (visits - 1)). With ``doses``,
    ``dose_slope`` is the linear dose term: the least-squares slope, over all arms (reference effect
    0), of each arm's effect averaged over its visits against its dose (outcome units per dose unit).
    Cells (arm, visit) with fewer than ``min_group_size`` patients are left out of the design and
    reported with p = NaN. ``covariance``: "model" (REML model-based covariance, assumes the same
    variances in every arm; t reference with Satterthwaite df and F(q, ddf) for joint tests, see
    :mod:`cytopipe.stats.smallsample`) or "robust" (patient-clustered CR3 sandwich, t(G-1) and
    Hotelling-F reference: allows arm-specific variances). ``effects`` carries each effect's ``df``;
    its ``z`` column is the Wald ratio estimate / se, referred to t(df).
    """
    if covariance not in ("model", "robust"):
        raise ValueError(f"covariance must be 'model' or 'robust', not {covariance!r}")
    from statsmodels.regression.mixed_linear_model import MixedLM

    d = data[np.isfinite(data[outcome]) & np.isfinite(data["baseline"])]
    d = d[d["arm"].isin(arms)]
    visits = sorted(d["visit"].unique())
    active = [a for a in arms if a != reference]
    sizes = d.groupby("arm")["patient_id"].nunique().to_dict()
    cell_n = d.groupby(["arm", "visit"])["patient_id"].nunique()
    effect_rows = []
    columns: list[np.ndarray] = []
    names: list[tuple[str, int] | str] = []
    arm_col = d["arm"].to_numpy()
    visit_col = d["visit"].to_numpy()
    ref_visits = [v for v in visits if cell_n.get((reference, v), 0) >= min_group_size]
    thin = np.zeros(len(d), dtype=bool)
    for v in ref_visits:
        columns.append((visit_col == v).astype(float))
        names.append(f"visit {v}")
    for a in active:
        for v in visits:
            n_av = int(cell_n.get((a, v), 0))
            if v not in ref_visits or n_av < min_group_size:
                thin |= (arm_col == a) & (visit_col == v)  # left out: never pooled with the reference
                n_ref = int(cell_n.get((reference, v), 0))
                effect_rows.append(
                    _effect(
                        a,
                        v,
                        n_av,
                        note=f"too few patients at this visit ({a}: {n_av}, {reference}: "
                        f"{n_ref}; need {min_group_size})",
                    )
                )
                continue
            columns.append(((arm_col == a) & (visit_col == v)).astype(float))
            names.append((a, v))
    # the observations of a cell left out of the design are left out of the fit too: without their
    # own column they would count as reference-arm observations and bias the visit means
    keep = np.isin(visit_col, ref_visits) & ~thin
    n_patients = int(pd.unique(d["patient_id"].to_numpy()[keep]).size)
    estimable = [nm for nm in names if isinstance(nm, tuple)]
    nan6 = (np.nan,) * 6
    empty = MixedModelFit(
        pd.DataFrame(effect_rows),
        (np.nan, 0, np.nan),
        (np.nan, 0, np.nan),
        nan6,
        n_patients,
        int(keep.sum()),
        False,
        "",
        sizes,
    )
    if not estimable:
        empty.note = "no arm x visit cell has enough patients"
        return _finish(empty, [])
    bl = d["baseline"].to_numpy(dtype=float)
    adjust = np.ptp(bl[keep]) > 0
    # a baseline equal in every patient (e.g. a population at 0 % before treatment) adjusts nothing:
    # its column would only make the design singular, so the model is fitted without it
    exog = np.column_stack(columns + ([bl - bl[keep].mean()] if adjust else []))[keep]
    endog = d[outcome].to_numpy(dtype=float)[keep]
    groups = d["patient_id"].to_numpy()[keep]
    if np.linalg.matrix_rank(exog) < exog.shape[1]:
        empty.note = "design matrix is singular (e.g. baseline constant); model not fitted"
        return _finish(empty, estimable, effect_rows)
    if np.ptp(endog) == 0:
        empty.note = "outcome is constant; model not fitted"
        return _finish(empty, estimable, effect_rows)
    best = _fit_mixedlm(MixedLM, endog, exog, groups)
    if isinstance(best, str):
        empty.note = best
        return _finish(empty, estimable, effect_rows)
    beta, cov, notes, scale, re_var = best
    if not adjust:
        notes = [f"baseline {bl[keep][0]:g} in every patient: not adjusted for baseline", *notes]
    outside = _baseline_outside(d[keep], arms) if adjust else {}
    k = exog.shape[1]
    n_groups = len(np.unique(groups))
    if covariance == "robust":
        cov = _cluster_robust_cov(exog, endog, groups, beta, scale, re_var)

        def df_of(_contrast: np.ndarray) -> float:
            return float(n_groups - 1)  # t and F reference distributions with G - 1 degrees of freedom

    else:
        satterthwaite = SatterthwaiteDF(exog, groups, scale, re_var)
        df_of = satterthwaite.df
        # (X'V^-1 X)^-1 at the REML variances: statsmodels' Hessian-based block is unreliable where
        # it warns (e.g. one visit per patient, where only the sum of the two variances is identified)
        cov = satterthwaite.cov

    se = np.sqrt(np.diag(cov))
    index = {nm: i for i, nm in enumerate(names)}
    for a, v in estimable:
        i = index[(a, v)]
        z = beta[i] / se[i]
        df_i = df_of(_select([i], k)[0])
        crit = float(sps.t.ppf(1 - alpha / 2, df_i))
        effect_rows.append(
            _effect(
                a,
                v,
                int(cell_n.get((a, v), 0)),
                beta[i],
                se[i],
                z,
                _two_sided(z, df_i),
                beta[i] - crit * se[i],
                beta[i] + crit * se[i],
                df=df_i,
                note="; ".join(outside[x] for x in (a, reference) if x in outside),
            )
        )
    pos = [index[nm] for nm in estimable]
    if covariance == "robust":

        def joint(contrast: np.ndarray) -> tuple[float, int, float]:
            return _wald(beta, cov, contrast, n_groups)

    else:

        def joint(contrast: np.ndarray) -> tuple[float, int, float]:
            return _wald(beta, cov, contrast, ddf=satterthwaite.ddf(contrast))

    overall = joint(_select(pos, k))
    contrasts = []
    for a in active:
        cols = [index[(a, v)] for v in visits if (a, v) in index]
        for c in cols[1:]:
            r = np.zeros(k)
            r[c], r[cols[0]] = 1.0, -1.0
            contrasts.append(r)
    interaction = joint(np.array(contrasts)) if contrasts else (np.nan, 0, np.nan)
    need = (
        f"an arm x visit effect needs {min_group_size} patients in the arm and in {reference} at that visit"
    )
    interaction_note = (
        "" if contrasts else f"not estimable: no arm has an effect at 2 or more visits ({need})"
    )
    dose_slope, dose_df, dose_note = nan6, np.nan, ""
    if doses is not None and all(a in doses for a in arms):
        d_all = np.array([doses[a] for a in arms], dtype=float)
        ss = float(np.sum((d_all - d_all.mean()) ** 2))
        r = np.zeros(k)
        complete = True
        for a in active:
            cols = [index[(a, v)] for v in visits if (a, v) in index]
            if not cols:
                complete = False
                cells = ", ".join(
                    f"week {v}: {int(cell_n.get((a, v), 0))} vs {int(cell_n.get((reference, v), 0))}"
                    for v in visits
                )
                dose_note = (
                    f"not estimable: {a} has too few patients at every visit ({a} vs {reference} patients: "
                    f"{cells}; {need}), and the linear dose term needs every arm's effect"
                )
                break
            r[cols] = (doses[a] - d_all.mean()) / (ss * len(cols))
        if complete and ss > 0:
            est, var = float(r @ beta), float(r @ cov @ r)
            se_s = np.sqrt(var)
            z = est / se_s
            dose_df = df_of(r)
            crit = float(sps.t.ppf(1 - alpha / 2, dose_df))
            dose_slope = (est, se_s, z, _two_sided(z, dose_df), est - crit * se_s, est + crit * se_s)
    fit = MixedModelFit(
        pd.DataFrame(effect_rows),
        overall,
        interaction,
        dose_slope,
        n_patients,
        int(keep.sum()),
        True,
        "; ".join(notes),
        sizes,
        dose_df,
        dose_note,
        interaction_note,
        outside,
        "; ".join(outside.values()),
    )
    return _finish(fit, [])


def _baseline_outside(d: pd.DataFrame, arms: Sequence[str]) -> dict[str, str]:
    """``{arm: note}`` for each arm whose every patient's baseline lies above (or below) every
    baseline of the other arms in the fit: its baseline-adjusted effects rest on the common
    baseline slope far from any baseline the other arms have (an extrapolation, e.g. an arm at
    100 % at baseline)."""
    per = d.drop_duplicates("patient_id")
    out: dict[str, str] = {}
    for a in arms:
        own = per.loc[per["arm"] == a, "baseline"].to_numpy(dtype=float)
        rest = per.loc[per["arm"] != a, "baseline"].to_numpy(dtype=float)
        if not own.size or not rest.size:
            continue
        if own.min() > rest.max():
            side = "above"
        elif own.max() < rest.min():
            side = "below"
        else:
            continue
        out[a] = (
            f"baseline-adjusted estimate extrapolates: every {a} baseline ({own.min():.3g} to {own.max():.3g}) "
            f"lies {side} the other arms' ({rest.min():.3g} to {rest.max():.3g})"
        )
    return out


def _fit_mixedlm(
    mixedlm, endog, exog, groups
) -> tuple[np.ndarray, np.ndarray, list[str], float, float] | str:
    """Fit by REML, trying optimizers in turn until one gives a clean fit; else keep the best REML fit.

    L-BFGS sometimes stops at a zero random-intercept variance that BFGS/CG show is not the optimum,
    so a fit with warnings is retried with other optimizers and the highest REML likelihood wins. At a
    true boundary (variance 0) statsmodels' Hessian-based covariance is unusable; the model is then
    y = X b + e with e ~ N(0, s2 I), whose exact covariance of b is s2 (X'X)^-1 (the OLS one).
    """
    k = exog.shape[1]
    candidates = []
    for method in ("lbfgs", "bfgs", "cg", "nm"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = mixedlm(endog, exog, groups=groups).fit(reml=True, method=method)
            except (np.linalg.LinAlgError, ValueError, ZeroDivisionError) as exc:
                candidates.append((None, f"{type(exc).__name__}: {exc}"))
                continue
        messages = sorted({str(w.message).splitlines()[0] for w in caught})
        beta = np.asarray(result.fe_params, dtype=float)
        cov = np.asarray(result.cov_params(), dtype=float)[:k, :k]
        re_var = float(np.asarray(result.cov_re).ravel()[0])
        clean = (
            result.converged
            and not messages
            and np.all(np.isfinite(beta))
            and np.all(np.isfinite(cov))
            and np.all(np.diag(cov) > 0)
        )
        candidates.append((result, messages, beta, cov, re_var))
        if clean:
            return beta, cov, [], float(result.scale), re_var
    fitted = [c for c in candidates if c[0] is not None and c[0].converged and np.isfinite(c[0].llf)]
    if not fitted:
        reasons = sorted({m for c in candidates for m in (c[1] if c[0] is not None else [c[1]])})
        return f"mixed model did not converge with any optimizer ({'; '.join(reasons) or 'no reason given'}); no inference"
    result, messages, beta, cov, re_var = max(fitted, key=lambda c: c[0].llf)
    notes = []
    if re_var <= 1e-8 * max(float(result.scale), 1e-300):
        cov = float(result.scale) * np.linalg.pinv(exog.T @ exog)
        notes.append(
            "random-intercept variance estimated at 0 (boundary): fixed effects and their covariance are the OLS ones"
        )
    elif messages:
        notes.append("; ".join(messages))
    # the caller's covariance of the fixed effects comes from the REML variances, (X'V^-1 X)^-1 or
    # the cluster-robust one, never statsmodels' Hessian block: a fit whose Hessian is not positive
    # definite (one post-baseline visit: only the sum of the two variances is identified) still
    # has usable estimates and variances
    scale = float(result.scale)
    if not (np.all(np.isfinite(beta)) and np.isfinite(scale) and scale > 0 and np.isfinite(re_var)):
        return f"mixed model fit has no usable estimates ({'; '.join(messages)}); no inference"
    return beta, cov, notes, scale, max(re_var, 0.0)


def _effect(
    arm, visit, n, estimate=np.nan, se=np.nan, z=np.nan, p=np.nan, lo=np.nan, hi=np.nan, note="", df=np.nan
):
    return {
        "arm": arm,
        "visit": int(visit),
        "n": n,
        "estimate": estimate,
        "se": se,
        "z": z,
        "df": df,
        "p": p,
        "ci_low": lo,
        "ci_high": hi,
        "note": note,
    }


def _finish(fit: MixedModelFit, not_fitted: list, rows: list | None = None) -> MixedModelFit:
    rows = list(fit.effects.to_dict("records")) if rows is None else rows
    for a, v in not_fitted:
        rows.append(_effect(a, v, np.nan, note=fit.note))
    effects = pd.DataFrame(
        rows, columns=["arm", "visit", "n", "estimate", "se", "z", "df", "p", "ci_low", "ci_high", "note"]
    )
    fit.effects = effects.sort_values(["arm", "visit"], kind="mergesort").reset_index(drop=True)
    return fit


def _select(positions: list[int], k: int) -> np.ndarray:
    r = np.zeros((len(positions), k))
    r[np.arange(len(positions)), positions] = 1.0
    return r


def _wald(
    beta: np.ndarray,
    cov: np.ndarray,
    contrast: np.ndarray,
    n_groups: int | None = None,
    ddf: float | None = None,
) -> tuple[float, int, float]:
    """Wald chi-square W of H0: contrast @ beta = 0 (pseudo-inverse, df = rank q).

    The p-value: with ``ddf`` (model-based covariance, Satterthwaite) W / q ~ F(q, ddf); with
    ``n_groups`` (robust covariance) the Hotelling-type small-sample approximation
    F = W / q * (G - q) / (G - 1) ~ F(q, G - q); with neither, chi-square(q).
    """
    lb = contrast @ beta
    lvl = contrast @ cov @ contrast.T
    df = int(np.linalg.matrix_rank(lvl))
    if df == 0:
        return np.nan, 0, np.nan
    stat = float(lb @ np.linalg.pinv(lvl) @ lb)
    if ddf is not None:
        return stat, df, float(sps.f.sf(stat / df, df, ddf)) if np.isfinite(ddf) else np.nan
    if n_groups is None:
        return stat, df, float(sps.chi2.sf(stat, df))
    if n_groups <= df:
        return stat, df, np.nan
    f = stat / df * (n_groups - df) / (n_groups - 1)
    return stat, df, float(sps.f.sf(f, df, n_groups - df))


def _two_sided(z: float, df: float | None) -> float:
    return float(2 * special.ndtr(-abs(z))) if df is None else float(2 * sps.t.sf(abs(z), df))


def _cluster_robust_cov(
    exog: np.ndarray, endog: np.ndarray, groups: np.ndarray, beta: np.ndarray, scale: float, re_var: float
) -> np.ndarray:
    """Sandwich covariance of the GLS fixed effects, clustered by patient, with the jackknife-type
    (CR3) small-sample correction: residuals of patient i are inflated by (I - H_ii)^-1, scaled (G-1)/G.

    Valid when the arms' variances differ (e.g. IL-2 responders spread the active arms) where the
    model-based covariance assumes one residual and one random-intercept variance for all arms.
    """
    k = exog.shape[1]
    resid = endog - exog @ beta
    blocks = []
    bread = np.zeros((k, k))
    for g in np.unique(groups):
        m = groups == g
        xi, n = exog[m], int(m.sum())
        wi = (np.eye(n) - re_var / (scale + n * re_var) * np.ones((n, n))) / scale  # V_i^-1
        blocks.append((xi, resid[m], wi))
        bread += xi.T @ wi @ xi
    b_inv = np.linalg.pinv(bread)
    meat = np.zeros((k, k))
    for xi, ei, wi in blocks:
        hat = xi @ b_inv @ xi.T @ wi
        try:
            adj = np.linalg.solve(np.eye(len(ei)) - hat, ei)
        except np.linalg.LinAlgError:
            adj = ei
        u = xi.T @ wi @ adj
        meat += np.outer(u, u)
    n_groups = len(blocks)
    return b_inv @ meat @ b_inv * (n_groups - 1) / n_groups


# ------------------------------------------------------------------------------------------------
# logistic regression of response on arm x baseline
# ------------------------------------------------------------------------------------------------
@dataclass
class LogisticFit:
    """``prognostic``: OR per SD of baseline, adjusted for arm (model ``resp ~ arm + z``);
    ``per_arm``: OR per SD within each arm from ``resp ~ arm * z``; ``interaction``: likelihood-ratio
    chi-square, df and p of the arm x baseline terms (is the baseline effect arm-specific, i.e.
    predictive rather than prognostic?). Values are (estimate, ci_low, ci_high, p, note)."""

    prognostic: tuple
    per_arm: dict[str, tuple]
    interaction: tuple[float, int, float, str]
    n: int
    n_responders: int
    note: str
    scale_sd: float


def fit_logistic(
    response: np.ndarray,
    baseline: np.ndarray,
    arm: np.ndarray,
    arms: Sequence[str],
    reference: str,
    *,
    alpha: float = 0.05,
    min_group_size: int = 3,
) -> LogisticFit:
    """Logistic regressions of a binary response on arm and the standardised baseline value."""
    from statsmodels.discrete.discrete_model import Logit  # not statsmodels.api: ~0.15 s of imports

    resp = np.asarray(response, dtype=float)
    base = np.asarray(baseline, dtype=float)
    arm = np.asarray(arm, dtype=object)
    keep = np.isfinite(resp) & np.isfinite(base) & np.isin(arm, list(arms))
    resp, base, arm = resp[keep], base[keep], arm[keep]
    n, n_resp = len(resp), int(resp.sum())
    nan4 = (np.nan, np.nan, np.nan, np.nan)
    present = [a for a in arms if np.sum(arm == a) > 0]
    active = [a for a in present if a != reference]

    def fail(note: str) -> LogisticFit:
        return LogisticFit(
            (*nan4, note),
            {a: (*nan4, note) for a in present},
            (np.nan, 0, np.nan, note),
            n,
            n_resp,
            note,
            np.nan,
        )

    if n_resp < 2 or n - n_resp < 2:
        return fail(f"{n_resp} responders and {n - n_resp} non-responders: too few to model")
    sd = float(np.std(base, ddof=1)) if n > 1 else 0.0
    if not sd > 0:
        return fail("baseline value is constant")
    if reference not in present:
        return fail(f"no patients in the reference arm {reference!r}")
    z = (base - base.mean()) / sd
    dummies = [(arm == a).astype(float) for a in active]
    x_main = np.column_stack([np.ones(n), *dummies, z])
    x_full = np.column_stack([x_main, *[d * z for d in dummies]])
    zcrit = float(special.ndtri(1 - alpha / 2))

    def fit(x):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                res = Logit(resp, x).fit(disp=0, maxiter=200)
            except Exception as exc:  # statsmodels raises PerfectSeparationError / LinAlgError here
                return None, f"{type(exc).__name__}: {exc}"
        msgs = sorted({str(w.message).splitlines()[0] for w in caught})
        sep = [m for m in msgs if "separation" in m.lower()]
        bse = np.asarray(res.bse, dtype=float)
        if sep or not res.mle_retvals.get("converged", False) or not np.all(np.isfinite(bse)):
            return None, "; ".join(sep or msgs) or "did not converge"
        return res, "; ".join(msgs)

    main, note_main = fit(x_main)
    if main is None:
        return fail(f"logistic model failed ({note_main}): e.g. an arm where everyone (or no one) responds")
    b, v = float(main.params[-1]), float(main.cov_params()[-1, -1])
    prognostic = (*_or_ci(b, v, zcrit), float(2 * special.ndtr(-abs(b / np.sqrt(v)))), note_main)
    small = [a for a in present if np.sum(arm == a) < min_group_size]
    full, note_full = (None, f"arm(s) {small} have < {min_group_size} patients") if small else fit(x_full)
    if full is None:
        note = f"interaction model failed ({note_full})"
        return LogisticFit(
            prognostic, {a: (*nan4, note) for a in present}, (np.nan, 0, np.nan, note), n, n_resp, "", sd
        )
    params = np.asarray(full.params, dtype=float)
    cov = np.asarray(full.cov_params(), dtype=float)
    iz = 1 + len(active)
    per_arm = {}
    for a in present:
        r = np.zeros(len(params))
        r[iz] = 1.0
        if a != reference:
            r[iz + 1 + active.index(a)] = 1.0
        est, var = float(r @ params), float(r @ cov @ r)
        per_arm[a] = (*_or_ci(est, var, zcrit), float(2 * special.ndtr(-abs(est / np.sqrt(var)))), note_full)
    lr = float(2 * (full.llf - main.llf))
    df = len(active)
    interaction = (lr, df, float(sps.chi2.sf(max(lr, 0.0), df)) if df else np.nan, note_full)
    return LogisticFit(prognostic, per_arm, interaction, n, n_resp, "", sd)


def _or_ci(beta: float, var: float, zcrit: float) -> tuple[float, float, float]:
    se = np.sqrt(var)
    return float(np.exp(beta)), float(np.exp(beta - zcrit * se)), float(np.exp(beta + zcrit * se))


# ------------------------------------------------------------------------------------------------
# ROC
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RocResult:
    auc: float  # P(score of a responder > score of a non-responder) + 0.5 P(tie)
    ci_low: float
    ci_high: float
    p: float  # Mann-Whitney two-sided test of AUC = 0.5
    n_pos: int
    n_neg: int
    note: str = ""


def roc_auc(scores, labels, alpha: float = 0.05, min_group_size: int = 3) -> RocResult:
    """ROC AUC of ``scores`` for ``labels`` (True = responder) with DeLong's standard error.

    AUC < 0.5 means *low* scores go with response. CI: AUC +- z * SE(DeLong), clipped to [0, 1];
    p: the equivalent two-sided Mann-Whitney test.
    """
    s = np.asarray(scores, dtype=float)
    lab = np.asarray(labels, dtype=float)
    keep = np.isfinite(s) & np.isfinite(lab)
    s, lab = s[keep], lab[keep].astype(bool)
    pos, neg = s[lab], s[~lab]
    n1, n0 = len(pos), len(neg)
    if n1 < min_group_size or n0 < min_group_size:
        return RocResult(
            np.nan, np.nan, np.nan, np.nan, n1, n0, f"{n1} responders, {n0} non-responders: too few"
        )
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(psi.mean())
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = float(np.sqrt(np.var(v10, ddof=1) / n1 + np.var(v01, ddof=1) / n0))
    zcrit = float(special.ndtri(1 - alpha / 2))
    mw = mann_whitney(pos, neg)
    lo, hi = (max(0.0, auc - zcrit * se), min(1.0, auc + zcrit * se)) if se > 0 else (np.nan, np.nan)
    return RocResult(auc, lo, hi, mw.p, n1, n0, mw.note)
