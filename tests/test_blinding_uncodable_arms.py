"""Studies that blinding cannot code are refused before any work (exit 2, nothing written): arms
named by numbers, and ids that carry a one-letter arm (cytopipe/report/armcheck.py).

Before, a blinded run of arms ``1``, ``2``, ``3`` coded every digit standing alone in the run's
texts (run.json's ``cytopipe_version`` ``0.Arm A.0``, its problems ``line Arm A column 36``), broke
the gate review's shapes (JSON: the report was not written, exit 3) and blinded the folder all the
same; and a study of arms ``A``, ``B``, ``C`` whose patients were ``P001-A``, ``P002-B``, ... got a
blinded folder showing ``P001-A`` beside ``Arm 2`` in every table: which code is ``A``. Longer arm
names inside ids (``P001-placebo``) were and are coded there (``P001-Arm B``) and come back when
unblinding (the slow test)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cytopipe.report.armcheck import ids_showing_arms, number_arms
from cytopipe.report.blinding import find_leaks, folder_record
from tests.blinding_support import visible_text
from tests.pipeline_support import SECTIONS, TEMPLATE, cli_in_process

# the commands run in this process (cli_in_process): these tests check what they write and say,
# not the process, whose start-up (~1 s of imports) was most of a refusal's cost

DOSES = ("IL-2 1.0 MIU", "IL-2 0.5 MIU", "IL-2 0.2 MIU")


@pytest.fixture(scope="module")
def trial(tmp_path_factory) -> Path:
    from cytopipe.simulate import simulate_trial

    folder = tmp_path_factory.mktemp("uncodable") / "trial"
    simulate_trial(folder, n_patients=3, visits=(0,), events=3000, control_events=1500, seed=5151,
                   instrument="fortessa")  # fmt: skip
    return folder


def _study(trial: Path, folder: Path, arms: tuple[str, str, str], ids: str = "") -> Path:
    """A copy of the trial with its arms renamed (``arms``, for ``DOSES``) and, by ``ids``, the
    arm's name joined to the study's ids: ``patient`` (``P001-A``), ``sample`` (``P001_W00_A``),
    ``batch`` (``S1-2020W04.A``) or ``file`` (``fcs/P001_W00-A.fcs``, the file renamed); or glued
    to their digits: ``patient glued`` (``P001A``), ``patient first`` (``A001``: the arm for the
    ``P``), ``sample glued`` (``P001A_W00``) or ``file glued`` (``fcs/P001_W00A.fcs``)."""
    shutil.copytree(trial, folder)
    names = dict(zip(DOSES, arms))
    for name in ("manifest.csv", "clinical.csv"):
        table = pd.read_csv(folder / name, dtype=str, keep_default_na=False)
        table["arm"] = table["arm"].replace(names)
        armed = table["arm"] != ""
        if ids == "patient":
            table.loc[armed, "patient_id"] = table.loc[armed, "patient_id"] + "-" + table.loc[armed, "arm"]
        elif ids == "sample" and "sample_id" in table:
            table.loc[armed, "sample_id"] = table.loc[armed, "sample_id"] + "_" + table.loc[armed, "arm"]
        elif ids == "batch" and "batch" in table:
            table.loc[armed, "batch"] = table.loc[armed, "batch"] + "." + table.loc[armed, "arm"]
        elif ids == "patient glued":
            table.loc[armed, "patient_id"] = table.loc[armed, "patient_id"] + table.loc[armed, "arm"]
        elif ids == "patient first":
            table.loc[armed, "patient_id"] = table.loc[armed, "arm"] + table.loc[armed, "patient_id"].str[1:]
        elif ids == "sample glued" and "sample_id" in table:
            table.loc[armed, "sample_id"] = [
                s.replace("_", f"{a}_", 1)
                for s, a in zip(table.loc[armed, "sample_id"], table.loc[armed, "arm"])
            ]
        elif ids in ("file", "file glued") and "file" in table:
            joint = "-" if ids == "file" else ""
            for i in table.index[armed]:
                new = table.at[i, "file"].replace(".fcs", f"{joint}{table.at[i, 'arm']}.fcs")
                (folder / table.at[i, "file"]).rename(folder / new)
                table.at[i, "file"] = new
        table.to_csv(folder / name, index=False)
    return folder


def _workflow(
    study: Path, out: Path, *, blinded: bool, report: bool = True, template: Path = TEMPLATE,
    name: str = "uncodable arms",
) -> Path:  # fmt: skip
    spec = {"study": name, "manifest": str(study / "manifest.csv"),
            "clinical": str(study / "clinical.csv"), "template": str(template), "output": str(out),
            **SECTIONS, "clustering": {"enabled": False}, "compensation": {"source": "controls"},
            "report": {"enabled": report, "blinded": blinded}}  # fmt: skip
    path = out.with_name(f"{out.name}.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _run(path: Path):
    return cli_in_process("run", str(path), "--no-progress", "--scheduler", "synchronous")


@pytest.mark.parametrize("arms", [("1", "2", "3"), pytest.param(("0", "10", "2.5"), marks=pytest.mark.slow)])
def test_a_blinded_run_of_arms_named_by_numbers_is_refused_before_any_work(trial, tmp_path, arms):
    study = _study(trial, tmp_path / "study", arms)
    out = tmp_path / "run"
    proc = _run(_workflow(study, out, blinded=True))
    # was: exit 3 after all the work, a blinded folder with '0.Arm A.0' in run.json
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the arm(s) {', '.join(repr(a) for a in sorted(set(arms), key=arms.index))} are named by numbers" in proc.stderr  # fmt: skip
    assert "Name the arms with words in the manifest" in proc.stderr and "nothing was done" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("ids", "shown"),
    [
        ("patient", "patient_id 'P001-A'"),
        pytest.param("sample", "sample_id 'P001_W00_A'", marks=pytest.mark.slow),
        pytest.param("batch", "batch 'S1-2020W04.A'", marks=pytest.mark.slow),
        ("file", "file 'fcs/P001_W00-A.fcs'"),
        # glued to digits (was: run and blinded, P001A beside its arm's code)
        ("patient glued", "patient_id 'P001A', patient_id 'P002B', patient_id 'P003C'"),
        pytest.param("patient first", "patient_id 'A001'", marks=pytest.mark.slow),
        pytest.param("sample glued", "sample_id 'P001A_W00'", marks=pytest.mark.slow),
        ("file glued", "file 'fcs/P001_W00A.fcs'"),
    ],
)
def test_a_blinded_run_whose_ids_carry_a_one_letter_arm_is_refused_before_any_work(
    trial, tmp_path, ids, shown
):
    study = _study(trial, tmp_path / "study", ("A", "B", "C"), ids=ids)
    out = tmp_path / "run"
    proc = _run(_workflow(study, out, blinded=True))
    # was: a blinded folder showing P001-A beside its arm's code in every table (exit 0)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the study's ids carry a one-letter arm name as a part of them ({shown}" in proc.stderr
    assert "ids that do not carry the arm" in proc.stderr and "nothing was done" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("arms", "shown"), [(("DR", "PBO", "TRT"), "'HLA-DR'"), (("APC", "PBO", "TRT"), "'APC-H7-A'")]
)
def test_a_blinded_run_whose_median_markers_or_panel_show_an_arm_is_refused_before_any_work(
    trial, tmp_path, arms, shown
):
    """A ``medians:`` marker no gate uses (a column name of population_stats, ``median_HLA-DR``,
    which blinding does not code) and a ``panel:`` channel (in the log and errors) are checked
    with the template's populations and gated markers (armcheck.template_names). Was: run."""
    study = _study(trial, tmp_path / "study", arms)
    text = TEMPLATE.read_text(encoding="utf-8").replace("medians: [CD3,", "medians: [HLA-DR, CD3,")
    text = text.replace("compensation: file\n", 'compensation: file\npanel: {CD3: "APC-H7-A"}\n', 1)
    assert "HLA-DR" in text and "APC-H7-A" in text
    template = tmp_path / "panel.yaml"
    template.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    proc = _run(_workflow(study, out, blinded=True, template=template))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "an arm's name is also a word of the run's population or marker names" in proc.stderr
    assert shown in proc.stderr and "nothing was done" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "folder", "said"),
    [("TRT trial", "run", "the study name 'TRT trial'"),
     ("uncodable arms", "pbo_run", "the run folder's name 'pbo_run'")],
)  # fmt: skip
def test_a_blinded_run_whose_study_or_folder_name_shows_an_arm_is_refused_before_any_work(
    trial, tmp_path, name, folder, said
):
    """The blinded report's title and summary show the study's and the run folder's names with
    the arm's code in the arm's place (``Arm B trial``): which code is that arm. Was: run."""
    study = _study(trial, tmp_path / "study", ("TRT", "PBO", "LOW"))
    out = tmp_path / folder
    proc = _run(_workflow(study, out, blinded=True, name=name))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"an arm's name shows in {said}" in proc.stderr and "nothing was done" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_blinded_report_of_a_run_folder_named_with_an_arm_is_refused(trial, tmp_path):
    """`cytopipe report --blinded` of a run written unblinded to a folder named with an arm."""
    study = _study(trial, tmp_path / "study", ("TRT", "PBO", "LOW"))
    out = tmp_path / "trt_run"
    proc = _run(_workflow(study, out, blinded=False, report=False))
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = cli_in_process("report", str(out), "--blinded")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the run folder's name 'trt_run'" in proc.stderr and "Nothing was written." in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert folder_record(out) is None


