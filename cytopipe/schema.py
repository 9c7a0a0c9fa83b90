"""Column contracts of the tables other tools and people rely on (docs/DEVELOPING.md).

Keep these names stable; add, never silently rename.
"""

from __future__ import annotations

import pandas as pd

# population_stats (and the simulator's truth table, and clusters.parquet): these leading
# columns, then ``median_<marker>`` (compensated, linear intensities), then extras.
STATS_COLUMNS: list[str] = [
    "sample_id",
    "patient_id",
    "visit",
    "arm",
    "population",
    "parent",
    "count",
    "parent_count",
    "pct_parent",
]

#: ``gate_source`` of a population whose gate needs a marker the file lacks (``missing_markers:
#: skip``): it has no count, no % of parent and no interval (missing values, never 0)
NOT_MEASURED = "not measured"
COUNT_COLUMNS: tuple[str, str] = ("count", "parent_count")


def with_count_dtypes(table: pd.DataFrame) -> pd.DataFrame:
    """``count`` / ``parent_count`` as ``int64``, or as pandas' nullable ``Int64`` only where a value
    is missing (a population not measured in its sample): a fully measured study's tables keep
    exactly the types (and Parquet metadata) they always had. Changes ``table`` in place."""
    for column in COUNT_COLUMNS:
        if column in table.columns:
            values = table[column]
            dtype = "Int64" if values.isna().any() else "int64"
            if str(values.dtype) != dtype:
                table[column] = values.astype("Int64").astype(dtype)
    return table


def blank_unmeasured_counts(table: pd.DataFrame, source: str = "gate_source") -> pd.DataFrame:
    """``population_stats`` rows with ``gate_source`` "not measured" get a missing ``count`` (and a
    missing ``parent_count`` when the parent is not measured in the same sample either), never 0;
    e.g. rows written by older cytopipe versions (they stored 0). ``source`` names the column that
    says so (``"source"`` in gate_review). Changes ``table`` in place."""
    if source not in table.columns or not len(table):
        return with_count_dtypes(table)
    unmeasured = table[source].astype(str) == NOT_MEASURED
    if unmeasured.any():
        keys = set(zip(table.loc[unmeasured, "sample_id"], table.loc[unmeasured, "population"]))
        parent_unmeasured = pd.Series(
            [(s, p) in keys for s, p in zip(table["sample_id"], table["parent"])], index=table.index
        )
        for column, mask in (("count", unmeasured), ("parent_count", unmeasured & parent_unmeasured)):
            if column in table.columns and mask.any():
                table[column] = table[column].astype("Int64").mask(mask)
    return with_count_dtypes(table)
