"""Event layer of an instrument profile: the same cells as the default simulator, measured by
another instrument (brightness, continua, spillover, noise, range, scatter geometry, drift).

The cells (latent states, reference abundances, noise-free scatter) come from
:func:`cytopipe.simulate.events.draw_cells`; this module changes only how they are expressed and
measured. Dim markers whose positivity is a continuum (``instruments.THRESHOLD_MARKERS``) get
their truth from the instrument's TRUE threshold: the 99.5th percentile of the marker's FMO
control on its parent population, computed once per instrument from a large simulated FMO; an
event is positive when its noise-free compensated value (specific staining + its own
autofluorescence) lies above it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cytopipe.simulate import params as P
from cytopipe.simulate._exact import inv, matmul
from cytopipe.simulate._rng import stream
from cytopipe.simulate.events import Cells, EventData, _lymphocytes, acquisition_times
from cytopipe.simulate.instruments import (
    _NEG_REF,
    _POS_REF,
    DIM_MARKERS,
    FMO_PARENT,
    FMO_PERCENTILE,
    THRESHOLD_MARKERS,
    Instrument,
)
from cytopipe.simulate.populations import CATEGORY, FLAG, LINEAGE

FLAG_OF = {"CXCR5": "cxcr5_pos", "PD-1": "pd1_pos", "CXCR3": "cxcr3_pos", "CCR6": "ccr6_pos"}
_NK = (LINEAGE["NK CD56bright"], LINEAGE["NK CD56dim"])
THRESHOLD_EVENTS = 200_000  # lymphocytes simulated per instrument to locate its true thresholds


def channel_names(inst: Instrument) -> list[str]:
    """$PnN of a file written by ``inst``, in file order."""
    if inst.kind == "mass":
        return ["Time", "Event_length", "Ir191Di", "Ir193Di", "Y89Di", "Er166Di", *inst.detectors]
    return [*inst.scatter, *inst.extra_scatter, *inst.detectors, "Time"]


def channel_pns(inst: Instrument) -> list[str]:
    if inst.kind == "mass":
        return ["", "", "191Ir_DNA1", "193Ir_DNA2", "89Y_CD45", "166Er_CD14", *inst.pns]
    return [""] * (len(inst.scatter) + len(inst.extra_scatter)) + list(inst.pns) + [""]


def fluor_slice(inst: Instrument) -> slice:
    """Columns of the 14 marker detectors in the event matrix."""
    start = 6 if inst.kind == "mass" else len(inst.scatter) + len(inst.extra_scatter)
    return slice(start, start + P.N_FLUOR)


# --------------------------------------------------------------------------------------------
# expression
# --------------------------------------------------------------------------------------------
def express(F: np.ndarray, flags: np.ndarray, lineage: np.ndarray, inst: Instrument, rng) -> np.ndarray:
    """Abundances in instrument units (n x 14, float32): CD56 dim/bright compression on NK cells,
    continua of the dim markers (extra log-normal smear, intermediate cells), brightness."""
    G = np.array(F, dtype=np.float32, copy=True)
    n = len(G)
    j56 = P.MI["CD56"]
    nk = np.isin(lineage, _NK)
    if inst.cd56_gamma != 1.0 and nk.any():
        ref = np.float32(_POS_REF["CD56"])
        G[nk, j56] = ref * np.power(G[nk, j56] / ref, np.float32(inst.cd56_gamma))
    treg = (flags & FLAG["treg"]) != 0
    for j, marker in enumerate(P.MARKERS):
        sd = float(inst.continuum_sd[j])
        if sd <= 0:
            continue
        G[:, j] *= np.exp(np.float32(sd) * rng.standard_normal(n, dtype=np.float32))
        # intermediate cells on the way between negative and positive (activation continuum);
        # Tregs keep their CD25hi CD127lo phenotype
        pick = (rng.random(n) < inst.intermediate[j]) & (G[:, j] > 0)
        if marker in ("CD25", "CD127"):
            pick &= ~treg
        k = int(pick.sum())
        neg, pos = max(_NEG_REF[marker], 30.0), _POS_REF[marker]
        u = rng.uniform(0.15, 0.85, k)
        G[pick, j] = (neg * (pos / neg) ** u).astype(np.float32)
    G *= (inst.brightness * inst.scale).astype(np.float32)
    return G


def _afc(inst: Instrument) -> np.ndarray:
    """Compensated autofluorescence per unit AF level (14,), instrument units."""
    af = P.AUTOFLUORESCENCE * inst.af_mult * inst.scale
    return matmul(af[None, :], inv(inst.spillover))[0]


def measure(G: np.ndarray, af_level: np.ndarray, inst: Instrument, rng) -> np.ndarray:
    """Detector values (n x 14, float32) of abundances ``G``: spillover, autofluorescence,
    photon and electronic noise (fluorescence) or Poisson ion counts (mass cytometry)."""
    S = inst.spillover.astype(np.float32)
    signal = matmul(G, S)
    af = (P.AUTOFLUORESCENCE * inst.af_mult * inst.scale).astype(np.float32)
    signal += af_level[:, None].astype(np.float32) * af
    if inst.kind == "mass":
        counts = rng.poisson(np.maximum(signal, 0.0).astype(np.float64)).astype(np.float32)
        # CyTOF software spreads integer counts by -U(0, 1) (zeros stay zero)
        counts -= np.where(counts > 0, rng.random(counts.shape, dtype=np.float32), np.float32(0.0))
        return counts
    var = np.maximum(signal, np.float32(0.0))
    var *= (P.PHOTON_Q * inst.photon_mult * inst.scale).astype(np.float32)
    var += ((P.ELECTRONIC_SD * inst.electronic_mult * inst.scale) ** 2).astype(np.float32)
    np.sqrt(var, out=var)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise *= var
    signal += noise
    return signal


# --------------------------------------------------------------------------------------------
# true thresholds (the FMO percentile on the parent, at the instrument's nominal set-up)
# --------------------------------------------------------------------------------------------
def reference_composition() -> dict[str, float]:
    """Composition of a typical donor (baseline medians of the cohort model)."""
    b = {k: v[0] for k, v in P.IMMUNE.items()}
    return {
        "p_nk": b["nk"], "p_t": (1 - b["nk"]) * b["t_of_non_nk"], "p_cd4": b["cd4"],
        "p_cd8": 1 - b["cd4"] - P.P_DN - P.P_DP, "p_treg": b["treg"], "p_mem": b["mem"],
        "p_th1": b["th1"], "p_th17": b["th17"], "p_th1_17": b["th1_17"], "p_tfh": b["tfh"],
        "p_atfh": b["atfh"], "p_bright": b["bright"],
    }  # fmt: skip


def _parent_mask(name: str, flags: np.ndarray) -> np.ndarray:
    f = {k: (flags & FLAG[k]) != 0 for k in ("cd3_pos", "cd4_pos", "cd8_pos", "cd45ra_neg", "cxcr5_pos")}
    cd4 = f["cd3_pos"] & f["cd4_pos"] & ~f["cd8_pos"]
    if name == "CD4 T":
        return cd4
    if name == "Memory CD4":
        return cd4 & f["cd45ra_neg"]
    if name == "cTfh":
        return cd4 & f["cd45ra_neg"] & f["cxcr5_pos"]
    return ~f["cd3_pos"]  # CD3- live lymphocytes


@dataclass
class Thresholds:
    """True thresholds of one instrument at its nominal set-up (compensated, instrument units)."""

    linear: dict[str, float]

    def at(self, gain: float) -> dict[str, float]:
        return {m: v * gain for m, v in self.linear.items()}


def true_thresholds(inst: Instrument, seed: int, key: str, n: int = THRESHOLD_EVENTS) -> Thresholds:
    """Each dim marker's FMO_PERCENTILE on its parent (FMO_PARENT) from a large simulated FMO
    of a typical donor's live lymphocytes measured by ``inst`` (nominal gain, no drift)."""
    rng = stream(seed, "thresholds", key)
    F, flags, lineage = _lymphocytes(n, reference_composition(), rng)
    G = express(F, flags, lineage, inst, rng)
    af_level = np.exp(P.AF_EVENT_SD * rng.standard_normal(n)).astype(np.float32)
    inv_s = inv(inst.spillover)
    afc = _afc(inst)
    out: dict[str, float] = {}
    for marker in DIM_MARKERS:  # CXCR5 before PD-1: PD-1's parent (cTfh) needs CXCR5's threshold
        j = P.MI[marker]
        fmo = G.copy()
        fmo[:, j] = 0.0
        raw = measure(fmo, af_level, inst, stream(seed, "thresholds", key, marker))
        comp_j = _comp_column(raw, inv_s, j)
        parent = _parent_mask(FMO_PARENT[marker], flags)
        out[marker] = float(np.percentile(comp_j[parent], FMO_PERCENTILE))
        if marker in THRESHOLD_MARKERS:
            nf = G[:, j] + af_level * np.float32(afc[j])
            flags = _set_flag(flags, FLAG_OF[marker], nf >= out[marker])
    return Thresholds(out)


