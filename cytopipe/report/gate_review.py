"""Gate-review data: a small, event-free picture of every gate of every sample.

Event matrices never leave the workers, so the report cannot draw gates from events. Instead the
per-sample pipeline task calls :func:`gate_review_data` right after gating; it returns a small
table (a few kB per sample) that the report draws the gate-review gallery from::

    result = gating.gate(sample, template, ...)
    review = gate_review_data(sample, result, sample_id="P001_W04")   # small DataFrame
    ...                                                               # one frame per sample
    write_gate_review(run_dir, pd.concat(frames))                     # RUN_DIR/gate_review.parquet

One row per sample x population x *panel*. A panel is one 2-D (or 1-D) view of the parent's
events on the gate's dimensions, in the transformed units the gate was drawn in:

==============  ===================================================================================
column          meaning
==============  ===================================================================================
sample_id       the sample
population      the gated population; ``parent`` its parent
panel           0, 1, ... (a 3-D gate such as Treg CD25 x CD127 x FOXP3 has two panels)
gate_type       ``rectangle``, ``quadrant``, ``range``, ``polygon``, ``ellipse``, ``boolean``,
                ``all_of`` (a ``diagonal`` gate with extra thresholds, e.g. Treg: one panel per part)
source          ``fixed``, ``fitted``, ``pooled`` (fit replaced by the pooled estimate), ``mixed``,
                ``boolean``
x, y            marker (or channel) on each axis; ``y`` is "" for a 1-D panel
x_scale,        the transform of each axis, e.g. ``arcsinh(x/150)`` or ``linear``
y_scale
x_range,        ``[lo, hi]`` of the histogram grid on each axis (transformed units) and its number
y_range,        of equal bins: 48 x 48 in 2-D, 96 in 1-D (``y_bins`` = 0). Each sample's grid
x_bins, y_bins  spans its own robust range (0.5-99.5% quantiles of ALL the parent's events),
                widened towards the gate by at most a quarter of that range (a far-off vertex,
                e.g. the singlet wedge's apex at 0, is cut at the edge), so the events fill the
                panel and a shifted sample is still visible; but a gate is never cut away
                whole: when none of a shape's coordinates on an axis (or a diagonal's line)
                would be on the grid (a tiny sample whose few events lie far from a pooled
                threshold), the grid reaches its nearest one
counts          event counts of the shown events per bin, row-major ``[y, x]`` (int32)
background      when ``condition`` shows part of the parent: every parent event per bin on the
                same grid (drawn in grey behind ``counts``); else empty
condition       events shown, when a gate has more than two dimensions: e.g. Treg's CD25 x CD127
                panel shows the CD4 T events that are FOXP3+ (``FOXP3 >= 2.79``) over all CD4 T
shapes          the applied gate in panel coordinates, as JSON: a list of ``{"kind": "rect", "x":
                [lo, hi], "y": [lo, hi]}`` (``null`` = open), ``{"kind": "range", "x": [lo, hi]}``,
                ``{"kind": "polygon", "vertices": [[x, y], ...]}``, ``{"kind": "ellipse",
                "center": [x, y], "covariance": [[...]], "distance_square": d2}``; a diagonal
                (half-plane) gate is a ``polygon`` clipped to the panel's grid with ``"line":
                [[x, y], [x, y]]`` (its boundary, the one drawn) and ``"half_plane": true``; boolean gates
                draw their sibling operands' shapes with ``"negate": true`` where inverted
n_shown         parent events in this panel (after ``condition``)
count,          the population's events, its parent's events and % of parent (the gate's result);
parent_count,   missing (null, NaN) where the population (for ``parent_count``: its parent) is not
pct_parent      measured in the sample (``source`` "not measured": its gate needs a marker the
                file lacks), never 0 (as in population_stats)
flags           the gating flags of this population ("; "-joined), e.g. a fit that fell back
params,         the gate's fitted numbers for the outlier rule (thresholds, ellipse centres,
param_names,    singlet area/height ratios), their names (``CD25 >=``) and the axis span of each
param_spans     parameter's dimension (the scale floor of the outlier rule); a diagonal gives where
                its line crosses the axes (``CD25 >=`` at CD127 = 0, ``CD127 <`` at CD25 = 0)
==============  ===================================================================================

No events are stored. :func:`cytopipe.report.outliers.gate_outliers` applies the outlier rule
(docs/reports.md).

Why one module: writing the gate-review table and reading it back share the table's schema (the
columns above) and must change together; the per-gate-type panel builders
are small functions over that one schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.errors import ReportError
from cytopipe.report.panels import panel_arrays, panel_background  # noqa: F401  (part of this table's API)
from cytopipe.schema import NOT_MEASURED, blank_unmeasured_counts, with_count_dtypes

GATE_REVIEW_FILE = "gate_review.parquet"
BINS_2D = 48
BINS_1D = 96
QUANTILES = (0.005, 0.995)
_OPEN = 1e9  # polygon vertices beyond this are open-ended (rays), e.g. the singlet wedge
# a gate coordinate widens a panel's grid by at most this share of the events' robust span (a
# coordinate further away is cut at the panel's edge): the panel stays on the events, not on 0
_GATE_REACH = 0.25
_QUANTILE_SAMPLE = 20_000  # events used for the robust range (a strided, deterministic subset)

GATE_REVIEW_COLUMNS = [
    "sample_id",
    "population",
    "parent",
    "panel",
    "gate_type",
    "source",
    "x",
    "y",
    "x_scale",
    "y_scale",
    "x_range",
    "y_range",
    "x_bins",
    "y_bins",
    "counts",
    "background",
    "condition",
    "shapes",
    "n_shown",
    "count",
    "parent_count",
    "pct_parent",
    "flags",
    "params",
    "param_names",
    "param_spans",
]


# ------------------------------------------------------------------------------------------------
# computing the data (inside the per-sample task)
# ------------------------------------------------------------------------------------------------
def gate_review_data(
    sample: Any,
    result: Any,
    sample_id: str | None = None,
    *,
    bins_2d: int = BINS_2D,
    bins_1d: int = BINS_1D,
    values: Any = None,
) -> pd.DataFrame:
    """Gate-review rows (see the module docstring) for one gated sample.

    ``sample`` is the :class:`cytopipe.Sample` the gating engine saw (after event QC) and ``result``
    its :class:`~cytopipe.gating.GatingResult`; ``values`` its
    :meth:`~cytopipe.gating.GatingResult.event_values` when the caller has them already. Cost: one histogram per panel over the parent's
    events (a few ms per 100k events); the output holds no events.
    """
    if sample_id is None:
        sample_id = Path(str(getattr(sample, "path", "") or "sample")).stem
    vals = values if values is not None else result.event_values(sample)  # what the engine saw
    rows: list[dict[str, Any]] = []
    pops = result.populations
    ranges: dict[int, tuple] = {}  # robust ranges of the value arrays (a parent's axis is in many panels)
    for name, pop in pops.items():
        parent = pops.get(pop.parent)
        parent_unmeasured = parent is not None and parent.source == NOT_MEASURED
        base = {
            "sample_id": str(sample_id),
            "population": name,
            "parent": pop.parent,
            "source": pop.source,
            # not measured (a marker its gate needs is not in the file): no count, never 0 events
            "count": None if pop.source == NOT_MEASURED else int(pop.count),
            "parent_count": None if parent_unmeasured else int(pop.parent_count),
            "pct_parent": float(pop.pct_parent),
            "flags": "; ".join(pop.flags),
        }
        idx = None if pop.parent == "root" else result.indices(pop.parent)
        gate = pop.gate
        panels = _panels_for(name, gate, pops, result)
        params, names, param_dims = _gate_params(gate)
        spans: dict[str, float] = {}
        made = []
        for panel in panels:
            row = _panel_row(panel, vals, idx, pop.parent, bins_2d, bins_1d, ranges=ranges)
            if row is None:
                continue
            for axis in ("x", "y"):
                lim = row[f"{axis}_range"]
                if row[axis] and len(lim):
                    spans.setdefault(row[axis], float(lim[1] - lim[0]))
            made.append(row)
        if not made:
            made.append(_empty_panel(gate))
        for i, row in enumerate(made):
            row.update(base)
            row["panel"] = i
            row["params"] = [float(p) for p in params]
            row["param_names"] = list(names)
            row["param_spans"] = [float(spans.get(d, np.nan)) for d in param_dims]
            rows.append(row)
    return _frame(rows)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=GATE_REVIEW_COLUMNS)
    df["panel"] = df["panel"].astype("int16")
    for col in ("x_bins", "y_bins"):
        df[col] = df[col].astype("int16")
    df["n_shown"] = df["n_shown"].astype("int64")
    with_count_dtypes(df)  # int64, or Int64 with missing values where not measured
    df["pct_parent"] = df["pct_parent"].astype("float64")
    return df


def _gate_type(gate: Any) -> str:
    if gate is None:
        return "none"
    kind = getattr(gate, "type", "") or type(gate).__name__
    if kind == "rectangle":
        style = getattr(gate, "style", "rectangle")
        return "range" if style == "range" else style
    return str(kind)


def _empty_panel(gate: Any) -> dict[str, Any]:
    return {
        "gate_type": _gate_type(gate),
        "x": "",
        "y": "",
        "x_scale": "",
        "y_scale": "",
        "x_range": [],
        "y_range": [],
        "x_bins": 0,
        "y_bins": 0,
        "counts": [],
        "background": [],
        "condition": "",
        "shapes": "[]",
        "n_shown": 0,
    }


def _bound_text(dim: str, lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo:.3g} <= {dim} < {hi:.3g}"
    if lo is not None:
        return f"{dim} >= {lo:.3g}"
    return f"{dim} < {hi:.3g}"


def _panels_for(name: str, gate: Any, pops: Mapping[str, Any], result: Any) -> list[dict[str, Any]]:
    """The views of one gate: which dimensions, which events, which shapes."""
    if gate is None:
        return []
    kind = _gate_type(gate)
    dims = list(getattr(gate, "dims", ()))
    if kind == "boolean":
        return _boolean_panels(name, gate, pops, result)
    if kind in ("rectangle", "range", "quadrant"):
        lower, upper = list(gate.lower), list(gate.upper)
        groups = [list(range(i, min(i + 2, len(dims)))) for i in range(0, len(dims), 2)]
        panels = []
        for group in groups:
            others = [j for j in range(len(dims)) if j not in group]
            shape: dict[str, Any] = {"kind": "rect" if len(group) == 2 else "range"}
            shape["x"] = [lower[group[0]], upper[group[0]]]
            if len(group) == 2:
                shape["y"] = [lower[group[1]], upper[group[1]]]
            panels.append(
                {
                    "gate_type": kind,
                    "dims": [dims[j] for j in group],
                    "shapes": [shape],
                    "condition": [(dims[j], lower[j], upper[j]) for j in others],
                }
            )
        return panels
    if kind == "all_of":
        return _all_of_panels(gate)
    if kind == "polygon" and _half_plane(gate) is not None:
        return [{"gate_type": kind, "dims": dims[:2], "shapes": [], "half_plane": gate, "condition": []}]
    if kind == "polygon":
        return [{"gate_type": kind, "dims": dims[:2], "shapes": [{"kind": "polygon", "vertices": gate.vertices.tolist()}], "condition": []}]  # fmt: skip
    if kind == "ellipse":
        shapes = []
        if len(dims) == 2:
            shapes = [
                {
                    "kind": "ellipse",
                    "center": gate.center.tolist(),
                    "covariance": gate.covariance.tolist(),
                    "distance_square": float(gate.distance_square),
                }
            ]
        return [{"gate_type": kind, "dims": dims[:2], "shapes": shapes, "condition": []}]
    return [{"gate_type": kind, "dims": dims[:2], "shapes": [], "condition": []}] if dims else []


def _half_plane(gate: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(point on the line, line direction, inward normal)`` of a fitted half-plane polygon (the
    CD25/CD127 diagonal of a ``diagonal`` gate: 4 huge vertices, two parallel edges), else None."""
    v = np.asarray(getattr(gate, "vertices", np.empty((0, 2))), dtype=float)
    if v.shape != (4, 2) or not np.isfinite(v).all() or np.abs(v).max() >= _OPEN or np.abs(v).max() < 1e5:
        return None
    d, n = v[1] - v[0], v[3] - v[0]
    if abs(d[0] * (v[2] - v[3])[1] - d[1] * (v[2] - v[3])[0]) > 1e-9 * float(np.hypot(*d)) ** 2:
        return None
    # the inward normal: perpendicular to the line, pointing to the kept side
    perp = np.array([-d[1], d[0]])
    if perp @ n < 0:
        perp = -perp
    return v[0], d, perp


