"""Blinded studies in the workspace: who sees arm names, and arm names coded on the way out.

A study created with ``blinded: true`` shows no arm name to anyone, whatever the role (no role of
the workspace is unblinded): the mapping (``GET /api/studies/{id}/mapping`` and the study page),
the audit trail (``/api/audit``, its export, the ``/audit`` page and ``cytopipe audit export``),
the run's log and error, and every file of its runs show each arm as its code (``Arm A``, ``Arm
B``, ...: :func:`cytopipe.report.blinding.arm_codes`, seeded by a secret kept in the data folder,
so the codes cannot be worked out from the study). The codes are those of the study's arm list,
or, without one, of the arms its data name (confirmed samples, clinical table, manifest); each is
stored the first time its arm is seen (:func:`assign_codes`, table ``arm_codes``) and never
changes: a new arm in a later upload gets a letter no arm has, never another arm's code. Runs
get the same codes as their blinding key, so the report and the tables agree with the pages. A
run folder of a blinded study that was not written blinded is refused (403).

The stored rows keep the arm names (the audit hashes cover what was written), so the audit trail
shows its hashes keyed from the first coded entry on (:func:`blind_audit`); a confirmed mapping
that comes back with codes is decoded before it is stored.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import random
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from cytopipe.errors import ReportError
from cytopipe.report.blinding import _letter, any_case, arm_codes, blind_text, folder_record
from cytopipe.serve.auth import AuthError
from cytopipe.serve.db import ArmCode, Batch, Run, Sample, Study, Upload
from cytopipe.serve.storage import BlobStore, read_table_rows

HIDDEN = "(blinded)"  # an arm that has no code (not one the study or its data names)
SECRET_FILE = "blinding.secret"


def arms_visible(study: Any) -> bool:
    """Whether arm names may be shown for this study (the same answer for every role)."""
    return not bool((study.settings or {}).get("blinded"))


def workspace_secret(data_dir: Path) -> bytes:
    """The workspace's blinding secret (created once, readable by the server's user only)."""
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        try:
            with open(path, "xb", opener=lambda p, f: os.open(p, f, 0o600)) as fh:
                fh.write(secrets.token_bytes(32))
        except FileExistsError:
            pass  # another process created it first
    return path.read_bytes()


def read_secret(data_dir: Path) -> bytes | None:
    """The workspace's blinding secret, or ``None`` when the folder has none (never created here)."""
    path = Path(data_dir) / SECRET_FILE
    return path.read_bytes() if path.is_file() else None


def table_arms(store: BlobStore, sha256: str | None) -> set[str]:
    """The arms an uploaded table (clinical table or manifest) names."""
    if not sha256:
        return set()
    try:
        rows = read_table_rows(store.path(sha256).read_bytes())
    except (OSError, ValueError):  # a missing blob: its arms are not known (shown hidden)
        return set()
    return {r["arm"] for r in rows if r.get("arm")}


def data_arms(db: DBSession, store: BlobStore, study: Study) -> list[str]:
    """The arms the study's data name: its confirmed samples, clinical table and manifest."""
    arms = {s for s in db.scalars(select(Sample.arm).where(Sample.study_id == study.id)) if s}
    return sorted(arms | table_arms(store, study.clinical_sha256) | table_arms(store, study.manifest_sha256))


def every_arm(db: DBSession, store: BlobStore, study: Study, more: Iterable[Any] = ()) -> list[str]:
    """Every arm the study codes (its list, its data's: :func:`data_arms`, those given codes
    before) and ``more``: the arms its blinding checks and masks look for."""
    arms = [*(study.arms or []), *more, *data_arms(db, store, study), *stored_codes(db, study.id)]
    return list(dict.fromkeys(str(a) for a in arms if a is not None and str(a).strip()))


def study_codes(study: Study, secret: bytes, arms: Iterable[str] = ()) -> dict[str, str]:
    """``{arm: code}`` of a blinded study: the codes of its arm list, or, without one, of the arms
    of its data (``arms``: :func:`data_arms`), derived the same way. With an arm list, an arm of
    the data outside it gets one of the letters after the list's."""
    seed = secret + b"\0study\0" + str(study.id).encode()
    listed = [str(a) for a in study.arms or []]
    codes = arm_codes(listed or list(arms), secret=seed)
    extra = sorted({str(a) for a in arms if a} - set(codes))
    if extra:  # a permutation of the next letters, seeded like arm_codes'
        letters = _unused_codes(len(extra), set(codes.values()), [*codes, *extra])
        rng = random.Random(int.from_bytes(hashlib.sha256(b"cytopipe-extra\0" + seed).digest()[:8], "big"))
        rng.shuffle(letters)
        codes.update(dict(zip(extra, letters)))
    return codes


