"""Instrument profiles: how one cytometer (with its set-up) turns cells into numbers.

The default simulator writes one instrument (an 18-bit BD-like LSRFortessa with well separated
markers). A profile changes everything a gating template must not depend on:

* **detector range and units**: 18-bit ($PnR 262144), 22-bit ($PnR 4194304, values ~8-24x larger)
  or floating-point ($PnR 1048576) fluorescence cytometers, and mass cytometry (ion counts, no
  scatter, DNA / event-length / cisplatin channels, arcsinh cofactor 5);
* **fluorochrome brightness**: each marker's positive-negative separation in arcsinh units (at the
  instrument's own cofactor: 150 x its unit scale, 5 for mass cytometry) drawn from published
  ranges - lineage markers 2-3.8, FOXP3 1.5-2.5, dim activation markers 1-2 (shoulders, not peaks);
* **negative spread**: autofluorescence, photon-statistics and electronic-noise multipliers;
* **scatter geometry and voltages**: where the lymphocyte cluster sits on FSC/SSC, the FSC-H/FSC-A
  ratio of single cells;
* **spillover**: a matrix drawn for the profile's fluorochrome order;
* **per-file drift** (log-normal sd of each detector's gain per file, ~0.15 arcsinh units);
* **names**: fluorochromes, detector ``$PnN`` names and ``$PnS`` spellings (``CD279``,
  ``Live/Dead Yellow-A [Live]``...).

Named profiles approximate instrument families (their channel names, ranges and fluorochromes);
``random`` draws a fluorescence profile from the ranges, ``random-mass`` a mass cytometer. Nothing
here was tuned to make a gating template pass or fail: the ranges are those of the literature
(e.g. stain indices of the OMIP panels, Maecker & Trotter 2006 on cytometer set-up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cytopipe.simulate import params as P
from cytopipe.simulate._rng import stream
from cytopipe.simulate.cohort import SimulationError

#: markers whose positivity is a continuum: their truth is "above the FMO threshold"
THRESHOLD_MARKERS = ("CXCR5", "PD-1", "CXCR3", "CCR6")
#: markers with an FMO control and a recorded true threshold (dim or continuous markers)
DIM_MARKERS = ("CD25", "CD127", "CXCR3", "CCR6", "CXCR5", "PD-1", "CD56")
LINEAGE_MARKERS = ("CD3", "CD4", "CD8", "CD45RA", "CD16")
#: percentile of the FMO control (on the marker's parent) that defines the true threshold
FMO_PERCENTILE = 99.5
#: the parent population an FMO threshold is read on (canonical population names)
FMO_PARENT = {
    "CD25": "CD4 T",
    "CD127": "CD4 T",
    "CXCR3": "Memory CD4",
    "CCR6": "Memory CD4",
    "CXCR5": "Memory CD4",
    "PD-1": "cTfh",
    "CD56": "CD3- live lymphocytes",
}

# reference (default simulator) medians of the positive and negative state of each marker:
# the brightness of a profile rescales a marker so that these two are `separation` apart
_POS_REF = {
    "CD3": 9000, "CD8": 12000, "CD25": 6000, "Viability": 25000, "CD4": 7000, "CXCR5": 2000,
    "PD-1": 2000, "CXCR3": 1800, "CD45RA": 9000, "CD56": 2200, "CCR6": 2000, "CD127": 5000,
    "FOXP3": 2500, "CD16": 8000,
}  # fmt: skip
_NEG_REF = {
    "CD3": 0, "CD8": 0, "CD25": 120, "Viability": 150, "CD4": 0, "CXCR5": 70, "PD-1": 80, "CXCR3": 60,
    "CD45RA": 110, "CD56": 0, "CCR6": 70, "CD127": 140, "FOXP3": 80, "CD16": 0,
}  # fmt: skip

#: separation ranges (arcsinh units at the instrument's own cofactor) by marker class
SEPARATION = {
    "lineage": (2.0, 3.8),
    "FOXP3": (1.5, 2.5),
    "Viability": (2.5, 4.0),
    "dim": (1.0, 2.0),
    "CD56": (1.5, 2.5),
}

#: $PnS spellings seen in real files, per marker (the first is the plain name)
PNS_VARIANTS = {
    "CD3": ("CD3", "CD3e", "CD3 {fl}", "{fl}-CD3", "CD3_{fl}"),
    "CD8": ("CD8", "CD8a", "CD8 {fl}", "{fl}-CD8a"),
    "CD25": ("CD25", "CD25 {fl}", "IL-2Ra", "CD25_IL2RA"),
    "Viability": (
        "Viability",
        "Live/Dead Yellow-A [Live]",
        "LIVE/DEAD Aqua",
        "Zombie NIR",
        "FVS780",
        "Live Dead Blue",
        "L/D {fl}",
    ),  # fmt: skip
    "CD4": ("CD4", "CD4 {fl}", "{fl}-CD4"),
    "CXCR5": ("CXCR5", "CD185", "CD185 (CXCR5)", "CXCR5 {fl}"),
    "PD-1": ("PD-1", "CD279", "PD1", "CD279 (PD-1)", "PD-1 {fl}"),
    "CXCR3": ("CXCR3", "CD183", "CXCR3 {fl}"),
    "CD45RA": ("CD45RA", "CD45RA {fl}", "{fl}-CD45RA"),
    "CD56": ("CD56", "NCAM", "CD56 {fl}", "CD56_NCAM"),
    "CCR6": ("CCR6", "CD196", "CCR6 {fl}"),
    "CD127": ("CD127", "IL-7Ra", "CD127 {fl}", "IL7R"),
    "FOXP3": ("FOXP3", "FoxP3", "Foxp3 {fl}"),
    "CD16": ("CD16", "FcgRIII", "CD16 {fl}", "CD16a"),
}


@dataclass
class Instrument:
    """One instrument (with its set-up) of a simulated trial.

    Per marker (``params.MARKERS`` order): ``detectors`` ($PnN), ``fluors``, ``pns`` ($PnS),
    ``brightness`` (factor on the reference abundances), ``separation`` (the arcsinh separation it
    was solved for). ``scale`` converts reference (18-bit) units to this instrument's units.
    """

    name: str
    kind: str  # "fluorescence" | "mass"
    cytometer: str
    pnr: float
    scale: float
    cofactor: float  # the instrument's own arcsinh cofactor (150 x scale; 5 for mass cytometry)
    detectors: tuple[str, ...]
    fluors: tuple[str, ...]
    pns: tuple[str, ...]
    separation: np.ndarray
    brightness: np.ndarray
    spillover: np.ndarray
    af_mult: float = 1.0
    photon_mult: float = 1.0
    electronic_mult: float = 1.0
    continuum_sd: np.ndarray = field(default_factory=lambda: np.zeros(P.N_FLUOR))
    intermediate: np.ndarray = field(default_factory=lambda: np.zeros(P.N_FLUOR))
    cd56_gamma: float = 1.0
    fsc_gain: float = 1.0
    ssc_gain: float = 1.0
    fsch_ratio: float = P.FSC_H_RATIO
    drift_sd: float = 0.15
    batch_gain_sd: float = 0.05
    scatter: tuple[str, ...] = ("FSC-A", "FSC-H", "SSC-A")
    extra_scatter: tuple[str, ...] = ()  # e.g. Aurora's SSC-B-A (a copy of SSC with its own gain)
    float_data: bool = False  # values not rounded to whole detector units

    @property
    def has_scatter(self) -> bool:
        return self.kind != "mass"

    def describe(self) -> dict:
        """A flat, CSV-friendly description (``truth/instruments.csv``)."""
        out = {
            "instrument": self.name, "kind": self.kind, "cytometer": self.cytometer, "pnr": self.pnr,
            "scale": round(self.scale, 6), "cofactor": round(self.cofactor, 6),
            "af_mult": round(self.af_mult, 6), "photon_mult": round(self.photon_mult, 6),
            "electronic_mult": round(self.electronic_mult, 6), "fsc_gain": round(self.fsc_gain, 6),
            "ssc_gain": round(self.ssc_gain, 6), "fsch_ratio": round(self.fsch_ratio, 6),
            "drift_sd": round(self.drift_sd, 6), "cd56_gamma": round(self.cd56_gamma, 6),
        }  # fmt: skip
        for j, m in enumerate(P.MARKERS):
            out[f"channel_{m}"] = self.detectors[j]
            out[f"pns_{m}"] = self.pns[j]
            out[f"separation_{m}"] = round(float(self.separation[j]), 6)
        return out


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def marker_class(marker: str) -> str:
    if marker in LINEAGE_MARKERS:
        return "lineage"
    if marker in ("FOXP3", "Viability", "CD56"):
        return marker
    return "dim"


def solve_brightness(marker: str, separation: float, af: float) -> float:
    """Factor b on the reference abundances that puts the marker's positive median ``separation``
    arcsinh units (cofactor 150, reference units) above its negative (autofluorescence + b x
    non-specific staining): asinh(b pos / 150) - asinh((af + b neg) / 150) = separation."""
    pos, neg = _POS_REF[marker], _NEG_REF[marker]
    lo, hi = 1e-3, 1e3
    for _ in range(80):  # bisection on log b: the separation grows with b
        b = float(np.sqrt(lo * hi))
        s = np.arcsinh(b * pos / 150.0) - np.arcsinh((af + b * neg) / 150.0)
        lo, hi = (b, hi) if s < separation else (lo, b)
    return float(np.sqrt(lo * hi))


def random_spillover(k: int, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A spillover matrix for k fluorochromes in spectral order: neighbours spill 2-30%, the next
    ones up to 8%, a few distant pairs (cross-laser excitation) up to 3%."""
    s = np.eye(k)
    for i in range(k):
        for j in range(k):
            d = abs(i - j)
            if d == 1:
                s[i, j] = rng.uniform(0.02, 0.30) * (1.0 if j > i else 0.35)
            elif d == 2:
                s[i, j] = rng.uniform(0.0, 0.08) * (1.0 if j > i else 0.3)
            elif d > 2 and rng.random() < 0.12:
                s[i, j] = rng.uniform(0.0, 0.03)
    off = ~np.eye(k, dtype=bool)
    s[off] *= strength
    return np.round(s, 4)


