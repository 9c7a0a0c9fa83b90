"""`cytopipe serve` through its JSON API and its pages, against a real server subprocess (uvicorn
on a free loopback port) with a fresh database: SQLite, and PostgreSQL where .ci/run started one.

Security: anonymous requests, roles, CSRF tokens, upload names, size limits, the login rate limit,
non-loopback hosts without accounts; uploads: content-addressed, read-only, duplicates, header
checks, validation rows; the mapping proposal; the audit trail's hash chain."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess

import pytest

from tests import serve_support
from tests.pipeline_support import REPO, cli_env, truncate_fcs
from tests.serve_support import PASSWORD, STUDY, Client, Server, trial_files, trial_manifest

backend = serve_support.backend  # fixtures shared with the other serve modules
server = serve_support.server  # SERVE_USERS / SERVE_ARGS: its accounts and options
SERVE_USERS = {"ana": "analyst", "vic": "viewer", "rev": "reviewer"}
SERVE_ARGS = ("--max-file-size", "1MB", "--max-batch-size", "20MB")

LIMIT = 1_000_000  # --max-file-size of this module's server


@pytest.fixture(scope="module")
def study(server):
    ana = server.client("ana")
    r = ana.post("/api/studies", json={"name": "security study", **STUDY}, headers=ana.h)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_anonymous_requests_are_refused(server, study):
    anon = Client(server.url, None)
    assert anon.get("/api/studies").status_code == 401
    assert anon.get(f"/api/studies/{study}").status_code == 401
    assert (
        anon.put(f"/api/studies/{study}/uploads", params={"name": "a.fcs"}, content=b"FCS3.1").status_code
        == 401
    )
    assert anon.post(f"/api/studies/{study}/runs").status_code == 401
    page = anon.get("/studies", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    # the OpenAPI schema is public (it holds no data) and lists the operations
    paths = anon.get("/api/openapi.json").json()["paths"]
    assert {"/api/studies", "/api/studies/{study_id}/uploads", "/api/studies/{study_id}/runs",
            "/api/runs/{run_id}", "/api/runs/{run_id}/cancel", "/api/runs/{run_id}/files/{name}"} <= set(paths)  # fmt: skip


def test_a_viewer_can_look_but_not_upload_or_start_runs(server, study, serve_trial):
    vic = server.client("vic")
    assert vic.get(f"/api/studies/{study}").status_code == 200
    r = vic.upload(study, trial_files(serve_trial)[0])
    assert r.status_code == 403 and "viewer" in r.json()["detail"]
    assert vic.post(f"/api/studies/{study}/runs", headers=vic.h).status_code == 403
    assert vic.post("/api/studies", json={"name": "x", **STUDY}, headers=vic.h).status_code == 403
    assert vic.post(f"/api/studies/{study}/mapping", json={"rows": []}, headers=vic.h).status_code == 403
    assert vic.post("/api/users", json={"name": "m", "password": PASSWORD, "role": "admin"},
                    headers=vic.h).status_code == 403  # fmt: skip
    # an analyst cannot manage accounts either
    ana = server.client("ana")
    assert ana.post("/api/users", json={"name": "m", "password": PASSWORD, "role": "admin"},
                    headers=ana.h).status_code == 403  # fmt: skip


def test_csrf_token_is_required_for_every_state_change(server, study, serve_trial):
    ana = server.client("ana")
    body = {"name": "csrf study", **STUDY}
    assert ana.post("/api/studies", json=body).status_code == 403
    assert ana.post("/api/studies", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    with open(trial_files(serve_trial)[1], "rb") as fh:
        assert (
            ana.put(f"/api/studies/{study}/uploads", params={"name": "a.fcs"}, content=fh).status_code == 403
        )
    # the HTML forms: a form post without the hidden csrf field is refused
    form = {"name": "form study", "template": STUDY["template"]}
    assert ana.post("/studies", data=form).status_code == 403
    assert ana.post("/studies", data={**form, "csrf": "forged"}).status_code == 403
    # and the sign-in form needs the token its page set
    fresh = Client(server.url, None)
    r = fresh.post("/login", data={"name": "ana", "password": PASSWORD, "csrf": "x"}, follow_redirects=False)
    assert r.status_code == 403
    # with the token everything works, and cookies are HttpOnly + SameSite=Strict
    login = fresh.get("/login")
    token = login.text.split('name="csrf" value="')[1].split('"')[0]
    r = fresh.post(
        "/login", data={"name": "ana", "password": PASSWORD, "csrf": token}, follow_redirects=False
    )
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    r = ana.post("/api/studies", json=body, headers=ana.h)
    assert r.status_code == 201
    assert all(s["name"] != "form study" for s in ana.get("/api/studies").json())


def test_the_session_cookie_is_secure_behind_a_tls_proxy(server):
    """A reverse proxy on the same machine that terminated HTTPS says so; the cookie is Secure."""
    anon = Client(server.url, None)
    r = anon.post(
        "/api/login", json={"name": "ana", "password": PASSWORD}, headers={"X-Forwarded-Proto": "https"}
    )
    assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()
    plain = Client(server.url, None).post("/api/login", json={"name": "ana", "password": PASSWORD})
    assert "secure" not in plain.headers["set-cookie"].lower()


def test_upload_names_are_neutralised(server, study, serve_trial):
    ana = server.client("ana")
    files = trial_files(serve_trial)
    names = {"../../x.fcs": "x.fcs", "/etc/passwd.fcs": "passwd.fcs", "a\x00b\x07c.fcs": "abc.fcs",
             "..\\..\\win.fcs": "win.fcs"}  # fmt: skip
    for (raw, expected), path in zip(names.items(), files[2:]):
        r = ana.upload(study, path, name=raw)
        assert r.status_code == 201, r.text
        assert r.json()["name"] == expected and r.json()["status"] == "ok"
    # nothing was written outside the data folder, and inside it only content-addressed blobs
    data = server.data
    assert not (data.parent / "x.fcs").exists() and not (data.parent.parent / "x.fcs").exists()
    assert not any(p.name.endswith(".fcs") for p in data.rglob("*"))
    for blob in (data / "blobs").rglob("*"):
        if blob.is_file():
            assert len(blob.name) == 64 and blob.parent.name == blob.name[:2]
            assert stat.S_IMODE(blob.stat().st_mode) == 0o444  # read-only


def test_content_is_checked_by_its_header_and_duplicates_are_kept_once(server, study, serve_trial, tmp_path):
    ana = server.client("ana")
    png = tmp_path / "picture.fcs"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    r = ana.upload(study, png)
    assert r.status_code == 201 and r.json()["status"] == "rejected"
    assert "not an FCS file" in r.json()["reason"] and "PNG" in r.json()["reason"]
    assert not any(b.name == r.json()["sha256"] for b in (server.data / "blobs").rglob("*"))  # bytes not kept
    # an FCS file named .txt is an FCS file
    src = trial_files(serve_trial)[6]
    renamed = tmp_path / "exported.txt"
    renamed.write_bytes(src.read_bytes())
    r = ana.upload(study, renamed)
    assert r.status_code == 201 and r.json()["status"] == "ok" and r.json()["events"] > 1000
    # the same bytes again (under another name): recognised, kept once
    r2 = ana.upload(study, src, name="again.fcs")
    assert r2.status_code == 200 and r2.json()["duplicate"] and r2.json()["id"] == r.json()["id"]
    assert "exported.txt" in r2.json()["message"]
    uploads = ana.get(f"/api/studies/{study}").json()["uploads"]
    assert sum(u["sha256"] == r.json()["sha256"] for u in uploads) == 1
    # a truncated FCS file is stored (nothing is lost) and rejected with validate's reason
    cut = tmp_path / "cut.fcs"
    cut.write_bytes(trial_files(serve_trial)[7].read_bytes())
    truncate_fcs(cut)
    r = ana.upload(study, cut)
    assert r.json()["status"] == "rejected" and r.json()["reason"]
    assert "DATA" in r.json()["reason"] or "truncated" in r.json()["reason"] or "end" in r.json()["reason"]


def test_the_same_bytes_sent_at_the_same_time_are_kept_once(server, serve_trial):
    """Four requests with the same file at once (the page sends two files at a time, a LIMS may
    send more): every one is answered, one row holds the bytes, the others say duplicate. (The
    batch's byte count under concurrent uploads: test_serve_upload.py.)"""
    from concurrent.futures import ThreadPoolExecutor

    src = trial_files(serve_trial)[9]
    clients = [server.client("ana") for _ in range(4)]
    c = clients[0]
    s = c.post("/api/studies", json={"name": "same bytes at once", **STUDY}, headers=c.h).json()["id"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: clients[i].upload(s, src, name=f"copy{i}.fcs"), range(4)))
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 201], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    rows = c.get(f"/api/studies/{s}").json()["uploads"]
    assert len(rows) == 1 and rows[0]["status"] == "ok"


