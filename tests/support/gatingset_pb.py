"""A small reader for cytolib GatingSet ``.pb`` files (test-only).

The files hold one length-prefixed protobuf ``GatingHierarchy`` message (schema:
RGLab/cytolib ``inst/include/GatingSet.proto``). We decode the protobuf wire format
directly (no ``protobuf`` dependency) and keep only what the gating tests need: the
population tree, each node's gate geometry, its stored membership and the compensation
and transforms recorded with the sample.

Wire format recap: each field is a varint key ``(number << 3) | wire_type``; wire type 0 is a
varint, 1 a little-endian 64-bit value, 2 a length-delimited payload (bytes, string, nested
message or packed repeated scalars), 5 a little-endian 32-bit value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GATE_TYPES = {
    1: "polygon",
    2: "range",
    3: "boolean",
    4: "ellipse",
    5: "rectangle",
    6: "logical",
    7: "ellipsoid",
}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> dict[int, list]:
    """Split one message into ``{field number: [raw values]}`` (ints or bytes)."""
    out: dict[int, list] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:  # groups (3/4) are not used by this schema
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _f32(raw: bytes) -> float:
    return struct.unpack("<f", raw)[0]


def _str(raw: bytes) -> str:
    return raw.decode("utf-8")


def _one(fields: dict, number: int, default=None):
    values = fields.get(number)
    return values[-1] if values else default


@dataclass
class PbGate:
    type: str
    negated: bool
    params: list[str] = field(default_factory=list)
    # range: (min, max); polygon/rectangle: (n, 2) vertices; ellipse: mu, cov, dist
    range: tuple[float, float] | None = None
    vertices: np.ndarray | None = None
    mu: np.ndarray | None = None
    cov: np.ndarray | None = None
    antipodal: np.ndarray | None = None
    dist: float | None = None
    bool_ops: list[tuple[str, str, bool]] = field(default_factory=list)  # (path, op, is_not)


@dataclass
class PbNode:
    index: int
    name: str
    parent: int | None
    gate: PbGate | None
    membership: np.ndarray | None  # bool per event, None when not stored
    path: str = ""


@dataclass
class PbHierarchy:
    nodes: list[PbNode]
    comp_markers: list[str]
    spillover: np.ndarray | None
    transforms: dict[str, dict]

    def by_path(self) -> dict[str, PbNode]:
        return {n.path: n for n in self.nodes}


def _coordinate(raw: bytes) -> tuple[float, float]:
    f = _fields(raw)
    return _f32(_one(f, 1)), _f32(_one(f, 2))


def _gate(raw: bytes) -> PbGate:
    f = _fields(raw)
    gtype = GATE_TYPES.get(_one(f, 4), str(_one(f, 4)))
    gate = PbGate(type=gtype, negated=bool(_one(f, 1, 0)))
    if 5 in f:  # rangeGate{param=1 paramRange{name=1, min=2, max=3}}
        pr = _fields(_one(_fields(_one(f, 5)), 1))
        gate.params = [_str(_one(pr, 1))]
        gate.range = (_f32(_one(pr, 2)), _f32(_one(pr, 3)))
    if 6 in f:  # polygonGate{param=1 paramPoly{params=1*, vertices=2*}}
        pp = _fields(_one(_fields(_one(f, 6)), 1))
        gate.params = [_str(p) for p in pp.get(1, [])]
        gate.vertices = np.array([_coordinate(v) for v in pp.get(2, [])], dtype=np.float64).reshape(-1, 2)
    if 7 in f:  # ellipseGate{mu=1, cov=2*, antipodal_vertices=3*, dist=4}
        eg = _fields(_one(f, 7))
        gate.mu = np.array(_coordinate(_one(eg, 1)))
        gate.cov = np.array([_coordinate(c) for c in eg.get(2, [])])
        gate.antipodal = np.array([_coordinate(c) for c in eg.get(3, [])])
        gate.dist = _f32(_one(eg, 4)) if 4 in eg else None
    if 8 in f:  # boolGate{boolOpSpec=1*{path=1*, op=2, isNot=3}}
        for spec in _fields(_one(f, 8)).get(1, []):
            sf = _fields(spec)
            path = "/".join(_str(p) for p in sf.get(1, []))
            gate.bool_ops.append((path, chr(_one(sf, 2, 0)), bool(_one(sf, 3, 0))))
    return gate


def _membership(raw: bytes) -> np.ndarray:
    f = _fields(raw)
    n = _one(f, 1)
    kind = _one(f, 2, 0)
    if kind == 2:  # ROOT: all events
        return np.ones(n, dtype=bool)
    if kind == 0:  # BOOL: bits packed LSB-first
        bits = np.frombuffer(_one(f, 4, b""), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[:n].astype(bool)
    # INT: packed varint list of event indices
    idx: list[int] = []
    for packed in f.get(3, []):
        if isinstance(packed, int):
            idx.append(packed)
            continue
        pos = 0
        while pos < len(packed):
            v, pos = _varint(packed, pos)
            idx.append(v)
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(idx, dtype=np.int64)] = True
    return mask


def _transform(raw: bytes) -> dict:
    f = _fields(raw)
    out: dict = {"name": _str(_one(f, 4, b"")), "channel": _str(_one(f, 5, b""))}
    if 13 in f:  # logicleTrans{T=1, W=2, M=3, A=4}
        lf = _fields(_one(f, 13))
        out.update(
            type="logicle", **{k: _f32(_one(lf, i)) for k, i in (("T", 1), ("W", 2), ("M", 3), ("A", 4))}
        )
    elif 11 in f:
        ff = _fields(_one(f, 11))
        out.update(
            type="fasinh", **{k: _f32(_one(ff, i)) for k, i in (("T", 3), ("A", 4), ("M", 5)) if i in ff}
        )
    elif 7 in f:
        bf = _fields(_one(f, 7))
        out.update(
            type="biexp",
            **{k: _f32(_one(bf, i)) for k, i in (("pos", 2), ("neg", 3), ("width", 4)) if i in bf},
        )
    else:
        out["type"] = f"trans_type {_one(f, 3)}"
    return out


def read_gatingset_pb(path: str | Path) -> PbHierarchy:
    """Decode one cytolib ``<sample>.pb`` file."""
    data = Path(path).read_bytes()
    length, pos = _varint(data, 0)
    gh = _fields(data[pos : pos + length])

    comp_markers: list[str] = []
    spill = None
    if 1 in gh:
        cf = _fields(_one(gh, 1))
        comp_markers = [_str(m) for m in cf.get(6, [])]
        values = [_f32(v) for v in cf.get(7, [])]
        if comp_markers and len(values) == len(comp_markers) ** 2:
            spill = np.array(values, dtype=np.float64).reshape(len(comp_markers), -1)

    transforms: dict[str, dict] = {}
    if 5 in gh:
        for tp in _fields(_one(gh, 5)).get(1, []):
            tpf = _fields(tp)
            name = _str(_one(tpf, 1))
            if 3 in tpf:
                transforms[name] = _transform(_one(tpf, 3))

    nodes: list[PbNode] = []
    for i, tn in enumerate(_fields(_one(gh, 2)).get(1, [])):
        tf = _fields(tn)
        props = _fields(_one(tf, 1))
        nodes.append(
            PbNode(
                index=i,
                name=_str(_one(props, 1)),
                parent=_one(tf, 2),
                gate=_gate(_one(props, 6)) if 6 in props else None,
                membership=_membership(_one(props, 5)) if 5 in props else None,
            )
        )
    for node in nodes:
        if node.parent is None or node.index == 0:
            node.parent = None
            node.path = "root"
        else:
            node.path = f"{nodes[node.parent].path}/{node.name}"
    return PbHierarchy(nodes=nodes, comp_markers=comp_markers, spillover=spill, transforms=transforms)


# --------------------------------------------------------------------------------------------
# .pb hierarchy -> cytopipe template
# --------------------------------------------------------------------------------------------
def population_name(path: str) -> str:
    """Population name for a node path (``root/a/b`` -> ``a/b``): paths keep names unique."""
    return path[len("root/") :]


def _resolve_ref(ref: str, node: PbNode, nodes: list[PbNode]) -> PbNode:
    """A boolean operand path (e.g. ``CD19``) -> the node it names, nearest to ``node``."""
    parts = ref.strip("/").split("/")
    candidates = [n for n in nodes if n.path.split("/")[-len(parts) :] == parts and n is not node]
    if not candidates:
        raise KeyError(f"boolean gate {node.path!r} refers to unknown node {ref!r}")

    def shared(n: PbNode) -> int:
        a, b = n.path.split("/"), node.path.split("/")
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return k

    return max(candidates, key=shared)


def to_template(h: PbHierarchy, dim_factory=None, name: str = "gatingset"):
    """Convert the stored gates to a cytopipe Template.

    ``dim_factory(param) -> Dim`` chooses compensation/transform per parameter; the default
    uses the stored (already compensated and transformed) values as they are.
    """
    from cytopipe.gating.gates import BooleanGate, Dim, EllipsoidGate, Operand, PolygonGate, RectangleGate
    from cytopipe.gating.template import Population, Template

    dim_factory = dim_factory or (lambda p: Dim(p, compensation=None, transform=None))

    def bound(v: float):
        return None if np.isinf(v) else float(v)

    pops = {}
    for node in h.nodes[1:]:
        g = node.gate
        if g is None:
            raise ValueError(f"node {node.path} has no gate")
        if g.negated:
            raise NotImplementedError(f"negated gate at {node.path}")
        dims = [dim_factory(p) for p in g.params]
        if g.type == "range":
            gate = RectangleGate(dims, [bound(g.range[0])], [bound(g.range[1])], style="range")
        elif g.type == "rectangle":
            lo, hi = g.vertices[0], g.vertices[1]
            gate = RectangleGate(dims, [bound(v) for v in lo], [bound(v) for v in hi])
        elif g.type == "polygon":
            gate = PolygonGate(dims, g.vertices)
        elif g.type == "ellipse":
            gate = EllipsoidGate(dims, g.mu, g.cov, (g.dist if g.dist is not None else 1.0) ** 2)
        elif g.type == "boolean":
            ops = {op for _, op, _ in g.bool_ops[1:]} or {"&"}
            if len(ops) != 1 or ops - {"&", "|"}:
                raise NotImplementedError(f"mixed boolean operators at {node.path}")
            operands = tuple(
                Operand(population_name(_resolve_ref(ref, node, h.nodes).path), is_not)
                for ref, _, is_not in g.bool_ops
            )
            gate = BooleanGate(op="and" if ops == {"&"} else "or", operands=operands)
        else:
            raise NotImplementedError(f"gate type {g.type} at {node.path}")
        parent = "root" if node.parent == 0 else population_name(h.nodes[node.parent].path)
        pname = population_name(node.path)
        pops[pname] = Population(pname, parent, gate)
    return Template(name=name, populations=pops, compensation="none")


def read_h5_events(path: str | Path):
    """A cytolib ``.h5`` event matrix as (float32 events x channels, channel table)."""
    import h5py
    import pandas as pd

    with h5py.File(path, "r") as f:
        events = np.ascontiguousarray(np.asarray(f["data"], dtype=np.float32).T)
        params = f["params"][:]
    channels = pd.DataFrame(
        {
            "pnn": [p.decode() for p in params["channel"]],
            "pns": [p.decode() for p in params["marker"]],
        }
    )
    return events, channels
