"""The report's sections, each built from a :class:`~cytopipe.report.data.RunData`.

Every section is a function ``(builder) -> Section | None``; :data:`SECTIONS` lists them in page
order. A later step adds its section by appending a function here (the optional cluster section
is one: it appears only when the run folder holds ``clusters.parquet``).

Why one module: :data:`SECTIONS` is the page order and each section is an independent function of
the shared :class:`Builder`; keeping them side by side keeps that order and the shared helpers
(significance rows, arm ordering) in one place. Larger sections live apart (review_section, batches).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.config import MAX_GALLERY, MAX_GALLERY_REST
from cytopipe.errors import CytopipeError
from cytopipe.report import batches as B
from cytopipe.report import figures as F
from cytopipe.report import html as H
from cytopipe.report.data import RunData, group_problems, measured_rows
from cytopipe.report.figcache import FigureCache, Plot, plot
from cytopipe.report.review_section import review

ENDPOINT_TITLES = {
    "sri4": "SRI-4 response",
    "sri5": "SRI-5 response",
    "sri6": "SRI-6 response",
    "sri7": "SRI-7 response",
    "sri8": "SRI-8 response",
    "renal_any": "Renal response (complete or partial)",
    "renal_complete": "Complete renal response",
}


class Builder:
    """Collects figures and CSV tables while the sections are built."""

    def __init__(
        self,
        data: RunData,
        tables_href: str,
        max_gallery: int = MAX_GALLERY,
        helper: bool | None = None,
        cache: FigureCache | None = None,
    ):
        from cytopipe.report.render_helper import FigureQueue

        self.data = data
        self.colors = F.arm_colors(data.arms, data.reference_arm, data.dose_ordered)
        self.tables: dict[str, pd.DataFrame] = {}
        self.figures: list[F.Rendered] = []
        self.tables_href = tables_href
        self.max_gallery = max_gallery
        self.dynamics: pd.DataFrame | None = None  # per-patient changes, set by the dynamics section
        self.gallery = FigureQueue(helper)  # gallery figures, drawn beside the other sections
        self.cache = cache if cache is not None else FigureCache(None)  # the previous report's figures
        self._captions: list[str] = []
        self._gallery_keys: list[str | None] = []  # cache entry of each gallery figure (None: not kept)

    @property
    def reference(self) -> str:
        """How captions name the reference arm (never by name in a blinded report)."""
        d = self.data
        return (
            f"the reference arm ({d.reference_arm})"
            if d.reference_arm and not d.blinded
            else "the reference arm"
        )

    def figure(self, fig: Plot | Any, name: str, alt: str, caption: str) -> str:
        """``fig``: a :func:`~cytopipe.report.figcache.plot` (read from the previous report's figures
        when they hold it), or a matplotlib Figure (drawn)."""
        rendered = self.cache.render(fig, name, alt)
        self.figures.append(rendered)
        return H.figure(rendered, caption)

    def gallery_figure(self, args: tuple[Any, ...], name: str, alt: str, caption: str) -> str:
        """A gate-gallery figure (``figures.gallery_figure(*args)``), drawn later unless the previous
        report's figures hold it: its HTML is a placeholder until :meth:`fill`."""
        key = self.cache.key(F.gallery_figure, args, {}, name, alt)
        n = self.gallery.submit(name, alt, args, done=self.cache.get(key))
        self._gallery_keys.append(key)
        self._captions.append(caption)
        return self.gallery.placeholder(n)

    def fill(self, page: str) -> str:
        """Draw the queued gallery figures and put them in ``page`` in place of their placeholders."""
        rendered = self.gallery.finish()
        for n in self.gallery.drawn:  # kept for the next report, unless drawing changed the arguments
            name, alt, args = self.gallery.jobs[n]
            key = self._gallery_keys[n]
            self.cache.put(
                key if key == self.cache.key(F.gallery_figure, args, {}, name, alt) else None, rendered[n]
            )
        self.figures.extend(rendered)
        html = [H.figure(fig, caption) for fig, caption in zip(rendered, self._captions)]
        # one pass over the page (replacing them one by one copied a 40 MB page once per figure)
        return re.sub(self.gallery.PLACEHOLDER, lambda m: html[int(m.group(1))], page)

    def csv(self, df: pd.DataFrame, name: str) -> str:
        self.tables[name] = df
        return f"{self.tables_href}/{name}.csv"

    def table(self, df: pd.DataFrame, name: str | None, caption: str = "", shown: pd.DataFrame | None = None,
              **kw: Any) -> str:  # fmt: skip
        """Register ``df`` as CSV ``name`` and return the HTML of ``shown`` (default ``df``)."""
        href = self.csv(df, name) if name else None
        return H.table(df if shown is None else shown, csv=href, caption=caption, **kw)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _family(data: RunData, family: str, measure: str = "pct_parent") -> pd.DataFrame:
    st = data.statistics
    if st is None or st.empty:
        return pd.DataFrame()
    sel = st[(st["family"] == family) & ((st["measure"] == measure) if measure else True)]
    return sel.reset_index(drop=True)


def _ci_text(est: float, lo: float, hi: float, scale: float = 1.0, digits: int = 3) -> str:
    if not np.isfinite(est):
        return ""
    text = f"{est * scale:.{digits}g}"
    if np.isfinite(lo) and np.isfinite(hi):
        text += f" [{lo * scale:.{digits}g}, {hi * scale:.{digits}g}]"
    return text


def _arm_of(comparison: str) -> str:
    return str(comparison).split(" vs ")[0]


def _in_order(
    table: pd.DataFrame, populations: Sequence[str], arms: Sequence[str] | None = None
) -> pd.DataFrame:
    """Rows in template order of populations (then arm display order and visit), stable."""
    pop_rank = {p: i for i, p in enumerate(populations)}
    keys = pd.DataFrame({"p": table["population"].astype(str).map(lambda v: pop_rank.get(v, len(pop_rank)))})
    if arms is not None and "arm" in table.columns:
        arm_rank = {a: i for i, a in enumerate(arms)}
        keys["a"] = table["arm"].astype(str).map(lambda v: arm_rank.get(v, len(arm_rank)))
    if "visit" in table.columns:
        keys["v"] = pd.to_numeric(table["visit"], errors="coerce").fillna(-1)
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return table.loc[order].reset_index(drop=True)


def _unmeasured_samples(d: RunData) -> dict[str, tuple[int, str]]:
    """population -> (samples it is not measured in, why) (:func:`cytopipe.report.data.not_measured`)."""
    nm = d.not_measured
    return {r.population: (int(r.samples_not_measured), r.reason) for r in nm.itertuples()}


def _sig_rows(q: pd.Series) -> list[str]:
    return [
        "sig" if np.isfinite(v) and v < 0.05 else "" for v in pd.to_numeric(q, errors="coerce").astype(float)
    ]


def parent_name(parent: object) -> str:
    """A parent population as the report names it: the gating root is "all events"."""
    text = "" if parent is None or (isinstance(parent, float) and np.isnan(parent)) else str(parent)
    return "all events" if text in ("", "root") else text


def events_of(parent: object) -> str:
    """``"the Live events"``, ``"all events"`` for the gating root, ``"the parent population's
    events"`` when it is not known (None)."""
    if parent is None:
        return "the parent population's events"
    name = parent_name(parent)
    return name if name == "all events" else f"the {name} events"