def _mass_spillover(k: int, rng: np.random.Generator) -> np.ndarray:
    """Mass cytometry crosstalk: isotopic impurity (M+-1, 0.3-3%) and oxidation (M+16, 0.5-2%)."""
    s = np.eye(k)
    for i in range(k - 1):
        s[i, i + 1] = rng.uniform(0.003, 0.03)
        s[i + 1, i] = rng.uniform(0.0, 0.01)
    for i in range(k - 3):
        if rng.random() < 0.5:
            s[i, i + 3] = rng.uniform(0.005, 0.02)  # the channel ~16 Da heavier in this panel
    return np.round(s, 4)


def _pns(marker: str, fluor: str, rng: np.random.Generator | None) -> str:
    variants = PNS_VARIANTS[marker]
    text = variants[0] if rng is None else variants[int(rng.integers(len(variants)))]
    return text.format(fl=fluor.removesuffix("-A"))


# fluorochromes by instrument family, in spectral (detector) order
_FL_BD = (
    "BUV395", "BUV496", "BUV563", "BUV661", "BUV737", "BUV805", "BV421", "BV480", "BV510", "BV570",
    "BV605", "BV650", "BV711", "BV750", "BV786", "FITC", "BB700", "PerCP-Cy5.5", "PE", "PE-CF594",
    "PE-Cy5", "PE-Cy7", "APC", "Alexa Fluor 700", "APC-H7", "APC-R700",
)  # fmt: skip
_FL_AURORA = (
    "BUV395", "BUV496", "BUV563", "BUV615", "BUV661", "BUV737", "BUV805", "BV421", "Super Bright 436",
    "BV480", "LIVE DEAD Yellow", "BV510", "BV570", "BV605", "BV650", "BV711", "BV750", "BV786",
    "Spark Blue 550", "FITC", "PerCP", "PerCP-eFluor 710", "PE", "PE-Dazzle594", "PE-Cy5",
    "PE-Fire 640", "PE-Cy7", "APC", "Spark NIR 685", "APC-Fire 750", "APC-Fire 810",
)  # fmt: skip
_ATTUNE = (
    "UV1", "UV2", "UV3", "VL1", "VL2", "VL3", "VL4", "VL5", "VL6", "BL1", "BL2", "BL3", "YL1", "YL2",
    "YL3", "YL4", "RL1", "RL2", "RL3",
)  # fmt: skip
_ATTUNE_FL = {
    "UV1": "BUV395", "UV2": "BUV496", "UV3": "BUV737", "VL1": "BV421", "VL2": "BV510", "VL3": "BV605",
    "VL4": "BV711", "VL5": "BV786", "VL6": "BV650", "BL1": "FITC", "BL2": "PerCP-eF710",
    "BL3": "PerCP-Cy5.5", "YL1": "PE", "YL2": "PE-Dazzle594", "YL3": "PE-Cy5", "YL4": "PE-Cy7",
    "RL1": "APC", "RL2": "Alexa Fluor 700", "RL3": "APC-Cy7",
}  # fmt: skip
# mass cytometry: (metal, mass) in mass order
_METALS = (
    ("Y", 89), ("Pr", 141), ("Nd", 142), ("Nd", 143), ("Nd", 144), ("Nd", 145), ("Nd", 146),
    ("Sm", 147), ("Nd", 148), ("Sm", 149), ("Nd", 150), ("Eu", 151), ("Sm", 152), ("Eu", 153),
    ("Sm", 154), ("Gd", 155), ("Gd", 156), ("Gd", 158), ("Tb", 159), ("Gd", 160), ("Dy", 161),
    ("Dy", 162), ("Dy", 163), ("Dy", 164), ("Ho", 165), ("Er", 166), ("Er", 167), ("Er", 168),
    ("Tm", 169), ("Er", 170), ("Yb", 171), ("Yb", 172), ("Yb", 173), ("Yb", 174), ("Lu", 175),
    ("Yb", 176), ("Bi", 209),
)  # fmt: skip
# viability is cisplatin (195Pt) on a mass cytometer, listed separately
_MASS_MARKERS = tuple(m for m in P.MARKERS if m != "Viability")


