"""A study on a real Dask cluster: `dask scheduler` and two `dask worker` processes on loopback,
`cytopipe run --scheduler-address`, one worker killed for good (its nanny too) while it processes
a sample. The run completes with every sample once and tables identical to a local run (issue 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.pipeline_support import assert_same_outputs, cli_env, free_port, read_outputs

DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - closed with the process below
    return subprocess.Popen(cmd, env=cli_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


@pytest.mark.timeout(900)
def test_a_worker_lost_mid_run_on_a_real_cluster(sim_run, sim_trial, tmp_path):
    from dask.distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [start([*DASK, "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
                   tmp_path / "scheduler.log")]  # fmt: skip
    run = None
    try:
        client = None
        deadline = time.monotonic() + 120
        while client is None:
            try:
                client = Client(address, timeout=5)
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
                time.sleep(0.5)
        workers = {}
        for name in ("w1", "w2"):
            workers[name] = start(
                [*WORKER, address, "--nthreads", "1", "--nworkers", "1", "--name", name, "--no-dashboard",
                 "--memory-limit", "2GB"],
                tmp_path / f"{name}.log",
            )  # fmt: skip
        client.wait_for_workers(2, timeout=120)
        names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
        out = tmp_path / "run"
        run = subprocess.Popen(
            [sys.executable, "-m", "cytopipe", "run", str(sim_trial / "workflow.yaml"), "--out", str(out),
             "--scheduler-address", address, "--no-progress"],
            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        victim = None
        deadline = time.monotonic() + 600
        while victim is None and run.poll() is None and time.monotonic() < deadline:
            for addr, keys in client.processing().items():
                busy = [str(k) for k in keys if str(k).startswith(("fit-", "gate-"))]
                if busy and addr in names:
                    victim = (names[addr], busy[0])
                    stop(workers[names[addr]])  # worker and nanny: gone for good
                    break
            time.sleep(0.005)
        stdout, stderr = run.communicate(timeout=600)
        assert victim is not None, "no sample task was seen running: " + stderr[-2000:]
        print(f"\nkilled worker {victim[0]} (and its nanny) while it ran {victim[1]}")
        assert run.returncode == 0, stderr[-3000:]
        assert len(client.scheduler_info()["workers"]) == 1
        client.close()
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        for proc in [*locals().get("workers", {}).values(), *procs]:
            stop(proc)
    samples = read_outputs(out)["samples"]
    assert samples["sample_id"].is_unique
    stats = read_outputs(out)["population_stats"]
    assert not stats.duplicated(["sample_id", "population"]).any()
    assert_same_outputs(sim_run, out)  # every table identical to the local (synchronous) run
    pd.testing.assert_frame_equal(samples, read_outputs(sim_run)["samples"])
