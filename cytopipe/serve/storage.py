"""Uploads: streamed to disk and hashed on the way, stored content-addressed and read-only,
validated with ``cytopipe validate``'s rules, and mapped to patient / visit / arm.

An upload is written to ``DATA/tmp`` while its sha256 is computed chunk by chunk (never whole
in memory), then renamed to ``DATA/blobs/<2 hex>/<sha256>`` and made read-only. The same bytes
uploaded twice land on the same blob; an existing blob is never replaced. Content that does
not start like an FCS file (``FCS2.0``/``FCS3.x``) is refused whatever its extension, and the
bytes are not kept. A name is only ever a label: it is sanitised and never used as a path.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import hashlib
import io
import logging
import mmap
import os
import re
import shutil
import tempfile
import threading
import unicodedata
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cytopipe.errors import RequestError

logger = logging.getLogger(__name__)

_FCS_MAGIC = re.compile(rb"FCS[23]\.\d")
_KEYWORDS = ("$FIL", "$SRC", "SAMPLE_ID", "PATIENT_ID", "VISIT_WEEK", "ARM", "$DATE", "$CYT")
_KNOWN_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"PK\x03\x04": "a ZIP archive (or an Excel/Word file)",
    b"%PDF": "a PDF document",
    b"GIF8": "a GIF image",
    b"\x1f\x8b": "a gzip archive",
}


class UploadRefused(RequestError):
    """The upload cannot be accepted (too big, not FCS, disk full); ``status`` is the HTTP code."""


def sanitise_name(raw: str, default: str = "upload.fcs") -> str:
    """A display name: the last path component, no control characters (NUL included), no
    leading dots, at most 200 characters. ``../../x.fcs`` -> ``x.fcs``, ``/etc/a.fcs`` -> ``a.fcs``."""
    text = unicodedata.normalize("NFC", str(raw or ""))
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C")
    text = re.split(r"[/\\]", text)[-1].strip().lstrip(".").strip()
    text = text.replace(":", "_")
    if len(text) > 200:
        stem, dot, ext = text.rpartition(".")
        text = (stem[: 200 - len(ext) - 1] + "." + ext) if dot and len(ext) < 10 else text[:200]
    return text or default


def describe_magic(head: bytes) -> str:
    for magic, what in _KNOWN_MAGIC.items():
        if head.startswith(magic):
            return what
    if not head:
        return "an empty file"
    shown = head[:8].decode("ascii", "replace")
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return f"a file starting with {shown!r}"


class BlobStore:
    """Content-addressed, read-only file store under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def adopt(self, tmp: Path, sha256: str) -> Path:
        """Move a fully written temporary file into the store (kept as is when present)."""
        dest = self.path(sha256)
        if dest.is_file():
            tmp.unlink(missing_ok=True)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        try:
            os.link(tmp, dest)  # fails if another upload of the same bytes won the race: fine
        except FileExistsError:
            pass
        tmp.unlink(missing_ok=True)
        return dest

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="put-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self.adopt(Path(tmp), sha)
        return sha


@dataclass
class Received:
    sha256: str
    size: int
    tmp: Path | None  # None when the content was refused and not kept
    head: bytes = b""
    is_fcs: bool = False
    notes: list[str] = field(default_factory=list)
    synced: bool = False  # flushed to disk (fsync) already


BLOCK = 1 << 20  # bytes per hand-over to the hashing and writing threads (a multiple of any sector size)
SLOTS = 4  # blocks in flight per upload: the event loop fills one while the others are hashed and written


class _Buffers:
    """Page-aligned blocks (anonymous maps) kept for reuse: O_DIRECT needs aligned memory, and a
    fresh map would page-fault on every upload."""

    def __init__(self) -> None:
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()

    def take(self, n: int) -> list[mmap.mmap]:
        with self.lock:
            got = [self.free.pop() for _ in range(min(n, len(self.free)))]
        return got + [mmap.mmap(-1, BLOCK) for _ in range(n - len(got))]

    def give(self, blocks: list[mmap.mmap]) -> None:
        with self.lock:
            self.free.extend(blocks[: 4 * SLOTS - len(self.free)])


