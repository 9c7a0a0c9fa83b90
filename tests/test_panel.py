"""Panel resolution: marker -> $PnN through aliases, spellings and explicit mappings.

Uses the $PnS texts of real files in ../shared/data (read with cytopipe.read_fcs, or taken from the
catalog's channel inventory for files that are not shipped) and the simulator's site spellings.
"""

from __future__ import annotations

import csv

import pandas as pd
import pytest

import cytopipe
from cytopipe.errors import PanelError
from cytopipe.panel import Panel, canonical_marker, channel_markers, normalize, resolve_markers
from cytopipe.simulate import params as P
from tests.conftest import shared_path

TEMPLATE_MARKERS = ["CD3", "CD4", "CD8", "CD25", "CD127", "FOXP3", "CD45RA", "CXCR3", "CCR6", "CXCR5", "PD-1"]
TEMPLATE_MARKERS += ["CD56", "CD16", "Viability"]


def inventory_channels(name_part: str) -> list[tuple[str, str]]:
    """(pnn, pns) pairs of a file listed in the catalog's FCS_CHANNELS.tsv (real $PnS texts)."""
    path = shared_path("_inventory", "FCS_CHANNELS.tsv")
    with open(path, encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if name_part in row[0]:
                pairs = []
                for item in row[2].split(" | "):
                    if item.endswith("]") and " [" in item:
                        pnn, pns = item[:-1].split(" [", 1)
                    else:
                        pnn, pns = item, ""
                    pairs.append((pnn, pns))
                return pairs
    pytest.skip(f"{name_part} not in the channel inventory")


def test_normalize_and_canonical_names():
    assert normalize("IL-7Ra") == normalize("il7ra") == "il7ra"
    assert normalize(" CD279 (PD-1) ") == "cd279pd1"
    assert canonical_marker("CD279") == "PD-1"
    assert canonical_marker("pd1") == "PD-1"
    assert canonical_marker("Foxp3") == "FOXP3"
    assert canonical_marker("CD183") == "CXCR3"
    assert canonical_marker("CD196") == "CCR6"
    assert canonical_marker("CD185") == "CXCR5"
    assert canonical_marker("IL-7Ra") == "CD127"
    assert canonical_marker("IL-2Ra") == "CD25"
    assert canonical_marker("CD197") == "CCR7"
    assert canonical_marker("NCAM") == "CD56"
    assert canonical_marker("FcγRIII") == "CD16"
    for dye in (
        "Zombie NIR",
        "LIVE/DEAD Aqua",
        "L/D",
        "FVS780",
        "Fixable Viability Dye eFluor 780",
        "7-AAD",
        "DAPI",
    ):
        assert canonical_marker(dye) == "Viability", dye
    assert canonical_marker("MyNewMarker") == "MyNewMarker"


@pytest.mark.parametrize("site", sorted(P.SITE_PNS))
def test_simulator_site_spellings_resolve(site):
    channels = [(c, "") for c in P.SCATTER] + [(d, P.SITE_PNS[site][m]) for d, m in P.FLUOR] + [("Time", "")]
    got = resolve_markers(channels, TEMPLATE_MARKERS + ["FSC-A", "FSC-H", "SSC-A", "Time"])
    expected = {m: d for d, m in P.FLUOR}
    for marker in TEMPLATE_MARKERS:
        assert got[marker] == expected[marker], (site, marker)
    assert got["FSC-A"] == "FSC-A" and got["Time"] == "Time"


@pytest.mark.parametrize(
    "pns, marker",
    [
        ("CD4 BV605", "CD4"),
        ("BV605-CD4", "CD4"),
        ("cd4", "CD4"),
        ("CD279 (PD-1)", "PD-1"),
        ("PD1", "PD-1"),
        ("pd-1", "PD-1"),
        ("FoxP3", "FOXP3"),
        ("Foxp3 APC", "FOXP3"),
        ("CD127_IL-7Ra", "CD127"),
        ("IL7R", "CD127"),
        ("CD25 (IL-2Ra)", "CD25"),
        ("CD56_NCAM", "CD56"),
        ("Zombie Aqua", "Viability"),
        ("LIVE/DEAD Fixable Aqua", "Viability"),
        ("eFluor 780 viability", "Viability"),
        ("FVS 780", "Viability"),
        ("Live_Dead", "Viability"),
    ],
)
def test_spellings(pns, marker):
    channels = [("FSC-A", ""), ("X-A", pns), ("Y-A", "CD19"), ("Z-A", "")]
    assert resolve_markers(channels, [marker]) == {marker: "X-A"}


def test_real_file_flowkit_100715_memory_panel():
    sample = cytopipe.read_fcs(shared_path("FlowKit", "data", "100715.fcs"))
    got = resolve_markers(
        sample, ["CD3", "CD4", "CD8", "CD127", "CCR7", "Ki-67", "Viability", "CD14", "FSC-A", "SSC-A"]
    )
    assert got == {
        "CD3": "R780-A", "CD4": "V655-A", "CD8": "V800-A", "CD127": "G560-A", "CCR7": "G610-A",
        "Ki-67": "B515-A", "Viability": "V450-A", "CD14": "V450-A", "FSC-A": "FSC-A", "SSC-A": "SSC-A",
    }  # fmt: skip


def test_real_file_cytopipeline_fluorochrome_prefixes():
    sample = cytopipe.read_fcs(shared_path("CytoPipeline", "inst", "extdata", "Donor1.fcs"))
    got = resolve_markers(sample, ["Viability", "CD3", "CD4", "CD8", "CD45RA", "CCR7"])
    assert got == {
        "Viability": "525/50Violet-A",  # "L/D Aqua - Viability"
        "CD3": "670/30Violet-A",  # "BV785 - CD3"
        "CD4": "780/60Red-A",  # "APCCy7 - CD4"
        "CD8": "585/15Violet-A",  # "BV650 - CD8a" (not "APC - CD8b")
        "CD45RA": "710/50Blue-A",
        "CCR7": "780/60Yellow-A",  # "PECy7 - CCR7"
    }


def test_real_file_flowsom_blank_pns_and_lowercase_dye():
    sample = cytopipe.read_fcs(shared_path("FlowSOM", "inst", "extdata", "68983.fcs"))
    assert resolve_markers(sample, ["Viability", "CD4", "CD3", "CD8"]) == {
        "Viability": "AmCyan-A", "CD4": "PE-Texas Red-A", "CD3": "PE-Cy7-A", "CD8": "Pacific Blue-A",
    }  # fmt: skip


def test_cytof_names_from_inventory():
    channels = inventory_channels("HuImmProfiling_S1_PBMC_1_07")
    got = resolve_markers(
        channels, ["CD127", "CD25", "CXCR5", "CXCR3", "CCR6", "CD56", "CD8", "CCR7", "Viability"]
    )
    assert got == {
        "CD127": "Yb176Di",  # 176Yb_CD127_IL-7Ra
        "CD25": "Eu153Di",  # 153Eu_CD25_IL-2Ra
        "CXCR5": "Gd158Di",  # 158Gd_CD185_CXCR5
        "CXCR3": "Gd156Di",
        "CCR6": "Pr141Di",
        "CD56": "Dy163Di",  # 163Dy_CD56_NCAM
        "CD8": "Nd146Di",  # 146Nd_CD8a
        "CCR7": "Er167Di",  # 167Er_CD197_CCR7
        "Viability": "Rh103Di",  # 103Rh_Live_Dead
    }
    with pytest.raises(PanelError, match="PD-1"):
        resolve_markers(channels, ["PD-1"], file="HuImmProfiling.fcs")


def test_spectral_names_from_inventory():
    channels = inventory_channels("INF071_Ctrl_Tetramer")
    got = resolve_markers(channels, ["Viability", "PD-1", "CD16", "CD25", "CCR6"])
    assert got == {
        "Viability": "Zombie NIR-A",
        "PD-1": "PE-Vio770-A",
        "CD16": "APC-A",
        "CD25": "PE-Cy5-A",
        "CCR6": "BV786-A",
    }


def test_duplicate_marker_is_ambiguous_and_mapping_fixes_it():
    path = shared_path("cytofkit", "inst", "extdata", "130515_C2_stim_CD19-.fcs")
    sample = cytopipe.read_fcs(path)
    with pytest.raises(PanelError) as info:
        resolve_markers(sample, ["CD3", "CD14"])
    err = info.value
    text = str(err)
    assert err.context["marker"] == "CD14" and "130515_C2_stim_CD19-.fcs" in str(err.context["file"])
    assert "ambiguous" in text and "(Cd112)Di [CD14]" in text and "(Cd114)Di [CD14]" in text
    # what a scientist edits, not Python: the template's panel: section, and the command that checks it
    assert 'template\'s `panel:` section, e.g. `panel: {CD14: "(Cd112)Di"}`' in text
    assert "cytopipe template check FILES --template TEMPLATE" in text and "mapping={" not in text
    assert resolve_markers(sample, ["CD3", "CD14"], mapping={"CD14": "(Cd114)Di"}) == {
        "CD3": "(Sm154)Di",
        "CD14": "(Cd114)Di",
    }


def test_file_without_pns_needs_a_mapping():
    """CytoExploreRData keeps its markers in a CSV, not in $PnS: a mapping from that CSV resolves them."""
    base = shared_path("CytoExploreRData", "inst", "extdata")
    sample = cytopipe.read_fcs(base / "Activation" / "Activation_1.fcs")
    with pytest.raises(PanelError) as info:
        resolve_markers(sample, ["CD4"])
    text = str(info.value)
    assert "Activation_1.fcs" in text and "'CD4'" in text and "Alexa Fluor 700-A" in text
    assert '`panel: {CD4: "<the channel\'s $PnN>"}`' in text and "alias table" not in text
    markers = pd.read_csv(base / "Activation-Experiment-Markers.csv").dropna()
    mapping = dict(zip(markers["Marker"], markers["Channel"]))
    assert resolve_markers(sample, ["CD4", "CD8", "CD69"], mapping=mapping) == {
        "CD4": "Alexa Fluor 700-A",
        "CD8": "Alexa Fluor 488-A",
        "CD69": "7-AAD-A",  # a 7-AAD detector carrying CD69: no viability guess from $PnN
    }


def test_mapping_overrides_aliases_and_is_checked():
    channels = [("BV421-A", "CD25"), ("BV711-A", "PD-1"), ("PE-A", "CD279")]
    # two channels spell PD-1 exactly -> ambiguous unless mapped
    with pytest.raises(PanelError, match="ambiguous"):
        resolve_markers(channels, ["PD-1"])
    assert resolve_markers(channels, ["PD-1"], mapping={"CD279": "PE-A"}) == {"PD-1": "PE-A"}
    assert resolve_markers(channels, ["CD25"], mapping={"CD25": "pe-a"}) == {"CD25": "PE-A"}
    with pytest.raises(PanelError) as info:
        resolve_markers(channels, ["CD25"], mapping={"CD25": "BV999-A"}, file="x.fcs")
    assert "BV999-A" in str(info.value) and "x.fcs" in str(info.value) and "BV421-A [CD25]" in str(info.value)
    assert "the template's `panel:` section (or `mapping=` in Python) sends marker 'CD25'" in str(info.value)


def test_missing_marker_message_names_everything():
    channels = [("FSC-A", ""), ("BV421-A", "CD25 BV421"), ("APC-A", "FOXP3")]
    with pytest.raises(PanelError) as info:
        resolve_markers(channels, ["CD25", "CD127"], file="P001_W00.fcs")
    err = info.value
    assert err.context == {"file": "P001_W00.fcs", "marker": "CD127"}
    text = str(err)
    assert text.startswith("file 'P001_W00.fcs', marker 'CD127':")
    assert "FSC-A, BV421-A [CD25 BV421], APC-A [FOXP3]" in text
    assert '`panel: {CD127: "<the channel\'s $PnN>"}`' in text and "cytopipe template check" in text
    assert "mapping={" not in text and "alias table" not in text


def test_area_channel_wins_over_height_twin():
    channels = [("FL1-A", "CD4"), ("FL1-H", "CD4"), ("FL2-A", "CD8")]
    assert resolve_markers(channels, ["CD4"]) == {"CD4": "FL1-A"}


def test_better_match_wins_and_blank_pns_falls_back_to_pnn():
    # "CD8 APC" (marker + fluorochrome) beats "CD8 B PE" (marker mentioned among other words)
    channels = [("FL2-H", "CD8 B PE"), ("FL4-H", "CD8 APC"), ("CD4", ""), ("FL1-H", "")]
    assert resolve_markers(channels, ["CD8", "CD4", "FL1-H"]) == {
        "CD8": "FL4-H",
        "CD4": "CD4",
        "FL1-H": "FL1-H",
    }


def test_panel_class_resolves_once_and_lists_unresolved(tmp_path):
    from cytopipe.simulate import simulate_trial

    trial = simulate_trial(tmp_path / "t", n_patients=4, visits=(0,), events=500, control_events=200, seed=3)
    panel = Panel(TEMPLATE_MARKERS)
    for row in trial.manifest.itertuples():
        sample = cytopipe.read_fcs(tmp_path / "t" / row.file)
        assert panel.resolve(sample) == {m: d for d, m in P.FLUOR if m in TEMPLATE_MARKERS}
    assert Panel(["CD4", "CD19", "HLA-DR"]).unresolved(sample) == ["CD19", "HLA-DR"]
    cands = panel.candidates("Viability", sample)
    assert cands[0][0] == "BV510-A"


def test_channel_markers_names_each_channel():
    channels = [("FSC-A", ""), ("BV711-A", "CD279 (PD-1)"), ("BV510-A", "Zombie Aqua"), ("X", "mystery")]
    assert channel_markers(channels) == {
        "FSC-A": None,
        "BV711-A": "PD-1",
        "BV510-A": "Viability",
        "X": "mystery",
    }
