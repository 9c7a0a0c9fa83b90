"""Incremental re-gating after review overrides.

Only the samples whose overrides changed are gated again, with the run's own study state
(:func:`cytopipe.pipeline.load_run`: compensation, locked transforms, pooled estimates), from
prepared events kept in memory when this process has prepared the sample before (e.g. for the
live preview), else prepared again from the file (read + event QC of one sample). The gate of an
overridden population becomes a fixed gate; the populations above it are computed exactly as in
the run (same seeds, same fits), those below it follow from its new events. Then only that
sample's rows of ``population_stats.parquet`` and ``gate_review.parquet`` are replaced, and the
statistics, the catalog and the report are written again.

The run's memoised state and prepared samples are in :mod:`cytopipe.review.runcache`, the fixed
gates a decision asks for in :mod:`cytopipe.review.overrides` (their names are imported here too:
``from cytopipe.review.regate import loaded_run, current_params, forget`` keeps working).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.errors import CytopipeError, ReviewError
from cytopipe.review.blinded import coded, coded_info, plain
from cytopipe.review.decisions import Decision, ReviewState, effective_overrides
from cytopipe.review.overrides import current_params, is_diagonal, numbers_of, overridden_template
from cytopipe.review.runcache import forget, loaded_run, prepared, sample_job

__all__ = ["apply_review", "current_params", "forget", "loaded_run", "preview", "regate_sample"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# gating one sample
# ------------------------------------------------------------------------------------------------
def regate_sample(
    lr: Any, sample_id: str, overrides: Mapping[str, Decision], review: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(population_stats rows, gate_review rows) of one sample with ``overrides`` (population ->
    decision) applied, as the run's gating pass would have written them."""
    from cytopipe import gating
    from cytopipe.qc import add_count_qc
    from cytopipe.report.gate_review import gate_review_data

    job = sample_job(lr, sample_id)
    prep = prepared(lr, sample_id)
    template = overridden_template(lr, overrides, review, prep.meta)
    from cytopipe.pipeline.fmo import gate_with_fmo

    result = gate_with_fmo(  # with the sample's FMO set, as the run gated it
        gating.gate, prep, lr.state, template, pooled=lr.state.pooled, sample_meta=prep.meta,
        transforms=lr.state.transforms,
    )  # fmt: skip
    stats = result.to_population_stats(prep.meta)
    flags: dict[str, list[str]] = {}
    for population, flag in result.flags:
        flags.setdefault(population, []).append(flag)
    stats["gate_flags"] = ["; ".join(flags.get(p, [])) for p in stats["population"]]
    stats["sample_id"] = sample_id
    for col in ("patient_id", "visit", "arm"):
        stats[col] = job.get(col)
    stats = add_count_qc(stats, lr.state.qc)
    rows = gate_review_data(prep.sample, result, sample_id)
    own = lr.state.template_for(sample_id)  # a FlowJo workspace run: the sample's own gates
    rows = _with_diagonal_panels(rows, prep.sample, result, own)
    for i in rows.index:
        name = rows.at[i, "population"]
        if name in own.populations and is_diagonal(own[name].gate):
            numbers = numbers_of(own[name].gate, result.populations[name].gate)
            have = list(rows.at[i, "param_names"])
            new = [k for k in numbers if k not in have]
            rows.at[i, "param_names"] = have + new
            rows.at[i, "params"] = [float(v) for v in rows.at[i, "params"]] + [numbers[k] for k in new]
            rows.at[i, "param_spans"] = [float(v) for v in rows.at[i, "param_spans"]] + [np.nan] * len(new)
    over = rows["population"].isin(list(overrides))
    rows.loc[over, "source"] = "overridden"
    return stats, rows


