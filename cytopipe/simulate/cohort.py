"""Cohort layer: patients, visits, clinical outcomes and true immune frequencies (tables only).

Fast enough for hundreds of replicate trials; the event layer (:mod:`cytopipe.simulate.events`)
draws cells from the per-sample composition computed here, so the expected frequencies of the
FCS files are exactly ``Cohort.frequencies``.

Generative model (see docs/simulator.md):

* immune trait k of patient i at week t, on the logit scale::

      logit p_ik(t) = logit(base_k) + patient_sd_k * z_ik + effect * E_k * dose(d_i) * r_i * kin(t)
                      + visit_sd_k * v_ikt

  with ``dose(d) = (d / (d + ED50)) / (1 / (1 + ED50))`` (1 at 1.0 MIU, 0 for placebo),
  ``r_i`` the patient's IL-2 responsiveness and ``kin`` the every-other-day rise to week 12
  followed by a small loss on weekly dosing;
* clinical improvement (SLEDAI points) ``Delta_it = g(t) * (mu0 + gamma * R_i + u_i) + e_it`` with
  ``R_i = effect * dose(d_i) * r_i`` the patient's latent Treg response: the drug acts on the
  clinic only through the Treg response, so ``effect=0`` gives identical arms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cytopipe.errors import CytopipeError
from cytopipe.simulate import params as P
from cytopipe.simulate._rng import stream
from cytopipe.simulate.populations import POPULATIONS

CLINICAL_COLUMNS = (
    "patient_id", "visit", "arm", "sledai", "pga", "bilag_new_a", "bilag_new_b",
    "anti_dsdna", "c3", "c4", "proteinuria", "prednisone_mg",
)  # fmt: skip
FREQUENCY_COLUMNS = ("patient_id", "visit", "arm", "population", "parent", "pct_parent")


class SimulationError(CytopipeError):
    """Invalid simulator arguments (visits, patient count, fault specification...)."""


@dataclass
class Cohort:
    """Tables of a simulated trial (no events)."""

    patients: pd.DataFrame
    clinical: pd.DataFrame
    frequencies: pd.DataFrame
    samples: pd.DataFrame  # one row per patient-visit: acquisition + full composition
    seed: int
    effect: float
    visits: tuple[int, ...]
    meta: dict = field(default_factory=dict)


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def dose_response(dose_miu: float) -> float:
    """Relative IL-2 effect of a dose (0 for placebo, 1 at 1.0 MIU; Emax with ED50)."""
    return (dose_miu / (dose_miu + P.DOSE_ED50)) * (1.0 + P.DOSE_ED50)


def kinetics(week: np.ndarray | float) -> np.ndarray:
    """Fraction of the full IL-2 effect present at ``week`` (every-other-day, then weekly dosing)."""
    w = np.asarray(week, dtype=float)
    rise = 1.0 - np.exp(-np.minimum(w, P.EOD_UNTIL_WEEK) / P.KINETICS_TAU_WEEKS)
    after = np.maximum(w - P.EOD_UNTIL_WEEK, 0.0)
    return rise * (1.0 - P.WEEKLY_DROP * (1.0 - np.exp(-after / P.WEEKLY_TAU_WEEKS)))


def improvement_course(week: np.ndarray | float) -> np.ndarray:
    """Fraction of a patient's eventual clinical improvement reached at ``week``."""
    return 1.0 - np.exp(-np.asarray(week, dtype=float) / P.CLIN["improve_tau_weeks"])


def check_visits(visits: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in visits)
    except (TypeError, ValueError):
        raise SimulationError(f"visits must be whole weeks, got {visits!r}") from None
    if not out or any(v < 0 for v in out) or len(set(out)) != len(out) or list(out) != sorted(out):
        raise SimulationError(f"visits must be distinct, increasing, non-negative weeks; got {list(out)}")
    return out


def patient_ids(n: int) -> list[str]:
    width = max(3, len(str(n)))
    return [f"P{i + 1:0{width}d}" for i in range(n)]


def sample_id(patient_id: str, week: int) -> str:
    return f"{patient_id}_W{week:02d}"


