"""Review actions refused before anything is recorded, for gates that cannot take them: a population
not measured in a sample (its gate needs a marker the file lacks: no events, no gate to approve or
change), a revert of a gate that has no override or pooled gate in force, a sign-off while
gates are still unreviewed, and a new version of a run that is not signed off."""

from __future__ import annotations

import pandas as pd

from cytopipe.review.decisions import Decision, ReviewState, effective_overrides, status_of
from cytopipe.schema import NOT_MEASURED
from cytopipe.serve.auth import AuthError


def unmeasured(review: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(sample, population) -> why, for each population not measured in a sample (its gate needs a
    marker the file lacks): it has no events and no gate to approve or change (gate_review and
    population_stats have a missing count for it)."""
    rows = review[(review["panel"] == 0) & (review["source"].astype(str) == NOT_MEASURED)]
    return {
        (s, p): str(f or NOT_MEASURED)
        for s, p, f in zip(rows["sample_id"], rows["population"], rows["flags"])
    }


def refuse_nothing_to_revert(current: ReviewState, decisions: list[Decision]) -> None:
    """409 for a revert of a gate that has no override or pooled gate in force (a no-op that would
    still be an audit entry and a row of the report's gate changes)."""
    changed = effective_overrides(current.decisions)
    plain = sorted(
        d.sample_id for d in decisions if d.kind == "revert" and (d.sample_id, d.population) not in changed
    )
    if plain:
        more = len(decisions) > 1
        raise AuthError(
            409,
            f"nothing to revert: {decisions[0].population} of sample{'s' if len(plain) > 1 else ''} "
            f"{', '.join(plain)} has no override or pooled gate; it is the run's gate already"
            + (". Revert only the samples that were changed (e.g. 'this sample')" if more else ""),
        )


def refuse_unmeasured(
    run_id: int, pairs: dict[tuple[str, str], str], action: str, group: bool = False
) -> None:
    """409 naming the samples (and why) whose population is not measured: nothing to ``action``."""
    if not pairs:
        return
    (_, population), why = next(iter(pairs.items()))
    why = why.removeprefix(f"{NOT_MEASURED}: ")
    samples = sorted(s for s, _ in pairs)
    todo = (
        "Leave these samples out: apply the change to 'this sample', or filter them out first"
        if group
        else "Go on with the next sample"
    )
    raise AuthError(
        409,
        f"{population} is not measured in sample{'s' if len(samples) > 1 else ''} {', '.join(samples)} of "
        f"run {run_id} ({why}): there is no gate to {action}. {todo}",
    )


def refuse_unreviewed(run_id: int, review: pd.DataFrame, current: ReviewState) -> None:
    """409 for a sign-off while a measured gate of the run is neither approved nor corrected: the
    signature means "reviewed and approved" (docs/review.md: every gate is reviewed first)."""
    status = status_of(current.decisions)
    first = review[review["panel"] == 0]
    absent = unmeasured(review)
    waiting = [
        (s, p)
        for s, p in dict.fromkeys(zip(first["sample_id"], first["population"]))
        if (s, p) not in status and (s, p) not in absent
    ]
    if not waiting:
        return
    populations = list(dict.fromkeys(p for _, p in waiting))
    sample, population = waiting[0]
    raise AuthError(
        409,
        f"run {run_id} cannot be signed off yet: {len(waiting)} gate(s) are not reviewed "
        f"(populations {', '.join(populations[:5])}{' ...' if len(populations) > 5 else ''}; first: "
        f"{population} of sample {sample}). Approve or correct every gate first (the review page's "
        "'Approve every gate of the run' approves the rest), then sign off",
    )


def refuse_unsigned(run_id: int, signed: bool) -> None:
    """409 for a new version of a run that is not signed off: its gates are not locked, so they are
    reviewed (and changed) in the run itself; a new version is how a signed-off run is reopened."""
    if not signed:
        raise AuthError(
            409,
            f"run {run_id} is not signed off: its gates are not locked, so review and change them in run "
            f"{run_id} itself. A new version is made of a signed-off run, to change its locked gates",
        )
