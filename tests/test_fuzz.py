"""Fuzzing the reader: 1,200 seeded mutations of valid FCS files through ``read_fcs`` and
``validate_file``. Every file either reads or fails with a CytopipeError (never another exception,
never a hang), with bounded memory per file. The figures are printed (run with ``-s``) and
recorded in docs/pipeline.md."""

from __future__ import annotations

import time
import tracemalloc
import warnings

import numpy as np
import pytest

from cytopipe.errors import CytopipeError
from cytopipe.fcs import read_fcs
from cytopipe.validate import validate_file
from tests.fcs_builder import build_fcs, float_keywords, int_keywords, pack_ints

N_FILES = 1200
PEAK_LIMIT = 64 * 2**20  # bytes per file, Python + numpy allocations (tracemalloc)


def seeds() -> list[bytes]:
    """Valid files of several layouts: float32 little/big endian, float64, packed integers."""
    rng = np.random.default_rng(0)
    ev = rng.normal(1000, 300, size=(300, 4)).astype(np.float32)
    names = ["FSC-A", "SSC-A", "CD4", "Time"]
    spill = "2,CD4,FSC-A,1,0.1,0.05,1"
    out = [
        build_fcs(float_keywords(300, names, **{"$SPILLOVER": spill}), ev.astype("<f4").tobytes()),
        build_fcs(float_keywords(300, names, big=True), ev.astype(">f4").tobytes(), version="FCS3.0"),
        build_fcs(float_keywords(300, names, datatype="D"), ev.astype("<f8").tobytes(), delimiter=b"/"),
    ]
    ints = rng.integers(0, 1000, size=(300, 4))
    kw = int_keywords(300, names, [16, 16, 32, 16], [1024, 1024, 1024, 1024])
    out.append(build_fcs(kw, pack_ints(ints, [16, 16, 32, 16]), version="FCS2.0"))
    return out


KEYWORDS = [b"$TOT", b"$PAR", b"$P1B", b"$P2R", b"$P3E", b"$DATATYPE", b"$BYTEORD", b"$BEGINDATA",
            b"$ENDDATA", b"$NEXTDATA", b"$MODE", b"$SPILLOVER", b"$P1N"]  # fmt: skip
VALUES = [b"0", b"-1", b"999999999999999999", b"1e308", b"nan", b"\xff\xfe", b"", b"7", b"A", b"4,3,2,1",
          b"1,2", b"\x00", b"\xef\xbc\x93", b"3,a,b,c", b"2147483648"]  # fmt: skip


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = int(rng.integers(0, 8))
    n = len(buf)
    if kind == 0:  # flip random bytes anywhere
        for i in rng.integers(0, n, size=int(rng.integers(1, 8))):
            buf[i] = int(rng.integers(0, 256))
    elif kind == 1:  # bytes in the HEADER offsets
        for i in rng.integers(10, 58, size=int(rng.integers(1, 4))):
            buf[i] = int(rng.choice(list(b"0123456789 -\x00x")))
    elif kind == 2:  # truncate
        buf = buf[: int(rng.integers(0, n))]
    elif kind == 3:  # a keyword's value replaced (the TEXT length changes: offsets go stale)
        key = KEYWORDS[int(rng.integers(len(KEYWORDS)))]
        at = bytes(buf).find(key)
        if at >= 0:
            d = buf[at - 1 : at]
            start = at + len(key) + 1
            end = bytes(buf).find(bytes(d), start)
            if end > start:
                buf[start:end] = VALUES[int(rng.integers(len(VALUES)))]
    elif kind == 4:  # a chunk inserted or deleted inside TEXT/DATA
        i = int(rng.integers(0, n))
        if rng.random() < 0.5:
            buf[i:i] = rng.integers(0, 256, size=int(rng.integers(1, 64))).astype(np.uint8).tobytes()
        else:
            del buf[i : i + int(rng.integers(1, 64))]
    elif kind == 5:  # the delimiter corrupted
        d = buf[58]
        for i in np.flatnonzero(np.frombuffer(bytes(buf[58:2000]), np.uint8) == d)[
            :: int(rng.integers(2, 6))
        ]:
            buf[58 + int(i)] = int(rng.integers(32, 127))
    elif kind == 6:  # a HEADER offset set to a huge or out-of-file number
        field = int(rng.integers(0, 6))
        value = str(int(rng.choice([0, n, n * 2, 99999999, int(rng.integers(0, n))]))).rjust(8)[:8]
        buf[10 + 8 * field : 18 + 8 * field] = value.encode()
    else:  # a second mutation on top of another
        buf = bytearray(mutate(mutate(bytes(buf), rng), rng))
    return bytes(buf)


@pytest.mark.timeout(900)  # a hang guard: the run itself takes well under a minute
def test_mutated_files_raise_only_cytopipe_errors_with_bounded_memory(tmp_path):
    rng = np.random.default_rng(20261203)
    base = seeds()
    outcomes = {"read": 0, "refused": 0}
    errors: dict[str, int] = {}
    worst_time, worst_peak = 0.0, 0
    path = tmp_path / "fuzz.fcs"
    tracemalloc.start()
    try:
        for k in range(N_FILES):
            data = mutate(base[k % len(base)], rng)
            path.write_bytes(data)
            tracemalloc.reset_peak()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    read_fcs(path)
                    outcomes["read"] += 1
                except CytopipeError as exc:
                    outcomes["refused"] += 1
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                except Exception as exc:  # pragma: no cover - the failure this test looks for
                    (tmp_path / f"crash-{k}.fcs").write_bytes(data)
                    raise AssertionError(
                        f"file {k}: {type(exc).__name__}: {exc} (kept as crash-{k}.fcs)"
                    ) from exc
                report = validate_file(path)
            elapsed = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            worst_time, worst_peak = max(worst_time, elapsed), max(worst_peak, peak)
            assert not report.error.startswith("unexpected error"), (k, report.error)
            assert peak < PEAK_LIMIT + len(data), f"file {k}: {peak / 2**20:.1f} MB"
    finally:
        tracemalloc.stop()
    print(
        f"\nfuzz: {N_FILES} mutated FCS files: {outcomes['read']} read, {outcomes['refused']} refused with a "
        f"CytopipeError {dict(sorted(errors.items()))}; max {worst_time * 1000:.0f} ms and "
        f"{worst_peak / 2**20:.1f} MB peak per file (read_fcs + validate)"
    )
    assert outcomes["read"] + outcomes["refused"] == N_FILES
    assert outcomes["refused"] >= N_FILES // 4  # the mutations do break files
