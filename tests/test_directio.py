"""Scratch files with direct I/O (cytopipe.directio): exact bytes in and out, at every size.

Real files on the test machine's file system (Linux: ``O_DIRECT`` is used there; with
``CYTOPIPE_DIRECT_IO=0`` it is not). Sizes around the 4 MiB block and the 4 kB sector: the last,
partial block goes through the page cache, every whole one directly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cytopipe.directio import BLOCK, BytesReader, DirectWriter, load_array, read_direct

PIECES = [0, 1, 4095, 4096, 4097, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7, 123_457]


@pytest.mark.parametrize("direct", ["1", "0"])
def test_written_and_read_bytes_are_exact_at_every_size(tmp_path, monkeypatch, direct):
    monkeypatch.setenv("CYTOPIPE_DIRECT_IO", direct)
    rng = np.random.default_rng(7)
    for total in (0, 1, 4096, BLOCK - 3, BLOCK, BLOCK + 5, 2 * BLOCK):
        data = rng.integers(0, 256, total, dtype=np.uint8)
        path = tmp_path / f"f{total}.bin"
        with DirectWriter(path) as w:
            assert w.direct == (direct == "1" and hasattr(os, "O_DIRECT"))
            w.write(data)
        assert path.read_bytes() == data.tobytes()
        back = read_direct(path)
        assert back.dtype == np.uint8 and np.array_equal(back, data)
        if total:
            assert back.ctypes.data % 4096 == 0  # aligned, as O_DIRECT needs


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
    assert read_direct(path).tobytes() == want


def test_npy_sections_load_as_np_load_does(tmp_path):
    arrays = [
        np.array('{"columns": ["CD3", "CD4"], "specs": [1.5, "x"]}'),  # a 0-d string (the JSON meta)
        np.random.default_rng(3).normal(size=(70_001, 13)).astype("<f4"),
        np.packbits(np.random.default_rng(4).random((5, 70_001)) > 0.5, axis=1),
        np.zeros((0, 9), dtype=np.uint8),
        np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
    ]
    path = tmp_path / "sections.npy"
    with DirectWriter(path) as w:
        for a in arrays:
            np.save(w, a)
    reader = BytesReader(read_direct(path))
    with open(path, "rb") as fh:
        for a in arrays:
            want = np.load(fh, allow_pickle=False)
            got = load_array(reader)
            assert got.dtype == want.dtype and got.shape == want.shape == a.shape
            assert np.array_equal(got, want)
            assert got.flags.writeable and got.flags.aligned  # a copy, not a view of the file's bytes
    assert reader.pos == path.stat().st_size


def test_a_truncated_section_is_an_error_not_short_data(tmp_path):
    path = tmp_path / "cut.npy"
    with DirectWriter(path) as w:
        np.save(w, np.arange(100_000, dtype="<f4"))
    data = read_direct(path)
    with pytest.raises(EOFError):
        load_array(BytesReader(data[: len(data) - 4]))
