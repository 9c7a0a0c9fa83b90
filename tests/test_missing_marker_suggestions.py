"""A marker in no file: the channel suggested for it (a ready-to-paste `panel:` line) is never one
whose stain label names another marker, nor one another marker of the template uses; with nothing
safe to suggest the message says so and lists the file(s)' channels (docs/gating.md, §5b).

The suggestion was by string similarity alone: on these real files it proposed `PD-1: Pd102Di` (a
CyTOF barcode channel, $PnS BC1), `CD56: V585-A` ($PnS CD57), `CD4: PE-CY7-A` ($PnS CD14) and on
OMIP-021's Donor1 `CD16: 540/30Violet-A` and `CD56: 540/30Violet-A` ($PnS "BV605 - CD161")."""

from __future__ import annotations

import re

import pytest

from cytopipe.cli import main
from cytopipe.fcs import read_fcs_header
from cytopipe.gating import load_template
from cytopipe.gating.check import marker_table, missing_everywhere
from cytopipe.panel import label_names_marker
from tests.conftest import REPO, shared_path

TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"
CYTOF_TEMPLATE = REPO / "gating" / "sle_il2_cytof.yaml"
PLACEHOLDER = "<$PnN of the channel>"

CASES = [  # (file, template, marker, the channel it was wrongly given)
    (
        ("CytoNorm", "inst", "extdata", "Gates_PTLG021_Unstim_Control_1.fcs"),
        CYTOF_TEMPLATE,
        "PD-1",
        "Pd102Di",
    ),
    (("FlowKit", "data", "100715.fcs"), TEMPLATE, "CD56", "V585-A"),
    (("flowWorkspaceData", "inst", "extdata", "a2004_O1T2pb05i_A2_A02.fcs"), TEMPLATE, "CD4", "PE-CY7-A"),
    (("CytoPipeline", "inst", "extdata", "Donor1.fcs"), TEMPLATE, "CD16", "540/30Violet-A"),
    (("CytoPipeline", "inst", "extdata", "Donor1.fcs"), TEMPLATE, "CD56", "540/30Violet-A"),
]


def _normal(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(("parts", "template", "marker", "wrong"), CASES)
def test_no_channel_naming_another_marker_is_suggested(parts, template, marker, wrong, capsys):
    path = shared_path(*parts)
    rc = main(["template", "check", str(path), "--template", str(template)])
    text = capsys.readouterr().out
    assert rc == 3
    assert f"panel:\n  {marker}: {wrong}" not in text
    report = next(p for p in text.split("\n\n") if p.startswith(f"marker {marker!r} is in none"))
    assert f"no channel to suggest: no channel's stain label ($PnS) names {marker}" in report
    assert report.endswith(f"panel:\n  {marker}: {PLACEHOLDER}")
    # the channels to choose from, with their labels, once below the missing markers
    header = read_fcs_header(path)
    listed = [
        line for line in text.splitlines() if line.startswith("channels of the file(s) ($PnN [$PnS]): ")
    ]
    assert len(listed) == 1
    for pnn, pns in zip(header.channels["pnn"], header.channels["pns"]):
        assert (f"{pnn} [{pns}]" if str(pns).strip() else str(pnn)) in listed[0]


@pytest.mark.parametrize(("parts", "template"), sorted({(c[0], c[1]) for c in CASES}))
def test_every_suggestion_names_the_marker_and_an_unused_channel(parts, template):
    """Whatever the message (gate, run, template check), each suggested channel's label names the
    marker itself, and no marker of the template resolved to it."""
    path = shared_path(*parts)
    tables = {str(path): read_fcs_header(path).channels}
    table = marker_table(load_template(template), tables)
    used = {c for row in table.resolved.values() for c in row.values() if c}
    missing = missing_everywhere(load_template(template), table)
    assert missing
    pns = dict(table.pairs[str(path)])
    for m in missing:
        for label in m.closest + m.unlabelled:
            pnn = label.split(" [")[0]
            assert pnn not in used
            assert label_names_marker(pns[pnn], m.marker) is not False, (m.marker, label)


def test_a_label_naming_the_marker_is_still_suggested(tmp_path, capsys):
    """A spelling the alias table lacks (`anti-hCD56`) is the marker: suggested, ready to paste;
    the similar CD57 beside it is not."""
    header = read_fcs_header(shared_path("FlowKit", "data", "100715.fcs"))
    channels = header.channels.copy()
    channels.loc[channels["pnn"] == "V800-A", "pns"] = "anti-hCD56 BV786"  # was CD8
    table = marker_table(load_template(TEMPLATE), {"100715.fcs": channels})
    cd56 = next(m for m in missing_everywhere(load_template(TEMPLATE), table) if m.marker == "CD56")
    assert cd56.closest == ["V800-A [anti-hCD56 BV786]"]
    assert cd56.message().endswith("panel:\n  CD56: V800-A")


@pytest.mark.parametrize(
    ("label", "marker", "names"),
    [
        ("PD1", "PD-1", True),
        ("CD279 (PD-1)", "PD-1", True),
        ("FoxP3", "FOXP3", True),
        ("anti-hCD25 PE", "CD25", True),
        ("BC1", "PD-1", False),
        ("CD14", "CD4", False),
        ("CD57", "CD56", False),
        ("BV605 - CD161", "CD16", False),
        ("CD45RO", "CD45RA", False),
        ("CD8b", "CD8", False),
        ("EMPTY", "CD25", None),
        ("", "CD25", None),
        ("176Yb", "CD25", None),
    ],
)
def test_label_names_marker(label, marker, names):
    assert label_names_marker(label, marker) is names


def test_cytopipe_gate_stops_without_a_wrong_suggestion(tmp_path, capsys):
    path = shared_path(*CASES[0][0])
    rc = main(["gate", str(path), "--template", str(CYTOF_TEMPLATE), "--out", str(tmp_path / "g"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Pd102Di [BC1]" in err  # in the channel list, to choose from
    assert "PD-1: Pd102Di" not in err and f"panel:\n  PD-1: {PLACEHOLDER}" in err
    assert err.count("channels of the file(s) ($PnN [$PnS]): ") == 1


def test_the_worked_example_of_docs_gating_is_what_the_check_prints(monkeypatch, capsys):
    """docs/gating.md §5b: every part of the example (between its `...`) is in the real output,
    run as written from the repository root."""
    doc = (REPO / "docs" / "gating.md").read_text(encoding="utf-8")
    block = re.search(r"```\n\$ cytopipe template check (\S+) --template (\S+)\n(.*?)```", doc, re.S)
    assert block is not None
    shared_path(*block.group(1).split("/")[3:])  # skips (fails in CI) without the shared data
    monkeypatch.chdir(REPO)
    rc = main(["template", "check", block.group(1), "--template", block.group(2)])
    out = _normal(capsys.readouterr().out)
    assert rc == 3
    for paragraph in block.group(3).split("\n\n"):
        lines = paragraph.splitlines() if paragraph.startswith("file ") else [paragraph]
        for line in lines:
            for piece in line.split("..."):
                assert _normal(piece).strip(" ,;") in out, piece
