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
    """``{"format", "run", "signoff", "transforms", "examples": [{sample_id, population, status, gate_type, dims,
    params, shapes, audit_entry}, ...]}`` for every approved, overridden or pooled gate; a
    ``diagonal`` gate (Treg CD25/CD127, CD56bright NK) also carries its full ``gate``."""
    from cytopipe.report.gate_review import read_gate_review
    from cytopipe.review.regate import current_params, loaded_run

    review = read_gate_review(run_dir)
    first = (
        review[review["panel"] == 0]
        .drop_duplicates(["sample_id", "population"])
        .set_index(["sample_id", "population"])
    )
    lr = loaded_run(run_dir)
    template = lr.state.template
    status = status_of(state.decisions)
    entries: dict[tuple[str, str], Any] = {}
    for d in state.decisions:
        entries[(d.sample_id, d.population)] = d.audit_entry
    out = []
    for (sid, pop), st in sorted(status.items()):
        if (sid, pop) not in first.index:
            continue
        row = first.loc[(sid, pop)]
        params = current_params(review, sid, pop, run_dir)
        entry = {
            "sample_id": sid, "population": pop, "status": st, "gate_type": str(row["gate_type"]),
            "source": str(row["source"]), "dims": [d for d in (row["x"], row["y"]) if d],
            "params": params, "shapes": json.loads(row["shapes"]), "pct_parent": float(row["pct_parent"]),
            "audit_entry": entries.get((sid, pop)),
        }  # fmt: skip
        gate = _diagonal_geometry(template, pop, params)
        if gate is not None:  # a half-plane: the panel's clipped shape does not carry it, the numbers do
            entry["gate"] = gate
        out.append(entry)
    # the gates' numbers are on the run's locked scales: the file carries them, so that
    # `cytopipe gate --examples` reads every file on the same scales (not each file's own cofactor)
    transforms = {str(m): _plain(spec) for m, spec in sorted(lr.state.transforms.items())}
    return {"format": EXAMPLES_FORMAT, "run": str(Path(run_dir).resolve()), "signoff": state.signoff,
            "transforms": transforms, "examples": out}  # fmt: skip


def _plain(spec: Any) -> Any:
    """A transform spec as plain YAML/JSON data (numpy scalars to Python numbers)."""
    if isinstance(spec, dict):
        return {str(k): _plain(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_plain(v) for v in spec]
    return spec.item() if hasattr(spec, "item") else spec


def _diagonal_geometry(template: Any, population: str, params: dict[str, float]) -> dict[str, Any] | None:
    """The full applied gate of a ``diagonal`` population (half-plane polygon, AND its extra
    thresholds) as an examples ``gate`` field, from its review numbers; None for other gates."""
    from cytopipe.gating.landmarks import DiagonalGate
    from cytopipe.gating.learn import gate_geometry

    tg = template[population].gate if population in template.populations else None
    if not isinstance(tg, DiagonalGate):
        return None
    try:
        return gate_geometry(tg.realize(tg.params_from_numbers(params)))
    except ValueError:
        return None


def examples_text(data: dict[str, Any], fmt: str = "yaml") -> str:
    if fmt == "json":
        return json.dumps(data, indent=1, sort_keys=False)
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
