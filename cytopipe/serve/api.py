"""The JSON API (``/api``): the same operations as the pages, for a LIMS or a script.

Sign in with ``POST /api/login`` (the session cookie is set; the answer holds the CSRF token),
then send ``X-CSRF-Token: <token>`` with every POST/PUT. Files are uploaded one per request as
the raw body of ``PUT /api/studies/{id}/uploads?name=NAME`` (streamed, never whole in memory).
The schema is served at ``/api/openapi.json`` (browsable at ``/api/docs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import Field
from sqlalchemy import select

from cytopipe.serve import armentry, audit, auth, blinding, ops, results, reviewops
from cytopipe.serve.auth import AuthError
from cytopipe.serve.db import Audit, Run, Sample, Study, Upload, User
from cytopipe.serve.deps import (
    STREAMED,
    Body,
    Ctx,
    client_address,
    permit,
    set_session_cookie,
    signed_in,
    workspace,
)
from cytopipe.serve.runs import progress

router = APIRouter(prefix="/api", tags=["api"])
_RAW = {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                             "format": "binary"}}}}}  # fmt: skip


class Login(Body):
    name: str
    password: str


class NewStudy(Body):
    name: str
    arms: list[str] = []
    visits: list[int] = []
    template: str = Field("", description="a shipped template's file name (GET /api/templates)")
    template_yaml: str | None = Field(None, description="or the gating template itself (YAML text)")
    pattern: str = "{patient}_W{visit}.fcs"
    seed: int = 0
    workers: str = "auto"
    clustering: bool = False
    blinded: bool = False
    report: bool = Field(True, description="write report.html at the end of each run")
    four_eyes: bool = Field(
        True,
        description="sign-off by a second person: who started a run or changed its gates cannot sign it off",
    )


class Policy(Body):
    four_eyes: bool = Field(description="sign-off by a second person (four eyes)")
    reason: str = Field(description="why the rule changes (required; recorded in the audit trail)")


class NewBatch(Body):
    files: int = Field(ge=1)
    bytes: int = Field(ge=0)


class MappingRow(Body):
    upload_id: int
    sample_id: str
    patient_id: str
    visit: int | str = Field(
        description="the study week: 4, -2, or W4 / Week 4 / D28 / BL as a manifest writes it (months, "
        "visit numbers and days that are no whole week are refused, naming why)"
    )
    arm: str
    # shown by GET .../mapping; accepted so that its rows can be sent back, not used
    name: str | None = None
    source: str | None = None
    confirmed: bool | None = None


class Mapping(Body):
    rows: list[MappingRow]
    pattern: str | None = None


class RunOptions(Body):
    missing_markers: str = Field(
        "stop",
        description="a template marker absent from every file: 'stop' the run, or 'skip' (its populations "
        "are reported 'not measured'), as `missing_markers` in a workflow",
    )


class NewUser(Body):
    name: str
    password: str
    role: str


def login_user(request: Request, response: Response, name: str, password: str) -> dict[str, Any]:
    ws = workspace(request)
    client = client_address(request)
    wait = ws.limiter.blocked(name, client)
    if wait > 0:
        raise AuthError(429, f"too many failed sign-ins; try again in {int(wait) + 1} s")
    with ws.sessions() as db:
        user = auth.authenticate(db, name, password)
        if user is None:
            ws.limiter.failed(name, client)
            audit.record(db, name[:64] or "?", "login.fail", "user", "", None, {"client": client})
            db.commit()
            raise AuthError(401, "wrong user name or password")
        ws.limiter.succeeded(name)
        token, session = auth.start_session(db, user)
        audit.record(db, user.name, "login", "user", user.id, None, {"client": client})
        db.commit()
        csrf, role = session.csrf, user.role
    set_session_cookie(request, response, token)
    return {"user": name, "role": role, "csrf": csrf}


@router.post("/login")
def api_login(body: Login, request: Request, response: Response) -> dict[str, Any]:
    return login_user(request, response, body.name, body.password)


@router.post("/logout")
def api_logout(
    request: Request, ctx: Annotated[Ctx, Depends(permit("view"))], response: Response
) -> dict[str, Any]:
    with workspace(request).sessions() as db:
        auth.end_session(db, request.cookies.get(auth.COOKIE))
        audit.record(db, ctx.name, "logout", "user", ctx.user.id)
        db.commit()
    response.delete_cookie(auth.COOKIE)
    return {"ok": True}


@router.get("/me")
def me(request: Request) -> dict[str, Any]:
    ctx = signed_in(request)
    return {"user": ctx.name, "role": ctx.user.role, "csrf": ctx.session.csrf,
            "permissions": sorted(p for p in auth.PERMISSIONS if ctx.can(p))}  # fmt: skip


@router.post("/users", status_code=201)
def create_user(
    body: NewUser, request: Request, ctx: Annotated[Ctx, Depends(permit("accounts"))]
) -> dict[str, Any]:
    with workspace(request).sessions() as db:
        user = auth.create_user(db, body.name, body.password, body.role, ctx.name)
        db.commit()
        return {"id": user.id, "name": user.name, "role": user.role}


@router.get("/users")
def list_users(request: Request) -> list[dict[str, Any]]:
    signed_in(request).require("accounts")
    with workspace(request).sessions() as db:
        return [
            {"id": u.id, "name": u.name, "role": u.role, "active": u.active} for u in db.scalars(select(User))
        ]


@router.get("/templates")
def templates(request: Request) -> list[str]:
    signed_in(request)
    return list(ops.template_choices())


@router.get("/studies")
def list_studies(request: Request) -> list[dict[str, Any]]:
    signed_in(request)
    with workspace(request).sessions() as db:
        return [ops.study_dict(s) for s in db.scalars(select(Study).order_by(Study.name))]


@router.post("/studies", status_code=201)
def create_study(
    body: NewStudy, request: Request, ctx: Annotated[Ctx, Depends(permit("study.create"))]
) -> dict[str, Any]:
    with workspace(request).sessions() as db:
        study = ops.create_study(db, ctx.name, body.model_dump())
        db.commit()
        return ops.study_dict(study)


@router.get("/studies/{study_id}")
def get_study(study_id: int, request: Request) -> dict[str, Any]:
    signed_in(request)
    ws = workspace(request)
    with ws.sessions() as db:
        study = ops.get_study(db, study_id)
        runs = db.scalars(select(Run).where(Run.study_id == study_id).order_by(Run.id.desc()))
        uploads = db.scalars(select(Upload).where(Upload.study_id == study_id).order_by(Upload.id))
        codes = blinding.codes_of(db, ws.store, study, ws.blind_secret)
        # names stored before a blinded study's arms were known: masked
        mask = armentry.name_mask(db, ws.store, study)
        return {**ops.study_dict(study), "counts": ops.study_counts(db, study_id),
                "uploads": [armentry.shown_upload(ops.upload_dict(u), mask) for u in uploads],
                "runs": [blinding.blind_run(ops.run_dict(r), codes) for r in runs]}  # fmt: skip


@router.post("/studies/{study_id}/policy")
def set_policy(
    study_id: int, body: Policy, request: Request, ctx: Annotated[Ctx, Depends(permit("policy"))]
) -> dict[str, Any]:
    """Turn the study's four-eyes sign-off rule on or off (administrators; a reason is required)."""
    from cytopipe.serve import signoffpolicy

    with workspace(request).sessions() as db:
        done = signoffpolicy.set_policy(
            db, ops.get_study(db, study_id), ctx.name, body.four_eyes, body.reason
        )
        db.commit()
        return done


