"""``cytopipe validate``'s rules applied to an upload's blocks while they stream in (no second
read of the stored file).

The HEADER and TEXT are parsed by the FCS reader's own code (:mod:`cytopipe.fcs`) from the
first bytes, against the file size the client declared (``Content-Length``): every structural
check (offsets, keywords, the DATA segment's length and that it lies inside the file) is the
reader's, with its messages. The DATA bytes that stream past are then checked for what the
reader notes while decoding: values that are NaN or infinite as float32, integer bits above
``$PnR``. The result is the dict :func:`cytopipe.serve.storage.validate_blob` returns.

Anything this does not cover -- no declared size or a different final size, several data sets
(``$NEXTDATA``), channels of mixed widths, a HEADER+TEXT over 16 MiB, an unexpected error -- gives
``None`` from :meth:`StreamCheck.result`, and the caller validates the stored file instead (the
rules are the same; only the second read comes back).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from cytopipe.errors import CytopipeError
from cytopipe.fcs import _channel_rows, _FCSFile, _spillover_for, _table_of

logger = logging.getLogger(__name__)

_SCRATCH = threading.local()  # aligned memory for DATA at an odd offset, one block per thread
PREFIX_LIMIT = 16 << 20  # bytes held while waiting for the end of TEXT (TEXT is usually a few kB)


class _NeedMore(Exception):
    """The reader asked for bytes that have not arrived yet."""

    def __init__(self, end: int):
        self.end = end


class _Prefix:
    """A read-only file over the bytes received so far; reading past them raises
    :class:`_NeedMore` until the whole file is in (then a short read means end of file)."""

    def __init__(self, data: bytearray, complete: bool):
        self.data, self.complete, self.pos = data, complete, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos
        return pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        if end > len(self.data) and not self.complete:
            raise _NeedMore(end)
        out = bytes(self.data[self.pos : end])
        self.pos += len(out)
        return out

    def close(self) -> None:
        pass


class _StreamedFCS(_FCSFile):
    """The reader's HEADER/TEXT/layout logic over :class:`_Prefix` with the declared size."""

    def __init__(self, name: str, fh: _Prefix, size: int):  # no super(): nothing to open
        self.path = Path(name)
        self._warnings: list[str] = []
        self.fh = fh
        self.size = size


