"""The report refresh after a review action reads the previous report's figures whose data did not
change (cytopipe/report/figcache.py) and gives the same bytes as a report built from scratch.

The serve trial's run (tests/conftest.py serve_reference): its report is written by `cytopipe
report` in a fresh process (as a run or the server's previous refresh writes it), then gate
changes and an approval are applied and the report is written again here, as the server's
refresh does; each time it must equal, byte for byte, the report of the same state written with
no cache at all, while drawing only the figures whose data moved.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from cytopipe.report import write_report
from cytopipe.report.figcache import CACHE_DIR, FigureCache, content_hash, plot
from cytopipe.review.decisions import Decision, ReviewState, write_review
from cytopipe.review.regate import apply_review, current_params
from tests.pipeline_support import cli

COUNTS = re.compile(r"report: (\d+) figures read from the cache, (\d+) drawn")


def _report_files(run: Path) -> dict[str, bytes]:
    files = {"report.html": (run / "report.html").read_bytes()}
    for path in sorted((run / "report_tables").glob("*.csv")):
        files[path.name] = path.read_bytes()
    return files


def _refresh(run: Path, caplog) -> tuple[dict[str, bytes], int, int]:
    """The report written again with the cache (as the server's refresh writes it): its files and
    how many figures were read from the cache / drawn."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="cytopipe.report.figcache"):
        write_report(run)
    counts = [COUNTS.search(r.getMessage()) for r in caplog.records]
    hit, drawn = next((int(m.group(1)), int(m.group(2))) for m in counts if m)
    return _report_files(run), hit, drawn


def _from_scratch(run: Path, tmp_path: Path) -> dict[str, bytes]:
    """The report of the same folder state written with no cache (in a copy at the same depth)."""
    scratch = tmp_path / "scratch" / run.name
    shutil.rmtree(scratch.parent, ignore_errors=True)
    shutil.copytree(run, scratch, ignore=shutil.ignore_patterns("report.html", "report_tables"))
    shutil.rmtree(scratch / ".cache" / "report", ignore_errors=True)
    shutil.rmtree(scratch / CACHE_DIR, ignore_errors=True)
    write_report(scratch)
    return _report_files(scratch)


def test_a_refresh_after_a_change_equals_a_report_from_scratch_and_draws_only_what_moved(
    review_run_dir, tmp_path, caplog
):
    # the run's report, written in another process (the figures' names must not depend on the process)
    proc = cli("report", str(review_run_dir))
    assert proc.returncode == 0, proc.stderr
    kept = sorted(p.name for p in (review_run_dir / CACHE_DIR).glob("*.json"))
    shutil.copy(review_run_dir / "report.html", review_run_dir / "report.html.before")
    assert len(kept) > 10

    # an approval changes review.json only: every figure is read back, none drawn
    ps = pd.read_parquet(review_run_dir / "population_stats.parquet")
    samples = sorted(ps["sample_id"].unique())
    state = ReviewState()
    state.add(Decision("approve", samples[0], "Live", "rita"))
    write_review(review_run_dir, state)
    files, hit, drawn = _refresh(review_run_dir, caplog)
    assert (hit, drawn) == (len(kept), 0)
    assert files["report.html"] != (review_run_dir / "report.html.before").read_bytes()  # its review section

    # a gate moved on one sample (Treg's FOXP3 threshold) and a pooled gate on another
    rv = pd.read_parquet(review_run_dir / "gate_review.parquet")
    foxp3 = current_params(rv, samples[2], "Treg")["FOXP3 >="]
    state.add(Decision("override", samples[2], "Treg", "rita", params={"FOXP3 >=": foxp3 + 1.5},
                       reason="debris", category="debris", audit_entry=7))  # fmt: skip
    state.add(Decision("pooled", samples[5], "CD4 T", "rita", reason="fit failure", audit_entry=8))
    write_review(review_run_dir, state)
    apply_review(review_run_dir, state, statistics=False, report=False)
    after = pd.read_parquet(review_run_dir / "population_stats.parquet")
    assert not after.set_index(["sample_id", "population"])["pct_parent"].equals(
        ps.set_index(["sample_id", "population"])["pct_parent"])  # fmt: skip
    files, hit, drawn = _refresh(review_run_dir, caplog)
    # the figures drawn from the moved frequencies (dynamics, their gallery panels) are drawn again,
    # the others (QC, clusters, the other populations' gallery panels) read back
    assert drawn >= 2 and hit >= len(kept) // 2, (hit, drawn)
    assert files == _from_scratch(review_run_dir, tmp_path)
    # the cache holds this report's figures only
    assert len(list((review_run_dir / CACHE_DIR).glob("*.json"))) == hit + drawn


def test_a_figure_is_named_by_the_content_it_is_drawn_from(tmp_path):
    a = pd.DataFrame({"population": ["Treg", "CD4 T"], "pct_parent": [5.0, 40.0], "visit": [0, 4]})
    same = pd.DataFrame({"population": ["Treg", "CD4 T"], "visit": [0, 4]}).assign(pct_parent=[5.0, 40.0])
    same = same[["population", "pct_parent", "visit"]]
    assert content_hash(a) == content_hash(same)  # built another way, same content
    moved = a.assign(pct_parent=[5.0, 40.000001])
    assert content_hash(moved) != content_hash(a)
    assert content_hash(a.assign(visit=[0.0, 4.0])) != content_hash(a)  # dtype
    assert content_hash(a.iloc[::-1]) != content_hash(a)  # order
    assert content_hash(a.rename(columns={"visit": "week"})) != content_hash(a)
    assert content_hash({"x": np.arange(3)}) != content_hash({"x": np.arange(3, dtype=np.int32)})
    assert content_hash([1, 1.0, True]) != content_hash([1.0, 1, True])
    assert content_hash(a.astype({"population": "string"})) != content_hash(a)


def test_a_figure_function_that_changes_its_arguments_is_not_kept(tmp_path):
    from cytopipe.report.figures import new_figure

    def draws_and_changes(table):
        table["seen"] = 1  # a section after it would see this column: the figure must be drawn every time
        fig = new_figure(2, 2)
        fig.add_subplot().plot(table["x"])
        return fig

    def draws(table):
        fig = new_figure(2, 2)
        fig.add_subplot().plot(table["x"])
        return fig

    for fn, kept in ((draws_and_changes, 0), (draws, 1)):
        cache = FigureCache(tmp_path / fn.__name__)
        first = cache.render(plot(fn, pd.DataFrame({"x": [1.0, 2.0]})), "f", "a figure")
        assert len(list((tmp_path / fn.__name__ / CACHE_DIR).glob("*.json"))) == kept
        again = FigureCache(tmp_path / fn.__name__)
        second = again.render(plot(fn, pd.DataFrame({"x": [1.0, 2.0]})), "f", "a figure")
        assert (again.hits, again.drawn) == (kept, 1 - kept) and second == first


def test_a_damaged_cached_figure_is_drawn_again(tmp_path):
    from cytopipe.report.figures import new_figure

    def draws(values):
        fig = new_figure(2, 2)
        fig.add_subplot().plot(values)
        return fig

    cache = FigureCache(tmp_path)
    first = cache.render(plot(draws, [1.0, 2.0]), "f", "a figure")
    (entry,) = (tmp_path / CACHE_DIR).glob("*.json")
    entry.write_text(
        entry.read_text().replace('"uri": "data:image/png;base64,', '"uri": "data:image/png;base64,AAAA')
    )
    again = FigureCache(tmp_path)
    assert again.render(plot(draws, [1.0, 2.0]), "f", "a figure") == first and again.drawn == 1


def test_the_statistics_refit_only_the_populations_whose_rows_moved(serve_reference):
    """The mixed models of a review's statistics: a population whose rows did not move since its
    fit in this process is not fitted again, and the table equals one computed afresh."""
    from cytopipe.report.data import measured_rows
    from cytopipe.stats import fitmemo, run_statistics

    ps = measured_rows(pd.read_parquet(serve_reference / "population_stats.parquet"))
    settings = {"reference_arm": "placebo"}
    fitmemo.forget()
    first = run_statistics(ps, None, settings)
    populations = ps["population"].nunique()
    before = dict(fitmemo.counts)
    moved = ps.copy()
    rows = (moved["population"] == "Treg") & (moved["visit"] > 0)
    moved.loc[rows[rows].index[:1], "pct_parent"] += 1.5  # one post-baseline sample's Treg frequency
    again = run_statistics(moved, None, settings)
    assert fitmemo.counts["fitted"] - before["fitted"] == 1  # Treg's model only
    assert fitmemo.counts["reused"] - before["reused"] == populations - 1
    fitmemo.forget()
    pd.testing.assert_frame_equal(again, run_statistics(moved, None, settings))
    assert len(first) == len(again) > 0