# ------------------------------------------------------------------------------------------------
# overview
# ------------------------------------------------------------------------------------------------
def overview(b: Builder) -> H.Section:
    d = b.data
    s = H.Section("overview", "Overview")
    ps = d.population_stats
    samples = d.samples
    n_files = len(samples) if samples is not None else ps["sample_id"].nunique()
    status = samples["status"].astype(str).value_counts() if samples is not None else pd.Series(dtype=int)
    items = [
        ("files in the run", str(n_files)),
        ("samples gated", str(ps["sample_id"].nunique())),
        ("patients", str(ps["patient_id"].nunique())),
        ("arms", str(len(d.arms))),
        _visits_kpi(ps["visit"]),
        ("populations", str(ps["population"].nunique())),
    ]
    if samples is not None:
        items += [
            ("flagged", str(int(status.get("flagged", 0)))),
            ("failed", str(int(status.get("failed", 0)))),
        ]
    s.add(H.kpis(items))
    s.add(f'<p class="lead">Arm colours used in every figure: {H.swatches(b.colors, d.arms)}</p>')
    if d.blinded:
        # the report's own codes (``Arm A, Arm B`` would be wrong where they are ``Arm 1, ...``, and
        # show an arm named ``B``)
        s.add(H.paragraph(
            f"Blinded report: every arm is shown by its code ({', '.join(d.arms)}) in every figure, table "
            "and CSV file of this report. Codes are not in dose order.", "note"))  # fmt: skip
    for note in d.notes:
        s.add(H.paragraph(note, "note"))
    ids = [] if d.samples is None else d.samples["sample_id"].astype(str).tolist()
    for problem, samples in group_problems(d.problems, ids or ps["sample_id"].astype(str).unique()):
        if len(samples) < 2:
            s.add(H.paragraph(f"Problem in this run: {problem}", "error"))
            continue
        listed = H.esc(", ".join(samples))
        s.add(H.paragraph(f"Problem in this run, {len(samples)} samples: {problem}", "error"))
        s.add(f"<details><summary>Show the {len(samples)} samples</summary><p>{listed}</p></details>")
    if d.clinical_error:
        s.add(H.paragraph(f"Clinical table not used: {d.clinical_error}", "error"))
    _not_measured_note(b, s)
    info = d.info
    facts = []
    if info.get("finished_at"):
        facts.append(f"run finished {info['finished_at']}")
    if info.get("cytopipe_version"):
        facts.append(f"cytopipe {info['cytopipe_version']}")
    facts.append(f"run folder {d.folder_name}")
    s.add(H.paragraph("; ".join(facts) + "."))
    s.add(H.paragraph(
        "How to read this report: start with the run summary (did every file make it through QC?), then "
        "review the gates (flagged and outlying gates come first), then the dynamics of each population by "
        "arm, the clinical endpoints, the correlations between immune and clinical changes, and the "
        "mixed-model estimates. Every table is also a CSV file next to this report."))  # fmt: skip
    return s


def _visits_kpi(visit: pd.Series) -> tuple[str, str]:
    """(label, value) of the visits: their number, the weeks named in the label (a study of one
    visit at week 0 showed a bare "0" over "visits (weeks)", read as no visits at all)."""
    weeks = [str(int(v)) for v in sorted(visit.dropna().unique())]
    label = f"visit{'s' if len(weeks) != 1 else ''}" + (
        f" (week{'s' if len(weeks) > 1 else ''} {', '.join(weeks)})" if weeks else ""
    )
    return label, str(len(weeks))


def _not_measured_note(b: Builder, s: H.Section) -> None:
    """The populations not measured in some or every sample (a marker of their gate is not in the
    files): named with the reason, and the table ``not_measured.csv``."""
    nm = b.data.not_measured
    if nm.empty:
        return
    every = nm["samples_not_measured"] >= nm["samples"]
    text = []
    if every.any():
        named = [f"{r.population} ({r.reason})" for r in nm[every].itertuples()]
        text.append(f"Not measured in any sample: {'; '.join(named)}.")
    if (~every).any():
        named = [f"{r.population} in {r.samples_not_measured} of {r.samples} ({r.reason})"
                 for r in nm[~every].itertuples()]  # fmt: skip
        text.append(f"Not measured in some samples: {'; '.join(named)}.")
    text.append(
        "A marker their gate needs is not in those files: they have no frequency there (never 0%), and the "
        "figures, the batch charts and the statistics leave those values out."
    )
    s.add(H.paragraph(" ".join(text), "note"))
    s.add(b.table(nm, "not_measured", "Populations not measured in some or every sample, and why."))


# ------------------------------------------------------------------------------------------------
# run summary and QC
# ------------------------------------------------------------------------------------------------
_FLAG_SPLIT = re.compile(r"; (?=(?:gate |qc_|QC |sample ))")


