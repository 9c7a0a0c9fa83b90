"""Migration 0003 (template versions) on a real SQLite file and a real PostgreSQL database: a workspace
made before it (at 0002, with a study and its template) is upgraded when it is opened; its template
keeps its text and gets an empty reason; versions are then immutable (UPDATE/DELETE refused by the
database), a second version 1 of the same study is refused, and the migration goes down and up again."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tests import serve_support

backend = serve_support.backend


def _alembic(engine: sa.Engine, direction: str, target: str) -> None:
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    import cytopipe.serve.db as db

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, direction)(cfg, target)


def test_migration_0003_upgrades_an_existing_workspace(backend, tmp_path):
    from cytopipe.serve.db import database_url, make_engine, open_database

    database, drop = serve_support.fresh_database(backend)
    try:
        url = database_url(database, tmp_path)
        engine = make_engine(url)
        _alembic(engine, "upgrade", "0002")  # a workspace of the previous release
        text = "populations: []\n"
        with engine.begin() as con:
            con.execute(sa.text("INSERT INTO studies (id, name, arms, visits, settings, pattern, created_by, "
                                "created_at) VALUES (1, 's', '[]', '[]', '{}', 'p', 'ann', :t)"),
                        {"t": "2026-01-01T00:00:00+00:00"})  # fmt: skip
            con.execute(sa.text("INSERT INTO templates (id, study_id, version, name, yaml, sha256, created_by, "
                                "created_at) VALUES (1, 1, 1, 't.yaml', :y, :h, 'ann', :t)"),
                        {"y": text, "h": hashlib.sha256(text.encode()).hexdigest(),
                         "t": "2026-01-01T00:00:00+00:00"})  # fmt: skip
        engine.dispose()
        engine, _ = open_database(url)  # what `cytopipe serve` does at start-up: upgrade to head
        with engine.connect() as con:
            assert con.execute(sa.text("SELECT yaml, reason FROM templates")).one() == (text, "")
        for stmt in ("UPDATE templates SET yaml = 'x'", "DELETE FROM templates"):
            with pytest.raises(DBAPIError, match="immutable"), engine.begin() as con:
                con.execute(sa.text(stmt))
        with pytest.raises(DBAPIError), engine.begin() as con:  # one version 1 per study
            con.execute(sa.text("INSERT INTO templates (id, study_id, version, name, yaml, sha256, created_by, "
                                "created_at, reason) VALUES (2, 1, 1, 't.yaml', 'y', 'h', 'ann', :t, '')"),
                        {"t": "2026-01-01T00:00:00+00:00"})  # fmt: skip
        _alembic(engine, "downgrade", "0002")
        with engine.begin() as con:  # no triggers below 0003
            con.execute(sa.text("UPDATE templates SET name = 'u.yaml'"))
            assert "reason" not in {c["name"] for c in sa.inspect(con).get_columns("templates")}
        _alembic(engine, "upgrade", "head")
        with engine.connect() as con:
            assert con.execute(sa.text("SELECT name, reason FROM templates")).one() == ("u.yaml", "")
        engine.dispose()
    finally:
        drop()


def test_migration_0006_keeps_single_person_signoff_for_earlier_studies(backend, tmp_path):
    """A workspace at 0005 with a study is upgraded at start-up: the study gets the four-eyes rule
    written into its settings, off (its runs keep the sign-off they had; an administrator turns it
    on), its other settings kept; a study made afterwards has it on. The migration goes down (the key
    stays: the older code ignores it) and up again without changing it."""
    import json

    from cytopipe.serve import ops, signoffpolicy
    from cytopipe.serve.db import Study, database_url, make_engine, open_database

    database, drop = serve_support.fresh_database(backend)
    try:
        url = database_url(database, tmp_path)
        engine = make_engine(url)
        _alembic(engine, "upgrade", "0005")
        with engine.begin() as con:
            con.execute(sa.text("INSERT INTO studies (id, name, arms, visits, settings, pattern, created_by, "
                                "created_at) VALUES (7, 'old', '[]', '[]', :s, 'p', 'ann', :t)"),
                        {"s": json.dumps({"seed": 3, "blinded": True}), "t": "2026-01-01T00:00:00+00:00"})  # fmt: skip
        engine.dispose()
        engine, sessions = open_database(url)  # what `cytopipe serve` does at start-up
        with sessions() as db:
            old = db.get(Study, 7)
            assert old.settings == {"seed": 3, "blinded": True, "four_eyes": False}
            assert not signoffpolicy.required(old)
            new = ops.create_study(db, "ann", {"name": "new", "template": ops.DEFAULT_TEMPLATE})
            db.commit()
            assert new.settings["four_eyes"] is True and signoffpolicy.required(new)
        _alembic(engine, "downgrade", "0005")
        _alembic(engine, "upgrade", "head")
        with sessions() as db:
            assert {s.name: s.settings["four_eyes"] for s in db.query(Study)} == {"old": False, "new": True}
        engine.dispose()
    finally:
        drop()
