"""Workflow specs: validation up front, with errors that name the key or path."""

from __future__ import annotations

from pathlib import Path

import pytest

from cytopipe.errors import WorkflowError
from cytopipe.workflow import describe_schema, load_workflow, workflow_from_options

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    """A folder with the files a spec points at (content is not read by load_workflow)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("file,sample_id\n")
    (tmp_path / "data" / "clinical.csv").write_text("patient_id,visit\n")
    (tmp_path / "data" / "comp.csv").write_text("a,b\n1,0\n0,1\n")
    (tmp_path / "gating").mkdir()
    (tmp_path / "gating" / "t.yaml").write_text("populations: []\n")
    (tmp_path / "workflows").mkdir()
    return tmp_path


def write_spec(study: Path, text: str) -> Path:
    path = study / "workflows" / "w.yaml"
    path.write_text(text)
    return path


BASE = """\
study: Test study
manifest: ../data/manifest.csv
template: ../gating/t.yaml
"""


def test_minimal_spec_paths_are_relative_to_the_spec_and_defaults_are_filled(study):
    wf = load_workflow(write_spec(study, BASE + "clinical: ../data/clinical.csv\n"))
    assert wf.study == "Test study"
    assert wf.manifest == (study / "data" / "manifest.csv").resolve()
    assert wf.template == (study / "gating" / "t.yaml").resolve()
    assert wf.clinical == (study / "data" / "clinical.csv").resolve()
    # default output: runs/<study slug> next to the spec
    assert wf.output == (study / "workflows" / "runs" / "Test_study").resolve()
    assert wf.workers is None and wf.seed == 0
    assert wf.compensation == {"source": "template", "path": None}
    assert wf.qc["time"]["mad"] == 6.0 and wf.qc["time"]["consecutive_bins"] == 5
    assert wf.qc["min_parent_events"] == 100
    assert wf.transforms["method"] == "logicle" and wf.transforms["estimate"] == "template"
    assert wf.clustering["enabled"] is True and wf.statistics["enabled"] == "auto"
    assert wf.report == {"enabled": True, "blinded": False, "blind_key": None, "max_gallery": 36}
    # statistics 'auto': on because a clinical table is given; off without one
    from cytopipe.workflow import statistics_enabled

    assert statistics_enabled(wf) and not statistics_enabled(load_workflow(write_spec(study, BASE)))


def test_every_setting_is_documented_with_a_default_row():
    rows = describe_schema()
    keys = [r[0] for r in rows]
    assert "qc.time.mad" in keys and "compensation.source" in keys and "clustering.metaclusters" in keys
    assert all(help_text for _, _, help_text in rows)


def test_full_spec_with_every_section(study):
    text = (
        BASE
        + """\
output: ../out/run1
workers: 2
seed: 7
compensation: {source: csv, path: ../data/comp.csv}
transforms: {method: arcsinh, estimate: study, params: {CD25: {type: arcsinh, cofactor: 150}}}
qc:
  margins: {lower_channels: all}
  time: {mad: 5, consecutive_bins: 3}
  min_events: 500
