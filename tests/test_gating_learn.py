"""Gates learned from reviewed samples (cytopipe.gating.learn).

* A 24-file random-instrument study (3 sites, each its own instrument profile): the first sample of
  each site is "reviewed" - the template's own fitted gates on it, corrected toward that sample's
  truth labels (the best threshold / shift per gate, as a scientist moving gates by eye would) -
  and those 3 samples' gates are transferred to the other 21. F1 against the simulator's per-event
  truth on the 21 targets (whose truth is never used for the examples).
* flowWorkspaceData gs_DC_auto (real HIPC DC/Mono/NK data, openCyto gates stored per sample):
  every gate of sample 001 learned onto sample 002 against 002's stored counts.
* Warps, the examples file and the CLI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import cytopipe
from cytopipe.gating import Engine, load_template
from cytopipe.gating.gates import BooleanGate, Dim, EllipsoidGate, PolygonGate, RectangleGate
from cytopipe.gating.landmarks import AllOfGate
from cytopipe.gating.learn import (
    LEARNED,
    Example,
    Learner,
    landmark_warp,
    overlap,
    read_examples,
    warp_gate,
    write_examples,
)
from cytopipe.gating.template import Population, Template, _parse_transforms
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"
SEED = 5150  # never used while developing the learner


# --------------------------------------------------------------------------------------------
# unit level: warps and geometry
# --------------------------------------------------------------------------------------------
def test_landmark_warp_maps_peaks_and_moves_a_valley_threshold():
    rng = np.random.default_rng(1)
    # example: negative peak at 1, positive at 4; target: same populations shifted and stretched
    ex = np.concatenate([rng.normal(1.0, 0.3, 6000), rng.normal(4.0, 0.4, 4000)])
    tg = np.concatenate([rng.normal(1.5, 0.45, 5000), rng.normal(6.0, 0.6, 5000)])
    w = landmark_warp(ex, tg)
    assert abs(float(w(1.0)) - 1.5) < 0.1 and abs(float(w(4.0)) - 6.0) < 0.15
    # the example's threshold between the peaks lands between the target's, in proportion
    assert abs(float(w(2.5)) - 3.75) < 0.2
    assert overlap(w(ex), tg) > 0.85 > overlap(ex, tg)
    assert float(w(np.inf)) == np.inf


def test_a_threshold_on_a_valley_floor_follows_the_valley():
    from cytopipe.gating.align import at_valley, valleys

    rng = np.random.default_rng(3)

    def sample(lo: float, hi: float) -> np.ndarray:  # peaks at 1 and 4; cells smeared over [lo, hi]
        return np.concatenate([rng.normal(1, 0.3, 5000), rng.normal(4, 0.4, 5000), rng.uniform(lo, hi, 1500)])

    ex, tg = sample(1.4, 2.6), sample(2.2, 3.4)  # the valley floor: ~2.8-2.9 in ex, ~1.9-2.0 in tg
    ve, vt = valleys(ex), valleys(tg)
    (fe,), (ft,) = ve.floors, vt.floors
    w = landmark_warp(ex, tg)
    t = 0.5 * (fe[0] + fe[1]) + 0.05
    assert abs(float(w(t)) - t) < 0.1  # the peaks do not move, so the warp leaves the cut in place
    moved = at_valley(t, float(w(t)), ve, vt, w.slope(t))
    assert moved is not None and abs(moved - (0.5 * (ft[0] + ft[1]) + 0.05 * w.slope(t))) < 1e-9
    assert ft[0] - 0.05 < moved < ft[1] + 0.1
    # a cut on a flank, or on a density with one peak, stays where the warp put it
    assert at_valley(4.3, float(w(4.3)), ve, vt, 1.0) is None
    one = valleys(rng.normal(1, 0.3, 5000))
    assert one.floors == () and at_valley(1.5, 1.5, one, one, 1.0) is None


def _one_marker(events: np.ndarray, cytometer: str = "") -> SimpleNamespace:
    channels = pd.DataFrame({"pnn": ["A"], "pns": [""]})
    return SimpleNamespace(
        events=events.astype(np.float32)[:, None], channels=channels, keywords={"$CYT": cytometer}
    )


def _dim_marker(rng, shift: float, positives: float, n: int = 20000) -> np.ndarray:
    """A dim marker: a negative peak N(shift, 0.3) and positives as a continuum above it."""
    k = int(positives * n)
    return np.concatenate([rng.normal(shift, 0.3, n - k), shift + 0.3 + rng.gamma(2.0, 0.35, k)])


def test_a_threshold_above_a_one_peak_negative_moves_with_the_negative_not_the_positives():
    """The same populations 0.5 higher on the target's axis, but three times as many positives: the
    upper side of the negative's peak widens with them, so the warp through its widths at half and
    a tenth of its height stretched the threshold far too high; a threshold is shifted by the
    middle of the peak's upper half, which the positives move much less."""
    rng = np.random.default_rng(11)
    a = Dim("A", compensation=None)
    template = Template(name="t", populations={"pos": Population("pos", "root", RectangleGate([a], [0.9], [None]))},
                        compensation="none")  # fmt: skip
    example, target = _one_marker(_dim_marker(rng, 0.0, 0.1)), _one_marker(_dim_marker(rng, 0.5, 0.3))
    learner = Learner(template, [Example("ex", {"pos": template["pos"].gate})], {"ex": example})
    (t,) = learner.gate(target, sample_id="tg", medians=False).populations["pos"].gate.lower
    widths = float(landmark_warp(example.events[:, 0], target.events[:, 0])(0.9))
    print(f"\nthreshold 0.9 + 0.5 moved to {t:.3f} (the widths' warp: {widths:.3f})")
    assert abs(t - 1.4) < 0.15  # seeds 0-4 of this set-up: 0.08-0.13 above 1.4
    assert widths - 1.4 > 3 * abs(t - 1.4)  # 0.69-0.79 above


def test_saturated_events_are_left_out_of_the_alignment():
    """A target like the example (a dim marker's negative and its positives) but with a tenth of its
    events saturated ($PnR - 1: a margin pile-up `cytopipe gate` does not remove): the alignment
    read them as a density spike the example lacks (quality 0.90 vs 0.98 for the clean target; a
    fifth saturated: 0.79, flagged "aligned poorly"). The learner reads the events a fit reads
    (Engine.fit_values): the same quality and threshold as on the clean target."""
    a = Dim("A", compensation=None)
    template = Template(name="t", populations={"pos": Population("pos", "root", RectangleGate([a], [0.9], [None]))},
                        compensation="none")  # fmt: skip

    def sample(x):
        channels = pd.DataFrame({"pnn": ["A"], "pns": [""], "pnr": [6.0]})
        return SimpleNamespace(events=x.astype(np.float32)[:, None], channels=channels, keywords={})

    rng = np.random.default_rng(3)
    example, target = _dim_marker(rng, 0.0, 0.1), _dim_marker(rng, 0.0, 0.1)
    saturated = target.copy()
    saturated[rng.random(len(target)) < 0.1] = 5.0  # $PnR - 1
    learner = Learner(template, [Example("ex", {"pos": template["pos"].gate})], {"ex": sample(example)})
    clean = learner.gate(sample(target), sample_id="tg", medians=False)
    got = learner.gate(sample(saturated), sample_id="tg", medians=False)
    print(f"\nalignment quality: clean {clean.alignment['pos']:.3f}, saturated {got.alignment['pos']:.3f}")
    assert abs(got.alignment["pos"] - clean.alignment["pos"]) < 0.01
    assert abs(got.populations["pos"].gate.lower[0] - clean.populations["pos"].gate.lower[0]) < 0.01


