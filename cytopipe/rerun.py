"""The rerun fast path: `cytopipe run` on a finished run folder whose inputs and outputs are
exactly as the last run left them does nothing but say so.

A full rerun reuses every per-sample result and the cached statistics and report, but still
registers every file (sha256 of every byte), starts Dask and loads the cache: tens of seconds for
the sample trial. Here, before any worker starts, a cheap fingerprint of every input is compared
with the one the last run recorded in run.json (``"rerun"``):

* each manifest file: absolute path, size and ``st_mtime_ns`` (its content hash, taken when the
  run registered it, is recorded beside them; a file whose size or time changed is not trusted);
* the bytes of the manifest, clinical table, gating template, workflow file, spillover CSV,
  blinding key and frozen clustering model;
* the workflow's settings (the worker count aside: it does not change outputs);
* the cytopipe version and its source files (size and time), Python's and the libraries' versions.

In a blinded run the manifest, clinical table, workflow and blinding key hold the arms, and a plain
SHA-256 of them could be matched by trying every arm assignment. So a blinded run records keyed
hashes of the files and settings instead (HMAC-SHA256, ``"hash"`` in the record says so), keyed
with the run folder's secret (:func:`cytopipe.store.run_secret`, in ``.cache/``, which no reader of
the run gets). Reruns compare with the same key; a lost secret only means the steps are run.

When all of that is unchanged and every output the run wrote is present with the sha256 it was
written with (and run.json is the one the run wrote), the executor is skipped entirely. Any
difference, a missing record, an unreadable output, or a last run with failed files or problems
(a failure may have been transient) falls back to the normal path, which reuses whatever its caches
allow. The fast path writes nothing into the folder (it only takes the run lock while it reads).

Kept out of the pipeline package on purpose: the pipeline calls :func:`start_fingerprint` and
:func:`reuse_finished_run` before it starts an executor and :func:`record_finished_run` after it
wrote run.json; nothing here imports the pipeline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cytopipe.config import jsonable, stable_hash

logger = logging.getLogger(__name__)

RECORD_KEY = "rerun"
RECORD_VERSION = 1
#: the ``"hash"`` of a blinded run's record: what its settings and config_files hashes are
KEYED = "hmac-sha256 (blinded run; key kept in .cache/run.secret)"
# written by the run but not outputs: the log, the lock, the cache; run.json is checked by content
_NOT_OUTPUTS = {".cache", "run.log", ".cytopipe.lock", ".review.lock", "run.json"}
_LIBRARIES = ("numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "statsmodels", "numba", "dask",
              "distributed", "duckdb", "flowkit", "flowutils", "matplotlib")  # fmt: skip


def start_fingerprint(
    wf: Any, jobs: Iterable[Mapping[str, Any]], run_dir: str | Path | None = None
) -> dict[str, Any]:
    """The inputs' fingerprint, taken before any work (so a file changed during the run is seen
    as changed next time). ``jobs``: every manifest row (samples and controls) with its ``path``.
    When the run in ``run_dir`` is blinded, its hashes are keyed with the folder's secret (made
    here when missing: call it holding the run lock)."""
    key = None
    if run_dir is not None and is_blinded(wf, run_dir):
        from cytopipe.store import run_secret

        key = run_secret(run_dir, create=True)
    return _fingerprint(wf, jobs, key)


def is_blinded(wf: Any, run_dir: str | Path) -> bool:
    """Whether the run writes a blinded folder: the workflow blinds it or it is blinded already."""
    from cytopipe.report.blinding import folder_record

    return bool((wf.report or {}).get("blinded")) or folder_record(run_dir) is not None


def _fingerprint(wf: Any, jobs: Iterable[Mapping[str, Any]], key: bytes | None) -> dict[str, Any]:
    out = {
        "version": RECORD_VERSION,
        "settings": _settings(wf, key),
        "config_files": {name: _bytes_hash(p, key) for name, p in _config_files(wf).items()},
        "files": {str(j["path"]): _stat(j["path"]) for j in jobs if j.get("path")},
        "code": _code_fingerprint(),
    }
    if key is not None:
        out["hash"] = KEYED  # an unblinded run's record keeps its shape (plain sha256)
    return out


class Reuse(NamedTuple):
    """What :func:`reuse_finished_run` found."""

    outputs: dict[str, Any] | None  # ``{samples, population_stats, info}`` when nothing changed
    why: str  # else why the steps run again ("" for a folder without a run, or when reused)


def reuse_finished_run(wf: Any, folder: Any) -> Reuse:
    """The finished run's ``{samples, population_stats, info}`` in ``folder`` when nothing
    changed since it was written (and the message printed); else no outputs (run normally) and
    why, which the caller writes to run.log (it does not exist yet here: logged now, it was lost).

    Called before the inputs are validated (that loads the template and the gating code): with
    the same bytes, settings and code, the validation the last run passed would pass again."""
    t0 = time.perf_counter()
    why = why_not_reusable(folder.path, wf)
    if why:
        return Reuse(None, why if (Path(folder.path) / "run.json").exists() else "")
    import pandas as pd

    from cytopipe.store import RunLock, read_run_info

    with RunLock(folder.path, "run"):  # not while another command writes into the folder
        why = why_not_reusable(folder.path, wf)
        if why:
            return Reuse(None, why)
        info = dict(read_run_info(folder.path))
        samples = pd.read_parquet(folder.table_path("samples"))
        stats = pd.read_parquet(folder.table_path("population_stats"))
    n = int((samples["control"].fillna("") == "").sum()) if "control" in samples else len(samples)
    info.update(seconds=round(time.perf_counter() - t0, 3), cached_samples=n, reused_everything=True)
    from cytopipe.pipeline.progress import notice

    notice(f"nothing changed: reused every output ({n} samples)")  # run.log's logger and stderr
    _warn_again(info)
    return Reuse({"samples": samples, "population_stats": stats, "info": info}, "")


def _warn_again(info: Mapping[str, Any]) -> None:
    """The warnings of the reused run that still hold: patients of the clinical table without flow
    data (recorded by its statistics step; docs/statistics.md)."""
    from cytopipe.clinical import without_flow_data_message

    for step in info.get("steps") or []:
        if step.get("step") == "statistics" and step.get("clinical_patients_without_flow_data"):
            missing = list(step["clinical_patients_without_flow_data"])
            logger.warning("clinical table: %s", without_flow_data_message(missing))


def why_not_reusable(run_dir: str | Path, wf: Any) -> str | None:
    """``None`` when the run folder's record matches the inputs of ``wf`` now and every recorded
    output is intact; otherwise the first difference found, in words (logged). The files compared
    are those the record lists: the manifest's bytes are compared too, so they are its files."""
    run_json = Path(run_dir) / "run.json"
    try:
        info = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable run.json"
    record = info.get(RECORD_KEY)
    if not isinstance(record, dict):
        return "run.json has no rerun record (an older or an unfinished run)"
    if record.get("run_json") != _info_hash(info):
        return "run.json was changed after the run (by another command)"
    if info.get("failed") or info.get("problems"):
        return "the last run had failed files or problems: they are tried again"
    recorded = record.get("inputs") or {}
    key = None
    if recorded.get("hash") == KEYED:
        from cytopipe.store import run_secret

        key = run_secret(run_dir)
        if key is None:
            return "the key of the blinded run's input hashes (.cache/run.secret) is missing"
    elif is_blinded(wf, run_dir):
        return "the blinded run's record has unkeyed input hashes (they are recorded keyed now)"
    fingerprint = _fingerprint(wf, [{"path": p} for p in recorded.get("files") or {}], key)
    for part in ("version", "hash", "settings", "code", "config_files"):
        if recorded.get(part) != fingerprint.get(part):
            return f"the {part.replace('_', ' ')} changed"
    files = recorded.get("files") or {}
    for path, now in fingerprint["files"].items():
        was = files[path]
        if now is None or was is None or now["size"] != was["size"] or now["mtime_ns"] != was["mtime_ns"]:
            return f"file {path} changed (size or modification time)"
    for rel, digest in (record.get("outputs") or {}).items():
        path = Path(run_dir) / rel
        if not path.is_file() or _file_hash(path) != digest:
            return f"output {rel} is missing or was changed"
    if not record.get("outputs"):
        return "no outputs recorded"
    return None