def test_what_counts_as_a_number_or_an_id_carrying_an_arm():
    assert number_arms(["1", " 2 ", "10", "0.5", "-", "+/-", "A", "dose 1", "10 mg", "PBO", "", "1"]) == [
        "1", "2", "10", "0.5", "-", "+/-",
    ]  # fmt: skip
    manifest = pd.DataFrame({
        "file": ["fcs/P1.fcs", "fcs/P2.fcs", "fcs/controls/CTRL_FSC-A.fcs", "fcs/P3.fcs"],
        "sample_id": ["P1 a", "P2", "CTRL_A", "P3"],  # a control's id (no arm) tells nothing
        "patient_id": ["P1", "P2-B", "", "P3"],
        "panel": ["T-NK-A", "T-NK-A", "T-NK-A", "T-NK-A"],  # not an id: one panel for all
        "arm": ["A", "B", "", "PBO"],
    })  # fmt: skip
    assert ids_showing_arms(["A", "B", "PBO"], [manifest]) == ["patient_id 'P2-B'", "sample_id 'P1 a'"]
    # letters inside an id's part, and longer names (coded as words), are not what this refuses
    assert ids_showing_arms(["W", "P"], [manifest]) == []
    assert ids_showing_arms(["PBO", "HI"], [manifest.assign(patient_id="P1-PBO")]) == []
    # a Windows drive is no id (blinding codes ``C:`` as ``Arm 3:``); the same letter in a name is
    windows = manifest.assign(file=["C:\\trial\\P1.fcs", "C:/trial/P2.fcs", "fcs/c.fcs", "D:\\C\\P3.fcs"])
    assert ids_showing_arms(["C", "PBO"], [windows]) == ["file 'D:\\\\C\\\\P3.fcs'"]


