"""Per-channel display scale from the data: the arcsinh cofactor from the negative population.

A fixed cofactor (150) suits an 18-bit instrument; on a 22-bit or float instrument the negative
population spreads over hundreds or thousands of units and arcsinh(x / 150) splits it into two
humps, so "the negative peak" and every threshold stated relative to it move. Here the cofactor is
``k`` x the negative population's robust SD in compensated linear units: its mode found on a
provisional arcsinh/150 scale, its spread from the events below that mode (mirror of its lower
half, where no positive cells are). ``estimate_cofactors`` pools samples so a study locks one
cofactor per channel (give the result to ``gate(..., transforms=...)``; it is recorded with the
run's transforms).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from cytopipe.gating.cofactor import COFACTOR_K, estimate_cofactor  # estimate_cofactor: re-exported


def estimate_cofactors(
    samples: Iterable, template, markers: Iterable[str] | None = None, k: float = COFACTOR_K
) -> dict[str, dict]:
    """One locked arcsinh spec per marker for a study: the median of the per-sample estimates.

    ``samples``: :class:`cytopipe.Sample` objects; ``template``: the gating template (its panel and
    compensation are used). Returns ``{marker: {"type": "arcsinh", "cofactor": c}}``.
    """
    from cytopipe.gating.engine import Engine

    per: dict[str, list[float]] = {}
    for s in samples:
        e = Engine(s.events, s.channels, template, spillover=getattr(s, "spillover", None))
        for m in markers or template.median_markers():
            if m in e.missing:
                continue
            dim = template.dimension(m)
            spec = e.transform_specs.get(dim.transform or "")
            if dim.transform is None or spec is None or spec.get("type") != "arcsinh":
                continue
            x = e.linear(e._column(m, dim, None), e._comp_key(dim))
            per.setdefault(m, []).append(estimate_cofactor(x, float(spec["cofactor"]), k))
    return {m: {"type": "arcsinh", "cofactor": float(np.median(v))} for m, v in per.items()}


#: per-sample cofactors of one channel spreading more than this (90th / 10th percentile) mean the
#: study mixes instruments or detector ranges: one locked cofactor would not suit them all
MAX_SPREAD = 3.0


def auto_markers(template, fixed: Iterable[str] = ()) -> list[str]:
    """The template's markers whose display scale is ``cofactor: auto`` (scatter, time, ratio
    dimensions and markers given a transform in ``fixed`` left out): the ones a study locks."""
    from cytopipe.gating import is_scatter_or_time

    fixed = set(fixed)
    out = []
    for m in template.markers():
        if m in fixed or is_scatter_or_time(m):
            continue
        dim = template.dimension(m)
        spec = template.transforms.get(dim.transform or "")
        if dim.ratio is None and getattr(spec, "auto", False):
            out.append(m)
    return out


def pool_columns(
    events: np.ndarray, channels, markers: Sequence[str], panel: Mapping[str, str] | None = None
) -> tuple[np.ndarray, list[int | None]]:
    """``events`` (compensated) on ``markers``, one column each: a marker the file does not carry
    is a column of NaN (the file's populations needing it are "not measured"; the other channels'
    estimates still count). Returns the float32 array and the column index used per marker."""
    from cytopipe.errors import PanelError
    from cytopipe.gating.engine import _resolve_cached

    pnn = list(channels["pnn"])
    out = np.full((len(events), len(markers)), np.nan, dtype=np.float32)
    cols: list[int | None] = []
    for j, m in enumerate(markers):
        try:  # memoised per panel, as the engine resolves (matching a marker: ~1.5 ms a call)
            c = pnn.index(_resolve_cached(channels, [m], panel or {}, None)[m])
        except PanelError:
            c = None
        if c is not None:
            out[:, j] = events[:, c]
        cols.append(c)
    return out, cols


def sample_cofactors(
    pool: np.ndarray, default: float = 150.0, k: float = COFACTOR_K, min_events: int = 200
) -> list[float | None]:
    """One sample's cofactor estimate per column of ``pool`` (events x markers, compensated linear
    values): None where the column has fewer than ``min_events`` finite values. Run where the
    sample's pool is made (the pooling pass's worker), so the study's locking only takes medians."""
    pool = np.asarray(pool)
    out: list[float | None] = []
    for j in range(pool.shape[1]):
        x = pool[:, j]
        out.append(float(estimate_cofactor(x, default, k)) if np.isfinite(x).sum() >= min_events else None)
    return out


def lock_cofactors(
    pools: Sequence[np.ndarray | Sequence[float | None]],
    markers: Sequence[str],
    default: float = 150.0,
    k: float = COFACTOR_K,
    max_spread: float = MAX_SPREAD,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """One arcsinh cofactor per channel for a whole study, from its pooled events.

    ``pools``: per sample, either an array (events x ``markers``) of compensated linear values
    (e.g. a seeded subsample of each file, as ``cytopipe run`` pools them) or that array's
    :func:`sample_cofactors` (computed where the sample was read). Each sample's cofactor is
    estimated from its own negative population (:func:`estimate_cofactor`); the study locks their
    median, so every file is gated on the same scale. A channel whose per-sample estimates spread
    more than ``max_spread``-fold (90th / 10th percentile: several instruments or detector ranges
    in one study) is not locked and keeps a per-file estimate, with the reason recorded.

    Returns ``(locked, record)``: ``{marker: {"type": "arcsinh", "cofactor": c}}`` for the locked
    channels, and per marker the figures for run.json (``cofactor`` or ``reason``, ``samples``,
    ``spread``).
    """
    per_sample = [sample_cofactors(p, default, k) if isinstance(p, np.ndarray) else list(p) for p in pools]
    locked: dict[str, dict] = {}
    record: dict[str, dict] = {}
    for j, m in enumerate(markers):
        est = [e[j] for e in per_sample if e[j] is not None]
        if not est:
            record[m] = {"samples": 0, "reason": "no sample had 200 events to estimate from"}
            continue
        lo, hi = np.quantile(est, [0.1, 0.9])
        spread = float(hi / lo) if lo > 0 else float("inf")
        entry: dict = {"samples": len(est), "spread": round(spread, 3)}
        if spread > max_spread:
            entry["reason"] = (
                f"per-sample cofactors {lo:.3g}-{hi:.3g} differ more than {max_spread:g}-fold "
                "(several instruments?): estimated per file"
            )
        else:
            c = float(f"{float(np.median(est)):.2g}")
            locked[m] = {"type": "arcsinh", "cofactor": c}
            entry["cofactor"] = c
        record[m] = entry
    return locked, record


def describe(scales: Mapping[str, dict]) -> str:
    return ", ".join(f"{m} {s['cofactor']:.0f}" for m, s in scales.items())