def _half_plane_text(gate: Any) -> tuple[list[float], list[str]]:
    """The diagonal's two numbers: where it crosses ``y = 0`` (``x >=``/``x <``) and ``x = 0``."""
    p, d, n = _half_plane(gate)
    names = [dim.name for dim in gate.dims[:2]]
    values, labels = [], []
    for axis in (0, 1):
        other = 1 - axis
        if d[other] == 0:  # parallel to this axis: never crosses it
            values.append(float("nan"))
        else:
            values.append(float(p[axis] + (0.0 - p[other]) * d[axis] / d[other]))
        labels.append(f"{names[axis]} {'>=' if n[axis] > 0 else '<'}")
    return values, labels


def _all_of_panels(gate: Any) -> list[dict[str, Any]]:
    """An ``all_of`` gate (e.g. Treg: CD25/CD127 diagonal AND FOXP3+): one panel per part, showing
    the parent's events that pass the other parts (tested with the parts' own ``contains``, as the
    engine does)."""
    panels = []
    for i, part in enumerate(gate.parts):
        for panel in _panels_for("", part, {}, None):
            others = [q for j, q in enumerate(gate.parts) if j != i]
            panel["condition"] = list(panel["condition"]) + [("gate", q) for q in others]
            panel["gate_type"] = "all_of"
            panels.append(panel)
    return panels


