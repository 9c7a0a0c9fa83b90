"""Clustering benchmark: cytopipe FlowSOM vs FlowSOM_Python vs scikit-learn MiniBatchKMeans.

Data sets
  a) ~1M cells in 10 samples: the trial simulator when ``cytopipe.simulate`` is available
     (Live cells, compensated with $SPILLOVER + arcsinh, its 13 antibody markers, truth = the
     simulator's cell lineage), else (or with --synthetic) a 16-marker synthetic 12-population
     mixture with per-sample proportions (truth = mixture component);
  b) FlowSOM's own 68983.fcs (../shared/data/FlowSOM), compensated with its SPILL, logicle
     (T=262144, W=0.5, M=4.5, A=0) on the fluorescence channels (cytopipe.compensation/transforms), the vignette's 7 markers,
     z-scored; truth = gatingResult.csv without "Unlabeled".

Every method gets the same matrix, the same grid (10x10) and the same k. Each method runs in
its own worker process (imports and numba compilation warmed up on a small slice first, not
timed); time is the min and median of ``--repeats`` warm runs; peak memory is the highest
extra resident memory of the worker during a run (sampled every 1 ms) above its level before. Agreement:
ARI and the mean over truth populations of the best single cluster's F1. On 68983 the
agreement is also given as the mean (and min) over ``--seeds`` seeds (20), and on the 1M set
over ``--seeds-1m`` (3), since one seed is noisy.

FlowSOM_Python (GPL) is optional: ``pip install flowsom`` (extra ``bench-gpl``); its rows
are skipped cleanly when it is absent. Run from the repository root:

    PYTHONPATH=$PWD python bench/cluster.py            # both data sets
    PYTHONPATH=$PWD python bench/cluster.py --quick    # 200k cells, 1 repeat (smoke test)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLOWSOM_DIR = REPO / ".." / "shared" / "data" / "FlowSOM" / "inst" / "extdata"
MARKERS_68983 = ["CD8", "TCRyd", "TCRb", "NK1/1", "CD4", "CD19", "CD3"]

# --- data sets -------------------------------------------------------------------------------------
PANEL16 = [
    "CD3", "CD4", "CD8", "CD45RA", "CCR7", "CD25", "CD127", "FOXP3",
    "CXCR3", "CCR6", "CXCR5", "PD-1", "CD56", "CD16", "CD19", "HLA-DR",
]  # fmt: skip
# population: (abundance %, {marker: level}); unlisted markers are negative (0.3)
MIXTURE = {
    "CD4 naive": (20, {"CD3": 3, "CD4": 3, "CD45RA": 3, "CCR7": 3, "CD127": 2.5}),
    "CD4 memory": (12, {"CD3": 3, "CD4": 3, "CCR7": 1.5, "CD127": 2.5}),
    "Treg": (3, {"CD3": 3, "CD4": 3, "CD25": 3, "FOXP3": 3, "CD127": 0.8}),
    "Th17": (2, {"CD3": 3, "CD4": 3, "CCR6": 3, "CD127": 2.5, "CCR7": 1.5}),
    "Th1": (3, {"CD3": 3, "CD4": 3, "CXCR3": 3, "CD127": 2.5, "CCR7": 1.5}),
    "cTfh": (2, {"CD3": 3, "CD4": 3, "CXCR5": 3, "PD-1": 2, "CD127": 2.5}),
    "CD8 naive": (12, {"CD3": 3, "CD8": 3, "CD45RA": 3, "CCR7": 3}),
    "CD8 memory": (10, {"CD3": 3, "CD8": 3, "CXCR3": 2, "PD-1": 1.5}),
    "CD56bright NK": (0.8, {"CD56": 3.5, "CD16": 0.5}),
    "CD56dim NK": (8, {"CD56": 2, "CD16": 3}),
    "B cells": (10, {"CD19": 3, "HLA-DR": 3, "CD45RA": 2.5}),
    "Monocytes": (5, {"HLA-DR": 3, "CD4": 1.2, "CD16": 1.5}),
}


def synthetic_mixture(n_samples: int, n_per_sample: int, seed: int = 0):
    """Events (float32), per-event truth labels and sample index of a 16-marker mixture."""
    rng = np.random.default_rng(seed)
    names = list(MIXTURE)
    base = np.array([MIXTURE[n][0] for n in names], dtype=np.float64)
    centers = np.full((len(names), len(PANEL16)), 0.3, dtype=np.float32)
    for i, name in enumerate(names):
        for marker, level in MIXTURE[name][1].items():
            centers[i, PANEL16.index(marker)] = level
    xs, ys, ss = [], [], []
    for s in range(n_samples):
        p = rng.dirichlet(base / base.sum() * 200)
        y = rng.choice(len(names), size=n_per_sample, p=p)
        x = centers[y] + rng.normal(scale=0.3, size=(n_per_sample, len(PANEL16))).astype(np.float32)
        x += rng.exponential(0.1, size=x.shape).astype(np.float32)  # a little right skew
        xs.append(x)
        ys.append(y)
        ss.append(np.full(n_per_sample, s))
    labels = np.array(names)[np.concatenate(ys)]
    return np.concatenate(xs).astype(np.float32), labels, np.concatenate(ss)


def simulated_live_cells(n_samples: int, n_live_per_sample: int, tmp: Path):
    """Live cells of simulated trial samples: compensated with $SPILLOVER, arcsinh (cofactor
    150) on the 13 antibody markers; truth = the simulator's lineage of each cell."""
    import cytopipe
    from cytopipe.compensation import compensate
    from cytopipe.simulate import load_labels, simulate_trial
    from cytopipe.simulate.populations import unpack_membership

    out = tmp / "sim"
    # ~80% of the events of a simulated file are live single lymphocytes
    simulate_trial(out, n_patients=n_samples, visits=(0,), events=int(n_live_per_sample / 0.8), seed=0)
    xs, ys, ss = [], [], []
    for i, path in enumerate(sorted((out / "fcs").glob("*.fcs"))):
        s = compensate(cytopipe.read_fcs(path))
        cols = [s.pnn.index(c) for c in s.spillover.channels if c != "BV510-A"]  # not viability
        labels = load_labels(out / "truth" / "labels" / f"{path.stem}.npz")
        live = unpack_membership(labels["membership"], "Live")
        xs.append(np.arcsinh(s.events[np.ix_(np.flatnonzero(live), cols)] / 150.0).astype(np.float32))
        ys.append(np.asarray(labels["lineages"])[labels["lineage"][live]])
        ss.append(np.full(int(live.sum()), i))
    return np.concatenate(xs), np.concatenate(ys).astype(str), np.concatenate(ss)


