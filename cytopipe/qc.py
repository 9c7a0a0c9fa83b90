"""Event- and sample-level quality control.

Run per sample before compensation and gating, on the raw values, in this order (docs/qc.md):

1. **Margin events** (:func:`margin_qc`): events at a detector's maximum (``value >= $PnR - 1``,
   saturated) on any measured channel, and events at or below ``lower_limit`` (default 0) on
   scatter channels. Counted per channel. Events with a NaN or infinite value on any channel
   (a float file can hold them; compensation would spread them over every channel and the gates
   would lose them silently) are removed here too, whatever the settings, counted, and flag the
   sample (``nonfinite_events``).
2. **Time-resolved anomalies** (:func:`time_qc`), as PeacoQC and flowAI do: the remaining events
   are cut, in acquisition order, into bins of equal event count; a bin is flagged when

   * its **event rate** (events / duration on the Time channel) departs from the sample's
     typical rate (clog, bubble, burst), or
   * the **signal of any channel** (the bin's mean rank of that channel: a Wilcoxon rank-sum /
     median-shift test) departs from the sample's typical signal,

   by more than ``mad`` robust standard deviations (median +- ``mad`` x 1.4826 x MAD, PeacoQC's
   default ``MAD=6``; never below the statistic's own sampling noise). Stretches of fewer than
   ``consecutive_bins`` good bins between flagged bins are flagged too (PeacoQC's
   ``consecutive_bins=5``). Events in flagged bins are removed.
3. **Counts**: a sample with fewer than ``min_events`` events left, or that lost more than
   ``max_removed_fraction`` of its events, is *flagged* (kept, never dropped); every reported
   ``pct_parent`` gets a Wilson binomial confidence interval and populations whose parent has
   fewer than ``min_parent_events`` events are marked (:func:`add_count_qc`).

Compensation mixes channels linearly and transforms are monotone, so neither changes which
bins stand out; running QC on raw values lets the gating engine compensate only once.
Everything is vectorised numpy (one numba pass for the ranks); no per-event Python loop.

Why one module: the three steps share the channel roles, the ``qc:`` settings and the numba
kernels, and the margin definition (:func:`saturation_limits`) is also what the gating engine
uses to leave saturated events out of data-driven fits: one place says what a margin event is.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.config import Field, defaults
from cytopipe.errors import QCError
from cytopipe.intervals import wilson_interval

# Keys of the ``qc:`` section of a workflow (validated by cytopipe.workflow).
QC_SCHEMA: dict[str, Any] = {
    "margins": {
        "enabled": Field(bool, True, "remove margin (saturated) events", nullable=False),
        "lower_channels": Field(
            str,
            "scatter",
            "channels whose lower margin is checked: 'scatter' (FSC/SSC), 'all' or 'none'",
            choices=("scatter", "all", "none"),
            nullable=False,
        ),
        "lower_limit": Field(float, 0.0, "events at or below this value are lower-margin events"),
    },
    "time": {
        "enabled": Field(bool, True, "remove time-resolved anomalies (rate and signal)", nullable=False),
        "mad": Field(float, 6.0, "robust z threshold (PeacoQC MAD=6)", minimum=1.0, nullable=False),
        "consecutive_bins": Field(
            int, 5, "good stretches shorter than this between bad bins are removed", minimum=0
        ),
        "min_cells": Field(int, 150, "minimum events per bin (PeacoQC min_cells=150)", minimum=10),
        "max_bins": Field(int, 500, "maximum number of bins (PeacoQC max_bins=500)", minimum=10),
        "flow_rate": Field(bool, True, "check the event rate per time bin", nullable=False),
        "signal": Field(bool, True, "check every channel's signal (its mean rank) per bin", nullable=False),
    },
    "min_events": Field(int, 1000, "flag a sample with fewer events left after QC", minimum=0),
    "min_parent_events": Field(
        int, 100, "mark populations whose parent has fewer events (Poisson CV ~10% at 100)", minimum=0
    ),
    "max_removed_fraction": Field(
        float, 0.2, "flag a sample that loses more than this share of events to QC", minimum=0, maximum=1
    ),
    "loss_outlier_mad": Field(
        float, 5.0, "flag samples whose QC loss is a robust outlier among the study's samples", minimum=1
    ),
    "confidence": Field(
        float, 0.95, "level of the Wilson interval of pct_parent", minimum=0.5, maximum=0.9999
    ),
}

MAD_TO_SD = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation
SCORE_LEVELS = 64  # rank grid of the signal check (quantiles per channel)


def _flat_defaults() -> dict[str, Any]:
    """QC_SCHEMA's defaults flattened to QCSettings' field names (``margins.enabled`` -> ``margins``)."""
    flat: dict[str, Any] = {}
    for key, value in defaults(QC_SCHEMA).items():
        if isinstance(value, dict):
            flat.update({key if sub == "enabled" else sub: v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


_D = _flat_defaults()  # the defaults live in QC_SCHEMA only


@dataclass(frozen=True)
class QCSettings:
    """Flat view of the validated ``qc:`` section (defaults from :data:`QC_SCHEMA`)."""

    margins: bool = _D["margins"]
    lower_channels: str = _D["lower_channels"]
    lower_limit: float = _D["lower_limit"]
    time: bool = _D["time"]
    mad: float = _D["mad"]
    consecutive_bins: int = _D["consecutive_bins"]
    min_cells: int = _D["min_cells"]
    max_bins: int = _D["max_bins"]
    flow_rate: bool = _D["flow_rate"]
    signal: bool = _D["signal"]
    min_events: int = _D["min_events"]
    min_parent_events: int = _D["min_parent_events"]
    max_removed_fraction: float = _D["max_removed_fraction"]
    loss_outlier_mad: float = _D["loss_outlier_mad"]
    confidence: float = _D["confidence"]

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> QCSettings:
        """From a validated ``qc:`` section (nested ``margins``/``time``) or a flat dict; an unknown
        key is an error (a typo must not silently fall back to a default)."""
        if not section:
            return cls()
        flat: dict[str, Any] = {}
        for key, value in section.items():
            if key in ("margins", "time") and isinstance(value, Mapping):
                for sub, v in value.items():
                    flat[key if sub == "enabled" else sub] = v
            else:
                flat[key] = value
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(flat) - known)
        if unknown:
            near = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            hints = ", ".join(
                f"{k!r}" + (f" (did you mean {near[k][0]!r}?)" if near[k] else "") for k in unknown
            )
            raise QCError(f"unknown QC setting {hints}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in flat.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- channel roles ------------------------------------------------------------------------------
def channel_roles(channels: pd.DataFrame) -> np.ndarray:
    """'time', 'scatter' or 'fluor' per channel, from ``$PnN``."""
    return _roles(tuple(str(n) for n in channels["pnn"])).copy()


@functools.lru_cache(maxsize=64)
def _roles(pnn: tuple[str, ...]) -> np.ndarray:
    # cached per panel: the QC of a sample asks 4 times and a study has a few panels (pandas
    # string methods on the names cost ~2 ms a call, ~10% of the time QC of a 200k-event file)
    roles = np.full(len(pnn), "fluor", dtype=object)
    for i, name in enumerate(pnn):
        name = name.strip().lower()
        if name.startswith(("fsc", "ssc")):
            roles[i] = "scatter"
        if name.startswith("time"):
            roles[i] = "time"
    return roles


def measured_channels(events: np.ndarray, channels: pd.DataFrame) -> np.ndarray:
    """Columns holding measurements: not time, and not an event counter/ID (a column that
    never decreases in acquisition order, e.g. ``Original_ID`` of a subsampled file)."""
    roles = channel_roles(channels)
    head = events[:5000]  # a measured channel is never monotone over thousands of events
    cols = [j for j in np.flatnonzero(roles != "time") if not _never_decreases(head[:, j])]
    return np.asarray(cols, dtype=np.int64)


def _never_decreases(col: np.ndarray) -> bool:
    return col.shape[0] > 2 and col[-1] > col[0] and bool(np.all(col[1:] >= col[:-1]))


def time_index(channels: pd.DataFrame) -> int | None:
    """Column of the time channel, or None."""
    idx = np.flatnonzero(channel_roles(channels) == "time")
    return int(idx[0]) if len(idx) else None


# --- 1. margins ---------------------------------------------------------------------------------
@dataclass
class MarginResult:
    bad: np.ndarray  # bool per event
    counts: dict[str, int]  # $PnN -> events at a margin of that channel (an event may count twice)
    nonfinite: int = 0  # events with a NaN or infinite value (also in ``bad``)


def margin_qc(events: np.ndarray, channels: pd.DataFrame, settings: QCSettings) -> MarginResult:
    """Events at a detector's maximum (any measured channel) or at/below the lower limit, and
    events with a NaN or infinite value on any channel (always)."""
    n, p = events.shape
    if len(channels) != p:
        raise QCError(f"{len(channels)} channels described but the event matrix has {p} columns")
    bad = _nonfinite_events(events)
    nonfinite = int(bad.sum())
    counts: dict[str, int] = {}
    if not settings.margins or n == 0:
        return MarginResult(bad, counts, nonfinite)
    roles = channel_roles(channels)
    cols = measured_channels(events, channels)
    if len(cols) == 0:
        return MarginResult(bad, counts, nonfinite)
    lower = {"scatter": roles == "scatter", "all": roles != "time", "none": np.zeros(p, bool)}[
        settings.lower_channels
    ][cols]
    hi = _upper_margins(channels, cols)
    lo = np.where(lower, settings.lower_limit, -np.inf).astype(np.float32)
    kernel = _kernels()["margins"]
    n_hi, n_lo, n_above = kernel(events, cols, hi, lo, bad)
    # $PnR is the detector range only if the data respect it (some exports write a nominal
    # range and values beyond it): then the top of the range is not a saturation limit
    if (n_above > 0).any():
        hi[n_above > 0] = np.inf
        bad[:] = _nonfinite_events(events) if nonfinite else False
        n_hi, n_lo, _ = kernel(events, cols, hi, lo, bad)
    for k, j in enumerate(cols):
        if n_hi[k] + n_lo[k]:
            counts[str(channels["pnn"].iloc[j])] = int(n_hi[k] + n_lo[k])
    return MarginResult(bad, counts, nonfinite)


def _upper_margins(channels: pd.DataFrame, cols: np.ndarray) -> np.ndarray:
    """The detector maximum of channels ``cols`` (float32): an event is saturated there at
    ``value >= $PnR - 1``; inf where no range is recorded (``$PnR <= 1``) and on a mass cytometry
    file (:func:`is_mass_cytometry`), whose ``$PnR`` is written from the data, not a detector's
    range: CyTOF software sets it to the channel's observed maximum rounded up (CytoNorm's files:
    Event_length $PnR 75, maximum 75; Nd145Di $PnR 285, maximum 284.2), so the top event or few
    of every channel sat "at the detector maximum" and were removed as saturated, from every file."""
    if is_mass_cytometry(channels):
        return np.full(len(cols), np.inf, dtype=np.float32)
    pnr = channels["pnr"].to_numpy(dtype=np.float64)[cols]
    return np.where(pnr > 1, pnr - 1, np.inf).astype(np.float32)


# a metal isotope channel of a mass cytometer: Nd145Di, Ir191Di, CD3(Nd145)Dd, (Pt195)Di
_ISOTOPE = re.compile(r"\(?[A-Z][a-z]?\d{2,3}\)?D[id]$")


def is_mass_cytometry(channels: pd.DataFrame) -> bool:
    """Whether the channels are a mass cytometer's: no scatter channel, and an ``Event_length``
    channel or mostly metal isotope channels (``Nd145Di``, ``CD3(Nd145)Dd``) by ``$PnN``."""
    return _is_mass(tuple(str(n) for n in channels["pnn"]))


@functools.lru_cache(maxsize=64)
def _is_mass(pnn: tuple[str, ...]) -> bool:
    roles = _roles(pnn)
    if (roles == "scatter").any():
        return False
    names = [n.strip() for n, r in zip(pnn, roles) if r != "time"]
    if any(n.lower() == "event_length" for n in names):
        return True
    return bool(names) and 2 * sum(bool(_ISOTOPE.search(n)) for n in names) > len(names)


def saturation_limits(events: np.ndarray, channels: pd.DataFrame) -> np.ndarray:
    """Per channel: the value at and above which an event is saturated, as :func:`margin_qc`
    calls an upper margin event (``$PnR - 1``), or inf where a channel has no saturation limit:
    not a measured channel (time, an event counter) or no recorded range. The data are not
    scanned: a channel whose values go beyond its declared range (``> $PnR``) has no saturation
    either, which the caller checks on the values it reads.

    For estimates that must not be moved by events carrying no position information (e.g. the
    landmarks of a data-driven gate when margin QC has not removed them)."""
    hi = np.full(events.shape[1], np.inf, dtype=np.float32)
    cols = measured_channels(events, channels)
    if "pnr" in channels and len(cols):  # a channel table without recorded ranges: no limits
        hi[cols] = _upper_margins(channels, cols)
    return hi


def _nonfinite_events(events: np.ndarray) -> np.ndarray:
    """Events (rows) with a NaN or infinite value. The sum of all values is finite when every value
    is (one fast pass, ~0.5 ms per 3M values; only an overflow or a non-finite value makes it
    inf/NaN), and only then are rows looked at: a row's float64 sum of float32 values is finite
    exactly when every value of the row is (it cannot overflow)."""
    bad = np.zeros(events.shape[0], dtype=bool)
    if not events.size or events.dtype.kind != "f":
        return bad
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(events)
    if not np.isfinite(total):
        rows = np.flatnonzero(~np.isfinite(events.sum(axis=1, dtype=np.float64)))
        if len(rows):
            bad[rows] = ~np.isfinite(events[rows]).all(axis=1)
    return bad


def _margins(events, cols, hi, lo, bad):  # pragma: no cover - compiled
    """One row-major pass: flag events at/above ``hi`` or at/below ``lo`` on any of ``cols``;
    count them per channel (an event counts once per channel), and values above ``hi + 1``
    (beyond the declared range). Events already ``bad`` on entry (non-finite) are skipped."""
    k = cols.shape[0]
    n_hi = np.zeros(k, dtype=np.int64)
    n_lo = np.zeros(k, dtype=np.int64)
    n_above = np.zeros(k, dtype=np.int64)
    for i in range(events.shape[0]):
        if bad[i]:
            continue
        for c in range(k):
            v = events[i, cols[c]]
            if v >= hi[c]:
                n_hi[c] += 1
                bad[i] = True
                if v > hi[c] + 1:
                    n_above[c] += 1
            elif v <= lo[c]:
                n_lo[c] += 1
                bad[i] = True
    return n_hi, n_lo, n_above


# --- 2. time-resolved anomalies ------------------------------------------------------------------
@dataclass
class TimeResult:
    bad: np.ndarray  # bool per event (of the events given)
    n_bins: int = 0
    events_per_bin: int = 0
    rate_bins_flagged: int = 0
    signal_bins_flagged: int = 0
    worst_channel: str | None = None  # channel with the most flagged bins
    note: str = ""


def time_qc(
    events: np.ndarray, channels: pd.DataFrame, settings: QCSettings, rows: np.ndarray | None = None
) -> TimeResult:
    """Flag events in time bins whose event rate or channel signal jumps (robust z > ``mad``).

    Events are cut, in acquisition order, into bins of equal event count (PeacoQC's
    ``max(min_cells, n / max_bins)``). A bin's event rate is its events over its duration on the
    time channel; its signal is the share of its events above each channel's quartiles. Bins that
    are flagged, and short good stretches between flagged bins, are removed.

    ``rows`` (indices) restricts the check to those events (e.g. those left after the margin
    check) without copying the matrix; the returned mask is then over ``rows``.
    """
    n = events.shape[0] if rows is None else len(rows)
    bad = np.zeros(n, dtype=bool)
    if not settings.time:
        return TimeResult(bad, note="time QC disabled")
    per_bin = max(settings.min_cells, math.ceil(n / settings.max_bins))
    n_bins = n // per_bin
    if n_bins < max(10, 2 * settings.consecutive_bins):
        return TimeResult(bad, note=f"too few events ({n}) for time QC (bins of {per_bin})")
    t_col = time_index(channels)
    # acquisition order: file order unless the time channel says otherwise
    t = None
    order = None  # positions (within the n events) in acquisition order
    if t_col is not None:
        t = events[:, t_col] if rows is None else events[rows, t_col]
        if np.any(np.diff(t) < 0):
            order = np.argsort(t, kind="stable")
            t = t[order]
    sel = rows if order is None else (order if rows is None else rows[order])
    result = TimeResult(bad, n_bins=n_bins, events_per_bin=per_bin)
    bin_bad = np.zeros(n_bins, dtype=bool)

    if settings.signal:
        sig_cols = measured_channels(events if rows is None else events[rows[:5000]], channels)
        sig_bad, worst = _signal_bins(events, sig_cols, sel, per_bin, n_bins, settings.mad)
        result.signal_bins_flagged = int(sig_bad.sum())
        if worst is not None:
            result.worst_channel = str(channels["pnn"].iloc[worst])
        bin_bad |= sig_bad
    if settings.flow_rate and t is not None:
        rate_bad = _rate_bins(t, per_bin, n_bins, settings.mad)
        result.rate_bins_flagged = int(rate_bad.sum())
        bin_bad |= rate_bad
    elif settings.flow_rate:
        result.note = "no time channel: event rate not checked"
    bin_bad = _close_short_gaps(bin_bad, settings.consecutive_bins)
    if bin_bad.any():
        ev_bad = bin_bad[np.minimum(np.arange(n) // per_bin, n_bins - 1)]
        if order is None:
            bad = ev_bad
        else:
            bad[order] = ev_bad
    result.bad = bad
    return result


def _robust_z(values: np.ndarray, floor: float) -> np.ndarray:
    """(x - center) / scale with a robust center and scale = max(1.4826 MAD, floor).

    Two passes: the bins that look anomalous at first sight (|z| > 3 around the median) are set
    aside and the center and MAD are taken from the rest, so that an anomaly lasting a fifth of
    the run neither drags the center towards itself nor inflates the yardstick it is judged by.
    """
    center = float(np.median(values))
    mad = MAD_TO_SD * float(np.median(np.abs(values - center)))
    scale = max(mad, floor)
    if scale <= 0:
        return np.zeros_like(values, dtype=np.float64)
    calm = np.abs(values - center) <= 3 * scale
    if calm.sum() >= max(5, values.size // 2):
        center = float(np.median(values[calm]))
        mad = MAD_TO_SD * float(np.median(np.abs(values[calm] - center)))
        scale = max(mad, floor)
    return (values - center) / scale


def _signal_bins(
    events: np.ndarray, cols: np.ndarray, sel: np.ndarray | None, per_bin: int, n_bins: int, mad: float
) -> tuple[np.ndarray, int | None]:
    """Bins (equal event counts, acquisition order) where the signal of any channel jumps.

    Per channel, every event gets its rank among the sample's events (on a grid of
    ``SCORE_LEVELS`` quantiles); a bin's signal is its events' mean rank: a Wilcoxon rank-sum
    statistic, which moves when the bin's distribution moves (up or down, any part of it).
    Unlike raw bin medians it has a known sampling noise (``sd(rank) / sqrt(per_bin)``, the
    floor of the robust z) and stays well behaved on bimodal channels, where a bin median can
    hop between the negative and positive peaks.
    """
    n = events.shape[0] if sel is None else len(sel)
    bin_bad = np.zeros(n_bins, dtype=bool)
    if len(cols) == 0:
        return bin_bad, None
    # The rank grid of each channel, from ~4k events spread over the run. Any fixed monotone
    # grid gives a valid test (the null mean and variance are those of all the events), so the
    # grid only needs to be roughly even, not exact quantiles.
    sub = np.sort(events[:: max(1, events.shape[0] // 4096)][:, cols], axis=0)
    at = (np.arange(1, SCORE_LEVELS) * sub.shape[0]) // SCORE_LEVELS
    cuts = np.full((len(cols), SCORE_LEVELS), np.inf, dtype=np.float32)
    cuts[:, :-1] = sub[at].T
    rows = np.arange(0) if sel is None else np.asarray(sel, dtype=np.int64)
    kernel = _kernels()["ranks"]
    sums, tot, tot2 = kernel(events, rows, np.asarray(cols, dtype=np.int64), cuts, per_bin, n_bins)
    counts = np.full(n_bins, per_bin, dtype=np.float64)
    counts[-1] = n - (n_bins - 1) * per_bin
    flagged_per_col = np.zeros(len(cols), dtype=np.int64)
    for k in range(len(cols)):
        if cuts[k, 0] == cuts[k, -2]:
            continue  # (mostly) constant channel: nothing to judge
        var = tot2[k] / n - (tot[k] / n) ** 2
        if var <= 0:
            continue
        hit = np.abs(_robust_z(sums[:, k] / counts, math.sqrt(var / per_bin))) > mad
        flagged_per_col[k] = int(hit.sum())
        bin_bad |= hit
    worst = int(cols[int(np.argmax(flagged_per_col))]) if flagged_per_col.any() else None
    return bin_bad, worst


_KERNELS: dict = {}


def _kernels() -> dict:
    """The compiled kernels (numba is imported on first use: `cytopipe --help` stays fast)."""
    if not _KERNELS:
        import numba

        jit = numba.njit(cache=True, nogil=True)
        _KERNELS.update(ranks=jit(_rank_sums), margins=jit(_margins))
    return _KERNELS


def _rank_sums(events, rows, cols, cuts, per_bin, n_bins):  # pragma: no cover - compiled
    """Per bin and channel, the sum of the events' ranks on the quantile grid (branch-free binary
    search over ``SCORE_LEVELS`` = 64 cuts). Bin by bin, one channel at a time over the bin's
    rows (a few kB, in cache): the searches of successive events are independent, so the CPU
    overlaps them (1.8x faster than channel-inner order). The rank sums are integers, added
    exactly in any order, so the order does not change a value."""
    n = events.shape[0] if rows.shape[0] == 0 else rows.shape[0]
    k = cols.shape[0]
    sums = np.zeros((n_bins, k))
    tot = np.zeros(k)
    tot2 = np.zeros(k)
    direct = rows.shape[0] == 0
    for b in range(n_bins):
        start = b * per_bin
        stop = n if b == n_bins - 1 else min(n, start + per_bin)  # the last bin takes the remainder
        for c in range(k):
            col = cols[c]
            acc = 0
            acc2 = 0
            for i in range(start, stop):
                v = events[i if direct else rows[i], col]
                pos = 0
                step = 32
                while step > 0:
                    pos += step * (cuts[c, pos + step - 1] <= v)
                    step >>= 1
                acc += pos
                acc2 += pos * pos
            sums[b, c] += acc
            tot[c] += acc
            tot2[c] += acc2
    return sums, tot, tot2


def _rate_bins(t: np.ndarray, per_bin: int, n_bins: int, mad: float) -> np.ndarray:
    """Bins whose event rate (events / duration, on a log scale) departs from the typical rate.

    ``t`` is the time channel in acquisition order. A clog stretches a bin's duration, a burst
    shrinks it. Noise floor: the log-duration of k Poisson arrivals has sd ~ 1/sqrt(k), plus
    the clock tick relative to the typical duration.
    """
    t = t.astype(np.float64)
    starts = np.arange(n_bins) * per_bin
    ends = np.append(starts[1:], t.shape[0] - 1)  # next bin's first event (last bin: last event)
    intervals = (ends - starts).astype(np.float64)
    duration = t[ends] - t[starts]
    d = np.diff(t)
    d = d[d > 0]
    if d.size == 0:
        return np.zeros(n_bins, dtype=bool)
    tick = float(d.min())
    typical = float(np.median(duration))
    if typical <= 0:
        return np.zeros(n_bins, dtype=bool)
    log_rate = np.log(intervals / np.maximum(duration, tick))
    floor = math.sqrt(1.0 / per_bin + (tick / typical) ** 2)
    return np.abs(_robust_z(log_rate, floor)) > mad


def _close_short_gaps(bin_bad: np.ndarray, consecutive: int) -> np.ndarray:
    """Flag runs of fewer than ``consecutive`` good bins lying between two flagged bins."""
    if consecutive <= 0 or bin_bad.sum() < 2:
        return bin_bad
    bad_idx = np.flatnonzero(bin_bad)
    gaps = np.diff(bad_idx) - 1  # good bins between consecutive bad bins
    out = bin_bad.copy()
    for start, gap in zip(bad_idx[:-1], gaps):
        if 0 < gap < consecutive:
            out[start + 1 : start + 1 + gap] = True
    return out


# --- the whole event QC of one sample ----------------------------------------------------------
@dataclass
class QCReport:
    """Per-sample QC outcome. Masks are over the sample's original events."""

    n_events: int
    margin: np.ndarray
    time: np.ndarray
    margin_counts: dict[str, int] = field(default_factory=dict)
    time_result: TimeResult | None = None

    @property
    def removed(self) -> np.ndarray:
        return self.margin | self.time

    @property
    def keep(self) -> np.ndarray:
        return ~self.removed

    nonfinite: int = 0

    def metrics(self, settings: QCSettings) -> dict[str, Any]:
        return qc_metrics(
            self.n_events,
            int(self.margin.sum()),
            int(self.time.sum()),
            MarginResult(self.margin, self.margin_counts, self.nonfinite),
            self.time_result,
            settings,
        )


