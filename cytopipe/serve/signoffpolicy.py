"""Four-eyes sign-off: a study's policy that the person who signs a run's gating off is a second
person, not the one who made the results being signed.

With ``four_eyes`` on (the study's ``settings``; on for a new study, off for a study made before
migration 0006 until an administrator turns it on), a run cannot be signed off by anyone who

* started the run, or made it as a new version of a run, or started any run it is a version of
  (who processed the data, as the first signature level of GxP review), or
* overrode, pooled or reverted a gate of the run or of a run it is a version of (a correction is
  checked by another person: a carried-over override counts for whoever made it, as its decision
  row names them).

Approving a gate is part of the reviewer's own review and does not count. The policy is changed
by an administrator only, with a reason, as one ``study.policy`` audit entry; a refused
signature is recorded (``review.signoff_refused``) like a wrong password.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from cytopipe.serve import audit
from cytopipe.serve.auth import AuthError
from cytopipe.serve.db import Run, Study
from cytopipe.serve.reviewmodels import ReviewDecision, RunVersion

KEY = "four_eyes"
RULE = "sign-off by a second person (four eyes)"
_VERBS = {"override": "overrode", "pooled": "used the pooled gate for", "revert": "reverted"}


def required(study: Study) -> bool:
    """True when the study's runs must be signed off by a second person. A study without the key
    (none after migration 0006, which writes it) is held to the rule."""
    return bool((study.settings or {}).get(KEY, True))


def set_policy(db: DBSession, study: Study, user: str, four_eyes: bool, reason: str) -> dict[str, Any]:
    """Turn the study's four-eyes rule on or off (the caller checks the role): one audit entry with
    the setting before and after and the reason, which is required."""
    reason = " ".join(str(reason or "").split())
    if not reason:
        raise AuthError(400, f"say why the study's rule '{RULE}' changes: a reason is required")
    before = required(study)
    if before == bool(four_eyes):
        raise AuthError(
            409, f"study {study.name!r} has {RULE} {'on' if before else 'off'} already: nothing changed"
        )
    study.settings = {**(study.settings or {}), KEY: bool(four_eyes)}  # a new dict: the JSON column is saved
    entry = audit.record(
        db, user, "study.policy", "study", study.id, {KEY: before}, {KEY: bool(four_eyes)}, reason
    )
    return {"study": study.id, KEY: bool(four_eyes), "audit_entry": entry.id}


def _chain(db: DBSession, run_id: int) -> list[Run]:
    """The run, then the run it is a version of, and so on (the first run last)."""
    runs: list[Run] = []
    current: int | None = run_id
    while current is not None and current not in {r.id for r in runs}:
        run = db.get(Run, current)
        if run is None:
            break
        runs.append(run)
        version = db.get(RunVersion, current)
        current = version.parent_run_id if version else None
    return runs


def authors(db: DBSession, run_id: int) -> dict[str, list[str]]:
    """Who may not sign the run off under the rule: user -> what they did (in the order done). Each
    decision row names its author, a carried-over one too (migration 0007); a gate change carried
    over into later versions is one change, named in the run where it was made."""
    found: dict[str, list[str]] = {}
    seen: set[tuple[int, str, str, str]] = set()  # (audit entry, sample, population, kind) of a change
    for run in reversed(_chain(db, run_id)):  # the first run first
        version = db.get(RunVersion, run.id)
        what = f"made run {run.id} as version {version.version} of run {version.parent_run_id}" if version \
            else f"started run {run.id}"  # fmt: skip
        found.setdefault(run.started_by, []).append(what)
        rows = db.scalars(select(ReviewDecision).where(ReviewDecision.run_id == run.id,
                                                       ReviewDecision.kind != "approve")
                          .order_by(ReviewDecision.id))  # fmt: skip
        changes: dict[str, list[str]] = {}
        for r in rows:
            key = (r.audit_id, r.sample_id, r.population, r.kind)
            if key in seen:
                continue  # carried over from a run before: that change is named where it was made
            seen.add(key)
            changes.setdefault(r.user_name, []).append(
                f"{_VERBS.get(r.kind, r.kind)} {r.population} of {r.sample_id}"
            )
        for user, done in changes.items():
            more = f" and {len(done) - 1} more gate change(s)" if len(done) > 1 else ""
            found.setdefault(user, []).append(f"{done[0]}{more} in run {run.id}")
    return found


def refuse_own_work(db: DBSession, run: Run, study: Study, signer: str) -> None:
    """409 naming the rule when the study requires a second person and ``signer`` made the run or
    changed its gates; the refusal is recorded in the audit trail (committed) first."""
    if not required(study):
        return
    done = authors(db, run.id).get(signer)
    if not done:
        return
    message = (
        f"run {run.id} cannot be signed off by {signer}: study {study.name!r} requires {RULE}, and {signer} "
        f"{'; '.join(done)}. Another reviewer, who neither started the run nor changed its gates, signs it "
        "off (an administrator can turn the rule off on the study's page, with a reason)"
    )
    audit.record(db, signer, "review.signoff_refused", "run", run.id, None, {"rule": KEY, "signer": signer,
                                                                             "did": done}, RULE)  # fmt: skip
    db.commit()
    raise AuthError(409, message)


def who_cannot_sign(db: DBSession, run: Run, study: Study) -> dict[str, list[str]]:
    """For the review page: the people the rule keeps from signing this run (empty when it is off)."""
    return authors(db, run.id) if required(study) else {}