def _with_diagonal_panels(rows: pd.DataFrame, sample: Any, result: Any, template: Any) -> pd.DataFrame:
    """Gate-review rows of diagonal gates drawn as panels a reviewer can move: the two diagonal
    markers (events past the extra thresholds) with the half-plane, and one 1-D panel per extra
    marker (e.g. FOXP3) with its threshold line (``FOXP3 >=``)."""
    from cytopipe.report import gate_review as gr

    vals = result.event_values(sample)
    out = []
    for name in dict.fromkeys(rows["population"]):
        mine = rows[rows["population"] == name]
        pop = result.populations[name]
        tg = template[name].gate if name in template.populations else None
        rec = getattr(pop.gate, "review_params", None)
        if tg is None or not is_diagonal(tg) or not rec or "" not in rec or pop.parent == "root":
            out.append(mine)
            continue
        idx = result.indices(pop.parent)
        cond, extra = [], []
        for f, sign in zip(tg.extra, tg.signs[2:]):
            key = f"[{f.dims[0].name}]"
            if key in rec:
                t = rec[key][0]
                lo, hi = (t, None) if sign == "+" else (None, t)
                cond.append((f.dims[0], lo, hi))
                extra.append({"gate_type": "range", "dims": [f.dims[0]], "condition": [],
                              "shapes": [{"kind": "range", "x": [lo, hi]}]})  # fmt: skip
        poly = _diagonal_polygon(tg, rec[""], vals, idx, pop.parent)
        panels = [{"gate_type": "polygon", "dims": list(tg.dims[:2]), "condition": cond,
                   "shapes": [{"kind": "polygon", "vertices": poly}]}, *extra]  # fmt: skip
        made = [gr._panel_row(p, vals, idx, pop.parent, gr.BINS_2D, gr.BINS_1D) for p in panels]
        made = [m for m in made if m is not None]
        if not made:
            out.append(mine)
            continue
        base = mine.iloc[0].to_dict()
        new = []
        for i, m in enumerate(made):
            row = dict(base)
            row.update(m)
            row["gate_type"] = base["gate_type"]
            row["panel"] = i
            new.append(row)
        out.append(pd.DataFrame(new, columns=rows.columns))
    got = pd.concat(out, ignore_index=True)
    for col in rows.columns:
        if got[col].dtype != rows[col].dtype:
            got[col] = got[col].astype(rows[col].dtype)
    return got