class _Hashers:
    """Single-thread executors (each runs its tasks in order: one upload's blocks at a time),
    kept for reuse: starting a thread per upload showed up in the profile of small files."""

    def __init__(self) -> None:
        self.free: list[ThreadPoolExecutor] = []
        self.lock = threading.Lock()

    def take(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.free:
                return self.free.pop()
        return ThreadPoolExecutor(1, thread_name_prefix="cytopipe-upload-hash")

    def give(self, hasher: ThreadPoolExecutor) -> None:
        with self.lock:
            if len(self.free) < 4:
                self.free.append(hasher)
                return
        hasher.shutdown(wait=False)


_BUFFERS = _Buffers()
_HASHERS = _Hashers()
_WRITERS: ThreadPoolExecutor | None = None


def _writers() -> ThreadPoolExecutor:
    global _WRITERS
    if _WRITERS is None:
        _WRITERS = ThreadPoolExecutor(4, thread_name_prefix="cytopipe-upload-write")
    return _WRITERS


def _direct(fd: int) -> bool:
    """Switch ``fd`` to direct I/O (Linux ``O_DIRECT``) where the file system allows it: the blocks
    go from our aligned memory to the disk while the next ones arrive, with no page-cache copy
    (whose cost varied 0.3-8 s/GB on the test VM) and little left for the final fsync."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get("CYTOPIPE_UPLOAD_DIRECT_IO", "1") == "0":
        return False
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | flag)
    except OSError:
        return False
    return True


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:  # a write may be partial
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:  # a file system that took O_DIRECT but refuses this write: buffered
            if exc.errno != errno.EINVAL or not _buffered(fd):
                raise
            continue
        view, offset = view[n:], offset + n


def _buffered(fd: int) -> bool:
    """Clear ``O_DIRECT`` on ``fd``; False when it was not set."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & getattr(os, "O_DIRECT", 0):
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    return True


async def receive(
    chunks: AsyncIterator[bytes],
    store: BlobStore,
    max_bytes: int,
    require_fcs: bool = True,
    sync: bool = True,
    check: Any = None,
) -> Received:
    """Stream ``chunks`` into a temporary file in the store, hashing as they arrive. Stops (and
    deletes what was written) as soon as ``max_bytes`` is exceeded; with ``require_fcs`` content
    that does not start like an FCS file is hashed but not written. With ``sync=False`` the caller
    flushes the file to disk itself (:func:`fsync_path`) before adopting it into the store.
    ``check`` (a :class:`~cytopipe.serve.streamcheck.StreamCheck`) sees every kept byte in order.

    The event loop copies the incoming chunks into 1 MiB aligned blocks (a ring of ``SLOTS``);
    each full block goes at once to two threads: the upload's own hashing thread (sha256 and the
    streamed check, in order) and a writer (``pwrite`` at the block's offset, direct I/O where
    possible). Both release the GIL, so the socket, the hash and the disk work overlap; the event
    loop waits only when every block of the ring is still in use."""
    digest = hashlib.sha256()
    size, head = 0, b""
    fd, name = tempfile.mkstemp(dir=store.tmp, prefix="up-")
    tmp = Path(name)
    direct = _direct(fd)
    keep = True
    loop = asyncio.get_running_loop()
    hasher = _HASHERS.take()  # one thread: the blocks are hashed and checked in order
    writers = _writers()
    blocks = _BUFFERS.take(SLOTS)
    busy: list[list[Future]] = [[] for _ in blocks]  # per block: the threads still using it
    cur = pos = offset = 0

    def digest_block(view: memoryview, feed: bool) -> None:
        digest.update(view)
        if feed and check is not None:
            check.feed(view)

    def write_tail(fd: int, view: memoryview, at: int) -> None:
        if direct:  # the last, partial block need not be a whole number of sectors
            _buffered(fd)
        _pwrite_all(fd, view, at)

    def submit(n: int, last: bool) -> None:
        view = memoryview(blocks[cur])[:n]
        busy[cur] = [hasher.submit(digest_block, view, keep)]
        if keep:
            busy[cur].append(writers.submit(write_tail if last else _pwrite_all, fd, view, offset))

    async def settle(slot: int) -> None:
        for f in busy[slot]:
            await asyncio.wrap_future(f, loop=loop)
        busy[slot] = []

    try:
        async for chunk in chunks:
            if not chunk:
                continue
            size += len(chunk)
            if size > max_bytes:
                raise UploadRefused(413, f"the file is larger than the limit of {_mb(max_bytes)}")
            if len(head) < 64:
                head += chunk[: 64 - len(head)]
                if require_fcs and len(head) >= 6 and not _FCS_MAGIC.match(head):
                    keep = False
            data = memoryview(chunk)
            while data:
                if pos == 0 and busy[cur]:
                    await settle(cur)
                k = min(len(data), BLOCK - pos)
                blocks[cur][pos : pos + k] = data[:k]
                pos += k
                data = data[k:]
                if pos == BLOCK:
                    submit(BLOCK, last=False)
                    cur, pos, offset = (cur + 1) % SLOTS, 0, offset + BLOCK
        if pos:
            if busy[cur]:
                await settle(cur)
            submit(pos, last=True)
        for slot in range(SLOTS):
            await settle(slot)
        if keep and sync:
            await loop.run_in_executor(None, os.fsync, fd)
    except BaseException:
        # never close the file or reuse a block under a running thread: at most SLOTS blocks of
        # hashing and writing are left, so this short wait may block the loop
        futures_wait([f for futures in busy for f in futures])
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if all(f.done() for futures in busy for f in futures):
            _BUFFERS.give(blocks)
            _HASHERS.give(hasher)
        else:
            hasher.shutdown(wait=False)
    os.close(fd)
    is_fcs = bool(_FCS_MAGIC.match(head))
    if require_fcs and not is_fcs:
        keep = False
    if not keep:
        tmp.unlink(missing_ok=True)
    return Received(digest.hexdigest(), size, tmp if keep else None, head, is_fcs)


def fsync_path(path: Path) -> None:
    """Flush a written file's data to disk (any descriptor of the file flushes its pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_disk(store: BlobStore, incoming: int, reserve: int = 256 << 20) -> None:
    free = shutil.disk_usage(store.root).free
    if incoming + reserve > free:
        raise UploadRefused(507, f"not enough free disk space for {_mb(incoming)} (free: {_mb(free)})")


def validate_blob(path: Path, name: str, sha256: str | None = None) -> dict[str, Any]:
    """``cytopipe validate``'s rules on a stored file: status ok / warning / rejected."""
    from cytopipe.validate import validate_file

    report = validate_file(path, display=name, sha256=sha256)
    info: dict[str, Any] = {"events": report.events, "channels": report.channels, "markers": report.markers,
                            "version": report.version, "datasets": report.datasets}  # fmt: skip
    if report.ok:
        info["keywords"] = _keywords(path)
    notes = report.warnings + report.notes  # a warning first: a run will fail the file
    status = "rejected" if not report.ok else ("warning" if notes else "ok")
    return {"status": status, "reason": report.error, "notes": notes, "info": info}


def _keywords(path: Path) -> dict[str, str]:
    from cytopipe.fcs import read_fcs_header

    try:
        kw = read_fcs_header(path).keywords
    except Exception:  # validated already; keywords are only a convenience for the mapping
        return {}
    return {k: str(kw[k])[:200] for k in _KEYWORDS if k in kw}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


# --- mapping: file names (and keywords, a manifest, a clinical table) -> patient / visit / arm ---
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """``{patient}_W{visit}.fcs`` -> a case-insensitive regex with named groups; fields:
    ``{patient}``, ``{visit}`` (an integer), ``{arm}``, ``{any}``."""
    fields = {"patient": r"(?P<patient>.+?)", "visit": r"(?P<visit>[+-]?\d+)", "arm": r"(?P<arm>.+?)",
              "any": r".*?"}  # fmt: skip
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        if m.group(1) not in fields:
            raise ValueError(
                f"pattern field {{{m.group(1)}}} is unknown; use {{patient}}, {{visit}}, {{arm}}"
            )
        out.append(fields[m.group(1)])
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    if "{patient}" not in pattern or "{visit}" not in pattern:
        raise ValueError("the pattern needs {patient} and {visit}, e.g. {patient}_W{visit}.fcs")
    return re.compile("".join(out), re.IGNORECASE)


def read_table_rows(data: bytes) -> list[dict[str, str]]:
    """A small CSV (manifest or clinical table) as dicts with normalised header names."""
    from cytopipe.manifest import _decode, _normalise

    text = _decode(data, Path("uploaded table"))  # the path only names the table in encoding warnings
    first = text.lstrip("\ufeff").splitlines()[0] if text.strip() else ""
    delimiter = max((",", ";", "\t"), key=first.count) if first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = [r for r in reader if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [_normalise(h) for h in rows[0]]
    return [{h: (r[i].strip() if i < len(r) else "") for i, h in enumerate(header) if h} for r in rows[1:]]


def propose_mapping(
    uploads: Iterable[Any],
    pattern: str,
    clinical: list[dict[str, str]] | None = None,
    manifest: list[dict[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """One proposal per usable upload: sample_id, patient_id, visit, arm and where each came from."""
    regex = pattern_regex(pattern)
    arms: dict[str, str] = {}
    for row in clinical or []:
        if row.get("patient_id") and row.get("arm"):
            arms.setdefault(row["patient_id"], row["arm"])
    by_file = {
        Path(r.get("file", "").replace("\\", "/")).name.lower(): r for r in manifest or [] if r.get("file")
    }
    out = []
    for up in uploads:
        kw = (up.info or {}).get("keywords", {})
        prop: dict[str, Any] = {"upload_id": up.id, "name": up.name, "sample_id": "", "patient_id": "",
                                "visit": None, "arm": "", "source": ""}  # fmt: skip
        row = by_file.get(up.name.lower())
        if row:
            prop.update(sample_id=row.get("sample_id", ""), patient_id=row.get("patient_id", ""),
                        visit=_visit(row.get("visit")), arm=row.get("arm", ""), source="manifest")  # fmt: skip
        else:
            for candidate, source in ((up.name, "file name"), (kw.get("$FIL", ""), "$FIL"),
                                      (kw.get("$SRC", ""), "$SRC")):  # fmt: skip
                m = regex.fullmatch(candidate) or (
                    regex.fullmatch(candidate + ".fcs") if source == "$SRC" else None
                )
                if m:
                    prop.update(patient_id=m.group("patient"), visit=int(m.group("visit")), source=source)
                    if "arm" in m.groupdict() and m.group("arm"):
                        prop["arm"] = m.group("arm")
                    break
            if not prop["patient_id"] and kw.get("PATIENT_ID") and _int(kw.get("VISIT_WEEK")) is not None:
                prop.update(patient_id=kw["PATIENT_ID"], visit=_int(kw["VISIT_WEEK"]), source="keywords")
            stem = up.name[:-4] if up.name.lower().endswith(".fcs") else up.name
            prop["sample_id"] = kw.get("SAMPLE_ID") or stem
        if not prop["arm"]:
            prop["arm"] = arms.get(prop["patient_id"], kw.get("ARM", ""))
        out.append(prop)
    return out


def _visit(value: Any) -> int | None:
    """A manifest's visit as a study week (W4, Week 4, Day 28, BL too: cytopipe.manifest.parse_visit);
    None when it is none (the mapping page then asks for it)."""
    from cytopipe.manifest import parse_visit

    try:
        return parse_visit(value) if value is not None and str(value).strip() else None
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    try:
        return int(float(str(value).strip()))
    except (TypeError, ValueError):
        return None
