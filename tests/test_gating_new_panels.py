"""A new user's panels: the canonical template adapted (as docs/gating.md §5b says) to real human
files the template was never tuned on.

* MetaCyto's ImmPort SDY736 files (LSRII, 1 000 events each, human PBMC): the T-cell panel
  (CD3, CD4, CD8b, ...; no viability dye, no FSC-H) and the Ki67/CCR7 panel (viability dye
  labelled ``Live``, CD3, CD4, CD8, CD45RA).
* cytoflow's ``itn_02.fcs`` (FACSCanto, human T cells; scatter named ``FSC`` / ``SSC``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.mixture import GaussianMixture

from cytopipe.cli import main
from cytopipe.fcs import read_fcs, write_fcs
from cytopipe.gating import gate, load_template
from tests.conftest import REPO, shared_path

TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"
SDY736 = ("MetaCyto", "inst", "extdata", "SDY736", "ResultFiles", "Flow_cytometry_result")


def _t_cell_copy(path, panel: dict, min_events: int) -> None:
    """The canonical template copied and cut to Lymphocytes > T cells > CD4 T / CD8 T, as a lab
    scientist adapts it to a panel without a viability dye or FSC-H; `min_events` lowered for
    1 000-event files (the lab's own copy: the shipped template is unchanged)."""
    template = yaml.safe_load(TEMPLATE.read_text())
    keep = ["Lymphocytes", "T cells", "CD4 T", "CD8 T"]
    template["populations"] = [p for p in template["populations"] if p["name"] in keep]
    for pop in template["populations"]:
        if pop["name"] == "T cells":
            pop["parent"] = "Lymphocytes"
        bounds = pop["gate"].get("bounds")
        if bounds and "min_events" in bounds:
            bounds["min_events"] = min_events
    template["panel"] = panel
    template["medians"] = ["CD3", "CD4", "CD8"]
    path.write_text(yaml.safe_dump(template, sort_keys=False))


def _first_events(path, out, n: int):
    """A copy of an FCS file cut to its first ``n`` events (a file too small for its own fits)."""
    s = read_fcs(path)
    write_fcs(out, s.events[:n], s.channels, {k: v for k, v in s.keywords.items() if not k.startswith("$P")})
    return out


def test_a_file_whose_gate_needs_the_pooled_estimate_is_gated_with_it(tmp_path, capsys):
    """Hs90211 cut to 80 events: its Lymphocytes gate cannot be fitted on its own (fewer than the
    copy's `min_events` 100). Pass 1 has no pooled estimate yet; the file was failed there ("there
    is no pooled estimate ... to fall back on") and never gated in pass 2, although the other
    files' cohort estimate was made for exactly this. (The whole Hs90211 was the example once: its
    saturated events made its fit fail; they are left out of the landmarks now, see below.)"""
    files = [
        shared_path(*SDY736, "Hs90208C20090205_00.583331.fcs"),
        shared_path(*SDY736, "Hs90210C20090205_00.583065.fcs"),
        _first_events(
            shared_path(*SDY736, "Hs90211C20090205_00.583066.fcs"), tmp_path / "Hs90211_80.fcs", 80
        ),
    ]
    template = tmp_path / "t_panel.yaml"
    _t_cell_copy(template, {"CD8": "PE-Texas Red-A"}, min_events=100)
    out = tmp_path / "out"
    rc = main(["gate", *map(str, files), "--template", str(template), "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    stats = pd.read_parquet(out / "population_stats.parquet")
    assert set(stats["sample_id"]) == {"Hs90208C20090205_00.583331", "Hs90210C20090205_00.583065",
                                       "Hs90211_80"}  # fmt: skip
    lymph = stats.set_index(["sample_id", "population"]).loc[("Hs90211_80", "Lymphocytes")]
    assert 0.5 < lymph["pct_parent"] / 100 < 0.9
    flags = pd.read_parquet(out / "gate_flags.parquet")
    mine = flags.loc[flags["sample_id"] == "Hs90211_80", "flag"].tolist()
    assert any("used the cohort estimate (median of 2 samples)" in f for f in mine), mine


@pytest.mark.parametrize("name", ["Hs90211C20090205_00.583066", "T_Hs60003C200900407A_00.581924"])
def test_saturated_events_do_not_move_the_lymphocyte_landmarks(name, tmp_path, capsys):
    """0.2-2 % of these LSRII files' events sit at the detector maximum (262143 = $PnR - 1) on
    FSC-A/SSC-A; without margin QC (`cytopipe gate`) they stretched the 0.5-99.5 % scatter range
    so that its 'debris' tenth reached the lymphocytes (FSC ~43 000) and the fit failed ("every
    dense scatter cluster lies in the debris range"). Saturated events are left out of the
    landmarks (not out of the gate): the gate is fitted, and T cells match a 2-component mixture
    on CD3 of the gated lymphocytes, as in test_gating_landmarks."""
    path = shared_path(*SDY736, name + ".fcs")
    template = tmp_path / "t_panel.yaml"
    _t_cell_copy(template, {"CD8": "PE-Texas Red-A"}, min_events=100)
    out = tmp_path / "out"
    assert main(["gate", str(path), "--template", str(template), "--out", str(out), "--quiet"]) == 0
    stats = pd.read_parquet(out / "population_stats.parquet").set_index("population")
    assert set(stats["sample_id"]) == {name}
    assert stats.loc["Lymphocytes", "count"] > 0
    flags = pd.read_parquet(out / "gate_flags.parquet")
    assert flags.empty, flags["flag"].tolist()

    sample = read_fcs(path)
    result = gate(sample, load_template(template))
    assert result.populations["Lymphocytes"].source == "fitted"
    cd3 = result.event_values(sample).values("CD3", "Lymphocytes").reshape(-1, 1)
    gm = GaussianMixture(2, random_state=0, n_init=3).fit(cd3)
    ref_t = 100 * np.mean(gm.predict(cd3) == np.argmax(gm.means_[:, 0]))
    got = result.populations["T cells"].pct_parent
    assert abs(stats.loc["T cells", "pct_parent"] - got) < 1e-9
    assert abs(got - ref_t) <= 5, (got, ref_t)


def test_a_viability_dye_labelled_live_resolves_to_viability(capsys):
    """SDY736's Ki67/CCR7 panel labels its viability dye `Live` (channel `Live/Dead Yellow-A`):
    Viability was MISSING and the message said no stain label named it."""
    path = shared_path(*SDY736, "Ki67ccr7_Hs60022C200906243.581846.fcs")
    main(["template", "check", str(path), "--template", str(TEMPLATE)])
    text = capsys.readouterr().out
    assert "Viability -> Live/Dead Yellow-A" in text
    assert "marker 'Viability'" not in text


def test_missing_scatter_channels_are_named_by_their_pnn(capsys):
    """cytoflow's itn_02.fcs (FACSCanto, human T cells) names its scatter `FSC` and `SSC`: the
    check said no stain label ($PnS) named FSC-A and suggested nothing; scatter is found by $PnN.
    SDY736 has FSC-A but no FSC-H: FSC-A (the area, used by FSC-A) is never suggested for it."""
    itn = shared_path("cytoflow", "cytoflow", "tests", "data", "module_examples", "itn_02.fcs")
    assert main(["template", "check", str(itn), "--template", str(TEMPLATE)]) == 3
    text = capsys.readouterr().out
    fsc_a = text.split("marker 'FSC-A'", 1)[1].split("\n\n", 1)[0]
    assert "stain label" not in fsc_a
    assert "channels named like it: FSC." in fsc_a and "panel:\n  FSC-A: FSC\n" in fsc_a
    assert "panel:\n  SSC-A: SSC\n" in text
    assert "leave that population out of your copy of the template" in fsc_a

    ki67 = shared_path(*SDY736, "Ki67ccr7_Hs60022C200906243.581846.fcs")
    assert main(["template", "check", str(ki67), "--template", str(TEMPLATE)]) == 3
    fsc_h = capsys.readouterr().out.split("marker 'FSC-H'", 1)[1].split("\n\n", 1)[0]
    assert "no channel is named FSC-H nor like it" in fsc_h
    assert "FSC-H: <$PnN of the channel>" in fsc_h and "FSC-H: FSC-A" not in fsc_h


def test_a_run_gates_a_file_whose_gate_needs_the_pooled_estimate(tmp_path):
    """The same in `cytopipe run` (80-event Hs90211): its pass 1 failed the file ("no pooled
    estimate ... to fall back on") and pass 2 never gated it."""
    names = ["Hs90208C20090205_00.583331", "Hs90210C20090205_00.583065"]
    paths = [shared_path(*SDY736, n + ".fcs") for n in names]
    paths.append(
        _first_events(shared_path(*SDY736, "Hs90211C20090205_00.583066.fcs"), tmp_path / "Hs90211_80.fcs", 80)
    )
    rows = [f"{p},S{i},P{i},0,A" for i, p in enumerate(paths)]
    (tmp_path / "manifest.csv").write_text("file,sample_id,patient_id,visit,arm\n" + "\n".join(rows) + "\n")
    _t_cell_copy(tmp_path / "t_panel.yaml", {"CD8": "PE-Texas Red-A"}, min_events=100)
    (tmp_path / "wf.yaml").write_text(
        "study: SDY736 T-cell panel\nmanifest: manifest.csv\ntemplate: t_panel.yaml\noutput: out\n"
        "workers: 1\nqc:\n  margins: {enabled: false}\nclustering: {enabled: false}\n"
        "report: {enabled: false}\n"
    )
    assert main(["run", str(tmp_path / "wf.yaml")]) == 0
    stats = pd.read_parquet(tmp_path / "out" / "population_stats.parquet").set_index(
        ["sample_id", "population"]
    )
    lymph = stats.loc[("S2", "Lymphocytes")]
    assert lymph["gate_source"] == "pooled"
    assert "used the cohort estimate (median of 2 samples)" in lymph["gate_flags"]
    assert stats.loc[("S2", "T cells"), "count"] > 0


def _two_sdy736_files() -> list:
    """Two SDY736 T-panel files of 1 000 events each."""
    return [
        shared_path(*SDY736, n) for n in ("Hs90208C20090205_00.583331.fcs", "Hs90210C20090205_00.583065.fcs")
    ]


def _check(files, template, capsys) -> tuple[int, str, list[str]]:
    """`cytopipe template check FILES --template T`: its exit code, output and PROBLEM lines."""
    code = main(["template", "check", *map(str, files), "--template", str(template)])
    text = capsys.readouterr().out
    return code, text, [line for line in text.splitlines() if line.startswith("  PROBLEM:")]


def test_template_check_says_when_files_are_too_small_for_the_first_gate(tmp_path, capsys):
    """SDY736's files have 1 000 events; the canonical Lymphocytes gate needs 2 000 (`min_events`).
    The check said "every population can be gated" (exit 0); `cytopipe gate` then left every
    population empty (flags only, exit 0)."""
    files = _two_sdy736_files()
    template = tmp_path / "t_panel.yaml"
    _t_cell_copy(template, {"CD8": "PE-Texas Red-A"}, min_events=2000)
    code, text, problems = _check(files, template, capsys)
    assert code == 3
    assert len(problems) == 2
    assert "the file has 1000 events; gate 'Lymphocytes' (on all events) needs at least 2000" in problems[0]
    assert "leaves Lymphocytes and every population under it empty" in problems[0]
    assert text.splitlines()[-1].startswith("2 of 2 file(s) with problems")
    out = tmp_path / "out"
    assert main(["gate", *map(str, files), "--template", str(template), "--out", str(out), "--quiet"]) == 0
    stats = pd.read_parquet(out / "population_stats.parquet")
    assert (stats["count"] == 0).all()  # what the check announced

    _t_cell_copy(template, {"CD8": "PE-Texas Red-A"}, min_events=100)  # the lab's copy, lowered
    assert main(["template", "check", *map(str, files), "--template", str(template)]) == 0


def test_template_check_counts_the_events_a_fit_reads_not_the_saturated_ones(tmp_path, capsys):
    """Two SDY736 files of 1 000 events, 40 and 32 of them saturated on FSC-A or SSC-A (at
    `$PnR - 1`): the Lymphocytes fit leaves those out and reads 960 and 968 (docs/gating.md). With
    `min_events: 980` the check counted the header's 1 000 and said "every population can be
    gated" (exit 0), while `cytopipe gate` failed both files (no file fitted, so no pooled
    estimate). The check now reads the events where the header cannot decide and counts as the
    fit does."""
    files = _two_sdy736_files()
    template = tmp_path / "t_panel.yaml"
    _t_cell_copy(template, {"CD8": "PE-Texas Red-A"}, min_events=980)
    code, text, problems = _check(files, template, capsys)
    assert code == 3
    assert len(problems) == 2, text
    for problem, reads in zip(problems, (960, 968)):
        assert (
            f"the file has 1000 events, but the fit of gate 'Lymphocytes' (on all events) reads only {reads}"
            in problem
        )
        assert "needs at least 980 (`min_events`)" in problem and "`cytopipe gate` fails this file" in problem
    assert (
        main(["gate", *map(str, files), "--template", str(template), "--out", str(tmp_path / "a"), "--quiet"])
        == 3
    )
    err = capsys.readouterr().err
    assert "only 960 events in the parent (need >= 980)" in err and "only 968 events" in err  # as announced

    # one file's fit reads enough (968 >= 965): its estimate is pooled for the other, gate succeeds
    _t_cell_copy(template, {"CD8": "PE-Texas Red-A"}, min_events=965)
    assert main(["template", "check", *map(str, files), "--template", str(template)]) == 0
    assert (
        main(["gate", *map(str, files), "--template", str(template), "--out", str(tmp_path / "b"), "--quiet"])
        == 0
    )
    stats = pd.read_parquet(tmp_path / "b" / "population_stats.parquet")
    assert (stats.loc[stats["population"] == "Lymphocytes", "count"] > 0).all()


@pytest.mark.parametrize(
    "name",
    [
        "Ki67ccr7_Hs60022C200906243.581846",
        "Ki67ccr7_Hs60025C200907134.583112",
        "Ki67ccr7_Hs60041C200908104.581964",
        "Ki67ccr7_Hs60056C200909217.581912",
    ],
)
def test_lymphocytes_are_found_above_dominant_debris(name, tmp_path):
    """SDY736's Ki67 tubes are 56-79 % debris (a dense cloud at the lowest FSC). Its peak was 12x
    the lymphocytes' and a cluster had to be 15 % as dense as the densest to count: "every dense
    scatter cluster lies in the debris range" and no gate. Density is now measured against the
    densest cluster of cells, and the ellipse stops at the FSC valley above the debris (its core
    slid onto the debris once found). The gated cells are lymphocytes: mostly T cells (64-86 %),
    as a 2-component mixture on CD3 of the gated events says too (debris would be CD3-)."""
    template = tmp_path / "t_panel.yaml"
    _t_cell_copy(template, {}, min_events=100)
    sample = read_fcs(shared_path(*SDY736, name + ".fcs"))
    result = gate(sample, load_template(template))
    lymph = result.populations["Lymphocytes"]
    assert lymph.source == "fitted" and not lymph.flags, lymph.flags
    cd3 = result.event_values(sample).values("CD3", "Lymphocytes").reshape(-1, 1)
    gm = GaussianMixture(2, random_state=0, n_init=3).fit(cd3)
    ref_t = 100 * np.mean(gm.predict(cd3) == np.argmax(gm.means_[:, 0]))
    got = result.populations["T cells"].pct_parent
    print(f"\n{name}: Lymphocytes {lymph.pct_parent:.1f} % of events, T cells {got:.1f} % (mix {ref_t:.1f})")
    assert got >= 50 and abs(got - ref_t) <= 5, (got, ref_t)
