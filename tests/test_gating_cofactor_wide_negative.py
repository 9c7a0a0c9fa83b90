"""The per-file arcsinh cofactor of a wide negative sitting below another population: a known
failure, kept as a strict xfail until a rule fixes it without costing the gates' accuracy.

On a 22-bit instrument the negative population is some 2,000 units wide: on the estimate's
provisional arcsinh(x/150) scale its density splits at zero into two humps. The rule takes the
upper one for "the negative" whenever the lower hump is no peak per linear unit; on seed 24's site
S3 it reads the CD4 channel's next peak instead, CD8 T cells and monocytes at CD4 ~3,600 (the
CD4-negative cells sit around +300): everything below it counts as the negative's spread, CD4
cofactors 10,000-64,000 and CXCR3 5,200-6,200 where the instrument's own cofactor is ~3,000.

Reading the negative's mode per linear unit (the middle of its flat top) fixes this file (CD4
3,000-4,000) and the estimates in general (2026-12-06: > 1.5x off the labelled negatives' three
SDs on held-out seeds 11/15/21 17.8/46.7/27.8 % -> 0 %), but the gates' constants were chosen with
the present estimate: on the held-out accuracy set (40 instruments) the dim populations' median
errors grew by 3-5 % (Th1 0.78 -> 0.80, cTfh 0.95 -> 0.99, activated cTfh 1.25 -> 1.30 pp) and the
issue-scale harness's by 6-10 %, so that rule was not landed (docs/gating.md, §6).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def site_s3(tmp_path_factory):
    """`cytopipe simulate --instrument random --seed 24` (9 patients, weeks 0 and 12): site S3
    (P003, P007) measures on a 22-bit instrument; each file's engine (as `cytopipe run` builds it)
    and the instrument's true cofactor."""
    from cytopipe.fcs import read_fcs
    from cytopipe.gating import load_template
    from cytopipe.gating.engine import Engine
    from cytopipe.simulate.trial import instrument_trial
    from tests.report_support import TEMPLATE

    folder = tmp_path_factory.mktemp("cofactor-wide-negative")
    trial = instrument_trial(folder / "trial", instrument="random", seed=24, patients=9, visits=(0, 12),
                             events=10_000)  # fmt: skip
    inst = trial.instruments["S3"]
    assert inst.pnr == 4194304.0
    tpl = load_template(TEMPLATE)
    engines = {}
    for sample_id in ("P003_W00", "P003_W12", "P007_W00", "P007_W12"):
        s = read_fcs(trial.out_dir / "fcs" / f"{sample_id}.fcs")
        engines[sample_id] = Engine(s.events, s.channels, tpl, spillover=s.spillover)
    return tpl, engines, inst.cofactor


@pytest.mark.xfail(strict=True, reason="known failure of the cofactor rule (module docstring)")
@pytest.mark.parametrize("marker", ["CD4", "CXCR3"])
def test_a_wide_negative_below_another_population_gets_the_instruments_cofactor(site_s3, marker):
    """The cofactor each file's engine uses (`cofactor: auto`, from 5,000 events) is within 1.5x of
    the instrument's own (3,027). Now: CD4 10,000-64,000 (P007_W12's read from the CD4+ peak),
    CXCR3 5,200-6,300; the mode per linear unit gives CD4 3,000-4,000, CXCR3 3,300-4,300 (the
    CD4-negative cells' own three robust SDs, from the simulator's labels: 3,100-4,300)."""
    tpl, engines, cofactor = site_s3
    got = {}
    for sample_id, e in engines.items():
        spec = e._transform_spec(tpl.dimension(marker))
        assert spec["type"] == "arcsinh"
        got[sample_id] = spec["cofactor"]
    assert all(1 / 1.5 < c / cofactor < 1.5 for c in got.values()), (marker, round(cofactor), got)
