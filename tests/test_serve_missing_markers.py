"""A web run's choice for a template marker missing from every file (`missing_markers`, as in a
workflow), with a real `cytopipe serve` subprocess (SQLite, and PostgreSQL where .ci/run starts one)
and a real upload of the 12 small simulated files with their CXCR5 channel unlabelled in every file.

Before, a web run had no such choice: the files stopped every run ("CXCR5 ... not in any file").
Now the run's options (the new-run form's choice or the API's body; default `stop`, the CLI's
default) are stored with the run, recorded in its `run.start` audit entry, written into its workflow
and shown on the run page; a run with `skip` finishes and its tables, run page and review queue
say that cTfh (and activated cTfh below it) are "not measured".
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests import serve_support, test_report_browser
from tests.serve_support import STUDY, assert_timed_run_log, fresh_database, signed_in, trial_manifest

backend = serve_support.backend
server = serve_support.server  # SERVE_USERS / SERVE_ARGS: its accounts and options
SERVE_USERS = {"vera": "viewer"}
browser = test_report_browser.browser


@pytest.fixture(scope="module")
def study(server, serve_trial, tmp_path_factory) -> int:
    """A study whose 12 files carry no CXCR5 label (uploaded for real), its mapping confirmed."""
    from cytopipe.fcs import read_fcs, write_fcs
    from cytopipe.panel import resolve_markers

    folder = tmp_path_factory.mktemp("no_cxcr5")
    c = server.client()
    sid = c.post("/api/studies", json={"name": "no CXCR5", **STUDY, "report": False}, headers=c.h).json()[
        "id"
    ]
    manifest = trial_manifest(serve_trial)
    for f in (serve_trial / name for name in manifest["file"]):  # the samples (not the controls)
        sample = read_fcs(f)
        channels = sample.channels.copy()
        cxcr5 = channels["pnn"] == resolve_markers(sample, ["CXCR5"])["CXCR5"]  # some label it CD185
        assert cxcr5.sum() == 1, channels
        channels.loc[cxcr5, "pns"] = ""
        path = Path(write_fcs(folder / f.name, sample.events, channels, keywords=sample.keywords))
        r = c.upload(sid, path)
        assert r.status_code == 201 and r.json()["status"] == "ok", r.text
    arms = manifest.set_index("sample_id")["arm"]
    rows = c.get(f"/api/studies/{sid}/mapping").json()
    for row in rows:
        row["arm"] = arms[row["sample_id"]]
    assert c.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=c.h).status_code == 200
    return sid


def _start_entries(c, run_id: int) -> list[dict]:
    return [
        e
        for e in c.get("/api/audit?limit=500").json()
        if e["action"] == "run.start" and e["object_id"] == str(run_id)
    ]


# its database work (a run's options in run.start's audit entry, runs started from the web) is the
# same on SQLite; runs from the web on PostgreSQL are in test_serve_runs' default tests
@serve_support.POSTGRESQL_SLOW
def test_a_web_run_chooses_what_a_missing_marker_does(server, study):
    c, viewer = server.client(), server.client("vera")
    trail = len(c.get("/api/audit?limit=500").json())
    # role and CSRF checks, a value that is not a choice, an unknown option: refused, nothing recorded
    assert (
        viewer.post(
            f"/api/studies/{study}/runs", json={"missing_markers": "skip"}, headers=viewer.h
        ).status_code
        == 403
    )
    assert c.post(f"/api/studies/{study}/runs", json={"missing_markers": "skip"}).status_code == 403
    r = c.post(f"/api/studies/{study}/runs", json={"missing_markers": "ignore"}, headers=c.h)
    assert r.status_code == 400 and "missing_markers must be one of ['stop', 'skip']" in r.json()["detail"], (
        r.text
    )
    assert c.post(f"/api/studies/{study}/runs", json={"missing": "skip"}, headers=c.h).status_code == 422
    assert len(c.get("/api/audit?limit=500").json()) == trail
    assert c.get(f"/api/studies/{study}").json()["runs"] == []

    # the default, as the CLI's: the marker missing from every file stops the run before any work
    r = c.post(f"/api/studies/{study}/runs", headers=c.h)
    assert r.status_code == 201, r.text
    stopped = c.wait_run(r.json()["id"])
    assert stopped["status"] == "failed" and stopped["options"] == {"missing_markers": "stop"}, stopped
    assert "CXCR5" in stopped["error"] and "missing-markers skip" in stopped["error"], stopped["error"]
    # the error as the command said it, with its time, as every line of the run's log (run.log)
    said = assert_timed_run_log(server.data / "runs" / str(stopped["id"]))
    assert any(line.startswith("cytopipe run: error: ") and "CXCR5" in line for line in said), said
    (entry,) = _start_entries(c, stopped["id"])
    assert entry["after"]["options"] == {"missing_markers": "stop"}

    # skip: the run finishes; cTfh (needs CXCR5) and activated cTfh (below it) are not measured
    r = c.post(f"/api/studies/{study}/runs", json={"missing_markers": "skip"}, headers=c.h)
    assert r.status_code == 201, r.text
    assert r.json()["options"] == {"missing_markers": "skip"}
    status = c.wait_run(r.json()["id"])
    run_id = status["id"]
    assert status["status"] == "finished" and status["options"] == {"missing_markers": "skip"}, status
    (entry,) = _start_entries(c, run_id)
    assert entry["user"] == "admin" and entry["after"]["options"] == {"missing_markers": "skip"}
    folder = server.data / "runs" / str(run_id)
    assert yaml.safe_load((folder / "input" / "workflow.yaml").read_text())["missing_markers"] == "skip"
    # the study page's run list shows each run's options (before, only its status and samples)
    html = c.get(f"/studies/{study}").text
    for rid, policy in ((stopped["id"], "stop"), (run_id, "skip")):
        row = re.search(rf'<tr data-run="{rid}">.*?</tr>', html, re.S).group(0)
        assert f'<td class="run-options"><code>missing_markers: {policy}</code></td>' in row, row

    ps = pd.read_parquet(folder / "out" / "population_stats.parquet")
    for population in ("cTfh", "activated cTfh"):
        rows = ps[ps["population"] == population]
        assert len(rows) == 12 and (rows["gate_source"] == "not measured").all(), rows
        assert rows["count"].isna().all() and rows["pct_parent"].isna().all()
    treg = ps[ps["population"] == "Treg"]
    assert (treg["gate_source"] != "not measured").all() and (treg["count"] > 0).all()

    results = c.get(f"/api/runs/{run_id}/results").json()
    freq = {f["population"]: f["cells"] for f in results["frequencies"]}
    assert all(cell["median"] is None and cell["not_measured"] >= 1 for cell in freq["cTfh"]), freq["cTfh"]
    assert sum(cell["not_measured"] for cell in freq["cTfh"]) == 12  # by arm and visit
    assert all(cell["median"] is not None and cell["not_measured"] == 0 for cell in freq["Treg"])

    page = c.get(f"/runs/{run_id}").text
    assert re.search(r'id="run-options">Missing markers: <strong>skip</strong>', page), page[:3000]
    row = re.search(r"<tr><td>cTfh</td>.*?</tr>", page, re.S).group(0)
    assert row.count("not measured") == len(freq["cTfh"]), row
    assert "Missing markers: <strong>stop</strong>" in c.get(f"/runs/{stopped['id']}").text

    items = c.get(f"/api/runs/{run_id}/review?population=cTfh").json()["items"]
    assert len(items) == 12 and {i["status"] for i in items} == {"not measured"}
    assert {i["status"] for i in c.get(f"/api/runs/{run_id}/review?population=Treg").json()["items"]} == {
        "unreviewed"
    }


# a browser check: it runs once, on SQLite. Before, its PostgreSQL variant skipped in its body, after
# its fixtures had started a server on PostgreSQL and uploaded the study's 12 files there (~4 s)
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_new_run_form_offers_the_choice(browser, server, study, backend):
    expect = pytest.importorskip("playwright.sync_api").expect
    errors: list[str] = []
    context, page = signed_in(browser, server, "admin", errors, console=False)
    page.goto(server.url + f"/studies/{study}#runs")
    choice = page.locator("#missing-markers")
    expect(choice).to_have_value("stop")  # the CLI's default
    choice.select_option("skip")
    page.click("#start-run")
    page.wait_for_url(re.compile(r".*/runs/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])
    expect(page.locator("#run-options")).to_contain_text("Missing markers: skip")
    c = server.client()
    assert c.get(f"/api/runs/{run_id}").json()["options"] == {"missing_markers": "skip"}
    (entry,) = _start_entries(c, run_id)
    assert entry["after"]["options"] == {"missing_markers": "skip"}
    page.click("#cancel-run")  # its outcome is the API test's; stop its work
    expect(page.locator("#run-state")).to_have_text("cancelled")
    # the study page's run list shows every run's options, as stored (before: no options column)
    page.goto(server.url + f"/studies/{study}#runs")
    runs = c.get(f"/api/studies/{study}").json()["runs"]
    assert {r["options"]["missing_markers"] for r in runs} >= {"skip"}
    expect(page.locator("#run-list thead")).to_contain_text("Options")
    for r in runs:
        expect(page.locator(f'#run-list tr[data-run="{r["id"]}"] td.run-options')).to_have_text(
            f"missing_markers: {r['options']['missing_markers']}"
        )
    # and the study's sign-off rule, which an administrator changes there with a reason (audited)
    expect(page.locator("#four-eyes-state")).to_contain_text("Sign-off by a second person (four eyes)")
    page.uncheck("#four-eyes")
    page.fill("#policy-reason", "one-person method development")
    page.click("#save-policy")
    expect(page.locator("#four-eyes-state")).to_contain_text("sign-off by a second person is off")
    expect(page.locator("#four-eyes")).not_to_be_checked()
    entry = c.get("/api/audit?limit=1").json()[0]
    assert (entry["action"], entry["reason"], entry["after"]) == (
        "study.policy", "one-person method development", {"four_eyes": False})  # fmt: skip
    assert errors == []
    context.close()


def test_migration_0004_gives_earlier_runs_the_default_options(backend, tmp_path):
    """A workspace at 0003 with a run is upgraded at start-up: the run's options are ``{}`` (it ran
    with the workflow's defaults, shown as ``stop``); the migration goes down and up again."""
    import sqlalchemy as sa

    from cytopipe.serve.db import Run, database_url, make_engine, open_database
    from cytopipe.serve.ops import run_dict
    from tests.test_review_templates import _alembic

    database, drop = fresh_database(backend)
    try:
        url = database_url(database, tmp_path)
        engine = make_engine(url)
        _alembic(engine, "upgrade", "0003")
        with engine.begin() as con:
            con.execute(sa.text("INSERT INTO studies (id, name, arms, visits, settings, pattern, created_by, "
                                "created_at) VALUES (1, 's', '[]', '[]', '{}', 'p', 'ann', :t)"),
                        {"t": "2026-01-01T00:00:00+00:00"})  # fmt: skip
            con.execute(sa.text("INSERT INTO runs (id, study_id, status, folder, attempts, error, n_samples, "
                                "started_by, created_at) VALUES (1, 1, 'failed', 'f', 1, '', 2, 'ann', :t)"),
                        {"t": "2026-01-01T00:00:00+00:00"})  # fmt: skip
        engine.dispose()
        engine, sessions = open_database(url)
        with sessions() as db:
            run = db.get(Run, 1)
            assert run.options == {} and run_dict(run)["options"] == {"missing_markers": "stop"}
        _alembic(engine, "downgrade", "0003")
        with engine.connect() as con:
            assert "options" not in {c["name"] for c in sa.inspect(con).get_columns("runs")}
        _alembic(engine, "upgrade", "head")
        with engine.connect() as con:
            assert con.execute(sa.text("SELECT options FROM runs")).scalar() in ("{}", {})
        engine.dispose()
    finally:
        drop()
