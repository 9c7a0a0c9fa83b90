"""The statistics step fits its per-population mixed models on the run's Dask workers (real local
cluster, two worker processes): the same table as fitted here, and a fit whose worker dies is
fitted here instead."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _with_pid(fn, item):
    return fn(item), os.getpid()


def _die_on_a_worker(fn, item):
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:  # not on a worker: fit
        return fn(item)
    os._exit(1)  # the worker process dies mid-task


def test_mixed_models_fitted_on_the_workers_give_the_same_statistics(pipeline_run, caplog):
    from cytopipe.clinical import load_clinical
    from cytopipe.pipeline import DaskExecutor, SyncExecutor
    from cytopipe.pipeline.statistics import _fits_on_workers
    from cytopipe.stats import StatsSettings, fitmemo, run_statistics

    out, _ = pipeline_run
    ps = pd.read_parquet(out / "population_stats.parquet")
    s = StatsSettings()
    clinical = load_clinical(
        REPO / "sample_data" / "clinical.csv",
        patients=ps[["patient_id", "arm"]],
        baseline_visit=s.baseline_visit,
    )
    here = run_statistics(ps, clinical, s)
    assert (here["family"] == "mixed_arm").sum() == ps["population"].nunique()
    assert _fits_on_workers(SimpleNamespace(executor=SyncExecutor())) is None  # no workers: fitted here

    ex = DaskExecutor(workers=2)
    try:
        map_fits = _fits_on_workers(SimpleNamespace(executor=ex))
        assert map_fits is not None
        pids: list[int] = []

        def recording(fn, items):
            pairs = map_fits(partial(_with_pid, fn), items)
            pids.extend(pid for _, pid in pairs)
            return [fit for fit, _ in pairs]

        fitmemo.forget()  # the fits above are kept in this process (a review's refresh reuses them)
        there = run_statistics(ps, clinical, s, map_fits=recording)
        workers = set(ex.client.run(os.getpid).values())
        assert len(pids) == ps["population"].nunique()
        assert set(pids) <= workers and os.getpid() not in pids  # every fit ran on a worker
        pd.testing.assert_frame_equal(here, there)
        assert here.equals(there)

        # a fit whose worker dies (each time dask retries it) is fitted here: the same result
        # (two such fits: one warning, then how many were fitted here, not a line per fit)
        one = partial(_die_on_a_worker, lambda item: item * 2)
        with caplog.at_level("WARNING", logger="cytopipe.pipeline.statistics"):
            assert map_fits(one, [21, 4]) == [42, 8]
        lines = [r.getMessage() for r in caplog.records if r.name == "cytopipe.pipeline.statistics"]
        assert sum("a mixed-model fit was lost with its worker" in m for m in lines) == 1, lines
        assert "2 of 2 mixed-model fits were lost with their workers and fitted here" in lines, lines
    finally:
        ex.close()
