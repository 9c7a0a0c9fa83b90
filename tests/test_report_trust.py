"""What makes a report trustworthy at a glance (issue 15): intervals within their scale, one
palette, QC counts per rule, batch tracking, empty metaclusters, formatting, tiny studies."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cytopipe.report import write_report
from tests.report_support import build_cohort_run


def _one_patient(tmp_path, visits):
    run, clinical = build_cohort_run(tmp_path / "run", n_patients=1)
    ps = pd.read_parquet(run / "population_stats.parquet")
    ps[ps["visit"].isin(visits)].to_parquet(run / "population_stats.parquet", index=False)
    info = json.loads((run / "run.json").read_text())
    path = info["workflow"]["clinical"]
    clinical[clinical["visit"].isin(visits)].to_csv(path, index=False)
    return run


@pytest.mark.parametrize("visits", [(0,), (0, 4, 12)])
def test_a_one_patient_study_gets_a_report(tmp_path, visits):
    """One patient (at baseline only, or over three visits): the report is written, and says why
    what needs more patients or visits is missing (this was `KeyError: 'arm'`)."""
    run = _one_patient(tmp_path, visits)
    html = write_report(run).read_text(encoding="utf-8")
    assert '<section id="dynamics">' in html and '<section id="clinical">' in html
    if visits == (0,):
        assert "no patient has a visit after baseline" in html
