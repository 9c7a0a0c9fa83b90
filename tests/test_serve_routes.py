"""Every state-changing route of `cytopipe serve`, as the application lists them (not as a test
types them), against a real server (SQLite and PostgreSQL): an anonymous request, one without
the session's CSRF token and one with a forged token are refused by the sign-in / CSRF check, and
a viewer (the lowest role) with a valid token by the role check, unless the route only changes the
caller's own session (:data:`SELF_SERVICE`); a body over its limit is refused on every route; and
every route with a cheap happy path writes an audit entry when it succeeds.

A new POST/PUT/PATCH/DELETE route shows up here by itself: it needs a body in :data:`BODIES` that
reaches its checks and a happy path in :data:`HAPPY` (or a reason in :data:`NO_CHEAP_HAPPY_PATH`),
else these tests fail naming it."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from tests import serve_support
from tests.pipeline_support import TEMPLATE
from tests.serve_support import PASSWORD, STUDY, Client, trial_files, trial_manifest

backend = serve_support.backend
server = serve_support.server
SERVE_USERS = {"ana": "analyst", "vic": "viewer"}
FILE_LIMIT = 1_000_000
SERVE_ARGS = ("--max-file-size", "1MB")

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
# anyone may call these (no session yet), with the reason
ANONYMOUS = {
    ("POST", "/login"): "signs in; the sign-in page's own token (pre-login cookie) is its CSRF check",
    ("POST", "/api/login"): "signs in; takes JSON only, which a cross-site form cannot send",
}
# a viewer with a valid token may call these: they change only the caller's own session
SELF_SERVICE = {
    ("POST", "/logout"): "signs the caller out",
    ("POST", "/api/logout"): "signs the caller out",
}
# no cheap happy path here, with the reason (the audit entries of these are checked where named)
NO_CHEAP_HAPPY_PATH = {
    ("POST", "/api/runs/{run_id}/review/preview"): "changes nothing: counts a gate change without saving it",
    ("POST", "/api/runs/{run_id}/review/change"): "a finished run: test_review_serve.py (review.override)",
    ("POST", "/api/runs/{run_id}/review/approve"): "a finished run: test_review_serve.py (review.approve)",
    ("POST", "/api/runs/{run_id}/signoff"): "a finished run: test_review_serve.py (review.signoff)",
    ("POST", "/api/runs/{run_id}/versions"): "a finished run: test_review_serve.py (run.version)",
    ("POST", "/api/runs/{run_id}/anndata"): "a finished run: test_serve_runs.py (run.export)",
    ("POST", "/runs/{run_id}/anndata"): "a finished run; the API's RunManager.export_anndata (run.export)",
}  # fmt: skip
_names = itertools.count(1)


def _unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


def _yaml_edit() -> str:
    return TEMPLATE.read_text() + f"\n# edit {next(_names)}\n"


def _clinical(trial: Path) -> bytes:
    return (trial / "clinical.csv").read_bytes()


# a body that passes each route's validation, so that a request reaches the route's own checks
# (a 404 or 422 first would hide a missing one): json / data (an HTML form) / content (raw) / params
Body = Callable[[dict[str, Any]], dict[str, Any]]
BODIES: dict[tuple[str, str], Body] = {
    ("POST", "/login"): lambda o: {"data": {"name": "vic", "password": PASSWORD}},
    ("POST", "/api/login"): lambda o: {"json": {"name": "vic", "password": PASSWORD}},
    ("POST", "/logout"): lambda o: {"data": {}},
    ("POST", "/api/logout"): lambda o: {},
    ("POST", "/users"): lambda o: {"data": {"name": _unique("u"), "password": PASSWORD, "role": "viewer"}},
    ("POST", "/api/users"): lambda o: {"json": {"name": _unique("u"), "password": PASSWORD, "role": "viewer"}},
    ("POST", "/studies"): lambda o: {"data": {"name": _unique("study "), "template": TEMPLATE.name, "seed": "0",
                                              "workers": "1", "four_eyes": "on"}},
    ("POST", "/api/studies"): lambda o: {"json": {"name": _unique("study "), **STUDY}},
    ("POST", "/studies/{study_id}/policy"): lambda o: {"data": {"reason": "routes test", **(
        {} if o["four_eyes"] else {"four_eyes": "on"})}},
    ("POST", "/api/studies/{study_id}/policy"): lambda o: {"json": {"four_eyes": not o["four_eyes"],
                                                                    "reason": "routes test"}},
    ("POST", "/api/studies/{study_id}/batches"): lambda o: {"json": {"files": 1, "bytes": 10}},
    ("PUT", "/api/studies/{study_id}/uploads"): lambda o: {"params": {"name": "a.fcs"}, "content": o["fcs"]},
    ("PUT", "/api/studies/{study_id}/tables/{kind}"): lambda o: {"params": {"name": "clinical.csv"},
                                                                 "content": o["clinical"]},
    ("POST", "/studies/{study_id}/mapping"): lambda o: {"data": {
        k: [str(r[k]) for r in o["rows"]] for k in ("upload_id", "sample_id", "patient_id", "visit", "arm")
    } | {"pattern": STUDY.get("pattern", "{patient}_W{visit}.fcs")}},
    ("POST", "/api/studies/{study_id}/mapping"): lambda o: {"json": {"rows": o["rows"]}},
    ("POST", "/studies/{study_id}/runs"): lambda o: {"data": {"missing_markers": "stop"}},
    ("POST", "/api/studies/{study_id}/runs"): lambda o: {"json": {"missing_markers": "stop"}},
    ("POST", "/runs/{run_id}/cancel"): lambda o: {"data": {}},
    ("POST", "/api/runs/{run_id}/cancel"): lambda o: {},
    ("POST", "/runs/{run_id}/anndata"): lambda o: {"data": {"population": "CD4 T"}},
    ("POST", "/api/runs/{run_id}/anndata"): lambda o: {"json": {"population": "CD4 T"}},
    ("POST", "/api/runs/{run_id}/review/preview"): lambda o: {"json": {
        "sample_id": o["sample"], "population": "CD4 T", "kind": "revert", "reason": "routes test"}},
    ("POST", "/api/runs/{run_id}/review/change"): lambda o: {"json": {
        "sample_id": o["sample"], "population": "CD4 T", "kind": "revert", "reason": "routes test"}},
    ("POST", "/api/runs/{run_id}/review/approve"): lambda o: {"json": {"scope": "run"}},
    ("POST", "/api/runs/{run_id}/signoff"): lambda o: {"json": {"password": PASSWORD}},
    ("POST", "/api/runs/{run_id}/versions"): lambda o: {},
    ("POST", "/studies/{study_id}/template"): lambda o: {"data": {"yaml": _yaml_edit(), "reason": "routes test"}},
    ("POST", "/api/studies/{study_id}/templates"): lambda o: {"json": {"yaml": _yaml_edit(), "reason": "routes test"}},
}  # fmt: skip


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> list[tuple[str, str]]:
    """(method, path) of every state-changing route of the application, from the app object."""
    from cytopipe.serve.app import Config, create_app

    data = tmp_path_factory.mktemp("routes") / "data"
    app = create_app(Config(data_dir=data, database_url=f"sqlite:///{data / 'routes.sqlite'}"))
    app.state.ws.engine.dispose()
    found = sorted(
        (method, r.path)
        for r in iter_route_contexts(app.routes)
        for method in (r.methods or set()) & STATE_CHANGING
    )
    assert len(found) >= 25 and ("PUT", "/api/studies/{study_id}/uploads") in found  # the list is the app's
    return found


@pytest.fixture(scope="module")
def objects(server, serve_trial) -> dict[str, Any]:
    """Real objects for the routes' path parameters: a study with two samples mapped, a (cancelled) run."""
    admin = server.client()
    sid = admin.post("/api/studies", json={"name": "routes study", **STUDY}, headers=admin.h).json()["id"]
    files = trial_files(serve_trial)
    for f in files[:2]:
        assert admin.upload(sid, f).status_code == 201
    arms = trial_manifest(serve_trial).set_index("sample_id")["arm"]
    rows = admin.get(f"/api/studies/{sid}/mapping").json()
    rows = [{k: r[k] for k in ("upload_id", "sample_id", "patient_id", "visit")} | {"arm": arms[r["sample_id"]]}
            for r in rows]  # fmt: skip
    assert admin.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=admin.h).status_code == 200
    run = admin.post(f"/api/studies/{sid}/runs", headers=admin.h)
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    assert admin.post(f"/api/runs/{run_id}/cancel", headers=admin.h).status_code == 200
    return {"study_id": sid, "run_id": run_id, "kind": "clinical", "rows": rows, "sample": rows[0]["sample_id"],
            "fcs": files[2].read_bytes(), "clinical": _clinical(serve_trial), "four_eyes": True}  # fmt: skip


