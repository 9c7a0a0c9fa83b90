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


def test_the_canonical_nk_gate_fits_cd56_within_its_quadrant():
    tpl = load_template(TEMPLATE)
    cd3, cd56 = tpl["NK"].gate.thresholds
    assert cd56.options["within"] == "quadrant" and "within" not in cd3.options
    spec = template_to_dict(tpl)  # written back and read again: the option survives
    nk = next(p for p in spec["populations"] if p["name"] == "NK")
    assert nk["gate"]["thresholds"][1]["within"] == "quadrant"
    assert parse_template(spec)["NK"].gate.thresholds[1].options["within"] == "quadrant"
    with pytest.raises(TemplateError, match="within"):
        _template({"type": "auto", "within": "parent"})
