"""Scratch files written and read with direct I/O (Linux ``O_DIRECT``): no page-cache copy.

A run's per-sample scratch files (the clustering mapping inputs, ~12 MB per 200k-event sample,
written once by the gating pass and read once by the mapping pass) went through the page cache,
whose allocation cost 8-55 ms per such file on the test VM (2-40x the same bytes' memcpy, and
varying minute to minute), all of it CPU taken from the other worker. With direct I/O the bytes
go from an aligned buffer to the disk and back with ~1 ms of CPU per file.

* :class:`DirectWriter`: a write-only file object (``write``, context manager). Bytes gather in a
  page-aligned block reused by the thread; whole blocks are written with ``O_DIRECT``, the last
  partial one through the page cache. Where the file system refuses ``O_DIRECT`` (tmpfs, some
  network file systems) it writes through the page cache, as a plain ``open(path, "wb")`` would.
* :func:`read_direct`: a whole file into a fresh (page-aligned) numpy byte array.
* :func:`load_array`: the next ``.npy`` array of such bytes (several written one after another).

``CYTOPIPE_DIRECT_IO=0`` in the environment turns direct I/O off (plain buffered I/O).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

import numpy as np

__all__ = ["BLOCK", "BytesReader", "DirectWriter", "load_array", "read_direct"]

BLOCK = 4 << 20  # bytes per direct write: a multiple of every sector and page size
ALIGN = 4096
_LOCAL = threading.local()


def _enabled() -> bool:
    return bool(getattr(os, "O_DIRECT", 0)) and os.environ.get("CYTOPIPE_DIRECT_IO", "1") != "0"


def _block() -> mmap.mmap:
    """This thread's aligned block (an anonymous map: page-aligned), kept for reuse: a fresh
    map would page-fault on every file."""
    block = getattr(_LOCAL, "block", None)
    if block is None:
        block = _LOCAL.block = mmap.mmap(-1, BLOCK)
    return block


def _set_direct(fd: int, on: bool) -> bool:
    """Set or clear ``O_DIRECT`` on ``fd``; False when the file system refuses it."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    new = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, new)
    except OSError:
        return False
    return True


def _write_all(fd: int, view: memoryview) -> None:
    while view:  # a write may be partial
        view = view[os.write(fd, view) :]


class DirectWriter:
    """``open(path, "wb")`` for one file written front to back, with direct I/O where possible."""

    def __init__(self, path: str | Path, mode: int = 0o644):
        self.path = Path(path)
        self.fd = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), mode
        )
        self.direct = _enabled() and _set_direct(self.fd, True)
        self.block = _block() if self.direct else None
        self.pos = 0  # bytes gathered in the block

    def write(self, data) -> int:
        """Append ``data`` (any bytes-like object); returns its length in bytes."""
        view = memoryview(data).cast("B")
        n = len(view)
        if not self.direct:
            _write_all(self.fd, view)
            return n
        block = self.block
        while view:
            k = min(len(view), BLOCK - self.pos)
            block[self.pos : self.pos + k] = view[:k]
            self.pos += k
            view = view[k:]
            if self.pos == BLOCK:
                self._flush_block()
        return n

    def _flush_block(self) -> None:
        try:
            _write_all(self.fd, memoryview(self.block))
        except OSError as exc:  # took O_DIRECT at open but refuses the write: buffered from here on
            if exc.errno != errno.EINVAL:
                raise
            _set_direct(self.fd, False)
            self.direct = False
            _write_all(self.fd, memoryview(self.block))
        self.pos = 0

    def close(self) -> None:
        """Write what is gathered (the partial last block through the page cache) and close."""
        if self.fd < 0:
            return
        try:
            if self.pos:
                _set_direct(self.fd, False)  # a partial block need not be whole sectors
                _write_all(self.fd, memoryview(self.block)[: self.pos])
                self.pos = 0
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_direct(path: str | Path) -> np.ndarray:
    """The bytes of ``path`` as a fresh uint8 array (direct I/O where the file system allows it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        padded = -(-size // ALIGN) * ALIGN
        raw = np.empty(padded + ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGN
        buf = raw[start : start + padded]  # aligned address, whole sectors: what O_DIRECT needs
        direct = _enabled() and _set_direct(fd, True)
        view, got = memoryview(buf), 0
        while got < size:
            try:
                n = os.readv(fd, [view[got:]])
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                _set_direct(fd, False)  # took O_DIRECT but refuses this read: buffered
                direct = False
                os.lseek(fd, got, os.SEEK_SET)
                continue
            if n == 0:
                break
            got += n
        if got != size:
            raise OSError(errno.EIO, f"read {got} of {size} bytes", str(path))
        return buf[:size]
    finally:
        os.close(fd)


class BytesReader:
    """A read-only file object over a byte array, for the ``.npy`` sections of a file read with
    :func:`read_direct`: :func:`load_array` reads each header through it and copies the array's
    data once, into its own aligned memory."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else min(len(self.data), self.pos + n)
        out = self.data[self.pos : end].tobytes()
        self.pos = end
        return out


def load_array(reader: BytesReader) -> np.ndarray:
    """The next ``.npy`` array of ``reader`` (as ``np.load(fh, allow_pickle=False)`` reads it from
    a file holding several, one after another), copied out of the reader's bytes."""
    fmt = np.lib.format
    version = fmt.read_magic(reader)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(reader)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(reader)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not loaded (allow_pickle=False)")
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if reader.pos + nbytes > len(reader.data):
        raise EOFError("the .npy data ends early")
    flat = np.frombuffer(reader.data, dtype=dtype, count=count, offset=reader.pos).copy()
    reader.pos += nbytes
    if fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)