def _url(path: str, objects: dict[str, Any]) -> str:
    def value(m: re.Match) -> str:
        if m.group(1) not in objects:
            pytest.fail(f"{path}: no real object for the path parameter {m.group(1)!r} in objects()")
        return str(objects[m.group(1)])

    return re.sub(r"{(\w+)}", value, path)


def _send(client: httpx.Client, route: tuple[str, str], objects: dict[str, Any], token: str | None,
          **override: Any) -> httpx.Response:  # fmt: skip
    """The route's request (its body from BODIES), with the CSRF token where the route's callers put
    it (API: the header; HTML form: its csrf field) or without one (``token=None``)."""
    method, path = route
    if route not in BODIES:
        pytest.fail(f"{method} {path}: a new state-changing route; give it a body in BODIES that passes its "
                    "validation, so that this test reaches its sign-in, CSRF and role checks")  # fmt: skip
    req = BODIES[route](objects) | override
    if path.startswith("/api/"):
        headers = {"X-CSRF-Token": token} if token is not None else {}
    else:
        headers = {}
        if token is not None:
            req["data"] = {**(req.get("data") or {}), "csrf": token}
    return client.request(method, _url(path, objects), headers=headers, follow_redirects=False, **req)


def _refused(r: httpx.Response, route: tuple[str, str], status: int, words: str) -> str | None:
    """None when ``r`` is the check's refusal (its status and message), else what went wrong."""
    method, path = route
    if path.startswith("/api/"):
        detail = (
            r.json().get("detail")
            if r.headers.get("content-type", "").startswith("application/json")
            else r.text
        )
        if r.status_code == status and words in str(detail):
            return None
    elif status == 401:
        if r.status_code == 303 and r.headers["location"].startswith("/login?next="):
            return None
    elif r.status_code == status and words in r.text:
        return None
    return f"{method} {path}: {r.status_code} {r.text[:200]!r} (expected {status} '{words}')"


