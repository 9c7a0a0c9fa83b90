"""What every `cytopipe review` (and `audit`) command pays before its work, on a real workspace
database (SQLite, and PostgreSQL where .ci/run starts one) in a fresh process: opening a workspace already at the newest schema imported Alembic and
ran its upgrade (~0.15 s of CPU), and importing the sign-in module made an argon2 hash for sign-ins
of unknown names (~0.2 s). Now neither happens; an unknown name is still checked against the dummy
hash, and a database below the newest schema is still upgraded (tests/test_review_templates.py)."""

from __future__ import annotations

import subprocess
import sys

from tests import serve_support
from tests.pipeline_support import cli_env
from tests.serve_support import PASSWORD

backend = serve_support.backend

CHECK = """
import sys
from pathlib import Path
from cytopipe.serve import auth
from cytopipe.serve.db import database_url, open_database

engine, sessions = open_database(database_url(sys.argv[3] or None, Path(sys.argv[1])))
with sessions() as db:
    assert auth.authenticate(db, "rita", sys.argv[2]) is not None
print("alembic" in sys.modules, auth._dummy is None)
with sessions() as db:
    assert auth.authenticate(db, "nobody", sys.argv[2]) is None
print(auth._dummy is None)
"""


def test_opening_a_current_workspace_and_signing_in_do_no_needless_work(backend, tmp_path):
    from cytopipe.serve import auth
    from cytopipe.serve.db import database_url, open_database

    url, drop = serve_support.fresh_database(backend)
    try:
        engine, sessions = open_database(database_url(url, tmp_path))  # a new workspace: migrated
        with sessions() as db:
            auth.create_user(db, "rita", PASSWORD, "reviewer", by="admin")
            db.commit()
        engine.dispose()
        proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path), PASSWORD, url or ""],
                              capture_output=True, text=True, env=cli_env(), timeout=120)  # fmt: skip
    finally:
        drop()
    assert proc.returncode == 0, proc.stderr
    # no Alembic, no dummy hash for a known account; the dummy made for an unknown name
    assert proc.stdout.split() == ["False", "True", "False"], proc.stdout


def test_the_newest_migration_read_from_the_files_is_alembics_head():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from cytopipe.serve.db import MIGRATIONS, migrations_head

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert [migrations_head()] == ScriptDirectory.from_config(cfg).get_heads()
