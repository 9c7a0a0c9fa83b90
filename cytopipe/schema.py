"""Column contracts of the tables other tools and people rely on (ARCHITECTURE.md).

Keep these names stable; add, never silently rename.
"""

from __future__ import annotations

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
