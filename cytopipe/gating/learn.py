"""Gates learned from reviewed samples (the flowLearn / ElastiGate idea).

A scientist sets or approves the gates of a few samples of a study (cytopipe's own examples file
from ``cytopipe review``, a FlowJo workspace or a Gating-ML file). Every other sample gets those
gates moved onto its own data: for each gate, the parent population's density on each axis of the
gate is aligned between the example sample and the target sample by its landmarks (the density
peaks and the robust half-widths of the outermost ones), which defines a monotone piecewise-linear
warp of that axis (as flowStats ``warpSet`` and flowLearn do); a parent too small for a smooth
density is aligned on its nearest ancestor with :data:`ALIGN_EVENTS` events (on an axis where
that warp brings the parent's own densities no closer than none, the gate is copied instead).
An example recorded on the target's cytometer whose ``cofactor: auto`` scale differs from the
target's more than 3-fold on an axis is first put on the target's scale (the same linear values).
Thresholds and rectangle bounds go through the warp; polygon vertices go through the warps of
their two axes (edges are first split where they cross a landmark, so every piece of the warped
polygon is exact); an ellipse's centre goes through the warps and its covariance is scaled by
their local slopes. A threshold or rectangle bound that the example set on the floor of a density
valley (where the density is within two standard errors of the valley's minimum) means that
valley: it keeps its offset from the middle of the target's valley floor, sought first on the
slab of the parent that the bound cuts (a rectangle's events within its range on its other axes).
The warp of peaks and widths moves a cut in a wide flat valley by where the peaks go; on
flowWorkspaceData gs_DC_auto (sample 001's openCyto gates learned onto 002) the CD16 cut of the
NK quadrants moved 1901 -> 1918 against 002's own 1959, and three quadrants missed 002's stored
counts by 2.1-3.0 %; with the valley rule every node of >= 1000 events is within 0.7 %.

With several example samples, a threshold, rectangle or ellipse is the median of the gates
transferred from the examples that align about as well as the best one (within
:data:`QUALITY_BAND`; an example from the target's own instrument usually aligns clearly better
than the others, and then it alone sets the gate); a polygon comes from the example whose warped
densities agree best with the target's (polygons of different examples need not have matching
vertices). A threshold or rectangle is then the mean of that gate and the one learned from the
example(s) recorded on the target's own cytometer (:data:`SAME_CYTOMETER_WEIGHT`, FCS ``$CYT`` and
``$CYTSN``); a small parent's threshold also with that example's moved by the quartiles of
its grandparent (:func:`cytopipe.gating.align.drift_threshold`).

Every transferred gate gets an alignment quality: the overlap (area under the minimum of two
normalised densities, 1 = identical) of the warped example density with the target's, the lowest
over the gate's axes. Below :data:`MIN_QUALITY` the gate is flagged; it is still applied and the
sample is never dropped. The gate source is ``learned``.

::

    from cytopipe.gating.learn import Learner, read_examples

    examples = read_examples("examples.yaml", template)
    learner = Learner(template, examples, {"P001_W00": sample_a, ...})   # the example samples
    result = learner.gate(target_sample, sample_id="P002_W00")          # a GatingResult

The 1-D alignment itself (warps, their quality, moving a gate through them) is
:mod:`cytopipe.gating.align`.

Why one module (~820 lines): the examples files (read, write, the FlowJo / Gating-ML mapping) and
the learner are one feature that no other module calls into piece by piece; the examples I/O is
the natural split if it grows.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytopipe.errors import GatingError, TemplateError
from cytopipe.gating.align import (
    IDENTITY,
    Valleys,
    at_valley,
    compose,
    drift_threshold,
    landmark_warp,
    overlap,
    rescale_warp,
    valleys,
    warp_gate,
)
from cytopipe.gating.engine import Engine, GatingResult
from cytopipe.gating.fitters import DataDrivenGate
from cytopipe.gating.gates import BooleanGate, Dim, EllipsoidGate, Gate, PolygonGate, RectangleGate
from cytopipe.gating.landmarks import AllOfGate, DiagonalGate
from cytopipe.gating.scale import MAX_SPREAD
from cytopipe.gating.template import ROOT, Population, Template

log = logging.getLogger(__name__)

LEARNED = "learned"
EXAMPLES_FORMAT = "cytopipe-gate-examples/1"
# Two equal-width normal densities half a standard deviation apart overlap 2*Phi(-0.25) = 0.80: a
# warped example density that agrees with the target's less well than that is misaligned by half a
# peak width or more somewhere (or the parent's shape differs), so the transferred gate is flagged.
MIN_QUALITY = 0.80
# Examples combined into one gate: those whose alignment quality is within this of the best
# example's (more than the ~0.01-0.02 the overlap of two densities of a few thousand events moves
# by sampling alone). An example from another instrument can pass MIN_QUALITY (0.80-0.82) while
# the target's own instrument's example aligns at 0.85-0.93, and the median of two is their mean:
# e.g. a CCR6 threshold halfway between the two instruments' (tuning studies 5151-5156, 21 targets
# each, mean pooled F1 over the six with no band / 0.05 / 0.10: Th17 0.945 / 0.947 / 0.946, Th1
# 0.945 / 0.951 / 0.948, cTfh 0.949 / 0.959 / 0.950, activated cTfh 0.910 / 0.920 / 0.913; every
# other population within 0.001).
QUALITY_BAND = 0.05
# A threshold or rectangle whose warp failed (below MIN_QUALITY and worse than no warp) is copied
# unwarped, but ranked among the examples by its failed warp's quality, not by the copy's overlap:
# a copy of another instrument's threshold must not enter the median beside (or win over) an
# example that aligned (tuning study 5155 P012_W12: an Attune example's CXCR5 cut copied at overlap
# 0.75 next to the same cytometer's warped 0.78 one, cTfh F1 0.767; ranked 0.69 it is left out:
# 0.983, activated cTfh 0.826 -> 0.960; docs/gating.md section 6b).
# A threshold or rectangle is the mean of the gate learned from the example(s) recorded on the
# target's own cytometer ($CYT, $CYTSN; aligned at least MIN_QUALITY) and the gate combined over
# all examples as above. Where a dim marker's one-peak density is aligned, the warp cannot carry an
# instrument's own shape to another (the error of a PD-1 threshold goes by the example's
# instrument: on study 5156 -0.18 from another site's example, -0.03 from the same site's, and a
# median of the two within QUALITY_BAND is their mean); the same cytometer's example alone carries
# its single reviewer's scatter. Tuning studies 5151-5160 (mean pooled F1, after the threshold
# shift of align.THRESHOLD_SHIFT_LEVEL; weight 1.0 / 0.7 / 0.5): Th17 0.9492 -> 0.9510 / 0.9514 /
# 0.9516, activated cTfh 0.9141 -> 0.9191 / 0.9176 / 0.9181, cTfh 0.9614 -> 0.9585 / 0.9606 /
# 0.9616 (1.0 was also applied to every gate there: scatter, T and CD4 gates -0.0006, Treg -0.0009).
# Re-tuned with $CYTSN in the simulated files (before, sites sharing a cytometer model counted as one
# instrument): 0.5 still best of 0.3-1.0, and QUALITY_BAND 0.05 of 0-0.10 (docs/gating.md section 6b).
SAME_CYTOMETER_WEIGHT = 0.5
# A polygon or ellipse comes from the best-ranked example. An example aligned on an ancestor (its
# parent below ALIGN_EVENTS) is ranked by the lower of the ancestor's quality and the overlap of the
# parent's own densities as its gate is moved (Learner.transfer), so that it is compared with an
# example aligned on the parent itself on the same footing: the ancestor's densities are mostly
# other cells and align well when the parent's do not. Fresh study 5202: one example's NK (641
# events) aligned on Live at 0.84-0.92 while its NK's own CD56 density, moved, overlapped the
# target's at 0.16-0.20, and its CD56bright polygon won over an example aligned on its own NK (1221
# events; 0.77-0.91): F1 0.33 / 0.52 / 0.84 / 0.90 on four targets, pooled 0.850 -> 0.998 (CD56dim
# NK 0.978 -> 0.999). Tuning studies 5151-5160 (mean pooled F1): CD56bright NK 0.9905 -> 0.9966
# (5156 +0.038, 5153 +0.019; worst -0.0005), CD56dim NK +0.0009; fresh 5201-5210: 0.9787 -> 0.9974
# (5206 +0.037, none down), 5181-5190: 0.9927 -> 0.9935 (worst -0.0002); every other population
# unchanged (rectangles keep their rank; on 5151 ranking them so too: activated cTfh -0.0045).
# An example recorded on the target's own cytometer ($CYT, $CYTSN) whose arcsinh cofactor on an axis
# differs from the target's by more than scale.MAX_SPREAD (3x, beyond the gain drift of one detector
# that `cofactor: auto` takes out file by file) is first put on the target's scale (the same linear
# values: align.rescale_warp), then aligned (Learner.transfer). The per-file estimate can take
# another population for the negative: seed 5187's reviewed P003_W00 had CD127 at cofactor 12 000,
# its Aurora's other files 730-1 400; its CD127 density aligned at 0.55-0.64 on the five targets of
# that Aurora, so another cytometer's example won, whose FOXP3 cut landed above their dim Tregs
# (quality 0.81-0.89, unflagged): Treg F1 0.00-0.13 on four of them. Across cytometers the
# per-file scale is what brings different linear ranges together and is kept (there, rescaled:
# the FOXP3 cut of a Fortessa example at cofactor 99 went to 141 on an Aurora's 2 200). Treg pooled
# F1: 5187 0.818 -> 0.947; tuning 5151-5160 0.9766 -> 0.9801 (5157 +0.025; worst -0.0003), every
# other population within 0.0004; 5201-5210 0.9834 -> 0.9842 (worst -0.0001); 5181-5190 (5187
# aside; 5182 unchanged, a different cause) 5183 -0.004, 5184 +0.005; there Th17 / Th1 5188 +0.026
# / +0.046, 5183 +0.009 / +0.010; CD56bright NK 5183 -0.020 (one target whose gate is flagged
# either way: quality 0.16 -> 0.29, F1 0.43 -> 0.32). Rescaling every example (no 3x test): Treg
# still up, but Th17 / Th1 / cTfh / activated cTfh -0.004 to -0.007 on 5151-5160 (dated
# 2026-12-07, this 2-core VM).
MIN_PARENT_EVENTS = 50  # fewer parent events than this: no density to align, the gate is copied
ALIGN_EVENTS = 1000  # a parent smaller than this in the example is aligned on a larger ancestor
MAX_PROFILE_EVENTS = 20_000  # example parent values kept per axis (density() caps n at 20 000 too)


def instrument_of(sample: Any) -> str:
    """The cytometer a sample was recorded on (FCS ``$CYT`` and ``$CYTSN``), "" when unnamed."""
    kw = getattr(sample, "keywords", None) or {}
    cyt, sn = str(kw.get("$CYT", "")).strip(), str(kw.get("$CYTSN", "")).strip()
    return f"{cyt}|{sn}" if cyt or sn else ""


def _signature(g: Gate) -> tuple:
    if isinstance(g, RectangleGate):
        return ("rect", g.dims, tuple(b is None for b in g.lower), tuple(b is None for b in g.upper))
    if isinstance(g, EllipsoidGate):
        return ("ellipse", g.dims, g.distance_square)
    return (type(g).__name__,)


def _median_gate(gates: list[Gate]) -> Gate | None:
    """Element-wise median of thresholds / rectangles / ellipses of one shape; None otherwise."""
    sig = {_signature(g) for g in gates}
    if len(sig) != 1:
        return None
    g0 = gates[0]
    if isinstance(g0, RectangleGate):

        def med(bounds):
            return [None if b[0] is None else float(np.median(b)) for b in zip(*bounds)]

        return RectangleGate(g0.dims, med([g.lower for g in gates]), med([g.upper for g in gates]), g0.style)
    if isinstance(g0, EllipsoidGate):
        return EllipsoidGate(
            g0.dims,
            np.median([g.center for g in gates], axis=0),
            np.median([g.covariance for g in gates], axis=0),
            g0.distance_square,
        )
    return None


# --------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------
@dataclass
class Example:
    """The reviewed gates of one sample: population -> the gate applied (template units)."""

    sample_id: str
    gates: dict[str, Gate] = field(default_factory=dict)


def _template_dims(template: Template) -> dict[str, Dim]:
    out: dict[str, Dim] = {}
    for pop in template:
        for d in getattr(pop.gate, "dims", ()):
            out.setdefault(d.name, d)
    return out


def _on_template_dims(gate: Gate, dims: Mapping[str, Dim]) -> Gate:
    """The same gate drawn on the template's dimensions (same names, the template's transforms)."""

    def redim(ds):
        return [dims.get(d.name, d) for d in ds]

    if isinstance(gate, RectangleGate):
        return RectangleGate(redim(gate.dims), gate.lower, gate.upper, gate.style)
    if isinstance(gate, PolygonGate):
        return PolygonGate(redim(gate.dims), gate.vertices)
    if isinstance(gate, EllipsoidGate):
        return EllipsoidGate(redim(gate.dims), gate.center, gate.covariance, gate.distance_square)
    if isinstance(gate, AllOfGate):
        return AllOfGate([_on_template_dims(p, dims) for p in gate.parts])
    return gate


def gate_geometry(gate: Gate) -> dict[str, Any]:
    """A geometric gate as plain data (the ``gate`` field of an examples entry)."""
    names = [d.name for d in gate.dims]
    if isinstance(gate, RectangleGate):
        return {"type": "rectangle", "dims": names, "min": list(gate.lower), "max": list(gate.upper),
                "style": gate.style}  # fmt: skip
    if isinstance(gate, PolygonGate):
        return {"type": "polygon", "dims": names, "vertices": gate.vertices.tolist()}
    if isinstance(gate, EllipsoidGate):
        return {"type": "ellipse", "dims": names, "center": gate.center.tolist(),
                "covariance": gate.covariance.tolist(), "distance_square": gate.distance_square}  # fmt: skip
    if isinstance(gate, AllOfGate):
        return {"type": "all_of", "parts": [gate_geometry(p) for p in gate.parts]}
    raise GatingError(f"a {type(gate).__name__} cannot be written as an example gate")


def _from_geometry(g: Mapping[str, Any], dims: Mapping[str, Dim]) -> Gate:
    kind = g.get("type")
    if kind == "all_of":
        return AllOfGate([_from_geometry(p, dims) for p in g["parts"]])
    ds = [dims.get(str(n), Dim(str(n))) for n in g["dims"]]

    def num(v):
        return None if v is None else float(v)

    if kind == "rectangle":
        return RectangleGate(
            ds, [num(v) for v in g["min"]], [num(v) for v in g["max"]], g.get("style", "rectangle")
        )
    if kind == "polygon":
        return PolygonGate(ds, g["vertices"])
    if kind == "ellipse":
        return EllipsoidGate(ds, g["center"], g["covariance"], float(g.get("distance_square", 1.0)))
    raise TemplateError(f"unknown example gate type {kind!r}")


def _from_shapes(entry: Mapping[str, Any], dims: Mapping[str, Dim]) -> Gate | None:
    """The applied gate from a review export's panel shapes (one plain shape), else None."""
    shapes = entry.get("shapes") or []
    names = [str(n) for n in entry.get("dims") or []]
    if len(shapes) != 1 or not names or shapes[0].get("half_plane") or shapes[0].get("negate"):
        return None
    s = shapes[0]
    ds = [dims.get(n, Dim(n)) for n in names]

    def num(v):
        return None if v is None else float(v)

    if s.get("kind") == "range" and len(ds) == 1:
        return RectangleGate(ds, [num(s["x"][0])], [num(s["x"][1])], style="range")
    if s.get("kind") == "rect" and len(ds) == 2:
        style = "quadrant" if entry.get("gate_type") == "quadrant" else "rectangle"
        return RectangleGate(ds, [num(s["x"][0]), num(s["y"][0])], [num(s["x"][1]), num(s["y"][1])], style)
    if s.get("kind") == "polygon" and len(ds) == 2:
        return PolygonGate(ds, [[math.inf if v is None else v for v in p] for p in s["vertices"]])
    if s.get("kind") == "ellipse" and len(ds) == 2:
        return EllipsoidGate(ds, s["center"], s["covariance"], float(s.get("distance_square", 1.0)))
    return None


