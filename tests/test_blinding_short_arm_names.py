"""A study whose arms have names of one or two characters (here ``HI``, ``MI`` and ``LO``): blinding
replaces them as whole words only, as the leak check finds them (cytopipe/report/blinding.py,
``find_leaks``), and unblinding gives back the tables the unblinded run wrote. Arms named like a
word of the codes (``A``, ``B``) get codes that do not show them (``Arm B`` would: ``Arm 1``, ...).

Before, ``blind_text`` replaced the letters inside every word, in the tables, run.json and run.log
(``Mann-Whitney U`` -> ``Mann-WArm Atney U``, ``mixed_model`` -> ``Arm Bxed_model``, run.json's
``spillover_sets`` -> ``spilArm Cver_sets``: the report could not read the folder any more), which
unblinding could not undo; and ``B`` was coded ``Arm A`` or ``Arm B``, which the leak
check finds ``B`` in."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cytopipe.report.blinding import arm_codes, blind_text, find_leaks
from tests.blinding_support import visible_text
from tests.pipeline_support import SECTIONS, TEMPLATE, cli

ARMS = {"IL-2 1.0 MIU": "HI", "IL-2 0.5 MIU": "MI", "IL-2 0.2 MIU": "LO"}


def _trial(folder: Path) -> Path:
    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, n_patients=3, visits=(0,), events=3000, control_events=1500, seed=5151,
                   instrument="fortessa")  # fmt: skip
    for name in ("manifest.csv", "clinical.csv"):
        table = pd.read_csv(folder / name)
        table["arm"] = table["arm"].replace(ARMS)
        table.to_csv(folder / name, index=False)
    return folder


def _run(trial: Path, out: Path, blinded: bool) -> None:
    spec = {"study": "short arm names", "manifest": str(trial / "manifest.csv"),
            "clinical": str(trial / "clinical.csv"), "template": str(TEMPLATE), "output": str(out),
            **SECTIONS, "clustering": {"enabled": False}, "compensation": {"source": "controls"},
            "report": {"enabled": True, "blinded": blinded}}  # fmt: skip
    path = out.with_name(f"{out.name}.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    proc = cli("run", str(path), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: the statistics' problems (one patient per arm)


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    """Every table of the run folder and of its study/ folder."""
    paths = [*out.glob("*.parquet"), *(out / "study").glob("*.parquet")]
    return {p.relative_to(out).as_posix(): pd.read_parquet(p) for p in sorted(paths)}


@pytest.mark.slow  # default suite: tests/test_blinding_one_letter_arms.py (one-letter arms coded as whole words, unblinding) and the codes test below
def test_short_arm_names_are_coded_as_whole_words_and_unblinding_gives_back_the_runs_tables(tmp_path):
    trial = _trial(tmp_path / "trial")
    plain, blinded = tmp_path / "plain", tmp_path / "blinded"
    _run(trial, plain, blinded=False)
    _run(trial, blinded, blinded=True)

    coded = pd.read_parquet(blinded / "samples.parquet")
    assert sorted(a for a in coded["arm"].unique() if a) == ["Arm A", "Arm B", "Arm C"]  # controls: ""
    # the texts around the arms are the run's own: populations, tests, files, run.json's keys
    ref = pd.read_parquet(plain / "population_stats.parquet")
    got = pd.read_parquet(blinded / "population_stats.parquet")
    assert sorted(got["population"].unique()) == sorted(ref["population"].unique())
    ref, got = pd.read_parquet(plain / "statistics.parquet"), pd.read_parquet(blinded / "statistics.parquet")
    for column in ("family", "method"):  # was "Arm Bxed_dose_trend", "Mann-WArm Atney U"
        assert sorted(got[column].unique()) == sorted(ref[column].unique())
    info, ref_info = (json.loads((d / "run.json").read_text(encoding="utf-8")) for d in (blinded, plain))
    assert set(info["study_state"]) == set(ref_info["study_state"])  # was "spilArm Cver_sets"
    pd.testing.assert_series_equal(coded["file"], pd.read_parquet(plain / "samples.parquet")["file"])
    assert find_leaks({"the blinded folder": visible_text(blinded)}, ARMS.values()) == []
    assert (blinded / "report.html").is_file()

    proc = cli("unblind", str(blinded), "--key", str(trial / "manifest.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    back, ref = _tables(blinded), _tables(plain)
    assert set(back) == set(ref)
    for name in ref:
        pd.testing.assert_frame_equal(back[name], ref[name], obj=name)
    for path in sorted((plain / "study").glob("*.csv")):
        assert (blinded / "study" / path.name).read_bytes() == path.read_bytes(), path.name


def test_arms_named_like_a_word_of_the_codes_get_codes_that_do_not_show_them():
    codes = arm_codes(["A", "B", "C"], secret=b"a run")
    assert sorted(codes.values()) == ["Arm 1", "Arm 2", "Arm 3"]  # was Arm A, Arm B, Arm C
    assert find_leaks({"codes": " ".join(codes.values())}, codes) == []
    # whole words only (was "Arm 3 Arm 2D45RArm 3 T ..."); a one-letter name in its own case, not
    # the article a (tests/test_blinding_one_letter_arms.py)
    assert blind_text("a CD45RA T cell: B", codes) == f"a CD45RA T cell: {codes['B']}"
    codes = arm_codes(["Arm", "placebo"], secret=b"a run")
    assert sorted(codes.values()) == ["Group 1", "Group 2"]
    # the codes of every other study are as they were
    codes = arm_codes(["placebo", "IL-2 0.5 MIU", "IL-2 1.0 MIU"], secret=b"a run")
    assert codes == {"IL-2 0.5 MIU": "Arm B", "IL-2 1.0 MIU": "Arm C", "placebo": "Arm A"}