def test_a_threshold_above_a_negative_with_a_hump_of_positives_moves_with_the_negative():
    """A dim marker's positives can form a shallow hump on the negative's shoulder (CXCR5 on
    memory CD4 in some files): the density between them stays above a fifth of the hump
    (landmarks.GAP_DEPTH), one population with humps, not two. The hump's place follows the
    positives' share and brightness, so a threshold is shifted with the negative as on one peak;
    the warp through both peaks carried it to 1.35 here (1.12 now). Two peaks with a gap between them
    (CD45RA, CD4) keep the peaks' warp."""
    rng = np.random.default_rng(5)

    def humped(neg: float, pos: float) -> np.ndarray:  # 80 % N(neg, 0.3), 20 % N(pos, 0.4)
        return np.concatenate([rng.normal(neg, 0.3, 16000), rng.normal(pos, 0.4, 4000)])

    ex, tg = humped(0.0, 1.2), humped(0.4, 1.9)  # the negative moves 0.4, the hump 0.7
    w = landmark_warp(ex, tg, threshold=True)
    print(f"\nthreshold 0.75 with a hump moved to {float(w(0.75)):.3f} (the negative: +0.4)")
    assert abs(float(w(0.75)) - 1.15) < 0.05  # before: 1.35, between the two peaks' moves
    gap = landmark_warp(humped(0.0, 3.0), humped(0.4, 3.8), threshold=True)
    assert len(gap.src) == 4 and abs(float(gap(1.5)) - 2.12) < 0.05  # peaks and their half-widths


def test_a_threshold_leans_to_the_example_recorded_on_the_targets_cytometer():
    """Two reviewers set the same data's threshold at 1.0 (cytometer A) and 1.4 (cytometer B): a
    target recorded on A gets the mean of A's gate and the median of both (1.1), one on an unnamed
    cytometer the median (1.2)."""
    rng = np.random.default_rng(5)
    a = Dim("A", compensation=None)
    template = Template(name="t", populations={"pos": Population("pos", "root", RectangleGate([a], [1.0], [None]))},
                        compensation="none")  # fmt: skip
    x = _dim_marker(rng, 0.0, 0.2)
    examples = [Example("ex_a", {"pos": RectangleGate([a], [1.0], [None])}),
                Example("ex_b", {"pos": RectangleGate([a], [1.4], [None])})]  # fmt: skip
    learner = Learner(
        template, examples, {"ex_a": _one_marker(x, "Fortessa"), "ex_b": _one_marker(x, "Aurora")}
    )
    on_a = learner.gate(_one_marker(x, "Fortessa"), sample_id="tg", medians=False)
    unnamed = learner.gate(_one_marker(x), sample_id="tg2", medians=False)
    assert on_a.populations["pos"].gate.lower[0] == pytest.approx(1.1, abs=0.01)
    assert unnamed.populations["pos"].gate.lower[0] == pytest.approx(1.2, abs=0.01)
    assert any("same cytometer" in text for _, text in on_a.sources)


def test_a_small_parents_threshold_follows_the_same_cytometers_drift_on_its_grandparent():
    """A threshold on a parent of 600 events ("small", aligned on "cells"), the target the example's
    own events as its cytometer records them after drifting (A x1.5 + 0.3, so the right threshold
    1.0 -> 1.8): the one-peak shift moves it by the negative's mode and half width only (~1.4);
    the quartiles of the grandparent ("cells", 20 000 events) carry the offset and the gain, and the
    threshold is the mean of the two. On an unnamed cytometer (no same-cytometer example) it is not
    used."""
    rng = np.random.default_rng(2)
    a, b = Dim("A", compensation=None), Dim("B", compensation=None)
    pops = {
        "cells": Population("cells", "root", RectangleGate([b], [-10.0], [None])),
        "small": Population("small", "cells", RectangleGate([b], [5.0], [None])),
        "pos": Population("pos", "small", RectangleGate([a], [1.0], [None])),
    }
    template = Template(name="t", populations=pops, compensation="none")
    x = _dim_marker(rng, 0.0, 0.2)
    y = np.where(np.arange(len(x)) % 33 == 0, 6.0, 0.0)  # every 33rd event: 606 "small" events
    channels = pd.DataFrame({"pnn": ["A", "B"], "pns": ["", ""]})

    def sample(xa, cytometer):
        return SimpleNamespace(events=np.column_stack([xa, y]).astype(np.float32), channels=channels,
                               keywords={"$CYT": cytometer})  # fmt: skip

    learner = Learner(
        template, [Example("ex", {n: p.gate for n, p in pops.items()})], {"ex": sample(x, "Fortessa")}
    )
    drifted = 1.5 * x + 0.3
    same = learner.gate(sample(drifted, "Fortessa"), sample_id="tg", medians=False)
    other = learner.gate(sample(drifted, ""), sample_id="tg2", medians=False)
    (t_same,), (t_other,) = same.populations["pos"].gate.lower, other.populations["pos"].gate.lower
    print(f"\nthreshold 1.0 -> 1.8 by the drift: same cytometer {t_same:.3f}, unnamed {t_other:.3f}")
    assert t_other < 1.5  # the one-peak shift alone
    assert t_same == pytest.approx(0.5 * (t_other + 1.8), abs=0.03)
    assert any("drift on cells" in text for _, text in same.sources)


@pytest.mark.parametrize("width", [0.42, 0.45])
def test_a_threshold_copied_after_a_failed_warp_does_not_outrank_an_aligned_one(width):
    """Example "aligned" is the target's data 0.3 higher and a little wider: its threshold 1.3 warps
    to ~0.85 at overlap 0.83 (width 0.42) or 0.79 (0.45). Example "copied" has a two-peaked negative:
    its warp fails (overlap 0.67, worse than none, 0.81), so its threshold 1.6 is copied. Ranked by
    the copy's overlap it joined the median (1.23) or, above the aligned one, won (1.6); ranked by
    its failed warp it is left out."""
    rng = np.random.default_rng(3)
    a = Dim("A", compensation=None)

    def dim(shift, sd, pos=0.15, n=20000):
        k = int(pos * n)
        return np.concatenate([rng.normal(shift, sd, n - k), shift + sd + rng.gamma(2.0, 0.35, k)])

    target = dim(0.0, 0.3)
    aligned = dim(0.3, width)
    copied = np.concatenate(
        [rng.normal(-0.3, 0.2, 10000), rng.normal(0.35, 0.2, 8000), 0.6 + rng.gamma(2.0, 0.35, 2000)]
    )
    template = Template(name="t", populations={"pos": Population("pos", "root", RectangleGate([a], [1.3], [None]))},
                        compensation="none")  # fmt: skip
    examples = [Example("aligned", {"pos": RectangleGate([a], [1.3], [None])}),
                Example("copied", {"pos": RectangleGate([a], [1.6], [None])})]  # fmt: skip
    learner = Learner(template, examples, {"aligned": _one_marker(aligned), "copied": _one_marker(copied)})
    res = learner.gate(_one_marker(target), sample_id="tg", medians=False)
    (t,) = res.populations["pos"].gate.lower
    print(f"\nwidth {width}: threshold {t:.3f}, {[text for _, text in res.sources]}")
    assert abs(t - 0.9) < 0.1
    assert any("learned from aligned," in text for _, text in res.sources)


