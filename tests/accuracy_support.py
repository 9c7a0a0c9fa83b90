"""Gating accuracy on simulated trials: gate a trial with a template through the real engine and
compare with the simulator's truth.

::

    from cytopipe.simulate import instrument_trial
    from tests.accuracy_support import gate_trial, accuracy_table

    instrument_trial(folder, instrument="random", seed=101, patients=6, events=20000)
    acc = accuracy_table(gate_trial(folder, "gating/sle_il2_tcell_nk.yaml"))
    # population, n, undefined, mae_pp (median |% of parent - truth|), ccc (Lin's concordance),
    # fallback_rate (share of samples whose gate fell back / was flagged), failed (samples not gated)

The engine is used as ``cytopipe run`` uses it: pass 1 fits every sample, estimates are pooled per
patient/cohort, pass 2 gates with the pooled fallbacks (``pooled=False`` gates each file alone).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"


def lins_ccc(x, y) -> float:
    """Lin's concordance correlation coefficient of two paired series (nan if < 3 pairs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()
    cov = ((x - mx) * (y - my)).mean()
    denom = vx + vy + (mx - my) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def site_fmo_controls(trial_dir, manifest: pd.DataFrame) -> dict[str, dict]:
    """The FMO controls (``control: fmo:<marker>``) of each site's first batch, read once:
    site -> {marker: Sample}; empty when the trial has none. One FMO set per site (acquired at
    the study's start), as many labs do; each file's own landmarks follow its later drift."""
    import cytopipe

    fmo = manifest[manifest["control"].fillna("").str.startswith("fmo:")]
    out: dict[str, dict] = {}
    for site, g in fmo.sort_values(["acquired_at", "batch"]).groupby("site", sort=True):
        first = g[g["batch"] == g["batch"].iloc[0]]
        out[str(site)] = {
            c.split(":", 1)[1]: cytopipe.read_fcs(Path(trial_dir) / f)
            for c, f in zip(first["control"], first["file"])
        }
    return out


def gate_trial(
    trial_dir, template=TEMPLATE, pooled: bool = True, mapping: dict | None = None, fmo: bool = True
) -> pd.DataFrame:
    """Gate every sample file of a simulated trial; one row per (sample, population) with the
    gated ``pct_parent``, the truth ``pct_parent_true``, the gate ``source``, whether it fell back
    (``fallback``: source not ``fitted`` or any flag) and ``error`` (why a sample could not be
    gated at all; its rows then have no gated value). When the trial has FMO controls (and
    ``fmo``), each sample gets its site's (:func:`site_fmo_controls`)."""
    import cytopipe
    from cytopipe.errors import CytopipeError
    from cytopipe.gating import gate, load_template, pool_estimates

    trial_dir = Path(trial_dir)
    tpl = load_template(template) if isinstance(template, (str, Path)) else template
    manifest = pd.read_csv(trial_dir / "manifest.csv", dtype={"sample_id": str, "patient_id": str})
    controls = site_fmo_controls(trial_dir, manifest) if fmo else {}
    manifest = manifest[manifest["control"].isna()].reset_index(drop=True)
    site_of = dict(zip(manifest["sample_id"], manifest["site"].astype(str)))
    truth = pd.read_csv(trial_dir / "truth" / "population_truth.csv", dtype={"sample_id": str})
    samples, errors = {}, {}
    for r in manifest.itertuples():
        samples[r.sample_id] = cytopipe.read_fcs(trial_dir / r.file)
    pooled_est = None
    if pooled:
        records = []
        for sid, s in samples.items():
            try:
                ctl = controls.get(site_of[sid])
                records.append(gate(s, tpl, mapping=mapping, controls=ctl).fit_records(sid))
            except CytopipeError as exc:
                errors[sid] = str(exc).splitlines()[0]
        if records:
            pooled_est = pool_estimates(pd.concat(records, ignore_index=True), manifest)
    rows = []
    for meta in manifest.to_dict("records"):
        sid = meta["sample_id"]
        t = truth[truth["sample_id"] == sid].set_index("population")
        try:
            res = gate(samples[sid], tpl, pooled=pooled_est, sample_meta=meta, mapping=mapping,
                       controls=controls.get(site_of[sid]))  # fmt: skip
        except CytopipeError as exc:
            errors.setdefault(sid, str(exc).splitlines()[0])
            res = None
        for pop in t.index:
            row = {"sample_id": sid, "population": pop, "pct_parent_true": float(t.loc[pop, "pct_parent"])}
            if res is None or pop not in res.populations:
                row.update(pct_parent=np.nan, source="error", fallback=True, flagged=True,
                           error=errors.get(sid, "not gated"))  # fmt: skip
            else:
                p = res.populations[pop]
                data_driven = p.source not in ("fixed", "boolean")
                fell_back = data_driven and (p.source not in ("fitted", "control") or bool(p.flags))
                row.update(pct_parent=p.pct_parent, source=p.source, fallback=fell_back, error="",
                           flagged=bool(p.flags))  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def accuracy_table(gated: pd.DataFrame) -> pd.DataFrame:
    """Per canonical population: n (samples with a defined % of parent), undefined (gated but the
    parent was empty), median absolute error (pp), Lin's concordance, fallback rate, and failed
    (samples that could not be gated at all, e.g. a marker the template needs is missing)."""
    out = []
    for pop, g in gated.groupby("population", sort=False):
        err = (g["pct_parent"] - g["pct_parent_true"]).abs()
        out.append(
            {
                "population": pop,
                "n": int(g["pct_parent"].notna().sum()),
                # gated, but the parent came out empty: % of parent undefined (not in mae/ccc)
                "undefined": int((g["pct_parent"].isna() & (g["source"] != "error")).sum()),
                "mae_pp": float(err.median()) if err.notna().any() else float("nan"),
                "ccc": lins_ccc(g["pct_parent"], g["pct_parent_true"]),
                "fallback_rate": float(g["fallback"].mean()),
                "failed": int((g["source"] == "error").sum()),
            }
        )
    return pd.DataFrame(out)


