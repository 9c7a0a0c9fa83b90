"""What a blinded study keeps from before its arms were known, and what it shows of it, with a
real `cytopipe serve` subprocess (SQLite; PostgreSQL under -m slow) and real uploads of the small
simulated trial's files.

An FCS file's name is checked against the arms the study knows when it is uploaded; one uploaded
before them (a study without an arm list, tables or mapping yet) is stored under its name, and an
audit entry can never be rewritten (a hash chain). Once the arms are known, every view of the
study (its page, the API, the mapping, the audit trail and its exports) shows ``[arm]`` where an
arm shows in such a name or id, by the rules of the refusals at entry
(cytopipe/report/armcheck.py: ``masked``), while the stored rows, and so the chain, stay as
written. The mapping shows a proposal whose ids its confirmation would refuse without its arm's
code (an arm letter glued to digits, ``P01A``; ids from an FCS file's keywords). A study's name
that shows an arm, and arms named by numbers, are refused at run start as at entry.
"""

from __future__ import annotations

import json

import numpy as np

from tests import serve_support
from tests.pipeline_support import cli
from tests.serve_support import PASSWORD, STUDY, confirm_in_database, trial_manifest

backend = serve_support.backend_postgresql_slow
server = serve_support.server
SERVE_USERS = {"vera": "viewer"}  # a blinded user who reads the pages


def _create(c, name: str, arms: list[str], **more):
    return c.post(
        "/api/studies", json={"name": name, **STUDY, "arms": arms, "blinded": True, **more}, headers=c.h
    )


def _put_table(c, study: int, kind: str, text: str):
    return c.put(
        f"/api/studies/{study}/tables/{kind}", params={"name": "t.csv"}, content=text.encode(), headers=c.h
    )


def _db(server) -> list[str]:
    return ["--data", str(server.data)] + (["--database", server.database] if server.database else [])


def _actions(c, study: int) -> list[str]:
    return [e["action"] for e in c.get("/api/audit?limit=5000").json() if e["object_id"] == str(study)]


