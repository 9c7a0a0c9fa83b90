"""A simulated trial measured on instrument profiles (``simulate_trial(..., instrument=...)``).

Same cohort, cells and truth definitions as the default trial; each site measures on its own
instrument (a named profile everywhere, or a random profile drawn per site), with a per-batch
detector set-up and a per-file drift. Writes the same folder layout plus
``truth/instruments.csv`` (the profiles) and ``truth/thresholds.csv`` (the true threshold of every
dim marker per batch), and, with ``fmo=True``, one FMO control per dim marker and batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cytopipe.simulate import params as P
from cytopipe.simulate._rng import stream
from cytopipe.simulate.cohort import SimulationError, simulate_cohort
from cytopipe.simulate.events import draw_cells
from cytopipe.simulate.instrument_events import (
    batch_gains,
    bead_control,
    channel_names,
    channel_pns,
    compensated,
    file_drift,
    measure_cells,
    site_instruments,
    true_thresholds,
)
from cytopipe.simulate.instruments import DIM_MARKERS, FMO_PARENT, FMO_PERCENTILE, Instrument
from cytopipe.simulate.truth import STATS_COLUMNS, label_arrays, population_stats, save_npz, write_csv

PANEL_NAME = "SLE-IL2-T-NK-v1"


def simulate_instrument_trial(
    out: Path,
    instrument: str,
    n_patients: int,
    visits: Sequence[int],
    events: int,
    seed: int,
    effect: float,
    fault_plan: dict,
    control_events: int,
    fmo: bool = False,
    fmo_events: int | None = None,
):
    from cytopipe.simulate.trial import _TRUTH_README, MANIFEST_COLUMNS, Trial, _prepare_dirs

    cohort = simulate_cohort(n_patients=n_patients, visits=visits, seed=seed, effect=effect)
    sites = sorted(set(cohort.samples["site"]))
    insts = site_instruments(instrument, sites, seed)
    thresholds = {s: true_thresholds(insts[s], seed, f"site:{s}") for s in sites}
    _prepare_dirs(out)

    manifest_rows, truth_rows, sample_rows, fault_rows, thr_rows = [], [], [], [], []
    patient_index = {pid: i for i, pid in enumerate(cohort.patients["patient_id"])}
    for row in cohort.samples.to_dict("records"):
        sid, site = row["sample_id"], row["site"]
        inst = insts[site]
        i = patient_index[row["patient_id"]]
        level = np.exp(P.PATIENT_LEVEL_SD * stream(seed, "patient_markers", i).standard_normal(P.N_FLUOR))
        g = stream(seed, "batch", row["batch"])
        stain_gain = np.exp(P.BATCH_GAIN_SD * g.standard_normal(P.N_FLUOR))
        det_gain, scatter_gain = batch_gains(seed, row["batch"], inst)
        rng = stream(seed, "sample", sid)
        n_ev = int(round(events * rng.uniform(0.7, 1.3)))
        rate = float(rng.uniform(1500, 3000))
        cells = draw_cells(n_ev, row, rng, level, stain_gain)
        drift = file_drift(inst, seed, sid)
        data = measure_cells(cells, inst, thresholds[site], rng, det_gain, scatter_gain, drift, rate)
        kinds = fault_plan.get(sid, ())
        if kinds:
            from cytopipe.simulate.faults import inject_instrument_faults

            inject_instrument_faults(data, kinds, rng, rate, inst)
        rel = f"fcs/{sid}.fcs"
        _write(out / rel, data, inst, row, sid)
        save_npz(out / "truth" / "labels" / f"{sid}.npz", label_arrays(data))
        ids = {k: row[k] for k in ("sample_id", "patient_id", "visit", "arm")}
        truth_rows += population_stats(
            data.events,
            data.membership,
            ids,
            keep=data.fault == 0,
            comp_t=_nominal(data, inst, det_gain, drift),
        )
        manifest_rows.append(
            {"file": rel, "sample_id": sid, "patient_id": row["patient_id"], "visit": row["visit"],
             "arm": row["arm"], "panel": PANEL_NAME, "batch": row["batch"], "site": site,
             "acquired_at": row["acquired_at"], "control": ""}
        )  # fmt: skip
        sample_rows.append(
            {**row, "file": rel, "instrument": inst.name, "n_events": n_ev,
             "event_rate_per_s": round(rate, 3), "detector_gain": round(det_gain, 6),
             "scatter_gain": round(scatter_gain, 6),
             **{f"drift_{m}": round(float(v), 6) for m, v in zip(P.MARKERS, drift)},
             "faults": ";".join(kinds)}
        )  # fmt: skip
        for f in data.faults:
            fault_rows.append({"sample_id": sid, "file": rel, **f})

    batches = cohort.samples.drop_duplicates("batch")[["batch", "site", "acquired_at"]]
    for b in batches.to_dict("records"):
        inst = insts[b["site"]]
        det_gain, _ = batch_gains(seed, b["batch"], inst)
        for marker, value in thresholds[b["site"]].at(det_gain).items():
            j = P.MI[marker]
            thr_rows.append(
                {"batch": b["batch"], "site": b["site"], "instrument": inst.name, "marker": marker,
                 "parent": FMO_PARENT[marker], "channel": inst.detectors[j], "percentile": FMO_PERCENTILE,
                 "threshold": value, "cofactor": inst.cofactor,
                 "threshold_asinh": float(np.arcsinh(value / inst.cofactor)),
                 "threshold_asinh_150": float(np.arcsinh(value / 150.0))}
            )  # fmt: skip
        if fmo:
            manifest_rows += _fmo_controls(out, b, inst, cohort, seed, fmo_events or 4 * events, thresholds)

    for s in sites:
        inst = insts[s]
        for marker in (None, *P.MARKERS):
            name = "unstained" if marker is None else f"single:{marker}"
            sid = f"CTRL_{s}_unstained" if marker is None else f"CTRL_{s}_{marker}"
            data = bead_control(marker, inst, control_events, stream(seed, "control", s, name))
            rel = f"fcs/controls/{sid}.fcs"
            _write(out / rel, data, inst, {"site": s, "control": name}, sid)
            save_npz(out / "truth" / "labels" / f"{sid}.npz", label_arrays(data))
            manifest_rows.append(
                {"file": rel, "sample_id": sid, "patient_id": "", "visit": pd.NA, "arm": "",
                 "panel": PANEL_NAME, "batch": f"controls-{s}", "site": s,
                 "acquired_at": f"{P.STUDY_START}T08:00:00", "control": name}
            )  # fmt: skip

    manifest = pd.DataFrame(manifest_rows, columns=MANIFEST_COLUMNS)
    manifest["visit"] = manifest["visit"].astype("Int64")
    write_csv(manifest, out / "manifest.csv")
    write_csv(cohort.clinical, out / "clinical.csv")
    truth = out / "truth"
    write_csv(pd.DataFrame(truth_rows, columns=STATS_COLUMNS), truth / "population_truth.csv")
    first = insts[sites[0]]
    write_csv(pd.DataFrame(first.spillover, columns=list(first.detectors)), truth / "spillover.csv")
    write_csv(cohort.frequencies, truth / "expected_frequencies.csv")
    write_csv(cohort.patients, truth / "patients.csv")
    write_csv(pd.DataFrame(sample_rows), truth / "samples.csv")
    fault_cols = ["sample_id", "file", "fault", "first_event", "last_event", "n_events", "channels", "factor"]
    write_csv(pd.DataFrame(fault_rows, columns=fault_cols), truth / "faults.csv")
    write_csv(pd.DataFrame([{"site": s, **insts[s].describe()} for s in sites]), truth / "instruments.csv")
    for s in sites:
        spill = pd.DataFrame(insts[s].spillover, columns=list(insts[s].detectors))
        write_csv(spill, truth / f"spillover_{s}.csv")
    write_csv(pd.DataFrame(thr_rows), truth / "thresholds.csv")
    (truth / "README.txt").write_text(_TRUTH_README + _README_EXTRA, encoding="utf-8")
    return Trial(out, manifest, cohort, first.spillover, {k: list(v) for k, v in fault_plan.items()}, insts)


def _nominal(data, inst: Instrument, det_gain: float, drift: np.ndarray) -> np.ndarray:
    """Compensated values for the truth medians (the measured file, drift included)."""
    return compensated(data.events, inst)


def _fmo_controls(
    out: Path, batch: dict, inst: Instrument, cohort, seed: int, n: int, thresholds
) -> list[dict]:
    """One FMO control per dim marker for a batch: a typical donor stained with every antibody
    but one, acquired at the batch's set-up (no per-file drift)."""
    from cytopipe.simulate.instrument_events import reference_composition

    rows = []
    det_gain, scatter_gain = batch_gains(seed, batch["batch"], inst)
    samples = cohort.samples
    tech = samples[samples["batch"] == batch["batch"]].iloc[0].to_dict()
    comp = {**tech, **reference_composition()}
    g = stream(seed, "batch", batch["batch"])
    stain_gain = np.exp(P.BATCH_GAIN_SD * g.standard_normal(P.N_FLUOR))
    for marker in DIM_MARKERS:
        sid = f"FMO_{batch['batch']}_{marker}"
        rng = stream(seed, "fmo", batch["batch"], marker)
        cells = draw_cells(n, comp, rng, None, stain_gain)
        cells.F[:, P.MI[marker]] = 0.0
        data = measure_cells(cells, inst, thresholds[batch["site"]], rng, det_gain, scatter_gain, None)
        rel = f"fcs/controls/{sid}.fcs"
        _write(
            out / rel,
            data,
            inst,
            {"site": batch["site"], "control": f"fmo:{marker}", "batch": batch["batch"]},
            sid,
        )
        save_npz(out / "truth" / "labels" / f"{sid}.npz", label_arrays(data))
        rows.append(
            {"file": rel, "sample_id": sid, "patient_id": "", "visit": pd.NA, "arm": "", "panel": PANEL_NAME,
             "batch": batch["batch"], "site": batch["site"], "acquired_at": batch["acquired_at"],
             "control": f"fmo:{marker}"}
        )  # fmt: skip
    return rows


