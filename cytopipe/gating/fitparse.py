"""Parsing data-driven gates: a template's gate mapping (a :class:`~cytopipe.gating.spec.GateSpec`)
becomes a gate with its fitters.

The fitters themselves are in :mod:`~cytopipe.gating.fitters` (absolute thresholds, ratios,
mixtures) and :mod:`~cytopipe.gating.landmarks` (landmark-relative thresholds, references,
diagonals, lymphocytes); the parser picks between them, so it sits above both and neither imports
it. Called from :mod:`cytopipe.gating.template` (``GATE_TYPES``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cytopipe.gating import landmarks as _lm
from cytopipe.gating.fitters import (
    Bounds,
    DensestClusterFitter,
    EllipseFitGate,
    Fitter,
    MixtureFitter,
    PeakEdgeFitter,
    QuantileFitter,
    SingletFitter,
    SingletGate,
    ThresholdGate,
    ValleyFitter,
    chi2_quantile,
)
from cytopipe.gating.gates import Dim, Gate
from cytopipe.gating.landmarks import DiagonalFitter, DiagonalGate, LymphocyteFitter
from cytopipe.gating.spec import POOL_LEVELS, GateSpec, parse_signs

THRESHOLD_METHODS = ("valley", "tail", "quantile", "hi", "lo", "auto", "shoulder", "reference")
RELATIVE_OPTIONS = {  # landmark-relative thresholds (cytopipe.gating.landmarks): key -> (lo, hi)
    "min_peak": (0, 1),
    "max_depth": (0, 1),
    "ratio": (1, 100),
    "min_offset": (0, 10),
    "fallback_z": (0, 20),
    "min_separation": (0, 100),
}


def parse_bounds(spec, key: str = "bounds", kind: str = "threshold", n_dims: int = 1) -> Bounds:
    raw = spec.raw(key, required=False, default={}) or {}
    if not isinstance(raw, Mapping):
        raise spec.error(key, "`bounds` must be a mapping (range, min_events, max_shift, fraction)")
    allowed = {"min_events", "max_shift", "fraction"}
    allowed |= {"center"} if kind == "region" else {"range"} if kind in ("threshold", "ratio") else set()
    extra = sorted(set(raw) - allowed)
    if extra:
        raise spec.error(f"{key}.{extra[0]}", f"unknown bound(s) {extra}; allowed: {sorted(allowed)}")
    b = Bounds()
    if "range" in raw:
        b.range = tuple(_pair(spec, f"{key}.range", raw["range"]))
    if "center" in raw:
        c = raw["center"]
        if not isinstance(c, Sequence) or len(c) != n_dims:
            raise spec.error(f"{key}.center", f"needs one [lo, hi] pair per marker ({n_dims})")
        b.center = [tuple(_pair(spec, f"{key}.center", p)) for p in c]
    if "min_events" in raw:
        v = raw["min_events"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise spec.error(f"{key}.min_events", f"must be a positive integer, got {v!r}")
        b.min_events = v
    if "max_shift" in raw and raw["max_shift"] is not None:
        b.max_shift = spec.check_number(f"{key}.max_shift", raw["max_shift"], positive=True)
    if "fraction" in raw:
        lo, hi = _pair(spec, f"{key}.fraction", raw["fraction"])
        lo = 0.0 if lo is None else lo
        hi = 1.0 if hi is None else hi
        if not 0 <= lo < hi <= 1:
            raise spec.error(f"{key}.fraction", "must be [lo, hi] with 0 <= lo < hi <= 1")
        b.fraction = (lo, hi)
    return b


def parse_fraction(spec):
    return parse_bounds(spec, kind="quadrant").fraction


def _pair(spec, key, value):
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise spec.error(key, f"must be [lo, hi] (null for open), got {value!r}")
    out = [None if v is None else spec.check_number(key, v) for v in value]
    if out[0] is not None and out[1] is not None and out[0] >= out[1]:
        raise spec.error(key, f"lo must be smaller than hi, got {value!r}")
    return out


def _pool(spec) -> str:
    return spec.choice("pool", POOL_LEVELS, default="cohort")


def _threshold_fitter(method: str, spec, dim: Dim, with_side: bool):
    opts: dict = {}
    relative = (
        method in ("auto", "shoulder")
        or (method == "valley" and not spec.has("search"))
        or (method == "tail" and spec.has("percentile"))
    )
    if relative:
        for key, (lo, hi) in RELATIVE_OPTIONS.items():
            v = spec.number(key, required=False, lo=lo, hi=hi)
            if v is not None:
                opts[key] = v
        if method in ("auto", "shoulder"):
            opts["of"] = spec.choice("of", ("negative", "main", "bulk"), default="negative")
            scatter = spec.raw("scatter", required=False)
            if scatter is not None:
                # `of: bulk`: the scatter channels that tell a live hump beyond a gap from dead cells
                if (
                    opts["of"] != "bulk"
                    or not isinstance(scatter, list)
                    or not 1 <= len(scatter) <= 2
                    or not all(isinstance(c, str) and c.strip() for c in scatter)
                ):
                    raise spec.error(
                        "scatter", "with `of: bulk`, name one or two scatter channels: [FSC-A, SSC-A]"
                    )
                opts["scatter"] = [c.strip() for c in scatter]
        if method == "auto" and spec.has("split"):
            # the two populations' mixture boundary instead of the valley (landmarks.mixture_boundary)
            opts["split"] = spec.choice("split", ("valley", "mixture"), default="valley")
        if method == "tail" or (method == "auto" and spec.has("percentile")):
            opts["percentile"] = spec.number("percentile", lo=50, hi=100)
        if method == "auto" and spec.has("percentile") and spec.raw("control", required=False) is not None:
            # with the marker's FMO control (and another stained control) given to the engine,
            # the landmark threshold is calibrated on the FMO (engine._fmo_calibrated)
            if spec.raw("control") != "fmo":
                raise spec.error("control", "only `control: fmo` is supported")
            opts["control"] = "fmo"
            align = spec.raw("align_on", required=False)
            if align is not None:
                # the file's drift on the axis is read on the negative peak of these (larger)
                # populations, known negative for the marker (engine._fmo_aligned)
                names = [align] if isinstance(align, str) else align
                if (
                    not isinstance(names, list)
                    or not names
                    or not all(isinstance(a, str) and a.strip() for a in names)
                ):
                    raise spec.error(
                        "align_on",
                        "name populations negative for the marker, e.g. `align_on: [T cells, CD8 T]`",
                    )
                opts["align_on"] = [a.strip() for a in names]
                # `gain`: the file's drift is a gain on the axis (the landmark's ratio); `affine`:
                # a gain read on the negative's width plus an offset read on its mode (a file
                # whose detectors drifted apart is mis-compensated: its cells carry spill from
                # their other stains, an offset for a population whose lineage stains are alike)
                align_how = spec.choice("align", ("gain", "affine"), default="gain")
                if align_how != "gain":
                    opts["align"] = align_how
    elif method == "reference":
        opts["q"] = spec.number("q", lo=0.0, hi=1.0)
        pop = spec.raw("population", required=False)
        if pop is not None and (not isinstance(pop, str) or not pop.strip()):
            raise spec.error("population", "name the reference population, e.g. `population: CD8 T`")
        if pop is not None:
            opts["population"] = pop.strip()
        ctl = spec.raw("control", required=False)
        if ctl is not None:
            if ctl != "fmo":
                raise spec.error("control", "only `control: fmo` is supported")
            opts["control"] = "fmo"
        if pop is None and ctl is None:
            raise spec.error("population", "a reference threshold needs `population:` and/or `control: fmo`")
    elif method == "valley":
        opts["search"] = _pair(spec, "search", spec.raw("search"))
        if None in opts["search"]:
            raise spec.error("search", "give both ends of the search range, e.g. [1.0, 3.5]")
        for key, lo, hi in (("min_peak", 0, 1), ("max_depth", 0, 1)):
            v = spec.number(key, required=False, lo=lo, hi=hi)
            if v is not None:
                opts[key] = v
    elif method in ("tail", "hi", "lo"):
        v = spec.number("z", required=False, positive=True)
        if v is not None:
            opts["z"] = v
        v = spec.number("min_peak", required=False, lo=0, hi=1)
        if v is not None:
            opts["min_peak"] = v
    elif method == "quantile":
        opts["q"] = spec.number("q", lo=0.0, hi=1.0)
    v = (
        spec.number("bandwidth", required=False, positive=True)
        if method not in ("quantile", "reference")
        else None
    )
    if v is not None:
        opts["bandwidth"] = v
    v = spec.raw("max_events", required=False)
    if v is not None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 100:
            raise spec.error("max_events", "must be an integer >= 100")
        opts["max_events"] = v
    side = None
    if with_side:
        default_side = "below" if method == "lo" else "above"
        side = spec.choice("side", ("above", "below"), default=default_side)
    bounds = parse_bounds(spec, kind="threshold")
    default = spec.number("default", required=False)
    if relative:
        cls = _lm.RelativeThresholdFitter
    elif method == "reference":
        cls = _lm.ReferenceFitter
    else:
        cls = {"valley": ValleyFitter, "quantile": QuantileFitter}.get(method, PeakEdgeFitter)
    fitter = cls(
        method=method,
        dims=(dim,),
        options=opts,
        bounds=bounds,
        pool=_pool(spec),
        default=None if default is None else np.array([default]),
    )
    return fitter, side


def parse_threshold(parent_spec, key: str, value, dim: Dim, ctx):
    """A quadrant threshold: a number, or a mapping describing a fitted threshold."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return parent_spec.check_number(key, value)
    if not isinstance(value, Mapping) or value.get("type") not in THRESHOLD_METHODS:
        raise parent_spec.error(
            key,
            f"must be a number or a fitted threshold with `type` in {list(THRESHOLD_METHODS)}, got {value!r}",
        )
    sub = GateSpec(value, parent_spec.population, value["type"], prefix=f"{parent_spec.prefix}.{key}")
    fitter, _ = _threshold_fitter(value["type"], sub, dim, with_side=False)
    # `within: quadrant`: fitted among the parent's events on the quadrant's side of the other
    # thresholds (sequential gating, e.g. NK's CD56 among CD3- events); not for FMO/reference ones
    within = sub.choice("within", ("quadrant", None), default=None)
    if within is not None:
        if value["type"] == "reference":
            raise sub.error("within", "a reference threshold is set on its own population, not `within`")
        fitter.options["within"] = within
    sub.finish()
    return fitter


