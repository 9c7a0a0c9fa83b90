"""A blinded run folder run again, in a study whose manifest names a site ``Placebo`` (the arm
``placebo`` in another case) and a batch ``placebo`` (the arm's own name): the rerun (nothing
changed, then one sample's file changed, the others' results taken from the run's cache) exits as
the first run did, leaves no arm name in any case anywhere in the folder, and writes the first
run's tables when nothing changed; unblinding either folder with the manifest gives back the
tables an unblinded run of the same study wrote (``Placebo`` and ``placebo`` as written).

Written as proof: all of it held when the test was written (2026-12-07). On the code before the
case fix (53d58af) it fails at the first unblinding (``spillover_site_placebo.csv``, site
``placebo``); the folder scan finds a name put back into a table cell, ``.cache/`` or a file name."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.pipeline_support import cli
from tests.test_blinding_folder_kinds import _texts
from tests.test_blinding_spillover_batches import _spec
from tests.test_rerun import REUSED

# ~40 s of real runs for a path the default suite covers in parts (test_rerun_blinded.py,
# test_blinding_spillover_batches.py), and that suite is over its time budget: run with `-m slow`
pytestmark = pytest.mark.slow

ARM = "placebo"  # P003's arm (IL-2 0.2 MIU renamed)
ARMS = ("IL-2 1.0 MIU", "IL-2 0.5 MIU", ARM)
#: every arm name in any case, and the doses alone
WANTED = re.compile("|".join(re.escape(a) for a in (*ARMS, "0.5 MIU", "1.0 MIU")), re.IGNORECASE)


def _trial(folder: Path) -> Path:
    """Three patients, one visit; P002's site (and its controls') ``Placebo``, the batch of P001
    and P003 ``placebo``."""
    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, n_patients=3, visits=(0,), events=3000, control_events=1500, seed=5151,
                   instrument="fortessa")  # fmt: skip
    for name in ("manifest.csv", "clinical.csv"):
        table = pd.read_csv(folder / name, dtype=str, keep_default_na=False)
        table["arm"] = table["arm"].replace({"IL-2 0.2 MIU": ARM})
        if name == "manifest.csv":
            table["site"] = table["site"].replace({"S3": "Placebo"})
            table["batch"] = table["batch"].replace({"S1-2020W04": ARM})
        table.to_csv(folder / name, index=False)
    return folder


def _run(spec: Path) -> tuple[int, str]:
    proc = cli("run", str(spec), "--no-progress", "--scheduler", "synchronous")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: the statistics' problems (one patient per arm)
    return proc.returncode, proc.stderr


def _reused(out: Path) -> dict[str, int]:
    """``{step: per-sample results taken from the run's cache}`` of the last run of ``out``."""
    steps = json.loads((out / "run.json").read_text(encoding="utf-8"))["steps"]
    return {s["step"]: s["reused"] for s in steps if s["step"] in ("gating-fit", "gating")}


def _tables(out: Path) -> dict[str, pd.DataFrame | str]:
    """Every table of the run folder and of its study/ folder (Parquet), and the CSV files of study/
    (the spillover matrices, named by their site) and of report_tables/ (text)."""
    paths = [*out.glob("*.parquet"), *(out / "study").glob("*.parquet")]
    tables: dict[str, pd.DataFrame | str] = {p.relative_to(out).as_posix(): pd.read_parquet(p) for p in paths}
    for p in [*(out / "study").glob("*.csv"), *(out / "report_tables").glob("*.csv")]:
        tables[p.relative_to(out).as_posix()] = p.read_text(encoding="utf-8")
    return dict(sorted(tables.items()))


def _same_tables(got: dict[str, pd.DataFrame | str], ref: dict[str, pd.DataFrame | str]) -> None:
    assert list(got) == list(ref)
    for name, table in ref.items():
        if isinstance(table, str):
            assert got[name] == table, name
        else:
            pd.testing.assert_frame_equal(got[name], table, obj=name)


def _arms_in(out: Path) -> dict[str, list[str]]:
    """``{file: [where it names an arm]}`` of every file under ``out`` (``.cache/`` included), and of
    the file names."""
    found = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        hits = ["name"] if WANTED.search(rel) else []
        if path.is_file():
            hits += [where for where, text in _texts(path).items() if WANTED.search(text)]
        if hits:
            found[rel] = hits
    return found


def _unblinded(out: Path, copy: Path, trial: Path, report: bool = False) -> dict[str, pd.DataFrame | str]:
    """The tables of a copy of ``out`` unblinded with the manifest (without the report's tables
    unless ``report``: the unblinded report is written from the unblinded tables)."""
    shutil.copytree(out, copy)
    proc = cli(
        "unblind", str(copy), "--key", str(trial / "manifest.csv"), *([] if report else ["--no-report"])
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _tables(copy)


def _without_report(tables: dict[str, pd.DataFrame | str]) -> dict[str, pd.DataFrame | str]:
    return {name: table for name, table in tables.items() if not name.startswith("report_tables/")}


def test_a_blinded_folder_run_again_stays_blinded_and_unblinds_to_the_unblinded_runs_tables(tmp_path):
    trial = _trial(tmp_path / "trial")
    plain, out = tmp_path / "plain", tmp_path / "run"
    _run(_spec(trial, plain, blinded=False))
    code, _ = _run(_spec(trial, out, blinded=True))
    assert _arms_in(out) == {}
    first, reference = _tables(out), _tables(plain)
    assert "study/spillover_site_Placebo.csv" in reference  # the unblinded run's own spelling
    _same_tables(_unblinded(out, tmp_path / "first_unblinded", trial), _without_report(reference))

    # run again, nothing changed: every output reused
    again, err = _run(_spec(trial, out, blinded=True))
    assert again == code and REUSED in err, err[-3000:]
    assert _arms_in(out) == {}
    _same_tables(_tables(out), first)
    # ... and with a file touched (the same bytes): the steps run, every sample's results cached
    fcs = trial / "fcs" / "P002_W00.fcs"
    os.utime(fcs, ns=(fcs.stat().st_atime_ns, fcs.stat().st_mtime_ns + 10**9))
    assert _run(_spec(trial, out, blinded=True))[0] == code
    assert _reused(out) == {"gating-fit": 3, "gating": 3}
    assert _arms_in(out) == {}
    _same_tables(_tables(out), first)
    _same_tables(_unblinded(out, tmp_path / "again_unblinded", trial), _without_report(reference))

    # P002's file changed (its site is Placebo): its results computed again, the others' pass-1
    # fits from the cache (pass 2 runs again for all: the pooled gates changed)
    from cytopipe.fcs import read_fcs, write_fcs

    sample = read_fcs(fcs)
    write_fcs(
        fcs, sample.events[:2500], sample.channels, keywords=sample.keywords, spillover=sample.spillover
    )
    _run(_spec(trial, plain, blinded=False))
    assert _run(_spec(trial, out, blinded=True))[0] == code
    assert _reused(out) == _reused(plain) == {"gating-fit": 2, "gating": 0}
    assert _arms_in(out) == {}
    changed = _tables(out)
    assert not changed["population_stats.parquet"].equals(first["population_stats.parquet"])
    _same_tables(_unblinded(out, tmp_path / "changed_unblinded", trial, report=True), _tables(plain))
