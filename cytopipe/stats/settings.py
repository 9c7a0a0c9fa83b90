"""Settings of :func:`cytopipe.stats.run_statistics` (all defaults documented in docs/statistics.md)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cytopipe.clinical import ClinicalSettings
from cytopipe.config import dataclass_kwargs
from cytopipe.errors import StatisticsError

CHANGE_SCALES = ("change", "log2fc")


@dataclass(frozen=True)
class StatsSettings:
    """What :func:`run_statistics` computes. Pass an instance, a dict with these keys, or None."""

    #: measure columns analysed: "pct_parent" and/or "median_<marker>" columns
    measures: tuple[str, ...] = ("pct_parent",)
    #: populations analysed (None = every population in the table)
    populations: tuple[str, ...] | None = None
    baseline_visit: int = 0
    reference_arm: str = "placebo"
    #: dose per arm for the dose order (trend tests); None = parsed from arm names ("IL-2 0.5 MIU" -> 0.5),
    #: reference arm = 0
    arm_doses: Mapping[str, float] | None = None
    #: the per-patient outcome of the per-visit tests and the mixed model: "change" (absolute) or "log2fc"
    change_scale: str = "change"
    #: pseudo-count for log2 fold changes of measures without event counts (None = measure default)
    pseudocount: float | None = None
    #: several samples per patient, population and visit: "error" or "mean"
    duplicates: str = "error"
    #: fewest patients per compared group before a test is run (else a row with p = NaN and a note)
    min_group_size: int = 3
    alpha: float = 0.05
    #: AUC windows (start, end) in study weeks, plus "all" (baseline to last visit) when auc_all_visits
    auc_windows: tuple[tuple[int, int], ...] = ((0, 12), (0, 24))
    auc_all_visits: bool = True
    mann_whitney_method: str = "auto"
    jonckheere_method: str = "auto"
    mixed_model: bool = True
    #: covariance of the mixed-model fixed effects: "model" (REML, t / F with Satterthwaite df) or "robust"
    #: (patient-clustered CR3 sandwich with t(G-1) / Hotelling-F reference; arm-specific variances)
    mixed_model_covariance: str = "model"
    #: response-rate test: "auto" (Pearson chi-square when every expected count is >= 5, else Fisher
    #: exact), "chi2" (always Pearson, no continuity correction) or "fisher" (always Fisher exact)
    rate_test: str = "auto"
    #: binary endpoint for responder analyses, logistic regression and ROC
    response_endpoint: str = "sri4"
    #: visit at which responders are defined (None = 12 if present, else the last visit)
    response_visit: int | None = None
    #: clinical items whose change from baseline is correlated with each subset's change
    correlation_items: tuple[str, ...] = ("sledai", "anti_dsdna", "c3", "c4", "proteinuria")
    min_correlation_n: int = 5
    #: patient subgroups of the responder analyses: "all", "active" (all non-reference arms) or arm names
    responder_subgroups: tuple[str, ...] = ("all", "active")
    #: families to compute (None = all; see cytopipe.stats.FAMILIES), e.g. ("arm_visit", "dose_trend")
    families: tuple[str, ...] | None = None
    #: seed of every random step (permutation tests only)
    seed: int = 0
    clinical: ClinicalSettings = field(default_factory=ClinicalSettings)

    def __post_init__(self) -> None:
        if self.change_scale not in CHANGE_SCALES:
            raise StatisticsError(
                f"change_scale must be one of {CHANGE_SCALES}, not {self.change_scale!r}", key="change_scale"
            )
        if self.rate_test not in ("auto", "chi2", "fisher"):
            raise StatisticsError(
                f"rate_test must be 'auto', 'chi2' or 'fisher', not {self.rate_test!r}", key="rate_test"
            )
        if self.duplicates not in ("error", "mean"):
            raise StatisticsError(
                f"duplicates must be 'error' or 'mean', not {self.duplicates!r}", key="duplicates"
            )
        if self.mixed_model_covariance not in ("model", "robust"):
            raise StatisticsError(
                f"mixed_model_covariance must be 'model' or 'robust', not {self.mixed_model_covariance!r}",
                key="mixed_model_covariance",
            )
        if not 0 < self.alpha < 1:
            raise StatisticsError(f"alpha must be between 0 and 1, not {self.alpha!r}", key="alpha")
        if self.min_group_size < 2:
            raise StatisticsError("min_group_size must be at least 2", key="min_group_size")
        if self.clinical.baseline_visit != self.baseline_visit:
            # one baseline for flow and clinic; keep them in step rather than let them diverge silently
            object.__setattr__(self, "clinical", replace(self.clinical, baseline_visit=self.baseline_visit))

    @classmethod
    def from_any(cls, value: StatsSettings | Mapping[str, Any] | None) -> StatsSettings:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        kwargs = dataclass_kwargs(value, cls, StatisticsError, "statistics")
        for key in ("measures", "populations", "correlation_items", "responder_subgroups", "families"):
            if kwargs.get(key) is not None:
                kwargs[key] = (kwargs[key],) if isinstance(kwargs[key], str) else tuple(kwargs[key])
        if "auc_windows" in kwargs:
            kwargs["auc_windows"] = tuple((int(a), int(b)) for a, b in kwargs["auc_windows"])
        if "clinical" in kwargs:
            kwargs["clinical"] = ClinicalSettings.from_any(kwargs["clinical"])
        return cls(**kwargs)


_DOSE_WITH_UNIT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:MIU|MU|IU|mg|ug|µg|mcg|g)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![A-Za-z-])(\d+(?:\.\d+)?)")


def parse_dose(arm: str) -> float | None:
    """The dose in an arm name: the number before a unit ("IL-2 0.5 MIU" -> 0.5), else the only
    free-standing number; None when ambiguous. ("IL-2" is a name, not a dose: the 2 follows a hyphen.)"""
    with_unit = _DOSE_WITH_UNIT.findall(arm)
    if len(with_unit) == 1:
        return float(with_unit[0])
    numbers = _NUMBER.findall(arm)
    return float(numbers[0]) if len(numbers) == 1 else None


def missing_reference_note(arms: Sequence[str], reference: str) -> str:
    """Why nothing is compared with the reference arm: it is not among the arms (with a did-you-mean
    for a differently written name, e.g. "Placebo" or "PBO" for the default "placebo")."""
    import difflib

    names = sorted({str(a) for a in arms})
    note = f"reference arm {reference!r} not among arms {names}"
    close = [a for a in names if a.casefold() == reference.casefold()]
    close = close or difflib.get_close_matches(reference, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{note}; {hint}set reference_arm (statistics: reference_arm in the workflow)"


def arm_doses(arms: Sequence[str], settings: StatsSettings) -> tuple[dict[str, float] | None, str]:
    """Dose per arm (reference = 0 unless set), or (None, reason) when it cannot be known."""
    arms = list(dict.fromkeys(arms))
    if settings.reference_arm not in arms:
        return None, missing_reference_note(arms, settings.reference_arm)
    doses: dict[str, float] = {}
    for arm in arms:
        if settings.arm_doses is not None:
            if arm not in settings.arm_doses:
                return None, f"arm {arm!r} has no dose in settings.arm_doses"
            doses[arm] = float(settings.arm_doses[arm])
        elif arm == settings.reference_arm:
            doses[arm] = 0.0
        else:
            dose = parse_dose(arm)
            if dose is None:
                return None, f"cannot read a dose from arm name {arm!r}; set settings.arm_doses"
            doses[arm] = dose
    if len(set(doses.values())) != len(doses):
        return None, f"arms share a dose ({doses}); set settings.arm_doses"
    return doses, ""


def arm_order(arms: Sequence[str], settings: StatsSettings) -> tuple[list[str] | None, str]:
    """Arms in increasing dose order (reference first), or (None, reason) when it cannot be known."""
    doses, reason = arm_doses(arms, settings)
    if doses is None:
        return None, reason
    return sorted(doses, key=lambda a: doses[a]), ""
