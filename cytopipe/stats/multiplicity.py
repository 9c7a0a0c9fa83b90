"""Multiplicity: Benjamini-Hochberg q-values within explicitly chosen families."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

#: q-values are computed over rows sharing these columns (see docs/statistics.md, "Families")
BH_FAMILY_KEYS = ("family", "measure")


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q); NaN p-values stay NaN and do not count as tests.

    Calls statsmodels ``multipletests`` with ``method='fdr_bh'`` explicitly: its default is
    Holm-Sidak, a family-wise method, not the false discovery rate.
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return q


def add_qvalues(table: pd.DataFrame, by: Sequence[str] = BH_FAMILY_KEYS) -> pd.DataFrame:
    """Fill the ``q`` column with BH q-values computed separately within each group of ``by``."""
    out = table.copy()
    out["q"] = np.nan
    if out.empty:
        return out
    keys = [out[k].fillna("") for k in by]
    for _, index in out.groupby(keys, sort=False).groups.items():
        out.loc[index, "q"] = bh_qvalues(out.loc[index, "p"].to_numpy(dtype=float))
    return out
