"""Gate review in the workspace: the decisions, sign-offs and run versions tables, and the operations
that the pages, the JSON API and ``cytopipe review`` share.

Every action is one database transaction holding the decision rows and their audit entry
(``review.approve``, ``review.override``, ``review.pooled``, ``review.revert``, ``review.signoff``,
``run.version``); then the run folder's ``review.json`` is written from the database and the
changed sample is re-gated (:func:`cytopipe.review.regate.apply_review`). population_stats and
gate_review are updated before the answer (under the run's lock); the statistics and the report
follow in a background thread that does not hold the lock (:mod:`cytopipe.serve.reviewrefresh`):
one refresh per run at a time, requests made meanwhile collapse into one more refresh, which reads
the latest state.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from cytopipe.errors import ReviewError
from cytopipe.review.decisions import REASONS, Decision, ReviewState, write_review
from cytopipe.schema import NOT_MEASURED
from cytopipe.serve import audit, auth, reviewrefresh, signoffpolicy
from cytopipe.serve.auth import AuthError
from cytopipe.serve.db import Audit, Run, Study, User
from cytopipe.serve.results import REPORT_TABLES
from cytopipe.serve.reviewchecks import (
    refuse_nothing_to_revert,
    refuse_unmeasured,
    refuse_unreviewed,
    refuse_unsigned,
    unmeasured,
)
from cytopipe.serve.reviewmodels import ReviewDecision, RunVersion, Signoff
from cytopipe.serve.reviewrefresh import refresher

logger = logging.getLogger(__name__)
SIGNOFF_MEANING = "reviewed and approved"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def out_dir(run: Run) -> Path:
    return Path(run.folder) / "out"


def finished(db: DBSession, run_id: int) -> tuple[Run, Study]:
    run = db.get(Run, run_id)
    if run is None:
        raise AuthError(404, f"run {run_id} not found")
    if run.status != "finished" or not (out_dir(run) / "gate_review.parquet").is_file():
        raise AuthError(409, f"run {run_id} is {run.status}: only a finished run's gates can be reviewed")
    return run, db.get(Study, run.study_id)


def state(db: DBSession, run_id: int) -> ReviewState:
    """The run's review as :class:`ReviewState` (decisions in order, sign-off, version)."""
    rows = list(db.scalars(
        select(ReviewDecision).where(ReviewDecision.run_id == run_id).order_by(ReviewDecision.id)
    ))  # fmt: skip
    version = db.get(RunVersion, run_id)
    entries = {r.carried_audit_id for r in rows if r.carried_audit_id is not None}
    carried = {  # the run.version entry of a carried-over decision: who carried it over, and when
        e.id: {"from_run": version.parent_run_id if version else None, "by": e.user_name, "at": e.at,
               "audit_entry": e.id}
        for e in (db.scalars(select(Audit).where(Audit.id.in_(entries))) if entries else [])
    }  # fmt: skip
    decisions = [
        Decision(
            kind=r.kind,
            sample_id=r.sample_id,
            population=r.population,
            user=r.user_name,
            params=r.params or {},
            reason=r.reason,
            category=r.category,
            at=r.at,
            audit_entry=r.audit_id,
            before_pct=r.before_pct,
            after_pct=r.after_pct,
            carried=carried.get(r.carried_audit_id),
        )  # fmt: skip
        for r in rows
    ]
    sign = db.get(Signoff, run_id)
    return ReviewState(
        decisions=decisions,
        signoff=None
        if sign is None
        else {
            "user": sign.user_name,
            "meaning": sign.meaning,
            "at": sign.at,
            "audit_entry": sign.audit_id,
        },  # fmt: skip
        version=version.version if version else 1,
        parent_run=str(version.parent_run_id) if version else None,
    )


def _locked(db: DBSession, run_id: int) -> None:
    sign = db.get(Signoff, run_id)
    if sign is not None:
        raise AuthError(
            409,
            f"run {run_id}'s gating was signed off by {sign.user_name} at {sign.at[:19]} UTC: its gates are "
            "locked. Make a new version of the run to change them",
        )


