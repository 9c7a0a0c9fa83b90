"""Acquisition faults in files of an instrument profile, with per-event truth.

Realistic faults as QC tools (flowAI, PeacoQC, flowClean) meet them:

* ``clog``: the sample line partly blocks (the event rate drops to 1/3-1/5, signals dim by
  15-30%), the flow **stops** for 2-6 s, then a **burst** clears it (the rate jumps 4-8x, signals
  dimmed and smeared); 4-8% of the events;
* ``spike``: 1-3 short flow-rate surges (a bubble or a pressure kick): for 0.5-1.5% of the events
  each, the rate is 5-10x and signals scatter more (coincident, off-centre events);
* ``shift``: as in the default simulator (3 detectors read 1.6-2.2x higher, or lower, for a
  stretch of 15-25% of the events);
* ``margin``: 1.5-3% of the events pile up at the top of the range ($PnR - 1) of FSC-A or of
  one detector.

Every affected event is marked in ``EventData.fault`` (codes into :data:`FAULT_NAMES`), and
``EventData.faults`` describes each fault (event range, channels, factor).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cytopipe.simulate import params as P
from cytopipe.simulate.events import EventData
from cytopipe.simulate.instrument_events import channel_names, fluor_slice
from cytopipe.simulate.instruments import Instrument
from cytopipe.simulate.populations import FAULTS

#: fault codes of instrument-profile files (the default simulator's, then ``spike``)
FAULT_NAMES = (*FAULTS, "spike")
FAULT_CODE = {name: i for i, name in enumerate(FAULT_NAMES)}
INSTRUMENT_FAULT_KINDS = ("clog", "spike", "margin", "shift")


def _retime(ev: np.ndarray, t_col: int, gaps: np.ndarray) -> None:
    ev[:, t_col] = np.cumsum(gaps).astype(np.float32)


def _record(data: EventData, kind: str, idx: np.ndarray, channels: str, factor: float) -> None:
    data.fault[idx] = FAULT_CODE[kind]
    data.faults.append(
        {"fault": kind, "first_event": int(idx[0]), "last_event": int(idx[-1]), "n_events": int(idx.size),
         "channels": channels, "factor": round(float(factor), 4)}
    )  # fmt: skip


def inject_instrument_faults(
    data: EventData, kinds: Sequence[str], rng, rate: float, inst: Instrument
) -> None:
    """Inject ``kinds`` into ``data`` (in place) and mark the affected events."""
    data.fault_names = FAULT_NAMES
    ev = data.events
    n = ev.shape[0]
    names = channel_names(inst)
    t_col = names.index("Time")
    fl = fluor_slice(inst)
    signal_cols = [c for c in range(len(names)) if c != t_col]
    top = np.float32(inst.pnr - 1)
    for kind in kinds:
        gaps = np.diff(ev[:, t_col].astype(np.float64), prepend=0.0)
        if kind == "clog":
            length = max(3, int(n * rng.uniform(0.04, 0.08)))
            start = int(rng.integers(int(0.15 * n), max(int(0.15 * n) + 1, int(0.8 * n) - length)))
            idx = np.arange(start, min(n, start + length))
            slow = idx[: max(1, int(0.4 * idx.size))]
            burst = idx[slow.size :]
            gaps[slow] *= rng.uniform(3.0, 5.0)
            if burst.size:
                gaps[burst[0]] += rng.uniform(2.0, 6.0) / P.TIMESTEP  # the flow stops
                gaps[burst[1:]] /= rng.uniform(4.0, 8.0)
            _retime(ev, t_col, gaps)
            dim = rng.uniform(0.7, 0.85)
            ev[np.ix_(idx, signal_cols)] *= np.float32(dim)
            if burst.size:
                smear = np.exp(0.15 * rng.standard_normal((burst.size, len(signal_cols)))).astype(np.float32)
                ev[np.ix_(burst, signal_cols)] *= smear
            _record(data, "clog", idx, "all", dim)
        elif kind == "spike":
            for _ in range(int(rng.integers(1, 4))):
                length = max(2, int(n * rng.uniform(0.005, 0.015)))
                start = int(rng.integers(int(0.05 * n), max(int(0.05 * n) + 1, int(0.95 * n) - length)))
                idx = np.arange(start, min(n, start + length))
                idx = idx[data.fault[idx] == 0]
                if idx.size == 0:
                    continue
                factor = rng.uniform(5.0, 10.0)
                gaps[idx] /= factor
                smear = np.exp(0.2 * rng.standard_normal((idx.size, len(signal_cols)))).astype(np.float32)
                ev[np.ix_(idx, signal_cols)] *= smear
                _record(data, "spike", idx, "all", factor)
            _retime(ev, t_col, gaps)
        elif kind == "shift":
            length = max(1, int(n * rng.uniform(0.15, 0.25)))
            start = int(rng.integers(int(0.1 * n), max(int(0.1 * n) + 1, n - length)))
            idx = np.arange(start, min(n, start + length))
            cols = np.sort(rng.choice(P.N_FLUOR, 3, replace=False))
            factor = rng.uniform(1.6, 2.2) if rng.random() < 0.7 else rng.uniform(0.45, 0.6)
            sel = np.ix_(idx, fl.start + cols)
            ev[sel] = np.minimum(ev[sel] * np.float32(factor), top)
            _record(data, "shift", idx, ";".join(inst.detectors[j] for j in cols), factor)
        elif kind == "margin":
            free = np.flatnonzero(data.fault == 0)
            k = max(1, int(n * rng.uniform(0.015, 0.03)))
            idx = np.sort(rng.choice(free, min(k, free.size), replace=False))
            low = -1 if inst.has_scatter else 0  # -1 = FSC-A (no scatter on a mass cytometer)
            col = int(rng.integers(low, P.N_FLUOR))
            ci = names.index("FSC-A") if col < 0 else fl.start + col
            ev[idx, ci] = top
            _record(data, "margin", idx, names[ci], 1.0)
        else:
            raise ValueError(f"unknown fault {kind!r}")
    ev[:, signal_cols] = np.minimum(ev[:, signal_cols], top)
