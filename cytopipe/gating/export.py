"""Export: a sample's gates as Gating-ML 2.0, and a population's events as FCS.

``write_gatingml(result, path)`` writes the gates exactly as they were applied to one
sample (data-driven gates as their fitted geometry) together with the compensation matrix
and the per-channel transforms, so FlowKit, FlowJo or Cytobank can re-apply them.
Transforms map to Gating-ML as follows:

* ``logicle``, ``hyperlog``, ``fasinh``, ``flin``, ``flog``: the same Gating-ML transform
  (a ``scale`` factor is folded into the gate coordinates);
* ``arcsinh`` with cofactor c: ``fasinh`` with T = c sinh(1), M = 1/ln(10), A = 0, which
  equals asinh(x / c) (the Cytobank convention), so coordinates are unchanged;
* ``linear``: no transformation reference.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from cytopipe.errors import GatingError, GatingMLError
from cytopipe.gating.engine import GatingResult
from cytopipe.gating.gates import BooleanGate, Dim, EllipsoidGate, Gate, Operand, PolygonGate, RectangleGate
from cytopipe.gating.gatingml import NAME_PREFIX, NS
from cytopipe.gating.template import ROOT
from cytopipe.schema import NOT_MEASURED

COMP_ID = "cytopipe_compensation"


def _num(v: float) -> str:
    v = float(v)
    if math.isinf(v):  # XML Schema doubles spell infinities INF / -INF
        return "INF" if v > 0 else "-INF"
    return repr(v)


def gatingml_ids(names) -> dict[str, str]:
    """Population name -> a valid, unique Gating-ML id (an XML NCName: no spaces).

    The population name itself is kept in the gate's ``custom_info`` and restored on import.
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        gid = re.sub(r"[^A-Za-z0-9._-]", "_", name.strip())
        if not gid or not re.match(r"[A-Za-z_]", gid[0]):
            gid = "g_" + gid
        base, k = gid, 2
        while gid in used:
            gid, k = f"{base}_{k}", k + 1
        used.add(gid)
        out[name] = gid
    return out


def gatingml_transform(spec: dict | None) -> tuple[str | None, dict, float]:
    """(Gating-ML element name, its parameters, factor to divide coordinates by)."""
    if spec is None or spec["type"] == "identity":
        return None, {}, 1.0
    t = spec["type"]
    scale = spec.get("scale", 1.0)
    if t == "arcsinh":
        c = spec["cofactor"]
        return "fasinh", {"T": c * math.sinh(1.0), "M": 1.0 / math.log(10.0), "A": 0.0}, 1.0
    if t == "linear":
        return "flin", {"T": spec["T"], "A": spec["A"]}, 1.0
    if t == "log":
        return "flog", {"T": spec["T"], "M": spec["M"]}, 1.0
    if t == "fasinh":
        return "fasinh", {p: spec[p] for p in ("T", "M", "A")}, 1.0
    if t in ("logicle", "hyperlog"):
        return t, {p: spec[p] for p in ("T", "W", "M", "A")}, scale
    raise GatingMLError(
        f"the {t} transform has no Gating-ML 2.0 equivalent; use logicle or arcsinh to export"
    )


