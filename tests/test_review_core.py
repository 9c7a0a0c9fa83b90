"""Gate review as data, without the web: incremental re-gating of one sample after an override
changes exactly that sample's overridden population and the populations below it (and nothing
when there is no override: the run's own rows come back bit for bit); the patient's pooled gate;
revert; the report of a reviewed run lists the sign-off and every override with reason and
before/after frequency; approved gates export as an --examples file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from cytopipe.errors import ReviewError
from cytopipe.review.decisions import Decision, ReviewState, read_review, write_review
from cytopipe.review.examples import examples, examples_text
from cytopipe.review.regate import apply_review, current_params, forget
from tests.pipeline_support import TEMPLATE

KEY = ["sample_id", "population"]


def _changed(a: pd.DataFrame, b: pd.DataFrame) -> set[tuple[str, str]]:
    cols = [c for c in a.columns if c in b.columns and c not in ("gate_source", "audit_entry")]
    x, y = a[cols].reset_index(drop=True), b[cols].reset_index(drop=True)
    assert list(x["sample_id"]) == list(y["sample_id"]) and list(x["population"]) == list(y["population"])
    same = ((x == y) | (x.isna() & y.isna())).all(axis=1)
    return set(map(tuple, x.loc[~same, KEY].to_numpy()))


def test_regating_without_overrides_gives_the_runs_own_rows(review_run_dir):
    before = pd.read_parquet(review_run_dir / "population_stats.parquet")
    samples = sorted(before["sample_id"].unique())[:2]
    apply_review(review_run_dir, ReviewState(), samples=samples, statistics=False, report=False)
    after = pd.read_parquet(review_run_dir / "population_stats.parquet")
    # the run already has gate_source: a review without overrides gives it back unchanged
    pd.testing.assert_frame_equal(before, after.drop(columns=["audit_entry"]))
    assert set(after["gate_source"]) <= {"fitted", "pooled", "mixed", "boolean", "fixed"}
    assert after["audit_entry"].isna().all()


def test_an_override_changes_only_that_sample_and_the_populations_below(review_run_dir):
    from cytopipe.gating import load_template

    template = load_template(TEMPLATE)
    before = pd.read_parquet(review_run_dir / "population_stats.parquet")
    review = pd.read_parquet(review_run_dir / "gate_review.parquet")
    sid = sorted(before["sample_id"].unique())[3]
    gate = current_params(review, sid, "Memory CD4")  # CD45RA < t; below it: Th17, Th1, cTfh, activated cTfh
    (name, value), = gate.items()  # fmt: skip
    state = ReviewState()
    state.add(Decision("override", sid, "Memory CD4", "rita", params={name: value + 1.5}, reason="gate too low",
                       category="poor staining", audit_entry=41))  # fmt: skip
    got = apply_review(review_run_dir, state, statistics=False, report=False)
    assert got["samples"] == [sid]
    after = pd.read_parquet(review_run_dir / "population_stats.parquet")
    below = set(template.descendants("Memory CD4"))
    assert below >= {"Th17", "Th1", "cTfh", "activated cTfh"}
    changed = _changed(before, after)
    assert (sid, "Memory CD4") in changed
    assert changed <= {(sid, p) for p in {"Memory CD4", *below}}
    assert len(changed) >= 3  # the gate moved by 1.5 on the arcsinh scale: the counts below follow
    row = after.set_index(KEY).loc[(sid, "Memory CD4")]
    assert row["gate_source"] == "overridden" and row["audit_entry"] == 41
    old = before.set_index(KEY).loc[(sid, "Memory CD4")]
    assert row["pct_parent"] > old["pct_parent"]  # CD45RA < a higher threshold keeps more cells
    assert got["changes"][f"{sid}/Memory CD4"] == pytest.approx((old["pct_parent"], row["pct_parent"]))
    # descendants record the override that decided their events
    assert (after.set_index(KEY).loc[[(sid, p) for p in below], "audit_entry"] == 41).all()
    # the gate-review picture of that sample moved with it
    rv = pd.read_parquet(review_run_dir / "gate_review.parquet")
    assert current_params(rv, sid, "Memory CD4")[name] == pytest.approx(value + 1.5)
    assert (rv[(rv["sample_id"] == sid) & (rv["population"] == "Memory CD4")]["source"] == "overridden").all()

    # revert: a new decision, and the run's own rows come back exactly
    state.add(
        Decision("revert", sid, "Memory CD4", "rita", reason="second look: the fit was right", audit_entry=42)
    )
    apply_review(review_run_dir, state, statistics=False, report=False)
    back = pd.read_parquet(review_run_dir / "population_stats.parquet")
    pd.testing.assert_frame_equal(before, back.drop(columns=["audit_entry"]))


def test_the_patients_pooled_gate(review_run_dir):
    before = pd.read_parquet(review_run_dir / "population_stats.parquet")
    sid = sorted(before["sample_id"].unique())[0]
    state = ReviewState()
    state.add(Decision("pooled", sid, "Treg", "rita", reason="fit failure", category="fit failure"))
    apply_review(review_run_dir, state, statistics=False, report=False)
    rv = pd.read_parquet(review_run_dir / "gate_review.parquet")
    from cytopipe.pipeline import load_run

    lr = load_run(review_run_dir)
    meta = before[before["sample_id"] == sid].iloc[0]
    # Treg is a diagonal gate (CD25 up / CD127 down, in the CD4 cloud's robust SDs) AND FOXP3 >= t
    expected = [lr.state.pooled.lookup(f"Treg{k}", "patient", {"sample_id": sid, "patient_id": meta["patient_id"]})[0]
                for k in ("", "[FOXP3]")]  # fmt: skip
    got = current_params(rv, sid, "Treg")
    names = ["CD25 mode", "CD25 SD", "CD127 mode", "CD127 SD", "diagonal >=", "FOXP3 >="]
    np.testing.assert_allclose([got[n] for n in names], np.concatenate([np.ravel(e) for e in expected]))
    assert _changed(before, pd.read_parquet(review_run_dir / "population_stats.parquet")) <= {(sid, "Treg")}


def test_decisions_need_reasons_and_known_gates(review_run_dir):
    with pytest.raises(ReviewError, match="reason is required"):
        Decision("override", "P001_W00", "Treg", "rita", params={"CD25 >=": 3})
    sid = pd.read_parquet(review_run_dir / "population_stats.parquet")["sample_id"].iloc[0]
    state = ReviewState(
        decisions=[Decision("override", sid, "Treg", "rita", params={"CD8 >=": 3}, reason="x")]
    )
    with pytest.raises(ReviewError, match="unknown gate numbers"):
        apply_review(review_run_dir, state, statistics=False, report=False)
    locked = ReviewState(
        signoff={"user": "rita", "at": "2026-01-01T00:00:00", "meaning": "reviewed and approved"}
    )
    with pytest.raises(ReviewError, match="locked"):
        locked.add(Decision("approve", sid, "Treg", "rita"))


def test_report_lists_signoff_and_overrides_and_examples_export(review_run_dir):
    ps = pd.read_parquet(review_run_dir / "population_stats.parquet")
    sid = sorted(ps["sample_id"].unique())[1]
    rv = pd.read_parquet(review_run_dir / "gate_review.parquet")
    t = current_params(rv, sid, "Treg", review_run_dir)[
        "FOXP3 >="
    ]  # Treg: the CD25/CD127 diagonal AND FOXP3 >= t
    state = ReviewState()
    state.add(Decision("approve", sorted(ps["sample_id"].unique())[0], "Treg", "rita", audit_entry=5))
    d = Decision("override", sid, "Treg", "rita", params={"FOXP3 >=": t + 1.5}, reason="=HYPERLINK(\"x\") dim FOXP3",
                 category="poor staining", audit_entry=6)  # fmt: skip
    state.add(d)
    got = apply_review(review_run_dir, state, statistics=False, report=False)
    d.before_pct, d.after_pct = got["changes"][f"{sid}/Treg"]
    state.signoff = {"user": "rita", "meaning": "reviewed and approved", "at": "2026-12-03T14:00:00+00:00",
                     "audit_entry": 7}  # fmt: skip
    write_review(review_run_dir, state)
    assert read_review(review_run_dir).to_dict() == state.to_dict()
    apply_review(
        review_run_dir, state, samples=[], statistics=True, report=True
    )  # this run was made with --no-report
    from cytopipe.report import write_report

    write_report(review_run_dir)
    html = (review_run_dir / "report.html").read_text(encoding="utf-8")
    assert "Gate review" in html and "reviewed and approved" in html and "rita" in html
    from cytopipe.report.html import format_number  # the report's one rule for numbers (3 significant digits)

    assert (
        "poor staining" in html and format_number(d.before_pct) in html and format_number(d.after_pct) in html
    )
    csv = (review_run_dir / "report_tables" / "gate_overrides.csv").read_text(encoding="utf-8")
    assert sid in csv and "poor staining" in csv
    table = pd.read_csv(review_run_dir / "report_tables" / "gate_overrides.csv")
    row = table.iloc[0]
    assert row["pct_parent_before"] == pytest.approx(d.before_pct, rel=1e-3)
    assert row["pct_parent_after"] == pytest.approx(d.after_pct, rel=1e-3)
    assert row["pct_parent_after"] < row["pct_parent_before"]  # a higher FOXP3 threshold keeps fewer Treg

    data = examples(review_run_dir, state)
    by = {(e["sample_id"], e["population"]): e for e in data["examples"]}
    assert set(by) == {(sorted(ps["sample_id"].unique())[0], "Treg"), (sid, "Treg")}
    assert by[(sid, "Treg")]["status"] == "overridden"
    assert by[(sid, "Treg")]["params"]["FOXP3 >="] == pytest.approx(t + 1.5)
    approved = by[(sorted(ps["sample_id"].unique())[0], "Treg")]["params"]
    assert {"diagonal >=", "FOXP3 >="} <= set(approved)  # the approved gate's own numbers
    assert yaml.safe_load(examples_text(data, "yaml")) == json.loads(examples_text(data, "json"))


def test_the_queue_puts_flagged_then_outlying_gates_first(review_run_dir, tmp_path):
    """The review queue's order on a run with one flagged Treg gate (its flag written into the run's
    gate_review table, as the engine writes a fallback) and one outlying gate (its FOXP3 threshold moved
    far from the cohort by an override)."""
    from types import SimpleNamespace

    from cytopipe.report.gate_review import write_gate_review
    from cytopipe.serve import reviewops
    from cytopipe.serve.db import open_database

    samples = sorted(pd.read_parquet(review_run_dir / "gate_review.parquet")["sample_id"].unique())
    # every sample's rows re-gated without overrides: they carry the Treg diagonal gate's numbers
    apply_review(review_run_dir, ReviewState(), samples=samples, statistics=False, report=False)
    rv = pd.read_parquet(review_run_dir / "gate_review.parquet")
    flagged, moved = samples[5], samples[8]
    rv.loc[(rv["sample_id"] == flagged) & (rv["population"] == "Treg"), "flags"] = "Treg[FOXP3]: fit failed"
    write_gate_review(review_run_dir, rv)
    t = current_params(rv, moved, "Treg")["FOXP3 >="]
    state = ReviewState(
        decisions=[Decision("override", moved, "Treg", "rita", params={"FOXP3 >=": t + 1.5}, reason="x")]
    )
    apply_review(review_run_dir, state, statistics=False, report=False)
    (tmp_path / "ws_run").mkdir()
    (tmp_path / "ws_run" / "out").symlink_to(review_run_dir)
    engine, sessions = open_database(f"sqlite:///{tmp_path / 'ws.sqlite'}")
    with sessions() as db:
        q = reviewops.queue(db, SimpleNamespace(id=1, folder=str(tmp_path / "ws_run")), None, "Treg", False)
    engine.dispose()
    order = [i["sample_id"] for i in q["items"]]
    assert order[0] == flagged and q["items"][0]["flagged"]
    assert order[1] == moved and q["items"][1]["outlier"] and "FOXP3 >=" in q["items"][1]["reasons"]
    assert not any(i["flagged"] or i["outlier"] for i in q["items"][2:])
    assert all(i["arm"] is None for i in q["items"])  # arms hidden when the user may not see them
    assert sorted(order) == samples


_OTHER_PROCESS = """
import sys
from pathlib import Path
from cytopipe.review.decisions import Decision, ReviewState
from cytopipe.review.regate import apply_review, loaded_run