def _detectors_for(family: str, order: np.ndarray) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Detector $PnN and fluorochrome names of the 14 markers; ``order`` = sorted indices into
    the family's list (spectral order), assigned to P.MARKERS through a permutation."""
    if family == "attune":
        names = [_ATTUNE[i] for i in order]
        return tuple(f"{n}-A" for n in names), tuple(_ATTUNE_FL[n] for n in names)
    fl = _FL_AURORA if family == "aurora" else _FL_BD
    names = [fl[i] for i in order]
    return tuple(f"{n}-A" for n in names), tuple(names)


def _assign(rng: np.random.Generator, n_family: int) -> np.ndarray:
    """14 distinct detectors of the family (spectral order kept) assigned to markers at random."""
    chosen = np.sort(rng.choice(n_family, P.N_FLUOR, replace=False))
    return chosen[rng.permutation(P.N_FLUOR)]


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------
NAMED = ("fortessa", "symphony", "aurora", "attune", "cytof")
RANGES = ("18-bit", "22-bit", "float")


def _fluorescence(name: str, rng: np.random.Generator, spec: dict) -> Instrument:
    """A fluorescence profile: ``spec`` fixes some properties, the rest are drawn from ``rng``."""
    family = spec.get("family") or ("bd", "aurora", "attune")[int(rng.integers(3))]
    det_range = spec.get("range") or {"bd": "18-bit", "aurora": "22-bit", "attune": "float"}[family]
    if det_range == "18-bit":
        pnr, scale = 262144.0, 1.0
    elif det_range == "22-bit":
        pnr, scale = 4194304.0, float(rng.uniform(8.0, 24.0))
    else:
        pnr, scale = 1048576.0, float(rng.uniform(2.0, 6.0))
    if "detectors" in spec:
        detectors, fluors = spec["detectors"], spec["fluors"]
    else:
        n_family = {"bd": len(_FL_BD), "aurora": len(_FL_AURORA), "attune": len(_ATTUNE)}[family]
        detectors, fluors = _detectors_for(family, _assign(rng, n_family))
    af_mult = spec.get("af_mult", float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))))
    sep = np.array([rng.uniform(*SEPARATION[marker_class(m)]) for m in P.MARKERS])
    sep = np.array([spec.get("separation", {}).get(m, s) for m, s in zip(P.MARKERS, sep)])
    af = P.AUTOFLUORESCENCE * af_mult
    bright = np.array([solve_brightness(m, s, af[j]) for j, (m, s) in enumerate(zip(P.MARKERS, sep))])
    # spillover rows/columns follow the detectors' spectral order
    k = P.N_FLUOR
    if "spillover" in spec:
        spill = spec["spillover"]
    else:
        order = np.argsort(np.argsort(_spectral_rank(family, detectors)))
        base = random_spillover(k, rng, strength=spec.get("spill_strength", float(rng.uniform(0.5, 1.3))))
        spill = base[np.ix_(order, order)]
    dim = np.array([marker_class(m) == "dim" for m in P.MARKERS])
    pns_rng = None if spec.get("plain_pns") else rng
    return Instrument(
        name=name,
        kind="fluorescence",
        cytometer=spec.get("cytometer", {"bd": "BD LSRFortessa", "aurora": "Cytek Aurora", "attune": "Attune NxT"}[family]),
        pnr=pnr,
        scale=scale,
        cofactor=150.0 * scale,
        detectors=tuple(detectors),
        fluors=tuple(fluors),
        pns=tuple(spec["pns"]) if "pns" in spec else tuple(_pns(m, f, pns_rng) for m, f in zip(P.MARKERS, fluors)),
        separation=sep,
        brightness=bright,
        spillover=spill,
        af_mult=af_mult,
        photon_mult=spec.get("photon_mult", float(np.exp(rng.uniform(np.log(0.5), np.log(2.5))))),
        electronic_mult=spec.get("electronic_mult", float(np.exp(rng.uniform(np.log(0.5), np.log(3.0))))),
        continuum_sd=np.where(dim, rng.uniform(0.15, 0.40, k), 0.0),
        intermediate=np.where(dim, rng.uniform(0.05, 0.25, k), 0.0),
        cd56_gamma=float(rng.uniform(0.6, 1.0)),
        fsc_gain=spec.get("fsc_gain", float(rng.uniform(0.5, 1.7))),
        ssc_gain=spec.get("ssc_gain", float(rng.uniform(0.5, 2.5))),
        fsch_ratio=spec.get("fsch_ratio", float(rng.uniform(0.65, 0.95))),
        drift_sd=spec.get("drift_sd", float(rng.uniform(0.08, 0.20))),
        extra_scatter=("SSC-B-A",) if family == "aurora" else (),
        float_data=det_range != "18-bit" or family == "aurora",
    )  # fmt: skip