# no body at all: the checks come before the body's validation (no 422 in their place)
EMPTY = {"json": None, "data": None, "content": None, "files": None, "params": None}


# PostgreSQL under -m slow only: the sign-in, CSRF and role checks are the same Python on both (a
# session row read by its key, then compared); on PostgreSQL in the default suite they run in
# test_serve_api.py (anonymous, CSRF and viewer refusals) and in this module's audit-trail test
@serve_support.POSTGRESQL_SLOW
def test_every_state_change_checks_sign_in_csrf_and_role(server, routes, objects):
    admin, viewer = server.client(), server.client("vic")
    forged = "forged" + admin.h["X-CSRF-Token"][6:]
    problems = []
    for route, body in itertools.product(routes, ({}, EMPTY)):
        if route in ANONYMOUS:
            continue
        anonymous = Client(server.url, None)
        problems.append(_refused(_send(anonymous, route, objects, None, **body), route, 401, "sign in first"))
        problems.append(
            _refused(_send(anonymous, route, objects, "forged", **body), route, 401, "sign in first")
        )
        problems.append(_refused(_send(admin, route, objects, None, **body), route, 403, "CSRF token"))
        problems.append(_refused(_send(admin, route, objects, forged, **body), route, 403, "CSRF token"))
        if route not in SELF_SERVICE:
            problems.append(_refused(_send(viewer, route, objects, viewer.h["X-CSRF-Token"], **body), route, 403,
                                     "your role (viewer) does not allow"))  # fmt: skip
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