def _condition_text(part: Any) -> str:
    if _half_plane(part) is not None:
        (a, b), (la, lb) = _half_plane_text(part)
        x, y = (d.name for d in part.dims[:2])
        return f"diagonal {la} {a:.3g} at {y} = 0, {lb} {b:.3g} at {x} = 0"
    if _gate_type(part) in ("rectangle", "range", "quadrant"):
        return " and ".join(
            _bound_text(d.name, lo, hi)
            for d, lo, hi in zip(part.dims, part.lower, part.upper)
            if lo is not None or hi is not None
        )
    return f"inside the {_gate_type(part)} gate on {' x '.join(d.name for d in part.dims)}"


def _clip_half_plane(half: tuple, xlim: Sequence[float], ylim: Sequence[float]) -> dict[str, Any]:
    """The half-plane clipped to the panel's grid (a polygon) and its boundary segment (``line``)."""
    p, d, n = half
    box = np.array([[xlim[0], ylim[0]], [xlim[1], ylim[0]], [xlim[1], ylim[1]], [xlim[0], ylim[1]]])
    side = (box - p) @ n
    out: list[list[float]] = []
    for k in range(4):  # Sutherland-Hodgman against one half-plane
        a, b, sa, sb = box[k], box[(k + 1) % 4], side[k], side[(k + 1) % 4]
        if sa >= 0:
            out.append(a.tolist())
        if (sa >= 0) != (sb >= 0):
            out.append((a + (b - a) * (sa / (sa - sb))).tolist())
    line = [q for q in out if abs((np.asarray(q) - p) @ n) <= 1e-9 * max(1.0, float(np.abs(n).max()))]
    return {"kind": "polygon", "vertices": out, "line": line[:2], "half_plane": True}