def record_finished_run(run_dir: str | Path, fingerprint: Mapping[str, Any] | None,
                        sha256: Mapping[str, str | None],
                        shown: Callable[[str], str] | None = None) -> None:  # fmt: skip
    """Add the rerun record to the run.json just written: the inputs' fingerprint (with each
    file's registered sha256, ``sha256``: path -> hex) and the sha256 of every output. ``shown``
    (a blinded run): each file's path as the blinded folder may show it, arm names coded (a file
    ``P003_placebo.fcs``, a folder ``placebo/``): such a file is not found by that path, so the
    next run takes the normal path (its caches), never the fast one on a file it cannot check."""
    if fingerprint is None:
        return
    from cytopipe.store import atomic_write_json

    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    info = json.loads(run_json.read_text(encoding="utf-8"))
    from cytopipe.report.blinding import run_record

    if run_record(info) is not None and fingerprint.get("hash") != KEYED:
        logger.warning("rerun: not recorded (the run folder is blinded and the input hashes are not keyed)")
        return
    inputs = dict(fingerprint)
    inputs["files"] = {
        (shown(p) if shown else p): (None if st is None else {**st, "sha256": sha256.get(p)})
        for p, st in fingerprint["files"].items()
    }
    info.pop(RECORD_KEY, None)
    outputs = {
        str(p.relative_to(run_dir)): _file_hash(p)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.relative_to(run_dir).parts[0] not in _NOT_OUTPUTS
    }
    info[RECORD_KEY] = {"inputs": inputs, "outputs": outputs, "run_json": _info_hash(info)}
    atomic_write_json(run_json, info)


