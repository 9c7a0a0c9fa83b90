"""Run folders for the report tests, built the way `cytopipe run` lays them out.

Most report tests use run folders made here, in-process and quickly (one failed sample included):
every sample of a (simulated) trial is read and gated with the real gating engine and template,
its gate-review data computed with :func:`cytopipe.report.gate_review_data`, and the run-folder
tables written under the pipeline's names (population_stats.parquet, samples.parquet,
gate_review.parquet, run.json). The report of a folder made by `cytopipe run` itself is tested
through the ``pipeline_run`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cytopipe.schema import STATS_COLUMNS

ARMS = ["placebo", "IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU"]

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"


def build_gated_run(
    trial_dir: Path,
    out_dir: Path,
    *,
    fail: Sequence[str] = (),
    template: Path = TEMPLATE,
    study: str = "SLE IL-2 (simulated sample data)",
) -> Path:
    """Gate every sample of ``trial_dir`` (manifest.csv, clinical.csv, fcs/) into run folder
    ``out_dir``. Samples named in ``fail`` are recorded as failed (as the pipeline records a
    corrupt file) instead of gated."""
    from cytopipe.fcs import read_fcs
    from cytopipe.gating import gate, load_template
    from cytopipe.report import gate_review_data, write_gate_review

    out_dir.mkdir(parents=True, exist_ok=True)
    tpl = load_template(template)
    manifest = pd.read_csv(trial_dir / "manifest.csv", dtype={"patient_id": str}, keep_default_na=False)
    stats, reviews, sample_rows = [], [], []
    for row in manifest.to_dict("records"):
        path = trial_dir / row["file"]
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        base = {
            "sample_id": row["sample_id"],
            "file": row["file"],
            "sha256": sha,
            "patient_id": row["patient_id"] or None,
            "visit": int(row["visit"]) if str(row["visit"]) != "" else None,
            "arm": row["arm"] or None,
            "control": row["control"] or None,
            **{
                k: row.get(k) or None for k in ("batch", "site", "acquired_at")
            },  # as the pipeline records them
            "error": "",
            "failed_step": "",
            "flags": "",
        }
        if row["control"]:
            n = read_fcs(path).events.shape[0]
            sample_rows.append({**base, "status": "ok", "events_before_qc": n, "events_after_qc": n})
            continue
        if row["sample_id"] in fail:
            sample_rows.append(
                {**base, "status": "failed", "failed_step": "register", "events_before_qc": None,
                 "events_after_qc": None,
                 "error": f"file '{row['file']}': FCS header is damaged (not an FCS file); re-export it"}
            )  # fmt: skip
            continue
        sample = read_fcs(path)
        result = gate(sample, tpl)
        meta = {k: base[k] for k in ("sample_id", "patient_id", "visit", "arm")}
        stats.append(result.to_population_stats(meta))
        reviews.append(gate_review_data(sample, result, row["sample_id"]))
        flags = [f"gate {p}: {f}" for p, f in result.flags]
        n = sample.events.shape[0]
        sample_rows.append(
            {**base, "status": "flagged" if flags else "ok", "events_before_qc": n, "events_after_qc": n,
             "flags": "; ".join(flags)}
        )  # fmt: skip
    ps = pd.concat(stats, ignore_index=True)
    ps.to_parquet(out_dir / "population_stats.parquet", index=False)
    samples = pd.DataFrame(sample_rows)
    samples["visit"] = samples["visit"].astype("Int64")
    for col in ("events_before_qc", "events_after_qc"):
        samples[col] = samples[col].astype("Int64")
    samples.to_parquet(out_dir / "samples.parquet", index=False)
    write_gate_review(out_dir, pd.concat(reviews, ignore_index=True))
    workflow = {"study": study, "manifest": str(trial_dir / "manifest.csv"), "clinical": str(trial_dir / "clinical.csv"),
                "template": str(template), "statistics": {"enabled": False}}  # fmt: skip
    info = {
        "study": study,
        "workflow": workflow,
        "cytopipe_version": "test",
        "finished_at": "2024-01-01T00:00:00",
    }
    (out_dir / "run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out_dir


def build_cohort_run(out_dir: Path, *, n_patients: int = 60, seed: int = 5, effect: float = 1.0,
                     parent_events: int = 20000) -> tuple[Path, pd.DataFrame]:  # fmt: skip
    """A tables-only run folder from :func:`cytopipe.simulate.simulate_cohort` (no FCS files, no
    gate-review data): population_stats with event counts drawn binomially from the true
    frequencies (seeded), and the cohort's clinical table. Returns (run folder, clinical table)."""
    from cytopipe.simulate import simulate_cohort

    cohort = simulate_cohort(n_patients=n_patients, visits=(0, 4, 12, 24), seed=seed, effect=effect)
    f = cohort.frequencies.copy()
    rng = np.random.default_rng(seed)
    f["sample_id"] = f["patient_id"] + "_W" + f["visit"].map(lambda v: f"{int(v):02d}")
    f["parent_count"] = parent_events
    f["count"] = rng.binomial(parent_events, np.clip(f["pct_parent"].to_numpy() / 100, 0, 1))
    f["pct_parent"] = 100 * f["count"] / f["parent_count"]
    out_dir.mkdir(parents=True, exist_ok=True)
    f[STATS_COLUMNS].to_parquet(out_dir / "population_stats.parquet", index=False)
    clinical = out_dir.parent / f"{out_dir.name}_clinical.csv"
    cohort.clinical.to_csv(clinical, index=False)
    info = {
        "study": "simulated IL-2 cohort",
        "workflow": {"study": "simulated IL-2 cohort", "clinical": str(clinical)},
    }
    (out_dir / "run.json").write_text(json.dumps(info), encoding="utf-8")
    return out_dir, cohort.clinical


def arm_mismatch(clinical: pd.DataFrame, folder: Path) -> tuple[str, Path]:
    """(patient, path): the clinical table with its first patient given another arm."""
    patient = sorted(clinical["patient_id"])[0]
    arm = clinical.loc[clinical["patient_id"] == patient, "arm"].iloc[0]
    other = next(a for a in ARMS if a != arm)
    path = folder / "arm_mismatch.csv"
    clinical.assign(arm=clinical["arm"].where(clinical["patient_id"] != patient, other)).to_csv(
        path, index=False
    )
    return patient, path
