"""Gate review in the workspace on both databases, with a real `cytopipe serve` subprocess, a fresh
database (SQLite, and PostgreSQL where .ci/run starts one) and a finished run of 12 small simulated
samples (tests/review_support.py):

* a run is signed off by a second person (four eyes) where the study asks for it; a change carried
  over into a new version names who made it;
* a save answers while the previous refresh runs; a sign-off waits for a save that is re-gating;
* the report's CSV links open from the workspace;
* template versions through the API: refused when invalid, unchanged or without a reason, or from a
  viewer; a new version has a diff and an audit entry; run.json names the version; versions cannot be
  changed in the database;
* tampering: editing or deleting one audit row directly in the database makes `cytopipe audit verify`
  fail naming the first broken entry; the audit export escapes formula cells.

The review pages in Chromium and the API's refusals (SQLite; PostgreSQL under -m slow) are in
tests/test_review_serve_pages.py.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest

from tests import review_support, serve_support, test_report_browser
from tests.pipeline_support import cli
from tests.review_support import KEY, verify
from tests.serve_support import PASSWORD, signed_in

backend = serve_support.backend
server = serve_support.server  # SERVE_USERS / SERVE_ARGS: its accounts and options
browser = test_report_browser.browser  # the one Chromium fixture (module scope)
# the finished run of this module's server (tests/review_support.py): signed off, and new versions of it
finished, signed = review_support.finished, review_support.signed
unsigned, fresh = review_support.unsigned, review_support.fresh
SERVE_USERS = review_support.USERS


def test_a_run_is_signed_off_by_a_second_person(server, fresh):
    """The study's four-eyes rule, on for a new study: who made the run (here a new version of it) or
    overrode, pooled or reverted one of its gates, also in the run it is a version of, cannot sign it
    off (409 naming the rule and what they did, recorded as ``review.signoff_refused``); approving gates
    does not count. Only an administrator changes the rule, with a reason (one ``study.policy`` audit
    entry); with it off, one reviewer may do everything. Before, a reviewer signed off their own
    overrides. Rerunnable against the same server, in any order: its two reviewers are new accounts
    each time, its run a fresh version, and the study's rule is turned on again however it ends."""
    v1, _ = fresh  # a version made by the administrator
    admin = server.client()
    tag = os.urandom(3).hex()
    q_name, u_name = f"quinn-{tag}", f"ursula-{tag}"
    for name in (q_name, u_name):  # two reviewers who did nothing on this run yet
        r = admin.post(
            "/api/users", json={"name": name, "password": PASSWORD, "role": "reviewer"}, headers=admin.h
        )
        assert r.status_code == 201, r.text
    quinn, ursula = server.client(q_name), server.client(u_name)
    study = admin.get(f"/api/runs/{v1}").json()["study_id"]
    assert admin.get(f"/api/studies/{study}").json()["settings"]["four_eyes"] is True  # a new study's default
    try:
        _second_person(admin, quinn, ursula, q_name, u_name, v1, study)
    finally:  # the rule on again for the tests after this one, had it failed with the rule off
        if admin.get(f"/api/studies/{study}").json()["settings"]["four_eyes"] is not True:
            admin.post(f"/api/studies/{study}/policy", json={"four_eyes": True, "reason": "test cleanup"},
                       headers=admin.h)  # fmt: skip