def test_uploads_over_the_size_limit_are_refused_without_filling_the_disk(server, study):
    ana = server.client("ana")
    big = b"FCS3.1" + b"0" * (3 * LIMIT)
    r = ana.put(f"/api/studies/{study}/uploads", params={"name": "big.fcs"}, content=big, headers=ana.h)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the server counts while streaming and stops
        yield b"FCS3.1"
        for _ in range(200):
            yield b"\0" * 65536

    r = ana.put(
        f"/api/studies/{study}/uploads", params={"name": "stream.fcs"}, content=chunks(), headers=ana.h
    )
    assert r.status_code == 413
    assert list((server.data / "tmp").iterdir()) == []  # nothing left behind
    # a batch larger than the batch limit is refused before any byte is sent
    r = ana.post(f"/api/studies/{study}/batches", json={"files": 30, "bytes": 30 * LIMIT}, headers=ana.h)
    assert r.status_code == 413
    # a file beyond what its batch declared is refused too
    b = ana.post(f"/api/studies/{study}/batches", json={"files": 1, "bytes": 10}, headers=ana.h).json()
    r = ana.put(f"/api/studies/{study}/uploads", params={"name": "b.fcs", "batch": b["batch_id"]},
                content=b"FCS3.1" + b"0" * 100, headers=ana.h)  # fmt: skip
    assert r.status_code == 413