#: the manifest fields a per-sample result depends on: the sample_id seeds its subsamples and names
#: its rows, the patient and batch choose the pooled gate estimates it may use. Arm and visit are
#: labels the assembly takes from the current manifest (never in a key: a hash of them could be
#: matched against the arm names of a blinded run).
KEY_FIELDS = ("sample_id", "patient_id", "batch")


def manifest_key(job: Mapping[str, Any]) -> str:
    """Part of a per-sample cache key: the manifest fields the result depends on."""
    return stable_hash({name: job.get(name) for name in KEY_FIELDS})[:8]


# --- parts of the fingerprint --------------------------------------------------------------------
def _settings(wf: Any, key: bytes | None = None) -> str:
    settings = wf.to_dict()
    settings.pop("workers", None)  # how many processes, not what they compute
    if key is None:
        return stable_hash(settings)
    text = json.dumps(jsonable(settings), sort_keys=True, separators=(",", ":"))  # as stable_hash
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def _config_files(wf: Any) -> dict[str, Path]:
    files = {"manifest": wf.manifest, "template": wf.template, "clinical": wf.clinical,
             "workflow": wf.spec_path, "compensation": (wf.compensation or {}).get("path"),
             "clustering model": (wf.clustering or {}).get("model"),
             "blind key": (wf.report or {}).get("blind_key")}  # fmt: skip
    return {name: Path(p) for name, p in files.items() if p}


def _code_fingerprint() -> dict[str, Any]:
    """The cytopipe version and its installed files (size, time), Python and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    root = Path(__file__).resolve().parent
    code = sorted(
        (str(p.relative_to(root)), st.st_size, st.st_mtime_ns)
        for p in root.rglob("*")
        if p.suffix in (".py", ".yaml", ".yml", ".json", ".html", ".css", ".js", ".csv") and (st := p.stat())
    )
    return {
        "cytopipe": ver("cytopipe"),
        "source": stable_hash(jsonable(code)),
        "python": platform.python_version(),
        "libraries": {name: ver(name) for name in _LIBRARIES},
    }


def _stat(path: str | Path) -> dict[str, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _bytes_hash(path: Path, key: bytes | None = None) -> str | None:
    try:
        return _file_hash(path, key)
    except OSError:
        return None


def _file_hash(path: Path, key: bytes | None = None) -> str:
    """sha256 of the file's bytes, or with ``key`` their HMAC-SHA256."""
    h = hashlib.sha256() if key is None else hmac.new(key, digestmod=hashlib.sha256)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _info_hash(info: Mapping[str, Any]) -> str:
    return stable_hash({k: v for k, v in info.items() if k != RECORD_KEY})
