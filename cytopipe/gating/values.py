"""Event values on a gate's axes, after gating: what the engine saw, for the events of any population.

The gating engine drops its compensated, transformed copies of the data when it returns (they are
as large as the event matrix). Later steps that need values for some events (the report's gate
pictures, FlowSOM training and mapping, exports) rebuild them from the :class:`Sample` that was
gated and what its :class:`~cytopipe.gating.GatingResult` records: the compensation matrix applied
(``result.compensation``), the marker -> channel map (``result.channel_of``), the transform applied
to each channel (``result.transforms``) and the run-level transform overrides
(``result.overrides``)::

    result = gate(sample, template)
    values = result.event_values(sample)
    cd25 = values.values("CD25", "CD4 T")            # arcsinh units, one value per CD4 T event
    x = values.matrix(["CD3", "CD4", "CD8"], "Live")  # events x markers, float32
    lin = values.linear("CD25", "Treg")              # compensated, untransformed

Values equal the engine's own, bit for bit: the same compensation routine (one BLAS product over
every compensated channel, computed once and reused) and the same transform code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cytopipe.errors import GatingError
from cytopipe.gating import _adapters
from cytopipe.gating.gates import Dim
from cytopipe.gating.template import ROOT

_UNCOMPENSATED = (None, "uncompensated", "none")


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """The same values: the same memory, shape, strides and dtype (``a`` is kept alive by the
    caller, so its memory cannot have been reused for another array)."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def scale_label(spec: Mapping | None) -> str:
    """How an axis is scaled, for people: ``linear``, ``arcsinh(x/150)``, ``logicle(T=262144, ...)``."""
    if spec is None or spec.get("type") in ("identity", None):
        return "linear"
    kind = spec["type"]
    if kind == "arcsinh":
        return f"arcsinh(x/{float(spec['cofactor']):g})"
    params = ", ".join(
        f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in spec.items() if k != "type"
    )
    return f"{kind}({params})"


