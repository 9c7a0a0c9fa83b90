"""The run folder: final tables, the DuckDB catalog, run.json and the resumable cache.

Layout (docs/pipeline.md, "The run folder")::

    RUN_DIR/
      population_stats.parquet   one row per sample and population
      samples.parquet            one row per input file: sha256, status, error, QC metrics, flags
      gate_review.parquet        per sample x gate: a small histogram and the gate, for the report
      clusters.parquet           (clustering) one row per sample and metacluster
      statistics.parquet         (statistics) one row per test
      report.html, report_tables/  the report and its tables as CSV
      run.json                   versions, hashes, seeds, settings, steps, timings and problems
      catalog.duckdb             the tables (not gate_review) and run info, queryable with SQL
      study/                     study-level results (spillover, locked transforms, pooled gates)
      clustering/                the frozen FlowSOM model and the clustering tables of the report
      .cache/                    per-sample results keyed by content + settings hash (resume),
                                 and run.secret (the key of a blinded run's input hashes)

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
run killed at any moment leaves either the old or the new version of a file, never half of one.
Final tables are assembled from the per-sample cache in a fixed order, so a resumed run writes
exactly the tables an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.arrowfiles import ARROW, atomic_write_arrow, read_arrow
from cytopipe.errors import OutputWriteError, RunLockedError, StoreError
from cytopipe.files import (  # noqa: F401 - re-exported: the run folder's writers
    _MODE,
    TMP_SUFFIX,
    _unlink_quietly,
    atomic_write,
    atomic_write_bytes,
    check_rows,
    is_temp_name,
    open_regular,
)

TABLES = ("population_stats", "samples", "clusters", "statistics")  # in catalog.duckdb when present


CATALOG = "catalog.duckdb"
RUN_JSON = "run.json"
CLUSTER_DIR = "clustering"  # the frozen FlowSOM model and the clustering tables
MODEL_FILE = "model.npz"
#: files of RUN_DIR/clustering/ (besides the model) and what they hold
CLUSTER_FILES = {
    "nodes": "nodes.parquet",  # node, metacluster, grid position, cells mapped, training cells
    "metaclusters": "metaclusters.parquet",  # metacluster, cells, % of clustered cells, training medians
    "concordance": "concordance.parquet",  # population x metacluster: counts, precision, recall, F1
    "concordance_summary": "concordance_summary.parquet",  # per population: best match, best union
    "umap": "umap.parquet",  # sample_id, x, y, metacluster, population (a seeded subsample)
}


# --- atomic writes ------------------------------------------------------------------------------
def atomic_write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_write_parquet(path: str | Path, df: pd.DataFrame) -> Path:
    """Parquet, verified by reading the written file's row count back."""
    buf = io.BytesIO()
    df.reset_index(drop=True).to_parquet(buf, engine="pyarrow", index=False)
    return atomic_write_parquet_bytes(path, buf.getvalue(), len(df))


def atomic_write_parquet_bytes(path: str | Path, data: bytes, rows: int) -> Path:
    """A Parquet file already encoded (``data``, a table of ``rows`` rows), written atomically and
    verified by reading its row count back."""
    import pyarrow.parquet as pq

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    def verify(tmp: Path) -> None:
        check_rows(tmp, path, rows, lambda t: pq.ParquetFile(t).metadata.num_rows)

    return atomic_write(path, write, verify)


