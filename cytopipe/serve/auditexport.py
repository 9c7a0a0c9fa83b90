"""The audit trail as CSV (every text cell escaped against spreadsheet formula injection) or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

from cytopipe.serve.results import escaped_csv

COLUMNS = [
    "id",
    "at",
    "user",
    "action",
    "object_type",
    "object_id",
    "before",
    "after",
    "reason",
    "prev_hash",
    "hash",
]


def export_text(rows: Sequence[dict[str, Any]], fmt: str = "csv") -> str:
    """``rows`` from :func:`cytopipe.serve.audit.as_dict`, oldest first."""
    if fmt == "json":
        return json.dumps(list(rows), indent=1, ensure_ascii=False, default=str)
    frame = pd.DataFrame(
        [{**r, "before": json.dumps(r["before"], sort_keys=True), "after": json.dumps(r["after"], sort_keys=True)}
         for r in rows],
        columns=COLUMNS,
    )  # fmt: skip
    return escaped_csv(frame.astype({"before": object, "after": object})).decode("utf-8")