def _from_diagonal_numbers(entry: Mapping[str, Any], gate: DiagonalGate) -> Gate | None:
    """A ``diagonal`` gate's applied half-plane (AND its extra thresholds) from the numbers a review
    export lists (``CD56 mode``, ``CD56 SD``, ``CD16 mode``, ``CD16 SD``, ``diagonal >=``, ...),
    else None. The panel shapes cannot give it: they are clipped to the panel's grid."""
    try:
        return gate.realize(gate.params_from_numbers(entry.get("params") or {}))
    except (ValueError, TypeError):
        return None


def examples_document(examples: Sequence[Example], note: str = "") -> dict[str, Any]:
    """An examples file's content (format ``cytopipe-gate-examples/1``) with a full ``gate`` per
    entry, e.g. for gates set in code or corrected by hand."""
    out = []
    for ex in examples:
        for pop, g in ex.gates.items():
            if g is None:  # a population the sample could not gate (e.g. not measured): no example
                continue
            geo = gate_geometry(g)
            out.append({"sample_id": ex.sample_id, "population": pop, "status": "approved",
                        "gate_type": geo["type"], "dims": [d.name for d in g.dims][:2], "gate": geo})  # fmt: skip
    return {"format": EXAMPLES_FORMAT, "note": note, "examples": out}