def _second_person(admin, quinn, ursula, q_name: str, u_name: str, v1: int, study: int) -> None:
    # quinn uses the pooled gate of one sample, ursula approves
    sample = quinn.get(f"/api/runs/{v1}/review?population=Treg").json()["items"][0]["sample_id"]
    change = {"sample_id": sample, "population": "Treg", "kind": "pooled", "reason": "fit failure"}
    assert quinn.post(f"/api/runs/{v1}/review/change", json=change, headers=quinn.h).status_code == 200
    assert (
        ursula.post(f"/api/runs/{v1}/review/approve", json={"scope": "run"}, headers=ursula.h).status_code
        == 200
    )
    page = quinn.get(f"/runs/{v1}/review?population=Treg").text
    assert f"{q_name} (used the pooled gate for Treg of {sample} in run {v1})" in page  # told before he tries
    assert "admin (started run " in page and "cannot sign this run, so another reviewer signs it" in page
    r = quinn.post(f"/api/runs/{v1}/signoff", json={"password": PASSWORD}, headers=quinn.h)
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        f"run {v1} cannot be signed off by {q_name}: study 'review study' requires sign-off by a second person "
        f"(four eyes), and {q_name} used the pooled gate for Treg of {sample} in run {v1}. Another reviewer, who "
        "neither started the run nor changed its gates, signs it off (an administrator can turn the rule off "
        "on the study's page, with a reason)"
    )
    entry = admin.get("/api/audit?limit=5").json()[0]
    assert (entry["action"], entry["user"], entry["object_id"]) == (
        "review.signoff_refused",
        q_name,
        str(v1),
    )
    assert (
        entry["after"]["rule"] == "four_eyes" and entry["reason"] == "sign-off by a second person (four eyes)"
    )
    assert quinn.get(f"/api/runs/{v1}/review?population=Treg").json()["signoff"] is None
    r = ursula.post(f"/api/runs/{v1}/signoff", json={"password": PASSWORD}, headers=ursula.h)
    assert r.status_code == 200 and r.json()["signed_by"] == u_name, r.text  # her approvals do not count

    # ursula makes the next version: she made it, and quinn's carried-over pooled gate is still his
    r = ursula.post(f"/api/runs/{v1}/versions", headers=ursula.h)
    assert r.status_code == 201, r.text
    v2 = r.json()["id"]
    assert (
        quinn.post(f"/api/runs/{v2}/review/approve", json={"scope": "run"}, headers=quinn.h).status_code
        == 200
    )
    r = ursula.post(f"/api/runs/{v2}/signoff", json={"password": PASSWORD}, headers=ursula.h)
    assert (
        r.status_code == 409 and f"{u_name} made run {v2} as version 3 of run {v1}." in r.json()["detail"]
    ), r.text
    r = quinn.post(f"/api/runs/{v2}/signoff", json={"password": PASSWORD}, headers=quinn.h)
    assert r.status_code == 409 and f"{q_name} used the pooled gate for Treg of {sample} in run {v1}." in r.json()[
        "detail"], r.text  # fmt: skip

    # the rule is the administrator's, with a reason, and audited
    policy = f"/api/studies/{study}/policy"
    off = {"four_eyes": False, "reason": "a one-person pilot lab"}
    assert ursula.post(policy, json=off, headers=ursula.h).status_code == 403
    assert admin.post(policy, json=off).status_code == 403  # no CSRF token
    r = admin.post(policy, json={**off, "reason": " "}, headers=admin.h)
    assert r.status_code == 400 and "a reason is required" in r.json()["detail"], r.text
    r = admin.post(policy, json=off, headers=admin.h)
    assert r.status_code == 200 and r.json()["four_eyes"] is False, r.text
    entry = admin.get("/api/audit?limit=1").json()[0]
    assert (entry["action"], entry["user"], entry["object_id"], entry["reason"]) == (
        "study.policy", "admin", str(study), "a one-person pilot lab")  # fmt: skip
    assert entry["before"] == {"four_eyes": True} and entry["after"] == {"four_eyes": False}
    assert "sign-off by a second person is off" in admin.get(f"/studies/{study}").text
    r = admin.post(policy, json=off, headers=admin.h)
    assert r.status_code == 409 and "off already" in r.json()["detail"], r.text
    r = quinn.post(f"/api/runs/{v2}/signoff", json={"password": PASSWORD}, headers=quinn.h)
    assert r.status_code == 200 and r.json()["signed_by"] == q_name, r.text
    r = admin.post(policy, json={"four_eyes": True, "reason": "pilot over"}, headers=admin.h)
    assert r.status_code == 200 and admin.get(f"/api/studies/{study}").json()["settings"]["four_eyes"] is True


