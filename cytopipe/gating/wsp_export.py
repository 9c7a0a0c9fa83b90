"""Export to FlowJo 10: the gates a run applied to each sample, as a FlowJo workspace (``.wsp``).

Every sample gets its own gate tree (its fitted gates, as FlowJo "custom" sample gates), its
compensation matrix (the spillover the run applied, channels prefixed ``Comp-`` as FlowJo does)
and one transformation per channel, so FlowJo, FlowKit's ``Workspace`` and cytopipe's own importer
re-apply the gates to the same events. The counts cytopipe found are stored as FlowJo stores its
own, so ``cytopipe reconcile`` on the exported workspace checks the round trip.

How cytopipe's gates are written (FlowJo stores gate coordinates on the raw, untransformed scale):

* rectangles, ranges and quadrants: ``RectangleGate`` (open sides left open);
* polygons: ``PolygonGate``; ellipses: a ``PolygonGate`` through 720 points of the ellipse (FlowJo
  and FlowKit evaluate ellipses as polygons anyway; the chord error is below 1e-5 of a half-axis);
* ``and`` of geometric parts (``all_of``, e.g. a ``diagonal`` gate with a FOXP3 threshold): a FlowJo
  ``<Gate>`` holds one geometry, so each part but the last becomes an intermediate population named
  ``"<population> [<markers of the part>]"`` (see :func:`intermediate_name`), chained under the
  parent, and the population itself holds the last part: its events are exactly the AND;
* ``not X``: a ``NotNode``; ``and``/``or`` of populations: ``AndNode``/``OrNode`` (FlowJo has no
  negated operand inside those: such a gate is refused with a clear error);
* ``arcsinh`` (cofactor c): FlowJo's ``fasinh`` with T = 262144, M = asinh(T / c) / ln 10, A = 0,
  i.e. asinh(x / c) rescaled to FlowJo's 0-1 axis (same order of events, so the same gates);
  untransformed channels: ``linear`` 0-262144. Other transforms are refused with a clear error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cytopipe.errors import GatingError
from cytopipe.gating.gates import BooleanGate, EllipsoidGate, PolygonGate, RectangleGate
from cytopipe.gating.landmarks import AllOfGate
from cytopipe.gating.template import ROOT
from cytopipe.schema import NOT_MEASURED

NS = {
    "gating": "http://www.isac-net.org/std/Gating-ML/v2.0/gating",
    "transforms": "http://www.isac-net.org/std/Gating-ML/v2.0/transformations",
    "data-type": "http://www.isac-net.org/std/Gating-ML/v2.0/datatypes",
}
TOP = 262144.0  # FlowJo's usual axis top ($PnR of 18-bit instruments)
PREFIX = "Comp-"
ELLIPSE_POINTS = 720


def write_flowjo_workspace(
    path: str | Path, results: Mapping[str, tuple[str | Path, object]], group: str = "cytopipe"
) -> Path:
    """Write ``{sample name: (FCS file, GatingResult)}`` as a FlowJo 10 workspace at ``path``.

    The sample name is what FlowJo and FlowKit call the sample (use the FCS file name).
    """
    from lxml import etree

    path = Path(path)
    g, t, d = ("{" + NS[k] + "}" for k in ("gating", "transforms", "data-type"))
    root = etree.Element("Workspace", nsmap=NS)
    root.attrib.update({"version": "20.0", "flowJoVersion": "10.7.1", "curGroup": "All Samples"})
    etree.SubElement(root, "Matrices")
    groups = etree.SubElement(root, "Groups")
    samples_el = etree.SubElement(root, "SampleList")
    ids = [str(i + 1) for i in range(len(results))]
    for gname in ("All Samples", group):
        gn = etree.SubElement(groups, "GroupNode", name=gname, annotation="", owningGroup=gname)
        refs = etree.SubElement(etree.SubElement(gn, "Group", name=gname), "SampleRefs")
        for sid in ids:
            etree.SubElement(refs, "SampleRef", sampleID=sid)

    for sid, (name, (fcs, result)) in zip(ids, results.items()):
        s = etree.SubElement(samples_el, "Sample")
        etree.SubElement(s, "DataSet", uri=Path(fcs).resolve().as_uri(), sampleID=sid)
        comp = result.compensation
        comp_channels = list(comp["channels"]) if comp else []
        if comp:
            m = etree.SubElement(
                s, t + "spilloverMatrix", spectral="0", prefix=PREFIX, name="cytopipe", suffix=""
            )
            m.set("id", "cytopipe")
            params = etree.SubElement(m, d + "parameters")
            for ch in comp_channels:
                etree.SubElement(
                    params, d + "parameter", {d + "name": ch, "userProvidedCompInfix": PREFIX + ch}
                )
            for ch, row in zip(comp_channels, comp["matrix"]):
                sp = etree.SubElement(m, t + "spillover", {d + "parameter": ch})
                for ch2, v in zip(comp_channels, row):
                    etree.SubElement(
                        sp, t + "coefficient", {d + "parameter": ch2, t + "value": repr(float(v))}
                    )
        axes = _axes(result)
        xforms = etree.SubElement(s, "Transformations")
        for channel, spec in axes.items():
            _transform_element(xforms, t, d, channel, spec)
        kws = etree.SubElement(s, "Keywords")
        etree.SubElement(kws, "Keyword", name="$FIL", value=Path(fcs).name)
        etree.SubElement(kws, "Keyword", name="$TOT", value=str(result.n_events))
        node = etree.SubElement(s, "SampleNode", name=name, annotation="", owningGroup="", sampleID=sid)
        node.set("count", str(result.n_events))
        subs = {ROOT: etree.SubElement(node, "Subpopulations")}
        tpl = result.template
        ident = iter(range(1, 10**9))
        gate_ids: dict[str, str] = {}
        paths: dict[str, str] = {ROOT: ""}  # population -> its full path in the workspace
        chain_counts = _chain_counts(fcs, result)
        for pop in tpl:
            if result.populations[pop.name].source == NOT_MEASURED:
                continue  # a marker its gate needs is not in the file: no gate, no count (not 0)
            applied = result.populations[pop.name].gate
            parent_el = subs[pop.parent]
            parent_id = gate_ids.get(pop.parent)
            parent_path = paths[pop.parent]
            count = str(result.populations[pop.name].count)
            where = dict(file=str(fcs), population=pop.name)
            if isinstance(applied, BooleanGate):
                el = _boolean(parent_el, applied, pop.name, paths, count, where)
            else:
                parts = list(applied.parts) if isinstance(applied, AllOfGate) else [applied]
                for k, part in enumerate(parts[:-1]):  # an AND: intermediate populations, one per part
                    inter = intermediate_name(pop.name, part)
                    n = chain_counts.get(pop.name, [])
                    el, parent_id = _population(
                        parent_el, g, d, inter, str(n[k]) if k < len(n) else "-1", sid, ident, parent_id,
                        part, result, axes, comp_channels, where,
                    )  # fmt: skip
                    parent_el = etree.SubElement(el, "Subpopulations")
                    parent_path += "/" + inter
                el, gate_ids[pop.name] = _population(
                    parent_el, g, d, pop.name, count, sid, ident, parent_id, parts[-1], result, axes,
                    comp_channels, where,
                )  # fmt: skip
            paths[pop.name] = parent_path + "/" + pop.name
            subs[pop.name] = etree.SubElement(el, "Subpopulations")
        for sub in subs.values():  # FlowJo omits empty Subpopulations
            if len(sub) == 0:
                sub.getparent().remove(sub)
    data = etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def intermediate_name(population: str, part) -> str:
    """Name of the intermediate population that holds one part of an AND (``all_of``) gate:
    ``"Treg [CD25 CD127]"`` for the CD25/CD127 part of Treg."""
    return f"{population} [{' '.join(part.markers)}]"


def _population(
    parent_el, g, d, name, count, sid, ident, parent_id, gate, result, axes, comp_channels, where
):
    """One geometric ``Population`` under ``parent_el``; returns (element, its gate id)."""
    from lxml import etree

    el = etree.SubElement(parent_el, "Population", name=name, annotation="", owningGroup="")
    el.set("count", count)
    gid = f"ID{sid}{next(ident):04d}"
    attrs = {g + "id": gid}
    if parent_id is not None:
        attrs[g + "parent_id"] = parent_id
    gate_el = etree.SubElement(el, "Gate", attrs)
    _geometry(gate_el, g, d, gate, result, axes, comp_channels, where)
    return el, gid


def _chain_counts(fcs, result) -> dict[str, list[int]]:
    """Event counts of the intermediate populations of AND gates (population -> one count per part
    but the last), stored as FlowJo stores counts. Taken from ``result.chain_counts`` when the caller
    computed them (see :func:`chain_counts`), else from the FCS file while the result still holds
    its memberships; -1 (no stored count) when neither is available."""
    have = getattr(result, "chain_counts", None)
    if have is not None:
        return have
    if not any(isinstance(p.gate, AllOfGate) for p in result.populations.values()) or not result._idx:
        return {}
    import cytopipe

    sample = cytopipe.read_fcs(fcs)
    if sample.events.shape[0] != result.n_events:
        return {}
    return chain_counts(result, sample)


def chain_counts(result, sample) -> dict[str, list[int]]:
    """For every population gated by an AND of geometric parts: the event counts of its parent AND
    the first 1, 2, ... parts (the intermediate populations of the FlowJo export). ``sample`` is the
    sample ``result`` gated; call before the result's memberships are dropped."""
    out: dict[str, list[int]] = {}
    values = None
    for name, pop in result.populations.items():
        if not isinstance(pop.gate, AllOfGate):
            continue
        values = values or result.event_values(sample)
        parent = pop.parent
        inside = np.ones(len(result.indices(parent)), dtype=bool)
        counts = []
        for part in pop.gate.parts[:-1]:
            inside &= np.asarray(part.contains([values.values(dim, parent) for dim in part.dims]), dtype=bool)
            counts.append(int(inside.sum()))
        out[name] = counts
    return out


