"""Workspace operations shared by the HTML pages and the JSON API (each one audited)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from cytopipe.manifest import parse_visit, visit_problem
from cytopipe.serve import armentry, audit
from cytopipe.serve.auth import AuthError
from cytopipe.serve.blinding import arms_visible, assign_codes
from cytopipe.serve.db import Batch, Run, Sample, Study, Template, Upload
from cytopipe.serve.storage import (
    BlobStore,
    UploadRefused,
    check_disk,
    describe_magic,
    fsync_path,
    pattern_regex,
    propose_mapping,
    read_table_rows,
    receive,
    sanitise_name,
    validate_blob,
)

MAX_TABLE_BYTES = 20 << 20
MAX_YAML = 2 << 20  # a gating template's YAML


# the template a new study starts with (the form's preselected choice): the flow-cytometry T-cell/NK
# panel the workflows use. Alphabetical order would preselect the mass-cytometry one, whose
# channels (Pt195Di, DNA1, ...) no flow file has: every sample of such a run fails.
DEFAULT_TEMPLATE = "sle_il2_tcell_nk.yaml"


def template_choices() -> dict[str, Path]:
    """Gating templates shipped with the project (``gating/*.yaml`` next to the package), the
    default one first."""
    folder = Path(__file__).resolve().parents[2] / "gating"
    found = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    found.sort(key=lambda p: p.name != DEFAULT_TEMPLATE)  # stable: the rest stay alphabetical
    return {p.name: p for p in found}


def study_dict(study: Study) -> dict[str, Any]:
    return {"id": study.id, "name": study.name, "arms": study.arms, "visits": study.visits,
            "settings": study.settings, "pattern": study.pattern, "template_id": study.template_id,
            "clinical": study.clinical_name, "manifest": study.manifest_name,
            "created_by": study.created_by, "created_at": study.created_at.isoformat()}  # fmt: skip


def upload_dict(up: Upload) -> dict[str, Any]:
    return {"id": up.id, "name": up.name, "sha256": up.sha256, "size": up.size, "status": up.status,
            "reason": up.reason, "notes": up.notes, "events": (up.info or {}).get("events"),
            "uploaded_by": up.uploaded_by, "uploaded_at": up.uploaded_at.isoformat()}  # fmt: skip


RUN_OPTION_DEFAULTS = {"missing_markers": "stop"}  # what a run made before migration 0004 ran with


def shown_options(run: Run) -> dict[str, Any]:
    """Every option a run was started with (``runs.options``), the defaults of those it lacks filled in."""
    return {**RUN_OPTION_DEFAULTS, **(run.options or {})}


def run_dict(run: Run) -> dict[str, Any]:
    return {"id": run.id, "study_id": run.study_id, "status": run.status, "attempts": run.attempts,
            "exit_code": run.exit_code, "error": run.error, "n_samples": run.n_samples, "pid": run.pid,
            "options": shown_options(run),
            "started_by": run.started_by, "created_at": run.created_at.isoformat(),
            "finished_at": run.finished_at.isoformat() if run.finished_at else None}  # fmt: skip


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.replace(";", ",").split(",") if w.strip()]


def create_study(db: DBSession, user: str, values: dict[str, Any]) -> Study:
    name = " ".join(str(values.get("name", "")).split())
    if not name or len(name) > 200:
        raise AuthError(400, "a study needs a name (at most 200 characters)")
    if db.scalar(select(Study).where(Study.name == name)):
        raise AuthError(409, f"a study named {name!r} exists already")
    arms = values.get("arms") or []
    arms = _words(arms) if isinstance(arms, str) else [str(a) for a in arms]
    visits = values.get("visits") or []
    try:
        visits = [int(v) for v in (_words(visits) if isinstance(visits, str) else visits)]
    except ValueError:
        raise AuthError(
            400, "visits are study weeks, whole numbers separated by commas (e.g. 0, 4, 12)"
        ) from None
    pattern = str(values.get("pattern") or "{patient}_W{visit}.fcs")
    try:
        pattern_regex(pattern)
    except ValueError as exc:
        raise AuthError(400, str(exc)) from None
    settings = {"seed": int(values.get("seed") or 0), "workers": str(values.get("workers") or "auto"),
                "clustering": bool(values.get("clustering")), "blinded": bool(values.get("blinded")),
                "report": bool(values.get("report", True)),
                "four_eyes": bool(values.get("four_eyes", True))}  # sign-off by a second person  # fmt: skip
    if settings["blinded"]:
        armentry.refuse_number_arms(arms, "the study was not created")
        armentry.refuse_study_name(arms, name, "the study was not created")
    study = Study(name=name, arms=arms, visits=visits, settings=settings, pattern=pattern, created_by=user)
    db.add(study)
    db.flush()
    yaml_text = values.get("template_yaml")
    template_name = str(values.get("template") or "")
    if not yaml_text:
        choices = template_choices()
        if template_name not in choices:
            raise AuthError(400, f"template {template_name!r} is unknown; choose one of {sorted(choices)}")
        yaml_text = choices[template_name].read_text(encoding="utf-8")
    if len(yaml_text.encode("utf-8")) > MAX_YAML:
        raise AuthError(413, f"the template is larger than {MAX_YAML >> 20} MB")
    label = f"{template_name or 'template.yaml'!r} (version 1)"
    template = _check_template(yaml_text, label)
    if settings["blinded"]:  # its populations and markers beside its arm list, as its runs check them
        armentry.refuse_template_names(arms, template, label, "the study was not created")
    tpl = Template(study_id=study.id, version=1, name=template_name or "template.yaml", yaml=yaml_text,
                   sha256=hashlib.sha256(yaml_text.encode()).hexdigest(), created_by=user)  # fmt: skip
    db.add(tpl)
    db.flush()
    study.template_id = tpl.id
    audit.record(
        db, user, "study.create", "study", study.id, None, {**study_dict(study), "template": tpl.name}
    )
    return study


def _check_template(text: str, label: str) -> Any:
    """The loaded template (:func:`cytopipe.serve.armentry.check_template`: 400 when not valid)."""
    return armentry.check_template(text, label)


def get_study(db: DBSession, study_id: int) -> Study:
    study = db.get(Study, study_id)
    if study is None:
        raise AuthError(404, f"study {study_id} not found")
    return study


def new_batch(
    db: DBSession, cfg: Any, store: BlobStore, study: Study, user: str, files: int, size: int
) -> Batch:
    if size > cfg.max_batch_bytes:
        raise UploadRefused(413, f"the batch ({size / 1e6:.1f} MB) is larger than the limit of "
                                 f"{cfg.max_batch_bytes / 1e6:.1f} MB; upload it in parts")  # fmt: skip
    check_disk(store, size)
    batch = Batch(study_id=study.id, declared_files=files, declared_bytes=size, created_by=user)
    db.add(batch)
    db.flush()
    audit.record(db, user, "upload.batch", "batch", batch.id, None, {"study_id": study.id, "files": files,
                                                                      "bytes": size})  # fmt: skip
    return batch


async def upload_file(
    ws: Any, study_id: int, user: str, raw_name: str, chunks: AsyncIterator[bytes],
    length: int | None, batch_id: int | None,
) -> dict[str, Any]:  # fmt: skip
    """Receive one file; returns its row (status ok / warning / rejected, reason, duplicate)."""
    cfg = ws.config
    name = sanitise_name(raw_name)
    limit = cfg.max_file_bytes
    with ws.sessions() as db:
        study = get_study(db, study_id)
        if not arms_visible(study):  # its name would show an arm on the study's pages (nothing received yet)
            armentry.refuse_upload_name(
                db, ws.store, study, name, str(raw_name), f"the file {name!r} was not uploaded"
            )
        batch = db.get(Batch, batch_id) if batch_id else None
        if batch_id and (batch is None or batch.study_id != study_id):
            raise AuthError(404, f"batch {batch_id} not found in this study")
        if batch is not None:  # received_bytes includes what the batch's uploads still streaming reserved
            limit = min(limit, batch.declared_bytes - batch.received_bytes)
    if length is not None and length > cfg.max_file_bytes:
        raise UploadRefused(413, f"{name}: larger than the file limit of {cfg.max_file_bytes / 1e6:.1f} MB")
    if length is not None and length > limit:
        raise UploadRefused(413, f"{name}: more bytes than the batch declared")
    check_disk(ws.store, length or 0)
    if batch_id is None:
        return await _upload_file(ws, study_id, user, name, raw_name, chunks, length, None, limit, {})
    # reserve the declared length (else what the batch has left) in one UPDATE, so that uploads of one
    # batch at the same time (the page sends two) cannot together pass what it declared
    account = {"reserved": max(0, limit if length is None else length), "done": False}
    if not _reserve(ws, batch_id, account["reserved"]):
        raise UploadRefused(413, f"{name}: more bytes than the batch declared")
    try:
        return await _upload_file(
            ws, study_id, user, name, raw_name, chunks, length, batch_id, limit, account
        )
    finally:
        if not account["done"]:  # refused, cut off or failed: give the reservation back
            _reserve(ws, batch_id, -account["reserved"])


def _reserve(ws: Any, batch_id: int, n: int) -> bool:
    """Add ``n`` bytes to the batch's count if it stays within what the batch declared."""
    with ws.sessions() as db:
        query = update(Batch).where(Batch.id == batch_id)
        if n > 0:
            query = query.where(Batch.declared_bytes - Batch.received_bytes >= n)
        done = db.execute(query.values(received_bytes=Batch.received_bytes + n)).rowcount == 1
        db.commit()
    return done


async def _upload_file(
    ws: Any, study_id: int, user: str, name: str, raw_name: str, chunks: AsyncIterator[bytes],
    length: int | None, batch_id: int | None, limit: int, account: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    from starlette.concurrency import run_in_threadpool

    from cytopipe.serve.streamcheck import StreamCheck

    check = StreamCheck(name, length)  # validate's rules on the blocks as they stream
    got = await receive(chunks, ws.store, limit, sync=False, check=check)
    if got.tmp is None:
        checked = {"status": "rejected", "notes": [], "info": {},
                   "reason": f"not an FCS file: the content is {describe_magic(got.head)} (FCS files start with "
                             "'FCS3.1', 'FCS3.0' or 'FCS2.0'; the extension does not count)"}  # fmt: skip
    else:
        # checked while streaming; else (several data sets, mixed widths, no Content-Length)
        # validated from the stored file while it is flushed to disk: the two overlap
        checked = check.result(got.size)
        if checked is None:
            try:
                checked, _ = await asyncio.gather(
                    run_in_threadpool(validate_blob, got.tmp, name, got.sha256),
                    run_in_threadpool(fsync_path, got.tmp),
                )
            except BaseException:
                got.tmp.unlink(missing_ok=True)
                raise
            got.synced = True
    # the disk and database work runs in a thread: the event loop keeps receiving other uploads meanwhile
    return await run_in_threadpool(record_upload, ws, study_id, user, name, raw_name, batch_id, got, checked,
                                   account)  # fmt: skip


def record_upload(
    ws: Any, study_id: int, user: str, name: str, raw_name: str, batch_id: int | None, got: Any,
    checked: dict[str, Any], account: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The upload's row and audit entry (or the duplicate's audit entry), in one transaction, once
    the file is on disk and in the store; ``account`` holds the bytes the batch reserved for it
    (its count is corrected to the bytes received in the same transaction)."""
    account = account if account is not None else {"reserved": 0, "done": False}
    try:  # its name again: a table saved while the file streamed may have made an arm known
        with ws.sessions() as db:
            study = get_study(db, study_id)
            if not arms_visible(study):
                armentry.refuse_upload_name(
                    db, ws.store, study, name, str(raw_name), f"the file {name!r} was not uploaded"
                )
    except AuthError:
        if got.tmp is not None:
            got.tmp.unlink(missing_ok=True)
        raise
    if got.tmp is not None:
        try:
            if not got.synced:
                fsync_path(got.tmp)
        except BaseException:
            got.tmp.unlink(missing_ok=True)
            raise
        ws.store.adopt(got.tmp, got.sha256)
    for _ in range(7):
        try:
            return _upload_row(ws, study_id, user, name, raw_name, batch_id, got, checked, account)
        except IntegrityError:  # an upload at the same time stored the same bytes (then this one is a
            pass  # duplicate) or took the next audit id (SQLite reads the last one before locking)
    return _upload_row(ws, study_id, user, name, raw_name, batch_id, got, checked, account)


def _upload_row(
    ws: Any, study_id: int, user: str, name: str, raw_name: str, batch_id: int | None, got: Any,
    checked: dict[str, Any], account: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    status, reason, notes, info = checked["status"], checked["reason"], checked["notes"], checked["info"]
    with ws.sessions() as db:
        if batch_id:  # the bytes received instead of those reserved, in SQL (uploads finish at the same time)
            db.execute(update(Batch).where(Batch.id == batch_id)
                       .values(received_bytes=Batch.received_bytes + got.size - account["reserved"]))  # fmt: skip
        existing = db.scalar(select(Upload).where(Upload.study_id == study_id, Upload.sha256 == got.sha256))
        if existing is not None:
            result = {**upload_dict(existing), "duplicate": True,
                      "message": f"same content as {existing.name!r}, uploaded {existing.uploaded_at:%Y-%m-%d %H:%M} "
                                 f"UTC by {existing.uploaded_by}; kept once"}  # fmt: skip
            audit.record(
                db,
                user,
                "upload.duplicate",
                "upload",
                existing.id,
                None,
                {"name": name, "sha256": got.sha256},
            )
            db.commit()
            account["done"] = True  # the batch's count is final
            return result
        up = Upload(study_id=study_id, batch_id=batch_id, sha256=got.sha256, name=name, size=got.size,
                    stored=got.tmp is not None, status=status, reason=reason or "", notes=notes, info=info,
                    uploaded_by=user)  # fmt: skip
        db.add(up)
        db.flush()
        audit.record(db, user, "upload.file", "upload", up.id, None,
                     {"study_id": study_id, "name": name, "original_name": str(raw_name)[:300],
                      "sha256": got.sha256, "size": got.size, "status": status, "reason": reason})  # fmt: skip
        db.commit()
        account["done"] = True
        return {**upload_dict(up), "duplicate": False}


async def upload_table(ws: Any, study_id: int, user: str, kind: str, raw_name: str, chunks) -> dict[str, Any]:
    """The study's clinical table or manifest CSV (content-addressed like the FCS files)."""
    if kind not in ("clinical", "manifest"):
        raise AuthError(400, "kind is 'clinical' or 'manifest'")
    got = await receive(chunks, ws.store, MAX_TABLE_BYTES, require_fcs=False)
    data = got.tmp.read_bytes()
    rows = read_table_rows(data)
    need = {
        "clinical": {"patient_id", "visit", "arm"},
        "manifest": {"file", "sample_id", "patient_id", "visit", "arm"},
    }
    missing = sorted(need[kind] - set(rows[0] if rows else {}))
    if missing:
        got.tmp.unlink(missing_ok=True)
        raise AuthError(400, f"{kind} table: missing column(s) {missing} (or no rows)")
    name = sanitise_name(raw_name, f"{kind}.csv")
    with ws.sessions() as db:
        try:
            study = get_study(db, study_id)
            if not arms_visible(study):  # what the study's runs would refuse (the manifest: its proposals)
                todo = f"the {kind} table was not saved"
                arms = [r.get("arm", "") for r in rows]
                armentry.refuse_number_arms(arms, todo)
                armentry.refuse_ids_with_arms(db, ws.store, study, todo, **{kind: rows})
                armentry.refuse_names_with_arms(db, ws.store, study, todo, arms=arms)
        except AuthError:
            got.tmp.unlink(missing_ok=True)
            raise
        ws.store.adopt(got.tmp, got.sha256)
        before = {"name": getattr(study, f"{kind}_name"), "sha256": getattr(study, f"{kind}_sha256")}
        setattr(study, f"{kind}_sha256", got.sha256)
        setattr(study, f"{kind}_name", name)
        audit.record(db, user, f"study.{kind}", "study", study_id, before, {"name": name, "sha256": got.sha256,
                                                                            "rows": len(rows)})  # fmt: skip
        assign_codes(db, ws.store, study, ws.blind_secret, user)  # its new arms get their codes, for good
        db.commit()
    return {"kind": kind, "name": name, "sha256": got.sha256, "rows": len(rows)}


def usable_uploads(db: DBSession, study_id: int) -> list[Upload]:
    return list(db.scalars(select(Upload).where(Upload.study_id == study_id, Upload.status.in_(("ok", "warning")))
                           .order_by(Upload.name)))  # fmt: skip


def mapping(
    db: DBSession, store: BlobStore, study: Study, pattern: str | None = None
) -> list[dict[str, Any]]:
    """Confirmed samples as they are, proposals for the other usable uploads."""
    confirmed = {s.upload_id: s for s in db.scalars(select(Sample).where(Sample.study_id == study.id))}
    todo = [u for u in usable_uploads(db, study.id) if u.id not in confirmed]
    tables = {k: read_table_rows(store.path(sha).read_bytes()) if sha else None
              for k, sha in (("clinical", study.clinical_sha256), ("manifest", study.manifest_sha256))}  # fmt: skip
    try:
        proposals = propose_mapping(todo, pattern or study.pattern, tables["clinical"], tables["manifest"])
    except ValueError as exc:
        raise AuthError(400, str(exc)) from None
    uploads = {u.id: u for u in usable_uploads(db, study.id)}
    rows = [{"upload_id": s.upload_id, "name": uploads[s.upload_id].name if s.upload_id in uploads else "?",
             "sample_id": s.sample_id, "patient_id": s.patient_id, "visit": s.visit, "arm": s.arm,
             "source": "confirmed", "confirmed": True} for s in confirmed.values()]  # fmt: skip
    rows += [{**p, "confirmed": False} for p in proposals]
    return sorted(rows, key=lambda r: r["name"])


def stored_arms(db: DBSession, study: Study) -> dict[int, str]:
    """upload id -> the arm of its confirmed sample."""
    return {s.upload_id: s.arm for s in db.scalars(select(Sample).where(Sample.study_id == study.id))}


def confirm_mapping(
    db: DBSession, store: BlobStore, user: str, study: Study, rows: list[dict[str, Any]], pattern: str | None
) -> int:
    """Store the user's (edited) mapping; every row must be complete and sample ids unique (and, in a
    blinded study, what its runs would refuse is refused: ``store`` holds its clinical table)."""
    uploads = {u.id: u for u in usable_uploads(db, study.id)}
    existing = {s.upload_id: s for s in db.scalars(select(Sample).where(Sample.study_id == study.id))}
    problems, seen, clean = [], set(), []
    for i, row in enumerate(rows, 1):
        uid = int(row.get("upload_id", 0))
        if uid not in uploads:
            problems.append(f"row {i}: upload {uid} is not a usable file of this study")
            continue
        vals = {k: " ".join(str(row.get(k) or "").split()) for k in ("sample_id", "patient_id", "arm")}
        try:  # a study week, or W4 / Week 4 / Day 28 / BL as the manifest reads them
            visit = parse_visit(row.get("visit"))
        except ValueError:
            problems.append(f"{uploads[uid].name}: {visit_problem(row.get('visit'))}")
            continue
        for k, v in vals.items():
            if not v:
                problems.append(f"{uploads[uid].name}: {k} is empty")
        if vals["sample_id"] in seen:
            problems.append(f"{uploads[uid].name}: sample_id {vals['sample_id']!r} is used twice")
        if study.arms and vals["arm"] and vals["arm"] not in study.arms:
            problems.append(
                f"{uploads[uid].name}: arm {vals['arm']!r} is not one of the study's arms {study.arms}"
            )
        seen.add(vals["sample_id"])
        clean.append((uid, vals, visit))
    if problems:
        raise AuthError(400, "the mapping was not saved: " + "; ".join(problems))
    if not arms_visible(study):  # what a blinded study's runs would refuse, refused when it is entered
        armentry.refuse_number_arms([v["arm"] for _, v, _ in clean], "the mapping was not saved")
        mapped = {uid: {**vals, "file": f"fcs/{uploads[uid].name}"} for uid, vals, _ in clean}
        armentry.refuse_ids_with_arms(db, store, study, "the mapping was not saved", mapped=mapped)
        armentry.refuse_names_with_arms(db, store, study, "the mapping was not saved",
                                        arms=[v["arm"] for _, v, _ in clean])  # fmt: skip
    for uid, vals, visit in clean:
        old = existing.get(uid)
        if old is None:
            db.add(Sample(study_id=study.id, upload_id=uid, visit=visit, confirmed_by=user, **vals))
        else:
            old.sample_id, old.patient_id, old.arm, old.visit, old.confirmed_by = (
                vals["sample_id"], vals["patient_id"], vals["arm"], visit, user)  # fmt: skip
    before = {"pattern": study.pattern}
    if pattern and pattern != study.pattern:
        pattern_regex(pattern)
        study.pattern = pattern
    db.flush()
    audit.record(db, user, "mapping.confirm", "study", study.id, before,
                 {"pattern": study.pattern, "rows": [{"upload_id": u, **v, "visit": vis} for u, v, vis in clean]})  # fmt: skip
    return len(clean)


def study_counts(db: DBSession, study_id: int) -> dict[str, int]:
    def n(model, *where):
        return int(db.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    return {"uploads": n(Upload, Upload.study_id == study_id), "samples": n(Sample, Sample.study_id == study_id),
            "runs": n(Run, Run.study_id == study_id)}  # fmt: skip
