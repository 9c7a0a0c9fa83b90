"""Benchmark: `cytopipe serve` upload throughput and results page render time.

* **upload**: N simulated FCS files (default 48 of 200k events) uploaded one by one through the
  HTTP API (``PUT /api/studies/{id}/uploads``: streamed, hashed while streaming, stored
  content-addressed, validated with ``cytopipe validate``'s rules), against copying the same bytes
  on the same disk (``shutil.copyfile`` + fsync, the floor). Goal: the API at >= 50% of the copy.
* **results page**: a finished run of N samples (the pipeline run from the server on the same
  number of small files: the page's size depends on samples and populations, not events); the
  server time of ``GET /runs/{id}`` from its ``Server-Timing`` header, min and median of
  ``--repeat`` loads. Goal: < 1 s.

A real server subprocess (SQLite in a temporary data folder) on a free loopback port. Timings on a
shared machine are noisy; compare the ratio.

    python bench/serve.py [--files 48] [--events 200000] [--repeat 5] [--parallel 1] [--data DIR] [--skip-run]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serve_support import Server  # noqa: E402


def simulate(folder: Path, files: int, events: int) -> list[Path]:
    from cytopipe.simulate import simulate_trial

    visits = (0, 4, 12, 24)
    patients = max(1, -(-files // len(visits)))
    if not (folder / "manifest.csv").is_file():
        simulate_trial(folder, n_patients=patients, visits=visits, events=events, seed=77, control_events=500)
    return sorted((folder / "fcs").glob("*.fcs"))[:files]


def copy_rate(paths: list[Path], target: Path) -> float:
    target.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for p in paths:
        dest = target / p.name
        shutil.copyfile(p, dest)
        with open(dest, "rb+") as fh:
            os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    shutil.rmtree(target)
    return seconds


def upload_rate(server, study: int, paths: list[Path], parallel: int) -> float:
    """Files sent ``parallel`` at a time (one client each); the page sends one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    clients = [server.client() for _ in range(parallel)]

    def send(i: int) -> None:
        for p in paths[i::parallel]:
            r = clients[i].upload(study, p)
            assert r.status_code == 201 and r.json()["status"] in ("ok", "warning"), r.text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(send, range(parallel)))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--data", type=Path, help="folder for the simulated files (kept; default: temporary)")
    ap.add_argument("--skip-run", action="store_true", help="only the upload benchmark")
    ap.add_argument("--parallel", type=int, default=1, help="files uploaded at a time (the page sends 1)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    data = args.data or tmp / "trial"
    try:
        print(f"simulating {args.files} files of {args.events} events ...", flush=True)
        paths = simulate(data, args.files, args.events)
        total = sum(p.stat().st_size for p in paths)
        server = Server(tmp / "workspace", None, "--max-file-size", "1GB").start(create_admin="admin")
        try:
            c = server.client()
            copies, uploads = [], []
            for i in range(args.repeat):
                copies.append(copy_rate(paths, tmp / "copy"))
                sid = c.post("/api/studies", json={"name": f"bench {i}", "template": "sle_il2_tcell_nk.yaml"},
                             headers=c.h).json()["id"]  # fmt: skip
                uploads.append(upload_rate(server, sid, paths, args.parallel))
                shutil.rmtree(server.data / "blobs")  # the next round stores the bytes again
                (server.data / "blobs").mkdir()
            mb = total / 1e6
            best_copy, best_up = min(copies), min(uploads)
            print(f"\nupload of {len(paths)} files, {mb:.0f} MB, {args.parallel} at a time ({args.repeat} rounds, "
                  "min / median):")  # fmt: skip
            print(
                f"  copy on disk (floor): {mb / best_copy:8.1f} MB/s / {mb / statistics.median(copies):8.1f} MB/s"
            )
            print(
                f"  HTTP API upload:      {mb / best_up:8.1f} MB/s / {mb / statistics.median(uploads):8.1f} MB/s"
            )
            print(f"  API / copy: {best_copy / best_up:.2f} (median {statistics.median(copies) / statistics.median(uploads):.2f}); "
                  "goal >= 0.50")  # fmt: skip
            if not args.skip_run:
                results_page(c, tmp, len(paths), args.repeat)
        finally:
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def results_page(c, tmp: Path, n: int, repeat: int) -> None:
    small = simulate(tmp / "small", n, 2000)
    sid = c.post(
        "/api/studies", json={"name": "bench results", "template": "sle_il2_tcell_nk.yaml"}, headers=c.h
    ).json()["id"]
    for p in small:
        c.upload(sid, p)
    rows = c.get(f"/api/studies/{sid}/mapping").json()
    for row in rows:
        row["arm"] = row["arm"] or "unknown"
    c.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=c.h)
    run = c.post(f"/api/studies/{sid}/runs", headers=c.h).json()
    print(f"\nrunning the pipeline on {len(small)} small files for the results page ...", flush=True)
    status = c.wait_run(run["id"], timeout=3600)
    assert status["status"] == "finished", status
    times = []
    for _ in range(repeat + 1):
        r = c.get(f"/runs/{run['id']}")
        assert r.status_code == 200 and 'section id="results"' in r.text.replace("'", '"')
        times.append(float(r.headers["server-timing"].split("dur=")[1]) / 1000)
    times = times[1:]  # the first load warms the template cache
    print(f"results page of a {len(small)}-sample run: server time min {min(times) * 1000:.0f} ms, "
          f"median {statistics.median(times) * 1000:.0f} ms (goal < 1000 ms); {len(r.content) / 1e3:.0f} kB")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
