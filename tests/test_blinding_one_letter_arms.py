"""A study whose arms are named by one letter (``A``, ``B``, ``C``: a common way to name a trial's
arms) gets its blinded report, and the leak check still refuses such a name where it shows as data.

Before, no such study got one: the check found ``a`` (the article) in the page's wording and
``<a ...>``, ``<b>`` and ``nav.toc a`` in its markup, and refused the report; and blinding coded
the ``A`` of every channel (``FSC-A`` -> ``FSC-Arm 1``, in the gate review's tables and figures)
and every article ``a`` in run.json's and run.log's texts, which told anyone which code stood for
``A``. One definition now serves blinding and the check (cytopipe/report/armnames.py,
``leak_pattern``), and the page is read as text, not markup (cytopipe/report/pagecheck.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cytopipe.report import html as H
from cytopipe.report.armnames import shared_words
from cytopipe.report.blinding import arm_codes, blind_text, find_leaks, folder_record
from cytopipe.report.pagecheck import page_leaks
from tests.pipeline_support import SECTIONS, TEMPLATE, cli_in_process

ARMS = {"IL-2 1.0 MIU": "A", "IL-2 0.5 MIU": "B", "IL-2 0.2 MIU": "C"}
LETTERS = sorted(ARMS.values())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same small study with one-letter arms, run unblinded and blinded (report included).
    `cytopipe` runs in this process here and below (cli_in_process): these tests check what the
    commands write and say, not the process; a fresh one spent ~1 s importing before any work."""
    from cytopipe.simulate import simulate_trial

    base = tmp_path_factory.mktemp("one_letter")
    trial = base / "trial"
    simulate_trial(trial, n_patients=3, visits=(0,), events=3000, control_events=1500, seed=5151,
                   instrument="fortessa")  # fmt: skip
    for name in ("manifest.csv", "clinical.csv"):
        table = pd.read_csv(trial / name)
        table["arm"] = table["arm"].replace(ARMS)
        table.to_csv(trial / name, index=False)
    out = {"trial": trial}
    for kind in ("plain", "blinded"):
        folder = base / kind
        spec = {"study": "A study of one-letter arms", "manifest": str(trial / "manifest.csv"),
                "clinical": str(trial / "clinical.csv"), "template": str(TEMPLATE), "output": str(folder),
                **SECTIONS, "clustering": {"enabled": False}, "compensation": {"source": "controls"},
                "report": {"enabled": True, "blinded": kind == "blinded"}}  # fmt: skip
        path = base / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        proc = cli_in_process("run", str(path), "--no-progress", "--scheduler", "synchronous")
        assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: the statistics' problems
        out[kind] = folder
    return out


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    paths = [*out.glob("*.parquet"), *(out / "study").glob("*.parquet")]
    return {p.relative_to(out).as_posix(): pd.read_parquet(p) for p in sorted(paths)}


def _strings(value: str) -> list[str]:
    """The strings of a JSON text, each a text of its own (``value`` itself when it is no JSON)."""
    try:
        obj = json.loads(value)
    except ValueError:
        return [value]
    found: list[str] = []

    def walk(v: object) -> None:
        if isinstance(v, str):
            found.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            found.append(str(v))

    walk(obj)
    return found


def _shown(run: Path) -> dict[str, str]:
    """What a reader of the run folder gets (``.cache/`` and the report's page aside): each file's
    name, and its text (a table: its column names and every cell, one per line; JSON: every string,
    one per line)."""
    import duckdb

    texts = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if not path.is_file() or rel.parts[0] == ".cache":
            continue
        texts[f"name of {rel}"] = rel.as_posix()
        if path.suffix == ".html":
            continue
        if path.suffix in (".parquet", ".duckdb"):
            if path.suffix == ".parquet":
                frames = [pd.read_parquet(path)]
            else:
                con = duckdb.connect(str(path), read_only=True)
                try:
                    names = [
                        n
                        for (n,) in con.execute("select table_name from information_schema.tables").fetchall()
                    ]
                    frames = [con.execute(f'select * from "{n}"').df() for n in names]
                finally:
                    con.close()
            cells = [str(v) for df in frames for c in df.columns for v in [c, *df[c].dropna().astype(str)]]
            texts[str(rel)] = "\n".join(x for cell in cells for x in _strings(cell))
        elif path.suffix == ".json":
            texts[str(rel)] = "\n".join(_strings(path.read_text(encoding="utf-8")))
        else:
            texts[str(rel)] = path.read_text(encoding="utf-8", errors="replace")
    return texts


