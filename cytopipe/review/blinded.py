"""A review of a blinded run folder: the run is loaded with its arms in memory
(:func:`cytopipe.pipeline.loaded.load_run`), so what a review writes back (re-gated rows, the
statistics, the catalog's copy of run.json) is coded again here, never written with the names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd


def coded(lr: Any, table: pd.DataFrame | None) -> pd.DataFrame | None:
    """``table`` with arm names replaced by the folder's codes (as it is when not blinded)."""
    from cytopipe.report.blinding import blind_frame

    return blind_frame(table, lr.codes) if lr.codes is not None and table is not None else table


def plain(lr: Any, tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The folder's coded tables with their arms, in memory (what the statistics compute with)."""
    from cytopipe.report.blinding import unblind_frame

    if lr.codes is None:
        return dict(tables)
    return {name: unblind_frame(df, lr.codes) for name, df in tables.items()}


def coded_info(lr: Any) -> dict[str, Any]:
    """run.json's content as the folder holds it (coded when blinded)."""
    from cytopipe.report.blinding import recode_obj

    return recode_obj(lr.info, lr.codes) if lr.codes is not None else lr.info
