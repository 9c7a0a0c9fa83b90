"""Benchmark: `cytopipe serve` upload throughput and results page render time.

* **upload**: N simulated FCS files (default 48 of 200k events) uploaded through the HTTP API
  (``PUT /api/studies/{id}/uploads``: streamed, hashed and validated with ``cytopipe validate``'s
  rules while streaming, fsynced, stored content-addressed), two at a time as the page sends them
  (``--parallel``), against copying the same bytes on the same filesystem (``shutil.copyfile``, an
  in-kernel copy, + an fsync per file as the server does; sources in the page cache for both).
  Goal: the API at >= 50% of the copy. Three clients, each round running the copy and all of
  them (``--client`` picks one):

  - ``httpx`` in this process (what the tests use; ~0.7 CPU-s/GB of its own on the same cores);
  - ``curl`` (``curl -T FILE URL`` as docs/serve.md shows, one curl process for the batch);
  - ``sendfile``: HTTP/1.1 by hand, the body sent by the kernel (``socket.sendfile``): the least
    a client can cost, standing for a client on another computer (a lab PC, a LIMS).

* **results page**: a finished run of N samples (the pipeline run from the server on the same
  number of small files: the page's size depends on samples and populations, not events); the
  server time of ``GET /runs/{id}`` from its ``Server-Timing`` header, min and median of
  ``--repeat`` loads. Goal: < 1 s.

A real server subprocess (SQLite in a temporary data folder) on a free loopback port. The source
files are read once before timing (they are in the page cache), and the copy and the server's
store are on the same filesystem. Rounds alternate copy and uploads (interleaved), and each line
prints the load average: on a shared machine the wall-clock ratio follows the load (the copy is
kernel work and disk; the upload needs CPU for the socket, sha256 and validation). The CPU
seconds of the server process (user + system), of the client and of the copy are printed too:
they depend much less than the wall clock on what else runs. The last lines give the ratio per
client (median of the rounds' ratios). Each round also times a direct-I/O copy of the same files
(``O_DIRECT``, as the server writes): a second floor that skips the page cache, whose cost on some
VMs moves several-fold within minutes; the upload / direct-copy ratio is printed beside the goal's.

    python bench/serve.py [--files 48] [--events 200000] [--repeat 5] [--parallel 2] [--client all]
                          [--data DIR] [--skip-run]
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


def direct_copy_rate(paths: list[Path], target: Path, block: int = 8 << 20) -> float:
    """Seconds to copy the files with direct I/O (``O_DIRECT``, aligned 8 MiB blocks, fsync each),
    as the server stores uploads: a second floor that does not go through the page cache, whose
    cost on some VMs moves several-fold from minute to minute. NaN where direct I/O is refused."""
    import fcntl
    import mmap

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return float("nan")
    target.mkdir(parents=True, exist_ok=True)
    buf = mmap.mmap(-1, block)
    t0 = time.perf_counter()
    try:
        for p in paths:
            fd = os.open(target / p.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
            try:
                with open(p, "rb", buffering=0) as src:
                    offset = 0
                    while n := src.readinto(buf):
                        if n < block:  # the last, partial block: not a whole number of sectors
                            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~flag)
                        os.pwrite(fd, memoryview(buf)[:n], offset)
                        offset += n
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError:
        return float("nan")
    finally:
        buf.close()
        shutil.rmtree(target, ignore_errors=True)
    return time.perf_counter() - t0


def upload_rate(server, study: int, paths: list[Path], parallel: int) -> tuple[float, tuple, float]:
    """httpx in this process: (seconds, server (user, system) CPU seconds, client CPU seconds);
    files sent ``parallel`` at a time (one client each), as the page does."""
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


def curl_rate(server, study: int, paths: list[Path], parallel: int) -> tuple[float, tuple, float]:
    """The same with curl (``curl -T FILE URL``, docs/serve.md): one curl process for the whole
    batch (one ``-T FILE URL`` pair per file, the connection reused), ``--parallel`` when more than
    one at a time. The client's CPU is curl's (the children's rusage)."""
    import resource
    import subprocess
    from urllib.parse import quote

    c = server.client()
    cookie = "; ".join(f"{k}={v}" for k, v in c.cookies.items())
    args = ["curl", "-sS", "-H", f"Cookie: {cookie}", "-H", f"X-CSRF-Token: {c.h['X-CSRF-Token']}",
            "-H", "Content-Type: application/octet-stream", "-w", "%{http_code}\\n"]  # fmt: skip
    if parallel > 1:
        args += ["--parallel", "--parallel-max", str(parallel)]
    for p in paths:  # the answers are checked through the API below (parallel ones interleave)
        args += [
            "-T",
            str(p),
            "-o",
            os.devnull,
            f"{server.url}/api/studies/{study}/uploads?name={quote(p.name)}",
        ]
    t0, c0, s0 = (
        time.perf_counter(),
        resource.getrusage(resource.RUSAGE_CHILDREN),
        cpu_seconds(server.proc.pid),
    )
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    seconds, s1 = time.perf_counter() - t0, cpu_seconds(server.proc.pid)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = c.get(f"/api/studies/{study}").json()["uploads"]
    assert out.split() == ["201"] * len(paths), out
    assert sorted(r["name"] for r in rows) == sorted(p.name for p in paths), rows
    assert all(r["status"] in ("ok", "warning") for r in rows), rows
    client = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    return seconds, (s1[0] - s0[0], s1[1] - s0[1]), client


def sendfile_rate(server, study: int, paths: list[Path], parallel: int) -> tuple[float, tuple, float]:
    """The same with the least a client can spend: HTTP/1.1 by hand on a kept-alive socket, the
    body sent by the kernel from the page cache (``socket.sendfile``), the answer parsed by
    ``http.client``; ``parallel`` connections. It stands for a client on another computer, whose
    CPU is not taken from the server's two cores."""
    import http.client
    import json
    import socket
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import quote

    c = server.client()
    cookie = "; ".join(f"{k}={v}" for k, v in c.cookies.items())

    def send(i: int) -> None:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            for p in paths[i::parallel]:
                head = (f"PUT /api/studies/{study}/uploads?name={quote(p.name)} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{server.port}\r\nCookie: {cookie}\r\n"
                        f"X-CSRF-Token: {c.h['X-CSRF-Token']}\r\nContent-Type: application/octet-stream\r\n"
                        f"Content-Length: {p.stat().st_size}\r\n\r\n")  # fmt: skip
                sock.sendall(head.encode())
                with open(p, "rb") as fh:
                    sock.sendfile(fh)
                r = http.client.HTTPResponse(sock)
                r.begin()
                body = r.read()
                assert r.status == 201 and json.loads(body)["status"] in ("ok", "warning"), body[:2000]

    t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_seconds(server.proc.pid)
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(send, range(parallel)))
    s1 = cpu_seconds(server.proc.pid)
    return time.perf_counter() - t0, (s1[0] - s0[0], s1[1] - s0[1]), time.process_time() - c0


