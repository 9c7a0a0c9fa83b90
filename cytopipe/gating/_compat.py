"""Bridges to the parts of cytopipe that gating uses but does not own.

Marker resolution belongs to :mod:`cytopipe.panel`, transforms to :mod:`cytopipe.transforms`
and compensation to :mod:`cytopipe.compensation`. This module is the single place where
gating calls them, so that gating keeps working while those modules land, with the same
semantics (Gating-ML 2.0 / flowutils formulas).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cytopipe.errors import PanelError, TransformError

SCATTER_TIME = re.compile(r"^\s*(FSC|SSC|TIME)([-_ ]?[AHW])?\s*$", re.IGNORECASE)


def is_scatter_or_time(name: str) -> bool:
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
    """``{marker: $PnN}`` via :func:`cytopipe.panel.resolve_markers` when available.

    The fallback (until the panel module is on main) matches an explicit mapping, then
    ``$PnN`` exactly, then ``$PnS`` case-insensitively; anything else is a PanelError.
    """
    try:
        from cytopipe.panel import resolve_markers as panel_resolve
    except ImportError:
        panel_resolve = None
    if panel_resolve is not None:
        return panel_resolve(channels, list(markers), mapping=dict(mapping or {}) or None, file=file)

    pnn = [str(v) for v in channels["pnn"]]
    pns = [str(v) for v in channels["pns"]]
    out: dict[str, str] = {}
    for marker in markers:
        if mapping and marker in mapping:
            if mapping[marker] not in pnn:
                raise PanelError(
                    f"the panel maps it to channel {mapping[marker]!r}, which the file does not have; "
                    f"channels are {pnn}",
                    file=file,
                    marker=marker,
                )
            out[marker] = mapping[marker]
            continue
        if marker in pnn:
            out[marker] = marker
            continue
        hits = [n for n, s in zip(pnn, pns) if s.strip().lower() == marker.strip().lower()]
        if len(hits) != 1:
            seen = ", ".join(f"{n} [{s}]" if s else n for n, s in zip(pnn, pns))
            what = "no channel carries it" if not hits else f"several channels carry it ({hits})"
            raise PanelError(
                f"{what}; channels are {seen}. Add it to the template's `panel:` mapping",
                file=file,
                marker=marker,
            )
        out[marker] = hits[0]
    return out


# --------------------------------------------------------------------------------------------
# transforms: spec dict -> values
# --------------------------------------------------------------------------------------------
# type -> (required parameters, optional parameters with defaults)
TRANSFORM_PARAMS: dict[str, tuple[tuple[str, ...], dict[str, float]]] = {
    "linear": ((), {}),
    "flin": (("T", "A"), {}),
    "flog": (("T", "M"), {}),
    "fasinh": (("T", "M", "A"), {}),
    "arcsinh": (("cofactor",), {}),
    "logicle": (("T", "W", "M", "A"), {}),
    "hyperlog": (("T", "W", "M", "A"), {}),
}
COMMON_OPTIONAL = {"scale": 1.0}


def check_transform(spec: Mapping, where: dict) -> dict:
    """Validate a transform spec; returns a normalised copy. Raises TransformError."""
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise TransformError("a transform needs a `type` (e.g. {type: arcsinh, cofactor: 150})", **where)
    ttype = str(spec["type"]).lower()
    if ttype not in TRANSFORM_PARAMS:
        raise TransformError(
            f"unknown transform type {spec['type']!r}; use one of {sorted(TRANSFORM_PARAMS)}", **where
        )
    required, optional = TRANSFORM_PARAMS[ttype]
    allowed = set(required) | set(optional) | set(COMMON_OPTIONAL) | {"type"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise TransformError(
            f"unknown parameter(s) {extra} for a {ttype} transform; allowed: {sorted(allowed - {'type'})}",
            **where,
        )
    out: dict = {"type": ttype}
    for name in required:
        if name not in spec:
            raise TransformError(f"a {ttype} transform needs parameter {name!r}", **where)
    for name in [*required, *optional, *COMMON_OPTIONAL]:
        if name in spec:
            value = spec[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TransformError(f"parameter {name!r} must be a finite number, got {value!r}", **where)
            out[name] = float(value)
    if ttype == "arcsinh" and out["cofactor"] <= 0:
        raise TransformError("arcsinh cofactor must be > 0", **where)
    if ttype in ("flog", "fasinh", "logicle", "hyperlog") and out["T"] <= 0:
        raise TransformError(f"{ttype} T must be > 0", **where)
    if ttype == "flog" and out["M"] <= 0:
        raise TransformError("flog M must be > 0", **where)
    return out


def apply_transform(spec: Mapping | None, x: np.ndarray) -> np.ndarray:
    """Transform a 1-D array. Float32 input stays float32 for the cheap transforms; the
    root-finding ones (logicle, hyperlog) run in float64 as flowutils does."""
    if spec is None:
        return x
    ttype = spec["type"]
    scale = spec.get("scale", 1.0)
    if ttype == "linear":
        y = x
    elif ttype == "arcsinh":
        dt = x.dtype
        y = np.arcsinh(x * dt.type(1.0 / spec["cofactor"]))
    elif ttype == "flin":
        y = (x + spec["A"]) / (spec["T"] + spec["A"])
    elif ttype == "flog":
        with np.errstate(divide="ignore", invalid="ignore"):
            y = (1.0 / spec["M"]) * np.log10(x / spec["T"]) + 1.0
    elif ttype == "fasinh":
        t, m, a = spec["T"], spec["M"], spec["A"]
        pre = np.sinh(m * np.log(10)) / t
        y = (np.arcsinh(x * pre) + a * np.log(10)) / ((m + a) * np.log(10))
    elif ttype in ("logicle", "hyperlog"):
        from flowutils import transforms as fut

        fn = fut.logicle if ttype == "logicle" else fut.hyperlog
        y = fn(np.asarray(x, dtype=np.float64), None, t=spec["T"], m=spec["M"], w=spec["W"], a=spec["A"])
        if x.dtype == np.float32:
            y = y.astype(np.float32)
    else:  # pragma: no cover - specs are validated on load
        raise TransformError(f"unknown transform type {ttype!r}")
    if scale != 1.0:
        y = y * (y.dtype.type(scale) if hasattr(y, "dtype") else scale)
    return y


# --------------------------------------------------------------------------------------------
# compensation
# --------------------------------------------------------------------------------------------
def compensate_block(events: np.ndarray, cols: Sequence[int], spill: np.ndarray) -> np.ndarray:
    """Compensated detector channels, channel-major: row ``j`` is detector ``cols[j]``.

    ``spill`` is the k x k spillover matrix (rows = sources, columns = detectors ``cols``).
    Float64 events are solved as flowutils does (``solve(S.T, X.T)``). Float32 events are
    multiplied by the inverse in one BLAS call over the whole event matrix (a zero-padded
    p x k matrix avoids copying the detector columns out first); the result rows are
    contiguous, which the transforms, gates and medians downstream read fastest.
    """
    spill = np.asarray(spill, dtype=np.float64)
    # One BLAS thread: for this thin product threads only contend (measured 3-10x slower
    # with 2 threads on a busy 2-core machine).
    with single_thread():
        if events.dtype == np.float64:
            return np.linalg.solve(spill.T, events[:, list(cols)].T)
        padded = np.zeros((events.shape[1], len(cols)), dtype=events.dtype)
        padded[list(cols)] = np.linalg.inv(spill)
        return padded.T @ events.T


_CONTROLLER: tuple[int, object] | None = None


def single_thread():
    """Limit BLAS/OpenMP pools to one thread for the enclosed block (no-op without threadpoolctl).

    The controller is cached (building one scans the loaded libraries, ~10 ms) and rebuilt
    when new modules were imported since, e.g. scipy/sklearn bringing their own BLAS/OpenMP.
    """
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    import sys

    if _CONTROLLER is None or _CONTROLLER[0] != len(sys.modules):
        _CONTROLLER = (len(sys.modules), ThreadpoolController())
    return _CONTROLLER[1].limit(limits=1)
