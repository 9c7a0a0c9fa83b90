"""The Python examples of docs/fcs.md, docs/qc.md, docs/simulator.md, docs/gating.md and
docs/pipeline.md run as written, from the repository root (only the folders they write are moved
to a temporary folder), and give what the pages say they give."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO


def blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / doc).read_text(), re.S)


def run(code: str, name: str, scope: dict | None = None) -> dict:
    scope = {} if scope is None else scope
    exec(compile(code, name, "exec"), scope)
    return scope


@pytest.fixture
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_fcs_doc_reading_writing_and_the_manifest(at_repo, tmp_path):
    read, write, manifest = blocks("fcs.md")
    s = run(read, "docs/fcs.md (reading)")
    sample = s["sample"]
    assert sample.events.dtype == np.float32 and sample.events.flags.c_contiguous
    assert list(sample.channels.columns) == ["n", "pnn", "pns", "pnr", "pnb", "pne", "png"]
    assert sample.version == "FCS3.1" and sample.n_datasets == 1 and sample.warnings == []
    assert sample.spillover.keyword == "$SPILLOVER" and "BV421-A" in sample.spillover.channels
    assert list(s["frame"].columns) == list(sample.channels["pnn"])
    out = tmp_path / "out.fcs"
    run(write.replace('"out.fcs"', repr(str(out))), "docs/fcs.md (writing)")
    import cytopipe

    back = cytopipe.read_fcs(out)
    assert back.version == "FCS3.1" and back.events.shape == (5000, 3)
    assert list(back.channels["pns"]) == ["", "CD4", "FOXP3"] and back.keywords["$CYT"] == "Simulator"
    assert back.spillover.channels == ["BV421-A", "PE-A"]
    m = run(manifest, "docs/fcs.md (manifest)")
    assert m["table"]["ok"].all() and len(m["good"]) == len(m["manifest"]) == 105
    for column in ("file", "sample_id", "patient_id", "visit", "arm", "control", "path", "row"):
        assert column in m["manifest"].columns


def test_qc_doc_example(at_repo, capsys):
    (code,) = blocks("qc.md")
    s = run(code, "docs/qc.md")
    printed = capsys.readouterr().out
    for column in ("events_before_qc", "qc_removed_fraction", "qc_margin_by_channel", "qc_worst_channel"):
        assert column in printed  # the samples.parquet QC columns
    assert len(s["clean"]) == s["report"].keep.sum() <= len(s["sample"].events)
    assert s["strict"].keep.sum() <= s["report"].keep.sum()  # a stricter MAD removes no fewer events


def test_simulator_doc_cohort_and_trial(tmp_path, monkeypatch):
    code = blocks("simulator.md")[0]
    unpack = blocks("simulator.md")[1]
    monkeypatch.chdir(tmp_path)
    # the page's CLI example writes my_trial first: the Python example must not need that folder
    (tmp_path / "my_trial" / "fcs").mkdir(parents=True)
    s = run(code, "docs/simulator.md (cohort)")
    run(unpack, "docs/simulator.md (truth)", s)
    cohort = s["cohort"]
    assert list(cohort.clinical.columns) == ["patient_id", "visit", "arm", "sledai", "pga", "bilag_new_a",
                                             "bilag_new_b", "anti_dsdna", "c3", "c4", "proteinuria",
                                             "prednisone_mg"]  # fmt: skip
    assert list(cohort.frequencies.columns) == [
        "patient_id",
        "visit",
        "arm",
        "population",
        "parent",
        "pct_parent",
    ]
    commented = re.search(r"# (patient_id, arm, .*?) \.\.\.", code, re.S).group(1)
    listed = [c.strip() for c in commented.replace("#", "").split(",")]
    assert listed[-1] == "baseline_<trait>"  # the comment names the first columns, then one per trait
    assert list(cohort.patients.columns[: len(listed) - 1]) == listed[:-1]
    assert cohort.patients.columns[len(listed) - 1 :].str.startswith("baseline_").all()
    assert (tmp_path / "py_trial" / "manifest.csv").exists()
    assert s["treg"].dtype == bool and 0 < s["treg"].sum() < len(s["treg"])


def test_simulator_doc_fmo_threshold_example(tmp_path, monkeypatch):
    code = blocks("simulator.md")[3]
    monkeypatch.chdir(tmp_path)
    s = run(code, "docs/simulator.md (FMO)")
    level = float(np.arcsinh(np.percentile(s["x"][s["memory"]], 99.5) / s["inst"].cofactor))
    thresholds = pd.read_csv(tmp_path / "fmo_trial" / "truth" / "thresholds.csv")
    assert "threshold_asinh" in thresholds.columns and np.isfinite(level)


@pytest.mark.slow
def test_simulator_doc_instrument_and_accuracy_examples(tmp_path, monkeypatch):
    instruments, accuracy = blocks("simulator.md")[2], blocks("simulator.md")[4]
    monkeypatch.chdir(tmp_path)
    s = run(instruments, "docs/simulator.md (instruments)")
    assert s["inst"].pnr == 4194304 and set(s["trial"].instruments) == {"S1", "S2", "S3"}
    monkeypatch.syspath_prepend(str(REPO))
    s = run(accuracy.replace('"gating/', f'"{REPO}/gating/'), "docs/simulator.md (accuracy)")
    from tests.accuracy_support import accuracy_table

    table = accuracy_table(s["gated"])
    assert list(table.columns) == ["population", "n", "undefined", "mae_pp", "ccc", "fallback_rate", "failed"]
    assert (table["failed"] == 0).all()


def test_gating_doc_examples(at_repo, tmp_path, capsys):
    one, pooled, _values, learned = blocks("gating.md")
    s = run(one, "docs/gating.md (gate one file)")
    assert (
        "Treg" in capsys.readouterr().out
        and s["treg"].sum() == s["stats"].set_index("population").loc["Treg", "count"]
    )
    s = run(pooled, "docs/gating.md (two passes)")
    assert len(s["results"]) == 48 and not s["records"].empty
    s = run(learned.replace("/tmp/learned-demo", str(tmp_path / "learned-demo")), "docs/gating.md (learned)")
    out = capsys.readouterr().out
    assert "CD56dim NK" in out and set(s["result"].alignment) <= set(s["template"].names)


def test_pipeline_doc_reading_results(pipeline_run, monkeypatch, tmp_path):
    out, proc = pipeline_run
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sle_il2").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    (code,) = blocks("pipeline.md")[:1]
    s = run(code, "docs/pipeline.md (results)")
    assert s["treg"].shape == (12, 4)  # 12 patients x visits 0, 4, 12, 24
    from cytopipe.store import query

    flagged = query("runs/sle_il2", "select sample_id, status, flags from samples where status != 'ok'")
    assert set(flagged["status"]) == {"flagged"} and len(flagged) == 6


def test_pipeline_doc_names_every_column_of_the_run_tables(pipeline_run):
    """docs/pipeline.md's paragraphs on population_stats and samples name every column a run writes
    (`median_<marker>` for the medians; the QC metrics are docs/qc.md's)."""
    out, _ = pipeline_run
    text = (REPO / "docs" / "pipeline.md").read_text()
    for table in ("population_stats", "samples"):
        start = text.index(f"`{table}.parquet`: ")
        named = set(re.findall(r"`([^`]+)`", text[start : text.index("\n\n", start)]))
        if table == "samples":
            named |= set(re.findall(r"`(qc_[a-z_]+)`", (REPO / "docs" / "qc.md").read_text()))
        columns = pd.read_parquet(out / f"{table}.parquet").columns
        missing = [c for c in columns if c not in named and not c.startswith("median_")]
        assert not missing, f"docs/pipeline.md does not name these {table} columns: {missing}"


def test_readme_python_example(at_repo, capsys):
    (code,) = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    run(code, "README.md")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["population", "count", "pct_parent"] and len(printed) == 1 + 17
    assert any(line.split()[1:2] == ["Treg"] for line in printed)


def test_simulator_doc_names_the_columns_of_faults_csv(tmp_path):
    from cytopipe.simulate import simulate_trial

    simulate_trial(
        tmp_path / "t", n_patients=1, visits=(0, 4), events=2000, seed=5, control_events=100, faults=0.5
    )
    row = next(
        line
        for line in (REPO / "docs" / "simulator.md").read_text().splitlines()
        if "truth/faults.csv` |" in line
    )
    named = {c.strip() for part in re.findall(r"`([^`]+)`", row)[1:] for c in part.split(",")}
    assert set(pd.read_csv(tmp_path / "t" / "truth" / "faults.csv").columns) == named
