"""``cytopipe audit verify|export``: check the workspace's hash-chained audit trail (exit 3 and the
first broken entry when a row was edited or deleted) or export it as escaped CSV or JSON.

The export shows the arms of blinded studies as their codes (``Arm A``, ...), as the workspace's
pages do (seeded by ``blinding.secret`` in ``--data``). ``--unblind`` exports the arm names
instead: an administrator's account (``--user``, password from CYTOPIPE_PASSWORD or standard
input) and a ``--reason`` are required, and the unblinded export is itself recorded in the audit
trail (action ``audit.unblind``) before it is written.

    cytopipe audit verify --data ws          # exit 3 and the first broken entry if edited
    cytopipe audit export --data ws --format csv --out audit.csv
    cytopipe audit export --data ws --unblind --user alice --reason "database lock" --out audit.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cytopipe.errors import ServeError
from cytopipe.serve.review_command import _db_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("verify", "export"),
        help="verify: check the hash chain (exit 3 naming the first broken entry); export: write it out",
    )
    _db_arguments(parser)
    parser.add_argument(
        "--format", choices=("csv", "json"), default="csv", help="export format (default csv)"
    )
    parser.add_argument("--out", help="export file (default: standard output)")
    parser.add_argument(
        "--unblind",
        action="store_true",
        help="export the arm names of blinded studies instead of their codes (an admin's --user and a "
        "--reason; recorded in the audit trail)",
    )
    parser.add_argument("--user", help="with --unblind: an administrator's account (password as for review)")
    parser.add_argument("--reason", default="", help="with --unblind: why the names are needed")


def run(args: argparse.Namespace) -> int:
    from cytopipe.serve.auth import AuthError
    from cytopipe.serve.review_command import _open

    engine, sessions = _open(args)
    try:
        with sessions() as db:
            return _verify(db) if args.action == "verify" else _export(args, db)
    except AuthError as exc:
        print(f"cytopipe audit: refused ({exc.status}): {exc.message}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def _verify(db) -> int:
    from cytopipe.serve import audit

    ok, n, message = audit.verify_chain(db)
    print(("ok: " if ok else "BROKEN: ") + message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 3  # the check ran and found a problem (1 is a bug)


def _export(args: argparse.Namespace, db) -> int:
    from sqlalchemy import select

    from cytopipe.serve import audit, blinding
    from cytopipe.serve.auditexport import export_text
    from cytopipe.serve.db import Audit, Study

    data = Path(args.data).resolve()
    if args.unblind:
        _record_unblinding(args, db)
    elif args.user or args.reason:
        raise ServeError("--user and --reason go with --unblind (a coded export needs no account)")
    rows = [audit.as_dict(r) for r in db.scalars(select(Audit).order_by(Audit.id))]
    if not args.unblind and any(not blinding.arms_visible(s) for s in db.scalars(select(Study))):
        secret = blinding.read_secret(data)
        if secret is None:
            raise ServeError(
                f"the workspace has blinded studies but {data} has no {blinding.SECRET_FILE} (their arm "
                "codes are seeded by it); give the --data folder of `cytopipe serve`"
            )
        from cytopipe.serve.storage import BlobStore

        rows = blinding.blind_audit(db, rows, secret, BlobStore(data))
    text = export_text(rows, args.format)
    if args.out:
        from cytopipe.store import atomic_write_bytes

        atomic_write_bytes(Path(args.out), text.encode("utf-8"))
    else:
        sys.stdout.write(text)
    return 0


def _record_unblinding(args: argparse.Namespace, db) -> None:
    """Check the administrator's account and reason, and record the unblinded export."""
    from cytopipe.serve import audit, auth
    from cytopipe.serve.auth import AuthError
    from cytopipe.serve.review_command import _password

    if not args.user or not args.reason.strip():
        raise ServeError(
            "--unblind needs --user (an administrator's account) and --reason (why the arm names are "
            "needed): the unblinded export is recorded in the audit trail"
        )
    user = auth.authenticate(db, args.user, _password())
    db.commit()
    if user is None:
        raise AuthError(401, f"user {args.user!r}: unknown or wrong password")
    if not auth.allowed(user.role, "accounts"):
        raise AuthError(
            403, f"your role ({user.role}) does not allow an unblinded export (administrators only)"
        )
    audit.record(db, user.name, "audit.unblind", "audit", "", None,
                 {"format": args.format, "out": str(Path(args.out).resolve()) if args.out else "standard output"},
                 args.reason.strip())  # fmt: skip
    db.commit()
