"""The clinical table: load, validate, and derive trial endpoints.

``clinical.csv`` has one row per patient and visit (study week): ``patient_id``, ``visit``, ``arm``,
``sledai`` (SELENA-SLEDAI total), ``pga`` (physician global assessment, 0-3), ``bilag_new_a``,
``bilag_new_b``, ``anti_dsdna`` (IU/mL), ``c3``, ``c4`` (mg/dL), ``proteinuria`` (g/24 h) and
``prednisone_mg`` (mg/day); more columns are allowed and kept.

``bilag_new_a`` / ``bilag_new_b`` are the *numbers of BILAG-2004 domains newly scored A / B at that
visit compared with baseline* (a domain that is A now and was B-E at baseline counts as a new A; a
domain that is B now and was C-E at baseline counts as a new B). They are counts (0-9); at the
baseline visit they are 0 by definition and are ignored.

Endpoints (:func:`derive_endpoints`, one row per patient and post-baseline visit; full definitions
with defaults in ``docs/statistics.md``):

* SLEDAI change = SLEDAI(visit) - SLEDAI(baseline) (negative = improvement);
* SRI-k (k = 4 by default; 5..8 on request) from its three components, each kept as a column;
* renal response (complete / partial / none) for patients with baseline proteinuria above an
  entry threshold;
* serology status and normalisation flags for anti-dsDNA, C3 and C4.

Missing visits: binary response endpoints use non-responder imputation (NRI) by default; an
``*_imputed`` column says which values were imputed. ``imputation="none"`` leaves them missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.config import dataclass_kwargs
from cytopipe.errors import ClinicalDataError

ID_COLUMNS = ("patient_id", "visit", "arm")
MEASURED_COLUMNS = (
    "sledai",
    "pga",
    "bilag_new_a",
    "bilag_new_b",
    "anti_dsdna",
    "c3",
    "c4",
    "proteinuria",
    "prednisone_mg",
)
REQUIRED_COLUMNS = ID_COLUMNS + MEASURED_COLUMNS

# column -> (lowest allowed, highest allowed, must be integer, unit/meaning for messages)
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "sledai": (0, 105, True, "SELENA-SLEDAI total (0-105, integer)"),
    "pga": (0, 3, False, "physician global assessment (0-3)"),
    "bilag_new_a": (0, 9, True, "number of new BILAG A domains (0-9, integer)"),
    "bilag_new_b": (0, 9, True, "number of new BILAG B domains (0-9, integer)"),
    "anti_dsdna": (0, np.inf, False, "anti-dsDNA (IU/mL, >= 0)"),
    "c3": (0, np.inf, False, "C3 (mg/dL, >= 0)"),
    "c4": (0, np.inf, False, "C4 (mg/dL, >= 0)"),
    "proteinuria": (0, np.inf, False, "proteinuria (g/24 h, >= 0)"),
    "prednisone_mg": (0, np.inf, False, "prednisone dose (mg/day, >= 0)"),
}

# Floating-point slack for threshold comparisons: 1.3 - 1.0 is 0.30000000000000004 in binary,
# and a PGA rise of exactly 0.3 must count as "worsened by >= 0.3".
_EPS = 1e-9


@dataclass(frozen=True)
class ClinicalSettings:
    """Endpoint definitions. Defaults follow ../shared/design/domain.md sections 6-7 (see docs/statistics.md)."""

    baseline_visit: int = 0
    #: expected post-baseline visits; None = every post-baseline visit present in the table
    visits: tuple[int, ...] | None = None
    #: SLEDAI drop thresholds: 4 gives SRI-4; (4, 5, 6) also gives SRI-5 and SRI-6
    sri_thresholds: tuple[int, ...] = (4,)
    max_new_bilag_a: int = 0
    max_new_bilag_b: int = 1
    #: PGA worsening (visit - baseline) at or above this fails the PGA component
    pga_worsening: float = 0.3
    #: "nri" (non-responder imputation of missing binary responses) or "none" (leave missing)
    imputation: str = "nri"
    #: renal response is evaluated for patients with baseline proteinuria > renal_entry (g/24 h)
    renal_entry: float = 0.5
    #: complete renal response: proteinuria < renal_complete (g/24 h)
    renal_complete: float = 0.5
    #: partial: proteinuria <= (1 - renal_partial_reduction) * baseline and < renal_partial_max
    renal_partial_reduction: float = 0.5
    renal_partial_max: float = 3.0
    #: serology "normal" cut-offs: anti-dsDNA < 30 IU/mL, C3 >= 90 mg/dL, C4 >= 16 mg/dL
    anti_dsdna_normal_below: float = 30.0
    c3_normal_at_least: float = 90.0
    c4_normal_at_least: float = 16.0

    def __post_init__(self) -> None:
        if self.imputation not in ("nri", "none"):
            raise ClinicalDataError(
                f"imputation must be 'nri' or 'none', not {self.imputation!r}", key="imputation"
            )
        if not self.sri_thresholds or any(int(k) != k or k < 1 for k in self.sri_thresholds):
            raise ClinicalDataError(
                f"sri_thresholds must be positive integers such as (4,) or (4, 5, 6), not {self.sri_thresholds!r}",
                key="sri_thresholds",
            )

    @classmethod
    def from_any(cls, value: ClinicalSettings | Mapping[str, Any] | None) -> ClinicalSettings:
        """Settings from an instance, a dict (unknown keys are an error) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        kwargs = dataclass_kwargs(value, cls, ClinicalDataError, "clinical")
        for key in ("visits", "sri_thresholds"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# loading and validation
# ------------------------------------------------------------------------------------------------
def load_clinical(
    path: str | Path,
    patients: pd.DataFrame | Iterable[str] | None = None,
    *,
    baseline_visit: int = 0,
) -> pd.DataFrame:
    """Read and validate ``clinical.csv``; problems name the file, CSV line and column.

    ``patients``: the patients that must have clinical data (ids, or a table with ``patient_id``
    and optionally ``arm``, e.g. the manifest or the population table). Raises
    :class:`ClinicalDataError` listing every problem found.
    """
    path = Path(path)
    if not path.is_file():
        raise ClinicalDataError("clinical table not found; check the path in the workflow", file=path)
    try:
        # ids stay text ("007" is not 7); everything else is converted and checked column by column
        table = pd.read_csv(path, dtype={"patient_id": str, "arm": str}, keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ClinicalDataError(f"cannot parse the CSV ({exc}); save it as UTF-8 CSV", file=path) from None
    # CSV line numbers: line 1 is the header, so data row i is on line i + 2
    return validate_clinical(table, patients, baseline_visit=baseline_visit, row_offset=2, file=path)


def validate_clinical(
    clinical: pd.DataFrame,
    patients: pd.DataFrame | Iterable[str] | None = None,
    *,
    baseline_visit: int = 0,
    row_offset: int | None = None,
    file: str | Path | None = None,
) -> pd.DataFrame:
    """Return a clean, typed copy of the clinical table or raise one :class:`ClinicalDataError`.

    Every problem is collected first (see :func:`check_clinical`); the raised error names the first
    problem's row and column, lists all of them in its message and keeps them in ``.problems``.
    ``row_offset``: None reports rows by DataFrame index label; an integer reports
    ``position + row_offset`` (2 gives CSV line numbers).
    """
    problems = check_clinical(
        clinical, patients, baseline_visit=baseline_visit, row_offset=row_offset, file=file
    )
    if problems:
        raise _combine(problems)
    return _typed(clinical)


def _separator_hint(columns: Any) -> str:
    """A header read as one column that holds the required names joined by ``;`` or a tab: the
    file is not comma-separated (e.g. a spreadsheet saved with a European locale)."""
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        if any(sep in str(c) and "patient_id" in str(c) for c in columns):
            return f"; the header separates its columns with {name}: save the table as comma-separated CSV"
    return ""


def check_clinical(
    clinical: pd.DataFrame,
    patients: pd.DataFrame | Iterable[str] | None = None,
    *,
    baseline_visit: int = 0,
    row_offset: int | None = None,
    file: str | Path | None = None,
) -> list[ClinicalDataError]:
    """Every problem of the clinical table as a list of :class:`ClinicalDataError` (empty = valid).

    Checks: required columns; missing ids; non-integer visits; non-numeric or out-of-range values
    (PGA outside 0-3, negative SLEDAI/proteinuria/labs, non-integer SLEDAI or BILAG counts);
    duplicate patient-visit rows; an arm that changes within a patient; patients without a
    baseline visit; patients expected from ``patients`` with no clinical rows, or whose arm differs.
    """
    if not isinstance(clinical, pd.DataFrame):
        return [ClinicalDataError(f"expected a pandas DataFrame, got {type(clinical).__name__}", file=file)]
    problems: list[ClinicalDataError] = []

    def err(message: str, row: Any = None, column: str | None = None) -> None:
        problems.append(ClinicalDataError(message, file=file, row=row, column=column))

    missing = [c for c in REQUIRED_COLUMNS if c not in clinical.columns]
    if missing:
        err(
            f"missing required column(s) {missing}; the clinical table needs {list(REQUIRED_COLUMNS)} "
            f"(more columns are allowed){_separator_hint(clinical.columns)}",
            column=missing[0],
        )
        return problems  # without the schema the row checks would only repeat this
    if len(clinical) == 0:
        err("the clinical table has no rows")
        return problems

    labels = _row_labels(clinical, row_offset)

    # identifiers ------------------------------------------------------------------------------
    pid = clinical["patient_id"]
    pid_missing = pid.isna() | (pid.astype(str).str.strip() == "")
    for i in np.flatnonzero(pid_missing.to_numpy()):
        err("patient_id is empty; every row needs a patient", row=labels[i], column="patient_id")
    arm = clinical["arm"]
    arm_missing = arm.isna() | (arm.astype(str).str.strip() == "")
    for i in np.flatnonzero(arm_missing.to_numpy()):
        err("arm is empty; every row needs the randomised arm", row=labels[i], column="arm")

    visit_raw = clinical["visit"]
    visit, refused = visit_weeks(visit_raw)
    bad_visit = visit.isna()
    for i in np.flatnonzero(bad_visit.to_numpy()):
        err(refused.get(i) or "visit is empty; every row needs its study week", row=labels[i], column="visit")

    # measured values ----------------------------------------------------------------------------
    for column, (low, high, integer, meaning) in _RANGES.items():
        raw = clinical[column]
        values = pd.to_numeric(raw, errors="coerce")
        not_numeric = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        for i in np.flatnonzero(not_numeric.to_numpy()):
            err(f"{raw.iloc[i]!r} is not a number; expected {meaning}", row=labels[i], column=column)
        v = values.to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            out = np.isfinite(v) & ((v < low) | (v > high))
            out |= np.isinf(v)
            if integer:
                out |= np.isfinite(v) & (v != np.round(v))
        for i in np.flatnonzero(out):
            err(f"value {v[i]:g} is out of range; expected {meaning}", row=labels[i], column=column)

    # structure: duplicates, arm changes, baseline ---------------------------------------------
    ok = ~(pid_missing | bad_visit).to_numpy()
    keys = pd.DataFrame(
        {"patient_id": pid.astype(str).str.strip(), "visit": visit, "pos": np.arange(len(clinical))}
    )[ok]
    dup = keys.duplicated(["patient_id", "visit"], keep=False)
    for (p, v), group in keys[dup].groupby(["patient_id", "visit"], sort=True):
        rows = [labels[i] for i in group["pos"]]
        err(
            f"patient {p!r} has {len(rows)} rows for visit {int(v)} (rows {rows}); keep one row per "
            f"patient and visit",
            row=rows[1],
            column="visit",
        )

    arms = pd.DataFrame(
        {
            "patient_id": pid.astype(str).str.strip(),
            "arm": arm.astype(str).str.strip(),
            "pos": np.arange(len(clinical)),
        }
    )[~(pid_missing | arm_missing).to_numpy()]
    for p, group in arms.groupby("patient_id", sort=True):
        first = group["arm"].iloc[0]
        changed = group[group["arm"] != first]
        if len(changed):
            i = changed["pos"].iloc[0]
            err(
                f"patient {p!r} changes arm from {first!r} to {changed['arm'].iloc[0]!r}; the randomised "
                f"arm must be the same on every visit",
                row=labels[i],
                column="arm",
            )

    for p, group in keys.groupby("patient_id", sort=True):
        if not (group["visit"] == baseline_visit).any():
            err(
                f"patient {p!r} has no baseline visit (visit {baseline_visit}); changes from baseline "
                f"and SRI cannot be derived without it",
                row=labels[group["pos"].iloc[0]],
                column="visit",
            )

    # expected patients ------------------------------------------------------------------------
    if patients is not None:
        expected = _expected_patients(patients)
        present = set(keys["patient_id"])
        clinical_arm = arms.groupby("patient_id")["arm"].first().to_dict()
        for p, expected_arm in expected.items():
            if p not in present:
                err(
                    f"patient {p!r} has flow data but no clinical rows; add the patient's visits to "
                    f"the clinical table (or remove the patient from the manifest)",
                    column="patient_id",
                )
            elif expected_arm is not None and clinical_arm.get(p) not in (None, expected_arm):
                err(
                    f"patient {p!r} is in arm {clinical_arm[p]!r} in the clinical table but in arm "
                    f"{expected_arm!r} in the manifest/population table; fix whichever is wrong",
                    column="arm",
                )
    return problems


def patients_without_flow_data(clinical: pd.DataFrame, patients: pd.DataFrame | Iterable[str]) -> list[str]:
    """The patients of the clinical table that are not among ``patients`` (the patients with flow
    data: ids, or a table with ``patient_id``), sorted. They stay in the response-rate families
    (intention to treat: every randomised patient with a baseline visit) but are in no flow-based
    test; the pipeline and the report say so, naming them."""
    expected = set(_expected_patients(patients))
    ids = clinical["patient_id"].dropna().astype(str).str.strip()
    return sorted({p for p in ids if p and p not in expected})


def without_flow_data_message(missing: list[str], shown: int = 20) -> str:
    """The warning about :func:`patients_without_flow_data` (same words in the run and the report)."""
    names = ", ".join(repr(p) for p in missing[:shown])
    more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
    return (
        f"{len(missing)} patient(s) of the clinical table have no flow data ({names}{more}): they are "
        f"counted in the clinical response rates (intention to treat: every randomised patient with a "
        f"baseline visit; a patient without later visits is a non-responder under NRI) but are in no "
        f"flow-based test; if they were not randomised in this study, remove them from the clinical table"
    )


def _row_labels(table: pd.DataFrame, row_offset: int | None) -> list[Any]:
    if row_offset is None:
        return [int(x) if isinstance(x, (np.integer,)) else x for x in table.index]
    return [i + row_offset for i in range(len(table))]


def _expected_patients(patients: pd.DataFrame | Iterable[str]) -> dict[str, str | None]:
    if isinstance(patients, pd.DataFrame):
        if "patient_id" not in patients.columns:
            raise ClinicalDataError("the patients table needs a patient_id column", column="patient_id")
        cols = ["patient_id"] + (["arm"] if "arm" in patients.columns else [])
        first = patients[cols].dropna(subset=["patient_id"]).drop_duplicates("patient_id")
        arms = first["arm"].astype(str).str.strip() if "arm" in first else [None] * len(first)
        return dict(zip(first["patient_id"].astype(str).str.strip(), arms))
    return {str(p).strip(): None for p in patients}


def _combine(problems: list[ClinicalDataError]) -> ClinicalDataError:
    if len(problems) == 1:
        return problems[0]
    first = problems[0]
    shown = problems[:50]
    lines = "\n".join(f"  - {p}" for p in shown)
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    combined = ClinicalDataError(
        f"{len(problems)} problems in the clinical table (first: {first.message})\n{lines}{more}",
        **first.context,
    )
    combined.problems = problems
    return combined


def visit_weeks(values: pd.Series) -> tuple[pd.Series, dict[int, str]]:
    """The study week of each visit (float; NaN where refused or empty) and ``{position: why}``
    for the refused ones. Numbers must be whole weeks; text goes through
    :func:`cytopipe.manifest.parse_visit` (``W4``, ``Week 4``, ``Day 28``, ``BL``, ...)."""
    from cytopipe.manifest import parse_visit, visit_problem

    weeks = np.full(len(values), np.nan)
    refused: dict[int, str] = {}
    for i, v in enumerate(values.to_numpy(dtype=object)):
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            continue
        if isinstance(v, str):
            if not v.strip():
                continue
            try:
                weeks[i] = parse_visit(v)
            except ValueError:
                refused[i] = visit_problem(v)
            continue
        try:
            number = float(v)
        except (TypeError, ValueError):
            refused[i] = visit_problem(v)
            continue
        if np.isfinite(number) and number == round(number):
            weeks[i] = number
        else:
            refused[i] = visit_problem(v)
    return pd.Series(weeks, index=values.index), refused


def _typed(clinical: pd.DataFrame) -> pd.DataFrame:
    out = clinical.copy()
    out["patient_id"] = out["patient_id"].astype(str).str.strip()
    out["arm"] = out["arm"].astype(str).str.strip()
    out["visit"] = visit_weeks(out["visit"])[0].round().astype("int64")
    for column in MEASURED_COLUMNS:
        out[column] = pd.to_numeric(out[column], errors="coerce").astype("float64")
    return out


# ------------------------------------------------------------------------------------------------
# endpoints
# ------------------------------------------------------------------------------------------------
def derive_endpoints(
    clinical: pd.DataFrame, settings: ClinicalSettings | Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Endpoints per patient and expected post-baseline visit (one row each, also for missed visits).

    Columns (k for each SRI threshold, default 4): ``patient_id, arm, visit, observed`` (a row
    exists), baseline values ``<item>_bl``, visit values, changes ``<item>_change`` (visit - baseline)
    for sledai, pga, anti_dsdna, c3, c4, proteinuria, prednisone_mg; SRI components
    ``sri{k}_sledai`` (SLEDAI drop >= k), ``sri_bilag`` (new A <= 0 and new B <= 1), ``sri_pga`` (PGA
    rise < 0.3); ``sri{k}`` and ``sri{k}_imputed``; ``renal_eligible``, ``renal_response``
    (complete/partial/none, missing when not eligible), ``renal_complete``, ``renal_any``,
    ``renal_imputed``; serology ``<lab>_normal`` (status at the visit) and ``<lab>_normalised``
    (abnormal at baseline, normal at the visit; only for patients abnormal at baseline) with
    ``<lab>_normalised_imputed``. Booleans are pandas nullable (``boolean``).
    """
    s = ClinicalSettings.from_any(settings)
    clin = validate_clinical(clinical, baseline_visit=s.baseline_visit)
    base = clin[clin["visit"] == s.baseline_visit].drop_duplicates("patient_id").set_index("patient_id")
    patients = base.index
    if s.visits is not None:
        visits = sorted(int(v) for v in s.visits if v != s.baseline_visit)
    else:
        visits = sorted(int(v) for v in clin["visit"].unique() if v > s.baseline_visit)

    # the full patient x visit grid, so a missed visit is a row (imputed), never a silent absence
    grid = pd.MultiIndex.from_product([patients, visits], names=["patient_id", "visit"])
    post = clin[clin["visit"].isin(visits) & clin["patient_id"].isin(patients)].set_index(
        ["patient_id", "visit"]
    )
    post = post[~post.index.duplicated()]
    out = pd.DataFrame(index=grid).reset_index()
    out["arm"] = base["arm"].reindex(out["patient_id"]).to_numpy()
    out["observed"] = grid.isin(post.index)
    for item in ("sledai", "pga", "anti_dsdna", "c3", "c4", "proteinuria", "prednisone_mg"):
        bl = base[item].reindex(out["patient_id"]).to_numpy(dtype=float)
        now = post[item].reindex(grid).to_numpy(dtype=float)
        out[f"{item}_bl"] = bl
        out[item] = now
        out[f"{item}_change"] = now - bl
    out["bilag_new_a"] = post["bilag_new_a"].reindex(grid).to_numpy(dtype=float)
    out["bilag_new_b"] = post["bilag_new_b"].reindex(grid).to_numpy(dtype=float)

    nri = s.imputation == "nri"
    # components: True / False / <NA> when an input is missing
    bilag_ok, _ = _all_of(
        [
            _cond(out["bilag_new_a"] <= s.max_new_bilag_a, out["bilag_new_a"].notna()),
            _cond(out["bilag_new_b"] <= s.max_new_bilag_b, out["bilag_new_b"].notna()),
        ],
        impute_false=False,
    )
    pga_ok = _cond(out["pga_change"] < s.pga_worsening - _EPS, out["pga_change"].notna())
    out["sri_bilag"] = bilag_ok
    out["sri_pga"] = pga_ok
    for k in s.sri_thresholds:
        sledai_ok = _cond(-out["sledai_change"] >= k - _EPS, out["sledai_change"].notna())
        out[f"sri{k}_sledai"] = sledai_ok
        value, imputed = _all_of([sledai_ok, bilag_ok, pga_ok], impute_false=nri)
        out[f"sri{k}"] = value
        out[f"sri{k}_imputed"] = imputed

    # renal response among patients with baseline proteinuria above the entry threshold
    eligible = out["proteinuria_bl"] > s.renal_entry
    prot, prot_bl = out["proteinuria"], out["proteinuria_bl"]
    complete = prot < s.renal_complete
    partial = (
        ~complete & (prot <= (1 - s.renal_partial_reduction) * prot_bl + _EPS) & (prot < s.renal_partial_max)
    )
    response = np.where(complete, "complete", np.where(partial, "partial", "none")).astype(object)
    missing = prot.isna()
    renal_imputed = eligible & missing & nri
    response[missing.to_numpy()] = "none" if nri else None
    response[~eligible.to_numpy()] = None
    out["renal_eligible"] = eligible.astype("boolean")
    out["renal_response"] = pd.array(response, dtype="string")
    out["renal_complete"] = _from_labels(out["renal_response"], {"complete"})
    out["renal_any"] = _from_labels(out["renal_response"], {"complete", "partial"})
    out["renal_imputed"] = renal_imputed.astype(bool)

    # serology status and normalisation
    for lab, is_normal in (
        ("anti_dsdna", lambda x: x < s.anti_dsdna_normal_below),
        ("c3", lambda x: x >= s.c3_normal_at_least),
        ("c4", lambda x: x >= s.c4_normal_at_least),
    ):
        now_normal = _cond(is_normal(out[lab]), out[lab].notna())
        bl_abnormal = out[f"{lab}_bl"].notna() & ~is_normal(out[f"{lab}_bl"])
        out[f"{lab}_normal"] = now_normal
        normalised = now_normal.copy()
        imputed = bl_abnormal & now_normal.isna() & nri
        if nri:
            normalised = normalised.fillna(False)
        normalised[~bl_abnormal.to_numpy()] = pd.NA
        out[f"{lab}_normalised"] = normalised
        out[f"{lab}_normalised_imputed"] = imputed.astype(bool)
    return out


def _cond(condition: pd.Series, known: pd.Series) -> pd.Series:
    """A nullable boolean: the condition where its inputs are known, <NA> elsewhere."""
    out = pd.Series(pd.array(condition.to_numpy(dtype=bool), dtype="boolean"), index=condition.index)
    out[~known.to_numpy(dtype=bool)] = pd.NA
    return out


def _all_of(parts: list[pd.Series], impute_false: bool) -> tuple[pd.Series, pd.Series]:
    """Three-valued AND: False if any part is False, True if all are True, else missing.

    A definite False component makes the endpoint False even when another is missing (not an
    imputation); only an undecidable endpoint is imputed (NRI -> False) or left missing.
    """
    any_false = np.zeros(len(parts[0]), dtype=bool)
    all_true = np.ones(len(parts[0]), dtype=bool)
    for part in parts:
        any_false |= (part == False).fillna(False).to_numpy(dtype=bool)  # noqa: E712 (nullable compare)
        all_true &= (part == True).fillna(False).to_numpy(dtype=bool)  # noqa: E712
    undecided = ~any_false & ~all_true
    value = pd.array(all_true, dtype="boolean")
    if not impute_false:
        value[undecided] = pd.NA
    return pd.Series(value, index=parts[0].index), pd.Series(undecided & impute_false, index=parts[0].index)


def _from_labels(labels: pd.Series, positive: set[str]) -> pd.Series:
    value = pd.array(labels.isin(positive).to_numpy(dtype=bool), dtype="boolean")
    value[labels.isna().to_numpy()] = pd.NA
    return pd.Series(value, index=labels.index)


def binary_endpoints(settings: ClinicalSettings | None = None) -> list[str]:
    """Names of the binary response columns :func:`derive_endpoints` produces."""
    s = settings or ClinicalSettings()
    return [f"sri{k}" for k in s.sri_thresholds] + [
        "renal_any",
        "renal_complete",
        "anti_dsdna_normalised",
        "c3_normalised",
        "c4_normalised",
    ]


def response_rates(
    endpoints: pd.DataFrame,
    endpoint: str = "sri4",
    *,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Responders, evaluable patients, rate and Wilson CI per arm and visit for one binary endpoint.

    ``n`` counts patients with a value (under NRI every patient of the arm; for renal and serology
    endpoints only eligible patients); ``imputed`` counts the NRI-imputed non-responders.
    """
    from cytopipe.intervals import wilson_interval

    if endpoint not in endpoints.columns:
        raise ClinicalDataError(
            f"endpoint {endpoint!r} is not a column of the endpoint table; available: "
            f"{[c for c in endpoints.columns if c in set(binary_endpoints()) or c.startswith('sri')]}",
            column=endpoint,
        )
    imputed_col = {
        "renal_any": "renal_imputed",
        "renal_complete": "renal_imputed",
    }.get(endpoint, f"{endpoint}_imputed")
    rows = []
    for (arm, visit), group in endpoints.groupby(["arm", "visit"], sort=True):
        value = group[endpoint].dropna().astype(bool)
        x, n = int(value.sum()), int(len(value))
        low, high = wilson_interval(x, n, alpha)
        imputed = int(group[imputed_col].sum()) if imputed_col in group else 0
        rows.append(
            {
                "endpoint": endpoint,
                "arm": arm,
                "visit": int(visit),
                "responders": x,
                "n": n,
                "rate": x / n if n else np.nan,
                "ci_low": float(low),
                "ci_high": float(high),
                "imputed": imputed,
            }
        )
    return pd.DataFrame(rows)