class EventValues:
    """Compensated (and transformed) values of gate dimensions or markers at a population's events.

    Build it with :meth:`GatingResult.event_values` from the sample the engine gated (after event
    QC: the same rows). A dimension is a :class:`~cytopipe.gating.gates.Dim` or a marker name (then
    the template's axis for that marker, :meth:`Template.dimension`). Values are cached per
    dimension and population while the object lives; drop it to free them.
    """

    def __init__(self, sample: Any, result: Any):
        self.sample = sample
        self.events = sample.events
        self.result = result
        self.template = result.template
        self.pnn = [str(v) for v in sample.channels["pnn"]]
        self._col = {name: i for i, name in enumerate(self.pnn)}
        if self.events.shape[0] != result.n_events:
            raise GatingError(
                f"the sample has {self.events.shape[0]} events but was gated with {result.n_events}; "
                "give the sample exactly as it was gated (after event QC)",
                file=result.file,
            )
        self._block: tuple[dict[int, int], np.ndarray] | None = None
        kept = getattr(result, "_kept_block", None)  # gate(..., keep_values=True): the engine's own block
        if kept is not None and kept[0] is self.events:
            self._block = (kept[1], kept[2])
        self._cache: dict[tuple, np.ndarray] = {}

    def forget(self) -> None:
        """Free the cached per-population values and the engine's transformed columns (the
        compensated matrix stays)."""
        self._cache.clear()
        if getattr(self.result, "_kept_transformed", None) is not None:
            self.result._kept_transformed = None

    @property
    def n_events(self) -> int:
        return int(self.events.shape[0])

    # ---- what each axis is -------------------------------------------------------------------
    def dim(self, dim: Dim | str) -> Dim:
        return dim if isinstance(dim, Dim) else self.template.dimension(str(dim))

    def channel(self, name: str) -> str:
        """The ``$PnN`` a marker (or channel name) was read from in this sample."""
        pnn = self.result.channel_of.get(name)
        if pnn is None and name in self._col:
            pnn = name
        if pnn is None:
            from cytopipe.panel import resolve_markers

            mapping = self.template.panel or None
            pnn = resolve_markers(self.sample.channels, [name], mapping=mapping, file=self.result.file)[name]
        return pnn

    def transform_spec(self, dim: Dim | str) -> dict | None:
        """The transform applied on this axis (None = linear): the one the engine applied to the
        channel, else a run-level override for the marker, else the template's."""
        dim = self.dim(dim)
        if dim.transform is None or dim.ratio is not None:
            return None
        pnn = self.channel(dim.name)
        spec = self.result.transforms.get(pnn)
        if spec is None and dim.compensation == "template":
            overrides = getattr(self.result, "overrides", {}) or {}
            spec = overrides.get(dim.name) or overrides.get(pnn)
        if spec is None:
            t = self.template.transforms
            spec = t.get(dim.transform) if dim.transform != "default" else None
            spec = spec or t.get(dim.name) or t.get("default")
        return spec

    def scale(self, dim: Dim | str) -> str:
        """The axis' scale in words, e.g. ``arcsinh(x/150)``."""
        return scale_label(self.transform_spec(dim))

    # ---- values -----------------------------------------------------------------------------
    def _rows(self, population: str, events: np.ndarray | None) -> np.ndarray | None:
        if events is not None:
            return np.asarray(events)
        return None if population == ROOT else self.result.indices(population)

    def linear(
        self, marker: Dim | str, population: str = ROOT, *, events: np.ndarray | None = None
    ) -> np.ndarray:
        """Compensated, untransformed values (the units of ``population_stats`` medians) of a marker
        at the events of ``population`` (or at the event indices ``events``)."""
        dim = self.dim(marker)
        v = self._full_linear(self.channel(dim.name), dim.compensation not in _UNCOMPENSATED)
        rows = self._rows(population, events)
        return v if rows is None else v[rows]

    def values(
        self, dim: Dim | str, population: str = ROOT, *, events: np.ndarray | None = None
    ) -> np.ndarray:
        """Compensated, transformed values (the gate's display scale) of a dimension at the events of
        ``population`` (or at the event indices ``events``), one per event in index order."""
        rows = self._rows(population, events)
        return self.at(self.dim(dim), rows, scope=population if events is None else None)

    def at(self, dim: Dim | str, idx: np.ndarray | None, scope: str | None = None) -> np.ndarray:
        """Values of ``dim`` at event indices ``idx`` (None = every event). ``scope`` names the event
        set ``idx`` is, so repeated requests are served from a cache (None: not cached)."""
        dim = self.dim(dim)
        key = (dim.name, dim.compensation, dim.transform, scope)
        if scope is not None and key in self._cache:
            return self._cache[key]
        if dim.ratio is not None:
            raise GatingError(
                "values of ratio dimensions are not reproduced after gating", gate=str(dim.name)
            )
        v = self._full_linear(self.channel(dim.name), dim.compensation not in _UNCOMPENSATED)
        spec = self.transform_spec(dim)
        out = self._engine_transformed(v, spec, idx)
        if out is None:
            out = _adapters.apply_transform(spec, v if idx is None else v[idx])
        if scope is not None:
            self._cache[key] = out
        return out

    def _engine_transformed(self, linear: np.ndarray, spec: Mapping | None, idx: np.ndarray | None):
        """The engine's transform of this very column (same memory) with this spec, at these rows
        (the same index array) or at every event, if it made one (``gate(..., keep_values=True)``
        on these events); None otherwise. The transforms are elementwise: the values are those
        :func:`apply_transform` gives for the rows."""
        kept = getattr(self.result, "_kept_transformed", None)
        if spec is None or kept is None or kept[0] is not self.events:
            return None
        full = None
        for src, s, rows, out in kept[1]:
            if not (_same_memory(src, linear) and s == spec):
                continue
            if rows is None:
                full = out
            elif idx is not None and _same_memory(rows, idx):
                return out
        if full is None:
            return None
        return full if idx is None else full[idx]

    def matrix(
        self,
        markers: Sequence[Dim | str],
        population: str = ROOT,
        *,
        events: np.ndarray | None = None,
        transformed: bool = True,
    ) -> np.ndarray:
        """``events x markers`` float32 (C order) of the markers at a population's events:
        transformed (display scale, default) or linear. Only those events and columns are copied."""
        rows = self._rows(population, events)
        n = self.n_events if rows is None else len(rows)
        out = np.empty((n, len(markers)), dtype=np.float32)
        for j, m in enumerate(markers):
            dim = self.dim(m)
            if transformed:
                out[:, j] = self.at(dim, rows)
            else:
                v = self._full_linear(self.channel(dim.name), dim.compensation not in _UNCOMPENSATED)
                out[:, j] = v if rows is None else v[rows]
        return out

    # ---- compensation -----------------------------------------------------------------------
    def _compensation(self):
        """The Compensation the engine applied (recorded in the result), or the template's when the
        engine compensated nothing (e.g. gates on scatter only); None = uncompensated."""
        from cytopipe.compensation import Compensation

        if self.result.compensation:
            return Compensation.from_dict(self.result.compensation)
        source = self.template.compensation
        if source == "none":
            return None
        if source == "file":
            if getattr(self.sample, "spillover", None) is None:
                return None
            return Compensation.from_spillover(self.sample.spillover)
        return Compensation.from_csv(source)

    def _full_linear(self, pnn: str, compensated: bool) -> np.ndarray:
        c = self._col[pnn]
        if compensated:
            if self._block is None:
                comp = self._compensation()
                if comp is None:
                    self._block = ({}, np.empty((0, self.n_events), dtype=self.events.dtype))
                else:
                    cols = [int(i) for i in comp.columns_in(self.pnn, self.result.file)]
                    block = _adapters.compensate_block(self.events, cols, comp)
                    self._block = ({col: j for j, col in enumerate(cols)}, block)
            where, block = self._block
            if c in where:
                return block[where[c]]
        return self.events[:, c]