def test_a_carried_over_change_names_who_made_it(browser, server, signed, fresh, backend):
    """rita uses the pooled gate of one sample; sam makes the next version of the run. The copy of her
    change is still hers, at her time and audit entry, with her reason, marked carried over by sam
    (the version's run.version entry, which lists it with its author): in the review record, the
    review queue and page, the four-eyes rule (sam made the version, rita changed the gate in the run
    before) and the signed report's gate changes. Before, the copy was sam's, at the version's time
    and entry, and the reason began "carried over from run N"."""
    v1, _ = fresh
    rita, sam, tess = server.client("rita"), server.client("sam"), server.client("tess")
    sample = rita.get(f"/api/runs/{v1}/review?population=Treg").json()["items"][0]["sample_id"]
    change = {
        "sample_id": sample,
        "population": "Treg",
        "kind": "pooled",
        "reason": "fit failure",
        "category": "clog",
    }
    r = rita.post(f"/api/runs/{v1}/review/change", json=change, headers=rita.h)
    assert r.status_code == 200, r.text
    made = next(d for d in json.loads((server.data / "runs" / str(v1) / "out" / "review.json").read_text())
                ["decisions"] if d["sample_id"] == sample and d["kind"] == "pooled")  # fmt: skip
    assert (
        made["user"] == "rita" and made["audit_entry"] == r.json()["audit_entry"] and made["carried"] is None
    )
    # a new version is made of a signed-off run: tess, who changed nothing, approves and signs it
    assert (
        tess.post(f"/api/runs/{v1}/review/approve", json={"scope": "run"}, headers=tess.h).status_code == 200
    )
    r = tess.post(f"/api/runs/{v1}/signoff", json={"password": PASSWORD}, headers=tess.h)
    assert r.status_code == 200, r.text
    assert tess.post(f"/api/runs/{v1}/versions").status_code == 403  # CSRF
    assert (
        server.client("alan").post(f"/api/runs/{v1}/versions", headers=server.client("alan").h).status_code
        == 403
    )
    r = sam.post(f"/api/runs/{v1}/versions", headers=sam.h)
    assert r.status_code == 201, r.text
    v2 = r.json()["id"]
    entry = next(e for e in sam.get("/api/audit", params={"limit": 50}).json()
                 if e["action"] == "run.version" and e["object_id"] == str(v2))  # fmt: skip
    assert entry["user"] == "sam" and entry["before"] == {"run": v1}
    assert entry["after"]["carried"] == [{"sample_id": sample, "population": "Treg", "kind": "pooled", "by": "rita",
                                          "audit_entry": made["audit_entry"]}]  # fmt: skip
    # the review record of the new version
    out = server.data / "runs" / str(v2) / "out"
    copy = [d for d in json.loads((out / "review.json").read_text())["decisions"] if d["sample_id"] == sample]
    assert len(copy) == 1, copy
    assert {k: copy[0][k] for k in ("user", "at", "audit_entry", "reason", "category", "kind")} == {
        k: made[k] for k in ("user", "at", "audit_entry", "reason", "category", "kind")}  # fmt: skip
    assert copy[0]["carried"] == {"from_run": v1, "by": "sam", "at": entry["at"], "audit_entry": entry["id"]}
    # the review queue and page
    q = sam.get(f"/api/runs/{v2}/review?population=Treg").json()
    item = next(i for i in q["items"] if i["sample_id"] == sample)
    assert item["status"] == "pooled"
    assert item["changed_by"] == (
        f"Pooled gate used by rita at {made['at'][:19].replace('T', ' ')} UTC (audit entry {made['audit_entry']}); "
        f"carried over from run {v1} by sam at {entry['at'][:19].replace('T', ' ')} UTC (audit entry {entry['id']})."
    )
    assert q["cannot_sign"] == {"admin": [f"started run {signed[0]}", f"made run {v1} as version 2 of run {signed[0]}"],
                                "sam": [f"made run {v2} as version 3 of run {v1}"],
                                "rita": [f"used the pooled gate for Treg of {sample} in run {v1}"]}  # fmt: skip
    page = sam.get(f"/runs/{v2}/review?population=Treg").text
    assert f"rita (used the pooled gate for Treg of {sample} in run {v1})" in page
    for who in (sam, rita):  # neither may sign it: four eyes
        r = who.post(f"/api/runs/{v2}/signoff", json={"password": PASSWORD}, headers=who.h)
        assert r.status_code == 409, r.text
    assert (
        tess.post(f"/api/runs/{v2}/review/approve", json={"scope": "run"}, headers=tess.h).status_code == 200
    )
    r = tess.post(f"/api/runs/{v2}/signoff", json={"password": PASSWORD}, headers=tess.h)
    assert r.status_code == 200, r.text
    if backend == "sqlite":  # the page in a browser, once
        expect = pytest.importorskip("playwright.sync_api").expect
        context, pg = signed_in(browser, server, "vera")
        pg.goto(server.url + f"/runs/{v2}/review?population=Treg")
        pg.locator(f'#queue tbody tr[data-sample="{sample}"]').click()
        expect(pg.locator("#current-change")).to_have_text(item["changed_by"])
        context.close()
    # the report of the signed-off version (refreshed after the signature)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (
        (out / "report.html").is_file() and "by tess" in (out / "report.html").read_text(encoding="utf-8")
    ):  # (its own report: written after the version was made, then again after the signature)
        time.sleep(2)
    table = pd.read_csv(out / "report_tables" / "gate_overrides.csv")
    row = table[table["sample_id"] == sample].iloc[0]
    assert (row["user"], row["audit_entry"], row["reason"]) == (
        "rita",
        made["audit_entry"],
        "clog · fit failure",
    )
    assert row["carried_over"] == (
        f"from run {v1} by sam at {entry['at'][:19].replace('T', ' ')} UTC (audit entry {entry['id']})"
    )