def test_mapping_is_proposed_from_file_names_and_confirmed(server, serve_trial):
    ana = server.client("ana")
    sid = ana.post("/api/studies", json={"name": "mapping study", **STUDY}, headers=ana.h).json()["id"]
    files = trial_files(serve_trial)[:4]
    for f in files:
        assert ana.upload(sid, f).status_code == 201
    clinical = (serve_trial / "clinical.csv").read_bytes()
    r = ana.put(
        f"/api/studies/{sid}/tables/clinical",
        params={"name": "clinical.csv"},
        content=clinical,
        headers=ana.h,
    )
    assert r.status_code == 200
    rows = ana.get(f"/api/studies/{sid}/mapping").json()
    truth = trial_manifest(serve_trial).set_index("sample_id")
    assert len(rows) == 4
    for row in rows:
        t = truth.loc[row["sample_id"]]
        assert (row["patient_id"], row["visit"], row["arm"]) == (t.patient_id, int(t.visit), t.arm)
        assert row["source"] == "file name"
    # another pattern: the visit cannot be read from the name, then $FIL is tried with the pattern
    other = ana.get(f"/api/studies/{sid}/mapping", params={"pattern": "{patient}-V{visit}.fcs"}).json()
    assert all(r["patient_id"] == "" or r["source"] in ("keywords",) for r in other)
    assert ana.get(f"/api/studies/{sid}/mapping", params={"pattern": "{patient}.fcs"}).status_code == 400
    # a bad row is refused with its reason; then the proposal is confirmed
    bad = [dict(rows[0], visit="week four")]
    r = ana.post(f"/api/studies/{sid}/mapping", json={"rows": bad}, headers=ana.h)
    assert r.status_code == 400 and "visit is 'week four': not a study week" in r.json()["detail"], r.text
    dup = [rows[0], dict(rows[1], sample_id=rows[0]["sample_id"])]
    r = ana.post(f"/api/studies/{sid}/mapping", json={"rows": dup}, headers=ana.h)
    assert r.status_code == 400 and "used twice" in r.json()["detail"]
    r = ana.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=ana.h)
    assert r.status_code == 200 and r.json()["confirmed"] == 4
    assert all(r["confirmed"] for r in ana.get(f"/api/studies/{sid}/mapping").json())


