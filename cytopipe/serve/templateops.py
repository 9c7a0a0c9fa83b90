"""Template versions: a study's gating template is edited in the browser (the YAML in a text area,
or a new YAML file uploaded) and every saved edit is a new, immutable version with a readable diff.

* a new version is checked with the template loader first (an invalid YAML is refused, nothing
  saved), must differ from the current one and needs a reason; it becomes the study's current
  template and is one ``template.edit`` audit entry (before/after version, sha256 and the diff);
* versions are never changed or deleted (database triggers, migration 0003); a run keeps the
  ``template_id`` it started with and its input file is ``template_v{N}.yaml``, so run.json's
  ``workflow.template`` and ``hashes.template`` name the exact version;
* pages: ``/studies/{id}/template`` (edit, upload, history), ``/studies/{id}/template/{version}``
  (that version and its unified diff against the one before); JSON: ``/api/studies/{id}/templates``.
"""

from __future__ import annotations

import difflib
import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DBSession

from cytopipe.serve import armentry, audit, ops
from cytopipe.serve.auth import AuthError
from cytopipe.serve.blinding import arms_visible
from cytopipe.serve.db import Run, Study, Template
from cytopipe.serve.deps import Body, Ctx, page, permit, signed_in, workspace
from cytopipe.serve.storage import BlobStore

PERMISSION = "study.create"  # analysts, reviewers and admins set up studies and their templates
MAX_YAML = ops.MAX_YAML

api = APIRouter(prefix="/api", tags=["templates"])
web = APIRouter(include_in_schema=False)


def versions(db: DBSession, study_id: int) -> list[Template]:
    return list(db.scalars(select(Template).where(Template.study_id == study_id).order_by(Template.version)))


def version(db: DBSession, study_id: int, number: int) -> Template:
    tpl = db.scalar(select(Template).where(Template.study_id == study_id, Template.version == number))
    if tpl is None:
        raise AuthError(404, f"study {study_id} has no template version {number}")
    return tpl