def _blocked_in(thread, qualname: str) -> bool:
    """Whether ``thread`` is currently inside a function of this qualified name (its stack)."""
    import sys

    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_qualname == qualname:
            return True
        frame = frame.f_back
    return False


def test_a_save_answers_while_the_previous_refresh_runs(server, signed, monkeypatch):
    """The review operations in this process on the workspace's database, the statistics/report
    refresh held by a threading.Event (then run for real): while the first save's refresh is held, two
    more saves answer with their tables written (population_stats) and the held refresh has written
    nothing; the two requests collapse into one more refresh, which reads all three saves; a new
    version of the (then signed-off) run waits for the refreshes (it is seen blocked in the refresher
    while one is held); its report is not a copy of the run's: none until its own refresh (held
    here: "being prepared"), which then writes it unsigned, naming the version. Before, the run's
    signed-off report was copied into the new version."""
    import threading

    from sqlalchemy import select

    from cytopipe.review.decisions import Decision, read_review
    from cytopipe.serve import reviewops, reviewrefresh
    from cytopipe.serve.db import User, database_url, open_database

    run_id, _ = signed
    _, sessions = open_database(database_url(server.database, server.data))
    with sessions() as db:  # its own report written before the answer (as the command line makes one)
        run = reviewops.new_version(db, run_id, "rita", background=False)
        reviewops.approve(db, run.id, "rita", "run")  # a sign-off needs every gate reviewed
        out = reviewops.out_dir(run)
        items = reviewops.queue(db, run, reviewops.finished(db, run.id)[1], "Treg", True)["items"]
    samples = [i["sample_id"] for i in items[:3]]
    report_before = (out / "report.html").read_bytes()
    release, started = threading.Event(), threading.Event()
    copy_release, copy_started = threading.Event(), threading.Event()
    seen: list[int] = []  # per refresh of the run: how many decisions review.json held when it started
    real = reviewrefresh.refresh

    def held(folder: Path) -> None:
        if Path(folder).resolve() == out.resolve():
            seen.append(len(read_review(folder).decisions))
            started.set()
            release.wait()
        else:  # the new version's own report
            copy_started.set()
            copy_release.wait()
        real(folder)

    monkeypatch.setattr(reviewrefresh, "refresh", held)
    guard = 600  # seconds before a regression fails instead of hanging (not a timing assertion)

    def save(db, sample: str) -> dict:
        change = Decision(kind="pooled", sample_id=sample, population="Treg", user="rita", reason="refresh test",
                          category="clog")  # fmt: skip
        return reviewops.change_gate(db, run.id, "rita", change)

    with sessions() as db:
        save(db, samples[0])
    assert started.wait(guard)  # the first save's refresh runs, held
    answered = threading.Event()

    def more_saves() -> None:
        with sessions() as db:
            for sample in samples[1:]:
                save(db, sample)
        answered.set()

    saver = threading.Thread(target=more_saves, daemon=True)
    saver.start()
    assert answered.wait(guard), "a save waited for the previous save's statistics/report refresh"
    assert not release.is_set() and len(seen) == 1
    ps = pd.read_parquet(out / "population_stats.parquet").set_index(KEY)
    assert set(ps.loc[[(s, "Treg") for s in samples], "gate_source"]) == {"overridden"}
    assert (out / "report.html").read_bytes() == report_before  # the held refresh wrote nothing
    with sessions() as db:  # a new version is of a signed-off run: sam signs (rita made and changed it)
        reviewops.signoff(db, run.id, db.scalars(select(User).where(User.name == "sam")).one(), PASSWORD)
    copied: dict = {}

    def version() -> None:
        with sessions() as db:
            copied["run"] = reviewops.new_version(db, run.id, "rita")

    versioner = threading.Thread(target=version, daemon=True)
    versioner.start()
    for _ in range(guard * 10):  # until it is blocked waiting for the refreshes
        if _blocked_in(versioner, "Refresher.wait") or not versioner.is_alive():
            break
        time.sleep(0.1)
    assert _blocked_in(versioner, "Refresher.wait") and not copied  # no copy while a refresh is held
    release.set()
    versioner.join(guard)
    saver.join(guard)
    reviewrefresh.refresher(run.id, out).wait()
    assert len(seen) == 2 and seen[1] - seen[0] == 2  # three saves, two refreshes; the second read all
    report_after = (out / "report.html").read_bytes()
    assert report_after != report_before and b"Signed off" in report_after  # the refresh ran for real
    copy = copied["run"]
    copy_out = reviewops.out_dir(copy)
    assert copy_started.wait(guard)  # the new version's own report is being written, held
    assert not (copy_out / "report.html").exists() and reviewops.report_pending(copy)  # "being prepared"
    copy_release.set()
    reviewrefresh.refresher(copy.id, copy_out).wait()
    assert not reviewops.report_pending(copy)
    html = (copy_out / "report.html").read_text(encoding="utf-8")
    assert "Signed off" not in html and "This run&#x27;s gating has not been signed off" in html
    assert f"This is version 3 of the run, made from run {run.id} " in html
    # no report and no refresh running (what a server stopped while writing it leaves: the report is
    # written to a temporary name, then renamed): the run page asks for it again, once. Before, the
    # version had no report until its first save or sign-off
    (copy_out / "report.html").unlink()
    assert reviewops.report_pending(copy)  # "being prepared": its refresh asked for again
    reviewrefresh.refresher(copy.id, copy_out).wait()
    assert not reviewops.report_pending(copy)
    assert f"This is version 3 of the run, made from run {run.id} " in (copy_out / "report.html").read_text(
        encoding="utf-8"
    )


