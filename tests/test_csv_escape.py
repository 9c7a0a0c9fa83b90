"""CSV cells that a spreadsheet would run as formulas are escaped in every CSV cytopipe writes
(issue 11, defect 3); numbers stay numbers."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pandas as pd
import pytest

from cytopipe.tabular import csv_text, escape_cell, write_csv

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
HOSTILE = ["=cmd|' /C calc'!A0", "+P003_W00", "-2+3", "@SUM(A1:A9)", "\tx", "\rx", "=1+1"]


def cells(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return [c for row in csv.reader(fh) for c in row]


@pytest.mark.parametrize("value", HOSTILE)
def test_formula_like_text_gets_a_leading_quote(value):
    assert escape_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["-1.5", "+3", "-2e-5", "-inf", "NaN", "P001_W00", "a=b", "", "CD4+ T"])
def test_plain_numbers_and_ordinary_text_are_unchanged(value):
    assert escape_cell(value) == value


def test_write_csv_escapes_text_and_keeps_numbers_numeric(tmp_path):
    hostile = [v for v in HOSTILE if "\r" not in v]  # (pandas' reader splits rows at a quoted CR)
    df = pd.DataFrame(
        {
            "sample_id": hostile,
            "count": np.arange(len(hostile)) - 3,  # negative integers stay numbers
            "pct": np.linspace(-1.5, 1.5, len(hostile)),
            "arm": pd.Categorical(["@arm"] * len(hostile)),
            "=header": ["ok"] * len(hostile),
        }
    )
    path = write_csv(df, tmp_path / "t.csv")
    back = pd.read_csv(path)
    assert back["count"].tolist() == df["count"].tolist()
    np.testing.assert_allclose(back["pct"], df["pct"])
    assert back["sample_id"].tolist() == ["'" + v for v in hostile]
    assert set(back["arm"]) == {"'@arm"}
    assert "'=header" in back.columns
    for cell in cells(path):
        assert not cell.startswith(TRIGGERS) or _is_number(cell), cell
    assert df["sample_id"].tolist() == hostile  # the caller's frame is not modified
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_the_index_is_escaped_too():
    text = csv_text(pd.DataFrame({"-A": [1.0]}, index=pd.Index(["=B"], name="@c")), index=True)
    assert text.splitlines() == ["'@c,'-A", "'=B,1.0"]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_report_tables_escape_hostile_sample_ids_and_flags(sample_run, tmp_path):
    """Before: report_tables/samples.csv held `=cmd|' /C calc'!A0` and `+P003_W00` verbatim."""
    from cytopipe.report import write_report

    run = tmp_path / "run"
    shutil.copytree(sample_run, run)
    rename = {"P003_W00": "+P003_W00", "P001_W00": "=cmd|' /C calc'!A0"}
    for name in ("population_stats", "samples", "gate_review"):
        path = run / f"{name}.parquet"
        if path.is_file():
            df = pd.read_parquet(path)
            df["sample_id"] = df["sample_id"].replace(rename)
            if "flags" in df:
                df["flags"] = df["flags"].where(df["sample_id"] != "+P003_W00", "@SUM(1+1)*cmd|' /C calc'!A0")
            df.to_parquet(path, index=False)
    write_report(run)
    tables = sorted((run / "report_tables").glob("*.csv"))
    assert tables
    seen = set()
    for path in tables:
        for cell in cells(path):
            assert not cell.startswith(TRIGGERS) or _is_number(cell), f"{path.name}: {cell!r}"
            seen.add(cell)
    assert "'+P003_W00" in seen and "'=cmd|' /C calc'!A0" in seen
    # numbers are still numbers: the samples table's event counts read back as integers
    samples = pd.read_csv(run / "report_tables" / "samples.csv")
    numeric = samples.select_dtypes("number").columns
    assert len(numeric) >= 2, list(samples.columns)
