"""The arm codes of a blinded study without an arm list stay what they were when a later upload
brings new arms, with a real `cytopipe serve` subprocess (SQLite, and PostgreSQL where .ci/run
starts one) and real uploads of the small simulated trial's files.

Before, the codes were derived from the set of arms each time they were shown (a permutation of
the letters over the sorted arms), so a new arm could move the codes: a reviewer's "Arm B" then
meant another arm, and the move itself told something. The workspace's secret is chosen here so
that the old derivation does move an existing arm's code (checked below), so the test fails on it.
Now each code is stored the first time its arm is seen (table ``arm_codes``, audited as
``study.arm_codes`` with the codes only) and never changes; the table refuses changes.
"""

from __future__ import annotations

import hashlib
import json
import types

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tests import serve_support
from tests.serve_support import STUDY, Server, fresh_database, serving, trial_manifest

backend = serve_support.backend

FIRST = ("P002", "P003", "P005", "P006")  # placebo and IL-2 0.5 MIU; P001 and P004 bring two new arms


def _secret_that_moves_codes(study_id: int, before: set[str], after: set[str]) -> bytes:
    """A workspace secret for which the codes derived from the set of arms (the old way) give an
    arm of ``before`` another code once the arms are ``after``."""
    from cytopipe.serve.blinding import study_codes

    study = types.SimpleNamespace(id=study_id, arms=[])
    for i in range(256):
        secret = hashlib.sha256(b"moving codes %d" % i).digest()
        old, new = study_codes(study, secret, before), study_codes(study, secret, after)
        if any(old[a] != new[a] for a in before):
            return secret
    raise AssertionError("no secret moves the codes")


@pytest.fixture(scope="module")
def trial(serve_trial):
    manifest = trial_manifest(serve_trial)
    first = manifest[manifest["patient_id"].isin(FIRST)]
    later = manifest[~manifest["patient_id"].isin(FIRST)]
    assert set(later["arm"]).isdisjoint(set(first["arm"])) and len(set(later["arm"])) == 2
    return serve_trial, manifest, first, later


@pytest.fixture(scope="module")
def server(backend, trial, tmp_path_factory):
    _, manifest, first, _ = trial
    data = tmp_path_factory.mktemp(f"codes_{backend}") / "data"
    data.mkdir()
    secret = _secret_that_moves_codes(1, set(first["arm"]), set(manifest["arm"]))
    (data / "blinding.secret").write_bytes(secret)
    (data / "blinding.secret").chmod(0o600)
    with serving(data, backend) as srv:
        yield srv


def _codes(c, study: int) -> dict[str, str]:
    return {r["sample_id"]: r["arm"] for r in c.get(f"/api/studies/{study}/mapping").json() if r["confirmed"]}


def _upload_and_confirm(c, study: int, folder, rows) -> None:
    for f in rows["file"]:
        r = c.upload(study, folder / f)
        assert r.status_code == 201 and r.json()["status"] == "ok", r.text
    arms = rows.set_index("sample_id")["arm"]
    mapping = c.get(f"/api/studies/{study}/mapping").json()
    for row in mapping:
        if not row["confirmed"]:
            row["arm"] = arms[row["sample_id"]]  # the new ones by name; the confirmed ones come back coded
    r = c.post(f"/api/studies/{study}/mapping", json={"rows": mapping}, headers=c.h)
    assert r.status_code == 200, r.text