def test_a_signoff_waits_for_a_save_that_is_regating(server, signed, monkeypatch):
    """A sign-off sent while a save re-gates its sample (held here inside the save's preview, under the
    run's lock) is written after the save: the save's override comes before the signature in the
    audit trail and is in population_stats; nothing changes the run after its signature. Before, the
    sign-off was written at once, and the held save then recorded its override on the signed-off run."""
    import threading

    from sqlalchemy import select

    from cytopipe.review.decisions import Decision
    from cytopipe.serve import reviewops, reviewrefresh
    from cytopipe.serve.db import User, database_url, open_database

    run_id, _ = signed
    _, sessions = open_database(database_url(server.database, server.data))
    with sessions() as db:
        run = reviewops.new_version(db, run_id, "rita")  # unlocked, whatever the other tests did
        reviewops.approve(db, run.id, "rita", "run")  # a sign-off needs every gate reviewed
        items = reviewops.queue(db, run, reviewops.finished(db, run.id)[1], "Treg", True)["items"]
    sample = items[0]["sample_id"]
    held, release = threading.Event(), threading.Event()
    real = reviewops.preview

    def held_preview(db, rid: int, decision: Decision) -> dict:
        held.set()
        release.wait(600)
        return real(db, rid, decision)

    monkeypatch.setattr(reviewops, "preview", held_preview)
    saved: dict = {}
    signed: dict = {}

    def save() -> None:
        change = Decision(kind="pooled", sample_id=sample, population="Treg", user="rita", reason="race",
                          category="clog")  # fmt: skip
        with sessions() as db:
            saved.update(reviewops.change_gate(db, run.id, "rita", change))

    def sign() -> None:
        with sessions() as db:  # a second reviewer: rita made the version and changes its gate (four eyes)
            user = db.scalars(select(User).where(User.name == "sam")).one()
            signed.update(reviewops.signoff(db, run.id, user, PASSWORD))

    saver = threading.Thread(target=save, daemon=True)
    saver.start()
    assert held.wait(600)  # the save holds the run's lock, re-gating
    signer = threading.Thread(target=sign, daemon=True)
    signer.start()
    signed_early = False
    for _ in range(50):  # 5 s: the old code signed at once
        with sessions() as db:
            signed_early = db.get(reviewops.Signoff, run.id) is not None
        if signed_early:
            break
        time.sleep(0.1)
    release.set()
    saver.join(600)
    signer.join(600)
    reviewrefresh.refresher(run.id, reviewops.out_dir(run)).wait()
    assert not signed_early, "the run was signed off while a save was re-gating it"
    assert saved and signed and saved["audit_entry"] < signed["audit_entry"]
    ps = pd.read_parquet(reviewops.out_dir(run) / "population_stats.parquet").set_index(KEY)
    assert ps.loc[(sample, "Treg"), "gate_source"] == "overridden"
    c = server.client("rita")
    r = c.post(f"/api/runs/{run.id}/review/approve", json={"scope": "run"}, headers=c.h)
    assert r.status_code == 409 and "signed off" in r.json()["detail"], r.text