# ------------------------------------------------------------------------------------------------
# the queue
# ------------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A finite float, or None (JSON null) for a missing value: the page embeds the queue with
    ``json.dumps``, where a NaN is not valid JSON and left the queue empty."""
    v = float(value) if value is not None and not pd.isna(value) else None
    return v if v is not None and math.isfinite(v) else None


def queue(
    db: DBSession, run: Run, study: Study, population: str | None, can_see_arms: bool
) -> dict[str, Any]:
    """Every sample's gate of ``population`` (default: the first), flagged and outlying first."""
    from cytopipe.report.gate_review import read_gate_review
    from cytopipe.report.outliers import gate_outliers, with_site
    from cytopipe.review.decisions import effective_overrides, status_of

    out = out_dir(run)
    review = read_gate_review(out)
    ps = pd.read_parquet(out / "population_stats.parquet")
    populations = list(dict.fromkeys(review["population"]))
    population = population or populations[0]
    if population not in populations:
        raise AuthError(404, f"no population {population!r} in run {run.id}; populations are {populations}")
    meta = ps[["sample_id", "patient_id", "visit", "arm"]].drop_duplicates("sample_id")
    outl = gate_outliers(review[review["population"] == population], with_site(meta, _samples_table(out)))
    outl = outl.merge(meta[["sample_id", "arm"]], on="sample_id", how="left")
    st = state(db, run.id)
    status = status_of(st.decisions)
    sources = review[(review["population"] == population) & (review["panel"] == 0)].set_index("sample_id")[
        "source"
    ]
    absent = unmeasured(review[review["population"] == population])
    changed = {k: changed_by(d) for k, d in effective_overrides(st.decisions).items() if k[1] == population}
    items = []
    for r in outl.itertuples():
        items.append({
            "sample_id": r.sample_id, "patient_id": str(r.patient_id), "visit": int(r.visit),
            "arm": str(r.arm) if can_see_arms else None, "pct_parent": _number(r.pct_parent),
            "flagged": bool(r.flagged), "flags": r.flags, "outlier": bool(r.outlier), "score": _number(r.score) or 0.0,
            "reasons": r.reasons, "source": str(sources.get(r.sample_id, "")),
            "status": NOT_MEASURED if (r.sample_id, population) in absent
            else status.get((r.sample_id, population), "unreviewed"),
            "changed_by": changed.get((r.sample_id, population), ""),
        })  # fmt: skip
    items.sort(key=lambda i: (not i["flagged"], not i["outlier"], -i["score"] if i["outlier"] else 0.0,
                              i["patient_id"], i["visit"]))  # fmt: skip
    parent = str(review.loc[review["population"] == population, "parent"].iloc[0])
    four_eyes = study is not None and signoffpolicy.required(study)  # (a bare run folder has no study)
    return {"run": run.id, "population": population, "parent": parent, "populations": populations, "items": items,
            "locked": st.locked, "signoff": st.signoff, "version": st.version, "reasons": list(REASONS),
            "arms_visible": can_see_arms, "four_eyes": four_eyes,
            "cannot_sign": signoffpolicy.who_cannot_sign(db, run, study) if four_eyes else {}}  # fmt: skip


def changed_by(d: Decision) -> str:
    """Who changed a gate, when and in which audit entry; for a carried-over change also who carried
    it into this version of the run, and when."""
    what = "Pooled gate used" if d.kind == "pooled" else "Overridden"
    text = f"{what} by {d.user} at {d.at[:19].replace('T', ' ')} UTC (audit entry {d.audit_entry})"
    c = d.carried
    if c:
        text += (f"; carried over from run {c.get('from_run')} by {c.get('by')} at "
                 f"{str(c.get('at'))[:19].replace('T', ' ')} UTC (audit entry {c.get('audit_entry')})")  # fmt: skip
    return text + "."