def test_a_new_arm_keeps_every_existing_code(server, trial):
    folder, manifest, first, later = trial
    c = server.client()
    r = c.post("/api/studies", json={"name": "blinded, no arm list", **STUDY, "blinded": True}, headers=c.h)
    assert r.status_code == 201 and r.json()["arms"] == [], r.text
    study = r.json()["id"]
    assert study == 1  # the secret was chosen for this study's id

    _upload_and_confirm(c, study, folder, first)
    codes = _codes(c, study)
    assert set(codes) == set(first["sample_id"])
    by_arm = {
        arm: {codes[s] for s in first.loc[first["arm"] == arm, "sample_id"]} for arm in set(first["arm"])
    }
    assert all(len(v) == 1 for v in by_arm.values()) and len({next(iter(v)) for v in by_arm.values()}) == 2
    before = {arm: next(iter(v)) for arm, v in by_arm.items()}

    # the second batch: two arms not seen before
    _upload_and_confirm(c, study, folder, later)
    now = _codes(c, study)
    assert {s: now[s] for s in codes} == codes  # every existing code kept
    new = {arm: {now[s] for s in later.loc[later["arm"] == arm, "sample_id"]} for arm in set(later["arm"])}
    assert all(len(v) == 1 for v in new.values())
    given = {next(iter(v)) for v in new.values()}
    assert len(given) == 2 and given.isdisjoint(before.values())
    assert set(now.values()) == {"Arm A", "Arm B", "Arm C", "Arm D"}

    # what the workspace shows names no arm: the mapping, the study, the audit trail
    shown = json.dumps([c.get(f"/api/studies/{study}/mapping").json(), c.get(f"/api/studies/{study}").json(),
                        c.get("/api/audit?limit=500").json()])  # fmt: skip
    for arm in manifest["arm"].unique():
        assert arm not in shown, arm
    entries = [e for e in c.get("/api/audit?limit=500").json() if e["action"] == "study.arm_codes"]
    assert [e["user"] for e in entries] == ["admin", "admin"]
    assert [sorted(x["code"] for x in e["after"]["codes"]) for e in reversed(entries)] == [
        sorted(before.values()),
        sorted(given),
    ]
    assert all(x["arm"] == x["code"] for e in entries for x in e["after"]["codes"])  # shown coded

    # a restart keeps them (nothing re-derived at start-up), and the database refuses to change them
    server.stop()
    server.start()
    c = server.client()
    assert _codes(c, study) == now
    from cytopipe.serve.db import database_url, make_engine

    engine = make_engine(database_url(server.database, server.data))
    try:
        with engine.connect() as con:
            stored = dict(con.execute(sa.text("SELECT arm, code FROM arm_codes WHERE study_id = 1")).all())
        assert stored == {**before, **{arm: next(iter(v)) for arm, v in new.items()}}
        for stmt in ("UPDATE arm_codes SET code = 'Arm Z'", "DELETE FROM arm_codes"):
            with pytest.raises(DBAPIError, match="never changed"), engine.begin() as con:
                con.execute(sa.text(stmt))
    finally:
        engine.dispose()


def test_migration_0005_keeps_the_codes_a_study_showed(backend, tmp_path):
    """A blinded study of a workspace at 0004 (confirmed samples of two arms): the server's start-up
    upgrades it and stores the codes it showed (derived from its arms, as before), audited as
    ``system``; a new arm afterwards gets another letter. The migration goes down and up again."""
    from sqlalchemy.orm import sessionmaker

    from cytopipe.serve.blinding import study_codes
    from cytopipe.serve.db import Sample, Study, Upload, database_url, make_engine
    from tests.test_review_templates import _alembic

    database, drop = fresh_database(backend)
    data = tmp_path / "data"
    data.mkdir()
    secret = _secret_that_moves_codes(1, {"placebo", "IL-2"}, {"placebo", "IL-2", "IL-2 high"})
    (data / "blinding.secret").write_bytes(secret)
    try:
        engine = make_engine(database_url(database, data))
        _alembic(engine, "upgrade", "0004")
        with sessionmaker(engine)() as db:
            db.add(Study(id=1, name="old", arms=[], visits=[0], settings={"blinded": True}, created_by="ann"))
            db.flush()
            for i, arm in enumerate(["placebo", "IL-2", "IL-2", "placebo"], 1):
                db.add(Upload(id=i, study_id=1, sha256=f"{i:064x}", name=f"P{i}_W0.fcs", size=1, status="ok",
                              uploaded_by="ann"))  # fmt: skip
                db.flush()
                db.add(Sample(study_id=1, upload_id=i, sample_id=f"P{i}_W0", patient_id=f"P{i}", visit=0, arm=arm,
                              confirmed_by="ann"))  # fmt: skip
            db.commit()
        engine.dispose()
        shown = study_codes(types.SimpleNamespace(id=1, arms=[]), secret, {"placebo", "IL-2"})  # as before

        srv = Server(data, database).start(create_admin="admin")
        try:
            c = srv.client()
            assert _codes(c, 1) == {
                f"P{i}_W0": shown[a] for i, a in enumerate(["placebo", "IL-2", "IL-2", "placebo"], 1)
            }
            (entry,) = [e for e in c.get("/api/audit?limit=500").json() if e["action"] == "study.arm_codes"]
            assert entry["user"] == "system" and sorted(x["code"] for x in entry["after"]["codes"]) == [
                "Arm A",
                "Arm B",
            ]
        finally:
            srv.stop()
        engine = make_engine(database_url(database, data))
        with engine.connect() as con:
            assert dict(con.execute(sa.text("SELECT arm, code FROM arm_codes")).all()) == shown
        with sessionmaker(engine)() as db:  # a new arm (as a confirmed mapping adds it)
            from cytopipe.serve.blinding import assign_codes, codes_of
            from cytopipe.serve.storage import BlobStore

            db.add(
                Upload(
                    id=5,
                    study_id=1,
                    sha256=f"{5:064x}",
                    name="P5_W0.fcs",
                    size=1,
                    status="ok",
                    uploaded_by="ann",
                )
            )
            db.flush()
            db.add(Sample(study_id=1, upload_id=5, sample_id="P5_W0", patient_id="P5", visit=0, arm="IL-2 high",
                          confirmed_by="ann"))  # fmt: skip
            db.flush()
            study, store = db.get(Study, 1), BlobStore(data)
            assert assign_codes(db, store, study, secret, "ann") == {"IL-2 high": "Arm C"}
            db.commit()
            assert codes_of(db, store, study, secret) == {**shown, "IL-2 high": "Arm C"}
        _alembic(engine, "downgrade", "0004")
        with engine.connect() as con:
            assert "arm_codes" not in sa.inspect(con).get_table_names()
        _alembic(engine, "upgrade", "head")
        with engine.connect() as con:
            assert con.execute(sa.text("SELECT count(*) FROM arm_codes")).scalar() == 0
        engine.dispose()
    finally:
        drop()