def test_what_a_workspace_masks_in_a_name_stored_before_the_arms_were_known():
    """``masked``: an arm's name where blinding finds it and the refusals look for it (the one
    matcher, ``leak_pattern``), a one-letter arm as a part of an id's own in any case; nothing
    else (a letter glued to digits, a letter inside a word, the article)."""
    from cytopipe.report.armcheck import masked
    from cytopipe.report.armnames import shared_words

    assert masked(["IL2", "PBO"], "lab/IL2/P001_il2_W00.fcs") == "lab/[arm]/P001_[arm]_W00.fcs"
    assert masked(["IL-2 0.5 MIU", "placebo"], "sle_il2_tcell_nk.yaml") == "sle_il2_tcell_nk.yaml"
    assert masked(["A", "B"], "P001-a_W00.fcs P01A_W00 PA01") == "P001-[arm]_W00.fcs P01A_W00 PA01"
    assert masked(["A", "B"], "a gate of B", ids=False) == "a gate of [arm]"  # texts: blinding's rule
    assert masked(["HD", "LD"], "P01_HD_W04 CHD") == "P01_[arm]_W04 CHD"
    assert masked([], "P01_HD_W04") == "P01_HD_W04"
    for arms, name in ((["IL2"], "P01_IL2.fcs"), (["HD"], "x_HD_y")):  # what the refusals find, masked
        assert shared_words(arms, [name]) == [name] and "[arm]" in masked(arms, name)


