"""`cytopipe reconcile`: FlowJo's stored counts against cytopipe's on real workspaces and FCS files.

Exact on rectangles and quadrants (unless the parent already differs), polygon and ellipse
differences within 2 events or 0.5 % and explained; FlowKit (the peer) reads the same workspace
and files to cytopipe's counts wherever FlowJo's differ. The reports are left in the pytest
temporary folder (path printed) as artefacts.
"""

from __future__ import annotations

import pandas as pd
import pytest

from cytopipe.cli import main
from cytopipe.gating.reconcile import Tolerance, escape_cell, reconcile, write_report
from tests.conftest import shared_path

FLOWKIT = ("FlowKit", "data")
DIAMOND = [
    "simple_diamond_example_quad_gate.wsp",
    "test_data_diamond_asinh_rect.wsp",
    "test_data_diamond_asinh_rect2.wsp",
    "test_data_diamond_biex_rect.wsp",
]
LINE = ["simple_poly_and_rect.wsp", "single_ellipse_51_events.wsp"]


def _check(table: pd.DataFrame) -> pd.DataFrame:
    """The Done-when rules on one reconciliation table; returns the compared populations."""
    pops = table[(table["population_path"] != "root") & table["flowjo_count"].notna()]
    assert len(pops), "nothing compared"
    own = pops[~pops["reason"].str.contains("the parent .* already differs", regex=True)]
    rect = own[own["gate_type"] == "rectangle"]
    assert (rect["difference"] == 0).all(), rect  # rectangles and quadrants: exact
    shaped = pops[pops["gate_type"].isin(["polygon", "ellipse"])]
    off = shaped["difference"].abs()
    assert ((off <= 2) | (shaped["pct_difference"].abs() <= 0.5)).all(), shaped
    assert pops["within_tolerance"].all() and pops["explained"].all()
    differ = pops[pops["difference"] != 0]
    assert (differ["flowkit_count"] == differ["cytopipe_count"]).all(), differ  # the peer agrees
    return pops


def _run(tmp_path_factory, name, wsp, fcs_dir, *extra):
    out = tmp_path_factory.mktemp("reconcile") / name
    code = main(["reconcile", str(wsp), str(fcs_dir), "--out", str(out), *extra])
    print(f"\nreconcile report ({name}): {out / 'reconcile.html'}")
    for f in ("reconcile.csv", "reconcile.parquet", "reconcile.html"):
        assert (out / f).stat().st_size > 0
    table = pd.read_parquet(out / "reconcile.parquet")
    csv = pd.read_csv(out / "reconcile.csv", keep_default_na=False)
    assert list(csv["population_path"]) == list(table["population_path"])
    return code, table, out


@pytest.mark.parametrize("wsp", DIAMOND + LINE)
def test_flowkit_examples_reproduce_flowjo_exactly(wsp):
    folder = "simple_diamond_example" if wsp in DIAMOND else "simple_line_example"
    rec = reconcile(shared_path(*FLOWKIT, folder, wsp), shared_path(*FLOWKIT, folder))
    if wsp == "simple_poly_and_rect.wsp":  # FlowJo never computed these gates (count -1)
        gates = rec.table[rec.table["population_path"] != "root"]
        assert len(gates) == 2 and gates["reason"].str.contains("not compared").all() and rec.ok
        return
    pops = _check(rec.table)
    assert rec.ok and (pops["difference"] == 0).all()  # these FlowJo counts are reproduced exactly
    if wsp == "simple_diamond_example_quad_gate.wsp":
        assert sorted(pops["flowjo_count"]) == [49403, 49671, 50330, 50596]


def test_stale_flowjo_count_is_reported_and_fails(tmp_path_factory):
    """simple_poly_and_rect_v2_poly50.wsp stores 0 for a polygon that holds 50 of the 100 events (FlowKit
    counts 50 too): the report names a stale count and the command exits 3."""
    folder = shared_path(*FLOWKIT, "simple_line_example")
    code, table, _ = _run(tmp_path_factory, "poly50", folder / "simple_poly_and_rect_v2_poly50.wsp", folder)
    assert code == 3
    row = table.set_index("population_path").loc["/poly1"]
    assert (row["flowjo_count"], row["cytopipe_count"], row["flowkit_count"]) == (0, 50, 50)
    assert not row["within_tolerance"] and "stale count" in row["reason"]