def parse_data_driven(kind: str, spec, dims: list[Dim], ctx) -> Gate:
    if kind in THRESHOLD_METHODS:
        fitter, side = _threshold_fitter(kind, spec, dims[0], with_side=True)
        return ThresholdGate(dims, fitter, side, fraction=fitter.bounds.fraction)
    if kind == "diagonal":
        return parse_diagonal(spec, dims, ctx)
    if kind == "singlets":
        opts = {}
        for key in ("low", "high"):
            v = spec.number(key, required=False, positive=True)
            if v is not None:
                opts[key] = v
        bounds = parse_bounds(spec, kind="ratio")
        default = spec.raw("default", required=False)
        if default is not None:
            default = np.array(_pair(spec, "default", default), dtype=np.float64)
            if np.isnan(default).any():
                raise spec.error("default", "give both ends of the default ratio band")
        fitter = SingletFitter("singlets", tuple(dims), opts, bounds, _pool(spec), default)
        return SingletGate(dims, fitter, fraction=bounds.fraction)
    # gmm / scatter_region
    names = [d.name for d in dims]
    opts: dict = {}
    if kind == "gmm":
        opts["components"] = int(spec.number("components", required=False, default=2, lo=1, hi=10))
        for rule_key in ("select", "exclude"):
            rule = spec.raw(rule_key, required=False)
            if rule is None:
                continue
            if rule in ("largest", "smallest"):
                opts[rule_key] = rule
                continue
            if not isinstance(rule, Mapping) or len(rule) != 1:
                raise spec.error(rule_key, "use `largest`, `smallest` or one `{marker: highest|lowest}`")
            ((marker, how),) = rule.items()
            if marker not in names or how not in ("highest", "lowest"):
                raise spec.error(
                    rule_key, f"use {{marker: highest|lowest}} with a marker of this gate ({names})"
                )
            opts[rule_key] = {marker: how}
    if spec.has("distance") and spec.has("probability"):
        raise spec.error("distance", "give either `probability` or `distance`, not both")
    dist = spec.number("distance", required=False, positive=True)
    p = spec.number("probability", required=False, lo=0.5, hi=0.999999)
    if dist is not None:
        opts["distance"] = dist
    else:
        opts["probability"] = p = 0.95 if p is None else p
    v = spec.raw("max_events", required=False)
    if v is not None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 100:
            raise spec.error("max_events", "must be an integer >= 100")
        opts["max_events"] = v
    trim = spec.number("trim", required=False, lo=1.0, hi=5.0)
    if trim is None and kind in ("scatter_region", "lymphocytes"):
        trim = 2.5
    if trim is not None:
        opts["trim"] = trim
    bounds = parse_bounds(spec, kind="region", n_dims=len(dims))
    default = spec.raw("default", required=False)
    if default is not None:
        if not isinstance(default, Mapping) or set(default) != {"center", "covariance"}:
            raise spec.error("default", "give the default region as {center: [...], covariance: [[...]]}")
        c = np.asarray(default["center"], dtype=np.float64)
        cov = np.asarray(default["covariance"], dtype=np.float64)
        if c.shape != (len(dims),) or cov.shape != (len(dims), len(dims)):
            raise spec.error(
                "default", f"centre needs {len(dims)} values and covariance {len(dims)}x{len(dims)}"
            )
        default = np.concatenate([c, cov.ravel()])
    if dist is not None:
        d2 = dist * dist
    else:
        d2 = chi2_quantile(p, len(dims))
    if kind == "lymphocytes":
        for key in ("min_peak", "debris"):
            v = spec.number(key, required=False, lo=0, hi=1)
            if v is not None:
                opts[key] = v
        cls = LymphocyteFitter
    else:
        cls = DensestClusterFitter if kind == "scatter_region" else MixtureFitter
    fitter = cls(kind, tuple(dims), opts, bounds, _pool(spec), default)
    return EllipseFitGate(dims, fitter, d2, fraction=bounds.fraction)


