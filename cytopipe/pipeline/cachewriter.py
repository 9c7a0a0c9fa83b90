"""Per-sample cache entries written off the main thread.

A cache entry (``RUN_DIR/.cache/<phase>/<key>.json`` plus its parts ``<key>.<name>.arrow|npy``)
costs 4-5 fsynced files; written by the main thread while it collects the workers' results, the
fsyncs held up the collection, and the entries of results that were already at hand (a fused pass's
results standing for the next pass) kept the workers idle for seconds. :class:`CacheWriter` encodes
an entry at once in the calling thread (so later changes to the result cannot reach the cache) and
writes the bytes in one background thread, in submission order; every file is still written
atomically and fsynced, and the JSON (written last) still marks the entry complete, so a killed run
resumes exactly as before. An entry whose parts are already on disk in another phase's entry (the
fused pass's) is hard-linked instead of written again. :meth:`CacheWriter.close` waits for every
entry and raises the first write error (disk full: exit 4).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.arrowfiles import ARROW, arrow_bytes, arrow_rows
from cytopipe.errors import OutputWriteError
from cytopipe.files import _MODE, TMP_SUFFIX, _fsync_dir, _remove_temp, atomic_write_bytes, check_rows
from cytopipe.store import RunFolder, _json_default

logger = logging.getLogger(__name__)

SKIPPED = ("pid", "seconds")  # per-execution details, not part of a cached result


def encode_result(res: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str, bytes, int]]]:
    """The entry's JSON meta and its parts as (name, ext, bytes, rows) - exactly what
    ``_save_result`` writes (tables as Arrow IPC files, arrays as .npy, the rest in the JSON)."""
    meta: dict[str, Any] = {"_parts": {}}
    parts = []
    for name, value in res.items():
        if name in SKIPPED:
            continue
        if isinstance(value, pd.DataFrame):
            parts.append((name, ARROW, arrow_bytes(value), len(value)))
            meta["_parts"][name] = ARROW
        elif isinstance(value, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
            parts.append((name, "npy", buf.getvalue(), -1))
            meta["_parts"][name] = "npy"
        else:
            meta[name] = value
    return meta, parts


def _meta_bytes(meta: Mapping[str, Any]) -> bytes:
    import json

    text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
    return (text + "\n").encode("utf-8")


def write_encoded(folder: RunFolder, phase: str, key: str, meta: Mapping[str, Any], parts: list) -> None:
    """Write an encoded entry: the parts, then the JSON (its presence marks the entry complete).

    The parts go to temporary files, each fsynced once and verified (a Parquet part's row count
    read back, another part's size), then renamed, and the folder fsynced once for all of them
    before the JSON is written (atomically, fsynced): as durable as a write of each part on its
    own, with one folder fsync per entry instead of one per file (4-5 per entry)."""
    written: list[tuple[Path, Path]] = []
    try:
        for name, ext, data, rows in parts:
            path = folder.cached(phase, f"{key}.{name}", ext)
            written.append((_write_temp(path, data), path))
            _verify(written[-1][0], path, data, rows if ext == ARROW else None)
        for tmp, path in written:
            os.replace(tmp, path)
    except OSError as exc:
        for tmp, _ in written:
            _remove_temp(tmp)
        raise OutputWriteError.from_oserror(written[-1][1] if written else folder.path, exc) from None
    except BaseException:
        for tmp, _ in written:
            _remove_temp(tmp)
        raise
    if written:
        _fsync_dir(written[0][1].parent)
    atomic_write_bytes(folder.cached(phase, key, "json"), _meta_bytes(meta))


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a temporary file beside ``path`` (the name :func:`is_temp_name` knows),
    fsynced; its permissions those of an output file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _MODE)
    except BaseException:
        _remove_temp(tmp)
        raise
    return tmp


def _verify(tmp: Path, path: Path, data: bytes, rows: int | None) -> None:
    """The written file is complete: its size, and a table's row count read back."""
    size = tmp.stat().st_size
    if size != len(data):
        raise OutputWriteError(f"the written file has {size} of {len(data)} bytes (disk full?)", file=path)
    if rows is not None:
        check_rows(tmp, path, rows, arrow_rows)


def link_parts(
    folder: RunFolder, phase: str, key: str, source: tuple[str, str], parts: Mapping[str, str]
) -> bool:
    """Hard-link the parts of ``source`` = (phase, key) as the parts of (phase, key); False when a
    part is missing or the file system cannot link (then the entry is written in full)."""
    src_phase, src_key = source
    done = []
    try:
        for name, ext in parts.items():
            src = folder.cached(src_phase, f"{src_key}.{name}", ext)
            dst = folder.cached(phase, f"{key}.{name}", ext)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.link.tmp")  # a temporary name (is_temp_name)
            if tmp.exists():
                tmp.unlink()
            os.link(src, tmp)
            os.replace(tmp, dst)
            done.append(dst)
    except OSError as exc:
        logger.debug("cache entry %s/%s: parts not linked (%s); writing them", phase, key, exc)
        return False
    if done:
        from cytopipe.files import _fsync_dir

        _fsync_dir(done[0].parent)
    return True


class CacheWriter:
    """One background thread writing cache entries in submission order (see the module doc)."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        # SimpleQueue: its put() is one C call, so a Ctrl-C (KeyboardInterrupt, raised between
        # bytecodes of the main thread) cannot land inside it. queue.Queue's Python put() could be
        # interrupted inside Condition.notify, leaving a stale waiter behind: the writer thread then
        # missed the close() sentinel's wake-up and the interrupted run hung in close() for ever.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._raised = False
        self._thread = threading.Thread(target=self._loop, name="cytopipe-cache-writer", daemon=True)
        self._thread.start()

    def save(
        self, phase: str, key: str, res: Mapping[str, Any], source: tuple[str, str] | None = None
    ) -> None:
        """Queue the entry ``res`` of (phase, key). ``source`` = (phase, key) of an entry (saved
        earlier through this writer or found in the cache) whose parts are the same objects:
        linked instead of written."""
        self._raise()
        if source is not None:
            meta: dict[str, Any] = {"_parts": {}}
            for name, value in res.items():
                if name in SKIPPED:
                    continue
                if isinstance(value, pd.DataFrame):
                    meta["_parts"][name] = ARROW
                elif isinstance(value, np.ndarray):
                    meta["_parts"][name] = "npy"
                else:
                    meta[name] = value
            self._queue.put((phase, key, meta, None, source, res))
            return
        meta, parts = encode_result(res)
        self._queue.put((phase, key, meta, parts, None, None))

    def call(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn()`` (a write of a finished table) after the entries queued so far; its
        error is raised like a write error (by :meth:`flush` / :meth:`close`)."""
        self._raise()
        self._queue.put(fn)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if isinstance(item, threading.Event):  # flush(): everything before it is written
                    item.set()
                    continue
                if self._error is not None:  # after a failure: drain without writing
                    continue
                if callable(item):
                    item()
                    continue
                phase, key, meta, parts, source, res = item
                if parts is None:
                    if link_parts(self.folder, phase, key, source, meta["_parts"]):
                        atomic_write_bytes(self.folder.cached(phase, key, "json"), _meta_bytes(meta))
                        continue
                    meta, parts = encode_result(res)
                write_encoded(self.folder, phase, key, meta, parts)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by close()
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True  # once: the run stops with it
            raise self._error

    def flush(self) -> None:
        """Wait until every queued entry is written; raise the first write error."""
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait()
        self._raise()

    def close(self) -> None:
        """Write what is queued, stop the thread; raise the first write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()
