"""A run's state and its prepared samples, memoised in this process for the re-gating of reviewed
samples (:mod:`cytopipe.review.regate`) and the numbers of their gates (:mod:`cytopipe.review.overrides`):
:func:`loaded_run` while run.json is unchanged, and the last :data:`PREPARED_KEEP` samples after
event QC (e.g. kept from the live preview to the save)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cytopipe.errors import ReviewError

PREPARED_KEEP = 4  # prepared samples kept in memory per process (one sample: its event matrix)
_lock = threading.Lock()
_runs: OrderedDict[tuple[str, int], Any] = OrderedDict()
_prepared: OrderedDict[tuple[str, str], Any] = OrderedDict()


def loaded_run(run_dir: str | Path) -> Any:
    """:func:`cytopipe.pipeline.load_run`, memoised while run.json is unchanged."""
    from cytopipe.pipeline import load_run

    run_dir = Path(run_dir).resolve()
    key = (str(run_dir), (run_dir / "run.json").stat().st_mtime_ns)
    with _lock:
        hit = _runs.get(key)
    if hit is None:
        hit = load_run(run_dir)
        with _lock:
            _runs[key] = hit
            while len(_runs) > 4:
                _runs.popitem(last=False)
    return hit


def sample_job(lr: Any, sample_id: str) -> dict[str, Any]:
    """The run's job (file, metadata) of one processed sample; a failed sample has none."""
    for job in lr.jobs:
        if job["sample_id"] == sample_id:
            return job
    raise ReviewError(
        "no such processed sample in this run (failed samples have no gates to review)",
        sample=sample_id,
        file=lr.folder.path,
    )


def prepared(lr: Any, sample_id: str) -> Any:
    """The sample after event QC (kept in memory for the next call), or prepared again."""
    from cytopipe.pipeline import prepare_sample

    key = (str(lr.folder.path), sample_id)
    with _lock:
        hit = _prepared.get(key)
        if hit is not None:
            _prepared.move_to_end(key)
            return hit
    prep = prepare_sample(sample_job(lr, sample_id), lr.state)
    with _lock:
        _prepared[key] = prep
        while len(_prepared) > PREPARED_KEEP:
            _prepared.popitem(last=False)
    return prep


def forget(run_dir: str | Path | None = None) -> None:
    """Drop memoised runs and prepared samples (all, or one run folder's)."""
    with _lock:
        for cache in (_runs, _prepared):
            for k in list(cache):
                if run_dir is None or k[0] == str(Path(run_dir).resolve()):
                    del cache[k]