def simulate_cohort(
    n_patients: int = 40,
    visits: Sequence[int] = P.DEFAULT_VISITS,
    seed: int = 0,
    effect: float = 1.0,
) -> Cohort:
    """Simulate patients, clinical outcomes and true immune frequencies of an IL-2 trial.

    ``effect`` scales every IL-2 effect (0.0 = null trial: identical arms; 1.0 = the biology of
    docs/simulator.md). Arms are allocated 1:1:1:1 in permuted blocks of four. Random numbers
    come from one stream per patient and per patient-visit, so a patient's data do not depend on
    how many patients are simulated; the arithmetic is vectorised over all patient-visits.
    """
    if int(n_patients) < 1:
        raise SimulationError(f"n_patients must be at least 1, got {n_patients}")
    if int(seed) < 0:
        raise SimulationError(f"seed must be an integer >= 0, got {seed}")
    visits = check_visits(visits)
    effect = float(effect)
    n, nv = int(n_patients), len(visits)
    ids = patient_ids(n)
    traits = P.IMMUNE_TRAITS
    nt = len(traits)
    c = P.CLIN

    # --- draw every random number from its own stream (cheap loop, no arithmetic) ---------------
    arm_idx = np.empty(n, np.int64)
    pu = np.empty((n, 8))  # patient uniforms
    pz = np.empty((n, nt + 8))  # patient normals
    pk = np.empty(n, np.int64)  # SLEDAI extra (Poisson)
    vz = np.empty((n, nv, nt + 6))  # visit normals
    vu = np.empty((n, nv, 12))  # visit uniforms
    blocks: dict[int, np.ndarray] = {}
    for i in range(n):
        if i // 4 not in blocks:
            blocks[i // 4] = stream(seed, "block", i // 4).permutation(4)
        arm_idx[i] = blocks[i // 4][i % 4]
        rng = stream(seed, "patient", i)
        pu[i] = rng.random(8)
        pz[i] = rng.standard_normal(nt + 8)
        pk[i] = rng.poisson(c["sledai_extra_poisson"])
        for j, week in enumerate(visits):
            v = stream(seed, "visit", i, week)
            vz[i, j] = v.standard_normal(nt + 6)
            vu[i, j] = v.random(12)

    # --- patients ------------------------------------------------------------------------------
    arms = np.array(P.ARMS)[arm_idx]
    dose = np.array([P.DOSES_MIU[a] for a in arms])
    site = np.array(P.SITES)[
        np.searchsorted(np.cumsum(P.SITE_WEIGHTS), pu[:, 0] * sum(P.SITE_WEIGHTS), side="right")
    ]
    sex = np.where(pu[:, 1] < 0.9, "F", "M")
    enrol = np.floor(pu[:, 2] * P.ENROLMENT_DAYS).astype(np.int64)
    ln = pu[:, 3] < c["ln_fraction"]
    pred_choice = np.searchsorted(
        np.cumsum(c["prednisone_probs"]), pu[:, 4] * sum(c["prednisone_probs"]), side="right"
    )
    pred0 = np.array(c["prednisone_choices"])[np.minimum(pred_choice, len(c["prednisone_choices"]) - 1)]
    z = pz[:, :nt]
    extra = pz[:, nt:]
    age = np.clip(np.round(36 + 11 * extra[:, 0]), 18, 75).astype(int)
    r = np.exp(P.RESPONSIVENESS_TREG_LINK * z[:, traits.index("treg")] + P.RESPONSIVENESS_SD * extra[:, 1])
    sledai0 = np.minimum(c["sledai_base"] + 2 * pk, c["sledai_cap"])
    pga0 = np.clip(np.round(c["pga_base"][0] + c["pga_base"][1] * extra[:, 2], 1), 1.0, 3.0)
    dsdna0 = np.clip(c["dsdna_base"][0] * np.exp(c["dsdna_base"][1] * extra[:, 3]), 5, 1500)
    c3_0 = np.clip(c["c3_base"][0] + c["c3_base"][1] * extra[:, 4], 30, 170)
    c4_0 = np.clip(c["c4_base"][0] + c["c4_base"][1] * extra[:, 5], 2, 45)
    prot_m = np.where(ln, c["prot_ln"][0], c["prot_non_ln"][0])
    prot_s = np.where(ln, c["prot_ln"][1], c["prot_non_ln"][1])
    prot0 = prot_m * np.exp(prot_s * extra[:, 6])
    prot0 = np.where(ln, np.clip(prot0, 0.5, 8.0), np.clip(prot0, 0.02, 0.45))
    u_i = c["improve_patient_sd"] * extra[:, 7]
    dose_rel = np.array([dose_response(d) for d in dose])
    treg_response = effect * dose_rel * r  # R_i: latent Treg response (normalised)
    improvement = c["improve_placebo"] + c["improve_per_treg"] * treg_response + u_i  # D_i

    base = np.array([P.IMMUNE[k][0] for k in traits])
    psd = np.array([P.IMMUNE[k][1] for k in traits])
    vsd = np.array([P.IMMUNE[k][2] for k in traits])
    eff = np.array([P.IMMUNE[k][3] for k in traits])
    logit0 = _logit(base) + psd * z  # (n, nt)
    start = np.datetime64(P.STUDY_START, "D")
    patients = pd.DataFrame(
        {
            "patient_id": ids, "arm": arms, "dose_miu": dose, "site": site, "sex": sex, "age": age,
            "enrolled": (start + enrol).astype(str), "lupus_nephritis": ln,
            "il2_responsiveness": np.round(r, 6), "treg_response": np.round(treg_response, 6),
            "clinical_improvement": np.round(improvement, 6), "baseline_sledai": sledai0,
            **{f"baseline_{k}": np.round(_expit(logit0[:, j]) * 100, 6) for j, k in enumerate(traits)},
        }
    )  # fmt: skip

    # --- patient-visits (flattened: row = i * nv + j) ----------------------------------------------
    weeks = np.array(visits, dtype=float)
    pi = np.repeat(np.arange(n), nv)
    week = np.tile(weeks, n)
    vzf = vz.reshape(n * nv, -1)
    vuf = vu.reshape(n * nv, -1)
    shift = effect * eff[None, :] * (dose_rel * r)[pi, None] * kinetics(week)[:, None]
    p = _expit(logit0[pi] + shift + vsd[None, :] * vzf[:, :nt])
    col = {k: p[:, j] for j, k in enumerate(traits)}
    col["cd4"] = np.minimum(col["cd4"], 0.85)
    day_jitter = np.where(week > 0, np.floor(vuf[:, 7] * 7).astype(int) - 3, 0)
    acquired = start + enrol[pi] + 7 * week.astype(int) + day_jitter
    minute = 8 * 60 + np.floor(vuf[:, 8] * 9 * 60).astype(int)
    iso = pd.DatetimeIndex(acquired.astype("datetime64[ns]")).isocalendar()
    cols = {
        "sample_id": [sample_id(ids[i], int(w)) for i, w in zip(pi, week)],
        "patient_id": np.asarray(ids)[pi],
        "visit": week.astype(int),
        "arm": arms[pi],
        "site": site[pi],
        "acquired_at": [f"{a}T{m // 60:02d}:{m % 60:02d}:00" for a, m in zip(acquired.astype(str), minute)],
        "batch": [f"{s}-{y}W{w:02d}" for s, y, w in zip(site[pi], iso["year"], iso["week"])],
    }
    tech_keys = (
        "debris",
        "monocytes",
        "doublets",
        "doublets_in_region",
        "dead",
        "dead_in_region",
        "dead_monocytes",
    )
    for k, key in enumerate(tech_keys):
        lo, hi = P.TECH[key]
        cols[f"p_{key}"] = lo + vuf[:, k] * (hi - lo)
    cols["p_t"] = (1.0 - col["nk"]) * col["t_of_non_nk"]
    cols["p_nk"] = col["nk"]
    cols["p_cd4"] = col["cd4"]
    cols["p_cd8"] = 1.0 - col["cd4"] - P.P_DN - P.P_DP
    for key in ("treg", "mem", "th17", "th1", "th1_17", "tfh", "atfh", "bright"):
        cols[f"p_{key}"] = col[key]
    samples = pd.DataFrame(cols)

    # --- clinical ------------------------------------------------------------------------------
    e = vzf[:, nt:]
    delta = np.where(
        week > 0, improvement_course(week) * improvement[pi] + c["improve_visit_sd"] * e[:, 0], 0.0
    )
    post = week > 0
    drop = 2 * np.round(delta / 2.0)
    sledai = np.clip(sledai0[pi] - drop, 0, c["sledai_cap"] + 12).astype(int)
    pga = np.clip(np.round(pga0[pi] - c["pga_per_point"] * delta + c["pga_visit_sd"] * e[:, 1], 1), 0, 3)
    new_a = _poisson_ppf(vuf[:, 9], c["bilag_a_rate"] * np.exp(-0.25 * delta))
    new_b = _poisson_ppf(vuf[:, 10], c["bilag_b_rate"] * np.exp(-0.20 * delta))
    dsdna = np.clip(dsdna0[pi] * np.exp(-0.06 * delta + 0.15 * e[:, 2]), 1, 3000)
    c3v = np.clip(c3_0[pi] + 2.5 * delta + 6.0 * e[:, 3], 20, 200)
    c4v = np.clip(c4_0[pi] + 0.7 * delta + 1.8 * e[:, 4], 1, 60)
    prot = prot0[pi] * np.exp(-np.where(ln[pi], 0.10, 0.02) * delta + 0.15 * e[:, 5])
    taper = 1.0 - 0.4 * np.clip(delta / 8.0, 0.0, 1.0)
    pred = np.where(pred0[pi] > 2.5, np.maximum(2.5, np.round(pred0[pi] * taper / 2.5) * 2.5), pred0[pi])
    clinical = pd.DataFrame(
        {
            "patient_id": samples["patient_id"], "visit": samples["visit"], "arm": samples["arm"],
            "sledai": sledai,
            "pga": np.where(post, pga, pga0[pi]),
            "bilag_new_a": np.where(post, new_a, 0),
            "bilag_new_b": np.where(post, new_b, 0),
            "anti_dsdna": np.round(np.where(post, dsdna, dsdna0[pi]), 1),
            "c3": np.round(np.where(post, c3v, c3_0[pi]), 1),
            "c4": np.round(np.where(post, c4v, c4_0[pi]), 1),
            "proteinuria": np.round(np.where(post, prot, prot0[pi]), 2),
            "prednisone_mg": np.where(post, pred, pred0[pi]),
        },
        columns=list(CLINICAL_COLUMNS),
    )  # fmt: skip
    return Cohort(
        patients=patients,
        clinical=clinical,
        frequencies=expected_frequencies(samples),
        samples=samples,
        seed=int(seed),
        effect=effect,
        visits=visits,
    )


def _poisson_ppf(u: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Poisson draws by inversion of uniforms (vectorised; rates here are small)."""
    k = np.zeros(u.shape, dtype=np.int64)
    pmf = np.exp(-lam)
    cdf = pmf.copy()
    for j in range(1, 30):
        more = u > cdf
        if not more.any():
            break
        k += more
        pmf = pmf * lam / j
        cdf = cdf + pmf
    return k


def _uniform(u: float, bounds: tuple[float, float]) -> float:
    return float(bounds[0] + u * (bounds[1] - bounds[0]))


def expected_fractions(comp) -> dict[str, float]:
    """Expected fraction of parent of every canonical population for one sample composition.

    ``comp`` is a mapping (or DataFrame with one column per key: vectorised) of the ``p_*``
    composition keys of :attr:`Cohort.samples`.
    """
    ls = 1.0 - comp["p_debris"] - comp["p_monocytes"] - comp["p_doublets"]  # single lymphocytes
    dead, dead_in = comp["p_dead"], comp["p_dead_in_region"]
    single_in = ls * (1.0 - dead * (1.0 - dead_in))
    lymph = single_in + comp["p_doublets"] * comp["p_doublets_in_region"]
    p_treg, p_mem = comp["p_treg"], comp["p_mem"]
    return {
        "Lymphocytes": lymph,
        "Singlets": single_in / lymph,
        "Live": (1.0 - dead) / (1.0 - dead * (1.0 - dead_in)),
        "T cells": comp["p_t"],
        "CD4 T": comp["p_cd4"],
        "CD8 T": comp["p_cd8"],
        "Treg": p_treg,
        "Memory CD4": (1.0 - p_treg) * p_mem + p_treg * P.P_TREG_MEMORY,
        "Th17": comp["p_th17"],
        "Th1": comp["p_th1"],
        "cTfh": comp["p_tfh"],
        "activated cTfh": comp["p_atfh"],
        "NK": comp["p_nk"],
        "CD56bright NK": comp["p_bright"],
        "CD56dim NK": 1.0 - comp["p_bright"],
    }


def expected_frequencies(samples: pd.DataFrame) -> pd.DataFrame:
    """Long table patient_id, visit, arm, population, parent, pct_parent (true expected %).

    One row per sample and canonical population, in the order of ``samples`` then of the
    population hierarchy.
    """
    fr = expected_fractions(samples)
    names = [name for name, _, _ in POPULATIONS]
    k = len(names)
    pct = np.stack([np.asarray(fr[name], dtype=float) for name in names], axis=1).ravel() * 100.0
    return pd.DataFrame(
        {
            "patient_id": np.repeat(samples["patient_id"].to_numpy(), k),
            "visit": np.repeat(samples["visit"].to_numpy(), k),
            "arm": np.repeat(samples["arm"].to_numpy(), k),
            "population": np.tile(np.array(names, dtype=object), len(samples)),
            "parent": np.tile(np.array([parent for _, parent, _ in POPULATIONS], dtype=object), len(samples)),
            "pct_parent": pct,
        }
    )
