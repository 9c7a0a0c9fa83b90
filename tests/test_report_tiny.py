"""The report of the smallest study: one patient, one visit, one sample, no site recorded.

Found by looking at such a report: the overview showed a bare "0" over "visits (weeks)" (the only
week, read as "no visits"), the Levey-Jennings charts numbered their one sample's position
-0.04, -0.02, 0, 0.02, 0.04, and samples without a site were 1-pixel dots.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest

from tests.report_support import build_gated_run


@pytest.fixture(scope="module")
def one_sample(sample_data, tmp_path_factory):
    from cytopipe.report import write_report

    trial = tmp_path_factory.mktemp("one-sample")
    manifest = pd.read_csv(sample_data / "manifest.csv", dtype=str, keep_default_na=False)
    rows = manifest[manifest["sample_id"] == "P001_W00"].copy()
    rows["file"] = [str(sample_data / f) for f in rows["file"]]
    rows["site"] = ""  # no site recorded; the batch is
    rows.to_csv(trial / "manifest.csv", index=False)
    clinical = pd.read_csv(sample_data / "clinical.csv", dtype={"patient_id": str})
    clinical[clinical["patient_id"] == "P001"].to_csv(trial / "clinical.csv", index=False)  # every visit
    run = build_gated_run(trial, trial / "run")
    return run, write_report(run).read_text(encoding="utf-8")


def test_the_overview_counts_one_visit_and_names_its_week(one_sample):
    _, html = one_sample
    kpis = dict((k, v) for v, k in re.findall(r'<div class="kpi"><b>([^<]*)</b><span>([^<]*)</span>', html))
    assert kpis["visit (week 0)"] == "1"
    assert kpis["patients"] == "1" and kpis["samples gated"] == "1"
    assert not any(k.startswith("visits") for k in kpis)


def test_levey_jennings_axes_number_samples_and_show_siteless_points(one_sample):
    from cytopipe.report.batches import levey_jennings_figure, tracking_table
    from cytopipe.report.data import load_run

    run, html = one_sample
    assert '<section id="batches">' in html and "(no site recorded)" in html
    data = load_run(run)
    track = tracking_table(data.population_stats, data.samples)
    fig = levey_jennings_figure(track, data.measured_populations)
    fig.canvas.draw()
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 17
    for ax in shown:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # sample positions: 0, never 0.02
        points = [c for c in ax.collections if len(c.get_offsets()) and c.get_facecolor().size]
        extent = points[0].get_paths()[0].get_extents()
        assert extent.width >= 1.0  # a full-size marker, not matplotlib's '.' (half its size)


def test_correlations_of_too_few_patients_say_why_instead_of_an_empty_heatmap(tmp_path):
    """Four patients: no Spearman correlation can be computed. The section drew an all-grey heatmap
    and a table of headers only, without a word why."""
    from cytopipe.report import write_report
    from tests.report_support import build_cohort_run

    run, _ = build_cohort_run(tmp_path / "four", n_patients=4)
    html = write_report(run).read_text(encoding="utf-8")
    section = re.search(r'<section id="correlations">(.*?)</section>', html, re.S).group(1)
    assert "<img" not in section and "<table" not in section
    note = re.search(
        r'<p class="note">(No correlation could be computed[^<]*)<a href="([^"]+)">CSV</a>', section
    )
    assert note and "complete pairs" in note.group(1)
    table = pd.read_csv(run / note.group(2))
    assert len(table) > 0 and table["estimate"].isna().all()
    assert table["note"].str.contains("complete pairs").all()


def test_correlations_of_a_one_visit_study_do_not_ask_for_the_clinical_table(one_sample):
    """The run has a clinical table; with one visit there is no change from baseline to correlate.
    The section said 'they need the clinical table'."""
    _, html = one_sample
    assert '<section id="clinical">' in html and "Clinical table not used" not in html
    section = re.search(r'<section id="correlations">(.*?)</section>', html, re.S).group(1)
    assert "No correlations: they correlate changes from baseline, and the flow data have 1 visit." in section
    assert "need the clinical table" not in section


def test_a_baseline_only_study_draws_no_change_figure_of_zeros(one_sample):
    """One visit, the baseline: the change figure was 17 panels of a single 0 on a -0.1..0.1 axis."""
    _, html = one_sample
    section = re.search(r'<section id="dynamics">(.*?)</section>', html, re.S).group(1)
    assert 'id="fig-dynamics"' in section and 'id="fig-dynamics-change"' not in section
    assert (
        "No change from baseline to show: no sample of a later visit than week 0 (the baseline)." in section
    )


def test_the_batches_sentence_counts_in_words_and_leaves_out_a_site_count_of_zero(one_sample):
    """One sample, one batch and no site column value: '1 sample from 1 batch ... (no site
    recorded)', never '1 samples from 0 site(s)'."""
    _, html = one_sample
    text = re.sub(r"\s+", " ", html)
    assert (
        "Drift between sites and batches: 1 sample from 1 batch, in acquisition order (no site recorded)."
        in text
    )
    assert "site(s)" not in text and "batch(es)" not in text and "1 samples" not in text


def test_the_root_is_named_all_events_as_elsewhere_in_the_report(one_sample):
    """The first gate's parent is the gating root: its heading and caption say 'all events'
    (the figures' '% of all events'), not 'of root' or 'the root events'."""
    from cytopipe.report.sections import events_of, parent_name

    _, html = one_sample
    assert "Lymphocytes  (of all events)" in html
    assert "(of root)" not in html and "root events" not in html and "% of root" not in html
    assert parent_name("root") == "all events" and parent_name("Live") == "Live"
    assert events_of("root") == "all events" and events_of("CD4 T") == "the CD4 T events"


@pytest.mark.slow  # default suite: the other tests of this module (the report of small studies)
def test_the_same_problem_of_many_samples_is_one_box_with_the_samples_folded(sample_run, tmp_path):
    """Twelve samples left out of the clusters for the same reason: one 'Problem in this run, 12
    samples' box with the sample list in a <details>, not twelve boxes; a problem of one sample and
    a run-level problem keep their own box."""
    import json
    import shutil

    from cytopipe.report import write_report

    run = tmp_path / "run"
    shutil.copytree(sample_run, run)
    samples = pd.read_parquet(run / "samples.parquet")["sample_id"].astype(str).tolist()[:13]
    why = "ClusteringError: no Live events after QC"
    problems = [f"clustering (mapping): sample {s} left out: {why}" for s in samples[:12]]
    problems += [
        f"clustering (mapping): sample {samples[12]} left out: MemoryError",
        "statistics: no clinical table",
    ]
    info = json.loads((run / "run.json").read_text())
    info["problems"] = problems
    (run / "run.json").write_text(json.dumps(info))
    html = write_report(run).read_text(encoding="utf-8")
    boxes = re.findall(r'<p class="error">Problem in this run[^<]*</p>', html)
    assert len(boxes) == 3, boxes
    assert (
        boxes[0]
        == f'<p class="error">Problem in this run, 12 samples: clustering (mapping): samples left out: {why}</p>'
    )
    folded = re.search(r"<details><summary>Show the 12 samples</summary><p>([^<]*)</p></details>", html)
    assert folded and folded.group(1).split(", ") == samples[:12]
    assert f"sample {samples[12]} left out: MemoryError" in boxes[1] and "no clinical table" in boxes[2]