def event_qc(events: np.ndarray, channels: pd.DataFrame, settings: QCSettings | None = None) -> QCReport:
    """Margins then time anomalies on one event matrix (no compensation in between).

    The pipeline runs the same two steps with compensation between them; this helper is for
    interactive use and tests.
    """
    settings = settings or QCSettings()
    m = margin_qc(events, channels, settings)
    kept = np.flatnonzero(~m.bad)
    tr = time_qc(events, channels, settings, rows=kept if m.bad.any() else None)
    time_bad = np.zeros(events.shape[0], dtype=bool)
    time_bad[kept] = tr.bad
    return QCReport(events.shape[0], m.bad, time_bad, m.counts, tr, m.nonfinite)


def qc_metrics(
    n_events: int,
    n_margin: int,
    n_time: int,
    margin_counts: Mapping[str, int] | MarginResult,
    time_result: TimeResult | None,
    settings: QCSettings,
) -> dict[str, Any]:
    """Flat per-sample QC metrics and flags (the QC columns of samples.parquet).
    ``margin_counts``: the margin events per channel, or the :class:`MarginResult` (which also
    says how many events had NaN or infinite values: counted in ``n_margin``, and a flag)."""
    nonfinite = 0
    if isinstance(margin_counts, MarginResult):
        margin_counts, nonfinite = margin_counts.counts, margin_counts.nonfinite
    removed = n_margin + n_time
    after = n_events - removed
    frac = removed / n_events if n_events else 0.0
    flags = []
    if nonfinite:
        flags.append(
            f"nonfinite_events: {nonfinite} event(s) had a NaN or infinite value and were removed "
            "(counted with the margin events); check the instrument's export"
        )
    if after < settings.min_events:
        flags.append(f"too_few_events: {after} left after QC (< {settings.min_events})")
    if frac > settings.max_removed_fraction:
        flags.append(
            f"high_qc_loss: QC removed {100 * frac:.1f}% of events "
            f"(> {100 * settings.max_removed_fraction:.0f}%)"
        )
    tr = time_result or TimeResult(np.zeros(0, bool))
    return {
        "events_before_qc": int(n_events),
        "events_after_qc": int(after),
        "qc_removed_fraction": float(frac),
        "qc_margin_events": int(n_margin),
        "qc_margin_by_channel": ";".join(f"{k}={v}" for k, v in sorted(margin_counts.items())),
        "qc_time_events": int(n_time),
        "qc_time_bins": int(tr.n_bins),
        "qc_signal_bins_flagged": int(tr.signal_bins_flagged),
        "qc_rate_bins_flagged": int(tr.rate_bins_flagged),
        "qc_worst_channel": tr.worst_channel or "",
        "qc_note": tr.note,
        "qc_flags": flags,
    }


