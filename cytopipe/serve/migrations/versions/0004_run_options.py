"""run options: what a run was started with beyond the study's settings (``missing_markers``).

A run started before this migration has ``{}``: it ran with the workflow's defaults (a marker
missing from every file stopped it, ``missing_markers: stop``).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("options", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("options")
