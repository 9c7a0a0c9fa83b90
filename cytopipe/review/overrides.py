"""The gate a review decision asks for on one sample, and the numbers a gate's override takes.

An override names a gate's own numbers, on the gate's transformed scale (``CD25 >=``, ``CD127 <``;
for a diagonal gate such as Treg ``FOXP3 >=``, ``diagonal >=``, ``<marker> mode`` and ``<marker>
SD``), or gives a polygon's ``vertices`` or an ellipse's ``center``; a pooled decision takes the
patient's pooled estimate. :func:`overridden_template` puts those fixed gates into the run's
template of a sample, which :mod:`cytopipe.review.regate` gates again; :func:`settable_numbers` is
what the review page and ``cytopipe review --set`` both name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.errors import ReviewError
from cytopipe.review.decisions import Decision, ellipse_params, polygon_vertices
from cytopipe.review.runcache import loaded_run, prepared


def current_params(
    review: pd.DataFrame, sample_id: str, population: str, run_dir: str | Path | None = None
) -> dict[str, float]:
    """The gate numbers applied to a sample (``{"CD25 >=": 3.05, ...}``) from gate_review.

    A ``diagonal`` gate (e.g. Treg) has the numbers ``CD25 mode``, ``CD25 SD``, ``CD127 mode``,
    ``CD127 SD``, ``diagonal >=`` (the offset along the diagonal, in robust SDs) and one threshold
    per extra marker (``FOXP3 >=``); when the stored rows lack them (the run's own rows) and
    ``run_dir`` is given, they are taken from the sample gated again as in the run."""
    rows = review[(review["sample_id"] == sample_id) & (review["population"] == population)]
    if rows.empty:
        raise ReviewError("no gate-review data for this gate", sample=sample_id, population=population)
    row = rows.iloc[0]
    out = {str(n): float(v) for n, v in zip(row["param_names"], row["params"])}
    if run_dir is not None:
        lr = loaded_run(run_dir)
        template = lr.state.template_for(sample_id)  # a FlowJo workspace run: the sample's own gates
        if population in template.populations and is_diagonal(template[population].gate):
            if "diagonal >=" not in out:
                out.update(diagonal_numbers(lr, sample_id, population))
    return out


def diagonal_names(template_gate: Any) -> list[str]:
    """The numbers a diagonal gate's override takes, in reading order: each extra marker's threshold
    (``FOXP3 >=``), the cut along the diagonal (``diagonal >=``), then the cloud's modes and SDs."""
    a, b = (d.name for d in template_gate.dims[:2])
    extra = [f"{f.dims[0].name} {'>=' if sign == '+' else '<'}"
             for f, sign in zip(template_gate.extra, template_gate.signs[2:])]  # fmt: skip
    return [*extra, "diagonal >=", f"{a} mode", f"{a} SD", f"{b} mode", f"{b} SD"]


def settable_numbers(
    review: pd.DataFrame, sample_id: str, population: str, run_dir: str | Path
) -> dict[str, float]:
    """A gate's numbers under the names its override takes: what ``cytopipe review --set "NAME
    VALUE"`` and the API's ``params`` accept, and what :func:`override_gate` lists when a name is
    refused. A quadrant, range or rectangle gate's thresholds (``CD25 >=``, ``CD127 <``); a diagonal
    gate's numbers (Treg: ``FOXP3 >=``, ``diagonal >=``, ``CD25 mode``, ...), never where its
    diagonal crosses the axes (gate_review's ``CD25 >= (diagonal crossing)``, which no override
    takes). Empty for a gate moved by its shape (polygon vertices, ellipse centre) or a boolean gate."""
    rows = review[(review["sample_id"] == sample_id) & (review["population"] == population)]
    numbers = current_params(review, sample_id, population, run_dir)
    template = loaded_run(run_dir).state.template_for(sample_id)  # a FlowJo workspace run: its own gates
    gate = template[population].gate if population in template.populations else None
    if gate is not None and is_diagonal(gate):
        return {k: numbers[k] for k in diagonal_names(gate) if k in numbers}
    if gate is None or str(rows["gate_type"].iloc[0]) not in ("quadrant", "range", "rectangle"):
        return {}
    allowed = [f"{d.name} {op}" for d in gate.dims for op in (">=", "<")]
    return {k: numbers[k] for k in allowed if k in numbers}


def is_diagonal(gate: Any) -> bool:
    from cytopipe.gating.landmarks import DiagonalGate

    return isinstance(gate, DiagonalGate)


def _recording(gate: Any) -> Any:
    """A copy of a diagonal gate whose realized gates remember the numbers they were made from."""
    from cytopipe.gating.landmarks import DiagonalGate

    class RecordingDiagonalGate(type(gate)):  # type: ignore[misc, valid-type]
        def realize(self, params):
            applied = DiagonalGate.realize(self, params)
            applied.review_params = {k: [float(v) for v in np.ravel(p)] for k, p in params.items()}
            return applied

    out = RecordingDiagonalGate.__new__(RecordingDiagonalGate)
    out.__dict__.update(gate.__dict__)
    return out


def numbers_of(template_gate: Any, applied: Any) -> dict[str, float]:
    """The named numbers of a realized diagonal gate (see :func:`current_params`)."""
    rec = getattr(applied, "review_params", None)
    if not rec or "" not in rec:
        return {}
    a, b = (d.name for d in template_gate.dims[:2])
    m1, s1, m2, s2, t = rec[""][:5]
    out = {f"{a} mode": m1, f"{a} SD": s1, f"{b} mode": m2, f"{b} SD": s2, "diagonal >=": t}
    for f, sign in zip(template_gate.extra, template_gate.signs[2:]):
        key = f"[{f.dims[0].name}]"
        if key in rec:
            out[f"{f.dims[0].name} {'>=' if sign == '+' else '<'}"] = rec[key][0]
    return out


def diagonal_numbers(lr: Any, sample_id: str, population: str) -> dict[str, float]:
    """The numbers of the run's own diagonal gate of ``population`` on one sample (gated again)."""
    from cytopipe import gating

    template = lr.state.template_for(sample_id)
    g = template[population].gate
    prep = prepared(lr, sample_id)
    pops = dict(template.populations)
    pops[population] = dataclasses.replace(pops[population], gate=_recording(g))
    result = gating.gate(
        prep.sample,
        dataclasses.replace(template, populations=pops),
        pooled=lr.state.pooled,
        sample_meta=prep.meta,
        transforms=lr.state.transforms,
    )
    return numbers_of(g, result.populations[population].gate)


def _with_params(numbers: dict, params: Mapping[str, Any], allowed, where) -> dict:
    """The gate's current ``numbers`` with a decision's ``params`` set over them (each a known,
    finite number)."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ReviewError(f"unknown gate numbers {unknown}; this gate has {sorted(allowed)}", **where)
    for name, value in params.items():
        value = float(value)
        if not np.isfinite(value):
            raise ReviewError(f"gate number {name!r} must be finite, not {value}", **where)
        numbers[name] = value
    return numbers


def _diagonal_override(lr: Any, g: Any, decision: Decision, params: Mapping[str, Any], where) -> Any:
    numbers = diagonal_numbers(lr, decision.sample_id, decision.population)
    numbers = _with_params(numbers, params, list(numbers), where)
    try:
        chosen = g.params_from_numbers(numbers)
    except ValueError as exc:
        raise ReviewError(str(exc), **where) from None
    applied = g.realize(chosen)
    applied.review_params = {k: [float(x) for x in v] for k, v in chosen.items()}
    return applied


def override_gate(lr: Any, decision: Decision, review: pd.DataFrame, meta: Mapping[str, Any]) -> Any:
    """The fixed gate a decision asks for on one sample."""
    from cytopipe.gating.fitters import DataDrivenGate
    from cytopipe.gating.gates import EllipsoidGate, PolygonGate, RectangleGate

    template = lr.state.template_for(decision.sample_id)
    where = {"sample": decision.sample_id, "population": decision.population}
    if decision.population not in template.populations:
        raise ReviewError(f"no such population; populations are {template.names}", **where)
    g = template[decision.population].gate
    dims = list(g.dims)
    if decision.kind == "pooled":
        if not isinstance(g, DataDrivenGate):
            raise ReviewError("this gate is fixed in the template: it has no pooled estimate", **where)
        chosen = {}
        for suffix, fitter in g.fit_items():
            hit = (
                lr.state.pooled.lookup(decision.population + suffix, "patient", meta)
                if lr.state.pooled
                else None
            )
            if hit is None and fitter.default is None:
                raise ReviewError(
                    f"no pooled estimate or default for {decision.population + suffix}", **where
                )
            chosen[suffix] = hit[0] if hit is not None else fitter.default
        applied = g.realize(chosen)
        applied.review_params = {k: [float(x) for x in np.ravel(v)] for k, v in chosen.items()}
        return applied
    params = dict(decision.params)
    if "vertices" in params:
        return PolygonGate(dims, polygon_vertices(params, len(dims), where))
    if "center" in params:
        return EllipsoidGate(dims, *ellipse_params(params, len(dims), where))
    if is_diagonal(g):
        return _diagonal_override(lr, g, decision, params, where)
    allowed = {f"{d.name} {op}" for d in dims for op in (">=", "<")}
    numbers = _with_params(
        current_params(review, decision.sample_id, decision.population), params, allowed, where
    )
    lower = [numbers.get(f"{d.name} >=") for d in dims]
    upper = [numbers.get(f"{d.name} <") for d in dims]
    rows = review[(review["sample_id"] == decision.sample_id) & (review["population"] == decision.population)]
    style = str(rows["gate_type"].iloc[0])
    if style not in ("quadrant", "range", "rectangle"):
        raise ReviewError(
            f"a {style} gate takes vertices or an ellipse, not thresholds {sorted(params)}", **where
        )
    return RectangleGate(dims, lower, upper, style=style)


def overridden_template(
    lr: Any, overrides: Mapping[str, Decision], review: pd.DataFrame, meta: Mapping
) -> Any:
    """The run's template of the sample (``meta``) with the overridden populations' gates replaced
    by fixed gates."""
    template = lr.state.template_for(meta["sample_id"])
    pops = dict(template.populations)
    for name, pop in template.populations.items():  # diagonal gates record their numbers
        if name not in overrides and is_diagonal(pop.gate):
            pops[name] = dataclasses.replace(pop, gate=_recording(pop.gate))
    for name, decision in overrides.items():
        pops[name] = dataclasses.replace(pops[name], gate=override_gate(lr, decision, review, meta))
    return dataclasses.replace(template, populations=pops)