def test_a_later_arm_never_gets_a_code_that_shows_its_name():
    """An arm of the data outside the study's arm list, or one that arrives after codes were
    stored, gets the next free letter, but never one that shows an arm's name as the leak check
    reads it: an arm named ``D`` would otherwise be coded ``Arm D`` (before: it was)."""
    from cytopipe.report.blinding import find_leaks
    from cytopipe.serve.blinding import new_codes, study_codes

    secret = b"s" * 32
    listed = types.SimpleNamespace(id=1, arms=["placebo", "IL-2 low", "IL-2 high"])
    codes = study_codes(listed, secret, ["placebo", "IL-2 low", "IL-2 high", "D"])
    assert sorted(codes.values())[:3] == ["Arm A", "Arm B", "Arm C"]
    assert codes["D"] == "Arm E"
    stored = {"placebo": "Arm A", "IL-2 low": "Arm B", "IL-2 high": "Arm C"}
    later = new_codes(types.SimpleNamespace(id=1, arms=[]), secret, ["D"], stored)
    assert later == {"D": "Arm E"}
    for given in (codes, {**stored, **later}):
        assert not find_leaks({"codes": " ".join(given.values())}, given), given


def test_a_blinded_study_refuses_arms_named_by_numbers_and_ids_carrying_a_one_letter_arm(server, trial):
    """What a blinded study's runs would refuse (cytopipe/report/armcheck.py) is refused when it is
    entered: arms named by numbers when the study is created or mapped, ids carrying a one-letter
    arm when mapped. An unblinded study may name its arms by numbers."""
    folder, _, first, _ = trial
    c = server.client()
    numbered = {**STUDY, "arms": ["1", "2"]}
    r = c.post("/api/studies", json={"name": "numbered, blinded", **numbered, "blinded": True}, headers=c.h)
    assert r.status_code == 400 and "'1', '2' are named by numbers" in r.text, r.text
    assert c.post("/api/studies", json={"name": "numbered", **numbered}, headers=c.h).status_code == 201

    r = c.post(
        "/api/studies", json={"name": "arms from the data, blinded", **STUDY, "blinded": True}, headers=c.h
    )
    study = r.json()["id"]
    row = first.iloc[0]
    assert c.upload(study, folder / row["file"]).status_code == 201
    (mapped,) = c.get(f"/api/studies/{study}/mapping").json()
    for arm, patient, said in (("2", row["patient_id"], "'2' are named by numbers"),
                               ("A", f"{row['patient_id']}-A", f"patient_id '{row['patient_id']}-A'")):  # fmt: skip
        rows = [dict(mapped, arm=arm, patient_id=patient)]
        r = c.post(f"/api/studies/{study}/mapping", json={"rows": rows}, headers=c.h)
        assert r.status_code == 400 and said in r.text, r.text
        assert not any(m["confirmed"] for m in c.get(f"/api/studies/{study}/mapping").json())
    rows = [dict(mapped, arm="A", patient_id=row["patient_id"])]
    assert c.post(f"/api/studies/{study}/mapping", json={"rows": rows}, headers=c.h).status_code == 200