CLIENTS = {"httpx": upload_rate, "curl": curl_rate, "sendfile": sendfile_rate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--data", type=Path, help="folder for the simulated files (kept; default: temporary)")
    ap.add_argument("--skip-run", action="store_true", help="only the upload benchmark")
    ap.add_argument("--parallel", type=int, default=2, help="files uploaded at a time (the page sends 2)")
    ap.add_argument("--client", choices=("all", *CLIENTS), default="all",
                    help="upload client: httpx in this process, curl (one process per batch), sendfile (a "
                    "raw socket), or all (default; each round runs the copy and every upload, interleaved)")  # fmt: skip
    args = ap.parse_args(argv)
    names = list(CLIENTS) if args.client == "all" else [args.client]
    if "curl" in names and shutil.which("curl") is None:
        print("curl is not installed: the httpx client only")
        names.remove("curl")
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
            copies, loads, directs = [], [], []
            uploads: dict[str, list] = {n: [] for n in names}
            mb = total / 1e6
            for i in range(args.repeat):
                loads.append(os.getloadavg()[0])
                copies.append(copy_rate(paths, tmp / "copy"))
                directs.append(direct_copy_rate(paths, tmp / "copy-direct"))
                line = (f"  round {i + 1}: load {loads[-1]:5.1f}  copy {mb / copies[-1][0]:6.1f} MB/s"
                        f" (direct-I/O copy {mb / directs[-1]:6.1f})")  # fmt: skip
                for n in names[:: 1 if i % 2 == 0 else -1]:  # alternate which client goes first
                    sid = c.post("/api/studies", json={"name": f"bench {i} {n}", "template": "sle_il2_tcell_nk.yaml"},
                                 headers=c.h).json()["id"]  # fmt: skip
                    uploads[n].append(CLIENTS[n](server, sid, paths, args.parallel))
                    shutil.rmtree(server.data / "blobs")  # the next upload stores the bytes again
                    (server.data / "blobs").mkdir()
                    t, cpu, client = uploads[n][-1]
                    line += (f"  {n} {mb / t:6.1f} MB/s ratio {copies[-1][0] / t:.2f} (server CPU "
                             f"{sum(cpu) / mb * 1e3:.2f}, client {client / mb * 1e3:.2f} s/GB)")  # fmt: skip
                print(line, flush=True)
            best_copy, med_copy = min(t for t, _ in copies), statistics.median(t for t, _ in copies)
            print(f"\nupload of {len(paths)} files, {mb:.0f} MB, {args.parallel} at a time ({args.repeat} rounds, "
                  f"min / median; load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores):")  # fmt: skip
            print(f"  copyfile + fsync (floor):     {mb / best_copy:8.1f} MB/s / {mb / med_copy:8.1f} MB/s")
            print(f"  direct-I/O copy + fsync:      {mb / min(directs):8.1f} MB/s / "
                  f"{mb / statistics.median(directs):8.1f} MB/s (the floor without the page cache)")  # fmt: skip
            cpu_copy = statistics.median(x for _, x in copies)
            print(f"  CPU seconds per GB (median): copy {cpu_copy / mb * 1e3:.2f}")
            for n in names:
                ups = uploads[n]
                best_up, med_up = min(t for t, *_ in ups), statistics.median(t for t, *_ in ups)
                ratios = [cp[0] / up[0] for cp, up in zip(copies, ups)]
                user = statistics.median(x[0] for _, x, _ in ups)
                system = statistics.median(x[1] for _, x, _ in ups)
                cpu_server = statistics.median(sum(x) for _, x, _ in ups)
                cpu_client = statistics.median(x for *_, x in ups)
                print(
                    f"  HTTP API upload, client {n + ':':6s} {mb / best_up:8.1f} MB/s / {mb / med_up:8.1f} MB/s"
                )
                print(f"    API / copy with {n}: median {statistics.median(ratios):.2f} of the rounds' ratios "
                      f"(range {min(ratios):.2f}-{max(ratios):.2f}; best / best {best_copy / best_up:.2f}); goal >= 0.50")  # fmt: skip
                print(f"    CPU seconds per GB (median): server {cpu_server / mb * 1e3:.2f} (user {user / mb * 1e3:.2f}, "
                      f"system {system / mb * 1e3:.2f}) + client ({n}) {cpu_client / mb * 1e3:.2f}")  # fmt: skip
            summary = ", ".join(
                f"{n} {statistics.median(cp[0] / up[0] for cp, up in zip(copies, uploads[n])):.2f}"
                for n in names
            )
            direct_summary = ", ".join(
                f"{n} {statistics.median(d / up[0] for d, up in zip(directs, uploads[n])):.2f}" for n in names
            )
            print(f"  upload / direct-I/O copy (median of the rounds), by client: {direct_summary}")
            print(f"\nRESULT upload / copy (median of {args.repeat} rounds, {args.parallel} files at a time, load "
                  f"{min(loads):.1f}-{max(loads):.1f}), by client: {summary}; goal >= 0.50")  # fmt: skip
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
