"""Benchmark: peak memory of each phase of a run against the largest event matrix (goal <= 3x).

    python bench/memory.py                          # 2 patients x 1 visit x 2M events
    python bench/memory.py --events 5000000         # the issue's 5M-event file (needs ~4 GB)

The trial is simulated once into ``--cache`` and run with the shipped workflow's sections
(canonical template, QC, gate review, FlowSOM training and mapping, statistics) in one process
(the synchronous scheduler, i.e. exactly the per-sample code a Dask worker runs). tracemalloc
sees every numpy allocation, so each phase's peak above the memory held before it is the
working memory of its per-sample task (plus the small results kept by the run), and each
per-sample task's peak above its start is what one worker holds; both are printed
as a multiple of the largest float32 event matrix (events x channels x 4 bytes). This counts
allocations, not RSS: allocator slack and shared libraries are not included (bench/trial.py
samples the workers' RSS instead). No timings: tracemalloc slows Python code down.
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trial import TEMPLATE, WORKFLOW, default_cache, simulate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--events", type=int, default=2_000_000, help="mean events per file (+-30%%)")
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--out", type=Path, help="run folder (default: a fresh one in the cache folder)")
    args = ap.parse_args(argv)

    import shutil

    import pandas as pd
    import yaml

    from cytopipe import pipeline
    from cytopipe.fcs import read_fcs_header
    from cytopipe.workflow import workflow_from_options

    trial = simulate(args.cache, args.patients, (0,), args.events, args.seed)
    out = args.out or (args.cache / f"memory-run-{args.patients}x{args.events}")
    shutil.rmtree(out, ignore_errors=True)
    spec = yaml.safe_load(WORKFLOW.read_text())
    sections = {k: spec[k] for k in ("compensation", "transforms", "qc", "clustering", "statistics")}
    wf = workflow_from_options(trial / "manifest.csv", TEMPLATE, out, clinical=trial / "clinical.csv",
                               workers=1, seed=args.seed, report={"enabled": False}, **sections)  # fmt: skip
    manifest = pd.read_csv(trial / "manifest.csv")
    samples = manifest[manifest["control"].fillna("").astype(str) == ""]
    headers = [read_fcs_header(trial / f) for f in samples["file"]]
    largest = max(h.n_events * h.n_channels for h in headers) * 4

    peaks: dict[str, tuple[int, int]] = {}
    running = [0]  # the phase's peak so far (the task wrappers below reset tracemalloc's)

    def traced(name, fn):
        def run(*a, **k):
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            running[0] = before
            try:
                return fn(*a, **k)
            finally:
                peaks[name] = (before, max(running[0], tracemalloc.get_traced_memory()[1]))

        return run

    import sys

    from cytopipe.pipeline import tasks as cluster_steps  # the map-inputs writer lives in the tasks

    written: list[tuple[int, int]] = []  # (bytes, parent events) of each map-inputs file
    write = cluster_steps._write_map_inputs

    def counted(path, plan, values, result, idx):
        write(path, plan, values, result, idx)
        written.append((path.stat().st_size, len(idx)))

    cluster_steps._write_map_inputs = counted

    # per task (what one Dask worker holds): the peak above the memory at the task's start
    tasks: dict[str, int] = {}

    def task(module, name):
        fn = getattr(module, name)

        def run(*a, **k):
            start, outer = tracemalloc.get_traced_memory()
            running[0] = max(running[0], outer)
            tracemalloc.reset_peak()
            try:
                return fn(*a, **k)
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tasks[name] = max(tasks.get(name, 0), peak - start)
                running[0] = max(running[0], peak)
                tracemalloc.reset_peak()

        # every module of the pipeline package that looks the task up by name gets the traced one
        for mod in [m for n, m in sys.modules.items() if n.startswith("cytopipe.pipeline") and m is not None]:
            if getattr(mod, name, None) is fn:
                setattr(mod, name, run)

    for module, name in [(pipeline, "fit_task"), (pipeline, "gate_task"), (cluster_steps, "train_task"),
                         (cluster_steps, "map_task")]:  # fmt: skip
        task(module, name)
    pipeline.STEPS[:] = [pipeline.Step(s.name, traced(s.name, s.run), s.doc) for s in pipeline.STEPS]
    tracemalloc.start()
    result = pipeline.run_workflow(wf, scheduler="synchronous", progress=False)
    tracemalloc.stop()
    print(result.summary())
    print(f"\nlargest event matrix: {largest / 1e6:.0f} MB ({max(h.n_events for h in headers):,} events)")
    print(f"{'phase':22s} {'held before MB':>15s} {'peak above MB':>14s} {'x matrix':>9s}")
    for name, (before, peak) in peaks.items():
        print(
            f"{name:22s} {before / 1e6:15.0f} {(peak - before) / 1e6:14.0f} {(peak - before) / largest:9.2f}"
        )
    print(f"\n{'per-sample task (worker)':26s} {'peak above its start MB':>24s} {'x matrix':>9s}")
    for name, peak in tasks.items():
        print(f"{name:26s} {peak / 1e6:24.0f} {peak / largest:9.2f}")
    if written:
        size, n = map(sum, zip(*written))
        print(
            f"map-inputs on disk: {size / max(n, 1):.1f} bytes per parent event ({n:,} events, {len(written)} files)"
        )
    worst = max((p - b) / largest for b, p in peaks.values())
    print(
        f"worst phase: {worst:.2f}x the largest event matrix (goal <= 3x; a phase also holds the results "
        f"of earlier samples, a worker only its task)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
