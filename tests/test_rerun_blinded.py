"""A blinded run records no plain hash of a file that holds the arms (manifest, clinical table,
blinding key): a reader who knows every other column could try each arm assignment until the
SHA-256 matches. It records HMAC-SHA256 keyed with the run folder's secret (``.cache/run.secret``),
so reruns still tell a changed input; a lost secret only means the next run recomputes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cytopipe.pipeline import EXIT_OK, run_workflow
from cytopipe.rerun import KEYED
from cytopipe.store import RUN_SECRET, run_secret
from tests.blinding_support import candidate_digests, key_digests, matches, visible_text
from tests.pipeline_support import cli, copy_trial, workflow
from tests.test_rerun import REUSED, _swap_arms


def _arms(trial: Path) -> list[str]:
    return sorted(
        a for a in set(pd.read_csv(trial / "manifest.csv", dtype=str, keep_default_na=False)["arm"]) if a
    )


def _attack(trial: Path, shown: str, key: Path | None = None) -> dict[str, list[str]]:
    """{input: digests of candidate files found in ``shown``} (empty lists: nothing to match)."""
    arms = _arms(trial)
    found = {
        name: matches(candidate_digests(trial / name, arms), shown)
        for name in ("manifest.csv", "clinical.csv")
    }
    if key is not None:
        found["blind key"] = matches(key_digests(key), shown)
    return found


def _run(trial: Path, run: Path, capsys, **report) -> str:
    wf = workflow(trial, run, report={"enabled": False, "blinded": True, **report})
    result = run_workflow(wf, scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_OK, result.summary()
    return capsys.readouterr().err


def test_a_blinded_cli_run_shows_no_hash_of_its_arms_and_keeps_its_key_private(sim_trial, tmp_path):
    from cytopipe.serve.results import available, download_path, summary

    trial = copy_trial(sim_trial, tmp_path / "trial")
    arms = _arms(trial)
    key = trial / "blind_key.csv"  # written by hand: only 4! possible files
    key.write_text("arm,code\n" + "".join(f"{a},Arm {c}\n" for a, c in zip(arms, "CADB")), encoding="utf-8")
    spec = yaml.safe_load((trial / "workflow.yaml").read_text())
    spec.update(output=str(tmp_path / "run"), workers=2,
                report={"enabled": True, "blinded": True, "blind_key": str(key)})  # fmt: skip
    (trial / "blinded.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    proc = cli("run", str(trial / "blinded.yaml"))  # a Dask LocalCluster
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"

    shown = visible_text(run) + json.dumps(summary(run, blinded=True), default=str)
    assert _attack(trial, shown, key) == {"manifest.csv": [], "clinical.csv": [], "blind key": []}
    info = json.loads((run / "run.json").read_text())
    assert info["rerun"]["inputs"]["hash"] == KEYED
    assert set(info["rerun"]["inputs"]["config_files"]) >= {"manifest", "clinical", "blind key", "workflow"}
    # ... while the same attack finds a plain hash wherever there is one (the check checks)
    import hashlib

    assert matches(candidate_digests(trial / "manifest.csv", arms), hashlib.sha256((trial / "manifest.csv").read_bytes()).hexdigest())  # fmt: skip

    secret = run / ".cache" / RUN_SECRET
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(run_secret(run)) == 32
    assert secret.read_text().strip() not in shown
    assert not any(n.startswith(".") for n in available(run))
    assert download_path(run, f".cache/{RUN_SECRET}") is None and download_path(run, RUN_SECRET) is None
    proc = cli("run", str(trial / "blinded.yaml"))
    assert proc.returncode == 0 and REUSED in proc.stderr, proc.stderr


def test_a_blinded_rerun_is_reused_until_an_input_changes_and_a_lost_key_only_recomputes(
    sim_trial, sim_run, tmp_path, capsys
):
    trial = copy_trial(sim_trial, tmp_path / "trial")
    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    assert REUSED not in _run(trial, run, capsys)
    first = json.loads((run / "run.json").read_text())["rerun"]["inputs"]
    assert first["hash"] == KEYED
    assert REUSED in _run(trial, run, capsys)  # same key, same HMAC: nothing changed

    _swap_arms(trial, "P001", "P002")  # the manifest and clinical table changed (arms only)
    assert REUSED not in _run(trial, run, capsys)
    second = json.loads((run / "run.json").read_text())["rerun"]["inputs"]
    assert second["config_files"]["manifest"] != first["config_files"]["manifest"]
    assert second["config_files"]["clinical"] != first["config_files"]["clinical"]
    assert second["config_files"]["template"] == first["config_files"]["template"]
    assert REUSED in _run(trial, run, capsys)

    (run / ".cache" / RUN_SECRET).unlink()  # the key lost: the steps run (from the cache), no error
    err = _run(trial, run, capsys)
    assert REUSED not in err
    third = json.loads((run / "run.json").read_text())["rerun"]["inputs"]
    assert third["hash"] == KEYED and third["config_files"]["manifest"] != second["config_files"]["manifest"]
    assert REUSED in _run(trial, run, capsys)
    assert _attack(trial, visible_text(run)) == {"manifest.csv": [], "clinical.csv": []}


@pytest.mark.slow
def test_a_folder_blinded_after_its_run_drops_the_plain_hashes_and_codes_need_its_secret(
    sim_trial, sim_run, tmp_path, capsys
):
    from cytopipe.report import write_report
    from cytopipe.report.blinding import arm_codes, record_codes

    trial = copy_trial(sim_trial, tmp_path / "trial")
    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    _run(trial, run, capsys, blinded=False)  # an unblinded run of these paths: plain sha256 recorded
    plain = json.loads((run / "run.json").read_text())["rerun"]["inputs"]
    assert "hash" not in plain and _attack(trial, json.dumps(plain))["manifest.csv"]

    write_report(run, blinded=True)  # `cytopipe report RUN --blinded`: the folder is blinded now
    info = json.loads((run / "run.json").read_text())
    assert "rerun" not in info and _attack(trial, visible_text(run)) == {
        "manifest.csv": [],
        "clinical.csv": [],
    }
    # the codes are seeded with the folder's secret, not only the file hashes every reader sees
    hashes = sorted(pd.read_parquet(run / "samples.parquet")["sha256"].dropna())
    codes = record_codes(info["blinding"], _arms(trial), run)
    assert arm_codes(_arms(trial), secret=run_secret(run) + "\n".join(hashes).encode()) == codes

    assert REUSED not in _run(trial, run, capsys)  # no record: the steps run, and record keyed hashes
    assert json.loads((run / "run.json").read_text())["rerun"]["inputs"]["hash"] == KEYED
    assert REUSED in _run(trial, run, capsys)
    assert _attack(trial, visible_text(run)) == {"manifest.csv": [], "clinical.csv": []}
    assert os.path.isfile(run / ".cache" / RUN_SECRET)