def _boolean_panels(name: str, gate: Any, pops: Mapping[str, Any], result: Any) -> list[dict[str, Any]]:
    """A boolean gate is drawn with its sibling operands' gates (same parent), inverted where
    negated: e.g. ``CD56dim NK = not CD56bright NK`` shows the CD56bright ellipse, dashed."""
    parent = pops[name].parent
    negate_all = getattr(gate, "op", "") == "not"
    panels = []
    for operand in getattr(gate, "operands", ()):
        other = pops.get(operand.population)
        if other is None or other.parent != parent or other.gate is None:
            continue
        for panel in _panels_for(operand.population, other.gate, pops, result):
            for shape in panel["shapes"]:
                shape["negate"] = bool(operand.negate) != negate_all
                shape["of"] = operand.population
            # marks of shapes drawn later on the panel's own grid (a half-plane)
            panel["mark"] = {"negate": bool(operand.negate) != negate_all, "of": operand.population}
            panel["gate_type"] = "boolean"
            panel["inside_population"] = name
            panels.append(panel)
    return panels


def _panel_row(
    panel: Mapping[str, Any],
    vals: Any,
    idx: np.ndarray | None,
    scope: str,
    bins_2d: int,
    bins_1d: int,
    ranges: dict[int, tuple] | None = None,
) -> dict[str, Any] | None:
    dims = panel["dims"]
    if not dims:
        return None
    sel = idx
    parent_scope = scope
    cond_text = []
    if panel["condition"]:
        keep = None
        for cond in panel["condition"]:
            if cond[0] == "gate":  # another part of an all_of gate: its own contains()
                part = cond[1]
                got = [_dim_values(vals, d, idx, scope) for d in part.dims]
                if any(g is None for g in got):
                    return None
                ok = np.asarray(part.contains([g[0] for g in got]), dtype=bool)
                keep = ok if keep is None else keep & ok
                cond_text.append(_condition_text(part))
                continue
            dim, lo, hi = cond
            got = _dim_values(vals, dim, idx, scope)
            if got is None:
                return None
            v = got[0]
            ok = np.ones(len(v), dtype=bool)
            if lo is not None:
                ok &= v >= lo
            if hi is not None:
                ok &= v < hi
            keep = ok if keep is None else keep & ok
            cond_text.append(_bound_text(dim.name, lo, hi))
        base = np.arange(vals.n_events) if idx is None else idx
        sel = base[keep]
        scope = f"{scope} | {' and '.join(cond_text)}"
    axes = []
    for dim in dims:
        got = _dim_values(vals, dim, sel, scope)
        if got is None:
            return None
        axes.append(got)
    # a panel showing part of the parent (e.g. Treg CD25 x CD127: the FOXP3+ CD4 T events) also
    # carries every parent event as its background, on a grid that spans them all
    whole = axes
    if sel is not idx:
        whole = [_dim_values(vals, dim, idx, parent_scope) for dim in dims]
        if any(w is None for w in whole):
            return None
    shapes = list(panel["shapes"])
    background = np.empty(0, dtype=np.int64)
    if len(axes) == 2:
        (x, xs), (y, ys) = axes
        xe = _axis_edges([whole[0][0], x], shapes, 0, bins_2d, ranges)
        ye = _axis_edges([whole[1][0], y], shapes, 1, bins_2d, ranges)
        if panel.get("half_plane") is not None:  # drawn on this panel's own grid
            half = _half_plane(panel["half_plane"])
            clipped = _clip_half_plane(half, (xe[0], xe[-1]), (ye[0], ye[-1]))
            if len(clipped["line"]) < 2:  # the line misses the events (a tiny parent): reach it
                a, b = _line_piece(half, (xe[0], xe[-1]), (ye[0], ye[-1]))
                xe = _axis_edges([whole[0][0], x], shapes, 0, bins_2d, ranges, must=[a[0], b[0]])
                ye = _axis_edges([whole[1][0], y], shapes, 1, bins_2d, ranges, must=[a[1], b[1]])
                clipped = _clip_half_plane(half, (xe[0], xe[-1]), (ye[0], ye[-1]))
            shapes.append({**clipped, **panel.get("mark", {})})
        counts = _hist2d(x, y, xe, ye)
        if sel is not idx:
            background = _hist2d(whole[0][0], whole[1][0], xe, ye)
    else:
        (x, xs) = axes[0]
        xe = _axis_edges([whole[0][0], x], shapes, 0, bins_1d, ranges)
        ye, ys = np.empty(0), ""
        counts = _hist1d(x, xe)
        if sel is not idx:
            background = _hist1d(whole[0][0], xe)
    xr = [float(xe[0]), float(xe[-1])]
    yr = [float(ye[0]), float(ye[-1])] if len(ye) else []
    return {
        "gate_type": panel["gate_type"],
        "x": dims[0].name,
        "y": dims[1].name if len(dims) > 1 else "",
        "x_scale": xs,
        "y_scale": ys,
        "x_range": xr,
        "y_range": yr,
        "x_bins": len(xe) - 1,
        "y_bins": max(len(ye) - 1, 0),
        "counts": counts.ravel().astype(np.int32).tolist(),
        "background": background.ravel().astype(np.int32).tolist(),
        "condition": " and ".join(cond_text),
        "shapes": json.dumps(shapes, allow_nan=False, default=_none_for_inf),
        "n_shown": int(len(x)),
    }


