"""FlowJo 10 workspace import: gates read by FlowKit's parser, applied by cytopipe's engine,
must reproduce the counts FlowJo stored in the workspace."""

from __future__ import annotations

import pandas as pd
import pytest

import cytopipe
from cytopipe.errors import TemplateError
from cytopipe.gating.flowjo import read_flowjo_workspace
from tests.conftest import shared_path

CASES = [  # (workspace, FCS file); FlowJo's counts are in _derived/flowjo_counts/
    (
        "simple_diamond_example/simple_diamond_example_quad_gate.wsp",
        "simple_diamond_example/test_data_diamond_01.fcs",
    ),
    (
        "simple_diamond_example/test_data_diamond_asinh_rect.wsp",
        "simple_diamond_example/test_data_diamond_01.fcs",
    ),
    (
        "simple_diamond_example/test_data_diamond_asinh_rect2.wsp",
        "simple_diamond_example/test_data_diamond_01.fcs",
    ),
    (
        "simple_diamond_example/test_data_diamond_biex_rect.wsp",
        "simple_diamond_example/test_data_diamond_01.fcs",
    ),
    ("simple_line_example/single_ellipse_51_events.wsp", "simple_line_example/data_set_simple_line_100.fcs"),
]


@pytest.mark.parametrize(("wsp", "fcs"), CASES, ids=[w.split("/")[1] for w, _ in CASES])
def test_flowjo_counts_reproduced(wsp, fcs):
    template = cytopipe.load_template(shared_path("FlowKit", "data", *wsp.split("/")))
    sample = cytopipe.read_fcs(shared_path("FlowKit", "data", *fcs.split("/")), preprocess=True)
    result = cytopipe.gate(sample, template, medians=False)
    counts_file = "data_" + wsp.replace("/", "_") + ".tsv"
    counts = pd.read_csv(shared_path("FlowKit", "_derived", "flowjo_counts", counts_file), sep="\t")
    checked = 0
    for row in counts.itertuples():
        if row.population_path == "root" or row.count < 0:  # -1: FlowJo did not compute it
            continue
        name = row.population_path.split("/")[-1]
        assert result.populations[name].count == row.count, name
        checked += 1
    assert checked >= 1


def test_flowjo_workspace_hierarchy_and_duplicate_names():
    """The 8-colour ICS workspace (its FCS files are not in the data set): the hierarchy is read,
    repeated gate names are qualified by their parent, compensation and biex transforms come along."""
    t = read_flowjo_workspace(shared_path("FlowKit", "data", "8_color_data_set", "8_color_ICS.wsp"))
    assert t["Singlets"].parent == "Time" and t["CD3+"].parent == "aAmine-"
    assert t["CD4+/IFNg+"].parent == "CD4+" and t["CD8+/IFNg+"].parent == "CD8+"
    assert "IFNg+" not in t.names
    assert t.matrices, "the workspace's compensation matrix is imported"
    assert {spec["type"] for spec in t.transforms.values()} & {"biex", "linear", "fasinh", "logicle"}


def test_unknown_sample_is_a_clear_error():
    wsp = shared_path("FlowKit", "data", "simple_line_example", "single_ellipse_51_events.wsp")
    with pytest.raises(TemplateError, match="no sample 'nope.fcs'"):
        read_flowjo_workspace(wsp, sample="nope.fcs")
