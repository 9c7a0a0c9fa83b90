"""Write a whole simulated trial folder: FCS files, controls, manifest, clinical table, truth."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cytopipe.simulate import params as P
from cytopipe.simulate._rng import stream
from cytopipe.simulate.cohort import SimulationError, simulate_cohort
from cytopipe.simulate.events import EventData, simulate_control, simulate_sample
from cytopipe.simulate.layout import MANIFEST_COLUMNS, MONTHS, PANEL_NAME, TRUTH_README, Trial
from cytopipe.simulate.multi import simulate_instrument_trial
from cytopipe.simulate.populations import FAULTS
from cytopipe.simulate.truth import STATS_COLUMNS, label_arrays, population_stats, save_npz, write_csv

FAULT_KINDS = tuple(f for f in FAULTS if f != "none")
DEFAULT_FAULT_FRACTION = 0.25
_VOLTAGES = (420, 480, 390, 410, 450, 430, 470, 500, 460, 520, 440, 560, 580, 530)


def simulate_trial(
    out_dir: str | Path,
    n_patients: int = 8,
    visits: Sequence[int] = P.DEFAULT_VISITS,
    events: int = 20000,
    seed: int = 0,
    effect: float = 1.0,
    faults: bool | float | Mapping[str, Sequence[str]] | None = None,
    control_events: int = 5000,
    overwrite: bool = False,
    instrument: str | None = None,
    fmo: bool | str = False,
    fmo_events: int | None = None,
    instrument_per: str = "site",
    fmo_markers: Sequence[str] | None = None,
) -> Trial:
    """Write a simulated IL-2 trial with per-event ground truth into ``out_dir``.

    ``events`` is the mean number of events per sample file (each file varies by +-30%).
    ``faults``: None/False (no faults), True (inject into a default 25% of the sample files),
    a fraction of files, or a mapping sample_id -> fault kinds (``clog``, ``shift``, ``margin``).
    The same arguments always give byte-identical files.

    ``instrument`` measures the trial on instrument profiles instead of the default instrument:
    a named profile (``fortessa``, ``symphony``, ``aurora``, ``attune``, ``cytof``) for every site,
    or ``random`` / ``random-mass`` (a profile drawn per site from ``seed``, or per batch with
    ``instrument_per="batch"``); see
    :mod:`cytopipe.simulate.instruments`. ``fmo=True`` (instrument profiles only) adds one FMO
    control per dim marker and batch (``fmo_events`` events each, default 4 x ``events`` and at least 50,000);
    ``fmo="site"``: one set per site, in its first batch. ``fmo_markers``: FMOs of these dim markers
    only (default: every dim marker).
    """
    out = Path(out_dir)
    if int(events) < 100:
        raise SimulationError(f"events must be at least 100 per file, got {events}")
    if int(control_events) < 100:
        raise SimulationError(f"control_events must be at least 100 per control, got {control_events}")
    if fmo_events is not None and int(fmo_events) < 100:  # checked before anything is written
        raise SimulationError(f"fmo_events must be at least 100 per FMO control, got {fmo_events}")
    cohort = simulate_cohort(n_patients=n_patients, visits=visits, seed=seed, effect=effect)
    if instrument is not None:
        from cytopipe.simulate.faults import INSTRUMENT_FAULT_KINDS

        fault_plan = _fault_plan(faults, list(cohort.samples["sample_id"]), seed, INSTRUMENT_FAULT_KINDS)
    else:
        fault_plan = _fault_plan(faults, list(cohort.samples["sample_id"]), seed)
    if instrument is not None:
        from cytopipe.simulate.instruments import make_instrument

        make_instrument(instrument, seed)  # an unknown name fails before anything is written
        _prepare(out, overwrite)
        return simulate_instrument_trial(
            out, instrument, n_patients, visits, events, seed, effect, fault_plan, control_events,
            fmo=fmo, fmo_events=fmo_events, per=instrument_per, fmo_markers=fmo_markers,
        )  # fmt: skip
    if fmo:
        raise SimulationError(
            "FMO controls are simulated for instrument profiles only: add --instrument NAME (e.g. "
            "--instrument fortessa; in Python instrument='fortessa')"
        )
    _prepare(out, overwrite)  # only once every argument is known to be good
    spill = P.spillover_matrix()
    from cytopipe.fcs import Spillover

    spill_kw = Spillover(matrix=spill, channels=list(P.DETECTORS))
    (out / "fcs" / "controls").mkdir(parents=True, exist_ok=True)
    (out / "truth" / "labels").mkdir(parents=True, exist_ok=True)

    manifest_rows, truth_rows, sample_rows, fault_rows = [], [], [], []
    patient_index = {pid: i for i, pid in enumerate(cohort.patients["patient_id"])}
    for row in cohort.samples.to_dict("records"):
        sid = row["sample_id"]
        i = patient_index[row["patient_id"]]
        level = np.exp(P.PATIENT_LEVEL_SD * stream(seed, "patient_markers", i).standard_normal(P.N_FLUOR))
        g = stream(seed, "batch", row["batch"])
        gain = np.exp(P.BATCH_GAIN_SD * g.standard_normal(P.N_FLUOR))
        scatter_gain = float(np.exp(P.BATCH_SCATTER_SD * g.standard_normal()))
        rng = stream(seed, "sample", sid)
        n_ev = int(round(events * rng.uniform(0.7, 1.3)))
        rate = float(rng.uniform(1500, 3000))
        kinds = fault_plan.get(sid, ())
        data = simulate_sample(n_ev, row, rng, level, gain, scatter_gain, rate, kinds)
        rel = f"fcs/{sid}.fcs"
        _write_fcs(out / rel, data, row, spill_kw)
        save_npz(out / "truth" / "labels" / f"{sid}.npz", label_arrays(data))
        ids = {k: row[k] for k in ("sample_id", "patient_id", "visit", "arm")}
        truth_rows += population_stats(data.events, data.membership, ids, keep=data.fault == 0)
        manifest_rows.append(
            {"file": rel, "sample_id": sid, "patient_id": row["patient_id"], "visit": row["visit"],
             "arm": row["arm"], "panel": PANEL_NAME, "batch": row["batch"], "site": row["site"],
             "acquired_at": row["acquired_at"], "control": ""}
        )  # fmt: skip
        sample_rows.append(
            {**row, "file": rel, "n_events": n_ev, "event_rate_per_s": round(rate, 3),
             "scatter_gain": round(scatter_gain, 6),
             **{f"gain_{m}": round(float(v), 6) for m, v in zip(P.MARKERS, gain)},
             **{f"level_{m}": round(float(v), 6) for m, v in zip(P.MARKERS, level)},
             "faults": ";".join(kinds)}
        )  # fmt: skip
        for f in data.faults:
            fault_rows.append({"sample_id": sid, "file": rel, **f})

    for marker in (None, *P.MARKERS):
        name = "unstained" if marker is None else f"single:{marker}"
        sid = "CTRL_unstained" if marker is None else f"CTRL_{marker}"
        data = simulate_control(marker, control_events, stream(seed, "control", name))
        rel = f"fcs/controls/{sid}.fcs"
        _write_fcs(out / rel, data, {"sample_id": sid, "control": name}, spill_kw)
        save_npz(out / "truth" / "labels" / f"{sid}.npz", label_arrays(data))
        manifest_rows.append(
            {"file": rel, "sample_id": sid, "patient_id": "", "visit": pd.NA, "arm": "", "panel": PANEL_NAME,
             "batch": "controls", "site": "", "acquired_at": f"{P.STUDY_START}T08:00:00", "control": name}
        )  # fmt: skip

    manifest = pd.DataFrame(manifest_rows, columns=MANIFEST_COLUMNS)
    manifest["visit"] = manifest["visit"].astype("Int64")
    write_csv(manifest, out / "manifest.csv")
    write_csv(cohort.clinical, out / "clinical.csv")
    truth = out / "truth"
    write_csv(pd.DataFrame(truth_rows, columns=STATS_COLUMNS), truth / "population_truth.csv")
    write_csv(pd.DataFrame(spill, columns=list(P.DETECTORS)), truth / "spillover.csv")
    write_csv(cohort.frequencies, truth / "expected_frequencies.csv")
    write_csv(cohort.patients, truth / "patients.csv")
    write_csv(pd.DataFrame(sample_rows), truth / "samples.csv")
    fault_cols = ["sample_id", "file", "fault", "first_event", "last_event", "n_events", "channels", "factor"]
    write_csv(pd.DataFrame(fault_rows, columns=fault_cols), truth / "faults.csv")
    (truth / "README.txt").write_text(TRUTH_README, encoding="utf-8")
    return Trial(out, manifest, cohort, spill, {k: list(v) for k, v in fault_plan.items()})


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SimulationError(f"{out} exists and is not a folder; choose another --out")
    ours = [out / "fcs", out / "truth", out / "manifest.csv", out / "clinical.csv"]
    if any(p.exists() for p in ours):
        if not overwrite:
            raise SimulationError(
                f"{out} already holds a simulated trial (manifest.csv, fcs/ or truth/); "
                "pass overwrite=True (--overwrite) to replace it, or choose another folder"
            )
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _fault_plan(
    faults, sample_ids: list[str], seed: int, allowed: tuple[str, ...] = FAULT_KINDS
) -> dict[str, tuple[str, ...]]:
    if faults is None or faults is False:
        return {}
    if isinstance(faults, Mapping):
        plan = {}
        for sid, kinds in faults.items():
            if sid not in sample_ids:
                raise SimulationError(
                    f"fault plan names unknown sample {sid!r}; samples are e.g. {sample_ids[:3]}"
                )
            kinds = allowed if kinds in ("all", None) else tuple([kinds] if isinstance(kinds, str) else kinds)
            bad = [k for k in kinds if k not in allowed]
            if bad:
                raise SimulationError(f"unknown fault kind(s) {bad} for {sid}; choose from {list(allowed)}")
            plan[sid] = tuple(kinds)
        return plan
    fraction = DEFAULT_FAULT_FRACTION if faults is True else float(faults)
    if not 0.0 < fraction <= 1.0:
        raise SimulationError(f"fault fraction must be in (0, 1], got {faults}")
    rng = stream(seed, "faults")
    k = max(1, int(round(fraction * len(sample_ids))))
    chosen = sorted(rng.choice(len(sample_ids), size=k, replace=False))
    # rotate through the fault kinds so every kind occurs
    return {sample_ids[j]: (allowed[r % len(allowed)],) for r, j in enumerate(chosen)}


def _write_fcs(path: Path, data: EventData, row: Mapping, spill_kw) -> None:
    from cytopipe.fcs import write_fcs

    site = row.get("site") or "S1"
    spelled = P.SITE_PNS[site]
    pns = [""] * len(P.SCATTER) + [spelled[m] for m in P.MARKERS] + [""]
    # `n` numbers the parameters so the writer keeps the per-parameter $PnV keywords below
    channels = pd.DataFrame(
        {"n": range(1, len(P.CHANNELS) + 1), "pnn": list(P.CHANNELS), "pns": pns, "pnr": P.PNR}
    )
    when = row.get("acquired_at") or f"{P.STUDY_START}T08:00:00"
    day, clock = when.split("T")
    y, mth, d = day.split("-")
    hh, mm, ss = (int(x) for x in clock.split(":"))
    seconds = float(data.events[-1, -1]) * P.TIMESTEP if len(data.events) else 0.0
    end = hh * 3600 + mm * 60 + ss + int(np.ceil(seconds))
    keywords = {
        "$CYT": P.CYTOMETER,
        "$DATE": f"{d}-{MONTHS[int(mth) - 1]}-{y}",
        "$BTIM": f"{hh:02d}:{mm:02d}:{ss:02d}",
        "$ETIM": f"{end // 3600 % 24:02d}:{end // 60 % 60:02d}:{end % 60:02d}",
        "$TIMESTEP": repr(P.TIMESTEP),
        "$SRC": row["sample_id"],
        "$FIL": path.name,
        "$PROJ": "NCT04077684 (simulated)",
        "SAMPLE_ID": row["sample_id"],
        "CREATOR": "cytopipe simulate",
    }
    if row.get("patient_id"):
        keywords.update(
            {"$INST": f"site {site}", "PATIENT_ID": row["patient_id"], "VISIT_WEEK": str(row["visit"]),
             "SITE": site, "BATCH": row["batch"]}
        )  # fmt: skip
    if row.get("control"):
        keywords["CONTROL"] = row["control"]
    for j, volts in enumerate(_VOLTAGES):
        keywords[f"$P{len(P.SCATTER) + j + 1}V"] = str(volts)
    write_fcs(path, data.events, channels, keywords, spillover=spill_kw)


def instrument_trial(
    folder: str | Path,
    instrument: str = "random",
    seed: int = 0,
    patients: int = 6,
    visits: Sequence[int] = P.DEFAULT_VISITS,
    events: int = 20000,
    effect: float = 1.0,
    fmo: bool | str = False,
    faults=None,
    control_events: int = 2000,
    overwrite: bool = True,
    fmo_events: int | None = None,
    per: str = "site",
):
    """A trial measured on instrument profile(s): the harness entry point for accuracy tests.

    ``instrument``: a named profile (``fortessa``, ``symphony``, ``aurora``, ``attune``, ``cytof``),
    ``random`` (a fluorescence profile drawn per site from ``seed``) or ``random-mass``;
    ``per="batch"`` draws one per acquisition batch instead (every batch its own instrument).
    Returns the :class:`Trial` (``.instruments``: site/batch -> profile).
    """
    if instrument is None:
        raise SimulationError("instrument_trial needs an instrument profile name (or 'random')")
    return simulate_trial(
        folder, n_patients=patients, visits=visits, events=events, seed=seed, effect=effect,
        faults=faults, control_events=control_events, overwrite=overwrite, instrument=instrument,
        fmo=fmo, fmo_events=fmo_events, instrument_per=per,
    )  # fmt: skip