def test_a_small_parents_shape_is_ranked_by_its_parents_own_alignment():
    """A polygon on a small parent ("small", aligned on its ancestor "cells" in example "far", whose
    600 "small" events are too few for a smooth density; on "small" itself in example "near", 2 000
    events). The cells of "far" are the target's, so the ancestor aligns well (0.94), but its
    small population sits at A ~ 2, the target's at A ~ 1: its gate (A > 3) misses the target's
    bright cells. Ranked by the ancestor's quality "far" won (F1 0.000; seed 5202's
    CD56bright NK: an example's NK aligned on Live at 0.84-0.92, its NK's own densities at
    0.16-0.20, F1 0.33-0.90 on four targets); ranked by the small parent's own densities as moved,
    "near" (A > 2, aligned on the parent itself) gates them."""
    rng = np.random.default_rng(7)
    a, b, c = (Dim(n, compensation=None) for n in "ABC")
    pops = {
        "cells": Population("cells", "root", RectangleGate([b], [-10.0], [None])),
        "small": Population("small", "cells", RectangleGate([b], [5.0], [None])),
        "bright": Population("bright", "small", PolygonGate([a, c], [[2.0, -9], [9, -9], [9, 9], [2.0, 9]])),
    }
    template = Template(name="t", populations=pops, compensation="none")
    channels = pd.DataFrame({"pnn": ["A", "B", "C"], "pns": ["", "", ""]})

    def sample(every: int, centre: float, n: int = 20000):
        small = np.arange(n) % every == 0
        bright = small & (rng.random(n) < 0.15)
        xa = np.where(small, rng.normal(centre, 0.3, n), rng.normal(0.0, 0.3, n))
        xa = np.where(bright, rng.normal(centre + 1.5, 0.15, n), xa)
        ev = np.column_stack([xa, np.where(small, 6.0, 0.0), rng.normal(0.0, 0.3, n)]).astype(np.float32)
        return SimpleNamespace(events=ev, channels=channels, keywords={}), bright

    far, _ = sample(33, 2.0)
    near, _ = sample(10, 1.0)
    target, bright = sample(15, 1.0)
    examples = [
        Example("far", {**{n: p.gate for n, p in pops.items() if n != "bright"},
                        "bright": PolygonGate([a, c], [[3.0, -9], [9, -9], [9, 9], [3.0, 9]])}),
        Example("near", {n: p.gate for n, p in pops.items()}),
    ]  # fmt: skip
    learner = Learner(template, examples, {"far": far, "near": near})
    res = learner.gate(target, sample_id="tg", medians=False)
    tp, fp, fn = _f1(res.mask("bright"), bright)
    print(f"\nbright F1 {2 * tp / (2 * tp + fp + fn):.3f}: {[t for p, t in res.sources if p == 'bright']}")
    assert any(p == "bright" and "learned from near," in t for p, t in res.sources)
    assert 2 * tp / (2 * tp + fp + fn) > 0.95


def test_an_example_on_the_targets_cytometer_is_aligned_on_the_targets_arcsinh_scale():
    """``cofactor: auto`` sets each file's arcsinh scale from its own negative population. On one
    cytometer the linear values are comparable, yet the estimate can jump: example "same" has too
    few A- cells to count as a population (8 %), and its cofactor comes from the A+ cells (18 000,
    the target's 220 with 20 % A-). Its polygon (A < 0.3 on its scale, ~5 400 linear) compared on
    the two scales as they are aligned at 0.6, and example "other" (another cytometer, 45 % A-,
    aligned at 0.75) won with its cut in the middle of the target's A- cells: F1 0.59. Seed 5187
    (Treg; CD127 cofactor 12 000 in an example vs 730-1 400 in its cytometer's other files):
    pooled F1 0.818 -> 0.947. Put on the target's scale first (the same linear values), "same"
    aligns at 0.87 and gates the A- cells."""
    rng = np.random.default_rng(11)
    a, b = Dim("A", compensation=None, transform="default"), Dim("B", compensation=None)
    template = Template(name="t", populations={"neg": Population("neg", "root", PolygonGate(
        [a, b], [[-9.0, -9], [0.3, -9], [0.3, 9], [-9.0, 9]]))}, compensation="none",
        transforms=_parse_transforms({"default": {"type": "arcsinh", "cofactor": "auto"}}))  # fmt: skip
    channels = pd.DataFrame({"pnn": ["A", "B"], "pns": ["", ""]})

    def sample(neg: float, cytometer: str, n: int = 20000):
        is_neg = rng.random(n) < neg
        x = np.where(is_neg, rng.normal(0.0, 60.0, n), np.exp(rng.normal(np.log(20000.0), 0.3, n)))
        ev = np.column_stack([x, rng.normal(0.0, 1.0, n)]).astype(np.float32)
        return SimpleNamespace(events=ev, channels=channels, keywords={"$CYT": cytometer}), is_neg

    same, _ = sample(0.08, "Aurora")
    other, _ = sample(0.45, "Fortessa")
    target, is_neg = sample(0.20, "Aurora")
    examples = [
        Example("same", {"neg": PolygonGate([a, b], [[-9.0, -9], [0.3, -9], [0.3, 9], [-9.0, 9]])}),
        Example("other", {"neg": PolygonGate([a, b], [[-9.0, -9], [-0.1, -9], [-0.1, 9], [-9.0, 9]])}),
    ]
    learner = Learner(template, examples, {"same": same, "other": other})
    res = learner.gate(target, sample_id="tg", medians=False)
    tp, fp, fn = _f1(res.mask("neg"), is_neg)
    print(f"\nA- F1 {2 * tp / (2 * tp + fp + fn):.3f}: {[t for p, t in res.sources if p == 'neg']}")
    assert any(p == "neg" and "learned from same," in t for p, t in res.sources)
    assert 2 * tp / (2 * tp + fp + fn) > 0.98


def test_warp_gate_moves_every_geometry():
    x, y = Dim("x"), Dim("y")
    warps = {x: landmark_warp([0, 1, 2, 3] * 50, [0, 2, 4, 6] * 50), y: landmark_warp([0.0] * 9, [1.0] * 9)}
    r = warp_gate(RectangleGate([x, y], [1.0, None], [None, 2.0]), warps)
    assert r.lower[1] is None and r.upper[0] is None
    p = warp_gate(PolygonGate([x, y], [[0, 0], [2, 0], [2, 2], [-np.inf, 2]]), warps)
    assert np.isneginf(p.vertices[:, 0]).any()
    e = warp_gate(EllipsoidGate([x, y], [1.0, 1.0], np.eye(2), 1.0), warps)
    assert e.center.shape == (2,)
    a = warp_gate(AllOfGate([RectangleGate([x], [1.0], [None], "range"), r]), warps)
    assert isinstance(a, AllOfGate) and len(a.parts) == 2