def _dim_values(vals: Any, dim: Any, idx: np.ndarray | None, scope: str) -> tuple[np.ndarray, str] | None:
    """``(values at idx, scale label)``, or None when the dimension cannot be drawn (a Gating-ML
    ratio dimension, a channel the file lacks): the panel is then left out, its counts still show."""
    from cytopipe.errors import CytopipeError

    try:
        return vals.at(dim, idx, scope), vals.scale(dim)
    except CytopipeError:
        return None


def _none_for_inf(value: Any) -> Any:  # pragma: no cover - json calls it for unknown types only
    return None


def _shape_coordinates(shape: Mapping[str, Any], axis: int) -> list[float]:
    """Finite coordinates of one gate shape along one axis (its thresholds, its vertices, its
    ellipse's extent)."""
    key = "xy"[axis]
    kind = shape["kind"]
    if kind in ("rect", "range") and key in shape:
        return [float(v) for v in shape[key] if v is not None and np.isfinite(v)]
    if kind == "polygon" and len(shape["vertices"]):
        v = np.asarray(shape["vertices"], dtype=float)[:, axis]
        return [float(a) for a in v if np.isfinite(a) and abs(a) < _OPEN]
    if kind == "ellipse":
        c = shape["center"][axis]
        half = float(np.sqrt(shape["distance_square"] * shape["covariance"][axis][axis]))
        return [c - half, c + half]
    return []