def test_the_mapping_takes_visits_as_the_manifest_writes_them(server, serve_trial):
    """The mapping API reads a visit as the manifest does (W04, Week 4, D28, BL -> study weeks 4, 4,
    4, 0) and refuses one it cannot read (M3: months) with the manifest's message, saving nothing.
    Before, ``visit`` was typed as a number: every text visit was a 422 naming only the type."""
    from cytopipe.manifest import visit_problem

    ana = server.client("ana")
    sid = ana.post("/api/studies", json={"name": "text visits", **STUDY}, headers=ana.h).json()["id"]
    for f in trial_files(serve_trial)[:4]:
        assert ana.upload(sid, f).status_code == 201
    arms = trial_manifest(serve_trial).set_index("sample_id")["arm"]
    rows = [dict(row, arm=arms[row["sample_id"]]) for row in ana.get(f"/api/studies/{sid}/mapping").json()]
    audit_before = ana.get("/api/audit", params={"limit": 1}).json()[0]["id"]
    refused = [dict(rows[0], visit="M3")] + rows[1:]
    r = ana.post(f"/api/studies/{sid}/mapping", json={"rows": refused}, headers=ana.h)
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == f"the mapping was not saved: {rows[0]['name']}: {visit_problem('M3')}"
    assert (
        "months are no whole number of weeks" in r.json()["detail"] and "BL / Baseline" in r.json()["detail"]
    )
    assert not any(x["confirmed"] for x in ana.get(f"/api/studies/{sid}/mapping").json())  # nothing saved
    assert ana.get("/api/audit", params={"limit": 1}).json()[0]["id"] == audit_before  # nothing recorded
    texts = ["W04", "Week 4", "D28", "BL"]
    sent = [dict(row, visit=text) for row, text in zip(rows, texts)]
    r = ana.post(f"/api/studies/{sid}/mapping", json={"rows": sent}, headers=ana.h)
    assert r.status_code == 200 and r.json()["confirmed"] == 4, r.text
    stored = {x["upload_id"]: x for x in ana.get(f"/api/studies/{sid}/mapping").json()}
    assert [stored[row["upload_id"]]["visit"] for row in rows] == [4, 4, 4, 0]
    assert all(x["confirmed"] for x in stored.values())
    entry = ana.get("/api/audit", params={"limit": 1}).json()[0]
    assert entry["action"] == "mapping.confirm" and entry["user"] == "ana"
    assert [x["visit"] for x in entry["after"]["rows"]] == [4, 4, 4, 0]
    assert ana.post(f"/api/studies/{sid}/mapping", json={"rows": sent}).status_code == 403  # CSRF
    vic = server.client("vic")  # a viewer may not map
    assert vic.post(f"/api/studies/{sid}/mapping", json={"rows": sent}, headers=vic.h).status_code == 403


def test_every_state_change_is_in_the_audit_trail_and_the_chain_holds(server, study):
    admin = server.client()
    entries = admin.get("/api/audit", params={"limit": 5000}).json()
    actions = {(e["user"], e["action"]) for e in entries}
    assert {("admin", "account.create"), ("ana", "study.create"), ("ana", "upload.file"),
            ("ana", "upload.duplicate"), ("ana", "mapping.confirm")} <= actions  # fmt: skip
    ids = sorted(e["id"] for e in entries)
    assert ids == list(range(1, len(ids) + 1))
    by_id = {e["id"]: e for e in entries}
    for i in ids[1:]:
        assert by_id[i]["prev_hash"] == by_id[i - 1]["hash"]
    assert all(e["at"].endswith("+00:00") for e in entries)  # UTC
    assert "chain intact" in admin.get("/audit").text
    if server.database is None:  # the database refuses to rewrite the trail
        with sqlite3.connect(server.data / "cytopipe.sqlite") as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                con.execute("UPDATE audit SET reason = 'edited' WHERE id = 1")
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                con.execute("DELETE FROM audit WHERE id = 2")
    else:
        import psycopg

        with psycopg.connect(server.database.replace("+psycopg", "")) as con:
            with pytest.raises(psycopg.Error, match="append-only"):
                con.execute("UPDATE audit SET reason = 'edited' WHERE id = 1")