# --------------------------------------------------------------------------------------------
# a simulated study: 3 reviewed samples -> 21 others
# --------------------------------------------------------------------------------------------
def _truth(trial: Path, sid: str) -> dict[str, np.ndarray]:
    from cytopipe.simulate import load_labels
    from cytopipe.simulate.populations import unpack_membership

    lab = load_labels(trial / "truth" / "labels" / f"{sid}.npz")
    keep = lab["fault"] == 0
    return {str(p): unpack_membership(lab["membership"], str(p)) & keep for p in lab["populations"]}


def _f1(got: np.ndarray, want: np.ndarray) -> tuple[int, int, int]:
    return int((got & want).sum()), int((got & ~want).sum()), int((~got & want).sum())


def _candidates(gate, vals: dict) -> list:
    """One-knob variations of a gate: each finite bound over the parent's quantiles, polygons
    shifted along x or y, ellipses grown or shrunk (what dragging a gate in a plot does)."""
    out = []
    levels = np.linspace(0.005, 0.995, 100)
    if isinstance(gate, RectangleGate):
        for k, d in enumerate(gate.dims):
            qs = np.quantile(vals[d], levels) if len(vals[d]) else []
            for which in ("lower", "upper"):
                bounds = list(getattr(gate, which))
                if bounds[k] is None:
                    continue
                for q in qs:
                    b = bounds.copy()
                    b[k] = float(q)
                    lo, hi = (b, gate.upper) if which == "lower" else (gate.lower, b)
                    out.append(RectangleGate(gate.dims, lo, hi, gate.style))
    elif isinstance(gate, PolygonGate):
        for k, d in enumerate(gate.dims):
            spread = float(np.subtract(*np.quantile(vals[d], [0.75, 0.25]))) if len(vals[d]) else 0.0
            for s in np.linspace(-1.0, 1.0, 41) * spread:
                v = gate.vertices.copy()
                v[:, k] += s
                out.append(PolygonGate(gate.dims, v))
    elif isinstance(gate, EllipsoidGate):
        for f in np.linspace(0.4, 3.0, 27):
            out.append(EllipsoidGate(gate.dims, gate.center, gate.covariance, gate.distance_square * f))
    elif isinstance(gate, AllOfGate):
        for i, part in enumerate(gate.parts):
            for c in _candidates(part, vals):
                parts = list(gate.parts)
                parts[i] = c
                out.append(AllOfGate(parts))
    return out


def reviewed_gates(sample, template, truth: dict[str, np.ndarray]) -> dict:
    """The template's own fit on one sample, each gate then moved (two rounds, one knob at a time)
    to its best F1 against this sample's truth, parents first."""
    from cytopipe.gating import gate as gate_sample

    own = gate_sample(sample, template, medians=False)
    gates = {
        p.name: own.populations[p.name].gate
        for p in template
        if not isinstance(p.gate, BooleanGate) and own.populations[p.name].gate is not None
    }  # a population the fit could not gate (no gate) keeps the template's and is not reviewed
    learner_view = Learner(template, [], {})  # only for its template-with-gates builder
    for pop in template:
        if pop.name not in gates or pop.name not in truth:
            continue
        eng = Engine(
            sample.events, sample.channels, learner_view._with_gates(gates), spillover=sample.spillover
        )
        res = eng.run(medians=False)
        pidx = None if pop.parent == "root" else res.indices(pop.parent)
        g = gates[pop.name]
        vals = {d: eng.values(d, pidx, pop.parent) for d in g.dims}
        want = truth[pop.name] if pidx is None else truth[pop.name][pidx]

        def score(gate_, vals=vals, want=want):
            tp, fp, fn = _f1(gate_.contains([vals[d] for d in gate_.dims]), want)
            return 2 * tp / max(2 * tp + fp + fn, 1)

        best, best_f1 = g, score(g)
        for _ in range(2):
            for c in _candidates(best, vals):
                f = score(c)
                if f > best_f1 + 1e-9:
                    best, best_f1 = c, f
        gates[pop.name] = best
    return gates


def _study(folder: Path, patients: int, events: int) -> SimpleNamespace:
    from cytopipe.simulate import instrument_trial

    instrument_trial(folder, instrument="random", seed=SEED, patients=patients, visits=(0, 12), events=events,
                     control_events=100)  # fmt: skip
    manifest = pd.read_csv(folder / "manifest.csv", dtype={"sample_id": str, "patient_id": str})
    manifest = manifest[manifest["control"].isna()].reset_index(drop=True)
    # one reviewed sample per site (instrument): the first file of each site in the manifest
    reviewed = list(manifest.drop_duplicates("site")["sample_id"])
    return SimpleNamespace(folder=folder, manifest=manifest, reviewed=reviewed)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    return _study(tmp_path_factory.mktemp("learn") / "small", patients=2, events=5000)