def _spectral_rank(family: str, detectors) -> list[int]:
    names = [d.removesuffix("-A") for d in detectors]
    if family == "attune":
        return [_ATTUNE.index(n) for n in names]
    fl = _FL_AURORA if family == "aurora" else _FL_BD
    return [fl.index(n) for n in names]


def _mass(name: str, rng: np.random.Generator, spec: dict) -> Instrument:
    """A mass cytometer: 13 metal-tagged antibodies + cisplatin viability; ion-count units."""
    picks = np.sort(rng.choice(len(_METALS), len(_MASS_MARKERS), replace=False))
    perm = rng.permutation(len(_MASS_MARKERS))
    metal = {m: _METALS[picks[perm[i]]] for i, m in enumerate(_MASS_MARKERS)}
    metal["Viability"] = ("Pt", 195)
    detectors = tuple(f"{metal[m][0]}{metal[m][1]}Di" for m in P.MARKERS)
    fluors = tuple(f"{metal[m][1]}{metal[m][0]}" for m in P.MARKERS)
    pns = tuple(
        f"{metal[m][1]}{metal[m][0]}_{'Cisplatin' if m == 'Viability' else _pns(m, '', rng).strip()}"
        for m in P.MARKERS
    )
    sep = np.array([rng.uniform(*SEPARATION[marker_class(m)]) for m in P.MARKERS])
    # ion counts: a negative cell gives ~0-2 counts; cofactor 5. In reference units (cofactor 150)
    # the same arcsinh geometry means scale = 5 / 150.
    scale = 5.0 / 150.0
    af_mult = float(rng.uniform(0.05, 0.2))  # no autofluorescence: background ions only
    af = P.AUTOFLUORESCENCE * af_mult
    bright = np.array([solve_brightness(m, s, af[j]) for j, (m, s) in enumerate(zip(P.MARKERS, sep))])
    order = np.argsort([metal[m][1] for m in P.MARKERS])
    spill_sorted = _mass_spillover(P.N_FLUOR, rng)
    inv_order = np.argsort(order)
    spill = spill_sorted[np.ix_(inv_order, inv_order)]
    dim = np.array([marker_class(m) == "dim" for m in P.MARKERS])
    k = P.N_FLUOR
    return Instrument(
        name=name, kind="mass", cytometer=spec.get("cytometer", "CyTOF XT"), pnr=65536.0, scale=scale,
        cofactor=5.0, detectors=detectors, fluors=fluors, pns=pns, separation=sep, brightness=bright,
        spillover=spill, af_mult=af_mult, photon_mult=1.0, electronic_mult=0.0,
        continuum_sd=np.where(dim, rng.uniform(0.15, 0.40, k), 0.0),
        intermediate=np.where(dim, rng.uniform(0.05, 0.25, k), 0.0),
        cd56_gamma=float(rng.uniform(0.6, 1.0)), drift_sd=float(rng.uniform(0.05, 0.15)),
        scatter=(), float_data=True,
    )  # fmt: skip