def test_the_sign_in_routes_are_the_only_anonymous_ones(server, routes, objects):
    # the sign-in page's form: its own token (the pre-login cookie's), else refused
    anonymous = Client(server.url, None)
    r = anonymous.post("/login", data={"name": "vic", "password": PASSWORD, "csrf": "forged"})
    assert r.status_code == 403 and "CSRF token" in r.text
    # the API's sign-in takes JSON only: a form (what another site's page can send) is refused
    r = anonymous.post("/api/login", data={"name": "vic", "password": PASSWORD})
    assert r.status_code == 422 and "cytopipe_session" not in r.headers.get("set-cookie", "")
    assert set(ANONYMOUS) <= set(routes) and set(SELF_SERVICE) <= set(routes)  # the lists name real routes


# the bodies over each route's limit: the streamed uploads count against their own limits
OVER_LIMIT = {
    ("PUT", "/api/studies/{study_id}/uploads"): lambda: {"params": {"name": "big.fcs"},
                                                         "content": b"FCS3.1" + b"0" * FILE_LIMIT},
    ("PUT", "/api/studies/{study_id}/tables/{kind}"): lambda: {
        "params": {"name": "big.csv"}, "content": b"patient_id,visit,arm\n" + b"P1,0,A\n" * (3 << 20)},
}  # fmt: skip