def load_68983():
    import pandas as pd

    import cytopipe
    from cytopipe.compensation import compensate
    from cytopipe.transforms import TransformSet

    s = compensate(cytopipe.read_fcs(FLOWSOM_DIR / "68983.fcs"))  # the file's SPILL
    logicle = {"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0}
    TransformSet({c: logicle for c in s.spillover.channels}).apply(s.events, s.pnn)
    x = s.events[:, [s.markers.index(m) for m in MARKERS_68983]].astype(np.float64)
    x = ((x - x.mean(0)) / x.std(0, ddof=1)).astype(np.float32)
    labels = pd.read_csv(FLOWSOM_DIR / "gatingResult.csv", header=None)[0].to_numpy().astype(str)
    return x, labels, np.zeros(len(x), dtype=np.int64)


# --- methods (run inside a worker) ---------------------------------------------------------------
def _cytopipe(x, samples, k, seed, all_cells=False):
    from cytopipe import cluster

    bounds = np.flatnonzero(np.diff(samples)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(x)]])
    data = {f"S{i:03d}": x[a:b] for i, (a, b) in enumerate(zip(starts, stops))}
    settings = cluster.ClusterSettings(
        xdim=10, ydim=10, n_metaclusters=k, seed=seed, max_training_cells=10**12 if all_cells else 200_000
    )
    model = cluster.train_model(data, [f"m{j}" for j in range(x.shape[1])], settings)
    return cluster.map_events(model, x)[1]


