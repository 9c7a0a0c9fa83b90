"""Gating templates: the model, the template parser and its validation.

A template is a tree of named populations. Each population has a parent (``root`` for the
top), the markers it is gated on and a gate. Marker names are resolved to channels per
file (scatter and time channels by name). Transforms are set per marker; compensation
once for the template. See ``docs/gating.md`` for the format with an annotated example.

Every mistake in a template raises :class:`~cytopipe.errors.TemplateError` naming the
population and the field (``key``), so a scientist can fix the YAML without reading code.

Why one module: parsing a template is one pass with one error context (population, key) that
every gate parser reports through, and :func:`template_to_dict` is its exact inverse (tested
round trip); splitting the parsers from the data classes would split that pair. Reading a file
(YAML, Gating-ML, FlowJo) is :func:`cytopipe.gating.loading.load_template`; the gate-parameter
reader :class:`GateSpec` and :func:`gate_to_dict` are in :mod:`cytopipe.gating.spec`, shared with
the data-driven gate parsers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytopipe.errors import TemplateError
from cytopipe.gating import _adapters
from cytopipe.gating.gates import (
    BooleanGate,
    Dim,
    EllipsoidGate,
    Gate,
    Operand,
    PolygonGate,
    RectangleGate,
)
from cytopipe.gating.spec import GateSpec, gate_to_dict, parse_signs  # spec.py: shared with the fitters

ROOT = "root"


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
@dataclass
class Matrix:
    """A spillover matrix stored in a template (Gating-ML ``spectrumMatrix``).

    ``matrix[i, j]``: share of fluorochrome ``i`` seen in detector ``detectors[j]``.
    Gate dimensions may name a detector (``$PnN``) or a fluorochrome of the matrix.
    """

    fluorochromes: list[str]
    detectors: list[str]
    matrix: np.ndarray


@dataclass
class Population:
    name: str
    parent: str
    gate: Gate
    description: str = ""
    # full path from the root ("/Live/CD3/CD4 T"); imports set it when display names are shortened
    path: str = ""

    @property
    def markers(self) -> list[str]:
        return self.gate.markers

    @property
    def depends_on(self) -> list[str]:
        """Populations that must be computed first (parent and boolean operands)."""
        deps = [self.parent] if self.parent != ROOT else []
        if isinstance(self.gate, BooleanGate):
            deps += [o.population for o in self.gate.operands]
        for _, f in getattr(self.gate, "fit_items", list)():
            # `reference` thresholds read another population; FMO thresholds `align_on` one
            for ref in (f.options.get("population"), *f.options.get("align_on", ())):
                if ref and ref not in deps:
                    deps.append(ref)
        return deps


@dataclass
class Template:
    """A validated gating template (populations in an order where dependencies come first)."""

    name: str
    populations: dict[str, Population]
    transforms: dict[str, dict] = field(default_factory=dict)
    compensation: str = "file"  # "file" | "none" | path of a CSV matrix
    matrices: dict[str, Matrix] = field(default_factory=dict)
    panel: dict[str, str] = field(default_factory=dict)
    medians: list[str] = field(default_factory=list)
    seed: int = 0
    description: str = ""
    source: Path | None = None
    # the gates are drawn on preprocessed FCS values ($PnE log decoding, $PnG gain, $TIMESTEP):
    # True for gates imported from Gating-ML, Cytobank or FlowJo (see gating/loading.py)
    preprocess: bool = False

    def __post_init__(self):
        self.populations = _ordered(self.populations)

    def __getitem__(self, name: str) -> Population:
        return self.populations[name]

    def __iter__(self):
        return iter(self.populations.values())

    def __len__(self) -> int:
        return len(self.populations)

    @property
    def names(self) -> list[str]:
        return list(self.populations)

    def markers(self) -> list[str]:
        """Every marker/channel name a gate uses (first-use order)."""
        seen: dict[str, None] = {}
        for pop in self:
            for d in pop.gate.dims:
                if d.ratio is not None:
                    seen.setdefault(d.ratio.numerator)
                    seen.setdefault(d.ratio.denominator)
                else:
                    seen.setdefault(d.name)
        return list(seen)

    def median_markers(self) -> list[str]:
        """Markers whose medians go into population_stats (``medians:`` or every gated
        marker that is not a scatter/time channel)."""
        if self.medians:
            return list(self.medians)
        return [m for m in self.markers() if not _adapters.is_scatter_or_time(m)]

    def path_of(self, name: str) -> str:
        """The population's full path from the root (``/Lymphocytes/Singlets/Live``): its identity
        in imported workspaces, where display names may repeat gate names of other branches."""
        if name == ROOT:
            return "root"
        pop = self.populations[name]
        if pop.path:
            return pop.path
        return ("" if pop.parent == ROOT else self.path_of(pop.parent)) + "/" + name

    def children(self, name: str) -> list[str]:
        return [p.name for p in self if p.parent == name]

    def descendants(self, name: str) -> list[str]:
        """Every population below ``name`` (children, grandchildren, ...), in template order."""
        below = {name}
        out = []
        for p in self:  # dependencies come first, so a parent is seen before its children
            if p.parent in below:
                below.add(p.name)
                out.append(p.name)
        return out

    def dimension(self, marker: str) -> Dim:
        """The axis a template gate on ``marker`` uses: compensated with the template's matrix and
        transformed with the marker's transform (its own entry under ``transforms``, else
        ``default`` for a fluorescence marker; scatter and time channels stay linear). Use it to
        read values on the display scale of the gates for any marker, gated or not."""
        return _Context(self.transforms, self.seed).dim(str(marker))

    @property
    def data_driven(self) -> list[str]:
        return [p.name for p in self if p.gate.data_driven]


def _ordered(pops: Mapping[str, Population]) -> dict[str, Population]:
    """Dependencies first, otherwise the order the template lists them. Detects cycles."""
    out: dict[str, Population] = {}
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*chain[chain.index(name) :], name])
            raise TemplateError(
                f"the populations form a cycle ({cycle}); a population cannot depend on itself "
                "through its parent or boolean operands",
                population=name,
                key="parent",
            )
        state[name] = 1
        for dep in pops[name].depends_on:
            visit(dep, [*chain, name])
        state[name] = 2
        out[name] = pops[name]

    for name in pops:
        visit(name, [])
    return out


# --------------------------------------------------------------------------------------------
# template parsing (reading a file: cytopipe.gating.loading.load_template)
# --------------------------------------------------------------------------------------------
TOP_KEYS = {
    "name",
    "description",
    "version",
    "compensation",
    "transforms",
    "panel",
    "medians",
    "seed",
    "populations",
}
POP_KEYS = {"name", "parent", "markers", "gate", "description", "note"}


def parse_template(data: Mapping, base: Path | None = None) -> Template:
    """Validate a parsed template mapping and build a :class:`Template`."""
    extra = sorted(set(map(str, data)) - TOP_KEYS)
    if extra:
        raise TemplateError(f"unknown top-level key(s) {extra}; allowed: {sorted(TOP_KEYS)}", key=extra[0])
    if "populations" not in data:
        raise TemplateError("a template needs a `populations:` list", key="populations")

    compensation = data.get("compensation", "file")
    if compensation is None or compensation is False:
        compensation = "none"
    if not isinstance(compensation, str) or not compensation.strip():
        raise TemplateError(
            "`compensation` must be `file` (the FCS spillover), `none`, or the path of a CSV matrix",
            key="compensation",
        )
    compensation = compensation.strip()
    if compensation not in ("file", "none"):
        cpath = Path(compensation)
        if base is not None and not cpath.is_absolute():
            cpath = base / cpath
        compensation = str(cpath)

    transforms = _parse_transforms(data.get("transforms") or {})
    panel = data.get("panel") or {}
    if not isinstance(panel, Mapping) or not all(isinstance(v, str) for v in panel.values()):
        raise TemplateError("`panel` must map marker names to channel names ($PnN)", key="panel")

    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TemplateError("`seed` must be a non-negative integer", key="seed")

    raw_pops = data["populations"]
    if not isinstance(raw_pops, Sequence) or isinstance(raw_pops, (str, bytes)) or not raw_pops:
        raise TemplateError("`populations` must be a non-empty list", key="populations")

    ctx = _Context(transforms=transforms, seed=seed)
    pops: dict[str, Population] = {}
    for i, raw in enumerate(raw_pops):
        pop = _parse_population(raw, i, ctx)
        if pop.name in pops:
            raise TemplateError(
                "two populations have this name; names must be unique", population=pop.name, key="name"
            )
        pops[pop.name] = pop

    _check_references(pops)

    medians = data.get("medians") or []
    if (
        not isinstance(medians, Sequence)
        or isinstance(medians, str)
        or not all(isinstance(m, str) for m in medians)
    ):
        raise TemplateError("`medians` must be a list of marker names", key="medians")

    return Template(
        name=str(data.get("name") or (base.name if base else "template")),
        description=str(data.get("description") or ""),
        populations=pops,
        transforms=transforms,
        compensation=compensation,
        panel=dict(panel),
        medians=list(medians),
        seed=seed,
    )


def _parse_transforms(raw: Any) -> dict[str, dict]:
    if not isinstance(raw, Mapping):
        raise TemplateError(
            "`transforms` must map marker names (or `default`) to a transform", key="transforms"
        )
    out = {}
    for marker, spec in raw.items():
        if isinstance(spec, Mapping) and spec.get("cofactor") == "auto":
            # per-channel arcsinh cofactor from the data (engine: scale.estimate_cofactor); 150
            # is only what a channel without a usable negative population keeps
            spec = {**spec, "cofactor": 150.0, "auto": True}
        auto = bool(isinstance(spec, Mapping) and spec.get("auto"))
        if auto:
            spec = {k: v for k, v in spec.items() if k != "auto"}
        out[str(marker)] = _adapters.check_transform(spec, {"marker": str(marker), "key": "transforms"})
        if auto:
            if out[str(marker)]["type"] != "arcsinh":
                raise TemplateError(
                    "`cofactor: auto` needs `type: arcsinh`", marker=str(marker), key="transforms"
                )
            out[str(marker)] = _AutoSpec(out[str(marker)])
    return out


class _AutoSpec(dict):
    """A transform spec whose cofactor the engine estimates per channel (``cofactor: auto``)."""

    auto = True


def _check_references(pops: Mapping[str, Population]) -> None:
    names = list(pops)
    for pop in pops.values():
        if pop.parent != ROOT and pop.parent not in pops:
            raise TemplateError(
                f"unknown parent {pop.parent!r}; use `root` or one of {names}",
                population=pop.name,
                key="parent",
            )
        if isinstance(pop.gate, BooleanGate):
            for o in pop.gate.operands:
                if o.population not in pops:
                    raise TemplateError(
                        f"the boolean gate refers to unknown population {o.population!r}; populations are {names}",
                        population=pop.name,
                        key="gate",
                    )
        for dep in pop.depends_on:
            if dep not in pops:
                raise TemplateError(
                    f"the gate refers to unknown population {dep!r}; populations are {names}",
                    population=pop.name,
                    key="gate",
                )
    _ordered(pops)  # raises on cycles


@dataclass
class _Context:
    transforms: dict[str, dict]
    seed: int

    def dim(self, name: str) -> Dim:
        """A template dimension: compensated with the template matrix, transformed per marker."""
        if name in self.transforms:
            tkey = name
        elif not _adapters.is_scatter_or_time(name) and "default" in self.transforms:
            tkey = "default"
        else:
            tkey = None
        return Dim(name=name, compensation="template", transform=tkey)


def _parse_population(raw: Any, index: int, ctx: _Context) -> Population:
    if not isinstance(raw, Mapping):
        raise TemplateError(
            f"population #{index + 1} must be a mapping with name, parent, markers and gate",
            key="populations",
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TemplateError(f"population #{index + 1} has no `name`", key="name")
    name = name.strip()
    if name == ROOT:
        raise TemplateError(
            "`root` is reserved for the whole sample; choose another name", population=name, key="name"
        )
    extra = sorted(set(map(str, raw)) - POP_KEYS)
    if extra:
        raise TemplateError(
            f"unknown key(s) {extra}; allowed: {sorted(POP_KEYS)}", population=name, key=extra[0]
        )
    parent = raw.get("parent")
    if not isinstance(parent, str) or not parent.strip():
        raise TemplateError(
            "missing `parent` (use `root` for a top-level population)", population=name, key="parent"
        )
    gate_spec = raw.get("gate")
    if not isinstance(gate_spec, Mapping):
        raise TemplateError("missing `gate:` mapping with a `type`", population=name, key="gate")
    gtype = gate_spec.get("type")
    if not isinstance(gtype, str):
        raise TemplateError(
            f"the gate needs a `type`; one of {sorted(GATE_TYPES)}", population=name, key="gate.type"
        )
    gtype = gtype.strip().lower()
    if gtype not in GATE_TYPES:
        raise TemplateError(
            f"unknown gate type {gtype!r}; use one of {sorted(GATE_TYPES)}", population=name, key="gate.type"
        )
    parser, n_markers = GATE_TYPES[gtype]
    markers = raw.get("markers")
    if gtype == "boolean":
        if markers:
            raise TemplateError(
                "a boolean gate combines populations and takes no `markers`", population=name, key="markers"
            )
        dims: list[Dim] = []
    else:
        if isinstance(markers, str):
            markers = [markers]
        if (
            not isinstance(markers, Sequence)
            or not markers
            or not all(isinstance(m, str) and m.strip() for m in markers)
        ):
            raise TemplateError(
                "`markers` must list the marker (or scatter channel) names the gate is drawn on",
                population=name,
                key="markers",
            )
        markers = [m.strip() for m in markers]
        if len(set(markers)) != len(markers):
            raise TemplateError("a marker is listed twice", population=name, key="markers")
        lo, hi = n_markers
        if not lo <= len(markers) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}" if hi < 99 else f"at least {lo}"
            raise TemplateError(
                f"a {gtype} gate takes {want} marker(s), got {len(markers)}", population=name, key="markers"
            )
        dims = [ctx.dim(m) for m in markers]
    spec = GateSpec(gate_spec, population=name, gate_type=gtype)
    gate = parser(spec, dims, ctx)
    spec.finish()
    desc = raw.get("description", raw.get("note", "")) or ""
    return Population(name=name, parent=parent.strip(), gate=gate, description=str(desc).strip())


# --------------------------------------------------------------------------------------------
# gate parameter parsing
# --------------------------------------------------------------------------------------------
def _parse_range(spec: GateSpec, dims, ctx) -> Gate:
    lo = spec.number("min", required=False, allow_none=True)
    hi = spec.number("max", required=False, allow_none=True)
    if lo is None and hi is None:
        raise spec.error("min", "a range gate needs `min`, `max` or both")
    if lo is not None and hi is not None and lo >= hi:
        raise spec.error("max", f"`max` ({hi}) must be greater than `min` ({lo})")
    return RectangleGate(dims, [lo], [hi], style="range")


def _parse_rectangle(spec: GateSpec, dims, ctx) -> Gate:
    n = len(dims)
    lo = spec.numbers("min", n, required=False, allow_none=True) or [None] * n
    hi = spec.numbers("max", n, required=False, allow_none=True) or [None] * n
    if all(v is None for v in lo + hi):
        raise spec.error(
            "min", "a rectangle gate needs `min` and/or `max` (one value per marker, null = open)"
        )
    for i, (a, b) in enumerate(zip(lo, hi)):
        if a is not None and b is not None and a >= b:
            raise spec.error("max", f"for marker {dims[i].name!r} `max` ({b}) must exceed `min` ({a})")
    return RectangleGate(dims, lo, hi, style="rectangle")


def _parse_polygon(spec: GateSpec, dims, ctx) -> Gate:
    verts = spec.raw("vertices")
    if not isinstance(verts, Sequence) or isinstance(verts, str) or len(verts) < 3:
        raise spec.error("vertices", "a polygon needs a list of at least 3 [x, y] vertices")
    out = []
    for v in verts:
        if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != 2:
            raise spec.error("vertices", f"each vertex must be [x, y], got {v!r}")
        out.append([spec.check_number("vertices", c, allow_inf=True) for c in v])
    return PolygonGate(dims, out)


def _parse_ellipse(spec: GateSpec, dims, ctx) -> Gate:
    n = len(dims)
    center = spec.numbers("center", n)
    if spec.has("half_axes"):
        if n != 2:
            raise spec.error(
                "half_axes", "`half_axes`/`angle` describe 2-D ellipses; use `covariance` for more markers"
            )
        axes = spec.numbers("half_axes", 2)
        if min(axes) <= 0:
            raise spec.error("half_axes", "half-axes must be > 0")
        angle = spec.number("angle", required=False, default=0.0)
        return EllipsoidGate.from_axes(dims, center, axes, angle)
    cov = spec.raw("covariance")
    if not isinstance(cov, Sequence) or len(cov) != n:
        raise spec.error("covariance", f"needs a {n} x {n} matrix (or `half_axes` and `angle` in 2-D)")
    rows = []
    for row in cov:
        if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != n:
            raise spec.error("covariance", f"needs a {n} x {n} matrix, got row {row!r}")
        rows.append([spec.check_number("covariance", v) for v in row])
    d2 = spec.number("distance_square", required=False, default=1.0, positive=True)
    if abs(np.linalg.det(np.array(rows))) < 1e-300:
        raise spec.error("covariance", "the covariance matrix is singular")
    return EllipsoidGate(dims, center, rows, d2)


def _parse_quadrant(spec: GateSpec, dims, ctx) -> Gate:
    from cytopipe.gating.fitparse import parse_threshold

    n = len(dims)
    signs = parse_signs(spec, "quadrant", n)
    raw = spec.raw("thresholds")
    if not isinstance(raw, Sequence) or isinstance(raw, str) or len(raw) != n:
        raise spec.error(
            "thresholds", f"needs {n} thresholds (one per marker: a number or a fitted threshold)"
        )
    thresholds = [parse_threshold(spec, f"thresholds[{i}]", v, dims[i], ctx) for i, v in enumerate(raw)]
    if all(isinstance(t, float) for t in thresholds):
        lower = [t if s == "+" else None for t, s in zip(thresholds, signs)]
        upper = [t if s == "-" else None for t, s in zip(thresholds, signs)]
        return RectangleGate(dims, lower, upper, style="quadrant")
    from cytopipe.gating.fitters import QuadrantGate

    return QuadrantGate(dims, thresholds, signs, fraction=_fraction(spec))


def _fraction(spec: GateSpec):
    from cytopipe.gating.fitparse import parse_fraction

    return parse_fraction(spec)


def _parse_boolean(spec: GateSpec, dims, ctx) -> Gate:
    ops = [k for k in ("and", "or", "not") if spec.has(k)]
    if len(ops) != 1:
        raise spec.error("and", "a boolean gate needs exactly one of `and: [A, B]`, `or: [A, B]` or `not: A`")
    op = ops[0]
    value = spec.raw(op)
    if op == "not":
        if not isinstance(value, str) or not value.strip():
            raise spec.error("not", "`not` takes one population name")
        return BooleanGate(op="not", operands=(Operand(value.strip()),))
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
        raise spec.error(
            op, f"`{op}` takes a list of at least two population names (prefix `not ` to negate)"
        )
    operands = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise spec.error(op, f"each operand must be a population name, got {item!r}")
        item = item.strip()
        negate = item.lower().startswith("not ")
        operands.append(Operand(item[4:].strip() if negate else item, negate))
    return BooleanGate(op=op, operands=tuple(operands))


def _data_driven(kind: str):
    def parse(spec: GateSpec, dims, ctx):
        from cytopipe.gating.fitparse import parse_data_driven

        return parse_data_driven(kind, spec, dims, ctx)

    return parse


# type -> (parser, (min markers, max markers))
GATE_TYPES: dict[str, tuple[Any, tuple[int, int]]] = {
    "range": (_parse_range, (1, 1)),
    "rectangle": (_parse_rectangle, (1, 99)),
    "polygon": (_parse_polygon, (2, 2)),
    "ellipse": (_parse_ellipse, (2, 99)),
    "quadrant": (_parse_quadrant, (1, 99)),
    "boolean": (_parse_boolean, (0, 0)),
    "valley": (_data_driven("valley"), (1, 1)),
    "tail": (_data_driven("tail"), (1, 1)),
    "quantile": (_data_driven("quantile"), (1, 1)),
    "hi": (_data_driven("hi"), (1, 1)),
    "lo": (_data_driven("lo"), (1, 1)),
    "gmm": (_data_driven("gmm"), (1, 3)),
    "singlets": (_data_driven("singlets"), (2, 2)),
    "scatter_region": (_data_driven("scatter_region"), (2, 2)),
    "lymphocytes": (_data_driven("lymphocytes"), (2, 2)),
    "auto": (_data_driven("auto"), (1, 1)),
    "shoulder": (_data_driven("shoulder"), (1, 1)),
    "reference": (_data_driven("reference"), (1, 1)),
    "diagonal": (_data_driven("diagonal"), (2, 6)),
}


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def template_to_dict(template: Template) -> dict:
    """A template (e.g. one with fitted gates made fixed) as a YAML-ready mapping."""
    pops = []
    for pop in template:
        entry: dict[str, Any] = {"name": pop.name, "parent": pop.parent}
        if pop.gate.dims:
            entry["markers"] = pop.markers
        entry["gate"] = gate_to_dict(pop.gate)
        if pop.description:
            entry["description"] = pop.description
        pops.append(entry)
    out: dict[str, Any] = {"name": template.name}
    if template.description:
        out["description"] = template.description
    out["compensation"] = template.compensation
    if template.transforms:
        out["transforms"] = {
            k: ({**v, "cofactor": "auto"} if getattr(v, "auto", False) else dict(v))
            for k, v in template.transforms.items()
        }
    if template.panel:
        out["panel"] = dict(template.panel)
    if template.medians:
        out["medians"] = list(template.medians)
    out["seed"] = template.seed
    out["populations"] = pops
    return json.loads(json.dumps(out, default=_jsonable))


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v))
