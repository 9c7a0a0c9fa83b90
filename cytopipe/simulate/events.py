"""Event layer: per-event cells, optics and acquisition for one FCS file.

A sample is a mixture of debris, monocytes, doublets, dead and live lymphocytes drawn from the
composition of :class:`~cytopipe.simulate.cohort.Cohort.samples`. Each cell gets latent states
(lineage, CD25hi, CXCR5+, ...), fluorochrome abundances (log-normal per state), autofluorescence,
spillover into neighbouring detectors, photon (Poisson-like) and electronic noise, a batch
(day) gain and a per-patient staining level. Everything is vectorised numpy.

Why one module: the cell model - lineages, doublets, dead cells, debris, scatter geometry - is
one piece whose random draws must stay in this exact order for byte-identical output;
instrument profiles reuse :func:`draw_cells` from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cytopipe.simulate import params as P
from cytopipe.simulate._exact import cholesky2, inv, matmul
from cytopipe.simulate.populations import (
    CATEGORY,
    FAULT,
    FAULTS,
    FLAG,
    LINEAGE,
    membership_masks,
    pack_membership,
)

# column indices in the full 18-channel event matrix
I_FSC_A, I_FSC_H, I_SSC_A = 0, 1, 2
I_FL = slice(3, 3 + P.N_FLUOR)
I_TIME = 3 + P.N_FLUOR
N_CHANNELS = len(P.CHANNELS)
MAX_VALUE = np.float32(P.PNR - 1)

_SPILL = P.spillover_matrix()
_LYMPH_COV = np.array(
    [
        [P.LYMPH_SD[0] ** 2, P.LYMPH_RHO * P.LYMPH_SD[0] * P.LYMPH_SD[1]],
        [P.LYMPH_RHO * P.LYMPH_SD[0] * P.LYMPH_SD[1], P.LYMPH_SD[1] ** 2],
    ]
)
_LYMPH_CHOL = cholesky2(_LYMPH_COV)
_LYMPH_WHITEN = inv(_LYMPH_CHOL)


@dataclass
class EventData:
    """Events of one file with their per-event truth."""

    events: np.ndarray  # float32 (n, 18) in params.CHANNELS order, raw (uncompensated)
    flags: np.ndarray  # uint32 latent states (populations.FLAG_NAMES)
    category: np.ndarray  # uint8 (populations.CATEGORIES)
    lineage: np.ndarray  # uint8 (populations.LINEAGES)
    fault: np.ndarray  # uint8 (populations.FAULTS)
    faults: list[dict] = field(default_factory=list)  # description of injected faults
    fault_names: tuple[str, ...] = FAULTS  # names of the ``fault`` codes

    @property
    def membership(self) -> np.ndarray:
        """uint16 canonical population bitmask (populations.POPULATION_NAMES bit order)."""
        return pack_membership(membership_masks(self.flags))


def lymph_distance(fsc: np.ndarray, ssc: np.ndarray) -> np.ndarray:
    """Normalised (Mahalanobis) distance of noise-free scatter from the lymphocyte centre."""
    xy = np.stack([np.asarray(fsc, float) - P.LYMPH_MEAN[0], np.asarray(ssc, float) - P.LYMPH_MEAN[1]])
    w = matmul(_LYMPH_WHITEN, xy)
    return np.sqrt((w * w).sum(axis=0))


def _truncated_gaussian_2d(m, mean, chol, rmax, rng):
    """m points of a 2-D Gaussian truncated to Mahalanobis radius <= rmax (exact, no rejection)."""
    u = rng.random(m)
    r = np.sqrt(-2.0 * np.log1p(-u * (1.0 - np.exp(-0.5 * rmax**2))))
    theta = rng.random(m) * 2.0 * np.pi
    w = np.stack([r * np.cos(theta), r * np.sin(theta)])
    xy = matmul(chol, w)
    return mean[0] + xy[0], mean[1] + xy[1]


class _Profile:
    """Per-event median and log-sd of every marker (markers x events), filled state by state."""

    def __init__(self, m: int):
        self.m = m
        self.med = np.zeros((P.N_FLUOR, m), np.float32)
        self.sd = np.zeros((P.N_FLUOR, m), np.float32)

    def set(self, mask, marker: str, level: tuple[float, float]) -> None:
        j = P.MI[marker]
        self.med[j, mask] = level[0]
        self.sd[j, mask] = level[1]

    def draw(self, rng) -> np.ndarray:
        """Log-normal abundances (m x 14, float32); 0 where the marker is not expressed."""
        z = rng.standard_normal((P.N_FLUOR, self.m), dtype=np.float32)
        z *= self.sd
        np.exp(z, out=z)
        z *= self.med
        return np.ascontiguousarray(z.T)


def _lymphocytes(m: int, comp: Mapping[str, float], rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latent abundances (m x 14), flags (uint32) and lineage codes of m lymphocytes."""
    L = P.LEVELS
    u = rng.random((m, 10))
    p_nk, p_t = comp["p_nk"], comp["p_t"]
    nk = u[:, 0] < p_nk
    t = ~nk & (u[:, 0] < p_nk + p_t)
    b = ~nk & ~t
    c4, c8 = comp["p_cd4"], comp["p_cd8"]
    cd4 = t & (u[:, 1] < c4)
    cd8 = t & (u[:, 1] >= c4) & (u[:, 1] < c4 + c8)
    dn = t & (u[:, 1] >= c4 + c8) & (u[:, 1] < c4 + c8 + P.P_DN)
    dp = t & (u[:, 1] >= c4 + c8 + P.P_DN)
    treg = cd4 & (u[:, 2] < comp["p_treg"])
    conv = cd4 & ~treg
    treg_mem = treg & (u[:, 3] < P.P_TREG_MEMORY)
    conv_mem = conv & (u[:, 3] < comp["p_mem"])
    mem4 = treg_mem | conv_mem
    activated = conv_mem & (u[:, 4] < P.P_ACTIVATED)
    # memory CD4 chemokine receptor states (Tregs share the conventional distribution)
    a1, a2 = comp["p_th1"], comp["p_th1"] + comp["p_th17"]
    a3 = a2 + comp["p_th1_17"]
    th1 = mem4 & (u[:, 5] < a1)
    th17 = mem4 & (u[:, 5] >= a1) & (u[:, 5] < a2)
    th1_17 = mem4 & (u[:, 5] >= a2) & (u[:, 5] < a3)
    tfh = mem4 & (u[:, 6] < comp["p_tfh"])
    pd1_mem = mem4 & np.where(tfh, u[:, 7] < comp["p_atfh"], u[:, 7] < P.P_PD1_NON_TFH)
    # CD8, DN, DP
    cd8_ra = (cd8 & (u[:, 3] < P.P_CD8_CD45RA)) | ((dn | dp) & (u[:, 3] < 0.5))
    cd8_cxcr3 = cd8 & (u[:, 5] < P.P_CD8_CXCR3)
    cd8_ccr6 = cd8 & (u[:, 6] < P.P_CD8_CCR6)
    cd8_pd1 = cd8 & (u[:, 7] < P.P_CD8_PD1)
    t_cd56 = (cd8 & (u[:, 8] < P.P_T_CD56)) | (dn & (u[:, 8] < P.P_DN_CD56))
    # NK and B/other
    bright = nk & (u[:, 1] < comp["p_bright"])
    dim = nk & ~bright
    nk_cd8 = nk & (u[:, 2] < P.P_NK_CD8)
    nk_cxcr3 = (bright & (u[:, 5] < 0.7)) | (dim & (u[:, 5] < 0.1))
    b_cxcr3 = b & (u[:, 5] < P.P_B_CXCR3)
    b_ccr6 = b & (u[:, 6] < P.P_B_CCR6)

    pr = _Profile(m)
    pr.set(t, "CD3", L["CD3"]["T"])
    pr.set(cd4, "CD4", L["CD4"]["CD4"])
    pr.set(dp, "CD4", L["CD4"]["DP"])
    pr.set(cd8, "CD8", L["CD8"]["CD8"])
    pr.set(dp, "CD8", L["CD8"]["DP"])
    pr.set(nk_cd8, "CD8", L["CD8"]["NK_CD8dim"])
    naive4 = conv & ~conv_mem
    for marker in ("CD25", "CD127"):
        lv = L[marker]
        pr.set(naive4, marker, lv["naive"])
        pr.set(conv_mem & ~activated, marker, lv["memory"])
        pr.set(activated, marker, lv["activated"])
        pr.set(treg, marker, lv["Treg"])
        pr.set(cd8 | dp, marker, lv["CD8"])
        pr.set(dn, marker, lv["CD8"] if marker == "CD25" else lv["DN"])
        pr.set(bright, marker, lv["NKbright"])
        pr.set(dim, marker, lv["NKdim"])
        pr.set(b, marker, lv["B"])
    pr.set(t, "FOXP3", L["FOXP3"]["T"])
    pr.set(activated, "FOXP3", L["FOXP3"]["activated"])
    pr.set(treg, "FOXP3", L["FOXP3"]["Treg"])
    ra = L["CD45RA"]
    ra_pos = naive4 | cd8_ra
    ra_neg = mem4 | ((cd8 | dn | dp) & ~cd8_ra)
    pr.set(ra_pos, "CD45RA", ra["pos"])
    pr.set(ra_neg, "CD45RA", ra["neg"])
    pr.set(treg & ~treg_mem, "CD45RA", ra["Treg_naive"])
    pr.set(nk, "CD45RA", ra["NK"])
    pr.set(b, "CD45RA", ra["B"])
    everyone = np.ones(m, bool)
    for marker in ("CXCR3", "CCR6", "CXCR5", "PD-1"):
        pr.set(everyone, marker, L[marker]["bg"])  # non-specific staining, overridden below
    cxcr3 = th1 | th1_17 | cd8_cxcr3 | nk_cxcr3 | b_cxcr3
    pr.set(cxcr3, "CXCR3", L["CXCR3"]["pos"])
    ccr6 = th17 | th1_17 | cd8_ccr6
    pr.set(ccr6, "CCR6", L["CCR6"]["pos"])
    pr.set(b_ccr6, "CCR6", L["CCR6"]["B"])
    pr.set(tfh, "CXCR5", L["CXCR5"]["pos"])
    pr.set(b, "CXCR5", L["CXCR5"]["B"])
    pd1 = pd1_mem | cd8_pd1
    pr.set(pd1, "PD-1", L["PD-1"]["pos"])
    pr.set(dim, "CD56", L["CD56"]["NKdim"])
    pr.set(bright, "CD56", L["CD56"]["NKbright"])
    pr.set(t_cd56, "CD56", L["CD56"]["T"])
    pr.set(dim, "CD16", L["CD16"]["NKdim"])
    pr.set(bright, "CD16", L["CD16"]["NKbright"])
    pr.set(everyone, "Viability", L["Viability"]["live"])
    abundance = pr.draw(rng)

    flags = np.full(m, FLAG["lymphocyte"], dtype=np.uint32)
    for mask, name in (
        (t, "cd3_pos"), (cd4 | dp, "cd4_pos"), (cd8 | dp, "cd8_pos"), (treg, "treg"), (treg, "cd25_hi"),
        (treg, "cd127_lo"), (treg, "foxp3_pos"), (ra_neg & ~(treg & ~treg_mem), "cd45ra_neg"),
        (cxcr3, "cxcr3_pos"), (ccr6 | b_ccr6, "ccr6_pos"), (tfh | b, "cxcr5_pos"), (pd1, "pd1_pos"),
        (nk | t_cd56, "cd56_pos"), (bright, "cd56_bright"), (dim, "cd16_pos"),
    ):  # fmt: skip
        flags[mask] |= FLAG[name]
    lineage = np.zeros(m, dtype=np.uint8)
    for mask, name in (
        (naive4, "CD4 naive"), (conv_mem, "CD4 memory"), (treg & ~treg_mem, "Treg naive"),
        (treg_mem, "Treg memory"), (cd8, "CD8 T"), (dn, "DN T"), (dp, "DP T"), (b, "B/other"),
        (bright, "NK CD56bright"), (dim, "NK CD56dim"),
    ):  # fmt: skip
        lineage[mask] = LINEAGE[name]
    return abundance, flags, lineage


