"""Benchmark: what each per-sample step costs per event, against the gating kernel.

Issue 17 asks that event QC, the medians, the gate-review histograms and the FlowSOM mapping each
cost less than 20 % of the gating kernel, so that a study costs little more than its gating. On
the simulated sample of ``bench/gating.py`` (1M events x 18 channels, the canonical template),
timed interleaved in one process after a warm-up, min and median of ``--repeat`` rounds:

* **gating kernel**: ``gating.gate(sample, template, medians=False)`` (compensation, transforms,
  the data-driven fits and every gate), the reference;
* **medians**: ``gate(..., medians=True)`` minus the kernel (14 markers per population);
* **gate-review data**: ``gate(..., keep_values=True)`` followed by ``gate_review_data`` (one
  histogram per gate panel over its parent), minus the same gating alone;
* **event QC**: ``qc.event_qc`` on the raw events (margins, time-resolved anomalies);
* **FlowSOM mapping**: the nearest of 100 SOM nodes for every Live event on the workflow's 13
  clustering markers (``cluster.som.map_to_codes``; the model trained once beforehand on 20,000
  Live cells, the matrix of Live events gathered beforehand as the mapping step reads it);
* **read**: ``read_fcs`` of the file (per event of the file), for scale.

Printed per step: seconds, microseconds per event and the share of the gating kernel, with the
goal (< 20 %) where the issue sets one. Timings on a shared machine are noisy; the shares are
measured side by side.

    python bench/parts.py [--events 1000000] [--repeat 5] [--data DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"
CLUSTER_MARKERS = [
    "CD3",
    "CD4",
    "CD8",
    "CD25",
    "CD127",
    "FOXP3",
    "CD45RA",
    "CXCR5",
    "PD-1",
    "CXCR3",
    "CCR6",
    "CD56",
    "CD16",
]  # fmt: skip  (workflows/sle_il2.yaml)
GOAL = 0.20  # share of the gating kernel


def _bench_gating():
    """bench/gating.py as a module (its simulated sample and interleaved timer)."""
    spec = importlib.util.spec_from_file_location("bench_gating", REPO / "bench" / "gating.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "cytopipe-bench-gating")
    args = ap.parse_args(argv)

    import cytopipe
    from cytopipe import gating, qc
    from cytopipe.cluster.som import map_to_codes, train_som
    from cytopipe.report.gate_review import gate_review_data

    bg = _bench_gating()
    sample = bg.simulated_sample(args.events, args.data)
    path = args.data / "fcs" / "P001_W00.fcs"
    n_file = cytopipe.read_fcs(path).n_events
    template = gating.load_template(TEMPLATE)
    n = sample.n_events

    # the FlowSOM model and the Live events' matrix, made once (not timed)
    result = gating.gate(sample, template, medians=False, keep_values=True)
    values = result.event_values(sample)
    live = result.indices("Live")
    live_matrix = np.ascontiguousarray(values.matrix(CLUSTER_MARKERS, events=live), dtype=np.float32)
    pick = np.sort(np.random.default_rng(0).choice(len(live), size=min(20_000, len(live)), replace=False))
    codes = train_som(live_matrix[pick], 10, 10, rlen=10, seed=0)

    def review():
        res = gating.gate(sample, template, medians=False, keep_values=True)
        return gate_review_data(sample, res, "bench", values=res.event_values(sample))

    variants = {
        "gating kernel": lambda: gating.gate(sample, template, medians=False),
        "gating + medians": lambda: gating.gate(sample, template, medians=True),
        "gating (values kept)": lambda: gating.gate(sample, template, medians=False, keep_values=True),
        "gating + gate-review data": review,
        "event QC": lambda: qc.event_qc(sample.events, sample.channels),
        "FlowSOM mapping": lambda: map_to_codes(live_matrix, codes),
        "read": lambda: cytopipe.read_fcs(path),
    }
    timed = bg.interleaved(variants, args.repeat)
    mins = {k: v[0] for k, v in timed.items()}
    meds = {k: v[1] for k, v in timed.items()}
    rows = [
        ("gating kernel (reference)", mins["gating kernel"], meds["gating kernel"], n, None),
        ("medians (14 per population)", mins["gating + medians"] - mins["gating kernel"],
         meds["gating + medians"] - meds["gating kernel"], n, GOAL),
        ("gate-review data", mins["gating + gate-review data"] - mins["gating (values kept)"],
         meds["gating + gate-review data"] - meds["gating (values kept)"], n, GOAL),
        ("event QC (margins, time)", mins["event QC"], meds["event QC"], n, GOAL),
        (f"FlowSOM mapping ({len(live):,} Live events)", mins["FlowSOM mapping"], meds["FlowSOM mapping"], n, GOAL),
        (f"read ({n_file:,} events)", mins["read"], meds["read"], n_file, None),
    ]  # fmt: skip
    kernel_us = 1e6 * mins["gating kernel"] / n
    print(f"cytopipe {cytopipe.__version__}: {n:,} events x {sample.events.shape[1]} channels, template "
          f"{TEMPLATE.name}; min / median of {args.repeat} interleaved rounds")  # fmt: skip
    print(f"{'step':<42}{'min s':>8}{'median s':>10}{'us/event':>10}{'x kernel':>10}  goal")
    for name, lo, med, events, goal in rows:
        us = 1e6 * lo / events
        share = us / kernel_us
        verdict = "" if goal is None else f"< {goal:.0%}: {'met' if share < goal else 'NOT met'}"
        print(f"{name:<42}{lo:>8.4f}{med:>10.4f}{us:>10.3f}{share:>9.0%}  {verdict}")
    print(
        f"(shares per event of the sample; the mapping's events are the sample's Live events, "
        f"{len(live) / n:.0%} of them; the medians and review rows are differences of two timings)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