def gate_view(run: Run, sample_id: str, population: str) -> dict[str, Any]:
    """The gate of one sample as SVG panels (and their histograms, for the live frequency)."""
    from cytopipe.report.gate_review import panel_background, read_gate_review
    from cytopipe.review.overrides import settable_numbers
    from cytopipe.review.plot import panel_svg

    review = read_gate_review(out_dir(run))
    rows = review[(review["sample_id"] == sample_id) & (review["population"] == population)].sort_values(
        "panel"
    )
    if rows.empty:
        raise AuthError(404, f"no gate of {population!r} for sample {sample_id!r} in run {run.id}")
    drawn = (rows["shapes"] == "[]").all()  # e.g. a diagonal gate: its lines movable, not its corners
    if drawn:  # drawn from the sample
        from cytopipe.review.regate import loaded_run, regate_sample

        lr = loaded_run(out_dir(run))
        if population in lr.state.template.populations:
            got = regate_sample(lr, sample_id, {}, review)[1]
            got = got[got["population"] == population].sort_values("panel")
            if not got.empty and not (got["shapes"] == "[]").all():
                rows = got
    first = rows.iloc[0]
    if str(first["source"]) == NOT_MEASURED:  # no events, no gate: gate_review's counts are missing
        parent_count = first["parent_count"]  # missing too when the parent is not measured either
        return {"sample_id": sample_id, "population": population, "parent": first["parent"], "count": None,
                "parent_count": None if pd.isna(parent_count) else int(parent_count), "pct_parent": None,
                "source": first["source"], "flags": first["flags"], "params": {}, "panels": [],
                "drawn_from_sample": False, "measured": False}  # fmt: skip
    panels = []
    for _, r in rows.iterrows():
        background = panel_background(r)  # the parent's full events when the panel shows part of them
        panels.append({
            "svg": panel_svg(r), "x": r["x"], "y": r["y"], "x_range": list(map(float, r["x_range"])),
            "y_range": list(map(float, r["y_range"])), "x_bins": int(r["x_bins"]), "y_bins": int(r["y_bins"]),
            "counts": [int(c) for c in r["counts"]], "background": [int(c) for c in background.ravel()],
            "shapes": r["shapes"], "condition": r["condition"], "n_shown": int(r["n_shown"]),
            "gate_type": r["gate_type"],
        })  # fmt: skip
    return {"sample_id": sample_id, "population": population, "parent": first["parent"],
            "count": int(first["count"]), "parent_count": int(first["parent_count"]),
            "pct_parent": float(first["pct_parent"]), "source": first["source"], "flags": first["flags"],
            "params": settable_numbers(rows, sample_id, population, out_dir(run)),  # as --set names them
            "panels": panels, "drawn_from_sample": bool(drawn), "measured": True}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# actions
# ------------------------------------------------------------------------------------------------
_apply_locks: dict[int, threading.RLock] = {}
_guard = threading.Lock()


def _run_lock(run_id: int) -> threading.RLock:
    """Held while a run's tables are re-gated and written (seconds), never over the statistics and
    report refresh (30-100 s under load), so a save does not wait for the previous save's refresh."""
    with _guard:
        return _apply_locks.setdefault(run_id, threading.RLock())


def _stats_row(run: Run, sample_id: str, population: str) -> pd.Series:
    """The population_stats row of one sample's population (404 when there is none)."""
    ps = pd.read_parquet(
        out_dir(run) / "population_stats.parquet",
        columns=["sample_id", "population", "count", "parent_count", "pct_parent", "gate_source"],
    )
    hit = ps[(ps["sample_id"] == sample_id) & (ps["population"] == population)]
    if hit.empty:
        raise AuthError(404, f"no population {population!r} for sample {sample_id!r} in run {run.id}")
    return hit.iloc[0]


def preview(db: DBSession, run_id: int, decision: Decision) -> dict[str, Any]:
    from cytopipe.review.regate import preview as _preview

    run, _ = finished(db, run_id)
    row = _stats_row(run, decision.sample_id, decision.population)
    if decision.kind != "revert" and str(row["gate_source"]) == NOT_MEASURED:
        from cytopipe.report.gate_review import read_gate_review

        absent = unmeasured(read_gate_review(out_dir(run)))
        key = (decision.sample_id, decision.population)
        refuse_unmeasured(run_id, {key: absent.get(key, NOT_MEASURED)}, "change")
    before = float(row["pct_parent"])
    try:
        got = _preview(out_dir(run), decision, state(db, run_id))
    except ReviewError as exc:
        raise AuthError(400, str(exc)) from None
    return {"before_pct": before, "after_pct": got["pct_parent"], **got}


