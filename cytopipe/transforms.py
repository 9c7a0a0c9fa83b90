"""Display/analysis transforms of fluorescence and scatter values.

Every transform maps float32 arrays to float32, has an ``inverse``, a plain-dict form
(``{"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0}``) and a stable hash. The
definitions are those of flowutils / FlowKit (Gating-ML 2.0 and FlowJo), and the tests hold the
values to them:

============  =======================================  ===========================================
type          parameters                               reference
============  =======================================  ===========================================
logicle       T, W, M, A (+ ``scale``)                 flowutils.transforms.logicle (Gating-ML)
hyperlog      T, W, M, A (+ ``scale``)                 flowutils.transforms.hyperlog (Gating-ML)
fasinh        T, M, A                                  flowutils.transforms.asinh (Gating-ML)
arcsinh       cofactor                                 ``arcsinh(x / cofactor)``
biex          width, neg, pos, max, channel_range      FlowKit ``WSPBiexTransform`` (FlowJo biex)
linear        T, A                                     Gating-ML ``flin`` = FlowKit LinearTransform
log           T, M                                     Gating-ML ``flog`` = FlowKit LogTransform
identity      --                                       no change
============  =======================================  ===========================================

Logicle and hyperlog have no closed forward formula; flowutils finds a root per event (~0.13 s
per million values). Here they are an interpolation in a table of the *exact* flowutils values
(1024 bins per octave of ``|x|``, see :mod:`cytopipe._transform_kernels`): max error vs flowutils
1.4e-8 before the float32 rounding of the output (so <= 1 float32 ulp after it), ~50x faster.

A :class:`TransformSet` maps channels (``$PnN`` or marker names) to transforms and applies them
to an event matrix in one pass, in place by default. Parameters are either written per channel
(gating template) or estimated once per study with :func:`estimate_transforms` and then locked:
the set's dict is recorded with the run so every visit uses the same transform.

Why one module: the eight transform types share one base class, one dict form, one hash and one
table-interpolation machinery, and :class:`TransformSet` applies them all in one pass; splitting
per type would scatter the contract the tests hold against flowutils/FlowKit. The numba kernels
live apart in :mod:`cytopipe._transform_kernels`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cytopipe.errors import TransformError

LN10 = math.log(10.0)
_ROW_BLOCK = 32768  # rows per block for the numpy transforms: the block stays in cache


# ============================================================================================
# base class
# ============================================================================================
class Transform(ABC):
    """One transform of one channel. Subclasses are frozen dataclasses of their parameters."""

    kind: ClassVar[str]

    # --- public API ------------------------------------------------------------------------
    def apply(self, values: np.ndarray, *, inplace: bool = False) -> np.ndarray:
        """Transform ``values`` (any shape) and return a float32 array.

        ``inplace=True`` writes into ``values`` (which must then be a float32 array).
        """
        arr = _as_float32(values, inplace, what=f"{self.kind} transform")
        view = arr.reshape(-1, 1) if arr.ndim <= 1 else arr.reshape(arr.shape[0], -1)
        if view.size:
            _apply_columns(view, list(range(view.shape[1])), [self] * view.shape[1])
        return arr

    __call__ = apply

    def inverse(self, values: np.ndarray, *, inplace: bool = False) -> np.ndarray:
        """Map transformed values back to data values (float32)."""
        arr = _as_float32(values, inplace, what=f"{self.kind} inverse")
        if arr.size:
            flat = arr.reshape(-1) if arr.flags.c_contiguous else None
            if flat is None:  # strided view: compute then copy back
                arr[...] = self._inverse(np.asarray(arr, dtype=np.float64).reshape(-1)).reshape(arr.shape)
            else:
                flat[:] = self._inverse(flat.astype(np.float64))
        return arr

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for YAML/JSON: ``{"type": kind, <param>: float, ...}``."""
        out: dict[str, Any] = {"type": self.kind}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "scale" and value == 1.0:
                continue  # the default is left out so plain Gating-ML logicle dicts stay plain
            out[f.name] = int(value) if f.name == "channel_range" else float(value)
        return out

    @property
    def hash(self) -> str:
        """Stable sha256 (hex) of the type and parameters."""
        return _stable_hash(self.to_dict())

    def to_flowkit(self):
        """The equivalent FlowKit transform object (FlowKit is imported lazily)."""
        raise TransformError(f"{self.kind} has no FlowKit equivalent")

    # --- implementation hooks -----------------------------------------------------------------
    def _forward(self, v: np.ndarray) -> np.ndarray:
        """Forward transform of a float32 1-D array (a possibly strided view); returns float32."""
        out = np.array(v, dtype=np.float32, copy=True).reshape(-1, 1)
        type(self)._forward_block(out, [self])
        return out.reshape(-1)

    @classmethod
    def _forward_block(cls, block: np.ndarray, xforms: Sequence[Transform]) -> None:
        """Transform the columns of a float32 2-D ``block`` in place, column j with ``xforms[j]``
        (all of this class): one vectorised pass with per-column parameters."""
        for j, t in enumerate(xforms):
            block[:, j] = t._forward(block[:, j])

    @abstractmethod
    def _inverse(self, y: np.ndarray) -> np.ndarray:
        """Inverse of a float64 1-D array; returns an array castable to float32."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "type")
        return f"{type(self).__name__}({params})"


def _check(cond: bool, message: str, key: str | None = None) -> None:
    if not cond:
        raise TransformError(message, key=key)


def _finite(kind: str, **params: float) -> None:
    for name, value in params.items():
        if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
            raise TransformError(
                f"{kind}: parameter {name} is {value!r}; it must be a finite number", key=name
            )


# ============================================================================================
# logicle and hyperlog (table-interpolated exact flowutils values)
# ============================================================================================
class _TableTransform(Transform):
    """Shared machinery of logicle and hyperlog: an exact table + numba kernel."""

    _kernel_kind: ClassVar[int]

    def _validate_twma(self) -> None:
        T, W, M, A = self.T, self.W, self.M, self.A  # type: ignore[attr-defined]
        _finite(self.kind, T=T, W=W, M=M, A=A, scale=self.scale)  # type: ignore[attr-defined]
        _check(T > 0, f"{self.kind}: T (top of scale) is {T}; it must be > 0, e.g. 262144", "T")
        _check(M > 0, f"{self.kind}: M (decades) is {M}; it must be > 0, e.g. 4.5", "M")
        _check(W >= 0, f"{self.kind}: W (linear width) is {W}; it must be >= 0", "W")
        _check(
            2 * W <= M,
            f"{self.kind}: W={W} is larger than M/2={M / 2}; use a smaller W or a larger M",
            "W",
        )
        _check(
            -W <= A <= M - 2 * W,
            f"{self.kind}: A={A} is outside [-W, M - 2W] = [{-W}, {M - 2 * W}]",
            "A",
        )
        _check(self.scale > 0, f"{self.kind}: scale is {self.scale}; it must be > 0", "scale")  # type: ignore[attr-defined]

    @property
    def x1(self) -> float:
        """Transformed value of data zero (the symmetry centre)."""
        return (self.A + self.W) / (self.M + self.A) * self.scale  # type: ignore[attr-defined]

    def _table(self) -> tuple[np.ndarray, float, float, np.ndarray]:
        return _build_table(self.kind, self.T, self.W, self.M, self.A, self.scale)  # type: ignore[attr-defined]

    def _forward(self, v: np.ndarray) -> np.ndarray:
        out = np.array(v, dtype=np.float32, copy=True).reshape(-1, 1)
        _apply_columns(out, [0], [self])
        return out.reshape(-1)

    def _exact(self, x: np.ndarray) -> np.ndarray:
        """The flowutils forward transform in float64 (slow; used to build the table)."""
        import flowutils.transforms as fu

        fn = fu._logicle if self.kind == "logicle" else fu._hyperlog
        return fn(np.asarray(x, dtype=np.float64), t=self.T, m=self.M, w=self.W, a=self.A) * self.scale  # type: ignore[attr-defined]

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        import flowutils.transforms as fu

        fn = fu._logicle_inverse if self.kind == "logicle" else fu._hyperlog_inverse
        return fn(y / self.scale, t=self.T, m=self.M, w=self.W, a=self.A)  # type: ignore[attr-defined]


@dataclass(frozen=True, repr=False)
class Logicle(_TableTransform):
    """Logicle (Parks et al. 2006; Gating-ML 2.0 ``logicle``), as flowutils.

    ``T`` top of scale, ``W`` linear width in decades, ``M`` decades, ``A`` extra negative
    decades. Output: data value T maps to 1 (times ``scale``). flowCore/CytoExploreR GatingSets
    store logicle x M: use ``scale=M`` to match them.
    """

    T: float = 262144.0
    W: float = 0.5
    M: float = 4.5
    A: float = 0.0
    scale: float = 1.0

    kind: ClassVar[str] = "logicle"
    _kernel_kind: ClassVar[int] = 0

    def __post_init__(self) -> None:
        self._validate_twma()

    def to_flowkit(self):
        if self.scale != 1.0:
            raise TransformError("FlowKit's LogicleTransform has no output scale; use scale=1")
        from flowkit import transforms as fkt

        return fkt.LogicleTransform(param_t=self.T, param_w=self.W, param_m=self.M, param_a=self.A)


@dataclass(frozen=True, repr=False)
class Hyperlog(_TableTransform):
    """Hyperlog (Bagwell 2005; Gating-ML 2.0 ``hyperlog``), as flowutils. Parameters as logicle;
    W must be > 0."""

    T: float = 262144.0
    W: float = 0.5
    M: float = 4.5
    A: float = 0.0
    scale: float = 1.0

    kind: ClassVar[str] = "hyperlog"
    _kernel_kind: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self._validate_twma()
        _check(self.W > 0, f"hyperlog: W is {self.W}; it must be > 0", "W")

    def to_flowkit(self):
        if self.scale != 1.0:
            raise TransformError("FlowKit's HyperlogTransform has no output scale; use scale=1")
        from flowkit import transforms as fkt

        return fkt.HyperlogTransform(param_t=self.T, param_w=self.W, param_m=self.M, param_a=self.A)


def _biexponential_params(kind: str, T: float, W: float, M: float, A: float) -> np.ndarray:
    """(a, b, c, d, f) of the explicit inverse (Moore & Parks 2012 / Gating-ML 2.0)."""
    w = W / (M + A)
    x2 = A / (M + A)
    x1 = x2 + w
    x0 = x2 + 2 * w
    b = (M + A) * LN10
    if kind == "logicle":
        if w == 0:
            d = b
        else:
            from scipy.optimize import brentq

            # root of 2 (ln d - ln b) + w (b + d) in (0, b]: the Logicle condition
            d = brentq(
                lambda d: 2 * (math.log(d) - math.log(b)) + w * (b + d), 1e-300, b, xtol=1e-300, rtol=1e-15
            )
        c_a = math.exp(x0 * (b + d))
        mf_a = math.exp(b * x1) - c_a / math.exp(d * x1)
        a = T / ((math.exp(b) - mf_a) - c_a / math.exp(d))
        return np.array([a, b, c_a * a, d, -mf_a * a])
    e0 = math.exp(b * x0)
    c_a = e0 / w
    f_a = math.exp(b * x1) + c_a * x1
    a = T / (math.exp(b) + c_a - f_a)
    return np.array([a, b, c_a * a, 0.0, f_a * a])


@functools.lru_cache(maxsize=48)
def _build_table(kind: str, T: float, W: float, M: float, A: float, scale: float):
    """Exact flowutils values at the kernel's bin edges: (table of value and slope per bin, x1,
    slope0, explicit-inverse params)."""
    from cytopipe import _transform_kernels as K

    xt = Logicle(T, W, M, A, scale) if kind == "logicle" else Hyperlog(T, W, M, A, scale)
    edges = _bin_edges()
    y_edges = xt._exact(edges)
    slope = np.diff(y_edges) / np.diff(edges)
    x1 = float(xt._exact(np.zeros(1))[0])
    slope0 = (y_edges[0] - x1) / edges[0]
    params = _biexponential_params(kind, T, W, M, A)
    tab = np.ascontiguousarray(np.stack([y_edges[:-1], slope], axis=-1))  # value, slope per bin
    for arr in (tab, params):
        arr.setflags(write=False)
    assert tab.shape[0] == K.N_BINS
    return tab, x1, slope0, params


@functools.lru_cache(maxsize=1)
def _bin_edges() -> np.ndarray:
    from cytopipe import _transform_kernels as K

    edges = K.bin_edges()
    edges.setflags(write=False)
    return edges


# ============================================================================================
# closed-form transforms
# ============================================================================================
@dataclass(frozen=True, repr=False)
class Arcsinh(Transform):
    """``arcsinh(x / cofactor)``: the usual cytometry arcsinh (cofactor ~150 for conventional
    flow, 5 for mass cytometry). Output is not scaled to [0, 1]."""

    cofactor: float = 150.0

    kind: ClassVar[str] = "arcsinh"

    def __post_init__(self) -> None:
        _finite("arcsinh", cofactor=self.cofactor)
        _check(
            self.cofactor > 0, f"arcsinh: cofactor is {self.cofactor}; it must be > 0, e.g. 150", "cofactor"
        )

    @classmethod
    def _forward_block(cls, block: np.ndarray, xforms: Sequence[Transform]) -> None:
        block *= _row([1.0 / t.cofactor for t in xforms])  # type: ignore[attr-defined]
        np.arcsinh(block, out=block)

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        return np.sinh(y) * self.cofactor

    def to_flowkit(self):
        # arcsinh(x/c) is Gating-ML fasinh with A=0 up to an affine rescaling; FlowKit has no
        # unscaled form, so there is no exact equivalent object.
        raise TransformError("arcsinh(x/cofactor) has no FlowKit equivalent; use FAsinh for Gating-ML export")


@dataclass(frozen=True, repr=False)
class FAsinh(Transform):
    """Gating-ML 2.0 ``fasinh`` (FlowKit AsinhTransform):
    ``(asinh(x * sinh(M ln10) / T) + A ln10) / ((M + A) ln10)``; T maps to 1."""

    T: float = 262144.0
    M: float = 4.5
    A: float = 0.0

    kind: ClassVar[str] = "fasinh"

    def __post_init__(self) -> None:
        _finite("fasinh", T=self.T, M=self.M, A=self.A)
        _check(self.T > 0, f"fasinh: T is {self.T}; it must be > 0", "T")
        _check(self.M > 0, f"fasinh: M is {self.M}; it must be > 0", "M")
        _check(0 <= self.A <= self.M, f"fasinh: A is {self.A}; it must be in [0, M]", "A")

    def _consts(self) -> tuple[float, float, float]:
        return math.sinh(self.M * LN10) / self.T, self.A * LN10, (self.M + self.A) * LN10

    @classmethod
    def _forward_block(cls, block: np.ndarray, xforms: Sequence[Transform]) -> None:
        consts = [t._consts() for t in xforms]  # type: ignore[attr-defined]
        block *= _row([c[0] for c in consts])
        np.arcsinh(block, out=block)
        block += _row([c[1] for c in consts])
        block *= _row([1.0 / c[2] for c in consts])

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        pre, shift, div = self._consts()
        return np.sinh(y * div - shift) / pre

    def to_flowkit(self):
        from flowkit import transforms as fkt

        return fkt.AsinhTransform(param_t=self.T, param_m=self.M, param_a=self.A)


@dataclass(frozen=True, repr=False)
class Linear(Transform):
    """Gating-ML 2.0 ``flin`` (FlowKit LinearTransform): ``(x + A) / (T + A)``, maps [-A, T] to
    [0, 1]. For scatter and time."""

    T: float = 262144.0
    A: float = 0.0

    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _finite("linear", T=self.T, A=self.A)
        _check(self.T > 0, f"linear: T is {self.T}; it must be > 0", "T")
        _check(self.T + self.A > 0, f"linear: T + A is {self.T + self.A}; it must be > 0", "A")

    @classmethod
    def _forward_block(cls, block: np.ndarray, xforms: Sequence[Transform]) -> None:
        block += _row([t.A for t in xforms])  # type: ignore[attr-defined]
        block *= _row([1.0 / (t.T + t.A) for t in xforms])  # type: ignore[attr-defined]

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        return y * (self.T + self.A) - self.A

    def to_flowkit(self):
        from flowkit import transforms as fkt

        return fkt.LinearTransform(param_t=self.T, param_a=self.A)


@dataclass(frozen=True, repr=False)
class Log(Transform):
    """Gating-ML 2.0 ``flog`` (FlowKit LogTransform): ``log10(x / T) / M + 1``. Values <= 0
    have no logarithm: 0 gives -inf and negatives NaN, exactly as flowutils."""

    T: float = 262144.0
    M: float = 4.5

    kind: ClassVar[str] = "log"

    def __post_init__(self) -> None:
        _finite("log", T=self.T, M=self.M)
        _check(self.T > 0, f"log: T is {self.T}; it must be > 0", "T")
        _check(self.M > 0, f"log: M is {self.M}; it must be > 0", "M")

    @classmethod
    def _forward_block(cls, block: np.ndarray, xforms: Sequence[Transform]) -> None:
        block *= _row([1.0 / t.T for t in xforms])  # type: ignore[attr-defined]
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log10(block, out=block)
        block *= _row([1.0 / t.M for t in xforms])  # type: ignore[attr-defined]
        block += np.float32(1.0)

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        return self.T * 10.0 ** ((y - 1.0) * self.M)

    def to_flowkit(self):
        from flowkit import transforms as fkt

        return fkt.LogTransform(param_t=self.T, param_m=self.M)


@dataclass(frozen=True, repr=False)
class Identity(Transform):
    """No change (a channel listed in a set but left linear)."""

    kind: ClassVar[str] = "identity"

    @classmethod
    def _forward_block(cls, block: np.ndarray, xforms: Sequence[Transform]) -> None:
        return None

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        return y


# --------------------------------------------------------------------------------------------
# FlowJo biexponential (lookup table, as FlowKit's WSPBiexTransform)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class Biex(Transform):
    """FlowJo 10 biexponential, exactly as FlowKit's ``WSPBiexTransform``.

    FlowJo builds a lookup table (``channel_range + 1`` points, channel 0..channel_range) and
    interpolates linearly in it; values outside the table are clamped to its ends. ``width`` is
    FlowJo's negative "width basis" (e.g. -10, -100), ``neg`` the extra negative decades, ``pos``
    the positive decades (4.41854), ``max`` the top data value. FlowJo workspaces write this with
    ``length="256"``; FlowKit (and this class) always use the 4096-channel table that FlowJo's own
    exported lookup tables show.
    """

    width: float = -10.0
    neg: float = 0.0
    pos: float = 4.41854
    max: float = 262144.000029
    channel_range: int = 4096

    kind: ClassVar[str] = "biex"

    def __post_init__(self) -> None:
        _finite("biex", width=self.width, neg=self.neg, pos=self.pos, max=self.max)
        _check(
            self.width <= -1, f"biex: width is {self.width}; FlowJo width basis is <= -1, e.g. -10", "width"
        )
        _check(self.neg >= 0, f"biex: neg is {self.neg}; it must be >= 0", "neg")
        _check(self.pos > 0, f"biex: pos is {self.pos}; it must be > 0", "pos")
        _check(self.max > 0, f"biex: max is {self.max}; it must be > 0", "max")
        _check(
            isinstance(self.channel_range, (int, np.integer)) and self.channel_range >= 16,
            f"biex: channel_range is {self.channel_range!r}; it must be an integer >= 16 (FlowJo: 4096)",
            "channel_range",
        )
        lut_x, _ = self.lut()
        _check(
            bool(np.all(np.diff(lut_x) > 0)),
            f"biex: width={self.width}, neg={self.neg}, pos={self.pos} give a non-monotone table",
            "width",
        )

    def lut(self) -> tuple[np.ndarray, np.ndarray]:
        """(data values, channel values) of the FlowJo lookup table."""
        return _biex_lut(self.channel_range, self.pos, self.neg, self.width, self.max)

    def _forward(self, v: np.ndarray) -> np.ndarray:
        x, ch = self.lut()
        return np.interp(v, x, ch, left=ch[0], right=ch[-1]).astype(np.float32)

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        x, ch = self.lut()
        return np.interp(y, ch, x, left=x[0], right=x[-1])

    def to_flowkit(self):
        from flowkit import transforms as fkt

        if self.channel_range != 4096:
            raise TransformError("FlowKit's WSPBiexTransform only supports channel_range=4096")
        return fkt.WSPBiexTransform(
            negative=self.neg, width=self.width, positive=self.pos, max_value=self.max
        )


def _biex_root(b: float, w: float) -> float:
    """Root d in (0, b) of 2 ln(d/b) + w (b + d) = 0 (the biex 'negative range')."""
    if w == 0:
        return b
    from scipy.optimize import brentq

    return brentq(lambda d: 2 * math.log(d / b) + w * (b + d), 1e-300, b, xtol=1e-300, rtol=1e-15)


@functools.lru_cache(maxsize=64)
def _biex_lut(channel_range: int, pos: float, neg: float, width: float, top: float):
    """FlowJo's biex table (the algorithm of cytolib's ``biexpTrans``, as FlowKit uses it)."""
    w_dec = math.log10(-width)
    decades = pos - w_dec / 2
    extra = max(neg, 0.0) + w_dec / 2
    zero = int(extra * channel_range / (extra + decades))
    zero = int(min(zero, channel_range / 2))
    if zero > 0:
        decades = extra * channel_range / zero
    w = w_dec / (2 * decades)
    pos_range = LN10 * decades
    minimum = top / math.exp(pos_range)
    neg_range = _biex_root(pos_range, w)
    n = channel_range + 1
    k = np.arange(n, dtype=np.float64)
    positive = np.exp(k / n * pos_range)
    negative = np.exp(k / n * -neg_range)
    negative *= math.exp((pos_range + neg_range) * (w + extra / decades))
    offset = positive[zero] - negative[zero]
    positive[zero:] = minimum * ((positive[zero:] - negative[zero:]) - offset)
    below = np.arange(zero)
    positive[below] = -positive[2 * zero - below]
    positive.setflags(write=False)
    k.setflags(write=False)
    return positive, k


# ============================================================================================
# registry, dicts, FlowKit conversion
# ============================================================================================
TRANSFORM_TYPES: dict[str, type[Transform]] = {
    cls.kind: cls for cls in (Logicle, Hyperlog, Arcsinh, FAsinh, Biex, Linear, Log, Identity)
}
_ALIASES = {"flin": "linear", "flog": "log", "none": "identity", "asinh_gml": "fasinh"}
_PARAM_ALIASES = {
    "t": "T",
    "w": "W",
    "m": "M",
    "a": "A",
    "param_t": "T",
    "param_w": "W",
    "param_m": "M",
    "param_a": "A",
}


def transform_from_dict(spec: Mapping[str, Any] | Transform, *, channel: str | None = None) -> Transform:
    """Build a transform from its dict, e.g. ``{"type": "logicle", "T": 262144, "W": 0.5}``.

    Missing parameters take the class defaults (listed in docs/transforms.md); unknown types or
    parameters and non-numeric values raise :class:`TransformError` naming the channel.
    """
    if isinstance(spec, Transform):
        return spec
    if not isinstance(spec, Mapping):
        raise TransformError(
            f"a transform must be a mapping with a 'type' key, got {spec!r}", channel=channel
        )
    kind = str(spec.get("type", "")).strip().lower()
    kind = _ALIASES.get(kind, kind)
    if kind not in TRANSFORM_TYPES:
        raise TransformError(
            f"unknown transform type {spec.get('type')!r}; known types: {', '.join(sorted(TRANSFORM_TYPES))}",
            channel=channel,
            key="type",
        )
    cls = TRANSFORM_TYPES[kind]
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "type":
            continue
        name = key if key in names else _PARAM_ALIASES.get(str(key).lower(), str(key))
        if name not in names:
            raise TransformError(
                f"{kind} has no parameter {key!r}; its parameters are {sorted(names)}",
                channel=channel,
                key=key,
            )
        try:
            kwargs[name] = int(value) if name == "channel_range" else float(value)
        except (TypeError, ValueError):
            raise TransformError(
                f"{kind}: parameter {key} is {value!r}, not a number", channel=channel, key=key
            ) from None
    try:
        return cls(**kwargs)
    except TransformError as exc:
        raise TransformError(
            exc.message, channel=channel, **{k: v for k, v in exc.context.items() if k != "channel"}
        ) from None


def from_flowkit(xform: Any) -> Transform:
    """Convert a FlowKit transform object (e.g. from a Gating-ML document) to a cytopipe one."""
    name = type(xform).__name__
    if name == "LogicleTransform":
        return Logicle(T=xform.param_t, W=xform.param_w, M=xform.param_m, A=xform.param_a)
    if name == "HyperlogTransform":
        return Hyperlog(T=xform.param_t, W=xform.param_w, M=xform.param_m, A=xform.param_a)
    if name == "AsinhTransform":
        return FAsinh(T=xform.param_t, M=xform.param_m, A=xform.param_a)
    if name == "LinearTransform":
        return Linear(T=xform.param_t, A=xform.param_a)
    if name == "LogTransform":
        return Log(T=xform.param_t, M=xform.param_m)
    if name == "WSPBiexTransform":
        return Biex(width=xform.width, neg=xform.negative, pos=xform.positive, max=xform.max_value)
    raise TransformError(f"FlowKit transform {name} has no cytopipe equivalent")


def _stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ============================================================================================
# applying several transforms to the columns of an event matrix
# ============================================================================================
def _as_float32(values: Any, inplace: bool, what: str) -> np.ndarray:
    if inplace:
        if not isinstance(values, np.ndarray) or values.dtype != np.float32:
            raise TransformError(
                f"{what} in place needs a float32 numpy array, got "
                f"{getattr(values, 'dtype', type(values).__name__)}; pass inplace=False to get a copy"
            )
        if not values.flags.writeable:
            raise TransformError(f"{what} in place: the array is read-only; pass inplace=False")
        return values
    return np.array(values, dtype=np.float32, copy=True, order="C")


class _TablePlan:
    """Stacked tables of the logicle/hyperlog columns of one (columns, transforms) layout."""

    def __init__(self, transforms: Sequence[_TableTransform]) -> None:
        tables = [t._table() for t in transforms]
        if len(tables) > 1 and all(t[0] is tables[0][0] for t in tables):
            self.tab = np.broadcast_to(tables[0][0], (len(tables), *tables[0][0].shape))  # no copies
        else:
            self.tab = np.stack([t[0] for t in tables])
        self.x1 = np.array([t[1] for t in tables])
        self.slope0 = np.array([t[2] for t in tables])
        self.params = np.stack([t[3] for t in tables])
        self.kinds = np.array([t._kernel_kind for t in transforms], dtype=np.int64)
        self.scales = np.array([t.scale for t in transforms], dtype=np.float64)

    def run(self, events: np.ndarray, cols: Sequence[int]) -> None:
        from cytopipe import _transform_kernels as K

        K.table_transform(
            events,
            events,
            np.asarray(cols, dtype=np.int64),
            self.tab,
            _bin_edges(),
            self.x1,
            self.slope0,
            self.kinds,
            self.params,
            self.scales,
        )


def _apply_columns(
    events: np.ndarray, cols: Sequence[int], transforms: Sequence[Transform], plan: _TablePlan | None = None
) -> None:
    """Transform ``events[:, cols[i]]`` with ``transforms[i]`` in place (events: 2-D float32)."""
    table_cols = [c for c, t in zip(cols, transforms) if isinstance(t, _TableTransform)]
    if table_cols:
        if plan is None:
            plan = _TablePlan([t for t in transforms if isinstance(t, _TableTransform)])  # type: ignore[misc]
        plan.run(events, table_cols)
    groups: dict[type, tuple[list[int], list[Transform]]] = {}
    for c, t in zip(cols, transforms):
        if not isinstance(t, (_TableTransform, Identity)):
            groups.setdefault(type(t), ([], []))
            groups[type(t)][0].append(c)
            groups[type(t)][1].append(t)
    if not groups:
        return
    # columns of one kind are transformed together (one vectorised pass per kind), in row blocks
    # that keep the touched part of a C-ordered matrix in cache
    plans = []
    for cls, (gcols, xs) in groups.items():
        span = gcols[0], gcols[-1] + 1
        contiguous = list(gcols) == list(range(*span))
        plans.append((cls, slice(*span) if contiguous else np.asarray(gcols), contiguous, xs))
    for r0 in range(0, events.shape[0], _ROW_BLOCK):
        block = events[r0 : r0 + _ROW_BLOCK]
        for cls, where, _, xs in plans:
            # a contiguous copy: ufuncs on a strided (rows x 16) view run 2x slower
            tmp = np.ascontiguousarray(block[:, where])
            cls._forward_block(tmp, xs)
            block[:, where] = tmp


def _row(values: Sequence[float]) -> np.ndarray:
    """Per-column parameters as a float32 row that broadcasts over a block."""
    return np.asarray(values, dtype=np.float32)[None, :]


# ============================================================================================
# per-channel sets
# ============================================================================================
class TransformSet(Mapping[str, Transform]):
    """Transforms by channel: keys are ``$PnN`` names or marker names (``$PnS``).

    ``locked`` marks a study-wide set estimated once (:func:`estimate_transforms`) that must not
    be re-estimated; ``info`` records how it was made. Both travel in :meth:`to_dict`; the
    :attr:`hash` covers only the transforms.
    """

    def __init__(
        self,
        transforms: Mapping[str, Transform | Mapping[str, Any]],
        *,
        locked: bool = False,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(transforms, Mapping):
            raise TransformError(
                f"a transform set must be a mapping channel -> transform, got {type(transforms).__name__}"
            )
        self._transforms: dict[str, Transform] = {}
        for name, spec in transforms.items():
            key = str(name).strip()
            if not key:
                raise TransformError("a transform set has an empty channel name")
            self._transforms[key] = transform_from_dict(spec, channel=key)
        self.locked = bool(locked)
        self.info = dict(info or {})
        self._plans: dict[tuple, tuple[list[int], _TablePlan | None]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_plans"] = {}  # cached tables are rebuilt on demand, not shipped to workers
        return state

    # --- Mapping --------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Transform:
        return self._transforms[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._transforms)

    def __len__(self) -> int:
        return len(self._transforms)

    def __repr__(self) -> str:
        lock = ", locked" if self.locked else ""
        return f"TransformSet({len(self)} channels{lock}: {', '.join(self._transforms)})"

    # --- resolution and application -------------------------------------------------------
    def resolve(
        self, channel_names: Sequence[str], markers: Sequence[str] | None = None, *, missing: str = "error"
    ) -> dict[str, int]:
        """Column index of every key: exact ``$PnN`` first, then marker (case-insensitive)."""
        names = list(channel_names)
        by_pnn = {n: i for i, n in enumerate(names)}
        by_marker: dict[str, list[int]] = {}
        for i, m in enumerate(markers or []):
            if m and str(m).strip():
                by_marker.setdefault(str(m).strip().lower(), []).append(i)
        out: dict[str, int] = {}
        taken: dict[int, str] = {}
        for key in self._transforms:
            if key in by_pnn:
                idx = by_pnn[key]
            elif len(by_marker.get(key.lower(), [])) == 1:
                idx = by_marker[key.lower()][0]
            elif len(by_marker.get(key.lower(), [])) > 1:
                raise TransformError(
                    f"marker {key!r} is on several channels "
                    f"({[names[i] for i in by_marker[key.lower()]]}); name the $PnN channel instead",
                    channel=key,
                )
            elif missing == "ignore":
                continue
            else:
                raise TransformError(
                    f"no channel or marker named {key!r}; channels are {names}"
                    + (f", markers {[m for m in markers if m]}" if markers else ""),
                    channel=key,
                )
            if idx in taken:
                raise TransformError(
                    f"{key!r} and {taken[idx]!r} both name channel {names[idx]!r}; keep one", channel=key
                )
            taken[idx] = key
            out[key] = idx
        return out

    def apply(
        self,
        events: np.ndarray,
        channel_names: Sequence[str],
        *,
        markers: Sequence[str] | None = None,
        inplace: bool = True,
        missing: str = "error",
    ) -> np.ndarray:
        """Transform the named columns of ``events`` (events x channels); others are untouched.

        In place by default (``events`` must then be float32); ``missing="ignore"`` skips keys
        that name no channel of this file instead of raising.
        """
        arr = _as_float32(events, inplace, what="TransformSet.apply")
        if arr.ndim != 2 or arr.shape[1] != len(channel_names):
            raise TransformError(
                f"events have shape {arr.shape} but {len(channel_names)} channel names were given"
            )
        cols = self.resolve(channel_names, markers, missing=missing)
        if not cols:
            return arr
        keys = list(cols)
        layout = tuple((cols[k], k) for k in keys)
        if layout not in self._plans:
            table = [self._transforms[k] for k in keys if isinstance(self._transforms[k], _TableTransform)]
            self._plans[layout] = ([cols[k] for k in keys], _TablePlan(table) if table else None)  # type: ignore[arg-type]
        col_list, plan = self._plans[layout]
        _apply_columns(arr, col_list, [self._transforms[k] for k in keys], plan)
        return arr

    def inverse(
        self,
        events: np.ndarray,
        channel_names: Sequence[str],
        *,
        markers: Sequence[str] | None = None,
        inplace: bool = False,
        missing: str = "error",
    ) -> np.ndarray:
        """Undo :meth:`apply` on the named columns."""
        arr = _as_float32(events, inplace, what="TransformSet.inverse")
        for key, idx in self.resolve(channel_names, markers, missing=missing).items():
            arr[:, idx] = self._transforms[key]._inverse(arr[:, idx].astype(np.float64))
        return arr

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"transforms": {channel: {...}}, "locked": bool, "info": {...}, "hash": str}``."""
        return {
            "transforms": {k: t.to_dict() for k, t in self._transforms.items()},
            "locked": self.locked,
            "info": dict(self.info),
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformSet:
        """Inverse of :meth:`to_dict`; also accepts a plain ``{channel: {...}}`` mapping."""
        if not isinstance(data, Mapping):
            raise TransformError(f"a transform set must be a mapping, got {type(data).__name__}")
        if "transforms" in data and isinstance(data["transforms"], Mapping):
            tset = cls(
                data["transforms"], locked=bool(data.get("locked", False)), info=data.get("info") or {}
            )
            recorded = data.get("hash")
            if recorded and recorded != tset.hash:
                raise TransformError(
                    f"transform set hash {recorded[:12]}... does not match its transforms "
                    f"({tset.hash[:12]}...): the record was edited; re-estimate or fix it",
                    key="hash",
                )
            return tset
        return cls(data)

    @property
    def hash(self) -> str:
        """Stable sha256 (hex) of the channel -> transform mapping (order-independent)."""
        return _stable_hash({k: t.to_dict() for k, t in self._transforms.items()})

    def save(self, path: str | Path) -> Path:
        """Write the dict form as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        from cytopipe.files import atomic_write_bytes

        path = Path(path)
        data = self.to_dict()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2)
        return atomic_write_bytes(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> TransformSet:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise TransformError(f"cannot read transform set: {exc.strerror}", file=path) from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml/json syntax errors
            raise TransformError(f"cannot parse transform set: {exc}", file=path) from None
        try:
            return cls.from_dict(data)
        except TransformError as exc:
            raise TransformError(exc.message, file=path, **exc.context) from None


# ============================================================================================
# estimation (once per study, then locked)
# ============================================================================================
def estimate_logicle(
    pooled_values: np.ndarray, T: float = 262144.0, M: float = 4.5, A: float = 0.0, q: float = 0.05
) -> Logicle:
    """Logicle with W estimated from data (Parks et al. 2006; flowCore ``estimateLogicle``).

    ``r`` is the ``q`` quantile of the negative values and ``W = (M - log10(T / |r|)) / 2``,
    clipped to ``[0, (M - A) / 2]`` (W = 0 when there are no negative values).
    """
    _check(0 < q < 1, f"estimate_logicle: q is {q}; it must be in (0, 1)", "q")
    v = np.asarray(pooled_values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    neg = v[v < 0]
    if neg.size == 0:
        W = 0.0
    else:
        r = float(np.quantile(neg, q))
        W = (M - math.log10(T / abs(r))) / 2 if r != 0 else 0.0
    W = float(min(max(W, 0.0), (M - A) / 2))
    return Logicle(T=float(T), W=W, M=float(M), A=float(A))


def estimate_transforms(
    samples_or_events: Sequence[Any],
    channels: Sequence[str],
    method: str = "logicle",
    *,
    channel_names: Sequence[str] | None = None,
    T: float | str = 262144.0,
    M: float = 4.5,
    A: float = 0.0,
    q: float = 0.05,
    cofactor: float = 150.0,
    max_events_per_sample: int = 50_000,
    seed: int = 0,
) -> TransformSet:
    """Estimate one transform per channel from data pooled across samples, and lock it.

    ``samples_or_events``: compensated :class:`~cytopipe.fcs.Sample` objects, or event arrays
    (then ``channel_names`` gives their columns). ``channels``: ``$PnN`` or marker names. Each
    sample contributes the same number of events at most (a seeded random subsample), so large
    files do not dominate. ``method="logicle"`` estimates W per channel (:func:`estimate_logicle`;
    ``T="pnr"`` takes T from the largest ``$PnR``); ``method="arcsinh"`` uses ``cofactor``.
    """
    if method not in ("logicle", "arcsinh"):
        raise TransformError(
            f"unknown estimation method {method!r}; use 'logicle' or 'arcsinh'", key="method"
        )
    if len(samples_or_events) == 0:
        raise TransformError("estimate_transforms needs at least one sample")
    if max_events_per_sample < 1:
        raise TransformError(f"max_events_per_sample is {max_events_per_sample}; it must be >= 1")
    pooled: dict[str, list[np.ndarray]] = {c: [] for c in channels}
    pnr: dict[str, float] = {c: 0.0 for c in channels}
    n_events = 0
    for i, item in enumerate(samples_or_events):
        events, names, markers, ranges, label = _unpack(item, channel_names, i)
        idx = TransformSet({c: Identity() for c in channels}).resolve(names, markers)
        n = events.shape[0]
        rng = np.random.default_rng([seed, i])
        rows = (
            np.sort(rng.choice(n, size=max_events_per_sample, replace=False))
            if n > max_events_per_sample
            else slice(None)
        )
        sub = events[rows]
        n_events += sub.shape[0]
        for c, j in idx.items():
            pooled[c].append(np.asarray(sub[:, j], dtype=np.float64))
            if ranges is not None:
                pnr[c] = max(pnr[c], float(ranges[j]))
    out: dict[str, Transform] = {}
    for c in channels:
        if method == "arcsinh":
            out[c] = Arcsinh(cofactor)
            continue
        top = T
        if isinstance(T, str):
            if T != "pnr" or pnr[c] <= 0:
                raise TransformError(f"T={T!r}: use a number or 'pnr' with samples that have $PnR", channel=c)
            top = pnr[c]
        out[c] = estimate_logicle(np.concatenate(pooled[c]), T=float(top), M=M, A=A, q=q)
    info = {
        "method": method,
        "n_samples": len(samples_or_events),
        "n_events": int(n_events),
        "max_events_per_sample": int(max_events_per_sample),
        "seed": int(seed),
        "q": q,
    }
    return TransformSet(out, locked=True, info=info)


def _unpack(item: Any, channel_names: Sequence[str] | None, i: int):
    if hasattr(item, "events") and hasattr(item, "channels"):
        ch = item.channels
        return item.events, list(ch["pnn"]), list(ch["pns"]), ch["pnr"].to_numpy(dtype=float), item.path
    events = np.asarray(item)
    if channel_names is None:
        raise TransformError("event arrays need channel_names (their column names)")
    if events.ndim != 2 or events.shape[1] != len(channel_names):
        raise TransformError(
            f"sample {i}: events of shape {events.shape} do not match {len(channel_names)} channel names"
        )
    return events, list(channel_names), None, None, None


def transform_sample(sample: Any, tset: TransformSet, *, inplace: bool = False, missing: str = "error"):
    """Apply a :class:`TransformSet` to a Sample; returns the Sample (a copy unless ``inplace``)."""
    import dataclasses

    events = tset.apply(
        sample.events,
        list(sample.channels["pnn"]),
        markers=list(sample.channels["pns"]),
        inplace=inplace,
        missing=missing,
    )
    return sample if inplace else dataclasses.replace(sample, events=events)
