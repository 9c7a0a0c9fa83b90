"""What makes a report trustworthy at a glance (issue 15): intervals within their scale, one
palette, QC counts per rule, batch tracking, empty metaclusters, formatting, tiny studies."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cytopipe.report import write_report
from tests.report_support import build_cohort_run


def _one_patient(tmp_path, visits):
    run, clinical = build_cohort_run(tmp_path / "run", n_patients=1)
    ps = pd.read_parquet(run / "population_stats.parquet")
    ps[ps["visit"].isin(visits)].to_parquet(run / "population_stats.parquet", index=False)
    info = json.loads((run / "run.json").read_text())
    path = info["workflow"]["clinical"]
    clinical[clinical["visit"].isin(visits)].to_csv(path, index=False)
    return run


@pytest.mark.parametrize("visits", [(0,), (0, 4, 12)])
def test_a_one_patient_study_gets_a_report(tmp_path, visits):
    """One patient (at baseline only, or over three visits): the report is written, and says why
    what needs more patients or visits is missing (this was `KeyError: 'arm'`)."""
    run = _one_patient(tmp_path, visits)
    html = write_report(run).read_text(encoding="utf-8")
    assert '<section id="dynamics">' in html and '<section id="clinical">' in html
    if visits == (0,):
        assert "no patient has a visit after baseline" in html


# ------------------------------------------------------------------------------------------------
# intervals within their scale; dodge; one colour-blind-safe palette
# ------------------------------------------------------------------------------------------------
ARMS = ["placebo", "IL-2 0.2 MIU", "IL-2 0.5 MIU", "IL-2 1.0 MIU"]
# colour-vision-deficiency simulation (Machado, Oliveira & Fernandes 2009, severity 1) on linear RGB
CVD = {
    "protan": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deutan": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "tritan": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
}  # fmt: skip


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-1, linear-light input) -> CIELAB (D65)."""
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (rgb @ m.T) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.column_stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])])


def _linear(hexes) -> np.ndarray:
    from matplotlib.colors import to_rgb

    c = np.array([to_rgb(h) for h in hexes])
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def test_palette_is_colour_blind_safe_with_placebo_grey_and_doses_ordered():
    from cytopipe.report.figures import arm_colors

    colors = arm_colors(ARMS, "placebo", dose_ordered=True)
    rgb = _linear(colors[a] for a in ARMS)
    chroma = np.hypot(*_lab(rgb)[:, 1:].T)
    assert chroma[0] < 0.5 and (chroma[1:] > 20).all()  # placebo grey; every dose a colour
    lightness = _lab(rgb[1:])[:, 0]
    assert np.all(np.diff(lightness) < -5)  # ordered: higher dose, darker
    for name, m in {"normal": np.eye(3), **CVD}.items():
        lab = _lab(np.clip(rgb @ np.asarray(m).T, 0, 1))
        dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1)[np.triu_indices(len(ARMS), 1)]
        assert dist.min() > 12, (name, dist.round(1))
    # blinded / no dose order: a qualitative palette without grey, also distinct
    coded = arm_colors(["Arm A", "Arm B", "Arm C", "Arm D"], None, dose_ordered=False)
    assert len(set(coded.values())) == 4 and (np.hypot(*_lab(_linear(coded.values()))[:, 1:].T) > 20).all()


@pytest.fixture(scope="module")
def cohort_report(tmp_path_factory):
    """The report of a small simulated cohort (8 patients: 2 per arm, so t intervals are wide)."""
    run, _ = build_cohort_run(tmp_path_factory.mktemp("cohort") / "run", n_patients=8, seed=3)
    return run, write_report(run)


def test_no_interval_leaves_0_100_in_the_csv(cohort_report):
    from cytopipe.stats import baseline_change, summarise_by_arm

    run, path = cohort_report
    table = pd.read_csv(run / "report_tables" / "dynamics_by_arm.csv")
    assert len(table) > 50
    for col in ("mean", "ci_low", "ci_high", "median"):
        assert table[col].between(0, 100).all(), col
    assert (table["ci_low"] <= table["mean"] + 1e-9).all() and (
        table["mean"] <= table["ci_high"] + 1e-9
    ).all()
    for col in ("change_ci_low", "change_ci_high"):
        assert table[col].dropna().between(-100, 100).all(), col
    # the plain t interval of the same data would leave the range: the test can fail
    plain = summarise_by_arm(
        baseline_change(pd.read_parquet(run / "population_stats.parquet")), percent=False
    )
    assert (plain["ci_low"] < 0).sum() > 5


