"""FCS reading and writing (FCS 2.0, 3.0, 3.1; FCS 3.2 where its keywords allow).

``read_fcs`` returns a :class:`Sample`: a float32 C-contiguous event matrix
(events x channels), the channel table, all TEXT keywords (upper-case keys, ``$`` kept),
the FCS version and the spillover matrix when the file has one.

How the DATA segment is read (the fast path is the common case):

* little-endian float32 (any size): ``readinto`` straight into the matrix, the kernel's own
  copy, as ``np.fromfile`` does (the mapped copy below was 3-6 % cheaper on an Intel VM and
  ~10 % dearer on an AMD EPYC one: the plain read is the simpler of the two);
* big-endian float32 and 16/32-bit integers (DATA of 4 MB or more): the DATA segment is mapped
  (``mmap``) and one numba pass copies -- swapping bytes, masking with ``$PnR`` and widening
  where needed -- from the page cache straight into the float32 matrix; the raw bytes are
  never copied into a buffer first (where a file cannot be mapped: ~1 MB chunks through a
  small buffer);
* smaller files: little-endian float32 as above; the rest,
  and float64 and mixed layouts of any size: ~1 MB chunks are read into a small buffer,
  byte-swapped, masked with ``$PnR`` and converted into the float32 matrix, so peak
  memory stays at the size of the event matrix plus one chunk.

``read_fcs(path, out=buffer)`` decodes into a caller's buffer (one per worker, reused for
file after file) instead of a fresh matrix, whose page faults and first writes cost more than
reading a 16-bit file's bytes (``bench/read_fcs.py``).

Every malformed input raises an :class:`~cytopipe.errors.FCSError` subclass naming the
file and the problem (which offset, which keyword, what was expected). Quirks that are
handled (HEADER/TEXT offsets that disagree, bits above ``$PnR``, ...) are recorded in
``Sample.warnings`` and issued as :class:`FCSWarning`.

Precision: events are float32. Integer data wider than 24 bits (``$PnB`` 32/64) and
float64 data are rounded to the nearest float32 (integers above 2**24 = 16,777,216 lose
their lowest bits), exactly as flowio's arrays cast to float32.

Why one module: the reader's parts (header and TEXT parsing, keyword checks, the layout plan,
the decode into float32) all work on one private ``_FCSFile`` state and share its error context;
the writer is the reader's inverse and is tested against it. The hot decode kernels live apart
in :mod:`cytopipe._fcskernels`.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.errors import (
    FCSDataError,
    FCSError,
    FCSHeaderError,
    FCSKeywordError,
    FCSUnsupportedError,
    NotRegularFileError,
    OutputWriteError,
    SpilloverError,
)
from cytopipe.files import atomic_write, open_regular

logger = logging.getLogger(__name__)

__all__ = [
    "CHANNEL_COLUMNS",
    "SPILLOVER_KEYWORDS",
    "FCSInfo",
    "FCSWarning",
    "Sample",
    "Spillover",
    "count_datasets",
    "is_fcs_file",
    "parse_spillover",
    "parse_text",
    "preprocess_events",
    "needs_preprocessing",
    "read_fcs",
    "read_fcs_header",
    "read_spillover",
    "write_fcs",
]

CHANNEL_COLUMNS = ["n", "pnn", "pns", "pnr", "pnb", "pne", "png"]
SPILLOVER_KEYWORDS = ("$SPILLOVER", "SPILL", "$SPILL", "$COMP")

_HEADER_LEN = 58
_HEADER_LIMIT = 99_999_999  # largest offset the 8-character HEADER fields can hold
_CHUNK_BYTES = 1 << 20  # conversion chunk: fits in L2 cache, large enough to amortise calls
# Below this DATA size numpy's byte swap is fast enough and importing numba (~0.3 s, once
# per process) is not worth it.
_KERNEL_MIN_BYTES = 4 << 20
_MAPPED_CHUNKS = 16  # a mapped DATA segment is decoded (and released) 16 conversion chunks at a time
_MASK_BLOCK_ROWS = 256  # integer decode: range masks tiled over this many rows (stays in L1 cache)
_KNOWN_VERSIONS = {"FCS1.0", "FCS2.0", "FCS3.0", "FCS3.1", "FCS3.2"}
_LITTLE = {"1,2,3,4", "1,2", "1", "1,2,3,4,5,6,7,8"}
_BIG = {"4,3,2,1", "2,1", "8,7,6,5,4,3,2,1"}
_HEADER_FIELDS = ("TEXT begin", "TEXT end", "DATA begin", "DATA end", "ANALYSIS begin", "ANALYSIS end")
_MAGIC = re.compile(rb"FCS\d\.\d")  # the first 6 bytes of a data set's HEADER
_INTEGER = re.compile(r"[+-]?\d+")
_PARAMETER_KEYWORD = re.compile(r"\$P(\d+)([A-Z]+)")


class FCSWarning(UserWarning):
    """An FCS file has a quirk that was handled; the message says what was done."""


# --------------------------------------------------------------------------------------------
# public data classes
# --------------------------------------------------------------------------------------------
@dataclass
class Spillover:
    """A spillover matrix: ``matrix[i, j]`` is the fraction of fluorochrome ``i``'s
    signal seen in detector ``channels[j]`` (rows = sources, as FCS ``$SPILLOVER``)."""

    matrix: np.ndarray
    channels: list[str]
    keyword: str = "$SPILLOVER"
    # where a matrix not read from this file came from (e.g. "csv:study/spill.csv"), for messages
    source: str | None = field(default=None, compare=False)

    def to_keyword_value(self) -> str:
        values = ",".join(_format_number(v) for v in np.asarray(self.matrix, dtype=np.float64).ravel())
        return f"{len(self.channels)},{','.join(self.channels)},{values}"


@dataclass(repr=False)
class Sample:
    """One FCS data set: events (float32, events x channels) and its metadata."""

    events: np.ndarray
    channels: pd.DataFrame
    keywords: dict[str, str]
    version: str
    spillover: Spillover | None = None
    path: Path | None = None
    dataset: int = 0
    preprocessed: bool = False
    warnings: list[str] = field(default_factory=list)
    n_datasets: int = 1
    # margin QC removed every event at a detector's maximum (the pipeline's prepared samples):
    # the gating engine then has no saturated events to leave out of its fits
    margins_removed: bool = False

    @property
    def n_events(self) -> int:
        return int(self.events.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.events.shape[1])

    @property
    def pnn(self) -> list[str]:
        return list(self.channels["pnn"])

    @property
    def markers(self) -> list[str]:
        return list(self.channels["pns"])

    def channel_index(self, name: str) -> int:
        """Column index of the channel whose ``$PnN`` is ``name``.

        Raises :class:`~cytopipe.errors.FCSKeywordError` when no channel or more than
        one channel has that name (files may repeat a ``$PnN``; use the index then).
        """
        matches = np.flatnonzero(self.channels["pnn"].to_numpy() == name)
        if len(matches) == 1:
            return int(matches[0])
        if len(matches) == 0:
            message = f"no channel named {name!r}; channels are {self.pnn}"
        else:
            cols = ", ".join(str(int(m)) for m in matches)
            message = (
                f"channel name {name!r} is ambiguous: {len(matches)} channels have that $PnN "
                f"(column indices {cols}); select the column by index or by marker ($PnS)"
            )
        raise FCSKeywordError(message, file=self.path, channel=name)

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self.events, columns=self.pnn)

    def __repr__(self) -> str:
        name = self.path.name if self.path is not None else "<memory>"
        return (
            f"Sample({name!r}, {self.version}, {self.n_events} events x {self.n_channels} channels, "
            f"dataset {self.dataset} of {self.n_datasets}, spillover={'yes' if self.spillover else 'no'}"
            f"{', preprocessed' if self.preprocessed else ''})"
        )


@dataclass(repr=False)
class FCSInfo:
    """Metadata of one FCS data set without its events (see :func:`read_fcs_header`).

    Offsets are absolute byte positions in the file; ``data_segment`` is the
    ``(first, last)`` byte the reader would use, or ``None`` when the file has no
    usable DATA segment (``data_error`` then says why).
    """

    path: Path
    dataset: int
    version: str
    keywords: dict[str, str]
    channels: pd.DataFrame
    spillover: Spillover | None
    n_events: int
    n_channels: int
    datatype: str
    byte_order: str
    dataset_start: int
    text_segment: tuple[int, int]
    data_segment: tuple[int, int] | None
    data_error: str | None
    n_datasets: int
    warnings: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"FCSInfo({self.path.name!r}, {self.version}, {self.n_events} events x "
            f"{self.n_channels} channels, $DATATYPE {self.datatype})"
        )


# --------------------------------------------------------------------------------------------
# reading: public functions
# --------------------------------------------------------------------------------------------
def read_fcs(
    path: str | Path,
    dataset: int = 0,
    preprocess: bool = False,
    out: np.ndarray | None = None,
    warn: bool = True,
) -> Sample:
    """Read one data set of an FCS file into a :class:`Sample`.

    ``dataset`` selects a data set of a multi-data-set file (``$NEXTDATA``, e.g. Beckman
    LMD files); ``Sample.n_datasets`` says how many there are.

    ``preprocess=True`` applies the usual FCS preprocessing exactly as FlowIO/FlowKit do:
    ``$TIMESTEP`` on the time channel, log decoding of ``$PnE`` (``f2 = 0`` read as 1)
    and division by the gain ``$PnG`` (not on the time channel). Computed in float64 from
    the raw values, then rounded to float32.

    ``out``: decode into this C-contiguous float32 buffer (at least events x channels values)
    instead of a new array; ``Sample.events`` is then a view of its first values, valid until
    the buffer is used again. A process that reads many files one after another can reuse one
    buffer and skip the page faults of a fresh matrix (a 1M x 20 int16 file: ~13 instead of ~21
    ms of CPU on the project's VM).

    ``warn=False``: the reader's notes are only in ``Sample.warnings`` (no :class:`FCSWarning`;
    the pipeline reports them once per file, from its own process).
    """
    with _FCSFile(path) as f:
        ds = f.dataset(dataset)
        rows = _channel_rows(ds.keywords, f)
        channels = _table_of(rows)
        layout = f.layout(ds, rows)
        plan = _preprocess_plan(ds.keywords, channels, f) if preprocess else None
        events = f.read_events(layout, plan, out)
        spill = _spillover_for(ds.keywords, channels, f)
        n_datasets = f.count_following(ds)
    return Sample(
        events=events,
        channels=channels,
        keywords=ds.keywords,
        version=ds.version,
        spillover=spill,
        path=f.path,
        dataset=dataset,
        preprocessed=preprocess,
        warnings=f.flush_warnings(issue=warn),
        n_datasets=n_datasets,
    )


def read_fcs_header(path: str | Path, dataset: int = 0, warn: bool = True) -> FCSInfo:
    """Read the HEADER and TEXT of one data set (no events): keywords, channel table,
    spillover, event count and where the DATA segment is.

    Works on files whose DATA segment is missing or broken (``data_error`` says what
    is wrong); a broken HEADER or TEXT still raises an :class:`FCSError`.
    """
    with _FCSFile(path) as f:
        ds = f.dataset(dataset)
        rows = _channel_rows(ds.keywords, f)
        channels = _table_of(rows)
        spill = _spillover_for(ds.keywords, channels, f)
        datatype = ds.keywords.get("$DATATYPE", "").strip().upper()
        data_segment, data_error, byte_order, n_events = None, None, "", -1
        try:
            n_events = _int_keyword(ds.keywords, "$TOT", f, default=-1)
            layout = f.layout(ds, rows)
            byte_order = "big" if layout.big else "little"
            data_segment = (layout.begin, layout.begin + layout.nbytes - 1)
            n_events = layout.n_events
        except FCSError as exc:
            data_error = exc.message
        n_datasets = f.count_following(ds)
        t0, t1 = ds.offsets[0], ds.offsets[1]
    return FCSInfo(
        path=f.path,
        dataset=dataset,
        version=ds.version,
        keywords=ds.keywords,
        channels=channels,
        spillover=spill,
        n_events=n_events,
        n_channels=len(channels),
        datatype=datatype,
        byte_order=byte_order,
        dataset_start=ds.start,
        text_segment=(ds.start + t0, ds.start + t1),
        data_segment=data_segment,
        data_error=data_error,
        n_datasets=n_datasets,
        warnings=f.flush_warnings(issue=warn),
    )


def count_datasets(path: str | Path) -> int:
    """Number of data sets in an FCS file (follows ``$NEXTDATA``; 1 for most files)."""
    with _FCSFile(path) as f:
        first = f.dataset(0)
        n = f.count_following(first)
        f.flush_warnings()
    return n


def is_fcs_file(path: str | Path) -> bool:
    """True when the file starts with the FCS magic bytes (``FCS`` + version)."""
    try:
        with open_regular(path) as fh:
            head = fh.read(6)
    except (OSError, FCSError):
        return False
    return _MAGIC.fullmatch(head) is not None


# --------------------------------------------------------------------------------------------
# reading: HEADER, TEXT and the chain of data sets
# --------------------------------------------------------------------------------------------
@dataclass
class _DataSet:
    index: int
    start: int  # absolute offset of this data set's HEADER
    version: str
    offsets: tuple[int, int, int, int, int, int]  # HEADER fields, relative to start
    keywords: dict[str, str]
    notes: list[str]  # TEXT quirks of this data set (warned only when it is the one read)


@dataclass
class _Layout:
    """Where and how the events of one data set are stored."""

    n_events: int
    n_channels: int
    begin: int  # absolute offset of the first event
    nbytes: int  # bytes to read (n_events x row_bytes)
    row_bytes: int
    kinds: list[str]  # per channel: "u" (unsigned int) or "f" (float)
    widths: list[int]  # per channel: bytes in storage
    big: bool
    masks: list[int | None]  # per channel: AND mask for integers, None = keep all bits

    @property
    def uniform(self) -> np.dtype | None:
        """The single native dtype of every value, when all channels share one."""
        if len(set(zip(self.kinds, self.widths))) != 1 or self.widths[0] not in (1, 2, 4, 8):
            return None
        return np.dtype(f"{self.kinds[0]}{self.widths[0]}")


class _MappedData:
    """A DATA segment mapped read-only: ``values`` is an array over the file's pages in the page
    cache, so a kernel decodes straight from them (no copy into a buffer first).
    ``release(n)`` drops this process's mapping of the pages that hold the first ``n`` values
    once they are decoded (the page cache keeps them): the process's RSS grows by the output
    and one chunk, not by the whole file. The mapping closes with the last array using it."""

    def __init__(self, mm: mmap.mmap, dtype: np.dtype, offset: int, nbytes: int) -> None:
        self.mm = mm
        self.offset = offset
        self.released = 0
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_WILLNEED)  # a file not yet in the page cache is read ahead
        self.values = np.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)

    def release(self, n: int) -> None:
        end = min(self.offset + n * self.values.itemsize, len(self.mm)) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self.released and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end


class _FCSFile:
    """An open FCS file: parses HEADER/TEXT, chooses the DATA layout, reads events."""

    def __init__(self, path: str | Path) -> None:
        self.path = path if isinstance(path, Path) else Path(path)
        self._warnings: list[str] = []
        try:
            # raw file: readinto goes straight to the OS; FIFOs, devices and folders are refused
            # before any read (a FIFO would block, /dev/zero never ends)
            self.fh = open_regular(self.path)
            self.size = os.fstat(self.fh.fileno()).st_size
        except IsADirectoryError:
            raise NotRegularFileError(
                "not a regular file (a folder), not an FCS file", file=self.path
            ) from None
        except OSError as exc:
            raise FCSError(f"cannot open the file: {exc.strerror or exc}", file=self.path) from None

    def __enter__(self) -> _FCSFile:
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    # -- helpers ---------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        if message not in self._warnings:
            self._warnings.append(message)

    def flush_warnings(self, issue: bool = True) -> list[str]:
        for message in self._warnings:
            if issue:  # (else the caller reports them: the pipeline, once per file)
                warnings.warn(f"{self.path}: {message}", FCSWarning, stacklevel=3)
                logger.info("%s: %s", self.path, message)  # a log keeps what the file's reader noted
        return list(self._warnings)

    def read_at(self, offset: int, n: int) -> bytes:
        self.fh.seek(offset)
        chunks, got = [], 0
        while got < n:
            chunk = self.fh.read(n - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def readinto(self, array: np.ndarray) -> None:
        view = memoryview(array).cast("B")
        got = 0
        while got < len(view):
            n = self.fh.readinto(view[got:])
            if not n:
                raise FCSDataError(
                    f"the file ended while reading the DATA segment ({got} of {len(view)} bytes of a "
                    f"chunk read); it was truncated or changed while being read",
                    file=self.path,
                )
            got += n

    # -- HEADER and TEXT -------------------------------------------------------------------
    def header(self, start: int, index: int) -> tuple[str, tuple[int, ...]]:
        where = "" if index == 0 else f" of data set {index} (byte {start})"
        raw = self.read_at(start, _HEADER_LEN)
        if len(raw) < 6 or _MAGIC.fullmatch(raw[:6]) is None:
            if index == 0 and self.size == 0:
                raise FCSHeaderError("the file is empty (0 bytes), not an FCS file", file=self.path)
            # never quote the bytes: a text file pointed at by mistake may hold anything
            what = (
                "not an FCS file (no FCS header)"
                if index == 0
                else f"data set {index} (byte {start}) has no FCS header"
            )
            raise FCSHeaderError(f"{what}; expected a file starting with 'FCS3.1' or similar", file=self.path)
        if len(raw) < _HEADER_LEN:
            raise FCSHeaderError(
                f"the HEADER{where} is truncated: {len(raw)} of {_HEADER_LEN} bytes before the end of the "
                f"file ({self.size} bytes)",
                file=self.path,
            )
        version = raw[:6].decode("ascii")
        offsets = []
        for i, name in enumerate(_HEADER_FIELDS):
            lo = 10 + 8 * i
            text = raw[lo : lo + 8]
            stripped = text.strip()
            if not stripped:
                offsets.append(0)
            elif stripped.isdigit():
                offsets.append(int(stripped))
            else:
                raise FCSHeaderError(
                    f"HEADER{where} field '{name}' (bytes {lo}-{lo + 7}) is {text.decode('latin-1')!r}, "
                    f"expected a non-negative byte offset",
                    file=self.path,
                )
        if version not in _KNOWN_VERSIONS:
            self.warn(f"unknown FCS version {version!r}; read like FCS 3.1")
        return version, tuple(offsets)

    def dataset_at(self, start: int, index: int) -> _DataSet:
        version, offsets = self.header(start, index)
        where = "" if index == 0 else f" of data set {index}"
        t0, t1 = offsets[0], offsets[1]
        available = self.size - start
        if t0 == 0 and t1 == 0:
            raise FCSHeaderError(
                f"HEADER{where} gives no TEXT segment (offsets 0, 0); the file is not a readable FCS file",
                file=self.path,
            )
        if t0 < _HEADER_LEN or t1 < t0:
            raise FCSHeaderError(
                f"HEADER{where} gives TEXT segment bytes {t0}-{t1}, which is not a valid range "
                f"(it must start at byte {_HEADER_LEN} or later and end after it starts)",
                file=self.path,
            )
        if t1 >= available:
            if t1 == available and t0 < t1:  # end offset one past the last byte of the file
                t1 -= 1
            else:
                raise FCSHeaderError(
                    f"HEADER{where} gives TEXT segment bytes {t0}-{t1} but the file ends at byte "
                    f"{self.size - 1}: the file is truncated",
                    file=self.path,
                )
        raw = self.read_at(start + t0, t1 - t0 + 1)
        keywords, notes = _parse_text(raw, self.path, f"TEXT segment{where} (bytes {t0}-{t1})")
        self._merge_supplemental_text(keywords, start, available, where, notes)
        return _DataSet(index, start, version, (t0, t1, *offsets[2:]), keywords, notes)  # type: ignore[arg-type]

    def _merge_supplemental_text(
        self, keywords: dict[str, str], start: int, available: int, where: str, notes: list[str]
    ) -> None:
        b = _int_or_none(keywords.get("$BEGINSTEXT"))
        e = _int_or_none(keywords.get("$ENDSTEXT"))
        if not b or not e:
            return
        if not (_HEADER_LEN <= b <= e < available):
            notes.append(
                f"$BEGINSTEXT/$ENDSTEXT{where} ({b}-{e}) lie outside the file; supplemental TEXT ignored"
            )
            return
        try:
            extra, _ = _parse_text(self.read_at(start + b, e - b + 1), self.path, "supplemental TEXT")
        except FCSError as exc:
            notes.append(f"supplemental TEXT{where} ignored: {exc.message}")
            return
        for key, value in extra.items():
            keywords.setdefault(key, value)

    def datasets(self) -> Iterator[_DataSet]:
        """The chain of data sets, following ``$NEXTDATA`` (offsets relative to each data set)."""
        start, index = 0, 0
        while True:
            ds = self.dataset_at(start, index)
            yield ds
            nxt = self._next_start(ds)
            if nxt is None:
                return
            start, index = nxt, index + 1

    def _next_start(self, ds: _DataSet) -> int | None:
        raw = ds.keywords.get("$NEXTDATA", "0").strip() or "0"
        if not raw.isdigit():
            raise FCSKeywordError(
                f"$NEXTDATA is {raw!r}, expected the byte offset of the next data set (0 when there is none)",
                file=self.path,
                keyword="$NEXTDATA",
            )
        nxt = int(raw)
        if nxt == 0:
            return None
        for candidate in (ds.start + nxt, nxt):  # relative (the standard) or absolute (some writers)
            if ds.start < candidate <= self.size - _HEADER_LEN and self.read_at(candidate, 3) == b"FCS":
                if candidate == nxt and ds.start:
                    self.warn(f"$NEXTDATA of data set {ds.index} is an absolute offset ({nxt}); followed it")
                return candidate
        raise FCSKeywordError(
            f"$NEXTDATA of data set {ds.index} is {nxt}, but no FCS HEADER starts at byte "
            f"{ds.start + nxt} (file size {self.size})",
            file=self.path,
            keyword="$NEXTDATA",
        )

    def dataset(self, index: int) -> _DataSet:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise FCSError(f"dataset must be a non-negative integer, got {index!r}", file=self.path)
        count = 0
        for ds in self.datasets():
            if ds.index == index:
                for note in ds.notes:
                    self.warn(note)
                return ds
            count += 1
        raise FCSError(
            f"data set {index} requested but the file has only {count} (numbered 0 to {count - 1})",
            file=self.path,
        )

    def count_following(self, ds: _DataSet) -> int:
        """Number of data sets in the file, given data set ``ds`` was read; a broken link
        after ``ds`` ends the count with a warning instead of failing the read."""
        n, current = ds.index + 1, ds
        try:
            while (nxt := self._next_start(current)) is not None:
                current = self.dataset_at(nxt, n)
                n += 1
        except FCSError as exc:
            self.warn(f"data set {n} cannot be read ({exc.message}); counted {n} data set(s)")
        return n

    # -- DATA layout -----------------------------------------------------------------------
    def layout(self, ds: _DataSet, rows: Sequence[tuple]) -> _Layout:
        """Where and how the events are stored; ``rows``: :func:`_channel_rows`."""
        kw = ds.keywords
        n_par = len(rows)
        datatype = kw.get("$DATATYPE", "").strip().upper()
        if not datatype:
            raise FCSKeywordError(
                "required keyword $DATATYPE is missing", file=self.path, keyword="$DATATYPE"
            )
        mode = kw.get("$MODE", "L").strip().upper() or "L"
        if mode != "L":
            raise FCSUnsupportedError(
                f"$MODE is {mode!r} (histogram data); only list-mode data ($MODE L) is supported",
                file=self.path,
                keyword="$MODE",
            )
        kinds, bit_list = [], []
        for n, *_, bits, _pne, _png in rows:
            key = f"$P{n}DATATYPE"  # FCS 3.2
            own = kw.get(key)
            if own is None:
                key, dt = "$DATATYPE", datatype
            else:
                dt = own.strip().upper() or datatype
            if dt == "A":
                raise FCSUnsupportedError(
                    "$DATATYPE A (ASCII-encoded events) is not supported; re-export the file as "
                    "binary (I, F or D) from the acquisition software",
                    file=self.path,
                    keyword=key,
                )
            if dt not in ("I", "F", "D"):
                raise FCSKeywordError(
                    f"{key} is {dt!r}; expected I (integer), F (float32) or D (float64)",
                    file=self.path,
                    keyword=key,
                )
            if dt == "I":
                if bits <= 0 or bits > 64:
                    raise (FCSUnsupportedError if bits > 64 else FCSKeywordError)(
                        f"$P{n}B is {bits}; integer data needs 1 to 64 bits per value",
                        file=self.path,
                        keyword=f"$P{n}B",
                    )
                kinds.append("u")
                bit_list.append(int(bits))
            else:
                kinds.append("f")
                bit_list.append(32 if dt == "F" else 64)
        width_options = _storage_widths(bit_list)
        big = self._byte_order(kw, width_options[0])
        if not kw.get("$TOT", "").strip() and ds.version < "FCS3.0":
            n_events = None  # $TOT was optional in FCS 2.0: inferred from the DATA size
        else:
            n_events = _int_keyword(kw, "$TOT", self)
        begin, widths, n_events = self._data_segment(ds, n_events, width_options, n_par)
        masks = _range_masks(rows, kinds, bit_list, widths, self) if "u" in kinds else [None] * n_par
        row_bytes = sum(widths)
        return _Layout(
            n_events=n_events,
            n_channels=n_par,
            begin=ds.start + begin,
            nbytes=n_events * row_bytes,
            row_bytes=row_bytes,
            kinds=kinds,
            widths=widths,
            big=big,
            masks=masks,
        )

    def _byte_order(self, kw: Mapping[str, str], widths: list[int]) -> bool:
        raw = kw.get("$BYTEORD")
        order = (raw or "").replace(" ", "")
        if order in _LITTLE:
            return False
        if order in _BIG:
            return True
        if max(widths) == 1:  # single bytes: the order does not matter
            return False
        if raw is None:
            raise FCSKeywordError("required keyword $BYTEORD is missing", file=self.path, keyword="$BYTEORD")
        if re.fullmatch(r"\d(,\d)+", order) and sorted(order.split(",")) == [
            str(i) for i in range(1, len(order.split(",")) + 1)
        ]:
            raise FCSUnsupportedError(
                f"$BYTEORD is {raw!r}: mixed byte orders are not supported (only little-endian "
                f"1,2,3,4 and big-endian 4,3,2,1)",
                file=self.path,
                keyword="$BYTEORD",
            )
        raise FCSKeywordError(
            f"$BYTEORD is {raw!r}; expected 1,2,3,4 (little-endian) or 4,3,2,1 (big-endian)",
            file=self.path,
            keyword="$BYTEORD",
        )

    def _data_segment(
        self, ds: _DataSet, n_events: int | None, width_options: list[list[int]], n_par: int
    ) -> tuple[int, list[int], int]:
        """Choose the DATA segment among the HEADER and TEXT offsets; returns
        (begin relative to the data set, per-channel widths, number of events)."""
        kw = ds.keywords
        t0, t1 = ds.offsets[0], ds.offsets[1]
        available = self.size - ds.start
        candidates: list[tuple[str, int, int]] = []
        hb, he = ds.offsets[2], ds.offsets[3]
        if (hb, he) != (0, 0):
            candidates.append(("HEADER", hb, he))
        tb, te = _int_or_none(kw.get("$BEGINDATA")), _int_or_none(kw.get("$ENDDATA"))
        if ("$BEGINDATA" in kw or "$ENDDATA" in kw) and (tb is None or te is None):
            self.warn(
                f"$BEGINDATA/$ENDDATA are {kw.get('$BEGINDATA')!r}/{kw.get('$ENDDATA')!r}, not byte offsets; ignored"
            )
        if tb is not None and te is not None and (tb, te) != (0, 0):
            candidates.append(("TEXT", tb, te))
        if n_events is None:
            n_events = self._infer_events(candidates, width_options)
        if n_events < 0:
            raise FCSKeywordError(f"$TOT is {n_events}; it must be >= 0", file=self.path, keyword="$TOT")
        if n_events == 0:
            for name, b, e in candidates:
                if e - b + 1 > 1 and not (name == "TEXT" and ds.version < "FCS3.0"):
                    raise FCSDataError(
                        f"$TOT is 0 but the {name} gives a DATA segment of {e - b + 1} bytes "
                        f"(bytes {b}-{e}); $TOT or the offsets are wrong",
                        file=self.path,
                        keyword="$TOT",
                    )
            return (candidates[0][1] if candidates else 0), width_options[0], 0
        if not candidates:
            raise FCSDataError(
                f"the file has no DATA segment: the HEADER data offsets are 0 and $BEGINDATA/$ENDDATA "
                f"are missing, but $TOT says {n_events} events (a HEADER+TEXT-only file?)",
                file=self.path,
            )

        def assess(name: str, b: int, e: int) -> tuple[list[int] | None, str]:
            length = e - b + 1
            label = f"{name} says bytes {b}-{e}"
            if e < b:
                return None, f"{label}, an empty or reversed range"
            if b < _HEADER_LEN:
                return None, f"{label}, which starts inside the HEADER"
            if b < t1 and e >= t0:  # b == t1: the HEADER's TEXT end points one byte too far
                return None, f"{label}, which overlaps the TEXT segment (bytes {t0}-{t1})"
            reasons = []
            for widths in width_options:
                need = n_events * sum(widths)
                if need <= length <= need + sum(widths) - 1 or length == need + 1:
                    if b >= available:
                        return None, (
                            f"{label} ({need} bytes for {n_events} events), but the file ends at byte "
                            f"{available - 1}, before the DATA segment starts: it holds only HEADER and "
                            f"TEXT, or was truncated"
                        )
                    if b + need > available:
                        complete = (available - b) // sum(widths)
                        return None, (
                            f"{label} ({need} bytes for {n_events} events), but the file ends at byte "
                            f"{available - 1}: it is truncated (only {complete} of {n_events} events are complete)"
                        )
                    if length > need + 1:
                        self.warn(f"DATA segment has {length - need} bytes after the last event; ignored")
                    return widths, ""
                reasons.append(f"$TOT {n_events} x {sum(widths)} bytes per event = {need} bytes")
            return None, f"{label} ({length} bytes), but {' or '.join(reasons)}"

        assessed = [(name, b, e, *assess(name, b, e)) for name, b, e in candidates]
        good = [a for a in assessed if a[3] is not None]
        if not good:
            if len(assessed) == 2 and assessed[0][1:3] == assessed[1][1:3]:  # the same offsets: say it once
                reasons = [assessed[0][4].replace("HEADER says", "HEADER and TEXT say", 1)]
            else:
                reasons = list(dict.fromkeys(a[4] for a in assessed))
            todo = (
                "copy or export the file again from the acquisition computer"
                if any("truncated" in r for r in reasons)
                else "the file is damaged or was written wrongly; export it again from the acquisition software"
            )
            raise FCSDataError(
                "DATA segment does not match the keywords: " + "; ".join(reasons) + f"; {todo}",
                file=self.path,
            )
        if len(good) > 1 and good[0][1] != good[1][1]:
            # Both plausible but different: prefer the one that starts right after TEXT, then
            # the authoritative one (TEXT keywords in FCS 3.x, the HEADER in FCS 2.0).
            after_text = [a for a in good if a[1] in (t1, t1 + 1)]
            preferred = "HEADER" if ds.version < "FCS3.0" else "TEXT"
            if len(after_text) == 1:
                good = after_text
            else:
                good.sort(key=lambda a: a[0] != preferred)
        name, b, e, widths, _ = good[0]
        others = [a for a in assessed if a[0] != name and (a[1] != b or a[3] is None)]
        for oname, ob, oe, owidths, reason in others:
            why = "it starts right after TEXT" if b in (t1, t1 + 1) else "it matches $TOT and the file size"
            what = reason if owidths is None else f"{oname} says bytes {ob}-{oe}"
            self.warn(
                f"HEADER and TEXT disagree on the DATA segment: {what}; used the {name} offsets "
                f"(bytes {b}-{e}) because {why}"
            )
        return b, widths, n_events

    def _infer_events(self, candidates: list[tuple[str, int, int]], width_options) -> int:
        if not candidates:
            raise FCSKeywordError("required keyword $TOT is missing", file=self.path, keyword="$TOT")
        name, b, e = candidates[0]
        row = sum(width_options[0])
        self.warn(f"$TOT is missing; inferred {(e - b + 1) // row} events from the {name} DATA offsets")
        return (e - b + 1) // row

    # -- DATA decoding ---------------------------------------------------------------------
    def read_events(
        self, layout: _Layout, plan: _Plan | None, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        n, p = layout.n_events, layout.n_channels
        if buffer is not None:
            flags = buffer.flags
            if (
                buffer.dtype != np.float32
                or not (flags.c_contiguous and flags.writeable)
                or buffer.size < n * p
            ):
                raise FCSDataError(
                    f"the buffer given as out= ({buffer.dtype}, {buffer.size} values, "
                    f"{'' if flags.c_contiguous else 'not '}C-contiguous, "
                    f"{'' if flags.writeable else 'not '}writeable) cannot hold this data set: it needs "
                    f"a writeable C-contiguous float32 array of at least {n} events x {p} channels = {n * p} values",
                    file=self.path,
                )
            out = buffer.reshape(-1)[: n * p].reshape(n, p)
        else:
            try:
                out = np.empty((n, p), dtype=np.float32)
            except MemoryError:
                raise FCSDataError(
                    f"not enough memory for {n} events x {p} channels ({n * p * 4 / 1e9:.1f} GB as float32)",
                    file=self.path,
                ) from None
        if n == 0:
            return out
        self.fh.seek(layout.begin)
        uniform = layout.uniform
        if uniform == np.dtype("f4"):
            self._read_float32(out, layout, plan)
        elif uniform is not None:
            self._read_uniform(out, layout, uniform, plan)
        else:
            self._read_mixed(out, layout, plan)
        return out

    def _chunk_rows(self, layout: _Layout) -> int:
        return max(1, min(layout.n_events, _CHUNK_BYTES // max(layout.row_bytes, 1)))

    def _read_float32(self, out: np.ndarray, layout: _Layout, plan: _Plan | None) -> None:
        # little-endian: read() straight into the result (below); big-endian: one vectorised
        # swapping pass from the page cache into the result
        kernels = _kernels() if plan is None and layout.big and layout.nbytes >= _KERNEL_MIN_BYTES else None
        if kernels is not None:
            mapped = self._mapped(layout, np.dtype("u4"))
            if mapped is not None:
                copy = kernels.swap_copy32
                flat = out.reshape(-1).view(np.uint32)
                step = self._chunk_rows(layout) * _MAPPED_CHUNKS * layout.n_channels
                for s in range(0, flat.size, step):
                    copy(mapped.values[s : s + step], flat[s : s + step])
                    mapped.release(s + step)
                return
        if not layout.big and plan is None:
            self.readinto(out)  # the array read from disk is the result
            return
        rows = self._chunk_rows(layout)
        swap = _swapper(4, layout.nbytes) if layout.big else None
        for s in range(0, layout.n_events, rows):
            chunk = out[s : s + rows]
            self.readinto(chunk)
            if swap is not None:
                swap(chunk.reshape(-1).view(np.uint32))
            if plan is not None:
                plan.apply(lambda j, c=chunk: c[:, j], chunk)

    def _read_uniform(self, out: np.ndarray, layout: _Layout, dtype: np.dtype, plan: _Plan | None) -> None:
        rows = self._chunk_rows(layout)
        p = layout.n_channels
        kernels = _kernels() if layout.nbytes >= _KERNEL_MIN_BYTES else None
        if plan is None and kernels is not None and dtype in (np.dtype("u2"), np.dtype("u4")):
            self._decode_ints(out, layout, dtype, kernels)
            return
        buf = np.empty(rows * p, dtype=dtype)
        swap = _swapper(dtype.itemsize, layout.nbytes) if layout.big and dtype.itemsize > 1 else None
        masked = np.array([m is not None for m in layout.masks])
        if masked.any():
            full = np.iinfo(dtype).max if dtype.kind == "u" else 0
            row_mask = np.array([full if m is None else m for m in layout.masks], dtype=dtype)
            masks = np.tile(row_mask, rows)
        cleared = np.zeros(p, dtype=bool)
        for s in range(0, layout.n_events, rows):
            chunk = out[s : s + rows]
            raw = buf[: chunk.size]
            self.readinto(raw)
            if swap is not None:
                swap(raw.view(f"u{dtype.itemsize}"))
            if masked.any():
                m = masks[: raw.size]
                if not cleared[masked].all() and _bits_outside(raw, m, layout.nbytes):
                    cleared |= np.any(raw.reshape(-1, p) & ~row_mask, axis=0)
                np.bitwise_and(raw, m, out=raw)
            np.copyto(chunk.reshape(-1), raw, casting="unsafe")
            if plan is not None:
                grid = raw.reshape(-1, p)
                plan.apply(lambda j, g=grid: g[:, j], chunk)
        self._note_masked(cleared, layout)

    def _decode_ints(self, out: np.ndarray, layout: _Layout, dtype: np.dtype, kernels: Any) -> None:
        """16/32-bit integers in one pass: a numba kernel swaps, masks and widens the raw values
        into the float32 output, reading them from the file's mapped pages (or, where the file
        cannot be mapped, from a small cache-resident buffer refilled chunk by chunk)."""
        rows = self._chunk_rows(layout)
        p = layout.n_channels
        full = np.iinfo(dtype).max
        row_mask = np.array([full if m is None else m for m in layout.masks], dtype=dtype)
        masks = np.tile(row_mask, min(rows, _MASK_BLOCK_ROWS))
        flat = out.reshape(-1)
        cleared = np.zeros(p, dtype=bool)
        decode = kernels.decode_u16 if dtype.itemsize == 2 else kernels.decode_u32
        mapped = self._mapped(layout, dtype)
        if mapped is None:
            buf = np.empty(rows * p, dtype=dtype)
        else:
            rows *= _MAPPED_CHUNKS
        for s in range(0, layout.n_events, rows):
            e = min(s + rows, layout.n_events)
            if mapped is None:
                raw = buf[: (e - s) * p]
                self.readinto(raw)
            else:
                raw = mapped.values[s * p : e * p]
            if decode(raw, flat[s * p : e * p], masks, layout.big) and not cleared.all():
                # rare (flags above $PnR): find which channels from this chunk's raw values
                grid = raw.reshape(-1, p).copy()
                if layout.big:
                    grid.byteswap(inplace=True)
                cleared |= np.any(grid & ~row_mask, axis=0)
            if mapped is not None:
                mapped.release(e * p)
        self._note_masked(cleared, layout)

    def _mapped(self, layout: _Layout, dtype: np.dtype) -> _MappedData | None:
        """The DATA segment mapped read-only (see :class:`_MappedData`), or None when the file
        cannot be mapped (some network or FUSE file systems): the caller then reads chunks.
        The file's size is checked after mapping; a file truncated by another program *while*
        it is decoded would stop the process with SIGBUS (as with numpy.memmap), where a
        chunked read raised FCSDataError."""
        start = layout.begin - layout.begin % mmap.ALLOCATIONGRANULARITY
        fd = self.fh.fileno()
        try:
            mm = mmap.mmap(fd, layout.begin + layout.nbytes - start, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError, OverflowError):
            return None
        size = os.fstat(fd).st_size
        if size < layout.begin + layout.nbytes:
            mm.close()
            raise FCSDataError(
                f"the file shrank to {size} bytes while being read (its DATA segment ends at byte "
                f"{layout.begin + layout.nbytes - 1}); it was truncated or replaced by another program",
                file=self.path,
            )
        return _MappedData(mm, dtype, layout.begin - start, layout.nbytes)

    def _read_mixed(self, out: np.ndarray, layout: _Layout, plan: _Plan | None) -> None:
        rows = self._chunk_rows(layout)
        rb = layout.row_bytes
        buf = np.empty(rows * rb, dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(layout.widths)[:-1]]).tolist()
        order = ">" if layout.big else "<"
        cleared = np.zeros(layout.n_channels, dtype=bool)
        for s in range(0, layout.n_events, rows):
            chunk = out[s : s + rows]
            n = chunk.shape[0]
            raw = buf[: n * rb]
            self.readinto(raw)
            grid = raw.reshape(n, rb)
            columns = []
            for j, (off, width, kind) in enumerate(zip(offsets, layout.widths, layout.kinds)):
                if width in (1, 2, 4, 8):
                    dt = np.dtype(f"{order}{kind}{width}")
                    view = np.ndarray((n,), dtype=dt, buffer=raw, offset=off, strides=(rb,))
                    col = view.astype(dt.newbyteorder("="))
                else:  # 3-, 5-, 6- or 7-byte integers, assembled byte by byte
                    col = np.zeros(n, dtype=np.uint32 if width <= 4 else np.uint64)
                    for k in range(width):
                        byte = grid[:, off + (k if layout.big else width - 1 - k)]
                        col <<= col.dtype.type(8)
                        col |= byte
                mask = layout.masks[j]
                if mask is not None:
                    m = col.dtype.type(mask)
                    if not cleared[j] and np.any(col & ~m):
                        cleared[j] = True
                    col &= m
                chunk[:, j] = col
                columns.append(col)
            if plan is not None:
                plan.apply(lambda j, c=columns: c[j], chunk)
        self._note_masked(cleared, layout)

    def _note_masked(self, cleared: np.ndarray, layout: _Layout) -> None:
        if cleared.any():
            names = ", ".join(f"$P{j + 1}" for j in np.flatnonzero(cleared))
            self.warn(
                f"bits above the $PnR range were set in {names}; masked them off as the FCS "
                f"standard requires (some instruments store extra flags there)"
            )


def _bits_outside(raw: np.ndarray, masks: np.ndarray, nbytes: int) -> bool:
    """True when some value has bits set outside its mask."""
    kernels = _kernels() if nbytes >= _KERNEL_MIN_BYTES else None
    if kernels is not None:
        return bool(kernels.bits_outside(raw, masks))
    return bool(np.any(raw & ~masks))


def _kernels():
    try:
        from cytopipe import _fcskernels
    except ImportError:  # pragma: no cover - numba is a dependency; numpy fallback
        return None
    return _fcskernels


def _swapper(itemsize: int, nbytes: int) -> Callable[[np.ndarray], None]:
    kernels = _kernels() if nbytes >= _KERNEL_MIN_BYTES else None
    if kernels is None:
        return lambda a: a.byteswap(inplace=True)
    return {2: kernels.bswap16, 4: kernels.bswap32, 8: kernels.bswap64}[itemsize]


def _storage_widths(bits: list[int]) -> list[list[int]]:
    """Per-channel storage widths in bytes; several options when some ``$PnB`` is not a
    multiple of 8 (e.g. 10-bit values stored in 16-bit words), resolved by the DATA size."""
    exact = [b // 8 for b in bits]
    if all(b % 8 == 0 for b in bits):
        return [exact]
    up8 = [-(-b // 8) for b in bits]
    pow2 = [1 << (w - 1).bit_length() for w in up8]
    return [up8] if up8 == pow2 else [up8, pow2]


def _range_masks(
    rows: Sequence[tuple], kinds: list[str], bits: list[int], widths: list[int], f: _FCSFile
) -> list[int | None]:
    """AND masks for integer channels: keep the bits that ``$PnR`` (rounded up to a power
    of two, as FlowIO and fcsparser do) and ``$PnB`` allow; None when nothing is removed."""
    masks: list[int | None] = []
    for (n, _pnn, _pns, rng, *_), kind, b, w in zip(rows, kinds, bits, widths):
        if kind != "u":
            masks.append(None)
            continue
        keep = min(b, 8 * w)
        if math.isfinite(rng) and rng >= 2:
            keep = min(keep, (math.ceil(rng) - 1).bit_length())
        elif b == 8 * w:
            f.warn(f"$P{n}R is {rng!r}; not used to mask the integer values of $P{n}")
        masks.append((1 << keep) - 1 if keep < 8 * w else None)
    return masks


# --------------------------------------------------------------------------------------------
# TEXT parsing
# --------------------------------------------------------------------------------------------
def parse_text(raw: bytes, path: str | Path | None = None) -> dict[str, str]:
    """Parse a TEXT segment (first byte = delimiter) into a dict with upper-case keys.

    Doubled delimiters are escapes; FCS 2.0 files that write empty values as two
    delimiters are recognised. Values are decoded as UTF-8, falling back to Latin-1.
    """
    keywords, _ = _parse_text(raw, Path(path) if path is not None else None, "TEXT segment")
    return keywords


def _split(body: bytes, d: bytes, escapes: bool) -> tuple[list[bytes], bool]:
    """Split a TEXT body (after the first delimiter) into tokens; returns (tokens, terminated)."""
    if escapes:
        pieces = body.split(d + d)
        tokens = pieces[0].split(d)
        for piece in pieces[1:]:  # rejoin around each escaped (doubled) delimiter
            sub = piece.split(d)
            tokens[-1] += d + sub[0]
            tokens.extend(sub[1:])
    else:
        tokens = body.split(d)
    terminated = tokens[-1] == b""
    if terminated:
        tokens.pop()
    return tokens, terminated


def _check_tokens(tokens: list[bytes], terminated: bool) -> tuple[list[bytes] | None, str, str]:
    """Validate keyword/value tokens; returns (tokens or None, problem, note)."""
    note = ""
    if len(tokens) % 2 and not terminated:
        # The HEADER's TEXT end points past the final delimiter: drop the stray bytes.
        note = f"TEXT segment ends with {len(tokens[-1])} stray byte(s) {tokens[-1][:16]!r} after its last delimiter; ignored"
        tokens = tokens[:-1]
    if len(tokens) % 2:
        return None, f"it has an odd number of fields ({len(tokens)}): a keyword lacks its value", note
    if not all(map(bytes.strip, tokens[0::2])):  # (one C-level pass) some keyword name is empty
        i = next(i for i in range(0, len(tokens), 2) if not tokens[i].strip())
        after = tokens[i - 2].decode("latin-1") if i >= 2 else "the start"
        return None, f"it has an empty keyword name (field {i + 1}, after {after!r})", note
    return tokens, "", note


def _parse_text(raw: bytes, path: Path | None, what: str) -> tuple[dict[str, str], list[str]]:
    if len(raw) < 2:
        raise FCSKeywordError(f"{what} is {len(raw)} byte(s) long; it holds no keywords", file=path)
    d = raw[:1]
    if raw[-1:] != d:  # tolerate padding (spaces, NULs, newlines) after the final delimiter
        stripped = raw.rstrip(b" \x00\r\n\t")
        if len(stripped) > 1 and stripped[-1:] == d:
            raw = stripped
    body = raw[1:]
    notes: list[str] = []
    tokens, problem, note = _check_tokens(*_split(body, d, escapes=True))
    doubled = d + d in body
    if doubled:
        plain, plain_problem, plain_note = _check_tokens(*_split(body, d, escapes=False))
        # Doubled delimiters are escapes (FCS 3.x) or, in FCS 2.0 files, empty values. A
        # reading that leaves an empty keyword name or an odd field count is wrong; when both
        # readings are well formed, escapes would have put delimiters inside keyword names,
        # which real files do not do, so the empty-value reading wins.
        if plain is not None and (tokens is None or any(d in k for k in tokens[0::2])):
            tokens, note = plain, plain_note
    if tokens is None:
        raise FCSKeywordError(f"{what} cannot be parsed: {problem}", file=path)
    if note:
        notes.append(note)
    if not body.isascii():
        texts = [_decode(t) for t in tokens]
    elif doubled:
        texts = [t.decode("ascii") for t in tokens]
    else:  # (nearly every file) the tokens are the body split at each delimiter: decode it once
        texts = body.decode("ascii").split(d.decode("latin-1"))[: len(tokens)]
    keys = [k.strip().upper() for k in texts[0::2]]
    values = texts[1::2]
    keywords = dict(zip(keys, values))  # a repeated keyword keeps its first place and its last value
    if len(keywords) < len(keys):  # some keyword repeats: note those whose values differ
        keywords = {}
        for key, value in zip(keys, values):
            if key in keywords and keywords[key] != value:
                notes.append(
                    f"keyword {key} appears more than once ({keywords[key]!r}, {value!r}); kept the last"
                )
            keywords[key] = value
    return keywords, notes


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # not UTF-8 (older instruments): Latin-1 keeps every byte
        return raw.decode("latin-1")


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


def _int_keyword(
    keywords: Mapping[str, str], key: str, f: _FCSFile | None, default: int | None = None
) -> int:
    path = f.path if f is not None else None
    value = keywords.get(key)
    if value is None or value.strip() == "":
        if default is not None:
            return default
        raise FCSKeywordError(f"required keyword {key} is missing", file=path, keyword=key)
    text = value.strip()
    if _INTEGER.fullmatch(text):
        return int(text)
    try:
        as_float = float(text)
    except ValueError:
        as_float = math.nan
    if math.isfinite(as_float) and as_float == int(as_float):
        return int(as_float)
    raise FCSKeywordError(f"{key} is {value!r}, expected an integer", file=path, keyword=key)


def _float_keyword(keywords: Mapping[str, str], key: str, f: _FCSFile, default: float) -> float:
    value = keywords.get(key)
    if value is None or not value.strip():
        return default
    try:
        return float(value.strip())
    except ValueError:
        raise FCSKeywordError(f"{key} is {value!r}, expected a number", file=f.path, keyword=key) from None


# --------------------------------------------------------------------------------------------
# channel table and spillover
# --------------------------------------------------------------------------------------------
def _table_of(rows: list[tuple]) -> pd.DataFrame:
    """The channel table of ``rows`` (:func:`_channel_rows`)."""
    columns = list(zip(*rows))
    return pd.DataFrame(
        {
            "n": np.array(columns[0], dtype=np.int64),
            "pnn": np.array(columns[1], dtype=object),
            "pns": np.array(columns[2], dtype=object),
            "pnr": np.array(columns[3], dtype=np.float64),
            "pnb": np.array(columns[4], dtype=np.int64),
            "pne": np.array(columns[5], dtype=object),
            "png": np.array(columns[6], dtype=np.float64),
        },
        copy=False,  # the arrays are fresh: pandas' copy was ~1/3 of the TEXT-side cost of a read
    )


def _channel_rows(keywords: Mapping[str, str], f: _FCSFile) -> list[tuple]:
    """``(n, pnn, pns, pnr, pnb, pne, png)`` of every parameter, checked; the file's warnings
    about them noted on ``f``."""
    n_par = _int_keyword(keywords, "$PAR", f)
    if n_par <= 0:
        raise FCSKeywordError(
            f"$PAR is {n_par}; a file needs at least one parameter", file=f.path, keyword="$PAR"
        )
    if n_par > len(keywords):  # every parameter needs at least its $PnB: $PAR is a lie
        raise FCSKeywordError(
            f"$PAR is {n_par} but the TEXT segment has only {len(keywords)} keywords "
            f"(each parameter needs $PnB, $PnR, ...)",
            file=f.path,
            keyword="$PAR",
        )
    rows = []
    empty_names = []
    get = keywords.get
    for n in range(1, n_par + 1):
        p = f"$P{n}"
        bits_raw = get(p + "B", "").strip()
        if not bits_raw:
            raise FCSKeywordError(
                f"required keyword $P{n}B (bits of parameter {n} of $PAR {n_par}) is missing",
                file=f.path,
                keyword=f"$P{n}B",
            )
        if bits_raw == "*":
            bits = 0  # FCS 2.0 free-format ASCII; rejected with $DATATYPE A
        elif bits_raw.isdigit():
            bits = int(bits_raw)
        else:
            raise FCSKeywordError(
                f"$P{n}B is {bits_raw!r}, expected a number of bits", file=f.path, keyword=f"$P{n}B"
            )
        pnn = get(p + "N", "").strip()
        if not pnn:
            empty_names.append(n)
        pnr = _float_keyword(keywords, p + "R", f, math.nan)  # missing or blank: NaN
        png = _float_keyword(keywords, p + "G", f, 1.0)
        pne = get(p + "E", "").strip() or "0,0"
        rows.append((n, pnn, get(p + "S", "").strip(), pnr, bits, pne, png))
    if empty_names:
        f.warn(f"parameter(s) {empty_names} have an empty or missing $PnN (kept as '')")
    names = [r[1] for r in rows]
    if len(set(names)) < len(names):
        dup = sorted(name for name, count in Counter(names).items() if count > 1 and name)
        if dup:
            f.warn(f"duplicate channel names ($PnN) {dup}: kept as they are; select such channels by index")
    if f"$P{n_par + 1}N" in keywords or f"$P{n_par + 1}B" in keywords:
        f.warn(
            f"TEXT describes parameter {n_par + 1} but $PAR is {n_par}: parameters beyond $PAR are ignored"
        )
    return rows


def read_spillover(keywords: Mapping[str, str], path: str | Path | None = None) -> Spillover | None:
    """Parse the first spillover keyword present (``$SPILLOVER``, ``SPILL``, ``$SPILL``, ``$COMP``)."""
    for key in SPILLOVER_KEYWORDS:
        if key in keywords and keywords[key].strip():
            return parse_spillover(keywords[key], key, path)
    return None


def parse_spillover(value: str, keyword: str = "$SPILLOVER", path: str | Path | None = None) -> Spillover:
    """Parse ``n,name1,...,namen,v11,v12,...,vnn`` into a :class:`Spillover`."""
    parts = [p.strip() for p in value.strip().rstrip(",").split(",")]
    try:
        n = int(float(parts[0]))
    except ValueError:
        raise SpilloverError(
            f"first field is {parts[0]!r}, expected the number of channels", file=path, keyword=keyword
        ) from None
    if n <= 0 or len(parts) != 1 + n + n * n:
        raise SpilloverError(
            f"declares {n} channels, so needs 1 + {n} names + {n}x{n} values = {1 + n + n * n} fields, "
            f"but has {len(parts)}",
            file=path,
            keyword=keyword,
        )
    names = parts[1 : 1 + n]
    try:
        matrix = np.array([float(v) for v in parts[1 + n :]], dtype=np.float64).reshape(n, n)
    except ValueError:
        bad = next(v for v in parts[1 + n :] if not _is_float(v))
        raise SpilloverError(f"matrix value {bad!r} is not a number", file=path, keyword=keyword) from None
    if not np.isfinite(matrix).all():
        raise SpilloverError("matrix holds NaN or infinite values", file=path, keyword=keyword)
    return Spillover(matrix=matrix, channels=names, keyword=keyword)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _spillover_for(keywords: Mapping[str, str], channels: pd.DataFrame, f: _FCSFile) -> Spillover | None:
    """The file's spillover with channel names checked against ``$PnN``."""
    for key in SPILLOVER_KEYWORDS:
        value = keywords.get(key, "")
        if not value.strip():
            continue
        if key == "$COMP" and _nameless_comp(value):
            f.warn("$COMP holds a matrix without channel names (FCS 2.0 style); ignored")
            continue
        if _names_only(value):
            # MACSQuant FCS 3.1 writes "n,name1..namen" with no matrix: nothing to apply.
            f.warn(f"{key} lists {value.split(',')[0].strip()} channel names but no matrix values; ignored")
            continue
        spill = parse_spillover(value, key, f.path)
        names = list(channels["pnn"])
        unknown = [c for c in spill.channels if c not in names]
        if unknown and all(c.isdigit() and 1 <= int(c) <= len(names) for c in spill.channels):
            # Some writers (e.g. Beckman Gallios) name the channels by parameter number.
            spill.channels = [names[int(c) - 1] for c in spill.channels]
            f.warn(f"{key} names its channels by parameter number; mapped to $PnN {spill.channels}")
        elif unknown:
            f.warn(f"{key} names channels that are not in $PnN: {unknown}")
        return spill
    return None