def _monocytes(m: int, rng) -> np.ndarray:
    L = P.LEVELS
    u = rng.random(m)
    pr = _Profile(m)
    allm = np.ones(m, bool)
    pr.set(allm, "CD4", L["CD4"]["mono"])
    pr.set(allm, "CD25", L["CD25"]["mono"])
    pr.set(allm, "CD127", L["CD127"]["mono"])
    pr.set(allm, "CD45RA", L["CD45RA"]["mono"])
    pr.set(u < P.P_MONO_CD16, "CD16", L["CD16"]["mono"])
    pr.set(u >= P.P_MONO_CD16, "CD16", L["CD16"]["mono_neg"])
    pr.set(allm, "Viability", L["Viability"]["live"])
    return pr.draw(rng)


def _scatter_outside(fsc, ssc, resample, rng, rounds: int = 40):
    """Redraw (via ``resample(k)``) points until all lie beyond OUTSIDE_MIN of the lymph centre."""
    for _ in range(rounds):
        bad = np.flatnonzero(lymph_distance(fsc, ssc) < P.OUTSIDE_MIN)
        if bad.size == 0:
            return fsc, ssc
        fsc[bad], ssc[bad] = resample(bad.size)
    bad = lymph_distance(fsc, ssc) < P.OUTSIDE_MIN
    fsc[bad] *= 0.35  # last resort: push far below the lymphocytes (debris-like)
    return fsc, ssc


