"""Blinded studies in the workspace: who sees arm names, and arm names coded on the way out.

A study created with ``blinded: true`` shows no arm name to anyone, whatever the role (no role of
the workspace is unblinded): the mapping (``GET /api/studies/{id}/mapping`` and the study page),
the audit trail (``/api/audit``, its export, the ``/audit`` page and ``cytopipe audit export``),
the run's log and error, and every file of its runs show each arm as its code (``Arm A``, ``Arm
B``, ...: :func:`cytopipe.report.blinding.arm_codes`, seeded by a secret kept in the data folder,
so the codes are stable and cannot be worked out from the study). The codes are those of the
study's arm list, or, without one, of the arms its data name (confirmed samples, clinical table,
manifest). Runs get the same codes as their blinding key, so the report and the tables agree with
the pages. A run folder of a blinded study that was not written blinded is refused (403).

The stored rows keep the arm names (the audit hashes cover what was written); a confirmed mapping
that comes back with codes is decoded before it is stored.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from cytopipe.report.blinding import _letter, arm_codes, blind_text, folder_record
from cytopipe.serve.auth import AuthError
from cytopipe.serve.db import Batch, Run, Sample, Study, Upload
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


def study_codes(study: Study, secret: bytes, arms: Iterable[str] = ()) -> dict[str, str]:
    """``{arm: code}`` of a blinded study: the codes of its arm list, or, without one, of the arms
    of its data (``arms``: :func:`data_arms`), derived the same way. With an arm list, an arm of
    the data outside it gets one of the letters after the list's."""
    seed = secret + b"\0study\0" + str(study.id).encode()
    listed = [str(a) for a in study.arms or []]
    codes = arm_codes(listed or list(arms), secret=seed)
    extra = sorted({str(a) for a in arms if a} - set(codes))
    if extra:  # a permutation of the next letters, seeded like arm_codes'
        letters = [_letter(len(codes) + i) for i in range(len(extra))]
        rng = random.Random(int.from_bytes(hashlib.sha256(b"cytopipe-extra\0" + seed).digest()[:8], "big"))
        rng.shuffle(letters)
        codes.update({arm: f"Arm {letter}" for arm, letter in zip(extra, letters)})
    return codes


def codes_of(db: DBSession, store: BlobStore, study: Study, secret: bytes) -> dict[str, str]:
    """``{arm: code}`` of a blinded study (``{}`` when its arms are visible)."""
    if arms_visible(study):
        return {}
    return study_codes(study, secret, data_arms(db, store, study))


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


def blind_audit(
    db: DBSession, rows: list[dict[str, Any]], secret: bytes, store: BlobStore
) -> list[dict[str, Any]]:
    """Audit entries (:func:`cytopipe.serve.audit.as_dict`) with the arms of blinded studies coded
    in ``before`` / ``after`` (:func:`codes_of`); an arm whose study cannot be told is hidden
    while any study is blinded. The entries' hashes are those of the stored rows (verify the chain
    on the server: ``GET /api/audit/verify``)."""
    studies = {s.id: s for s in db.scalars(select(Study))}
    blinded = {sid for sid, s in studies.items() if not arms_visible(s)}
    if not blinded:
        return rows
    cache: dict = {}
    codes: dict[int, dict[str, str]] = {}
    out = []
    for r in rows:
        if not (_has_arm(r["before"]) or _has_arm(r["after"])):
            out.append(r)
            continue
        sid = _study_of(db, r["object_type"], r["object_id"], cache)
        if sid is not None and sid not in blinded:
            out.append(r)
            continue
        table = None
        if sid is not None:
            if sid not in codes:
                codes[sid] = codes_of(db, store, studies[sid], secret)
            table = codes[sid]
        out.append({**r, "before": _code_arms(r["before"], table), "after": _code_arms(r["after"], table)})
    return out