# Measured on seed 5150 (issue 10's Done-when line, not met yet), last on 2026-12-07 12:57 UTC
# after two fixes found on fresh studies (a small parent's polygon ranked by its own alignment,
# 5202; a same-cytometer example put on the target's arcsinh scale, 5187): Th17 0.948, activated
# cTfh 0.916 (0.918 before them), Th1 0.974, Treg 0.985, cTfh 0.985, CD56bright NK 0.998, the rest
# >= 0.998. Earlier: pooled F1 >= 0.995 for the
# scatter, viability, T, CD4/CD8, memory and NK gates, Treg 0.985, Th1 0.970, cTfh 0.985, Th17
# 0.951, but activated cTfh 0.922 (2026-12-06 13:01 UTC, the simulated files carrying each
# instrument's serial number $CYTSN, so the same-cytometer rule below no longer pools two sites of
# one cytometer model; tuning studies 5151-5160: Th17 0.9516 -> 0.9560, activated cTfh 0.9181 ->
# 0.9254; and again at 13:34 UTC, the same, after a copy made where a warp failed is ranked by that
# warp's quality: tuning activated cTfh 0.9254 -> 0.9278). Before $CYTSN Th17 0.938 and activated
# cTfh 0.926, Th1 0.951 (2026-12-06 09:45 UTC, with a threshold above a one-peak negative
# shifted by the middle of the peak's upper half (align.THRESHOLD_SHIFT_LEVEL) and a threshold
# averaged with the same cytometer's example's (learn.SAME_CYTOMETER_WEIGHT), both chosen on tuning
# seeds 5151-5160, figures in docs/gating.md section 6b). Before them Th17 0.935, activated cTfh
# 0.921, Th1 0.953, cTfh 0.973 (2026-12-06 07:35 UTC, after the per-file cofactor estimate stopped
# taking half of a split wide negative for the negative; 0.934 / 0.914 before it, with thresholds
# set on a valley floor moved to the
# target's valley, chosen for gs_DC_auto below and checked on tuning seeds 5151-5153: every pooled
# F1 within 0.001 there; here Th17 0.932 -> 0.934, Th1 0.955 -> 0.953, CD56bright NK 0.999 ->
# 0.998, the rest unchanged). Before it (2026-12-05, with learn.QUALITY_BAND: only examples aligned within
# 0.05 of the best one are combined; chosen on tuning seeds 5151-5156 and confirmed on 5157, 5158
# and 5160 (Th17 +0.007 / +0.004 / 0.000, activated cTfh 0.000 / +0.003 / +0.021, cTfh 0.000 /
# +0.002 / +0.021; 5159: within 0.001, cTfh -0.005); here it moved Th17 0.939 -> 0.932, activated cTfh 0.919 -> 0.911, cTfh 0.971 ->
# 0.973, Th1 unchanged; an ancestor's warp checked on the small parent then 0.911 -> 0.914) (the
# dim CXCR3/CCR6/PD-1 continua: a threshold 0.07 arcsinh off
# the best one costs ~0.07 F1 there; the reviewed PD-1 thresholds themselves, F1-optimal on a few
# hundred cTfh each, scatter by ~0.15 arcsinh, and on some files even each file's own best PD-1
# threshold under the learned cTfh gate scores < 0.95). History, each rule chosen on other seeds
# and checked here once: before one-peak axes were warped by their half- and tenth-maximum widths
# and small parents aligned on an ancestor (seeds 5151/5152): Th17 0.926, Th1 0.944, activated
# cTfh 0.879; before a width crossing beyond another peak was dropped (seeds 5151-5156): Th17
# 0.936, Th1 0.953, cTfh 0.951, activated cTfh 0.897, Treg 0.979. strict: the test fails as soon
# as the line holds. The ceiling of any threshold transfer (each target's own best gates, chosen as
# the examples are, on its own truth; measured 2026-12-04): seed 5150 Th17 0.981, activated cTfh
# 0.964; tuning seed 5151 0.984 / 0.979. Tried on tuning seeds 5151/5152 and not kept: the example
# whose parent densities agree best with the target's before warping (flowLearn's nearest
# prototype) instead of the median of three: Th17 0.946 -> 0.958 and 0.956 -> 0.951, activated
# cTfh 0.942 -> 0.932 and 0.940 -> 0.899, cTfh 0.972 -> 0.905 on 5152. Also tried there on
# 2026-12-05 and not kept (pooled F1 on 5151 / 5152, Th17 and activated cTfh; the landmark warp gives
# 0.946 / 0.956 and 0.942 / 0.940): thresholds moved as the FMO alignment moves them (the affine
# gain and offset of the negative peak's mode and mirrored 99.5th percentile, linear units, median
# of memory CD4, CD4 T and T cells): 0.955 / 0.962 and 0.911 / 0.920; a gain alone: 0.942 / 0.961,
# 0.915 / 0.914; either from the same site's example only: 0.931-0.969, 0.874-0.932; warping on
# one display scale (each file has its own auto cofactor in a multi-instrument study): 0.944 /
# 0.959, 0.925 / 0.938; each moved threshold shrunk toward the example's by its bootstrap variance
# (8 resamples; move = d^2 / (d^2 + var)): 0.949 / 0.953, 0.939 / 0.944. Within a site the warp's
# scatter (~0.14 arcsinh on PD-1) exceeds the files' drift (~0.06), but the reviewed thresholds
# are themselves ~0.1 off their neighbours', so copying them does no better. Tried 2026-12-05 on
# tuning seeds 5151-5153 and not kept (pooled F1 Th17 / activated cTfh; the learner: 0.960 / 0.941,
# 0.943 / 0.951, 0.969 / 0.940): the template's own fit on the target moved by the examples'
# corrections (reviewed minus fitted threshold, median of the three or the same site's): 0.941 /
# 0.904, 0.923 / 0.872, 0.942 / 0.917 and 0.922 / 0.922, 0.955 / 0.889, 0.890 / 0.864 (the fit
# alone, without FMO controls in this study: 0.888 / 0.859, 0.896 / 0.834, 0.938 / 0.916); the
# mean of that and the learned threshold: 0.955 / 0.933, 0.942 / 0.917, 0.966 / 0.933 (median) and
# 0.945 / 0.956, 0.957 / 0.923, 0.962 / 0.935 (site). Tried 2026-12-05 on tuning seeds 5151 / 5152
# and not kept (pooled F1 Th17 / activated cTfh; the learner: 0.960 / 0.941, 0.943 / 0.951): each
# axis warped through a two-component Gaussian mixture of the parent (the components' means and
# +-2 SD as knots; openCyto's flowClust K=2 idea): 0.895 / 0.883, 0.922 / 0.942; the mean of that
# warp and the landmark warp: 0.934 / 0.911, 0.943 / 0.941; thresholds moved to the target's point
# of the example's posterior log-ratio: 0.870 / 0.894, 0.890 / 0.883 (and every other population
# down to ~0.93). Tried 2026-12-05 (afternoon) on tuning seeds 5151 / 5152 and not kept (pooled F1
# Th17 / activated cTfh; the learner: 0.960 / 0.941, 0.943 / 0.951): a finer simulated reviewer
# (400 quantile levels, 161 polygon shifts) on 5151: 0.961 / 0.944, so the reviewer's grid is not
# what limits; the same study with 100,000 events per file on 5151: 0.951 / 0.921 (the ceiling
# 0.983 / 0.980), so it is not sampling noise either: at that depth the PD-1 thresholds land on
# average 0.06 arcsinh above each target's best, a bias of the transfer itself; only the reviewed
# sample(s) of the target's own site (instrument): 0.958 / 0.942, 0.957 / 0.932; the best-aligned
# example alone when only two are within the quality band: 0.960 / 0.938, 0.952 / 0.942; always
# the best-aligned one: 0.960 / 0.929, 0.952 / 0.936.
# Tried 2026-12-06 on tuning seeds 5151-5156 and not kept (pooled F1 on each, Th17 / activated
# cTfh; the learner: 0.959 0.943 0.969 0.935 0.939 0.936 / 0.940 0.951 0.940 0.899 0.921 0.879):
# a composition confound. Within a site the upper side of a dim marker's one-peak density widens
# with the parent's share of positives (correlation of the tenth-maximum crossing with the true
# positive fraction: CCR6 +0.36, CXCR5 +0.19, CXCR3 +0.16, PD-1 +0.11; of each file's best
# threshold: -0.10 to +0.10), and a transferred threshold's error grows with the target's share
# (from one example: CXCR3 r = 0.50, ~1.0 arcsinh per unit of fraction; PD-1 0.25; CXCR5 0.24;
# CCR6 0.08): a quarter of CXCR3's error variance, ~6 % of PD-1's; at 100,000 events per file on
# 5151 it accounts for ~0.003 of the PD-1 thresholds' +0.052 mean bias, which goes by instrument
# (targets of site S3 +0.08, S1 +0.03, S2 -0.09). Thresholds above a one-peak negative moved on
# the negative's own mode and lower half-width only (t = mode_t + (t_ex - mode_ex) w_t / w_ex):
# 0.829 0.926 0.941 0.900 0.853 0.854 / 0.927 0.916 0.894 0.835 0.846 0.872, and Treg 0.971 ->
# 0.733 on 5156 (the lower tenth-width, 5151 / 5152: 0.883 / 0.929, 0.929 / 0.921): the mode and
# the lower side do not place a dim marker's best threshold (coefficient of variation of (best -
# mode) over the lower half-width 0.26-0.32, over the upper one 0.12-0.17; on 5151's site S1 the
# PD-1 mode wanders over 0.21-0.63 arcsinh while each file's best threshold is within 1.17-1.36;
# a shift matching a lower crossing alone: Th17 0.674 on 5155). Re-scored on the four dim-marker
# gates alone (mean over the six; the learner: Th17 0.947, activated cTfh 0.922, cTfh 0.959): a
# shift matching the upper half-maximum crossing (no scale): 0.949, 0.927, 0.965, but Th17 0.950
# on 5151; the same site's reviewed sample only: 0.952, 0.928, cTfh 0.945; a least-squares line
# through the crossings at 0.8-0.2 of the peak (upper side, or both): 0.939-0.941, 0.923-0.930.
# 2026-12-06 15:41 UTC, with the small-parent drift rule and the humps shift (align.py): Th17
# 0.951 -> 0.948, activated cTfh 0.922 -> 0.918 here; on ten fresh validation studies (5171-5180)
# both rose (activated cTfh +0.0145, 10 of 10; Th17 +0.0035, 8 of 9 that moved): docs/gating.md 6b.
# Tried 2026-12-07 00:05-00:45 UTC and not kept: a negative reference by biology, naive CD4 T
# cells (CD4 T not Memory CD4) for the CXCR3, CCR6, CXCR5 and PD-1 cuts aligned on Memory CD4 (all
# of it negative, so no composition confound). Mean of the landmark warp's threshold and the
# affine map of the naive cells' median and 90th percentile (chosen on 5151-5153 of 50/80, 50/90,
# 50/95, 25/90, shifts and half-maximum landmarks): tuning 5151-5160 Th17 0.9636 -> 0.9687,
# activated cTfh 0.9387 -> 0.9409; fresh validation 5181-5190 Th17 0.9526 -> 0.9506, activated
# cTfh 0.9513 -> 0.9492 (4 / 5 and 5 / 5 studies up / down), so 5150 was not run. Figures of every
# variant (reference-quality ranking, drift and percentile maps on it) in docs/gating.md 6b. Nor a
# two-axis rectangle's axes aligned on the slab its other axis cuts: tuning 5151-5155 Th17 -0.0016.
# Tried 2026-12-07 11:50-12:20 UTC and not kept: a deconvolved, F1-optimal threshold per target.
# On a bound above a one-peak parent density (judged at the learner's bandwidth), the negative is
# the part below its mode mirrored (g(x) = f(2m - x)), the positives the excess max(f - g, 0), t* the
# cut maximising the expected F1 of the positives; the examples' median of (reviewed - own t*) in
# lower half-widths of the negative is carried to the target's t*. Tuning 5151-5160 (mean pooled F1
# Th17 / activated cTfh; the learner 0.9636 / 0.9387): as proposed, replacing the learned threshold:
# 0.8619 / 0.7129 (cTfh 0.8531); same-cytometer example, mode on a 4x Silverman density, Gaussian
# negative from mode and lower half-width: 0.9475 / 0.9121; mean with the learned threshold (weight
# 0.2 on t*): 0.9648 / 0.9403, at most +0.0015 over every variant (negatives above t counted below
# 2m - t, weight 0.1: 0.9651 / 0.9402; all examples' median: 0.9634 / 0.9358; 2x / 6x bandwidth:
# 0.9629 / 0.9386, 0.9609 / 0.9367; upper bounds left alone or by the negatives' F1: within 0.0003),
# short of +0.005, so not validated (fresh studies 5201-5210 are prepared, no variant run on them;
# the learner there: 0.9573 / 0.9390). Why (5151-5156, each target's truth-best 1-D cut on its
# parent): rms error of the learned CXCR5 / PD-1 / CCR6 / CXCR3 cuts 0.043 / 0.052 / 0.035 / 0.038,
# of t* carried from the same site's example 0.155 / 0.247 / 0.140 / 0.096 (Gaussian negative on a
# 4x density: 0.056 / 0.084 / 0.048 / 0.072): one file's t* scatters more than the transfer
# misses; within a site the best cut hardly follows the positives' share (r -0.06 to +0.11) while
# t* does (Th1 +0.54: positives near the mode are read as the negative's shape), and its errors
# correlate +0.3 to +0.6 with the learned cut's. An asymmetric mirror whose stretch is set so each
# example's t* is its reviewed cut: worse still.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="activated cTfh and Th17 below F1 0.95 on 5150 (see comment)")
def test_learned_gates_on_21_samples_of_a_random_instrument_study(tmp_path):
    study = _study(tmp_path / "trial", patients=12, events=20000)
    assert len(study.manifest) == 24
    template = load_template(TEMPLATE)
    samples = {r.sample_id: cytopipe.read_fcs(study.folder / r.file) for r in study.manifest.itertuples()}
    examples = [
        Example(sid, reviewed_gates(samples[sid], template, _truth(study.folder, sid)))
        for sid in study.reviewed
    ]
    # through the examples file, as a scientist's reviewed gates would arrive
    path = write_examples(tmp_path / "examples.yaml", examples, note="fitted, then corrected on 3 samples")
    learner = Learner(template, read_examples(path, template), {s: samples[s] for s in study.reviewed})

    totals: dict[str, list[int]] = {}
    per_sample: dict[str, list[float]] = {}
    flagged = 0
    targets = [s for s in samples if s not in study.reviewed]
    assert len(targets) == 21
    for sid in targets:
        res = learner.gate(samples[sid], sample_id=sid, medians=False)
        truth = _truth(study.folder, sid)
        for pop in template:
            if pop.name not in truth:
                continue
            tp, fp, fn = _f1(res.mask(pop.name), truth[pop.name])
            t = totals.setdefault(pop.name, [0, 0, 0])
            t[0] += tp
            t[1] += fp
            t[2] += fn
            per_sample.setdefault(pop.name, []).append(2 * tp / max(2 * tp + fp + fn, 1))
            if not isinstance(pop.gate, BooleanGate):
                assert res.populations[pop.name].source == LEARNED
        flagged += sum(1 for _, f in res.flags if "aligned poorly" in f)
        assert set(res.alignment) == {p.name for p in template if not isinstance(p.gate, BooleanGate)}

    rows = []
    for pop, (tp, fp, fn) in totals.items():
        f = per_sample[pop]
        rows.append((pop, 2 * tp / (2 * tp + fp + fn), float(np.median(f)), float(np.min(f))))
    print(f"\nlearned gates, 3 reviewed samples {study.reviewed} -> 21 others (seed {SEED}); "
          f"{flagged} gate(s) flagged for poor alignment")  # fmt: skip
    print(f"{'population':<16}{'F1 (pooled)':>12}{'median':>9}{'min':>8}")
    for pop, pooled, med, mn in rows:
        print(f"{pop:<16}{pooled:>12.3f}{med:>9.3f}{mn:>8.3f}")
    low = [(p, round(v, 3)) for p, v, _, _ in rows if v < 0.95]
    assert not low, f"pooled F1 below 0.95: {low}"


