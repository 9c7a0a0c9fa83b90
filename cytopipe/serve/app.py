"""The ASGI application of ``cytopipe serve``: configuration, database, auth dependencies,
error pages and security headers. Routes live in :mod:`.web` (HTML) and :mod:`.api` (JSON)."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import MutableHeaders

from cytopipe import __version__
from cytopipe.serve import auth
from cytopipe.serve.auth import AuthError
from cytopipe.serve.db import Session, User, open_database
from cytopipe.serve.runs import RunError, RunManager
from cytopipe.serve.storage import BlobStore, UploadRefused

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent
# report.html is self-contained (inline styles, scripts, data: images): its own policy, sandboxed
# (no access to the workspace's cookies or pages)
REPORT_CSP = "sandbox allow-scripts; default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


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
        self.runs = RunManager(config.data_dir, self.sessions, self.store, config.scheduler_address)
        self.limiter = auth.RateLimiter(config.login_limit, config.login_window)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals["version"] = __version__


def create_app(config: Config) -> FastAPI:
    ws = Workspace(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ws.runs.watch()
        yield
        ws.runs.close()
        ws.engine.dispose()

    app = FastAPI(
        title="cytopipe workspace",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger UI loads from a CDN; /api/docs is a page of our own
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.ws = ws
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    app.add_middleware(SecurityHeaders)

    def _error(request: Request, status: int, message: str):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=status)
        if status == 401:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return ws.templates.TemplateResponse(
            request, "error.html", {"status": status, "message": message, "user": None}, status_code=status
        )

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError):
        return _error(request, exc.status, exc.message)

    @app.exception_handler(RunError)
    async def _run_error(request: Request, exc: RunError):
        return _error(request, exc.status, exc.message)

    @app.exception_handler(UploadRefused)
    async def _upload_error(request: Request, exc: UploadRefused):
        return _error(request, exc.status, exc.message)

    from cytopipe.serve import api, review, templateops, web

    app.include_router(api.router)
    app.include_router(review.api)
    app.include_router(web.router)
    app.include_router(review.web)
    app.include_router(templateops.api)
    app.include_router(templateops.web)
    return app


class SecurityHeaders:
    """CSP and friends on every response, and a Server-Timing header. A plain ASGI middleware:
    Starlette's BaseHTTPMiddleware would funnel every upload's body through an extra stream."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if path.endswith("/files/report.html"):
                    headers["Content-Security-Policy"] = REPORT_CSP
                else:
                    headers["Content-Security-Policy"] = CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "same-origin"
                headers.setdefault("Cache-Control", "no-store")
                headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.1f}"
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- dependencies shared by the routers ---------------------------------------------------------
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
    given = csrf or request.headers.get("x-csrf-token")
    if not auth.csrf_ok(ctx.session, given):
        raise AuthError(403, "missing or wrong CSRF token: reload the page and try again")
    ctx.require(permission)
    return ctx


def set_session_cookie(request: Request, response: Any, token: str) -> None:
    secure = request.url.scheme == "https"
    response.set_cookie(
        auth.COOKIE, token, httponly=True, samesite="strict", secure=secure, max_age=auth.SESSION_HOURS * 3600
    )


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def page(request: Request, name: str, ctx: Ctx | None, status: int = 200, **values: Any) -> HTMLResponse:
    values.setdefault("csrf", ctx.session.csrf if ctx else "")
    return workspace(request).templates.TemplateResponse(
        request, name, {"user": ctx.user if ctx else None, "ctx": ctx, **values}, status_code=status
    )