def _write(path: Path, data, inst: Instrument, row: dict, sid: str) -> None:
    from cytopipe.fcs import Spillover, write_fcs
    from cytopipe.simulate.trial import _MONTHS

    names = channel_names(inst)
    channels = pd.DataFrame({"pnn": names, "pns": channel_pns(inst), "pnr": inst.pnr})
    when = row.get("acquired_at") or f"{P.STUDY_START}T08:00:00"
    day, clock = when.split("T")
    y, mth, d = day.split("-")
    keywords = {
        "$CYT": f"{inst.cytometer} (cytopipe simulator)",
        "$DATE": f"{d}-{_MONTHS[int(mth) - 1]}-{y}",
        "$BTIM": clock,
        "$TIMESTEP": repr(P.TIMESTEP),
        "$SRC": sid,
        "$FIL": path.name,
        "$PROJ": "NCT04077684 (simulated)",
        "SAMPLE_ID": sid,
        "CREATOR": "cytopipe simulate",
        "INSTRUMENT_PROFILE": inst.name,
    }
    if row.get("patient_id"):
        keywords.update({"PATIENT_ID": row["patient_id"], "VISIT_WEEK": str(row["visit"]), "SITE": row["site"],
                         "BATCH": row["batch"]})  # fmt: skip
    if row.get("control"):
        keywords["CONTROL"] = row["control"]
    # mass cytometry files carry no spillover matrix (as a CyTOF writes them)
    spill = None if inst.kind == "mass" else Spillover(matrix=inst.spillover, channels=list(inst.detectors))
    write_fcs(path, data.events, channels, keywords, spillover=spill)