def test_dynamics_figure_dodges_the_arms_and_stays_within_0_100(cohort_report):
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    from cytopipe.report import figures as F
    from cytopipe.stats import baseline_change, summarise_by_arm

    run, _ = cohort_report
    ps = pd.read_parquet(run / "population_stats.parquet")
    summary = summarise_by_arm(baseline_change(ps))
    colors = F.arm_colors(ARMS, "placebo", True)
    pops = list(dict.fromkeys(ps["population"]))
    with F.style_context():
        fig = F.dynamics_figure(ps, summary, pops, ARMS, colors, show_sample_ci=False)
        fig.canvas.draw() if fig.canvas is not None else None
    visits = sorted(ps["visit"].unique())
    n_checked = 0
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        lo, hi = ax.get_ylim()
        assert 0 <= lo < hi <= 100
        means = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
        assert {to_hex(ln.get_color()) for ln in means} <= set(colors.values())
        xs = {to_hex(ln.get_color()): np.asarray(ln.get_xdata(), float) for ln in means}
        assert len(xs) == len(ARMS)
        for i, v in enumerate(visits):  # at every visit the four arms sit apart, each near the visit
            at = sorted(x[i] for x in xs.values())
            assert min(np.diff(at)) >= 0.5 and all(abs(x - v) < 2.5 for x in at), (v, at)
            n_checked += 1
        for coll in ax.collections:
            if isinstance(coll, LineCollection):
                for seg in coll.get_segments():
                    assert np.all((seg[:, 1] >= 0) & (seg[:, 1] <= 100))
        assert not any(
            isinstance(a, Line2D) and a.get_marker() == "o" and a.get_color() == "" for a in ax.lines
        )
    assert n_checked >= 4 * len(visits)


# ------------------------------------------------------------------------------------------------
# QC per rule, controls apart; batch and site tracking
# ------------------------------------------------------------------------------------------------
def _batched_run(tmp_path, shift: float | None):
    """A simulated cohort (24 patients x 4 visits) acquired in 12 batches of 8 samples at 3 sites;
    ``shift`` multiplies Treg (% of CD4 T) in batch B05 (a staining or instrument fault)."""
    run, _ = build_cohort_run(tmp_path / "run", n_patients=24, seed=11)
    ps = pd.read_parquet(run / "population_stats.parquet")
    ids = sorted(ps["sample_id"].unique(), key=lambda s: (s[-3:], s))  # visit by visit, like a trial
    rng = np.random.default_rng(0)
    ids = list(rng.permutation(ids))
    batch = {s: f"B{i // 8:02d}" for i, s in enumerate(ids)}
    samples = pd.DataFrame({
        "sample_id": ids, "status": "ok", "batch": [batch[s] for s in ids],
        "site": [f"S{int(batch[s][1:]) % 3 + 1}" for s in ids],
        "acquired_at": [(pd.Timestamp("2021-01-04") + pd.Timedelta(days=3 * i)).isoformat() for i in range(len(ids))],
        "control": "", "events_before_qc": 20000, "events_after_qc": 20000, "flags": ""})  # fmt: skip
    samples = samples.merge(ps.drop_duplicates("sample_id")[["sample_id", "patient_id", "visit", "arm"]])
    if shift is not None:
        sel = (ps["population"] == "Treg") & ps["sample_id"].map(batch).eq("B05")
        ps.loc[sel, "pct_parent"] *= shift
        ps.loc[sel, "count"] = (ps.loc[sel, "count"] * shift).round().astype(ps["count"].dtype)
        ps.to_parquet(run / "population_stats.parquet", index=False)
    samples.to_parquet(run / "samples.parquet", index=False)
    return run


