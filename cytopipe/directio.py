"""Scratch files written and read with direct I/O (Linux ``O_DIRECT``): no page-cache copy.

A run's per-sample scratch files (the clustering mapping inputs, ~12 MB per 200k-event sample,
written once by the gating pass and read once by the mapping pass) went through the page cache,
whose allocation cost 8-55 ms per such file on the test VM (2-40x the same bytes' memcpy, and
varying minute to minute), all of it CPU taken from the other worker. With direct I/O the bytes
go from an aligned buffer to the disk and back with ~1 ms of CPU per file.

* :class:`DirectWriter`: a write-only file object (``write``, context manager). Bytes gather in a
  page-aligned block reused by the thread; whole blocks are written with ``O_DIRECT``, the last
  partial one through the page cache. Where the file system refuses ``O_DIRECT`` (older tmpfs,
  some FUSE and network file systems) it writes through the page cache, as a plain ``open(path, "wb")`` would.
* :class:`DirectReader`: a read-only file object (``read``, ``seek``: enough for ``np.load``)
  reading aligned blocks with ``O_DIRECT`` into a reused block, so that memory stays one block
  above the arrays read, whatever the file's size.

``CYTOPIPE_DIRECT_IO=0`` in the environment turns direct I/O off (plain buffered I/O).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

__all__ = ["BLOCK", "DirectReader", "DirectWriter"]

BLOCK = 1 << 20  # bytes per direct read or write: a multiple of every sector and page size
ALIGN = 4096
_LOCAL = threading.local()


def _enabled() -> bool:
    return bool(getattr(os, "O_DIRECT", 0)) and os.environ.get("CYTOPIPE_DIRECT_IO", "1") != "0"


def _block(which: int = 0) -> mmap.mmap:
    """This thread's aligned block ``which`` (0: writing, 1: reading; an anonymous map, so
    page-aligned), kept for reuse: a fresh map would page-fault on every file."""
    blocks = getattr(_LOCAL, "blocks", None)
    if blocks is None:
        blocks = _LOCAL.blocks = {}
    if which not in blocks:
        blocks[which] = mmap.mmap(-1, BLOCK)
    return blocks[which]


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


class DirectReader:
    """``open(path, "rb")`` for one file read front to back (``read``, ``seek``; what ``np.load``
    needs), with direct I/O where possible: aligned blocks of :data:`BLOCK` bytes go from the disk
    into this thread's reused block, and ``read`` copies out of it. Memory: one block, whatever the
    file's size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self.fd).st_size
        self.direct = _enabled() and _set_direct(self.fd, True)
        self.block = _block(1)
        self.start = self.end = 0  # the file's bytes [start, end) are in the block
        self.pos = 0

    def _load(self, at: int) -> None:
        """Fill the block with the aligned stretch of the file holding offset ``at``."""
        start = at - at % ALIGN
        view, got = memoryview(self.block), 0
        while start + got < self.size and got < BLOCK:
            try:
                n = self._pread(view[got:], start + got)
            except OSError as exc:
                if not self.direct or exc.errno != errno.EINVAL:
                    raise
                _set_direct(self.fd, False)  # took O_DIRECT but refuses this read: buffered
                self.direct = False
                continue
            if n == 0:
                break
            got += n
            if self.direct and got % ALIGN:  # a short direct read ends at the end of the file
                break
        self.start, self.end = start, start + got

    def _pread(self, view: memoryview, at: int) -> int:
        if hasattr(os, "preadv"):  # straight into the block (Linux, the BSDs)
            return os.preadv(self.fd, [view], at)
        os.lseek(self.fd, at, os.SEEK_SET)  # macOS, Windows: no O_DIRECT either, a plain read
        chunk = os.read(self.fd, len(view))
        view[: len(chunk)] = chunk
        return len(chunk)

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes from the current position (all the rest for ``n`` < 0)."""
        stop = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        parts = []
        while self.pos < stop:
            if not self.start <= self.pos < self.end:
                self._load(self.pos)
                if not self.start <= self.pos < self.end:
                    raise OSError(errno.EIO, "the file ended early", str(self.path))
            k = min(stop, self.end) - self.pos
            a = self.pos - self.start
            parts.append(self.block[a : a + k])  # one copy (np.load asks for up to 256 kB at a time)
            self.pos += k
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirectReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