def _shape_extent(shapes: Sequence[Mapping[str, Any]], axis: int) -> list[float]:
    """Finite coordinates of the gate along one axis (the grid is widened to show them)."""
    return [v for s in shapes for v in _shape_coordinates(s, axis)]


def _axis_edges(
    values: Sequence[np.ndarray],
    shapes: Sequence[Mapping[str, Any]],
    axis: int,
    bins: int,
    ranges: dict[int, tuple] | None = None,
    must: Sequence[float] = (),
) -> np.ndarray:
    """The grid of one axis: over the events, widened towards the gate (at most ``_GATE_REACH``);
    a shape none of whose coordinates on this axis is then on the grid (a tiny sample's events
    far from a threshold, an ellipse beside them) widens it up to its nearest one, so the
    panel always shows the gate (its boundary is never cut away). ``must``: coordinates the grid
    includes in any case (a half-plane's line)."""
    extent = _shape_extent(shapes, axis)
    edges = _edges_over(values, extent, bins, ranges, must)
    lo, hi = float(edges[0]), float(edges[-1])
    unseen = []
    for shape in shapes:
        coords = _shape_coordinates(shape, axis)
        if not coords:
            continue
        if shape["kind"] in ("rect", "range"):  # thresholds: each is a line of the panel
            if any(lo <= c <= hi for c in coords):
                continue
        else:  # an ellipse, a polygon: its extent on this axis (open vertices: rays) meets the grid
            first, last = _polygon_reach(shape, axis, min(coords), max(coords))
            if first <= hi and last >= lo:
                continue
        unseen.append(min(coords, key=lambda c: min(abs(c - lo), abs(c - hi))))
    if not unseen:
        return edges
    return _edges_over(values, extent, bins, ranges, [*must, *unseen])


def _polygon_reach(shape: Mapping[str, Any], axis: int, first: float, last: float) -> tuple[float, float]:
    """A shape's extent on one axis: a polygon's open-ended vertices (rays, e.g. the singlet
    wedge's) make it reach to infinity on their side."""
    if shape["kind"] == "polygon":
        v = np.asarray(shape["vertices"], dtype=float)[:, axis]
        if (v <= -_OPEN).any():
            first = -np.inf
        if (v >= _OPEN).any():
            last = np.inf
    return first, last


