"""The report's per-patient lines (dynamics figures) and per-batch median bars (Levey-Jennings
chart) are built without a data frame per group; they must be exactly the segments the
per-group construction gave, in the same order (the figures' PNGs were compared byte for byte
on the 150- and 3,501-file trials when the change was made)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cytopipe.report.batches import _batch_bars
from cytopipe.report.figures import _patient_lines


def _study(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in rng.permutation(40):
        for v in rng.choice([0, 4, 12, 24], size=int(rng.integers(1, 5)), replace=False):
            rows.append({"patient_id": f"P{p:03d}", "visit": int(v), "pct_parent": float(rng.uniform(0, 100)),
                         "order": len(rows), "batch": f"B{int(rng.integers(0, 9))}" if rng.random() > 0.1 else None})  # fmt: skip
    df = pd.DataFrame(rows)
    df.loc[df.index[:2], "patient_id"] = None  # a row without a patient is in no line (groupby drops it)
    return df


def test_patient_lines_are_the_groupby_segments():
    for seed in range(5):
        d = _study(seed).sort_values(["patient_id", "visit"])
        want = [
            g[["visit", "pct_parent"]].to_numpy(float) + (0.3, 0.0)
            for _, g in d.groupby("patient_id", sort=False)
        ]
        got = _patient_lines(d, 0.3)
        assert len(got) == len(want) == d["patient_id"].nunique()
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert _patient_lines(_study(0).iloc[:0], 0.0) == []


def test_batch_bars_are_the_per_batch_medians_in_first_seen_order():
    for seed in range(5):
        d = _study(seed).sample(frac=1.0, random_state=seed)  # batches interleaved, unsorted
        want = []
        for _, g in d[d["batch"].notna()].groupby("batch", sort=False):
            if len(g) > 1:
                want.append([(g["order"].min() - 0.3, g["pct_parent"].median()),
                             (g["order"].max() + 0.3, g["pct_parent"].median())])  # fmt: skip
        got = _batch_bars(d)
        assert got == want and len(got) >= 5