def test_pages_render_for_a_signed_in_user(server, study):
    ana = server.client("ana")
    for path in ("/studies", f"/studies/{study}", "/audit"):
        r = ana.get(path)
        assert r.status_code == 200 and "security study" in ana.get("/studies").text
        assert "default-src 'self'" in r.headers["content-security-policy"]
    assert ana.get("/users").status_code == 403
    docs = ana.get("/api/docs")  # our own page (FastAPI's Swagger UI would load from a CDN)
    assert docs.status_code == 200 and "/api/studies/{study_id}/uploads" in docs.text
    assert "cdn" not in docs.text.lower()
    # html in names is escaped, never markup
    r = ana.post("/api/studies", json={"name": "<script>alert(1)</script>", **STUDY}, headers=ana.h)
    assert r.status_code == 201
    page = ana.get("/studies").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_blinded_study_shows_arm_codes_in_its_mapping_and_audit_trail(server, serve_trial):
    """No arm name reaches anyone through a blinded study's mapping or audit entries (the stored
    rows keep the names and the hash chain holds); an unblinded study still shows them."""
    truth = trial_manifest(serve_trial).set_index("sample_id")
    arms = sorted(set(truth["arm"]))
    ana = server.client("ana")
    sids = {}
    for blinded in (True, False):
        body = {"name": f"blinding {blinded}", "arms": arms, "blinded": blinded, **STUDY}
        sid = sids[blinded] = ana.post("/api/studies", json=body, headers=ana.h).json()["id"]
        for f in trial_files(serve_trial)[4:8]:
            assert ana.upload(sid, f).status_code in (200, 201)
        r = ana.put(f"/api/studies/{sid}/tables/clinical", params={"name": "clinical.csv"},
                    content=(serve_trial / "clinical.csv").read_bytes(), headers=ana.h)  # fmt: skip
        assert r.status_code == 200, r.text
        rows = ana.get(f"/api/studies/{sid}/mapping").json()
        # the proposal comes back as it was shown (codes in a blinded study) and is confirmed
        r = ana.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=ana.h)
        assert r.status_code == 200 and r.json()["confirmed"] == 4, r.text
    blind, open_ = sids[True], sids[False]

    def arm_names(text: str) -> list[str]:
        return [a for a in arms if a.lower() in text.lower()]

    for user in ("vic", "ana", "rev", "admin"):
        c = server.client(user)
        rows = c.get(f"/api/studies/{blind}/mapping").json()
        assert {r["arm"] for r in rows} <= {f"Arm {x}" for x in "ABCDEFGH"}, rows
        codes = {}
        for r in rows:  # one code per arm, the same for every user and every request
            assert codes.setdefault(truth.loc[r["sample_id"], "arm"], r["arm"]) == r["arm"]
        assert not arm_names(json.dumps(rows))
        assert not arm_names(c.get(f"/studies/{blind}").text.split("<h2>Samples")[1].split("</form>")[0])
        entries = [
            e for e in c.get("/api/audit", params={"limit": 5000}).json() if e["object_id"] == str(blind)
        ]
        confirm = [e for e in entries if e["action"] == "mapping.confirm"]
        assert len(confirm) == 1 and not arm_names(json.dumps(confirm))
        assert {row["arm"] for row in confirm[0]["after"]["rows"]} <= set(codes.values())
        exported = json.loads(c.get("/api/audit/export", params={"format": "json"}).text)
        assert not arm_names(json.dumps([e for e in exported if e["action"] == "mapping.confirm"
                                         and e["object_id"] == str(blind)]))  # fmt: skip
        csv_rows = [line for line in c.get("/api/audit/export").text.splitlines()
                    if ",mapping.confirm,study," + str(blind) + "," in line]  # fmt: skip
        assert len(csv_rows) == 1 and not arm_names(csv_rows[0])
        page_rows = [tr for tr in c.get("/audit").text.split("<tr>")
                     if f"<td>mapping.confirm</td><td>study {blind}</td>" in tr]  # fmt: skip
        assert page_rows and not any(arm_names(tr) for tr in page_rows)
        # the unblinded study shows its arms
        shown = {r["sample_id"]: r["arm"] for r in c.get(f"/api/studies/{open_}/mapping").json()}
        assert shown == {s: truth.loc[s, "arm"] for s in shown}
        opened = [e for e in c.get("/api/audit", params={"limit": 5000}).json()
                  if e["object_id"] == str(open_) and e["action"] == "mapping.confirm"]  # fmt: skip
        assert {row["arm"] for row in opened[0]["after"]["rows"]} == set(shown.values())
    assert server.client().get("/api/audit/verify").json()["ok"]
    if server.database is None:  # the names are what was stored
        with sqlite3.connect(server.data / "cytopipe.sqlite") as con:
            stored = dict(con.execute("SELECT sample_id, arm FROM samples WHERE study_id = ?", (blind,)))
        assert stored == {s: truth.loc[s, "arm"] for s in stored} and len(stored) == 4


def _blinded_study(client, trial, name: str, arms: list[str] | None = None) -> tuple[int, list[dict]]:
    """A blinded study (with ``arms`` as its arm list, or none) with 4 files and the clinical table;
    answers the study and its mapping proposal as the API shows it."""
    body = {"name": name, "blinded": True, **STUDY} | ({"arms": arms} if arms else {})
    sid = client.post("/api/studies", json=body, headers=client.h).json()["id"]
    for f in trial_files(trial)[:4]:
        assert client.upload(sid, f).status_code in (200, 201)
    r = client.put(f"/api/studies/{sid}/tables/clinical", params={"name": "clinical.csv"},
                   content=(trial / "clinical.csv").read_bytes(), headers=client.h)  # fmt: skip
    assert r.status_code == 200, r.text
    return sid, client.get(f"/api/studies/{sid}/mapping").json()