def test_a_study_with_one_letter_arms_gets_its_blinded_report_and_unblinds_to_the_runs_tables(runs):
    plain, blinded = runs["plain"], runs["blinded"]
    page = (blinded / "report.html").read_text(encoding="utf-8")  # was: not written (exit 3)
    assert folder_record(blinded) is not None

    coded = pd.read_parquet(blinded / "samples.parquet")
    codes = sorted(a for a in coded["arm"].unique() if a)
    assert codes == ["Arm 1", "Arm 2", "Arm 3"]  # controls: ""
    assert f"by its code ({', '.join(codes)})" in page  # was "(Arm A, Arm B, ...)": not its codes
    assert page_leaks(page, LETTERS) == []
    assert find_leaks(_shown(blinded), LETTERS) == []
    # ordinary words and channels are left as they are: FSC-A was FSC-Arm 1 (tables and figures)
    for name in ("gate_review.parquet", "population_stats.parquet"):
        ref, got = pd.read_parquet(plain / name), pd.read_parquet(blinded / name)
        for column in ("x", "y", "population", "parent"):
            if column in ref.columns:
                assert sorted(got[column].astype(str).unique()) == sorted(ref[column].astype(str).unique())
    assert "Gate review: Singlets (FSC-A × FSC-H)" in page
    assert "<title>A study of one-letter arms: run report (blinded)</title>" in page  # the article stays

    unblinded = blinded.with_name("unblinded")
    shutil.copytree(blinded, unblinded)
    proc = cli_in_process("unblind", str(unblinded), "--key", str(runs["trial"] / "manifest.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    back, ref = _tables(unblinded), _tables(plain)
    assert set(back) == set(ref)
    for name in ref:
        pd.testing.assert_frame_equal(back[name], ref[name], obj=name)


def test_the_check_refuses_a_one_letter_arm_shown_as_data_in_the_run_folder(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["plain"], run)
    # a user's files: a note in plain English stays; a table of counts per arm is refused
    (run / "notes.txt").write_text("Sent a copy to the sponsor. A batch was re-acquired.\n", encoding="utf-8")
    (run / "counts.csv").write_text("arm,patients\nA,2\nB,1\n", encoding="utf-8")
    proc = cli_in_process("report", str(run), "--blinded")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "counts.csv" in proc.stderr and "notes.txt" not in proc.stderr
    assert folder_record(run) is None  # nothing was blinded
    (run / "counts.csv").unlink()
    (run / "arm_A.txt").write_text("nothing here\n", encoding="utf-8")  # the name shows it
    proc = cli_in_process("report", str(run), "--blinded")
    assert proc.returncode == 2 and "arm_A.txt" in proc.stderr, proc.stderr[-3000:]
    (run / "arm_A.txt").unlink()
    proc = cli_in_process("report", str(run), "--blinded")  # was refused: the article a, <a>, <b>
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert folder_record(run) is not None
    assert (run / "notes.txt").read_text(encoding="utf-8").startswith("Sent a copy")  # a user's: untouched


def _page(cell: str, sentence: str, swatch: str) -> str:
    """A page built as the report builds it (cytopipe/report/html.py), with one text of choice in a
    table cell, a sentence of its wording and the arm colours' legend."""
    table = pd.DataFrame({"population": ["T cells", "CD4 T"], "comparison": ["Arm 2 vs Arm 1", cell]})
    section = H.Section("overview", "Overview")
    section.add(H.kpis([("samples", "3"), ("arms", "3")]))
    section.add(
        f'<p class="lead">Arm colours used in every figure: {H.swatches({swatch: "#000"}, [swatch])}</p>'
    )
    section.add(H.paragraph(sentence))
    section.add(H.paragraph("A batch is marked shifted when its median lies more than 3 MAD away; a flag is "
                            "a prompt to look at that batch's gates (R-4s, 10-x). QC'd, not analysed."))  # fmt: skip
    section.sub("gate-singlets", "Singlets (FSC-A × FSC-H)")
    section.add(H.table(table, csv="report_tables/x.csv", caption="A table of the tests."))
    return H.page("A study: run report (blinded)", "3 samples, arms: Arm 1, Arm 2, Arm 3", [section])


def test_the_page_check_reads_text_not_markup_and_finds_a_one_letter_arm_shown_as_data():
    clean = _page("Arm 3 vs Arm 1", "Arms: Arm 1=2, Arm 2=3.", "Arm 1")
    assert "<a " in clean and "<b>" in clean and "nav.toc a" in clean
    # the old check read the page's markup: <a>, <b>, <li>, nav.toc a (and the article a)
    assert find_leaks({"page": clean}, ["b", "li"]) == ["page: 'b'", "page: 'li'"]
    assert page_leaks(clean, ["b", "li"]) == []
    assert page_leaks(clean, LETTERS) == []
    # the name as data: a table cell, a comparison, a list in a sentence, the legend
    for page in (
        _page("A", "Arms: Arm 1=2, Arm 2=3.", "Arm 1"),
        _page("B vs Arm 1", "Arms: Arm 1=2, Arm 2=3.", "Arm 1"),
        _page("Arm 3 vs Arm 1", "Arms: A=2, B=3.", "Arm 1"),
        _page("Arm 3 vs Arm 1", "A vs B: no test (one patient each).", "Arm 1"),
        _page("Arm 3 vs Arm 1", "A has 2 patients.", "Arm 1"),
        _page("Arm 3 vs Arm 1", "Arms: Arm 1=2, Arm 2=3.", "A"),
    ):
        assert page_leaks(page, LETTERS), page
    # only the style sheet is the report's code: a script (the page has none) is read as text
    assert page_leaks(clean.replace("</body>", "<script>const arm = 'A';</script></body>"), LETTERS)
    # a figure's texts (legend, axis labels) and a CSV's cells are checked as they are
    assert find_leaks({"figure": "Arm 1\nA\nFSC-A"}, LETTERS) == ["figure: 'A'"]
    assert find_leaks({"figure": "Arm 1\nArm 2\nFSC-A\nSSC-A"}, LETTERS) == []


def test_blinding_codes_a_one_letter_name_where_the_check_finds_it():
    codes = arm_codes(["A", "B", "C"], secret=b"a run")
    a, b = codes["A"], codes["B"]
    text = "A vs B; arms: A=2, B=3; ['A', 'B']; spillover_batch_A.csv; A has 2. A batch is shifted; FSC-A, a flag"
    assert blind_text(text, codes) == (
        f"{a} vs {b}; arms: {a}=2, {b}=3; ['{a}', '{b}']; spillover_batch_{a}.csv; {a} has 2. A batch is "
        "shifted; FSC-A, a flag"
    )
    assert find_leaks({"t": blind_text(text, codes)}, codes) == []
    assert sorted(codes.values()) == ["Arm 1", "Arm 2", "Arm 3"]  # Arm A would show A
    assert sorted(arm_codes(["a", "b"], secret=b"a run").values()) == ["Arm 1", "Arm 2"]  # nor an arm a
    # an arm named by a lower-case letter: the article a before any word is not it
    codes = {"a": "Arm 1", "b": "Arm 2"}
    text = "a vs b; arm a has 2; a=2; a flag in a CSV file; FSC-A"
    assert blind_text(text, codes) == "Arm 1 vs Arm 2; arm Arm 1 has 2; Arm 1=2; a flag in a CSV file; FSC-A"


def test_a_run_whose_populations_show_a_one_letter_arm_is_not_blinded(runs, tmp_path):
    """Arms ``P`` and ``T`` beside the populations ``T cells``, ``CD4 T``: coded there too
    (``Arm 2 cells``, as before), they would tell which code is ``T``. Refused before any work."""
    trial = tmp_path / "trial"
    shutil.copytree(runs["trial"], trial)
    for name in ("manifest.csv", "clinical.csv"):
        table = pd.read_csv(trial / name)
        table["arm"] = table["arm"].replace({"A": "T", "B": "P", "C": "R"})
        table.to_csv(trial / name, index=False)
    spec = yaml.safe_load((runs["blinded"].with_name("blinded.yaml")).read_text(encoding="utf-8"))
    out = tmp_path / "run"
    spec.update(manifest=str(trial / "manifest.csv"), clinical=str(trial / "clinical.csv"), output=str(out))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    proc = cli_in_process("run", str(path), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "'T cells', 'CD4 T', 'CD8 T'" in proc.stderr and "nothing was done" in proc.stderr
    assert not (out / "population_stats.parquet").exists()
    assert shared_words(["P", "T", "R", "DR"], ["T cells", "CD4 T", "Treg", "NK", "HLA-DR", "FSC-A"]) == [
        "T cells",
        "CD4 T",
        "HLA-DR",
    ]
    assert shared_words(LETTERS, ["T cells", "CD4 T", "FSC-A", "SSC-A", "B cells"]) == ["B cells"]
