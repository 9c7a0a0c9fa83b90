"""Unblinding gives a value spelt with an arm's name in another case (the sample ``P003_W00_PLACEBO``
and the clinical table's patient ``P009_PLACEBO`` of the arm ``placebo``) back as written inside the
folder's texts too: run.log's lines, run.json's paths and lists (cytopipe/report/respell.py).

Blinding codes every case of an arm's name alike; the tables' cells holding the whole value were
given their spelling back by column already, but a text holding it came back with the arm's
spelling: run.log's ``no flow data ('P009_placebo')`` where the unblinded run wrote
``'P009_PLACEBO'``, run.json's ``P009_placebo`` and ``fcs/P003_W00_placebo.fcs``. A value that is
the arm's name in another case (a batch ``Placebo``) still comes back as the arm in a text (it
cannot be told from it there: tests/test_blinding_spillover_batches.py), and a line a blinded run
wrote shows ``[arm]`` for it, never the code, so there is nothing to give back."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.pipeline_support import SECTIONS, TEMPLATE, cli


def _trial(folder: Path) -> Path:
    """P003's arm renamed ``placebo``, its sample and file ``P003_W00_PLACEBO``; the clinical table
    with a patient ``P009_PLACEBO`` of that arm without flow data (named in a warning)."""
    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, n_patients=3, visits=(0,), events=3000, control_events=1500, seed=5151,
                   instrument="fortessa")  # fmt: skip
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    clinical = pd.read_csv(folder / "clinical.csv", dtype=str, keep_default_na=False)
    for table in (manifest, clinical):
        table["arm"] = table["arm"].replace({"IL-2 0.2 MIU": "placebo"})
    row = manifest.index[manifest["sample_id"] == "P003_W00"][0]
    (folder / manifest.at[row, "file"]).rename(folder / "fcs" / "P003_W00_PLACEBO.fcs")
    manifest.loc[row, ["file", "sample_id"]] = ["fcs/P003_W00_PLACEBO.fcs", "P003_W00_PLACEBO"]
    extra = clinical[clinical["arm"] == "placebo"].assign(patient_id="P009_PLACEBO")
    manifest.to_csv(folder / "manifest.csv", index=False)
    pd.concat([clinical, extra]).to_csv(folder / "clinical.csv", index=False)
    return folder


def _spec(trial: Path, out: Path, blinded: bool) -> Path:
    spec = {"study": "case", "manifest": str(trial / "manifest.csv"), "clinical": str(trial / "clinical.csv"),
            "template": str(TEMPLATE), "output": str(out), **SECTIONS, "clustering": {"enabled": False},
            "compensation": {"source": "controls"}, "report": {"enabled": False, "blinded": blinded}}  # fmt: skip
    path = out.with_name(f"{out.name}_{blinded}.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _no_flow_data(info: dict) -> list[str]:
    stats = next(s for s in info["steps"] if s.get("step") == "statistics")
    return stats["clinical_patients_without_flow_data"]


@pytest.mark.slow  # an edge case of unblinding (values spelt with an arm in another case)
def test_unblinding_gives_values_spelt_with_an_arm_in_another_case_back_as_written_in_texts(tmp_path):
    trial = _trial(tmp_path / "trial")
    out = tmp_path / "run"
    proc = cli("run", str(_spec(trial, out, blinded=False)), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: the statistics' problems
    plain_log = (out / "run.log").read_text(encoding="utf-8")
    plain_info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    plain_samples = pd.read_parquet(out / "samples.parquet")
    assert "no flow data ('P009_PLACEBO')" in plain_log and _no_flow_data(plain_info) == ["P009_PLACEBO"]

    # the same folder blinded by a run (its run.log's earlier lines coded), then unblinded
    proc = cli("run", str(_spec(trial, out, blinded=True)), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    log = (out / "run.log").read_text(encoding="utf-8")
    assert "placebo" not in log.lower() and "'P009_Arm " in log
    proc = cli("unblind", str(out), "--key", str(trial / "manifest.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = (out / "run.log").read_text(encoding="utf-8")
    assert log.startswith(plain_log)  # was: no flow data ('P009_placebo')
    assert "no flow data ('P009_[arm]')" in log[len(plain_log) :]  # the blinded run's line: masked
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert _no_flow_data(info) == ["P009_PLACEBO"]  # was P009_placebo
    files = sorted(info["rerun"]["inputs"]["files"])
    assert files == sorted(plain_info["rerun"]["inputs"]["files"])  # was .../P003_W00_placebo.fcs
    assert str(trial / "fcs" / "P003_W00_PLACEBO.fcs") in files
    assert info["workflow"]["statistics"] == plain_info["workflow"]["statistics"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "samples.parquet"), plain_samples)
