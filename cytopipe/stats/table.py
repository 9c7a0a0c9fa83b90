"""The long result table written to ``statistics.parquet``: one row per test or estimate."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

#: column -> meaning (the contract the report and statisticians rely on; add, never rename)
COLUMNS: dict[str, str] = {
    "family": "multiplicity family (BH q-values are computed within family x measure)",
    "population": "population / cluster name (empty for clinical-only tests)",
    "parent": "parent population of the frequency (denominator)",
    "measure": "analysed column: pct_parent, median_<marker>, or the clinical endpoint",
    "scale": "per-patient outcome: change, log2fc, auc_change, auc_log2fc, baseline, rate",
    "visit": "study week (empty for AUC windows and whole-trajectory tests)",
    "window": "AUC window ('0-12', '0-24', 'all') for AUC tests",
    "endpoint": "clinical endpoint or item involved (e.g. sri4@12, sledai_change)",
    "subgroup": "patients included: all, active (non-reference arms) or an arm",
    "comparison": "what is compared, e.g. 'IL-2 1.0 MIU vs placebo', 'dose trend'",
    "estimate": "effect estimate (see effect_label)",
    "ci_low": "lower confidence limit of estimate",
    "ci_high": "upper confidence limit of estimate",
    "effect_label": "what estimate is",
    "statistic": "test statistic (U, J, chi-square, Wald ratio estimate / SE, Wald chi-square, ...)",
    "df": "degrees of freedom: of chi-square statistics (numerator df of the mixed model's joint tests), or of the t reference of a mixed-model effect or dose slope",
    "p": "two-sided p-value (NaN when the test could not run; see note)",
    "q": "Benjamini-Hochberg q-value within family x measure",
    "method": "test and options used",
    "n": "patients in the test",
    "n_detail": "patients per group",
    "note": "why p is NaN, or a warning about the fit",
}


def row(**values: Any) -> dict[str, Any]:
    """A result row with every column present (missing ones NaN/None)."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns {sorted(unknown)}")
    out: dict[str, Any] = dict.fromkeys(COLUMNS)
    for key in ("estimate", "ci_low", "ci_high", "statistic", "df", "p", "q"):
        out[key] = np.nan
    out.update(values)
    return out


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> the typed result table (stable dtypes, so empty and full tables concatenate and write to Parquet)."""
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for key in ("estimate", "ci_low", "ci_high", "statistic", "df", "p", "q"):
        table[key] = pd.to_numeric(table[key], errors="coerce").astype("float64")
    table["visit"] = pd.array(pd.to_numeric(table["visit"], errors="coerce"), dtype="Int64")
    table["n"] = pd.array(pd.to_numeric(table["n"], errors="coerce"), dtype="Int64")
    for key in (
        "family",
        "population",
        "parent",
        "measure",
        "scale",
        "window",
        "endpoint",
        "subgroup",
        "comparison",
        "effect_label",
        "method",
        "n_detail",
        "note",
    ):
        table[key] = table[key].astype("string")
    return table


def blind_arms(table: pd.DataFrame, codes: dict[str, str]) -> pd.DataFrame:
    """Copy of a result table with every arm name replaced by its code in every text column.

    For blinded reports: ``codes`` maps each arm name to a code (e.g. ``{"placebo": "Arm A", ...}``).
    Longer names are replaced first so that one name inside another cannot leak a fragment.
    """
    out = table.copy()
    names = sorted(codes, key=len, reverse=True)
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            values = out[column]
            mask = values.notna()
            text = values[mask].astype(str)
            for name in names:
                text = text.str.replace(name, codes[name], regex=False)
            out.loc[mask, column] = text
    return out
