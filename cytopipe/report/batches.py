"""Batch and site tracking: Levey-Jennings charts, Westgard-style rules and per-batch medians.

A trial acquires its samples over months, at several sites, in many batches. A shift of one
instrument or one staining batch moves every sample acquired with it; the report makes that
visible per population:

* **Levey-Jennings chart**: each sample's frequency (% of parent) in acquisition order
  (``acquired_at``, else batch, else sample id) against the population's centre line and its
  2 SD and 3 SD limits. The centre is the median of the samples and the SD a robust one
  (1.4826 x MAD), so a shifted batch does not widen its own limits. When the manifest marks
  reference samples (``control`` = ``reference``), only those are charted, as in a laboratory QC.
* **Westgard-style rules** on that sequence: ``1-3s`` (one value beyond 3 SD), ``2-2s`` (two
  consecutive beyond 2 SD on the same side), ``R-4s`` (two consecutive values more than 4 SD
  apart), ``4-1s`` (four consecutive beyond 1 SD on the same side), ``10-x`` (ten consecutive on
  the same side of the centre). Patients differ biologically, so on patient samples these are
  prompts to look, not verdicts.
* **Per-batch (and per-site) medians** of every population, and a **shift test** per batch. Patients
  differ far more than batches do, so when patients were sampled at several visits each sample is
  compared with its own patient: ``d = value - the patient's median``, and the batch's shift is
  ``z = median_b(d) / SE``, where SE is the standard error of the median of ``n_b`` deviations (a
  seeded bootstrap over the population's deviations). Without repeated patients, the batch median
  is compared with the study median the same way. ``|z| > 3.5`` flags a batch whose samples sit
  together away from the rest (a strict limit: a study has many batch x population pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cytopipe.report.figcache import plot

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

MAD_TO_SD = 1.4826
SHIFT_Z = 3.5  # two-sided p ~ 0.0005: about one false flag in 2000 batch x population pairs
GROUPINGS = ("batch", "site")


def tracking_table(population_stats: pd.DataFrame, samples: pd.DataFrame | None) -> pd.DataFrame:
    """One row per sample and population with ``batch``, ``site``, ``acquired_at`` and ``order``
    (acquisition order), ``centre``, ``sd`` and ``z`` of its frequency, and ``rules`` (the
    Westgard-style rules that the sequence breaks at this sample, joined by ", ")."""
    cols = [
        c for c in ("sample_id", "patient_id", "population", "parent", "pct_parent") if c in population_stats
    ]
    ps = population_stats[cols].copy()
    if "patient_id" not in ps.columns:
        ps["patient_id"] = None
    meta_cols = [c for c in ("sample_id", "batch", "site", "acquired_at", "control") if samples is not None and c in samples.columns]  # fmt: skip
    if samples is not None and "sample_id" in meta_cols:
        meta = samples[meta_cols].drop_duplicates("sample_id")
        ps = ps.merge(meta, on="sample_id", how="left")
    for col in ("batch", "site", "acquired_at", "control"):
        if col not in ps.columns:
            ps[col] = None
        ps[col] = ps[col].astype(object).where(ps[col].notna() & (ps[col].astype(str) != ""), None)
    reference = ps["control"].astype(str).str.lower().eq("reference")
    if reference.any():
        ps = ps[reference]
    ps["acquired"] = pd.to_datetime(ps["acquired_at"], errors="coerce", utc=True)
    order = (
        ps.drop_duplicates("sample_id")
        .sort_values(["acquired", "batch", "sample_id"], na_position="last", kind="stable")["sample_id"]
        .tolist()
    )
    ps["order"] = ps["sample_id"].map({s: i for i, s in enumerate(order)})
    ps = ps.sort_values(["population", "order"], kind="stable").reset_index(drop=True)
    values = ps["pct_parent"].astype(float)
    grouped = values.groupby(ps["population"], sort=False)
    ps["centre"] = grouped.transform("median")
    mad = (values - ps["centre"]).abs().groupby(ps["population"], sort=False).transform("median")
    ps["sd"] = MAD_TO_SD * mad
    with np.errstate(invalid="ignore", divide="ignore"):
        ps["z"] = np.where(ps["sd"] > 0, (values - ps["centre"]) / ps["sd"], np.nan)
    # within-patient deviation: the sample minus its patient's median (patients with >= 2 samples);
    # between-patient differences, much larger than a batch effect, drop out of the shift test
    by_patient = values.groupby([ps["population"], ps["patient_id"]], sort=False, dropna=True)
    n_own = by_patient.transform("size")
    ps["within"] = np.where(n_own >= 2, values - by_patient.transform("median"), np.nan)
    within_mad = ps["within"].abs().groupby(ps["population"], sort=False).transform("median")
    ps["within_sd"] = MAD_TO_SD * within_mad
    ps["rules"] = ""
    for _, idx in ps.groupby("population", sort=False).groups.items():
        ps.loc[idx, "rules"] = westgard(ps.loc[idx, "z"].to_numpy(float))
    return ps.drop(columns=["acquired", "control"])


def westgard(z: Sequence[float]) -> list[str]:
    """The Westgard-style rules broken at each point of a sequence of z-scores (see the module
    docstring); a rule over several points is reported at the last of them."""
    z = np.asarray(z, dtype=float)
    out: list[list[str]] = [[] for _ in z]
    for i in range(len(z)):
        if not np.isfinite(z[i]):
            continue
        if abs(z[i]) > 3:
            out[i].append("1-3s")
        if i >= 1 and np.isfinite(z[i - 1]):
            if (z[i] > 2 and z[i - 1] > 2) or (z[i] < -2 and z[i - 1] < -2):
                out[i].append("2-2s")
            if abs(z[i] - z[i - 1]) > 4 and np.sign(z[i]) != np.sign(z[i - 1]):
                out[i].append("R-4s")
        if i >= 3:
            w = z[i - 3 : i + 1]
            if np.all(w > 1) or np.all(w < -1):
                out[i].append("4-1s")
        if i >= 9:
            w = z[i - 9 : i + 1]
            if np.all(w > 0) or np.all(w < 0):
                out[i].append("10-x")
    return [", ".join(r) for r in out]


def group_medians(track: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per ``by`` (``batch`` or ``site``) and population: samples, median, and the shift test's
    ``z`` and ``shifted`` (``|z| > 3``; see the module docstring)."""
    t = track[track[by].notna()]
    if t.empty:
        return pd.DataFrame(columns=["population", by, "samples", "median", "z", "shifted"])
    g = t.groupby(["population", by], sort=False)
    out = g.agg(samples=("pct_parent", "size"), median=("pct_parent", "median"),
                centre=("centre", "first"), sd=("sd", "first"), first=("order", "min"),
                n_within=("within", "count"), within=("within", "median"),
                within_sd=("within_sd", "first")).reset_index()  # fmt: skip
    # patients seen at several visits: the shift of the batch's within-patient deviations;
    # otherwise the batch median against the study median
    paired = (out["n_within"] >= 3) & (out["within_sd"] > 0)
    n = np.where(paired, out["n_within"], out["samples"]).astype(int)
    shift = np.where(paired, out["within"], out["median"] - out["centre"])
    se = np.full(len(out), np.nan)
    for pop, rows in out.groupby("population", sort=False).groups.items():
        sel = t["population"] == pop
        pools = {True: t.loc[sel, "within"].dropna().to_numpy(float),
                 False: (t.loc[sel, "pct_parent"] - t.loc[sel, "centre"]).dropna().to_numpy(float)}  # fmt: skip
        known: dict[tuple[bool, int], float] = {}  # batches of one size share the bootstrap (its seed)
        for i in rows:
            k = out.index.get_loc(i)
            key = (bool(paired[i]), int(n[k]))
            if key not in known:
                known[key] = _median_se(pools[key[0]], key[1])
            se[k] = known[key]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["z"] = np.where(se > 0, shift / se, np.nan)
    out["shifted"] = out["z"].abs() > SHIFT_Z
    out = out.sort_values(["population", "first"], kind="stable")
    return out[["population", by, "samples", "median", "z", "shifted"]].reset_index(drop=True)