@router.post("/studies/{study_id}/batches", status_code=201)
def new_batch(
    study_id: int, body: NewBatch, request: Request, ctx: Annotated[Ctx, Depends(permit("upload"))]
) -> dict[str, Any]:
    ws = workspace(request)
    with ws.sessions() as db:
        study = ops.get_study(db, study_id)
        batch = ops.new_batch(db, ws.config, ws.store, study, ctx.name, body.files, body.bytes)
        db.commit()
        return {"batch_id": batch.id, "max_file_bytes": ws.config.max_file_bytes}


@router.put("/studies/{study_id}/uploads", openapi_extra=_RAW, max_body_size=STREAMED)
async def upload(
    study_id: int, request: Request, ctx: Annotated[Ctx, Depends(permit("upload"))], name: str = Query(..., description="the file's name (a label only)"),
    batch: int | None = Query(None, description="batch id from POST /batches (batch size limit)"),
) -> JSONResponse:  # fmt: skip
    """Upload one FCS file as the raw request body; answers its row: ok / warning / rejected."""
    length = request.headers.get("content-length")
    row = await ops.upload_file(workspace(request), study_id, ctx.name, name, request.stream(),
                                int(length) if length and length.isdigit() else None, batch)  # fmt: skip
    return JSONResponse(row, status_code=200 if row.get("duplicate") else 201)