# --------------------------------------------------------------------------------------------
# real data: flowWorkspaceData gs_DC_auto, learned from sample 001 onto sample 002
# --------------------------------------------------------------------------------------------
def test_gs_dc_auto_gates_learned_from_001_reproduce_002():
    from tests.support.gatingset_pb import read_gatingset_pb, read_h5_events, to_template

    extdata = shared_path("flowWorkspaceData", "inst", "extdata", "gs_DC_auto")
    name = "DC_MONO_NK_12828001_{}.fcs"
    ev1, ch1 = read_h5_events(extdata / (name.format("001") + ".h5"))
    ev2, ch2 = read_h5_events(extdata / (name.format("002") + ".h5"))
    s1 = SimpleNamespace(events=ev1, channels=ch1)
    s2 = SimpleNamespace(events=ev2, channels=ch2)
    t1 = to_template(read_gatingset_pb(extdata / (name.format("001") + ".pb")))
    learner = Learner(t1, [Example("001", {p.name: p.gate for p in t1})], {"001": s1})
    res = learner.gate(s2, sample_id="002", medians=False)
    copied = Engine(ev2, ch2, t1).run(medians=False)  # 001's gates applied unchanged, for comparison

    counts = pd.read_csv(
        shared_path("flowWorkspaceData", "_derived", "gatingset_counts", name.format("002") + ".counts.tsv"),
        sep="\t",
    )
    stored = {r.path[5:]: int(r.flowcore_count) for r in counts.itertuples() if r.path != "root"}
    print("\ngs_DC_auto 002: gates learned from 001 vs stored counts (and 001's gates copied)")
    print(f"{'node':<16}{'stored':>8}{'learned':>9}{'rel %':>8}{'pp':>7}{'copied rel %':>14}{'quality':>9}")
    worst_pp, big_rel, small_pp = 0.0, [], 0.0
    for node, want in stored.items():
        got, cp = res.populations[node].count, copied.populations[node].count
        parent = t1[node].parent
        pw = stored.get(parent, len(ev2)) if parent != "root" else len(ev2)
        pg = res.populations[node].parent_count
        pp = abs(100 * got / pg - 100 * want / pw)
        rel = 100 * (got / want - 1)
        print(f"{node.split('/')[-1]:<16}{want:>8}{got:>9}{rel:>+8.2f}{pp:>7.2f}{100 * (cp / want - 1):>+14.2f}"
              f"{res.alignment[node]:>9.3f}")  # fmt: skip
        if want >= 1000 and abs(rel) > 2:
            big_rel.append(node)
        if pw >= 1000:
            worst_pp = max(worst_pp, pp)
        else:  # the four DC nodes under HLADR+ (~600 events), aligned on a larger ancestor: 0.0-0.4 pp
            small_pp = max(small_pp, pp)  # (0.3-13.7 pp before the ancestor's warp was checked on them)
        assert res.populations[node].source == LEARNED
    print(f"worst |% of parent - stored| where the parent has >= 1000 events: {worst_pp:.2f} pp; "
          f"nodes >= 1000 events off by more than 2% of their count: {big_rel}")  # fmt: skip
    print(f"worst |% of parent - stored| where the parent has < 1000 events: {small_pp:.2f} pp")
    # issue 10's Done-when line: every node of >= 1000 stored events within 2 % of its count (worst
    # 0.70 %, CD16-CD56+, since thresholds set on a valley floor move to the target's valley; before:
    # the NK quadrants CD16-CD56- -2.07 %, CD16-CD56+ -3.00 %, CD16+CD56+ +2.14 %). Near the noise:
    # with the valley floor at 1.5 / 3 standard errors instead of 2 the worst is 2.95 % / 1.30 %, and
    # learned the other way (002's gates onto 001) 4.26 % (CD16-CD56-; 8.41 % before the rule).
    assert not big_rel, f"nodes >= 1000 events off by more than 2 % of their count: {big_rel}"
    assert worst_pp <= 2.0
    assert small_pp <= 3.0
    nk = [n for n in stored if n.split("/")[-1] in ("CD16+CD56+", "CD16-CD56+", "CD16+CD56-", "CD16-CD56-")]
    assert len(nk) == 4
    # aligning the densities does better than copying 001's gates unchanged (summed over NK nodes)
    learned_err = sum(abs(res.populations[n].count / stored[n] - 1) for n in nk)
    copied_err = sum(abs(copied.populations[n].count / stored[n] - 1) for n in nk)
    print(f"NK nodes, summed |relative count error|: learned {learned_err:.3f}, copied {copied_err:.3f}")
    assert learned_err < copied_err


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
def test_cli_gate_with_examples(small_study, tmp_path):
    study = small_study
    template = load_template(TEMPLATE)
    sid = study.reviewed[0]
    s = cytopipe.read_fcs(study.folder / study.manifest.set_index("sample_id").loc[sid, "file"])
    from cytopipe.gating import gate as gate_sample

    own = gate_sample(s, template, medians=False)
    ex = Example(
        sid, {p.name: own.populations[p.name].gate for p in template if not isinstance(p.gate, BooleanGate)}
    )
    path = write_examples(tmp_path / "ex.json", [ex])
    files = [study.folder / f for f in study.manifest["file"][:2]]
    assert study.manifest["sample_id"][0] == sid
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cytopipe", "gate", *map(str, files), "--template", str(TEMPLATE),
           "--examples", str(path), "--out", str(out), "--quiet", "--no-pool"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ,
                          "PYTHONPATH": str(REPO)}, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ps = pd.read_parquet(out / "population_stats.parquet")
    assert set(ps["sample_id"]) == {Path(f).stem for f in files}
    assert "gate_source" in ps.columns
    gated = ps[~ps["population"].isin(["CD56dim NK", "NK"])]  # booleans of learned gates
    assert set(gated["gate_source"]) == {LEARNED}
    # the reviewed sample itself gets exactly its reviewed gates
    mine = ps[ps["sample_id"] == sid].set_index("population")["count"]
    assert int(mine["T cells"]) == own.populations["T cells"].count

    missing = subprocess.run(
        [*cmd[:4], *map(str, files[1:]), "--template", str(TEMPLATE), "--examples", str(path), "--out", str(tmp_path / "o2")],
        capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert missing.returncode == 2 and sid in missing.stderr and "examples" in missing.stderr


# --------------------------------------------------------------------------------------------
# a workflow with `examples:` through `cytopipe run` (in process, synchronous scheduler)
# --------------------------------------------------------------------------------------------
def test_workflow_examples_through_run(small_study, tmp_path):
    import yaml

    from cytopipe.pipeline import EXIT_OK, run_workflow
    from cytopipe.store import read_table
    from cytopipe.workflow import load_workflow

    study = small_study
    template = load_template(TEMPLATE)
    sid = study.reviewed[0]
    s = cytopipe.read_fcs(study.folder / study.manifest.set_index("sample_id").loc[sid, "file"])
    from cytopipe.gating import gate as gate_sample

    own = gate_sample(s, template, medians=False)
    gates = {p.name: own.populations[p.name].gate for p in template if not isinstance(p.gate, BooleanGate)}
    path = write_examples(tmp_path / "examples.yaml", [Example(sid, gates)])
    spec = {"study": "learned", "manifest": str(study.folder / "manifest.csv"), "template": str(TEMPLATE),
            "examples": str(path), "output": str(tmp_path / "run"), "report": {"enabled": False},
            "statistics": {"enabled": False}}  # fmt: skip
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    wf = load_workflow(tmp_path / "wf.yaml")
    assert wf.examples == path.resolve()
    result = run_workflow(wf, scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_OK, result.summary()
    ps = read_table(tmp_path / "run", "population_stats")
    assert len(set(ps["sample_id"])) == len(study.manifest)
    review = pd.read_parquet(tmp_path / "run" / "gate_review.parquet")
    sources = set(review.loc[~review["population"].isin(["CD56dim NK", "NK"]), "source"])  # booleans
    assert sources == {LEARNED}, sources
    # exports re-process samples as the run did: the learner is rebuilt (the cache key matches)
    from cytopipe.pipeline import load_run

    assert load_run(tmp_path / "run").state.learner is not None
    # the reviewed sample keeps exactly its reviewed gates (event QC may drop a few events first)
    mine = ps[ps["sample_id"] == sid].set_index("population")
    assert (
        abs(int(mine.loc["T cells", "count"]) - own.populations["T cells"].count)
        <= 0.01 * own.populations["T cells"].count
    )


def test_review_export_entries_rebuild_their_gates(tmp_path):
    """An examples file as `cytopipe review --examples` writes it (panel shapes, no `gate` field):
    range, rectangle/quadrant, polygon and ellipse gates come back on the template's axes; a
    half-plane (diagonal) panel cannot, and is left to the template (logged, not guessed)."""
    import yaml

    template = load_template(TEMPLATE)
    entries = [
        {"sample_id": "S1", "population": "T cells", "gate_type": "auto", "dims": ["CD3"],
         "shapes": [{"kind": "range", "x": [2.5, None]}]},
        {"sample_id": "S1", "population": "CD4 T", "gate_type": "quadrant", "dims": ["CD4", "CD8"],
         "shapes": [{"kind": "rect", "x": [2.0, None], "y": [None, 2.2]}]},
        {"sample_id": "S1", "population": "Singlets", "gate_type": "singlets", "dims": ["FSC-A", "FSC-H"],
         "shapes": [{"kind": "polygon", "vertices": [[0, 0], [1e12, 9e11], [9e11, 1e12]]}]},
        {"sample_id": "S1", "population": "Lymphocytes", "gate_type": "lymphocytes", "dims": ["FSC-A", "SSC-A"],
         "shapes": [{"kind": "ellipse", "center": [5e4, 2e4], "covariance": [[1e8, 0], [0, 4e7]],
                     "distance_square": 9.0}]},
        {"sample_id": "S1", "population": "Treg", "gate_type": "diagonal", "dims": ["CD25", "CD127"],
         "shapes": [{"kind": "polygon", "vertices": [[0, 0], [1, 0], [1, 1]], "half_plane": True}]},
    ]  # fmt: skip
    path = tmp_path / "review_examples.yaml"
    path.write_text(
        yaml.safe_dump({"format": "cytopipe-gate-examples/1", "examples": entries}), encoding="utf-8"
    )
    (ex,) = read_examples(path, template)
    assert set(ex.gates) == {"T cells", "CD4 T", "Singlets", "Lymphocytes"}
    t = ex.gates["T cells"]
    assert isinstance(t, RectangleGate) and t.lower == (2.5,) and t.upper == (None,)
    assert t.dims == template["T cells"].gate.dims  # the template's axes (its transform)
    q = ex.gates["CD4 T"]
    assert q.lower == (2.0, None) and q.upper == (None, 2.2) and q.style == "quadrant"
    assert isinstance(ex.gates["Singlets"], PolygonGate)
    e = ex.gates["Lymphocytes"]
    assert isinstance(e, EllipsoidGate) and e.distance_square == 9.0
    with pytest.raises(Exception, match="does not have"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"format": "cytopipe-gate-examples/1", "examples": [
            {**entries[0], "population": "Basophils"}]}), encoding="utf-8")  # fmt: skip
        read_examples(bad, template)