def change_gate(
    db: DBSession, run_id: int, user: str, decision: Decision, background: bool = True
) -> dict[str, Any]:
    """Override / pooled / revert one sample's gate: audit entry + decision row, then re-gate it."""
    run, _ = finished(db, run_id)
    _locked(db, run_id)
    with _run_lock(run_id):
        _locked(db, run_id)  # again under the lock: a sign-off may have come in while we waited for it
        refuse_nothing_to_revert(state(db, run_id), [decision])
        pv = preview(db, run_id, decision)
        entry = audit.record(
            db, user, f"review.{decision.kind}", "run", run_id,
            {"sample_id": decision.sample_id, "population": decision.population, "pct_parent": pv["before_pct"]},
            {"sample_id": decision.sample_id, "population": decision.population, "gate": decision.params or None,
             "category": decision.category, "pct_parent": pv["after_pct"]},
            " · ".join(x for x in (decision.category, decision.reason) if x),
        )  # fmt: skip
        row = ReviewDecision(run_id=run_id, kind=decision.kind, sample_id=decision.sample_id,
                             population=decision.population, params=decision.params or {}, reason=decision.reason,
                             category=decision.category, user_name=user, at=entry.at, audit_id=entry.id,
                             before_pct=pv["before_pct"], after_pct=pv["after_pct"])  # fmt: skip
        db.add(row)
        db.commit()
        result = _apply(db, run, [decision.sample_id], background)
    return {"audit_entry": entry.id, "before_pct": pv["before_pct"], "after_pct": pv["after_pct"], **result}


def change_group(
    db: DBSession, run_id: int, user: str, decisions: list[Decision], background: bool = True
) -> dict[str, Any]:
    """One override / pooled / revert for a group of samples (e.g. a patient's visits, or the samples a
    filter shows): one audit entry naming every sample with its before/after %, one decision row per
    sample pointing at it; then every sample of the group is re-gated."""
    run, _ = finished(db, run_id)
    _locked(db, run_id)
    if not decisions:
        raise AuthError(400, "no samples in the group")
    population, kind = decisions[0].population, decisions[0].kind
    samples = [d.sample_id for d in decisions]
    if len(set(samples)) != len(samples) or any(d.population != population for d in decisions):
        raise AuthError(400, "a group override names each sample once, all of one population")
    if kind != "revert":  # every sample whose population is not measured named at once
        from cytopipe.report.gate_review import read_gate_review

        absent = unmeasured(read_gate_review(out_dir(run)))
        refuse_unmeasured(run_id, {(s, population): absent[(s, population)] for s in samples
                                    if (s, population) in absent}, "change", group=True)  # fmt: skip
    with _run_lock(run_id):
        _locked(db, run_id)  # again under the lock (a sign-off waits for it)
        refuse_nothing_to_revert(state(db, run_id), decisions)
        previews = {d.sample_id: preview(db, run_id, d) for d in decisions}
        d0 = decisions[0]
        entry = audit.record(
            db, user, f"review.{kind}", "run", run_id,
            {"population": population, "samples": {s: p["before_pct"] for s, p in previews.items()}},
            {"population": population, "samples": {s: p["after_pct"] for s, p in previews.items()},
             "gate": d0.params or None, "category": d0.category, "group": len(samples)},
            " · ".join(x for x in (d0.category, d0.reason) if x),
        )  # fmt: skip
        for d in decisions:
            pv = previews[d.sample_id]
            db.add(ReviewDecision(run_id=run_id, kind=d.kind, sample_id=d.sample_id, population=population,
                                  params=d.params or {}, reason=d.reason, category=d.category, user_name=user,
                                  at=entry.at, audit_id=entry.id, before_pct=pv["before_pct"],
                                  after_pct=pv["after_pct"]))  # fmt: skip
        db.commit()
        result = _apply(db, run, samples, background)
    return {"audit_entry": entry.id, "population": population,
            "group": {s: {"before_pct": p["before_pct"], "after_pct": p["after_pct"]} for s, p in previews.items()},
            **result}  # fmt: skip


