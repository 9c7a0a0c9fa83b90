"""Landmark-relative gates on real files the template was never tuned to (issue 10).

* OMIP-021 Donor1/2 (CytoPipeline, LSRFortessa): the canonical template mapped only through
  ``panel:`` (no edited numbers) gives T cells, CD4 T and CD8 T within 5 pp of an independent
  Gaussian-mixture reference computed here; the populations whose markers the panel lacks are
  "not measured" instead of failing the sample.
* FlowKit 100715.fcs (FACSAria, float data): Singlets and Live are fitted, not fallen back.
* cytometree HIPC Lyoplate T cells (FlowCAP-III, Stanford manual labels): CD4 T, CD8 T and
  Memory CD4 match the manual gating (F1 >= 0.97), the same on any linear scale of the values.
* Lone-sample fits are not thrown away for lying far from a typed default; a gmm gate outside its
  own fraction bound is flagged; a `reference` threshold records which population set it.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

import cytopipe
from cytopipe.gating import gate, load_template, parse_template, template_to_dict
from tests.conftest import REPO, shared_path

TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"


@pytest.fixture(scope="module")
def canonical():
    return template_to_dict(load_template(TEMPLATE))


def _numbers(node) -> list[float]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k not in ("min_events", "percentile") for v in _numbers(v)]
    if isinstance(node, list):
        return [v for item in node for v in _numbers(item)]
    return [node] if isinstance(node, float | int) and not isinstance(node, bool) else []


def test_canonical_template_has_no_instrument_scale_numbers(canonical):
    """Only fractions, SD multiples, percentiles and counts: nothing on an intensity or scatter scale."""
    for pop in canonical["populations"]:
        gate_spec = pop["gate"]
        assert "default" not in gate_spec and "search" not in gate_spec, pop["name"]
        assert "range" not in gate_spec.get("bounds", {}) and "center" not in gate_spec.get("bounds", {})
        for v in _numbers(gate_spec):
            assert abs(v) <= 10, (pop["name"], v)  # fractions, SDs (trim 2.5, distance 3.4), z


def _gmm_reference(values: np.ndarray, k: int, seed: int = 0):
    gm = GaussianMixture(k, random_state=seed, n_init=3).fit(values)
    return gm, gm.predict(values)


@pytest.mark.parametrize("donor", ["Donor1", "Donor2"])
def test_omip021_t_cells_against_a_mixture_reference(donor, canonical):
    spec = dict(canonical, panel={"CD8": "585/15Violet-A"})  # CD8a of the two CD8 channels
    template = parse_template(spec)
    sample = cytopipe.read_fcs(shared_path("CytoPipeline", "inst", "extdata", f"{donor}.fcs"))
    result = gate(sample, template)
    print("\n" + result.summary())
    # the panel has no CD25/CD127/FOXP3/CXCR3/CCR6/CXCR5/PD-1/CD56/CD16: those are not measured
    for name in ("Treg", "Th17", "Th1", "cTfh", "activated cTfh", "NK", "CD56bright NK", "CD56dim NK"):
        assert result.populations[name].source == "not measured", name
    for name in ("Lymphocytes", "Singlets", "Live", "T cells", "CD4 T", "CD8 T"):
        p = result.populations[name]
        assert p.source == "fitted" and not p.flags, (name, p.flags)

    values = result.event_values(sample)
    # reference 1: T cells = the high component of a 2-component mixture on CD3 of live cells
    cd3 = values.values("CD3", "Live").reshape(-1, 1)
    gm, lab = _gmm_reference(cd3, 2)
    ref_t = 100 * np.mean(lab == np.argmax(gm.means_[:, 0]))
    # reference 2: a 4-component mixture on CD4/CD8 of T cells; a component is CD4 T (CD8 T) when
    # its mean is above the midpoint of the components' means on CD4 (CD8) and below it on the other
    x = values.matrix(["CD4", "CD8"], "T cells")
    gm, lab = _gmm_reference(x, 4)
    mid = (gm.means_.min(axis=0) + gm.means_.max(axis=0)) / 2
    hi = gm.means_ > mid
    ref_cd4 = 100 * np.isin(lab, np.flatnonzero(hi[:, 0] & ~hi[:, 1])).mean()
    ref_cd8 = 100 * np.isin(lab, np.flatnonzero(~hi[:, 0] & hi[:, 1])).mean()
    got = {n: result.populations[n].pct_parent for n in ("T cells", "CD4 T", "CD8 T")}
    print(f"reference T {ref_t:.1f} CD4 {ref_cd4:.1f} CD8 {ref_cd8:.1f}; gated {got}")
    assert abs(got["T cells"] - ref_t) <= 5
    assert abs(got["CD4 T"] - ref_cd4) <= 5
    assert abs(got["CD8 T"] - ref_cd8) <= 5


def test_flowkit_100715_singlets_and_live_are_fitted(canonical):
    sample = cytopipe.read_fcs(shared_path("FlowKit", "data", "100715.fcs"))
    result = gate(sample, parse_template(canonical))  # "VIVID / CD14" resolves as Viability
    print("\n" + result.summary())
    assert result.channel_of["Viability"] == "V450-A"
    for name in ("Lymphocytes", "Singlets", "Live"):
        p = result.populations[name]
        assert p.source == "fitted" and not p.flags, (name, p.flags)
        assert p.pct_parent > 50, name
    fits = {f.key: f for f in result.fits}
    assert fits["Singlets"].status == "ok" and fits["Live"].status == "ok"
    # the singlets' VIVID/CD14 values form one peak (mode ~0.6, robust SD ~0.23 on the display scale,
    # nothing beyond 1.8: no dead-cell population in this file): the Live gate keeps that peak whole.
    # The upper-shoulder walk from 1 SD of the peak's lower half cut its flank (94.2 %, 2026-12-04)
    assert result.populations["Live"].pct_parent > 97.0


def test_viability_label_with_live_dead_dye_resolves():
    import pandas as pd

    from cytopipe.gating._adapters import resolve_markers

    channels = pd.DataFrame(
        {"pnn": ["FSC-A", "V510-A", "B515-A"], "pns": ["", "Live/Dead Yellow-A [Live]", "CD3"]}
    )
    assert resolve_markers(channels, ["Viability"])["Viability"] == "V510-A"


# --------------------------------------------------------------------------------------------
# bounds are plausibility checks, fallbacks are flagged
# --------------------------------------------------------------------------------------------
def _engine_gate(template, n=20_000, neg=0.0, pos=3.0, seed=0):
    import pandas as pd

    from cytopipe.gating import Engine

    rng = np.random.default_rng(seed)
    x = np.where(rng.random(n) < 0.3, rng.normal(pos, 0.3, n), rng.normal(neg, 0.3, n))
    events = np.column_stack([np.sinh(x) * 150, rng.normal(0, 150, n)]).astype(np.float32)
    channels = pd.DataFrame({"pnn": ["B1-A", "B2-A"], "pns": ["CD3", "CD8"]})
    return Engine(events, channels, template).run(medians=False)


def _mini(gate_spec):
    return parse_template(
        {
            "compensation": "none",
            "transforms": {"default": {"type": "arcsinh", "cofactor": 150}},
            "populations": [{"name": "CD3+", "parent": "root", "markers": ["CD3"], "gate": gate_spec}],
        }
    )


def test_a_good_lone_fit_is_kept_however_far_from_the_typed_default():
    """Before: a fit further than `max_shift` from the `default` was replaced by the default."""
    t = _mini({"type": "valley", "search": [0.5, 6.0], "default": 5.5, "bounds": {"max_shift": 0.5}})
    result = _engine_gate(t, pos=4.0)
    assert not result.flags and result.populations["CD3+"].source == "fitted"
    assert 1.0 < result.populations["CD3+"].gate.lower[0] < 3.0
    assert result.populations["CD3+"].pct_parent == pytest.approx(30, abs=1)


def test_auto_threshold_moves_with_the_data():
    """The same relative gate on two 'instruments' whose scales differ by 2 arcsinh units."""
    t = _mini({"type": "auto"})
    a, b = _engine_gate(t, neg=0.0, pos=3.0), _engine_gate(t, neg=2.0, pos=5.0)
    ta, tb = (r.populations["CD3+"].gate.lower[0] for r in (a, b))
    assert tb - ta == pytest.approx(2.0, abs=0.1)
    for r in (a, b):
        assert r.populations["CD3+"].pct_parent == pytest.approx(30, abs=1.0) and not r.flags


def test_gate_outside_its_fraction_bound_is_flagged_even_after_fallback():
    t = _mini({"type": "auto", "bounds": {"fraction": [0.5, 0.9]}})  # 30 % positive: implausible
    result = _engine_gate(t)
    (flag,) = result.populations["CD3+"].flags
    assert "outside [50%, 90%]" in flag and "also outside" in flag
    assert result.fits[0].status == "failed"


def test_reference_threshold_records_its_source():
    spec = {
        "compensation": "none",
        "transforms": {"default": {"type": "arcsinh", "cofactor": 150}},
        "populations": [
            {"name": "CD3-", "parent": "root", "markers": ["CD3"], "gate": {"type": "range", "max": 1.5}},
            {
                "name": "CD3+",
                "parent": "root",
                "markers": ["CD3"],
                "gate": {"type": "reference", "population": "CD3-", "q": 0.995},
            },
        ],
    }
    result = _engine_gate(parse_template(spec))
    p = result.populations["CD3+"]
    assert p.source == "reference"
    (note,) = result.sources
    assert note[0] == "CD3+" and "population CD3-" in note[1]
    # the 99.5th percentile of N(0, 0.3): 0.77
    assert p.gate.lower[0] == pytest.approx(0.3 * 2.576, abs=0.05)


def test_auto_threshold_stays_below_a_dim_population_beside_a_wide_negative():
    """CD56 on CD3- live cells, the shape of a held-out file (10015 P004_W24) where the NK gate kept
    0.44 % of live cells (truth 3.7 %): a wide negative (B cells, monocytes; its lower flank spread
    by compensation), CD56dim NK joined to it by a shallow valley, a few CD56bright. The shallow
    valley is no gap, so ``auto`` takes the negative's shoulder, whose mirrored lower flank covered
    the CD56dim cells: the cut fell between CD56dim and CD56bright. A peak below the shoulder now
    keeps the cut under it (numbers of the test case drawn independently of the rule)."""
    import pandas as pd

    from cytopipe.gating import Engine

    rng = np.random.default_rng(11)
    neg = np.concatenate([rng.normal(1.7, 0.4, 12_000), rng.normal(0.3, 0.9, 8_000)])  # skewed low
    dim, bright = rng.normal(3.1, 0.3, 2_500), rng.normal(4.6, 0.2, 250)
    x = np.concatenate([neg, dim, bright])
    truth = 100 * (len(dim) + len(bright)) / len(x)
    events = (np.sinh(x) * 150).astype(np.float32).reshape(-1, 1)
    channels = pd.DataFrame({"pnn": ["B1-A"], "pns": ["CD3"]})
    result = Engine(events, channels, _mini({"type": "auto"})).run(medians=False)
    pop = result.populations["CD3+"]
    print(f"threshold {pop.gate.lower[0]:.2f}, {pop.pct_parent:.2f} % (truth {truth:.2f} %)")
    assert 2.3 < pop.gate.lower[0] < 2.9  # between the negative and CD56dim
    assert pop.pct_parent == pytest.approx(truth, abs=1.0)


def test_hipc_lyoplate_t_cells_against_stanford_manual_labels():
    """cytometree's HIPC Lyoplate T-cell table (FlowCAP-III patient 1369: 33,992 CD3+ T cells,
    already compensated and transformed to a 0-4096 scale, manually gated at Stanford). Label
    meanings from the per-label medians (CATALOG.md): 1-5 CD8+, 6-10 CD4+; 8 and 9 the CCR7+/-
    CD45RA- memory cells, 6/7 CD45RA+, 10 activated (HLA-DR+ CD38+, either CD45RA side).
    The canonical template's CD4 T, CD8 T and Memory CD4 gates, unchanged but rooted at the T
    cells the table already is, reproduce the manual gating; and, being relative to the data's
    own landmarks, give the same events on any linear scale of the values."""
    import dataclasses

    import pandas as pd

    from cytopipe.gating import Engine
    from cytopipe.gating.template import ROOT, Template

    table = pd.read_csv(shared_path("cytometree", "_derived", "HIPC.csv"))
    canonical = load_template(TEMPLATE)
    pops = {n: dataclasses.replace(canonical[n], parent=ROOT if canonical[n].parent == "T cells" else
                                   canonical[n].parent, path="") for n in ("CD4 T", "CD8 T", "Memory CD4")}  # fmt: skip
    template = Template("hipc", pops, compensation="none")
    markers = ["CCR7", "CD4", "CD45RA", "HLADR", "CD38", "CD8"]
    channels = pd.DataFrame({"pnn": markers, "pns": markers, "pnr": [4096] * len(markers)})
    label = table["label"].to_numpy()

    def f1(mask, truth):
        return 2 * np.sum(mask & truth) / (mask.sum() + truth.sum())

    masks = {}
    for scale in (1.0, 1e-3):  # as stored, and as if an instrument wrote 1000x smaller numbers
        events = table[markers].to_numpy(np.float32) * np.float32(scale)
        result = Engine(events, channels, template).run(medians=False)
        masks[scale] = {n: result.mask(n) for n in pops}
        for n in pops:
            assert result.populations[n].source == "fitted" and not result.populations[n].flags, n
    for n in pops:
        assert np.array_equal(masks[1.0][n], masks[1e-3][n]), n
    m = masks[1.0]
    cd4, cd8 = np.isin(label, [6, 7, 8, 9, 10]), np.isin(label, [1, 2, 3, 4, 5])
    resting_cd4, memory = np.isin(label, [6, 7, 8, 9]), np.isin(label, [8, 9])
    scores = {"CD4 T": f1(m["CD4 T"], cd4), "CD8 T": f1(m["CD8 T"], cd8),
              "Memory CD4": f1(m["Memory CD4"] & resting_cd4, memory)}  # fmt: skip
    pct_memory = 100 * m["Memory CD4"].sum() / m["CD4 T"].sum()
    ref_memory = 100 * memory.sum() / resting_cd4.sum()
    print(f"\nHIPC 1369 vs Stanford labels: F1 { {k: round(float(v), 3) for k, v in scores.items()} }; "
          f"CD4 T {100 * m['CD4 T'].mean():.1f} % (manual {100 * cd4.mean():.1f}), CD8 T {100 * m['CD8 T'].mean():.1f} % "
          f"(manual {100 * cd8.mean():.1f}), memory {pct_memory:.1f} % of CD4 T (manual {ref_memory:.1f})")  # fmt: skip
    assert min(scores.values()) >= 0.97, scores
    assert abs(100 * m["CD4 T"].mean() - 100 * cd4.mean()) <= 2
    assert abs(100 * m["CD8 T"].mean() - 100 * cd8.mean()) <= 2
    assert abs(pct_memory - ref_memory) <= 3


@pytest.mark.parametrize(
    "name, node",
    [
        ("gs_DC_auto/DC_MONO_NK_12828001_001.fcs", "root/boundary/Monocytes/lymph"),
        ("gs_DC_auto/DC_MONO_NK_12828001_002.fcs", "root/boundary/Monocytes/lymph"),
        ("gs_bcell_auto/12828_1_Bcell_C01.fcs", "root/boundary/nonDebris/lymph"),
    ],
)
def test_lymphocytes_against_the_lyoplate_manual_lymph_gate(name, node, canonical):
    """HIPC Lyoplate files (flowWorkspaceData GatingSets): the canonical Lymphocytes gate (only the
    gate itself, on all events) against the stored manual `lymph` gate. The DC files have a dense
    debris cluster at the lowest FSC right beside the lymphocytes: the ellipse reached across the
    FSC valley into it (F1 0.907 / 0.913); it now stops at the valley (0.961 / 0.959; 53.5 % of
    events each, 53.7 % / 53.3 % stored). The B-cell file's gate is about the same (0.974)."""
    from cytopipe.gating import Engine
    from tests.support.gatingset_pb import read_h5_events

    extdata = shared_path("flowWorkspaceData", "inst", "extdata")
    events, channels = read_h5_events(extdata / f"{name}.h5")
    spec = dict(canonical, compensation="none")  # the stored values are already compensated
    spec["populations"] = [p for p in canonical["populations"] if p["name"] == "Lymphocytes"]
    result = Engine(events, channels, parse_template(spec)).run(medians=False)
    stored = f"{name.split('/')[1]}.membership.npz"
    member = np.load(shared_path("flowWorkspaceData", "_derived", "gatingset_membership", stored))
    truth, got = member[node].astype(bool), result.mask("Lymphocytes")
    f1 = 2 * np.sum(truth & got) / (truth.sum() + got.sum())
    pct, ref = 100 * got.mean(), 100 * truth.mean()
    print(f"\n{name}: Lymphocytes {pct:.1f} % of events, manual lymph {ref:.1f} %, F1 {f1:.3f}")
    assert result.populations["Lymphocytes"].source == "fitted"
    assert f1 >= 0.95
