"""FlowJo 10 workspace (``.wsp``) import: one sample's gates as a fixed-gate template.

FlowKit's workspace parser reads the XML (gates, per-channel transforms, compensation); this
module converts its gate objects into cytopipe's model so cytopipe's engine applies them. The
FCS files are not needed to read the gates. FlowJo's own transforms (biex, log) are evaluated
by FlowKit's implementations of them; the Gating-ML ones map onto cytopipe's transforms.

Gate names that occur more than once in the hierarchy (e.g. ``IFNg+`` under both ``CD4+`` and
``CD8+``) are qualified by their parent: ``CD4+/IFNg+``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cytopipe.errors import TemplateError
from cytopipe.gating.gates import BooleanGate, Dim, EllipsoidGate, Operand, PolygonGate, RectangleGate
from cytopipe.gating.template import ROOT, Matrix, Population, Template


def read_flowjo_workspace(path: str | Path, sample: str | None = None) -> Template:
    """The gates of ``sample`` (a sample id as FlowJo lists it, usually the FCS file name;
    default: the first sample) in a FlowJo 10 workspace, as a fixed-gate template."""
    import flowkit as fk

    path = Path(path)
    if not path.is_file():
        raise TemplateError("FlowJo workspace not found", file=path)
    try:
        ws = fk.Workspace(str(path), load_missing_file_data=True)
    except (ValueError, KeyError, OSError) as exc:
        raise TemplateError(f"cannot read the FlowJo workspace: {exc}", file=path) from None
    samples = ws.get_sample_ids(loaded_only=False)
    if not samples:
        raise TemplateError("the workspace lists no samples", file=path)
    if sample is None:
        sample = samples[0]
    if sample not in samples:
        raise TemplateError(f"no sample {sample!r} in the workspace; samples are {samples}", file=path)
    gs = ws.get_gating_strategy(sample)

    transforms = {tid: _transform_spec(t, tid, path) for tid, t in gs.transformations.items()}
    matrices = {
        mid: Matrix(list(m.fluorochromes), list(m.detectors), np.asarray(m.matrix, dtype=np.float64))
        for mid, m in gs.comp_matrices.items()
    }

    ids = gs.get_gate_ids()  # (name, path) in hierarchy order
    counts: dict[str, int] = {}
    for name, _ in ids:
        counts[name] = counts.get(name, 0) + 1

    def pop_name(name: str, gate_path: tuple[str, ...]) -> str:
        if counts.get(name, 0) > 1 and len(gate_path) > 1:
            return f"{gate_path[-1]}/{name}"
        return name

    def dim(d) -> Dim:
        comp = d.compensation_ref
        if comp in (None, "uncompensated"):
            comp = None
        elif comp != "FCS" and comp not in matrices:
            raise TemplateError(f"compensation {comp!r} is not defined in the workspace", file=path)
        xform = d.transformation_ref if d.transformation_ref in transforms else None
        return Dim(d.id, comp, xform)

    pops: dict[str, Population] = {}
    for name, gate_path in ids:
        g = gs.get_gate(name, gate_path)
        parent_name = gate_path[-1]
        parent = ROOT if parent_name == "root" else pop_name(parent_name, gate_path[:-1])
        kind = type(g).__name__
        if kind == "RectangleGate":
            gate = RectangleGate(
                [dim(d) for d in g.dimensions], [d.min for d in g.dimensions], [d.max for d in g.dimensions]
            )
        elif kind == "PolygonGate":
            gate = PolygonGate([dim(d) for d in g.dimensions], g.vertices)
        elif kind == "EllipsoidGate":
            gate = EllipsoidGate(
                [dim(d) for d in g.dimensions], g.coordinates, g.covariance_matrix, g.distance_square
            )
        elif kind == "BooleanGate":
            operands = tuple(
                Operand(pop_name(r["ref"], tuple(r["path"])), bool(r.get("complement"))) for r in g.gate_refs
            )
            gate = BooleanGate(op=g.type, operands=operands)
        else:
            raise TemplateError(
                f"gate {name!r}: unsupported FlowJo gate type {kind}", file=path, population=name
            )
        pname = pop_name(name, gate_path)
        pops[pname] = Population(pname, parent, gate)
    return Template(
        name=f"{path.stem} ({sample})",
        populations=pops,
        transforms=transforms,
        compensation="none",
        matrices=matrices,
        source=path,
    )


def _transform_spec(t, tid: str, path: Path) -> dict:
    """A FlowKit transform from the workspace as a template transform dict."""
    from cytopipe.errors import TransformError
    from cytopipe.transforms import from_flowkit

    if type(t).__name__ == "WSPLogTransform":
        return {"type": "flowjo_log", "offset": float(t.offset), "decades": float(t.decades)}
    try:
        return from_flowkit(t).to_dict()
    except TransformError as exc:
        raise TemplateError(f"transform {tid!r}: {exc.message}", file=path) from None