def simulate_sample(
    n_events: int,
    comp: Mapping[str, float],
    rng: np.random.Generator,
    marker_level: np.ndarray | None = None,
    batch_gain: np.ndarray | None = None,
    scatter_gain: float = 1.0,
    rate: float = 2000.0,
    faults: Sequence[str] = (),
) -> EventData:
    """Simulate one stained blood sample (``n_events`` events) from a composition row."""
    cells = draw_cells(n_events, comp, rng, marker_level, batch_gain)
    events = _acquire(cells.F, cells.af_factor, cells.fsc, cells.fsch, cells.ssc, scatter_gain, rate, rng)
    n = len(events)
    data = EventData(events, cells.flags, cells.category, cells.lineage, np.zeros(n, np.uint8))
    if faults:
        inject_faults(data, faults, rng, rate)
    return data


@dataclass
class Cells:
    """Cells of one sample in acquisition order, before optics: abundances (n x 14, reference
    units), autofluorescence factor, noise-free scatter and the per-event truth."""

    F: np.ndarray
    af_factor: np.ndarray
    fsc: np.ndarray
    fsch: np.ndarray
    ssc: np.ndarray
    flags: np.ndarray
    category: np.ndarray
    lineage: np.ndarray


def draw_cells(
    n_events: int,
    comp: Mapping[str, float],
    rng: np.random.Generator,
    marker_level: np.ndarray | None = None,
    batch_gain: np.ndarray | None = None,
) -> Cells:
    """The cells of one sample (``n_events`` events) from a composition row, shuffled into
    acquisition order (the random draws of :func:`simulate_sample` before its optics)."""
    n = int(n_events)
    c = comp
    p_ls = 1.0 - c["p_debris"] - c["p_monocytes"] - c["p_doublets"]
    probs = np.array(
        [
            c["p_debris"],
            c["p_monocytes"] * (1 - c["p_dead_monocytes"]),
            c["p_monocytes"] * c["p_dead_monocytes"],
            c["p_doublets"] * c["p_doublets_in_region"],
            c["p_doublets"] * (1 - c["p_doublets_in_region"]),
            p_ls * (1 - c["p_dead"]),
            p_ls * c["p_dead"] * c["p_dead_in_region"],
            p_ls * c["p_dead"] * (1 - c["p_dead_in_region"]),
        ]
    )
    probs = np.clip(probs, 0, None)
    counts = rng.multinomial(n, probs / probs.sum())
    n_deb, n_mono, n_mono_dead, n_dbl_in, n_dbl_out, n_live, n_dead_in, n_dead_out = (int(k) for k in counts)
    if n_live == 0:  # (tiny files only) doublets need live lymphocytes to pair
        n_live, n_dbl_in, n_dbl_out = n_dbl_in + n_dbl_out, 0, 0

    # --- single lymphocytes (live, dead in region, dead outside) -----------------------------
    n_lymph = n_live + n_dead_in + n_dead_out
    F_l, flags_l, lin_l = _lymphocytes(n_lymph, c, rng)
    fsc_l, ssc_l = _truncated_gaussian_2d(n_lymph, P.LYMPH_MEAN, _LYMPH_CHOL, P.LYMPH_CORE, rng)
    dead = np.zeros(n_lymph, bool)
    dead[n_live:] = True
    cat_l = np.where(dead, CATEGORY["dead lymphocyte"], CATEGORY["lymphocyte"]).astype(np.uint8)
    in_reg = np.ones(n_lymph, bool)
    in_reg[n_live + n_dead_in :] = False
    # dead cells: smaller and more granular; some stay in the region, others fall out of it
    lo, hi = n_live, n_live + n_dead_in
    fsc_l[lo:hi], ssc_l[lo:hi] = _dead_scatter(fsc_l[lo:hi], ssc_l[lo:hi], P.DEAD_IN_SCATTER, True, rng)
    lo, hi = hi, n_lymph
    fsc_l[lo:hi], ssc_l[lo:hi] = _dead_scatter(fsc_l[lo:hi], ssc_l[lo:hi], P.DEAD_OUT_SCATTER, False, rng)
    flags_l[dead] |= FLAG["dead"]
    flags_l[in_reg] |= FLAG["in_lymph_region"]

    # --- monocytes ------------------------------------------------------------------------
    n_m = n_mono + n_mono_dead
    F_m = _monocytes(n_m, rng)
    mono_chol = cholesky2(
        np.array(
            [
                [P.MONO_SD[0] ** 2, 0.3 * P.MONO_SD[0] * P.MONO_SD[1]],
                [0.3 * P.MONO_SD[0] * P.MONO_SD[1], P.MONO_SD[1] ** 2],
            ]
        )
    )
    fsc_m, ssc_m = _truncated_gaussian_2d(n_m, P.MONO_MEAN, mono_chol, 2.8, rng)
    fsc_m, ssc_m = _scatter_outside(
        fsc_m, ssc_m, lambda k: _truncated_gaussian_2d(k, P.MONO_MEAN, mono_chol, 2.8, rng), rng
    )
    dead_m = np.zeros(n_m, bool)
    dead_m[n_mono:] = True
    fsc_m[dead_m] *= 0.6
    ssc_m[dead_m] *= 1.1
    fsc_m, ssc_m = _scatter_outside(fsc_m, ssc_m, lambda k: (np.full(k, 30000.0), np.full(k, 30000.0)), rng)
    flags_m = np.where(dead_m, FLAG["dead"], np.uint32(0)).astype(np.uint32)
    cat_m = np.where(dead_m, CATEGORY["dead monocyte"], CATEGORY["monocyte"]).astype(np.uint8)

    # --- debris -----------------------------------------------------------------------------
    def debris_scatter(k):
        f = P.DEBRIS_FSC[0] * np.exp(P.DEBRIS_FSC[1] * rng.standard_normal(k))
        s = P.DEBRIS_SSC[0] * np.exp(P.DEBRIS_SSC[1] * rng.standard_normal(k))
        return np.maximum(f, 800.0), np.maximum(s, 300.0)

    fsc_d, ssc_d = debris_scatter(n_deb)
    fsc_d, ssc_d = _scatter_outside(fsc_d, ssc_d, debris_scatter, rng)
    F_d = np.zeros((n_deb, P.N_FLUOR), np.float32)
    frag = rng.random(n_deb) < P.P_DEBRIS_FRAGMENT
    n_frag = int(frag.sum())
    if n_frag:
        F_frag, _, _ = _lymphocytes(n_frag, c, rng)
        F_d[frag] = F_frag * rng.uniform(0.03, 0.3, size=(n_frag, 1))
    via = P.LEVELS["Viability"]["debris"]
    F_d[:, P.MI["Viability"]] = via[0] * np.exp(via[1] * rng.standard_normal(n_deb))

    # --- doublets ---------------------------------------------------------------------------
    F_b, fsc_b, ssc_b, h_b, flags_b, lin_b = _doublets(
        n_dbl_in, n_dbl_out, F_l[:n_live], fsc_l[:n_live], ssc_l[:n_live], flags_l[:n_live], lin_l[:n_live],
        F_m[:n_mono], fsc_m[:n_mono], ssc_m[:n_mono], rng,
    )  # fmt: skip

    # --- assemble in a fixed order, then shuffle into acquisition order ----------------------
    F = np.concatenate([F_l, F_m, F_d, F_b])
    fsc = np.concatenate([fsc_l, fsc_m, fsc_d, fsc_b])
    ssc = np.concatenate([ssc_l, ssc_m, ssc_d, ssc_b])
    n_single = n_lymph + n_m + n_deb
    ratio = P.FSC_H_RATIO + P.FSC_H_RATIO_SD * rng.standard_normal(n_single)
    fsch = np.concatenate([np.concatenate([fsc_l, fsc_m, fsc_d]) * ratio, h_b])
    flags = np.concatenate([flags_l, flags_m, np.zeros(n_deb, np.uint32), flags_b])
    category = np.concatenate(
        [
            cat_l,
            cat_m,
            np.full(n_deb, CATEGORY["debris"], np.uint8),
            np.full(len(fsc_b), CATEGORY["doublet"], np.uint8),
        ]
    )
    lineage = np.concatenate(
        [
            lin_l,
            np.full(n_m, LINEAGE["monocyte"], np.uint8),
            np.full(n_deb, LINEAGE["debris"], np.uint8),
            lin_b,
        ]
    )
    # dead cells: amine dye bright, staining partly lost, more autofluorescence
    is_dead = (flags & FLAG["dead"]) != 0
    F[is_dead] *= P.DEAD_STAINING
    k_dead = int(is_dead.sum())
    dying = rng.random(k_dead) < P.P_DYING  # early apoptotic: intermediate dye uptake
    vm = np.where(dying, P.LEVELS["Viability"]["dying"][0], P.LEVELS["Viability"]["dead"][0])
    vs = np.where(dying, P.LEVELS["Viability"]["dying"][1], P.LEVELS["Viability"]["dead"][1])
    F[is_dead, P.MI["Viability"]] = vm * np.exp(vs * rng.standard_normal(k_dead))
    af_factor = np.ones(n)
    af_factor[n_lymph : n_lymph + n_m] = P.AF_FACTOR["monocyte"]
    af_factor[n_lymph + n_m : n_single] = P.AF_FACTOR["debris"]
    af_factor[n_single:] = 1.5  # doublets: two cells' worth
    af_factor[is_dead] *= P.AF_FACTOR["dead"]

    if marker_level is not None:
        F *= marker_level
    if batch_gain is not None:
        F *= batch_gain
    assert len(F) == n, (len(F), n)
    order = rng.permutation(n)
    return Cells(
        F[order], af_factor[order], fsc[order], fsch[order], ssc[order], flags[order], category[order],
        lineage[order],
    )  # fmt: skip