def write_examples(path: str | Path, examples: Sequence[Example], note: str = "") -> Path:
    """Write an examples file (YAML, or JSON when the name ends in .json)."""
    path = Path(path)
    doc = examples_document(examples, note)
    if path.suffix.lower() == ".json":
        text = json.dumps(doc, indent=1)
    else:
        import yaml

        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _match_population(name: str, path: str, template: Template) -> str | None:
    """A template population for an imported gate: same name, or same last path element."""
    if name in template.populations:
        return name
    last = path.rstrip("/").split("/")[-1] if path else name
    hits = [p.name for p in template if p.name == last or template.path_of(p.name).endswith("/" + last)]
    return hits[0] if len(hits) == 1 else None


def examples_from_template(sample_id: str, gates: Template, template: Template) -> Example:
    """One sample's gates from an imported (FlowJo / Gating-ML) template, mapped onto ``template``'s
    populations by name (or last path element); gates that match no population are left out
    (logged)."""
    dims = _template_dims(template)
    ex = Example(str(sample_id))
    for pop in gates:
        if isinstance(pop.gate, (BooleanGate, DataDrivenGate)):
            continue
        target = _match_population(pop.name, pop.path, template)
        if target is None:
            log.warning(
                "example gate %r (%s) matches no template population; not learned", pop.name, sample_id
            )
            continue
        ex.gates[target] = _on_template_dims(pop.gate, dims)
    return ex


