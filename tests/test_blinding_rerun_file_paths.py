"""A blinded run whose FCS files are named (or filed) by their arm (``fcs/placebo/P003_W00.fcs``,
``P003_W00_Placebo.fcs``): the run.json of the blinded folder shows no arm.

The tables and run.log code such a path like any text (``fcs/Arm A/P003_W00_Arm A.fcs``). Before,
the rerun record (run.json's ``rerun.inputs.files``: each file's path, size and time, written after
the folder was blinded) kept every path as it is: the arm's name beside the sample in the blinded
run.json. The record now holds the paths coded; a file is not found by its coded path, so the next
run takes the normal path (its caches), never the fast path on a file it did not check."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from tests.blinding_support import visible_text
from tests.pipeline_support import SECTIONS, TEMPLATE, cli_in_process

# the commands run in this process (cli_in_process): these tests check what they write and say,
# not the process, whose start-up (~1 s of imports) was most of a refusal's cost

ARM = "placebo"


def _trial(folder: Path) -> Path:
    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, n_patients=3, visits=(0,), events=3000, control_events=1500, seed=5151,
                   instrument="fortessa")  # fmt: skip
    for name in ("manifest.csv", "clinical.csv"):
        table = pd.read_csv(folder / name, dtype=str, keep_default_na=False)
        table["arm"] = table["arm"].replace({"IL-2 0.2 MIU": ARM})
        if name == "manifest.csv":
            row = table.index[table["sample_id"] == "P003_W00"][0]
            new = Path("fcs") / ARM / "P003_W00_Placebo.fcs"  # a folder per arm; the arm in another case
            (folder / new).parent.mkdir()
            (folder / table.at[row, "file"]).rename(folder / new)
            table.at[row, "file"] = new.as_posix()
        table.to_csv(folder / name, index=False)
    return folder


def test_a_blinded_run_json_shows_no_arm_in_the_paths_of_its_files(tmp_path):
    trial = _trial(tmp_path / "trial")
    out = tmp_path / "run"
    spec = {"study": "files by arm", "manifest": str(trial / "manifest.csv"), "clinical": str(trial / "clinical.csv"),
            "template": str(TEMPLATE), "output": str(out), **SECTIONS, "clustering": {"enabled": False},
            "compensation": {"source": "controls"}, "report": {"enabled": False, "blinded": True}}  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    for _ in range(2):  # the second run: into the blinded folder, from its record
        proc = cli_in_process("run", str(path), "--no-progress", "--scheduler", "synchronous")
        assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: the statistics' problems
        samples = pd.read_parquet(out / "samples.parquet").set_index("sample_id")
        code = samples.loc["P003_W00", "arm"]
        assert samples.loc["P003_W00", "file"] == f"fcs/{code}/P003_W00_{code}.fcs"
        assert (
            ARM not in visible_text(out).lower()
        )  # was: run.json's rerun record, .../placebo/P003_W00_Placebo.fcs
        record = json.loads((out / "run.json").read_text(encoding="utf-8"))["rerun"]["inputs"]["files"]
        assert len(record) == len(pd.read_csv(trial / "manifest.csv"))  # every file, by its coded path
        assert str(trial / "fcs" / code / f"P003_W00_{code}.fcs") in record
    assert "rerun: running the steps (file " in (out / "run.log").read_text(encoding="utf-8")  # not reused