@router.put("/studies/{study_id}/tables/{kind}", openapi_extra=_RAW, max_body_size=STREAMED)
async def upload_table(
    study_id: int,
    kind: str,
    request: Request,
    ctx: Annotated[Ctx, Depends(permit("upload"))],
    name: str = Query("table.csv"),
) -> dict[str, Any]:
    """The study's clinical table (``kind=clinical``: patient_id, visit, arm, ...) or manifest CSV."""
    return await ops.upload_table(workspace(request), study_id, ctx.name, kind, name, request.stream())


@router.get("/studies/{study_id}/mapping")
def get_mapping(study_id: int, request: Request, pattern: str | None = None) -> list[dict[str, Any]]:
    signed_in(request)
    ws = workspace(request)
    with ws.sessions() as db:
        study = ops.get_study(db, study_id)
        codes = blinding.codes_of(db, ws.store, study, ws.blind_secret)
        rows = armentry.shown_mapping(db, ws.store, study, ops.mapping(db, ws.store, study, pattern))
        return blinding.blind_mapping(rows, study, codes)


@router.post("/studies/{study_id}/mapping")
def confirm_mapping(
    study_id: int, body: Mapping, request: Request, ctx: Annotated[Ctx, Depends(permit("map"))]
) -> dict[str, Any]:
    ws = workspace(request)
    with ws.sessions() as db:
        study = ops.get_study(db, study_id)
        codes = blinding.codes_of(db, ws.store, study, ws.blind_secret)
        rows = blinding.unblind_mapping([r.model_dump() for r in body.rows], study, codes,
                                        ops.stored_arms(db, study))  # fmt: skip
        n = ops.confirm_mapping(db, ws.store, ctx.name, study, rows, body.pattern)
        blinding.assign_codes(db, ws.store, study, ws.blind_secret, ctx.name)  # a new arm: its code, for good
        db.commit()
    return {"confirmed": n}


@router.post("/studies/{study_id}/runs", status_code=201)
def start_run(
    study_id: int,
    request: Request,
    ctx: Annotated[Ctx, Depends(permit("run"))],
    body: RunOptions | None = None,
) -> dict[str, Any]:
    """Start a run; the body (optional) holds the run's options (``missing_markers``)."""
    ws = workspace(request)
    options = body.model_dump() if body is not None else None
    with ws.sessions() as db:
        run = ws.runs.start(db, ops.get_study(db, study_id), ctx.name, options)
    with ws.sessions() as db:
        return ops.run_dict(db.get(Run, run.id))


def run_status(ws: Any, run_id: int) -> dict[str, Any]:
    """The run's row with its progress; in a blinded study arm names in its log and error are coded."""
    with ws.sessions() as db:
        run = db.get(Run, run_id)
        if run is None:
            raise AuthError(404, f"run {run_id} not found")
        shas = dict(db.execute(select(Sample.sample_id, Upload.sha256).join(Upload, Sample.upload_id == Upload.id)
                               .where(Sample.study_id == run.study_id)).all())  # fmt: skip
        codes = blinding.codes_of(db, ws.store, db.get(Study, run.study_id), ws.blind_secret)
        return blinding.blind_run({**ops.run_dict(run), "progress": progress(run, shas)}, codes)


@router.get("/runs/{run_id}")
def get_run(run_id: int, request: Request) -> dict[str, Any]:
    signed_in(request)
    return run_status(workspace(request), run_id)


@router.post("/runs/{run_id}/cancel")
def cancel_run(run_id: int, request: Request, ctx: Annotated[Ctx, Depends(permit("run"))]) -> dict[str, Any]:
    ws = workspace(request)
    with ws.sessions() as db:
        run = db.get(Run, run_id)
        if run is None:
            raise AuthError(404, f"run {run_id} not found")
        ws.runs.cancel(db, run, ctx.name)
        return ops.run_dict(run)