def _line_piece(half: tuple, xlim: Sequence[float], ylim: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A piece of a half-plane's boundary line to bring onto a grid it misses: centred on the
    line's point nearest to the grid's centre, a quarter of the grid's larger side long."""
    p, d, _ = half
    d = np.asarray(d, dtype=float) / float(np.hypot(*d))
    centre = np.array([(xlim[0] + xlim[1]) / 2, (ylim[0] + ylim[1]) / 2])
    q = p + ((centre - p) @ d) * d
    half_length = 0.125 * max(xlim[1] - xlim[0], ylim[1] - ylim[0])
    return q - half_length * d, q + half_length * d


def _robust_range(v: np.ndarray) -> tuple[float, float]:
    """The 0.5-99.5% quantiles of the finite values of ``v`` (of a strided subset when large)."""
    # imported here: the gating package (and numba) only where the events are binned, not in the report
    from cytopipe.gating._quantile import quantile_like_numpy

    if v.dtype.kind == "f" and not np.isfinite(v).all():
        v = v[np.isfinite(v)]
    if len(v) > _QUANTILE_SAMPLE:  # a strided subset: deterministic and fast
        v = v[:: len(v) // _QUANTILE_SAMPLE]
    if len(v):
        lo, hi = (float(q) for q in quantile_like_numpy(v, QUANTILES))
        return lo, hi
    return 0.0, 1.0


def _edges(
    v: np.ndarray,
    extra: Sequence[float],
    bins: int,
    ranges: dict[int, tuple] | None = None,
    must: Sequence[float] = (),
) -> np.ndarray:
    """Bin edges over the robust range of ``v`` (0.5-99.5% quantiles), widened towards ``extra``
    (the gate's coordinates) by at most ``_GATE_REACH`` of that range and up to every ``must``
    coordinate, and padded by 5%.
    ``ranges`` caches the range per array (keyed by identity; the array is kept with it, so the
    key cannot be reused while the cache lives)."""
    if ranges is None:
        lo, hi = _robust_range(v)
    else:
        hit = ranges.get(id(v))
        if hit is None or hit[0] is not v:
            hit = ranges[id(v)] = (v, *_robust_range(v))
        lo, hi = hit[1], hit[2]
    if extra:  # the gate shown where it meets the data; far-off vertices (a wedge's apex at 0) cut
        reach = _GATE_REACH * max(hi - lo, 1e-12)
        near = [e for e in extra if lo - reach <= e <= hi + reach]
        beyond = [lo - reach if e < lo else hi + reach for e in extra if not lo - reach <= e <= hi + reach]
        lo, hi = min(lo, *near, *beyond), max(hi, *near, *beyond)
    if must:
        lo, hi = min(lo, *must), max(hi, *must)
    span = hi - lo
    if not np.isfinite(span) or span <= 0:
        lo, hi, span = lo - 0.5, lo + 0.5, 1.0
    return np.linspace(lo - 0.05 * span, hi + 0.05 * span, bins + 1)


def _edges_over(
    values: Sequence[np.ndarray],
    extra: Sequence[float],
    bins: int,
    ranges: dict[int, tuple] | None = None,
    must: Sequence[float] = (),
) -> np.ndarray:
    """Edges spanning the robust range of each of ``values`` (the parent's events and the shown
    ones: a small subset in the parent's tail, e.g. Treg's high CD25, stays on the grid)."""
    grids = [_edges(v, extra, bins, ranges, must) for v in values if len(v)] or [
        _edges(values[0], extra, bins, ranges, must)
    ]
    return np.linspace(min(g[0] for g in grids), max(g[-1] for g in grids), bins + 1)


def _grid(edges: np.ndarray) -> tuple[float, float, int]:
    n = len(edges) - 1
    return float(edges[0]), float(n / (edges[-1] - edges[0])), n


def _hist2d(x: np.ndarray, y: np.ndarray, xe: np.ndarray, ye: np.ndarray) -> np.ndarray:
    """Counts on the grid ``xe`` x ``ye``, shaped (ny, nx); one pass, no temporaries."""
    from cytopipe.report._histkernels import hist2d_kernel

    (xlo, xs, nx), (ylo, ys, ny) = _grid(xe), _grid(ye)
    counts = np.zeros(nx * ny, dtype=np.int64)
    hist2d_kernel(x, y, xlo, xs, nx, ylo, ys, ny, counts)
    return counts.reshape(ny, nx)


def _hist1d(x: np.ndarray, xe: np.ndarray) -> np.ndarray:
    from cytopipe.report._histkernels import hist1d_kernel

    xlo, xs, nx = _grid(xe)
    counts = np.zeros(nx, dtype=np.int64)
    hist1d_kernel(x, xlo, xs, nx, counts)
    return counts


DIAGONAL_MARK = "(diagonal crossing)"


def _gate_params(gate: Any) -> tuple[list[float], list[str], list[str]]:
    """The gate's numbers the outlier rule compares: ``(values, names, dimension of each)``."""
    kind = _gate_type(gate)
    if gate is None or kind in ("boolean", "none"):
        return [], [], []
    if kind == "all_of":
        values, names, owner = [], [], []
        for part in gate.parts:
            v, n, o = _gate_params(part)
            values += v
            names += n
            owner += o
        return values, names, owner
    if kind == "polygon" and _half_plane(gate) is not None:
        # where a diagonal crosses the axes is an extrapolation (often far outside the data): it is
        # recorded but named as such, and the outlier rule leaves it out (the frequency still counts)
        values, names = _half_plane_text(gate)
        return values, [f"{n} {DIAGONAL_MARK}" for n in names], [d.name for d in gate.dims[:2]]
    dims = [d.name for d in getattr(gate, "dims", ())]
    values: list[float] = []
    names: list[str] = []
    owner: list[str] = []
    if kind in ("rectangle", "range", "quadrant"):
        for d, lo, hi in zip(dims, gate.lower, gate.upper):
            for v, op in ((lo, ">="), (hi, "<")):
                if v is not None and np.isfinite(v):
                    values.append(float(v))
                    names.append(f"{d} {op}")
                    owner.append(d)
    elif kind == "ellipse":
        for d, c in zip(dims, gate.center):
            values.append(float(c))
            names.append(f"{d} centre")
            owner.append(d)
    elif kind == "polygon" and len(dims) == 2:
        v = np.asarray(gate.vertices, dtype=float)
        open_end = ~np.isfinite(v).all(axis=1) | (np.abs(np.nan_to_num(v, nan=0.0)) >= _OPEN).any(axis=1)
        if open_end.any():  # rays from the origin, e.g. the singlet wedge: their area/height ratios
            for k, (a, b) in enumerate(v[open_end]):
                if np.isfinite(a) and np.isfinite(b) and b != 0:
                    values.append(float(a / b))
                    names.append(f"{dims[0]}/{dims[1]} ratio {k + 1}")
                    owner.append("")
        else:
            for j, d in enumerate(dims):
                values.append(float(v[:, j].mean()))
                names.append(f"{d} centre")
                owner.append(d)
    return values, names, owner


# ------------------------------------------------------------------------------------------------
# storing and reading
# ------------------------------------------------------------------------------------------------
def _arrow_schema():
    """The gate-review table's fixed Parquet schema: the same bytes whether rows come straight from
    :func:`gate_review_data` (Python lists) or back from a Parquet cache (numpy arrays)."""
    import pyarrow as pa

    floats, ints, text = pa.list_(pa.float64()), pa.list_(pa.int32()), pa.list_(pa.string())
    types = {
        "panel": pa.int16(), "x_bins": pa.int16(), "y_bins": pa.int16(), "n_shown": pa.int64(),
        "count": pa.int64(), "parent_count": pa.int64(), "pct_parent": pa.float64(),
        "x_range": floats, "y_range": floats, "counts": ints, "background": ints, "params": floats, "param_names": text,
        "param_spans": floats,
    }  # fmt: skip
    return pa.schema([(c, types.get(c, pa.string())) for c in GATE_REVIEW_COLUMNS])


def gate_review_bytes(table: pd.DataFrame) -> bytes:
    """The gate-review table as zstd Parquet bytes with a fixed schema (see :func:`write_gate_review`)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = _with_background(table)
    missing = [c for c in GATE_REVIEW_COLUMNS if c not in table.columns]
    if missing:
        raise ReportError(f"gate-review table lacks columns {missing}", key="gate_review")
    frame = table[GATE_REVIEW_COLUMNS].reset_index(drop=True)
    schema = _arrow_schema()
    arrow = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    buf = io.BytesIO()
    # no dictionary for the list columns (histogram counts, ranges, parameters): the dictionary
    # of 66,519 panels' counts (3,501 files) took half the write and read time for 18% less size
    plain = [f.name for f in schema if not pa.types.is_list(f.type)]
    pq.write_table(arrow, buf, compression="zstd", use_dictionary=plain)
    return buf.getvalue()


def write_gate_review(run_dir: str | Path, table: pd.DataFrame) -> Path:
    """Write the gate-review table (rows of every sample) as ``RUN_DIR/gate_review.parquet``
    (atomically: temporary file, then rename)."""
    from cytopipe.store import atomic_write_bytes

    return atomic_write_bytes(Path(run_dir) / GATE_REVIEW_FILE, gate_review_bytes(table))


def read_gate_review(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's gate-review table, or None when the run folder has none."""
    path = Path(run_dir) / GATE_REVIEW_FILE
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # a damaged file: say which and what to do
        raise ReportError(
            f"cannot read the gate-review table ({exc}); rerun `cytopipe run` to rewrite it", file=path
        ) from None
    table = _with_background(table)
    missing = [c for c in GATE_REVIEW_COLUMNS if c not in table.columns]
    if missing:
        raise ReportError(f"the gate-review table lacks columns {missing}", file=path)
    return blank_unmeasured_counts(table, source="source")  # older versions stored 0 events


def _with_background(table: pd.DataFrame) -> pd.DataFrame:
    """A table written before panels carried their parent's background (``background`` empty)."""
    if "background" in table.columns or "counts" not in table.columns:
        return table
    return table.assign(background=[[] for _ in range(len(table))])
