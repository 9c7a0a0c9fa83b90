"""The workspace database: SQLAlchemy 2 models, the engine and the Alembic migrations.

One schema for SQLite (the default, ``DATA/cytopipe.sqlite`` in WAL mode) and PostgreSQL
(``--database postgresql://...``). The schema is created and upgraded only by the Alembic
migrations in ``cytopipe/serve/migrations`` (applied at start-up), never by ``create_all``.

The audit table is append-only: database triggers refuse UPDATE and DELETE, and each row
carries the hash of the previous row (see :mod:`cytopipe.serve.audit`).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

ROLES = ("viewer", "analyst", "reviewer", "admin")
RUN_ACTIVE = ("queued", "running")


def utcnow() -> dt.datetime:
    """The server clock in UTC, to the microsecond (naive values are never stored)."""
    return dt.datetime.now(dt.timezone.utc)


class UTC(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores no zone: it is restored)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime stored; use cytopipe.serve.db.utcnow()")
        return value.astimezone(dt.timezone.utc) if value is not None else None

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)


class Session(Base):
    """A login: the cookie holds a random token, the table only its sha256."""

    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTC)


class Template(Base):
    """One immutable version of a study's gating template (see :mod:`cytopipe.serve.templateops`)."""

    __tablename__ = "templates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    name: Mapped[str] = mapped_column(String(255))
    yaml: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")  # why this version (migration 0003)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    arms: Mapped[list] = mapped_column(JSON, default=list)
    visits: Mapped[list] = mapped_column(JSON, default=list)
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    pattern: Mapped[str] = mapped_column(String(200), default="{patient}_W{visit}.fcs")
    template_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # current version
    clinical_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    clinical_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    manifest_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)


class ArmCode(Base):
    """The code of one arm of a blinded study, given the first time the arm is seen and never
    changed (migration 0005; :func:`cytopipe.serve.blinding.assign_codes`)."""

    __tablename__ = "arm_codes"
    __table_args__ = (UniqueConstraint("study_id", "code", name="uq_arm_codes_study_code"),)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    arm: Mapped[str] = mapped_column(String(200), primary_key=True)
    code: Mapped[str] = mapped_column(String(32))
    at: Mapped[str] = mapped_column(String(32))  # as the audit entry that recorded it
    audit_id: Mapped[int] = mapped_column(Integer)


class Batch(Base):
    """One drag-and-drop: its declared size is checked against the batch limit up front."""

    __tablename__ = "batches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    declared_files: Mapped[int] = mapped_column(Integer)
    declared_bytes: Mapped[int] = mapped_column(BigInteger)
    received_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)


class Upload(Base):
    """One uploaded file of a study (ok / warning / rejected); the bytes live in the blob store."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("study_id", "sha256", name="uq_upload_study_sha"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"), nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    stored: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    notes: Mapped[list] = mapped_column(JSON, default=list)
    info: Mapped[dict] = mapped_column(JSON, default=dict)  # events, channels, markers, keywords
    uploaded_by: Mapped[str] = mapped_column(String(64))
    uploaded_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)


class Sample(Base):
    """A confirmed mapping of an upload to patient / visit / arm."""

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("study_id", "sample_id", name="uq_sample_study_id"),
        UniqueConstraint("study_id", "upload_id", name="uq_sample_study_upload"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    upload_id: Mapped[int] = mapped_column(ForeignKey("uploads.id"))
    sample_id: Mapped[str] = mapped_column(String(200))
    patient_id: Mapped[str] = mapped_column(String(200))
    visit: Mapped[int] = mapped_column(Integer)
    arm: Mapped[str] = mapped_column(String(200))
    confirmed_by: Mapped[str] = mapped_column(String(64))
    confirmed_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    folder: Mapped[str] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    template_id: Mapped[int | None] = mapped_column(ForeignKey("templates.id"), nullable=True)
    n_samples: Mapped[int] = mapped_column(Integer, default=0)
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # missing_markers, ... (migration 0004)
    started_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTC, nullable=True)


class Audit(Base):
    """Append-only trail of every state change; ``hash`` chains each row to the one before."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[str] = mapped_column(String(32))  # ISO 8601 UTC text: hashed exactly as stored
    user_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32), default="")
    object_id: Mapped[str] = mapped_column(String(64), default="")
    before: Mapped[str] = mapped_column(Text, default="null")  # canonical JSON text
    after: Mapped[str] = mapped_column(Text, default="null")
    reason: Mapped[str] = mapped_column(Text, default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


# --------------------------------------------------------------------------------------------
def database_url(database: str | None, data_dir: Path) -> str:
    """``--database`` as given (``postgresql://`` uses psycopg 3), else SQLite in the data folder."""
    if not database:
        return f"sqlite:///{(data_dir / 'cytopipe.sqlite').resolve()}"
    if database.startswith("postgresql://") or database.startswith("postgres://"):
        return "postgresql+psycopg://" + database.split("://", 1)[1]
    return database


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL: readers never block the writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


MIGRATIONS = Path(__file__).parent / "migrations"


def migrations_head() -> str | None:
    """The newest migration's revision, read from the files' ``revision = "..."`` and
    ``down_revision = ...`` lines without importing Alembic; None unless they make one line."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        revision = re.search(r'^revision = "([^"]+)"$', source, re.M)
        if revision is None:
            continue  # not a migration (__init__.py)
        parent = re.search(r'^down_revision = (None|"([^"]+)")$', source, re.M)
        if parent is None:
            return None  # a merge, or written another way: Alembic decides
        revisions.add(revision.group(1))
        parents.add(parent.group(2))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _revision(engine: Engine) -> str | None:
    """The database's Alembic revision (None: none yet, or not readable here)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except DBAPIError:  # no such table: a new database
        return None
    return rows[0] if len(rows) == 1 else None


def migrate(engine: Engine) -> None:
    """Apply every Alembic migration not yet applied (idempotent). A database already at the
    newest revision is left as it is without importing Alembic (~0.15 s of CPU for every
    ``cytopipe review`` or ``audit`` command)."""
    head = migrations_head()
    if head is not None and _revision(engine) == head:
        return
    from alembic import command
    from alembic.config import Config
    from alembic.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        after = MigrationContext.configure(conn).get_current_revision()
    if after != before:  # Alembic's own step-by-step lines are debug detail (see serve.run)
        log.info("database schema upgraded from %s to %s", before or "empty", after)


def open_database(url: str) -> tuple[Engine, sessionmaker]:
    engine = make_engine(url)
    migrate(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)