def _flag_rows(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per flag: sample, status, what it concerns (a gate's population, or QC) and the
    message without the repeated population name ("gate Treg: Treg: only ..." -> "only ...")."""
    rows = []
    for rec in samples.itertuples(index=False):
        text = getattr(rec, "flags", None)
        if not (isinstance(text, str) and text.strip()):
            continue
        for flag in _FLAG_SPLIT.split(text):
            what, message = "sample", flag.strip()
            m = re.match(r"gate (.+?): (.*)$", message)
            if m:
                what, message = m.group(1), m.group(2)
                if message.startswith(f"{what}: "):
                    message = message[len(what) + 2 :]
            else:
                m = re.match(r"(qc_[a-z_]+|high_qc_loss|[a-z_]+): (.*)$", message)
                if m:
                    what, message = "QC", m.group(2)
            rows.append({"sample_id": rec.sample_id, "status": rec.status, "concerns": what, "flag": message})
    return pd.DataFrame(rows, columns=["sample_id", "status", "concerns", "flag"])


#: human headers of the per-file QC table (CSV keeps the column names)
QC_HEADERS = {
    "sample_id": "Sample", "patient_id": "Patient", "visit": "Week", "arm": "Arm", "batch": "Batch",
    "site": "Site", "status": "Status", "events_before_qc": "Events in file",
    "qc_margin_events": "Removed: margin events", "qc_time_events": "Removed: unstable acquisition",
    "removed": "Removed in all", "removed_pct": "% removed", "events_after_qc": "Events kept",
    "qc_worst_channel": "Worst channel", "qc_note": "QC note", "error": "Error",
}  # fmt: skip


def run_summary(b: Builder) -> H.Section:
    d = b.data
    s = H.Section("qc", "Run summary and QC")
    samples = d.samples
    if samples is None:
        s.add(H.paragraph(
            "The run folder has no samples.parquet, so per-file QC is unknown; the table lists the "
            "samples found in population_stats.", "note"))  # fmt: skip
        root = d.population_stats.drop_duplicates("sample_id")
        shown = root[["sample_id", "patient_id", "visit", "arm"]]
        s.add(b.table(shown, "samples", "Samples.", shown=shown.rename(columns=QC_HEADERS)))
        return s
    samples = samples.copy()
    control = (
        samples["control"].fillna("").astype(str)
        if "control" in samples
        else pd.Series("", index=samples.index)
    )
    is_control = control != ""
    controls, samples = samples[is_control], samples[~is_control]
    for col in ("events_before_qc", "events_after_qc", "qc_margin_events", "qc_time_events"):
        samples[col] = pd.to_numeric(samples[col], errors="coerce") if col in samples else np.nan
    before, after = samples["events_before_qc"], samples["events_after_qc"]
    samples["removed"] = before - after
    with np.errstate(invalid="ignore", divide="ignore"):
        samples["removed_pct"] = 100 * samples["removed"] / before
    counts = samples["status"].astype(str).value_counts()
    removed = int(np.nansum(samples["removed"]))
    touched = int((samples["removed"] > 0).sum())
    total = int(np.nansum(before[after.notna()]))
    s.add(H.paragraph(
        f"{H.count(len(samples), 'sample')}: {int(counts.get('ok', 0))} ok, {int(counts.get('flagged', 0))} flagged, "
        f"{int(counts.get('failed', 0))} failed; and {H.count(len(controls), 'compensation control')}, which only estimate "
        "the spillover matrix (no event QC, not in the analysis). "
        + (f"Event QC removed {removed:,} of {total:,} events ({100 * removed / total:.1f}%) from {touched} of "
           f"{H.count(int(after.notna().sum()), 'sample')}: {int(np.nansum(samples['qc_margin_events'])):,} margin events "
           f"(saturated or off-scale), {int(np.nansum(samples['qc_time_events'])):,} from unstable acquisition "
           "(clogs, flow spikes)." if total and removed
           else "Event QC removed no event from any sample." if total else "")))  # fmt: skip
    if {"events_before_qc", "events_after_qc"} <= set(samples.columns) and before.notna().any():
        s.add(b.figure(
            plot(F.qc_events_figure, samples), "qc-events", "Events kept by QC per sample",
            "Each point is one sample (controls are not QC'd and not shown): its size (x) and the share of its "
            "events kept after event QC (margin events and unstable acquisition time removed; y). Samples that "
            "lost an unusual share are flagged; failed files have no events after QC and sit at 0."))  # fmt: skip
    s.sub("qc-removed", "Events removed by each QC rule")
    hit = samples[samples["removed"] > 0].sort_values("removed_pct", ascending=False)
    cols = ["sample_id", "status", "events_before_qc", "qc_margin_events", "qc_time_events", "removed",
            "removed_pct", "events_after_qc", "qc_worst_channel", "qc_note"]  # fmt: skip
    cols = [c for c in cols if c in samples.columns]
    if hit.empty:
        s.add(H.paragraph("No QC rule removed any event."))
    else:
        s.add(b.table(hit[cols], "qc_removed", "Samples from which event QC removed events, per rule: margin "
                      "events (at the detector's limits) and events from unstable acquisition (time bins whose "
                      "rate or signal departs from the file's own).", shown=hit[cols].rename(columns=QC_HEADERS),
                      collapse_over=25))  # fmt: skip
    failed = samples[samples["status"].astype(str) == "failed"]
    s.sub("qc-failures", "Failures")
    if failed.empty:
        s.add(H.paragraph("No file failed."))
    else:
        cols_f = [c for c in ("sample_id", "file", "failed_step", "error") if c in failed.columns]
        s.add(b.table(failed[cols_f], "failures", "Files that could not be processed, with the reason. "
                      "They are not in any other table or figure.", collapse_over=60,
                      shown=failed[cols_f].rename(columns={**QC_HEADERS, "file": "File", "failed_step": "Step"})))  # fmt: skip
    s.sub("qc-flags", "Flags")
    flags = _flag_rows(samples)
    if len(flags):
        s.add(b.table(flags, "flags",
                      "One row per flag: gates that fell back to a pooled estimate, populations with few parent "
                      "events, samples that lost an unusual share of events. Flagged samples stay in the analysis; "
                      "review them in the gate gallery.", collapse_over=30,
                      shown=flags.rename(columns={"sample_id": "Sample", "status": "Status", "concerns": "Concerns",
                                                  "flag": "Flag"})))  # fmt: skip
    else:
        s.add(H.paragraph("No flags."))
    s.sub("qc-samples", "Per-sample table")
    cols = [c for c in ("sample_id", "patient_id", "visit", "arm", "batch", "site", "status", "events_before_qc",
                        "qc_margin_events", "qc_time_events", "removed_pct", "events_after_qc", "qc_note", "error")
            if c in samples.columns]  # fmt: skip
    classes = [
        "bad" if st == "failed" else "warn" if st == "flagged" else "" for st in samples["status"].astype(str)
    ]
    s.add(b.table(samples[cols], "samples", "Every sample of the run: status, events before and after QC, and "
                  "events removed by the margin and time checks.", row_class=classes, collapse_over=40,
                  shown=samples[cols].rename(columns=QC_HEADERS)))  # fmt: skip
    if len(controls):
        s.sub("qc-controls", "Compensation controls")
        cols = [
            c
            for c in ("sample_id", "control", "status", "events_before_qc", "error")
            if c in controls.columns
        ]
        s.add(b.table(controls[cols], "controls", "Single-stain controls used to estimate the spillover matrix. "
                      "They are not event-QC'd and not analysed.", collapse_over=20,
                      shown=controls[cols].rename(columns={**QC_HEADERS, "control": "Control",
                                                          "events_before_qc": "Events"})))  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------------
# gate review gallery
# ------------------------------------------------------------------------------------------------
def gate_gallery(b: Builder) -> H.Section:
    from cytopipe.report.outliers import OUTLIER_Z, gate_outliers, with_site

    d = b.data
    s = H.Section("gates", "Gate review gallery")
    review = d.gate_review
    if review is None or review.empty:
        s.add(H.paragraph(
            "This run folder has no gate-review data (gate_review.parquet), so gates cannot be drawn. "
            "Runs of `cytopipe run` that store it show here every gate of every sample.", "note"))  # fmt: skip
        return s
    meta = d.population_stats[["sample_id", "patient_id", "visit"]].drop_duplicates("sample_id")
    flags = gate_outliers(review, with_site(meta, d.samples))
    s.add(H.paragraph(
        "For every gate, each small panel is one sample: the density of the parent population's events on "
        "the gate's axes (transformed units; darker = fewer events, yellow = most), the gate as applied "
        "(pink; dashed = the gate is the complement of the drawn shape), and the % of the parent inside. "
        "Flagged gates (red frame: the data-driven fit failed or left its bounds and a pooled estimate was "
        "used) come first, then outlying gates (orange frame), then the rest. A gate is an outlier when "
        f"one of its fitted numbers (threshold, centre) or its frequency lies more than {OUTLIER_Z} robust "
        "SDs from the median of the same patient's other visits or of the whole cohort "
        "(robust z = (value - median) / (1.4826 MAD); see docs/reports.md). A number on a linear axis "
        "(scatter, in the instrument's own units) is compared relative to the median of the sample's "
        "own events on that axis, the singlet wedge's area/height ratios relative to those events' median, so "
        "samples of instruments with other ranges and pulse shapes are compared like with like. "
        "A fluorescence threshold must be unusual both in display units and relative to the "
        "sample's own events (its place between the parent's negative peak and 98th percentile; for one "
        "in the negative's tail, also its distance above that peak in SDs of the negative), so an "
        "ordinary gate of an instrument with another brightness, negative width or scale is not an "
        "outlier."))  # fmt: skip
    summary = (
        flags.groupby("population", sort=False)
        .agg(
            samples=("sample_id", "size"),
            flagged=("flagged", "sum"),
            outliers=("outlier", "sum"),
            median_pct_parent=("pct_parent", "median"),
        )  # fmt: skip
        .reset_index()
        .rename(columns={"median_pct_parent": "median % of parent"})
    )
    unmeasured = _unmeasured_samples(d)
    if unmeasured:  # a marker not in some files: those samples have no panel and no number
        summary.insert(2, "not measured", summary["population"].map(lambda p: unmeasured.get(p, (0, ""))[0]))
    s.add(
        b.table(summary, None, "Gates at a glance: samples, flagged and outlying gates, median % of parent.")
    )
    csv_cols = ["sample_id", "population", "patient_id", "visit", "pct_parent", "flagged", "outlier", "score",
                "flags", "reasons"]  # fmt: skip
    b.csv(flags[csv_cols], "gate_review")
    by_pop = dict(tuple(review.groupby("population", sort=False)))
    flag_pop = dict(tuple(flags.groupby("population", sort=False)))
    order = list(dict.fromkeys(review["population"]))
    for pop in order:
        rows = by_pop[pop]
        f = flag_pop[pop].copy()
        f["rank"] = np.where(f["flagged"], 0, np.where(f["outlier"], 1, 2))
        f = f.sort_values(["rank", "score", "sample_id"], ascending=[True, False, True], kind="stable")
        chosen = list(f["sample_id"].head(b.max_gallery))
        first = rows.iloc[0]
        s.sub(f"gate-{_slug(pop)}", f"{pop}  (of {parent_name(first['parent'])})")
        if pop in unmeasured:
            n_nm, why = unmeasured[pop]
            which = "any sample" if n_nm >= len(f) else f"{n_nm} of {len(f)} samples (they have no panel)"
            s.add(H.paragraph(f"Not measured in {which}: {why}.", "note"))
        n_flag, n_out = int(f["flagged"].sum()), int((f["outlier"] & ~f["flagged"]).sum())
        mark = {
            r.sample_id: ("flag" if r.flagged else "outlier" if r.outlier else "") for r in f.itertuples()
        }
        score = dict(zip(f["sample_id"], f["score"]))
        panels = sorted(int(p) for p in rows["panel"].unique())
        for panel in panels:
            pr = rows[rows["panel"] == panel].set_index("sample_id")
            ids = [i for i in chosen if i in pr.index and pr.loc[i, "x"]]
            if not ids:
                continue
            recs = [pr.loc[i].to_dict() for i in ids]
            labels = [f"{i}  {pr.loc[i, 'pct_parent']:.1f}%"
                      + (" (flag)" if mark[i] == "flag" else f" (z {score[i]:.1f})" if mark[i] == "outlier" else "")
                      for i in ids]  # fmt: skip
            head = recs[0]
            axes = f"{head['x']} × {head['y']}" if head["y"] else head["x"]
            scale = (
                head["x_scale"]
                if head["x_scale"] == head.get("y_scale", head["x_scale"]) or not head["y"]
                else f"{head['x_scale']} / {head['y_scale']}"
            )
            cond = (
                f" Events shown: {events_of(first['parent'])} with {head['condition']}."
                if head["condition"]
                else ""
            )
            more = (
                f" Showing {len(ids)} of {len(pr)} samples (flagged and outlying first; the others below)."
                if len(pr) > len(ids)
                else ""
            )
            own = [a for a, o in zip(("x", "y"), F.own_axes(recs)) if o]
            apart = (f" The samples' ranges on {' and '.join(own)} differ too much to share axes (e.g. other "
                     "instruments): each panel has its own, with its tick values." if own else "")  # fmt: skip
            caption = (f"{pop}: {axes} ({scale}) of {events_of(first['parent'])}.{cond} "
                       f"{n_flag} flagged, {n_out} outlying.{more}{apart}")  # fmt: skip
            s.add(b.gallery_figure((recs, [mark[i] for i in ids], labels), f"gate-{_slug(pop)}-{panel}",
                                   f"Gate review: {pop} ({axes})", caption))  # fmt: skip
            every = [i for i in f["sample_id"] if i in pr.index and i not in set(ids) and pr.loc[i, "x"]]
            rest, undrawn = every[:MAX_GALLERY_REST], len(every) - MAX_GALLERY_REST
            if rest:  # every sample stays reachable: the others folded below
                more_args = ([pr.loc[i].to_dict() for i in rest], [mark[i] for i in rest],
                             [f"{i}  {pr.loc[i, 'pct_parent']:.1f}%" for i in rest])  # fmt: skip
                note = (f" The last {undrawn} samples (in the order above) are not drawn, to keep the report "
                        f"small: their % of parent is in {b.tables_href}/gate_review.csv and their panels in "
                        "the review queue of `cytopipe serve`." if undrawn > 0 else "")  # fmt: skip
                html_fig = b.gallery_figure(more_args, f"gate-{_slug(pop)}-{panel}-more", f"Gate review: {pop} "
                                            f"({axes}), the other samples", f"{pop}: {len(rest)} other samples.{note}")  # fmt: skip
                s.add(f"<details><summary>Show the other {len(every)} samples</summary>{html_fig}</details>")
        bad = f[f["flagged"] | f["outlier"]]
        if len(bad):
            shown = bad[["sample_id", "pct_parent", "flags", "reasons"]].rename(
                columns={"pct_parent": "% of parent", "reasons": "outlier reasons"})  # fmt: skip
            s.add(H.table(shown, caption=f"Flagged and outlying {pop} gates.", collapse_over=8))
    return s


# ------------------------------------------------------------------------------------------------
# dynamics
# ------------------------------------------------------------------------------------------------
def _dynamics_tables(d: RunData) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    from cytopipe.errors import StatisticsError
    from cytopipe.stats import add_wilson_ci, baseline_change, summarise_by_arm

    ps = measured_rows(d.population_stats)  # not measured in a sample: missing there, not 0%
    ps = ps[ps["arm"].astype(str).isin(d.arms)]
    if {"count", "parent_count"} <= set(ps.columns):
        ps = add_wilson_ci(ps)
    note = ""
    try:
        dyn = baseline_change(ps, "pct_parent", baseline_visit=d.baseline_visit)
    except StatisticsError:
        dyn = baseline_change(ps, "pct_parent", baseline_visit=d.baseline_visit, duplicates="mean")
        note = "Some patients have several samples at one visit: the figures average them."
    summary = summarise_by_arm(dyn)
    return ps, dyn, summary, note


def _drawn(ps: pd.DataFrame) -> pd.DataFrame:
    """The columns :func:`~cytopipe.report.figures.dynamics_figure` draws (without its sample
    intervals), rows as they are: the figure is read back from the previous report's unless one of
    them changed (a review's audit entry or gate source changes no frequency)."""
    return ps[
        [c for c in ("patient_id", "arm", "visit", "population", "parent", "pct_parent") if c in ps.columns]
    ]


def dynamics(b: Builder) -> H.Section:
    d = b.data
    s = H.Section("dynamics", "Dynamics")
    ps, dyn, summary, note = _dynamics_tables(d)
    b.dynamics = dyn  # reused by the correlation section
    if note:
        s.add(H.paragraph(note, "note"))
    pops = [p for p in d.measured_populations if p in set(ps["population"])]
    s.add(H.paragraph(
        "How each population changes over the trial, by arm. Frequencies are % of the parent population "
        "named on the axis. Faint lines: individual patients; points with bars: arm means with 95% "
        "confidence intervals, the arms side by side at each visit. The intervals of the means are t "
        "intervals on the logit scale, so they stay within 0-100% (docs/reports.md); arms with fewer than 3 "
        "patients at a visit have no bar. Each sample's own Wilson interval (from its event counts) is in "
        "dynamics_per_sample.csv."))  # fmt: skip
    left_out = [p for p in d.populations if p not in pops]
    if left_out:
        s.add(H.paragraph(f"Not shown, no frequency in any sample (e.g. not measured): {', '.join(left_out)}.",
                          "note"))  # fmt: skip
    s.add(b.figure(
        plot(F.dynamics_figure, _drawn(ps), summary, pops, d.arms, b.colors, show_sample_ci=False),
        "dynamics", "Population frequencies over visits by arm",
        "Frequencies over visits: patients' trajectories and the arm means (95% CI), arms dodged."))  # fmt: skip
    later = summary["visit"].dropna().ne(d.baseline_visit).any() and summary["mean_change"].notna().any()
    if later:
        s.add(b.figure(
            plot(F.change_figure, summary, pops, d.arms, b.colors, d.baseline_visit),
            "dynamics-change", "Mean change from baseline by arm",
            f"Mean change from week {d.baseline_visit} in percentage points (pp) with 95% CI, per arm and visit: "
            f"what the mixed model compares between each arm and {b.reference}."))  # fmt: skip
    else:  # only the baseline itself: a figure of zeros would say nothing
        s.add(H.paragraph(f"No change from baseline to show: no sample of a later visit than week "
                          f"{d.baseline_visit} (the baseline).", "note"))  # fmt: skip
    cols = ["population", "parent", "arm", "visit", "n", "mean", "ci_low", "ci_high", "mean_change",
            "change_ci_low", "change_ci_high", "median", "median_log2fc"]  # fmt: skip
    table = summary[cols]
    s.add(b.table(table, "dynamics_by_arm",
                  "Arm summaries per population and visit: mean % of parent with 95% CI, mean change from "
                  "baseline with 95% CI, median and median log2 fold change.", collapse_over=20))  # fmt: skip
    per_sample = [c for c in ("sample_id", "patient_id", "arm", "visit", "population", "parent", "count",
                              "parent_count", "pct_parent", "pct_ci_low", "pct_ci_high") if c in ps.columns]  # fmt: skip
    href = b.csv(ps[per_sample], "dynamics_per_sample")
    s.add(f'<div class="caption">Per-sample frequencies with their Wilson 95% intervals: '
          f'<a class="csv" href="{H.esc(href)}">CSV</a></div>')  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------------
# clinical endpoints
# ------------------------------------------------------------------------------------------------
def clinical(b: Builder) -> H.Section:
    from cytopipe.clinical import response_rates

    d = b.data
    s = H.Section("clinical", "Clinical endpoints")
    if d.endpoints is None:
        why = d.clinical_error or "this run has no clinical table (set `clinical:` in the workflow)"
        s.add(H.paragraph(f"No clinical endpoints: {why}.", "note"))
        return s
    ep = d.endpoints
    names = [c for c in ep.columns if re.fullmatch(r"sri\d+", c)]
    if "renal_eligible" in ep.columns and ep["renal_eligible"].fillna(False).astype(bool).any():
        names.append("renal_any")
    rates = {}
    for name in names:
        r = response_rates(ep, name)
        if len(r) and "arm" in r.columns:  # none when no patient has a visit after baseline
            rates[name] = r[r["arm"].astype(str).isin(d.arms)]
    if not rates:
        s.add(H.paragraph(
            "No response rates: responses are judged against baseline, and no patient has a visit after "
            "baseline yet.", "note"))  # fmt: skip
        return s
    s.add(H.paragraph(
        "Responder rates by arm and visit with Wilson 95% intervals. SRI-4: SLEDAI fell by at least 4 points, "
        "no new BILAG A and at most one new BILAG B domain, and PGA did not worsen by 0.3 or more, all vs "
        "baseline. Renal response (patients with baseline proteinuria > 0.5 g/24 h): complete (< 0.5 g/24 h) "
        "or partial (at least halved and < 3 g/24 h). Missing visits count as non-response (NRI)."))  # fmt: skip
    s.add(b.figure(plot(F.rates_figure, rates, ENDPOINT_TITLES, d.arms, b.colors), "clinical-rates",
                   "Response rates by arm and visit", "Responder rates (%) with Wilson 95% CI."))  # fmt: skip
    table = pd.concat(rates.values(), ignore_index=True)
    table["rate_pct"] = 100 * table["rate"]
    table["ci_low_pct"] = 100 * table["ci_low"]
    table["ci_high_pct"] = 100 * table["ci_high"]
    table["arm"] = pd.Categorical(table["arm"], d.arms, ordered=True)
    table = table.sort_values(["endpoint", "visit", "arm"])
    table["arm"] = table["arm"].astype(str)
    cols = ["endpoint", "visit", "arm", "responders", "n", "rate_pct", "ci_low_pct", "ci_high_pct", "imputed"]
    s.add(b.table(table[cols], "response_rates",
                  "Responders / evaluable patients, rate (%) with Wilson 95% CI, and how many non-responders "
                  "were imputed (missed visits).", collapse_over=30))  # fmt: skip
    tests = _family(d, "response_rate", measure="")
    if len(tests):
        shown = pd.DataFrame({
            "endpoint": tests["endpoint"], "comparison": tests["comparison"],
            "risk difference, pp [95% CI]": [_ci_text(e, lo, hi, 100) for e, lo, hi in
                                              zip(tests["estimate"], tests["ci_low"], tests["ci_high"])],
            "p": tests["p"], "q": tests["q"], "responders": tests["n_detail"], "test": tests["method"],
            "note": tests["note"]})  # fmt: skip
        s.add(b.table(tests, "response_tests",
                      "Each active arm (and all active arms pooled) vs the reference arm at each visit: risk "
                      "difference with Newcombe's CI, the test named in 'test', and BH q-values across these "
                      "comparisons. For the protocol's primary endpoint read the raw p in its prespecified "
                      "hierarchy.", shown=shown, row_class=_sig_rows(tests["q"]), collapse_over=30))  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------------
# correlations
# ------------------------------------------------------------------------------------------------
def correlations(b: Builder) -> H.Section:
    d = b.data
    s = H.Section("correlations", "Correlations with clinical change (secondary endpoints)")
    corr = _family(d, "correlation")
    if corr.empty or d.endpoints is None:
        visits = d.population_stats["visit"].dropna().nunique()
        why = ("they need the clinical table" if d.endpoints is None else
               f"they correlate changes from baseline, and the flow data have {visits} visit{'s' if visits != 1 else ''}"
               if visits < 2 else "no population and clinical item has changes from baseline at a common visit")  # fmt: skip
        s.add(H.paragraph(f"No correlations: {why}.", "note"))
        return s
    s.add(H.paragraph(
        "Does a population's change from baseline go with the change of a clinical measure at the same "
        "visit? Spearman's rho over all patients (arms pooled), one cell per population, clinical item and "
        "visit; red = both rise together, blue = one rises as the other falls. The numbers are "
        "Benjamini-Hochberg q-values across the whole grid; outlined cells have q < 0.05. Pooling arms mixes "
        "the treatment effect with within-arm association (see docs/statistics.md)."))  # fmt: skip
    ok = corr[np.isfinite(corr["p"].astype(float))].sort_values(["p", "population"], kind="stable")
    if ok.empty:  # an all-grey heatmap and a table of headers only said nothing (e.g. 2 patients)
        why = corr["note"].dropna().astype(str).value_counts() if "note" in corr.columns else pd.Series()
        reason = f" (most often: {why.index[0]})" if len(why) and why.index[0] else ""
        text = (f"No correlation could be computed in this run{reason}: too few patients with both changes at "
                "a visit. Each pair and why it was left out: ")  # fmt: skip
        href = b.csv(corr, "correlations")
        s.add(f'<p class="note">{H.esc(text)}<a href="{H.esc(href)}">CSV</a></p>')
        return s
    s.add(b.figure(plot(F.correlation_heatmap, corr, d.populations), "correlation-heatmap",
                   "Spearman correlation heatmap of subset change vs clinical change",
                   "Spearman rho (colour) and BH q-value (number) of each subset's change vs each clinical change."))  # fmt: skip
    pairs = []
    dyn = b.dynamics
    if dyn is not None and len(ok):
        for r in ok.head(4).itertuples():
            sub = dyn[(dyn["population"] == r.population) & (dyn["visit"] == r.visit)][
                ["patient_id", "arm", "change"]
            ]
            clin = d.endpoints[d.endpoints["visit"] == r.visit][["patient_id", r.endpoint]]
            m = (
                sub.merge(clin, on="patient_id")
                .rename(columns={"change": "x", r.endpoint: "y"})
                .dropna(subset=["x", "y"])
            )
            pairs.append({"population": r.population, "endpoint": r.endpoint, "visit": int(r.visit),
                          "rho": r.estimate, "q": r.q, "data": m})  # fmt: skip
    if pairs:
        s.add(b.figure(plot(F.correlation_scatter, pairs, d.arms, b.colors), "correlation-scatter",
                       "Scatter plots of the strongest correlations",
                       "The four strongest pairs (smallest p): each point is one patient at that visit, "
                       "coloured by arm."))  # fmt: skip
    shown = pd.DataFrame({
        "population": ok["population"], "clinical change": ok["endpoint"].map(lambda e: F.CLINICAL_LABELS.get(e, e)),
        "visit": ok["visit"], "rho [95% CI]": [_ci_text(e, lo, hi, digits=2) for e, lo, hi in
                                               zip(ok["estimate"], ok["ci_low"], ok["ci_high"])],
        "p": ok["p"], "q": ok["q"], "n": ok["n"]})  # fmt: skip
    s.add(b.table(corr, "correlations", "All correlations, strongest first (rho with a Fisher-z 95% CI).",
                  shown=shown, row_class=_sig_rows(ok["q"]), collapse_over=15))  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------------
# model tables
# ------------------------------------------------------------------------------------------------
def models(b: Builder) -> H.Section:
    d = b.data
    s = H.Section("models", "Model tables")
    mixed = _family(d, "mixed_arm_visit")
    if mixed.empty:
        s.add(H.paragraph("No mixed-model results in the statistics table.", "note"))
        return s
    s.add(H.paragraph(
        "Linear mixed model per population: change from baseline ~ arm × visit + baseline value, with a "
        "random intercept per patient (statsmodels MixedLM, REML). Each estimate is the difference in mean "
        f"change (percentage points) between an arm and {b.reference} at that visit, adjusted for the baseline "
        "value, with its 95% CI, p-value and Benjamini-Hochberg q-value across all populations, arms and "
        "visits. CIs and p-values use a t reference with Satterthwaite degrees of freedom (with few patients "
        "a normal reference rejects too often). Positive: the population rose more in that arm."))  # fmt: skip
    pops = d.populations
    mixed = mixed.copy()
    mixed["arm"] = mixed["comparison"].map(_arm_of)
    arms = [a for a in d.arms if a in set(mixed["arm"])]
    fitted = np.isfinite(mixed["estimate"].astype(float)).any()
    if not fitted:
        s.add(H.paragraph(
            "No arm × visit effect could be estimated in this run (the notes in the table say why; usually too "
            "few patients per arm and visit: at least 3 are needed).", "note"))  # fmt: skip
    if fitted:
        s.add(b.figure(plot(F.effect_map, mixed, pops, arms), "model-effects", "Mixed-model arm by visit effects",
                       "Arm × visit effects of the mixed model: colour is the Wald z (estimate / SE), the number "
                       "the estimate in pp; * marks q < 0.05. Grey: not estimable (see the table's notes)."))  # fmt: skip
    mixed = _in_order(mixed, pops, d.arms)
    shown = pd.DataFrame({
        "population": mixed["population"], "% of": mixed["parent"].map(parent_name), "arm": mixed["arm"],
        "week": mixed["visit"],
        "estimate, pp [95% CI]": [_ci_text(e, lo, hi) for e, lo, hi in zip(mixed["estimate"], mixed["ci_low"], mixed["ci_high"])],
        "t": mixed["statistic"], "df": mixed["df"], "p": mixed["p"], "q": mixed["q"], "n": mixed["n"],
        "note": mixed["note"]})  # fmt: skip
    s.add(b.table(mixed.drop(columns=["arm"]), "model_arm_visit",
                  "Mixed-model arm × visit estimates (rows with q < 0.05 highlighted).", shown=shown,
                  row_class=_sig_rows(mixed["q"]), collapse_over=400 if fitted else 0))  # fmt: skip
    joint = pd.concat(
        [_family(d, f) for f in ("mixed_arm", "mixed_interaction", "mixed_dose_trend")], ignore_index=True
    )
    if len(joint):
        joint = _in_order(joint, pops)
        label = {"mixed_arm": "any arm effect (joint Wald)", "mixed_interaction": "arm effects differ between visits",
                 "mixed_dose_trend": "linear dose trend (per dose unit)"}  # fmt: skip
        shown = pd.DataFrame({
            "population": joint["population"], "test": joint["family"].map(label),
            "estimate [95% CI]": [_ci_text(e, lo, hi) for e, lo, hi in zip(joint["estimate"], joint["ci_low"], joint["ci_high"])],
            "statistic": joint["statistic"], "df": joint["df"], "p": joint["p"], "q": joint["q"], "note": joint["note"]})  # fmt: skip
        s.add(b.table(joint, "model_joint_tests", "Joint tests per population: is there any arm effect, do arm "
                      "effects change over visits, and the linear dose trend.", shown=shown,
                      row_class=_sig_rows(joint["q"]), collapse_over=60))  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------------
# clusters (optional: only when the run folder has clusters.parquet)
# ------------------------------------------------------------------------------------------------
def _read_optional(path) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(path) if path.is_file() else None
    except Exception:  # a damaged optional table: the figure is left out, the rest of the report stands
        return None


def _mc_number(labels: pd.Series) -> np.ndarray:
    """``MC03`` -> 3 (metacluster labels of the clustering tables as numbers for the plots)."""
    return labels.astype(str).str.extract(r"(\d+)$")[0].astype(int).to_numpy()


def clusters(b: Builder) -> H.Section | None:
    """FlowSOM metaclusters (``clusters.parquet`` and ``RUN_DIR/clustering/``, see docs/pipeline.md):
    the metacluster x marker heatmap, the MST of the SOM nodes sized by abundance, the UMAP coloured
    by metacluster and by gated population, the cluster-gate concordance, abundances and their
    dynamics, and the differential-abundance statistics (families ``cluster_*``)."""
    from cytopipe.store import CLUSTER_DIR, MODEL_FILE
    from cytopipe.store import CLUSTER_FILES as FILES

    d = b.data
    cl = d.clusters
    if cl is None or cl.empty:
        return None
    folder = d.run_dir / CLUSTER_DIR
    s = H.Section("clusters", "Clusters (FlowSOM)")
    model = None
    if (folder / MODEL_FILE).is_file():
        from cytopipe.cluster import load_model

        try:
            model = load_model(folder / MODEL_FILE)
        except CytopipeError as exc:
            s.add(
                H.paragraph(
                    f"The clustering model could not be read ({exc}); its figures are left out.", "error"
                )
            )
    parent = str(cl["parent"].iloc[0]) if "parent" in cl.columns and len(cl) else None
    name_col = "population" if "population" in cl.columns else "metacluster"
    k = cl[name_col].nunique()
    what = (
        f"{k} metaclusters of {events_of(parent)} of every sample, on {len(model.markers)} markers "
        f"({', '.join(model.markers)}), from a {model.xdim} x {model.ydim} self-organising map (model "
        f"{model.content_hash[:12]})"
        if model is not None
        else f"{k} metaclusters of {events_of(parent)}"
    )
    s.add(H.paragraph(
        f"Unsupervised clustering (FlowSOM): {what}. Every event of the parent population of every sample "
        "is assigned to the nearest node of one frozen model, so abundances are comparable across visits. "
        "Abundances are % of the parent, like gated populations, and follow the same dynamics and statistics "
        "(docs/clustering.md)."))  # fmt: skip
    from cytopipe.report.data import tiny_metaclusters

    tiny = tiny_metaclusters(cl)
    if tiny:
        s.add(H.paragraph(
            f"{len(tiny)} of {k} metaclusters are empty or nearly so and are left out of the heatmaps, the "
            "dynamics and the differential-abundance tests (their abundances are zeros and noise): "
            + "; ".join(f"{mc}: {why}" for mc, why in sorted(tiny.items()))
            + ". A model with fewer metaclusters (clustering: metaclusters) would not make them.", "note"))  # fmt: skip
        cl = cl[~cl[name_col].astype(str).isin(tiny)]
    mcs = _read_optional(folder / FILES["metaclusters"])
    if mcs is not None and tiny:
        mcs = mcs[~mcs["metacluster"].astype(str).isin(tiny)]
    med_cols = [c for c in (mcs.columns if mcs is not None else []) if c.startswith("median_")]
    if mcs is not None and med_cols:
        from cytopipe.cluster import plot_heatmap

        med = mcs.set_index("metacluster")[med_cols].rename(columns=lambda c: c.removeprefix("median_"))
        med.insert(0, "count", mcs["cells"].to_numpy())
        s.sub("clusters-heatmap", "Metacluster markers")
        s.add(b.figure(plot(plot_heatmap, med, "Metacluster median expression (display scale)"), "cluster-heatmap",
                       "Metacluster by marker median heatmap",
                       "Rows are metaclusters (with their share of all clustered cells), columns the clustering "
                       "markers; colour is the median of the training cells scaled 0-1 per marker, the number the "
                       "median on the gates' display scale. Name metaclusters from this (e.g. CD25+ CD127- = "
                       "Treg-like)."))  # fmt: skip
        b.csv(mcs, "cluster_metaclusters")
    else:
        markers = [c for c in cl.columns if c.startswith("median_")]
        if markers and "count" in cl.columns:
            w = cl["count"].astype(float)  # weights of the samples with a median (a file may lack a marker)
            med = (cl[markers].mul(w, axis=0).groupby(cl[name_col]).sum(min_count=1)
                   .div(cl[markers].notna().mul(w, axis=0).groupby(cl[name_col]).sum().replace(0, np.nan)))  # fmt: skip
            med.columns = [c.removeprefix("median_") for c in med.columns]
            s.add(b.figure(plot(F.marker_heatmap, med, "Metacluster median expression (event-weighted across samples)"),
                           "cluster-heatmap", "Metacluster by marker median heatmap",
                           "Rows are metaclusters, columns markers; colour is the median scaled 0-1 per marker, "
                           "the number the median."))  # fmt: skip
    nodes = _read_optional(folder / FILES["nodes"])
    if model is not None and nodes is not None and len(nodes) == model.n_nodes:
        from cytopipe.cluster import plot_mst

        s.sub("clusters-mst", "Self-organising map")
        s.add(b.figure(plot(plot_mst, model, nodes["cells"].to_numpy(), title="SOM nodes (minimum spanning tree)"),
                       "cluster-mst", "FlowSOM minimum spanning tree sized by abundance",
                       "Each circle is a SOM node, its area proportional to its cells in all samples, its colour its "
                       "metacluster; lines join the most similar nodes. Branches are lineages; a metacluster split "
                       "over distant branches deserves a second look."))  # fmt: skip
        b.csv(nodes, "cluster_nodes")
    umap = _read_optional(folder / FILES["umap"])
    if umap is not None and len(umap) and {"x", "y", "metacluster"} <= set(umap.columns):
        from cytopipe.cluster import plot_umap

        pops = umap["population"].astype(str).to_numpy() if "population" in umap.columns else None
        fig = plot(
            plot_umap, umap[["x", "y"]].to_numpy(), _mc_number(umap["metacluster"]), pops, title="UMAP"
        )
        s.sub("clusters-umap", "UMAP")
        s.add(b.figure(fig, "cluster-umap", "UMAP of a subsample coloured by metacluster and by gated population",
                       f"UMAP of {len(umap):,} cells (an equal seeded subsample of {events_of(parent)} of every sample), "
                       "coloured by metacluster (left) and by the deepest gated population each cell falls in "
                       "(right). Where colours agree, clusters and gates describe the same cells; distances "
                       "between far-apart islands mean little."))  # fmt: skip
    conc = _read_optional(folder / FILES["concordance"])
    if conc is not None and tiny and "metacluster" in conc.columns:
        conc = conc[~conc["metacluster"].astype(str).isin(tiny)]
    summary = _read_optional(folder / FILES["concordance_summary"])
    if conc is not None and len(conc):
        from cytopipe.cluster import plot_concordance

        s.sub("clusters-concordance", "Clusters vs gates")
        table = conc.rename(columns={"metacluster": "cluster"})
        pops = [p for p in d.populations if p in set(table["population"])]
        table = table.assign(_o=table["population"].map({p: i for i, p in enumerate(pops)})).sort_values(
            ["_o", "cluster"], kind="stable").drop(columns="_o")  # fmt: skip
        s.add(b.figure(plot(plot_concordance, table, "F1 of each metacluster against each gated population"),
                       "cluster-concordance", "Cluster-gate concordance heatmap (F-measure)",
                       "F1 = 2 |cluster and gate| / (|cluster| + |gate|) over every clustered event of every sample; "
                       "1 means the metacluster and the gate hold the same cells. Precision is the share of the "
                       "metacluster inside the gate, recall the share of the gate captured."))  # fmt: skip
        b.csv(conc, "cluster_concordance_f1")
    if summary is not None and len(summary):
        cols = [c for c in ("population", "n_population", "best_metacluster", "best_f1", "best_precision",
                            "best_recall", "union_metaclusters", "union_f1") if c in summary.columns]  # fmt: skip
        s.add(b.table(summary, "cluster_concordance",
                      "For each gated population below the clustered parent: the best-matching metacluster and the "
                      "best union of metaclusters (F1 >= 0.9: the same cells).", shown=summary[cols]))  # fmt: skip
    abundance = cl.groupby(name_col).agg(samples=("sample_id", "nunique"), mean_pct_parent=("pct_parent", "mean"),
                                         median_pct_parent=("pct_parent", "median")).reset_index()  # fmt: skip
    s.sub("clusters-abundance", "Abundance and dynamics")
    s.add(
        b.table(
            abundance,
            "cluster_abundance",
            f"Metacluster abundance across samples (% of {'the parent' if parent is None else parent_name(parent)}).",
        )
    )
    if {"patient_id", "visit", "arm"} <= set(cl.columns):
        from cytopipe.stats import baseline_change, summarise_by_arm

        table = cl.rename(columns={name_col: "population"}) if name_col != "population" else cl
        table = table[table["arm"].astype(str).isin(d.arms)]
        try:
            summary_arm = summarise_by_arm(baseline_change(table, "pct_parent", baseline_visit=d.baseline_visit,
                                                           duplicates="mean"))  # fmt: skip
            pops = list(dict.fromkeys(table["population"]))
            s.add(b.figure(plot(F.dynamics_figure, table, summary_arm, pops, d.arms, b.colors, show_sample_ci=False),
                           "cluster-dynamics", "Metacluster abundance over visits by arm",
                           "Metacluster abundance over visits: patients' lines and arm means (95% CI)."))  # fmt: skip
        except CytopipeError as exc:
            s.add(H.paragraph(f"Cluster dynamics not shown: {exc}", "note"))
    _cluster_statistics(b, s, cl, name_col)
    return s


def _cluster_statistics(b: Builder, s: H.Section, cl: pd.DataFrame, name_col: str) -> None:
    """Differential abundance of the metaclusters: the statistics table's ``cluster_*`` families
    (older run folders: metacluster rows of the plain families)."""
    d = b.data
    st = d.statistics
    s.sub("clusters-statistics", "Differential abundance")
    if st is None or st.empty:
        s.add(H.paragraph("No statistics for the metaclusters in this run.", "note"))
        return
    names = set(cl[name_col].astype(str))
    fam = st["family"].astype(str)
    rows = st[fam.str.startswith("cluster_") & st["population"].astype(str).isin(names)]
    prefix = "cluster_"
    if rows.empty:  # metacluster rows computed alongside the gated populations
        rows = st[st["population"].astype(str).isin(names)]
        prefix = ""
    if rows.empty:
        s.add(H.paragraph("No statistics for the metaclusters in this run.", "note"))
        return
    b.csv(rows, "cluster_statistics")
    pops = sorted(names)
    mixed = rows[(rows["family"] == f"{prefix}mixed_arm_visit") & (rows["measure"] == "pct_parent")].copy()
    s.add(H.paragraph(
        "The metaclusters' abundances (% of the parent) tested like the gated populations, in their own "
        "Benjamini-Hochberg families (family names start with cluster_): per-visit Mann-Whitney of each arm vs "
        f"{b.reference}, the dose trend, and the mixed model change ~ arm × visit + baseline. Every test is in "
        "the CSV file cluster_statistics.csv and in statistics.parquet."))  # fmt: skip
    if len(mixed) and np.isfinite(mixed["estimate"].astype(float)).any():
        arms = [a for a in d.arms if a in set(mixed["comparison"].map(_arm_of))]
        s.add(b.figure(plot(F.effect_map, mixed, pops, arms), "cluster-effects",
                       "Mixed-model arm by visit effects on metacluster abundance",
                       "Differential abundance: arm × visit effects of the mixed model on each metacluster's change "
                       "from baseline (colour = Wald z, number = estimate in pp, * = q < 0.05)."))  # fmt: skip
    if len(mixed):
        mixed = _in_order(mixed, pops, d.arms)
        shown = pd.DataFrame({
            "metacluster": mixed["population"], "comparison": mixed["comparison"], "week": mixed["visit"],
            "estimate, pp [95% CI]": [_ci_text(e, lo, hi) for e, lo, hi in zip(mixed["estimate"], mixed["ci_low"], mixed["ci_high"])],
            "p": mixed["p"], "q": mixed["q"], "n": mixed["n"], "note": mixed["note"]})  # fmt: skip
        s.add(b.table(mixed, "cluster_models", "Differential abundance (mixed model, arm × visit) of the metaclusters.",
                      shown=shown, row_class=_sig_rows(mixed["q"]), collapse_over=30))  # fmt: skip
    mw = rows[(rows["family"] == f"{prefix}arm_visit") & (rows["measure"] == "pct_parent")]
    if len(mw):
        mw = _in_order(mw, pops)
        shown = pd.DataFrame({
            "metacluster": mw["population"], "comparison": mw["comparison"], "week": mw["visit"],
            "shift [95% CI]": [_ci_text(e, lo, hi) for e, lo, hi in zip(mw["estimate"], mw["ci_low"], mw["ci_high"])],
            "p": mw["p"], "q": mw["q"], "n": mw["n_detail"], "note": mw["note"]})  # fmt: skip
        s.add(b.table(mw, "cluster_arm_visit", "Per-visit Mann-Whitney tests of each arm vs the reference arm on the "
                      "change in metacluster abundance (Hodges-Lehmann shift, pp).", shown=shown,
                      row_class=_sig_rows(mw["q"]), collapse_over=20))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# files and methods
# ------------------------------------------------------------------------------------------------
def files(b: Builder) -> H.Section:
    d = b.data
    s = H.Section("files", "Tables and methods")
    s.add(H.paragraph(
        "Every table of this report is a CSV file in the folder next to it (UTF-8, one header row). "
        "Figures are embedded in this page; the page needs no network connection."))  # fmt: skip
    rows = [
        {"table": name, "rows": len(df), "file": f"{b.tables_href}/{name}.csv"}
        for name, df in b.tables.items()
    ]
    s.add(H.table(pd.DataFrame(rows), caption="CSV files written with this report."))
    versions = dict((d.info.get("versions") or {}) if isinstance(d.info, dict) else {})
    if d.info.get("cytopipe_version"):
        versions = {"cytopipe": d.info["cytopipe_version"], **versions}
    # the libraries the statistics, clustering and figures use (their versions where the report runs)
    for module in ("scipy", "statsmodels", "scikit-learn", "numba", "matplotlib"):
        if module not in versions:
            versions[module] = _version(module)
    s.add(H.paragraph("Software: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "."))
    s.add(H.paragraph(
        "Methods in brief: frequencies are % of the parent population; Wilson intervals carry each sample's "
        "event counts; arm means use t intervals on the logit scale (inside 0-100%); changes are visit minus baseline; statistics as in "
        "docs/statistics.md (Mann-Whitney, Jonckheere-Terpstra, mixed model, chi-square for response rates (Fisher exact when an expected count is below 5), "
        "Spearman correlations, Benjamini-Hochberg within each family); the gate outlier rule as in "
        "docs/reports.md."))  # fmt: skip
    return s


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


SECTIONS: list[Callable[[Builder], H.Section | None]] = [
    overview,
    run_summary,
    B.section,
    gate_gallery,
    review,
    dynamics,
    clinical,
    correlations,
    models,
    clusters,
    files,
]


def build_sections(
    b: Builder,
    sections: Sequence[Callable[[Builder], H.Section | None]] = SECTIONS,
    between: Callable[[], None] | None = None,
) -> list[H.Section]:
    """The sections in page order (those that return None left out); ``between`` is called before
    each one (the report's garbage-collector bookkeeping: :mod:`cytopipe.report.build`)."""
    out = []
    for make in sections:
        if between is not None:
            between()
        section = make(b)
        if section is not None:
            out.append(section)
    return out
