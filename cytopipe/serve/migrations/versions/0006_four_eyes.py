"""four-eyes sign-off: each study says whether its runs must be signed off by a second person.

The rule is the study's ``settings["four_eyes"]`` (:mod:`cytopipe.serve.signoffpolicy`). A new
study has it on unless its creator turns it off; a study made before this migration gets it
**off** here, written into its settings, so that its runs (some perhaps half reviewed by one
person) keep the sign-off they had. An administrator turns it on from the study's page, with a
reason (``study.policy`` in the audit trail).

The downgrade leaves the key in place: the code before this migration ignores it, and an upgrade
again then keeps each study's rule as it was.

Revision ID: 0006
Revises: 0005
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)
_studies = sa.table("studies", sa.column("id", sa.Integer()), sa.column("settings", sa.JSON()))


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(_studies.c.id, _studies.c.settings).order_by(_studies.c.id)).all()
    older = [(i, dict(s or {})) for i, s in rows if "four_eyes" not in (s or {})]
    for study_id, settings in older:
        bind.execute(
            _studies.update()
            .where(_studies.c.id == study_id)
            .values(settings={**settings, "four_eyes": False})
        )
    if older:
        log.warning(
            "sign-off by one person kept for %d existing stud%s (four_eyes off): an administrator can "
            "require sign-off by a second person on each study's page",
            len(older),
            "y" if len(older) == 1 else "ies",
        )


def downgrade() -> None:
    pass  # the key stays (older code ignores it), so an upgrade again keeps each study's rule