def _names_only(value: str) -> bool:
    parts = [p.strip() for p in value.strip().rstrip(",").split(",")]
    return parts[0].isdigit() and int(parts[0]) > 0 and len(parts) == 1 + int(parts[0])


def _nameless_comp(value: str) -> bool:
    parts = [p.strip() for p in value.strip().rstrip(",").split(",")]
    try:
        n = int(float(parts[0]))
    except ValueError:
        return False
    return n > 0 and len(parts) == 1 + n * n and all(_is_float(p) for p in parts[1:])


# --------------------------------------------------------------------------------------------
# preprocessing (FlowIO/FlowKit semantics)
# --------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Per-channel float64 operations, in FlowIO's order: timestep, log decoding, gain."""

    ops: list[tuple[int, float | None, tuple[float, float, float] | None, float | None]]

    def apply(self, raw_column: Callable[[int], np.ndarray], out_rows: np.ndarray) -> None:
        for j, timestep, log, gain in self.ops:
            v = np.array(raw_column(j), dtype=np.float64)
            if timestep is not None:
                v = v * timestep
            if log is not None:
                decades, log0, rng = log
                v = (10 ** (decades * v / rng)) * log0
            if gain is not None:
                v = v / gain
            out_rows[:, j] = v


def _preprocess_plan(keywords: Mapping[str, str], channels: pd.DataFrame, f: _FCSFile) -> _Plan:
    time_j = None
    for j, name in enumerate(channels["pnn"]):
        if name.lower() == "time":
            time_j = j  # FlowIO uses the last channel named "time"
    timestep = None
    if "$TIMESTEP" in keywords and time_j is not None:
        timestep = _float_keyword(keywords, "$TIMESTEP", f, 1.0)
    ops = []
    for j, (n, pne, pnr, png) in enumerate(
        zip(channels["n"], channels["pne"], channels["pnr"], channels["png"])
    ):
        try:
            decades, log0 = (float(x) for x in pne.split(","))
        except ValueError:
            raise FCSKeywordError(
                f"$P{n}E is {pne!r}, expected two numbers 'decades,offset' such as '0,0' or '4,1'",
                file=f.path,
                keyword=f"$P{n}E",
            ) from None
        log = None
        if decades > 0:
            if log0 == 0:
                log0 = 1.0  # '4,0' is invalid; read as 4 decades from 1, like FlowIO/FlowKit
            if not (math.isfinite(pnr) and pnr > 0):
                raise FCSKeywordError(
                    f"$P{n}E {pne!r} needs $P{n}R to decode log values, but $P{n}R is {pnr!r}",
                    file=f.path,
                    keyword=f"$P{n}R",
                )
            log = (decades, log0, float(pnr))
        gain = float(png) if (j != time_j and png not in (0.0, 1.0)) else None
        ts = timestep if j == time_j else None
        if ts is not None or log is not None or gain is not None:
            ops.append((j, ts, log, gain))
    return _Plan(ops)


