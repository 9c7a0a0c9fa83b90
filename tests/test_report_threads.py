"""The report builds its figures with BLAS on one thread (cytopipe/report/build.py): its products
are small, where a second BLAS thread only contends with the gate gallery's helper process."""

from __future__ import annotations

import functools

import pytest

from cytopipe.report import figures as F
from cytopipe.report import write_report
from cytopipe.threads import pool_sizes
from tests.report_support import build_cohort_run


def test_report_figures_are_drawn_with_one_blas_thread(tmp_path, monkeypatch):
    import numpy  # noqa: F401 - its OpenBLAS pool is what the report limits

    before = pool_sizes()
    if max(before.values(), default=1) <= 1:
        pytest.skip("BLAS has one thread here already (one CPU): nothing to limit")
    run, _ = build_cohort_run(tmp_path / "small", n_patients=8)
    seen: list[dict[str, int]] = []
    real = F.dynamics_figure

    @functools.wraps(real)
    def recording(*args, **kwargs):  # the real figure, with the pools' sizes while it is made
        seen.append(pool_sizes())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "dynamics_figure", recording)
    write_report(run)
    assert seen, "the dynamics figure was not drawn"
    assert all(max(sizes.values()) == 1 for sizes in seen), seen
    assert pool_sizes() == before  # given back after the report
