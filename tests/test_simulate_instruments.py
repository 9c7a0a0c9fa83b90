"""Instrument profiles of the simulator: ranges, brightness, scatter, names, continua, truth,
determinism, and the accuracy harness (tests/accuracy_support.py)."""

from __future__ import annotations

import filecmp

import numpy as np
import pandas as pd
import pytest

import cytopipe
from cytopipe.simulate import (
    POPULATION_NAMES,
    SimulationError,
    instrument_trial,
    load_labels,
    make_instrument,
)
from cytopipe.simulate import params as P
from cytopipe.simulate.instrument_events import channel_names, compensated, fluor_slice
from cytopipe.simulate.instruments import DIM_MARKERS, NAMED, SEPARATION, marker_class
from cytopipe.simulate.populations import unpack_membership

SMALL = dict(patients=4, visits=(0, 12), events=8000, control_events=300)


def read_manifest(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "manifest.csv", keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def random_trial(tmp_path_factory):
    out = tmp_path_factory.mktemp("inst") / "t"
    instrument_trial(out, instrument="random", seed=31, **SMALL)
    return out


def test_profiles_differ_as_specified():
    seen_ranges, fsc_centres = set(), []
    for seed in range(12):
        inst = make_instrument("random", seed, "S1")
        assert inst.kind == "fluorescence"
        seen_ranges.add(inst.pnr)
        for j, m in enumerate(P.MARKERS):
            lo, hi = SEPARATION[marker_class(m)]
            assert lo <= inst.separation[j] <= hi
        # the brightness delivers the drawn separation (reference units, cofactor 150)
        j = P.MI["CXCR5"]
        assert 1.0 <= inst.separation[j] <= 2.0
        assert inst.cofactor == pytest.approx(150 * inst.scale)
        assert np.allclose(np.diag(inst.spillover), 1) and inst.spillover.max() <= 1
        fsc_centres.append(P.LYMPH_MEAN[0] * inst.fsc_gain * inst.scale)
        assert 0.05 <= inst.drift_sd <= 0.25
    assert seen_ranges == {262144.0, 1048576.0, 4194304.0}
    assert max(fsc_centres) / min(fsc_centres) > 5  # lymphocytes sit at very different FSC
    mass = make_instrument("random-mass", 1)
    assert mass.kind == "mass" and mass.cofactor == 5 and not mass.has_scatter
    assert make_instrument("fortessa").detectors == P.DETECTORS
    for name in NAMED:
        a, b = make_instrument(name, 1), make_instrument(name, 2)
        assert a.detectors == b.detectors and np.array_equal(a.spillover, b.spillover)  # named = fixed
    with pytest.raises(SimulationError, match="unknown instrument"):
        make_instrument("facscalibur")


def test_random_trial_files_follow_their_site_instrument(random_trial):
    man = read_manifest(random_trial)
    inst = pd.read_csv(random_trial / "truth" / "instruments.csv").set_index("site")
    samples = man[man["control"].isna()]
    for row in samples.itertuples():
        s = cytopipe.read_fcs(random_trial / row.file)
        prof = make_instrument("random", 31, row.site)
        assert list(s.channels["pnn"]) == channel_names(prof)
        assert float(s.channels["pnr"].iloc[-2]) == prof.pnr == inst.loc[row.site, "pnr"]
        assert s.events[:, :-1].max() <= prof.pnr - 1
        assert list(s.channels["pns"])[fluor_slice(prof)] == list(prof.pns)
        assert s.spillover is not None and np.array_equal(s.spillover.matrix, prof.spillover)
        assert s.keywords["INSTRUMENT_PROFILE"] == prof.name


def test_truth_fractions_in_realistic_ranges(random_trial):
    truth = pd.read_csv(random_trial / "truth" / "population_truth.csv").set_index(
        ["sample_id", "population"]
    )
    pct = truth["pct_parent"].unstack()
    cd4 = pct["Treg"]
    assert cd4.between(2.5, 14).all(), cd4  # Treg 3-10% of CD4 (+ IL-2 rise)
    atfh_of_cd4 = pct["activated cTfh"] * pct["cTfh"] * pct["Memory CD4"] / 1e4
    assert atfh_of_cd4.between(0.3, 4.0).all(), atfh_of_cd4
    assert pct["cTfh"].between(5, 50).all() and pct["Th17"].between(3, 35).all()
    assert pct["NK"].between(2, 50).all() and pct["CD56bright NK"].between(1, 30).all()


def test_dim_markers_are_continua_with_threshold_truth(random_trial):
    """CXCR5 positivity is 'above the true threshold'; the compensated values form a shoulder
    (the true positives are not separated from the negatives by an empty valley)."""
    man = read_manifest(random_trial)
    thr = pd.read_csv(random_trial / "truth" / "thresholds.csv")
    assert set(thr["marker"]) == set(DIM_MARKERS)
    row = man[man["control"].isna()].iloc[0]
    prof = make_instrument("random", 31, row["site"])
    s = cytopipe.read_fcs(random_trial / row["file"])
    lab = load_labels(random_trial / "truth" / "labels" / f"{row['sample_id']}.npz")
    comp = compensated(s.events, prof)
    mem = unpack_membership(lab["membership"], "Memory CD4")
    tfh = unpack_membership(lab["membership"], "cTfh")
    x = np.arcsinh(comp[P.MI["CXCR5"]] / prof.cofactor)
    t = thr[(thr["batch"] == row["batch"]) & (thr["marker"] == "CXCR5")]["threshold_asinh"].item()
    # measured values agree with the truth for most events, but not all (a continuum)
    agree = ((x[mem] >= t) == tfh[mem]).mean()
    assert 0.8 < agree < 0.995, agree
    hist, _ = np.histogram(x[mem], bins=np.linspace(t - 1.0, t + 1.0, 11))
    assert hist.min() > 0  # no empty valley around the threshold


def test_mass_cytometry_files_have_no_scatter(tmp_path):
    out = tmp_path / "m"
    instrument_trial(
        out, instrument="cytof", seed=2, patients=1, visits=(0,), events=3000, control_events=200
    )
    man = read_manifest(out)
    s = cytopipe.read_fcs(out / man["file"].iloc[0])
    names = list(s.channels["pnn"])
    assert not any(n.startswith(("FSC", "SSC")) for n in names)
    assert {"Event_length", "Ir191Di", "Ir193Di", "Pt195Di", "Time"} <= set(names)
    assert s.spillover is None
    fl = s.events[:, 6:20]
    assert fl.min() >= 0 and (fl == 0).mean() > 0.2  # ion counts: many zeros
    pns = list(s.channels["pns"])
    assert any("Cisplatin" in p for p in pns) and any("DNA" in p for p in pns)
    lab = load_labels(out / "truth" / "labels" / f"{man['sample_id'].iloc[0]}.npz")
    assert unpack_membership(lab["membership"], "T cells").sum() > 100


def test_same_seed_same_bytes(tmp_path):
    a = instrument_trial(tmp_path / "a", instrument="random", seed=7, patients=2, visits=(0,), events=2000,
                         control_events=200).out_dir  # fmt: skip
    b = instrument_trial(tmp_path / "b", instrument="random", seed=7, patients=2, visits=(0,), events=2000,
                         control_events=200).out_dir  # fmt: skip
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert len(files) > 20
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    c = instrument_trial(tmp_path / "c", instrument="random", seed=8, patients=2, visits=(0,), events=2000,
                         control_events=200).out_dir  # fmt: skip
    assert (a / "truth" / "instruments.csv").read_bytes() != (c / "truth" / "instruments.csv").read_bytes()


def test_accuracy_harness_runs_the_real_engine(random_trial):
    from tests.accuracy_support import accuracy_table, gate_trial, lins_ccc

    assert lins_ccc([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert lins_ccc([1, 2, 3, 4], [2, 3, 4, 5]) < 0.9  # a bias lowers concordance
    gated = gate_trial(random_trial)
    acc = accuracy_table(gated)
    print("\n" + acc.round(3).to_string())
    assert list(acc["population"]) == list(POPULATION_NAMES)
    assert (acc["n"] + acc["undefined"] + acc["failed"] == 8).all()
    assert acc["fallback_rate"].between(0, 1).all()
    assert gated["pct_parent_true"].notna().all()