def test_a_blinded_study_without_an_arm_list_codes_the_arms_of_its_data(server, serve_trial):
    """Without an arm list each arm of the data gets its own code (not one '(blinded)' for all,
    which a confirmed mapping then stored as every sample's arm); the audit trail shows the same
    codes, the names are stored, and a hidden arm with nothing stored behind it is refused."""
    import pandas as pd

    truth = trial_manifest(serve_trial).set_index("sample_id")["arm"]
    clinical = set(pd.read_csv(serve_trial / "clinical.csv")["arm"])
    ana = server.client("ana")
    sid, rows = _blinded_study(ana, serve_trial, "blinded, no arm list")
    assert len(rows) == 4 and len({truth[r["sample_id"]] for r in rows}) == 2
    codes = {}
    for r in rows:  # one code per arm, a different code for each arm
        assert r["arm"] != "(blinded)" and re.fullmatch(r"Arm [A-H]", r["arm"]), rows
        assert codes.setdefault(truth[r["sample_id"]], r["arm"]) == r["arm"]
    assert len(set(codes.values())) == len(codes) == 2
    # a hidden arm that stands for nothing stored is refused, naming what to send
    hidden = [{**rows[0], "arm": "(blinded)"}] + rows[1:]
    r = ana.post(f"/api/studies/{sid}/mapping", json={"rows": hidden}, headers=ana.h)
    detail = r.json()["detail"]
    assert r.status_code == 400 and "give its code" in detail and "Arm " in detail, r.text
    r = ana.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=ana.h)
    assert r.status_code == 200 and r.json()["confirmed"] == 4, r.text
    for user in ("vic", "admin"):
        c = server.client(user)
        again = c.get(f"/api/studies/{sid}/mapping").json()
        assert {r["sample_id"]: r["arm"] for r in again} == {r["sample_id"]: r["arm"] for r in rows}
        confirm = [e for e in c.get("/api/audit", params={"limit": 5000}).json()
                   if e["object_id"] == str(sid) and e["action"] == "mapping.confirm"]  # fmt: skip
        assert {x["sample_id"]: x["arm"] for x in confirm[0]["after"]["rows"]} == {
            r["sample_id"]: r["arm"] for r in rows
        }
        assert not [a for a in clinical if a.lower() in json.dumps(again + confirm).lower()]
    if server.database is None:  # the names are stored
        with sqlite3.connect(server.data / "cytopipe.sqlite") as con:
            stored = dict(con.execute("SELECT sample_id, arm FROM samples WHERE study_id = ?", (sid,)))
        assert stored == {s: truth[s] for s in stored} and len(stored) == 4


def test_cli_audit_export_codes_blinded_arms_unless_an_admin_unblinds_it(server, serve_trial, tmp_path):
    """`cytopipe audit export` shows a blinded study's arms as the pages' codes; `--unblind` needs an
    administrator and a reason, and is itself an audit entry of the export it writes."""
    from tests.pipeline_support import cli

    truth = trial_manifest(serve_trial).set_index("sample_id")["arm"]
    arms = sorted(set(truth))
    ana = server.client("ana")
    sid, rows = _blinded_study(ana, serve_trial, "blinded, cli export", arms)
    assert ana.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=ana.h).status_code == 200
    db = ["--data", str(server.data)] + (["--database", server.database] if server.database else [])

    def export(*more: str, user_input: str = "") -> tuple[subprocess.CompletedProcess, list[dict]]:
        out = tmp_path / f"audit{len(list(tmp_path.iterdir()))}.json"
        proc = cli("audit", "export", *db, "--format", "json", "--out", str(out), *more, input=user_input)
        return proc, (json.loads(out.read_text()) if out.is_file() else [])

    def confirmed(entries: list[dict]) -> dict[str, str]:
        entry = next(e for e in entries if e["action"] == "mapping.confirm" and e["object_id"] == str(sid))
        return {x["sample_id"]: x["arm"] for x in entry["after"]["rows"]}

    proc, coded = export()
    assert proc.returncode == 0, proc.stderr
    assert confirmed(coded) == {r["sample_id"]: r["arm"] for r in rows}  # the codes the API shows
    web = server.client("admin").get("/api/audit/export", params={"format": "json"}).json()
    assert confirmed(web) == confirmed(coded)
    assert {e["hash"] for e in coded} <= {e["hash"] for e in web}  # the stored rows' hashes
    # --unblind: an administrator with a reason, else refused and nothing written or recorded
    proc, _ = export("--unblind")
    assert proc.returncode != 0 and "--user" in proc.stderr and "--reason" in proc.stderr
    proc, refused = export("--unblind", "--user", "ana", "--reason", "DSMB", user_input=PASSWORD + "\n")
    assert proc.returncode == 2 and "administrators only" in proc.stderr and not refused, proc.stderr
    proc, named = export("--unblind", "--user", "admin", "--reason", "lock", user_input=PASSWORD + "\n")
    assert proc.returncode == 0, proc.stderr
    assert confirmed(named) == {s: truth[s] for s in confirmed(named)}
    last = named[-1]
    assert last["action"] == "audit.unblind" and last["user"] == "admin" and last["reason"] == "lock"
    assert [e["action"] for e in named].count("audit.unblind") == 1  # the refused ones left no entry
    assert last["after"]["format"] == "json"
    shown = server.client("vic").get("/api/audit", params={"limit": 5}).json()
    assert any(e["action"] == "audit.unblind" for e in shown)
    assert server.client().get("/api/audit/verify").json()["ok"]


