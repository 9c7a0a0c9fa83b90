"""flowWorkspaceData gs_DC_auto (real HIPC DC/Mono/NK data): the four CD16 x CD56 NK nodes gated
by landmark-relative gates (``auto`` thresholds on both axes, cytopipe/gating/landmarks.py) against
the counts stored with each sample (openCyto's own data-driven gates).

The parent chain down to ``CD14-Lineage-`` (scatter boundary, FSC range, viability, CD14- and
Lineage-) is taken from each sample's stored gates, so that only the NK gates are compared.
"""

from __future__ import annotations

import pandas as pd
import pytest

from cytopipe.gating import Engine, load_template
from cytopipe.gating.template import Population, Template
from tests.conftest import shared_path

CHAIN = "boundary/Monocytes/Live/CD14-Lineage-"
NK = {"CD16+CD56+": "++", "CD16-CD56+": "-+", "CD16+CD56-": "+-", "CD16-CD56-": "--"}
SAMPLE = "DC_MONO_NK_12828001_{}.fcs"


def nk_template(stored: Template) -> Template:
    """The stored parent chain, then one landmark-relative quadrant per NK node."""
    spec = {
        "name": "gs_DC_auto NK (landmark-relative)",
        "compensation": "none",
        "populations": [{"name": "parent", "parent": "root", "markers": ["FSC-A"], "gate": {"type": "range", "min": -1e30}}]
        + [
            {"name": node, "parent": "parent", "markers": ["CD16", "CD56"],
             "gate": {"type": "quadrant", "quadrant": signs, "thresholds": [{"type": "auto"}, {"type": "auto"}]}}
            for node, signs in NK.items()
        ],
    }  # fmt: skip
    landmark = load_template(spec)
    chain = ["boundary", "boundary/Monocytes", "boundary/Monocytes/Live", CHAIN]
    pops = {name: stored.populations[name] for name in chain}
    for node in NK:
        pops[node] = Population(node, CHAIN, landmark[node].gate)
    return Template(name=spec["name"], populations=pops, compensation="none")


@pytest.mark.xfail(
    strict=True,
    reason="the CD16 density of CD14-Lineage- cells is flat between ~1500 and ~2000 (no valley): the "
    "landmark threshold lands at 1733/1753, openCyto's at 1901/1959, so CD16+CD56+ and CD16-CD56+ are "
    "3.3-4.8 pp off; CD16+CD56- and CD16-CD56- are within 0.6 pp",
)
@pytest.mark.parametrize("sample", ["001", "002"])
def test_gs_dc_auto_nk_nodes_with_landmark_gates(sample):
    from tests.support.gatingset_pb import read_gatingset_pb, read_h5_events, to_template

    extdata = shared_path("flowWorkspaceData", "inst", "extdata", "gs_DC_auto")
    name = SAMPLE.format(sample)
    stored = to_template(read_gatingset_pb(extdata / f"{name}.pb"))
    events, channels = read_h5_events(extdata / f"{name}.h5")
    result = Engine(events, channels, nk_template(stored)).run(medians=False)
    counts = pd.read_csv(
        shared_path("flowWorkspaceData", "_derived", "gatingset_counts", f"{name}.counts.tsv"), sep="\t"
    ).set_index("path")["flowcore_count"]
    parent = float(counts[f"root/{CHAIN}"])
    assert result.populations[CHAIN].count == parent  # the stored chain is reproduced exactly
    errors = {}
    print(f"\ngs_DC_auto {sample}: NK nodes, landmark-relative gates vs stored (% of CD14-Lineage-)")
    for node in NK:
        want = 100 * float(counts[f"root/{CHAIN}/{node}"]) / parent
        got = result.populations[node].pct_parent
        errors[node] = abs(got - want)
        assert result.populations[node].source == "fitted"
        print(f"  {node:<12} stored {want:6.2f}  landmark {got:6.2f}  |diff| {errors[node]:.2f} pp")
    assert max(errors.values()) <= 2.0, errors