def test_the_reports_csv_links_open_from_the_workspace(server, finished):
    """report.html links its tables relatively (report_tables/<name>.csv); opened from the run page
    (/runs/N/files/report.html) each link answers its CSV, for any signed-in role. Before, every one
    was a JSON 404 ("Not Found"), e.g. the Gate review section's overrides table."""
    from urllib.parse import urljoin

    run_id, out = finished
    vera = server.client("vera")
    for base in (f"/runs/{run_id}/files/report.html", f"/api/runs/{run_id}/files/report.html"):
        html = vera.get(base, params={"inline": "true"}).text
        links = sorted(set(re.findall(r'href="(report_tables/[^"#]+\.csv)"', html)))
        assert "report_tables/samples.csv" in links, links
        for link in links:
            r = vera.get(urljoin(base, link))
            assert r.status_code == 200, (link, r.text[:200])
            assert r.headers["content-type"].startswith("text/csv")
            assert r.content == (out / link).read_bytes()
            assert f'filename="{link.split("/")[1]}"' in r.headers["content-disposition"]
    assert vera.get(f"/api/runs/{run_id}/files/report_tables/nope.csv").status_code == 404
    assert vera.get(f"/api/runs/{run_id}/files/report_tables/..%2Frun.json").status_code == 404
    anonymous = server.client(None)
    assert anonymous.get(f"/api/runs/{run_id}/files/report_tables/gate_review.csv").status_code == 401


