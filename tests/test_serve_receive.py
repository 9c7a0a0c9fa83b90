"""``storage.receive``, the upload's streaming core, on a real file system without the HTTP layer:
the bytes land exactly (direct I/O on and off, blocks that end on and off the 1 MiB boundary,
several uploads at once sharing the writer threads and the block pool), the sha256 is that of
the content, the streamed check gives ``cytopipe validate``'s verdict, and an error or the size
limit mid-file leaves nothing behind and the next upload still works."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from cytopipe.serve.storage import BLOCK, SLOTS, BlobStore, UploadRefused, receive, validate_blob
from cytopipe.serve.streamcheck import StreamCheck
from tests.conftest import shared_path

SOURCE = ("FlowIO", "data", "fcs_files", "100715.fcs")  # 4.2 MB, a real instrument's file


async def chunked(data: bytes, sizes: list[int], fail_at: int | None = None):
    pos, i = 0, 0
    while pos < len(data):
        if fail_at is not None and pos >= fail_at:
            raise ConnectionResetError("client went away")
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        await asyncio.sleep(0)  # let the other uploads run, as a socket would
        pos, i = pos + n, i + 1


@pytest.fixture(params=["direct", "buffered"])
def store(request, tmp_path, monkeypatch):
    monkeypatch.setenv("CYTOPIPE_UPLOAD_DIRECT_IO", "1" if request.param == "direct" else "0")
    return BlobStore(tmp_path / "ws")


def test_bytes_hash_and_verdict_whatever_the_chunking_and_length(store, tmp_path):
    real = shared_path(*SOURCE).read_bytes()
    # the real file; cut to end exactly on a block and one byte after (truncated: the streamed check
    # must say so as validate does); padded to fill the ring of blocks exactly
    cases = [real, real[: 3 * BLOCK], real[: 3 * BLOCK + 1], real + b"\0" * (SLOTS * BLOCK - len(real))]
    sizes = [[65536], [1, 5, 1000, 3 << 20, 7, 65536, 1 << 20], [BLOCK], [BLOCK // 3]]
    verdicts = []
    for data, pattern in zip(cases, sizes):
        check = StreamCheck("f.fcs", len(data))
        got = asyncio.run(receive(chunked(data, pattern), store, 10 * len(real), check=check))
        assert got.size == len(data) and got.sha256 == hashlib.sha256(data).hexdigest()
        assert got.tmp.read_bytes() == data
        copy = tmp_path / f"copy-{len(data)}.fcs"
        copy.write_bytes(data)
        reference = validate_blob(copy, "f.fcs")
        assert check.result(got.size) == reference
        verdicts.append(reference["status"])
        got.tmp.unlink()
    assert verdicts[:3] == ["ok", "rejected", "rejected"]


def test_uploads_at_the_same_time_each_get_their_own_bytes(store):
    real = shared_path(*SOURCE).read_bytes()
    contents = [real[:-n] + bytes([n % 251]) * n for n in (1, 4097, 3 * BLOCK // 2)]

    async def all_at_once():
        return await asyncio.gather(
            *(receive(chunked(d, [70_000 + 1000 * i]), store, 10 * len(real)) for i, d in enumerate(contents))
        )

    for got, data in zip(asyncio.run(all_at_once()), contents):
        assert got.tmp.read_bytes() == data and got.sha256 == hashlib.sha256(data).hexdigest()


def test_an_error_or_the_limit_mid_file_leaves_nothing_and_the_next_upload_works(store):
    data = shared_path(*SOURCE).read_bytes()
    with pytest.raises(ConnectionResetError):
        asyncio.run(receive(chunked(data, [300_000], fail_at=2 * BLOCK + 5), store, 10 * len(data)))
    assert list(store.tmp.iterdir()) == []
    with pytest.raises(UploadRefused) as refused:
        asyncio.run(receive(chunked(data, [300_000]), store, 3 * BLOCK))
    assert refused.value.status == 413 and list(store.tmp.iterdir()) == []
    got = asyncio.run(receive(chunked(data, [65536]), store, 10 * len(data)))
    assert got.tmp.read_bytes() == data


def test_a_write_direct_io_refuses_is_done_buffered(tmp_path):
    """An unaligned block on a file opened for direct I/O: the kernel refuses it (EINVAL); the
    writer clears O_DIRECT and writes it buffered instead of failing the upload."""
    import fcntl
    import os

    from cytopipe.serve.storage import _direct, _pwrite_all

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _direct(fd):
            pytest.skip("this file system has no direct I/O")
        data = os.urandom(1000)  # neither the length nor (usually) the address is sector-aligned
        _pwrite_all(fd, memoryview(data), 3)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 3 + data