def _comp_column(raw: np.ndarray, inv_s: np.ndarray, j: int) -> np.ndarray:
    """Column j of ``raw @ inv_s`` summed in a fixed order (no BLAS)."""
    out = np.zeros(len(raw), np.float64)
    for i in range(raw.shape[1]):
        if inv_s[i, j] != 0.0:
            out += raw[:, i].astype(np.float64) * inv_s[i, j]
    return out


def _set_flag(flags: np.ndarray, name: str, on: np.ndarray) -> np.ndarray:
    flags = flags & ~FLAG[name]
    flags[on] |= FLAG[name]
    return flags


# --------------------------------------------------------------------------------------------
# one file
# --------------------------------------------------------------------------------------------
def measure_cells(
    cells: Cells,
    inst: Instrument,
    thresholds: Thresholds,
    rng: np.random.Generator,
    batch_gain: float = 1.0,
    scatter_gain: float = 1.0,
    drift: np.ndarray | None = None,
    rate: float = 2000.0,
) -> EventData:
    """The events of ``cells`` measured by ``inst``: raw (uncompensated) channels of
    :func:`channel_names`, with threshold-based truth for the continuum markers.

    ``batch_gain`` scales every detector (the batch's set-up: its true thresholds scale with it),
    ``drift`` (14,) multiplies each fluorescence detector of this file only (not the truth).
    """
    n = len(cells.F)
    flags = cells.flags.copy()
    G = express(cells.F, flags, cells.lineage, inst, rng)
    af_level = (cells.af_factor * np.exp(P.AF_EVENT_SD * rng.standard_normal(n))).astype(np.float32)
    afc = _afc(inst)
    for marker in THRESHOLD_MARKERS:
        j = P.MI[marker]
        nf = G[:, j] + af_level * np.float32(afc[j])
        flags = _set_flag(flags, FLAG_OF[marker], nf >= thresholds.linear[marker])
    fl = measure(G, af_level, inst, rng)
    gain = np.full(P.N_FLUOR, batch_gain, np.float32)
    if drift is not None:
        gain *= drift.astype(np.float32)
    fl *= gain
    top = np.float32(inst.pnr - 1)
    names = channel_names(inst)
    out = np.empty((n, len(names)), np.float32)
    sl = fluor_slice(inst)
    if inst.kind == "mass":
        np.clip(fl, 0.0, top, out=out[:, sl])
        _mass_extra_channels(out, cells, rng, top)
    else:
        np.minimum(fl, top, out=out[:, sl])
        sc = float(scatter_gain) * inst.scale
        cols = {
            "FSC-A": cells.fsc * inst.fsc_gain * sc,
            "FSC-H": cells.fsch * (inst.fsch_ratio / P.FSC_H_RATIO) * inst.fsc_gain * sc,
            "SSC-A": cells.ssc * inst.ssc_gain * sc,
            "SSC-B-A": cells.ssc * inst.ssc_gain * 0.6 * sc,
        }
        for c, name in enumerate([*inst.scatter, *inst.extra_scatter]):
            v = cols[name]
            noisy = v * (1.0 + P.SCATTER_NOISE * rng.standard_normal(n))
            noisy += P.SCATTER_NOISE_ABS * inst.scale * rng.standard_normal(n)
            out[:, c] = np.clip(noisy, 0.0, top)
    out[:, names.index("Time")] = acquisition_times(n, rate, rng)
    if not inst.float_data:  # an 18-bit digital detector reports whole channel numbers
        np.round(out[:, sl], out=out[:, sl])
    return EventData(out, flags, cells.category, cells.lineage, np.zeros(n, np.uint8))


