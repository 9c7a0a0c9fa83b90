"""What the routers share, below :mod:`.app` so imports flow one way (app -> routers -> deps):
the workspace's configuration and state, and the request dependencies (signed-in user, CSRF
check, session cookie, page rendering)."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.routing import iter_route_contexts
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from cytopipe import __version__
from cytopipe.serve import auth
from cytopipe.serve.auth import AuthError
from cytopipe.serve.blinding import workspace_secret
from cytopipe.serve.db import Session, User, open_database
from cytopipe.serve.runs import RunManager
from cytopipe.serve.storage import BlobStore, UploadRefused

HERE = Path(__file__).parent
# the largest body of a request (a form, a JSON body): the app's default (``FastAPI(max_body_size=)``);
# a template's YAML, the largest of them, is at most 2 MB
MAX_REQUEST_BYTES = 4 << 20
# the ``max_body_size`` of a route that streams its body to disk and counts it against its own
# limit (the FCS uploads: --max-file-size and the batch's; the tables: ops.MAX_TABLE_BYTES)
STREAMED = sys.maxsize
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# the state-changing routes anyone may call: signing in (there is no session yet). The sign-in
# page's form echoes its own token (a pre-login cookie); the API's takes JSON only, which another
# site's page cannot send without the browser asking first
SIGN_IN = frozenset({"/login", "/api/login"})
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


@dataclass
class Config:
    data_dir: Path
    database_url: str
    max_file_bytes: int = 2 << 30
    max_batch_bytes: int = 50 << 30
    scheduler_address: str | None = None
    login_limit: int = 5
    login_window: float = 300.0


class Workspace:
    """What the routes share: database sessions, blob store, runs, login limiter, templates."""

    def __init__(self, config: Config):
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine, self.sessions = open_database(config.database_url)
        self.store = BlobStore(config.data_dir)
        self.blind_secret = workspace_secret(config.data_dir)  # codes of blinded studies' arms
        self.runs = RunManager(config.data_dir, self.sessions, self.store, config.scheduler_address)
        self.limiter = auth.RateLimiter(config.login_limit, config.login_window)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals["version"] = __version__
        self.templates.env.filters["readable_json"] = readable_json


class Body(BaseModel):
    """A JSON request body: a key it does not know is refused (422 naming it), never ignored."""

    model_config = ConfigDict(extra="forbid")


def workspace(request: Request) -> Workspace:
    return request.app.state.ws


class Ctx:
    """The signed-in user of a request and their session."""

    def __init__(self, user: User, session: Session):
        self.user, self.session = user, session

    @property
    def name(self) -> str:
        return self.user.name

    def can(self, permission: str) -> bool:
        return auth.allowed(self.user.role, permission)

    def require(self, permission: str) -> None:
        if not self.can(permission):
            raise AuthError(403, f"your role ({self.user.role}) does not allow this ({permission})")


def signed_in(request: Request) -> Ctx:
    """The request's user, or 401 (a redirect to the login page for HTML pages)."""
    ws = workspace(request)
    with ws.sessions() as db:
        found = auth.lookup_session(db, request.cookies.get(auth.COOKIE))
    if found is None:
        raise AuthError(401, "sign in first")
    return Ctx(*found)


def state_change(request: Request, permission: str, csrf: str | None = None) -> Ctx:
    """A signed-in user with ``permission`` whose request carries the session's CSRF token
    (form field ``csrf`` or header ``X-CSRF-Token``)."""
    ctx = signed_in(request)
    too_long(request)
    given = csrf or request.headers.get("x-csrf-token")
    if not auth.csrf_ok(ctx.session, given):
        raise AuthError(403, "missing or wrong CSRF token: reload the page and try again")
    ctx.require(permission)
    return ctx


def permit(permission: str) -> Callable[[Request], Awaitable[Ctx]]:
    """The dependency of every state-changing route (``ctx: Annotated[Ctx, Depends(permit(...))]``):
    :func:`state_change` before the route runs, and before its body is validated (an anonymous or
    token-less request is refused as such, not as a malformed one). A page's form sends the token as
    its ``csrf`` field, the API as the ``X-CSRF-Token`` header (its uploads' bodies are never read
    here). :func:`unguarded` finds a route without it; the app refuses to start with one."""

    async def check(request: Request) -> Ctx:
        csrf = None
        form = request.headers.get("content-type", "").startswith(_FORMS)
        if form and not request.url.path.startswith("/api/") and "x-csrf-token" not in request.headers:
            # kept by the request for the route; a field may be as large as the request (the
            # parser's default, 1 MB per field, refused a 1.5 MB template typed into its text box)
            form_data = await request.form(max_part_size=MAX_REQUEST_BYTES)
            csrf = str(form_data.get("csrf") or "")
        return await run_in_threadpool(state_change, request, permission, csrf)

    check.permission = permission  # what :func:`unguarded` looks for
    return check


def unguarded(routes: Iterable[Any]) -> list[str]:
    """``METHOD path`` of each state-changing route that asks for no permission (:func:`permit`)
    and is not a sign-in route (:data:`SIGN_IN`)."""
    found = []
    for route in iter_route_contexts(list(routes)):
        methods = sorted((route.methods or set()) & STATE_CHANGING)
        if not methods or route.path in SIGN_IN:
            continue
        dependant = getattr(route, "dependant", None)
        calls = [d.call for d in dependant.dependencies] if dependant is not None else []
        if not any(getattr(call, "permission", None) for call in calls):
            found += [f"{method} {route.path}" for method in methods]
    return found


def too_long(request: Request) -> None:
    """413 when the request declares a body over its route's limit: refused before anything
    changes, also by a route that never reads its body (which the limit alone would answer 413
    only after the change)."""
    limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
    length = request.headers.get("content-length", "")
    if limit is not None and length.isdigit() and int(length) > limit:
        raise UploadRefused(413, f"the request ({int(length) / 1e6:.1f} MB) is larger than the limit of "
                                 f"{limit / 1e6:.1f} MB of this page or API call")  # fmt: skip


def set_session_cookie(request: Request, response: Any, token: str) -> None:
    secure = request.url.scheme == "https"
    response.set_cookie(
        auth.COOKIE, token, httponly=True, samesite="strict", secure=secure, max_age=auth.SESSION_HOURS * 3600
    )


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def readable_json(value: Any) -> str:
    """JSON as a person reads it (``{"FOXP3 >=": 2.5}``, accents kept), escaped by the page like any
    text; Jinja's ``tojson`` writes ``>`` as ``\\u003e`` for scripts, which the audit page showed."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def page(request: Request, name: str, ctx: Ctx | None, status: int = 200, **values: Any) -> HTMLResponse:
    values.setdefault("csrf", ctx.session.csrf if ctx else "")
    return workspace(request).templates.TemplateResponse(
        request, name, {"user": ctx.user if ctx else None, "ctx": ctx, **values}, status_code=status
    )
