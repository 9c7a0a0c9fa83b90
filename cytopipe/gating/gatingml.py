"""Gating-ML 2.0 import: a Gating-ML document becomes a fixed-gate :class:`Template`.

Every gate becomes a population named by its ``gating:id``; a QuadrantGate becomes one
rectangle population per Quadrant. Dimensions keep their own compensation reference
(``FCS``, ``uncompensated`` or a ``spectrumMatrix`` id) and transformation reference, so the
engine evaluates them exactly as the standard says. Supported: Rectangle, Polygon,
Ellipsoid, Quadrant and Boolean gates; flin, flog, fasinh, logicle, hyperlog and fratio
transformations; spectrumMatrix compensation. Read a file with ``cytopipe.gating.read_gatingml``
(:mod:`cytopipe.gating.loading`), which also recognises Cytobank exports and FlowJo 9 workspaces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cytopipe.errors import GatingMLError
from cytopipe.gating._adapters import check_transform
from cytopipe.gating.gates import BooleanGate, Dim, EllipsoidGate, Operand, PolygonGate, Ratio, RectangleGate
from cytopipe.gating.template import ROOT, Matrix, Population, Template

NS = {
    "gating": "http://www.isac-net.org/std/Gating-ML/v2.0/gating",
    "transforms": "http://www.isac-net.org/std/Gating-ML/v2.0/transformations",
    "data-type": "http://www.isac-net.org/std/Gating-ML/v2.0/datatypes",
}
G = "{" + NS["gating"] + "}"
T = "{" + NS["transforms"] + "}"
NAME_PREFIX = "cytopipe population: "
D = "{" + NS["data-type"] + "}"

_TRANSFORM_PARAMS = {
    "flin": ("T", "A"),
    "flog": ("T", "M"),
    "fasinh": ("T", "M", "A"),
    "logicle": ("T", "W", "M", "A"),
    "hyperlog": ("T", "W", "M", "A"),
}


def _attr(el, ns: str, name: str, required: bool = False, what: str = ""):
    value = el.get(ns + name)
    if value is None:
        value = el.get(name)
    if value is None and required:
        raise GatingMLError(f"{what or el.tag} (line {el.sourceline}) lacks attribute {name!r}")
    return value


def _float(el, ns, name, required=False):
    value = _attr(el, ns, name, required)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise GatingMLError(
            f"attribute {name!r} = {value!r} is not a number (line {el.sourceline})"
        ) from None


class _Doc:
    """The compensation matrices and transformations of a Gating-ML document, and its gate
    elements as cytopipe gates (shared by the plain and the Cytobank reader)."""

    def __init__(self, root):
        self.matrices: dict[str, Matrix] = {}
        for m in root.iter(T + "spectrumMatrix"):
            mid = _attr(m, T, "id", True, "spectrumMatrix")
            fluoro = [
                _attr(d, D, "name", True) for d in m.find(T + "fluorochromes").iter(D + "fcs-dimension")
            ]
            dets = [_attr(d, D, "name", True) for d in m.find(T + "detectors").iter(D + "fcs-dimension")]
            rows = [
                [_float(c, T, "value", True) for c in s.iter(T + "coefficient")]
                for s in m.iter(T + "spectrum")
            ]
            arr = np.array(rows, dtype=np.float64)
            if arr.shape != (len(fluoro), len(dets)):
                raise GatingMLError(
                    f"spectrumMatrix {mid!r} is {arr.shape}, expected {len(fluoro)} x {len(dets)}"
                )
            self.matrices[mid] = Matrix(fluoro, dets, arr)

        self.transforms: dict[str, dict] = {}
        self.ratios: dict[str, Ratio] = {}
        for t in root.iter(T + "transformation"):
            tid = _attr(t, T, "id", True, "transformation")
            child = next((c for c in t if isinstance(c.tag, str)), None)
            if child is None:
                raise GatingMLError(f"transformation {tid!r} is empty")
            kind = child.tag.replace(T, "")
            if kind == "fratio":
                dims = [_attr(d, D, "name", True) for d in child.iter(D + "fcs-dimension")]
                if len(dims) != 2:
                    raise GatingMLError(f"fratio {tid!r} needs two fcs-dimensions")
                self.ratios[tid] = Ratio(
                    dims[0], dims[1], *(_float(child, T, p, True) for p in ("A", "B", "C"))
                )
            elif kind in _TRANSFORM_PARAMS:
                spec = {"type": kind, **{p: _float(child, T, p, True) for p in _TRANSFORM_PARAMS[kind]}}
                self.transforms[tid] = check_transform(spec, {"key": f"transformation {tid}"})
            else:
                raise GatingMLError(f"transformation {tid!r}: unsupported type {kind!r}")

    def dim(self, el) -> Dim:
        comp = _attr(el, G, "compensation-ref")
        if comp in (None, "uncompensated"):
            comp = None
        elif comp != "FCS" and comp not in self.matrices:
            raise GatingMLError(f"compensation-ref {comp!r} is not defined (line {el.sourceline})")
        xform = _attr(el, G, "transformation-ref")
        if xform is not None and xform not in self.transforms:
            raise GatingMLError(f"transformation-ref {xform!r} is not defined (line {el.sourceline})")
        fcs = el.find(D + "fcs-dimension")
        if fcs is not None:
            return Dim(_attr(fcs, D, "name", True), comp, xform)
        new = el.find(D + "new-dimension")
        if new is None:
            raise GatingMLError(f"dimension without fcs-dimension or new-dimension (line {el.sourceline})")
        rid = _attr(new, D, "transformation-ref", True)
        if rid not in self.ratios:
            raise GatingMLError(f"new-dimension refers to unknown fratio {rid!r}")
        return Dim(rid, comp, xform, ratio=self.ratios[rid])

    def gates(self, el, kind: str, gid: str, name_of=lambda g: g) -> list[tuple[str, object]]:
        """``[(id, gate)]`` of one gate element (a QuadrantGate gives one rectangle per Quadrant)."""
        dim = self.dim
        if kind == "RectangleGate":
            dels = el.findall(G + "dimension")
            return [
                (
                    gid,
                    RectangleGate(
                        [dim(d) for d in dels],
                        [_float(d, G, "min") for d in dels],
                        [_float(d, G, "max") for d in dels],
                    ),
                )
            ]
        if kind == "PolygonGate":
            dims = [dim(d) for d in el.findall(G + "dimension")]
            verts = [
                [_float(c, D, "value", True) for c in v.findall(G + "coordinate")]
                for v in el.findall(G + "vertex")
            ]
            return [(gid, PolygonGate(dims, verts))]
        if kind == "EllipsoidGate":
            dims = [dim(d) for d in el.findall(G + "dimension")]
            mean = [_float(c, D, "value", True) for c in el.find(G + "mean").findall(G + "coordinate")]
            cov = [
                [_float(e, D, "value", True) for e in r.findall(G + "entry")]
                for r in el.find(G + "covarianceMatrix").findall(G + "row")
            ]
            d2 = _float(el.find(G + "distanceSquare"), D, "value", True)
            return [(gid, EllipsoidGate(dims, mean, cov, d2))]
        if kind == "QuadrantGate":
            dividers = {}
            for dv in el.findall(G + "divider"):
                values = sorted(float(v.text) for v in dv.findall(G + "value"))
                dividers[_attr(dv, G, "id", True, "divider")] = (dim(dv), values)
            out = []
            for q in el.findall(G + "Quadrant"):
                qdims, lo, hi = [], [], []
                for pos in q.findall(G + "position"):
                    ref = _attr(pos, G, "divider_ref", True, "position")
                    if ref not in dividers:
                        raise GatingMLError(f"quadrant position refers to unknown divider {ref!r}")
                    d, values = dividers[ref]
                    loc = _float(pos, G, "location", True)
                    below = [v for v in values if v <= loc]
                    above = [v for v in values if v > loc]
                    qdims.append(d)
                    lo.append(below[-1] if below else None)
                    hi.append(above[0] if above else None)
                out.append(
                    (_attr(q, G, "id", True, "Quadrant"), RectangleGate(qdims, lo, hi, style="rectangle"))
                )
            return out
        # BooleanGate
        ops = [c for c in el if isinstance(c.tag, str) and c.tag in (G + "and", G + "or", G + "not")]
        if len(ops) != 1:
            raise GatingMLError(f"BooleanGate {gid!r} needs exactly one of and/or/not")
        op = ops[0].tag.replace(G, "")
        operands = tuple(
            Operand(
                name_of(_attr(r, G, "ref", True, "gateReference")),
                _attr(r, G, "use-as-complement") == "true",
            )
            for r in ops[0].findall(G + "gateReference")
        )
        if not operands or (op == "not" and len(operands) != 1):
            raise GatingMLError(
                f"BooleanGate {gid!r}: {op} needs {'one' if op == 'not' else 'some'} gateReference"
            )
        return [(gid, BooleanGate(op=op, operands=operands))]


GATE_KINDS = ("RectangleGate", "PolygonGate", "EllipsoidGate", "QuadrantGate", "BooleanGate")


def _read(root, path: Path) -> Template:
    doc = _Doc(root)

    # cytopipe writes population names that are not valid XML ids into custom_info
    names: dict[str, str] = {}
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.startswith(G) and el.get(G + "id") is not None:
            info = el.find(D + "custom_info")
            text = (info.text or "").strip() if info is not None else ""
            if text.startswith(NAME_PREFIX):
                names[el.get(G + "id")] = text[len(NAME_PREFIX) :]

    def name_of(gid: str | None) -> str | None:
        return None if gid is None else names.get(gid, gid)

    pops: dict[str, Population] = {}

    def add(name: str, parent: str | None, gate) -> None:
        if name in pops:
            raise GatingMLError(f"gate id {name!r} is used twice")
        pops[name] = Population(name=name, parent=parent or ROOT, gate=gate)

    for el in root.iter():
        if not isinstance(el.tag, str) or not el.tag.startswith(G):
            continue
        kind = el.tag.replace(G, "")
        if kind not in GATE_KINDS:
            continue
        gid = name_of(_attr(el, G, "id", True, kind))
        parent = name_of(_attr(el, G, "parent_id"))
        for qid, gate in doc.gates(el, kind, gid, name_of):
            add(qid if kind == "QuadrantGate" else gid, parent, gate)

    if not pops:
        raise GatingMLError("the document contains no gates")
    names = set(pops)
    for p in pops.values():
        if p.parent != ROOT and p.parent not in names:
            raise GatingMLError(f"gate {p.name!r} has unknown parent_id {p.parent!r}")
        if isinstance(p.gate, BooleanGate):
            for o in p.gate.operands:
                if o.population not in names:
                    raise GatingMLError(f"BooleanGate {p.name!r} refers to unknown gate {o.population!r}")
    return Template(
        name=path.stem,
        populations=pops,
        transforms=doc.transforms,
        compensation="none",
        matrices=doc.matrices,
        source=path,
        preprocess=True,  # Gating-ML 2.0 gates are defined on preprocessed values
    )
