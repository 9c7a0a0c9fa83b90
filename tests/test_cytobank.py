"""Cytobank Gating-ML: tailored gates per FCS file, Cytobank's population names and hierarchy.

The document is built here the way Cytobank writes its exports (gates with ``custom_info/cytobank``
name, gate_id and fcs_file_filename; populations as ``and`` gate sets, single-gate ones as
``and(g, g)``) and applied to real FCS files (fcexpr's LSRFortessa files, 500 events each). The
expected counts are computed from the events with numpy, independently of the engine.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

import cytopipe
from cytopipe.gating import read_gatingml
from tests.conftest import shared_path

FILES = (
    "0001_-_vol.50_time.2_polybrene.10_EGF.50_FCS.2_density.16.fcs",
    "0002_-_vol.50_time.2_polybrene.10_EGF.50_FCS.2_density.8.fcs",
    "0003_-_vol.50_time.2_polybrene.10_EGF.50_FCS.2_density.4.fcs",
)
GFP = "b-LP502 530/30-E-A"
# experiment-wide scatter gate, and the copies Cytobank tailored to the first two files
WIDE = (60000.0, 250000.0)
TAILORED = {FILES[0]: (100000.0, 140000.0), FILES[1]: (80000.0, 115000.0)}
SSC = (20000.0, 120000.0)
COFACTOR = 150.0
GFP_MIN = 4.0  # on the arcsinh(x / 150) scale


def _cytobank_doc() -> str:
    def info(name, gate_id, fcs=""):
        return (
            f"<data-type:custom_info><cytobank><name>{name}</name><id>{gate_id}</id><gate_id>{gate_id}</gate_id>"
            f"<type>x</type><version>-1</version><fcs_file_id>{'7' if fcs else ''}</fcs_file_id>"
            f"<tailored>{'true' if fcs else 'false'}</tailored><fcs_file_filename>{fcs}</fcs_file_filename>"
            "</cytobank></data-type:custom_info>"
        )

    def scatter(xml_id, fcs, lo, hi):
        return (
            f'<gating:RectangleGate gating:id="{xml_id}">{info("Cells", 1, fcs)}'
            f'<gating:dimension gating:compensation-ref="uncompensated" gating:min="{lo}" gating:max="{hi}">'
            '<data-type:fcs-dimension data-type:name="FSC-A"/></gating:dimension>'
            f'<gating:dimension gating:compensation-ref="uncompensated" gating:min="{SSC[0]}" gating:max="{SSC[1]}">'
            '<data-type:fcs-dimension data-type:name="SSC-A"/></gating:dimension></gating:RectangleGate>'
        )

    t = COFACTOR * math.sinh(1.0)  # Cytobank's arcsinh(x / cofactor) as Gating-ML fasinh
    m = 1.0 / math.log(10.0)
    gates = [scatter("Gate_1_Q2VsbHM.", "", *WIDE)]
    gates += [scatter(f"Gate_1_t{i}", f, *b) for i, (f, b) in enumerate(TAILORED.items())]
    gates.append(
        f'<gating:RectangleGate gating:id="Gate_2_R0ZQKw..">{info("GFP+", 2)}'
        '<gating:dimension gating:compensation-ref="comp1" gating:transformation-ref="asinh150" '
        f'gating:min="{GFP_MIN}"><data-type:fcs-dimension data-type:name="Comp_{GFP}"/></gating:dimension>'
        "</gating:RectangleGate>"
    )

    def gate_set(xml_id, name, refs):
        r = "".join(f'<gating:gateReference gating:ref="{x}"/>' for x in refs)
        return (
            f'<gating:BooleanGate gating:id="{xml_id}">{info(name, 90 + len(refs))}'
            f"<gating:and>{r}</gating:and></gating:BooleanGate>"
        )

    sets = [
        gate_set("GateSet_1", "Single cells ☑", ["Gate_1_Q2VsbHM.", "Gate_1_Q2VsbHM."]),  # and(g, g)
        gate_set("GateSet_2", "GFP+ cells", ["Gate_1_Q2VsbHM.", "Gate_2_R0ZQKw.."]),
    ]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<gating:Gating-ML xmlns:gating="http://www.isac-net.org/std/Gating-ML/v2.0/gating" '
        'xmlns:transforms="http://www.isac-net.org/std/Gating-ML/v2.0/transformations" '
        'xmlns:data-type="http://www.isac-net.org/std/Gating-ML/v2.0/datatypes">'
        "<data-type:custom_info><cytobank><experiment_number>1</experiment_number></cytobank></data-type:custom_info>"
        # a custom compensation (identity here, so the expected values need none): Cytobank then
        # names the gated channel Comp_<channel>
        '<transforms:spectrumMatrix transforms:id="comp1"><transforms:fluorochromes>'
        f'<data-type:fcs-dimension data-type:name="{GFP}"/><data-type:fcs-dimension data-type:name="FSC-A"/>'
        "</transforms:fluorochromes><transforms:detectors>"
        f'<data-type:fcs-dimension data-type:name="{GFP}"/><data-type:fcs-dimension data-type:name="FSC-A"/>'
        "</transforms:detectors>"
        '<transforms:spectrum><transforms:coefficient transforms:value="1"/><transforms:coefficient transforms:value="0"/>'
        "</transforms:spectrum>"
        '<transforms:spectrum><transforms:coefficient transforms:value="0"/><transforms:coefficient transforms:value="1"/>'
        "</transforms:spectrum></transforms:spectrumMatrix>"
        f'<transforms:transformation transforms:id="asinh150"><transforms:fasinh transforms:T="{t!r}" '
        f'transforms:M="{m!r}" transforms:A="0"/></transforms:transformation>'
        + "".join(gates + sets)
        + "</gating:Gating-ML>"
    )


def _expected(sample, fsc):
    ev = sample.events.astype(np.float64)
    ch = list(sample.channels["pnn"])
    x, y, g = ev[:, ch.index("FSC-A")], ev[:, ch.index("SSC-A")], ev[:, ch.index(GFP)]
    cells = (x >= fsc[0]) & (x < fsc[1]) & (y >= SSC[0]) & (y < SSC[1])
    return int(cells.sum()), int((cells & (np.arcsinh(g / COFACTOR) >= GFP_MIN)).sum())


@pytest.fixture(scope="module")
def files():
    folder = shared_path("fcexpr", "inst", "extdata", "_extracted", "Part_3", "FCS_files", "Exp_part_3")
    return {f: folder / f for f in FILES}


def test_each_file_is_gated_with_its_own_tailored_copy(tmp_path, files, caplog):
    doc = tmp_path / "CytExp_1_Gates_v1.xml"
    doc.write_text(_cytobank_doc(), encoding="utf-8")
    counts = {}
    for name, path in files.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cytopipe.gating.cytobank"):
            template = read_gatingml(doc, fcs_file=path)
        # Cytobank's population names (not XML ids) and its gate sets as the hierarchy
        assert template.names == ["Single cells ☑", "GFP+ cells"]
        assert template["GFP+ cells"].parent == "Single cells ☑"
        assert template.path_of("GFP+ cells") == "/Single cells ☑/GFP+ cells"
        sample = cytopipe.read_fcs(path, preprocess=True)
        result = cytopipe.gate(sample, template, medians=False)
        got = (result.populations["Single cells ☑"].count, result.populations["GFP+ cells"].count)
        assert got == _expected(sample, TAILORED.get(name, WIDE)), name
        counts[name] = got
        warned = [r.getMessage() for r in caplog.records]
        if name in TAILORED:  # its own copy: nothing to warn about
            assert not warned
        else:  # no copy for this file: the experiment-wide gate, and a warning naming file and gate
            assert len(warned) == 1 and name in warned[0] and "'Cells'" in warned[0]
    # the copies matter: each tailored file's counts differ from what the experiment-wide gate gives
    for name in TAILORED:
        sample = cytopipe.read_fcs(files[name], preprocess=True)
        assert counts[name] != _expected(sample, WIDE)


def test_without_a_file_the_experiment_wide_gates_are_used_and_named(tmp_path, caplog):
    doc = tmp_path / "CytExp_1_Gates_v1.xml"
    doc.write_text(_cytobank_doc(), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cytopipe.gating.cytobank"):
        template = cytopipe.load_template(doc)
    assert template.names == ["Single cells ☑", "GFP+ cells"]
    assert template["Single cells ☑"].gate.lower[0] == WIDE[0]
    assert "no FCS file named" in caplog.text and "tailored to 2 other file(s)" in caplog.text
    from lxml import etree

    from cytopipe.gating.cytobank import tailored_files

    assert tailored_files(etree.parse(str(doc)).getroot()) == sorted(TAILORED)


def test_cytopipe_gate_uses_each_files_own_copy(tmp_path, files):
    """`cytopipe gate FILES --template cytobank.xml`: population_stats hold each file's own counts."""
    import pandas as pd

    from cytopipe.cli import main

    doc = tmp_path / "CytExp_1_Gates_v1.xml"
    doc.write_text(_cytobank_doc(), encoding="utf-8")
    out = tmp_path / "out"
    assert (
        main(["gate", *map(str, files.values()), "--template", str(doc), "--out", str(out), "--quiet"]) == 0
    )
    stats = pd.read_parquet(out / "population_stats.parquet").set_index(["sample_id", "population_path"])
    for name, path in files.items():
        expected = _expected(cytopipe.read_fcs(path, preprocess=True), TAILORED.get(name, WIDE))
        sid = path.stem
        got = (
            stats.loc[(sid, "/Single cells ☑"), "count"],
            stats.loc[(sid, "/Single cells ☑/GFP+ cells"), "count"],
        )
        assert got == expected, name