def test_a_request_with_an_unknown_key_is_refused_naming_it(server, study):
    ana, admin = server.client("ana"), server.client()
    r = ana.post(
        "/api/studies", json={"name": "nested settings", "settings": {"blinded": True}}, headers=ana.h
    )
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "settings"]]
    assert "unknown field 'settings'" in r.json()["detail"][0]["msg"]
    assert not [s for s in ana.get("/api/studies").json() if s["name"] == "nested settings"]
    for client, path, body in (
        (admin, "/api/users", {"name": "x", "password": PASSWORD, "role": "viewer", "roles": ["admin"]}),
        (ana, f"/api/studies/{study}/batches", {"files": 1, "bytes": 1, "file": 2}),
        (ana, f"/api/studies/{study}/mapping", {"rows": [], "patern": "{patient}.fcs"}),
        (ana, "/api/runs/1/anndata", {"population": "CD4 T", "max_events": 10}),
        (ana, f"/api/studies/{study}/templates", {"yaml": "name: x", "reason": "r", "comment": "c"}),
        (admin, "/api/runs/1/review/approve", {"scope": "run", "populations": ["CD4 T"]}),
    ):
        r = client.post(path, json=body, headers=client.h)
        extra = set(body) - {"name", "password", "role", "files", "bytes", "rows", "population", "yaml",
                             "reason", "scope"}  # fmt: skip
        assert r.status_code == 422, (path, r.text)
        assert f"unknown field {extra.pop()!r}" in r.json()["detail"][0]["msg"], r.text
    # a login with a typo is refused too (no session is started for an ignored key)
    r = server.client(None).post("/api/login", json={"name": "ana", "password": PASSWORD, "remember": True})
    assert r.status_code == 422 and "unknown field 'remember'" in r.text


def test_a_template_error_names_the_template_not_a_server_file(server, study):
    ana = server.client("ana")
    name = STUDY["template"]
    versions = ana.get(f"/api/studies/{study}/templates").json()
    for path, body, label in (
        ("/api/studies", {"name": "bad template", "template_yaml": "name: [unclosed"}, "'template.yaml' (version 1)"),
        (f"/api/studies/{study}/templates", {"yaml": "name: [unclosed", "reason": "typo"},
         f"{name!r} (version {len(versions) + 1})"),
        (f"/api/studies/{study}/templates", {"yaml": "name: x\npopulations: 3\n", "reason": "typo"},
         f"{name!r} (version {len(versions) + 1})"),
    ):  # fmt: skip
        r = ana.post(path, json=body, headers=ana.h)
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert detail.startswith(f"the gating template {label} is not valid: "), detail
        assert "/tmp" not in detail and ".yaml'" not in detail.split(label)[1], detail
    assert len(ana.get(f"/api/studies/{study}/templates").json()) == len(versions)  # nothing saved