def _axes(result) -> dict[str, dict | None]:
    """$PnN -> transform spec of every channel a gate is drawn on (None = linear)."""
    from cytopipe.gating.export import _specs

    specs = _specs(result)
    out: dict[str, dict | None] = {}
    for dim, spec in specs.items():
        if dim.ratio is not None:
            raise GatingError(f"ratio dimension {dim.name!r} cannot be written to a FlowJo workspace")
        channel = result.channel_of.get(dim.name, dim.name)
        if channel in out and out[channel] != spec:
            raise GatingError(
                f"channel {channel!r} is gated on two scales ({out[channel]} and {spec}); FlowJo keeps one "
                "transform per channel"
            )
        out[channel] = spec
    return out


def _flowjo_scale(spec: dict | None) -> tuple[str, dict[str, float]]:
    if spec is None or spec.get("type") in ("identity", None):
        return "linear", {"minRange": 0.0, "maxRange": TOP, "gain": 1.0}
    if spec["type"] == "arcsinh" and set(spec) <= {"type", "cofactor"}:
        c = float(spec["cofactor"])
        return "fasinh", {
            "length": 256.0,
            "maxRange": TOP,
            "T": TOP,
            "M": math.asinh(TOP / c) / math.log(10),
            "A": 0.0,
            "W": 0.0,
        }
    raise GatingError(
        f"the {spec['type']} transform {spec} has no FlowJo workspace equivalent in cytopipe's export; "
        "use arcsinh (or linear) for gates to be exported to FlowJo"
    )


