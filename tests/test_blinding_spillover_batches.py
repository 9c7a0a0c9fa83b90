"""A per-batch spillover matrix (``study/spillover_<column>_<value>.csv``, one per site or batch of
controls) whose batch is named like an arm (a lab's batch ``placebo``): cytopipe's own file, so
blinding names it as the blinded run.json names the batch (by the arm's code), and unblinding names
it back. The run is not refused, and no file name of the blinded folder shows the arm.

Before, the blinded run.json recorded the batch coded (``spillover_site_Arm B.csv``) while the file
kept the batch's name: the file then counted as a user's file whose name shows an arm, so the run
that blinded the folder stopped after all its work (exit 2), and so did every later command; a
report blinding the folder kept the file, the arm in its name beside its code in run.json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.blinding_support import visible_text
from tests.pipeline_support import SECTIONS, TEMPLATE, cli

# slow suite: edge cases of blinding (the default suite keeps blinding's broad tests: test_report_blinding,
# test_blinding_folder_kinds, ...), moved there for the default suite's time budget (2026-12-07)
pytestmark = pytest.mark.slow

ARM = "placebo"  # the arm of P003, and the name of the site of P002's controls


def _trial(folder: Path) -> Path:
    """A small two-site trial with one set of controls per site; site S3 renamed ``placebo``, the
    name of P003's arm (IL-2 0.2 MIU renamed)."""
    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, n_patients=3, visits=(0,), events=3000, control_events=1500, seed=5151,
                   instrument="fortessa")  # fmt: skip
    for name, column in (("manifest.csv", "site"), ("clinical.csv", None)):
        table = pd.read_csv(folder / name)
        table["arm"] = table["arm"].replace({"IL-2 0.2 MIU": ARM})
        if column:
            table[column] = table[column].replace({"S3": ARM})
        table.to_csv(folder / name, index=False)
    return folder


def _spec(trial: Path, out: Path, blinded: bool) -> Path:
    spec = {"study": "two sites", "manifest": str(trial / "manifest.csv"), "clinical": str(trial / "clinical.csv"),
            "template": str(TEMPLATE), "output": str(out), **SECTIONS, "clustering": {"enabled": False},
            "compensation": {"source": "controls"}, "report": {"enabled": True, "blinded": blinded}}  # fmt: skip
    path = out.with_name(f"{out.name}_{'blinded' if blinded else 'plain'}.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _run(spec: Path) -> None:
    proc = cli("run", str(spec), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: the statistics' problems (one patient per arm)


def _spillovers(out: Path) -> dict[str, str]:
    """{file name: its content} of the per-batch spillover matrices."""
    return {
        p.name: p.read_text(encoding="utf-8") for p in sorted((out / "study").glob("spillover_site_*.csv"))
    }


def _recorded(out: Path) -> list[str]:
    sets = json.loads((out / "run.json").read_text(encoding="utf-8"))["study_state"]["spillover_sets"]
    return sorted(f"spillover_{sets['column']}_{value}.csv" for value in sets["sets"])


def _code(out: Path) -> str:
    """The code of ARM in the blinded folder (P003's arm in samples.parquet)."""
    samples = pd.read_parquet(out / "samples.parquet").set_index("sample_id")
    return str(samples.loc["P003_W00", "arm"])


def _shown(out: Path) -> str:
    """What a reader of the folder gets: every file's content and every name in it."""
    names = "\n".join(p.relative_to(out).as_posix() for p in out.rglob("*") if ".cache" not in p.parts)
    return visible_text(out) + "\n" + names


def test_a_batch_named_like_an_arm_has_its_spillover_matrix_coded_by_blinding(tmp_path):
    trial = _trial(tmp_path / "trial")
    out = tmp_path / "run"
    _run(_spec(trial, out, blinded=True))  # was exit 2 after all the work
    code = _code(out)
    assert code.startswith("Arm ")
    plain = {"spillover_site_S1.csv", f"spillover_site_{code}.csv"}
    matrices = _spillovers(out)
    assert set(matrices) == plain and _recorded(out) == sorted(plain)
    assert ARM not in _shown(out).lower()

    _run(_spec(trial, out, blinded=True))  # the blinded folder run again (its run writes the batch's name)
    assert _spillovers(out) == matrices and ARM not in _shown(out).lower()

    proc = cli("unblind", str(out), "--key", str(trial / "manifest.csv"))  # named back, as run.json
    assert proc.returncode == 0, proc.stderr[-3000:]
    unblinded = {"spillover_site_S1.csv", f"spillover_site_{ARM}.csv"}
    assert set(_spillovers(out)) == unblinded and _recorded(out) == sorted(unblinded)
    assert _spillovers(out)[f"spillover_site_{ARM}.csv"] == matrices[f"spillover_site_{code}.csv"]

    # blinded by a report (no run): the file named by the code again, nothing refused
    proc = cli("report", str(out), "--blinded")
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = _code(out)
    assert set(_spillovers(out)) == {"spillover_site_S1.csv", f"spillover_site_{code}.csv"}
    assert _recorded(out) == sorted(_spillovers(out)) and ARM not in _shown(out).lower()


def test_a_batch_named_like_an_arm_in_another_case_is_given_back_as_written(tmp_path):
    """The batch ``Placebo`` of the arm ``placebo``: blinding codes it as the arm (a code written in
    the batch's case would tell the arm's case, and so which arm it is); unblinding gives it back as
    the manifest writes it, in the tables, run.json and the file names: as the unblinded run wrote
    them. Before, it came back as ``placebo``."""
    trial = _trial(tmp_path / "trial")
    manifest = pd.read_csv(trial / "manifest.csv")
    manifest["site"] = manifest["site"].replace({ARM: "Placebo"})
    manifest.to_csv(trial / "manifest.csv", index=False)
    plain, out = tmp_path / "plain", tmp_path / "run"
    _run(_spec(trial, plain, blinded=False))
    _run(_spec(trial, out, blinded=True))
    code = _code(out)
    assert set(_spillovers(out)) == {"spillover_site_S1.csv", f"spillover_site_{code}.csv"}
    assert ARM not in _shown(out).lower()

    proc = cli("unblind", str(out), "--key", str(trial / "manifest.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _spillovers(out) == _spillovers(plain)  # was spillover_site_placebo.csv
    assert _recorded(out) == _recorded(plain) == ["spillover_site_Placebo.csv", "spillover_site_S1.csv"]
    for table in ("samples.parquet", "study/spillover_quality.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / table), pd.read_parquet(plain / table), obj=table)
    info, ref = (json.loads((d / "run.json").read_text(encoding="utf-8")) for d in (out, plain))
    assert info["study_state"] == ref["study_state"]
    assert [s.get("control_sets") for s in info["steps"]] == [s.get("control_sets") for s in ref["steps"]]