def test_flowjo_workspace_gates_learned_onto_a_gain_changed_copy():
    """FlowSOM's 68983.fcs with its FlowJo workspace as the example; the target is the same file as
    another instrument setting would record it (every fluorescence channel x1.3, scatter x1.1), so
    the right membership is known per event: the FlowJo gates on the original events."""
    import dataclasses

    from cytopipe.gating.flowjo import read_flowjo_workspace

    folder = shared_path("FlowSOM", "inst", "extdata")
    template = read_flowjo_workspace(folder / "gating.wsp")
    (example,) = read_examples(folder / "gating.wsp", template)
    assert example.sample_id == "68983" and len(example.gates) == len(template.populations)
    s = cytopipe.read_fcs(folder / "68983.fcs")
    truth = Engine(s.events, s.channels, template, spillover=s.spillover).run(medians=False)
    events = s.events.copy()
    for i, name in enumerate(s.channels["pnn"]):
        if name != "Time":
            events[:, i] *= np.float32(1.1 if str(name).startswith(("FSC", "SSC")) else 1.3)
    target = dataclasses.replace(s, events=events)
    learned = Learner(template, [example], {"68983": s}).gate(target, sample_id="gain", medians=False)
    copied = Engine(events, s.channels, template, spillover=s.spillover).run(medians=False)

    def f1(mask, want):
        return 2 * (mask & want).sum() / max(mask.sum() + want.sum(), 1)

    print("\n68983 x1.3 gain: F1 against the FlowJo gates on the original events")
    scores = {}
    for pop in template:
        want = truth.mask(pop.name)
        scores[pop.name] = (
            f1(learned.mask(pop.name), want),
            f1(copied.mask(pop.name), want),
            int(want.sum()),
        )
        print(
            f"  {pop.name:<14}{want.sum():>7}  learned {scores[pop.name][0]:.3f}  copied {scores[pop.name][1]:.3f}"
        )
    assert np.mean([v[0] for v in scores.values()]) > np.mean([v[1] for v in scores.values()])
    # populations of >= 1000 events (in smaller ones a few cells move F1 by 0.01-0.03)
    low = {p: round(v[0], 3) for p, v in scores.items() if v[2] >= 1000 and v[0] < 0.95}
    assert not low, low