def _diagonal_polygon(tg: Any, params: list[float], vals: Any, idx: Any, scope: str) -> list[list[float]]:
    """The half-plane ``projection >= t`` cut to a box around the parent's events (for drawing)."""
    m1, s1, m2, s2, t = (float(v) for v in params[:5])
    k1, k2 = (1.0 if c == "+" else -1.0 for c in tg.signs[:2])
    x = np.asarray(vals.at(tg.dims[0], idx, scope), dtype=float)
    y = np.asarray(vals.at(tg.dims[1], idx, scope), dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    xlo, xhi = np.quantile(x, [0.005, 0.995]) if len(x) else (m1 - 1, m1 + 1)
    ylo, yhi = np.quantile(y, [0.005, 0.995]) if len(y) else (m2 - 1, m2 + 1)
    pad = max(xhi - xlo, yhi - ylo, 1e-6)
    box = [(xlo - pad, ylo - pad), (xhi + pad, ylo - pad), (xhi + pad, yhi + pad), (xlo - pad, yhi + pad)]

    def f(p):
        return k1 * (p[0] - m1) / s1 + k2 * (p[1] - m2) / s2 - t

    pts: list[list[float]] = []  # Sutherland-Hodgman: the box's part with f >= 0
    for a, b in zip(box, box[1:] + box[:1]):
        fa, fb = f(a), f(b)
        if fa >= 0:
            pts.append([float(a[0]), float(a[1])])
        if (fa >= 0) != (fb >= 0):
            r = fa / (fa - fb)
            pts.append([float(a[0] + r * (b[0] - a[0])), float(a[1] + r * (b[1] - a[1]))])
    return pts


def preview(run_dir: str | Path, decision: Decision, state: ReviewState | None = None) -> dict[str, Any]:
    """A population's count and % of parent on one sample if ``decision`` were saved (None: not measured)."""
    from cytopipe.report.gate_review import read_gate_review

    lr = loaded_run(run_dir)
    review = read_gate_review(lr.folder.path)
    overrides = {p: d for (s, p), d in effective_overrides(state.decisions if state else []).items()
                 if s == decision.sample_id}  # fmt: skip
    if decision.kind == "revert":
        overrides.pop(decision.population, None)
    else:
        overrides[decision.population] = decision
    stats, _ = regate_sample(lr, decision.sample_id, overrides, review)
    row = stats[stats["population"] == decision.population].iloc[0]
    count, parent = (None if pd.isna(row[c]) else int(row[c]) for c in ("count", "parent_count"))
    return {"count": count, "parent_count": parent, "pct_parent": float(row["pct_parent"])}


# ------------------------------------------------------------------------------------------------
# applying a run's review
# ------------------------------------------------------------------------------------------------
def apply_review(
    run_dir: str | Path,
    state: ReviewState,
    samples: Iterable[str] | None = None,
    statistics: bool = True,
    report: bool = True,
    write_tables: bool = True,
    catalog: bool = True,
) -> dict[str, Any]:
    """Re-gate ``samples`` (default: every sample with an override now or before) with the overrides
    in force, replace their rows of population_stats and gate_review, and refresh the statistics,
    catalog and report. Returns timings and, per overridden gate, its % of parent before/after.
    ``write_tables=False`` (with ``samples=[]``): only the statistics, catalog and report, from the
    tables as they are (a background refresh must not write back a population_stats it read before
    a concurrent re-gate replaced it). ``catalog=False``: the catalog is not written (a refresh
    that the caller waits for writes it next)."""
    from cytopipe.store import atomic_write_parquet

    t0 = time.perf_counter()
    lr = loaded_run(run_dir)
    folder = lr.folder
    with _tables_lock(folder.path):
        ps, review, samples, changes, t_gate = _regate_tables(lr, state, samples, write_tables, t0)
    t_tables = time.perf_counter() - t0
    problems: list[str] = []
    tables = {"population_stats": ps}
    for name in ("samples", "clusters"):
        if folder.table_path(name).is_file():
            tables[name] = pd.read_parquet(folder.table_path(name))
    if statistics:
        table = coded(lr, _statistics(lr, plain(lr, tables), problems))
        if table is not None:
            tables["statistics"] = table
            atomic_write_parquet(folder.table_path("statistics"), table)
    elif folder.table_path("statistics").is_file():
        tables["statistics"] = pd.read_parquet(folder.table_path("statistics"))
    if catalog:
        from cytopipe.store import write_catalog

        write_catalog(folder.catalog, tables, coded_info(lr))
    t_stats = time.perf_counter() - t0
    if report:
        from cytopipe.pipeline import write_run_report

        write_run_report(folder.path, lr.wf, problems)
    return {
        "samples": samples,
        "changes": {f"{s}/{p}": v for (s, p), v in changes.items()},
        "problems": problems,
        "seconds": {
            "regate": round(t_gate, 3),
            "tables": round(t_tables, 3),
            "statistics": round(t_stats, 3),
            "total": round(time.perf_counter() - t0, 3),
        },  # fmt: skip
    }


def _tables_lock(run_dir: Path):
    """An exclusive ``flock`` on ``RUN_DIR/.review.lock`` over the read-modify-write of the tables:
    a `cytopipe review` in a terminal and the server (or two servers) applying decisions to the same
    run take turns instead of one writing back tables the other has just replaced. The threads of one
    server already take turns (serve.reviewops._run_lock); flock locks are per open file, so two
    threads would also wait here. No-op where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held():
        fd = os.open(Path(run_dir) / ".review.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    return held()


def _regate_tables(
    lr: Any, state: ReviewState, samples: Iterable[str] | None, write_tables: bool, t0: float
) -> tuple:
    """apply_review's table part (under _tables_lock): re-gate, replace rows, write the tables."""
    from cytopipe.report.gate_review import read_gate_review, write_gate_review
    from cytopipe.store import atomic_write_parquet

    folder = lr.folder
    ps = pd.read_parquet(folder.table_path("population_stats"))
    review = read_gate_review(folder.path)
    if review is None:
        raise ReviewError("the run has no gate_review.parquet; rerun `cytopipe run` first", file=folder.path)
    active = effective_overrides(state.decisions)
    if samples is None:
        before = (
            ps["gate_source"].eq("overridden") if "gate_source" in ps else pd.Series(False, index=ps.index)
        )
        samples = {s for s, _ in active} | set(ps.loc[before, "sample_id"])
    samples = sorted(set(samples))
    changes: dict[tuple[str, str], tuple[float, float]] = {}
    new_stats, new_review = [], []
    for sid in samples:
        mine = {p: d for (s, p), d in active.items() if s == sid}
        stats, rows = regate_sample(lr, sid, mine, review)
        old = ps[ps["sample_id"] == sid].set_index("population")["pct_parent"]
        for p in mine:
            changes[(sid, p)] = (
                float(old.get(p, np.nan)),
                float(stats.set_index("population").at[p, "pct_parent"]),
            )
        new_stats.append(stats)
        new_review.append(rows)
    t_gate = time.perf_counter() - t0
    if samples:
        ps = _replace_rows(ps, pd.concat(new_stats, ignore_index=True), samples)
        review = _replace_rows(
            review, pd.concat(new_review, ignore_index=True), samples, sort_population=False
        )
    ps = coded(lr, _sources(ps, review, active, lr.state.template))  # re-gated rows: the names, in memory
    if write_tables or samples:
        atomic_write_parquet(folder.table_path("population_stats"), ps)
        write_gate_review(folder.path, review)
    return ps, review, samples, changes, t_gate


def _replace_rows(
    table: pd.DataFrame, new: pd.DataFrame, samples: list[str], sort_population: bool = True
) -> pd.DataFrame:
    """``table`` with the rows of ``samples`` replaced by ``new`` at the same place (same order)."""
    for col in table.columns:
        if col not in new.columns:
            new[col] = None
    new = new[[c for c in table.columns] + [c for c in new.columns if c not in table.columns]]
    keep = ~table["sample_id"].isin(samples)
    order = {s: i for i, s in enumerate(dict.fromkeys(table["sample_id"]))}
    parts = [p for p in (table[keep], new) if len(p)] or [table.iloc[:0]]
    with warnings.catch_warnings():
        # all-NA columns of `new` (added above): the dtypes are restored from `table` below, so
        # pandas' coming change in how concat treats all-NA columns cannot change the result
        warnings.filterwarnings("ignore", "The behavior of DataFrame concatenation", FutureWarning)
        out = pd.concat(parts, ignore_index=True)
    out["_o"] = out["sample_id"].map(order)
    out["_r"] = out.groupby("sample_id").cumcount()
    out = out.sort_values(["_o", "_r"], kind="stable").drop(columns=["_o", "_r"]).reset_index(drop=True)
    for col in table.columns:
        if out[col].dtype != table[col].dtype:
            try:
                out[col] = out[col].astype(table[col].dtype)
            except (TypeError, ValueError):
                pass
    return out


def _sources(ps: pd.DataFrame, review: pd.DataFrame, active: Mapping, template: Any) -> pd.DataFrame:
    """``gate_source`` and ``audit_entry`` of every row: the engine's source, or ``overridden`` (and
    the override's audit entry, also on the populations below it, whose events it decided)."""
    first = review[review["panel"] == 0].drop_duplicates(["sample_id", "population"])
    source = dict(zip(zip(first["sample_id"], first["population"]), first["source"]))
    ps = ps.copy()
    keys = list(zip(ps["sample_id"], ps["population"]))
    ps["gate_source"] = [source.get(k, "") for k in keys]
    entry: dict[tuple[str, str], Any] = {}
    for (sid, pop), d in active.items():
        for p in [pop, *template.descendants(pop)]:
            entry.setdefault((sid, p), d.audit_entry)
        entry[(sid, pop)] = d.audit_entry
    ps["audit_entry"] = pd.array([entry.get(k) for k in keys], dtype="Int64")
    over = pd.Series([k in active for k in keys], index=ps.index)
    ps.loc[over, "gate_source"] = "overridden"
    return ps


def _statistics(lr: Any, tables: dict[str, pd.DataFrame], problems: list[str]) -> pd.DataFrame | None:
    from types import SimpleNamespace

    from cytopipe.pipeline import compute_statistics
    from cytopipe.workflow import statistics_enabled, statistics_settings

    if not statistics_enabled(lr.wf):
        return None
    ctx = SimpleNamespace(
        wf=lr.wf, stats_settings=statistics_settings(lr.wf), tables=tables, problems=problems, executor=None
    )  # no Dask cluster here: the mixed models are fitted in this process
    try:
        table, _ = compute_statistics(ctx)
    except CytopipeError as exc:
        problems.append(f"statistics: {exc}")
        return None
    return table
