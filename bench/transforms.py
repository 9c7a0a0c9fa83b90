"""Micro-benchmark: compensation, logicle and arcsinh on 1M events x 16 fluorescence channels.

cytopipe vs the peers (FlowKit ``Matrix.apply``, flowutils) vs a plain-numpy floor, measured
side by side in one process after a warm-up; min and median of several runs, and ratios.

    PYTHONPATH=$PWD /work/venv/bin/python bench/transforms.py [--events 1000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np


def make_events(n: int, seed: int = 0):
    """18 columns: FSC-A, SSC-A and 16 fluorescence channels with realistic spillover."""
    rng = np.random.default_rng(seed)
    k = 16
    true = np.where(
        rng.random((n, k)) < 0.3, rng.lognormal(np.log(5000), 1.0, (n, k)), rng.normal(0, 150, (n, k))
    )
    spill = np.eye(k)
    for i in range(k - 1):
        spill[i, i + 1] = rng.uniform(0.02, 0.3)
        if i + 2 < k:
            spill[i, i + 2] = rng.uniform(0.0, 0.05)
    raw = true @ spill + rng.normal(0, 30, (n, k))
    scatter = rng.lognormal(np.log([60000, 20000]), 0.3, (n, 2))
    events = np.ascontiguousarray(np.column_stack([scatter, raw]), dtype=np.float32)
    names = ["FSC-A", "SSC-A"] + [f"FL{i + 1}-A" for i in range(k)]
    return events, names, spill


def timeit(fn, repeat: int, setup=None) -> list[float]:
    """Run ``fn`` once to warm up, then ``repeat`` times; ``setup`` (untimed) runs before each."""
    if setup is not None:
        setup()
    fn()
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--repeat-slow", type=int, default=2, help="runs of the slow peers (flowutils logicle)"
    )
    args = parser.parse_args()

    import flowkit as fk
    import flowutils

    from cytopipe.compensation import Compensation
    from cytopipe.transforms import Arcsinh, Logicle, TransformSet

    events, names, spill = make_events(args.events)
    fluo = names[2:]
    idx = np.arange(2, 18)
    comp = Compensation(spill, tuple(fluo), "bench")
    inv32 = comp.inverse.astype(np.float32)
    ev16 = np.ascontiguousarray(events[:, idx])
    work = events.copy()

    def refresh():
        np.copyto(work, events)

    rows: list[tuple[str, str, list[float]]] = []

    # ---------------------------------------------------------------- compensation
    from threadpoolctl import threadpool_limits

    def floor_one_thread():
        with threadpool_limits(1, user_api="blas"):
            return ev16 @ inv32

    rows.append(
        (
            "compensation",
            "numpy floor: events16 @ inv(S), 1 BLAS thread",
            timeit(floor_one_thread, args.repeat),
        )
    )
    rows.append(
        (
            "compensation",
            "numpy: events16 @ inv(S), default threads",
            timeit(lambda: ev16 @ inv32, args.repeat),
        )
    )
    rows.append(
        (
            "compensation",
            "cytopipe Compensation.apply (copy)",
            timeit(lambda: comp.apply(events, names), args.repeat),
        )
    )
    rows.append(
        (
            "compensation",
            "cytopipe Compensation.apply (in place)",
            timeit(lambda: comp.apply(work, names, inplace=True), args.repeat, setup=refresh),
        )
    )
    ev64 = events.astype(np.float64)
    rows.append(
        (
            "compensation",
            "flowutils.compensate (float64 solve)",
            timeit(lambda: flowutils.compensate.compensate(ev64, spill, list(idx)), args.repeat),
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fk_sample = fk.Sample(events, sample_id="bench", channel_labels=names)
    fk_matrix = fk.Matrix(spill, fluo)
    rows.append(
        ("compensation", "FlowKit Matrix.apply", timeit(lambda: fk_matrix.apply(fk_sample), args.repeat))
    )

    # ---------------------------------------------------------------- logicle
    params = [dict(T=262144.0, W=0.5 + 0.02 * i, M=4.5, A=0.0) for i in range(16)]
    comp.apply(events, names, inplace=False)
    compensated = comp.apply(events, names)
    grids = []
    for p in params:  # the floor: np.interp on a precomputed fine grid of the exact inverse
        y = np.linspace(-1.5, 1.5, 200_001)  # max error 3e-10 vs flowutils
        x = flowutils.transforms._logicle_inverse(y, t=p["T"], m=p["M"], w=p["W"], a=p["A"])
        grids.append((x, y))

    def floor_logicle():
        for j, (x, y) in zip(idx, grids):
            np.interp(compensated[:, j], x, y)

    tset = TransformSet({c: Logicle(**p) for c, p in zip(fluo, params)})

    def refresh_comp():
        np.copyto(work, compensated)

    rows.append(
        ("logicle x16", "floor: np.interp, 200k-point grid (err 3e-10)", timeit(floor_logicle, args.repeat))
    )
    rows.append(
        (
            "logicle x16",
            "cytopipe TransformSet (in place)",
            timeit(lambda: tset.apply(work, names), args.repeat, setup=refresh_comp),
        )
    )
    rows.append(
        (
            "logicle x16",
            "cytopipe TransformSet (copy)",
            timeit(lambda: tset.apply(compensated, names, inplace=False), args.repeat),
        )
    )
    comp64 = compensated.astype(np.float64)

    def flowutils_logicle():
        for j, p in zip(idx, params):
            flowutils.transforms.logicle(comp64[:, j], None, t=p["T"], m=p["M"], w=p["W"], a=p["A"])

    rows.append(
        ("logicle x16", "flowutils.transforms.logicle (exact)", timeit(flowutils_logicle, args.repeat_slow))
    )
    out = tset.apply(compensated, names, inplace=False)
    err = max(
        float(
            np.max(
                np.abs(
                    out[:, j]
                    - flowutils.transforms._logicle(comp64[:, j], t=p["T"], m=p["M"], w=p["W"], a=p["A"])
                )
            )
        )
        for j, p in zip(idx, params)
    )

    # ---------------------------------------------------------------- arcsinh
    comp16 = np.ascontiguousarray(compensated[:, idx])
    inv_cof = np.float32(1 / 150)
    rows.append(
        (
            "arcsinh x16",
            "floor: np.arcsinh(events16 / 150) float32",
            timeit(lambda: np.arcsinh(comp16 * inv_cof), args.repeat),
        )
    )
    aset = TransformSet({c: Arcsinh(150) for c in fluo})
    rows.append(
        (
            "arcsinh x16",
            "cytopipe TransformSet (in place)",
            timeit(lambda: aset.apply(work, names), args.repeat, setup=refresh_comp),
        )
    )

    # ---------------------------------------------------------------- report
    print(
        f"\n{args.events:,} events x 16 fluorescence channels (+2 scatter), float32; {args.repeat} runs after a warm-up"
    )
    print(f"{'step':14s} {'implementation':45s} {'min s':>8s} {'median s':>9s} {'x floor':>8s}")
    print("-" * 88)
    floor: dict[str, float] = {}
    for step, impl, times in rows:
        best, med = min(times), statistics.median(times)
        if "floor" in impl:
            floor[step] = best
        print(f"{step:14s} {impl:45s} {best:8.4f} {med:9.4f} {best / floor[step]:8.2f}")
    print(f"cytopipe logicle: max |cytopipe - flowutils| over the 16M values = {err:.2g} (float32 output)")


if __name__ == "__main__":
    main()