def test_poor_alignment_is_flagged_and_the_gate_still_applied():
    """A target whose parent looks nothing like the example's: the gate is applied anyway (a value,
    never a dropped sample) and flagged with its alignment quality."""
    rng = np.random.default_rng(7)
    channels = pd.DataFrame({"pnn": ["A"], "pns": [""]})
    a = Dim("A", compensation=None)
    template = Template(name="t", populations={"pos": Population("pos", "root", RectangleGate([a], [2.0], [None]))},
                        compensation="none")  # fmt: skip
    example = SimpleNamespace(events=np.concatenate([rng.normal(0, 0.3, 3000), rng.normal(4, 0.3, 3000)])
                              .astype(np.float32)[:, None], channels=channels)  # fmt: skip
    odd = SimpleNamespace(events=rng.uniform(-5, 9, 6000).astype(np.float32)[:, None], channels=channels)
    alike = SimpleNamespace(events=example.events + np.float32(0.5), channels=channels)
    learner = Learner(template, [Example("ex", {"pos": template["pos"].gate})], {"ex": example})
    bad = learner.gate(odd, sample_id="odd", medians=False)
    good = learner.gate(alike, sample_id="alike", medians=False)
    assert bad.alignment["pos"] < 0.8 <= good.alignment["pos"]
    assert any("aligned poorly" in f for _, f in bad.flags) and not good.flags
    assert bad.populations["pos"].count > 0 and bad.populations["pos"].source == LEARNED
    # the shifted copy: its threshold moved by the shift, so the same events are inside
    assert good.populations["pos"].count == int((example.events[:, 0] >= 2.0).sum())