def _named_spec(name: str) -> dict:
    if name == "fortessa":
        return dict(
            family="bd", range="18-bit", detectors=P.DETECTORS,
            fluors=tuple(d.removesuffix("-A") for d in P.DETECTORS), spillover=P.spillover_matrix(),
            separation={"CXCR5": 1.6, "PD-1": 1.4, "CXCR3": 1.7, "CCR6": 1.8, "CD25": 1.9, "CD127": 1.7},
            cytometer="BD LSRFortessa X-20", fsc_gain=0.85, ssc_gain=1.3, drift_sd=0.15,
        )  # fmt: skip
    if name == "symphony":
        return dict(family="bd", range="18-bit", cytometer="BD FACSymphony A5", fsc_gain=1.4, ssc_gain=0.7)
    if name == "aurora":
        return dict(family="aurora", range="22-bit", cytometer="Cytek Aurora 5L")
    if name == "attune":
        return dict(family="attune", range="float", cytometer="Attune NxT")
    if name == "cytof":
        return dict(cytometer="CyTOF XT")
    raise SimulationError(
        f"unknown instrument {name!r}; choose one of {', '.join(NAMED)}, 'random' or 'random-mass'"
    )


def make_instrument(name: str, seed: int = 0, key: str = "") -> Instrument:
    """The instrument profile ``name`` (``fortessa``, ``symphony``, ``aurora``, ``attune``,
    ``cytof``, ``random`` or ``random-mass``).

    Named profiles are fixed (their drawn properties come from a stream keyed by the name only);
    ``random`` profiles are drawn from ``(seed, key)`` (e.g. key = a site or batch name).
    """
    if name in ("random", "random-mass"):
        rng = stream(seed, "instrument", name, key)
        label = f"{name}:{seed}:{key}" if key else f"{name}:{seed}"
        return _mass(label, rng, {}) if name == "random-mass" else _fluorescence(label, rng, {})
    spec = _named_spec(name)
    rng = stream(0, "named-instrument", name)
    return _mass(name, rng, spec) if name == "cytof" else _fluorescence(name, rng, spec)
