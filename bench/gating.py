"""Benchmark: compensation + transforms + the canonical gating template on 1M events x 18 channels.

Compared side by side in one process, on the same simulated sample:

* cytopipe, canonical template (data-driven gates fitted on the sample);
* cytopipe, the same gates fixed (the fitted geometry of that sample: ``result.fitted_template()``);
* FlowKit ``Session.analyze_samples`` on the same fixed gates (exported with ``write_gatingml``,
  so FlowKit compensates and transforms itself; its event cache enabled within a run and cleared
  between runs; one process, as FlowKit uses ``cores - 1`` = 1 here);
* a plain-numpy floor: ``events @ inv(S)`` (float32) + arcsinh of the gated channels + boolean
  masks over all events (rectangles, ellipses, polygons via matplotlib.path).

Every variant is warmed up first, then timed ``--repeat`` times; min and median are printed,
with ratios. Goals: cytopipe >= 5x faster than FlowKit, within 1.5x of the floor, and the
data-driven template < 50 % slower than its fixed version. Timings on a shared machine are noisy;
compare the ratios.

    python bench/gating.py [--events 1000000] [--repeat 5] [--data DIR] [--no-flowkit]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"


def simulated_sample(events: int, data_dir: Path):
    """One simulated sample of ``events`` events (written once, then re-read)."""
    import cytopipe

    fcs = data_dir / "fcs" / "P001_W00.fcs"
    if not fcs.exists():
        from cytopipe.simulate import simulate_trial

        simulate_trial(
            data_dir, n_patients=1, visits=(0,), events=int(events * 1.35), seed=20240611, overwrite=True
        )
    sample = cytopipe.read_fcs(fcs)
    if sample.n_events < events:
        raise SystemExit(f"{fcs} has only {sample.n_events} events; delete {data_dir} to regenerate")
    sample.events = np.ascontiguousarray(sample.events[:events])
    return sample


def interleaved(variants: dict, repeat: int, slow: set[str] = frozenset(), slow_repeat: int = 3):
    """Time every variant ``repeat`` times, round-robin (so a burst of load on a shared machine
    hits all variants alike), after one warm-up each. Returns {name: (min, median, last output)}."""
    outs = {name: fn() for name, fn in variants.items()}  # warm-up: numba compilation, first touch
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeat):
        for name, fn in variants.items():
            if name in slow and r >= slow_repeat:
                continue
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t), statistics.median(t), outs[name]) for name, t in times.items()}


# --------------------------------------------------------------------------------------------
# plain-numpy floor
# --------------------------------------------------------------------------------------------
def numpy_floor(
    sample, fixed_template, channel_of: dict[str, str], cofactors: dict[str, float] | None = None
):
    """The same fixed gates, written as directly as numpy allows (full-length masks)."""
    from matplotlib.path import Path as MplPath
    from threadpoolctl import threadpool_limits

    from cytopipe.gating.gates import BooleanGate, EllipsoidGate, PolygonGate, RectangleGate

    ev = sample.events
    pnn = list(sample.channels["pnn"])
    spill = sample.spillover
    cols = [pnn.index(c) for c in spill.channels]
    inv = np.linalg.inv(spill.matrix).astype(np.float32)
    cofactor = np.float32(1.0 / fixed_template.transforms["default"]["cofactor"])
    cofactors = cofactors or {}

    def run():
        with threadpool_limits(1):
            comp = ev[:, cols] @ inv
        j = {c: i for i, c in enumerate(spill.channels)}
        cache: dict[str, np.ndarray] = {}

        def value(marker: str) -> np.ndarray:
            if marker not in cache:
                ch = channel_of[marker]
                inv_c = np.float32(1.0 / cofactors[ch]) if ch in cofactors else cofactor
                cache[marker] = np.arcsinh(comp[:, j[ch]] * inv_c) if ch in j else ev[:, pnn.index(ch)]
            return cache[marker]

        masks: dict[str, np.ndarray] = {}
        for pop in fixed_template:
            g = pop.gate
            if isinstance(g, BooleanGate):
                ms = [~masks[o.population] if o.negate else masks[o.population] for o in g.operands]
                m = (
                    ~ms[0]
                    if g.op == "not"
                    else np.logical_and.reduce(ms)
                    if g.op == "and"
                    else np.logical_or.reduce(ms)
                )
            else:
                m = inside(g, value)
            if pop.parent != "root":
                m = m & masks[pop.parent]
            masks[pop.name] = m
        return {k: int(v.sum()) for k, v in masks.items()}

    def inside(g, value) -> np.ndarray:
        vals = [value(d.name) for d in g.dims]
        if isinstance(g, RectangleGate):
            m = np.ones(len(ev), dtype=bool)
            for v, lo, hi in zip(vals, g.lower, g.upper):
                if lo is not None:
                    m &= v >= lo
                if hi is not None:
                    m &= v < hi
            return m
        if isinstance(g, EllipsoidGate):
            d0, d1 = vals[0] - g.center[0], vals[1] - g.center[1]
            q = g.inverse
            return (
                d0 * d0 * q[0, 0] + d0 * d1 * (q[0, 1] + q[1, 0]) + d1 * d1 * q[1, 1]
            ) <= g.distance_square
        if isinstance(g, PolygonGate):
            return MplPath(g.vertices).contains_points(np.column_stack(vals))
        if getattr(g, "type", "") == "all_of":  # e.g. Treg: CD25/CD127 diagonal AND FOXP3+
            return np.logical_and.reduce([inside(part, value) for part in g.parts])
        raise TypeError(g)

    return run


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "cytopipe-bench-gating")
    ap.add_argument("--no-flowkit", action="store_true")
    ap.add_argument(
        "--previous",
        default="c409b23",
        help="git revision whose canonical template (absolute search ranges and defaults, before the "
        "landmark-relative gates) is timed for comparison ('' to skip)",
    )
    args = ap.parse_args(argv)

    import cytopipe
    from cytopipe.gating import gate, load_template
    from cytopipe.gating.export import gatingml_ids, write_gatingml

    sample = simulated_sample(args.events, args.data)
    template = load_template(TEMPLATE)
    n, p = sample.events.shape
    print(
        f"cytopipe {cytopipe.__version__}: {n:,} events x {p} channels, template {TEMPLATE.name} ({len(template)} populations)"
    )

    fitted = gate(sample, template)
    fixed = fitted.fitted_template()
    counts = {k: v.count for k, v in fitted.populations.items()}

    variants = {
        "plain numpy floor (fixed gates)": numpy_floor(
            sample,
            fixed,
            fitted.channel_of,
            {ch: t["cofactor"] for ch, t in fitted.transforms.items() if t.get("type") == "arcsinh"},
        ),
        "cytopipe, fixed gates": lambda: gate(sample, fixed, medians=False),
        "cytopipe, data-driven gates": lambda: gate(sample, template, medians=False),
        "cytopipe, fixed gates + medians": lambda: gate(sample, fixed),
        "cytopipe, data-driven + medians": lambda: gate(sample, template),
    }
    previous = None
    if args.previous:
        import subprocess

        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{args.previous}:gating/sle_il2_tcell_nk.yaml"],
            capture_output=True,
            text=True,
        )
        if text.returncode == 0:
            import yaml

            previous = load_template(yaml.safe_load(text.stdout))
            variants["cytopipe, previous data-driven template"] = lambda: gate(
                sample, previous, medians=False
            )
    slow = set()
    if not args.no_flowkit:
        import flowkit as fk

        tmp = tempfile.TemporaryDirectory()
        gml = write_gatingml(fitted, Path(tmp.name) / "fixed.xml")
        fk_sample = fk.Sample(sample.events, sample_id="bench", channel_labels=list(sample.channels["pnn"]))
        session = fk.Session(gating_strategy=str(gml), fcs_samples=[fk_sample])

        def run_flowkit():
            session.gating_strategy.clear_cache()
            session.analyze_samples(use_mp=False, cache_events=True)
            return session

        variants["FlowKit Session.analyze_samples (fixed)"] = run_flowkit
        slow.add("FlowKit Session.analyze_samples (fixed)")

    results = interleaved(variants, args.repeat, slow)
    rows = [(name, lo, med) for name, (lo, med, _) in results.items()]

    assert {k: v.count for k, v in results["cytopipe, fixed gates"][2].populations.items()} == counts
    floor_counts = results["plain numpy floor (fixed gates)"][2]
    worst = max(abs(floor_counts[k] - counts[k]) for k in counts)
    print(f"floor vs cytopipe: largest count difference {worst} event(s)")
    if not args.no_flowkit:
        ids = gatingml_ids(fixed.names)
        fk_counts = {k: int(session.get_gate_membership("bench", ids[k]).sum()) for k in counts}
        worst = max(abs(fk_counts[k] - counts[k]) for k in counts)
        print(f"FlowKit vs cytopipe: largest count difference {worst} event(s)")
        tmp.cleanup()

    times = {name: (lo, med) for name, lo, med in rows}
    print()
    print(f"{'variant':44s}{'min s':>9s}{'median s':>10s}")
    for name, lo, med in rows:
        print(f"{name:44s}{lo:9.3f}{med:10.3f}")
    fx = times["cytopipe, fixed gates"]
    dd = times["cytopipe, data-driven gates"]
    fl = times["plain numpy floor (fixed gates)"]
    print()
    print("ratios (min / median):")
    print(
        f"  cytopipe fixed vs numpy floor        {fx[0] / fl[0]:6.2f} / {fx[1] / fl[1]:6.2f}   (goal <= 1.5)"
    )
    print(
        f"  data-driven vs fixed (cytopipe)       {dd[0] / fx[0]:6.2f} / {dd[1] / fx[1]:6.2f}   (goal <= 1.5)"
    )
    if previous is not None:
        pv = times["cytopipe, previous data-driven template"]
        print(
            f"  landmark-relative vs previous template {dd[0] / pv[0]:6.2f} / {dd[1] / pv[1]:6.2f}   (goal <= 1.5)"
        )
    fm, dm = times["cytopipe, fixed gates + medians"], times["cytopipe, data-driven + medians"]
    print(f"  data-driven vs fixed, with medians    {dm[0] / fm[0]:6.2f} / {dm[1] / fm[1]:6.2f}")
    if "FlowKit Session.analyze_samples (fixed)" in times:
        fk_t = times["FlowKit Session.analyze_samples (fixed)"]
        print(
            f"  FlowKit vs cytopipe fixed             {fk_t[0] / fx[0]:6.2f} / {fk_t[1] / fx[1]:6.2f}   (goal >= 5)"
        )
        print(f"  FlowKit vs cytopipe fixed + medians   {fk_t[0] / fm[0]:6.2f} / {fk_t[1] / fm[1]:6.2f}")
        print(f"  FlowKit vs cytopipe data-driven       {fk_t[0] / dd[0]:6.2f} / {fk_t[1] / dd[1]:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