@pytest.mark.parametrize("shift", [None, 1.6])
def test_a_batch_shift_of_one_population_is_flagged(tmp_path, shift):
    from cytopipe.report.batches import group_medians, tracking_table

    run = _batched_run(tmp_path, shift)
    ps = pd.read_parquet(run / "population_stats.parquet")
    samples = pd.read_parquet(run / "samples.parquet")
    if shift is None:  # the same cohort without the fault: that batch is not flagged
        medians = group_medians(tracking_table(ps, samples), "batch").set_index(["population", "batch"])
        assert not medians.loc[("Treg", "B05"), "shifted"] and abs(medians.loc[("Treg", "B05"), "z"]) < 2
        return
    html = write_report(run).read_text(encoding="utf-8")
    assert '<section id="batches">' in html and 'id="fig-levey-jennings"' in html
    track = pd.read_csv(run / "report_tables" / "levey_jennings.csv")
    assert track["batch"].nunique() == 12 and track["site"].nunique() == 3
    medians = pd.read_csv(run / "report_tables" / "batch_medians.csv")
    treg_b05 = medians[(medians["population"] == "Treg") & (medians["batch"] == "B05")].iloc[0]
    assert treg_b05["shifted"] and treg_b05["z"] > 3.5
    assert medians["z"].abs().idxmax() == treg_b05.name  # the most extreme batch of all populations
    shifts = pd.read_csv(run / "report_tables" / "batch_shifts.csv")
    assert ((shifts["population"] == "Treg") & (shifts["group"] == "B05")).any()
    # the same numbers from the functions, and every batch median is the median of its samples
    again = group_medians(tracking_table(ps, samples), "batch")
    treg = ps[ps["population"] == "Treg"].merge(samples[["sample_id", "batch"]])
    assert again.set_index(["population", "batch"]).loc[("Treg", "B05"), "median"] == pytest.approx(
        treg[treg["batch"] == "B05"]["pct_parent"].median())  # fmt: skip


def test_westgard_rules_by_hand():
    from cytopipe.report.batches import westgard

    z = [0.5, 3.5, 0.2, 2.5, 2.2, -1.0, -2.5, 2.0, 1.5, 1.2, 1.1, 1.3]
    rules = westgard(z)
    assert rules[1] == "1-3s" and "2-2s" in rules[4] and "R-4s" not in rules[4]
    assert "R-4s" in rules[7]  # -2.5 then 2.0: 4.5 SD apart, opposite sides
    assert "4-1s" in rules[10] and "4-1s" in rules[11] and "4-1s" not in rules[9]
    assert westgard([0.1] * 9 + [0.2])[-1] == "10-x" and westgard([0.1] * 9)[-1] == ""


