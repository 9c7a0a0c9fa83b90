"""`cytopipe run` against a second run, leftovers of killed runs, a filling disk, a read-only folder,
FIFOs, devices and files that are not FCS (issue 11, defects 2, 4-9)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd

from cytopipe.errors import EXIT_FAILURES, EXIT_INPUT, EXIT_OK, EXIT_OUTPUT
from tests.disk_support import fill, remount, small_tmpfs, temp_files
from tests.pipeline_support import (
    TEMPLATE,
    assert_same_outputs,
    cli,
    cli_env,
    copy_trial,
    forget_rerun_record,
    read_outputs,
)

SYNC = ("--scheduler", "synchronous", "--no-progress")


def run_cli(trial, out, *extra):
    return cli("run", str(trial / "workflow.yaml"), "--out", str(out), *SYNC, *extra)


# --- the lock -------------------------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused_and_a_stale_lock_taken_over(
    sim_run, sim_trial, tmp_path
):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "cytopipe", "run", str(sim_trial / "workflow.yaml"), "--out", str(out), *SYNC],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lock = out / ".cytopipe.lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        # paused while it holds the lock: under load a short run could otherwise finish (and
        # release the lock) while the second one starts, and the kill below would find it gone
        os.kill(first.pid, signal.SIGSTOP)
        holder = json.loads(lock.read_text())
        assert (
            holder["pid"] == first.pid and holder["command"] == "run" and holder["host"] and holder["since"]
        )
        second = run_cli(sim_trial, out)
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
        assert second.returncode == EXIT_OUTPUT, second.stderr
        assert "in use by another cytopipe command" in second.stderr
        assert f"pid {first.pid} on host {holder['host']}" in second.stderr
        # the first run is killed (-9) while holding the lock: its lock file stays, naming a dead pid
        first.kill()
        assert first.wait() == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid
    third = run_cli(sim_trial, out)
    assert third.returncode == EXIT_OK, third.stderr[-3000:]
    log = (out / "run.log").read_text()
    assert "took over a stale lock" in log and f"'pid': {first.pid}" in log
    assert_same_outputs(sim_run, out)
    assert lock.read_text() == ""  # released
    assert temp_files(out) == []


# --- leftovers of killed runs ---------------------------------------------------------------------
def test_a_resumed_run_removes_orphan_temporary_files(sim_run, sim_trial, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sim_run, out)
    orphans = [
        out / ".catalog.duckdb.k2j4h1.tmp",
        out / ".catalog.duckdb.k2j4h1.tmp.wal",
        out / ".samples.parquet.x81.tmp",
        out / ".cache" / "gate" / ".abc-def.json.q1.tmp",
        out / "study" / ".gate_fits.parquet.zz.tmp",
        out / "clustering" / ".model.npz.m.tmp",
    ]
    keep = [out / "notes.tmp", out / "study" / "my.tmp"]  # not cytopipe's temporary names
    for p in orphans + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    proc = run_cli(sim_trial, out)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert [p for p in orphans if p.exists()] == []
    assert all(p.exists() for p in keep)
    assert "removed 6 temporary files left by an interrupted run" in (out / "run.log").read_text()
    assert_same_outputs(sim_run, out)


# --- invalid input: nothing is created ------------------------------------------------------------
def test_an_invalid_template_leaves_no_run_folder(sim_trial, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TEMPLATE.read_text().replace("parent:", "parnet:", 1))
    out = tmp_path / "run"
    proc = cli(
        "run", "--manifest", str(sim_trial / "manifest.csv"), "--template", str(bad), "--out", str(out), *SYNC
    )
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "bad.yaml" in proc.stderr
    assert not out.exists()


# --- a full disk mid-run, then resume --------------------------------------------------------------
def test_a_disk_filling_mid_run_says_which_file_and_the_rerun_resumes(sim_run, sim_trial, tmp_path):
    with small_tmpfs(tmp_path / "mnt", "16m") as mnt:
        out = mnt / "run"
        # room for about half of the per-sample cache: the disk fills during the gating phases
        filler = fill(mnt, leave=700_000)
        proc = run_cli(sim_trial, out)
        assert proc.returncode == EXIT_OUTPUT, proc.stderr[-3000:]
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith("cytopipe run: error: file '" + str(out)), error
        assert "No space left on device" in error and "rerun the same command: the run resumes" in error
        assert "Traceback" not in proc.stderr
        assert not (out / "run.json").exists()
        assert temp_files(out) == []
        cached = len(list((out / ".cache").rglob("*.json")))
        assert cached > 0
        filler.unlink()  # space freed: the same command resumes and ends as an uninterrupted run
        again = run_cli(sim_trial, out)
        assert again.returncode == EXIT_OK, again.stderr[-3000:]
        assert_same_outputs(sim_run, out)
        assert temp_files(out) == []

        # The case: a rerun of a finished run on a nearly full disk emptied catalog.duckdb and
        # exited 0. Now the old catalog stays and the run fails with exit 4, naming the catalog.
        good = (out / "catalog.duckdb").read_bytes()
        forget_rerun_record(out)  # the normal path (with nothing changed, nothing would be written)
        fill(mnt, leave=(out / "catalog.duckdb").stat().st_size // 2)  # the tables fit, the catalog not
        proc = run_cli(sim_trial, out)
        assert proc.returncode == EXIT_OUTPUT, proc.stderr[-3000:]
        assert "catalog.duckdb" in proc.stderr and "No space left on device" in proc.stderr
        assert (out / "catalog.duckdb").read_bytes() == good
        assert_same_outputs(sim_run, out)  # tables and catalog as in the reference run
        assert temp_files(out) == []


def test_a_read_only_run_folder_is_a_clear_error(sim_trial, tmp_path):
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        out = mnt / "run"
        out.mkdir()
        remount(mnt, "ro")
        proc = run_cli(sim_trial, out)
        remount(mnt, "rw")
    assert proc.returncode == EXIT_OUTPUT, proc.stderr[-3000:]
    assert "Read-only file system" in proc.stderr and "the folder is read-only" in proc.stderr
    assert str(out) in proc.stderr and "Traceback" not in proc.stderr


# --- a batch with a corrupt, a missing, a FIFO and a non-FCS file ----------------------------------
def test_a_batch_with_four_bad_files_completes_with_exit_3(sim_run, sim_trial, tmp_path):
    trial = copy_trial(sim_trial, tmp_path / "trial")
    fcs = trial / "fcs"
    data = (fcs / "P001_W00.fcs").read_bytes()
    (fcs / "corrupt.fcs").write_bytes(data[: len(data) // 2])
    os.mkfifo(fcs / "fifo.fcs")
    (fcs / "passwd.fcs").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (fcs / "zero.fcs").symlink_to("/dev/zero")
    manifest = trial / "manifest.csv"
    rows = [
        "fcs/corrupt.fcs,X_CORRUPT,P001,8,{arm}",
        "fcs/missing.fcs,X_MISSING,P001,9,{arm}",
        "fcs/fifo.fcs,X_FIFO,P001,10,{arm}",
        "fcs/passwd.fcs,X_TEXT,P001,11,{arm}",
        "fcs/zero.fcs,X_DEVICE,P001,12,{arm}",
    ]
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    arm = table.loc[table["patient_id"] == "P001", "arm"].iloc[0]
    header = list(table.columns)
    with open(manifest, "a", encoding="utf-8") as fh:
        for row in rows:
            cells = row.format(arm=arm).split(",")
            fh.write(",".join(cells + [""] * (len(header) - len(cells))) + "\n")
    out = tmp_path / "run"
    proc = cli("run", str(trial / "workflow.yaml"), "--out", str(out), "--workers", "2", "--no-progress",
               timeout=900)  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == EXIT_FAILURES, proc.stderr[-3000:]
    samples = read_outputs(out)["samples"].set_index("sample_id")
    failed = samples[samples["status"] == "failed"]["error"]
    assert sorted(failed.index) == ["X_CORRUPT", "X_DEVICE", "X_FIFO", "X_MISSING", "X_TEXT"]
    assert "DATA" in failed["X_CORRUPT"] and "corrupt.fcs" in failed["X_CORRUPT"]
    assert "not found" in failed["X_MISSING"] and "missing.fcs" in failed["X_MISSING"]
    assert "not a regular file: a FIFO" in failed["X_FIFO"] and "fifo.fcs" in failed["X_FIFO"]
    assert "not a regular file: a character device" in failed["X_DEVICE"]
    assert "not an FCS file (no FCS header)" in failed["X_TEXT"] and "passwd.fcs" in failed["X_TEXT"]
    # the manifest's path and the resolved one
    assert str(fcs / "fifo.fcs") in failed["X_FIFO"] and "'fcs/fifo.fcs'" in failed["X_FIFO"]
    for error in failed:
        assert "root:x" not in error  # never the file's content
    assert "root:x" not in (out / "run.log").read_text() and "root:x" not in proc.stdout
    # run.log: the one-line error of each failed sample and its full traceback (one line in the table)
    log = (out / "run.log").read_text()
    assert "sample X_CORRUPT (file fcs/corrupt.fcs) failed at step register" in log
    assert "Traceback (most recent call last)" in log and "FCSDataError" in log
    assert all("\n" not in e and "Traceback" not in e for e in failed)
    # every other sample exactly as in the reference run
    ref = read_outputs(sim_run)
    got = read_outputs(out)
    pd.testing.assert_frame_equal(got["population_stats"], ref["population_stats"])
    ok = samples.drop(index=failed.index).reset_index()
    pd.testing.assert_frame_equal(ok, ref["samples"].reset_index(drop=True), check_dtype=False)
    info = json.loads((out / "run.json").read_text())
    assert info["problems"] == []


# --- --debug --------------------------------------------------------------------------------------
def test_debug_with_the_synchronous_scheduler_lets_the_exception_propagate(sim_trial, tmp_path):
    trial = copy_trial(sim_trial, tmp_path / "trial")
    data = (trial / "fcs" / "P003_W04.fcs").read_bytes()
    (trial / "fcs" / "P003_W04.fcs").write_bytes(data[: len(data) // 2])
    proc = run_cli(trial, tmp_path / "run", "--debug")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "FCSDataError" in proc.stderr
    proc = cli("run", str(trial / "workflow.yaml"), "--out", str(tmp_path / "o"), "--debug")
    assert proc.returncode == EXIT_INPUT and "--debug needs --scheduler synchronous" in proc.stderr


def test_exit_codes_are_documented_in_help_and_readme():
    from tests.pipeline_support import REPO

    for args in (["--help"], ["run", "--help"], ["validate", "--help"], ["export", "--help"]):
        out = cli(*args).stdout.replace("\n", " ")
        out = " ".join(out.split())
        for code in ("0 done", "2 ", "3 completed with failures", "4 ", "1 internal error"):
            assert code in out, (args, code)
    readme = (REPO / "README.md").read_text()
    assert "## Exit codes" in readme
