"""Approved and overridden gates of a run as an ``--examples`` file: per sample and population, the
gate actually applied (thresholds, polygon vertices or ellipse) in the gate's transformed units,
so that learned gating can start from a study's first reviewed samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cytopipe.review.decisions import ReviewState, status_of

EXAMPLES_FORMAT = "cytopipe-gate-examples/1"


def examples(run_dir: str | Path, state: ReviewState) -> dict[str, Any]:
    """``{"format", "run", "signoff", "examples": [{sample_id, population, status, gate_type, dims,
    params, shapes, audit_entry}, ...]}`` for every approved, overridden or pooled gate."""
    from cytopipe.report.gate_review import read_gate_review
    from cytopipe.review.regate import current_params

    review = read_gate_review(run_dir)
    first = (
        review[review["panel"] == 0]
        .drop_duplicates(["sample_id", "population"])
        .set_index(["sample_id", "population"])
    )
    status = status_of(state.decisions)
    entries: dict[tuple[str, str], Any] = {}
    for d in state.decisions:
        entries[(d.sample_id, d.population)] = d.audit_entry
    out = []
    for (sid, pop), st in sorted(status.items()):
        if (sid, pop) not in first.index:
            continue
        row = first.loc[(sid, pop)]
        out.append({
            "sample_id": sid, "population": pop, "status": st, "gate_type": str(row["gate_type"]),
            "source": str(row["source"]), "dims": [d for d in (row["x"], row["y"]) if d],
            "params": current_params(review, sid, pop, run_dir),
            "shapes": json.loads(row["shapes"]), "pct_parent": float(row["pct_parent"]),
            "audit_entry": entries.get((sid, pop)),
        })  # fmt: skip
    return {"format": EXAMPLES_FORMAT, "run": str(Path(run_dir).resolve()), "signoff": state.signoff,
            "examples": out}  # fmt: skip


def examples_text(data: dict[str, Any], fmt: str = "yaml") -> str:
    if fmt == "json":
        return json.dumps(data, indent=1, sort_keys=False)
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
