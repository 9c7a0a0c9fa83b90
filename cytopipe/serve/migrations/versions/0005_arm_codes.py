"""arm codes of blinded studies, stored the first time an arm is seen and never changed.

Before, a blinded study's codes were derived from the set of arms each time they were shown, so
a new arm in a later upload could give the existing arms other codes (a reviewer's "Arm B" then
meant another arm, and the shift itself told something). Now each (study, arm) gets its code once;
rows are never changed or deleted (triggers refuse UPDATE and DELETE on SQLite and PostgreSQL, as
for the audit trail). The codes a study showed before this migration are stored when the server
starts (:func:`cytopipe.serve.blinding.store_codes`), so they stay what they were.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_MESSAGE = "arm codes are never changed: each arm keeps the code it was given"


def upgrade() -> None:
    op.create_table(
        "arm_codes",
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("arm", sa.String(length=200), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("at", sa.String(length=32), nullable=False),
        sa.Column("audit_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("study_id", "arm"),
        sa.UniqueConstraint("study_id", "code", name="uq_arm_codes_study_code"),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER arm_codes_no_{verb.lower()} BEFORE {verb} ON arm_codes "
                f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION arm_codes_immutable() RETURNS trigger AS $$ BEGIN "
            f"RAISE EXCEPTION '{_MESSAGE}'; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER arm_codes_immutable BEFORE UPDATE OR DELETE ON arm_codes "
            "FOR EACH ROW EXECUTE FUNCTION arm_codes_immutable()"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS arm_codes_immutable ON arm_codes")
        op.execute("DROP FUNCTION IF EXISTS arm_codes_immutable()")
    op.drop_table("arm_codes")  # SQLite drops the table's triggers with it
