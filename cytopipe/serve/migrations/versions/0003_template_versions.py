"""template versions: a reason per version, one version number per study, versions immutable.

Editing a study's template in the browser (or uploading a new YAML) adds a row to ``templates``;
rows are never changed or deleted (triggers refuse UPDATE and DELETE on SQLite and PostgreSQL,
as for the audit trail), so a run's ``template_id`` always names the exact YAML it used.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_MESSAGE = "template versions are immutable: save a new version instead"


def upgrade() -> None:
    op.add_column("templates", sa.Column("reason", sa.Text(), nullable=False, server_default=""))
    op.create_index("uq_templates_study_version", "templates", ["study_id", "version"], unique=True)
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER templates_no_{verb.lower()} BEFORE {verb} ON templates "
                f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION templates_immutable() RETURNS trigger AS $$ BEGIN "
            f"RAISE EXCEPTION '{_MESSAGE}'; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER templates_immutable BEFORE UPDATE OR DELETE ON templates "
            "FOR EACH ROW EXECUTE FUNCTION templates_immutable()"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS templates_no_{verb}")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS templates_immutable ON templates")
        op.execute("DROP FUNCTION IF EXISTS templates_immutable()")
    op.drop_index("uq_templates_study_version", "templates")
    with op.batch_alter_table("templates") as batch:
        batch.drop_column("reason")