def _put_clinical(c, study: int, rows: list[tuple[str, str]], name: str = "clinical.csv"):
    text = "patient_id,visit,arm\n" + "".join(f"{patient},0,{arm}\n" for patient, arm in rows)
    return c.put(
        f"/api/studies/{study}/tables/clinical", params={"name": name}, content=text.encode(), headers=c.h
    )


@serve_support.POSTGRESQL_SLOW
def test_a_blinded_study_refuses_a_clinical_table_its_runs_would_refuse(server, trial):
    """A blinded study whose arms come from its clinical table alone: the table is refused (400,
    nothing stored or audited) when its runs would refuse it (their input: cytopipe/report/armcheck.py),
    arms named by numbers or ids carrying a one-letter arm. Before, it was stored (200), and every
    run of the study stopped at once (exit 2: `the arm(s) '1', '2' are named by numbers`)."""
    c = server.client()
    study = c.post("/api/studies", json={"name": "arms from the clinical table, blinded", **STUDY, "blinded": True},
                   headers=c.h).json()["id"]  # fmt: skip
    plain = c.post(
        "/api/studies", json={"name": "arms from the clinical table", **STUDY}, headers=c.h
    ).json()["id"]
    refused = [
        ([("P001", "1"), ("P002", "2"), ("P003", "1")], "the arm(s) '1', '2' are named by numbers"),
        ([("P001", "0"), ("P002", "10"), ("P003", "2.5")], "the arm(s) '0', '10', '2.5' are named by numbers"),
        ([("P001-A", "A"), ("P002", "B")], "(patient_id 'P001-A')"),
        ([("P001A", "A"), ("P002B", "B"), ("P003A", "A")], "(patient_id 'P001A', patient_id 'P002B', patient_id 'P003A')"),
        ([("A001", "A"), ("B002", "B"), ("A003", "A"), ("B004", "B")], "patient_id 'A003' and 1 more)"),
    ]  # fmt: skip
    for rows, said in refused:
        r = _put_clinical(c, study, rows)
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith("the clinical table was not saved: ") and said in r.text, r.text
        assert _put_clinical(c, plain, rows).status_code == 200  # an unblinded study may have them
    assert c.get(f"/api/studies/{study}").json()["clinical"] is None
    entries = c.get("/api/audit?limit=500").json()
    assert not [e for e in entries if e["action"] == "study.clinical" and e["object_id"] == str(study)]

    # left alone: the P of every patient of arms P and R (not T: the template's 'T cells' show it,
    # tests/test_serve_blind_names.py)
    r = _put_clinical(c, study, [("P001", "P"), ("P002", "R"), ("P003", "P")], name="ok.csv")
    assert r.status_code == 200, r.text
    assert c.get(f"/api/studies/{study}").json()["clinical"] == "ok.csv"

    # a mapping is checked with the clinical table's arms too, as its runs are (was: saved, as its
    # own arm is no letter; its runs refused the patient P002-R of the clinical table's arm R)
    folder, _, first, _ = trial
    row = first.iloc[0]
    assert c.upload(study, folder / row["file"]).status_code == 201
    (mapped,) = c.get(f"/api/studies/{study}/mapping").json()
    rows = [dict(mapped, arm="TRT", patient_id=f"{row['patient_id']}-R")]
    r = c.post(f"/api/studies/{study}/mapping", json={"rows": rows}, headers=c.h)
    assert r.status_code == 400 and f"(patient_id '{row['patient_id']}-R'" in r.text, r.text
    assert not any(m["confirmed"] for m in c.get(f"/api/studies/{study}/mapping").json())