def parse_diagonal(spec, dims: list[Dim], ctx) -> DiagonalGate:
    """``type: diagonal``: ``signs`` (one per marker), optional ``ratio``/``min_peak``/``fallback_z``/
    ``min_offset``, ``cut`` (``shoulder`` or ``edge``), ``thresholds`` for the markers after the first
    two (default ``auto``), ``optional`` markers."""
    n = len(dims)
    signs = parse_signs(spec, "signs", n)
    opts: dict = {"signs": signs[:2]}
    for key, lo, hi in (("ratio", 1, 100), ("min_peak", 0, 1), ("fallback_z", 0, 20), ("min_offset", 0, 10)):
        v = spec.number(key, required=False, lo=lo, hi=hi)
        if v is not None:
            opts[key] = v
    cut = spec.choice("cut", ("shoulder", "edge"), default="shoulder")
    if cut == "edge":
        if n < 3:
            raise spec.error("cut", "`cut: edge` is a pre-gate for the markers after the first two: add them")
        opts["cut"] = cut
    bounds = parse_bounds(spec, kind="quadrant")
    if bounds.min_events == 100:
        bounds.min_events = 200
    pool = _pool(spec)
    fitter = DiagonalFitter("diagonal", tuple(dims[:2]), opts, bounds, pool, None)
    raw = spec.raw("thresholds", required=False)
    if raw is None:
        raw = [{"type": "auto", "pool": pool}] * (n - 2)
    if not isinstance(raw, list) or len(raw) != n - 2:
        raise spec.error("thresholds", f"give {n - 2} threshold(s), one per marker after the first two")
    extra = []
    for i, (d, v) in enumerate(zip(dims[2:], raw)):
        f = parse_threshold(spec, f"thresholds[{i}]", v, d, ctx)
        if not isinstance(f, Fitter):
            raise spec.error(
                f"thresholds[{i}]", "the extra markers of a diagonal gate need fitted thresholds"
            )
        extra.append(f)
    optional = spec.raw("optional", required=False) or []
    names = [d.name for d in dims]
    if not isinstance(optional, list) or any(o not in names[2:] for o in optional):
        raise spec.error("optional", f"list markers after the first two that a file may lack ({names[2:]})")
    return DiagonalGate(dims, fitter, extra, signs, optional=optional, fraction=bounds.fraction)