def trial_accuracy(
    trial_dir, template=TEMPLATE, pooled: bool = True, mapping: dict | None = None
) -> pd.DataFrame:
    """``accuracy_table(gate_trial(...))`` in one call."""
    return accuracy_table(gate_trial(trial_dir, template, pooled, mapping))


THRESHOLD_POPULATIONS = ("Th17", "Th1", "cTfh", "activated cTfh")


def threshold_floor(trial_dir, with_drift: bool = True, matrix: str = "batch") -> pd.DataFrame:
    """What a perfect gate AT the true thresholds would score on an instrument-profile trial:
    Th17, Th1, cTfh and activated cTfh gated on the measured (compensated) values with each
    batch's true threshold from ``truth/thresholds.csv``, every other population taken from the
    truth. The error left is the measurement's own (noise, spillover spread, per-file drift):
    no template can be expected to do better. ``with_drift``: the threshold follows the file's own
    detector drift (``truth/samples.csv``), as a landmark-relative gate can; without it, one
    threshold per batch (what a fixed or FMO-based gate uses). ``matrix``: ``"batch"`` compensates
    with the batch's spillover matrix (the file's $SPILLOVER, as the pipeline does); ``"file"``
    with that matrix corrected for the file's own detector gains (spill k -> m scaled by
    drift_m / drift_k): what a perfect per-file compensation would give. Same columns as
    :func:`gate_trial`."""
    import cytopipe
    from cytopipe.simulate import load_labels
    from cytopipe.simulate import params as P
    from cytopipe.simulate.instrument_events import compensated, fluor_slice
    from cytopipe.simulate.multi import load_instruments
    from cytopipe.simulate.populations import unpack_membership

    trial_dir = Path(trial_dir)
    insts = load_instruments(trial_dir)
    manifest = pd.read_csv(trial_dir / "manifest.csv", dtype={"sample_id": str, "patient_id": str})
    manifest = manifest[manifest["control"].isna()]
    thr = pd.read_csv(trial_dir / "truth" / "thresholds.csv")
    truth = pd.read_csv(trial_dir / "truth" / "population_truth.csv", dtype={"sample_id": str})
    samples = pd.read_csv(trial_dir / "truth" / "samples.csv", dtype={"sample_id": str}).set_index(
        "sample_id"
    )
    rows = []
    for r in manifest.itertuples():
        inst = insts.get(r.batch) or insts[r.site]
        s = cytopipe.read_fcs(trial_dir / r.file)
        lab = load_labels(trial_dir / "truth" / "labels" / f"{r.sample_id}.npz")
        keep = lab["fault"] == 0
        drift = samples.loc[r.sample_id] if with_drift or matrix == "file" else None
        if matrix == "file":  # inverse of D^-1 S D = D^-1 S^-1 D: undo the gains, compensate, redo
            gains = np.array([drift[f"drift_{m}"] for m in P.MARKERS], np.float32)
            ev = s.events.copy()
            ev[:, fluor_slice(inst)] /= gains
            comp = compensated(ev, inst) * gains[:, None]
        else:
            comp = compensated(s.events, inst)
        t = thr[thr["batch"] == r.batch].set_index("marker")["threshold"]
        pos = {
            m: comp[P.MI[m]] >= t[m] * (drift[f"drift_{m}"] if with_drift else 1.0)
            for m in ("CXCR3", "CCR6", "CXCR5", "PD-1")
        }
        mem = unpack_membership(lab["membership"], "Memory CD4") & keep
        tfh = mem & pos["CXCR5"]
        gated = {
            "Th17": (mem & ~pos["CXCR3"] & pos["CCR6"], mem),
            "Th1": (mem & pos["CXCR3"] & ~pos["CCR6"], mem),
            "cTfh": (tfh, mem),
            "activated cTfh": (tfh & pos["PD-1"], tfh),
        }
        tt = truth[truth["sample_id"] == r.sample_id].set_index("population")["pct_parent"]
        for pop, (m, parent) in gated.items():
            pct = 100.0 * m.sum() / parent.sum() if parent.sum() else np.nan
            rows.append({"sample_id": r.sample_id, "population": pop, "pct_parent_true": float(tt[pop]),
                         "pct_parent": pct, "source": "threshold", "fallback": False, "error": ""})  # fmt: skip
    return pd.DataFrame(rows)


