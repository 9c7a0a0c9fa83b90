"""Blinded studies in the workspace: who sees arm names, and arm names coded on the way out.

A study created with ``blinded: true`` shows no arm name to anyone (as the review queue, whose
``arms_visible`` is false, and the run's blinded report): the mapping (``GET
/api/studies/{id}/mapping`` and the study page) and the audit trail (``/api/audit``, its export
and the ``/audit`` page) show each arm as its code (``Arm A``, ``Arm B``, ...:
:func:`cytopipe.report.blinding.arm_codes`, seeded by a secret kept in the data folder, so the
codes are stable and cannot be worked out from the study). The stored rows keep the arm names
(the audit hashes cover what was written); a confirmed mapping that comes back with codes is
decoded before it is stored.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from cytopipe.report.blinding import arm_codes
from cytopipe.serve.db import Batch, Run, Study, Upload

HIDDEN = "(blinded)"  # an arm that is not one of the study's arms (it has no code)
_SECRET_FILE = "blinding.secret"


def arms_visible(study: Any) -> bool:
    """Whether arm names may be shown for this study (the same answer for every role)."""
    return not bool((study.settings or {}).get("blinded"))


def workspace_secret(data_dir: Path) -> bytes:
    """The workspace's blinding secret (created once, readable by the server's user only)."""
    path = Path(data_dir) / _SECRET_FILE
    if not path.exists():
        try:
            with open(path, "xb", opener=lambda p, f: os.open(p, f, 0o600)) as fh:
                fh.write(secrets.token_bytes(32))
        except FileExistsError:
            pass  # another process created it first
    return path.read_bytes()


def study_codes(study: Study, secret: bytes) -> dict[str, str]:
    """``{arm: code}`` of a blinded study's arms."""
    return arm_codes(study.arms or [], secret=secret + b"\0study\0" + str(study.id).encode())


def code_arm(arm: Any, codes: dict[str, str]) -> Any:
    if arm is None or arm == "":
        return arm
    return codes.get(str(arm), HIDDEN)


def blind_mapping(rows: list[dict[str, Any]], study: Study, secret: bytes) -> list[dict[str, Any]]:
    """Mapping rows with each arm as its code when the study is blinded."""
    if arms_visible(study):
        return rows
    codes = study_codes(study, secret)
    return [{**r, "arm": code_arm(r.get("arm"), codes)} for r in rows]


def unblind_mapping(
    rows: list[dict[str, Any]], study: Study, secret: bytes, stored: dict[int, str]
) -> list[dict[str, Any]]:
    """Confirmed rows of a blinded study back to arm names: a code becomes its arm, the hidden
    marker keeps the arm already stored for that upload (``stored``: upload id -> arm)."""
    if arms_visible(study):
        return rows
    names = {code: arm for arm, code in study_codes(study, secret).items()}
    out = []
    for r in rows:
        arm = " ".join(str(r.get("arm") or "").split())
        if arm in names:
            arm = names[arm]
        elif arm == HIDDEN:
            arm = stored.get(_int(r.get("upload_id")), arm)
        out.append({**r, "arm": arm})
    return out


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


def blind_audit(db: DBSession, rows: list[dict[str, Any]], secret: bytes) -> list[dict[str, Any]]:
    """Audit entries (:func:`cytopipe.serve.audit.as_dict`) with the arms of blinded studies coded
    in ``before`` / ``after``; an arm whose study cannot be told is hidden while any study is
    blinded. The entries' hashes are those of the stored rows (verify the chain on the server:
    ``GET /api/audit/verify``)."""
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
            table = codes.setdefault(sid, study_codes(studies[sid], secret))
        out.append({**r, "before": _code_arms(r["before"], table), "after": _code_arms(r["after"], table)})
    return out
