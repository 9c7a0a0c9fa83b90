"""Fixed gate geometry: which events fall inside a gate.

Every gate works on the values of its dimensions for the events under consideration
(one 1-D array per dimension, already compensated and transformed by the engine) and
returns a boolean array. Boundary rules follow Gating-ML 2.0 (and FlowKit):

* rectangle / range / quadrant: ``min <= x < max`` per dimension; a missing bound is open;
* polygon: even-odd rule (crossing number), so self-intersecting polygons work; vertices
  may be +-inf (cytolib/openCyto write open-ended polygons that way);
* ellipsoid: ``(x - mean)^T inv(covariance) (x - mean) <= distance_square``;
* boolean: and / or / not of other populations (evaluated by the engine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np


@dataclass(frozen=True)
class Ratio:
    """A Gating-ML ``fratio`` new dimension: ``A * (x - B) / (y - C)`` of two channels."""

    numerator: str
    denominator: str
    A: float = 1.0
    B: float = 0.0
    C: float = 0.0


@dataclass(frozen=True)
class Dim:
    """One axis a gate is drawn on.

    ``name`` is a marker (templates) or a ``$PnN``/fluorochrome name (Gating-ML).
    ``compensation`` is ``None`` (raw values), ``"template"`` (the template's compensation:
    the file's spillover, a CSV matrix, or none), ``"FCS"`` (the file's spillover, Gating-ML)
    or the id of a matrix stored in the template. ``transform`` is a key of
    ``Template.transforms`` (``None`` = linear). ``ratio`` makes this a ratio dimension.
    """

    name: str
    compensation: str | None = "template"
    transform: str | None = None
    ratio: Ratio | None = None

    @property
    def label(self) -> str:
        return self.name


class Gate:
    """Base class of fixed gates."""

    type: str = ""
    data_driven = False

    def __init__(self, dims: Sequence[Dim]):
        self.dims = tuple(dims)

    @property
    def markers(self) -> list[str]:
        return [d.name for d in self.dims]

    def contains(self, values: Sequence[np.ndarray]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def geometry(self) -> dict:
        """The gate's parameters as plain Python values (for YAML, reports and tests)."""
        raise NotImplementedError  # pragma: no cover


def _none_or_float(v):
    return None if v is None else float(v)


class RectangleGate(Gate):
    """Hyper-rectangle ``lower <= x < upper`` (``None`` = open bound).

    ``style`` only records how the template wrote it (``range``, ``rectangle`` or
    ``quadrant``) so the fitted template reads back the way the scientist wrote it.
    """

    type = "rectangle"

    def __init__(
        self,
        dims: Sequence[Dim],
        lower: Sequence[float | None],
        upper: Sequence[float | None],
        style: str = "rectangle",
    ):
        super().__init__(dims)
        self.lower = tuple(_none_or_float(v) for v in lower)
        self.upper = tuple(_none_or_float(v) for v in upper)
        self.style = style

    def contains(self, values: Sequence[np.ndarray]) -> np.ndarray:
        # bounds as float64 scalars: a Python float next to a float32 array would be rounded to
        # float32 first (NEP 50), moving the bound; float32 values widen to float64 exactly
        inside = None
        for x, lo, hi in zip(values, self.lower, self.upper):
            lo = None if lo is None else np.float64(lo)
            hi = None if hi is None else np.float64(hi)
            for cond in (None if lo is None else x >= lo, None if hi is None else x < hi):
                if cond is None:
                    continue
                if inside is None:
                    inside = cond
                else:
                    inside &= cond
        if inside is None:  # no bound at all: everything
            return np.ones(len(values[0]), dtype=bool)
        return inside

    def geometry(self) -> dict:
        return {"min": list(self.lower), "max": list(self.upper)}


@numba.njit(cache=True, nogil=True)
def _edge_x(xi, yi, xj, yj, y):
    """x where the edge (xi, yi)-(xj, yj) crosses the horizontal line at height y.

    Edges may have infinite endpoints: an edge running to +-inf in y is vertical through
    its finite end; an edge running to +-inf in x crosses at that infinity.
    """
    if xi == xj:
        return xi
    if math.isinf(yi) and not math.isinf(yj):
        return xj
    if math.isinf(yj) and not math.isinf(yi):
        return xi
    if math.isinf(xi) and not math.isinf(xj):
        return xi
    if math.isinf(xj) and not math.isinf(xi):
        return xj
    return xi + (y - yi) * (xj - xi) / (yj - yi)


