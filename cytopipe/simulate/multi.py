"""A simulated trial measured on instrument profiles (``simulate_trial(..., instrument=...)``).

Same cohort, cells and truth definitions as the default trial; each site measures on its own
instrument (a named profile everywhere, or a random profile drawn per site), with a per-batch
detector set-up and a per-file drift. Writes the same folder layout plus
``truth/instruments.csv`` (the profiles) and ``truth/thresholds.csv`` (the true threshold of every
dim marker per batch), and, with ``fmo=True``, one FMO control per dim marker and batch.
"""

from __future__ import annotations

import zlib
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
from cytopipe.simulate.layout import MANIFEST_COLUMNS, MONTHS, PANEL_NAME, TRUTH_README, Trial, prepare_dirs
from cytopipe.simulate.truth import STATS_COLUMNS, label_arrays, population_stats, save_npz, write_csv


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
    fmo: bool | str = False,
    fmo_events: int | None = None,
    per: str = "site",
    fmo_markers: Sequence[str] | None = None,
):
    cohort = simulate_cohort(n_patients=n_patients, visits=visits, seed=seed, effect=effect)
    if per not in ("site", "batch"):
        raise SimulationError(f"instrument profiles are drawn per 'site' or per 'batch', not {per!r}")
    units = sorted(set(cohort.samples[per]))  # one instrument per site (or batch)
    site_of = dict(zip(cohort.samples[per], cohort.samples["site"]))
    insts = site_instruments(instrument, units, seed)
    thresholds, named = {}, {}
    for u in units:  # a named profile is the same instrument everywhere: its thresholds once
        if insts[u].name.startswith("random"):
            thresholds[u] = true_thresholds(insts[u], seed, f"{per}:{u}")
        else:
            if insts[u].name not in named:
                named[insts[u].name] = true_thresholds(insts[u], seed, f"named:{insts[u].name}")
            thresholds[u] = named[insts[u].name]
    unknown = sorted(set(fmo_markers or ()) - set(DIM_MARKERS))
    if unknown:
        raise SimulationError(
            f"no FMO control is simulated for {unknown}: choose among {', '.join(DIM_MARKERS)}"
        )
    prepare_dirs(out)

    manifest_rows, truth_rows, sample_rows, fault_rows, thr_rows = [], [], [], [], []
    patient_index = {pid: i for i, pid in enumerate(cohort.patients["patient_id"])}
    for row in cohort.samples.to_dict("records"):
        sid, site, unit = row["sample_id"], row["site"], row[per]
        inst = insts[unit]
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
        data = measure_cells(cells, inst, thresholds[unit], rng, det_gain, scatter_gain, drift, rate)
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
            comp_t=compensated(data.events, inst),
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
    # fmo="site": one FMO set per site, in its first batch (acquired at the study's start)
    first_batch = batches.sort_values(["acquired_at", "batch"]).groupby("site")["batch"].first()
    for b in batches.to_dict("records"):
        unit = b[per]
        inst = insts[unit]
        det_gain, _ = batch_gains(seed, b["batch"], inst)
        for marker, value in thresholds[unit].at(det_gain).items():
            j = P.MI[marker]
            thr_rows.append(
                {"batch": b["batch"], "site": b["site"], "instrument": inst.name, "marker": marker,
                 "parent": FMO_PARENT[marker], "channel": inst.detectors[j], "percentile": FMO_PERCENTILE,
                 "threshold": value, "cofactor": inst.cofactor,
                 "threshold_asinh": float(np.arcsinh(value / inst.cofactor)),
                 "threshold_asinh_150": float(np.arcsinh(value / 150.0))}
            )  # fmt: skip
        if fmo and (fmo != "site" or first_batch[b["site"]] == b["batch"]):
            manifest_rows += _fmo_controls(
                out, b, inst, cohort, seed, fmo_events or max(4 * events, 50_000), thresholds[unit],
                fmo_markers,
            )  # fmt: skip

    for u in units:
        inst, s = insts[u], site_of[u]
        for marker in (None, *P.MARKERS):
            name = "unstained" if marker is None else f"single:{marker}"
            sid = f"CTRL_{u}_unstained" if marker is None else f"CTRL_{u}_{marker}"
            data = bead_control(marker, inst, control_events, stream(seed, "control", u, name))
            rel = f"fcs/controls/{sid}.fcs"
            _write(out / rel, data, inst, {"site": s, "control": name}, sid)
            save_npz(out / "truth" / "labels" / f"{sid}.npz", label_arrays(data))
            manifest_rows.append(
                {"file": rel, "sample_id": sid, "patient_id": "", "visit": pd.NA, "arm": "",
                 "panel": PANEL_NAME, "batch": f"controls-{u}", "site": s,
                 "acquired_at": f"{P.STUDY_START}T08:00:00", "control": name}
            )  # fmt: skip

    manifest = pd.DataFrame(manifest_rows, columns=MANIFEST_COLUMNS)
    manifest["visit"] = manifest["visit"].astype("Int64")
    write_csv(manifest, out / "manifest.csv")
    write_csv(cohort.clinical, out / "clinical.csv")
    truth = out / "truth"
    write_csv(pd.DataFrame(truth_rows, columns=STATS_COLUMNS), truth / "population_truth.csv")
    first = insts[units[0]]
    write_csv(pd.DataFrame(first.spillover, columns=list(first.detectors)), truth / "spillover.csv")
    write_csv(cohort.frequencies, truth / "expected_frequencies.csv")
    write_csv(cohort.patients, truth / "patients.csv")
    write_csv(pd.DataFrame(sample_rows), truth / "samples.csv")
    fault_cols = ["sample_id", "file", "fault", "first_event", "last_event", "n_events", "channels", "factor"]
    write_csv(pd.DataFrame(fault_rows, columns=fault_cols), truth / "faults.csv")
    described = [
        {"site": site_of[u], "batch": u if per == "batch" else "", **insts[u].describe()} for u in units
    ]
    write_csv(pd.DataFrame(described), truth / "instruments.csv")
    for u in units:
        spill = pd.DataFrame(insts[u].spillover, columns=list(insts[u].detectors))
        write_csv(spill, truth / f"spillover_{u}.csv")
    write_csv(pd.DataFrame(thr_rows), truth / "thresholds.csv")
    (truth / "README.txt").write_text(TRUTH_README + _README_EXTRA, encoding="utf-8")
    return Trial(out, manifest, cohort, first.spillover, {k: list(v) for k, v in fault_plan.items()}, insts)


