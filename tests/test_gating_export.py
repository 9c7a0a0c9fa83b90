"""Export: fitted gates as Gating-ML 2.0 that FlowKit re-applies identically; population FCS."""

from __future__ import annotations

import numpy as np
import pytest

import cytopipe
from cytopipe.gating import gate, parse_template, read_gatingml
from cytopipe.gating.export import gatingml_ids, write_gatingml, write_population_fcs
from tests.conftest import shared_path

ACTIVATION = ("CytoExploreRData", "inst", "extdata", "Activation")

# Every gate type, fixed and data-driven, on a real file (mouse T-cell activation; the file
# carries no $PnS markers, so the template maps markers to channels with `panel:`).
MIXED_TEMPLATE = {
    "name": "export test",
    "compensation": "file",
    "panel": {
        "CD4": "Alexa Fluor 700-A",
        "CD8": "Alexa Fluor 488-A",
        "CD69": "7-AAD-A",
        "CD44": "Alexa Fluor 647-A",
        "Hoechst": "Alexa Fluor 405-A",
    },
    "transforms": {
        "default": {"type": "arcsinh", "cofactor": 150},
        "CD4": {"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0},
    },
    "populations": [
        {
            "name": "Cells",
            "parent": "root",
            "markers": ["FSC-A", "SSC-A"],
            "gate": {
                "type": "polygon",
                "vertices": [
                    [40000, 88000],
                    [30000, 32000],
                    [52000, -2300],
                    [202720, 27176],
                    [248663, 98070],
                    [225401, 202844],
                    [112577, 212255],
                ],
            },
        },
        {
            "name": "Singlets",
            "parent": "Cells",
            "markers": ["FSC-A", "FSC-H"],
            "gate": {"type": "singlets", "default": [0.8, 1.5]},
        },
        {"name": "Dead", "parent": "Singlets", "markers": ["Hoechst"], "gate": {"type": "range", "min": 4.0}},
        {"name": "Live", "parent": "Singlets", "gate": {"type": "boolean", "not": "Dead"}},
        {
            "name": "T",
            "parent": "Live",
            "markers": ["CD4", "CD8"],
            "gate": {"type": "ellipse", "center": [0.5, 4], "half_axes": [0.3, 2], "angle": 20},
        },
        {
            "name": "CD4 T",
            "parent": "Live",
            "markers": ["CD4", "CD8"],
            "gate": {
                "type": "quadrant",
                "quadrant": "+-",
                "thresholds": [{"type": "quantile", "q": 0.6}, {"type": "tail", "default": 3.0}],
            },
        },
        {
            "name": "CD44hi",
            "parent": "CD4 T",
            "markers": ["CD44"],
            "gate": {"type": "hi", "z": 2, "default": 5.0},
        },
        {
            "name": "CD69 cluster",
            "parent": "Live",
            "markers": ["CD69", "CD44"],
            "gate": {"type": "gmm", "components": 2, "select": {"CD44": "highest"}},
        },
        {
            "name": "T not cluster",
            "parent": "Live",
            "gate": {"type": "boolean", "and": ["T", "not CD69 cluster"]},
        },
        {
            "name": "Rect",
            "parent": "Live",
            "markers": ["CD8", "CD69"],
            "gate": {"type": "rectangle", "min": [2, None], "max": [6, 5]},
        },
    ],
}


def _flowkit_memberships(gml, fcs_path, names):
    """FlowKit's memberships for our populations (gate ids are the sanitized names)."""
    import flowkit as fk

    ids = gatingml_ids(names)
    sample = fk.Sample(str(fcs_path))
    session = fk.Session(gating_strategy=str(gml), fcs_samples=[sample])
    session.analyze_samples(use_mp=False)
    return {n: session.get_gate_membership(sample.id, ids[n]) for n in names}


def _schema_valid(gml) -> None:
    """The document validates against the Gating-ML 2.0 XML schema (shipped with FlowKit)."""
    from flowkit._resources import gml_schema
    from lxml import etree

    doc = etree.parse(str(gml))
    assert gml_schema.validate(doc), gml_schema.error_log


def test_gatingml_export_reapplied_by_flowkit(tmp_path):
    fcs_path = shared_path(*ACTIVATION, "Activation_32.fcs")
    sample = cytopipe.read_fcs(fcs_path)
    template = parse_template(MIXED_TEMPLATE)
    result = gate(sample, template)
    assert {p.source for p in result.populations.values()} >= {"fixed", "fitted", "boolean"}

    gml = write_gatingml(result, tmp_path / "gates.xml")
    _schema_valid(gml)
    theirs = _flowkit_memberships(gml, fcs_path, template.names)
    for name in template.names:
        mine = result.mask(name)
        assert mine.sum() > 0, name
        assert np.array_equal(theirs[name], mine), f"{name}: {np.sum(theirs[name] != mine)} events differ"

    # the exported document is also a cytopipe template (names restored) giving the same result
    imported = read_gatingml(gml)
    assert imported.names == template.names
    again = cytopipe.gate(sample, imported)
    for name in template.names:
        assert np.array_equal(again.mask(name), result.mask(name)), name


def test_population_fcs_export_keeps_markers_and_spillover(tmp_path):
    fcs_path = shared_path(*ACTIVATION, "Activation_1.fcs")
    sample = cytopipe.read_fcs(fcs_path)
    result = gate(sample, parse_template(MIXED_TEMPLATE))
    out = write_population_fcs(tmp_path / "cd4.fcs", sample, result, "CD4 T")
    back = cytopipe.read_fcs(out)
    idx = result.indices("CD4 T")
    assert back.n_events == len(idx) == result.populations["CD4 T"].count > 0
    np.testing.assert_array_equal(back.events, sample.events[idx])
    assert list(back.channels["pnn"]) == list(sample.channels["pnn"])
    assert list(back.channels["pns"]) == list(sample.channels["pns"])
    np.testing.assert_allclose(back.spillover.matrix, sample.spillover.matrix)
    assert back.keywords["CYTOPIPE_POPULATION"] == "CD4 T"
    # the gates as applied (fitted ones made fixed) keep every exported event in CD4 T
    assert gate(back, result.fitted_template()).populations["CD4 T"].count == back.n_events


def test_population_fcs_export_rejects_a_foreign_result(tmp_path):
    import dataclasses

    a = cytopipe.read_fcs(shared_path(*ACTIVATION, "Activation_1.fcs"))
    result = gate(a, parse_template(MIXED_TEMPLATE))
    b = dataclasses.replace(a, events=a.events[:1000])
    with pytest.raises(cytopipe.errors.GatingError, match="events"):
        write_population_fcs(tmp_path / "x.fcs", b, result, "Live")


def test_canonical_template_export_reapplied_by_flowkit(tmp_path):
    """The canonical template's fitted gates on sample data, re-applied by FlowKit."""
    from tests.conftest import REPO

    template = cytopipe.load_template(REPO / "gating" / "sle_il2_tcell_nk.yaml")
    for fcs_path in sorted((REPO / "sample_data" / "fcs").glob("P00[12]_W*.fcs"))[:3]:
        sample = cytopipe.read_fcs(fcs_path)
        result = gate(sample, template)
        gml = write_gatingml(result, tmp_path / f"{fcs_path.stem}.xml")
        _schema_valid(gml)
        theirs = _flowkit_memberships(gml, fcs_path, template.names)
        for name in template.names:
            mine = result.mask(name)
            assert np.array_equal(theirs[name], mine), (
                f"{fcs_path.name} {name}: {np.sum(theirs[name] != mine)} differ"
            )