def approve(
    db: DBSession,
    run_id: int,
    user: str,
    scope: str,
    population: str | None = None,
    sample_id: str | None = None,
) -> dict[str, Any]:
    """Approve one gate (``scope="one"``), every unflagged, non-outlying gate of a population
    (``"unflagged"``) or every gate of the run (``"run"``)."""
    from cytopipe.report.gate_review import read_gate_review
    from cytopipe.report.outliers import gate_outliers, with_site

    run, _ = finished(db, run_id)
    _locked(db, run_id)
    review = read_gate_review(out_dir(run))
    first = review[review["panel"] == 0]
    absent = unmeasured(review)
    if scope in ("one", "unflagged") and not population or scope == "one" and not sample_id:
        raise AuthError(
            400,
            f"approving {scope!r} needs the population" + (" and the sample_id" if scope == "one" else ""),
        )
    if scope == "one":
        pairs = [(sample_id, population)]
        if first[(first["sample_id"] == sample_id) & (first["population"] == population)].empty:
            raise AuthError(404, f"no gate of {population!r} for sample {sample_id!r} in run {run_id}")
        refuse_unmeasured(run_id, {p: absent[p] for p in pairs if p in absent}, "approve")
    elif scope == "unflagged":
        ps = pd.read_parquet(
            out_dir(run) / "population_stats.parquet", columns=["sample_id", "patient_id", "visit"]
        )
        meta = with_site(ps.drop_duplicates("sample_id"), _samples_table(out_dir(run)))
        o = gate_outliers(review[review["population"] == population], meta)
        if o.empty:
            raise AuthError(404, f"no population {population!r} in run {run_id}")
        o = o[~o["flagged"] & ~o["outlier"]]
        pairs = list(zip(o["sample_id"], o["population"]))
    elif scope == "run":
        pairs = list(zip(first["sample_id"], first["population"]))
    else:
        raise AuthError(400, f"scope {scope!r}: use one, unflagged or run")
    pairs = [p for p in pairs if p not in absent]  # not measured: no gate to approve
    with _run_lock(run_id):  # never between a sign-off's check and its signature
        _locked(db, run_id)
        entry = audit.record(db, user, "review.approve", "run", run_id, None,
                             {"scope": scope, "population": population, "sample_id": sample_id, "gates": len(pairs)})  # fmt: skip
        for sid, pop in pairs:
            db.add(ReviewDecision(run_id=run_id, kind="approve", sample_id=sid, population=pop, params={}, reason="",
                                  category="", user_name=user, at=entry.at, audit_id=entry.id))  # fmt: skip
        db.commit()
        write_review(out_dir(run), state(db, run_id))
    return {"audit_entry": entry.id, "approved": len(pairs)}


def signoff(
    db: DBSession,
    run_id: int,
    user: User,
    password: str,
    meaning: str = SIGNOFF_MEANING,
    background: bool = True,
) -> dict[str, Any]:
    """The electronic signature: the signer's password again; meaning, identity and time stored.
    Only when every measured gate is approved or corrected, and, where the study requires a second
    person, by someone who neither made the run nor changed its gates (409 otherwise). Under the run's lock:
    a save that is re-gating a sample ends (its tables written) before the signature, and no save
    starts between the signature's check and its row."""
    from cytopipe.report.gate_review import read_gate_review

    run, study = finished(db, run_id)
    _locked(db, run_id)
    with _run_lock(run_id):
        _locked(db, run_id)
        refuse_unreviewed(run_id, read_gate_review(out_dir(run)), state(db, run_id))
        signoffpolicy.refuse_own_work(db, run, study, user.name)  # the study's four-eyes rule
        if auth.authenticate(db, user.name, password) is None:
            audit.record(db, user.name, "review.signoff_refused", "run", run_id, None, None, "wrong password")
            db.commit()
            raise AuthError(403, "the password is not right: the run was not signed off")
        entry = audit.record(db, user.name, "review.signoff", "run", run_id, None,
                             {"meaning": meaning, "signer": user.name, "role": user.role}, meaning)  # fmt: skip
        db.add(Signoff(run_id=run_id, user_name=user.name, meaning=meaning, at=entry.at, audit_id=entry.id))
        db.commit()
    run, _ = finished(db, run_id)
    _apply(db, run, [], background=background, tables=False)
    return {"audit_entry": entry.id, "signed_by": user.name, "at": entry.at, "meaning": meaning}


