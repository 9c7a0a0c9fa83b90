"""A blinded run folder holds no hash of a report table written before it was blinded
(cytopipe/report/tables_folder.py, docs/reports.md "Blinded run folders").

The report's record of its tables (``report_tables/.cytopipe-report-tables.json``) keeps, for a
table the user edited since the report wrote it, the SHA-256 the report wrote (so that the next
report still tells it from the user's own files). When the folder is then blinded by a run without
a report, the edited table stays (it shows no arm: the user took the arm column out) and so did
that SHA-256: the hash of the **unblinded** table. A blinded reader knows every cell of it but the
arms (the edited copy, or the folder's coded tables), so writing it once per assignment of the
arms to the codes and hashing finds the assignment. Now blinding drops those hashes: the record
still lists the table as edited (a report still refuses it, the user decides where it goes), with
no hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re

import pytest
import yaml

from tests.pipeline_support import SECTIONS, TEMPLATE, cli_in_process
from tests.test_blinded_run_report_tables import ARMS

# the commands run in this process (cli_in_process): these tests check what they write and say,
# not the process, whose start-up (~1 s of imports) was most of a refusal's cost

RECORD = ".cytopipe-report-tables.json"


def _spec(trial, out, path, **report) -> str:
    spec = {"study": "simulated trial", "manifest": str(trial / "manifest.csv"),
            "clinical": str(trial / "clinical.csv"), "template": str(TEMPLATE), "output": str(out),
            **SECTIONS, "report": report}  # fmt: skip
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return str(path)


def _every_assignment(text: str) -> dict[str, bool]:
    """{sha256: is the true table} of ``text`` with the arms exchanged in every possible way (what a
    reader can write who knows the table but which arm each code is)."""
    pattern = re.compile("|".join(re.escape(a) for a in sorted(ARMS, key=len, reverse=True)))
    out = {}
    for perm in itertools.permutations(ARMS):
        swap = dict(zip(ARMS, perm))
        out[hashlib.sha256(pattern.sub(lambda m, swap=swap: swap[m.group(0)], text).encode()).hexdigest()] = (
            perm == ARMS
        )
    assert sum(out.values()) == 1
    return out


@pytest.mark.slow
def test_blinding_drops_the_hashes_of_tables_written_before(sim_trial, tmp_path):
    out = tmp_path / "run"
    proc = cli_in_process("run", _spec(sim_trial, out, tmp_path / "plain.yaml", enabled=True, blinded=False),
                          "--no-progress", "--scheduler", "synchronous")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = out / "report_tables"
    written = {p.name: p.read_text(encoding="utf-8") for p in tables.glob("*.csv")}
    with_arms = {n: t for n, t in written.items() if "placebo" in t}
    assert "samples.csv" in with_arms and "dynamics_by_arm.csv" in with_arms

    # the user takes the arm column out of the samples table (to share it), then blinds the folder
    rows = list(csv.reader(io.StringIO(written["samples.csv"])))
    arm = rows[0].index("arm")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([r[:arm] + r[arm + 1 :] for r in rows])
    (tables / "samples.csv").write_text(buf.getvalue(), encoding="utf-8")
    record = json.loads((tables / RECORD).read_text(encoding="utf-8"))
    assert (
        record["files"]["samples.csv"]["sha256"]
        == hashlib.sha256(written["samples.csv"].encode()).hexdigest()
    )
    proc = cli_in_process("run", _spec(sim_trial, out, tmp_path / "blinded.yaml", enabled=False, blinded=True),
                          "--no-progress", "--scheduler", "synchronous")  # fmt: skip
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    assert (
        not (out / "report.html").exists()
        and (tables / "samples.csv").read_text(encoding="utf-8") == buf.getvalue()
    )

    # no hash of any table written before blinding, nor of any other assignment of its arms
    candidates = {d: n for n, t in with_arms.items() for d in _every_assignment(t)}
    candidates |= {hashlib.sha256(t.encode()).hexdigest(): n for n, t in written.items()}
    shown = "\n".join(p.read_bytes().decode("latin-1") for p in out.rglob("*")
                      if p.is_file() and ".cache" not in p.relative_to(out).parts)  # fmt: skip
    hexes = set(re.findall(r"[0-9a-f]{64}", shown))
    assert {candidates[h] for h in hexes if h in candidates} == set()
    # the record still lists the edited table (no hash), so a report refuses it, not replaces it
    record = json.loads((tables / RECORD).read_text(encoding="utf-8"))
    assert set(record["changed"]) == {"samples.csv"}
    proc = cli_in_process("report", str(out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "samples.csv (a table an earlier report wrote, changed since)" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow  # default suite: tests/test_blinding_folder_kinds.py (reports written elsewhere in the folder are removed when it is blinded)
def test_a_run_that_blinds_the_folder_removes_every_unblinded_report(sim_trial, tmp_path):
    """A run that blinds a folder writes its tables coded, so often nothing else in the folder needs
    recoding; its reports (``report_tables/`` without its report.html, an ``--out`` report beside
    its tables) were then kept, unblinded: every arm name in the blinded folder. Now they go."""
    out = tmp_path / "run"
    proc = cli_in_process("run", _spec(sim_trial, out, tmp_path / "plain.yaml", enabled=True, blinded=False),
                          "--no-progress", "--scheduler", "synchronous")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli_in_process("report", str(out), "--out", str(out / "interim.html"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "report.html").unlink()  # its tables stay
    assert "placebo" in (out / "report_tables" / "samples.csv").read_text(encoding="utf-8")
    assert "placebo" in (out / "interim_tables" / "samples.csv").read_text(encoding="utf-8")
    proc = cli_in_process("run", _spec(sim_trial, out, tmp_path / "blinded.yaml", enabled=False, blinded=True),
                          "--no-progress", "--scheduler", "synchronous")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed interim.html and the tables it wrote in interim_tables/" in proc.stderr
    assert not any(p.exists() for p in (out / "report_tables", out / "interim_tables", out / "interim.html"))
    pattern = re.compile("|".join(re.escape(a) for a in ARMS), re.IGNORECASE)
    named = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.suffix in (".csv", ".html", ".json", ".log")
             and pattern.search(p.read_text(encoding="utf-8", errors="replace"))]  # fmt: skip
    assert named == []


def test_the_report_cache_key_of_a_blinded_folder_needs_its_secret(sim_run, tmp_path):
    """The name of the report's marker (``.cache/report/<key>.json``: what the last report was made
    from) hashes the clinical table, which holds the arms: in a blinded folder it is keyed with the
    folder's secret, so that it cannot be computed again from a guess of the table without it."""
    import shutil

    from cytopipe.report.build import report_key
    from cytopipe.store import RUN_SECRET

    out = tmp_path / "run"
    shutil.copytree(sim_run, out)
    clinical = json.loads((sim_run / "run.json").read_text(encoding="utf-8"))["workflow"]["clinical"]
    proc = cli_in_process("report", str(out), "--blinded", "--clinical", clinical)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    [marker] = (out / ".cache" / "report").glob("*.json")
    options = dict(blinded=True, out=out / "report.html", blind_key=None, clinical=clinical, max_gallery=36)
    assert report_key(out, **options) == marker.stem  # the key as the next report computes it
    secret = out / ".cache" / RUN_SECRET
    secret.rename(tmp_path / RUN_SECRET)  # what a reader without the folder's secret can compute
    assert report_key(out, **options) != marker.stem