def _fmo_controls(
    out: Path, batch: dict, inst: Instrument, cohort, seed: int, n: int, thresholds, markers=None
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
    for marker in markers or DIM_MARKERS:  # each FMO has its own random stream: a subset is the same files
        sid = f"FMO_{batch['batch']}_{marker}"
        rng = stream(seed, "fmo", batch["batch"], marker)
        cells = draw_cells(n, comp, rng, None, stain_gain)
        cells.F[:, P.MI[marker]] = 0.0
        data = measure_cells(cells, inst, thresholds, rng, det_gain, scatter_gain, None)
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


def serial_number(inst: Instrument) -> str | None:
    """The ``$CYTSN`` of a drawn (``random``) instrument profile: one per profile drawn (one is
    drawn per site or batch, so two sites with the same cytometer model are two instruments),
    stable across runs and machines. None for a named profile: it is the same instrument
    everywhere, and its files (``sample_data/``) stay as they were."""
    if not inst.name.startswith(("random:", "random-mass:")):
        return None
    return f"SIM-{zlib.crc32(inst.name.encode()):08X}"


def _write(path: Path, data, inst: Instrument, row: dict, sid: str) -> None:
    from cytopipe.fcs import Spillover, write_fcs

    names = channel_names(inst)
    channels = pd.DataFrame({"pnn": names, "pns": channel_pns(inst), "pnr": inst.pnr})
    when = row.get("acquired_at") or f"{P.STUDY_START}T08:00:00"
    day, clock = when.split("T")
    y, mth, d = day.split("-")
    serial = serial_number(inst)
    keywords = {
        "$CYT": f"{inst.cytometer} (cytopipe simulator)",
        **({"$CYTSN": serial} if serial else {}),
        "$DATE": f"{d}-{MONTHS[int(mth) - 1]}-{y}",
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
instruments.csv          one row per site (or batch): the instrument profile measuring it (range, cofactor,
                         gains, channel names, $PnS and the positive-negative separation of every marker)
spillover_<site>.csv     the true spillover matrix of each site's (or batch's) instrument (spillover.csv =
                         the first one)
thresholds.csv           per batch and dim marker: the TRUE threshold (compensated linear units, and
                         arcsinh at the instrument's cofactor and at 150) = the 99.5th percentile of the
                         marker's FMO control on its parent; CXCR5, PD-1, CXCR3 and CCR6 positivity in the
                         labels and population_truth.csv is "compensated measurement at the
                         instrument's nominal set-up (before the batch gain and the file's drift) above
                         this threshold"
labels/*.npz faults      instrument-profile files add the fault code "spike" (flow-rate surge); "clog" is
                         slow flow, a stop and a burst
labels/FMO_*.npz         with --fmo: labels of the FMO controls (fcs/controls/FMO_<batch>_<marker>.fcs)
"""


def load_instruments(trial_dir: str | Path) -> dict[str, Instrument]:
    """The instrument profiles of a trial folder (``truth/instruments.csv``), by site or batch."""
    from cytopipe.simulate.instruments import make_instrument

    table = pd.read_csv(Path(trial_dir) / "truth" / "instruments.csv", keep_default_na=False, dtype=str)
    out = {}
    for row in table.to_dict("records"):
        name = row["instrument"]
        if name.startswith(("random:", "random-mass:")):
            kind, seed, *key = name.split(":", 2)
            inst = make_instrument(kind, int(seed), key[0] if key else "")
        else:
            inst = make_instrument(name)
        out[row["batch"] or row["site"]] = inst
    return out
