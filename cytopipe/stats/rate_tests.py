"""Families ``response_rate`` and ``serology_rate``: clinical response rates of each active arm (and
of all active arms pooled) vs the reference arm at each visit, from the endpoint table of
:func:`cytopipe.clinical.derive_endpoints` (NRI-imputed non-responders counted and named)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cytopipe.stats.rates import compare_rates
from cytopipe.stats.settings import StatsSettings, missing_reference_note
from cytopipe.stats.table import row


def response_rate_tests(endpoints: pd.DataFrame, arms: Sequence[str], s: StatsSettings) -> list[dict]:
    """Families ``response_rate`` (SRI-k, renal response) and ``serology_rate`` (anti-dsDNA / C3 / C4
    normalisation): each active arm, and all active arms pooled, vs the reference at each visit."""
    rows: list[dict] = []
    sri = [f"sri{k}" for k in s.clinical.sri_thresholds]
    plan = [("response_rate", e) for e in sri + ["renal_any", "renal_complete"]]
    plan += [("serology_rate", e) for e in ("anti_dsdna_normalised", "c3_normalised", "c4_normalised")]
    active = [a for a in arms if a != s.reference_arm]
    comparisons = [(a, [a]) for a in active]
    no_ref = "" if s.reference_arm in set(endpoints["arm"]) else missing_reference_note(arms, s.reference_arm)
    if len(active) > 1:
        comparisons.append(("all active arms", active))
    for family, endpoint in plan:
        for visit, group in endpoints.groupby("visit", sort=True):
            imp_col = "renal_imputed" if endpoint.startswith("renal_") else f"{endpoint}_imputed"
            values = group.dropna(subset=[endpoint])
            if imp_col in values:
                imputed = values[imp_col].fillna(False).astype(bool)
            else:  # imputation "none": nothing imputed
                imputed = pd.Series(False, index=values.index)
            ref = values[values["arm"] == s.reference_arm][endpoint].astype(bool)
            ref_imp = int(imputed[values["arm"] == s.reference_arm].sum())
            for label, members in comparisons:
                x = values[values["arm"].isin(members)][endpoint].astype(bool)
                x_imp = int(imputed[values["arm"].isin(members)].sum())
                nri = _imputed_note(label, x_imp, len(x), s.reference_arm, ref_imp, len(ref))
                common = dict(
                    family=family,
                    measure=endpoint,
                    scale="rate",
                    visit=int(visit),
                    endpoint=f"{endpoint}@{int(visit)}",
                    subgroup="all",
                    comparison=f"{label} vs {s.reference_arm}",
                    n=len(x) + len(ref),
                    n_detail=f"{label} {int(x.sum())}/{len(x)}, {s.reference_arm} {int(ref.sum())}/{len(ref)}",
                    effect_label="risk difference (arm - reference), Newcombe hybrid-score CI",
                )
                if len(x) == 0 or len(ref) == 0:
                    note = no_ref or "no evaluable patients in an arm"
                    rows.append(row(**common, method="response rates", note=note))
                    continue
                if (x_imp and x_imp == len(x)) or (ref_imp and ref_imp == len(ref)):
                    note = f"not tested: no observed patient in an arm at this visit ({nri})"
                    rows.append(row(**common, method="response rates", note=note))
                    continue
                r = compare_rates(
                    int(x.sum()), len(x), int(ref.sum()), len(ref), method=s.rate_test, alpha=s.alpha
                )
                rows.append(
                    row(
                        **common,
                        estimate=r.risk_difference,
                        ci_low=r.ci_low,
                        ci_high=r.ci_high,
                        statistic=r.statistic,
                        df=1.0 if r.method.startswith("Pearson") and np.isfinite(r.p) else np.nan,
                        p=r.p,
                        method=r.method,
                        note="; ".join(n for n in (r.note, nri) if n),
                    )
                )
    return rows


def _imputed_note(label: str, x_imp: int, n_x: int, reference: str, ref_imp: int, n_ref: int) -> str:
    """How many of the compared patients are NRI-imputed non-responders (missed visit or item)."""
    if not (x_imp or ref_imp):
        return ""
    return f"NRI-imputed non-responders: {label} {x_imp}/{n_x}, {reference} {ref_imp}/{n_ref}"
