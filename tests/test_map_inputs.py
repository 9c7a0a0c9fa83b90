"""Mapping inputs on disk (RUN_DIR/.cache/map-inputs/): compact, written in blocks, exact on load.

The gating pass writes each sample's parent events for the mapping pass. They are stored as the
linear values of the median and clustering markers plus the concordance memberships as bits; the
transformed values are recomputed on load. Checked on a simulated sample gated with the canonical
template: the loaded matrices are bit-identical to what the gating pass computes, the file holds
about 4 bytes per marker and event (not 8 + one byte per population), and writing it never holds
a whole matrix (tracemalloc peak).
"""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pandas as pd

from cytopipe.fcs import read_fcs
from cytopipe.gating import gate, load_template
from cytopipe.pipeline import mapinputs as cluster_steps  # where the map-inputs file is written and read
from cytopipe.pipeline.mapinputs import _load_map_inputs, _write_map_inputs
from cytopipe.pipeline.state import ClusterPlan
from tests.pipeline_support import TEMPLATE

MARKERS = ["CD3", "CD4", "CD8", "CD25", "CD127", "FOXP3", "CD45RA", "CXCR5", "PD-1", "CXCR3", "CCR6", "CD56"]


def test_map_inputs_round_trip_is_exact_compact_and_blockwise(sim_trial, tmp_path, monkeypatch):
    manifest = pd.read_csv(sim_trial / "manifest.csv")
    row = manifest[manifest["control"].fillna("").astype(str) == ""].iloc[0]
    template = load_template(TEMPLATE)
    sample = read_fcs(sim_trial / row["file"])
    result = gate(sample, template)
    plan = ClusterPlan(population="Live", markers=MARKERS, medians=list(template.median_markers()), settings=None,
                       transforms={}, concordance=template.descendants("Live"), inputs_dir=str(tmp_path))  # fmt: skip
    idx = result.indices("Live")
    values = result.event_values(sample)
    values.linear(MARKERS[0])  # the sample's compensated block (cached): not part of the file's cost
    n, cols = len(idx), cluster_steps._map_columns(plan)
    assert n > 2000 and len(plan.concordance) > 5

    monkeypatch.setattr(cluster_steps, "_MAP_CHUNK", 256)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    _write_map_inputs(tmp_path / "s.npy", plan, values, result, idx)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    # blocks of 256 events and the memberships (one byte per event and population) and 128 kB of fixed
    # overhead, never the matrix
    assert peak < n * len(plan.concordance) + 256 * len(cols) * 8 + (1 << 17) < n * len(cols) * 4

    size = (tmp_path / "s.npy").stat().st_size
    compact = n * (4 * len(cols) + -(-n * len(plan.concordance) // 8) / n)
    assert compact <= size <= compact + 3 * 4096  # the three .npy headers (JSON of the transforms)
    assert size < 0.6 * n * (
        4 * len(MARKERS) + 4 * len(plan.medians) + len(plan.concordance)
    )  # the old layout

    x, linear, masks = _load_map_inputs({"map_inputs": "s.npy"}, plan, SimpleNamespace(markers=MARKERS))
    expected_x = values.matrix(MARKERS, events=idx)
    assert x.dtype == np.float32 and np.array_equal(x.view(np.uint32), expected_x.view(np.uint32))
    expected_linear = values.matrix(plan.medians, events=idx, transformed=False)
    assert np.array_equal(np.ascontiguousarray(linear).view(np.uint32), expected_linear.view(np.uint32))
    assert list(masks) == plan.concordance
    for p in plan.concordance:
        assert np.array_equal(masks[p], result.mask(p)[idx])
        assert masks[p].any()


def test_map_inputs_of_the_older_layout_are_not_read(tmp_path):
    """A killed run's mapping inputs in the older layout (events x markers, no ``layout`` in the
    header) are not taken for the markers x events layout of this version: the mapping pass then
    reads and gates the file itself (None), rather than mapping transposed values."""
    import json

    plan = ClusterPlan(population="Live", markers=["CD3", "CD4"], medians=["CD3", "CD4"], settings=None,
                       transforms={}, concordance=[], inputs_dir=str(tmp_path))  # fmt: skip
    events = np.arange(12, dtype=np.float32).reshape(6, 2)  # 6 events x 2 markers
    with open(tmp_path / "old.npy", "wb") as fh:
        np.save(fh, np.array(json.dumps({"columns": ["CD3", "CD4"], "specs": [None, None]})))
        np.save(fh, events)
        np.save(fh, np.zeros((0, 1), dtype=np.uint8))
    assert _load_map_inputs({"map_inputs": "old.npy"}, plan, SimpleNamespace(markers=plan.markers)) is None