def read_examples(
    path: str | Path, template: Template, samples: Sequence[str] | None = None
) -> list[Example]:
    """Example gates from a cytopipe examples file (.yaml/.json), a FlowJo workspace (.wsp: every
    sample, or those named in ``samples``) or a Gating-ML file (.xml: one sample, named after the
    file unless ``samples`` gives one name)."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError("examples file not found; give the file written by `cytopipe review examples`, "
                            "a FlowJo .wsp or a Gating-ML .xml", file=path)  # fmt: skip
    suffix = path.suffix.lower()
    if suffix == ".wsp":
        from cytopipe.gating.flowjo import FlowJoWorkspace

        ws = FlowJoWorkspace(path)
        names = list(samples) if samples else [s.name for s in ws.samples]
        return [examples_from_template(Path(n).stem, ws.template(n), template) for n in names]
    if suffix == ".xml":
        from cytopipe.gating.loading import read_gatingml

        sid = samples[0] if samples else path.stem
        return [examples_from_template(sid, read_gatingml(path), template)]
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except ValueError as exc:
        raise TemplateError(f"cannot read the examples file: {exc}", file=path) from None
    if not isinstance(doc, Mapping) or doc.get("format") != EXAMPLES_FORMAT:
        raise TemplateError(f"not a cytopipe examples file (format {EXAMPLES_FORMAT!r} expected)", file=path)
    dims = _template_dims(template)
    by_sample: dict[str, Example] = {}
    for e in doc.get("examples") or []:
        sid, pop = str(e.get("sample_id")), str(e.get("population"))
        if pop not in template.populations:
            raise TemplateError(f"example gate for population {pop!r}, which the template does not have",
                                file=path, sample=sid, population=pop)  # fmt: skip
        if isinstance(template[pop].gate, BooleanGate):
            continue  # follows from its operands
        if e.get("gate"):
            g = _from_geometry(e["gate"], dims)
        elif isinstance(template[pop].gate, DiagonalGate):
            g = _from_diagonal_numbers(e, template[pop].gate)
        else:
            g = _from_shapes(e, dims)
        if g is None:
            log.warning("%s: the %s gate of %s cannot be rebuilt from its review panel; the template "
                        "gates it", path, pop, sid)  # fmt: skip
            continue
        by_sample.setdefault(sid, Example(sid)).gates[pop] = g
    if not by_sample:
        raise TemplateError("the examples file holds no usable gate", file=path)
    return list(by_sample.values())


def read_example_transforms(path: str | Path) -> dict[str, dict]:
    """The display scales an examples file's gates were drawn on (``transforms:``, marker ->
    spec, e.g. the study-locked arcsinh cofactors a review export carries); {} when it names none
    (and for FlowJo / Gating-ML files, whose gates carry their own transforms)."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        return {}
    from cytopipe.gating import check_transform

    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
    else:
        import yaml

        doc = yaml.safe_load(text)
    specs = (doc or {}).get("transforms") or {}
    if not isinstance(specs, Mapping):
        raise TemplateError("`transforms:` of an examples file must map markers to transforms", file=path)
    return {str(m): check_transform(spec, {"marker": str(m), "file": str(path)}) for m, spec in specs.items()}


