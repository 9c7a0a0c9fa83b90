"""The gate review's tables (migrations 0002, 0007): each decision on a gate, the sign-off of a run and
the versions of a run. The operations on them are in :mod:`.reviewops`."""

from __future__ import annotations

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cytopipe.serve.db import Base


class ReviewDecision(Base):
    __tablename__ = "review_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    kind: Mapped[str] = mapped_column(String(16))
    sample_id: Mapped[str] = mapped_column(String(200))
    population: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")
    category: Mapped[str] = mapped_column(String(64), default="")
    user_name: Mapped[str] = mapped_column(String(64))
    at: Mapped[str] = mapped_column(String(32))
    audit_id: Mapped[int] = mapped_column(Integer)
    before_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    after_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    # carried over into a new version of a run (migration 0007): user_name, at and audit_id stay the
    # original's; carried_from is the row copied, carried_audit_id the version's run.version entry
    carried_from: Mapped[int | None] = mapped_column(Integer, nullable=True)
    carried_audit_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Signoff(Base):
    __tablename__ = "signoffs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(64))
    meaning: Mapped[str] = mapped_column(Text)
    at: Mapped[str] = mapped_column(String(32))
    audit_id: Mapped[int] = mapped_column(Integer)


class RunVersion(Base):
    __tablename__ = "run_versions"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    parent_run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    version: Mapped[int] = mapped_column(Integer)
