"""`cytopipe run` on Dask workers: a real LocalCluster of processes, workers killed (one, or the
whole run with kill -9, or Ctrl-C), the executor's tasks and the settings of its workers.

The small simulated trial of tests/test_pipeline.py (its reference run in-process without Dask:
the ``sim_run`` fixture) must come out of every way of running it with the same tables. Split from
tests/test_pipeline.py so that `pytest -n 2 --dist loadfile` can run the two halves side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from cytopipe.errors import WorkflowError
from cytopipe.pipeline import EXIT_FAILURES, EXIT_OK, run_workflow
from tests.pipeline_support import (
    REPO,
    assert_same_outputs,
    cli,
    cli_env,
    workflow,
)


# --------------------------------------------------------------------------------------------
# schedulers: the same tables whatever runs them
# --------------------------------------------------------------------------------------------
def test_a_local_cluster_of_one_worker_gives_identical_outputs(sim_run, sim_trial, tmp_path):
    """(Two workers: the killed-worker, kill -9 and failure tests run on two.)"""
    one = tmp_path / "one"
    before = dict(os.environ)
    result = run_workflow(workflow(sim_trial, one, workers=1), scheduler="local", progress=False)
    # the workers' thread limits are not left in this process's environment (dask's nannies put
    # them there; numba refuses to compile after NUMBA_NUM_THREADS changes under a running pool)
    assert dict(os.environ) == before
    assert result.info["executor"]["workers"] == 1
    assert result.info["executor"]["scheduler"] == "distributed (local)"
    assert_same_outputs(sim_run, one)
    # a rerun reuses every sample and rewrites identical tables
    again = run_workflow(workflow(sim_trial, one), scheduler="synchronous", progress=False)
    assert again.info["cached_samples"] == 8
    assert_same_outputs(sim_run, one)


# --------------------------------------------------------------------------------------------
# resumability: kill -9 of the whole run, then rerun
# --------------------------------------------------------------------------------------------
def test_kill_9_mid_run_then_rerun_gives_identical_outputs(sim_run, sim_trial, tmp_path):
    """Also: two workers give the outputs of the synchronous reference, new files included (gate
    review, clusters and their model, statistics)."""
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "cytopipe", "run", str(sim_trial / "workflow.yaml"), "--out", str(out),
        "--workers", "2", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, env=cli_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    done = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((out / ".cache" / "fit").glob("*.json")) + list(
                (out / ".cache" / "gate").glob("*.json")
            )
            if len(done) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        )
        os.killpg(proc.pid, signal.SIGKILL)  # the client, the scheduler, the nannies and the workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "run.json").exists()
    print(f"\nkilled after {len(done)} cached results")
    assert not _live_processes_in_group(proc.pid), "orphaned worker processes survived the kill"
    rerun = cli("run", str(sim_trial / "workflow.yaml"), "--out", str(out), "--workers", "2", "--no-progress")
    assert rerun.returncode == EXIT_OK, rerun.stderr[-3000:]
    assert_same_outputs(sim_run, out)
    assert not list(out.rglob("*.tmp"))  # no leftover temporary files either
    info = json.loads((out / "run.json").read_text())
    fit = next(s for s in info["steps"] if s["step"] == "gating-fit")
    assert fit["reused"] >= 1  # work done before the kill was not redone


def _live_processes_in_group(pgid: int, wait: float = 10.0) -> list[str]:
    """Processes of the group that are still alive (zombies waiting to be reaped do not count)."""
    deadline = time.monotonic() + wait
    while True:
        ps = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True)
        alive = [
            line for line in ps.stdout.splitlines() if line.split() and not line.split()[1].startswith("Z")
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# a worker process killed while it processes a sample
# --------------------------------------------------------------------------------------------
def _run_and_kill_a_busy_worker(
    sim_trial, out, monkeypatch, allowed_failures: int, keep_killing: bool = False
):
    """Run the trial on a 2-worker LocalCluster (via its address) and SIGKILL a worker while it
    processes a sample; with ``keep_killing``, also every worker that later runs that sample again
    on its own (the run's last attempt). Returns (result, (worker address, task key)).

    Through its address the run's executor takes the cluster for an existing scheduler, which may
    be left without a worker for 30 min (NO_WORKER_TIMEOUT_EXISTING_S) before its samples fail: the
    cluster drops a nanny whose worker is not back within `lost-worker-timeout` (worker_watch.py),
    which a loaded machine can cause. Here the run gives up after the local cluster's timeout instead,
    so that such a run ends (and the test fails on its NoWorker samples) rather than hanging."""
    import dask
    from dask.distributed import Client, LocalCluster

    from cytopipe.pipeline import executors

    monkeypatch.setattr(executors, "NO_WORKER_TIMEOUT_EXISTING_S", executors.NO_WORKER_TIMEOUT_LOCAL_S)

    environ = dict(os.environ)  # a plain LocalCluster's nannies write dask's worker variables here
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    os.environ.clear()
    os.environ.update(environ)  # (MALLOC_TRIM_THRESHOLD_ would reach every later test's workers)
    # the cluster drops a lost worker's nanny when no worker of that name is back within
    # `lost-worker-timeout` (read when the worker is lost), which a loaded CI machine can cause:
    # this test is about the run's handling of a dead worker, not dask's dropping of nannies
    # (tests/test_executor_no_worker.py), so the nannies get all the time they need here
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "600s"}),
        cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)  # worker address -> pid
        box: dict = {}

        def target():
            try:
                box["result"] = run_workflow(
                    workflow(sim_trial, out),
                    scheduler="distributed",
                    address=cluster.scheduler_address,
                    progress=False,
                )
            except BaseException as exc:  # pragma: no cover - reported below
                box["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        victim = None
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and thread.is_alive():
            for addr, keys in client.processing().items():
                busy = [k for k in keys if str(k).startswith(("fit-", "gate-"))]
                if busy and addr in pids:
                    victim = (addr, busy[0])
                    os.kill(pids[addr], signal.SIGKILL)
                    break
            time.sleep(0.005)
        if victim is not None and keep_killing:
            phase, first = str(victim[1]).split("-")[:2]
            again = f"{phase}-{first}-again-"  # executors.DaskExecutor.map's last attempt
            while thread.is_alive() and time.monotonic() < deadline:
                for addr, keys in client.processing().items():
                    if any(str(k).startswith(again) for k in keys):
                        if addr not in pids:
                            pids = client.run(os.getpid)
                        if addr in pids:
                            # the scheduler can list a worker we killed a moment ago until it
                            # notices the death: that worker is gone already, as intended
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pids[addr], signal.SIGKILL)
                time.sleep(0.005)
        thread.join(timeout=600)  # a hang guard, far above the run's time (~1 min) and its timeouts
        assert not thread.is_alive(), "the run did not end"
    assert victim is not None, "no task was seen running on a worker"
    assert "error" not in box, box.get("error")
    print(f"\nkilled worker {victim[0]} while it ran {victim[1]}")
    return box["result"], victim


def test_a_killed_worker_is_survived(sim_run, sim_trial, tmp_path, monkeypatch):
    """The scheduler retries the sample on a live worker (the nanny restarts the dead one)."""
    out = tmp_path / "run"
    result, _ = _run_and_kill_a_busy_worker(sim_trial, out, monkeypatch, allowed_failures=3)
    assert result.exit_code == EXIT_OK, result.summary()
    assert_same_outputs(sim_run, out)


@pytest.mark.slow  # default suite: test_a_sample_that_kills_its_worker_fails_alone and test_a_killed_worker_is_survived
def test_a_sample_whose_worker_keeps_dying_is_recorded_as_failed(sim_trial, tmp_path, monkeypatch):
    """With no retries left (allowed-failures 0), the samples of the dead worker are run again
    alone at the end of the phase; the one whose worker dies again is given up, the batch goes
    on."""
    out = tmp_path / "run"
    result, (_, key) = _run_and_kill_a_busy_worker(
        sim_trial, out, monkeypatch, allowed_failures=0, keep_killing=True
    )
    assert result.exit_code == EXIT_FAILURES
    # only the sample killed again is failed: any queued next to it on the dead worker came
    # through on its second attempt
    failed = result.samples[result.samples["status"] == "failed"]
    assert len(failed) == 1, result.summary()
    assert failed["error"].str.contains("worker died while processing this sample").all()
    assert set(failed["failed_step"]) == {key.split("-")[0]}
    done = result.population_stats["sample_id"].unique()
    assert len(done) == 8 - len(failed) and not set(done) & set(failed["sample_id"])


def test_unreachable_scheduler_is_a_clear_error():
    from cytopipe.pipeline import DaskExecutor

    with pytest.raises(WorkflowError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        DaskExecutor(address="tcp://127.0.0.1:9", connect_timeout=1.0)


def _crash_item(item: dict, shared: str) -> dict:
    if item["kind"] == "crash":  # e.g. a native library's segfault on one file
        os._exit(1)
    if item["kind"] == "raise":
        raise ValueError(f"item {item['i']} is bad")
    return {"i": item["i"], "shared": shared, "pid": os.getpid()}


def test_a_sample_that_kills_its_worker_fails_alone():
    """A file that kills its worker (a native library's crash, or out of memory) fails alone, and
    one that raises fails alone: a worker holds two tasks at a time, and whatever sat next to the
    crashing file on its dying worker is run again at the end of the phase and comes through; every
    other item's result comes back under its own index. (Before, the sample queued next to the
    crash failed with it.)"""
    from cytopipe.pipeline import DaskExecutor
    from cytopipe.pipeline.executors import TaskFailure

    items = [{"i": i, "kind": "ok"} for i in range(30)]
    items[7] = {"i": 7, "kind": "crash"}
    items[12] = {"i": 12, "kind": "raise"}
    # one worker: the task queued next to the crash dies with it every time (dask's allowed-failures,
    # 3: the crash kills the worker 4 times, then 4 more when it runs alone)
    ex = DaskExecutor(workers=1)
    try:
        got = dict(ex.map(_crash_item, items, "shared state", "crash", False))
    finally:
        ex.close()
    assert sorted(got) == list(range(30))
    assert isinstance(got[7], TaskFailure) and got[7].error_type == "KilledWorker"
    assert "a worker died while processing this sample" in got[7].error
    assert isinstance(got[12], TaskFailure) and got[12].error_type == "ValueError"
    assert "item 12 is bad" in got[12].error
    for i in set(range(30)) - {7, 12}:
        assert not isinstance(got[i], TaskFailure), (i, got[i])
        assert got[i]["i"] == i and got[i]["shared"] == "shared state", got[i]


def test_a_submitted_task_runs_on_a_worker_and_says_how_it_ended(tmp_path):
    """``executor.submit`` (the UMAP computed beside the statistics): the result comes back; the
    task's own error is raised as it was raised; a task whose worker died is a TaskError that
    says so, and the clustering-umap step records it as a problem of the run instead of failing
    it. The synchronous executor computes the task when its result is asked for."""
    from cytopipe.pipeline import DaskExecutor, SyncExecutor
    from cytopipe.pipeline.cluster_steps import step_umap
    from cytopipe.pipeline.context import RunContext
    from cytopipe.pipeline.executors import TaskError
    from cytopipe.store import RunFolder

    ex = DaskExecutor(workers=1)
    try:
        # one after another: results held by a worker are lost when it dies, so the two tasks are
        # done (their results fetched) before the one that kills the worker is submitted
        ok = ex.submit(_crash_item, {"i": 1, "kind": "ok"}, "s", desc="t")
        got = ok.result()
        assert got["i"] == 1 and got["shared"] == "s" and got["pid"] != os.getpid()
        bad = ex.submit(_crash_item, {"i": 2, "kind": "raise"}, "s", desc="t")
        with pytest.raises(ValueError, match="item 2 is bad"):
            bad.result()
        dead = ex.submit(_crash_item, {"i": 3, "kind": "crash"}, "s", desc="t")
        ctx = RunContext(wf=None, folder=RunFolder(tmp_path / "run"), executor=ex, progress=False)
        ctx.umap = (dead, "key", None, tmp_path)
        assert step_umap(ctx) == {} and ctx.umap is None
        assert len(ctx.problems) == 1 and ctx.problems[0].startswith(
            "clustering: no UMAP: a worker died"
        )  # a TaskError is one of cytopipe's errors: its message, no traceback in the log
        with pytest.raises(TaskError, match="a worker died"):
            ex.submit(_crash_item, {"i": 4, "kind": "crash"}, "s", desc="t").result()
    finally:
        ex.close()
    later = SyncExecutor().submit(_crash_item, {"i": 5, "kind": "ok"}, "s")
    assert later.result()["pid"] == os.getpid()


def test_tasks_submitted_in_the_same_clock_tick_stay_distinct(monkeypatch):
    """Many submits in a tight loop (the statistics' mixed-model fits): a clock that does not move
    between them must not give two tasks one key (dask would give both the first one's result)."""
    import cytopipe.pipeline.executors as executors
    from cytopipe.pipeline import DaskExecutor

    ex = DaskExecutor(workers=1)
    try:
        monkeypatch.setattr(executors.time, "time_ns", lambda: 1_700_000_000_000_000_000)
        pending = [ex.submit(_crash_item, {"i": i, "kind": "ok"}, "s", desc="fit") for i in range(5)]
        assert [p.result()["i"] for p in pending] == [0, 1, 2, 3, 4]
    finally:
        ex.close()


def _worker_settings() -> dict:
    import dask

    return {
        "tick": dask.config.get("distributed.admin.tick.interval"),
        "profile": dask.config.get("distributed.worker.profile.enabled"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "malloc": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "pid": os.getpid(),
    }


def test_local_workers_get_the_quiet_housekeeping_also_after_a_restart():
    """The local cluster's workers run with dask's housekeeping slowed (QUIET_LOCAL_CLUSTER), one
    BLAS thread and no malloc threshold of dask's; a worker the nanny restarts gets the same; this
    process's dask config and environment are left as they were."""
    import dask
    import distributed  # noqa: F401 - loads dask's `distributed.*` defaults in this process

    from cytopipe.pipeline import DaskExecutor

    before = (dict(os.environ), dask.config.get("distributed.admin.tick.interval"))
    ex = DaskExecutor(workers=1)
    try:
        first = next(iter(ex.client.run(_worker_settings).values()))
        assert first["tick"] == "1s" and first["profile"] is False
        # glibc's malloc thresholds: whatever this process has (dask's 65536 is not added)
        assert first["omp"] == "1" and first["malloc"] == os.environ.get("MALLOC_TRIM_THRESHOLD_")
        ex.client.restart()
        again = next(iter(ex.client.run(_worker_settings).values()))
        assert again["pid"] != first["pid"]
        assert {k: v for k, v in again.items() if k != "pid"} == {
            k: v for k, v in first.items() if k != "pid"
        }
    finally:
        ex.close()
    assert (dict(os.environ), dask.config.get("distributed.admin.tick.interval")) == before


def _heap_kept_after_free() -> float:
    """MB of resident memory a process keeps after freeing a 20 MB array, once a 30 MB one was
    freed before it (glibc's adaptive thresholds then keep up to 60 MB of freed heap)."""
    import numpy as np

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    a = np.ones(30 << 20, np.uint8)  # touched: resident
    del a
    before = rss()
    a = np.ones(20 << 20, np.uint8)
    del a
    return (rss() - before) / 2**20


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_local_workers_give_freed_matrices_back_also_after_a_restart():
    """A sample task's freed event matrix goes back to the system (the ReturnFreedMemory plugin
    fixes glibc's thresholds): with glibc's adaptive ones a worker kept ~20 MB here (the memory
    behind bench/trial.py's peak of 3.6-4.9x the matrix). Also in a worker the nanny restarts."""
    from cytopipe.pipeline import DaskExecutor

    ex = DaskExecutor(workers=1)
    try:
        for restarted in (False, True):
            if restarted:  # bounded waits: a restart that loses its worker fails the test, not hangs it
                ex.client.restart(timeout=120)
                ex.client.wait_for_workers(1, timeout=120)
            kept = ex.client.submit(_heap_kept_after_free, pure=False).result(timeout=300)  # a task thread
            # up to the top pad (8 MiB) stays for the next sample (see the next test)
            assert kept < 10, f"the worker kept {kept:.1f} MB of a freed 20 MB array (restarted: {restarted})"
    finally:
        ex.close()


def _faults_to_reuse_freed(mb: int) -> int:
    """Minor page faults of this thread while it touches an ``mb`` MB array, after an array of
    that size was touched and freed (memory the system gives afresh faults once a page)."""
    import resource

    import numpy as np

    a = np.ones(mb << 20, np.uint8)
    del a
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    a = np.ones(mb << 20, np.uint8)
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    del a
    return faults


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_local_workers_keep_a_top_pad_of_freed_heap_for_the_next_sample():
    """The ReturnFreedMemory plugin's top pad: freeing a sample's arrays leaves up to 8 MiB at the
    top of the heap, so the next sample's arrays of that size reuse those pages instead of
    faulting them in again (with glibc's 128 KiB pad a 6 MB array faulted 482 times, every
    time); also in a worker the nanny restarts."""
    from cytopipe.pipeline import DaskExecutor

    ex = DaskExecutor(workers=1)
    try:
        for restarted in (False, True):
            if restarted:
                ex.client.restart()
            # in a task thread, as samples; the worst of a few tasks (the first one's arena is fresh:
            # its array need not end up at the top of the heap)
            faults = max(ex.client.submit(_faults_to_reuse_freed, 6, pure=False).result() for _ in range(3))
            assert faults < 200, f"{faults} page faults to reuse a freed 6 MB array (restarted: {restarted})"
    finally:
        ex.close()


def test_workers_size_a_task_result_from_its_arrays_and_dtypes():
    """A sample's result is a TaskResult, which the worker sizes with cytopipe's cheap estimate (the
    scheduler records that number), not by sampling every object cell of the review table; the
    result itself is what the synchronous path returns."""
    import numpy as np
    from dask.sizeof import sizeof

    from cytopipe.fcs import read_fcs_header
    from cytopipe.gating import load_template
    from cytopipe.pipeline import DaskExecutor, StudyState
    from cytopipe.pipeline.taskresult import TaskResult, _result_nbytes
    from cytopipe.pipeline.tasks import fit_task
    from cytopipe.qc import QCSettings
    from cytopipe.store import file_sha256

    path = REPO / "sample_data" / "fcs" / "P001_W00.fcs"
    job = {"path": str(path), "file": path.name, "sample_id": "P001_W00", "sha256": file_sha256(path)}
    state = StudyState(
        qc=QCSettings(), template=load_template(REPO / "gating" / "sle_il2_tcell_nk.yaml"),
        compensation="template", seed=0,
    )  # fmt: skip
    here = fit_task(job, state)
    assert type(here) is TaskResult and here["ok"], here.get("error")
    n_events = read_fcs_header(path).n_events
    assert sizeof(TaskResult(cells=np.zeros((n_events, 3), np.float32))) == 64 + 12 * n_events
    ex = DaskExecutor(workers=1)
    try:
        fut = ex.client.submit(fit_task, job, state, pure=False)
        there = fut.result()
        nbytes = ex.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.tasks[fut.key].nbytes)
    finally:
        ex.close()
    assert type(there) is TaskResult
    assert nbytes == _result_nbytes(there)
    for name in ("stats", "review", "fits"):
        pd.testing.assert_frame_equal(there[name], here[name])
    # the review table's lists count as 64 bytes a cell: below dask's own estimate, never above
    assert 0 < nbytes < sizeof(dict(there))


def test_ctrl_c_in_a_terminal_stops_a_run_without_the_workers_tracebacks(tmp_path):
    """Ctrl-C reaches every process of the terminal's process group: the local cluster's workers
    ignore it (each printed a KeyboardInterrupt traceback, ~90 lines), this process stops the run
    (exit 130, 'interrupted') and closes them."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "cytopipe", "run", str(REPO / "workflows" / "sle_il2.yaml"), "--out",
         str(tmp_path / "run"), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=str(REPO),
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # with Ctrl-C's default action, as in a terminal: a child inherits an ignored SIGINT, and
        # pytest started in the background by a non-interactive shell (`pytest &`, nohup) ignores
        # it, so the run never saw the signal and finished with exit 0
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines = []
    for line in proc.stderr:  # wait until the workers are busy
        lines.append(line)
        if "samples" in line and ("pool" in line or "fit" in line):
            break
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    out, err = proc.communicate(timeout=300)
    err = "".join(lines) + err
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; run the same command again to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    # run.log says what stopped the run (it said 'the run stopped: ' and nothing more)
    log = (tmp_path / "run" / "run.log").read_text()
    assert "the run was interrupted (Ctrl-C or SIGINT); run the same command again to resume" in log
