"""Helpers of the `cytopipe serve` tests: a real server in a subprocess on a free loopback port,
a fresh database (SQLite in its data folder, or a new database on the PostgreSQL server that
.ci/run starts), a small simulated trial and an API client."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pandas as pd
import pytest

from tests.pipeline_support import REPO, TEMPLATE, cli, cli_env, free_port

PASSWORD = "correct horse battery"
POSTGRES_ENV = "CYTOPIPE_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgresql"]
# 6 patients x 2 visits = 12 small files (the trial the template was not tuned on has its own seed)
TRIAL = dict(n_patients=6, visits=(0, 4), events=3000, seed=1313, control_events=500)
STUDY = {"template": TEMPLATE.name, "seed": 0, "workers": "1"}


def postgres_admin_url() -> str:
    """The PostgreSQL server of the tests; outside CI its absence skips, in CI it fails."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        message = f"no PostgreSQL server for the serve tests: {POSTGRES_ENV} is not set (.ci/run starts one)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return url


def fresh_database(backend: str) -> tuple[str | None, callable]:
    """(--database URL or None for SQLite, cleanup)."""
    if backend == "sqlite":
        return None, lambda: None
    import psycopg

    admin = postgres_admin_url()
    name = "cytopipe_test_" + secrets.token_hex(6)
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    url = admin.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return url, drop


class Server:
    """``cytopipe serve`` in a subprocess; ``start()`` again after ``kill()`` reuses data and database."""

    def __init__(self, data: Path, database: str | None, *extra: str):
        self.data, self.database, self.extra = data, database, list(extra)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def args(self, *more: str) -> list[str]:
        args = [sys.executable, "-m", "cytopipe", "serve", "--data", str(self.data), "--port", str(self.port),
                "--log-level", "warning", *self.extra, *more]  # fmt: skip
        if self.database:
            args += ["--database", self.database]
        return args

    def start(self, create_admin: str | None = None, timeout: float = 120) -> Server:
        more = ["--create-admin", create_admin] if create_admin else []
        self.log = open(self.data.parent / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(self.args(*more), stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=cli_env(), cwd=str(REPO))  # fmt: skip
        self.proc.stdin.write((PASSWORD + "\n").encode())
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server did not answer within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return (self.data.parent / f"server-{self.port}.log").read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: the server dies without any shutdown (as in a power cut or OOM kill)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def client(self, user: str = "admin", password: str = PASSWORD) -> Client:
        return Client(self.url, user, password)


class Client(httpx.Client):
    """An API client signed in as ``user``; ``h`` is the CSRF header."""

    def __init__(self, url: str, user: str | None, password: str = PASSWORD):
        super().__init__(base_url=url, timeout=120)
        self.h: dict[str, str] = {}
        if user:
            r = self.post("/api/login", json={"name": user, "password": password})
            assert r.status_code == 200, r.text
            self.h = {"X-CSRF-Token": r.json()["csrf"]}

    def upload(
        self, study: int, path: Path, name: str | None = None, batch: int | None = None
    ) -> httpx.Response:
        params = {"name": name or path.name} | ({"batch": batch} if batch else {})
        with open(path, "rb") as fh:
            return self.put(f"/api/studies/{study}/uploads", params=params, content=fh, headers=self.h)

    def wait_run(self, run_id: int, timeout: float = 600, until=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get(f"/api/runs/{run_id}").json()
            if until is not None and until(status):
                return status
            if until is None and status["status"] not in ("queued", "running"):
                return status
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} did not finish in {timeout} s: {status}")


@contextlib.contextmanager
def serving(
    data: Path,
    backend: str = "sqlite",
    users: Mapping[str, str] | None = None,
    *extra: str,
    admin: str = "admin",
) -> Iterator[Server]:
    """``cytopipe serve`` on a fresh database of ``backend`` with its data folder ``data``, the
    administrator ``admin`` and the accounts ``users`` (name -> role); stopped, and its database
    dropped, at the end. ``extra``: more command-line options (e.g. upload limits)."""
    database, drop = fresh_database(backend)
    try:
        srv = Server(data, database, *extra).start(create_admin=admin)
        try:
            client = srv.client(admin)
            for name, role in (users or {}).items():
                r = client.post(
                    "/api/users", json={"name": name, "password": PASSWORD, "role": role}, headers=client.h
                )
                assert r.status_code == 201, r.text
            yield srv
        finally:
            srv.stop()
    finally:
        drop()


def make_trial(folder: Path) -> Path:
    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, **TRIAL)
    return folder