# --------------------------------------------------------------------------------------------
# the learner
# --------------------------------------------------------------------------------------------
class LearnedGate(DataDrivenGate):
    """Placeholder in a learning template: the engine asks the :class:`Learner` for the gate."""

    type = LEARNED

    def __init__(self, dims, population: str):
        super().__init__(dims)
        self.population = population

    def fit_items(self):
        return []

    def realize(self, params):  # pragma: no cover - the learning engine never realizes
        raise TypeError("a learned gate is transferred, not fitted")


@dataclass
class _Profile:
    gate: Gate
    values: dict[Dim, np.ndarray]  # the example parent's values per axis
    n_parent: int
    scope: str = ""  # the population whose densities are aligned (the parent, or a larger ancestor)
    parent_values: dict[Dim, np.ndarray] | None = None  # the parent's own, when scope is an ancestor
    # a rectangle's: (axis, on its slab?) -> the example's valleys there, from all parent events
    valleys: dict[tuple[Dim, bool], Valleys] = field(default_factory=dict)
    reference: str = ""  # a threshold's: its parent's parent, whose quartiles give the file's drift
    reference_values: dict[Dim, np.ndarray] | None = None
    cofactors: dict[Dim, float] = field(default_factory=dict)  # its file's arcsinh scale per axis


def _within(gate: RectangleGate, values: Sequence[np.ndarray], axes: Sequence[int]) -> np.ndarray:
    """Events inside the rectangle's range on the given axes (its other axes ignored)."""
    inside = np.ones(len(values[0]), dtype=bool)
    for i in axes:
        if gate.lower[i] is not None:
            inside &= values[i] >= gate.lower[i]
        if gate.upper[i] is not None:
            inside &= values[i] < gate.upper[i]
    return inside


def _rescale(cofactor_example: float | None, cofactor_target: float | None):
    """The example axis' map onto the target's arcsinh scale (the rule above MIN_PARENT_EVENTS); None when
    their cofactors are within MAX_SPREAD of each other."""
    if cofactor_example is None or cofactor_target is None:
        return None
    if max(cofactor_example, cofactor_target) <= MAX_SPREAD * min(cofactor_example, cofactor_target):
        return None  # a detector's gain drift between files, which the per-file scale takes out
    return rescale_warp(cofactor_example, cofactor_target)


def _rectangle_valleys(gate: RectangleGate, values: Sequence[np.ndarray]) -> dict[tuple[Dim, bool], Valleys]:
    """The valleys of a rectangle's parent on each bounded axis: on the whole parent, and on the
    slab the bounds cut (the events within the rectangle's range on its other axes) when it has
    ALIGN_EVENTS events."""
    out = {}
    for k, d in enumerate(gate.dims):
        if gate.lower[k] is None and gate.upper[k] is None:
            continue
        out[d, False] = valleys(values[k])
        others = [i for i in range(len(gate.dims)) if i != k]
        if any(gate.lower[i] is not None or gate.upper[i] is not None for i in others):
            inside = _within(gate, values, others)
            if inside.sum() >= ALIGN_EVENTS:
                out[d, True] = valleys(np.asarray(values[k])[inside])
    return out


def arcsinh_cofactors(engine: Engine, dims: Sequence[Dim]) -> dict[Dim, float]:
    """The arcsinh cofactor each axis is displayed with in this file (``cofactor: auto`` is
    estimated per file), for the axes on an arcsinh scale."""
    out = {}
    for d in dims:
        spec = None if d.ratio is not None else engine._transform_spec(d)
        if spec is not None and spec.get("type") == "arcsinh":
            out[d] = float(spec["cofactor"])
    return out


def _thin(x: np.ndarray) -> np.ndarray:
    if len(x) <= MAX_PROFILE_EVENTS:
        return np.asarray(x, dtype=np.float32)  # float32: the learner travels to every worker
    step = int(math.ceil(len(x) / MAX_PROFILE_EVENTS))  # deterministic: every k-th event
    return np.asarray(x[::step], dtype=np.float32)