@numba.njit(cache=True, nogil=True)
def _points_in_polygon(x, y, vx, vy, out):
    n = x.shape[0]
    m = vx.shape[0]
    for k in range(n):
        px = x[k]
        py = y[k]
        inside = False
        j = m - 1
        for i in range(m):
            yi = vy[i]
            yj = vy[j]
            if (yi > py) != (yj > py):
                xc = _edge_x(vx[i], yi, vx[j], yj, py)
                if px < xc:
                    inside = not inside
            j = i
        out[k] = inside


def points_in_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of events (x, y) against ``vertices`` (k x 2)."""
    v = np.asarray(vertices, dtype=np.float64)
    out = np.empty(len(x), dtype=np.bool_)
    if len(x):
        _points_in_polygon(
            np.ascontiguousarray(x), np.ascontiguousarray(y), v[:, 0].copy(), v[:, 1].copy(), out
        )
    return out


class PolygonGate(Gate):
    type = "polygon"

    def __init__(self, dims: Sequence[Dim], vertices):
        super().__init__(dims)
        self.vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)

    def contains(self, values: Sequence[np.ndarray]) -> np.ndarray:
        return points_in_polygon(values[0], values[1], self.vertices)

    def geometry(self) -> dict:
        return {"vertices": self.vertices.tolist()}


@numba.njit(cache=True, nogil=True)
def _in_ellipse_2d(x, y, center, inv, d2, out):
    # same operation order as flowutils (dot(d, inv) * d, summed) so boundary events agree
    for i in range(x.shape[0]):
        u = np.float64(x[i]) - center[0]
        v = np.float64(y[i]) - center[1]
        out[i] = (u * inv[0, 0] + v * inv[1, 0]) * u + (u * inv[0, 1] + v * inv[1, 1]) * v <= d2


class EllipsoidGate(Gate):
    """``(x - center)^T inv(covariance) (x - center) <= distance_square`` (n-D)."""

    type = "ellipse"

    def __init__(self, dims: Sequence[Dim], center, covariance, distance_square: float = 1.0):
        super().__init__(dims)
        self.center = np.asarray(center, dtype=np.float64).ravel()
        self.covariance = np.asarray(covariance, dtype=np.float64).reshape(len(self.center), -1)
        self.distance_square = float(distance_square)
        self.inverse = np.linalg.inv(self.covariance)

    def contains(self, values: Sequence[np.ndarray]) -> np.ndarray:
        k = len(self.center)
        if k == 2:  # the common case, one pass without temporaries
            out = np.empty(len(values[0]), dtype=np.bool_)
            _in_ellipse_2d(values[0], values[1], self.center, self.inverse, self.distance_square, out)
            return out
        # quadratic form sum_ij d_i inv_ij d_j in float64, one pair of dimensions at a time
        d = [np.asarray(values[i], dtype=np.float64) - self.center[i] for i in range(k)]
        q = np.zeros(len(d[0]), dtype=np.float64)
        for i in range(k):
            for j in range(k):
                q += d[i] * self.inverse[i, j] * d[j]
        return q <= self.distance_square

    def geometry(self) -> dict:
        return {
            "center": self.center.tolist(),
            "covariance": self.covariance.tolist(),
            "distance_square": self.distance_square,
        }

    @classmethod
    def from_axes(cls, dims, center, half_axes, angle_degrees: float = 0.0) -> EllipsoidGate:
        """A 2-D ellipse from its half-axes and rotation (degrees, counter-clockwise)."""
        a, b = (float(v) for v in half_axes)
        t = math.radians(angle_degrees)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        cov = rot @ np.diag([a * a, b * b]) @ rot.T
        return cls(dims, center, cov, 1.0)


@dataclass(frozen=True)
class Operand:
    population: str
    negate: bool = False


@dataclass
class BooleanGate(Gate):
    """``and`` / ``or`` of populations (each optionally negated), or ``not`` of one."""

    op: str = "and"
    operands: tuple[Operand, ...] = field(default_factory=tuple)
    type = "boolean"

    def __post_init__(self):
        self.dims = ()

    def combine(self, masks: Sequence[np.ndarray]) -> np.ndarray:
        vals = [~m if o.negate else m for m, o in zip(masks, self.operands)]
        if self.op == "not":
            return ~vals[0]
        out = vals[0].copy()
        for v in vals[1:]:
            if self.op == "and":
                out &= v
            else:
                out |= v
        return out

    @property
    def union_of(self) -> tuple[str, ...]:
        """The operands of a plain ``or`` (none negated), which is measured as the union of those a
        file can measure; () for any other boolean gate, which needs every operand."""
        if self.op != "or" or any(o.negate for o in self.operands):
            return ()
        return tuple(o.population for o in self.operands)

    def geometry(self) -> dict:
        if self.op == "not":
            return {"not": self.operands[0].population}
        return {self.op: [("not " if o.negate else "") + o.population for o in self.operands]}