def test_template_versions(server, finished, backend):
    """Editing the study's template makes a new immutable version with a diff and an audit entry; the
    finished run keeps naming the version it ran with (run row and run.json)."""
    run_id, out = finished
    c, vera = server.client("alan"), server.client("vera")  # an analyst may edit, a viewer may not
    study_id = c.get(f"/api/runs/{run_id}").json()["study_id"]
    start = c.get(f"/api/studies/{study_id}/templates").json()  # (the browser test may have added v2)
    v1, n = start[0], len(start)
    assert v1["version"] == 1 and run_id in v1["runs"] and start[-1]["current"]
    info = json.loads((out / "run.json").read_text())
    assert info["workflow"]["template"].endswith("template_v1.yaml")  # run.json names the version
    assert info["hashes"]["template"] == v1["sha256"]  # ... and its bytes are that version's
    v1_yaml = c.get(f"/api/studies/{study_id}/templates/1").json()["yaml"]
    text = c.get(f"/api/studies/{study_id}/templates/{n}").json()["yaml"]
    assert "FOXP3" in text
    url = f"/api/studies/{study_id}/templates"
    edit = {"yaml": text + "\n# FMO-based FOXP3 from week 12\n", "reason": "FMO"}
    assert vera.post(url, json=edit, headers=vera.h).status_code == 403
    bad = c.post(url, json={"yaml": "populations: [", "reason": "typo"}, headers=c.h)
    assert bad.status_code == 400 and "not valid" in bad.json()["detail"]
    same = c.post(url, json={"yaml": text, "reason": "no change"}, headers=c.h)
    assert same.status_code == 400 and "unchanged" in same.json()["detail"]
    assert c.post(url, json={**edit, "reason": " "}, headers=c.h).status_code == 400  # a reason is required
    assert len(c.get(url).json()) == n  # nothing refused was saved
    r = c.post(url, json=edit, headers=c.h)
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert v2["version"] == n + 1 and v2["current"] and v2["runs"] == []
    assert "+# FMO-based FOXP3 from week 12" in v2["diff"] and v2["diff"].startswith(f"--- v{n}")
    versions = c.get(url).json()
    assert [v["version"] for v in versions] == list(range(1, n + 2)) and not versions[0]["current"]
    assert run_id in versions[0]["runs"]  # the finished run still names version 1
    entry = next(e for e in c.get("/api/audit?limit=500").json() if e["action"] == "template.edit")
    assert entry["user"] == "alan" and entry["reason"] == "FMO"
    assert entry["before"]["version"] == n and entry["after"]["version"] == n + 1
    assert entry["after"]["diff"] == v2["diff"]
    # versions are immutable in the database itself
    sql = "UPDATE templates SET yaml = 'x' WHERE version = 1"
    if backend == "sqlite":
        con = sqlite3.connect(server.data / "cytopipe.sqlite")
        for stmt in (sql, "DELETE FROM templates WHERE version = 1"):
            with pytest.raises(sqlite3.DatabaseError, match="immutable"):
                con.execute(stmt)
        con.close()
    else:
        import psycopg

        with psycopg.connect(server.database, autocommit=True) as con:
            for stmt in (sql, "DELETE FROM templates WHERE version = 1"):
                with pytest.raises(psycopg.Error, match="immutable"):
                    con.execute(stmt)
    assert c.get(f"/api/studies/{study_id}/templates/1").json()["yaml"] == v1_yaml


