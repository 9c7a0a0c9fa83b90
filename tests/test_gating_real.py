"""Real human and mouse data: stored GatingSet gates re-applied by cytopipe's engine.

* flowWorkspaceData ``gs_DC_auto`` (HIPC DC/Mono/NK panel, 2 samples) and ``gs_bcell_auto``
  (B-cell panel): the stored gates (decoded from the cytolib ``.pb``) applied to the stored,
  already compensated and transformed event matrices (``.h5``) reproduce every stored
  per-event membership exactly.
* CytoExploreRData activation samples: raw FCS -> the file's spillover -> logicle with the
  stored widths -> stored gates reproduce the stored counts and memberships of every node
  (polygons, rectangles, the ellipse T-cell node and the boolean "Live Cells" node).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cytopipe
from cytopipe.gating import Engine
from cytopipe.gating.gates import Dim
from tests.conftest import shared_path
from tests.support.gatingset_pb import read_gatingset_pb, read_h5_events, to_template

FWD = "flowWorkspaceData"
GS_SAMPLES = [
    ("gs_DC_auto", "DC_MONO_NK_12828001_001.fcs"),
    ("gs_DC_auto", "DC_MONO_NK_12828001_002.fcs"),
    ("gs_bcell_auto", "12828_1_Bcell_C01.fcs"),
]


@pytest.mark.parametrize(("folder", "sample"), GS_SAMPLES, ids=[s for _, s in GS_SAMPLES])
def test_gatingset_memberships_exact(folder, sample):
    extdata = shared_path(FWD, "inst", "extdata", folder)
    hierarchy = read_gatingset_pb(extdata / f"{sample}.pb")
    template = to_template(hierarchy)
    events, channels = read_h5_events(extdata / f"{sample}.h5")
    result = Engine(events, channels, template).run(medians=False)

    stored = np.load(shared_path(FWD, "_derived", "gatingset_membership", f"{sample}.membership.npz"))
    checked = 0
    for path in stored.files:
        if path == "root":
            continue
        name = path[len("root/") :]
        got, want = result.mask(name), stored[path]
        assert got.sum() == want.sum(), f"{name}: {got.sum()} events, stored {want.sum()}"
        assert np.array_equal(got, want), f"{name}: {np.sum(got != want)} events differ"
        checked += 1
    assert checked == len(stored.files) - 1 >= 20

    # boolean nodes are stored as counts only
    counts = pd.read_csv(shared_path(FWD, "_derived", "gatingset_counts", f"{sample}.counts.tsv"), sep="\t")
    for row in counts.itertuples():
        if row.path != "root":
            assert result.populations[row.path[5:]].count == int(row.flowcore_count), row.path


def test_gatingset_ellipse_and_boolean_nodes_are_covered():
    """The B-cell set exercises an ellipse gate and two boolean gates (one with NOT)."""
    hierarchy = read_gatingset_pb(
        shared_path(FWD, "inst", "extdata", "gs_bcell_auto", "12828_1_Bcell_C01.fcs.pb")
    )
    types = {n.path: n.gate.type for n in hierarchy.nodes[1:]}
    assert types["root/boundary/nonDebris/lymph"] == "ellipse"
    assert types["root/boundary/nonDebris/lymph/Live/CD19and!CD20"] == "boolean"
    assert "polygon" in set(types.values())


CX = "CytoExploreRData"
CX_SAMPLES = [
    "Activation_1",
    "Activation_2",
    "Activation_3",
    "Activation_17",
    "Activation_32",
    "Activation_33",
]


def _cytoexplorer_template(sample: str):
    hierarchy = read_gatingset_pb(
        shared_path(CX, "inst", "extdata", "Activation-GatingSet", f"{sample}.fcs.pb")
    )
    tr = pd.read_csv(
        shared_path(CX, "_derived", "gatingset_transforms", f"{sample}.fcs.transforms.tsv"),
        sep="\t",
        comment="#",
    )
    transformed = set(tr["channel"])
    template = to_template(
        hierarchy, lambda p: Dim(p, compensation="template", transform=p if p in transformed else None)
    )
    template.compensation = "file"
    for row in tr.itertuples():
        p = {k: float(v) for k, v in (kv.split("=") for kv in row.parameters.split(";"))}
        # flowCore's logicle reports decades (0..M): Gating-ML logicle scaled by M
        template.transforms[row.channel] = {
            "type": "logicle",
            **{k: p[k] for k in ("T", "W", "M", "A")},
            "scale": p["M"],
        }
    return hierarchy, template


@pytest.mark.parametrize("sample", CX_SAMPLES)
def test_cytoexplorer_raw_fcs_to_stored_counts(sample):
    hierarchy, template = _cytoexplorer_template(sample)
    fcs = cytopipe.read_fcs(shared_path(CX, "inst", "extdata", "Activation", f"{sample}.fcs"))
    assert fcs.spillover is not None
    result = Engine(fcs.events, fcs.channels, template, spillover=fcs.spillover).run(medians=False)

    counts = pd.read_csv(
        shared_path(CX, "_derived", "gatingset_counts", f"{sample}.fcs.counts.tsv"), sep="\t"
    )
    stored = np.load(shared_path(CX, "_derived", "gatingset_membership", f"{sample}.fcs.membership.npz"))
    for row in counts.itertuples():
        if row.path == "root":
            continue
        name = row.path[5:]
        assert result.populations[name].count == int(row.flowcore_count), name
        if row.path in stored.files:
            assert np.array_equal(result.mask(name), stored[row.path]), name
    kinds = {n.gate.type for n in hierarchy.nodes[1:]}
    assert {"polygon", "rectangle", "ellipse", "boolean"} <= kinds
