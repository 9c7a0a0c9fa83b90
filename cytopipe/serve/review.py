"""Gate review routes: the review page of a run (``/runs/{id}/review``), the audit verification and
exports, and the same actions as JSON (``/api/runs/{id}/review/...``). Operations live in
:mod:`.reviewops`; the page's script is ``static/review.js``."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import Field
from sqlalchemy import select

from cytopipe.errors import ReviewError
from cytopipe.review.decisions import Decision
from cytopipe.serve import audit, blinding, reviewops
from cytopipe.serve.auth import AuthError
from cytopipe.serve.db import Audit, Template, User
from cytopipe.serve.deps import Body, Ctx, page, permit, signed_in, workspace

api = APIRouter(prefix="/api", tags=["review"])
web = APIRouter(include_in_schema=False)


class GateChange(Body):
    sample_id: str
    population: str
    kind: str = Field("override", description="override | pooled | revert")
    params: dict[str, Any] = Field(default_factory=dict, description='e.g. {"CD25 >=": 3.1}')
    reason: str = ""
    category: str = ""
    sample_ids: list[str] | None = Field(
        None, description="a group override: the same change for each of these samples (one audit entry)"
    )


class Approval(Body):
    scope: str = Field("one", description="one | unflagged | run")
    population: str | None = None
    sample_id: str | None = None


class SignOff(Body):
    password: str
    meaning: str = reviewops.SIGNOFF_MEANING


def _finite(value: Any) -> bool:
    """A finite number, or a (nested) list of them (a polygon's vertices, an ellipse's centre)."""
    if isinstance(value, list):
        return bool(value) and all(_finite(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _decision(body: GateChange, user: str) -> Decision:
    for name, value in body.params.items():
        if not _finite(value):
            shown = json.dumps(value, allow_nan=True)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise AuthError(
                400, f"gate number {name!r} must be a finite number (or a list of them), not {shown}"
            )
    try:
        return Decision(kind=body.kind, sample_id=body.sample_id, population=body.population, user=user,
                        params=body.params, reason=body.reason.strip(), category=body.category.strip())  # fmt: skip
    except ReviewError as exc:
        raise AuthError(400, str(exc)) from None


@api.get("/runs/{run_id}/review")
def review_queue(run_id: int, request: Request, population: str | None = None) -> dict[str, Any]:
    """The review queue of one population: every sample's gate, flagged and outlying first."""
    signed_in(request)
    with workspace(request).sessions() as db:
        run, study = reviewops.finished(db, run_id)
        return reviewops.queue(db, run, study, population, blinding.arms_visible(study))


@api.get("/runs/{run_id}/review/gate")
def review_gate(run_id: int, request: Request, sample_id: str, population: str) -> dict[str, Any]:
    """One sample's gate drawn over its parent's density (SVG) with the histograms behind it."""
    signed_in(request)
    with workspace(request).sessions() as db:
        run, _ = reviewops.finished(db, run_id)
    return reviewops.gate_view(run, sample_id, population)


@api.post("/runs/{run_id}/review/preview")
def review_preview(
    run_id: int, body: GateChange, request: Request, ctx: Annotated[Ctx, Depends(permit("review"))]
) -> dict[str, Any]:
    """The exact count and % of parent of a gate change, without saving it."""
    body.reason = body.reason or "preview"
    with workspace(request).sessions() as db:
        return reviewops.preview(db, run_id, _decision(body, ctx.name))


@api.post("/runs/{run_id}/review/change")
def review_change(
    run_id: int, body: GateChange, request: Request, ctx: Annotated[Ctx, Depends(permit("review"))]
) -> dict[str, Any]:
    """Override a gate (new numbers), use the patient's pooled gate, or revert; a reason is required.
    With ``sample_ids`` the same change applies to that group of samples (one audit entry)."""
    with workspace(request).sessions() as db:
        if body.sample_ids:
            group = [_decision(body.model_copy(update={"sample_id": s}), ctx.name) for s in body.sample_ids]
            return reviewops.change_group(db, run_id, ctx.name, group)
        return reviewops.change_gate(db, run_id, ctx.name, _decision(body, ctx.name))