class _Named:
    """What :func:`_preprocess_plan` needs of a file for its errors: its path."""

    def __init__(self, path: Path | None):
        self.path = path


def preprocess_events(sample: Sample) -> Sample:
    """Apply the usual FCS preprocessing to a sample read without it, in place.

    The same per-channel operations as ``read_fcs(path, preprocess=True)`` (``$TIMESTEP``, ``$PnE``
    log decoding, ``$PnG`` gain), on the rows ``sample.events`` holds now (e.g. those kept by event
    QC, which looks at the raw values), computed in float64 and rounded to float32: identical to
    reading with ``preprocess=True`` for data stored as integers or float32. Nothing is done to a
    sample that is already preprocessed.
    """
    if sample.preprocessed:
        return sample
    plan = _preprocess_plan(sample.keywords, sample.channels, _Named(sample.path))
    if plan.ops:
        events = sample.events if sample.events.flags.writeable else sample.events.copy()
        plan.apply(lambda j: events[:, j], events)
        sample.events = events
    sample.preprocessed = True
    return sample


def needs_preprocessing(channels: pd.DataFrame) -> list[str]:
    """The channels whose raw values differ from their preprocessed ones through ``$PnE`` log
    encoding or a gain ``$PnG`` other than 1 (as ``"FL1-H ($P3E 4,0)"``): the channels
    :func:`read_fcs` with ``preprocess=True`` changes (``$TIMESTEP`` is not counted)."""
    try:
        plan = _preprocess_plan({}, channels, _Named(None))  # no keywords: no $TIMESTEP
    except FCSKeywordError:
        return []  # a malformed $PnE: reading with preprocess=True names the problem
    out = []
    for j, _timestep, log, gain in plan.ops:
        row = channels.iloc[j]
        out.append(
            f"{row['pnn']} ($P{row['n']}E {row['pne']})" if log else f"{row['pnn']} ($P{row['n']}G {gain:g})"
        )
    return out


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
_OWNED_KEYWORDS = {
    "$BEGINDATA",
    "$ENDDATA",
    "$BEGINSTEXT",
    "$ENDSTEXT",
    "$BEGINANALYSIS",
    "$ENDANALYSIS",
    "$BYTEORD",
    "$DATATYPE",
    "$MODE",
    "$NEXTDATA",
    "$PAR",
    "$TOT",
}
_OWNED_PARAMETER_KEYS = {"N", "S", "B", "E", "R", "G", "DATATYPE"}
# Delimiters FlowIO, fcsparser and FlowJo all split on correctly; the first one that occurs
# nowhere in the TEXT is used, so no value needs escaping.
_DELIMITERS = ("|", "/", "\\", "*", "!", "#", "%", "&", ";", "~", "@", "\x0c", "\x1e", "\x1f")


