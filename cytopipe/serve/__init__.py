"""``cytopipe serve``: a study workspace in the browser.

Upload FCS files in batches (validated at once), map them to patients, visits and arms, start
runs in worker processes with live progress, and look at and download the results; the same
operations as a JSON API (``/api``, schema at ``/api/openapi.json``). Accounts with roles,
CSRF-protected forms and an append-only, hash-chained audit trail. See docs/serve.md.

Modules: :mod:`.db` (models, engine, migrations), :mod:`.auth`, :mod:`.audit`,
:mod:`.storage` (uploads, blob store, mapping), :mod:`.runs` (worker processes),
:mod:`.ops` (operations), :mod:`.results`, :mod:`.app`, :mod:`.api`, :mod:`.web`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys
from pathlib import Path

from cytopipe.errors import ServeError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "cytopipe serve [--data DIR] [--host 127.0.0.1] [--port 8765] [--database URL] [options]"
    parser.add_argument("--data", default="cytopipe-workspace", help="folder of the uploads, runs and (by default) "
                        "the SQLite database (default: ./cytopipe-workspace)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                        "computer only; any other address needs accounts and prints a warning)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    parser.add_argument("--database", metavar="URL", help="postgresql://user:password@host/db for a shared "
                        "database (default: SQLite in --data)")  # fmt: skip
    parser.add_argument("--create-admin", metavar="NAME", help="create an administrator account first (the "
                        "password is asked for, or read from standard input / CYTOPIPE_ADMIN_PASSWORD)")  # fmt: skip
    parser.add_argument("--max-file-size", default="2GB", help="largest FCS file accepted (default: 2GB)")
    parser.add_argument("--max-batch-size", default="50GB", help="largest batch of files (default: 50GB)")
    parser.add_argument("--scheduler-address", metavar="tcp://HOST:PORT", help="run on an existing Dask "
                        "scheduler (its workers must see --data at the same path)")  # fmt: skip
    parser.add_argument("--forwarded-allow-ips", default="127.0.0.1", help="reverse proxies whose "
                        "X-Forwarded-Proto/For headers are trusted (default: 127.0.0.1)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ServeError(f"size {text!r} is not understood; write e.g. 500MB or 2GB")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2).lower() or " "))


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_password(name: str) -> str:
    if os.environ.get("CYTOPIPE_ADMIN_PASSWORD"):
        return os.environ["CYTOPIPE_ADMIN_PASSWORD"]
    if sys.stdin is not None and sys.stdin.isatty():
        import getpass

        first = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != first:
            raise ServeError("the two passwords differ; nothing was created")
        return first
    line = (sys.stdin.readline() if sys.stdin is not None else "").rstrip("\r\n")
    if not line:  # not a terminal, and nothing piped in (a service, nohup, stdin closed)
        raise ServeError(
            f"--create-admin {name}: no password given, and standard input is not a terminal to ask "
            "for one: run the command in a terminal, pipe the password on standard input, or set "
            "CYTOPIPE_ADMIN_PASSWORD; nothing was created"
        )
    return line


def build_config(args: argparse.Namespace):
    from cytopipe.serve.db import database_url
    from cytopipe.serve.deps import Config

    data = Path(args.data).resolve()
    return Config(
        data_dir=data,
        database_url=database_url(args.database, data),
        max_file_bytes=parse_size(args.max_file_size),
        max_batch_bytes=parse_size(args.max_batch_size),
        scheduler_address=args.scheduler_address,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Alembic narrates every plugin and migration step at INFO; the database module logs
        # one line when the schema was upgraded
        logging.getLogger("alembic").setLevel(logging.WARNING)
    config = build_config(args)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    from cytopipe.serve import auth
    from cytopipe.serve.db import open_database

    engine, sessions = open_database(config.database_url)
    with sessions() as db:
        if args.create_admin:
            try:
                auth.create_user(db, args.create_admin, _read_password(args.create_admin), "admin", "cli")
            except auth.AuthError as exc:
                raise ServeError(f"--create-admin {args.create_admin}: {exc.message}") from None
            db.commit()
            print(f"cytopipe serve: created administrator {args.create_admin!r}", file=sys.stderr)
        n_users = auth.count_users(db)
    engine.dispose()
    if not is_loopback(args.host):
        if n_users == 0:
            raise ServeError(
                f"refusing to listen on {args.host}: no accounts exist, so anyone on the network could "
                "reach an empty workspace. Create one first: cytopipe serve --create-admin NAME"
            )
        print(f"cytopipe serve: WARNING: listening on {args.host}, reachable from other computers; put it "
              "behind a TLS reverse proxy (docs/serve.md)", file=sys.stderr)  # fmt: skip
    elif n_users == 0:
        print("cytopipe serve: no accounts yet; create one with: cytopipe serve --create-admin NAME",
              file=sys.stderr)  # fmt: skip
    import uvicorn

    from cytopipe.serve.app import create_app

    app = create_app(config)
    print(
        f"cytopipe serve: http://{args.host}:{args.port}/ (data: {config.data_dir})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, proxy_headers=True,
                forwarded_allow_ips=args.forwarded_allow_ips, timeout_graceful_shutdown=5)  # fmt: skip
    return 0