def _flowsom(x, samples, k, seed, batch=False):
    from flowsom.models import BatchFlowSOMEstimator, FlowSOMEstimator

    cls = BatchFlowSOMEstimator if batch else FlowSOMEstimator
    return cls(n_clusters=k, xdim=10, ydim=10, seed=seed).fit_predict(x.astype(np.float64))


def _kmeans(x, samples, k, seed):
    from sklearn.cluster import MiniBatchKMeans

    return MiniBatchKMeans(n_clusters=k, batch_size=8192, n_init=1, random_state=seed).fit_predict(x)


METHODS = {
    "cytopipe": (lambda *a: _cytopipe(*a), None),
    "cytopipe (SOM on all cells)": (lambda *a: _cytopipe(*a, all_cells=True), None),
    "FlowSOM_Python": (lambda *a: _flowsom(*a), "flowsom"),
    "FlowSOM_Python batch": (lambda *a: _flowsom(*a, batch=True), "flowsom"),
    "MiniBatchKMeans(k)": (lambda *a: _kmeans(*a), "sklearn"),
}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident memory seen by a 1 ms sampling thread while active."""

    def __enter__(self):
        import threading

        self.peak = _rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss())
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def worker(method: str, data_dir: Path, repeats: int, seeds: list[int], out: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    fn = METHODS[method][0]
    x = np.load(data_dir / "x.npy")
    samples = np.load(data_dir / "samples.npy")
    k = int(json.loads((data_dir / "meta.json").read_text())["k"])
    warm = min(len(x), 5000)
    fn(x[:warm], samples[:warm], k, seeds[0])  # imports + numba compilation, not timed
    times, labels, peak = [], None, 0
    for _ in range(repeats):
        labels = None
        before = _rss()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            labels = fn(x, samples, k, seeds[0])
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak - before)
    per_seed = [labels] + [fn(x, samples, k, s) for s in seeds[1:]]
    np.savez(out, times=np.array(times), peak=np.array(max(peak, 0)), labels=np.array(per_seed))


# --- parent ----------------------------------------------------------------------------------------
def agreement(labels_pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import adjusted_rand_score

    from cytopipe.cluster import mean_best_f1

    keep = truth != "Unlabeled"
    return (
        adjusted_rand_score(truth[keep], labels_pred[keep]),
        mean_best_f1(labels_pred, truth, exclude=["Unlabeled"]),
    )


def run_dataset(name, x, truth, samples, k, methods, repeats, seeds, tmp: Path) -> list[dict]:
    d = tmp / name.replace(" ", "_")
    d.mkdir()
    np.save(d / "x.npy", x)
    np.save(d / "samples.npy", samples)
    (d / "meta.json").write_text(json.dumps({"k": k}))
    rows = []
    for method in methods:
        module = METHODS[method][1]
        if module and importlib.util.find_spec(module) is None:
            print(f"  {method}: skipped ({module} is not installed; pip install {module})", flush=True)
            continue
        out = d / f"{method.replace(' ', '_').replace('(', '').replace(')', '')}.npz"
        cmd = [sys.executable, __file__, "--worker", method, "--data", str(d), "--out", str(out)]
        cmd += ["--repeats", str(repeats), "--seeds", ",".join(map(str, seeds))]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  {method}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        with np.load(out, allow_pickle=False) as r:
            times, peak, labels = r["times"], int(r["peak"]), r["labels"]
        scores = np.array([agreement(lab, truth) for lab in labels])
        rows.append(
            {
                "data": name,
                "method": method,
                "t_min": times.min(),
                "t_med": float(np.median(times)),
                "peak_mb": peak / 2**20,
                "ari": scores[0, 0],
                "f1": scores[0, 1],
                "f1_mean": scores[:, 1].mean(),
                "f1_min": scores[:, 1].min(),
                "ari_mean": scores[:, 0].mean(),
                "n_seeds": len(labels),
            }
        )
        print(f"  {method}: done ({times.min():.2f} s)", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'data':<22} {'method':<28} {'min s':>7} {'med s':>7} {'x cytopipe':>10} {'peak MB':>8} "
        f"{'ARI':>6} {'F1':>6} {'seeds':>5} {'F1 mean':>8} {'F1 min':>7} {'ARI mean':>8}"
    )
    print(header)
    print("-" * len(header))
    for data in dict.fromkeys(r["data"] for r in rows):
        ref = next((r["t_min"] for r in rows if r["data"] == data and r["method"] == "cytopipe"), np.nan)
        for r in (r for r in rows if r["data"] == data):
            print(
                f"{r['data']:<22} {r['method']:<28} {r['t_min']:7.2f} {r['t_med']:7.2f} "
                f"{r['t_min'] / ref:10.1f} {r['peak_mb']:8.0f} {r['ari']:6.3f} {r['f1']:6.3f} "
                f"{r['n_seeds']:5d} {r['f1_mean']:8.3f} {r['f1_min']:7.3f} {r['ari_mean']:8.3f}"
            )
    print(
        "\n'x cytopipe' = min time / cytopipe's min time on the same data (>1: slower than cytopipe). "
        "F1 = mean over truth populations of the best single cluster's F1; ARI on labelled events."
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200k cells, 1 repeat, 3 seeds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", default=None, help="seeds for the 68983 agreement (default 1..20)")
    ap.add_argument("--seeds-1m", default="42,1,2", help="seeds for the 1M agreement (default 42,1,2)")
    ap.add_argument("--only", choices=["1m", "68983"], default=None)
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic mixture, not the simulator")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if args.worker:
        worker(args.worker, Path(args.data), args.repeats, seeds or [42], Path(args.out))
        return 0
    repeats = 1 if args.quick else args.repeats
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cytopipe-bench-cluster-") as tmp:
        tmp = Path(tmp)
        if args.only in (None, "68983"):
            if (FLOWSOM_DIR / "68983.fcs").exists():
                x, truth, samples = load_68983()
                print(f"68983.fcs: {x.shape[0]} cells x {x.shape[1]} markers, k=10", flush=True)
                seeds68 = seeds or ([1, 2, 3] if args.quick else list(range(1, 21)))
                rows += run_dataset(
                    "68983 (FlowSOM)", x, truth, samples, 10, list(METHODS)[:1] + list(METHODS)[2:],
                    repeats, seeds68, tmp,
                )  # fmt: skip
            else:
                print(f"68983.fcs not found under {FLOWSOM_DIR}: skipped", flush=True)
        if args.only in (None, "1m"):
            n_per = 20_000 if args.quick else 100_000
            if not args.synthetic and importlib.util.find_spec("cytopipe.simulate") is not None:
                x, truth, samples = simulated_live_cells(10, n_per, tmp)
                name = f"{len(x) // 1000}k x {x.shape[1]} simulated"
                k = 15
                print(f"{name}: Live cells of 10 simulated samples, truth = lineage, k={k}", flush=True)
            else:
                x, truth, samples = synthetic_mixture(10, n_per, seed=0)
                name = f"{len(x) // 1000}k x 16 synthetic"
                k = len(MIXTURE)
                print(f"{name}: {k} populations in 10 samples, k={k}", flush=True)
            seeds1m = [42] if args.quick else [int(v) for v in args.seeds_1m.split(",")]
            rows += run_dataset(name, x, truth, samples, k, list(METHODS), repeats, seeds1m, tmp)
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