review_run_dir, sid, name, value = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
loaded_run(review_run_dir)  # the slow part first, so the tables are read only after "ready"
state = ReviewState()
state.add(Decision("override", sid, "Memory CD4", "omar", params={name: value}, reason="too low",
                   category="poor staining", audit_entry=7))
(review_run_dir / "ready").write_text("1")
apply_review(review_run_dir, state, statistics=False, report=False)
"""


def test_two_processes_applying_decisions_to_one_run_take_turns(review_run_dir):
    """A `cytopipe review` in a terminal and the server re-gating the same run: the second writer
    waits for the first's table write (flock on RUN_DIR/.review.lock) and re-reads the tables, so it
    does not write back a population_stats that drops the first writer's change."""
    import fcntl
    import os
    import subprocess
    import sys
    import time

    from tests.pipeline_support import cli_env

    before = pd.read_parquet(review_run_dir / "population_stats.parquet")
    review = pd.read_parquet(review_run_dir / "gate_review.parquet")
    samples = sorted(before["sample_id"].unique())
    mine, theirs = samples[0], samples[3]
    (name, value), = current_params(review, theirs, "Memory CD4").items()  # fmt: skip
    fd = os.open(review_run_dir / ".review.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this test is the first writer
    proc = subprocess.Popen(
        [sys.executable, "-c", _OTHER_PROCESS, str(review_run_dir), theirs, name, str(value + 1.5)],
        env=cli_env(),
    )
    try:
        while not (review_run_dir / "ready").exists():
            assert proc.poll() is None, "the other process ended before it was ready"
            time.sleep(0.05)
        time.sleep(1.0)  # room for the other process to read the tables now, if nothing stopped it
        mark = before.copy()
        row = (mark["sample_id"] == mine) & (mark["population"] == "Th17")
        mark.loc[row, "pct_parent"] = 12.345  # the first writer's change, written under the lock
        mark.to_parquet(review_run_dir / "population_stats.parquet")
    finally:
        os.close(fd)  # releases the lock
    assert proc.wait(timeout=300) == 0
    after = pd.read_parquet(review_run_dir / "population_stats.parquet").set_index(KEY)
    assert after.loc[(mine, "Th17"), "pct_parent"] == 12.345  # kept: the second writer read it
    assert after.loc[(theirs, "Memory CD4"), "gate_source"] == "overridden"  # and made its own change


def test_an_override_recomputes_the_statistics_of_a_run_with_statistics(pipeline_run, tmp_path):
    """The README's run (statistics with the clinical table): an override re-gates the sample and
    the statistics are fitted again from the reviewed table, in this process (no Dask cluster
    here; an AttributeError once the mixed models went to the run's workers, found by
    bench/review.py on 2026-12-05)."""
    src, proc = pipeline_run
    assert proc.returncode == 0, proc.stderr
    review_run_dir = tmp_path / "run"
    shutil.copytree(src, review_run_dir)
    forget()
    try:
        before = pd.read_parquet(review_run_dir / "statistics.parquet")
        review = pd.read_parquet(review_run_dir / "gate_review.parquet")
        sid = sorted(review["sample_id"].unique())[3]
        t = current_params(review, sid, "Treg", review_run_dir)["FOXP3 >="]
        state = ReviewState()
        state.add(Decision("override", sid, "Treg", "rita", params={"FOXP3 >=": t + 1.0}, reason="dim FOXP3"))
        got = apply_review(review_run_dir, state, statistics=True, report=False)
    finally:
        forget()
    assert not got["problems"], got["problems"]
    pct_before, pct_after = got["changes"][f"{sid}/Treg"]
    assert pct_after < pct_before
    after = pd.read_parquet(review_run_dir / "statistics.parquet")
    assert list(after.columns) == list(before.columns) and len(after) == len(before)
    ident = ["family", "population", "measure", "scale", "visit", "endpoint", "subgroup", "comparison"]
    pd.testing.assert_frame_equal(after[ident], before[ident])  # the same analyses, in the same order
    treg = after["population"].astype(object).eq("Treg").to_numpy(bool)
    a, b = after["estimate"].to_numpy(float), before["estimate"].to_numpy(float)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    assert treg.any() and not same[treg].all()  # the overridden sample's Treg entered the models
    assert same[~treg].all()  # no other population's estimate moved


def test_a_command_line_override_writes_the_catalog_once(review_run_dir, tmp_path, monkeypatch):
    """`cytopipe review --override` (reviewops with background=False) waits for the statistics and
    report refresh, which writes the catalog: the table step wrote it before as well, with the
    statistics of before the change, only for the refresh to write it again. Now once, holding the
    refreshed tables."""
    import duckdb

    import cytopipe.store
    from cytopipe.serve import auth, reviewops
    from cytopipe.serve.db import Run, Study, database_url, open_database

    out = tmp_path / "ws" / "runs" / "1" / "out"
    shutil.move(str(review_run_dir), out)
    engine, sessions = open_database(database_url(None, tmp_path / "ws"))
    writes = []
    real = cytopipe.store.write_catalog

    def counted(path, *args, **kwargs):  # the real writer, counted
        writes.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cytopipe.store, "write_catalog", counted)
    try:
        with sessions() as db:
            auth.create_user(db, "rita", "a long enough password", "reviewer", by="admin")
            study = Study(name="trial", created_by="admin")
            db.add(study)
            db.flush()
            db.add(Run(study_id=study.id, status="finished", folder=str(out.parent), started_by="admin"))
            db.commit()
            review = pd.read_parquet(out / "gate_review.parquet")
            sid = sorted(review["sample_id"].unique())[1]
            foxp3 = current_params(review, sid, "Treg", out)["FOXP3 >="]
            decision = Decision("override", sid, "Treg", "rita", params={"FOXP3 >=": foxp3 + 1.0},
                                reason="dim FOXP3", category="poor staining")  # fmt: skip
            got = reviewops.change_gate(db, 1, "rita", decision, background=False)
    finally:
        engine.dispose()
        forget()
    assert got["after_pct"] < got["before_pct"]
    assert len(writes) == 1
    con = duckdb.connect(str(out / "catalog.duckdb"), read_only=True)
    try:
        for name in ("population_stats", "samples"):
            table = con.execute(f"select * from {name}").df()
            assert len(table) == len(pd.read_parquet(out / f"{name}.parquet")) > 0
        row = con.execute("select gate_source from population_stats where sample_id = ? and population = 'Treg'",
                          [sid]).fetchone()  # fmt: skip
    finally:
        con.close()
    assert row == ("overridden",)