def write_fcs(
    path: str | Path,
    events: np.ndarray,
    channels: pd.DataFrame | Sequence[str] | Sequence[tuple[str, str]],
    keywords: Mapping[str, str] | None = None,
    spillover: Spillover | None = None,
) -> Path:
    """Write an FCS 3.1 file with float32 little-endian data, atomically.

    ``channels`` is a channel table (column ``pnn``; optional ``pns`` marker, ``pnr``
    range, ``png`` gain, and ``n``, the parameter numbers the rows had in ``keywords``'
    file), a list of ``$PnN`` names or a list of ``(pnn, pns)`` pairs. Values are written
    as given, linear (``$PnE 0,0``): what you write is what every reader reads back.

    ``keywords`` are extra TEXT keywords (e.g. ``sample.keywords``): the layout keywords
    (``$PAR``, ``$TOT``, offsets, ``$DATATYPE``...) are always computed; per-parameter
    keywords such as ``$PnV`` follow their channel through the ``n`` column (without one,
    ``$PnV`` belongs to the n-th channel given; numbers beyond ``$PAR`` are dropped).
    ``spillover`` is written as ``$SPILLOVER`` (and replaces any
    spillover keyword in ``keywords``). The file appears under ``path`` only when complete.
    """
    path = Path(path)
    try:
        data = np.ascontiguousarray(events, dtype="<f4")
    except (TypeError, ValueError) as exc:
        raise FCSDataError(f"events cannot be converted to float32: {exc}", file=path) from None
    if data.ndim != 2:
        raise FCSDataError(
            f"events must be a 2-D array (events x channels), got shape {data.shape}", file=path
        )
    table = _as_channel_table(channels, data, path)
    text = _text_keywords(data, table, keywords, spillover, path)
    header, text_bytes = _layout_text(text, data.nbytes, path)
    size = len(header) + len(text_bytes) + data.nbytes

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(text_bytes)
            if data.size:
                fh.write(memoryview(data).cast("B"))

    def verify(tmp: Path) -> None:
        if tmp.stat().st_size != size:
            raise OutputWriteError(f"the written file has {tmp.stat().st_size} of {size} bytes", file=path)

    return atomic_write(path, write, verify)  # temporary file, fsync, size check, rename


