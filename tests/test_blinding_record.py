"""run.json's blinding record keys each code's arm with the folder's secret: the study's arm list is
public, so a salted hash stored next to its salt would give every code's arm at one guess per arm.
A folder that lost its secret (a copy, e.g. the web's new version of a run) still works: its codes
are read off its coded tables joined with the run's manifest, then keyed anew. `cytopipe unblind`
logs no hash of the key, which a folder blinded again would show."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cytopipe.report.blindrecord import KEYED, arm_mac, record_codes
from cytopipe.store import RUN_SECRET, run_secret
from tests.blinding_support import arm_matches, key_digests, matches, visible_text
from tests.pipeline_support import copy_trial
from tests.test_rerun_blinded import _arms, _run


def _shown(run: Path) -> str:
    """What every web role gets of a blinded run: its files, run.json and the results page's data."""
    from cytopipe.serve.results import summary

    return visible_text(run) + json.dumps(summary(run, blinded=True), default=str)


def _record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["blinding"]


def _coded_samples(run: Path) -> dict[str, str]:
    s = pd.read_parquet(run / "samples.parquet")
    return dict(zip(s["sample_id"], s["arm"]))


def test_the_blinding_record_holds_no_hash_a_guessed_arm_name_can_be_checked_against(
    sim_trial, sim_run, tmp_path, capsys
):
    from cytopipe.report import write_report

    trial = copy_trial(sim_trial, tmp_path / "trial")
    arms = _arms(trial)
    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    _run(trial, run, capsys)
    assert arm_matches(arms, _shown(run)) == {}
    record = _record(run)
    assert "salt" not in record and record["codes_hash"] == KEYED
    codes = record_codes(record, arms, run)
    assert sorted(codes.values()) == sorted(record["codes"]) and len(codes) == len(arms)
    assert record["codes"] == {c: arm_mac(run_secret(run), a) for a, c in codes.items()}
    # ... while the attack finds the arms of a record like the old one (salt stored in clear)
    salt = "0123456789abcdef" * 2
    old = {
        c: hashlib.sha256(f"cytopipe-arm\0{salt}\0{a.lower()}".encode()).hexdigest() for a, c in codes.items()
    }
    assert sorted(arm_matches(arms, json.dumps({"salt": salt, "codes": old})).values()) == arms

    # the secret lost: the run works, the codes stay, and the record is keyed with the new secret
    before = _coded_samples(run)
    (run / ".cache" / RUN_SECRET).unlink()
    _run(trial, run, capsys)
    assert _coded_samples(run) == before
    rekeyed = _record(run)
    assert rekeyed["codes"] != record["codes"] and record_codes(rekeyed, arms, run) == codes
    assert arm_matches(arms, _shown(run)) == {}

    # a record written by an older version (salted SHA-256, salt beside it) is read, then keyed
    info = json.loads((run / "run.json").read_text())
    info["blinding"] = {**{k: v for k, v in rekeyed.items() if k != "codes_hash"}, "salt": salt, "codes": old}
    (run / "run.json").write_text(json.dumps(info))
    _run(trial, run, capsys)
    assert "salt" not in _record(run) and record_codes(_record(run), arms, run) == codes
    assert _coded_samples(run) == before and arm_matches(arms, _shown(run)) == {}

    # a copy without .cache (the web's new version of a run): the report is written blinded, with
    # the folder's codes, and the record keyed with the copy's own secret
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".cache"))
    write_report(copy)
    assert (copy / "report.html").is_file() and _coded_samples(copy) == before
    assert record_codes(_record(copy), arms, copy) == codes
    assert _record(copy)["codes"] != rekeyed["codes"] and arm_matches(arms, _shown(copy)) == {}


@pytest.mark.slow  # default suite: the record's hashes in the test above; unblinding in tests/test_report_blinding.py
def test_unblinding_logs_no_hash_of_the_key_and_works_without_the_secret(
    sim_trial, sim_run, tmp_path, capsys
):
    from cytopipe.report import write_report
    from cytopipe.report.unblind import unblind_run

    trial = copy_trial(sim_trial, tmp_path / "trial")
    arms = _arms(trial)
    key = tmp_path / "blind_key.csv"  # written by hand: only 4! possible files
    key.write_text("arm,code\n" + "".join(f"{a},Arm {c}\n" for a, c in zip(arms, "CADB")), encoding="utf-8")
    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    _run(trial, run, capsys, blind_key=str(key))
    (run / ".cache" / RUN_SECRET).unlink()  # e.g. a copied folder: the key is matched through the tables
    done = unblind_run(run, key, report=False)
    assert done["codes"] == dict(zip(arms, ["Arm C", "Arm A", "Arm D", "Arm B"]))
    assert set(_coded_samples(run).values()) - {"", None} == set(arms)
    entry = json.loads((run / "run.json").read_text())["blinding"]["log"][-1]
    assert entry["action"] == "unblinded" and entry["key"] == key.name
    assert matches(key_digests(key), json.dumps(entry)) == []

    info = json.loads((run / "run.json").read_text())  # as an older `cytopipe unblind` logged it
    info["blinding"]["log"][-1]["key_sha256"] = hashlib.sha256(key.read_bytes()).hexdigest()
    (run / "run.json").write_text(json.dumps(info))
    write_report(run, blinded=True, blind_key=key)  # blinded again: the log is kept and shown
    assert [e["action"] for e in _record(run)["log"]][-2:] == ["unblinded", "blinded"]
    assert matches(key_digests(key), _shown(run)) == [] and arm_matches(arms, _shown(run)) == {}