def accuracy_across_instruments(
    folder,
    seeds,
    template=TEMPLATE,
    instrument: str = "random",
    patients: int = 2,
    visits=(0, 12),
    events: int = 6000,
    pooled: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One trial per seed on ``instrument`` profiles (drawn per site), each gated with
    ``template``: returns (accuracy table over all files, threshold floor table, gated rows with
    ``seed`` and ``instruments`` columns)."""
    from cytopipe.simulate import instrument_trial

    frames, floors = [], []
    for seed in seeds:
        out = Path(folder) / f"seed{seed}"
        trial = instrument_trial(out, instrument=instrument, seed=seed, patients=patients, visits=visits,
                                 events=events, control_events=100)  # fmt: skip
        g = gate_trial(out, template, pooled)
        g["seed"] = seed
        g["instruments"] = ";".join(sorted({i.cytometer for i in trial.instruments.values()}))
        frames.append(g)
        if trial.instruments and next(iter(trial.instruments.values())).kind != "mass":
            floors.append(threshold_floor(out).assign(seed=seed))
    gated = pd.concat(frames, ignore_index=True)
    floor = accuracy_table(pd.concat(floors, ignore_index=True)) if floors else pd.DataFrame()
    return accuracy_table(gated), floor, gated


def format_accuracy(acc: pd.DataFrame, floor: pd.DataFrame, gated: pd.DataFrame, title: str) -> str:
    """The printed report of :func:`accuracy_across_instruments`."""
    n_files = len(gated) // max(gated["population"].nunique(), 1)
    kinds = gated.groupby("seed")["instruments"].first().value_counts().to_dict()
    lines = [f"{title}: {gated['seed'].nunique()} trials, {n_files} files; instruments per trial {kinds}",
             acc.round(3).to_string(index=False)]  # fmt: skip
    if len(floor):
        lines += ["a perfect gate at each file's true thresholds (the measurement's own error):",
                  floor[["population", "n", "mae_pp", "ccc"]].round(3).to_string(index=False)]  # fmt: skip
    failed = gated[gated["source"] == "error"].drop_duplicates(["seed", "sample_id"])
    if len(failed):
        lines.append(f"files not gated: {failed['error'].value_counts().to_dict()}")
    return "\n".join(lines)
