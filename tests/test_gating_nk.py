"""NK gating: the CD56 threshold of the NK quadrant is fitted among CD3- events (``within:
quadrant``), as a scientist gates CD3- first. On all live cells the T cells' CD56-negative events
can form two humps (e.g. CD4 and CD8 T cells with different spillover spread into CD56); the
deepest valley between the two most prominent peaks is then the one between those humps, far
below the NK cells. Among CD3- events the two most prominent peaks are the CD56-negative non-T
cells and the CD56dim NK cells.

The events below are drawn with per-event truth labels (NK = CD3- cells of the CD56dim and
CD56bright clouds); the same template without ``within`` is gated too, to show what the option
changes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cytopipe.errors import TemplateError
from cytopipe.gating import Engine, load_template, parse_template, template_to_dict
from tests.conftest import REPO

TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"


def _events(seed: int = 7, n: int = 20_000):
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=n, p=[0.60, 0.25, 0.12, 0.03])  # T, other CD3-, NK dim, NK bright
    cd3 = np.where(kind == 0, rng.normal(3.5, 0.3, n), rng.normal(0.0, 0.3, n))
    # T cells' CD56 negatives in two humps 0.7 apart (as seed 3013's P001_W00 shows: -0.6 and 0.0)
    t_neg = np.where(rng.random(n) < 0.6, rng.normal(-0.7, 0.2, n), rng.normal(0.0, 0.2, n))
    cd56 = np.select(
        [kind == 0, kind == 1, kind == 2],
        [t_neg, rng.normal(0.0, 0.3, n), rng.normal(2.2, 0.3, n)],
        rng.normal(3.8, 0.3, n),
    )
    events = (np.sinh(np.column_stack([cd3, cd56])) * 150).astype(np.float32)
    channels = pd.DataFrame({"pnn": ["B1-A", "B2-A"], "pns": ["CD3", "CD56"]})
    return events, channels, kind >= 2


def _template(cd56: dict):
    return parse_template(
        {
            "compensation": "none",
            "transforms": {"default": {"type": "arcsinh", "cofactor": 150}},
            "populations": [
                {"name": "NK", "parent": "root", "markers": ["CD3", "CD56"],
                 "gate": {"type": "quadrant", "quadrant": "-+", "thresholds": [{"type": "auto"}, cd56]}},
            ],
        }
    )  # fmt: skip


def _f1(mask, truth) -> float:
    tp = int((mask & truth).sum())
    return 2 * tp / (int(mask.sum()) + int(truth.sum()))


def test_nk_cd56_threshold_fitted_among_cd3_negative_events():
    events, channels, truth = _events()
    got = {}
    for name, spec in (("within", {"type": "auto", "within": "quadrant"}), ("all", {"type": "auto"})):
        res = Engine(events, channels, _template(spec)).run(medians=False)
        nk = res.populations["NK"]
        got[name] = (nk.gate.lower[1], _f1(res.mask("NK"), truth), nk.source)
    print(f"\nCD56 threshold / NK F1: within CD3- {got['within'][:2]}, on all events {got['all'][:2]}")
    t, f1, source = got["within"]
    assert source == "fitted"
    assert 0.6 < t < 1.6  # between the CD3- negatives (0) and the CD56dim NK cells (2.2)
    assert f1 >= 0.97
    # on all events the valley between the T cells' two CD56-negative humps is taken
    assert got["all"][0] < 0.0 and got["all"][1] < 0.7


def test_the_canonical_nk_gate_is_cd56_or_cd16_among_cd3_negative_cells():
    """NK = CD3- CD56+ OR CD3- CD16+: two quadrants whose CD56 / CD16 thresholds are fitted among
    the CD3- events (``within: quadrant``), and a boolean ``or``; the option survives writing the
    template back and reading it again."""
    tpl = load_template(TEMPLATE)
    g = tpl["NK"].gate
    assert g.op == "or" and [o.population for o in g.operands] == ["CD3- CD56+", "CD3- CD16+"]
    for half, marker in (("CD3- CD56+", "CD56"), ("CD3- CD16+", "CD16")):
        cd3, other = tpl[half].gate.thresholds
        assert tpl[half].parent == "Live" and [d.name for d in tpl[half].gate.dims] == ["CD3", marker]
        assert other.options["within"] == "quadrant" and "within" not in cd3.options
    spec = template_to_dict(tpl)  # written back and read again: the option survives
    half = next(p for p in spec["populations"] if p["name"] == "CD3- CD56+")
    assert half["gate"]["thresholds"][1]["within"] == "quadrant"
    assert parse_template(spec)["CD3- CD56+"].gate.thresholds[1].options["within"] == "quadrant"


def test_quadrant_threshold_within_is_checked():
    with pytest.raises(TemplateError, match="within"):
        _template({"type": "auto", "within": "parent"})


@pytest.mark.parametrize("seed, patient", [(10409, "P003"), (10416, "P002")])
def test_nk_with_cd56dim_close_to_the_negatives_per_event(tmp_path, seed, patient):
    """Two held-out profiles of the accuracy test (10301-10320 + 10401-10420) whose W12 NK (10-40 %
    of live cells under the simulated IL-2 effect) the CD3- CD56+ quadrant alone missed (10409
    P003_W12: 1.0 % of live cells, truth 10.8 %; 10416 P002_W12: 5.5 %, truth 23.4 %): their CD56dim
    NK sit within ~0.5 arcsinh units of the CD3- negatives on CD56, and are CD16 bright. Diagnosed
    after that run, so a regression test here, not a measure of accuracy. Per event against the
    simulator's labels, every visit: NK F1 >= 0.97 and NK % of live cells within 1 pp of the truth;
    and CD3- CD56+ alone misses the W12 file by more than 5 pp."""
    import cytopipe
    from cytopipe.gating import gate
    from cytopipe.simulate import instrument_trial, load_labels
    from cytopipe.simulate.populations import unpack_membership

    instrument_trial(
        tmp_path, instrument="random", seed=seed, patients=6, events=10_000
    )  # as the accuracy test
    tpl = load_template(TEMPLATE)
    for visit in ("W00", "W04", "W12", "W24"):
        sid = f"{patient}_{visit}"
        s = cytopipe.read_fcs(tmp_path / "fcs" / f"{sid}.fcs")
        true = unpack_membership(
            load_labels(tmp_path / "truth" / "labels" / f"{sid}.npz")["membership"], "NK"
        )
        res = gate(s, tpl, medians=False)
        nk, live, half = res.mask("NK"), res.mask("Live"), res.mask("CD3- CD56+")
        f1 = 2 * (nk & true).sum() / (nk.sum() + true.sum())
        pct, truth_pct = 100 * nk.sum() / live.sum(), 100 * (true & live).sum() / live.sum()
        print(f"{seed} {sid}: NK {pct:.2f} % of live (truth {truth_pct:.2f}; CD3- CD56+ alone "
              f"{100 * half.sum() / live.sum():.2f}), F1 {f1:.3f}")  # fmt: skip
        assert f1 >= 0.97 and abs(pct - truth_pct) < 1.0
        if visit == "W12":
            assert truth_pct - 100 * half.sum() / live.sum() > 5.0


def test_nk_without_cd16_is_the_cd56_half_flagged():
    """A panel without CD16: NK is gated as CD3- CD56+ alone (the measured half of the `or`), flagged,
    not dropped; CD56bright / CD56dim NK (which need CD16) are not measured."""
    events, channels, truth = _events()
    tpl = load_template(TEMPLATE)
    spec = template_to_dict(tpl)
    keep = {"CD3- CD56+", "CD3- CD16+", "NK", "CD56bright NK", "CD56dim NK"}
    spec["populations"] = [
        {**p, "parent": "root"} if p["name"] in ("CD3- CD56+", "CD3- CD16+", "NK") else p
        for p in spec["populations"]
        if p["name"] in keep
    ]
    spec["compensation"] = "none"
    spec["transforms"] = {"default": {"type": "arcsinh", "cofactor": 150}}
    spec.pop("medians", None)
    for p in spec["populations"]:
        if p["name"] in ("CD3- CD56+", "CD3- CD16+"):
            p["gate"]["thresholds"][0] = {"type": "auto"}
    res = Engine(events, channels, parse_template(spec)).run(medians=False)
    nk = res.populations["NK"]
    assert res.populations["CD3- CD16+"].source == "not measured"
    assert nk.source == "boolean" and any("CD3- CD16+ not measured" in f for f in nk.flags), nk.flags
    assert nk.count == res.populations["CD3- CD56+"].count > 0
    assert _f1(res.mask("NK"), truth) >= 0.97
    assert res.populations["CD56bright NK"].source == "not measured"