def finished_run(ws: Any, run_id: int) -> tuple[Run, Study, Path]:
    with ws.sessions() as db:
        run = db.get(Run, run_id)
        if run is None:
            raise AuthError(404, f"run {run_id} not found")
        study = db.get(Study, run.study_id)
    return run, study, Path(run.folder) / "out"


def shown_run(ws: Any, run_id: int) -> tuple[Run, Study, Path]:
    """:func:`finished_run`, refused (403) when a blinded study's run folder holds arm names."""
    run, study, out = finished_run(ws, run_id)
    blinding.check_run_folder(study, run_id, out)
    return run, study, out


REPORT_PREPARED = (
    "the report of run {run} is being prepared: it is a new version of a run, whose own report "
    "is written in the background after the version is made (a minute or so). Reload this page"
)


@router.get("/runs/{run_id}/results")
def run_results(run_id: int, request: Request) -> dict[str, Any]:
    signed_in(request)
    ws = workspace(request)
    run, study, out = shown_run(ws, run_id)
    data = results.summary(out, blinded=not blinding.arms_visible(study))
    shown = {k: v for k, v in run_status(ws, run_id).items() if k != "progress"}  # the error coded
    return {"run": shown, **data, "downloads": results.available(out)}


def download(run_id: int, name: str, request: Request, inline: bool = False) -> Response:
    signed_in(request)
    run, _, out = shown_run(workspace(request), run_id)
    if name == "report.html" and reviewops.report_pending(run):
        raise AuthError(409, REPORT_PREPARED.format(run=run_id))
    found = results.download_path(out, name)
    if found is not None:
        disposition = "inline" if inline and name == "report.html" else "attachment"
        return FileResponse(
            found[0], media_type=found[1], filename=found[0].name, content_disposition_type=disposition
        )
    data = results.csv_download(out, name)
    if data is not None:
        return Response(data, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip
    raise AuthError(404, f"{name!r} is not a download of this run (yet)")


class Export(Body):
    population: str = Field(description='a population of the template, e.g. "CD4 T"')
    max_events_per_sample: int | None = Field(None, ge=1)


@router.post("/runs/{run_id}/anndata", status_code=202)
def export_anndata(
    run_id: int, body: Export, request: Request, ctx: Annotated[Ctx, Depends(permit("run"))]
) -> dict[str, Any]:
    """Start writing the population's events of every sample as one AnnData ``.h5ad`` (a worker
    process); it appears in the run's downloads as ``<population>.h5ad`` when done."""
    ws = workspace(request)
    run, _, out = shown_run(ws, run_id)
    if run.status != "finished":
        raise AuthError(409, f"run {run_id} is {run.status}; export the events of a finished run")
    with ws.sessions() as db:
        name = ws.runs.export_anndata(db, run, body.population, body.max_events_per_sample, ctx.name)
    return {"file": name, "status": "started"}


@router.get("/runs/{run_id}/files/{name}")
def api_download(run_id: int, name: str, request: Request, inline: bool = False) -> Response:
    """report.html (``inline=true`` to view it), *.parquet, *.csv (escaped against formula injection),
    run.json, catalog.duckdb."""
    return download(run_id, name, request, inline)


@router.get("/runs/{run_id}/files/report_tables/{name}")
def api_report_table(run_id: int, name: str, request: Request) -> Response:
    """A CSV table of the run's report (the report's own CSV links, relative to report.html)."""
    return download(run_id, f"{results.REPORT_TABLES}/{name}", request)


@router.get("/audit")
def audit_log(
    request: Request, limit: int = Query(200, le=5000), before: int | None = None
) -> list[dict[str, Any]]:
    signed_in(request)
    ws = workspace(request)
    with ws.sessions() as db:
        q = select(Audit).order_by(Audit.id.desc()).limit(limit)
        if before:
            q = q.where(Audit.id < before)
        return blinding.blind_audit(db, [audit.as_dict(r) for r in db.scalars(q)], ws.blind_secret, ws.store)