def flag_loss_outliers(removed_fraction: pd.Series, settings: QCSettings) -> pd.Series:
    """True for samples whose QC loss is a robust outlier among the study's samples.

    An outlier removes more than ``median + loss_outlier_mad x 1.4826 MAD`` of the study and at
    least 5% of its events (small absolute losses are never unusual).
    """
    x = removed_fraction.astype(float)
    ok = x.notna()
    out = pd.Series(False, index=x.index)
    if ok.sum() < 5:
        return out
    center = float(x[ok].median())
    mad = MAD_TO_SD * float((x[ok] - center).abs().median())
    limit = center + settings.loss_outlier_mad * max(mad, 0.01)
    return ok & (x > limit) & (x >= 0.05)


# --- 3. counts ----------------------------------------------------------------------------------
def add_count_qc(stats: pd.DataFrame, settings: QCSettings | None = None) -> pd.DataFrame:
    """Add ``pct_parent_ci_low``/``pct_parent_ci_high`` (0-100, Wilson) and ``low_parent_count``.

    A missing count (a population not measured in its sample) has no interval (NaN), and a
    missing parent count is not a low one (``low_parent_count`` False)."""
    settings = settings or QCSettings()
    out = stats.copy()
    count = out["count"].to_numpy(dtype=np.float64, na_value=np.nan)
    parent = out["parent_count"].to_numpy(dtype=np.float64, na_value=np.nan)
    lo, hi = wilson_interval(count, parent, 1 - settings.confidence)
    out["pct_parent_ci_low"] = 100 * lo
    out["pct_parent_ci_high"] = 100 * hi
    out["low_parent_count"] = parent < settings.min_parent_events  # NaN (not measured): False
    return out
