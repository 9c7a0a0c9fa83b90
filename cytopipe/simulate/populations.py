"""Canonical populations of the SLE IL-2 panel and their truth from latent per-event states.

The truth of every event is decided by its *latent* states (what the cell is), never by its noisy
intensities: e.g. an event is in ``Treg`` when it is a live single lymphocyte, a CD4 T cell and a
regulatory T cell (latent CD25hi, CD127lo, FOXP3+). The definitions mirror the canonical phenotype
table of docs/simulator.md ("Truth"; the populations of docs/DEVELOPING.md).
"""

from __future__ import annotations

import numpy as np

#: (population, parent, definition) in hierarchy order; bit i of a membership mask = row i
POPULATIONS: tuple[tuple[str, str, str], ...] = (
    ("Lymphocytes", "root", "FSC-A/SSC-A lymphocyte region"),
    ("Singlets", "Lymphocytes", "FSC-A vs FSC-H diagonal"),
    ("Live", "Singlets", "viability dye negative"),
    ("T cells", "Live", "CD3+"),
    ("CD4 T", "T cells", "CD4+ CD8-"),
    ("CD8 T", "T cells", "CD8+ CD4-"),
    ("Treg", "CD4 T", "CD25hi CD127lo FOXP3+"),
    ("Memory CD4", "CD4 T", "CD45RA-"),
    ("Th17", "Memory CD4", "CXCR3- CCR6+"),
    ("Th1", "Memory CD4", "CXCR3+ CCR6-"),
    ("cTfh", "Memory CD4", "CXCR5+"),
    ("activated cTfh", "cTfh", "PD-1+"),
    ("NK", "Live", "CD3- CD56+"),
    ("CD56bright NK", "NK", "CD56hi CD16-/lo"),
    ("CD56dim NK", "NK", "CD56lo CD16+"),
)
POPULATION_NAMES = tuple(p for p, _, _ in POPULATIONS)
PARENT = {p: parent for p, parent, _ in POPULATIONS}
BIT = {p: i for i, p in enumerate(POPULATION_NAMES)}

#: latent per-event states, bit i of the ``flags`` array of the truth labels
FLAG_NAMES = (
    "in_lymph_region",  # noise-free FSC-A/SSC-A inside the lymphocyte region
    "doublet",
    "dead",
    "lymphocyte",  # the (first) cell is a lymphocyte
    "cd3_pos",
    "cd4_pos",
    "cd8_pos",
    "treg",  # regulatory T cell: CD25hi, CD127lo and FOXP3+ together
    "cd25_hi",
    "cd127_lo",
    "foxp3_pos",
    "cd45ra_neg",
    "cxcr3_pos",
    "ccr6_pos",
    "cxcr5_pos",
    "pd1_pos",
    "cd56_pos",
    "cd56_bright",
    "cd16_pos",
)
FLAG = {name: np.uint32(1 << i) for i, name in enumerate(FLAG_NAMES)}

#: per-event category codes (``category`` array of the truth labels)
CATEGORIES = (
    "lymphocyte",
    "dead lymphocyte",
    "doublet",
    "debris",
    "monocyte",
    "dead monocyte",
    "bead negative",
    "bead positive",
    "bead doublet",
)
CATEGORY = {name: i for i, name in enumerate(CATEGORIES)}

#: per-event lineage codes (for a doublet: the lineage of its first cell)
LINEAGES = (
    "none",
    "CD4 naive",
    "CD4 memory",
    "Treg naive",
    "Treg memory",
    "CD8 T",
    "DN T",
    "DP T",
    "B/other",
    "NK CD56bright",
    "NK CD56dim",
    "monocyte",
    "debris",
    "bead",
)
LINEAGE = {name: i for i, name in enumerate(LINEAGES)}

#: per-event fault codes (``fault`` array of the truth labels)
FAULTS = ("none", "clog", "shift", "margin")
FAULT = {name: i for i, name in enumerate(FAULTS)}


def has(flags: np.ndarray, name: str) -> np.ndarray:
    """Boolean mask of events whose latent state ``name`` is set."""
    return (flags & FLAG[name]) != 0


def membership_masks(flags: np.ndarray) -> dict[str, np.ndarray]:
    """Canonical population membership (boolean per event) from latent flags."""
    f = {name: has(flags, name) for name in FLAG_NAMES}
    m: dict[str, np.ndarray] = {}
    m["Lymphocytes"] = f["in_lymph_region"]
    m["Singlets"] = m["Lymphocytes"] & ~f["doublet"] & f["lymphocyte"]
    m["Live"] = m["Singlets"] & ~f["dead"]
    m["T cells"] = m["Live"] & f["cd3_pos"]
    m["CD4 T"] = m["T cells"] & f["cd4_pos"] & ~f["cd8_pos"]
    m["CD8 T"] = m["T cells"] & f["cd8_pos"] & ~f["cd4_pos"]
    m["Treg"] = m["CD4 T"] & f["treg"]
    m["Memory CD4"] = m["CD4 T"] & f["cd45ra_neg"]
    m["Th17"] = m["Memory CD4"] & ~f["cxcr3_pos"] & f["ccr6_pos"]
    m["Th1"] = m["Memory CD4"] & f["cxcr3_pos"] & ~f["ccr6_pos"]
    m["cTfh"] = m["Memory CD4"] & f["cxcr5_pos"]
    m["activated cTfh"] = m["cTfh"] & f["pd1_pos"]
    m["NK"] = m["Live"] & ~f["cd3_pos"] & f["cd56_pos"]
    m["CD56bright NK"] = m["NK"] & f["cd56_bright"]
    m["CD56dim NK"] = m["NK"] & ~f["cd56_bright"]
    return m


def pack_membership(masks: dict[str, np.ndarray]) -> np.ndarray:
    """uint16 bitmask per event (bit i = POPULATION_NAMES[i])."""
    n = len(next(iter(masks.values())))
    out = np.zeros(n, dtype=np.uint16)
    for name, bit in BIT.items():
        out |= masks[name].astype(np.uint16) << np.uint16(bit)
    return out


def unpack_membership(bits: np.ndarray, population: str) -> np.ndarray:
    """Boolean membership of ``population`` from a uint16 bitmask array."""
    return (bits >> np.uint16(BIT[population])) & np.uint16(1) != 0
