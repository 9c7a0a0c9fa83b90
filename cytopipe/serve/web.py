"""The HTML pages: sign-in, studies, a study (uploads, mapping, runs), a run (progress and
results), accounts and the audit trail. Every form carries the session's CSRF token; uploads
and progress use the JSON API from ``static/app.js``."""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from cytopipe.serve import api, armentry, audit, auth, blinding, ops, results, reviewops, signoffpolicy
from cytopipe.serve.auth import AuthError
from cytopipe.serve.db import RUN_ACTIVE, Audit, Run, Study, Template, Upload, User
from cytopipe.serve.deps import Ctx, page, permit, signed_in, workspace
from cytopipe.serve.runs import run_options

router = APIRouter(include_in_schema=False)
PRELOGIN = "cytopipe_prelogin"


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/studies"


def _maybe_user(request: Request) -> Ctx | None:
    try:
        return signed_in(request)
    except AuthError:
        return None


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/studies", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/studies", error: str = "") -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    with workspace(request).sessions() as db:
        no_accounts = auth.count_users(db) == 0
    resp = page(
        request, "login.html", None, csrf=token, next=_safe_next(next), error=error, no_accounts=no_accounts
    )
    resp.set_cookie(PRELOGIN, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.post("/login")
def login_submit(
    request: Request,
    name: str = Form(...),
    password: str = Form(...),
    csrf: str = Form(""),
    next: str = Form(""),
) -> Response:
    expected = request.cookies.get(PRELOGIN, "")
    if not expected or not secrets.compare_digest(expected, csrf):
        raise AuthError(403, "missing or wrong CSRF token: reload the sign-in page and try again")
    response = RedirectResponse(_safe_next(next), status_code=303)
    try:
        api.login_user(request, response, name, password)
    except AuthError as exc:
        if exc.status not in (401, 429):
            raise
        token = secrets.token_urlsafe(24)
        resp = page(request, "login.html", None, status=exc.status, csrf=token, next=_safe_next(next),
                    error=exc.message, no_accounts=False)  # fmt: skip
        resp.set_cookie(
            PRELOGIN, token, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return resp
    response.delete_cookie(PRELOGIN)
    return response


@router.post("/logout")
def logout(request: Request, ctx: Annotated[Ctx, Depends(permit("view"))]) -> Response:
    with workspace(request).sessions() as db:
        auth.end_session(db, request.cookies.get(auth.COOKIE))
        audit.record(db, ctx.name, "logout", "user", ctx.user.id)
        db.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(auth.COOKIE)
    return response


@router.get("/studies", response_class=HTMLResponse)
def studies(request: Request) -> HTMLResponse:
    ctx = signed_in(request)
    with workspace(request).sessions() as db:
        rows = [(s, ops.study_counts(db, s.id)) for s in db.scalars(select(Study).order_by(Study.name))]
    return page(request, "studies.html", ctx, studies=rows, templates=list(ops.template_choices()))


@router.post("/studies")
async def create_study(request: Request, ctx: Annotated[Ctx, Depends(permit("study.create"))]) -> Response:
    form = await request.form()
    values = {k: form.get(k) for k in ("name", "arms", "visits", "template", "pattern", "seed", "workers")}
    values.update(clustering=form.get("clustering") == "on", blinded=form.get("blinded") == "on",
                  report=form.get("report") == "on", four_eyes=form.get("four_eyes") == "on")  # fmt: skip
    upload = form.get("template_file")
    if upload is not None and getattr(upload, "filename", ""):
        # one byte over the limit, so that a larger file is refused (413), never cut short
        values["template_yaml"] = (await upload.read(ops.MAX_YAML + 1)).decode("utf-8", "replace")
        values["template"] = upload.filename
    with workspace(request).sessions() as db:
        study = ops.create_study(db, ctx.name, values)
        db.commit()
        return RedirectResponse(f"/studies/{study.id}", status_code=303)


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(study_id: int, request: Request, pattern: str | None = None) -> HTMLResponse:
    ctx = signed_in(request)
    ws = workspace(request)
    with ws.sessions() as db:
        study = ops.get_study(db, study_id)
        uploads = list(db.scalars(select(Upload).where(Upload.study_id == study_id).order_by(Upload.name)))
        runs = list(db.scalars(select(Run).where(Run.study_id == study_id).order_by(Run.id.desc())))
        template = db.get(Template, study.template_id) if study.template_id else None
        try:
            rows, mapping_error = ops.mapping(db, ws.store, study, pattern), ""
        except AuthError as exc:
            rows, mapping_error = ops.mapping(db, ws.store, study), exc.message
        mask = armentry.name_mask(db, ws.store, study)  # names stored before the arms were known
        rows = armentry.shown_mapping(db, ws.store, study, rows, mask)
        rows = blinding.blind_mapping(rows, study, blinding.codes_of(db, ws.store, study, ws.blind_secret))
        uploads = [u if mask is None else _ShownUpload(u, mask) for u in uploads]
    active = next((r for r in runs if r.status in RUN_ACTIVE), None)
    return page(request, "study.html", ctx, study=study, uploads=uploads, runs=runs, template=template,
                mapping=rows, pattern=pattern or study.pattern, mapping_error=mapping_error, active=active,
                max_file=ws.config.max_file_bytes, max_batch=ws.config.max_batch_bytes,
                run_defaults=run_options(None), four_eyes=signoffpolicy.required(study),
                run_options={r.id: ops.shown_options(r) for r in runs})  # fmt: skip


class _ShownUpload:
    """An upload as a blinded study's page shows it: its name, reason and notes masked
    (:func:`cytopipe.serve.armentry.shown_upload`), the rest as stored."""

    def __init__(self, upload: Upload, mask: Any):
        self._shown = armentry.shown_upload(
            {"name": upload.name, "reason": upload.reason, "notes": upload.notes}, mask
        )
        self._upload = upload

    def __getattr__(self, key: str) -> Any:
        return self._shown[key] if key in self._shown else getattr(self._upload, key)


@router.post("/studies/{study_id}/mapping")
async def confirm_mapping(
    study_id: int, request: Request, ctx: Annotated[Ctx, Depends(permit("map"))]
) -> Response:
    form = await request.form()
    fields = ("upload_id", "sample_id", "patient_id", "visit", "arm")
    columns = {f: form.getlist(f) for f in fields}
    rows = [dict(zip(fields, values)) for values in zip(*(columns[f] for f in fields))]
    ws = workspace(request)
    with ws.sessions() as db:
        study = ops.get_study(db, study_id)
        codes = blinding.codes_of(db, ws.store, study, ws.blind_secret)
        rows = blinding.unblind_mapping(rows, study, codes, ops.stored_arms(db, study))
        ops.confirm_mapping(db, ws.store, ctx.name, study, rows, form.get("pattern"))
        blinding.assign_codes(db, ws.store, study, ws.blind_secret, ctx.name)  # a new arm: its code, for good
        db.commit()
    return RedirectResponse(f"/studies/{study_id}#runs", status_code=303)


@router.post("/studies/{study_id}/policy")
def set_policy(
    study_id: int,
    request: Request,
    ctx: Annotated[Ctx, Depends(permit("policy"))],
    four_eyes: str = Form(""),
    reason: str = Form(""),
) -> Response:
    """The study page's sign-off rule form (administrators)."""
    with workspace(request).sessions() as db:
        signoffpolicy.set_policy(db, ops.get_study(db, study_id), ctx.name, four_eyes == "on", reason)
        db.commit()
    return RedirectResponse(f"/studies/{study_id}#policy", status_code=303)


@router.post("/studies/{study_id}/runs")
def start_run(
    study_id: int,
    request: Request,
    ctx: Annotated[Ctx, Depends(permit("run"))],
    missing_markers: str = Form(""),
) -> Response:
    ws = workspace(request)
    with ws.sessions() as db:
        run = ws.runs.start(db, ops.get_study(db, study_id), ctx.name, {"missing_markers": missing_markers})
    return RedirectResponse(f"/runs/{run.id}", status_code=303)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: int, request: Request) -> HTMLResponse:
    ctx = signed_in(request)
    ws = workspace(request)
    status = api.run_status(ws, run_id)
    run, study, out = api.finished_run(ws, run_id)
    data = downloads = None
    refused = ""
    try:
        blinding.check_run_folder(study, run_id, out)
    except AuthError as exc:
        refused = exc.message
    preparing = ""  # a new version's own report, written in the background
    if run.status == "finished" and not refused:
        data = results.summary(out, blinded=not blinding.arms_visible(study))
        downloads = results.available(out)
        if reviewops.report_pending(run):
            preparing = api.REPORT_PREPARED.format(run=run_id)
    provenance = json.dumps(data["info"], indent=2, sort_keys=True)[:200_000] if data else ""
    return page(request, "run.html", ctx, run=run, study=study, run_status=status, data=data, downloads=downloads,
                provenance=provenance, refused=refused, preparing=preparing)  # fmt: skip


@router.post("/runs/{run_id}/cancel")
def cancel_run(run_id: int, request: Request, ctx: Annotated[Ctx, Depends(permit("run"))]) -> Response:
    ws = workspace(request)
    with ws.sessions() as db:
        run = db.get(Run, run_id)
        if run is None:
            raise AuthError(404, f"run {run_id} not found")
        ws.runs.cancel(db, run, ctx.name)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


@router.post("/runs/{run_id}/anndata")
def export_anndata(
    run_id: int, request: Request, ctx: Annotated[Ctx, Depends(permit("run"))], population: str = Form(...)
) -> Response:
    ws = workspace(request)
    run, _, _ = api.shown_run(ws, run_id)
    if run.status != "finished":
        raise AuthError(409, f"run {run_id} is {run.status}; export the events of a finished run")
    with ws.sessions() as db:
        ws.runs.export_anndata(db, run, population, None, ctx.name)
    return RedirectResponse(f"/runs/{run_id}#downloads", status_code=303)


@router.get("/runs/{run_id}/files/{name}")
def download(run_id: int, name: str, request: Request, inline: bool = False) -> Response:
    return api.download(run_id, name, request, inline)


@router.get("/runs/{run_id}/files/report_tables/{name}")
def report_table(run_id: int, name: str, request: Request) -> Response:
    """The report's CSV links (``report_tables/<name>.csv`` beside report.html) from the run page."""
    return api.download(run_id, f"{results.REPORT_TABLES}/{name}", request)


@router.get("/users", response_class=HTMLResponse)
def users(request: Request) -> HTMLResponse:
    ctx = signed_in(request)
    ctx.require("accounts")
    with workspace(request).sessions() as db:
        rows = list(db.scalars(select(User).order_by(User.name)))
    return page(request, "users.html", ctx, users=rows, roles=auth.PERMISSIONS, role_names=list(auth.ROLES))


@router.post("/users")
def create_user(
    request: Request,
    ctx: Annotated[Ctx, Depends(permit("accounts"))],
    name: str = Form(...),
    password: str = Form(...),
    role: str = Form(...),
) -> Response:
    with workspace(request).sessions() as db:
        auth.create_user(db, name, password, role, ctx.name)
        db.commit()
    return RedirectResponse("/users", status_code=303)


@router.get("/api/docs", response_class=HTMLResponse)
def api_docs(request: Request) -> HTMLResponse:
    """The API's operations from its OpenAPI schema, as a page that needs nothing from elsewhere."""
    ctx = _maybe_user(request)
    schema = request.app.openapi()
    operations = [
        {"method": method.upper(), "path": path, "summary": op.get("summary", ""),
         "doc": (op.get("description") or "").strip(),
         "params": [p["name"] for p in op.get("parameters", [])],
         "body": next(iter(op.get("requestBody", {}).get("content", {})), "")}
        for path, item in schema["paths"].items() for method, op in item.items()
    ]  # fmt: skip
    return page(request, "api.html", ctx, operations=operations, title=schema["info"]["title"],
                version=schema["info"]["version"])  # fmt: skip


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request) -> HTMLResponse:
    ctx = signed_in(request)
    ws = workspace(request)
    with ws.sessions() as db:
        rows = [audit.as_dict(r) for r in db.scalars(select(Audit).order_by(Audit.id.desc()).limit(500))]
        rows = blinding.blind_audit(db, rows, ws.blind_secret, ws.store)
        ok, n, message = blinding.chain_status(db, ws.blind_secret, ws.store)
    return page(request, "audit.html", ctx, rows=rows, chain_ok=ok, chain_message=message)
