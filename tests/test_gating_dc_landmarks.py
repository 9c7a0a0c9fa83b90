"""flowWorkspaceData gs_DC_auto (real HIPC DC/Mono/NK data): the four CD16 x CD56 NK nodes gated
by data-relative gates (``auto`` thresholds on both axes, cytopipe/gating/landmarks.py) against
the counts stored with each sample (openCyto's own data-driven gates).

The parent chain down to ``CD14-Lineage-`` (scatter boundary, FSC range, viability, CD14- and
Lineage-) is taken from each sample's stored gates, so that only the NK gates are compared.

What openCyto did: the stored node structure (Lineage1 under CD14-, Lineage2 under CD14+,
CD14+CD16+ under CD14+Lineage-, hidden CD16+ / CD56+ 1-D gates combined into the four quadrants)
is that of the HIPC Lyoplate DC template (RGLab/flowcap3 ``gating-templates/gt-DC.csv``), whose
CD16/CD56 row is ``"*","CD16+/-CD56+/-","CD14-Lineage-","CD16,CD56","flowClust","K=2"`` with
``prior_flowClust`` preprocessing: a two-component t-mixture cut per axis, with priors estimated
over the whole study's samples. Not a valley: openCyto's ``mindensity`` with its defaults (deepest
valley of a KDE at 2x Silverman's bandwidth) gives CD16 cuts of 1849 / 1875, not the stored 1901 /
1959 (computed while diagnosing, not asserted). So two rules are tested: the landmark rule
(valley, else the negative's shoulder: strict xfail, see its reason) and ``split: mixture`` (the
two-component Gaussian mixture's boundary, the same family as openCyto's cut, with no number
taken from these files; the priors cannot be rebuilt from two samples).
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


def nk_template(stored: Template, split: str = "valley") -> Template:
    """The stored parent chain, then one data-relative quadrant per NK node."""
    threshold = {"type": "auto", "split": split}
    spec = {
        "name": "gs_DC_auto NK (landmark-relative)",
        "compensation": "none",
        "populations": [{"name": "parent", "parent": "root", "markers": ["FSC-A"], "gate": {"type": "range", "min": -1e30}}]
        + [
            {"name": node, "parent": "parent", "markers": ["CD16", "CD56"],
             "gate": {"type": "quadrant", "quadrant": signs, "thresholds": [threshold, threshold]}}
            for node, signs in NK.items()
        ],
    }  # fmt: skip
    landmark = load_template(spec)
    chain = ["boundary", "boundary/Monocytes", "boundary/Monocytes/Live", CHAIN]
    pops = {name: stored.populations[name] for name in chain}
    for node in NK:
        pops[node] = Population(node, CHAIN, landmark[node].gate)
    return Template(name=spec["name"], populations=pops, compensation="none")


VALLEY_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="the CD16 density of CD14-Lineage- cells is flat between ~1500 and ~2000 (no valley): the "
    "landmark threshold (the CD16-negative's shoulder) lands at 1733/1753, openCyto's flowClust K=2 "
    "mixture cut at 1901/1959, so CD16+CD56+ and CD16-CD56+ are 3.3-4.8 pp off (CD16+CD56- and "
    "CD16-CD56- within 0.6 pp); no valley or shoulder rule reproduces a mixture boundary without "
    "picking its numbers on these two files",
)


@pytest.mark.parametrize("split", [pytest.param("valley", marks=VALLEY_XFAIL), "mixture"])
@pytest.mark.parametrize("sample", ["001", "002"])
def test_gs_dc_auto_nk_nodes_with_landmark_gates(sample, split):
    from tests.support.gatingset_pb import read_gatingset_pb, read_h5_events, to_template

    extdata = shared_path("flowWorkspaceData", "inst", "extdata", "gs_DC_auto")
    name = SAMPLE.format(sample)
    stored = to_template(read_gatingset_pb(extdata / f"{name}.pb"))
    events, channels = read_h5_events(extdata / f"{name}.h5")
    result = Engine(events, channels, nk_template(stored, split)).run(medians=False)
    counts = pd.read_csv(
        shared_path("flowWorkspaceData", "_derived", "gatingset_counts", f"{name}.counts.tsv"), sep="\t"
    ).set_index("path")["flowcore_count"]
    parent = float(counts[f"root/{CHAIN}"])
    assert result.populations[CHAIN].count == parent  # the stored chain is reproduced exactly
    errors = {}
    print(f"\ngs_DC_auto {sample}: NK nodes, `auto` split {split} vs stored (% of CD14-Lineage-)")
    for node in NK:
        want = 100 * float(counts[f"root/{CHAIN}/{node}"]) / parent
        got = result.populations[node].pct_parent
        errors[node] = abs(got - want)
        assert result.populations[node].source == "fitted"
        print(f"  {node:<12} stored {want:6.2f}  fitted {got:6.2f}  |diff| {errors[node]:.2f} pp")
    assert max(errors.values()) <= 2.0, errors


def test_mixture_boundary_is_the_bayes_boundary_of_two_populations():
    """Two normal populations of equal width: the equal-posterior point is known in closed form,
    (m1 + m2) / 2 + s^2 ln(w1 / w2) / (m2 - m1); a single population has no second component."""
    import numpy as np

    from cytopipe.gating.fitters import FitFailure
    from cytopipe.gating.landmarks import mixture_boundary

    rng = np.random.default_rng(11)
    m1, m2, s = 1.0, 3.0, 0.5
    for w1 in (0.5, 0.8):
        n1 = int(40_000 * w1)
        x = np.concatenate([rng.normal(m1, s, n1), rng.normal(m2, s, 40_000 - n1)])
        want = (m1 + m2) / 2 + s**2 * np.log(w1 / (1 - w1)) / (m2 - m1)
        got = mixture_boundary(x)
        # within a sixth of the populations' SD (the fit has its own widths and weights); for
        # unequal weights, clearly off the midpoint of the two peaks (0.17 away here)
        assert abs(got - want) < 0.08, (w1, got, want)
        assert w1 == 0.5 or got - (m1 + m2) / 2 > 0.1
    with pytest.raises(FitFailure):
        mixture_boundary(rng.normal(0, 1, 30))


@pytest.mark.parametrize("sample", ["001", "002"])
def test_gs_dc_auto_nk_as_the_canonical_template_gates_it(sample):
    """The canonical template's NK is CD56+ or CD16+ among CD3- cells, each threshold an `auto`
    landmark threshold (valley, else the negative's shoulder). On real data (Lineage- standing for
    CD3-), that union against the stored NK (the three CD16/CD56 nodes that are not CD16-CD56-):
    within 1 pp of the parent, although the valley rule misplaces CD16 within NK (see above)."""
    from tests.support.gatingset_pb import read_gatingset_pb, read_h5_events, to_template

    extdata = shared_path("flowWorkspaceData", "inst", "extdata", "gs_DC_auto")
    name = SAMPLE.format(sample)
    stored = to_template(read_gatingset_pb(extdata / f"{name}.pb"))
    events, channels = read_h5_events(extdata / f"{name}.h5")
    result = Engine(events, channels, nk_template(stored, "valley")).run(medians=False)
    counts = pd.read_csv(
        shared_path("flowWorkspaceData", "_derived", "gatingset_counts", f"{name}.counts.tsv"), sep="\t"
    ).set_index("path")["flowcore_count"]
    parent = float(counts[f"root/{CHAIN}"])
    nk = result.mask("CD16+CD56+") | result.mask("CD16-CD56+") | result.mask("CD16+CD56-")
    want = sum(float(counts[f"root/{CHAIN}/{n}"]) for n in ("CD16+CD56+", "CD16-CD56+", "CD16+CD56-"))
    got, want = 100 * nk.sum() / parent, 100 * want / parent
    print(f"\ngs_DC_auto {sample}: NK (CD56+ or CD16+) {got:.2f} % of CD14-Lineage-, stored {want:.2f} %")
    assert abs(got - want) <= 1.0