def _transform_element(parent, t, d, channel, spec) -> None:
    from lxml import etree

    kind, params = _flowjo_scale(spec)
    el = etree.SubElement(parent, t + kind, {t + k: repr(float(v)) for k, v in params.items()})
    etree.SubElement(el, d + "parameter", {d + "name": channel})


def _raw(values, spec) -> np.ndarray:
    """Coordinates on the gate's scale back on the raw (compensated, untransformed) scale."""
    v = np.asarray(values, dtype=np.float64)
    if spec is None or spec.get("type") in ("identity", None):
        return v
    _flowjo_scale(spec)  # refuses what cannot be written
    return float(spec["cofactor"]) * np.sinh(v)


def _geometry(gate_el, g, d, gate, result, axes, comp_channels, where) -> None:
    from lxml import etree

    def dimension(el, dim, lo=None, hi=None):
        channel = result.channel_of.get(dim.name, dim.name)
        name = (
            PREFIX + channel
            if channel in comp_channels and dim.compensation not in (None, "uncompensated")
            else channel
        )
        attrs = {}
        spec = axes.get(channel)
        if lo is not None:
            attrs[g + "min"] = repr(float(_raw([lo], spec)[0]))
        if hi is not None:
            attrs[g + "max"] = repr(float(_raw([hi], spec)[0]))
        dim_el = etree.SubElement(el, g + "dimension", attrs)
        etree.SubElement(dim_el, d + "fcs-dimension", {d + "name": name})
        return spec

    if isinstance(gate, RectangleGate):
        el = etree.SubElement(gate_el, g + "RectangleGate", eventsInside="1", percentX="0", percentY="0")
        for dim, lo, hi in zip(gate.dims, gate.lower, gate.upper):
            dimension(el, dim, lo, hi)
        return
    if isinstance(gate, EllipsoidGate):
        if len(gate.dims) != 2:
            raise GatingError("only 2-D ellipses can be written to a FlowJo workspace", **where)
        vertices = _ellipse_polygon(gate)
    elif isinstance(gate, PolygonGate):
        vertices = gate.vertices
    else:
        raise GatingError(f"a {type(gate).__name__} cannot be written to a FlowJo workspace", **where)
    el = etree.SubElement(gate_el, g + "PolygonGate", eventsInside="1", quadId="-1", gateResolution="256")
    specs = [dimension(el, dim) for dim in gate.dims]
    vertices = _clip_to_box(np.asarray(vertices, dtype=np.float64), [_scale_limit(sp) for sp in specs])
    raw = np.column_stack([_raw(vertices[:, i], specs[i]) for i in range(2)])
    for x, y in raw:
        v = etree.SubElement(el, g + "vertex")
        etree.SubElement(v, g + "coordinate", {d + "value": repr(float(x))})
        etree.SubElement(v, g + "coordinate", {d + "value": repr(float(y))})