def test_refuses_a_non_loopback_host_without_accounts(tmp_path):
    proc = subprocess.run(
        [os.sys.executable, "-m", "cytopipe", "serve", "--data", str(tmp_path / "d"), "--host", "0.0.0.0",
         "--port", "1"], capture_output=True, text=True, env=cli_env(), cwd=str(REPO), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0" in proc.stderr and "--create-admin" in proc.stderr


def test_create_admin_without_a_terminal_or_a_password_says_how_to_give_one(tmp_path):
    """Started with nothing on standard input (a service, nohup): not 'a password needs at least
    10 characters' for a password nobody typed, but how to give one; no account is made."""
    proc = subprocess.run(
        [os.sys.executable, "-m", "cytopipe", "serve", "--data", str(tmp_path / "d"), "--create-admin", "alice",
         "--port", "1"], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=cli_env(), cwd=str(REPO),
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no password given" in proc.stderr and "CYTOPIPE_ADMIN_PASSWORD" in proc.stderr, proc.stderr
    assert "nothing was created" in proc.stderr and "created administrator" not in proc.stderr


def test_review_and_audit_commands_without_a_password_say_how_to_give_one(tmp_path):
    """`cytopipe review --user NAME` / `cytopipe audit ... --unblind` from a script that gives no
    password: not 'unknown or wrong password', but how to give it."""
    srv = Server(tmp_path / "d", None).start(create_admin="admin")
    srv.stop()
    for args in (["review", "1", "--user", "admin", "--approve-run"],
                 ["audit", "export", "--unblind", "--user", "admin", "--reason", "r", "--out", str(tmp_path / "a.csv")]):  # fmt: skip
        proc = subprocess.run(
            [os.sys.executable, "-m", "cytopipe", *args, "--data", str(srv.data)], stdin=subprocess.DEVNULL,
            capture_output=True, text=True, env={k: v for k, v in cli_env().items() if k != "CYTOPIPE_PASSWORD"},
            cwd=str(REPO), timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "no password given" in proc.stderr and "CYTOPIPE_PASSWORD" in proc.stderr, proc.stderr


def test_start_up_says_once_that_the_schema_was_upgraded_without_alembics_narration(tmp_path):
    """At the default log level a new workspace prints one line for its database schema, not
    Alembic's ~15 lines of plugins and migration steps; a second start prints none."""
    srv = Server(tmp_path / "d", None, "--log-level", "info")
    try:
        srv.start()
        srv.stop()
        log = tmp_path / f"server-{srv.port}.log"  # the whole log (Server.output() gives its tail)
        first = log.read_text(errors="replace")
        srv.start()
    finally:
        srv.stop()
    second = log.read_text(errors="replace")[len(first) :]
    assert re.search(r"database schema upgraded from empty to \d{4}", first), first
    assert "alembic" not in first.lower() and "Running upgrade" not in first
    assert "Uvicorn running" in second and "schema upgraded" not in second, second


def test_audit_rows_hash_what_they_say(server):
    """The stored before/after JSON is what the hash covers (a change would be detected). Entries
    from a blinded study's first coded one on show keyed hashes (tests/test_serve_audit_blinding.py):
    the newest entry with plain hashes is checked."""
    from cytopipe.serve.audit import row_hash

    admin = server.client()
    entries = admin.get("/api/audit", params={"limit": 5000}).json()
    entry = next(e for e in entries if len(e["hash"]) == len(e["prev_hash"]) == 64)
    row = {k: entry[k] for k in ("id", "at", "action", "object_type", "object_id", "reason", "prev_hash")}
    row.update(user_name=entry["user"], before=json.dumps(entry["before"], sort_keys=True, separators=(",", ":"),
               ensure_ascii=False), after=json.dumps(entry["after"], sort_keys=True, separators=(",", ":"),
               ensure_ascii=False))  # fmt: skip
    assert row_hash(row) == entry["hash"]
    row["reason"] = "edited"
    assert row_hash(row) != entry["hash"]


def test_login_is_rate_limited_after_repeated_failures(server):
    anon = Client(server.url, None)
    for _ in range(5):
        assert anon.post("/api/login", json={"name": "rev", "password": "wrong password"}).status_code == 401
    r = anon.post("/api/login", json={"name": "rev", "password": PASSWORD})
    assert r.status_code == 429 and "try again" in r.json()["detail"]
    assert (
        anon.post("/api/login", json={"name": "ana", "password": PASSWORD}).status_code == 200
    )  # others can


def test_login_is_rate_limited_per_client_address(server):
    """Last test of the module: after 20 failures from one address, it is locked out (all names)."""
    anon = Client(server.url, None)
    codes = [
        anon.post("/api/login", json={"name": f"guess{i}", "password": "x"}).status_code for i in range(16)
    ]
    assert codes == [401] * 15 + [429]  # 5 failures for 'rev' earlier + 15 now
    assert anon.post("/api/login", json={"name": "ana", "password": PASSWORD}).status_code == 429