class Learner:
    """Transfers the example samples' gates to other samples of a study.

    ``samples`` maps each example's sample id to its :class:`cytopipe.Sample` (or any object
    with ``events``, ``channels`` and optionally ``spillover``); those samples are gated once
    with their own example gates (populations without one: the template's gate) to learn their
    parents' densities. ``combine``: ``median`` (thresholds, rectangles, ellipses, over the
    examples aligned within :data:`QUALITY_BAND` of the best; polygons from the best-aligned
    example) or ``best`` (always the best-aligned example)."""

    def __init__(
        self,
        template: Template,
        examples: Sequence[Example],
        samples: Mapping[str, Any],
        *,
        combine: str = "median",
        min_quality: float = MIN_QUALITY,
        mapping: Mapping[str, str] | None = None,
        transforms: Mapping[str, Mapping] | None = None,
    ):
        if combine not in ("median", "best"):
            raise TemplateError(f"combine must be 'median' or 'best', not {combine!r}")
        missing = [e.sample_id for e in examples if e.sample_id not in samples]
        if missing:
            raise TemplateError(
                f"example sample(s) {missing} are not among the files; gate them together with the "
                "other samples (their events are needed to learn from)"
            )
        self.template = template
        examples = [
            Example(e.sample_id, {k: g for k, g in e.gates.items() if g is not None}) for e in examples
        ]
        self.examples = [e for e in examples if e.gates]
        self.combine = combine
        self.min_quality = float(min_quality)
        self.mapping = dict(mapping or {})
        self.transforms = dict(transforms or {})
        self.populations = [p.name for p in template if any(p.name in e.gates for e in self.examples)]
        self.learning_template = self._learning_template()
        self.profiles: dict[str, dict[str, _Profile]] = {}  # sample id -> population -> profile
        self.instruments = {e.sample_id: instrument_of(samples[e.sample_id]) for e in self.examples}
        for ex in self.examples:
            self.profiles[ex.sample_id] = self._profile(ex, samples[ex.sample_id])

    def _with_gates(self, gates: Mapping[str, Gate]) -> Template:
        pops = {
            p.name: Population(p.name, p.parent, gates.get(p.name, p.gate), p.description, p.path)
            for p in self.template
        }
        t = self.template
        return Template(name=t.name, populations=pops, transforms=dict(t.transforms), compensation=t.compensation,
                        matrices=dict(t.matrices), panel=dict(t.panel), medians=list(t.medians), seed=t.seed,
                        description=t.description)  # fmt: skip

    def _learning_template(self) -> Template:
        gates = {}
        for name in self.populations:
            dims: list[Dim] = []
            for ex in self.examples:
                g = ex.gates.get(name)
                if g is not None:
                    dims += [d for d in g.dims if d not in dims]
            gates[name] = LearnedGate(dims, name)
        return self._with_gates(gates)

    def _profile(self, ex: Example, sample: Any) -> dict[str, _Profile]:
        engine = Engine(
            events=sample.events, channels=sample.channels, spillover=getattr(sample, "spillover", None),
            template=self._with_gates(ex.gates), file=getattr(sample, "path", None), mapping=self.mapping,
            transforms=self.transforms,
        )  # fmt: skip
        result = engine.run(medians=False)
        out = {}
        for name, g in ex.gates.items():
            scope = parent = self.template[name].parent
            # a small parent's density is noisy: its axes are aligned on the nearest ancestor
            # with enough events (e.g. activated cTfh's PD-1 on Memory CD4, not on cTfh)
            while scope != ROOT and len(result.indices(scope)) < ALIGN_EVENTS:
                scope = self.template[scope].parent
            sidx = None if scope == ROOT else result.indices(scope)
            # the events a fit reads: none saturated on the gate's channels (Engine.fit_values)
            vals = dict(zip(g.dims, map(_thin, engine.fit_values(g.dims, sidx, scope))))
            n = result.n_events if parent == ROOT else len(result.indices(parent))
            own = None
            if scope != parent:  # the small parent's own values: is the ancestor's warp right for it?
                pidx = result.indices(parent)
                own = dict(zip(g.dims, map(_thin, engine.fit_values(g.dims, pidx, parent))))
            out[name] = _Profile(g, vals, n, scope, own, cofactors=arcsinh_cofactors(engine, g.dims))
            grand = ROOT if parent == ROOT else self.template[parent].parent
            if isinstance(g, RectangleGate) and len(g.dims) == 1 and grand != ROOT:
                gidx = result.indices(grand)
                out[name].reference = grand
                out[name].reference_values = dict(
                    zip(g.dims, map(_thin, engine.fit_values(g.dims, gidx, grand)))
                )
            if scope == parent and isinstance(g, RectangleGate):
                out[name].valleys = _rectangle_valleys(g, engine.fit_values(g.dims, sidx, scope))
        return out

    # ---- transfer ----------------------------------------------------------------------------
    def transfer(
        self,
        population: str,
        values: Mapping[Dim, np.ndarray],
        sample_id: str | None = None,
        values_of=None,
        instrument: str = "",
        cofactors: Mapping[Dim, float] | None = None,
    ):
        """The gate for one target parent (``values`` per axis): ``(gate, quality, note)``;
        ``values_of(population)``: the target's values of another population (an example aligned
        on a larger ancestor of the parent); ``cofactors``: the target's arcsinh cofactor per axis
        (an example displayed with another is first put on the target's scale)."""
        if sample_id is not None and sample_id in self.profiles and population in self.profiles[sample_id]:
            return self.profiles[sample_id][population].gate, 1.0, f"the reviewed gate of {sample_id}"
        # (rank, example, gate, quality): the rank orders and selects the examples, the quality
        # is reported; they differ for a threshold copied where its warp failed (below)
        moved: list[tuple[float, str, Gate, float]] = []
        n_target = min((len(v) for v in values.values()), default=0)
        for sid, profiles in self.profiles.items():
            prof = profiles.get(population)
            if prof is None:
                continue
            if n_target < MIN_PARENT_EVENTS or prof.n_parent < MIN_PARENT_EVENTS:
                moved.append((0.0, sid, prof.gate, 0.0))  # nothing to align: copied, and flagged below
                continue
            warps, qs, ranks, copied = {}, [], [], set()
            same = bool(instrument) and self.instruments.get(sid) == instrument
            here = values
            if values_of is not None and prof.scope and prof.scope != self.template[population].parent:
                here = values_of(prof.scope)
            for d, xe in prof.values.items():
                xt = np.asarray(here[d], dtype=np.float64)
                # the example's axis on the target's arcsinh scale (the same linear values) when
                # both were recorded on one cytometer: its per-file cofactors can differ 10-fold
                # (seed 5187, CD127 on one Aurora); across cytometers the per-file scale is what
                # brings their different linear ranges together, and it is kept
                r = _rescale(prof.cofactors.get(d), (cofactors or {}).get(d)) if same else None
                if r is not None:
                    xe = r(xe)
                w = landmark_warp(xe, xt, isinstance(prof.gate, RectangleGate))
                q, q0 = overlap(w(xe), xt), overlap(xe, xt)
                rank = q  # a threshold or rectangle copied below is ranked by its failed warp's quality
                if q < self.min_quality and q0 > q:  # a failed warp that aligns worse than none is not used
                    w, q = IDENTITY, q0
                ranks.append(rank if isinstance(prof.gate, RectangleGate) else q)
                if here is not values and prof.parent_values is not None:
                    pe = np.asarray(prof.parent_values[d], dtype=np.float64)
                    pe = pe if r is None else r(pe)
                    pt = np.asarray(values[d], dtype=np.float64)
                    if min(len(pe), len(pt)) >= MIN_PARENT_EVENTS:
                        # aligned on an ancestor: its warp is used only if it also brings the
                        # parent's own densities closer than no warp (gs_DC_auto: the CD11c / CD123
                        # densities of CD14- Lineage- cells, mostly NK, moved the gates of its ~600
                        # HLADR+ DCs 14 pp); if not, copied on this axis, the quality the ancestor's
                        if w is not IDENTITY and overlap(w(pe), pt) < overlap(pe, pt):
                            w = IDENTITY
                        if not isinstance(prof.gate, RectangleGate):  # ranked on the parent (above)
                            ranks[-1] = min(ranks[-1], overlap(w(pe), pt))
                if w is IDENTITY:
                    copied.add(d)
                warps[d] = w if r is None else compose(w, r)
                qs.append(q)
            g = warp_gate(prof.gate, warps)
            if here is values and isinstance(g, RectangleGate):  # aligned on the parent itself
                g = self._at_valleys(prof, g, values, warps, copied)
            moved.append((min(ranks), sid, g, min(qs)))
        if not moved:
            raise GatingError("no example gate for this population", population=population)
        moved.sort(key=lambda m: -m[0])
        g, q, note = self._combine(moved)
        mine = [m for m in moved if instrument and self.instruments.get(m[1]) == instrument]
        mine = [m for m in mine if m[0] >= self.min_quality]
        if mine and isinstance(g, RectangleGate) and self.combine == "median":
            own = _median_gate([m[2] for m in mine]) if len(mine) > 1 else mine[0][2]
            if isinstance(own, RectangleGate) and _signature(own) == _signature(g):
                w = SAME_CYTOMETER_WEIGHT

                def mix(a, b):
                    return [None if x is None else w * x + (1 - w) * y for x, y in zip(a, b)]

                g = RectangleGate(g.dims, mix(own.lower, g.lower), mix(own.upper, g.upper), g.style)
                note += f"; mean with the gate learned from {', '.join(m[1] for m in mine)} (same cytometer)"
        same = [m[1] for m in moved if instrument and self.instruments.get(m[1]) == instrument]
        if same and isinstance(g, RectangleGate) and self.combine == "median":
            # the quartiles' drift does not rest on the warp: used whatever the warp's quality
            g, note = self._drift_threshold(population, g, note, same, values_of)
        return g, q, note

    def _drift_threshold(self, population: str, g: RectangleGate, note: str, same: list[str], values_of):
        """A small parent's threshold (aligned on an ancestor in an example): the mean of ``g`` and
        the same cytometer's example gate moved by its grandparent's quartiles (align.QUARTILES)."""
        profs = [self.profiles[sid][population] for sid in same]
        parent = self.template[population].parent
        small = any(p[population].scope != parent for p in self.profiles.values() if population in p)
        if not small or len(g.dims) != 1 or values_of is None or not all(p.reference_values for p in profs):
            return g, note  # on every threshold: T cells' CD3 and cTfh's CXCR5 lost (docs/gating.md 6b)
        if any(_signature(p.gate) != _signature(g) for p in profs):
            return g, note
        ref, d = profs[0].reference, g.dims[0]
        xe = [p.reference_values[d] for p in profs]
        g = drift_threshold(g, [p.gate for p in profs], xe, np.asarray(values_of(ref)[d]))
        return g, note + f"; mean with its drift on {ref} (quartiles)"

    def _combine(self, moved: list[tuple[float, str, Gate, float]]) -> tuple[Gate, float, str]:
        good = [m for m in moved if m[0] >= self.min_quality] or moved
        good = [m for m in good if m[0] >= good[0][0] - QUALITY_BAND]
        if self.combine == "median" and len(good) > 1:
            med = _median_gate([m[2] for m in good])
            if med is not None:
                q = float(np.median([m[3] for m in good]))
                return med, q, f"median of the gates learned from {', '.join(m[1] for m in good)}"
        _, sid, g, q = good[0]
        return g, q, f"learned from {sid}"

    def _at_valleys(self, prof: _Profile, moved: RectangleGate, values, warps, copied=()) -> RectangleGate:
        """The warped rectangle with each bound that the example set on a valley floor moved to the
        target's valley (:func:`cytopipe.gating.align.at_valley`). The valley is sought first on
        the slab the bound cuts (the parent's events within the rectangle's range on its other
        axes: the example's, and the target's as warped), when both slabs have ALIGN_EVENTS
        events, then on the whole parent: gs_DC_auto's CD14- Lineage- rectangle on Live cells sets
        its Lineage cut in the valley of the CD14- cells, on Live cells a flank of the monocytes'
        hump. Each side's valleys are read off all of its parent's events."""
        gate, dims = prof.gate, list(prof.gate.dims)
        lower, upper = list(moved.lower), list(moved.upper)
        for k, d in enumerate(dims):
            if warps[d] is IDENTITY or d in copied:
                continue
            for b, out in ((gate.lower[k], lower), (gate.upper[k], upper)):
                if b is None:
                    continue
                for slab in (True, False):
                    ve = prof.valleys.get((d, slab))
                    fe = None if ve is None else ve.around(b)
                    if fe is None or not fe[0] <= b <= fe[1]:
                        continue  # not on a valley floor of the example here
                    xt = np.asarray(values[d])
                    if slab:
                        mt = _within(
                            moved,
                            [np.asarray(values[x]) for x in dims],
                            [i for i in range(len(dims)) if i != k],
                        )
                        if mt.sum() < ALIGN_EVENTS:
                            continue
                        xt = xt[mt]
                    t = at_valley(b, out[k], ve, valleys(xt), warps[d].slope(b))
                    if t is not None:
                        out[k] = t
                        break
        return RectangleGate(moved.dims, lower, upper, style=moved.style)

    def engine(self, sample: Any, sample_id: str | None = None, **kw) -> LearningEngine:
        return LearningEngine(
            events=sample.events, channels=sample.channels, spillover=getattr(sample, "spillover", None),
            template=self.learning_template, file=getattr(sample, "path", None),
            mapping={**self.mapping, **(kw.pop("mapping", None) or {})},
            transforms=kw.pop("transforms", None) or self.transforms, learner=self, sample_id=sample_id,
            instrument=instrument_of(sample), **kw,
        )  # fmt: skip

    def gate(
        self,
        sample: Any,
        template: Template | None = None,
        *,
        sample_id: str | None = None,
        pooled=None,
        sample_meta: Mapping[str, Any] | None = None,
        medians: bool = True,
        keep_values: bool = False,
        **kw,
    ) -> GatingResult:
        """Gate one sample: learned gates where there are examples, the template elsewhere. Called
        like :func:`cytopipe.gating.gate` (``template``, if given, must be the learner's own)."""
        if template is not None and template is not self.template:
            raise GatingError("a learner gates with the template it learned for")
        if sample_id is None and sample_meta:
            sample_id = str(sample_meta.get("sample_id"))
        return self.engine(sample, sample_id, **kw).run(
            pooled=pooled, sample_meta=sample_meta, medians=medians, keep_values=keep_values
        )