def diff(old: Template | None, new: Template) -> str:
    """Unified diff of two versions' YAML (empty for the first version)."""
    if old is None:
        return ""
    lines = difflib.unified_diff(
        old.yaml.splitlines(keepends=True),
        new.yaml.splitlines(keepends=True),
        fromfile=f"v{old.version} {old.name}",
        tofile=f"v{new.version} {new.name}",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def previous(db: DBSession, tpl: Template) -> Template | None:
    if tpl.version <= 1:
        return None
    return db.scalar(
        select(Template).where(Template.study_id == tpl.study_id, Template.version == tpl.version - 1)
    )


def new_version(
    db: DBSession, store: BlobStore, study: Study, user: str, yaml_text: str, reason: str, name: str = ""
) -> Template:
    """Validate ``yaml_text`` and save it as the study's next template version (one audit entry);
    in a blinded study, names that show an arm are refused as its runs refuse them (``store``
    holds its tables)."""
    reason = (reason or "").strip()
    if not reason:
        raise AuthError(400, "a reason is required: say why the template changes")
    if len(yaml_text.encode("utf-8")) > MAX_YAML:
        raise AuthError(413, f"the template is larger than {MAX_YAML >> 20} MB")
    yaml_text = yaml_text.replace("\r\n", "\n")
    current = db.get(Template, study.template_id) if study.template_id else None
    number = (db.scalar(select(func.max(Template.version)).where(Template.study_id == study.id)) or 0) + 1
    name = name or (current.name if current else "template.yaml")
    label = f"{name!r} (version {number})"
    template = ops._check_template(yaml_text, label)  # the loader's checks: 400, its message
    if not arms_visible(study):  # its populations and markers beside the study's arms, as its runs check them
        armentry.refuse_names_with_arms(db, store, study, "the template was not saved", template=template,
                                        label=label)  # fmt: skip
    sha = hashlib.sha256(yaml_text.encode("utf-8")).hexdigest()
    if current is not None and current.sha256 == sha:
        raise AuthError(400, f"the template is unchanged (it is version {current.version}): nothing saved")
    tpl = Template(study_id=study.id, version=number, name=name,
                   yaml=yaml_text, sha256=sha, created_by=user, reason=reason)  # fmt: skip
    db.add(tpl)
    db.flush()
    text = diff(current, tpl)
    audit.record(
        db, user, "template.edit", "study", study.id,
        None if current is None else {"template_id": current.id, "version": current.version, "sha256": current.sha256},
        {"template_id": tpl.id, "version": number, "sha256": sha, "name": tpl.name, "diff": text},
        reason,
    )  # fmt: skip
    study.template_id = tpl.id
    return tpl


def as_dict(db: DBSession, tpl: Template, study: Study, with_yaml: bool = False) -> dict[str, Any]:
    runs = list(db.scalars(select(Run.id).where(Run.template_id == tpl.id).order_by(Run.id)))
    out = {"id": tpl.id, "version": tpl.version, "name": tpl.name, "sha256": tpl.sha256,
           "created_by": tpl.created_by, "created_at": tpl.created_at.isoformat(), "reason": tpl.reason,
           "current": tpl.id == study.template_id, "runs": runs}  # fmt: skip
    if with_yaml:
        out["yaml"] = tpl.yaml
        out["diff"] = diff(previous(db, tpl), tpl)
    return out


# ------------------------------------------------------------------------------------------------
# JSON API
# ------------------------------------------------------------------------------------------------
class TemplateEdit(Body):
    yaml: str = Field(..., description="the whole template (YAML text)")
    reason: str = Field(..., description="why it changes (required)")
    name: str = ""


@api.get("/studies/{study_id}/templates")
def list_versions(study_id: int, request: Request) -> list[dict[str, Any]]:
    signed_in(request)
    with workspace(request).sessions() as db:
        study = ops.get_study(db, study_id)
        return [as_dict(db, t, study) for t in versions(db, study_id)]


@api.get("/studies/{study_id}/templates/{number}")
def get_version(study_id: int, number: int, request: Request) -> dict[str, Any]:
    signed_in(request)
    with workspace(request).sessions() as db:
        study = ops.get_study(db, study_id)
        return as_dict(db, version(db, study_id, number), study, with_yaml=True)


@api.post("/studies/{study_id}/templates", status_code=201)
def save_version(
    study_id: int, body: TemplateEdit, request: Request, ctx: Annotated[Ctx, Depends(permit(PERMISSION))]
) -> dict[str, Any]:
    with workspace(request).sessions() as db:
        study = ops.get_study(db, study_id)
        tpl = new_version(db, workspace(request).store, study, ctx.name, body.yaml, body.reason, body.name)
        db.commit()
        return as_dict(db, tpl, study, with_yaml=True)


# ------------------------------------------------------------------------------------------------
# pages
# ------------------------------------------------------------------------------------------------
@web.get("/studies/{study_id}/template", response_class=HTMLResponse)
def template_page(study_id: int, request: Request) -> HTMLResponse:
    ctx = signed_in(request)
    with workspace(request).sessions() as db:
        study = ops.get_study(db, study_id)
        rows = [as_dict(db, t, study) for t in reversed(versions(db, study_id))]
        current = db.get(Template, study.template_id) if study.template_id else None
    return page(request, "template.html", ctx, study=study, versions=rows, current=current,
                can_edit=ctx.can(PERMISSION))  # fmt: skip


@web.post("/studies/{study_id}/template")
async def template_save(
    study_id: int, request: Request, ctx: Annotated[Ctx, Depends(permit(PERMISSION))]
) -> Response:
    form = await request.form()
    text = str(form.get("yaml") or "")
    name = ""
    upload = form.get("template_file")
    if upload is not None and getattr(upload, "filename", ""):
        data = await upload.read(MAX_YAML + 1)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthError(
                400, f"{upload.filename} is not UTF-8 text: upload the template's YAML file"
            ) from None
        name = str(upload.filename)
    with workspace(request).sessions() as db:
        study = ops.get_study(db, study_id)
        tpl = new_version(
            db, workspace(request).store, study, ctx.name, text, str(form.get("reason") or ""), name
        )
        db.commit()
        return RedirectResponse(f"/studies/{study_id}/template/{tpl.version}", status_code=303)


@web.get("/studies/{study_id}/template/{number}", response_class=HTMLResponse)
def template_version_page(study_id: int, number: int, request: Request) -> HTMLResponse:
    ctx = signed_in(request)
    with workspace(request).sessions() as db:
        study = ops.get_study(db, study_id)
        info = as_dict(db, version(db, study_id, number), study, with_yaml=True)
    return page(request, "template_version.html", ctx, study=study, t=info)