_README_EXTRA = """
Instrument profiles (simulate --instrument):
instruments.csv          one row per site: the instrument profile measuring it (range, cofactor, gains,
                         channel names, $PnS and the positive-negative separation of every marker)
spillover_<site>.csv     the true spillover matrix of each site's instrument (spillover.csv = first site)
thresholds.csv           per batch and dim marker: the TRUE threshold (compensated linear units, and
                         arcsinh at the instrument's cofactor and at 150) = the 99.5th percentile of the
                         marker's FMO control on its parent; CXCR5, PD-1, CXCR3 and CCR6 positivity in the
                         labels and population_truth.csv is "noise-free value above this threshold"
"""


def instrument_trial(
    folder: str | Path,
    instrument: str = "random",
    seed: int = 0,
    patients: int = 6,
    visits: Sequence[int] = P.DEFAULT_VISITS,
    events: int = 20000,
    effect: float = 1.0,
    fmo: bool = False,
    faults=None,
    control_events: int = 2000,
    overwrite: bool = True,
):
    """A trial measured on instrument profile(s): the harness entry point for accuracy tests.

    ``instrument``: a named profile (``fortessa``, ``symphony``, ``aurora``, ``attune``, ``cytof``),
    ``random`` (a fluorescence profile drawn per site from ``seed``) or ``random-mass``.
    """
    from cytopipe.simulate.trial import simulate_trial

    if instrument is None:
        raise SimulationError("instrument_trial needs an instrument profile name (or 'random')")
    return simulate_trial(
        folder, n_patients=patients, visits=visits, events=events, seed=seed, effect=effect,
        faults=faults, control_events=control_events, overwrite=overwrite, instrument=instrument,
        fmo=fmo,
    )  # fmt: skip