def study_learner(
    examples_path: str | Path, state: Any, jobs: Sequence[Mapping[str, Any]], prepare, template_hash: str
):
    """The learner of a workflow's ``examples:``: the example samples are read and prepared as the
    run prepares every sample (``prepare(job, state)``: QC, the study's spillover), and gated with
    the study's locked transforms. Returns it with the gating cache key extended by the examples."""
    examples = read_examples(examples_path, state.template)
    by_id = {str(j["sample_id"]): j for j in jobs}
    missing = [e.sample_id for e in examples if e.sample_id not in by_id]
    if missing:
        raise TemplateError(
            f"the examples' sample(s) {missing} are not among the study's samples (or failed QC); "
            "learned gates need their events",
            file=examples_path,
        )
    samples = {e.sample_id: prepare(by_id[e.sample_id], state).sample for e in examples}
    learner = Learner(state.template, examples, samples, transforms=state.transforms)
    return learner, examples_key(template_hash, examples_path)


def examples_key(template_hash: str, examples_path: str | Path) -> str:
    """The gating cache key of a template learned from an examples file (both contents)."""
    import hashlib

    digest = hashlib.sha256(Path(examples_path).read_bytes()).hexdigest()
    return hashlib.sha256(f"{template_hash}|{digest}".encode()).hexdigest()