def _unused_codes(n: int, used: set[str], arms: Iterable[str]) -> list[str]:
    """The first ``n`` codes ``Arm A``, ``Arm B``, ... that no arm has (``used``) and that show no
    arm's name as the leak check reads it (an arm named ``D`` never gets ``Arm D``); then ``Arm 1``,
    ... and ``Group 1``, ... when the letters run out that way (an arm named ``Arm``)."""
    shown = any_case(arms)  # no code shows an arm's letter in any case (no Arm A for an arm a)
    found: list[str] = []
    limit = len(used) + n + 26
    for scheme in (lambda i: f"Arm {_letter(i)}", lambda i: f"Arm {i + 1}", lambda i: f"Group {i + 1}"):
        for i in range(limit):
            code = scheme(i)
            if len(found) < n and code not in used and code not in found and not shown.search(code):
                found.append(code)
    if len(found) < n:
        raise ReportError(
            "no neutral code is left for the study's arms (their names show in 'Arm A', 'Arm 1' and "
            "'Group 1' alike); rename the arms in the manifest"
        )
    return found


def stored_codes(db: DBSession, study_id: int) -> dict[str, str]:
    """``{arm: code}`` given so far to the arms of a study (:func:`assign_codes`)."""
    return dict(db.execute(select(ArmCode.arm, ArmCode.code).where(ArmCode.study_id == study_id)).all())


def new_codes(study: Study, secret: bytes, arms: Iterable[str], stored: dict[str, str]) -> dict[str, str]:
    """Codes for the arms (``arms``: :func:`data_arms`, and the study's arm list) that have none
    in ``stored``. The first time (nothing stored) the codes are :func:`study_codes`' (those a study
    showed before its codes were stored); later an arm gets one of the letters no arm of the study
    has, never another arm's code, so the codes already given never move."""
    arms = {str(a) for a in [*(study.arms or []), *arms] if a}
    new = sorted(arms - set(stored))
    if not new:
        return {}
    if not stored:
        return study_codes(study, secret, arms)
    # the first letters no arm has (and that show no arm), in an order seeded by the secret
    letters = _unused_codes(len(new), set(stored.values()), [*arms, *stored])
    seed = secret + b"\0study\0" + str(study.id).encode() + b"\0" + str(len(stored)).encode()
    random.Random(int.from_bytes(hashlib.sha256(b"cytopipe-new-arms\0" + seed).digest()[:8], "big")).shuffle(
        letters
    )
    return dict(zip(new, letters))


def codes_of(db: DBSession, store: BlobStore, study: Study, secret: bytes) -> dict[str, str]:
    """``{arm: code}`` of a blinded study (``{}`` when its arms are visible): the stored codes, and
    for an arm of its data not yet stored (none is, after :func:`assign_codes`) the code it would get."""
    if arms_visible(study):
        return {}
    stored = stored_codes(db, study.id)
    return {**stored, **new_codes(study, secret, data_arms(db, store, study), stored)}


def assign_codes(db: DBSession, store: BlobStore, study: Study, secret: bytes, user: str) -> dict[str, str]:
    """Store a code for each arm of a blinded study's data (and arm list) that has none yet, in
    the caller's transaction, with an audit entry (``study.arm_codes``: shown with the codes only);
    called wherever arms enter a study (mapping, clinical table, manifest, run start). Returns the
    codes given now."""
    if arms_visible(study):
        return {}
    db.execute(select(Study).where(Study.id == study.id).with_for_update())  # one assignment at a time
    given = new_codes(study, secret, data_arms(db, store, study), stored_codes(db, study.id))
    if given:
        from cytopipe.serve import audit

        entry = audit.record(db, user, "study.arm_codes", "study", study.id, None,
                             {"codes": [{"arm": a, "code": c} for a, c in sorted(given.items())]},
                             "codes of arms seen for the first time; a code never changes")  # fmt: skip
        db.add_all(
            ArmCode(study_id=study.id, arm=a, code=c, at=entry.at, audit_id=entry.id)
            for a, c in given.items()
        )
        db.flush()
    return given


def store_codes(sessions: Any, store: BlobStore, secret: bytes) -> None:
    """At start-up: every blinded study's codes stored (the codes it showed before they were
    stored, e.g. after the upgrade to migration 0005), so that no later arm can move them."""
    with sessions() as db:
        for study in db.scalars(select(Study)).all():
            if not arms_visible(study) and assign_codes(db, store, study, secret, "system"):
                db.commit()
        db.commit()