def _mass_extra_channels(out: np.ndarray, cells: Cells, rng, top) -> None:
    """Event length, DNA (two iridium isotopes), CD45 and CD14 of a mass cytometry file."""
    n = len(cells.F)
    cat = cells.category
    debris = cat == CATEGORY["debris"]
    doublet = cat == CATEGORY["doublet"]
    mono = np.isin(cat, (CATEGORY["monocyte"], CATEGORY["dead monocyte"]))
    dna = np.where(debris, 0.08, 1.0) * np.where(doublet, 1.9, 1.0)
    dna = dna * np.exp(0.18 * rng.standard_normal(n))
    length = np.where(debris, 12.0, 20.0) + np.where(doublet, 9.0, 0.0) + 2.5 * rng.standard_normal(n)
    out[:, 1] = np.clip(np.round(length), 8, 80)
    out[:, 2] = rng.poisson(350.0 * dna)
    out[:, 3] = rng.poisson(700.0 * dna)
    cd45 = np.where(debris, 15.0, 400.0) * np.exp(0.35 * rng.standard_normal(n))
    cd14 = np.where(mono, 250.0, 0.4) * np.exp(0.4 * rng.standard_normal(n))
    out[:, 4] = np.clip(rng.poisson(cd45), 0, top)
    out[:, 5] = np.clip(rng.poisson(cd14), 0, top)


