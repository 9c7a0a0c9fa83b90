"""Benchmark: the pipeline's per-sample tasks on N simulated files of 200k events.

Measured side by side in one process, on the same files (written once by the simulator):

* **plain loop**: the pipeline's per-sample function (read -> event QC -> compensate ->
  transform -> gate -> per-sample table) called in a loop in this process;
* **Dask, 1 worker** and **Dask, 2 workers**: the same function as whole-sample tasks on a
  LocalCluster of processes (1 thread each, BLAS limited to 1 thread), warm (started and
  warmed up before timing), so the numbers are the per-sample throughput of a long run;
* **FlowKit** ``Session.analyze_samples`` (its own multiprocessing, ``use_mp=True``) on the same
  files and the same fixed gates (exported as Gating-ML), for comparison;
* the full canonical template (data-driven gates) on 2 workers as the run gates it: one fused
  pass (fits, statistics, review data), pooled estimates, pass 2 only for the samples whose gates
  used them; which gives the extrapolated gating time of a full trial (500 patients x 7 visits);
* a discrete-event model of 1, 2, 8 and 32 workers fed with the measured task times, per-task
  Dask overhead and the 2-worker slowdown (what a 32-core node buys).

Reported: events/s, speed-up of 2 workers over 1, Dask overhead over the plain loop (1 worker),
peak RSS per worker above its warm idle RSS relative to one file's event matrix, and FlowKit's
time. Goals: speed-up >= 1.7, Dask overhead < 10%, peak RSS per worker <= 3x one file's
matrix. Every variant is warmed up first; min and median of ``--repeat`` runs are printed.
Timings on a shared machine are noisy; compare the ratios.

    python bench/scaling.py [--files 16] [--events 200000] [--repeat 5] [--data DIR] [--no-flowkit]
    python bench/scaling.py --files 24 --events 50000 --repeat 3 --no-flowkit   # a few minutes
    python bench/scaling.py --files 24 --events 200000                          # the issue's figures

For the issue-17 figures, on a quiet machine, run exactly:

    python bench/scaling.py --files 24 --events 200000 --repeat 5

Besides wall times it prints the CPU seconds of each variant: this process (the plain loop; for
Dask the client, scheduler and nannies) and the worker processes, so that Dask's own cost can be
told apart from other load on a shared machine (CPU time barely moves with it; wall time does).
"""

from __future__ import annotations

import os

# whole-sample tasks are compute-dense; the loop runs with BLAS on one thread like the workers
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"
FULL_TRIAL_FILES = 500 * 7


def simulate(data: Path, files: int, events: int) -> tuple[list[dict], dict]:
    """N sample files of ~``events`` events (+-30%) and one small warm-up file; written once."""
    from cytopipe.pipeline import _load_manifest, split_jobs
    from cytopipe.simulate import simulate_trial

    big, small = data / f"trial_{files}x{events}", data / "warmup"
    if not (big / "manifest.csv").exists():
        simulate_trial(big, n_patients=math.ceil(files / 2), visits=(0, 4), events=events, seed=31,
                       control_events=500, overwrite=True)  # fmt: skip
    if not (small / "manifest.csv").exists():
        simulate_trial(
            small, n_patients=1, visits=(0,), events=5000, seed=32, control_events=500, overwrite=True
        )
    jobs = split_jobs(_load_manifest(big / "manifest.csv"))[0][:files]
    warm = split_jobs(_load_manifest(small / "manifest.csv"))[0][0]
    return jobs, warm


def with_sha(jobs):
    from cytopipe.store import file_sha256

    for j in jobs:
        j["sha256"] = file_sha256(j["path"])
    return jobs