def write_run_key(path: Path, codes: dict[str, str]) -> None:
    """The blinding key of a run (``report.blind_key``, CSV ``arm,code``): the study's codes of the
    run's arms, so its tables and report show the codes the pages show (``cytopipe unblind RUN
    --key`` takes it). A random ``note`` makes the file's SHA-256, which run.json records,
    impossible to match by trying the few possible keys."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["arm", "code", "note"])
    for arm, code in sorted(codes.items()):
        writer.writerow([arm, code, secrets.token_hex(16)])
    path.write_text(buf.getvalue(), encoding="utf-8")


def code_arm(arm: Any, codes: dict[str, str]) -> Any:
    if arm is None or arm == "":
        return arm
    return codes.get(str(arm), HIDDEN)


def blind_mapping(rows: list[dict[str, Any]], study: Study, codes: dict[str, str]) -> list[dict[str, Any]]:
    """Mapping rows with each arm as its code when the study is blinded (``codes``: :func:`codes_of`)."""
    if arms_visible(study):
        return rows
    return [{**r, "arm": code_arm(r.get("arm"), codes)} for r in rows]


def unblind_mapping(
    rows: list[dict[str, Any]], study: Study, codes: dict[str, str], stored: dict[int, str]
) -> list[dict[str, Any]]:
    """Confirmed rows of a blinded study back to arm names: a code becomes its arm, the hidden
    marker keeps the arm already stored for that upload (``stored``: upload id -> arm); a hidden
    arm with nothing stored is refused (it would be stored as the arm)."""
    if arms_visible(study):
        return rows
    names = {code: arm for arm, code in codes.items()}
    out = []
    for r in rows:
        arm = " ".join(str(r.get("arm") or "").split())
        if arm in names:
            arm = names[arm]
        elif arm == HIDDEN:
            arm = stored.get(_int(r.get("upload_id")), "")
            if not arm:
                shown = ", ".join(sorted(names)) or "none yet: upload the clinical table or manifest"
                raise AuthError(400, f"the mapping was not saved: {r.get('sample_id') or r.get('upload_id')}: "
                                     f"the arm is {HIDDEN}; give its code ({shown})")  # fmt: skip
        out.append({**r, "arm": arm})
    return out


def blind_run(run: dict[str, Any], codes: dict[str, str]) -> dict[str, Any]:
    """A run's status (:func:`cytopipe.serve.ops.run_dict`, with ``progress``) with the arm names in
    its error and log replaced by codes (the pipeline's messages can quote the clinical table)."""
    if not codes:
        return run
    out = {**run, "error": blind_text(run["error"], codes) if run.get("error") else run.get("error")}
    if isinstance(run.get("progress"), dict):
        out["progress"] = {**run["progress"], "log": blind_text(run["progress"].get("log") or "", codes)}
    return out


def check_run_folder(study: Study, run_id: int, out: Path) -> None:
    """Refuse (403) the files and results of a blinded study's run whose folder was written with
    arm names (a run made before its runs were always blinded, or unblinded on the server)."""
    if arms_visible(study) or not (out / "run.json").is_file() or folder_record(out) is not None:
        return
    raise AuthError(
        403,
        f"run {run_id} of the blinded study {study.name!r} was written with arm names (it is not a blinded run "
        "folder), so its results and files are not shown; start a new run of the study (runs of a blinded "
        "study write arm codes)",
    )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _study_of(db: DBSession, object_type: str, object_id: str, cache: dict) -> int | None:
    key = (object_type, object_id)
    if key not in cache:
        oid, found = _int(object_id), None
        if oid is not None:
            if object_type == "study":
                found = oid
            elif object_type in ("run", "upload", "batch"):
                row = db.get({"run": Run, "upload": Upload, "batch": Batch}[object_type], oid)
                found = row.study_id if row is not None else None
        cache[key] = found
    return cache[key]


def _has_arm(value: Any) -> bool:
    if isinstance(value, dict):
        return "arm" in value or any(_has_arm(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_arm(v) for v in value)
    return False


def _code_arms(value: Any, codes: dict[str, str] | None) -> Any:
    """``value`` with every ``"arm"`` entry coded (``codes`` None: hidden)."""
    if isinstance(value, dict):
        return {k: (code_arm(v, codes or {}) if k == "arm" and isinstance(v, str) else _code_arms(v, codes))
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_code_arms(v, codes) for v in value]
    return value


#: the prefix of what a web user (and a coded export) sees of a hash the arms could be tried against
KEYED = "hmac-sha256:"
#: the uploaded tables' audit entries, whose SHA-256 is of a file that holds the arms
_TABLE_ACTIONS = ("study.clinical", "study.manifest")


def _keyed(value: Any, secret: bytes, what: bytes) -> Any:
    """``value`` (a hex digest) as an HMAC keyed with the workspace's secret: the same digest shows
    the same value, and nothing can be tried against it without the secret."""
    if not isinstance(value, str) or not value:
        return value
    return (
        KEYED
        + hmac.new(secret, b"cytopipe-audit-" + what + b"\0" + value.encode(), hashlib.sha256).hexdigest()
    )


class _AuditBlinder:
    """Codes audit entries (:func:`blind_audit`), remembering studies and codes."""

    def __init__(self, db: DBSession, secret: bytes, store: BlobStore):
        self.db, self.secret, self.store = db, secret, store
        self.studies = {s.id: s for s in db.scalars(select(Study))}
        self.blinded = {sid for sid, s in self.studies.items() if not arms_visible(s)}
        self.cache: dict = {}
        self.codes: dict[int, dict[str, str]] = {}
        self.owners: dict[tuple[str, str], int] | None = None
        self.masks: dict[int, Any] = {}

    def shown(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """The entry as shown when it carries a blinded study's arms (coded), the hash of a table
        that holds them (keyed) or, in its texts, an arm's name (masked: :meth:`_mask`);
        ``None``: shown as it is."""
        coded = self._coded(r)
        mask = self._mask(self._owner(r))
        if mask is None:
            return coded
        base = coded or r
        out = {**base, "before": _masked(base["before"], mask), "after": _masked(base["after"], mask),
               "reason": mask(base["reason"] or "", False)}  # fmt: skip
        return out if out != base else coded

    def _owner(self, r: dict[str, Any]) -> int | None:
        """The blinded study an entry is about (its study, upload, batch or run), else ``None``."""
        if not self.blinded:
            return None
        if self.owners is None:  # one query per kind, not one per entry
            self.owners = {("study", str(sid)): sid for sid in self.studies}
            for kind, model in (("upload", Upload), ("batch", Batch), ("run", Run)):
                self.owners.update(((kind, str(i)), sid) for i, sid in self.db.execute(
                    select(model.id, model.study_id).where(model.study_id.in_(self.blinded))))  # fmt: skip
        sid = self.owners.get((r["object_type"], str(r["object_id"])))
        return sid if sid in self.blinded else None

    def _mask(self, sid: int | None) -> Any:
        """``mask(text, ids)`` of a blinded study whose arms are known (:func:`every_arm`), else None:
        :func:`cytopipe.report.armcheck.masked`, the rules of its refusals at entry."""
        if sid is None:
            return None
        if sid not in self.masks:
            from cytopipe.report.armcheck import masker

            arms = self.arms(sid)
            self.masks[sid] = masker(arms) if arms else None
        return self.masks[sid]

    def arms(self, sid: int) -> list[str]:
        """:func:`every_arm` of a blinded study: those its codes are given for (read once)."""
        return list(self.study_codes(sid))

    def study_codes(self, sid: int) -> dict[str, str]:
        if sid not in self.codes:
            self.codes[sid] = codes_of(self.db, self.store, self.studies[sid], self.secret)
        return self.codes[sid]

    def _coded(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """The entry with a blinded study's arms coded and its tables' hashes keyed, else ``None``."""
        if r["action"] in _TABLE_ACTIONS and r["object_type"] == "study":
            if _int(r["object_id"]) not in self.blinded:
                return None

            def keyed(v: Any) -> Any:
                return (
                    {**v, "sha256": _keyed(v.get("sha256"), self.secret, b"file")}
                    if isinstance(v, dict)
                    else v
                )

            return {**r, "before": keyed(r["before"]), "after": keyed(r["after"])}
        if not (_has_arm(r["before"]) or _has_arm(r["after"])):
            return None
        sid = _study_of(self.db, r["object_type"], r["object_id"], self.cache)
        if sid is not None and sid not in self.blinded:
            return None
        table = self.study_codes(sid) if sid is not None else None
        return {**r, "before": _code_arms(r["before"], table), "after": _code_arms(r["after"], table)}

    def first_shown_coded(self) -> int | None:
        """The id of the first stored entry shown coded or masked: its hash and every later one
        (each covers its predecessor's) could be recomputed with the arms put back in. The entries
        looked at are those that name an arm or a table, or hold a word of a blinded study's arms
        (SQL, case-insensitive: a superset of what :meth:`shown` masks)."""
        from sqlalchemy import or_

        from cytopipe.serve.audit import as_dict
        from cytopipe.serve.db import Audit

        if not self.blinded:
            return None

        def first(*where: Any) -> int | None:
            for row in self.db.scalars(select(Audit).where(*where).order_by(Audit.id)):
                if self.shown(as_dict(row)) is not None:
                    return row.id
            return None

        coded = first(or_(Audit.action.in_(_TABLE_ACTIONS), Audit.before.contains('"arm"'),
                          Audit.after.contains('"arm"')))  # fmt: skip
        words = {a for sid in self.blinded for a in self.arms(sid)}
        if all(w.isascii() and '"' not in w and "\\" not in w for w in words):  # as stored (JSON, SQL's case)
            texts = [
                c.icontains(w, autoescape=True)
                for w in words
                for c in (Audit.before, Audit.after, Audit.reason)
            ]
        else:  # a name SQL may fold otherwise than Python: every entry is looked at
            texts = [Audit.id.isnot(None)]
        # only the entries before the first coded one: usually few (a study's arms come early)
        masked = first(or_(*texts), *([Audit.id < coded] if coded is not None else [])) if texts else None
        return min((i for i in (coded, masked) if i is not None), default=None)


#: keys of audit entries whose values are not texts to mask: the arm list (shown by design), arms
#: and codes (coded), hashes
_NOT_MASKED = frozenset({"arms", "arm", "code", "sha256", "hash", "prev_hash"})
#: keys whose values are ids or file names: masked by the id rules too (a one-letter arm part)
_ID_KEYS = frozenset(
    {"name", "original_name", "files", "file", "sample_id", "patient_id", "study", "anndata"}
)


def _masked(value: Any, mask: Any, ids: bool = False) -> Any:
    """``value`` (an audit entry's before / after) with ``mask`` applied to its texts."""
    if isinstance(value, dict):
        return {k: v if k in _NOT_MASKED else _masked(v, mask, k in _ID_KEYS) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, mask, ids) for v in value]
    return mask(value, ids) if isinstance(value, str) else value


def blind_audit(
    db: DBSession, rows: list[dict[str, Any]], secret: bytes, store: BlobStore
) -> list[dict[str, Any]]:
    """Audit entries (:func:`cytopipe.serve.audit.as_dict`) with the arms of blinded studies coded
    in ``before`` / ``after`` (:func:`codes_of`); an arm whose study cannot be told is hidden
    while any study is blinded; a blinded study's uploaded tables show a keyed hash (HMAC). In the
    entries of a blinded study whose arms are known, every text (a file's name kept from before
    the arms were known, a reason) shows ``[arm]`` where an arm's name shows as its refusals find
    one (:func:`cytopipe.report.armcheck.masked`), never the code: the same text may show
    elsewhere unmasked (a template's name), which would tell the code's arm.

    The hashes of the chain from the first such entry on are shown keyed (:data:`KEYED` + HMAC
    with the workspace's secret; an entry's ``hash`` still equals the next one's ``prev_hash``):
    each is the SHA-256 of a stored row that holds the arm names, or of one after it (which covers
    its predecessor's hash), so putting each arm back in and hashing would tell them. The chain
    itself is verified on the server (``cytopipe audit verify``, ``GET /api/audit/verify``), which
    reads the stored rows."""
    blinder = _AuditBlinder(db, secret, store)
    first = blinder.first_shown_coded()
    if first is None:
        return rows
    out = []
    for r in rows:
        r = blinder.shown(r) or r
        if r["id"] >= first:
            r = {**r, "hash": _keyed(r["hash"], secret, b"hash")}
        if r["id"] > first:
            r = {**r, "prev_hash": _keyed(r["prev_hash"], secret, b"hash")}
        out.append(r)
    return out


def chain_status(db: DBSession, secret: bytes, store: BlobStore) -> tuple[bool, int, str]:
    """:func:`cytopipe.serve.audit.verify_chain` as web users see it: the newest entry's hash keyed
    as :func:`blind_audit` shows it."""
    import re

    from cytopipe.serve.audit import verify_chain
    from cytopipe.serve.db import Audit

    ok, n, message = verify_chain(db)
    first = _AuditBlinder(db, secret, store).first_shown_coded() if ok and n else None
    if first is not None:
        newest = db.get(Audit, n)
        shown = _keyed(newest.hash, secret, b"hash")[len(KEYED) :]
        message = re.sub(r", hash [0-9a-f]+$", f", hash (keyed, blinded study) {shown[:16]}", message)
    return ok, n, message
