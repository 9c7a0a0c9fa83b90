"""``cytopipe review``: gate review from the command line, on the same workspace database as
``cytopipe serve`` (``--data DIR`` or ``--database URL``); ``cytopipe audit`` is in
:mod:`cytopipe.serve.audit_command` and shares the options and sign-in here.

    cytopipe review 3 --data ws --user rita --list Treg
    cytopipe review 3 --data ws --user rita --override P001_W00/Treg --set "FOXP3 >= 1.7" \\
        --category "poor staining" --reason "FOXP3 dim in this tube"
    cytopipe review 3 --data ws --user rita --pooled P001_W00/Treg --also P001_W12 --reason "clog"
    cytopipe review 3 --data ws --user rita --approve-unflagged Treg
    cytopipe review 3 --data ws --user rita --signoff
    cytopipe review 3 --data ws --examples approved_gates.yaml

The password of ``--user`` is read from CYTOPIPE_PASSWORD or standard input: every action is
recorded in the audit trail under that account, with its role checked as in the browser.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from cytopipe.errors import ReviewError, ServeError


def _db_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default="cytopipe-workspace", help="the workspace folder of `cytopipe serve`"
    )
    parser.add_argument(
        "--database", metavar="URL", help="postgresql://... when the workspace uses PostgreSQL"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=int, help="the workspace's run number")
    _db_arguments(parser)
    parser.add_argument("--user", help="your account (password from CYTOPIPE_PASSWORD or standard input)")
    parser.add_argument("--list", metavar="POPULATION", help="print the review queue of a population")
    parser.add_argument("--approve", metavar="SAMPLE/POPULATION", action="append", default=[])
    parser.add_argument(
        "--approve-unflagged", metavar="POPULATION", help="approve every unflagged gate of it"
    )
    parser.add_argument("--approve-run", action="store_true", help="approve every gate of the run")
    parser.add_argument("--override", metavar="SAMPLE/POPULATION", help="override this gate (with --set)")
    parser.add_argument(
        "--set",
        metavar='"CD25 >= 3.1"',
        action="append",
        default=[],
        help='a new gate number, named as the review page names it ("FOXP3 >= 1.7", "CD25 mode 2.1")',
    )
    parser.add_argument("--pooled", metavar="SAMPLE/POPULATION", help="use the patient's pooled gate")
    parser.add_argument("--revert", metavar="SAMPLE/POPULATION", help="back to the run's own gate")
    parser.add_argument(
        "--also",
        metavar="SAMPLE[,SAMPLE...]",
        action="append",
        default=[],
        help="a group change: the same --override/--pooled/--revert for these samples too (one audit entry)",
    )
    parser.add_argument("--reason", default="", help="why (required for --override/--pooled/--revert)")
    parser.add_argument("--category", default="", help="debris, clog, poor staining, fit failure, ...")
    parser.add_argument("--signoff", action="store_true", help="sign the run's gating (locks its gates)")
    parser.add_argument("--new-version", action="store_true", help="a new, unlocked version of the run")
    parser.add_argument("--examples", metavar="FILE", help="write approved/overridden gates (.yaml or .json)")


def _open(args: argparse.Namespace):
    from cytopipe.serve.db import database_url, open_database

    data = Path(args.data).resolve()
    if not args.database and not (data / "cytopipe.sqlite").is_file():
        raise ServeError(f"no workspace database in {data}; give the --data folder of `cytopipe serve`")
    return open_database(database_url(args.database, data))


def _password() -> str:
    if os.environ.get("CYTOPIPE_PASSWORD"):
        return os.environ["CYTOPIPE_PASSWORD"]
    if sys.stdin is not None and sys.stdin.isatty():
        import getpass

        return getpass.getpass("password: ")
    line = (sys.stdin.readline() if sys.stdin is not None else "").rstrip("\r\n")
    if not line:  # a script that forgot it: say so, rather than sign in with "" (a failed sign-in)
        raise ReviewError(
            "no password given, and standard input is not a terminal to ask for one: set "
            "CYTOPIPE_PASSWORD, pipe the password on standard input, or run the command in a terminal"
        )
    return line


def _target(text: str) -> tuple[str, str]:
    sample, sep, population = text.partition("/")
    if not sep or not sample or not population:
        raise ReviewError(f"{text!r}: write SAMPLE/POPULATION, e.g. P001_W00/Treg")
    return sample, population


def _numbers(items: list[str]) -> dict[str, float]:
    """``--set "NAME VALUE"`` as the review page names a gate's numbers: ``FOXP3 >= 1.7`` (also
    ``FOXP3>=1.7``), ``diagonal >= 0.5``, ``CD25 mode 2.1``, ``CD25 SD 0.4``."""
    out = {}
    for item in items:
        m = re.fullmatch(r"\s*(.+?)\s*(>=|<)\s*([-+0-9.eE]+)\s*", item)
        if m:
            out[f"{m.group(1)} {m.group(2)}"] = float(m.group(3))
            continue
        m = re.fullmatch(r"\s*(.+?)\s+([-+0-9.eE]+)\s*", item)
        try:
            value = float(m.group(2)) if m else None
        except ValueError:
            value = None
        if value is None:
            raise ReviewError(f'--set {item!r}: write the gate number\'s name and value, e.g. "CD25 >= 3.1", '
                              '"CD127 < 2.4" or "CD25 mode 2.1" (the review page lists a gate\'s numbers)')  # fmt: skip
        out[" ".join(m.group(1).split())] = value
    return out


def run(args: argparse.Namespace) -> int:
    from cytopipe.review.decisions import Decision
    from cytopipe.serve import reviewops
    from cytopipe.serve.auth import AuthError

    engine, sessions = _open(args)
    try:
        with sessions() as db:
            return _review(args, db, reviewops, Decision)
    except AuthError as exc:
        print(f"cytopipe review: refused ({exc.status}): {exc.message}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def _review(args, db, reviewops, Decision) -> int:
    from cytopipe.serve import auth
    from cytopipe.serve.auth import AuthError

    if args.list or args.examples:
        run, study = reviewops.finished(db, args.run)
        if args.list:
            q = reviewops.queue(db, run, study, args.list, not (study.settings or {}).get("blinded"))
            for it in q["items"]:
                mark = "flagged" if it["flagged"] else ("outlier" if it["outlier"] else "")
                shown = "-" if it["pct_parent"] is None else f"{it['pct_parent']:.2f}%"  # e.g. not measured
                print(f"{it['sample_id']}\t{shown}\t{it['status']}\t{mark}\t{it['reasons']}")
        if args.examples:
            from cytopipe.review.examples import examples, examples_text

            out = Path(args.examples)
            fmt = "json" if out.suffix.lower() == ".json" else "yaml"
            from cytopipe.store import atomic_write_bytes

            atomic_write_bytes(
                out,
                examples_text(examples(reviewops.out_dir(run), reviewops.state(db, args.run)), fmt).encode(),
            )
            print(f"cytopipe review: wrote {out}", file=sys.stderr)
    actions = bool(args.approve or args.approve_unflagged or args.approve_run or args.override or args.pooled
                   or args.revert or args.signoff or args.new_version)  # fmt: skip
    if not actions:
        return 0
    if not args.user:
        raise ReviewError("--user is required for review actions (they are recorded under your account)")
    user = auth.authenticate(db, args.user, _password())
    db.commit()
    if user is None:
        raise AuthError(401, f"user {args.user!r}: unknown or wrong password")
    perm = "signoff" if args.signoff else "review"
    if not auth.allowed(user.role, perm):
        raise AuthError(403, f"your role ({user.role}) does not allow this ({perm})")
    for target in args.approve:
        sample, population = _target(target)
        _approved(
            reviewops.approve(db, args.run, user.name, "one", population, sample), f"{sample}/{population}"
        )
    if args.approve_unflagged:
        got = reviewops.approve(db, args.run, user.name, "unflagged", args.approve_unflagged)
        _approved(got, f"the unflagged gates of {args.approve_unflagged}")
    if args.approve_run:
        _approved(reviewops.approve(db, args.run, user.name, "run"), f"every gate of run {args.run}")
    for kind, target in (("override", args.override), ("pooled", args.pooled), ("revert", args.revert)):
        if target:
            sample, population = _target(target)
            decision = Decision(kind=kind, sample_id=sample, population=population, user=user.name,
                                params=_numbers(args.set) if kind == "override" else {},
                                reason=args.reason or args.category, category=args.category)  # fmt: skip
            also = [
                x.strip() for item in args.also for x in item.split(",") if x.strip() and x.strip() != sample
            ]
            if also:
                group = [decision] + [replace(decision, sample_id=x) for x in dict.fromkeys(also)]
                got = reviewops.change_group(db, args.run, user.name, group, background=False)
                for sid, g in got["group"].items():
                    print(f"{sid}/{population}: {g['before_pct']:.2f}% -> {g['after_pct']:.2f}% "
                          f"(audit entry {got['audit_entry']})")  # fmt: skip
                continue
            got = reviewops.change_gate(db, args.run, user.name, decision, background=False)
            print(f"{sample}/{population}: {got['before_pct']:.2f}% -> {got['after_pct']:.2f}% "
                  f"(audit entry {got['audit_entry']})")  # fmt: skip
    if args.signoff:
        if not auth.allowed(user.role, "signoff"):
            raise AuthError(403, f"your role ({user.role}) does not allow signing off")
        got = reviewops.signoff(db, args.run, user, _password_again(), background=False)
        print(
            f"run {args.run}: signed off by {got['signed_by']} at {got['at']} (audit entry {got['audit_entry']})"
        )
    if args.new_version:
        new = reviewops.new_version(db, args.run, user.name, background=False)
        print(f"run {args.run}: new version is run {new.id}")
    return 0


def _approved(got: dict, what: str) -> None:
    # one line, as the other actions print (not the API's JSON)
    print(f"approved {what}: {got['approved']} gate(s) (audit entry {got['audit_entry']})")


def _password_again() -> str:
    # the electronic signature re-checks the password (from the same source as the sign-in)
    return os.environ.get("CYTOPIPE_PASSWORD") or _password()