def timed(fn, repeat: int) -> tuple[float, float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def gate_task_rss(job, state):
    """gate_task, with the worker's RSS sampled every 2 ms while it runs (peak vs start)."""
    import threading

    import psutil

    from cytopipe.pipeline import gate_task

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = gate_task(job, state)
    finally:
        stop.set()
        th.join()
    from dask.distributed import get_worker

    return {"ok": out["ok"], "rss_start": start, "rss_peak": peak[0], "worker": get_worker().address}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def cpu_s() -> float:
    """CPU seconds of the calling process so far (run on each worker by ``client.run``)."""
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "cytopipe-bench-scaling")
    ap.add_argument("--no-flowkit", action="store_true")
    args = ap.parse_args()
    import logging

    # several clusters start and stop here; each restores the log levels it found on closing
    logging.getLogger("distributed").setLevel(logging.ERROR)

    from cytopipe import gating
    from cytopipe.fcs import read_fcs
    from cytopipe.pipeline import DaskExecutor, StudyState, gate_task
    from cytopipe.qc import QCSettings

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    jobs, warm = simulate(args.data, args.files, args.events)
    jobs, warm = with_sha(jobs), with_sha([warm])[0]
    shapes = [read_fcs(j["path"]).events.shape for j in jobs]
    for j, shape in zip(jobs, shapes):  # as the run's register step records it
        j["n_events"] = shape[0]
    n_events = sum(s[0] for s in shapes)
    matrix_mb = max(s[0] * s[1] * 4 for s in shapes) / 2**20
    print(f"{len(jobs)} files, {n_events:,} events ({n_events / len(jobs):,.0f} per file, "
          f"{shapes[0][1]} channels; largest event matrix {matrix_mb:.1f} MB); data ready in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip

    # fixed gates: the canonical template fitted on the first file
    canonical = gating.load_template(TEMPLATE)
    fitted = gating.gate(read_fcs(jobs[0]["path"]), canonical)
    fixed = fitted.fitted_template()
    state = StudyState(qc=QCSettings(), template=fixed, compensation="template", seed=0)

    def loop():
        return [gate_task(j, state) for j in jobs]

    # both clusters start first and every round runs loop, 1 worker, 2 workers back to back, so
    # a burst of load from other jobs on a shared machine hits all variants alike
    executors = {n: DaskExecutor(workers=n) for n in (1, 2)}
    try:
        for n, ex in executors.items():
            list(ex.map(gate_task, [warm] * n, state, "warmup", False))  # imports, numba caches
        out = loop()  # warm-up of this process
        assert all(r["ok"] for r in out), [r.get("error") for r in out if not r["ok"]]
        times: dict[str, list[float]] = {"loop": [], 1: [], 2: []}
        cpu: dict[object, list[tuple[float, float]]] = {"loop": [], 1: [], 2: []}  # (this process, workers)
        in_task: dict[int, list[float]] = {1: [], 2: []}
        task_times: dict[int, list[float]] = {}
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            loop()
            times["loop"].append(time.perf_counter() - t0)
            cpu["loop"].append((time.process_time() - c0, 0.0))
            for n, ex in executors.items():
                w0 = ex.client.run(cpu_s)
                t0, c0 = time.perf_counter(), time.process_time()
                res = dict(ex.map(gate_task, jobs, state, "bench", False))
                times[n].append(time.perf_counter() - t0)
                c1, w1 = time.process_time(), ex.client.run(cpu_s)
                cpu[n].append((c1 - c0, sum(w1[k] - w0.get(k, 0.0) for k in w1)))
                in_task[n].append(sum(r["seconds"] for r in res.values()))
                task_times[n] = [res[i]["seconds"] for i in range(len(jobs))]
                assert all(r["ok"] for r in res.values())
                for i, a in enumerate(out):  # identical tables whatever runs them
                    assert a["stats"].equals(res[i]["stats"])
    finally:
        for ex in executors.values():
            ex.close()
    # memory, on fresh workers: RSS when warm and idle, then the peak while processing the files
    ex = DaskExecutor(workers=2)
    try:
        # every worker warm (imports, numba, its task thread's allocator arena): two mapped tasks
        # could both land on one worker, and the other's peak then counted its imports (16x the
        # matrix in one run of 2026-12-06); warming with client.run instead runs outside the task
        # thread, whose own arena then still grows (3.3-3.7x), so: tasks until each worker ran one
        pids = set(ex.client.run(os.getpid).values())
        for _ in range(10):
            done = {r["pid"] for _, r in ex.map(gate_task, [warm] * 2, state, "warmup", False)}
            pids -= done
            if not pids:
                break
        idle = ex.client.run(rss_mb)
        mem = dict(ex.map(gate_task_rss, jobs, state, "memory", False))
    finally:
        ex.close()
    lmin, lmed = min(times["loop"]), statistics.median(times["loop"])
    rows = [("plain loop (this process)", 1, lmin, lmed)]
    for n in (1, 2):
        rows.append(
            (
                f"Dask LocalCluster, {n} worker{'s' if n > 1 else ''}",
                n,
                min(times[n]),
                statistics.median(times[n]),
            )
        )
    growth = max(m["rss_peak"] / 2**20 - idle[m["worker"]] for m in mem.values())
    peak_abs = max(m["rss_peak"] for m in mem.values()) / 2**20
    # Dask's own cost, from the same runs: wall time of a 1-worker run vs the time its tasks took
    layer = min(w / t for w, t in zip(times[1], in_task[1])) - 1

    fk = None
    if not args.no_flowkit:
        fk = flowkit_time(jobs, fitted, args.repeat)
        if fk is not None:
            rows.append(("FlowKit Session.analyze_samples(use_mp=True)", "mp", fk[0], fk[1]))

    # the canonical, data-driven template: pass 1 (fits), pooled estimates, pass 2 (gating)
    two_pass = canonical_two_pass(jobs, warm, canonical, args.repeat)

    print()
    print(f"{'variant (fixed gates, with event QC)':<48}{'workers':>8}{'min s':>9}{'median s':>10}"
          f"{'events/s':>13}{'x loop':>8}")  # fmt: skip
    for name, w, tmin, tmed in rows:
        print(f"{name:<48}{w!s:>8}{tmin:>9.2f}{tmed:>10.2f}{n_events / tmin:>13,.0f}{tmin / lmin:>8.2f}")
    speedup = min(times[1]) / min(times[2])
    overhead = min(times[1]) / lmin - 1
    print()
    print(f"speed-up, 2 workers vs 1:                 {speedup:.2f}x   (goal >= 1.7)")
    for key, label in (("loop", "plain loop"), (1, "Dask, 1 worker"), (2, "Dask, 2 workers")):
        main_cpu = statistics.median(c[0] for c in cpu[key])
        work_cpu = statistics.median(c[1] for c in cpu[key])
        print(f"CPU per run, {label:<16} this process {main_cpu:6.2f} s   workers {work_cpu:6.2f} s   "
              f"= {1e6 * (main_cpu + work_cpu) / n_events:.2f} us per event")  # fmt: skip
    loop_cpu = statistics.median(c[0] for c in cpu["loop"])
    for n in (1, 2):
        main_cpu = statistics.median(c[0] for c in cpu[n])
        work_cpu = statistics.median(c[1] for c in cpu[n])
        print(f"Dask CPU overhead, {n} worker{'s' if n > 1 else ' '} vs plain loop: workers "
              f"{100 * (work_cpu / loop_cpu - 1):+.1f}%, client + scheduler + nannies {100 * main_cpu / loop_cpu:+.1f}% "
              f"of the loop's CPU (on 2 cores their sum has to fit next to the workers)")  # fmt: skip
    print(f"Dask overhead, 1 worker vs plain loop:    {100 * overhead:+.1f}%   (goal < 10%); scheduling and "
          f"transfer alone (run wall time vs time inside its tasks): {100 * layer:+.1f}%")  # fmt: skip
    print(f"peak RSS per worker above its RSS when warm and idle: {growth:.0f} MB = "
          f"{growth / matrix_mb:.2f}x one file's event matrix ({matrix_mb:.1f} MB)   (goal <= 3x); "
          f"absolute peak {peak_abs:.0f} MB (Python, numpy, pandas, numba, dask)")  # fmt: skip
    if fk is not None:
        print(f"FlowKit vs cytopipe 2 workers:            {fk[0] / min(times[2]):.1f}x the time "
              "(FlowKit: gates only; cytopipe: + event QC + 14 medians per population)")  # fmt: skip
    cores = os.cpu_count() or 1
    load = load0  # measured before this benchmark started its own processes
    if load > 0.5 * cores:
        print(f"note: load average {load:.1f} on {cores} cores before this benchmark: other processes "
              "competed for the cores, so the 2-worker speed-up is understated; rerun on a quiet machine")  # fmt: skip
    fit_s, gate_s, again = two_pass
    per_file = (fit_s + gate_s) / len(jobs)
    print()
    print(f"canonical template on 2 workers: fused pass (fits + statistics + review data) {fit_s:.2f} s + "
          f"pass 2 for the {again} of {len(jobs)} samples whose gates used pooled estimates {gate_s:.2f} s "
          f"= {per_file:.2f} s per file ({1e6 * per_file * 2 / (n_events / len(jobs)):.2f} us per event "
          "per core)")  # fmt: skip
    # a cluster: discrete-event model fed with this run's measured task times
    durations = [d for d in task_times[1]]
    per_task = max(0.0, (min(times[1]) - sum(durations)) / len(durations))
    slowdown = statistics.median(in_task[2]) / statistics.median(in_task[1])
    model = cluster_model(durations, per_task, slowdown, FULL_TRIAL_FILES)
    print()
    print(f"scaling model (a phase of {FULL_TRIAL_FILES} tasks of these files; measured: per-task Dask overhead "
          f"{1e3 * per_task:.1f} ms, per-task slowdown with 2 busy workers x{slowdown:.2f}; 1 thread per worker, "
          "the same per-core speed as here):")  # fmt: skip
    for n, t in model.items():
        print(f"  {n:>2} workers: {t / 60:6.1f} min   speed-up {model[1] / t:5.1f}x   efficiency "
              f"{100 * model[1] / t / n:4.0f}%")  # fmt: skip
    print(
        "  (the model ignores the scheduler's own limit, ~1 ms of scheduler time per task, i.e. ~4 s per "
        "3,500-task phase, and a cluster's shared file system; the client-side steps are in bench/trial.py)"
    )
    total = FULL_TRIAL_FILES * per_file
    print(f"full trial, 500 patients x 7 visits x {args.events:,} events = {FULL_TRIAL_FILES} files: "
          f"~{total / 60:.0f} min on this machine (2 workers), ~{total * speedup / 60:.0f} min on 1")  # fmt: skip


def canonical_two_pass(jobs, warm, template, repeat: int) -> tuple[float, float, int]:
    """The canonical template as `cytopipe run` gates it: the fused pass (fits, statistics, review
    data from one read), pooled estimates, then pass 2 only for the samples whose gating can
    depend on them. Returns (fused pass s, pass 2 s, samples gated again)."""
    import pandas as pd

    from cytopipe.gating import pool_estimates
    from cytopipe.pipeline import DaskExecutor, StudyState, fit_task, gate_task, needs_regating
    from cytopipe.qc import QCSettings

    state = StudyState(qc=QCSettings(), template=template, compensation="template", seed=0)
    ex = DaskExecutor(workers=2)
    try:
        list(ex.map(fit_task, [warm, warm], state, "warmup", False))
        fits_t, gate_t = [], []
        for _ in range(max(1, repeat - 1)):
            state.pooled = None
            t0 = time.perf_counter()
            fits = dict(ex.map(fit_task, jobs, state, "fit", False))
            fits_t.append(time.perf_counter() - t0)
            records = pd.concat([fits[i]["fits"] for i in range(len(jobs))], ignore_index=True)
            manifest = pd.DataFrame(jobs)
            state.pooled = pool_estimates(records, manifest)
            t0 = time.perf_counter()
            again = [
                j for i, j in enumerate(jobs) if needs_regating(fits[i]["fits"], j, template, state.pooled)
            ]
            res = dict(ex.map(gate_task, again, state, "gate", False))
            gate_t.append(time.perf_counter() - t0)
            assert all(r["ok"] for r in res.values())
    finally:
        ex.close()
    return min(fits_t), min(gate_t), len(again)


def cluster_model(durations: list[float], overhead: float, slowdown: float, files: int) -> dict[int, float]:
    """Discrete-event model of a phase of ``files`` whole-sample tasks on N single-threaded
    workers: task times drawn (cycled) from the measured ones, times ``slowdown`` (the measured
    per-task slowdown of 2 busy workers against 1: memory bandwidth shared), plus the measured
    per-task scheduling overhead; each task goes to the first free worker in submission order,
    largest files first (what the executor's priorities do). Returns N -> phase wall time."""
    import heapq

    tasks = sorted((durations[i % len(durations)] for i in range(files)), reverse=True)
    out = {}
    for n in (1, 2, 8, 32):
        factor = 1.0 if n == 1 else slowdown
        free = [0.0] * n
        heapq.heapify(free)
        for d in tasks:
            t = heapq.heappop(free)
            heapq.heappush(free, t + d * factor + overhead)
        out[n] = max(free)
    return out


def flowkit_time(jobs, fitted, repeat: int):
    try:
        import flowkit as fk
    except ImportError:
        print("FlowKit not installed: skipped")
        return None
    from cytopipe.gating import write_gatingml

    with tempfile.TemporaryDirectory() as tmp:
        gml = write_gatingml(fitted, Path(tmp) / "fixed.xml")

        def run():
            session = fk.Session(gating_strategy=str(gml), fcs_samples=[str(j["path"]) for j in jobs])
            session.analyze_samples(use_mp=True)
            return session

        t = []
        run()  # warm-up
        for _ in range(max(1, repeat - 1)):
            t0 = time.perf_counter()
            run()
            t.append(time.perf_counter() - t0)
    return min(t), statistics.median(t)


if __name__ == "__main__":
    main()
