"""Adapters to the layers below gating: the single place where gating calls the modules it
builds on but does not own (it was ``_compat.py``, though it never was a compatibility shim).

* markers -> channels: :func:`cytopipe.panel.resolve_markers`;
* transforms: :mod:`cytopipe.transforms` for float32 data (the normal case); float64 data (e.g.
  Gating-ML reference arrays) is transformed with the flowutils/FlowKit formulas in float64 so
  results agree exactly with those references;
* compensation: :class:`cytopipe.compensation.Compensation` validates and inverts the matrix;
  the product is done here in the channel-major layout the engine reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cytopipe.errors import TransformError
from cytopipe.threads import one_thread

SCATTER_TIME = re.compile(r"^\s*(FSC|SSC|TIME)([-_ ]?[AHW])?\s*$", re.IGNORECASE)


def is_scatter_or_time(name: str) -> bool:
    """True for scatter and time channel names (``FSC-A``, ``SSC-H``, ``Time``): channels the
    template's ``default`` transform leaves linear. Public as ``cytopipe.gating.is_scatter_or_time``."""
    return bool(SCATTER_TIME.match(name))


# --------------------------------------------------------------------------------------------
# marker -> channel
# --------------------------------------------------------------------------------------------
def resolve_markers(
    channels: pd.DataFrame,
    markers: Sequence[str],
    mapping: Mapping[str, str] | None = None,
    file=None,
) -> dict[str, str]:
    """``{marker: $PnN}`` through :func:`cytopipe.panel.resolve_markers` (aliases such as
    CD279 = PD-1, explicit per-panel mapping first); a PanelError names what is missing."""
    from cytopipe.panel import resolve_markers as panel_resolve

    return panel_resolve(channels, list(markers), mapping=dict(mapping or {}) or None, file=file)


# --------------------------------------------------------------------------------------------
# transforms: spec dict -> values
# --------------------------------------------------------------------------------------------
# Template transforms use cytopipe.transforms' vocabulary (logicle, hyperlog, fasinh, arcsinh,
# biex, linear = Gating-ML flin, log = flog, identity), plus FlowJo's log for workspace import.
FLOWJO_LOG = "flowjo_log"


def check_transform(spec: Mapping, where: dict | None = None) -> dict:
    """Validate a transform spec (``{type: arcsinh, cofactor: 150}``, a ``cytopipe.transforms``
    dict, or FlowJo's ``flowjo_log``); returns its normalised dict. ``where`` is error context
    (e.g. ``{"marker": "CD25", "key": "transforms"}``). Raises TransformError. Public as
    ``cytopipe.gating.check_transform``."""
    where = dict(where or {})
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise TransformError("a transform needs a `type` (e.g. {type: arcsinh, cofactor: 150})", **where)
    if str(spec["type"]).strip().lower() == FLOWJO_LOG:
        extra = sorted(set(spec) - {"type", "offset", "decades"})
        if extra or not all(_positive(spec.get(k)) for k in ("offset", "decades")):
            raise TransformError("flowjo_log takes positive `offset` and `decades` only", **where)
        return {"type": FLOWJO_LOG, "offset": float(spec["offset"]), "decades": float(spec["decades"])}
    from cytopipe.transforms import transform_from_dict

    try:
        return transform_from_dict(dict(spec), channel=where.get("marker")).to_dict()
    except TransformError as exc:
        context = {**exc.context, **where}
        if "key" in exc.context:
            context["key"] = f"{where.get('key', 'transforms')}.{exc.context['key']}"
        raise TransformError(exc.message, **context) from None


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


_TRANSFORMS: dict[tuple, object] = {}


def _transform_object(spec: Mapping):
    """The cytopipe.transforms object for a spec (cached: tables are built once)."""
    key = tuple(sorted(spec.items()))
    if key not in _TRANSFORMS:
        from cytopipe.transforms import transform_from_dict

        _TRANSFORMS[key] = transform_from_dict(dict(spec))
    return _TRANSFORMS[key]


def apply_transform(spec: Mapping | None, x: np.ndarray) -> np.ndarray:
    """Transform a 1-D array with a spec from :func:`check_transform` (None = linear), exactly as
    the gating engine does. Public as ``cytopipe.gating.apply_transform``.

    Float32 values (the normal case) go through :mod:`cytopipe.transforms` (float32 out, within
    one float32 ulp of flowutils/FlowKit). Float64 values are transformed in float64 with the
    flowutils/FlowKit formulas themselves, for exact agreement with Gating-ML reference results.
    """
    if spec is None or spec["type"] == "identity":
        return x
    kind = spec["type"]
    if kind == FLOWJO_LOG:
        from flowkit import transforms as fkt

        y = fkt.WSPLogTransform(offset=spec["offset"], decades=spec["decades"]).apply(
            np.asarray(x, np.float64)
        )
        return y.astype(np.float32) if x.dtype == np.float32 else y
    if x.dtype == np.float32:
        return _transform_object(spec).apply(x)
    x = np.asarray(x, dtype=np.float64)
    if kind == "arcsinh":
        return np.arcsinh(x / spec["cofactor"])
    if kind == "linear":
        return (x + spec["A"]) / (spec["T"] + spec["A"])
    if kind == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            return (1.0 / spec["M"]) * np.log10(x / spec["T"]) + 1.0
    if kind == "fasinh":
        t, m, a = spec["T"], spec["M"], spec["A"]
        return (np.arcsinh(x * (np.sinh(m * np.log(10)) / t)) + a * np.log(10)) / ((m + a) * np.log(10))
    if kind in ("logicle", "hyperlog"):
        from flowutils import transforms as fut

        fn = fut.logicle if kind == "logicle" else fut.hyperlog
        y = fn(x, None, t=spec["T"], m=spec["M"], w=spec["W"], a=spec["A"])
        scale = spec.get("scale", 1.0)
        return y * scale if scale != 1.0 else y
    # biex and anything else: the cytopipe.transforms object, in float64 via FlowKit where exact
    return _transform_object(spec).to_flowkit().apply(x)


# --------------------------------------------------------------------------------------------
# compensation
# --------------------------------------------------------------------------------------------
def compensate_block(events: np.ndarray, cols: Sequence[int], comp) -> np.ndarray:
    """Compensated detector channels, channel-major: row ``j`` is detector ``cols[j]``.

    ``comp`` is a :class:`cytopipe.compensation.Compensation` over those detectors. Float64
    events are solved as flowutils does (``solve(S.T, X.T)``), for exact Gating-ML agreement.
    Float32 events are multiplied by the float32 inverse (as ``Compensation.apply``) in one BLAS
    call over the whole event matrix: a zero-padded p x k matrix avoids copying the detector
    columns out first, and the rows of the result are contiguous, which the transforms, gates and
    medians downstream read fastest.
    """
    # One BLAS thread: for this thin product threads only contend (see cytopipe.threads).
    with one_thread():
        if events.dtype == np.float64:
            return np.linalg.solve(np.asarray(comp.matrix).T, events[:, list(cols)].T)
        padded = np.zeros((events.shape[1], len(cols)), dtype=events.dtype)
        padded[list(cols)] = np.asarray(comp.inverse, dtype=events.dtype)
        return padded.T @ events.T