class StreamCheck:
    """Feed the upload's bytes in order (:meth:`feed`), then ask :meth:`result`."""

    def __init__(self, name: str, size: int | None):
        self.name, self.size = name, size
        self.received = 0
        self.state = "prefix" if size is not None else "fallback"
        self.prefix = bytearray()
        self.need = 58  # bytes to hold before the next parse attempt
        self.error: CytopipeError | None = None

    # -- streaming ------------------------------------------------------------------------
    def feed(self, chunk: bytes | memoryview) -> None:
        at = self.received
        self.received += len(chunk)
        if self.state == "prefix":
            self.prefix += chunk
            if len(self.prefix) >= self.need:
                self._parse(complete=False)
            if self.state == "prefix" and len(self.prefix) > PREFIX_LIMIT:
                self._fallback(f"HEADER and TEXT need more than {PREFIX_LIMIT} bytes")
        elif self.state == "data":
            self._data(memoryview(chunk), at)

    def _fallback(self, why: str) -> None:
        logger.debug("%s: validated after the upload (%s)", self.name, why)
        self.state, self.prefix = "fallback", bytearray()

    def _parse(self, complete: bool) -> None:
        f = _StreamedFCS(self.name, _Prefix(self.prefix, complete), self.size)
        try:
            ds = f.dataset(0)
            rows = _channel_rows(ds.keywords, f)
            channels = _table_of(rows)
            layout = f.layout(ds, rows)
        except _NeedMore as more:
            self.need = more.end
            return
        except CytopipeError as exc:  # final: the bytes it depends on are all in, the size is known
            self.state, self.error, self.prefix = "error", exc, bytearray()
            return
        except Exception as exc:  # a reader bug: let validate_file on the stored file report it
            self._fallback(f"{type(exc).__name__}: {exc}")
            return
        following = ds.keywords.get("$NEXTDATA", "0").strip() or "0"
        if not (following.isdigit() and int(following) == 0):  # as the reader's _next_start reads it
            self._fallback("several data sets")
            return
        dtype = layout.uniform
        if layout.n_events and dtype is None:
            self._fallback("channels of different widths")
            return
        self.f, self.ds, self.channels, self.layout = f, ds, channels, layout
        self.bad, self.carry = 0, b""
        self.cleared = np.zeros(layout.n_channels, dtype=bool)
        if dtype is not None:
            self.dtype = np.dtype(f"{'>' if layout.big else '<'}{dtype.kind}{dtype.itemsize}")
            masked = [m is not None for m in layout.masks]
            self.masked = np.array(masked)
            if any(masked):
                full = np.iinfo(dtype).max
                self.row_mask = np.array([full if m is None else m for m in layout.masks], dtype=dtype)
        self.state = "data"
        prefix, self.prefix = self.prefix, bytearray()
        if layout.n_events:
            self._data(memoryview(prefix), 0)  # DATA may begin inside what is held already

    def _data(self, chunk: memoryview, at: int) -> None:
        begin = self.layout.begin
        end = begin + self.layout.nbytes
        lo, hi = max(at, begin), min(at + len(chunk), end)
        if lo >= hi:
            return
        piece = chunk[lo - at : hi - at]
        row = self.layout.row_bytes
        if self.carry:  # complete the row split over two chunks
            take = piece[: row - len(self.carry)]
            self.carry += bytes(take)
            piece = piece[len(take) :]
            if len(self.carry) < row:
                return
            self._check(self.carry)
            self.carry = b""
        whole = len(piece) - len(piece) % row
        if whole:
            self._check(piece[:whole])
        if whole < len(piece):
            self.carry = bytes(piece[whole:])

    def _check(self, rows: bytes | memoryview) -> None:
        """What the reader notes while decoding these whole rows."""
        values = np.frombuffer(rows, dtype=self.dtype)
        if not values.flags.aligned:  # DATA at an odd offset: numpy's fast loops need aligned values
            n = len(rows)
            scratch = getattr(_SCRATCH, "block", None)
            if scratch is None or scratch.size < n:  # kept per thread across uploads: a fresh
                scratch = _SCRATCH.block = np.empty(max(n, 1 << 20), dtype=np.uint8)  # one page-faults
            scratch[:n] = np.frombuffer(rows, dtype=np.uint8)
            values = scratch[:n].view(self.dtype)
        if self.dtype.kind == "f":
            with np.errstate(all="ignore"):  # float64 beyond float32's range becomes inf, as in the reader
                as32 = values if self.dtype.itemsize == 4 else values.astype(np.float32)
                lo, hi = as32.min(), as32.max()  # NaN propagates; no temporary array on clean data
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    self.bad += int(as32.size - np.count_nonzero(np.isfinite(as32)))
        elif self.masked.any() and not self.cleared[self.masked].all():
            grid = values.reshape(-1, self.layout.n_channels)
            self.cleared |= np.any(grid & ~self.row_mask, axis=0)

    # -- the verdict ----------------------------------------------------------------------
    def result(self, received: int) -> dict[str, Any] | None:
        """``validate_blob``'s dict, or None when the stored file must be validated instead."""
        if self.state == "fallback" or received != self.size or received != self.received:
            return None
        if self.state == "prefix":
            self._parse(complete=True)  # a small or broken file: everything is held
        if self.state == "error":
            from cytopipe.validate import _message

            info = {"events": None, "channels": None, "markers": [], "version": "", "datasets": 0}
            return {"status": "rejected", "reason": _message(self.error), "notes": [], "info": info}
        if self.state != "data" or self.carry:
            return None
        return self._report()

    def _report(self) -> dict[str, Any]:
        from cytopipe.serve.storage import _KEYWORDS
        from cytopipe.validate import channel_warnings, is_duplicate_name_note, keyword_notes

        f, ds, layout = self.f, self.ds, self.layout
        if self.cleared.any():
            f._note_masked(self.cleared, layout)
        _spillover_for(ds.keywords, self.channels, f)  # for its notes, after the data's: the reader's order
        warnings = [w for w in f._warnings if not is_duplicate_name_note(w)]
        notes = warnings + [w for w in keyword_notes(ds.keywords) if w not in warnings]
        notes = channel_warnings([str(n) for n in self.channels["pnn"]]) + notes  # validate_blob's order
        if layout.n_events == 0:
            notes.append("the file holds no events ($TOT 0)")
        if self.bad:
            notes.append(f"{self.bad} event values are NaN or infinite")
        info: dict[str, Any] = {
            "events": layout.n_events,
            "channels": layout.n_channels,
            "markers": [m for m in self.channels["pns"] if m],
            "version": ds.version,
            "datasets": 1,
            "keywords": {k: str(ds.keywords[k])[:200] for k in _KEYWORDS if k in ds.keywords},
        }
        return {"status": "warning" if notes else "ok", "reason": "", "notes": notes, "info": info}
