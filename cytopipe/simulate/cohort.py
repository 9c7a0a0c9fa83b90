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

import math
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
    docs/simulator.md). Arms are allocated 1:1:1:1 in permuted blocks of four.
    """
    if int(n_patients) < 1:
        raise SimulationError(f"n_patients must be at least 1, got {n_patients}")
    visits = check_visits(visits)
    effect = float(effect)
    ids = patient_ids(int(n_patients))
    patients, clinical, samples = [], [], []
    start = np.datetime64(P.STUDY_START, "D")
    traits = P.IMMUNE_TRAITS
    base = np.array([P.IMMUNE[k][0] for k in traits])
    psd = np.array([P.IMMUNE[k][1] for k in traits])
    vsd = np.array([P.IMMUNE[k][2] for k in traits])
    eff = np.array([P.IMMUNE[k][3] for k in traits])
    itreg = traits.index("treg")
    c = P.CLIN
    weeks = np.array(visits, dtype=float)

    for i, pid in enumerate(ids):
        block = stream(seed, "block", i // 4).permutation(4)
        arm = P.ARMS[int(block[i % 4])]
        dose = P.DOSES_MIU[arm]
        rng = stream(seed, "patient", i)
        site = P.SITES[int(rng.choice(len(P.SITES), p=P.SITE_WEIGHTS))]
        sex = "F" if rng.random() < 0.9 else "M"
        age = int(np.clip(np.round(rng.normal(36, 11)), 18, 75))
        enrol = int(rng.integers(0, P.ENROLMENT_DAYS))
        z = rng.standard_normal(len(traits))
        r_i = float(
            np.exp(P.RESPONSIVENESS_TREG_LINK * z[itreg] + P.RESPONSIVENESS_SD * rng.standard_normal())
        )
        # clinical baseline
        sledai0 = int(min(c["sledai_base"] + 2 * rng.poisson(c["sledai_extra_poisson"]), c["sledai_cap"]))
        pga0 = float(np.clip(np.round(rng.normal(*c["pga_base"]), 1), 1.0, 3.0))
        dsdna0 = float(
            np.clip(c["dsdna_base"][0] * np.exp(c["dsdna_base"][1] * rng.standard_normal()), 5, 1500)
        )
        c3_0 = float(np.clip(rng.normal(*c["c3_base"]), 30, 170))
        c4_0 = float(np.clip(rng.normal(*c["c4_base"]), 2, 45))
        ln = bool(rng.random() < c["ln_fraction"])
        prot_m, prot_s = c["prot_ln"] if ln else c["prot_non_ln"]
        prot0 = float(prot_m * np.exp(prot_s * rng.standard_normal()))
        prot0 = float(np.clip(prot0, 0.5, 8.0) if ln else np.clip(prot0, 0.02, 0.45))
        pred0 = float(rng.choice(c["prednisone_choices"], p=c["prednisone_probs"]))
        u_i = c["improve_patient_sd"] * rng.standard_normal()

        treg_response = effect * dose_response(dose) * r_i  # R_i: latent Treg response (normalised)
        improvement = c["improve_placebo"] + c["improve_per_treg"] * treg_response + u_i  # D_i

        logit0 = _logit(base) + psd * z
        patients.append(
            {
                "patient_id": pid, "arm": arm, "dose_miu": dose, "site": site, "sex": sex, "age": age,
                "enrolled": str(start + enrol), "lupus_nephritis": ln,
                "il2_responsiveness": round(r_i, 6), "treg_response": round(treg_response, 6),
                "clinical_improvement": round(float(improvement), 6),
                "baseline_sledai": sledai0,
                **{f"baseline_{k}": round(float(_expit(logit0[j])) * 100, 6) for j, k in enumerate(traits)},
            }
        )  # fmt: skip

        kin = kinetics(weeks)
        course = improvement_course(weeks)
        for j, week in enumerate(visits):
            v = stream(seed, "visit", i, week)
            vnoise = v.standard_normal(len(traits))
            tech = v.random(7)
            e_it = v.standard_normal()
            pga_e = v.standard_normal()
            lab_e = v.standard_normal(4)
            day_jitter = int(v.integers(-3, 4)) if week > 0 else 0
            minute = int(v.integers(8 * 60, 17 * 60))

            # --- immune composition -----------------------------------------------------------
            shift = effect * eff * dose_response(dose) * r_i * kin[j]
            p = dict(zip(traits, _expit(logit0 + shift + vsd * vnoise)))
            p["cd4"] = min(p["cd4"], 0.85)
            p_nk = p["nk"]
            p_t = (1.0 - p_nk) * p["t_of_non_nk"]
            t = P.TECH
            comp = {
                "p_debris": _uniform(tech[0], t["debris"]),
                "p_monocytes": _uniform(tech[1], t["monocytes"]),
                "p_doublets": _uniform(tech[2], t["doublets"]),
                "p_doublets_in_region": _uniform(tech[3], t["doublets_in_region"]),
                "p_dead": _uniform(tech[4], t["dead"]),
                "p_dead_in_region": _uniform(tech[5], t["dead_in_region"]),
                "p_dead_monocytes": _uniform(tech[6], t["dead_monocytes"]),
                "p_t": p_t,
                "p_nk": p_nk,
                "p_cd4": p["cd4"],
                "p_cd8": 1.0 - p["cd4"] - P.P_DN - P.P_DP,
                "p_treg": p["treg"],
                "p_mem": p["mem"],
                "p_th17": p["th17"],
                "p_th1": p["th1"],
                "p_th1_17": p["th1_17"],
                "p_tfh": p["tfh"],
                "p_atfh": p["atfh"],
                "p_bright": p["bright"],
            }
            acquired = start + enrol + 7 * week + day_jitter
            iso = pd.Timestamp(str(acquired)).isocalendar()
            samples.append(
                {
                    "sample_id": sample_id(pid, week), "patient_id": pid, "visit": week, "arm": arm,
                    "site": site,
                    "acquired_at": f"{acquired}T{minute // 60:02d}:{minute % 60:02d}:00",
                    "batch": f"{site}-{iso.year}W{iso.week:02d}",
                    **comp,
                }
            )  # fmt: skip

            # --- clinical ---------------------------------------------------------------------
            if week == 0:
                delta = 0.0
            else:
                delta = course[j] * improvement + c["improve_visit_sd"] * e_it
            drop = 2 * int(np.round(delta / 2.0))
            sledai = int(np.clip(sledai0 - drop, 0, c["sledai_cap"] + 12))
            if week == 0:
                pga, new_a, new_b = pga0, 0, 0
                dsdna, c3v, c4v, prot, pred = dsdna0, c3_0, c4_0, prot0, pred0
            else:
                pga = float(
                    np.clip(np.round(pga0 - c["pga_per_point"] * delta + c["pga_visit_sd"] * pga_e, 1), 0, 3)
                )
                new_a = int(v.poisson(c["bilag_a_rate"] * math.exp(-0.25 * delta)))
                new_b = int(v.poisson(c["bilag_b_rate"] * math.exp(-0.20 * delta)))
                dsdna = float(np.clip(dsdna0 * math.exp(-0.06 * delta + 0.15 * lab_e[0]), 1, 3000))
                c3v = float(np.clip(c3_0 + 2.5 * delta + 6.0 * lab_e[1], 20, 200))
                c4v = float(np.clip(c4_0 + 0.7 * delta + 1.8 * lab_e[2], 1, 60))
                prot = float(prot0 * math.exp(-(0.10 if ln else 0.02) * delta + 0.15 * lab_e[3]))
                taper = 1.0 - 0.4 * float(np.clip(delta / 8.0, 0.0, 1.0))
                pred = max(2.5, math.floor(pred0 * taper / 2.5) * 2.5) if pred0 > 2.5 else pred0
            clinical.append(
                {
                    "patient_id": pid, "visit": week, "arm": arm, "sledai": sledai, "pga": pga,
                    "bilag_new_a": new_a, "bilag_new_b": new_b, "anti_dsdna": round(dsdna, 1),
                    "c3": round(c3v, 1), "c4": round(c4v, 1), "proteinuria": round(prot, 2),
                    "prednisone_mg": pred,
                }
            )  # fmt: skip

    samples_df = pd.DataFrame(samples)
    return Cohort(
        patients=pd.DataFrame(patients),
        clinical=pd.DataFrame(clinical, columns=list(CLINICAL_COLUMNS)),
        frequencies=expected_frequencies(samples_df),
        samples=samples_df,
        seed=int(seed),
        effect=effect,
        visits=visits,
    )


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
    """Long table patient_id, visit, arm, population, parent, pct_parent (true expected %)."""
    fr = expected_fractions(samples)
    parts = []
    for name, parent, _ in POPULATIONS:
        parts.append(
            pd.DataFrame(
                {
                    "patient_id": samples["patient_id"].to_numpy(),
                    "visit": samples["visit"].to_numpy(),
                    "arm": samples["arm"].to_numpy(),
                    "population": name,
                    "parent": parent,
                    "pct_parent": np.asarray(fr[name], dtype=float) * 100.0,
                }
            )
        )
    out = pd.concat(parts, ignore_index=True)
    order = {name: k for k, (name, _, _) in enumerate(POPULATIONS)}
    out["_o"] = out["population"].map(order)
    out = out.sort_values(["patient_id", "visit", "_o"], kind="stable").drop(columns="_o")
    return out.reset_index(drop=True)