def test_which_letters_glued_to_an_ids_digits_show_an_arm():
    """A one-letter arm glued to an id's digits shows the arm where only one arm's rows carry that
    letter at that place (column, part, piece); one that rows of several arms carry tells nothing."""

    def shown(arms: list[str], column: str, ids: list[str], known: tuple[str, ...] = ()) -> list[str]:
        table = pd.DataFrame({column: ids, "arm": arms, "visit": "0"})
        return ids_showing_arms([*arms, *known], [table])

    # was: [] for each (the letter is not a part of its own)
    assert shown(["A", "B", "A"], "patient_id", ["P01A", "P02B", "P03A"]) == [
        "patient_id 'P01A'", "patient_id 'P02B'", "patient_id 'P03A'",
    ]  # fmt: skip
    assert shown(["A", "B"], "patient_id", ["A017", "B018"]) == ["patient_id 'A017'", "patient_id 'B018'"]
    assert shown(["a", "B"], "sample_id", ["P001A_W00", "P002b_W00"]) == [
        "sample_id 'P001A_W00'", "sample_id 'P002b_W00'",
    ]  # fmt: skip
    assert shown(["A", "B"], "file", ["fcs/P01A.fcs", "fcs/P02.fcs"]) == ["file 'fcs/P01A.fcs'"]
    # another arm's letter, where only one arm's rows carry it, tells as much
    assert shown(["A", "B"], "patient_id", ["P01B", "P02A"]) == ["patient_id 'P01B'", "patient_id 'P02A'"]
    # a letter only some rows of one arm carry: those rows' ids (site T2 of arm T; S of both arms)
    assert shown(["S", "T", "T"], "site", ["S1", "T2", "S3"]) == ["site 'T2'"]
    # fail-closed: rows all of one arm cannot show that the letter is not the arm's
    assert shown(["P", "P"], "patient_id", ["P001", "P002"], known=("T",)) == [
        "patient_id 'P001'", "patient_id 'P002'",
    ]  # fmt: skip
    # left alone: a letter in every arm's ids at that place, and letters in a word
    assert shown(["P", "T", "P", "T"], "patient_id", ["P001", "P002", "P003", "P004"]) == []
    assert shown(["W", "V"], "sample_id", ["P001_W00", "P002_W00"]) == []
    assert shown(["W", "V"], "sample_id", ["P001_V1", "P002_V1"]) == []
    assert shown(["A", "B"], "batch", ["S1-2020W04", "S1-2020W04"]) == []
    assert shown(["A", "B"], "patient_id", ["PA01", "PB02"]) == []  # inside a word, as everywhere
    assert shown(["PBO", "TRT"], "patient_id", ["P01A", "P02B"]) == []  # no one-letter arm
    assert shown(["S", "T", "S", "T"], "sample_id", ["P1_S1", "P2_S1", "P3_T2", "P4_T2"]) == []


@pytest.mark.parametrize(("arms", "ids", "said"), [pytest.param(("1", "2", "3"), "", "named by numbers", marks=pytest.mark.slow),
                                                   (("A", "B", "C"), "patient", "patient_id 'P001-A'"),
                                                   pytest.param(("A", "B", "C"), "file glued", "file 'fcs/P001_W00A.fcs'",
                                                                marks=pytest.mark.slow)])  # fmt: skip
def test_a_blinded_report_of_such_a_run_folder_is_refused_and_leaves_it_as_it_was(
    trial, tmp_path, arms, ids, said
):
    study = _study(trial, tmp_path / "study", arms, ids=ids)
    out = tmp_path / "run"
    proc = _run(_workflow(study, out, blinded=False, report=False))
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # only blinding is refused
    samples = pd.read_parquet(out / "samples.parquet")
    assert set(samples.loc[samples["arm"] != "", "arm"]) == set(arms)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = cli_in_process("report", str(out), "--blinded")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert said in proc.stderr and "Nothing was written." in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # not even a secret
    assert folder_record(out) is None


@pytest.mark.slow
def test_longer_arm_names_inside_ids_are_coded_there_and_come_back_when_unblinding(trial, tmp_path):
    arms = ("highdose", "lowdose", "placebo")
    study = _study(trial, tmp_path / "study", arms, ids="patient")
    out = tmp_path / "run"
    proc = _run(_workflow(study, out, blinded=True))
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    samples = pd.read_parquet(out / "samples.parquet")
    armed = samples[samples["arm"] != ""]
    assert sorted(armed["arm"].unique()) == ["Arm A", "Arm B", "Arm C"]
    assert list(armed["patient_id"]) == list(armed["patient_id"].str[:4] + "-" + armed["arm"])  # P001-Arm B
    assert find_leaks({"the blinded folder": visible_text(out)}, arms) == []
    proc = cli_in_process("unblind", str(out), "--key", str(study / "manifest.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = pd.read_parquet(out / "samples.parquet")
    assert sorted(samples.loc[samples["arm"] != "", "patient_id"]) == [
        "P001-highdose",
        "P002-lowdose",
        "P003-placebo",
    ]
