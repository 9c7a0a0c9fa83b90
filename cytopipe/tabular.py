"""CSV output that a spreadsheet cannot execute: the one way cytopipe writes CSV files.

A lab member opens ``report_tables/*.csv`` in Excel or LibreOffice. A cell that starts with
``=``, ``+``, ``-``, ``@``, a TAB or a CR is read there as a formula (``=cmd|' /C calc'!A0``,
``+P003_W00``, ``@SUM(...)``). Following the OWASP rule, such text cells get a leading single
quote (``'=cmd...``), which spreadsheets show as text. Numbers stay numbers: numeric columns are
written as they are, and text cells that are plain numbers (``-1.5``, ``+3``, ``-inf``) are not
quoted either, since they cannot run as formulas.

Every CSV the project writes goes through :func:`write_csv` (to a file, atomically) or
:func:`csv_text` (to a string, e.g. to check it before writing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["csv_text", "escape_cell", "escape_frame", "write_csv"]

_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan|infinity)", re.IGNORECASE)


def escape_cell(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would run as a formula."""
    if isinstance(value, str) and value.startswith(_TRIGGERS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def _escape_index(index: pd.Index) -> pd.Index:
    if isinstance(index, pd.MultiIndex):
        return pd.MultiIndex.from_tuples(
            [tuple(escape_cell(v) for v in t) for t in index], names=[escape_cell(n) for n in index.names]
        )
    if pd.api.types.is_numeric_dtype(index.dtype) or pd.api.types.is_bool_dtype(index.dtype):
        return index.rename(escape_cell(index.name))
    return pd.Index([escape_cell(v) for v in index], name=escape_cell(index.name), dtype=object)


def escape_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells, column names and index labels are escaped; numeric,
    boolean and datetime columns are untouched (they stay numbers in the CSV)."""
    out = df.copy()
    for i in range(out.shape[1]):
        series = out.iloc[:, i]
        dtype = series.dtype
        if pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
            continue
        if pd.api.types.is_datetime64_any_dtype(dtype) or isinstance(dtype, pd.PeriodDtype):
            continue
        if isinstance(dtype, pd.CategoricalDtype):
            series = series.astype(object)
        out.isetitem(i, series.map(escape_cell, na_action="ignore"))
    out.columns = _escape_index(out.columns)
    out.index = _escape_index(out.index)
    return out


def csv_text(df: pd.DataFrame, index: bool = False, **kwargs: Any) -> str:
    """The CSV text of ``df`` with formula-like cells escaped (``kwargs`` go to ``DataFrame.to_csv``)."""
    kwargs.setdefault("lineterminator", "\n")
    return escape_frame(df).to_csv(index=index, **kwargs)


def write_csv(df: pd.DataFrame, path: str | Path, index: bool = False, **kwargs: Any) -> Path:
    """Write ``df`` as CSV to ``path``: formula-like cells escaped, written to a temporary file in
    the same folder, flushed, fsynced, read back and renamed (the old file is kept on any failure;
    :class:`~cytopipe.errors.StoreError` names the file)."""
    from cytopipe.files import atomic_write_bytes

    data = csv_text(df, index=index, **kwargs).encode("utf-8")
    return atomic_write_bytes(path, data)
