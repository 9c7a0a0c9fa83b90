"""Benchmark: FCS reading speed of cytopipe against its peers and the hardware floor.

    python bench/read_fcs.py                  # 1M events, 7 repeats, every reader
    python bench/read_fcs.py --events 200000 --repeats 3 --readers cytopipe,flowio
    python bench/read_fcs.py --readers cytopipe --repeats 15   # loaded machine: read the cpu columns

Files (written to a temporary folder, page-cached by a warm-up read):

* ``float32 LE``: 20 channels, little-endian float32 -- what cytopipe.write_fcs writes;
* ``float32 BE``: the same events big-endian -- what BD instruments write;
* ``int16 BE``: 20 channels of 16-bit integers with $PnR 1024 (FACSCalibur style: byte swap
  and range mask needed).

For each reader: min and median wall time and process CPU time (user + system, page faults
included) of ``--repeats`` reads after one warm-up; events/s; the speed as a fraction of the
floor -- ``np.fromfile`` of the DATA segment into a fresh array, warm page cache, timed the same
way; 1.0 = as fast as reading the bytes -- by wall and by CPU time; the median of per-read
ratios (each read paired with a floor read just before it: both see the same load); and as a
fraction of the float32 floor (the same events stored as little-endian float32). Beside
``cytopipe`` (a fresh array, the headline): ``cytopipe reused`` (``read_fcs(path, out=buffer)``,
one buffer reused for every read, as a worker reading file after file could) and ``output
alone`` (``np.empty`` + fill of the float32 event matrix, no reading at all: the bound for any
reader that returns a fresh float32 matrix). Then the peak memory of ``cytopipe.read_fcs``
(tracemalloc, which sees numpy's allocations) relative to the matrix it returns. On a loaded
machine wall time mostly measures the wait for a core: compare the CPU columns.

Why int16 stays below 0.8x of its floor by CPU time on the Intel Xeon VM (2026-12-07, 03:15-03:23
UTC, load average 7-10 from other sessions on this 2-core guest, CPU time, min of 15 reads, the
previous code and this one alternated 3 times): a fresh 80 MB float32 matrix costs more than the
whole int16 floor here. Faulting it in (numpy's 2 MB pages, 37-40 THP faults) takes ~10 ms of
kernel time; the floor, 40 MB faulted and copied, 9.3-10.8 ms; ``output alone`` 14.0-14.7 ms =
0.64-0.77x. No single-threaded decode into a fresh matrix reaches 0.8x by CPU on this VM; into a
reused buffer it does (0.81-0.89x). Found and fixed: numba typed the decode kernels' OR
accumulator as 64-bit, so LLVM vectorised the loop 4 values wide (decode_u16 3.8 ms per 20M
values in cache, now 2.6): the fresh int16 read went from 20.4-21.2 to 18.6-19.1 ms of CPU.
Tried and not kept: two threads decoding pieces of the DATA (both cores fault in pages: the same
CPU time, a shorter wall time; it meets the ratio only by using a second core against a
one-thread floor, and the pipeline's workers, which keep every core busy, gain nothing); within
the noise: mapped chunks of 4 or 64 MiB, mask blocks of 64 or 1024 rows, no unmapping of decoded
pages; slower: reading through a reused 64 KiB-1 MiB buffer instead of the mapping, reading the
raw bytes into the upper half of the output and widening in place (the floor's copy plus the
faults of the lower half). Not done: matrices from a pool of already-faulted memory (what
``cytopipe reused`` measures): the process would keep the memory after the sample is dropped.

Why int16 stays below 0.8x of its own floor (2026-12-03, 2-core KVM guest, load average 9-13,
CPU time, 1M x 20, this code and the previous one alternated, 15 reads each): the floor reads
40 MB into a fresh 40 MB array in 9.8-10.6 ms. Any reader that returns float32 must fill a
fresh 80 MB matrix, and ``output alone`` -- only that, no reading -- takes 14.6-15.1 ms =
0.67-0.73x of the floor (paired 0.71-0.77x): faulting the pages in (the kernel zeroes them;
numpy's MADV_HUGEPAGE gives 2 MB pages here, 625 faults instead of 19,532 -- with 4 KB pages the
same fill takes 28-29 ms) costs ~10 ms of it, writing them ~4.5 ms. A decode that cost nothing
could not pass ~0.75x. ``read_fcs`` of the int16 file: 21.7-22.2 ms = 0.44-0.48x (paired
0.48-0.49x), was 25.7-26.4 ms = 0.40x. Tried: decoding straight from the file's mapped pages
instead of through a chunk buffer (-2 ms, kept); int32 arithmetic in the kernel (numba widens
uint16 operations to 64-bit lanes; kept); range masks tiled over an L1-sized block of rows
instead of the whole chunk (-0.7 ms, kept); chunks of 64 KiB to 1 MiB (within 0.6 ms of each
other; 4 MiB 1.7 ms slower); one scalar mask for files whose channels share one $PnR (another
-1 ms, not kept: it helps only such files, like this benchmark's); reading everything first,
then converting (33 ms); MADV_POPULATE_WRITE on the output before decoding (fill 20 ms instead
of 14.7: the zeroed pages are no longer in cache when written); MADV_NOHUGEPAGE (28 ms). Into a
reused buffer (no fresh pages) the same read takes 13.1-13.6 ms = 0.75-0.78x (paired
0.81-0.85x).

Big-endian float32 now reads at 1.03-1.05x its floor (paired 1.02-1.03x; was 0.76-0.77x) and
little-endian at 0.98-1.04x (was 0.96-0.97x): both are copied -- swapped or not -- in one
vectorised pass from the mapped page cache into the output, which costs less here than the
kernel's own copy in read() (``np.fromfile``).

The per-file fixed cost (the last line of the output; 2026-12-06 12:31-12:38 UTC, load average
3-6 on this 2-core guest, the previous code and this one alternated 3 times, 15 reads each):
``read_fcs`` of a 1,000 x 20 float32 LE file takes 0.140-0.142 ms of CPU, was 0.166-0.171 ms;
valgrind counts 1.46 M instructions per read, was 1.97 M (float32 BE 1.72 M, was 2.13 M; int16
2.06 M, was 2.67 M). Cut: the TEXT decoded once and split instead of token by token, keywords
built by one ``dict(zip(...))``, regexes compiled once, channel keywords looked up without
formatting each key twice, the path parsed once. Right after an 80 MB read (caches cold) the
same work costs 1.5-2x more, and that is the little-endian gap to the floor: its data copy alone
(``open`` + ``np.empty`` + ``readinto``) is as fast as ``np.fromfile``. At that load the 1M LE
ratio did not move beyond the noise: 0.93-0.98x by CPU (paired 0.92x), was 0.90-0.95x (paired
0.91-0.92x). Of what is left, the channel table (a 7-column pandas DataFrame, ~0.7 M
instructions, about half) is the largest part; pandas' constructor has no cheaper public form, and
building it lazily would help only callers that never look at ``Sample.channels`` (the pipeline
reads it for every file), so it is built as before.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cytopipe.fcs import read_fcs, read_fcs_header, write_fcs  # noqa: E402

READERS = ("cytopipe", "flowio", "fcsparser", "flowkit", "readfcs")


# --------------------------------------------------------------------------------------------
# test files
# --------------------------------------------------------------------------------------------
def _write_raw(path: Path, keywords: dict[str, str], data: bytes) -> None:
    """A minimal FCS 3.1 writer for layouts cytopipe.write_fcs does not produce."""
    kw = dict(keywords, **{"$BEGINDATA": "0" * 12, "$ENDDATA": "0" * 12})
    text = ("|" + "".join(f"{k}|{v}|" for k, v in kw.items())).encode()
    begin = 58 + len(text)
    end = begin + len(data) - 1
    kw["$BEGINDATA"], kw["$ENDDATA"] = str(begin).zfill(12), str(end).zfill(12)
    text = ("|" + "".join(f"{k}|{v}|" for k, v in kw.items())).encode()
    fits = end <= 99_999_999
    header = f"FCS3.1    {58:>8d}{57 + len(text):>8d}{begin if fits else 0:>8d}{end if fits else 0:>8d}{0:>8d}{0:>8d}"
    with open(path, "wb") as fh:
        fh.write(header.encode() + text)
        fh.write(data)


def make_files(folder: Path, n_events: int, n_channels: int = 20, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    events = rng.lognormal(7, 1.5, size=(n_events, n_channels)).astype(np.float32)
    names = [f"FL{i}-A" for i in range(1, n_channels + 1)]
    markers = [f"CD{i}" for i in range(1, n_channels + 1)]  # readfcs needs $PnS on every channel
    files = {"float32 LE": folder / "float32_le.fcs", "float32 BE": folder / "float32_be.fcs"}
    write_fcs(files["float32 LE"], events, list(zip(names, markers)))
    base = {"$MODE": "L", "$NEXTDATA": "0", "$PAR": str(n_channels), "$TOT": str(n_events)}
    kw = dict(base, **{"$BYTEORD": "4,3,2,1", "$DATATYPE": "F"})
    for i, name in enumerate(names, 1):
        kw.update({f"$P{i}N": name, f"$P{i}S": markers[i - 1], f"$P{i}B": "32", f"$P{i}E": "0,0"})
        kw[f"$P{i}R"] = "262144"
    _write_raw(files["float32 BE"], kw, events.astype(">f4").tobytes())
    ints = rng.integers(0, 1024, size=(n_events, n_channels), dtype=np.uint16)
    kw = dict(base, **{"$BYTEORD": "4,3,2,1", "$DATATYPE": "I"})
    for i, name in enumerate(names, 1):
        kw.update({f"$P{i}N": name, f"$P{i}S": markers[i - 1], f"$P{i}B": "16", f"$P{i}E": "0,0"})
        kw[f"$P{i}R"] = "1024"
    files["int16 BE"] = folder / "int16_be.fcs"
    _write_raw(files["int16 BE"], kw, ints.astype(">u2").tobytes())
    return files


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------
def reader_functions(path: Path) -> dict[str, Callable[[], object]]:
    info = read_fcs_header(path)
    begin, end = info.data_segment
    count = (end - begin + 1) // np.dtype(_floor_dtype(info)).itemsize

    def floor():
        return np.fromfile(path, dtype=_floor_dtype(info), count=count, offset=begin)

    def cytopipe():
        return read_fcs(path).events

    buffer = np.empty(0, dtype=np.float32)

    def cytopipe_reused():
        nonlocal buffer
        if buffer.size < info.n_events * info.n_channels:
            buffer = np.zeros(info.n_events * info.n_channels, dtype=np.float32)  # first call only
        return read_fcs(path, out=buffer).events

    def output_alone():
        events = np.empty((info.n_events, info.n_channels), dtype=np.float32)
        events.fill(1.0)
        return events

    def flowio_reader():
        import flowio

        return flowio.FlowData(str(path)).as_array(preprocess=False)

    def fcsparser_reader():
        import fcsparser

        return fcsparser.parse(str(path), reformat_meta=False, channel_naming="$PnN")[1]

    def flowkit_reader():
        import flowkit

        return flowkit.Sample(str(path)).get_events(source="raw")

    def readfcs_reader():
        import readfcs

        return readfcs.read(str(path)).X

    return {
        "floor": floor,
        "cytopipe": cytopipe,
        "cytopipe reused": cytopipe_reused,
        "output alone": output_alone,
        "flowio": flowio_reader,
        "fcsparser": fcsparser_reader,
        "flowkit": flowkit_reader,
        "readfcs": readfcs_reader,
    }


def _floor_dtype(info) -> str:
    order = ">" if info.byte_order == "big" else "<"
    return order + ("f4" if info.datatype == "F" else "u2")


def time_reader(
    fn: Callable[[], object], repeats: int, floor: Callable[[], object] | None = None
) -> dict[str, list[float]] | str:
    """Wall and CPU times (process CPU: user + system, page faults included) of ``repeats``
    calls after one warm-up call. With ``floor``, each call of ``fn`` is paired with a call of
    ``floor`` just before it (interleaved: both see the same load) and the per-pair ratios
    floor/reader are kept. CPU time leaves out the time spent waiting for a core on a loaded
    machine, which wall time cannot."""

    def once(f):
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        result = f()
        c1, w1 = time.process_time(), time.perf_counter()
        del result
        return w1 - w0, c1 - c0

    stats: dict[str, list[float]] = {"wall": [], "cpu": [], "paired_wall": [], "paired_cpu": []}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()  # warm-up: imports, numba's cached kernels, page cache
            for _ in range(repeats):
                base = once(floor) if floor is not None else None
                wall, cpu = once(fn)
                stats["wall"].append(wall)
                stats["cpu"].append(cpu)
                if base is not None:
                    stats["paired_wall"].append(base[0] / wall)
                    stats["paired_cpu"].append(base[1] / cpu)
    except Exception as exc:  # a peer that cannot read the file is reported, not fatal
        return f"error: {type(exc).__name__}: {str(exc)[:60]}"
    return stats


def peak_memory(path: Path) -> tuple[int, int]:
    """(peak bytes allocated during read_fcs, bytes of the returned event matrix)."""
    gc.collect()
    tracemalloc.start()
    events = read_fcs(path).events
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, events.nbytes


def fixed_cost_line(folder: Path, n_channels: int, n_events: int = 1000, repeats: int = 200) -> str:
    """The per-file fixed cost of ``read_fcs`` (opening, HEADER/TEXT, keyword checks, channel
    table, result object): min process CPU time of reading a small file, back to back (warm
    caches; right after an 80 MB read, as in the table above, the same work costs 1.5-2x more)."""
    small = folder / "small"
    small.mkdir(exist_ok=True)
    path = make_files(small, n_events, n_channels)["float32 LE"]
    for _ in range(10):
        read_fcs(path)
    cpu = []
    for _ in range(repeats):
        c0 = time.process_time()
        read_fcs(path)
        cpu.append(time.process_time() - c0)
    return (
        f"fixed cost per file (read_fcs of {n_events:,} events x {n_channels} channels float32 LE, "
        f"min CPU time of {repeats} reads): {min(cpu) * 1e3:.3f} ms"
    )


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="events per file (default 1,000,000)")
    parser.add_argument("--channels", type=int, default=20, help="channels per file (default 20)")
    parser.add_argument("--repeats", type=int, default=7, help="timed reads per reader (default 7)")
    parser.add_argument(
        "--readers", default=",".join(READERS), help=f"comma-separated subset of {','.join(READERS)}"
    )
    args = parser.parse_args(argv)
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    unknown = set(readers) - set(READERS)
    if unknown:
        parser.error(f"unknown reader(s) {sorted(unknown)}; choose from {READERS}")

    with tempfile.TemporaryDirectory(prefix="cytopipe-bench-") as tmp:
        files = make_files(Path(tmp), args.events, args.channels)
        print(
            f"FCS read benchmark: {args.events:,} events x {args.channels} channels, warm page cache, "
            f"min / median of {args.repeats} reads after a warm-up, wall clock and process CPU time; "
            f"'x floor' = min floor / min reader (wall, cpu), 'paired' = median of the per-read ratios "
            f"(each read paired with a floor read just before it, cpu); load average "
            f"{os.getloadavg()[0]:.1f}\n"
        )
        header = (
            f"{'file':<11} {'reader':<16} {'wall min':>8} {'median':>7} {'cpu min':>8} {'median':>7} "
            f"{'Mev/s':>6} {'x floor':>11} {'paired':>6} {'x f32 floor':>11}"
        )
        print(header)
        print("-" * len(header))
        memory = {}
        f32_floor = None  # reading the same events as little-endian float32: the cost of the output alone
        for label, path in files.items():
            functions = reader_functions(path)
            floor = time_reader(functions["floor"], args.repeats)
            assert not isinstance(floor, str), floor
            f32_floor = f32_floor or min(floor["cpu"])
            names = ["floor", *readers]
            if "cytopipe" in readers:
                names[names.index("cytopipe") + 1 : names.index("cytopipe") + 1] = [
                    "cytopipe reused",
                    "output alone",
                ]
            for name in names:
                result = (
                    floor
                    if name == "floor"
                    else time_reader(functions[name], args.repeats, functions["floor"])
                )
                if isinstance(result, str):
                    print(f"{label:<11} {name:<16} {result}")
                    continue
                wall, cpu = min(result["wall"]), min(result["cpu"])
                paired = statistics.median(result["paired_cpu"]) if result["paired_cpu"] else float("nan")
                print(
                    f"{label:<11} {name:<16} {wall * 1e3:8.1f} {statistics.median(result['wall']) * 1e3:7.1f} "
                    f"{cpu * 1e3:8.1f} {statistics.median(result['cpu']) * 1e3:7.1f} {args.events / cpu / 1e6:6.1f} "
                    f"{min(floor['wall']) / wall:5.2f} {min(floor['cpu']) / cpu:5.2f} {paired:6.2f} "
                    f"{f32_floor / cpu:11.2f}"
                )
            if "cytopipe" in readers:
                memory[label] = peak_memory(path)
            print()
        print(
            "'cytopipe reused': read_fcs(path, out=buffer) into one buffer reused for every read (a worker "
            "reading file after file); the headline is the fresh-array 'cytopipe' row.\n'output alone': "
            "np.empty + fill of the float32 event matrix, no reading at all: the bound for any reader that "
            "returns a fresh float32 matrix.\n"
        )
        if memory:
            print("peak memory of cytopipe.read_fcs (tracemalloc) / size of the float32 event matrix:")
            for label, (peak, matrix) in memory.items():
                print(f"  {label:<11} {peak / 1e6:8.1f} MB / {matrix / 1e6:8.1f} MB = {peak / matrix:.3f}")
            print(fixed_cost_line(Path(tmp), args.channels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