def _dead_scatter(fsc, ssc, factors, inside: bool, rng, rounds: int = 40):
    """Shrink (and granulate) cells; keep them inside INSIDE_MAX or beyond OUTSIDE_MIN."""
    (f_lo, f_hi), (s_lo, s_hi) = factors
    f0, s0 = fsc.copy(), ssc.copy()
    fsc = f0 * rng.uniform(f_lo, f_hi, f0.size)
    ssc = s0 * rng.uniform(s_lo, s_hi, s0.size)
    for _ in range(rounds):
        d = lymph_distance(fsc, ssc)
        bad = np.flatnonzero(d > P.INSIDE_MAX if inside else d < P.OUTSIDE_MIN)
        if bad.size == 0:
            break
        fsc[bad] = f0[bad] * rng.uniform(f_lo, f_hi, bad.size)
        ssc[bad] = s0[bad] * rng.uniform(s_lo, s_hi, bad.size)
    d = lymph_distance(fsc, ssc)
    if inside:
        bad = d > P.INSIDE_MAX
        fsc[bad], ssc[bad] = f0[bad], s0[bad]  # core cells are inside by construction
    else:
        bad = d < P.OUTSIDE_MIN
        fsc[bad] = f0[bad] * 0.3
    return fsc, ssc


def _doublets(n_in, n_out, F_l, fsc_l, ssc_l, flags_l, lin_l, F_m, fsc_m, ssc_m, rng, rounds: int = 60):
    """Doublets pair random cells: fluorescence sums, FSC-A/SSC-A add a coincident fraction k of
    the first cell's area, FSC-H barely grows. In-region doublets are pairs of lymphocytes with a
    small k (0.12-0.25); the others pair lymphocytes and monocytes with k in 0.45-1."""
    n_l, n_mo = len(fsc_l), len(fsc_m)
    n = n_in + n_out
    F = np.zeros((n, P.N_FLUOR))
    fsc = np.zeros(n)
    ssc = np.zeros(n)
    fsch = np.zeros(n)
    flags = np.zeros(n, np.uint32)
    lineage = np.zeros(n, np.uint8)
    if n == 0 or n_l == 0:
        return F[:0], fsc[:0], ssc[:0], fsch[:0], flags[:0], lineage[:0]
    # pool: lymphocytes then monocytes
    pool_F = np.concatenate([F_l, F_m])
    pool_f = np.concatenate([fsc_l, fsc_m])
    pool_s = np.concatenate([ssc_l, ssc_m])
    pool_flags = np.concatenate([flags_l, np.zeros(n_mo, np.uint32)])
    pool_lin = np.concatenate([lin_l, np.full(n_mo, LINEAGE["monocyte"], np.uint8)])

    def pick(k, inside):
        if inside or n_mo == 0:
            a = rng.integers(0, n_l, k)
            b = rng.integers(0, n_l, k)
        else:
            a = np.where(rng.random(k) < 0.7, rng.integers(0, n_l, k), n_l + rng.integers(0, n_mo, k))
            b = np.where(rng.random(k) < 0.7, rng.integers(0, n_l, k), n_l + rng.integers(0, n_mo, k))
        lo, hi = P.DOUBLET_IN_C if inside else P.DOUBLET_OUT_C
        return a, b, rng.uniform(lo, hi, k)

    def geometry(a, b, k):
        # k = extra area as a fraction of the first cell's area
        c = k * pool_f[a] / pool_f[b]
        return pool_f[a] + c * pool_f[b], pool_s[a] + c * pool_s[b]

    a = np.zeros(n, np.int64)
    b = np.zeros(n, np.int64)
    k = np.zeros(n)
    for inside, sl in ((True, slice(0, n_in)), (False, slice(n_in, n))):
        m = sl.stop - sl.start
        if m == 0:
            continue
        aa, bb, kk = pick(m, inside)
        for _ in range(rounds):
            f, s = geometry(aa, bb, kk)
            d = lymph_distance(f, s)
            bad = np.flatnonzero(d > P.INSIDE_MAX if inside else d < P.OUTSIDE_MIN)
            if bad.size == 0:
                break
            aa[bad], bb[bad], kk[bad] = pick(bad.size, inside)
        f, s = geometry(aa, bb, kk)
        d = lymph_distance(f, s)
        if inside:
            # rare leftovers: use the smallest coincidence with the smallest first cells
            bad = np.flatnonzero(d > P.INSIDE_MAX)
            if bad.size:
                small = np.argsort(pool_f[:n_l])[: max(1, n_l // 10)]
                aa[bad] = small[rng.integers(0, small.size, bad.size)]
                kk[bad] = P.DOUBLET_IN_C[0]
        a[sl], b[sl], k[sl] = aa, bb, kk
    fsc, ssc = geometry(a, b, k)
    ratio_a = P.FSC_H_RATIO + P.FSC_H_RATIO_SD * rng.standard_normal(n)
    fsch = ratio_a * pool_f[a] * (1.0 + 0.1 * k)
    F = pool_F[a] + pool_F[b]
    flags = (pool_flags[a] & ~FLAG["in_lymph_region"]) | FLAG["doublet"]
    flags[lymph_distance(fsc, ssc) <= P.LYMPH_REGION] |= FLAG["in_lymph_region"]
    lineage = pool_lin[a]
    return F, fsc, ssc, fsch, flags, lineage


def _acquire(F, af_factor, fsc, fsch, ssc, scatter_gain, rate, rng) -> np.ndarray:
    """Optics and electronics: spillover, autofluorescence, noise, time; float32 (n, 18).

    Works in float32 and in place: large temporary arrays are slow to allocate on shared machines.
    """
    n = F.shape[0]
    out = np.empty((n, N_CHANNELS), dtype=np.float32)
    af_level = (af_factor * np.exp(P.AF_EVENT_SD * rng.standard_normal(n))).astype(np.float32)
    signal = matmul(np.asarray(F, dtype=np.float32), _SPILL.astype(np.float32))
    signal += af_level[:, None] * P.AUTOFLUORESCENCE.astype(np.float32)
    sd = np.maximum(signal, np.float32(0.0))
    sd *= P.PHOTON_Q.astype(np.float32)
    sd += (P.ELECTRONIC_SD**2).astype(np.float32)
    np.sqrt(sd, out=sd)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise *= sd
    signal += noise
    del sd, noise
    np.minimum(signal, MAX_VALUE, out=out[:, I_FL])
    for col, v in ((I_FSC_A, fsc), (I_FSC_H, fsch), (I_SSC_A, ssc)):
        noisy = v * scatter_gain * (1.0 + P.SCATTER_NOISE * rng.standard_normal(n))
        noisy += P.SCATTER_NOISE_ABS * rng.standard_normal(n)
        out[:, col] = np.clip(noisy, 0.0, MAX_VALUE)
    out[:, I_TIME] = acquisition_times(n, rate, rng)
    return out


def acquisition_times(n: int, rate: float, rng) -> np.ndarray:
    """Time channel values ($TIMESTEP units) of a Poisson arrival process at ``rate`` events/s."""
    gaps = rng.exponential(1.0 / rate, n)
    return (np.cumsum(gaps) / P.TIMESTEP).astype(np.float32)


# --------------------------------------------------------------------------------------------
# acquisition faults (for QC)
# --------------------------------------------------------------------------------------------
def inject_faults(data: EventData, kinds: Sequence[str], rng, rate: float) -> None:
    """Inject acquisition faults in place and mark the affected events in ``data.fault``.

    * ``clog``: for a stretch of 5-10% of the events the flow slows to 1/3-1/5 of the event rate
      and signals (scatter and fluorescence) dim by 15-30%;
    * ``shift``: for a stretch of 15-25% of the events 3 fluorescence detectors read 1.6-2.2x
      higher (or 0.45-0.6x lower);
    * ``margin``: 1.5-3% of the events, spread over the run, pile up at the detector maximum
      ($PnR - 1) of FSC-A or of one fluorescence detector.
    """
    ev = data.events
    n = ev.shape[0]
    for kind in kinds:
        if kind == "clog":
            length = max(1, int(n * rng.uniform(0.05, 0.10)))
            start = int(rng.integers(int(0.15 * n), max(int(0.15 * n) + 1, int(0.8 * n) - length)))
            idx = np.arange(start, min(n, start + length))
            gaps = np.diff(ev[:, I_TIME].astype(np.float64), prepend=0.0)
            gaps[idx] *= rng.uniform(3.0, 5.0)
            ev[:, I_TIME] = np.cumsum(gaps).astype(np.float32)
            dim = rng.uniform(0.7, 0.85)
            ev[idx, :I_TIME] *= np.float32(dim)
            data.fault[idx] = FAULT["clog"]
            data.faults.append({"fault": "clog", "first_event": int(idx[0]), "last_event": int(idx[-1]),
                                "n_events": int(idx.size), "channels": "all", "factor": round(float(dim), 4)})  # fmt: skip
        elif kind == "shift":
            length = max(1, int(n * rng.uniform(0.15, 0.25)))
            start = int(rng.integers(int(0.1 * n), max(int(0.1 * n) + 1, n - length)))
            idx = np.arange(start, min(n, start + length))
            cols = np.sort(rng.choice(P.N_FLUOR, 3, replace=False))
            up = rng.random() < 0.7
            factor = rng.uniform(1.6, 2.2) if up else rng.uniform(0.45, 0.6)
            sel = np.ix_(idx, I_FL.start + cols)
            ev[sel] = np.minimum(ev[sel] * np.float32(factor), MAX_VALUE)
            data.fault[idx] = FAULT["shift"]
            data.faults.append({"fault": "shift", "first_event": int(idx[0]), "last_event": int(idx[-1]),
                                "n_events": int(idx.size),
                                "channels": ";".join(P.DETECTORS[j] for j in cols), "factor": round(float(factor), 4)})  # fmt: skip
        elif kind == "margin":
            free = np.flatnonzero(data.fault == 0)
            k = max(1, int(n * rng.uniform(0.015, 0.03)))
            idx = np.sort(rng.choice(free, min(k, free.size), replace=False))
            col = int(rng.integers(-1, P.N_FLUOR))  # -1 = FSC-A
            ci = I_FSC_A if col < 0 else I_FL.start + col
            ev[idx, ci] = MAX_VALUE
            data.fault[idx] = FAULT["margin"]
            name = "FSC-A" if col < 0 else P.DETECTORS[col]
            data.faults.append({"fault": "margin", "first_event": int(idx[0]), "last_event": int(idx[-1]),
                                "n_events": int(idx.size), "channels": name, "factor": 1.0})  # fmt: skip
        else:
            raise ValueError(f"unknown fault {kind!r}")


# --------------------------------------------------------------------------------------------
# compensation controls
# --------------------------------------------------------------------------------------------
BEAD_FSC = (85000.0, 2500.0)
BEAD_SSC = (30000.0, 1500.0)
BEAD_POSITIVE_FRACTION = 0.55
BEAD_DOUBLET_FRACTION = 0.02
BEAD_BRIGHT = {  # median abundance of positive capture beads in their primary detector
    "CD3": 60000, "CD8": 45000, "CD25": 70000, "Viability": 40000, "CD4": 65000, "CXCR5": 50000,
    "PD-1": 55000, "CXCR3": 45000, "CD45RA": 60000, "CD56": 40000, "CCR6": 80000, "CD127": 50000,
    "FOXP3": 55000, "CD16": 45000,
}  # fmt: skip
BEAD_CV = 0.12


def simulate_control(
    marker: str | None, n_events: int, rng: np.random.Generator, rate: float = 1500.0
) -> EventData:
    """An unstained (``marker=None``) or single-stain compensation control.

    Antibody controls are capture beads: negative beads carry only (low) autofluorescence,
    positive beads the fluorochrome of ``marker`` at a bright, tight level. The viability control
    is cells, half of them heat-killed (dye bright, more autofluorescent), as labs usually do for
    amine-reactive dyes. A few doublets are included. Same optics as the samples.
    """
    n = int(n_events)
    cells = marker == "Viability"
    pos = np.zeros(n, bool) if marker is None else rng.random(n) < (0.5 if cells else BEAD_POSITIVE_FRACTION)
    F = np.zeros((n, P.N_FLUOR), np.float32)
    if cells:
        fsc, ssc = _truncated_gaussian_2d(n, P.LYMPH_MEAN, _LYMPH_CHOL, P.LYMPH_CORE, rng)
        fsc[pos] *= rng.uniform(0.6, 0.9, int(pos.sum()))
        lev = P.LEVELS["Viability"]
        F[:, P.MI["Viability"]] = np.where(
            pos,
            lev["dead"][0] * np.exp(lev["dead"][1] * rng.standard_normal(n)),
            lev["live"][0] * np.exp(lev["live"][1] * rng.standard_normal(n)),
        )
        fsch = fsc * (P.FSC_H_RATIO + P.FSC_H_RATIO_SD * rng.standard_normal(n))
        category = np.where(pos, CATEGORY["dead lymphocyte"], CATEGORY["lymphocyte"]).astype(np.uint8)
        af_factor = np.where(pos, P.AF_FACTOR["dead"], 1.0)
    else:
        if marker is not None:
            j = P.MI[marker]
            F[pos, j] = BEAD_BRIGHT[marker] * np.exp(BEAD_CV * rng.standard_normal(int(pos.sum())))
        fsc = BEAD_FSC[0] + BEAD_FSC[1] * rng.standard_normal(n)
        ssc = BEAD_SSC[0] + BEAD_SSC[1] * rng.standard_normal(n)
        fsch = fsc * (0.9 + 0.01 * rng.standard_normal(n))
        category = np.where(pos, CATEGORY["bead positive"], CATEGORY["bead negative"]).astype(np.uint8)
        af_factor = np.full(n, P.AF_FACTOR["bead"])
    dbl = rng.random(n) < BEAD_DOUBLET_FRACTION
    k = int(dbl.sum())
    if k:
        partner = rng.integers(0, n, k)
        F[dbl] += F[partner]
        fsc[dbl] *= 1.9
        ssc[dbl] *= 1.9
        af_factor[dbl] *= 2.0
        category[dbl] = CATEGORY["doublet"] if cells else CATEGORY["bead doublet"]
    events = _acquire(F, af_factor, fsc, fsch, ssc, 1.0, rate, rng)
    lineage = np.full(n, LINEAGE["none"] if cells else LINEAGE["bead"], np.uint8)
    return EventData(events, np.zeros(n, np.uint32), category, lineage, np.zeros(n, np.uint8))