def write_gatingml(result: GatingResult, path: str | Path) -> Path:
    """Write the gates applied to one sample (with compensation and transforms) as Gating-ML 2.0."""
    from lxml import etree

    path = Path(path)
    E = {k: "{" + v + "}" for k, v in NS.items()}
    root = etree.Element(E["gating"] + "Gating-ML", nsmap=NS)
    template = result.template

    comp = result.compensation
    if comp is not None:
        m = etree.SubElement(root, E["transforms"] + "spectrumMatrix", {E["transforms"] + "id": COMP_ID})
        for tag in ("fluorochromes", "detectors"):
            el = etree.SubElement(m, E["transforms"] + tag)
            for ch in comp["channels"]:
                etree.SubElement(el, E["data-type"] + "fcs-dimension", {E["data-type"] + "name": ch})
        for row in comp["matrix"]:
            s = etree.SubElement(m, E["transforms"] + "spectrum")
            for v in row:
                etree.SubElement(s, E["transforms"] + "coefficient", {E["transforms"] + "value": _num(v)})
    comp_channels = set(comp["channels"]) if comp is not None else set()
    for mid, mat in template.matrices.items():
        m = etree.SubElement(root, E["transforms"] + "spectrumMatrix", {E["transforms"] + "id": mid})
        for tag, names in (("fluorochromes", mat.fluorochromes), ("detectors", mat.detectors)):
            el = etree.SubElement(m, E["transforms"] + tag)
            for ch in names:
                etree.SubElement(el, E["data-type"] + "fcs-dimension", {E["data-type"] + "name": ch})
        for row in mat.matrix:
            s = etree.SubElement(m, E["transforms"] + "spectrum")
            for v in row:
                etree.SubElement(s, E["transforms"] + "coefficient", {E["transforms"] + "value": _num(v)})

    xform_ids: dict[tuple, str] = {}
    engine_specs = _specs(result)

    def transform_ref(dim: Dim) -> tuple[str | None, float]:
        spec = engine_specs.get(dim)
        kind, params, scale = gatingml_transform(spec)
        if kind is None:
            return None, scale
        key = (kind, tuple(sorted(params.items())))
        if key not in xform_ids:
            tid = f"xf_{kind}_{len(xform_ids) + 1}"
            xform_ids[key] = tid
            t = etree.Element(E["transforms"] + "transformation", {E["transforms"] + "id": tid})
            etree.SubElement(
                t, E["transforms"] + kind, {E["transforms"] + k: _num(v) for k, v in params.items()}
            )
            root.insert(_n_matrices(root), t)
        return xform_ids[key], scale

    ratio_ids: dict = {}

    def dimension(parent_el, dim: Dim, tag: str = "dimension", bounds=None) -> float:
        attrs = {}
        if dim.ratio is not None:
            comp_ref = "uncompensated"
        elif dim.compensation in ("template", "FCS") and result.channel_of.get(dim.name) in comp_channels:
            comp_ref = COMP_ID
        elif dim.compensation in template.matrices:
            comp_ref = dim.compensation
        else:
            comp_ref = "uncompensated"
        attrs[E["gating"] + "compensation-ref"] = comp_ref
        tid, scale = transform_ref(dim)
        if tid is not None:
            attrs[E["gating"] + "transformation-ref"] = tid
        if bounds is not None:
            lo, hi = bounds
            if lo is not None:
                attrs[E["gating"] + "min"] = _num(lo / scale)
            if hi is not None:
                attrs[E["gating"] + "max"] = _num(hi / scale)
        d = etree.SubElement(parent_el, E["gating"] + tag, attrs)
        if dim.ratio is not None:
            r = dim.ratio
            rid = ratio_ids.get(r)
            if rid is None:
                rid = ratio_ids[r] = f"xf_ratio_{len(ratio_ids) + 1}"
                t = etree.Element(E["transforms"] + "transformation", {E["transforms"] + "id": rid})
                f = etree.SubElement(
                    t, E["transforms"] + "fratio", {E["transforms"] + k: _num(getattr(r, k)) for k in "ABC"}
                )
                for ch in (r.numerator, r.denominator):
                    etree.SubElement(
                        f, E["data-type"] + "fcs-dimension", {E["data-type"] + "name": _channel(result, ch)}
                    )
                root.insert(_n_matrices(root), t)
            etree.SubElement(
                d, E["data-type"] + "new-dimension", {E["data-type"] + "transformation-ref": rid}
            )
        else:
            etree.SubElement(
                d, E["data-type"] + "fcs-dimension", {E["data-type"] + "name": _channel(result, dim.name)}
            )
        return scale

    ids = gatingml_ids(template.names)
    for pop in template:
        if result.populations[pop.name].source == NOT_MEASURED:
            continue  # a marker its gate needs is not in the file (nor its descendants'): no gate
        applied = _without_parent_operand(result.populations[pop.name].gate, pop.parent)
        attrs = {E["gating"] + "id": ids[pop.name]}
        if pop.parent != ROOT:
            attrs[E["gating"] + "parent_id"] = ids[pop.parent]
        _write_gate(root, E, applied, attrs, dimension, pop.name, ids)

    tree = etree.ElementTree(root)
    tree.write(str(path), xml_declaration=True, encoding="UTF-8", pretty_print=True)
    return path


def _without_parent_operand(gate: Gate, parent: str) -> Gate:
    """``and`` of the gate's own parent and X is just X below that parent (Gating-ML ANDs every
    gate with its parent); FlowKit cannot parse the redundant form, so drop the operand."""
    if not isinstance(gate, BooleanGate) or gate.op != "and":
        return gate
    rest = tuple(o for o in gate.operands if not (o.population == parent and not o.negate))
    if len(rest) == len(gate.operands) or not rest:
        return gate
    if len(rest) == 1:
        if not rest[0].negate:
            return gate  # a plain copy of one population: keep the original form
        return BooleanGate(op="not", operands=(Operand(rest[0].population),))
    return BooleanGate(op="and", operands=rest)


def _n_matrices(root) -> int:
    """Insert transformations after spectrum matrices and earlier transformations."""
    return sum(1 for el in root if not el.tag.startswith("{" + NS["gating"] + "}"))


def _channel(result: GatingResult, name: str) -> str:
    return result.channel_of.get(name, name)