@api.post("/runs/{run_id}/review/approve")
def review_approve(
    run_id: int, body: Approval, request: Request, ctx: Annotated[Ctx, Depends(permit("review"))]
) -> dict[str, Any]:
    with workspace(request).sessions() as db:
        return reviewops.approve(db, run_id, ctx.name, body.scope, body.population, body.sample_id)


@api.post("/runs/{run_id}/signoff")
def review_signoff(
    run_id: int, body: SignOff, request: Request, ctx: Annotated[Ctx, Depends(permit("signoff"))]
) -> dict[str, Any]:
    """Electronic signature of the run's gating (the signer's password again); locks the gates."""
    with workspace(request).sessions() as db:
        user = db.get(User, ctx.user.id)
        return reviewops.signoff(db, run_id, user, body.password, body.meaning or reviewops.SIGNOFF_MEANING)


@api.post("/runs/{run_id}/versions", status_code=201)
def review_new_version(
    run_id: int, request: Request, ctx: Annotated[Ctx, Depends(permit("review"))]
) -> dict[str, Any]:
    """A new, unlocked version of a run (its outputs and overrides carried over)."""
    with workspace(request).sessions() as db:
        new = reviewops.new_version(db, run_id, ctx.name)
        return {"id": new.id, "parent": run_id}


@api.get("/runs/{run_id}/review/examples")
def review_examples(
    run_id: int, request: Request, format: str = Query("yaml", pattern="^(yaml|json)$")
) -> Response:
    """The approved and overridden gates of the run as an ``--examples`` file."""
    from cytopipe.review.examples import examples, examples_text

    signed_in(request)
    with workspace(request).sessions() as db:
        run, _ = reviewops.finished(db, run_id)
        st = reviewops.state(db, run_id)
    data = examples(reviewops.out_dir(run), st)
    media = "application/json" if format == "json" else "application/yaml"
    return Response(examples_text(data, format), media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="run{run_id}_examples.{format}"'})  # fmt: skip


@api.get("/audit/verify")
def audit_verify(request: Request) -> dict[str, Any]:
    signed_in(request)
    ws = workspace(request)
    with ws.sessions() as db:  # the newest entry's hash is hidden when it covers a blinded study's arms
        ok, n, message = blinding.chain_status(db, ws.blind_secret, ws.store)
    return {"ok": ok, "entries": n, "message": message}


@api.get("/audit/export")
def audit_export(request: Request, format: str = Query("csv", pattern="^(csv|json)$")) -> Response:
    """The whole audit trail as CSV (cells escaped against formula injection) or JSON."""
    from cytopipe.serve.auditexport import export_text

    signed_in(request)
    ws = workspace(request)
    with ws.sessions() as db:
        rows = blinding.blind_audit(db, [audit.as_dict(r) for r in db.scalars(select(Audit).order_by(Audit.id))],
                                    ws.blind_secret, ws.store)  # fmt: skip
    media = "text/csv; charset=utf-8" if format == "csv" else "application/json"
    return Response(export_text(rows, format), media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="audit.{format}"'})  # fmt: skip


@web.get("/runs/{run_id}/review", response_class=HTMLResponse)
def review_page(run_id: int, request: Request, population: str | None = None) -> HTMLResponse:
    ctx = signed_in(request)
    with workspace(request).sessions() as db:
        run, study = reviewops.finished(db, run_id)
        q = reviewops.queue(db, run, study, population, blinding.arms_visible(study))
        template = db.get(Template, run.template_id) if run.template_id else None
    return page(request, "review.html", ctx, run=run, study=study, q=q, q_json=json.dumps(q), template=template,
                can_review=ctx.can("review"), can_signoff=ctx.can("signoff"), ctx_role=ctx.user.role)  # fmt: skip
