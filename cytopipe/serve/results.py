"""A finished run's results for the pages and the API: samples with QC, frequencies by arm and
visit, downloads (CSV escaped against formula injection) and provenance (run.json)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from cytopipe.schema import NOT_MEASURED

FILES = {  # download name -> (file in the run folder, media type)
    "report.html": ("report.html", "text/html"),
    "population_stats.parquet": ("population_stats.parquet", "application/vnd.apache.parquet"),
    "samples.parquet": ("samples.parquet", "application/vnd.apache.parquet"),
    "statistics.parquet": ("statistics.parquet", "application/vnd.apache.parquet"),
    "clusters.parquet": ("clusters.parquet", "application/vnd.apache.parquet"),
    "gate_review.parquet": ("gate_review.parquet", "application/vnd.apache.parquet"),
    "catalog.duckdb": ("catalog.duckdb", "application/octet-stream"),
    "run.json": ("run.json", "application/json"),
}
H5AD = "application/x-hdf5"
REPORT_TABLES = "report_tables"  # report.html's CSV links: report_tables/<name>.csv beside it
CSV_TABLES = ("population_stats", "samples", "statistics", "clusters")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%")
SAMPLE_COLUMNS = ["sample_id", "patient_id", "visit", "arm", "status", "events_before_qc", "events_after_qc",
                  "qc_removed_fraction", "flags", "error"]  # fmt: skip


def escape_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula gets a leading apostrophe."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def escaped_csv(df: pd.DataFrame) -> bytes:
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(escape_cell)
    out.columns = [escape_cell(str(c)) for c in out.columns]
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


def download_path(out_dir: Path, name: str) -> tuple[Path, str] | None:
    if name in FILES:
        rel, media = FILES[name]
        path = out_dir / rel
        return (path, media) if path.is_file() else None
    if name.endswith(".h5ad") and "/" not in name and not name.startswith("."):
        path = out_dir / "exports" / name
        return (path, H5AD) if path.is_file() else None
    folder, _, base = name.partition("/")
    if folder == REPORT_TABLES and base.endswith(".csv") and "/" not in base and not base.startswith("."):
        # the report's tables, which report.html links to (relative): written escaped by the report
        path = out_dir / REPORT_TABLES / base
        return (path, "text/csv; charset=utf-8") if path.is_file() else None
    return None


def csv_download(out_dir: Path, name: str) -> bytes | None:
    stem = name[:-4] if name.endswith(".csv") else ""
    if stem not in CSV_TABLES or not (out_dir / f"{stem}.parquet").is_file():
        return None
    return escaped_csv(pd.read_parquet(out_dir / f"{stem}.parquet"))


def available(out_dir: Path) -> list[str]:
    names = [n for n in FILES if (out_dir / FILES[n][0]).is_file()]
    names += [f"{t}.csv" for t in CSV_TABLES if (out_dir / f"{t}.parquet").is_file()]
    names += sorted(p.name for p in (out_dir / "exports").glob("*.h5ad"))  # written completely (renamed)
    return names


def summary(out_dir: Path, blinded: bool = False) -> dict[str, Any]:
    """Samples (status, QC), frequencies (median % of parent) by arm and visit, and run.json."""
    info = (
        json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
        if (out_dir / "run.json").is_file()
        else {}
    )
    samples = (
        pd.read_parquet(out_dir / "samples.parquet") if (out_dir / "samples.parquet").is_file() else None
    )
    stats = _population_stats(out_dir / "population_stats.parquet")
    sample_rows: list[dict[str, Any]] = []
    if samples is not None:
        cols = [c for c in SAMPLE_COLUMNS if c in samples.columns and not (blinded and c == "arm")]
        sample_rows = _records(samples[cols])
    freq: list[dict[str, Any]] = []
    groups: list[str] = []
    populations: list[str] = []
    if stats is not None and len(stats):
        by = ["visit"] if blinded else ["arm", "visit"]
        stats = stats.copy()
        stats["group"] = (
            stats[by].astype(str).agg(" / week ".join, axis=1)
            if not blinded
            else "week " + stats["visit"].astype(str)
        )
        table = (
            stats.groupby(["population", "group"], sort=False)["pct_parent"]
            .agg(["median", "count"])
            .reset_index()
        )
        populations = list(dict.fromkeys(stats["population"]))
        order = stats.sort_values(by)[["group"]].drop_duplicates()["group"].tolist()
        groups = order
        lookup = {(r.population, r.group): (r.median, int(r.count)) for r in table.itertuples()}
        unmeasured = (
            stats[stats["gate_source"].astype(str) == NOT_MEASURED].groupby(["population", "group"]).size().to_dict()
            if "gate_source" in stats.columns else {}
        )  # fmt: skip
        parents = dict(zip(stats["population"], stats["parent"]))
        for pop in populations:
            cells = [(*lookup.get((pop, g), (None, 0)), int(unmeasured.get((pop, g), 0))) for g in groups]
            freq.append({"population": pop, "parent": parents.get(pop) or "",
                         "cells": [{"median": None if m is None or pd.isna(m) else round(float(m), 2), "n": n,
                                    "not_measured": k} for m, n, k in cells]})  # fmt: skip
    return {"info": info, "samples": sample_rows, "groups": groups, "frequencies": freq,
            "counts": _counts(samples), "blinded": blinded}  # fmt: skip


def _population_stats(path: Path) -> pd.DataFrame | None:
    """The columns of population_stats the summary needs (``gate_source``: "not measured" where a
    population's gate needs a marker the file lacks, in the runs that write it)."""
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    columns = ["sample_id", "arm", "visit", "population", "parent", "pct_parent", "gate_source"]
    present = set(pq.read_schema(path).names)
    return pd.read_parquet(path, columns=[c for c in columns if c in present])


def _counts(samples: pd.DataFrame | None) -> dict[str, int]:
    if samples is None:
        return {}
    return {str(k): int(v) for k, v in samples["status"].value_counts().items()}


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.astype(object).where(df.notna(), None).to_dict("records"):
        out.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()})
    return out