def _median_se(pool: np.ndarray, n: int, draws: int = 400) -> float:
    """Standard error of the median of ``n`` values drawn from ``pool`` (a seeded bootstrap: the
    deviations of a few visits around their patient's median are not normal, and their MAD
    understates their spread)."""
    if len(pool) < 3 or n < 1:
        return float("nan")
    rng = np.random.default_rng([len(pool), n])
    return float(np.median(pool[rng.integers(0, len(pool), size=(draws, n))], axis=1).std())


def levey_jennings_figure(track: pd.DataFrame, populations: Sequence[str], ncols: int = 4) -> Figure:
    """Small multiples: each population's frequency in acquisition order, its centre line, the
    2 SD (dashed) and 3 SD (solid) limits, each batch's median as a short bar, points outside
    3 SD ringed in red; marker shape = site. Samples without a frequency (the population not
    measured in them) have no point; a population with none has no panel."""
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import MaxNLocator

    from cytopipe.report.figures import _panel_grid

    fig, axes, nrows, ncols = _panel_grid(len(populations), ncols, panel=(2.6, 1.35))
    sites = [s for s in dict.fromkeys(track["site"].dropna().astype(str))]
    # sites by marker shape, in grey: colours belong to the arms in every figure of the report
    markers = {s: "osD^vP*Xhp"[i % 10] for i, s in enumerate(sites)}
    by_pop = dict(tuple(track.groupby("population", sort=False)))
    for i, ax in enumerate(axes):
        pop = populations[i]
        d = by_pop.get(pop)
        if d is None or not d["pct_parent"].notna().any():
            ax.set_visible(False)
            continue
        x = d["order"].to_numpy(float)
        y = d["pct_parent"].to_numpy(float)
        c, sd = float(d["centre"].iloc[0]), float(d["sd"].iloc[0])
        ax.axhline(c, color="#495057", lw=0.8)
        for k, style in ((2, "--"), (3, "-")):
            for sign in (-1, 1):
                level = c + sign * k * sd
                if 0 <= level <= 100:
                    ax.axhline(level, color="#e03131" if k == 3 else "#f08c00", lw=0.7, ls=style, alpha=0.8)
        site = d["site"].astype(str).to_numpy()
        for name in [*sites, "None"]:
            sel = site == name
            if sel.any():
                # no site: a point as large as the sites' shapes (was a 1-pixel '.'), another shape than theirs
                ax.scatter(x[sel], y[sel], s=10, marker=markers.get(name, "<" if sites else "o"), color="#495057",
                           edgecolor="none", zorder=3)  # fmt: skip
        out = d["z"].abs().to_numpy(float) > 3
        if out.any():
            ax.scatter(x[out], y[out], s=30, facecolor="none", edgecolor="#e03131", lw=0.9, zorder=4)
        bars = _batch_bars(d)
        if bars:  # one collection: a line per batch took 5,000 plot calls in a 3,500-sample study
            ax.add_collection(
                LineCollection(bars, colors="#212529", linewidths=1.6, capstyle="butt", zorder=2)
            )
        finite = y[np.isfinite(y)]
        lo, hi = min(finite.min(), c - 3 * sd), max(finite.max(), c + 3 * sd)
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.set_ylim(max(lo - pad, 0.0), min(hi + pad, 100.0))
        parent = str(d["parent"].iloc[0]) if "parent" in d.columns else ""
        ax.set_title(f"{pop} · % of {parent if parent and parent != 'root' else 'all events'}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # sample positions: never 0.02
        if i >= len(populations) - ncols:
            ax.set_xlabel("samples in acquisition order")
        else:
            ax.tick_params(labelbottom=False)
        ax.grid(alpha=0.15)
    if sites:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="#495057", marker=markers[s], lw=0, ms=4) for s in sites]
        fig.legend(handles, [f"site {s}" for s in sites], loc="upper center", ncol=len(sites), frameon=False,
                   bbox_to_anchor=(0.5, 1.0))  # fmt: skip
    return fig