def test_a_file_name_stored_before_the_arms_were_known_is_masked_wherever_it_shows(server, serve_trial):
    """``P001_IL2_W00.fcs`` (sent as ``lab/IL2/P001_IL2_W00.fcs``) uploaded while the study knew no
    arm, then its arm ``IL2`` known: the audit trail (API, page, exports, `cytopipe audit export`),
    the study page and API show ``P001_[arm]_W00.fcs`` to every user, the chain still verifies
    over the stored rows, the hashes from that entry on are keyed, and an administrator's
    unblinded export (recorded) shows the name as stored. Before, every view showed it."""
    c, vera = server.client(), server.client("vera")
    study = _create(c, "stored names, blinded", []).json()["id"]
    row = trial_manifest(serve_trial).iloc[0]
    up = c.upload(study, serve_trial / row["file"], name="lab/IL2/P001_IL2_W00.fcs")
    assert up.status_code == 201, up.text  # no arm known: nothing tells that IL2 is one
    letter = c.upload(study, serve_trial / trial_manifest(serve_trial).iloc[1]["file"], name="P001-X_W04.fcs")
    assert letter.status_code == 201, letter.text
    confirm_in_database(server, study, up.json()["id"], sample_id="S1", patient_id="P001", arm="IL2")
    confirm_in_database(server, study, letter.json()["id"], sample_id="S2", patient_id="P001", arm="X")

    for user in (vera, c):
        shown = "\n".join(
            user.get(p).text
            for p in ("/api/audit?limit=5000", "/audit", "/api/audit/export", "/api/audit/export?format=json",
                      f"/studies/{study}", f"/api/studies/{study}", f"/api/studies/{study}/mapping")
        )  # fmt: skip
        leaks = [ln for ln in shown.splitlines() if "P001_IL2" in ln or "/IL2/" in ln or "P001-X" in ln]
        assert not leaks, leaks[:3]
        assert "P001_[arm]_W00.fcs" in shown and "lab/[arm]/P001_[arm]_W00.fcs" in shown
        assert "P001-[arm]_W04.fcs" in shown
    entries = {
        e["action"]: e for e in vera.get("/api/audit?limit=5000").json() if e["object_id"] == str(study)
    }
    assert entries["study.create"]["after"]["arms"] == []  # the arm list itself is shown by design
    stored = cli("audit", "export", *_db(server), "--format", "json")
    assert (
        stored.returncode == 0 and "P001_IL2" not in stored.stdout and "P001_[arm]_W00.fcs" in stored.stdout
    )
    file_entry = next(
        e
        for e in json.loads(stored.stdout)
        if e["after"].get("original_name") == "lab/[arm]/P001_[arm]_W00.fcs"
    )
    assert file_entry["hash"].startswith("hmac-sha256:"), file_entry  # the masked name cannot be tried

    # the stored rows are as written: the chain verifies; an administrator's unblinded export shows them
    proc = cli("audit", "verify", *_db(server))
    assert proc.returncode == 0 and "chain intact" in proc.stdout, proc.stderr
    assert vera.get("/api/audit/verify").json()["ok"]
    proc = cli("audit", "export", *_db(server), "--format", "json", "--unblind", "--user", "admin",
               "--reason", "test", input=PASSWORD + "\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plain = next(e for e in json.loads(proc.stdout) if e["id"] == file_entry["id"])
    assert plain["after"]["name"] == "P001_IL2_W00.fcs" and len(plain["hash"]) == 64


def _with_keywords(source, path, **keywords: str):
    """A copy of the FCS file ``source`` at ``path`` with ``keywords`` set (a real file, read back)."""
    from cytopipe.fcs import read_fcs, write_fcs

    sample = read_fcs(source)
    kept = {k: v for k, v in sample.keywords.items() if not k.startswith("$") or k in ("$FIL", "$SRC")}
    path = write_fcs(path, np.asarray(sample.events), sample.channels, keywords={**kept, **keywords})
    assert {k: read_fcs(path).keywords.get(k) for k in keywords} == keywords
    return path


def test_a_proposal_whose_ids_show_an_arm_is_not_shown_beside_its_code(server, serve_trial, tmp_path):
    """The mapping proposes ids its confirmation refuses: ``P01A_W00`` (the file ``P01A_W00.fcs``,
    the arm ``A`` from the pattern ``{patient}{arm}_W{visit}.fcs``: a letter glued to digits that
    only arm A's ids carry there) and ids from an FCS file's keywords (``$FIL``, ``SAMPLE_ID``
    naming the arm ``IL2``) that the file's name does not show. Before, each was shown beside its
    arm's code until a confirmation was tried; now its arm shows as ``(blinded)`` and an arm's
    name in its ids as ``[arm]``; the confirmation still refuses them."""
    c, vera = server.client(), server.client("vera")
    rows = trial_manifest(serve_trial)
    study = _create(c, "glued letters, blinded", ["A", "B"]).json()["id"]
    for i, (name, arm) in enumerate([("P01A_W00.fcs", "A"), ("P02B_W00.fcs", "B")]):  # the arm: keyword ARM
        path = _with_keywords(serve_trial / rows.iloc[i]["file"], tmp_path / name, ARM=arm)
        assert c.upload(study, path).status_code == 201
    mapping = vera.get(f"/api/studies/{study}/mapping").json()
    assert [(m["name"], m["patient_id"], m["arm"]) for m in mapping] == [
        ("P01A_W00.fcs", "P01A", "(blinded)"),
        ("P02B_W00.fcs", "P02B", "(blinded)"),
    ]
    page = vera.get(f"/studies/{study}").text
    assert 'name="arm" value="(blinded)"' in page and 'name="arm" value="Arm' not in page
    confirmed = [dict(m, arm="A" if "A_" in m["name"] else "B", visit=0) for m in mapping]
    r = c.post(f"/api/studies/{study}/mapping", json={"rows": confirmed}, headers=c.h)
    assert r.status_code == 400 and "patient_id 'P01A'" in r.text, r.text

    # FCS keywords: the file's name shows no arm, its $FIL and SAMPLE_ID do (the proposal's ids)
    path = _with_keywords(serve_trial / rows.iloc[2]["file"], tmp_path / "k.fcs", **{
        "$FIL": "P03_IL2_W00.fcs", "$SRC": "P03_IL2_W00", "SAMPLE_ID": "P03_IL2_W00"})  # fmt: skip
    study = _create(c, "keywords, blinded", ["IL2", "PBO"]).json()["id"]
    r = c.upload(study, path, name="upload1.fcs")
    assert r.status_code == 201, r.text
    assert (
        _put_table(c, study, "clinical", "patient_id,visit,arm\nP03_IL2,0,IL2\nP04,0,PBO\n").status_code
        == 400
    )
    (proposal,) = vera.get(f"/api/studies/{study}/mapping").json()
    assert (proposal["sample_id"], proposal["patient_id"]) == ("P03_[arm]_W00", "P03_[arm]"), proposal
    shown = vera.get(f"/studies/{study}").text + vera.get(f"/api/studies/{study}/mapping").text
    assert "P03_IL2" not in shown and "P03_[arm]_W00" in shown
    typed = dict(proposal, sample_id="P03_IL2_W00", patient_id="P03_IL2", arm="IL2", visit=0)  # the keywords'
    r = c.post(f"/api/studies/{study}/mapping", json={"rows": [typed]}, headers=c.h)
    assert r.status_code == 400 and "(sample_id 'P03_IL2_W00'" in r.text, r.text


def test_a_study_name_that_shows_an_arm_is_refused_as_file_names_are(server, serve_trial):
    """A blinded study's runs write its name in their report's title, coded there (``Arm B trial``
    for ``IL2 trial``), and its pages show it: a name that shows one of its arms is refused when
    the study is created, when its arms come (a table) and at run start, 400, nothing stored and
    no audit entry. The template's file name (the default ``sle_il2_tcell_nk.yaml`` beside an arm
    ``IL2``) reaches no run and is taken."""
    c = server.client()
    r = _create(c, "IL2 trial", ["IL2", "PBO"])
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("the study was not created: ") and "study's name 'IL2 trial'" in detail, detail
    assert "'IL2'" not in detail and "create the study under a name" in detail
    assert "IL2 trial" not in [s["name"] for s in c.get("/api/studies").json()]
    assert _create(c, "SLE trial, blinded", ["IL2", "PBO"]).status_code == 201  # sle_il2_tcell_nk.yaml

    study = _create(c, "PBO trial", []).json()["id"]
    r = _put_table(c, study, "clinical", "patient_id,visit,arm\nP001,0,IL2\nP002,0,PBO\n")
    assert r.status_code == 400 and "the clinical table was not saved: " in r.text and "'PBO trial'" in r.text
    assert "study.clinical" not in _actions(c, study) and "study.arm_codes" not in _actions(c, study)

    row = trial_manifest(serve_trial).iloc[5]  # a study set up before (an older version): no run starts
    up = c.upload(study, serve_trial / row["file"])
    assert up.status_code == 201, up.text
    confirm_in_database(
        server, study, up.json()["id"], sample_id=row["sample_id"], patient_id="P9", arm="PBO"
    )
    r = c.post(f"/api/studies/{study}/runs", headers=c.h)
    assert r.status_code == 400 and r.json()["detail"].startswith("the run was not started: "), r.text
    assert "'PBO trial'" in r.text and c.get(f"/api/studies/{study}").json()["runs"] == []
    assert "run.start" not in _actions(c, study)


def test_a_run_start_refuses_arms_named_by_numbers_as_the_entry_does(server, serve_trial):
    """Arms named by numbers are refused at entry (study, table, mapping); a study set up before
    (an older version confirmed arm ``1``) now starts no run either (400, no run, no audit
    entry), where before the run started and stopped at once, or coded digits everywhere."""
    c = server.client()
    study = _create(c, "numbers set up before, blinded", []).json()["id"]
    row = trial_manifest(serve_trial).iloc[6]
    up = c.upload(study, serve_trial / row["file"])
    assert up.status_code == 201, up.text
    confirm_in_database(server, study, up.json()["id"], sample_id=row["sample_id"], patient_id="P9", arm="1")
    r = c.post(f"/api/studies/{study}/runs", headers=c.h)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("the run was not started: the arm(s) '1' are named by numbers"), (
        r.text
    )
    assert c.get(f"/api/studies/{study}").json()["runs"] == [] and "run.start" not in _actions(c, study)


def test_an_upload_whose_arm_became_known_while_it_streamed_is_refused(server, serve_trial):
    """The name of an FCS file is checked before its bytes are received; a clinical table saved
    while the file streams (a large file takes minutes) made its arm known. Before, the file was
    then stored under its name (``P001_HD_W00.fcs`` beside an arm ``HD``); now the name is checked
    again once the file is received, before it is stored: 400, no upload, no audit entry."""
    import threading
    import time

    c = server.client()
    study = _create(c, "streamed, blinded", []).json()["id"]
    data = (serve_trial / trial_manifest(serve_trial).iloc[7]["file"]).read_bytes()
    table_saved = threading.Event()

    def body():
        yield data[:4096]
        assert table_saved.wait(60)
        yield data[4096:]

    answer: dict = {}
    sender = threading.Thread(target=lambda: answer.update(r=c.put(
        f"/api/studies/{study}/uploads", params={"name": "P001_HD_W00.fcs"}, content=body(), headers=c.h)))  # fmt: skip
    sender.start()
    time.sleep(1.0)  # the server has checked the name (no arm known yet) and is receiving
    other = server.client()
    r = _put_table(other, study, "clinical", "patient_id,visit,arm\nP001,0,HD\nP002,0,LD\n")
    assert r.status_code == 200, r.text
    table_saved.set()
    sender.join(60)
    r = answer["r"]
    assert r.status_code == 400, r.text
    assert (
        r.json()["detail"].startswith("the file 'P001_HD_W00.fcs' was not uploaded: ")
        and "'HD'" not in r.text
    )
    assert c.get(f"/api/studies/{study}").json()["uploads"] == []
    entries = c.get("/api/audit?limit=5000").json()
    assert not [
        e for e in entries if e["action"].startswith("upload.") and e["after"].get("study_id") == study
    ]