def _specs(result: GatingResult) -> dict:
    """Dim -> transform spec the engine applied (re-derived from the template)."""
    from cytopipe.gating.engine import _all_dims

    specs = {}
    t = result.template
    for pop in t:
        if result.populations[pop.name].source == NOT_MEASURED:  # no gate applied in this file
            continue
        for d in _all_dims(result.populations[pop.name].gate) + _all_dims(pop.gate):
            if d.transform is None:
                specs[d] = None
            elif d.transform != "default" and d.transform in t.transforms:
                specs[d] = t.transforms[d.transform]
            else:
                specs[d] = t.transforms.get(d.name, t.transforms.get(d.transform))
            applied = result.transforms.get(result.channel_of.get(d.name, ""))
            if d.transform is not None and applied is not None and d.ratio is None:
                specs[d] = applied  # e.g. a cofactor estimated from the data (`cofactor: auto`)
    return specs


def _gate_element(root, E, kind: str, attrs: dict, name: str):
    from lxml import etree

    el = etree.SubElement(root, E["gating"] + kind, attrs)
    info = etree.SubElement(el, E["data-type"] + "custom_info")
    info.text = NAME_PREFIX + name
    return el


def _write_gate(root, E, gate: Gate, attrs: dict, dimension, name: str, ids: dict[str, str]) -> None:
    from lxml import etree

    g = E["gating"]
    if isinstance(gate, RectangleGate):
        el = _gate_element(root, E, "RectangleGate", attrs, name)
        for d, lo, hi in zip(gate.dims, gate.lower, gate.upper):
            dimension(el, d, bounds=(lo, hi))
    elif isinstance(gate, PolygonGate):
        el = _gate_element(root, E, "PolygonGate", attrs, name)
        scales = [dimension(el, d) for d in gate.dims]
        for x, y in gate.vertices:
            v = etree.SubElement(el, g + "vertex")
            for c, s in ((x, scales[0]), (y, scales[1])):
                etree.SubElement(v, g + "coordinate", {E["data-type"] + "value": _num(c / s)})
    elif isinstance(gate, EllipsoidGate):
        el = _gate_element(root, E, "EllipsoidGate", attrs, name)
        scales = np.array([dimension(el, d) for d in gate.dims])
        mean = etree.SubElement(el, g + "mean")
        for c, s in zip(gate.center, scales):
            etree.SubElement(mean, g + "coordinate", {E["data-type"] + "value": _num(c / s)})
        cov = gate.covariance / np.outer(scales, scales)
        cm = etree.SubElement(el, g + "covarianceMatrix")
        for row in cov:
            r = etree.SubElement(cm, g + "row")
            for v in row:
                etree.SubElement(r, g + "entry", {E["data-type"] + "value": _num(v)})
        etree.SubElement(el, g + "distanceSquare", {E["data-type"] + "value": _num(gate.distance_square)})
    elif isinstance(gate, BooleanGate):
        el = _gate_element(root, E, "BooleanGate", attrs, name)
        op = etree.SubElement(el, g + gate.op)
        for o in gate.operands:
            a = {g + "ref": ids[o.population]}
            if o.negate:
                a[g + "use-as-complement"] = "true"
            etree.SubElement(op, g + "gateReference", a)
    elif getattr(gate, "type", "") == "all_of":
        # a fitted diagonal gate with extra thresholds (e.g. Treg: CD25/CD127 diagonal AND FOXP3+):
        # each part as a gate of the same parent, the population as their Boolean AND
        refs = []
        for k, part in enumerate(gate.parts, 1):
            pid = f"{attrs[g + 'id']}_part{k}"
            part_attrs = {**attrs, g + "id": pid}
            _write_gate(root, E, part, part_attrs, dimension, f"{name} (part {k})", ids)
            refs.append(pid)
        el = _gate_element(root, E, "BooleanGate", attrs, name)
        op = etree.SubElement(el, g + "and")
        for ref in refs:
            etree.SubElement(op, g + "gateReference", {g + "ref": ref})
    else:
        raise GatingMLError(f"cannot export gate type {type(gate).__name__} to Gating-ML", population=name)


def write_population_fcs(path: str | Path, sample, result: GatingResult, population: str) -> Path:
    """Write the raw (uncompensated, untransformed) events of one population as FCS.

    Channel names, ``$PnS`` markers, ``$PnR`` ranges, the other keywords and the spillover
    matrix of the source file are kept, so the file can be re-analysed anywhere.
    """
    from cytopipe.fcs import write_fcs

    if result.n_events != sample.events.shape[0]:
        raise GatingError(
            f"the result has {result.n_events} events but the sample has {sample.events.shape[0]}",
            file=getattr(sample, "path", None),
            population=population,
        )
    idx = result.indices(population)
    keywords = dict(getattr(sample, "keywords", {}) or {})
    keywords["CYTOPIPE_POPULATION"] = population
    keywords["CYTOPIPE_SOURCE"] = str(getattr(sample, "path", "") or "")
    return write_fcs(path, sample.events[idx], sample.channels, keywords=keywords, spillover=sample.spillover)
