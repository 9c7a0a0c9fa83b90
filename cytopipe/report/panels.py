"""One gate-review panel's arrays (a row of :mod:`cytopipe.report.gate_review`'s table).

Apart from gate_review (which re-exports them) because the gate gallery's helper process
(:mod:`cytopipe.report.render_helper`) needs only these: it draws without importing pandas
(~0.3 s of CPU per report).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def panel_arrays(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x_edges, y_edges, counts)`` of one gate-review row; counts shaped (ny, nx) or (nx,)."""
    nx, ny = int(row["x_bins"]), int(row["y_bins"])
    xe = np.linspace(*row["x_range"], nx + 1) if nx else np.empty(0)
    ye = np.linspace(*row["y_range"], ny + 1) if ny else np.empty(0)
    counts = np.asarray(row["counts"], dtype=np.int64)
    if ny:
        counts = counts.reshape(ny, nx)
    return xe, ye, counts


def panel_background(row: Mapping[str, Any]) -> np.ndarray:
    """Every parent event per bin of a panel that shows part of them (shaped like its counts),
    else an empty array."""
    values = row.get("background") if hasattr(row, "get") else None
    if values is None or (isinstance(values, float) and np.isnan(values)) or len(values) == 0:
        return np.empty(0, dtype=np.int64)
    out = np.asarray(values, dtype=np.int64)
    nx, ny = int(row["x_bins"]), int(row["y_bins"])
    return out.reshape(ny, nx) if ny else out
