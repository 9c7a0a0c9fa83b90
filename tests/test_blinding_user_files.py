"""Blinding rewrites only the files cytopipe wrote in a run folder (cytopipe/report/blindfiles.py).

A user's own file kept there (notes, a copy of the clinical table) is never rewritten: a run, a
`cytopipe report --blinded` that would blind the folder while such a file shows an arm name refuses
before any work (exit 2, the folder byte-identical, the file and the line named); one that shows
no arm stays as it is; unblinding leaves it alone too (a literal ``Arm B`` in it is not a code)."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.pipeline_support import cli
from tests.test_blinded_run_report_tables import _snapshot, _spec

NOTES = "placebo patients P003 and P007: re-acquired\n"
OWN_NOTES = "sample_id,comment\nP001_W00,compare with Arm B of the 2018 study\n"


def _run(spec) -> None:
    proc = cli("run", str(spec), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # default suite: tests/test_blinding_folder_kinds.py (a user's file showing an arm refused before any work; one without arm names kept as it is)
def test_a_users_file_in_a_run_folder_is_never_rewritten_by_blinding(sim_trial, tmp_path):
    out = tmp_path / "run"
    spec = _spec(sim_trial, out, tmp_path)
    plain = spec.with_name("plain.yaml")
    plain.write_text(spec.read_text(encoding="utf-8").replace("blinded: true", "blinded: false"))
    _run(plain)  # an unblinded run folder, where the scientist keeps notes

    notes = out / "notes.txt"
    notes.write_text(NOTES, encoding="utf-8")
    before = _snapshot(out)
    proc = cli("run", str(spec), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"file '{out}': holds a file cytopipe did not write that shows an arm name: notes.txt " \
           "(line 1: 'placebo')" in proc.stderr, proc.stderr[-3000:]  # fmt: skip
    assert "nothing was done. Move the file out of the run folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(out) == before  # nothing blinded, the notes as they were

    # `cytopipe report --blinded` blinds the folder too: refused the same way, nothing written
    proc = cli("report", str(out), "--blinded")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "notes.txt (line 1)" in proc.stderr and "Nothing was written" in proc.stderr
    assert _snapshot(out) == before  # untouched: not even the secret it made to code the arms is left

    # moved out; a user's file without arm names (in cytopipe's own subfolder too) stays as it is
    notes.rename(tmp_path / notes.name)
    own = {out / "my_notes.csv": OWN_NOTES, out / "study" / "remarks.txt": "gates look fine\n"}
    for path, text in own.items():
        path.write_text(text, encoding="utf-8")
    _run(spec)
    for path, text in own.items():
        assert path.read_text(encoding="utf-8") == text
    # cytopipe's own tables are blinded as before
    arms = set(pd.read_parquet(out / "samples.parquet")["arm"].dropna()) - {""}
    assert arms and all(a.startswith("Arm ") for a in arms)
    samples_csv = (out / "report_tables" / "samples.csv").read_text(encoding="utf-8")
    assert "placebo" not in samples_csv and "Arm " in samples_csv

    # unblinding decodes cytopipe's tables only: the literal "Arm B" of the notes is not a code
    proc = cli("unblind", str(out), "--key", str(sim_trial / "manifest.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "placebo" in set(pd.read_parquet(out / "samples.parquet")["arm"])
    for path, text in own.items():
        assert path.read_text(encoding="utf-8") == text
