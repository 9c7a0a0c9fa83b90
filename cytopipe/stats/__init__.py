"""Dynamics and statistics of immune populations in a longitudinal trial.

One entry point for the pipeline and the report::

    from cytopipe.stats import run_statistics
    table = run_statistics(population_stats, clinical, {"measures": ["pct_parent"]})
    table.to_parquet(run_dir / "statistics.parquet")

``run_statistics`` works on any table with the ``population_stats`` columns (gated populations or
FlowSOM metacluster abundances) and any measure column (``pct_parent`` or ``median_<marker>``).
It returns one long table, one row per test (columns in :data:`cytopipe.stats.table.COLUMNS`), with
Benjamini-Hochberg q-values within each family x measure. The building blocks are public too:
:func:`baseline_change`, :func:`time_averaged_auc`, :func:`add_wilson_ci`, :func:`summarise_by_arm`, :func:`mann_whitney`,
:func:`jonckheere_terpstra`, :func:`spearman`, :func:`compare_rates`, :func:`wilson_interval`,
:func:`fit_mixed_model`, :func:`fit_logistic`, :func:`roc_auc`, :func:`bh_qvalues`.
Definitions, defaults and families: docs/statistics.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd

from cytopipe.errors import StatisticsError
from cytopipe.intervals import newcombe_interval, wilson_interval
from cytopipe.stats.armorder import in_arm_order
from cytopipe.stats.dynamics import (
    add_wilson_ci,
    baseline_change,
    check_population_table,
    summarise_by_arm,
    time_averaged_auc,
)
from cytopipe.stats.models import fit_logistic, fit_mixed_model, roc_auc
from cytopipe.stats.multiplicity import BH_FAMILY_KEYS, add_qvalues, bh_qvalues
from cytopipe.stats.nonparametric import hodges_lehmann, jonckheere_terpstra, mann_whitney, spearman
from cytopipe.stats.rates import RateComparison, compare_rates
from cytopipe.stats.settings import StatsSettings, arm_doses, arm_order
from cytopipe.stats.table import COLUMNS, blind_arms, row

__all__ = [
    "BH_FAMILY_KEYS",
    "COLUMNS",
    "FAMILIES",
    "RateComparison",
    "StatsSettings",
    "add_qvalues",
    "add_wilson_ci",
    "arm_doses",
    "arm_order",
    "baseline_change",
    "bh_qvalues",
    "blind_arms",
    "compare_rates",
    "fit_logistic",
    "fit_mixed_model",
    "hodges_lehmann",
    "jonckheere_terpstra",
    "mann_whitney",
    "newcombe_interval",
    "roc_auc",
    "run_statistics",
    "spearman",
    "summarise_by_arm",
    "time_averaged_auc",
    "wilson_interval",
]

#: family -> what it holds (BH q-values are computed within family x measure)
FAMILIES: dict[str, str] = {
    "arm_visit": "Mann-Whitney, each active arm vs reference, per population x post-baseline visit",
    "dose_trend": "Jonckheere-Terpstra across arms in dose order, per population x post-baseline visit",
    "auc_arm": "Mann-Whitney on time-averaged AUC, each active arm vs reference, per population x window",
    "auc_dose_trend": "Jonckheere-Terpstra on time-averaged AUC, per population x window",
    "mixed_arm_visit": "mixed-model arm x visit effects, per population x active arm x visit",
    "mixed_arm": "mixed-model joint Wald test of all arm x visit effects, per population",
    "mixed_interaction": "mixed-model Wald test that arm effects are equal across visits, per population",
    "mixed_dose_trend": "mixed-model linear dose term (slope of visit-averaged arm effects on dose), per population",
    "response_rate": "SRI-k and renal response rates, arm vs reference, per endpoint x visit x comparison",
    "serology_rate": "anti-dsDNA / C3 / C4 normalisation rates, arm vs reference",
    "responder_change": "Mann-Whitney responders vs non-responders on change, per population x visit x subgroup",
    "roc": "ROC AUC of baseline value for response, per population x subgroup",
    "logistic_prognostic": "odds ratio per SD of baseline adjusted for arm, per population",
    "logistic_terms": "odds ratio per SD of baseline within each arm, per population x arm",
    "logistic_interaction": "likelihood-ratio test of arm x baseline, per population",
    "correlation": "Spearman of subset change vs clinical change, per population x item x visit",
}


def run_statistics(
    population_stats: pd.DataFrame,
    clinical: pd.DataFrame | None = None,
    settings: StatsSettings | Mapping[str, Any] | None = None,
    map_fits: Callable[[Callable, list], Iterable] | None = None,
) -> pd.DataFrame:
    """Every analysis of the trial in one long table (write it to ``statistics.parquet``).

    ``population_stats``: one row per sample and population (``patient_id, visit, arm, population``
    and the measure columns). ``clinical``: the clinical table (validated here against the patients
    of ``population_stats``; a :class:`~cytopipe.errors.ClinicalDataError` lists every problem), or
    None to skip the clinical families. ``map_fits(fn, items)``: how the per-population mixed
    models are fitted (results in the order of ``items``; default: one after another here; the
    pipeline fits them on its Dask workers). Deterministic: same inputs, same table.
    """
    from cytopipe.clinical import derive_endpoints, validate_clinical
    from cytopipe.stats import analyses as an

    s = StatsSettings.from_any(settings)
    table = check_population_table(population_stats, s.measures)
    absent: list[str] = []
    if s.populations is not None:
        absent = [p for p in dict.fromkeys(s.populations) if p not in set(table["population"])]
        table = table[table["population"].isin(s.populations)]
    visits = sorted(set(table["visit"]))
    if visits and s.baseline_visit not in visits:  # every change would be missing: say why, once
        raise StatisticsError(
            f"baseline visit {s.baseline_visit} has no sample in the population table (visits: {visits}); "
            f"set baseline_visit to the study week of the baseline samples",
            key="baseline_visit",
        )
    arms_present = list(dict.fromkeys(table["arm"]))
    order, reason = arm_order(arms_present, s)

    endpoints = None
    if clinical is not None:
        clin = validate_clinical(clinical, table[["patient_id", "arm"]], baseline_visit=s.baseline_visit)
        endpoints = derive_endpoints(clin, s.clinical)
        arms_clinical, _ = arm_order(list(dict.fromkeys(clin["arm"])), s)

    unknown = sorted(set(s.families or ()) - set(FAMILIES))
    if unknown:
        raise StatisticsError(f"unknown families {unknown}; known: {sorted(FAMILIES)}", key="families")

    def wanted(*families: str) -> bool:
        return s.families is None or any(f in s.families for f in families)

    rows: list[dict] = []
    for measure in s.measures:
        dyn = baseline_change(
            table,
            measure,
            baseline_visit=s.baseline_visit,
            pseudocount=s.pseudocount,
            duplicates=s.duplicates,
        )
        if wanted("arm_visit"):
            rows += an.arm_visit_tests(dyn, measure, order, reason, s)
        if wanted("dose_trend"):
            rows += an.dose_trend_tests(dyn, measure, order, reason, s)
        if wanted("auc_arm", "auc_dose_trend"):
            auc = time_averaged_auc(
                dyn, s.auc_windows, all_visits=s.auc_all_visits, baseline_visit=s.baseline_visit
            )
            rows += an.auc_tests(auc, measure, order, reason, s)
        if s.mixed_model and wanted("mixed_arm_visit", "mixed_arm", "mixed_interaction", "mixed_dose_trend"):
            rows += an.mixed_model_tests(dyn, measure, order, reason, s, map_fits=map_fits)
        if endpoints is not None:
            arms = order or sorted(arms_present)
            if wanted(
                "responder_change", "roc", "logistic_prognostic", "logistic_terms", "logistic_interaction"
            ):
                rows += an.responder_tests(dyn, endpoints, measure, arms, s)
            if wanted("correlation"):
                rows += an.correlation_tests(dyn, endpoints, measure, s)
    if endpoints is not None and wanted("response_rate", "serology_rate"):
        arms = arms_clinical or sorted(set(endpoints["arm"]))
        rows += an.response_rate_tests(endpoints, arms, s)

    from cytopipe.stats.table import to_frame

    # a requested population without a row in the table (a typo, or measured in no sample) still
    # gets one row per family and measure saying so: never a silent absence
    known = sorted(set(population_stats["population"].dropna().astype(str)))
    per_population = [f for f in FAMILIES if f not in ("response_rate", "serology_rate")]
    if not s.mixed_model:
        per_population = [f for f in per_population if not f.startswith("mixed_")]
    if endpoints is None:
        per_population = [f for f in per_population if f in an.FLOW_ONLY_FAMILIES]
    for pop in absent:
        note = _absent_population_note(pop, known)
        logging.getLogger(__name__).warning("statistics: %s", note)
        for measure in s.measures:
            rows += [
                row(family=f, population=pop, measure=measure, note=note) for f in per_population if wanted(f)
            ]

    out = to_frame(rows)
    if s.families is not None:
        out = out[out["family"].isin(s.families)].reset_index(drop=True)
    # one arm order, the same in every run and after `cytopipe unblind` (cytopipe/stats/armorder.py)
    known_arms = [*arms_present, *(list(dict.fromkeys(endpoints["arm"])) if endpoints is not None else [])]
    return in_arm_order(add_qvalues(out, BH_FAMILY_KEYS), known_arms, s.reference_arm, s.arm_doses)


def _absent_population_note(population: str, known: list[str]) -> str:
    """Why a requested population has no test: not in the table (with a did-you-mean)."""
    import difflib

    close = difflib.get_close_matches(population, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"population {population!r} (settings.populations) has no measured sample in the population "
        f"table{hint}"
    )
