"""Parameters of the simulated IL-2 trial: panel, optics, biology, clinical model.

Everything the generative model uses is a named constant here so that docs/simulator.md, the
oracle test and other modules can refer to one place. Intensities are linear detector units on a
0..262143 scale (an 18-bit BD-like range); "abundance" is the fluorochrome signal a cell gives in
its own primary detector (spillover diagonal = 1).
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------------
# trial design
# --------------------------------------------------------------------------------------------
ARMS = ("placebo", "IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU")
DOSES_MIU = {"placebo": 0.0, "IL-2 0.2 MIU": 0.2, "IL-2 0.5 MIU": 0.5, "IL-2 1.0 MIU": 1.0}
DEFAULT_VISITS = (0, 4, 12, 24)
SITES = ("S1", "S2", "S3")
SITE_WEIGHTS = (0.45, 0.35, 0.20)
STUDY_START = "2019-09-10"  # first patient in (NCT04077684 start date)
ENROLMENT_DAYS = 540  # patients enrol uniformly over this many days

# --------------------------------------------------------------------------------------------
# panel: 18 channels = 3 scatter + 14 fluorescence + Time
# --------------------------------------------------------------------------------------------
SCATTER = ("FSC-A", "FSC-H", "SSC-A")
TIME = "Time"
#: (detector $PnN, canonical marker) in file order
FLUOR = (
    ("BUV395-A", "CD3"),
    ("BUV496-A", "CD8"),
    ("BV421-A", "CD25"),
    ("BV510-A", "Viability"),
    ("BV605-A", "CD4"),
    ("BV650-A", "CXCR5"),
    ("BV711-A", "PD-1"),
    ("BV786-A", "CXCR3"),
    ("FITC-A", "CD45RA"),
    ("PerCP-Cy5.5-A", "CD56"),
    ("PE-A", "CCR6"),
    ("PE-Cy7-A", "CD127"),
    ("APC-A", "FOXP3"),
    ("APC-H7-A", "CD16"),
)
DETECTORS = tuple(d for d, _ in FLUOR)
MARKERS = tuple(m for _, m in FLUOR)
CHANNELS = SCATTER + DETECTORS + (TIME,)
N_FLUOR = len(FLUOR)
MI = {m: i for i, m in enumerate(MARKERS)}  # marker -> column in the fluorescence block
PNR = 262144.0  # $PnR of every channel; the largest value a detector reports is PNR - 1
TIMESTEP = 0.01  # seconds per Time unit ($TIMESTEP)
CYTOMETER = "LSRFortessa X-20 (cytopipe simulator)"

#: $PnS text per site: sites spell the same panel differently (exercises panel resolution)
SITE_PNS = {
    "S1": {
        "CD3": "CD3",
        "CD8": "CD8",
        "CD25": "CD25",
        "Viability": "Zombie Aqua",
        "CD4": "CD4",
        "CXCR5": "CXCR5",
        "PD-1": "PD-1",
        "CXCR3": "CXCR3",
        "CD45RA": "CD45RA",
        "CD56": "CD56",
        "CCR6": "CCR6",
        "CD127": "CD127",
        "FOXP3": "FOXP3",
        "CD16": "CD16",
    },
    "S2": {
        "CD3": "CD3 BUV395",
        "CD8": "CD8 BUV496",
        "CD25": "CD25 BV421",
        "Viability": "LIVE/DEAD Aqua",
        "CD4": "CD4 BV605",
        "CXCR5": "CD185 (CXCR5)",
        "PD-1": "CD279 (PD-1)",
        "CXCR3": "CD183 BV786",
        "CD45RA": "CD45RA FITC",
        "CD56": "CD56 PerCP-Cy5.5",
        "CCR6": "CD196 PE",
        "CD127": "CD127 PE-Cy7",
        "FOXP3": "FoxP3 APC",
        "CD16": "CD16 APC-H7",
    },
    "S3": {
        "CD3": "BUV395-CD3",
        "CD8": "BUV496-CD8a",
        "CD25": "CD25_IL-2Ra",
        "Viability": "L/D Aqua - Viability",
        "CD4": "BV605-CD4",
        "CXCR5": "CD185",
        "PD-1": "PD1",
        "CXCR3": "CD183",
        "CD45RA": "CD45RA",
        "CD56": "CD56_NCAM",
        "CCR6": "CCR6",
        "CD127": "IL-7Ra",
        "FOXP3": "Foxp3",
        "CD16": "FcgRIII",
    },
}

# --------------------------------------------------------------------------------------------
# optics: spillover, autofluorescence, noise
# --------------------------------------------------------------------------------------------
_SPILL = {  # source detector -> {detector: fraction of the source's signal seen there}
    "BUV395-A": {"BUV496-A": 0.045, "BV421-A": 0.022},
    "BUV496-A": {"BUV395-A": 0.012, "BV510-A": 0.065, "FITC-A": 0.031},
    "BV421-A": {"BV510-A": 0.182, "BV605-A": 0.014, "FITC-A": 0.019},
    "BV510-A": {"BV421-A": 0.011, "BV605-A": 0.061, "FITC-A": 0.034},
    "BV605-A": {"BV510-A": 0.018, "BV650-A": 0.224, "BV711-A": 0.058, "PE-A": 0.027},
    "BV650-A": {"BV711-A": 0.281, "BV786-A": 0.052, "PerCP-Cy5.5-A": 0.019, "APC-A": 0.041},
    "BV711-A": {"BV650-A": 0.016, "BV786-A": 0.176, "PerCP-Cy5.5-A": 0.083, "APC-H7-A": 0.013},
    "BV786-A": {"BV711-A": 0.021, "PE-Cy7-A": 0.043, "APC-H7-A": 0.024},
    "FITC-A": {"BV510-A": 0.012, "PE-A": 0.158, "PerCP-Cy5.5-A": 0.023},
    "PerCP-Cy5.5-A": {"BV711-A": 0.047, "PE-Cy7-A": 0.121, "APC-A": 0.052, "APC-H7-A": 0.015},
    "PE-A": {"FITC-A": 0.006, "BV605-A": 0.012, "PerCP-Cy5.5-A": 0.083, "PE-Cy7-A": 0.021},
    "PE-Cy7-A": {"BV786-A": 0.048, "PerCP-Cy5.5-A": 0.011, "APC-H7-A": 0.062},
    "APC-A": {"PE-Cy7-A": 0.006, "PerCP-Cy5.5-A": 0.012, "APC-H7-A": 0.092},
    "APC-H7-A": {"BV786-A": 0.011, "PE-Cy7-A": 0.079, "APC-A": 0.010},
}


def spillover_matrix() -> np.ndarray:
    """The true spillover matrix (rows = source fluorochrome, columns = detector), float64."""
    s = np.eye(N_FLUOR)
    index = {d: i for i, d in enumerate(DETECTORS)}
    for src, row in _SPILL.items():
        for dst, value in row.items():
            s[index[src], index[dst]] = value
    return s


#: median autofluorescence of a resting lymphocyte in each detector
AUTOFLUORESCENCE = np.array([180, 120, 110, 150, 60, 40, 35, 30, 90, 40, 60, 25, 20, 20], dtype=float)
AF_FACTOR = {"lymphocyte": 1.0, "monocyte": 3.5, "debris": 0.5, "dead": 1.6, "bead": 0.3}
AF_EVENT_SD = 0.25  # per-event log-normal spread of autofluorescence (shared by all detectors)
#: photon statistics: variance of a detector = PHOTON_Q * signal (+ electronic noise below)
PHOTON_Q = np.array([3.0, 2.5, 2.0, 2.5, 2.2, 2.4, 2.6, 3.0, 1.8, 2.8, 1.6, 3.2, 2.0, 2.8])
ELECTRONIC_SD = np.array([45, 40, 35, 38, 32, 30, 30, 34, 38, 30, 34, 30, 28, 28], dtype=float)
SCATTER_NOISE = 0.010  # relative measurement noise of FSC/SSC
SCATTER_NOISE_ABS = 150.0

#: day-to-day (per acquisition batch) multiplicative intensity shift: log-normal sd per marker
BATCH_GAIN_SD = 0.06
BATCH_SCATTER_SD = 0.015
#: per-patient staining/expression level: log-normal sd per marker
PATIENT_LEVEL_SD = 0.06

# --------------------------------------------------------------------------------------------
# scatter geometry
# --------------------------------------------------------------------------------------------
LYMPH_MEAN = np.array([62000.0, 16000.0])  # FSC-A, SSC-A
LYMPH_SD = np.array([6500.0, 3200.0])
LYMPH_RHO = 0.35
#: the lymphocyte region: normalised (Mahalanobis) distance from the lymphocyte centre
LYMPH_REGION = 3.3  # truth boundary (used by the oracle); documented in docs/simulator.md
LYMPH_CORE = 2.9  # live single lymphocytes are drawn inside this radius
INSIDE_MAX = 3.15  # dead cells / doublets labelled "in the region" lie inside this radius
OUTSIDE_MIN = 3.45  # everything labelled "outside" lies beyond this radius
FSC_H_RATIO = 0.86  # FSC-H / FSC-A of a single cell
FSC_H_RATIO_SD = 0.010
SINGLET_MIN_RATIO = 0.80  # FSC-H/FSC-A above this = single cell (oracle); doublets are <= ~0.78
MONO_MEAN = np.array([100000.0, 48000.0])
MONO_SD = np.array([11000.0, 9000.0])
DEBRIS_FSC = (14000.0, 0.45)  # log-normal median, sd
DEBRIS_SSC = (5000.0, 0.7)
DOUBLET_IN_C = (0.12, 0.30)  # extra area (fraction of the 1st cell) of doublets inside the region
DOUBLET_OUT_C = (0.45, 1.0)
DEAD_IN_SCATTER = ((0.85, 0.97), (1.0, 1.2))  # FSC and SSC factors of dead cells in the region
DEAD_OUT_SCATTER = ((0.3, 0.6), (0.8, 1.6))

# --------------------------------------------------------------------------------------------
# marker expression: (median abundance, log-normal sd); median 0 = not expressed
# --------------------------------------------------------------------------------------------
NEG = (0.0, 0.0)
LEVELS = {
    "CD3": {"T": (9000, 0.25)},
    "CD4": {"CD4": (7000, 0.22), "DP": (5000, 0.25), "mono": (900, 0.35)},
    "CD8": {"CD8": (12000, 0.30), "DP": (6000, 0.30), "NK_CD8dim": (900, 0.50)},
    "CD25": {
        "naive": (120, 0.8),
        "memory": (280, 0.8),
        "activated": (900, 0.45),
        "Treg": (6000, 0.35),
        "CD8": (60, 0.8),
        "NKbright": (500, 0.5),
        "NKdim": (40, 0.8),
        "B": (150, 0.8),
        "mono": (100, 0.8),
    },
    "CD127": {
        "naive": (5000, 0.35),
        "memory": (3500, 0.45),
        "activated": (1000, 0.5),
        "Treg": (140, 0.5),
        "CD8": (3000, 0.45),
        "DN": (2000, 0.5),
        "NKbright": (1200, 0.5),
        "NKdim": (60, 0.7),
        "B": (40, 0.7),
        "mono": (30, 0.7),
    },
    "FOXP3": {"Treg": (2500, 0.35), "activated": (300, 0.6), "T": (80, 0.6)},
    "CD45RA": {
        "pos": (9000, 0.30),
        "neg": (110, 0.6),
        "Treg_naive": (5000, 0.35),
        "NK": (6000, 0.35),
        "B": (7000, 0.30),
        "mono": (200, 0.6),
    },
    # chemokine receptors and PD-1: dim, smeared positives over non-specific staining ("bg")
    "CXCR3": {"pos": (1800, 0.50), "bg": (60, 0.6)},
    "CCR6": {"pos": (2000, 0.50), "B": (3000, 0.45), "bg": (70, 0.6)},
    "CXCR5": {"pos": (2000, 0.50), "B": (6000, 0.35), "bg": (70, 0.6)},
    "PD-1": {"pos": (2000, 0.50), "bg": (80, 0.55)},
    "CD56": {"NKdim": (2200, 0.40), "NKbright": (16000, 0.30), "T": (1500, 0.50)},
    "CD16": {"NKdim": (8000, 0.45), "NKbright": (280, 0.70), "mono": (4000, 0.40), "mono_neg": (100, 0.6)},
    "Viability": {"live": (150, 0.40), "dead": (25000, 0.40), "dying": (3000, 0.50), "debris": (800, 1.0)},
}
DEAD_STAINING = 0.7  # dead cells keep 70% of their surface staining
P_DYING = 0.20  # dead cells that are early apoptotic: intermediate viability dye

#: thresholds (linear, compensated) that separate the latent states; used by the oracle and the
#: docs. Each lies between the two state distributions it separates (see LEVELS), near the value
#: that minimises misclassified events once autofluorescence, spillover spread and noise are added.
THRESHOLDS = {
    "CD3": 1500,
    "CD4": 2000,
    "CD8": 2500,
    "CD25": 2000,
    "CD127": 700,
    "FOXP3": 1000,
    "CD45RA": 1300,
    "CXCR3": 450,
    "CCR6": 530,
    "CXCR5": 530,
    "PD-1": 470,
    "CD56": 300,
    "CD56bright": 6500,
    "CD16": 2500,
    "Viability": 1000,
}

# fixed within-lineage state probabilities
P_CD8_CD45RA = 0.55
P_CD8_CXCR3 = 0.40
P_CD8_CCR6 = 0.05
P_CD8_PD1 = 0.20
P_T_CD56 = 0.05
P_DN_CD56 = 0.15
P_DN = 0.04  # CD4-CD8- T, fraction of T cells
P_DP = 0.01  # CD4+CD8+ T, fraction of T cells
P_TREG_MEMORY = 0.80  # Treg that are CD45RA-
P_ACTIVATED = 0.05  # CD25int CD127int FOXP3lo activated conventional memory CD4
P_PD1_NON_TFH = 0.08  # PD-1+ among CXCR5- memory CD4
P_NK_CD8 = 0.35
P_B_CXCR3 = 0.20
P_B_CCR6 = 0.85
P_MONO_CD16 = 0.12
P_DEBRIS_FRAGMENT = 0.25  # debris events carrying a fragment of a stained cell

# --------------------------------------------------------------------------------------------
# immune model (cohort layer): baseline medians (fractions) and patient / visit variation on the
# logit scale; IL-2 effect at 1.0 MIU (logit shift) for effect=1
# --------------------------------------------------------------------------------------------
IMMUNE = {
    #  trait        baseline  patient_sd  visit_sd  il2_effect
    "treg": (0.050, 0.30, 0.08, 0.65),  # Treg % of CD4
    "mem": (0.55, 0.30, 0.06, 0.0),  # CD45RA- % of conventional CD4
    "th17": (0.15, 0.30, 0.10, -0.40),  # CXCR3-CCR6+ % of memory CD4
    "th1": (0.25, 0.30, 0.10, 0.0),  # CXCR3+CCR6- % of memory CD4
    "th1_17": (0.07, 0.30, 0.10, 0.0),  # CXCR3+CCR6+ % of memory CD4
    "tfh": (0.22, 0.30, 0.10, -0.35),  # CXCR5+ % of memory CD4
    "atfh": (0.20, 0.35, 0.12, -0.30),  # PD-1+ % of cTfh
    "nk": (0.10, 0.45, 0.10, 0.35),  # NK % of live lymphocytes
    "bright": (0.08, 0.35, 0.12, 0.60),  # CD56bright % of NK
    "t_of_non_nk": (0.78, 0.35, 0.06, 0.0),  # T % of non-NK live lymphocytes
    "cd4": (0.64, 0.25, 0.05, 0.0),  # CD4+CD8- % of T
}
IMMUNE_TRAITS = tuple(IMMUNE)
DOSE_ED50 = 0.5  # MIU; dose response d/(d+ED50), scaled to 1 at 1.0 MIU
RESPONSIVENESS_SD = 0.30  # patient IL-2 sensitivity, log-normal
RESPONSIVENESS_TREG_LINK = -0.25  # low baseline Treg -> larger response (He 2023 abstract)
KINETICS_TAU_WEEKS = 2.5  # rise during every-other-day dosing (weeks 0-12)
WEEKLY_DROP = 0.20  # fraction of the effect lost after the switch to weekly dosing (week > 12)
WEEKLY_TAU_WEEKS = 4.0
EOD_UNTIL_WEEK = 12

# technical composition of a sample (drawn per patient-visit)
TECH = {
    "debris": (0.04, 0.12),  # uniform range, fraction of all events
    "monocytes": (0.06, 0.15),
    "doublets": (0.03, 0.06),
    "doublets_in_region": (0.25, 0.45),  # fraction of doublets that fall in the lymphocyte region
    "dead": (0.02, 0.08),  # fraction of single lymphocytes that are dead
    "dead_in_region": (0.40, 0.70),
    "dead_monocytes": (0.03, 0.10),
}

# --------------------------------------------------------------------------------------------
# clinical model
# --------------------------------------------------------------------------------------------
CLIN = {
    "sledai_base": 8,  # entry criterion SLEDAI >= 8
    "sledai_extra_poisson": 2.3,  # SLEDAI0 = 8 + 2 * Poisson(2.3), capped
    "sledai_cap": 30,
    "improve_placebo": 1.8,  # mean SLEDAI improvement (points) under standard of care at plateau
    "improve_per_treg": 2.5,  # extra improvement per unit of (normalised) Treg rise
    "improve_patient_sd": 3.2,
    "improve_visit_sd": 1.3,
    "improve_tau_weeks": 5.0,
    "pga_base": (2.2, 0.35),
    "pga_per_point": 0.22,
    "pga_visit_sd": 0.25,
    "bilag_a_rate": 0.04,
    "bilag_b_rate": 0.20,
    "dsdna_base": (80.0, 0.9),  # log-normal median IU/mL, sd
    "c3_base": (78.0, 18.0),  # mg/dL
    "c4_base": (13.0, 5.0),
    "ln_fraction": 0.35,
    "prot_ln": (1.6, 0.6),  # g/24 h, log-normal
    "prot_non_ln": (0.12, 0.4),
    "prednisone_choices": (5.0, 7.5, 10.0, 15.0, 20.0, 30.0),
    "prednisone_probs": (0.10, 0.15, 0.25, 0.25, 0.15, 0.10),
}