def _as_channel_table(channels, data: np.ndarray, path: Path) -> pd.DataFrame:
    if isinstance(channels, pd.DataFrame):
        table = channels.reset_index(drop=True).copy()
        if "pnn" not in table:
            raise FCSKeywordError("the channel table needs a 'pnn' column", file=path)
    else:
        rows = [(c, "") if isinstance(c, str) else (c[0], c[1]) for c in channels]
        table = pd.DataFrame(rows, columns=["pnn", "pns"])
    if len(table) != data.shape[1]:
        raise FCSDataError(f"{len(table)} channels named but events have {data.shape[1]} columns", file=path)
    table["pnn"] = [str(v).strip() for v in table["pnn"]]
    table["pns"] = ["" if pd.isna(v) else str(v).strip() for v in table.get("pns", [""] * len(table))]
    for name in table["pnn"]:
        if not name:
            raise FCSKeywordError("a channel has an empty name ($PnN)", file=path)
        if "," in name:
            raise FCSKeywordError(
                f"channel name {name!r} contains a comma, which FCS 3.1 forbids in $PnN "
                f"(it would break $SPILLOVER)",
                file=path,
                channel=name,
            )
    dup = sorted(set(table["pnn"][table["pnn"].duplicated()]))
    if dup:
        raise FCSKeywordError(f"duplicate channel names {dup}; $PnN must be unique in FCS 3.1", file=path)
    given = table["pnr"] if "pnr" in table else pd.Series([np.nan] * len(table))
    finite = np.where(np.isfinite(data), data, np.nan) if data.size else np.zeros((0, data.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        top = np.nanmax(finite, axis=0) if data.shape[0] else np.zeros(data.shape[1])
    table["pnr"] = [
        float(g) if pd.notna(g) and float(g) > 0 else _default_range(t) for g, t in zip(given, top)
    ]
    return table


def _default_range(top: float) -> float:
    """A power of two >= the largest value, at least 262144 (18-bit, what most cytometers use)."""
    if not math.isfinite(top) or top <= 262144:
        return 262144.0
    return float(2 ** math.ceil(math.log2(min(top, 3.4e38))))


def _text_keywords(
    data: np.ndarray,
    table: pd.DataFrame,
    keywords: Mapping[str, str] | None,
    spillover: Spillover | None,
    path: Path,
) -> dict[str, str]:
    text: dict[str, str] = {
        "$BYTEORD": "1,2,3,4",
        "$DATATYPE": "F",
        "$MODE": "L",
        "$NEXTDATA": "0",
        "$PAR": str(data.shape[1]),
        "$TOT": str(data.shape[0]),
    }
    for i, row in table.iterrows():
        n = i + 1
        text[f"$P{n}N"] = row["pnn"]
        text[f"$P{n}B"] = "32"
        text[f"$P{n}E"] = "0,0"
        text[f"$P{n}R"] = _format_number(row["pnr"])
        if "png" in table and pd.notna(row["png"]) and float(row["png"]) not in (0.0, 1.0):
            text[f"$P{n}G"] = _format_number(row["png"])
        if row["pns"]:
            text[f"$P{n}S"] = row["pns"]
    # map the source file's parameter numbers to the new ones (for $PnV, $PnD, ...); without
    # an ``n`` column the keywords are taken to describe the channels as given
    renumber = {i: i for i in range(1, len(table) + 1)}
    if "n" in table:
        renumber = {int(old): new + 1 for new, old in enumerate(table["n"]) if pd.notna(old)}
    spill_keys = set(SPILLOVER_KEYWORDS) if spillover is not None else set()
    for key, value in (keywords or {}).items():
        key = str(key).strip().upper()
        value = "" if value is None else str(value)
        if key in _OWNED_KEYWORDS or key in spill_keys or not value.strip() or not key:
            continue
        m = _PARAMETER_KEYWORD.fullmatch(key)
        if m:
            old, suffix = int(m.group(1)), m.group(2)
            if suffix in _OWNED_PARAMETER_KEYS or old not in renumber:
                continue
            key = f"$P{renumber[old]}{suffix}"
        if (
            key in SPILLOVER_KEYWORDS
            and (value := _copied_spillover(key, value, list(table["pnn"]), path)) is None
        ):
            continue
        text[key] = value
    if spillover is not None:
        names = list(table["pnn"])
        missing = [c for c in spillover.channels if c not in names]
        if missing:
            raise SpilloverError(
                f"spillover names channels {missing} that are not among the written channels {names}",
                file=path,
            )
        matrix = np.asarray(spillover.matrix, dtype=np.float64)
        if matrix.shape != (len(spillover.channels),) * 2:
            raise SpilloverError(
                f"spillover matrix is {matrix.shape} for {len(spillover.channels)} channels", file=path
            )
        text["$SPILLOVER"] = spillover.to_keyword_value()
    return text


def _copied_spillover(key: str, value: str, names: list[str], path: Path) -> str | None:
    """A spillover keyword copied from ``keywords``, restricted to the written channels (writing a
    subset of a read file's channels with its keywords wrote a matrix naming channels the file
    lacks, which no reader can apply): its rows and columns of written channels (the spillover
    between two channels does not depend on the others), or None when it names none of them. One
    that cannot be parsed, or names parameters by number, is copied as it is."""
    try:
        copied = parse_spillover(value, key, path)
    except FCSError:
        return value
    if any(str(c).strip().isdigit() for c in copied.channels):
        return value
    kept = [i for i, c in enumerate(copied.channels) if c in names]
    if len(kept) == len(copied.channels):
        return value
    logger.info(
        "%s: %s copied from `keywords` names channels that are not written %s; kept its rows and "
        "columns of the written channels (%d of %d)",
        path,
        key,
        [c for c in copied.channels if c not in names],
        len(kept),
        len(copied.channels),
    )
    if not kept:
        return None
    matrix = np.asarray(copied.matrix, dtype=np.float64)[np.ix_(kept, kept)]
    return Spillover(matrix, [copied.channels[i] for i in kept], key).to_keyword_value()


def _layout_text(text: dict[str, str], n_data: int, path: Path) -> tuple[bytes, bytes]:
    """Build HEADER and TEXT; offsets change the TEXT length, so iterate to a fixed point."""
    everything = "".join(k + v for k, v in text.items())
    delim = next((d for d in _DELIMITERS if d not in everything), None)
    if delim is None:  # every candidate occurs: escape by doubling (values may not start/end with it)
        delim = "|"
        for k, v in text.items():
            if v.startswith(delim) or v.endswith(delim) or k.startswith(delim) or k.endswith(delim):
                raise FCSKeywordError(
                    f"keyword {k} starts or ends with '|' and every TEXT delimiter occurs in the keywords",
                    file=path,
                    keyword=k,
                )
    text_start = _HEADER_LEN
    begin = end = 0
    for _ in range(10):
        full = dict(text)
        full.update(
            {
                "$BEGINANALYSIS": "0",
                "$ENDANALYSIS": "0",
                "$BEGINSTEXT": "0",
                "$ENDSTEXT": "0",
                "$BEGINDATA": str(begin),
                "$ENDDATA": str(end),
            }
        )
        body = delim + "".join(
            f"{k.replace(delim, delim * 2)}{delim}{v.replace(delim, delim * 2)}{delim}"
            for k, v in full.items()
        )
        text_bytes = body.encode("utf-8")
        text_end = text_start + len(text_bytes) - 1
        new_begin = text_end + 1
        new_end = new_begin + n_data - 1  # zero events: end = begin - 1, an empty segment
        if (new_begin, new_end) == (begin, end):
            break
        begin, end = new_begin, new_end
    h_data = (begin, end) if end <= _HEADER_LIMIT else (0, 0)
    if text_end > _HEADER_LIMIT:
        raise FCSKeywordError("TEXT segment longer than 99,999,999 bytes cannot be written", file=path)
    header = "FCS3.1    " + "".join(f"{v:>8d}" for v in (text_start, text_end, *h_data, 0, 0))
    return header.encode("ascii"), text_bytes


def _format_number(value: float) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