def _batch_bars(d: pd.DataFrame) -> list[list[tuple[float, float]]]:
    """Each batch's median as a bar over its samples' positions (batches of >= 2 samples)."""
    g = d[d["batch"].notna()].groupby("batch", sort=False)
    agg = pd.DataFrame(
        {"lo": g["order"].min(), "hi": g["order"].max(), "n": g.size(), "y": g["pct_parent"].median()}
    )
    agg = agg[(agg["n"] > 1) & agg["y"].notna()]  # a batch without a frequency: no bar
    return [[(lo - 0.3, y), (hi + 0.3, y)] for lo, hi, y in zip(agg["lo"], agg["hi"], agg["y"])]


def section(b: Any) -> Any:
    """The report section "Batches and sites" (only when the samples carry batch, site or
    acquisition dates)."""
    from cytopipe.report import html as H

    d = b.data
    samples = d.samples
    if samples is None or not any(c in samples.columns for c in ("batch", "site", "acquired_at")):
        return None
    track = tracking_table(d.population_stats, samples)
    if track.empty or track[["batch", "site", "acquired_at"]].isna().all().all():
        return None
    s = H.Section("batches", "Batches and sites (Levey-Jennings)")
    pops = [p for p in d.measured_populations if p in set(track["population"])]
    n_batches = track["batch"].nunique()
    n_sites = track["site"].nunique()
    n_samples = track["sample_id"].nunique()
    origin = [H.count(n, word, plural) for n, word, plural in ((n_sites, "site", "sites"), (n_batches, "batch", "batches")) if n]  # fmt: skip
    where = f" from {' and '.join(origin)}" if origin else ""
    unknown = [what for n, what in ((n_sites, "site"), (n_batches, "batch")) if not n]
    s.add(H.paragraph(
        f"Drift between sites and batches: {H.count(n_samples, 'sample')}{where}, in acquisition order"
        + (f" (no {' or '.join(unknown)} recorded)" if unknown else "") + ". For each population, the line is the median of all "
        "samples, the dashed and solid lines 2 and 3 robust SDs (1.4826 × MAD) from it; black bars are "
        "batch medians. Flags follow Westgard's rules (1-3s, 2-2s, R-4s, 4-1s, 10-x); patients differ "
        "biologically, so a flag is a prompt to look at that batch's gates, not a verdict. A batch is "
        f"marked shifted when its median lies more than {SHIFT_Z:g} standard errors from the study median "
        "(docs/reports.md)."))  # fmt: skip
    left_out = [p for p in d.populations if p in set(track["population"]) and p not in pops]
    if left_out:
        text = f"Not charted, no frequency in any sample (e.g. not measured): {', '.join(left_out)}."
        s.add(H.paragraph(text, "note"))
    s.add(b.figure(plot(levey_jennings_figure, track, pops), "levey-jennings", "Levey-Jennings charts per population",
                   "Each point is one sample's frequency, in acquisition order, "
                   + ("its shape the site" if n_sites else "(no site recorded)") + "; red rings: beyond 3 SD."))  # fmt: skip
    batch = group_medians(track, "batch")
    site = group_medians(track, "site")
    shifted = pd.concat(
        [batch[batch["shifted"]].rename(columns={"batch": "group"}).assign(kind="batch"),
         site[site["shifted"]].rename(columns={"site": "group"}).assign(kind="site")], ignore_index=True)  # fmt: skip
    s.sub("batches-shifts", "Shifted batches and sites")
    if shifted.empty:
        s.add(
            H.paragraph(
                f"No batch or site median lies more than {SHIFT_Z:g} standard errors from the study median."
            )
        )
    else:
        shown = pd.DataFrame({"Population": shifted["population"], "Batch or site": shifted["kind"] + " " + shifted["group"].astype(str),
                              "Samples": shifted["samples"], "Median, % of parent": shifted["median"],
                              "Shift z": shifted["z"]})  # fmt: skip
        s.add(b.table(shifted.drop(columns="kind"), "batch_shifts", "Batches and sites whose median frequency "
                      "stands apart from the study's (|z| > 3.5).", shown=shown, row_class=["warn"] * len(shown)))  # fmt: skip
    rules = track[track["rules"] != ""]
    s.sub("batches-rules", "Westgard flags")
    if rules.empty:
        s.add(H.paragraph("No Westgard rule is broken."))
    else:
        shown = pd.DataFrame({"Population": rules["population"], "Sample": rules["sample_id"], "Batch": rules["batch"],
                              "Site": rules["site"], "% of parent": rules["pct_parent"], "z": rules["z"],
                              "Rules": rules["rules"]})  # fmt: skip
        s.add(b.table(rules, "westgard_flags", "Samples at which a Westgard-style rule is broken.", shown=shown,
                      collapse_over=15))  # fmt: skip
    s.sub("batches-medians", "Per-batch and per-site medians")
    for by, frame in (("site", site), ("batch", batch)):
        if frame.empty:
            continue
        wide = frame.pivot(index="population", columns=by, values="median").reindex([p for p in pops if p in set(frame["population"])])  # fmt: skip
        wide = wide[list(dict.fromkeys(frame[by]))].reset_index().rename(columns={"population": "Population"})
        b.csv(frame, f"{by}_medians")
        s.add(b.table(wide, None, f"Median % of parent of every population per {by} (CSV: {by}_medians.csv).",
                      collapse_over=0 if by == "batch" else 25,
                      summary=f"Show the per-{by} medians ({wide.shape[1] - 1} {by}es)" if by == "batch" else None))  # fmt: skip
    b.csv(track, "levey_jennings")
    return s
