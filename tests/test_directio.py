"""Scratch files with direct I/O (cytopipe.directio): exact bytes in and out, at every size.

Real files on the test machine's file system (Linux: ``O_DIRECT`` is used there; with
``CYTOPIPE_DIRECT_IO=0`` it is not). Sizes around the 1 MiB block and the 4 kB sector: the last,
partial block is written through the page cache, every whole one directly; reads come in aligned
blocks, whatever the offsets asked for.
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest

from cytopipe.directio import BLOCK, DirectReader, DirectWriter

PIECES = [0, 1, 4095, 4096, 4097, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7, 123_457]


@pytest.mark.parametrize("direct", ["1", "0"])
def test_written_and_read_bytes_are_exact_at_every_size(tmp_path, monkeypatch, direct):
    monkeypatch.setenv("CYTOPIPE_DIRECT_IO", direct)
    rng = np.random.default_rng(7)
    for total in (0, 1, 4096, BLOCK - 3, BLOCK, BLOCK + 5, 2 * BLOCK):
        data = rng.integers(0, 256, total, dtype=np.uint8).tobytes()
        path = tmp_path / f"f{total}.bin"
        with DirectWriter(path) as w:
            assert w.direct == (direct == "1" and hasattr(os, "O_DIRECT"))
            w.write(data)
        assert path.read_bytes() == data
        with DirectReader(path) as r:
            assert r.direct == (direct == "1" and hasattr(os, "O_DIRECT"))
            assert r.read() == data
            assert r.read(10) == b""  # at the end
            # reads of odd sizes from odd offsets, across block boundaries
            for at, n in ((0, 7), (4093, 9), (BLOCK - 2, 5), (total - 1, 10), (3, BLOCK + 11)):
                r.seek(max(0, at))
                assert r.read(n) == data[max(0, at) : max(0, at) + n]
            if total >= 3:
                r.seek(-3, os.SEEK_END)
                assert r.read() == data[-3:]


def test_many_writes_of_odd_sizes_concatenate(tmp_path):
    rng = np.random.default_rng(11)
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in PIECES]
    path = tmp_path / "pieces.bin"
    with DirectWriter(path) as w:
        for p in parts:
            assert w.write(p) == len(p)
        w.write(memoryview(np.arange(1000, dtype=np.float32)).cast("B"))  # a cast view, as the map inputs
    want = b"".join(parts) + np.arange(1000, dtype=np.float32).tobytes()
    assert path.stat().st_size == len(want)
    assert path.read_bytes() == want
    with DirectReader(path) as r:
        got = b"".join(iter(lambda: r.read(65_537), b""))
    assert got == want


def test_npy_sections_load_as_from_a_plain_file_and_memory_stays_one_copy(tmp_path):
    big = np.random.default_rng(3).normal(size=(400_001, 13)).astype("<f4")  # 20.8 MB: many blocks
    arrays = [
        np.array('{"columns": ["CD3", "CD4"], "specs": [1.5, "x"]}'),  # a 0-d string (the JSON meta)
        big,
        np.packbits(np.random.default_rng(4).random((5, 400_001)) > 0.5, axis=1),
        np.zeros((0, 9), dtype=np.uint8),
        np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
    ]
    path = tmp_path / "sections.npy"
    with DirectWriter(path) as w:
        for a in arrays:
            np.save(w, a)
    with open(path, "rb") as fh:
        want = [np.load(fh, allow_pickle=False) for _ in arrays]
    tracemalloc.start()
    with DirectReader(path) as r:
        got = [np.load(r, allow_pickle=False) for _ in arrays]
        assert r.tell() == path.stat().st_size
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for a, w, g in zip(arrays, want, got):
        assert g.dtype == w.dtype == a.dtype and g.shape == w.shape == a.shape
        assert np.array_equal(g, w)
    # the arrays and a few read buffers of np.load (256 kB each), never the file's bytes a second time
    assert peak < big.nbytes + 2 * (1 << 20)


def test_a_file_cut_short_is_an_error_not_short_data(tmp_path):
    path = tmp_path / "cut.npy"
    with DirectWriter(path) as w:
        np.save(w, np.arange(100_000, dtype="<f4"))
    os.truncate(path, path.stat().st_size - 4)
    with DirectReader(path) as r, pytest.raises(ValueError):
        np.load(r, allow_pickle=False)


def test_without_preadv_or_o_direct_the_reader_still_reads_exactly(tmp_path, monkeypatch):
    """macOS and Windows have neither: plain reads then (run here by hiding them)."""
    data = np.random.default_rng(5).integers(0, 256, 3 * BLOCK + 11, dtype=np.uint8).tobytes()
    path = tmp_path / "plain.bin"
    path.write_bytes(data)
    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    with DirectReader(path) as r:
        assert not r.direct
        assert r.read(5) == data[:5]
        r.seek(BLOCK - 1)
        assert r.read(BLOCK + 2) == data[BLOCK - 1 : 2 * BLOCK + 1]
        r.seek(0)
        assert r.read() == data
    with DirectWriter(tmp_path / "w.bin") as w:
        assert not w.direct
        w.write(data)
    assert (tmp_path / "w.bin").read_bytes() == data
