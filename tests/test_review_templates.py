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


def test_migration_0007_gives_carried_over_changes_back_to_who_made_them(backend, tmp_path):
    """A workspace at 0006 where ursula made run 2 as a version of run 1, carrying quinn's pooled gate
    over (stored, as the code before wrote it, as ursula's, at the version's time and audit entry,
    the reason prefixed): at start-up the copy is quinn's again, at his time and entry, with his
    reason, marked carried over from his row by the version's entry; the four-eyes rule and the
    review record read that. The migration goes down (the copy as it was) and up again."""
    from cytopipe.serve import reviewops, signoffpolicy
    from cytopipe.serve.db import database_url, make_engine, open_database

    t0, t1 = "2026-01-01T10:00:00.000000+00:00", "2026-01-02T11:00:00.000000+00:00"
    database, drop = serve_support.fresh_database(backend)
    try:
        url = database_url(database, tmp_path)
        engine = make_engine(url)
        _alembic(engine, "upgrade", "0006")
        with engine.begin() as con:
            con.execute(sa.text("INSERT INTO studies (id, name, arms, visits, settings, pattern, created_by, "
                                "created_at) VALUES (1, 's', '[]', '[]', :s, 'p', 'ann', :t)"),
                        {"s": '{"four_eyes": true}', "t": t0})  # fmt: skip
            for run, who in ((1, "ann"), (2, "ursula")):
                con.execute(sa.text("INSERT INTO runs (id, study_id, status, folder, attempts, error, n_samples, "
                                    "options, started_by, created_at) VALUES (:r, 1, 'finished', '', 0, '', 2, "
                                    "'{}', :u, :t)"), {"r": run, "u": who, "t": t0})  # fmt: skip
            con.execute(sa.text("INSERT INTO run_versions (run_id, parent_run_id, version) VALUES (2, 1, 2)"))
            for entry, at, who, action, obj in ((1, t0, "quinn", "review.pooled", "1"),
                                                (2, t1, "ursula", "run.version", "2")):  # fmt: skip
                con.execute(sa.text("INSERT INTO audit (id, at, user_name, action, object_type, object_id, "
                                    "before, after, reason, prev_hash, hash) VALUES (:i, :at, :u, :a, 'run', :o, "
                                    "'null', 'null', '', 'x', 'y')"),
                            {"i": entry, "at": at, "u": who, "a": action, "o": obj})  # fmt: skip
            for row, run, who, at, entry, reason in ((1, 1, "quinn", t0, 1, "fit failure"),
                                                      (2, 2, "ursula", t1, 2, "carried over from run 1: fit failure")):  # fmt: skip
                con.execute(sa.text("INSERT INTO review_decisions (id, run_id, kind, sample_id, population, params, "
                                    "reason, category, user_name, at, audit_id) VALUES (:i, :r, 'pooled', 'P1_W0', "
                                    "'Treg', '{}', :why, 'clog', :u, :at, :e)"),
                            {"i": row, "r": run, "why": reason, "u": who, "at": at, "e": entry})  # fmt: skip
        engine.dispose()
        columns = "user_name, at, audit_id, reason, carried_from, carried_audit_id"
        upgraded = ("quinn", t0, 1, "fit failure", 1, 2)
        engine, sessions = open_database(url)  # what `cytopipe serve` does at start-up
        with engine.connect() as con:
            assert (
                tuple(con.execute(sa.text(f"SELECT {columns} FROM review_decisions WHERE id = 2")).one())
                == upgraded
            )
            assert tuple(con.execute(sa.text(f"SELECT {columns} FROM review_decisions WHERE id = 1")).one()) == (
                "quinn", t0, 1, "fit failure", None, None)  # fmt: skip
        with sessions() as db:
            d = reviewops.state(db, 2).decisions[0]
            assert (d.user, d.at, d.audit_entry, d.reason) == ("quinn", t0, 1, "fit failure")
            assert d.carried == {"from_run": 1, "by": "ursula", "at": t1, "audit_entry": 2}
            assert signoffpolicy.authors(db, 2) == {
                "ann": ["started run 1"],
                "quinn": ["used the pooled gate for Treg of P1_W0 in run 1"],
                "ursula": ["made run 2 as version 2 of run 1"],
            }
        _alembic(engine, "downgrade", "0006")
        with engine.connect() as con:
            assert tuple(con.execute(sa.text("SELECT user_name, at, audit_id, reason FROM review_decisions "
                                             "WHERE id = 2")).one()) == ("ursula", t1, 2, "carried over from run 1: fit failure")  # fmt: skip
            assert "carried_from" not in {c["name"] for c in sa.inspect(con).get_columns("review_decisions")}
        _alembic(engine, "upgrade", "head")
        with engine.connect() as con:
            assert (
                tuple(con.execute(sa.text(f"SELECT {columns} FROM review_decisions WHERE id = 2")).one())
                == upgraded
            )
        engine.dispose()
    finally:
        drop()