@serve_support.POSTGRESQL_SLOW  # the same database work on PostgreSQL runs in the default suite in the other tests of this module (the limits are checked before any database work)
def test_every_route_refuses_a_body_over_its_limit(server, routes, objects):
    from cytopipe.serve.deps import MAX_REQUEST_BYTES

    filler = "x" * (MAX_REQUEST_BYTES + 1)
    # a session of its own for each route (a sign-out taken is not the next route's), signed in first:
    # then the refused requests are to add nothing to the audit trail
    clients = {route: server.client() for route in routes}
    admin = server.client()
    entries = _entries(admin)
    problems = []
    for route in routes:
        method, path = route
        if route in OVER_LIMIT:
            over = OVER_LIMIT[route]()
        elif path.startswith("/api/"):
            over = {"json": {**BODIES[route](objects).get("json", {}), "filler": filler}}
        else:  # an HTML form: a file part (what a template upload sends) over the limit
            over = {
                "data": BODIES[route](objects).get("data", {}),
                "files": {"template_file": ("t.yaml", filler)},
            }
        r = _send(clients[route], route, objects, clients[route].h["X-CSRF-Token"], **over)
        if r.status_code != 413:
            problems.append(f"{method} {path}: {r.status_code} {r.text[:200]!r} for a body over its limit")
    assert not problems, "\n".join(problems)
    # a template over its own limit (2 MB), within the request's, is refused: never cut short
    big = TEMPLATE.read_text() + ("#" * 999 + "\n") * ((2 << 20) // 1000)
    for route, over in (
        (("POST", "/studies"), {"files": {"template_file": ("big.yaml", big)}}),
        (("POST", "/studies/{study_id}/template"), {"files": {"template_file": ("big.yaml", big)}}),
        (("POST", "/api/studies"), {"json": {"name": "big template", **STUDY, "template_yaml": big}}),
        (("POST", "/api/studies/{study_id}/templates"), {"json": {"yaml": big, "reason": "big"}}),
    ):
        r = _send(admin, route, objects, admin.h["X-CSRF-Token"], **over)
        assert r.status_code == 413 and "larger than 2 MB" in r.text, (route, r.status_code, r.text[:300])
    assert _entries(admin) == entries  # nothing refused was done
    # a template typed into the page's text box may be as large as an uploaded one (2 MB): the form
    # parser's own 1 MB limit per field answered 400 "Part exceeded maximum size" at 1.5 MB
    typed = TEMPLATE.read_text() + ("# " + "x" * 997 + "\n") * 1500
    r = _send(admin, ("POST", "/studies/{study_id}/template"), objects, admin.h["X-CSRF-Token"],
              data={"yaml": typed, "reason": "a long comment"})  # fmt: skip
    assert r.status_code in (200, 303), (r.status_code, r.text[:300])
    assert _entries(admin) == entries + 1
    entries += 1
    # the limit of the forms and JSON bodies is not the streamed uploads': a table of 5 MB is taken
    table = b"patient_id,visit,arm\n" + b"P9,0,placebo\n" * ((5 << 20) // 13)
    r = admin.put(f"/api/studies/{objects['study_id']}/tables/clinical", params={"name": "big.csv"},
                  content=table, headers=admin.h)  # fmt: skip
    assert r.status_code == 200, r.text


def _entries(client: httpx.Client) -> int:
    r = client.get("/api/audit/verify")
    assert r.status_code == 200 and r.json()["ok"], r.text
    return r.json()["entries"]


# who takes each route's happy path (in this order: a run is started before it is cancelled)
HAPPY: dict[tuple[str, str], str] = {
    ("POST", "/api/login"): "vic",
    ("POST", "/login"): "vic",
    ("POST", "/api/logout"): "vic",
    ("POST", "/logout"): "vic",
    ("POST", "/api/users"): "admin",
    ("POST", "/users"): "admin",
    ("POST", "/api/studies"): "ana",
    ("POST", "/studies"): "ana",
    ("POST", "/api/studies/{study_id}/policy"): "admin",
    ("POST", "/studies/{study_id}/policy"): "admin",
    ("POST", "/api/studies/{study_id}/batches"): "ana",
    ("PUT", "/api/studies/{study_id}/uploads"): "ana",
    ("PUT", "/api/studies/{study_id}/tables/{kind}"): "ana",
    ("POST", "/api/studies/{study_id}/mapping"): "ana",
    ("POST", "/studies/{study_id}/mapping"): "ana",
    ("POST", "/api/studies/{study_id}/templates"): "ana",
    ("POST", "/studies/{study_id}/template"): "ana",
    ("POST", "/api/studies/{study_id}/runs"): "ana",
    ("POST", "/api/runs/{run_id}/cancel"): "ana",
    ("POST", "/studies/{study_id}/runs"): "ana",
    ("POST", "/runs/{run_id}/cancel"): "ana",
}


def test_every_successful_state_change_is_in_the_audit_trail(server, routes, objects):
    missing = sorted(set(routes) - set(HAPPY) - set(NO_CHEAP_HAPPY_PATH))
    assert not missing, f"new state-changing routes without a happy path in HAPPY (or a reason): {missing}"
    admin = server.client()
    mine = dict(objects)
    problems = []
    for route, user in HAPPY.items():
        if route in ANONYMOUS:
            client, token = Client(server.url, None), None
            if route == ("POST", "/login"):  # the sign-in page's token
                token = (
                    client.get("/login").cookies.get("cytopipe_prelogin")
                    or client.cookies["cytopipe_prelogin"]
                )
        else:
            client = server.client(user)
            token = client.h["X-CSRF-Token"]
        before = _entries(admin)
        r = _send(client, route, mine, token)
        if r.status_code >= 400:
            problems.append(f"{route}: the happy path failed: {r.status_code} {r.text[:300]!r}")
            continue
        if route[1].endswith("/runs"):  # the run just started: the next cancel's
            mine["run_id"] = (
                r.json()["id"] if route[1].startswith("/api/") else r.headers["location"].split("/")[-1]
            )
        if route[1].endswith("/policy"):
            mine["four_eyes"] = not mine["four_eyes"]
        after = admin.get("/api/audit", params={"limit": 1}).json()[0]
        if _entries(admin) <= before or after["user"] != user:
            problems.append(f"{route}: succeeded ({r.status_code}) without an audit entry by {user}")
    assert not problems, "\n".join(problems)


def test_a_state_changing_route_without_a_permission_check_is_named(routes):
    """What create_app refuses to start with (deps.unguarded); the workspace's own routes pass."""
    from fastapi import APIRouter, Depends, FastAPI

    from cytopipe.serve.deps import permit, unguarded

    router = APIRouter()

    @router.post("/api/studies/{study_id}/forgotten")
    def forgotten(study_id: int) -> None: ...

    @router.delete("/api/studies/{study_id}")
    def checked(study_id: int, ctx=Depends(permit("study.create"))) -> None: ...  # noqa: B008

    @router.post("/login")
    def sign_in() -> None: ...

    app = FastAPI()
    app.include_router(router, prefix="")
    assert unguarded(app.routes) == ["POST /api/studies/{study_id}/forgotten"]