def test_qc_section_counts_removed_events_per_rule_and_controls_apart(sim_run, tmp_path):
    """The simulated trial has a clogged file (P001_W04), a flow spike (shift, P002_W00) and margin
    events (P003_W04): each appears with what each QC rule removed; controls are listed apart."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    html = write_report(run, max_gallery=5).read_text(encoding="utf-8")
    samples = pd.read_parquet(run / "samples.parquet")
    # every sample reachable in the gallery: 5 shown per gate, the other 3 folded below
    n_gates = pd.read_parquet(run / "population_stats.parquet")["population"].nunique()
    assert html.count("<summary>Show the other 3 samples</summary>") >= n_gates
    removed = pd.read_csv(run / "report_tables" / "qc_removed.csv").set_index("sample_id")
    assert {"P001_W04", "P002_W00", "P003_W04"} <= set(removed.index)
    assert removed.loc["P003_W04", "qc_margin_events"] > 0 and removed.loc["P001_W04", "qc_time_events"] > 0
    truth = samples.set_index("sample_id")
    for sid, row in removed.iterrows():
        assert row["removed"] == truth.loc[sid, "events_before_qc"] - truth.loc[sid, "events_after_qc"]
        assert row["removed"] == row["qc_margin_events"] + row["qc_time_events"]
    controls = pd.read_csv(run / "report_tables" / "controls.csv")
    assert len(controls) == int(samples["control"].fillna("").ne("").sum()) > 0
    assert not set(controls["sample_id"]) & set(
        pd.read_csv(run / "report_tables" / "samples.csv")["sample_id"]
    )
    n_removed = int(removed["removed"].sum())
    assert f"Event QC removed {n_removed:,} of" in html
    assert "compensation controls, which only estimate" in html
    flags = pd.read_csv(run / "report_tables" / "flags.csv")
    for rec in flags.itertuples():  # no "gate X: X: ..." (the population named twice)
        assert not str(rec.flag).startswith(f"{rec.concerns}:")
    # the layout check made on every figure object while it was drawn: no text over another
    from tests.test_report import embedded_pngs, png_texts

    figures = embedded_pngs(html)
    assert len(figures) >= 20 and {"levey-jennings", "qc-events", "dynamics", "cluster-heatmap"} <= set(
        figures
    )
    for name, png in figures.items():
        layout = [t for t in png_texts(png) if t.startswith("Layout ")]
        assert layout == ["Layout overlapping texts: none"], (name, layout)


def test_a_trial_scale_gallery_draws_a_bounded_number_of_panels(sim_run, tmp_path, monkeypatch):
    """Thousands of files would make the folded "other samples" figures minutes of drawing and
    hundreds of MB: beyond MAX_GALLERY_REST panels per gate the rest are named, not drawn, and stay
    reachable in gate_review.csv (here with the bound lowered to 1 on the 8-sample trial)."""
    import shutil

    from cytopipe.report import sections

    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    monkeypatch.setattr(sections, "MAX_GALLERY_REST", 1)
    html = write_report(run, max_gallery=5).read_text(encoding="utf-8")
    n_gates = pd.read_parquet(run / "population_stats.parquet")["population"].nunique()
    assert html.count("<summary>Show the other 3 samples</summary>") >= n_gates
    assert html.count("The last 2 samples (in the order above) are not drawn") >= n_gates
    table = pd.read_csv(run / "report_tables" / "gate_review.csv")
    drawn = pd.read_parquet(run / "gate_review.parquet")[["sample_id", "population"]]
    assert set(map(tuple, drawn.to_numpy())) == set(zip(table["sample_id"], table["population"]))


def test_the_layout_check_finds_overlapping_labels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cytopipe.report import figures as F

    with F.style_context():
        fig = F.new_figure(2.0, 1.5)
        ax = fig.add_subplot()
        ax.set_xticks(range(12), [f"a long label {i}" for i in range(12)])  # crowded: they overlap
        FigureCanvasAgg(fig).draw()
        assert any("over" in o for o in F.text_overlaps(fig))
        fig2 = F.new_figure(4.0, 2.0)
        fig2.add_subplot().set_xticks(range(3), ["a", "b", "c"])
        FigureCanvasAgg(fig2).draw()
        assert F.text_overlaps(fig2) == []
        # rotated tick labels: their own (turned) rectangles count, not their axis-aligned boxes
        fig3 = F.new_figure(3.2, 3.0)
        fig3.add_subplot().set_xticks(range(9), [f"Δanti-dsDNA wk {v}" for v in (4, 12, 24)] * 3, rotation=60,
                                      ha="right")  # fmt: skip
        FigureCanvasAgg(fig3).draw()
        assert F.text_overlaps(fig3) == []
        fig4 = F.new_figure(1.0, 1.5)
        fig4.add_subplot().set_xticks(range(12), [f"a long label {i}" for i in range(12)], rotation=60)
        FigureCanvasAgg(fig4).draw()
        assert any("over" in o for o in F.text_overlaps(fig4))


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
def test_numbers_and_headers_are_printed_for_people(cohort_report):
    import re

    from cytopipe.report.html import format_number, format_p, header

    assert [format_p(v) for v in (0.0004, 0.0123, 0.15, 0.5, 1.0)] == ["< 0.001", "0.012", "0.15", "0.5", "1"]
    assert [format_number(v) for v in (100.0, 50.0, 33.3333, 0.001351, 12345.0, 123.456)] == [
        "100", "50", "33.3", "0.00135", "12,345", "123.5"]  # fmt: skip
    assert header("rate_pct") == "Rate (%)" and header("best_f1") == "Best F1"
    assert header("events_after_qc") == "Events after QC"
    _, path = cohort_report
    html = path.read_text(encoding="utf-8")
    heads = re.findall(r"<th>([^<]*)</th>", html)
    assert heads and not [h for h in heads if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", h)]
    # the model table's p and q columns: "< 0.001" or at most 2 significant digits
    tables = re.findall(r'<table class="data"><thead><tr>(.*?)</table>', html)
    table = next(t for t in tables if "<th>estimate, pp [95% CI]</th>" in t and "<th>t</th>" in t)
    cols = re.findall(r"<th>([^<]*)</th>", table)
    for row in re.findall(r"<tr[^>]*>(<td.*?)</tr>", table):
        cells = dict(zip(cols, re.findall(r"<td[^>]*>([^<]*)</td>", row)))
        for key in ("p", "q"):
            assert re.fullmatch(r"&lt; 0\.001|0\.0*[1-9]\d?|1|", cells[key]), cells[key]
    assert "q = .00" not in html and "= .0" not in html
    assert "statsmodels" in html and "scikit-learn" in html and "numba" in html
    assert "@media print" in html and "position: fixed" in html


# ------------------------------------------------------------------------------------------------
# clusters: empty and tiny metaclusters
# ------------------------------------------------------------------------------------------------
def test_empty_and_tiny_metaclusters_are_named_and_left_out(tmp_path):
    from cytopipe.report.data import tiny_metaclusters
    from tests.test_report import embedded_pngs, png_texts

    run, _ = build_cohort_run(tmp_path / "run", n_patients=8)
    ps = pd.read_parquet(run / "population_stats.parquet")
    parts = []
    for pop, mc in (("Treg", "MC01"), ("Th17", "MC02"), ("cTfh", "MC03"), ("Treg", "MC04"), ("Treg", "MC05")):
        c = ps[ps["population"] == pop].copy()
        c["population"], c["parent"] = mc, "CD4 T"
        if mc == "MC04":  # empty: no event in any sample
            c["count"], c["pct_parent"] = 0, 0.0
        if mc == "MC05":  # 3 events in one sample of the study
            c["count"], c["pct_parent"] = 0, 0.0
            c.iloc[0, c.columns.get_loc("count")] = 3
        c["median_CD25"] = np.where(mc == "MC01", 2500.0, 300.0)
        parts.append(c)
    clusters = pd.concat(parts, ignore_index=True)
    clusters.to_parquet(run / "clusters.parquet")
    tiny = tiny_metaclusters(clusters)
    assert set(tiny) == {"MC04", "MC05"} and "empty" in tiny["MC04"] and tiny["MC05"].startswith("3 events")
    html = write_report(run).read_text(encoding="utf-8")
    assert "2 of 5 metaclusters are empty or nearly so" in html and "MC05: 3 events in all samples" in html
    texts = "\n".join(png_texts(embedded_pngs(html)["cluster-heatmap"]))
    assert "MC01" in texts and "MC04" not in texts and "MC05" not in texts
    dyn = "\n".join(png_texts(embedded_pngs(html)["cluster-dynamics"]))
    assert "MC03" in dyn and "MC04" not in dyn


# ------------------------------------------------------------------------------------------------
# cheap reruns: statistics and report cached by the hash of their inputs
# ------------------------------------------------------------------------------------------------
def test_report_is_reused_when_nothing_changed_and_rebuilt_when_something_did(tmp_path, capsys):
    import argparse
    import os

    from cytopipe.report import run as report_command
    from cytopipe.report.build import report_is_current

    run, _ = build_cohort_run(tmp_path / "run", n_patients=8)
    path = write_report(run)
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))  # an older file: a rewrite would change it
    assert report_is_current(run)
    args = argparse.Namespace(
        run_dir=str(run), blinded=False, out=None, blind_key=None, clinical=None, rebuild=False
    )
    assert report_command(args) == 0
    assert "report reused (its inputs are unchanged)" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == stamp - 10**9
    # a changed input (one frequency) makes it stale: written again
    ps = pd.read_parquet(run / "population_stats.parquet")
    ps.loc[0, "pct_parent"] += 1.0
    ps.to_parquet(run / "population_stats.parquet", index=False)
    assert not report_is_current(run)
    report_command(args)
    assert "report written" in capsys.readouterr().out and path.stat().st_mtime_ns != stamp - 10**9
    assert report_is_current(run) and not report_is_current(run, blinded=True)


def test_statistics_are_reused_when_nothing_changed(sim_run, sim_trial, tmp_path, capsys):
    import shutil

    from cytopipe.pipeline import run_workflow
    from tests.pipeline_support import forget_rerun_record, workflow

    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    first = run_workflow(workflow(sim_trial, run), scheduler="synchronous", progress=True)
    capsys.readouterr()
    before = pd.read_parquet(run / "statistics.parquet")
    forget_rerun_record(run)  # else nothing runs at all (tests/test_rerun.py): the normal path here
    again = run_workflow(workflow(sim_trial, run), scheduler="synchronous", progress=True)
    err = capsys.readouterr().err
    assert "statistics: reused" in err
    step = next(s for s in again.info["steps"] if s["step"] == "statistics")
    assert (
        step["reused"]
        and step["rows"] == next(s for s in first.info["steps"] if s["step"] == "statistics")["rows"]
    )
    pd.testing.assert_frame_equal(pd.read_parquet(run / "statistics.parquet"), before)
    # other settings: computed again
    changed = run_workflow(workflow(sim_trial, run, statistics={"enabled": True, "baseline_visit": 0, "alpha": 0.1}),
                           scheduler="synchronous", progress=True)  # fmt: skip
    assert "statistics: computing" in capsys.readouterr().err
    assert not next(s for s in changed.info["steps"] if s["step"] == "statistics").get("reused")
