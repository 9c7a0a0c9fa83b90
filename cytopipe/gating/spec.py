"""Gate parameters as a template states them: the reader every gate parser uses, and its inverse.

:class:`GateSpec` reads one gate's mapping key by key and reports missing, extra or bad values by
population and key; :func:`gate_to_dict` writes a gate back as that mapping. Both the template
parser (:mod:`~cytopipe.gating.template`) and the data-driven gate parsers
(:mod:`~cytopipe.gating.fitparse`, :mod:`~cytopipe.gating.landmarks`) use them, so they live below
all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cytopipe.errors import TemplateError
from cytopipe.gating.gates import BooleanGate, EllipsoidGate, Gate, PolygonGate, RectangleGate

POOL_LEVELS = ("sample", "patient", "batch", "cohort")


class GateSpec:
    """Reads gate parameters one by one and reports missing, extra or bad values by name."""

    def __init__(self, mapping: Mapping, population: str, gate_type: str, prefix: str = "gate"):
        self.mapping = dict(mapping)
        self.population = population
        self.gate_type = gate_type
        self.prefix = prefix
        self.used = {"type"}

    def error(self, key: str, message: str) -> TemplateError:
        return TemplateError(message, population=self.population, key=f"{self.prefix}.{key}")

    def has(self, key: str) -> bool:
        return key in self.mapping

    def raw(self, key: str, required: bool = True, default=None):
        self.used.add(key)
        if key not in self.mapping:
            if required:
                raise self.error(key, f"a {self.gate_type} gate needs `{key}`")
            return default
        return self.mapping[key]

    def number(
        self, key: str, required=True, default=None, allow_none=False, positive=False, lo=None, hi=None
    ):
        value = self.raw(key, required, default)
        if value is None and (allow_none or not required):
            return None
        return self.check_number(key, value, positive=positive, lo=lo, hi=hi)

    def check_number(self, key, value, positive=False, lo=None, hi=None, allow_inf=False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and not allow_inf):
            raise self.error(key, f"must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value}")
        if lo is not None and value < lo:
            raise self.error(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.error(key, f"must be <= {hi}, got {value}")
        return value

    def numbers(self, key, length=None, required=True, allow_none=False, allow_inf=False):
        value = self.raw(key, required)
        if value is None and not required:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and length == 1:
            value = [value]
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise self.error(key, f"must be a list of numbers, got {value!r}")
        if length is not None and len(value) != length:
            raise self.error(key, f"needs {length} value(s) (one per marker), got {len(value)}")
        out = []
        for v in value:
            if v is None and allow_none:
                out.append(None)
            else:
                out.append(self.check_number(key, v, allow_inf=allow_inf))
        return out

    def choice(self, key, choices, required=False, default=None):
        value = self.raw(key, required, default)
        if value not in choices:
            raise self.error(key, f"must be one of {list(choices)}, got {value!r}")
        return value

    def finish(self) -> None:
        extra = sorted(set(map(str, self.mapping)) - self.used)
        if extra:
            raise self.error(
                extra[0],
                f"unknown parameter(s) {extra} for a {self.gate_type} gate; allowed: {sorted(self.used - {'type'})}",
            )


def parse_signs(spec: GateSpec, key: str, n: int) -> list[str]:
    signs = spec.raw(key)
    if (
        not isinstance(signs, str)
        or len(signs.replace(" ", "")) != n
        or set(signs.replace(" ", "")) - {"+", "-"}
    ):
        raise spec.error(
            key,
            f'give one sign per marker, in marker order, e.g. "+-" (first marker high, second low); got {signs!r}',
        )
    return list(signs.replace(" ", ""))


def gate_to_dict(gate: Gate) -> dict:
    if hasattr(gate, "to_spec"):
        return gate.to_spec()
    if isinstance(gate, RectangleGate):
        if gate.style == "range":
            d: dict[str, Any] = {"type": "range"}
            if gate.lower[0] is not None:
                d["min"] = gate.lower[0]
            if gate.upper[0] is not None:
                d["max"] = gate.upper[0]
            return d
        if gate.style == "quadrant":
            thresholds = [lo if lo is not None else hi for lo, hi in zip(gate.lower, gate.upper)]
            signs = "".join("+" if lo is not None else "-" for lo in gate.lower)
            return {"type": "quadrant", "quadrant": signs, "thresholds": thresholds}
        return {"type": "rectangle", **gate.geometry()}
    if isinstance(gate, PolygonGate):
        return {"type": "polygon", **gate.geometry()}
    if isinstance(gate, EllipsoidGate):
        return {"type": "ellipse", **gate.geometry()}
    if isinstance(gate, BooleanGate):
        return {"type": "boolean", **gate.geometry()}
    raise TypeError(f"cannot write gate {gate!r}")  # pragma: no cover