def new_version(db: DBSession, run_id: int, user: str, background: bool = True) -> Run:
    """A new version of a signed-off run: its outputs copied, its overrides carried over, unlocked.
    A run that is not signed off is refused (409, nothing recorded): its gates are reviewed directly.
    The parent's report is not copied (it names the parent's sign-off and version): the new
    version's own report is written in the background (:func:`report_pending` until then), or
    before the answer with ``background=False`` (the command line, whose process then ends)."""
    from cytopipe.report.figcache import CACHE_DIR as FIGURE_CACHE

    run, _ = finished(db, run_id)
    refuse_unsigned(run_id, db.get(Signoff, run_id) is not None)
    parent = db.get(RunVersion, run_id)
    version = (parent.version if parent else 1) + 1
    # A save or sign-off refreshes the statistics and the report in a background thread (temporary
    # names, then renames); copying mid-refresh fails or copies half. Under the run's lock no save
    # writes tables or asks for a refresh; wait (before opening a database write) until the running
    # and queued refreshes are done, then copy.
    with _run_lock(run_id):
        refresher(run_id, out_dir(run)).wait()
        new = Run(study_id=run.study_id, status="finished", folder="", template_id=run.template_id,
                  n_samples=run.n_samples, started_by=user, exit_code=run.exit_code, options=run.options,
                  finished_at=run.finished_at)  # fmt: skip
        db.add(new)
        db.flush()
        folder = Path(run.folder).parent / str(new.id)
        shutil.copytree(out_dir(run), folder / "out", ignore=shutil.ignore_patterns(
            ".cache", "review.json", "*.tmp*", "report.html", REPORT_TABLES))  # fmt: skip
        # the parent report's figures (not the rest of .cache: its secret stays with the parent): the
        # new version's report reads those whose data it shares instead of drawing them again
        figures = out_dir(run) / FIGURE_CACHE
        if figures.is_dir():
            shutil.copytree(figures, folder / "out" / FIGURE_CACHE, ignore=shutil.ignore_patterns("*.tmp"))
    new.folder = str(folder)
    rows = _in_force(db, run_id)
    entry = audit.record(db, user, "run.version", "run", new.id, {"run": run_id}, {
        "run": new.id, "version": version, "carried": [  # each gate change carried over, as its author made it
            {"sample_id": r.sample_id, "population": r.population, "kind": r.kind, "by": r.user_name,
             "audit_entry": r.audit_id} for r in rows]})  # fmt: skip
    db.add(RunVersion(run_id=new.id, parent_run_id=run_id, version=version))
    for r in rows:  # its author, time and audit entry kept; the version's entry says who carried it over
        db.add(ReviewDecision(run_id=new.id, kind=r.kind, sample_id=r.sample_id, population=r.population,
                              params=r.params, reason=r.reason, category=r.category, user_name=r.user_name,
                              at=r.at, audit_id=r.audit_id, before_pct=r.before_pct, after_pct=r.after_pct,
                              carried_from=r.id, carried_audit_id=entry.id))  # fmt: skip
    db.commit()
    _apply(db, new, [], background=background, tables=False)  # review.json now; its own report after
    return new


def report_pending(run: Run) -> bool:
    """Whether the run's report.html is missing while its refresh is requested or running (a new
    version's own report, written in the background after the version is made): see
    :func:`cytopipe.serve.reviewrefresh.report_pending`."""
    return reviewrefresh.report_pending(run.id, out_dir(run))


def _in_force(db: DBSession, run_id: int) -> list[ReviewDecision]:
    """The run's override and pooled-gate rows in force (the latest per gate, not reverted since)."""
    out: dict[tuple[str, str], ReviewDecision] = {}
    for r in db.scalars(
        select(ReviewDecision).where(ReviewDecision.run_id == run_id).order_by(ReviewDecision.id)
    ):
        if r.kind in ("override", "pooled"):
            out[(r.sample_id, r.population)] = r
        elif r.kind == "revert":
            out.pop((r.sample_id, r.population), None)
    return list(out.values())


def _apply(
    db: DBSession, run: Run, samples: list[str], background: bool, tables: bool = True
) -> dict[str, Any]:
    """review.json from the database; re-gate ``samples`` (tables now); statistics and report after."""
    from cytopipe.review.regate import apply_review

    out = out_dir(run)
    result: dict[str, Any] = {}
    with _run_lock(run.id):  # the tables now (re-entrant: change_gate already holds it)
        st = state(db, run.id)
        write_review(out, st)
        if tables:
            # the catalog holds the statistics too: written once, by the refresh, when the caller
            # waits for it (the command line); a server's save writes it now and again after
            result = apply_review(
                out, st, samples=samples, statistics=False, report=False, catalog=background
            )
        # requested after the tables are written: the refresh that serves it reads them
        refreshing = refresher(run.id, out)
        ticket = refreshing.request()
    if not background:
        refreshing.wait(ticket)
    return {"samples": result.get("samples", []), "seconds": result.get("seconds", {})}


def _samples_table(out: Path) -> pd.DataFrame | None:
    """The run's samples.parquet (its ``site`` column: the outlier rule's instruments), if any."""
    path = out / "samples.parquet"
    return pd.read_parquet(path) if path.is_file() else None