RAW_LIMIT = 1e15  # |raw value| no instrument reaches: a polygon is cut to it so its vertices stay finite


def _scale_limit(spec) -> float:
    """RAW_LIMIT on the gate's scale (asinh(1e15 / c) for arcsinh: sinh of more overflows)."""
    if spec is None or spec.get("type") in ("identity", None):
        return RAW_LIMIT
    return math.asinh(RAW_LIMIT / float(spec["cofactor"]))


def _clip_to_box(vertices: np.ndarray, limits) -> np.ndarray:
    """The polygon cut to the box ``|x| <= limits[0], |y| <= limits[1]`` (Sutherland-Hodgman): every
    point inside the box keeps its side, and far vertices (a half-plane drawn as a huge polygon, e.g.
    a ``diagonal`` gate) no longer overflow when written on the raw scale."""
    if np.all(np.abs(vertices) <= np.asarray(limits)):
        return vertices
    pts = [tuple(v) for v in vertices]
    for axis in (0, 1):
        for sign in (1.0, -1.0):
            bound = sign * limits[axis]

            def inside(p, a=axis, b=bound, sg=sign) -> bool:
                return sg * p[a] <= sg * b

            out = []
            for i, cur in enumerate(pts):
                prev = pts[i - 1]
                if inside(cur) != inside(prev):
                    f = (bound - prev[axis]) / (cur[axis] - prev[axis])
                    q = [prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1])]
                    q[axis] = bound
                    out.append(tuple(q))
                if inside(cur):
                    out.append(cur)
            pts = out
    return np.asarray(pts, dtype=np.float64)


def _ellipse_polygon(gate: EllipsoidGate) -> np.ndarray:
    """Points on the ellipse's edge (a polygon that FlowJo and FlowKit evaluate alike)."""
    w, vecs = np.linalg.eigh(gate.covariance * gate.distance_square)
    t = np.linspace(0.0, 2.0 * np.pi, ELLIPSE_POINTS, endpoint=False)
    circle = np.vstack([np.cos(t), np.sin(t)])
    return (vecs @ np.diag(np.sqrt(np.maximum(w, 0.0))) @ circle).T + gate.center


def _boolean(parent_el, gate: BooleanGate, name: str, paths: dict[str, str], count: str, where):
    from lxml import etree

    if any(o.negate for o in gate.operands) and gate.op != "not":
        raise GatingError(
            f"the boolean gate {gate.geometry()} negates an operand inside {gate.op!r}, which FlowJo's "
            f"{gate.op.capitalize()}Node cannot express; define the negated population first and combine that",
            **where,
        )
    tag = {"and": "AndNode", "or": "OrNode", "not": "NotNode"}[gate.op]
    el = etree.SubElement(parent_el, tag, name=name, annotation="", owningGroup="")
    el.set("count", count)
    deps = etree.SubElement(el, "Dependents")
    for o in gate.operands:
        etree.SubElement(deps, "Dependent", name=paths[o.population].lstrip("/"))
    return el