def trial_files(trial: Path) -> list[Path]:
    return sorted((trial / "fcs").glob("*.fcs"))


def trial_manifest(trial: Path) -> pd.DataFrame:
    m = pd.read_csv(trial / "manifest.csv", dtype=str)
    return m[m["control"].isna()][["file", "sample_id", "patient_id", "visit", "arm"]].reset_index(drop=True)


def reference_run(trial: Path, out: Path) -> Path:
    """`cytopipe run` on the same files, with the manifest columns the workspace writes."""
    manifest = trial / "serve_manifest.csv"
    trial_manifest(trial).to_csv(manifest, index=False)
    proc = cli("run", "--manifest", str(manifest), "--template", str(TEMPLATE), "--out", str(out),
               "--seed", "0", "--workers", "1", "--no-progress", "--no-report")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_population_stats(a: Path, b: Path) -> None:
    pa, pb = pd.read_parquet(a / "population_stats.parquet"), pd.read_parquet(b / "population_stats.parquet")
    assert len(pa) > 0
    pd.testing.assert_frame_equal(pa, pb)


TIMED_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def assert_timed_run_log(folder: Path) -> list[str]:
    """Every line of a served run's ``run.log`` begins with the time it was written, in order
    (the run page shows its tail); returns the lines without their times."""
    lines = (folder / "run.log").read_text(encoding="utf-8").splitlines()
    assert lines, f"{folder / 'run.log'} is empty"
    times = []
    for line in lines:
        found = TIMED_LINE.match(line)
        assert found, f"a line of run.log without its time: {line!r}"
        times.append(found.group(1))
    assert times == sorted(times), times
    return [line[TIMED_LINE.match(line).end() :] for line in lines]


# --- fixtures shared by the serve test modules (import them into the module) ---------------------
# The session's ``serve_trial`` and ``serve_reference`` are in tests/conftest.py, NOT imported into
# the modules: pytest makes a session fixture imported into a module that module's own, so each
# module simulated the trial and ran the reference run (~8 s) again.
@pytest.fixture(params=BACKENDS, scope="module")
def backend(request) -> str:
    return request.param


#: the backends of a test whose database work is the same on both, its PostgreSQL variant under
#: ``-m slow`` only (the test says where that work runs on PostgreSQL in the default suite):
#: ``@POSTGRESQL_SLOW`` on the test, or ``backend = serve_support.backend_postgresql_slow`` for a module
SLOW_POSTGRESQL = ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)]
POSTGRESQL_SLOW = pytest.mark.parametrize("backend", SLOW_POSTGRESQL, indirect=True)


@pytest.fixture(params=SLOW_POSTGRESQL, scope="module", name="backend")
def backend_postgresql_slow(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(request, backend, tmp_path_factory) -> Iterator[Server]:
    """One server per test module and backend (:func:`serving`): besides ``admin``, the accounts
    of the module's ``SERVE_USERS`` (name -> role), and its ``SERVE_ARGS`` on the command line."""
    module = request.module
    data = tmp_path_factory.mktemp(f"{module.__name__.rsplit('.', 1)[-1]}_{backend}") / "data"
    users = getattr(module, "SERVE_USERS", {})
    with serving(data, backend, users, *getattr(module, "SERVE_ARGS", ())) as srv:
        yield srv


def confirm_in_database(server, study: int, upload_id: int, **sample) -> None:
    """A sample confirmed by an older version of the workspace, which checked less: written to its
    database directly (how a study set up before a check comes to hold what the check now refuses)."""
    from sqlalchemy.orm import sessionmaker

    from cytopipe.serve.db import Sample, database_url, make_engine

    engine = make_engine(database_url(server.database, server.data))
    try:
        with sessionmaker(engine)() as db:
            db.add(Sample(study_id=study, upload_id=upload_id, visit=0, confirmed_by="admin", **sample))
            db.commit()
    finally:
        engine.dispose()


def signed_in(browser, server, user: str, errors: list | None = None, console: bool = True):
    """A fresh browser context signed in as ``user`` through the sign-in page: (context, page);
    ``errors`` collects the pages' script errors (and, with ``console``, console errors) from the
    start."""
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = context.new_page()
    if errors is not None:
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        if console:
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.set_default_timeout(60_000)
    page.goto(server.url + "/login")
    page.fill("input[name=name]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("#sign-in")
    page.wait_for_url(re.compile(r".*/studies$"))
    return context, page
