"""The ASGI application of ``cytopipe serve``: error pages, security headers and the routers.
Routes live in :mod:`.web` (HTML) and :mod:`.api` (JSON); the configuration, workspace and auth
dependencies they share live in :mod:`.deps`."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException

from cytopipe import __version__
from cytopipe.errors import ServeError
from cytopipe.serve import api, review, templateops, web
from cytopipe.serve.auth import AuthError, dummy_hash
from cytopipe.serve.blinding import store_codes

# the routers' shared dependencies live in .deps (below the routers); re-exported here so the
# old import paths (``from cytopipe.serve.app import Config``) keep working
from cytopipe.serve.deps import (  # noqa: F401
    MAX_REQUEST_BYTES,
    Config,
    Ctx,
    Workspace,
    client_address,
    page,
    set_session_cookie,
    signed_in,
    state_change,
    unguarded,
    workspace,
)
from cytopipe.serve.runs import RunError
from cytopipe.serve.storage import UploadRefused

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent
# report.html is self-contained (inline styles, scripts, data: images): its own policy, sandboxed
# (no access to the workspace's cookies or pages)
REPORT_CSP = "sandbox allow-scripts; default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def create_app(config: Config) -> FastAPI:
    ws = Workspace(config)
    dummy_hash()  # now, not at the first sign-in of an unknown name (which would take longer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store_codes(ws.sessions, ws.store, ws.blind_secret)  # codes shown before they were stored: kept
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
        # every request body is limited; the routes that stream uploads to disk set their own
        # (``max_body_size=STREAMED``) and count against the workspace's limits
        max_body_size=MAX_REQUEST_BYTES,
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

    @app.exception_handler(413)
    async def _too_large(request: Request, exc: HTTPException):
        # the body limit's own answer ("Content Too Large"), with the limit named
        return _error(request, 413, f"the request is larger than the limit of {MAX_REQUEST_BYTES / 1e6:.1f} MB "
                                    "of a form or API call; FCS files and tables are uploaded with PUT")  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        # FastAPI's 422 list, with a key the request does not know named in its message
        errors = []
        for e in exc.errors():
            if e.get("type") == "extra_forbidden" and e.get("loc"):
                e = {**e, "msg": f"unknown field {e['loc'][-1]!r}: not a field of this request (a typo?)"}
            errors.append(e)
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    app.include_router(api.router)
    app.include_router(review.api)
    app.include_router(web.router)
    app.include_router(review.web)
    app.include_router(templateops.api)
    app.include_router(templateops.web)
    missing = unguarded(app.routes)
    if missing:  # a route that changes state without asking for a permission: refused at start-up
        raise ServeError(f"state-changing routes without a permission check: {', '.join(missing)}; "
                         "give each a `ctx: Annotated[Ctx, Depends(permit(...))]` parameter (deps.permit)")  # fmt: skip
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
