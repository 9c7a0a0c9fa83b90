"""Gate review as data: approvals and overrides of a run's gates, applied incrementally.

A *decision* is one reviewer action on one sample's gate of one population: ``approve``,
``override`` (new gate numbers, e.g. ``{"CD25 >=": 3.1}``, or polygon vertices / an ellipse),
``pooled`` (use the patient's pooled gate) or ``revert`` (back to the run's own gate). Decisions
are kept in the run folder's ``review.json`` (with the audit entry that recorded each one; the
workspace database holds the same decisions and the hash-chained audit trail).

:func:`cytopipe.review.regate.apply_review` re-gates only the samples whose overrides changed,
from the run's own study state (transforms, pooled estimates, compensation: :func:`load_run`),
replaces only their rows of ``population_stats.parquet`` and ``gate_review.parquet``, adds the
columns ``gate_source`` (fixed / fitted / pooled / mixed / boolean / overridden) and
``audit_entry``, then refreshes statistics and the report. :mod:`.examples` exports the
approved and overridden gates as an ``--examples`` file. See docs/review.md.
"""

from cytopipe.review.decisions import (
    REASONS,
    Decision,
    ReviewState,
    effective_overrides,
    read_review,
    write_review,
)

__all__ = ["REASONS", "Decision", "ReviewState", "effective_overrides", "read_review", "write_review"]