def test_flowsom_68983_workspace(tmp_path_factory):
    d = shared_path("FlowSOM", "inst", "extdata")
    code, table, out = _run(tmp_path_factory, "flowsom68983", d / "gating.wsp", d)
    assert code == 0
    pops = _check(table)
    assert len(pops) == 15 and table["sample"].unique().tolist() == ["68983.fcs"]
    by = pops.set_index("population")
    # the lymphocyte polygon is the only gate with its own difference; everything below inherits it
    assert by.loc["Lymphocytes", "difference"] == 13 and "display grid" in by.loc["Lymphocytes", "reason"]
    assert (
        by.loc[["NK1_1+", "NK cells", "NK T cells", "CD8 T cells", "DP T cells", "gd T cells"], "difference"]
        == 0
    ).all()
    html = (out / "reconcile.html").read_text()
    assert "Every gate is within the tolerance" in html and "data:image/png;base64," in html


def test_fcexpr_48_samples(tmp_path_factory):
    part3 = shared_path("fcexpr", "inst", "extdata", "_extracted", "Part_3")
    code, table, _ = _run(
        tmp_path_factory, "fcexpr48", part3 / "FJ_workspace" / "07-Oct-2021.wsp", part3 / "FCS_files"
    )
    assert code == 0
    pops = _check(table)
    assert table["sample"].nunique() == 48 and len(pops) == 3 * 48
    assert (pops["difference"].abs() <= 2).all()


def test_csv_cells_are_escaped_against_formulas(tmp_path):
    folder = shared_path(*FLOWKIT, "simple_line_example")
    text = (folder / "simple_poly_and_rect.wsp").read_text()
    wsp = tmp_path / "formula.wsp"
    wsp.write_text(
        text.replace('name="poly1"', 'name="=HYPERLINK(1)"').replace('name="rect1"', 'name="-rect"')
    )
    rec = reconcile(wsp, folder)
    paths = write_report(rec, tmp_path / "out")
    csv = paths["csv"].read_text()
    assert "'=HYPERLINK(1)" in csv and ",'-rect," in csv and "\n=" not in csv
    back = pd.read_csv(paths["csv"])
    assert back["flowjo_count"].dropna().astype(int).tolist() == [100]  # numbers stay numbers
    assert (
        escape_cell("-1.5") == "-1.5"
        and escape_cell("@SUM(A1)") == "'@SUM(A1)"
        and escape_cell("\tx") == "'\tx"
    )
    assert escape_cell("+CD4") == "'+CD4" and escape_cell(-3) == -3


def test_usage_and_input_errors_exit_2(tmp_path, capsys):
    d = shared_path("FlowSOM", "inst", "extdata")
    assert main(["reconcile", str(d / "gating.wsp"), str(tmp_path / "nope")]) == 2
    assert main(["reconcile", str(d / "gating.wsp"), str(d), "--tolerance", "lots"]) == 2
    assert main(["reconcile", str(d / "gating.wsp"), str(tmp_path)]) == 2  # no matching FCS file
    err = capsys.readouterr().err
    assert "FCS folder not found" in err and "--tolerance 'lots'" in err and "68983.fcs" in err
    assert not any(tmp_path.iterdir())  # nothing written on an input error


def test_tolerance_rule():
    t = Tolerance.parse("2,0.5%")
    assert (t.events, t.percent) == (2, 0.5)
    assert t.ok(2, 10) and t.ok(-5, 1000) and not t.ok(6, 1000) and not t.ok(3, 0)
    assert Tolerance.parse("0").ok(0, 5) and not Tolerance.parse("0").ok(1, 10**6)
    assert Tolerance.parse("1%").ok(10, 1000) and not Tolerance.parse("1%").ok(11, 1000)


def test_report_page_in_a_real_browser(tmp_path):
    """reconcile.html of the FlowSOM workspace in headless Chromium: offline, no errors, every drawn
    gate decoded with a real size, the summary and the differing rows shown."""
    from tests.test_report_browser import CHROMIUM_ARGS, _chromium

    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    d = shared_path("FlowSOM", "inst", "extdata")
    paths = write_report(reconcile(d / "gating.wsp", d, worst=3), tmp_path)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_context(offline=True).new_page()
        errors, requests = [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda req: requests.append(req.url))
        page.goto(paths["html"].as_uri(), wait_until="load")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        sizes = page.eval_on_selector_all("img", "els => els.map(i => [i.naturalWidth, i.naturalHeight])")
        text = page.inner_text("body")
        rows = page.eval_on_selector_all("tr", "els => els.length")
        browser.close()
    assert not errors and all(u.startswith(("file:", "data:")) for u in requests)
    assert len(sizes) == 3 and all(w > 200 and h > 200 for w, h in sizes)
    assert "Every gate is within the tolerance" in text and "/Lymphocytes/Singlets" in text
    assert rows == 1 + 9  # header + the 9 populations that differ