def atomic_write_npy(path: str | Path, array: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def remove_orphan_temps(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete temporary files an interrupted write (kill, full disk) left under ``folder``; returns
    them. Call it only while holding the run lock: another writer's temporary files would go."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*") if recursive else folder.glob(".*")
    removed = []
    for entry in found:
        if is_temp_name(entry.name) and entry.is_file() and not entry.is_symlink():
            _unlink_quietly(entry)
            removed.append(entry)
    return sorted(removed)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content, hex. Read into one reused buffer: a fresh multi-MB ``bytes``
    per read is a fresh mapping each time (page faults and zeroing: ~25 % more CPU)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open_regular(path) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


#: the run folder's secret, ``RUN_DIR/.cache/run.secret``: 32 random bytes (hex), readable by its
#: owner only. It keys what a blinded run records of the files that hold arms (cytopipe/rerun.py)
#: and seeds its arm codes, so that nobody can work the arms out by trying assignments against a
#: hash. Never an output: ``.cache`` is not served, listed, exported or copied with a run.
RUN_SECRET = "run.secret"


def run_secret(run_dir: str | Path, create: bool = False) -> bytes | None:
    """The run folder's secret; ``None`` when it has none (or an unreadable one) and not ``create``.
    With ``create``, a missing secret is made (written atomically, mode 0600)."""
    path = Path(run_dir) / ".cache" / RUN_SECRET
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
        if len(key) >= 16:
            return key
    except (OSError, ValueError):
        pass
    if not create:
        return None
    import secrets

    key = secrets.token_bytes(32)
    atomic_write_bytes(path, key.hex().encode("ascii") + b"\n", mode=0o600)
    return key


# --- the run folder -----------------------------------------------------------------------------
class RunFolder:
    """Paths and cached results of one run folder: the one place that knows its layout. The
    report, review and export read a run through it (and :func:`read_table`,
    :func:`read_run_info`), never through the orchestrator (:mod:`cytopipe.pipeline`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    # layout
    @property
    def cache(self) -> Path:
        return self.path / ".cache"

    @property
    def study(self) -> Path:
        return self.path / "study"

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def catalog(self) -> Path:
        return self.path / CATALOG

    def table_path(self, name: str) -> Path:
        return self.path / f"{name}.parquet"

    @property
    def clustering(self) -> Path:
        return self.path / CLUSTER_DIR

    @property
    def model_path(self) -> Path:
        """The run's frozen FlowSOM model."""
        return self.clustering / MODEL_FILE

    def cluster_table_path(self, name: str) -> Path:
        """``name`` is a key of :data:`CLUSTER_FILES` (nodes, metaclusters, concordance, ...)."""
        return self.clustering / CLUSTER_FILES[name]

    # loaders of a finished run (read-only)
    def info(self) -> dict[str, Any]:
        """run.json (:func:`read_run_info`)."""
        return read_run_info(self.path)

    def table(self, name: str) -> pd.DataFrame:
        """A table of the run (:func:`read_table`): population_stats, samples, clusters, statistics."""
        return read_table(self.path, name)

    def cluster_table(self, name: str) -> pd.DataFrame | None:
        """A table of ``clustering/`` (a key of :data:`CLUSTER_FILES`), None when the run has none."""
        path = self.cluster_table_path(name)
        return pd.read_parquet(path) if path.is_file() else None

    def create(self) -> RunFolder:
        """Create the run folder (and its ``.cache``/``study``); refuse a file or a folder that
        holds someone else's files (:func:`check_output_folder`)."""
        check_output_folder(self.path)
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            self.study.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # read-only, no permission, disk full: exit 4, fix and rerun
            raise OutputWriteError.from_oserror(Path(exc.filename or self.path), exc) from None
        return self

    # cache of per-sample / per-phase results: .cache/<phase>/<key>.<ext>
    def cached(self, phase: str, key: str, ext: str) -> Path:
        return self.cache / phase / f"{key}.{ext}"

    def load_cached(self, phase: str, key: str, ext: str) -> Any | None:
        """The cached result, or None when absent or unreadable (then it is recomputed)."""
        path = self.cached(phase, key, ext)
        if not path.is_file():
            return None
        try:
            if ext == "json":
                return json.loads(path.read_text(encoding="utf-8"))
            if ext == ARROW:
                return read_arrow(path)
            if ext == "parquet":  # a cache entry of an earlier version, or the statistics table
                return pd.read_parquet(path)
            if ext == "npy":
                return np.load(path, allow_pickle=False)
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return None
        raise StoreError(f"unknown cache format {ext!r}", key=phase)

    def save_cached(self, phase: str, key: str, ext: str, value: Any) -> Path:
        path = self.cached(phase, key, ext)
        if ext == "json":
            return atomic_write_json(path, value)
        if ext == ARROW:
            return atomic_write_arrow(path, value)
        if ext == "parquet":
            return atomic_write_parquet(path, value)
        if ext == "npy":
            return atomic_write_npy(path, value)
        raise StoreError(f"unknown cache format {ext!r}", key=phase)

    def prune_cache(self, phase: str, keep: Iterable[str]) -> int:
        """Remove cache entries of ``phase`` whose key is not in ``keep``; returns how many."""
        folder = self.cache / phase
        if not folder.is_dir():
            return 0
        keep = set(keep)
        removed = 0
        for entry in folder.iterdir():
            # entries are <key>.json plus parts <key>.<name>.arrow|parquet|npy
            if entry.name.startswith(".") or entry.name.split(".")[0] not in keep:
                _unlink_quietly(entry)
                removed += 1
        return removed

    # final outputs
    def write_outputs(
        self,
        tables: Mapping[str, pd.DataFrame],
        run_info: Mapping[str, Any],
        parquet: Iterable[str] | None = None,
    ) -> None:
        """Write every table as Parquet (only those named in ``parquet``, when given: the others are
        on disk already), the DuckDB catalog, then run.json (last: it marks completion)."""
        names = set(tables) if parquet is None else set(parquet)
        for name, df in tables.items():
            if name in names:
                atomic_write_parquet(self.table_path(name), df)
        write_catalog(self.catalog, tables, run_info)
        atomic_write_json(self.run_json, dict(run_info))


def write_catalog(path: str | Path, tables: Mapping[str, pd.DataFrame], run_info: Mapping[str, Any]) -> Path:
    """A DuckDB database holding ``tables`` and a one-row-per-key ``run`` table (run.json as JSON).

    DuckDB can fail to save without raising (a full disk during its final checkpoint leaves an
    empty database and the data in a ``.wal``), so the new database is re-opened read-only and
    every table's row count checked before it replaces the old catalog."""
    import duckdb

    path = Path(path)
    info = json.loads(json.dumps(dict(run_info), sort_keys=True, default=_json_default))
    run_rows = [(k, json.dumps(v, default=_json_default)) for k, v in sorted(info.items())]
    expected = {name: len(df) for name, df in tables.items()}
    expected["run"] = len(run_rows)

    def write(tmp: Path) -> None:
        tmp.unlink()  # duckdb creates the file itself
        try:
            con = duckdb.connect(str(tmp))
            try:
                for name, df in tables.items():
                    con.register("_frame", df.reset_index(drop=True))
                    con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _frame')
                    con.unregister("_frame")
                con.execute("CREATE TABLE run (key VARCHAR, value JSON)")
                con.executemany("INSERT INTO run VALUES (?, ?)", run_rows)
                con.execute("CHECKPOINT")
            finally:
                con.close()
        except duckdb.Error as exc:
            raise _duckdb_failure(path, exc) from None

    def verify(tmp: Path) -> None:
        wal = Path(str(tmp) + ".wal")
        if wal.exists():
            raise OutputWriteError(
                "DuckDB could not save the catalog (its changes stayed in the write-ahead log; disk full?)",
                file=path,
            )
        try:
            con = duckdb.connect(str(tmp), read_only=True)
            try:
                got = {n: con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in expected}
            finally:
                con.close()
        except duckdb.Error as exc:
            raise _duckdb_failure(path, exc) from None
        short = {n: (got[n], want) for n, want in expected.items() if got[n] != want}
        if short:
            detail = ", ".join(f"{n}: {g} of {w} rows" for n, (g, w) in sorted(short.items()))
            raise OutputWriteError(f"the written catalog is incomplete ({detail})", file=path)

    return atomic_write(path, write, verify)


def _duckdb_failure(path: Path, exc: Exception) -> OutputWriteError:
    text = str(exc)
    for reason in (
        "No space left on device",
        "Read-only file system",
        "Permission denied",
        "Disk quota exceeded",
    ):
        if reason.lower() in text.lower():
            return OutputWriteError.for_reason(path, reason)
    return OutputWriteError(f"DuckDB could not write the catalog: {text.splitlines()[0]}", file=path)


# --- the run-folder lock -------------------------------------------------------------------------
LOCK = ".cytopipe.lock"

# --- output folders -----------------------------------------------------------------------------
#: what cytopipe commands write into an output folder (run, gate, reconcile, the workspace): a
#: folder holding nothing else is an earlier output of cytopipe (e.g. of `cytopipe gate`), which a
#: command may write into again
OUTPUT_NAMES = frozenset(
    {
        *(f"{name}.parquet" for name in (*TABLES, "gate_review", "gate_flags", "gate_fits", "reconcile")),
        RUN_JSON, CATALOG, CLUSTER_DIR, LOCK, "run.log", ".cache", "study", "report.html", "report_tables",
        "gatingml", "gates.wsp", "reconcile.csv", "reconcile.html", "review.json", "exports",
    }
)  # fmt: skip


#: the files cytopipe writes into ``RUN_DIR/study/`` (pipeline/steps.py), besides the per-batch
#: spillover matrices ``spillover_<column>_<value>.csv``
STUDY_FILES = frozenset(
    {"spillover.csv", "spillover_quality.parquet", "transforms.json", "gate_fits.parquet", "pooled_gates.parquet"}
)  # fmt: skip


def is_run_output(rel: str | Path) -> bool:
    """Whether ``rel`` (a path inside a run folder) is a file cytopipe writes there, by its exact
    place and name: a top-level :data:`OUTPUT_NAMES` file, a :data:`CLUSTER_FILES` table or the
    model in ``clustering/``, a :data:`STUDY_FILES` file (or a per-batch spillover matrix) in
    ``study/``. Anything else (a user's notes, an export, a copy of the clinical table) is not."""
    parts = Path(rel).parts
    if len(parts) == 1:
        return parts[0] in OUTPUT_NAMES
    if len(parts) != 2:
        return False
    folder, name = parts
    if folder == CLUSTER_DIR:
        return name in CLUSTER_FILES.values() or name == MODEL_FILE
    return folder == "study" and (
        name in STUDY_FILES or (name.startswith("spillover_") and name.endswith(".csv"))
    )


def check_output_folder(path: str | Path) -> Path:
    """Before a command writes into ``path`` (its ``--out``): a new folder, an empty one, a cytopipe
    run folder (``run.json`` or the run lock: a finished or an interrupted run, which resumes) or a
    folder holding only what cytopipe writes (:data:`OUTPUT_NAMES`). Anything else raises a
    :class:`StoreError` (exit 2, nothing done): a file, or a folder with someone else's files,
    which the command's outputs could replace. Returns ``path``."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise StoreError(
            "exists and is not a folder; choose another --out (a new or an empty folder)", file=path
        )
    if not path.is_dir():
        return path
    try:
        names = [entry.name for entry in path.iterdir()]
    except OSError as exc:  # a folder we may not list (no permission): exit 4, fix and rerun
        raise OutputWriteError.from_oserror(path, exc) from None
    if RUN_JSON in names or LOCK in names:
        return path
    foreign = sorted(n for n in names if n not in OUTPUT_NAMES and not is_temp_name(n))
    if foreign:
        listed = foreign + sorted(set(names) - set(foreign))
        shown = ", ".join(listed[:4]) + (f" and {len(listed) - 4} more" if len(listed) > 4 else "")
        raise StoreError(
            f"the folder is not empty and is not a cytopipe run folder (it holds {shown}); cytopipe "
            "would replace files in it. Choose a new or an empty folder for --out",
            file=path,
        )
    return path


class RunLock:
    """An exclusive lock on a run folder, so two runs never write one folder at once.

    ``flock`` on ``RUN_DIR/.cytopipe.lock`` (released by the kernel when the holder exits, even on
    ``kill -9``); the file records the holder's pid, host, command and start time, so a refused
    run can say who holds the folder. A lock file left by a process that no longer runs on this
    host is stale: it is taken over (and said so in run.log). The file is emptied, not deleted,
    on release (deleting a locked file lets two processes lock two different files)."""

    def __init__(self, folder: str | Path, command: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.command = command
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None  # the previous holder, when its lock was stale

    def acquire(self) -> RunLock:
        import fcntl
        import socket
        import time

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _MODE)
        except OSError as exc:
            raise OutputWriteError.from_oserror(self.path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"this run folder is in use by another cytopipe command ({_describe(holder)}); wait "
                "for it to finish (or stop it), then run again: finished work is reused",
                file=self.folder,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise OutputWriteError.from_oserror(self.path, exc) from None
        holder = _read_holder(fd)
        host = socket.gethostname()
        if holder.get("pid") and holder.get("host") == host and holder["pid"] != os.getpid():
            if _pid_alive(int(holder["pid"])):  # a lock file flock did not protect (e.g. an old NFS)
                os.close(fd)
                raise RunLockedError(
                    f"this run folder is in use by another cytopipe command ({_describe(holder)}); "
                    "wait for it to finish (or stop it), then run again",
                    file=self.folder,
                )
            self.stale = holder
        elif holder.get("pid") and holder.get("host") != host:
            self.stale = holder  # flock (NFSv4 locks across hosts) says its holder is gone
        info = {
            "pid": os.getpid(),
            "host": host,
            "command": self.command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise OutputWriteError.from_oserror(self.path, exc) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no holder: a later reader sees a free folder
        except OSError:
            pass
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return (
        f"`cytopipe {holder.get('command', '?')}`, pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a killed process its parent has not reaped yet (a zombie) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --- reading a run ------------------------------------------------------------------------------
def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """run.json of a finished run; a clear StoreError when the folder is not a finished run."""
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise StoreError("run folder not found; give the --out folder of `cytopipe run`", file=folder.path)
    if not folder.run_json.is_file():
        raise StoreError(
            "no run.json: this folder is not a finished cytopipe run (run `cytopipe run` to completion)",
            file=folder.path,
        )
    try:
        return json.loads(folder.run_json.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"run.json is damaged ({exc}); rerun `cytopipe run`", file=folder.run_json) from None


def read_table(run_dir: str | Path, name: str) -> pd.DataFrame:
    """One table (``population_stats``, ``samples``, ...) of a finished run."""
    folder = RunFolder(run_dir)
    path = folder.table_path(name)
    if not path.is_file():
        raise StoreError(
            f"table {name!r} not found in the run folder (expected {path.name})", file=folder.path
        )
    return pd.read_parquet(path)


def query(run_dir: str | Path, sql: str) -> pd.DataFrame:
    """Run SQL on a run's catalog.duckdb (read-only), e.g.
    ``query(run, "select * from population_stats where population = 'Treg'")``."""
    import duckdb

    folder = RunFolder(run_dir)
    if not folder.catalog.is_file():
        raise StoreError("no catalog.duckdb in the run folder", file=folder.path)
    con = duckdb.connect(str(folder.catalog), read_only=True)
    try:
        return con.execute(sql).df()
    finally:
        con.close()
