"""carried-over gate decisions keep their author: an override, pooled gate or revert copied into a
new version of a run (``run.version``) keeps who made it, when, and its own audit entry, and says
where it came from (``carried_from``: the decision row copied) and who carried it over, when
(``carried_audit_id``: the version's ``run.version`` audit entry, which names them).

Before, the copy was stored as made by whoever made the version, at the version's time and entry,
with the reason prefixed "carried over from run N: ". Such rows are rewritten here from the row
they were copied from (the latest change of the same gate in the parent run, before the copy):
author, time, audit entry and reason. A copy whose original is not found keeps what it had and is
only marked carried over. The downgrade puts the version's maker, time and entry back (and the
reason's prefix) and drops the columns.

Revision ID: 0007
Revises: 0006
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)
_PREFIX = "carried over from run {run}: "
_decisions = sa.table(
    "review_decisions",
    *(sa.column(c, sa.Integer()) for c in ("id", "run_id", "audit_id", "carried_from", "carried_audit_id")),
    *(sa.column(c, sa.String()) for c in ("kind", "sample_id", "population", "user_name", "at", "reason")),
)
_audit = sa.table(
    "audit",
    sa.column("id", sa.Integer()),
    sa.column("at", sa.String()),
    sa.column("user_name", sa.String()),
    sa.column("action", sa.String()),
    sa.column("object_type", sa.String()),
    sa.column("object_id", sa.String()),
)
_versions = sa.table(
    "run_versions", sa.column("run_id", sa.Integer()), sa.column("parent_run_id", sa.Integer())
)


def upgrade() -> None:
    op.add_column("review_decisions", sa.Column("carried_from", sa.Integer(), nullable=True))
    op.add_column("review_decisions", sa.Column("carried_audit_id", sa.Integer(), nullable=True))
    bind = op.get_bind()
    d, a, v = _decisions.c, _audit.c, _versions.c
    made = {  # run -> (its run.version entry, the run it is a version of)
        int(run): (entry, parent)
        for run, entry, parent in bind.execute(
            sa.select(a.object_id, a.id, v.parent_run_id)
            .join(_versions, sa.cast(v.run_id, sa.String()) == a.object_id)
            .where(a.action == "run.version", a.object_type == "run")
        )
    }
    rows = bind.execute(
        sa.select(d.id, d.run_id, d.kind, d.sample_id, d.population, d.user_name, d.at, d.audit_id, d.reason)
        .where(d.kind != "approve")
        .order_by(d.id)
    ).all()
    by_gate: dict[tuple, list] = {}  # (run, sample, population, kind) -> its rows in id order
    for r in rows:
        by_gate.setdefault((r.run_id, r.sample_id, r.population, r.kind), []).append(r)
    fixed: dict[int, tuple] = {}  # row id -> (user, at, audit entry, reason) as it now is
    carried = found = 0
    for r in rows:  # in id order: a parent's rows (rewritten first when carried themselves) come first
        entry, parent = made.get(r.run_id, (None, None))
        if entry is None or r.audit_id != entry:
            fixed[r.id] = (r.user_name, r.at, r.audit_id, r.reason)
            continue
        carried += 1
        before = [o for o in by_gate.get((parent, r.sample_id, r.population, r.kind), []) if o.id < r.id]
        original = before[-1] if before else None
        values = {"carried_audit_id": entry}
        if original is not None:
            found += 1
            user, at, audit_id, reason = fixed[original.id]
            values.update(carried_from=original.id, user_name=user, at=at, audit_id=audit_id, reason=reason)
            fixed[r.id] = (user, at, audit_id, reason)
        else:
            fixed[r.id] = (r.user_name, r.at, r.audit_id, r.reason)
        bind.execute(_decisions.update().where(d.id == r.id).values(**values))
    if carried:
        log.warning(
            "%d carried-over gate change(s) now name who made them (%d found in the run before)",
            carried,
            found,
        )


def downgrade() -> None:
    bind = op.get_bind()
    d, a = _decisions.c, _audit.c
    rows = bind.execute(
        sa.select(d.id, d.run_id, d.reason, a.user_name, a.at, a.id.label("entry"))
        .join(_audit, a.id == d.carried_audit_id)
        .where(d.carried_audit_id.is_not(None))
    ).all()
    for r in rows:  # as the code before this migration wrote a copy: the version's maker, time and entry
        bind.execute(
            _decisions.update()
            .where(d.id == r.id)
            .values(
                user_name=r.user_name,
                at=r.at,
                audit_id=r.entry,
                reason=_PREFIX.format(run=_parent(bind, r.run_id)) + (r.reason or ""),
            )  # fmt: skip
        )
    with op.batch_alter_table("review_decisions") as batch:
        batch.drop_column("carried_audit_id")
        batch.drop_column("carried_from")


def _parent(bind: sa.Connection, run_id: int) -> int | None:
    v = _versions.c
    return bind.scalar(sa.select(v.parent_run_id).where(v.run_id == run_id))