def test_samples_without_their_file_are_listed_not_dropped(tmp_path):
    """Two of fcexpr's 48 files in the folder: the other 46 samples are rows that say which file is
    missing, and the run is not 'within tolerance'."""
    part3 = shared_path("fcexpr", "inst", "extdata", "_extracted", "Part_3")
    folder = tmp_path / "fcs"
    folder.mkdir()
    for f in sorted((part3 / "FCS_files" / "Exp_part_3").glob("*.fcs"))[:2]:
        (folder / f.name).symlink_to(f)  # the shared files stay where they are
    rec = reconcile(part3 / "FJ_workspace" / "07-Oct-2021.wsp", folder)
    t = rec.table
    missing = t[t["cytopipe_count"].isna()]
    assert t["sample"].nunique() == 48 and missing["sample"].nunique() == 46
    assert missing["reason"].str.startswith("no FCS file named").all() and not rec.ok
    assert t[t["cytopipe_count"].notna()]["sample"].nunique() == 2


def test_compensation_note_measures_the_matrix_against_the_file():
    """68983.fcs: the workspace's matrix equals the file's SPILL (no note); changed by 0.1, it is named."""
    import cytopipe
    from cytopipe.gating.flowjo import FlowJoWorkspace
    from cytopipe.gating.reconcile import _compensation_note

    d = shared_path("FlowSOM", "inst", "extdata")
    template = FlowJoWorkspace(d / "gating.wsp").template("68983.fcs")
    sample = cytopipe.read_fcs(d / "68983.fcs")
    assert _compensation_note(template, sample) == ""
    (m,) = template.matrices.values()
    m.matrix[0, 1] += 0.1
    assert "differs from the file's" in _compensation_note(template, sample) and "0.1" in _compensation_note(
        template, sample
    )


def test_a_long_list_of_differences_says_how_many_it_leaves_out(tmp_path_factory, capsys):
    """With no tolerance the 48 fcexpr samples have more differences than the 20 printed: the last
    line says how many more there are and where all of them are."""
    part3 = shared_path("fcexpr", "inst", "extdata", "_extracted", "Part_3")
    capsys.readouterr()
    code, table, _ = _run(
        tmp_path_factory, "fcexpr48-t0", part3 / "FJ_workspace" / "07-Oct-2021.wsp", part3 / "FCS_files",
        "--tolerance", "0",
    )  # fmt: skip
    out = capsys.readouterr().out
    n_bad = int((~table["within_tolerance"]).sum())
    assert code == 3 and n_bad > 20, (code, n_bad)
    assert out.count(": FlowJo ") == 20
    assert f"  ... and {n_bad - 20} more: every row is in " in out and "reconcile.csv" in out


def test_a_population_not_measured_in_the_file_has_no_count_to_compare(tmp_path):
    """The ellipse of single_ellipse_51_events.wsp on its file written again without channel_B: the
    population is not measured (its gate needs channel_B), so cytopipe has no count, not 0 events
    (which read as a 51-event difference); the row says why and is not within the tolerance."""
    from cytopipe.fcs import read_fcs, write_fcs

    folder = shared_path(*FLOWKIT, "simple_line_example")
    fcs = folder / "data_set_simple_line_100.fcs"
    sample = read_fcs(fcs)
    channels = sample.channels.copy()
    channels.loc[channels["pnn"] == "channel_B", "pnn"] = "channel_Z"
    keywords = {k: v for k, v in sample.keywords.items() if not (k.startswith("$P") and k.endswith("N"))}
    write_fcs(tmp_path / fcs.name, sample.events, channels, keywords)
    rec = reconcile(folder / "single_ellipse_51_events.wsp", tmp_path)
    gates = rec.table[rec.table["population_path"] != "root"]
    assert len(gates) == 1 and gates["flowjo_count"].notna().all()
    row = gates.iloc[0]
    assert pd.isna(row["cytopipe_count"]) and pd.isna(row["difference"])
    assert "not measured" in row["reason"] and "channel_B" in row["reason"] and not row["within_tolerance"]
    assert not rec.ok
