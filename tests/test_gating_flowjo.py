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


WORKSPACES_8 = [
    "8_color_ICS.wsp",
    "8_color_ICS_boolean_gate_testing.wsp",
    "8_color_ICS_dot_gate_name.wsp",
    "8_color_ICS_sample_without_gates.wsp",
    "8_color_ICS_simple.wsp",
    "8_color_ICS_with_ellipse.wsp",
    "reused_quad_gate_with_child.wsp",
]


def _counts_table(wsp: str) -> pd.DataFrame:
    name = f"data_8_color_data_set_{wsp}.tsv"
    return pd.read_csv(shared_path("FlowKit", "_derived", "flowjo_counts", name), sep="\t")


@pytest.mark.parametrize("wsp", WORKSPACES_8)
def test_every_population_flowkit_lists_is_imported(wsp):
    """All 7 8-colour workspaces: per sample, the populations are exactly the full paths FlowJo stored
    (and that FlowKit lists, where FlowKit can read the workspace), display names are unique, and the
    reused quadrant's two `some_child_gate` populations are both kept."""
    import flowkit as fk

    from cytopipe.gating.flowjo import FlowJoWorkspace

    path = shared_path("FlowKit", "data", "8_color_data_set", wsp)
    ws = FlowJoWorkspace(path)
    try:
        peer = fk.Workspace(str(path), load_missing_file_data=True)
    except Exception:  # FlowKit refuses the '.' gate name; the stored counts are the reference
        assert wsp == "8_color_ICS_dot_gate_name.wsp"
        peer = None
    stored = _counts_table(wsp)
    for s in ws.samples:
        t = ws.template(s.name)
        paths = [t.path_of(n) for n in t.names]
        assert len(set(paths)) == len(paths) == len(t)
        expected = set(stored.loc[stored["sample"].str.endswith(s.name), "population_path"]) - {"root"}
        assert set(paths) == expected
        if peer is not None:
            ids = peer.get_gating_strategy(s.name).get_gate_ids()
            assert {"/" + "/".join((*p[1:], n)) for n, p in ids} == set(paths)
        for name in t.names:  # short display names: the gate name itself unless it repeats
            assert name == t.path_of(name).rsplit("/", 1)[-1] or name.count("/") >= 1
    if wsp == "reused_quad_gate_with_child.wsp":
        assert len(t) == 13
        cd4 = t["cd4+/Q2: CD107a+, IL2+/some_child_gate"]
        cd8 = t["cd8+/Q2: CD107a+, IL2+/some_child_gate"]
        assert cd4.path == "/good cells/cd4+/Q2: CD107a+, IL2+/some_child_gate"
        assert cd4.parent == "cd4+/Q2: CD107a+, IL2+" and cd8.parent == "cd8+/Q2: CD107a+, IL2+"
    if wsp == "8_color_ICS_dot_gate_name.wsp":  # imported under its own name
        assert t["."].path == "/Time/Singlets/aAmine-/CD3+/CD4+/." and t["."].parent == "CD4+"


def test_duplicate_full_path_is_an_error_naming_it(tmp_path):
    """Two sibling populations with the same name (hand-edited XML) would share a path: refused."""
    src = shared_path("FlowKit", "data", "8_color_data_set", "8_color_ICS_simple.wsp").read_text()
    text = src.replace('name="aAmine-"', 'name="Singlets"')  # a child named like its parent
    bad = tmp_path / "dup.wsp"
    bad.write_text(text)
    from cytopipe.gating.flowjo import FlowJoWorkspace

    # the renamed node is a child of Singlets (path /Time/Singlets/Singlets): legal, distinct paths
    t = FlowJoWorkspace(bad).template()
    assert "/Time/Singlets/Singlets" in {p.path for p in t}
    assert {"Time/Singlets", "Singlets/Singlets"} <= set(t.names)
    assert t["CD3+"].parent == "Singlets/Singlets"
    # now a true duplicate: two sibling <Population name="CD3+"> under the same parent
    import re

    at = src.index("<SampleList")  # the samples' trees, not the group templates before them
    m = re.compile(r'(<Population name="CD3\+".*?</Population>)', re.S).search(src, at)
    dup = src[: m.end()] + m.group(1) + src[m.end() :]
    bad.write_text(dup)
    with pytest.raises(TemplateError, match=r"same full path '/Time/Singlets/aAmine-/CD3\+'"):
        FlowJoWorkspace(bad)


def test_flowkit_failures_are_template_errors_naming_workspace_sample_and_gate(tmp_path):
    """A gate FlowKit cannot convert (an unknown FlowJo transform here) becomes a TemplateError that
    names the workspace, the sample and its sample group, never FlowKit's own exception."""
    src = shared_path("FlowKit", "data", "8_color_data_set", "8_color_ICS_simple.wsp").read_text()
    bad = tmp_path / "bad_transform.wsp"
    bad.write_text(src.replace("transforms:logicle", "transforms:miracle"))
    with pytest.raises(TemplateError, match="FlowKit cannot read the workspace: ValueError") as info:
        cytopipe.load_template(bad)
    assert "bad_transform.wsp" in str(info.value)
    # a boolean gate whose operand is not in the workspace: names sample, group and gate path
    import re

    src = shared_path(
        "FlowKit", "data", "8_color_data_set", "8_color_ICS_boolean_gate_testing.wsp"
    ).read_text()
    m = re.compile(r'<Dependent name="[^"]*"').search(src, src.index("<SampleList"))
    bad = tmp_path / "bad_bool.wsp"
    bad.write_text(src[: m.start()] + '<Dependent name="Time/Nowhere"' + src[m.end() :])
    with pytest.raises(TemplateError) as info:
        read_flowjo_workspace(bad, sample="101_DEN084Y5_15_E03_009_clean.fcs")
    msg = str(info.value)
    assert "bad_bool.wsp" in msg and "sample group 'DEN'" in msg and "101_DEN084Y5_15_E03_009" in msg
    assert "gate '/Time/Singlets/aAmine-/CD3+/CD4+/CD107a+ or IFNg+'" in msg and "'Time/Nowhere'" in msg


def test_flowjo9_workspace_is_refused_with_what_was_not_imported():
    path = shared_path("flowWorkspaceData", "inst", "extdata", "A2004Analysis.xml")
    with pytest.raises(TemplateError, match=r"FlowJo 9.2 workspace.*Not imported: gates, transforms"):
        read_flowjo_workspace(path)


def test_flowjo9_workspace_through_load_template_is_named():
    """A FlowJo 9 workspace has the .xml suffix of Gating-ML: load_template still says what it is."""
    path = shared_path("flowWorkspaceData", "inst", "extdata", "A2004Analysis.xml")
    with pytest.raises(TemplateError, match="FlowJo 9.2 workspace"):
        cytopipe.load_template(path)