def source_columns(table, result: GatingResult):
    """``gate_source`` and ``alignment_quality`` columns for a result's population_stats rows."""
    table = table.copy()
    table["gate_source"] = [result.populations[p].source for p in table["population"]]
    quality = getattr(result, "alignment", {})
    table["alignment_quality"] = [float(quality.get(p, float("nan"))) for p in table["population"]]
    return table


class LearningEngine(Engine):
    """The gating engine with learned gates: a :class:`LearnedGate` asks the learner."""

    def __init__(self, *args, learner: Learner, sample_id: str | None = None, instrument: str = "", **kw):
        super().__init__(*args, **kw)
        self.learner = learner
        self.sample_id = sample_id
        self.instrument = instrument

    def _fit_gate(self, pop, pidx, pooled, meta, flags, result):
        if not isinstance(pop.gate, LearnedGate):
            return super()._fit_gate(pop, pidx, pooled, meta, flags, result)
        dims = list(pop.gate.dims)
        # aligned on the events a fit reads (none saturated on the gate's channels); which events
        # are inside the moved gate is decided on all of them
        values = dict(zip(dims, self.fit_values(dims, pidx, pop.parent)))

        def values_of(scope: str):
            sidx = None if scope == ROOT else self._idx_now[scope]
            return dict(zip(dims, self.fit_values(dims, sidx, scope)))

        applied, q, note = self.learner.transfer(
            pop.name, values, self.sample_id, values_of, self.instrument, arcsinh_cofactors(self, dims)
        )
        inside = applied.contains(self.gather(applied.dims, pidx, pop.parent))
        quality = getattr(result, "alignment", {})
        quality[pop.name] = q
        result.alignment = quality
        result.sources.append((pop.name, f"{pop.name}: {note}, alignment quality {q:.2f}"))
        if q < self.learner.min_quality:
            flags.append(
                f"{pop.name}: learned gate aligned poorly (quality {q:.2f} < {self.learner.min_quality:.2f}: the "
                "parent's density differs from the reviewed samples'); applied anyway, check it"
            )
        return applied, inside, LEARNED


__all__ = [
    "Example",
    "LEARNED",
    "Learner",
    "LearningEngine",
    "MIN_QUALITY",
    "QUALITY_BAND",
    "landmark_warp",
    "overlap",
    "read_example_transforms",
    "read_examples",
    "warp_gate",
    "write_examples",
]