clustering: {enabled: true, markers: [CD4, CD8], grid: [8, 8], metaclusters: auto, embedding: {cells: 900}}
statistics: {enabled: true, families: [arm_visit, mixed_arm_visit], auc_windows: [[0, 4]], arm_doses: {a: 1}}
report: {blinded: true, blind_key: ../data/comp.csv}
"""
    )
    wf = load_workflow(write_spec(study, text))
    assert wf.output == (study / "out" / "run1").resolve()
    assert wf.workers == 2 and wf.seed == 7
    assert wf.compensation["path"] == (study / "data" / "comp.csv").resolve()
    assert wf.transforms["params"] == {"CD25": {"type": "arcsinh", "cofactor": 150}}
    assert wf.qc["time"]["mad"] == 5.0 and wf.qc["margins"]["lower_channels"] == "all"
    assert wf.clustering["grid"] == [8, 8] and wf.clustering["metaclusters"] == "auto"
    assert wf.clustering["embedding"] == {"enabled": True, "cells": 900, "neighbors": 15, "min_dist": 0.1}
    assert wf.statistics["families"] == ["arm_visit", "mixed_arm_visit"]
    assert wf.report["blinded"] is True and wf.report["blind_key"] == (study / "data" / "comp.csv").resolve()
    from cytopipe.workflow import statistics_settings

    settings = statistics_settings(wf)
    assert settings.families == ("arm_visit", "mixed_arm_visit") and settings.auc_windows == ((0, 4),)
    assert settings.seed == 7 and settings.arm_doses == {"a": 1}
    d = wf.to_dict()
    assert d["manifest"] == str(wf.manifest) and d["qc"]["min_events"] == 500


def test_out_overrides_the_spec_output(study, tmp_path):
    wf = load_workflow(write_spec(study, BASE + "output: somewhere\n"), output=tmp_path / "x")
    assert wf.output == (tmp_path / "x").resolve()


@pytest.mark.parametrize(
    "extra, key, fragment",
    [
        ("manifets: x.csv\n", "manifets", "did you mean 'manifest'"),
        ("qc: {time: {mads: 5}}\n", "qc.time.mads", "did you mean 'mad'"),
        ("clustering: {metacluster: 5}\n", "clustering.metacluster", "did you mean 'metaclusters'"),
        ("compensation: {source: flie}\n", "compensation.source", "did you mean 'file'"),
        ("workers: two\n", "workers", "positive integer or 'auto'"),
        ("seed: 1.5\n", "seed", "must be an integer"),
        ("seed: -1\n", "seed", "must be at least 0"),  # numpy refuses it: every sample failed
        ("clustering: {seed: -7}\n", "clustering.seed", "must be at least 0"),
        ("statistics: {seed: -7}\n", "statistics.seed", "must be at least 0"),
        ("qc: {time: {mad: 0.5}}\n", "qc.time.mad", "at least 1.0"),
        ("qc: {max_removed_fraction: 2}\n", "qc.max_removed_fraction", "at most 1"),
        ("qc: [1, 2]\n", "qc", "must be a mapping"),
        ("clustering: {markers: CD4}\n", "clustering.markers", "list of str"),
        ("clustering: {metaclusters: 1}\n", "clustering.metaclusters", "at least 2 or 'auto'"),
        ("clustering: {embedding: {cels: 10}}\n", "clustering.embedding.cels", "did you mean 'cells'"),
        ("clustering: {model: ../data/none.npz}\n", "clustering.model", "file not found"),
        ("statistics: {enabled: maybe}\n", "statistics.enabled", "true, false or 'auto'"),
        ("statistics: {fdr: bh}\n", "statistics.fdr", "unknown key"),
        ("statistics: {refrence_arm: x}\n", "statistics.refrence_arm", "did you mean 'reference_arm'"),
        ("statistics: {auc_windows: [[12, 0]]}\n", "statistics.auc_windows", "start < end"),
        ("statistics: {change_scale: log}\n", "statistics.change_scale", "did you mean 'log2fc'"),
        ("report: {blinded: yes please}\n", "report.blinded", "true or false"),
        ("clinical: ../data/nope.csv\n", "clinical", "file not found"),
        ("compensation: {source: csv}\n", "compensation.path", "no `path`"),
        ("compensation: {path: ../data/comp.csv}\n", "compensation.path", "only used with source 'csv'"),
    ],
)
def test_bad_specs_name_the_key(study, extra, key, fragment):
    with pytest.raises(WorkflowError) as info:
        load_workflow(write_spec(study, BASE + extra))
    assert info.value.context["key"] == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"file '{study / 'workflows' / 'w.yaml'}'")


@pytest.mark.parametrize(
    "section, key, fragment",
    [
        ("{families: [arm_vist]}", "statistics.families", "did you mean 'arm_visit'"),
        (
            "{clinical: {sri_treshold: [4]}}",
            "statistics.clinical.sri_treshold",
            "did you mean 'sri_thresholds'",
        ),
        ("{clinical: {imputation: lots}}", "statistics.imputation", "imputation must be"),
        ("{alpha: 0}", "statistics.alpha", "alpha must be between 0 and 1"),
    ],
)
def test_statistics_section_becomes_stats_settings_with_clear_errors(study, section, key, fragment):
    """Checked when the run starts (cytopipe.stats is imported then, not when a spec is read)."""
    from cytopipe.workflow import statistics_settings

    wf = load_workflow(write_spec(study, BASE + f"statistics: {section}\n"))
    with pytest.raises(WorkflowError) as info:
        statistics_settings(wf)
    assert info.value.context["key"] == key and fragment in str(info.value)


def test_missing_manifest_names_key_and_resolved_path(study):
    spec = write_spec(study, BASE.replace("../data/manifest.csv", "../data/missing.csv"))
    with pytest.raises(WorkflowError) as info:
        load_workflow(spec)
    assert info.value.context["key"] == "manifest"
    assert str((study / "data" / "missing.csv").resolve()) in str(info.value)
    assert "relative paths are taken from the workflow file's folder" in str(info.value)


def test_required_keys_and_file_level_problems(study, tmp_path):
    with pytest.raises(WorkflowError, match="required key is missing") as info:
        load_workflow(write_spec(study, "study: x\nmanifest: ../data/manifest.csv\n"))
    assert info.value.context["key"] == "template"
    with pytest.raises(WorkflowError, match="workflow file not found"):
        load_workflow(tmp_path / "nope.yaml")
    with pytest.raises(WorkflowError, match="empty"):
        load_workflow(write_spec(study, ""))
    with pytest.raises(WorkflowError, match="mapping of keys"):
        load_workflow(write_spec(study, "- a\n- b\n"))
    with pytest.raises(WorkflowError, match="not valid YAML at line 2"):
        load_workflow(write_spec(study, "study: x\n  manifest: : [\n"))


def test_settings_hash_is_stable_and_tracks_changes(study):
    a = load_workflow(write_spec(study, BASE))
    b = load_workflow(write_spec(study, BASE))
    assert a.settings_hash("qc", "compensation") == b.settings_hash("qc", "compensation")
    c = load_workflow(write_spec(study, BASE + "qc: {time: {mad: 5}}\n"))
    assert c.settings_hash("qc") != a.settings_hash("qc")
    assert c.settings_hash("compensation") == a.settings_hash("compensation")


def test_workflow_from_command_line_options(study, monkeypatch):
    monkeypatch.chdir(study)
    wf = workflow_from_options("data/manifest.csv", "gating/t.yaml", "out", clinical="data/clinical.csv")
    assert wf.manifest == (study / "data" / "manifest.csv").resolve()
    assert wf.output == (study / "out").resolve()
    assert wf.study == "data" and wf.spec_path is None
    with pytest.raises(WorkflowError) as info:
        workflow_from_options("data/none.csv", "gating/t.yaml", "out")
    assert info.value.context["key"] == "manifest"
    # no workflow file here: the message points at the current folder, not at a "workflow file"
    assert f"relative paths are taken from the current folder {study}" in str(info.value)
    assert "workflow file" not in str(info.value)


def test_every_setting_is_in_the_user_documentation():
    text = (REPO / "docs" / "pipeline.md").read_text()
    missing = [key for key, _, _ in describe_schema() if f"`{key}`" not in text]
    assert not missing, f"docs/pipeline.md does not document {missing}"


def test_the_example_workflow_is_valid():
    wf = load_workflow(REPO / "workflows" / "sle_il2.yaml")
    assert wf.manifest == (REPO / "sample_data" / "manifest.csv").resolve()
    assert wf.template == (REPO / "gating" / "sle_il2_tcell_nk.yaml").resolve()
    assert wf.output == (REPO / "runs" / "sle_il2").resolve()


def test_every_mistake_of_a_workflow_is_reported_at_once(study):
    text = BASE + (
        "seeed: 3\n"  # unknown key
        "workers: -1\n"  # not a positive integer
        "transforms: {cofactor: 0}\n"  # a divisor of 0 used to be replaced by 150 silently
        "clustering: {grid: five}\n"
        "report: {max_galery: 10}\n"
    )
    with pytest.raises(WorkflowError) as info:
        load_workflow(write_spec(study, text))
    message = str(info.value)
    assert "5 problems" in message
    for key, words in [
        ("seeed", "did you mean 'seed'"),
        ("workers", "positive integer"),
        ("transforms.cofactor", "greater than 0"),
        ("clustering.grid", "list"),
        ("report.max_galery", "did you mean 'max_gallery'"),
    ]:
        line = next(ln for ln in message.splitlines() if ln.strip().startswith(f"- {key}:"))
        assert words in line, line


def test_a_zero_arcsinh_cofactor_is_refused_not_replaced(study):
    with pytest.raises(WorkflowError, match="greater than 0") as info:
        load_workflow(write_spec(study, BASE + "transforms: {cofactor: 0}\n"))
    assert info.value.context["key"] == "transforms.cofactor"
    assert (
        load_workflow(write_spec(study, BASE + "transforms: {cofactor: 5}\n")).transforms["cofactor"] == 5.0
    )


def test_max_gallery_is_defined_once():
    """The gallery size has one default (cytopipe.config.MAX_GALLERY): the workflow schema, the
    report's functions and no literal elsewhere."""
    import inspect
    import re

    from cytopipe.config import MAX_GALLERY
    from cytopipe.report import write_report
    from cytopipe.report.build import _build_report
    from cytopipe.report.sections import Builder
    from cytopipe.workflow import REPORT
    from tests.conftest import REPO

    assert MAX_GALLERY == 36  # the documented default (docs/pipeline.md, docs/reports.md)
    assert REPORT["max_gallery"].default == MAX_GALLERY
    for fn in (write_report, _build_report, Builder.__init__):
        assert inspect.signature(fn).parameters["max_gallery"].default == MAX_GALLERY
    literal = re.compile(r"max_gallery[^\n]*\b36\b")
    found = [
        str(p.relative_to(REPO))
        for p in (REPO / "cytopipe").rglob("*.py")
        if literal.search(p.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_a_negative_seed_on_the_command_line_is_a_usage_error(study, tmp_path):
    """`cytopipe run --seed -1` (and `cytopipe simulate --seed -1`) stop before any work with exit 2;
    they used to fail every sample (run) or crash with a traceback (simulate)."""
    from tests.pipeline_support import cli

    spec = write_spec(study, BASE)
    proc = cli("run", str(spec), "--seed", "-1", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "argument --seed: must be an integer >= 0, not -1" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = cli("simulate", "--out", str(tmp_path / "sim"), "--patients", "1", "--seed", "-1")
    assert proc.returncode == 2, proc.stderr
    assert "argument --seed: must be an integer >= 0, not -1" in proc.stderr
    assert not (tmp_path / "sim").exists()
