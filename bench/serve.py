"""Benchmark: `cytopipe serve` upload throughput and results page render time.

* **upload**: N simulated FCS files (default 48 of 200k events) uploaded one by one through the
  HTTP API (``PUT /api/studies/{id}/uploads``: streamed, hashed and validated with ``cytopipe
  validate``'s rules while streaming, fsynced, stored content-addressed), against copying the same
  bytes on the same filesystem (``shutil.copyfile``, an in-kernel copy, + an fsync per file as the
  server does; sources in the page cache for both). Goal: the API at >= 50% of the copy.
* **results page**: a finished run of N samples (the pipeline run from the server on the same
  number of small files: the page's size depends on samples and populations, not events); the
  server time of ``GET /runs/{id}`` from its ``Server-Timing`` header, min and median of
  ``--repeat`` loads. Goal: < 1 s.

A real server subprocess (SQLite in a temporary data folder) on a free loopback port; the client is
httpx in this process. The source files are read once before timing (they are in the page cache),
and the copy and the server's store are on the same filesystem. Rounds alternate copy and upload
(interleaved), and each line prints the load average: on a shared machine the wall-clock ratio
follows the load (the copy is kernel work and disk; the upload needs CPU for the socket, sha256
and validation). The CPU seconds of the server process (user + system: the system part is mostly
the kernel's page-cache work of the writes), of the client and of the copy are printed too: they
depend much less than the wall clock on what else runs.

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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process (all its threads, exited ones included) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def copy_rate(paths: list[Path], target: Path) -> tuple[float, float]:
    """(seconds, CPU seconds) to copy the files and fsync each, as the upload does."""
    target.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for p in paths:
        dest = target / p.name
        shutil.copyfile(p, dest)
        with open(dest, "rb+") as fh:
            os.fsync(fh.fileno())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(target)
    return seconds, cpu


def upload_rate(server, study: int, paths: list[Path], parallel: int) -> tuple[float, tuple, float]:
    """(seconds, server (user, system) CPU seconds, client CPU seconds); files sent ``parallel`` at
    a time (one client each); the page sends one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    clients = [server.client() for _ in range(parallel)]

    def send(i: int) -> None:
        for p in paths[i::parallel]:
            r = clients[i].upload(study, p)
            assert r.status_code == 201 and r.json()["status"] in ("ok", "warning"), r.text

    t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_seconds(server.proc.pid)
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(send, range(parallel)))
    s1 = cpu_seconds(server.proc.pid)
    return time.perf_counter() - t0, (s1[0] - s0[0], s1[1] - s0[1]), time.process_time() - c0


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
        total = sum(len(p.read_bytes()) for p in paths)  # read once: the sources are in the page cache
        server = Server(tmp / "workspace", None, "--max-file-size", "1GB").start(create_admin="admin")
        same_fs = os.stat(paths[0]).st_dev == os.stat(tmp).st_dev
        print(f"{len(paths)} files, {total} bytes; sources in the page cache; store and copy on "
              f"{'the same filesystem as the sources' if same_fs else 'another filesystem than the sources'}")  # fmt: skip
        try:
            c = server.client()
            copies, uploads, loads = [], [], []
            mb = total / 1e6
            for i in range(args.repeat):
                loads.append(os.getloadavg()[0])
                copies.append(copy_rate(paths, tmp / "copy"))
                sid = c.post("/api/studies", json={"name": f"bench {i}", "template": "sle_il2_tcell_nk.yaml"},
                             headers=c.h).json()["id"]  # fmt: skip
                uploads.append(upload_rate(server, sid, paths, args.parallel))
                shutil.rmtree(server.data / "blobs")  # the next round stores the bytes again
                (server.data / "blobs").mkdir()
                server_cpu = sum(uploads[-1][1]) / mb * 1e3
                print(f"  round {i + 1}: load {loads[-1]:5.1f}  copy {mb / copies[-1][0]:6.1f} MB/s  upload "
                      f"{mb / uploads[-1][0]:6.1f} MB/s  ratio {copies[-1][0] / uploads[-1][0]:.2f}  "
                      f"(server CPU {server_cpu:.2f} s/GB)", flush=True)  # fmt: skip
            best_copy, best_up = min(t for t, _ in copies), min(t for t, *_ in uploads)
            med_copy, med_up = (
                statistics.median(t for t, _ in copies),
                statistics.median(t for t, *_ in uploads),
            )
            print(f"\nupload of {len(paths)} files, {mb:.0f} MB, {args.parallel} at a time ({args.repeat} rounds, "
                  f"min / median; load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores):")  # fmt: skip
            print(f"  copyfile + fsync (floor):     {mb / best_copy:8.1f} MB/s / {mb / med_copy:8.1f} MB/s")
            print(f"  HTTP API upload:              {mb / best_up:8.1f} MB/s / {mb / med_up:8.1f} MB/s")
            print(f"  API / copy: {best_copy / best_up:.2f} (median {med_copy / med_up:.2f}); goal >= 0.50")
            cpu_copy = statistics.median(x for _, x in copies)
            user = statistics.median(x[0] for _, x, _ in uploads)
            system = statistics.median(x[1] for _, x, _ in uploads)
            cpu_server = statistics.median(sum(x) for _, x, _ in uploads)
            cpu_client = statistics.median(x for *_, x in uploads)
            print(f"  CPU seconds per GB (median): copy {cpu_copy / mb * 1e3:.2f}; upload: server {cpu_server / mb * 1e3:.2f}"
                  f" (user {user / mb * 1e3:.2f}, system {system / mb * 1e3:.2f}) + client {cpu_client / mb * 1e3:.2f}")  # fmt: skip
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
