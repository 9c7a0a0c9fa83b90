"""The audit trail of a blinded study cannot be brute-forced by a web user: the hash of a stored
entry (and of every later one, which covers it) is the SHA-256 of a row holding the arm names, and
an uploaded clinical table's SHA-256 is that of a file whose every column but the arm is known.
So from the first such entry on the hashes are shown keyed with the workspace's secret, and the
tables' hashes too; the chain is verified on the server. Against a real server (SQLite and
PostgreSQL), every role, every view: /api/audit, its CSV and JSON export, the /audit page and
/api/audit/verify."""

from __future__ import annotations

import itertools
import json

from cytopipe.serve.audit import canonical, row_hash
from tests import serve_support
from tests.blinding_support import candidate_digests, matches
from tests.pipeline_support import cli
from tests.serve_support import PASSWORD, STUDY, trial_files, trial_manifest

backend = serve_support.backend
server = serve_support.server  # SERVE_USERS / SERVE_ARGS: its accounts and options
SERVE_USERS = {"ana": "analyst", "vic": "viewer", "rev": "reviewer"}
ROLES = ("vic", "ana", "rev", "admin")


def _shown(client) -> tuple[list[dict], str]:
    """The entries /api/audit gives, and everything the user can read of the audit trail."""
    entries = client.get("/api/audit", params={"limit": 5000}).json()
    parts = [json.dumps(entries), client.get("/api/audit/export").text,
             client.get("/api/audit/export", params={"format": "json"}).text, client.get("/audit").text,
             json.dumps(client.get("/api/audit/verify").json())]  # fmt: skip
    return entries, "\n".join(parts)


def _stored(entry: dict, before: object, after: object, prev: str) -> str:
    """The row hash of ``entry`` with its before/after (and predecessor's hash) put back."""
    row = {k: entry[k] for k in ("id", "at", "action", "object_type", "object_id", "reason")}
    return row_hash({**row, "user_name": entry["user"], "before": canonical(before), "after": canonical(after),
                     "prev_hash": prev})  # fmt: skip


def _attack(entries: list[dict], arms: list[str], clinical_digests: dict[str, bool]) -> list[str]:
    """Candidate hashes of the stored rows of the blinded study's mapping and clinical-table entries
    (every assignment of the arm list to the codes, every clinical table), and of the entry after
    each (whose hash covers its predecessor's), that appear in what the user reads."""
    by_id = {e["id"]: e for e in entries}
    candidates: dict[int, set[str]] = {}
    for e in entries:
        prev = e["prev_hash"] if len(e["prev_hash"]) == 64 else None
        if prev is None:
            continue  # the predecessor's stored hash is not shown: nothing to start from
        if e["action"] == "mapping.confirm":
            codes = sorted({r["arm"] for r in e["after"]["rows"]})
            for perm in itertools.permutations(arms, len(codes)):
                names = dict(zip(codes, perm))
                after = {**e["after"], "rows": [{**r, "arm": names[r["arm"]]} for r in e["after"]["rows"]]}
                candidates.setdefault(e["id"], set()).add(_stored(e, e["before"], after, prev))
        elif e["action"] == "study.clinical":
            for digest in clinical_digests:
                after = {**e["after"], "sha256": digest}
                candidates.setdefault(e["id"], set()).add(_stored(e, e["before"], after, prev))
    for eid, hashes in list(candidates.items()):
        nxt = by_id.get(eid + 1)
        if nxt is not None:
            candidates[eid] |= {_stored(nxt, nxt["before"], nxt["after"], h) for h in hashes}
    return [h for hs in candidates.values() for h in hs]


def test_a_blinded_studys_audit_hashes_cannot_be_tried_against_its_arms(server, serve_trial):
    truth = trial_manifest(serve_trial)
    arms = sorted(set(truth["arm"]))  # the study's arm list: shown to everyone by design
    ana = server.client("ana")
    body = {"name": "blinded audit", "arms": arms, "blinded": True, **STUDY}
    sid = ana.post("/api/studies", json=body, headers=ana.h).json()["id"]
    for f in trial_files(serve_trial)[:4]:
        assert ana.upload(sid, f).status_code in (200, 201)
    clinical = serve_trial / "clinical.csv"
    r = ana.put(f"/api/studies/{sid}/tables/clinical", params={"name": "clinical.csv"},
                content=clinical.read_bytes(), headers=ana.h)  # fmt: skip
    assert r.status_code == 200, r.text
    rows = ana.get(f"/api/studies/{sid}/mapping").json()
    assert ana.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=ana.h).status_code == 200
    # an entry after them that names no arm (its hash covers theirs)
    assert (
        ana.post("/api/studies", json={"name": "after", "arms": arms, **STUDY}, headers=ana.h).status_code
        == 201
    )

    digests = candidate_digests(clinical, arms)
    for user in ROLES:
        entries, shown = _shown(server.client(user))
        assert not [a for a in arms if a.lower() in json.dumps([e["after"] for e in entries
                                                                 if e["action"] == "mapping.confirm"]).lower()]  # fmt: skip
        assert matches(digests, shown) == [], f"{user}: the clinical table's SHA-256 is shown"
        assert matches(dict.fromkeys(_attack(entries, arms, digests), False), shown) == [], user
        table = next(e for e in entries if e["action"] == "study.clinical" and e["object_id"] == str(sid))
        assert table["after"]["sha256"].startswith("hmac-sha256:") and table["hash"].startswith(
            "hmac-sha256:"
        )
        # the chain still links as shown; the entries before the first coded one keep their hashes
        ordered = sorted(entries, key=lambda e: e["id"])
        assert all(a["hash"] == b["prev_hash"] for a, b in zip(ordered, ordered[1:]))
        first = ordered[0]
        assert len(first["hash"]) == 64 and first["hash"] == _stored(first, first["before"], first["after"],
                                                                     first["prev_hash"])  # fmt: skip
    # ... while the attack finds the arms in the stored rows' hashes (the check checks)
    admin = server.client()
    stored_entries = []
    db = ["--data", str(server.data)] + (["--database", server.database] if server.database else [])
    proc = cli("audit", "export", *db, "--format", "json", "--unblind", "--user", "admin", "--reason", "test",
               input=PASSWORD + "\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored_entries = json.loads(proc.stdout)
    coded = {e["id"]: e for e in admin.get("/api/audit", params={"limit": 5000}).json()}
    plain = [{**e, "after": coded[e["id"]]["after"], "prev_hash": e["prev_hash"]} for e in stored_entries
             if e["id"] in coded and e["action"] == "mapping.confirm"]  # fmt: skip
    assert matches(dict.fromkeys(_attack(plain, arms, {}), False), json.dumps(stored_entries))
    assert matches(digests, json.dumps(stored_entries))
    # the chain is intact, verified on the server by an administrator
    proc = cli("audit", "verify", *db)
    assert proc.returncode == 0 and "chain intact" in proc.stdout, proc.stderr
    assert admin.get("/api/audit/verify").json()["ok"]