def compensated(events: np.ndarray, inst: Instrument) -> np.ndarray:
    """Compensated marker values (markers x events, float32) with the profile's true matrix."""
    fl = events[:, fluor_slice(inst)]
    inv_t = inv(inst.spillover).T.astype(np.float32)
    return matmul(inv_t, fl.T)


def file_drift(inst: Instrument, seed: int, sample_id: str) -> np.ndarray:
    """Per-file gain of each fluorescence detector (log-normal, sd ``inst.drift_sd``)."""
    z = stream(seed, "drift", sample_id).standard_normal(P.N_FLUOR)
    return np.exp(inst.drift_sd * z)


def batch_gains(seed: int, batch: str, inst: Instrument) -> tuple[float, float]:
    """(detector gain, scatter gain) of a batch's set-up."""
    g = stream(seed, "batch-setup", batch).standard_normal(2)
    return float(np.exp(inst.batch_gain_sd * g[0])), float(np.exp(P.BATCH_SCATTER_SD * g[1]))


def bead_control(marker: str | None, inst: Instrument, n: int, rng) -> EventData:
    """Capture-bead single-stain (or unstained) control measured by ``inst``."""
    pos = np.zeros(n, bool) if marker is None else rng.random(n) < 0.55
    G = np.zeros((n, P.N_FLUOR), np.float32)
    if marker is not None:
        j = P.MI[marker]
        level = 60000.0 * inst.scale if inst.kind != "mass" else 300.0
        G[pos, j] = level * np.exp(0.12 * rng.standard_normal(int(pos.sum())))
    af = np.full(n, P.AF_FACTOR["bead"], np.float32)
    fl = measure(G, af, inst, rng)
    names = channel_names(inst)
    out = np.zeros((n, len(names)), np.float32)
    top = np.float32(inst.pnr - 1)
    sl = fluor_slice(inst)
    out[:, sl] = np.clip(fl, -top, top)
    if inst.kind != "mass":
        base = {"FSC-A": 85000.0 * inst.fsc_gain, "FSC-H": 85000.0 * inst.fsc_gain * 0.9,
                "SSC-A": 30000.0 * inst.ssc_gain, "SSC-B-A": 18000.0 * inst.ssc_gain}  # fmt: skip
        for c, name in enumerate([*inst.scatter, *inst.extra_scatter]):
            out[:, c] = np.clip(base[name] * inst.scale * (1 + 0.03 * rng.standard_normal(n)), 0, top)
    else:
        out[:, 1] = np.clip(np.round(20 + 2.5 * rng.standard_normal(n)), 8, 80)
    out[:, names.index("Time")] = acquisition_times(n, 1500.0, rng)
    cat = np.where(pos, CATEGORY["bead positive"], CATEGORY["bead negative"]).astype(np.uint8)
    return EventData(
        out, np.zeros(n, np.uint32), cat, np.full(n, LINEAGE["bead"], np.uint8), np.zeros(n, np.uint8)
    )


def site_instruments(name: str, sites, seed: int) -> Mapping[str, Instrument]:
    """One profile per site: a named profile everywhere, or a random one drawn per site."""
    from cytopipe.simulate.instruments import make_instrument

    return {s: make_instrument(name, seed, s) for s in sites}
