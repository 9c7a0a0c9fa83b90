"""Missing markers fail once, early; `cytopipe template check` (issue 10 item 5, issue 15 item 6)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

import cytopipe
from cytopipe.cli import main
from tests.conftest import REPO, shared_path

TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"


@pytest.fixture(scope="module")
def no_cd25_files(tmp_path_factory):
    """Two simulated files whose CD25 channel has no label (the panel 'lacks' CD25)."""
    from cytopipe.simulate import simulate_trial

    path = tmp_path_factory.mktemp("nocd25")
    simulate_trial(path, n_patients=1, visits=(0, 12), events=20_000, seed=99)
    manifest = pd.read_csv(path / "manifest.csv")
    out = []
    for f in manifest[manifest["control"].isna()]["file"]:
        s = cytopipe.read_fcs(path / f)
        ch = s.channels.copy()
        ch.loc[ch["pns"].astype(str).str.contains("CD25"), "pns"] = ""
        s = dataclasses.replace(s, channels=ch)
        target = path / f"nocd25_{(path / f).name}"
        cytopipe.write_fcs(target, s.events, s.channels, s.keywords, s.spillover)
        out.append(target)
    return out


def test_marker_absent_from_every_file_stops_once_before_any_work(no_cd25_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["gate", *map(str, no_cd25_files), "--template", str(TEMPLATE), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("marker 'CD25' is in none of the 2 file(s)") == 1
    # the message starts with the marker's own line (it read "error: marker 'CD25': marker 'CD25' ...")
    assert "cytopipe gate: error: marker 'CD25' is in none of the 2 file(s)" in err
    assert "populations needing it: Treg" in err and "panel:\n  CD25: " in err
    assert "--missing-markers skip" in err
    assert not (out / "population_stats.parquet").exists()


def test_missing_markers_skip_gates_everything_else(no_cd25_files, tmp_path):
    out = tmp_path / "out"
    rc = main(
        ["gate", *map(str, no_cd25_files), "--template", str(TEMPLATE), "--out", str(out), "--quiet",
         "--missing-markers", "skip"]
    )  # fmt: skip
    assert rc == 0
    stats = pd.read_parquet(out / "population_stats.parquet")
    assert len(stats) == 17 * len(
        no_cd25_files
    )  # the template's 17 populations (15 canonical + NK's two halves)
    treg = stats[stats["population"] == "Treg"]
    assert treg["pct_parent"].isna().all()
    others = stats[stats["population"] != "Treg"]
    assert others["pct_parent"].notna().all() and (others["count"] > 0).all()
    flags = pd.read_parquet(out / "gate_flags.parquet")
    assert (
        flags[flags["population"] == "Treg"]["flag"] == "not measured: marker CD25 is not in the file"
    ).all()


def test_template_check_on_a_new_panel(capsys):
    donor = shared_path("CytoPipeline", "inst", "extdata", "Donor1.fcs")
    rc = main(["template", "check", str(donor), "--template", str(TEMPLATE)])
    text = capsys.readouterr().out
    print(text)
    assert rc == 3  # the check completed and found problems (some markers are in no file)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "CD3 -> 670/30Violet-A" in lines["T"] and "fitted (auto)" in lines["T"]
    assert "landmark fallback" in lines["T"]
    assert "CD8 -> 585/15Violet-A" in text and "Viability -> 525/50Violet-A" in text
    assert "NOT MEASURED" in lines["Treg"] and "NOT MEASURED" not in lines["Memory"]
    assert (
        "marker 'CD56' is in none of the 1 file(s); populations needing it: CD3- CD56+, CD56bright NK, "
        "CD56dim NK" in text
    )
    # the panel lives in the template (a workflow has no `panel:` key): the message names it
    assert f"add to the template YAML {str(TEMPLATE)!r}:\npanel:\n  CD56: " in text
    assert "workflow" not in text
    assert text.rstrip().endswith("exit code 3")


def test_template_check_reports_not_measured_as_gate_does(tmp_path, capsys):
    """Donor1 lacks CD56 and CD16: NK (CD3- CD56+ `or` CD3- CD16+) is not measured, by gate and check."""
    donor = shared_path("CytoPipeline", "inst", "extdata", "Donor1.fcs")
    out = tmp_path / "out"
    rc = main(["gate", str(donor), "--template", str(TEMPLATE), "--out", str(out), "--quiet",
               "--missing-markers", "skip"])  # fmt: skip
    assert rc == 0
    stats = pd.read_parquet(out / "population_stats.parquet")
    by_gate = set(stats.loc[stats["pct_parent"].isna(), "population"])
    assert "NK" in by_gate
    capsys.readouterr()
    assert main(["template", "check", str(donor), "--template", str(TEMPLATE)]) == 3
    text = capsys.readouterr().out
    rows = {line[2:18].strip(): line for line in text.splitlines() if line.startswith("  ") and " | " in line}
    by_check = {name for name, line in rows.items() if line.endswith("NOT MEASURED")}
    assert by_check == by_gate


@pytest.mark.parametrize(
    "parts",
    [
        ("cytoflow", "cytoflow", "tests", "data", "module_examples", "itn_02.fcs"),
        ("FlowCal", "test", "Data002.fcs"),
        ("FlowKit", "data", "gate_ref", "data1.fcs"),
    ],
)
def test_template_check_reports_a_file_gate_would_refuse(parts, tmp_path, capsys):
    """No spillover matrix in a file and `compensation: file` in the template: gate refuses the file;
    the check says so for that file, in gate's words, which name the template to copy and edit."""
    path = shared_path(*parts)
    good = REPO / "sample_data" / "fcs" / "P001_W04.fcs"
    rc = main(["template", "check", str(good), str(path), "--template", str(TEMPLATE)])
    text = capsys.readouterr().out
    assert rc == 3
    problems = [line for line in text.splitlines() if line.startswith("  PROBLEM:")]
    assert len(problems) == 1
    assert text.index(problems[0]) > text.index(f"file {path}")  # under the file it is about
    rc = main(["gate", str(path), "--template", str(TEMPLATE), "--out", str(tmp_path / "g"),
               "--missing-markers", "skip", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 3
    refusal = err.split(f"file {str(path)!r}: ", 1)[1].splitlines()[0]
    assert refusal.startswith("the template asks for the file's spillover matrix (compensation: file)")
    assert f"Copy the template {str(TEMPLATE)!r}, set its `compensation:` key to `none`" in refusal
    assert "`cytopipe gate` has no option for this" in refusal
    assert problems[0].endswith(refusal)


def test_template_check_of_a_file_it_fits_exits_0(capsys):
    good = REPO / "sample_data" / "fcs" / "P001_W04.fcs"
    assert main(["template", "check", str(good), "--template", str(TEMPLATE)]) == 0
    text = capsys.readouterr().out
    assert "NOT MEASURED" not in text and "PROBLEM" not in text


def test_template_check_reports_a_truncated_file_as_gate_fails_it(tmp_path, capsys):
    """The check reads headers only, and a truncated copy's header is whole: it said 'every
    population can be gated' (exit 0) of a file `cytopipe gate` then fails."""
    good = REPO / "sample_data" / "fcs" / "P001_W04.fcs"
    cut = tmp_path / "P001_W04.fcs"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a copy stopped half-way
    assert main(["template", "check", str(cut), "--template", str(TEMPLATE)]) == 3
    text = capsys.readouterr().out
    problem = next(line for line in text.splitlines() if line.startswith("  PROBLEM:"))
    assert "would fail this file: DATA segment does not match the keywords" in problem
    assert "it is truncated" in problem and "copy or export the file again" in problem
    assert text.splitlines()[-1].startswith("1 of 1 file(s) with problems")
    rc = main(["gate", str(cut), "--template", str(TEMPLATE), "--out", str(tmp_path / "g"), "--quiet"])
    assert rc == 3 and "it is truncated" in capsys.readouterr().err  # what the check foretold


def test_template_check_reports_a_marker_on_a_shared_pnn_as_gate_fails_it(tmp_path, capsys):
    """A file whose CD4 and CXCR5 channels are both named BV605-A: `cytopipe gate` fails it
    (PanelError); the check said "every population can be gated" and exited 0."""
    import warnings

    from cytopipe.errors import PanelError

    raw = (REPO / "sample_data" / "fcs" / "P006_W00.fcs").read_bytes()
    path = tmp_path / "TWIN.fcs"
    path.write_bytes(raw.replace(b"|BV650-A|", b"|BV605-A|"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PanelError, match="'BV605-A' is ambiguous") as exc:
            cytopipe.gate(cytopipe.read_fcs(path), cytopipe.load_template(TEMPLATE))
        rc = main(["template", "check", str(path), "--template", str(TEMPLATE)])
    text = capsys.readouterr().out
    assert rc == 3
    problem = f"  PROBLEM: `cytopipe gate` and `cytopipe run` would fail this file: {exc.value.message}"
    assert problem in text.splitlines()  # the engine's own words (CD4 first, as gate meets it)
    assert "cTfh            CXCR5 -> BV605-A (AMBIGUOUS: a shared $PnN)" in text
    assert "every population can be gated" not in text


def test_optional_marker_missing_keeps_the_population():
    """FOXP3 is optional in the Treg gate: without it, Treg is the CD25/CD127 diagonal (flagged)."""
    import tempfile
    from pathlib import Path

    from cytopipe.gating import gate, load_template
    from cytopipe.simulate import simulate_trial

    with tempfile.TemporaryDirectory() as d:
        simulate_trial(Path(d), n_patients=1, visits=(0,), events=20_000, seed=98)
        m = pd.read_csv(Path(d) / "manifest.csv")
        s = cytopipe.read_fcs(Path(d) / m[m["control"].isna()]["file"].iloc[0])
    full = gate(s, load_template(TEMPLATE))
    ch = s.channels.copy()
    ch.loc[ch["pns"].astype(str).str.contains("FOXP3|FoxP3|Foxp3"), "pns"] = ""
    result = gate(dataclasses.replace(s, channels=ch), load_template(TEMPLATE))
    treg = result.populations["Treg"]
    assert treg.source != "not measured" and np.isfinite(treg.pct_parent)
    assert any("FOXP3 is not in the file" in f for f in treg.flags)
    assert abs(treg.pct_parent - full.populations["Treg"].pct_parent) < 1.5


def test_cytopipe_run_stops_once_or_skips(no_cd25_files, tmp_path, capsys):
    """`cytopipe run`: the same single early message (exit 2); `--missing-markers skip` gates the rest."""
    rows = [
        {"file": str(f), "sample_id": f"S{i}", "patient_id": "P1", "visit": 4 * i, "arm": "placebo"}
        for i, f in enumerate(no_cd25_files)
    ]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    base = ["run", "--manifest", str(manifest), "--template", str(TEMPLATE), "--scheduler", "synchronous"]
    rc = main([*base, "--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("marker 'CD25' is in none of the 2 file(s)") == 1 and "panel:\n  CD25:" in err
    assert not (tmp_path / "stop" / "population_stats.parquet").exists()
    rc = main([*base, "--out", str(tmp_path / "skip"), "--missing-markers", "skip", "--no-report"])
    assert rc == 0, capsys.readouterr().err
    stats = pd.read_parquet(next((tmp_path / "skip").rglob("population_stats.parquet")))
    assert stats[stats["population"] == "Treg"]["pct_parent"].isna().all()
    assert stats[stats["population"] == "CD4 T"]["pct_parent"].notna().all()