def test_tampering_with_the_audit_trail_is_detected(server, fresh, backend, tmp_path):
    """Editing or deleting an audit row directly in the database makes `cytopipe audit verify` fail
    naming it; the export escapes formula cells. The trail is put back as it was at the end (the row
    and the triggers), so the tests after this one see an intact chain."""
    rita = server.client("rita")  # a reason that a spreadsheet would run as a formula
    sample = rita.get(f"/api/runs/{fresh[0]}/review?population=Treg").json()["items"][0]["sample_id"]
    change = {"sample_id": sample, "population": "Treg", "kind": "pooled", "reason": "=1+1 fit failure"}
    assert rita.post(f"/api/runs/{fresh[0]}/review/change", json=change, headers=rita.h).status_code == 200
    newest = server.client("admin").get("/api/audit", params={"limit": 1}).json()[0]
    ok, text = verify(server)
    assert ok == 0 and "chain intact" in text, text
    # what the chain alone cannot show (its newest entries removed) the printed head can
    assert f"newest entry {newest['id']}, hash {newest['hash'][:16]}" in text, text
    # export: CSV escaped against formula injection, JSON complete
    c = server.client("admin")
    csv = c.get("/api/audit/export?format=csv")
    assert csv.status_code == 200 and csv.text.startswith("id,at,user,action")
    assert "'=1+1 fit failure" in csv.text and ",=1+1" not in csv.text  # the reason of the pooled gate
    rows = c.get("/api/audit/export?format=json").json()
    n = len(rows)
    assert n >= 5 and [r["id"] for r in rows] == list(range(1, n + 1))
    proc = cli("audit", "export", "--data", str(server.data), "--format", "json", "--out", str(tmp_path / "a.json"),
               *(["--database", server.database] if server.database else []))  # fmt: skip
    assert proc.returncode == 0 and len(json.loads((tmp_path / "a.json").read_text())) >= n
    changed, deleted = 3, 5
    if backend == "sqlite":
        db = server.data / "cytopipe.sqlite"
        con = sqlite3.connect(db)
        triggers = [x for (x,) in con.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name IN "
                                              "('audit_no_update', 'audit_no_delete')")]  # fmt: skip
        assert len(triggers) == 2
        gone = con.execute("SELECT * FROM audit WHERE id = ?", (deleted,)).fetchone()
        con.execute("DROP TRIGGER audit_no_update")  # what someone editing the file by hand can do
        con.execute("DROP TRIGGER audit_no_delete")
        original = con.execute("SELECT reason FROM audit WHERE id = ?", (changed,)).fetchone()[0]
        con.execute("UPDATE audit SET reason = 'nothing to see' WHERE id = ?", (changed,))
        con.commit()
        code, text = verify(server)
        assert code == 3 and f"audit entry {changed} was changed" in text, text
        con.execute("UPDATE audit SET reason = ? WHERE id = ?", (original, changed))
        con.commit()
        assert verify(server)[0] == 0
        con.execute("DELETE FROM audit WHERE id = ?", (deleted,))
        con.commit()
        code, text = verify(server)
        con.execute(f"INSERT INTO audit VALUES ({', '.join('?' * len(gone))})", gone)  # put back as it was
        for sql in triggers:
            con.execute(sql)
        con.commit()
        con.close()
    else:
        import psycopg

        with psycopg.connect(server.database, autocommit=True) as con:
            con.execute("ALTER TABLE audit DISABLE TRIGGER audit_append_only")
            gone = con.execute("SELECT * FROM audit WHERE id = %s", (deleted,)).fetchone()
            original = con.execute("SELECT reason FROM audit WHERE id = %s", (changed,)).fetchone()[0]
            con.execute("UPDATE audit SET reason = 'nothing to see' WHERE id = %s", (changed,))
            code, text = verify(server)
            assert code == 3 and f"audit entry {changed} was changed" in text, text
            con.execute("UPDATE audit SET reason = %s WHERE id = %s", (original, changed))
            assert verify(server)[0] == 0
            con.execute("DELETE FROM audit WHERE id = %s", (deleted,))
            code, text = verify(server)
            con.execute(f"INSERT INTO audit VALUES ({', '.join(['%s'] * len(gone))})", gone)  # put back
            con.execute("ALTER TABLE audit ENABLE TRIGGER audit_append_only")
    assert code == 3 and f"audit entry {deleted} is missing" in text, text
    assert verify(server)[0] == 0  # as it was: the tests after this one see an intact chain
