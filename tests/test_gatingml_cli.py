"""`cytopipe gate` and `cytopipe run` with a Gating-ML template: the compliance counts.

Gating-ML 2.0 gates are defined on preprocessed FCS values ($PnE log decoding, $PnG gain,
$TIMESTEP), as FlowKit and FlowJo read files. The command line reads the files the way the
template's gates expect (cytopipe.gating.loading.read_sample / preprocess_for), so the all-gates
compliance document gives every gate's truth count on data1.fcs, as tests/test_gatingml.py does in
Python. (Before: the raw channel values were gated, 48 of 49 counts wrong, exit 0, no warning.)
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

import cytopipe
from cytopipe.cli import main
from cytopipe.gating import read_gatingml
from tests.conftest import shared_path

GATE_REF = ("FlowKit", "data", "gate_ref")
TRUTH_ALIASES = {"ParRectangle1": "ParQuadRect"}  # as tests/test_gatingml.py


def _truth_counts() -> dict[str, int]:
    """Population -> its truth count, for every gate of gml_all_gates.xml with a truth vector."""
    truth_dir = shared_path(*GATE_REF, "truth")
    out = {}
    for name in read_gatingml(shared_path(*GATE_REF, "gml", "gml_all_gates.xml")).names:
        f = truth_dir / f"Results_{TRUTH_ALIASES.get(name, name)}.txt"
        if f.exists():
            out[name] = int(np.loadtxt(f).astype(bool).sum())
    return out


def _assert_truth(stats: pd.DataFrame) -> None:
    truth = _truth_counts()
    assert len(truth) == 49
    got = dict(zip(stats["population"], stats["count"].astype(int)))
    wrong = {n: (got.get(n), t) for n, t in truth.items() if got.get(n) != t}
    assert not wrong, f"{len(wrong)} of {len(truth)} gates differ (got, truth): {wrong}"


def test_gate_cli_with_gatingml_template_gives_the_truth_counts(tmp_path, capsys):
    out = tmp_path / "gml_all"
    rc = main(
        [
            "gate",
            str(shared_path(*GATE_REF, "data1.fcs")),
            "--template",
            str(shared_path(*GATE_REF, "gml", "gml_all_gates.xml")),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    _assert_truth(pd.read_parquet(out / "population_stats.parquet"))
    assert "usual FCS preprocessing" in err and "Gating-ML" in err  # said, not silent


def test_run_with_gatingml_template_gives_the_truth_counts(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        f"file,sample_id,patient_id,visit,arm\n{shared_path(*GATE_REF, 'data1.fcs')},data1,P1,0,A\n"
    )
    (tmp_path / "wf.yaml").write_text(
        "study: gml\nmanifest: manifest.csv\n"
        f"template: {shared_path(*GATE_REF, 'gml', 'gml_all_gates.xml')}\noutput: out\n"
        # the truth vectors count every event: no event QC
        "qc: {margins: {enabled: false}, time: {enabled: false}}\n"
        "clustering: {enabled: false}\nstatistics: {enabled: false}\nreport: {enabled: false}\n"
    )
    rc = main(["run", str(tmp_path / "wf.yaml"), "--scheduler", "synchronous", "--no-progress"])
    assert rc == 0
    out = tmp_path / "out"
    _assert_truth(pd.read_parquet(out / "population_stats.parquet"))
    note = json.loads((out / "run.json").read_text())["study_state"]["fcs_preprocessing"]
    assert note and "Gating-ML" in note
    assert "usual FCS preprocessing" in (out / "run.log").read_text()
    # an FCS export holds the file's raw values (its keywords describe those), not the gated ones
    exp = tmp_path / "exp"
    rc = main(["export", "fcs", str(out), "--population", "Range1", "--out", str(exp), "--scheduler", "synchronous",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    raw = cytopipe.read_fcs(shared_path(*GATE_REF, "data1.fcs"))
    inside = np.loadtxt(shared_path(*GATE_REF, "truth", "Results_Range1.txt")).astype(bool)
    assert np.array_equal(cytopipe.read_fcs(exp / "data1.fcs").events, raw.events[inside])


def test_gatingml_template_on_raw_values_warns(caplog):
    """In Python, gating raw values of a log-encoded file with Gating-ML gates is said loudly."""
    template = read_gatingml(shared_path(*GATE_REF, "gml", "gml_range_gate.xml"))
    assert template.preprocess
    raw = cytopipe.read_fcs(shared_path(*GATE_REF, "data1.fcs"))
    with caplog.at_level(logging.WARNING, logger="cytopipe"):
        cytopipe.gate(raw, template, medians=False)
    assert "read_fcs(path, preprocess=True)" in caplog.text and "$P3E 4,0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cytopipe"):
        cytopipe.gate(cytopipe.read_fcs(shared_path(*GATE_REF, "data1.fcs"), preprocess=True), template)
    assert "preprocess" not in caplog.text


def test_yaml_templates_keep_raw_values():
    """cytopipe's own templates are drawn on raw values: no preprocessing (the sample study's
    tables stay as recorded, tests/test_output_hashes.py)."""
    from cytopipe.gating import load_template
    from cytopipe.gating.loading import preprocessing_note
    from tests.pipeline_support import TEMPLATE

    template = load_template(TEMPLATE)
    assert not template.preprocess and preprocessing_note(template) is None
