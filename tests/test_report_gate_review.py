"""Gate-review data (per sample, event-free) and the gate outlier rule."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.path import Path as MPath

from cytopipe.errors import ReportError
from cytopipe.report.gate_review import (
    GATE_REVIEW_COLUMNS,
    gate_review_data,
    panel_arrays,
    panel_background,
    read_gate_review,
    write_gate_review,
)
from cytopipe.report.outliers import gate_outliers
from tests.report_support import TEMPLATE


@pytest.fixture(scope="module")
def gated(sample_data):
    from cytopipe.fcs import read_fcs
    from cytopipe.gating import gate, load_template

    template = load_template(TEMPLATE)
    sample = read_fcs(sample_data / "fcs" / "P003_W12.fcs")
    result = gate(sample, template)
    return sample, template, result, gate_review_data(sample, result, "P003_W12")


def _inside_count(row) -> float:
    """Events of the panel's histogram whose bin centre lies inside the drawn gate."""
    xe, ye, counts = panel_arrays(row)
    xc = (xe[:-1] + xe[1:]) / 2
    if row["y"]:
        x, y = np.meshgrid(xc, (ye[:-1] + ye[1:]) / 2)
    else:
        x, y = xc, None
    inside = np.ones(x.shape, dtype=bool)
    for s in json.loads(row["shapes"]):
        if s["kind"] in ("rect", "range"):
            m = np.ones(x.shape, dtype=bool)
            bounds = [(x, s["x"])] + ([(y, s["y"])] if "y" in s else [])
            for v, (lo, hi) in bounds:
                if lo is not None:
                    m &= v >= lo
                if hi is not None:
                    m &= v < hi
        elif s["kind"] == "ellipse":
            d = np.stack([x - s["center"][0], y - s["center"][1]], -1)
            m = np.einsum("...i,ij,...j->...", d, np.linalg.inv(s["covariance"]), d) <= s["distance_square"]
        else:
            pts = np.column_stack([x.ravel(), y.ravel()])
            m = MPath(np.asarray(s["vertices"])).contains_points(pts).reshape(x.shape)
        inside &= ~m if s.get("negate") else m
    return float(counts[inside].sum())


def test_one_row_per_population_and_panel_with_the_gating_numbers(gated):
    sample, _, result, review = gated
    assert list(review.columns) == GATE_REVIEW_COLUMNS
    stats = result.to_population_stats({"sample_id": "P003_W12"}).set_index("population")
    first = review[review["panel"] == 0].set_index("population")
    assert list(first.index) == list(result.populations)
    assert (first["count"] == stats["count"]).all()
    assert (first["parent_count"] == stats["parent_count"]).all()
    # Treg (CD25 x CD127 x FOXP3) has two panels, each showing the events that pass the other gate
    treg = review[review["population"] == "Treg"].set_index("panel")
    assert list(treg.index) == [0, 1]
    assert (treg.loc[0, "x"], treg.loc[0, "y"]) == ("CD25", "CD127")
    assert treg.loc[0, "condition"].startswith("FOXP3 >= ")
    assert treg.loc[1, "x"] == "FOXP3" and treg.loc[1, "y"] == "" and treg.loc[1, "y_bins"] == 0
    assert "CD25 >= " in treg.loc[1, "condition"] and "CD127 < " in treg.loc[1, "condition"]
    # a boolean gate is drawn as its sibling's gate, inverted: CD56dim NK = not CD56bright NK
    dim = json.loads(first.loc["CD56dim NK", "shapes"])
    # (CD56bright NK is a CD56 up / CD16 down diagonal gate: a half-plane drawn as its boundary line)
    assert dim[0]["kind"] == "polygon" and len(dim[0]["line"]) == 2
    assert dim[0]["negate"] and dim[0]["of"] == "CD56bright NK"
    assert first.loc["Lymphocytes", "x_scale"] == "linear"
    # fluorescence: arcsinh with the channel's cofactor the engine used (`cofactor: auto`)
    cd3 = result.transforms[result.channel_of[first.loc["T cells", "x"]]]["cofactor"]
    assert first.loc["T cells", "x_scale"] == f"arcsinh(x/{cd3:g})"
    # the numbers the outlier rule compares: thresholds, centres, singlet ratios
    assert list(first.loc["Treg", "param_names"]) == [
        "CD25 >= (diagonal crossing)",
        "CD127 < (diagonal crossing)",
        "FOXP3 >=",
    ]
    assert list(first.loc["Lymphocytes", "param_names"]) == ["FSC-A centre", "SSC-A centre"]
    lo, hi = sorted(first.loc["Singlets", "params"])
    assert 0.9 <= lo < hi <= 1.6  # area/height band of the singlet wedge (template bounds)


def test_histograms_are_the_parent_events_in_the_gate_units(gated):
    """The drawn gate holds the population's events: the engine's counts are recovered from the
    histogram (up to the bins cut by the gate), which fails if compensation, transform or
    channel mapping were reproduced wrongly."""
    *_, review = gated
    for row in review.to_dict("records"):
        if row["gate_type"] == "none":  # a lone sample's gate that could not be fitted: flagged, empty
            assert row["source"] == "not fitted" and row["flags"] and row["count"] == 0, row
            continue
        assert row["x"], row["population"]
        xe, ye, counts = panel_arrays(row)
        assert counts.sum() >= 0.98 * row["n_shown"]  # the grid covers the parent's events
        if not row["condition"]:
            assert row["n_shown"] == row["parent_count"]
        assert abs(_inside_count(row) - row["count"]) <= max(0.015 * row["n_shown"], 3), row["population"]


def test_values_match_the_gating_engine_exactly(gated):
    """The review draws what the engine gated on (through the public cytopipe.gating.EventValues)."""
    from cytopipe.gating import Engine

    sample, template, result, _ = gated
    engine = Engine(sample.events, sample.channels, template, spillover=sample.spillover)
    mine = result.event_values(sample)
    for name in ("T cells", "CD4 T", "Treg", "NK", "Lymphocytes"):
        pop = result.populations[name]
        idx = None if pop.parent == "root" else result.indices(pop.parent)
        for dim in pop.gate.dims:
            np.testing.assert_array_equal(mine.at(dim, idx, pop.parent), engine.values(dim, idx))


def test_review_data_is_small_and_holds_no_events(gated):
    sample, _, _, review = gated
    buf = io.BytesIO()
    review.to_parquet(buf, compression="zstd")
    assert len(buf.getvalue()) < 40_000  # 16 panels of 48x48 (or 96) counts
    n = sample.events.shape[0]
    assert max(len(c) for c in review["counts"]) <= 48 * 48 < n


def test_write_and_read_round_trip(tmp_path, gated):
    *_, review = gated
    write_gate_review(tmp_path, review)
    back = read_gate_review(tmp_path)
    assert back["sample_id"].tolist() == review["sample_id"].tolist()
    assert [list(c) for c in back["counts"]] == [list(c) for c in review["counts"]]
    assert read_gate_review(tmp_path / "nowhere") is None
    with pytest.raises(ReportError, match="lacks columns"):
        write_gate_review(tmp_path, review.drop(columns=["shapes"]))
    review.drop(columns=["counts"]).to_parquet(tmp_path / "gate_review.parquet")
    with pytest.raises(ReportError, match="lacks columns"):
        read_gate_review(tmp_path)


# ------------------------------------------------------------------------------------------------
# the outlier rule
# ------------------------------------------------------------------------------------------------
def _table(thresholds, counts, patients, visits, flags=None):
    n = len(thresholds)
    return pd.DataFrame(
        {
            "sample_id": [f"{p}_W{v:02d}" for p, v in zip(patients, visits)],
            "population": "CD4 T",
            "panel": 0,
            "count": counts,
            "parent_count": 1000,
            "pct_parent": [c / 10 for c in counts],
            "flags": flags or [""] * n,
            "params": [[t] for t in thresholds],
            "param_names": [["CD4 >="]] * n,
            "param_spans": [[6.0]] * n,
        }
    )


def test_outlier_rule_hand_computed():
    patients = ["A"] * 4 + ["B"] * 4 + ["C"] * 4
    visits = [0, 4, 12, 24] * 3
    thresholds = [2.50, 2.52, 2.48, 2.50, 2.60, 2.62, 2.58, 3.60, 2.40, 2.42, 2.38, 2.41]
    counts = [300] * 12
    table = _table(thresholds, counts, patients, visits, flags=[""] * 11 + ["CD4 T: fit failed; used pooled"])
    meta = pd.DataFrame({"sample_id": table["sample_id"], "patient_id": patients, "visit": visits})
    out = gate_outliers(table, meta).set_index("sample_id")
    # B_W24: 3.60 vs B's other visits (median 2.60): deviation 1.00. The within-patient scale is
    # 1.4826 x the median absolute leave-one-out deviation over all 12 samples = 1.4826 x 0.02
    # (floored at 2% of the 6-unit axis = 0.12) -> z = 1.00 / 0.12 = 8.33.
    assert out.loc["B_W24", "outlier"]
    assert "vs the patient's other visits (z=+8.3)" in out.loc["B_W24", "reasons"]
    # vs the cohort: median 2.50, MAD 0.085 -> scale max(1.4826 x 0.085, 0.12) = 0.126; z = 1.10 / 0.126 = 8.7
    assert "vs the cohort (z=+8.7)" in out.loc["B_W24", "reasons"]
    assert out.loc["B_W24", "score"] == pytest.approx(1.10 / (1.4826 * 0.085), rel=1e-9)  # the largest |z|
    # patient C sits lower than the others but consistently: not an outlier
    assert not out.loc[["C_W00", "C_W04", "C_W12"], "outlier"].any()
    assert out.loc["C_W24", "flagged"] and not out.loc["C_W24", "outlier"]
    assert out["outlier"].sum() == 1


def test_outlier_rule_frequency_and_few_visits():
    patients = ["A"] * 4 + ["B"] * 4 + ["C"] * 2
    visits = [0, 4, 12, 24] * 2 + [0, 4]
    counts = [300, 310, 295, 305, 290, 300, 80, 302, 298, 301]  # B_W12: 8% instead of ~30%
    table = _table([2.5] * 10, counts, patients, visits)
    meta = pd.DataFrame({"sample_id": table["sample_id"], "patient_id": patients, "visit": visits})
    out = gate_outliers(table, meta).set_index("sample_id")
    assert out.loc["B_W12", "outlier"]
    assert "frequency 8.04% is an outlier" in out.loc["B_W12", "reasons"]
    assert out["outlier"].sum() == 1
    # a patient with only one other visit gets no patient comparison (cohort only)
    assert "patient" not in out.loc["C_W04", "reasons"]
    # without patient information only the cohort comparison is made
    alone = gate_outliers(table).set_index("sample_id")
    assert alone.loc["B_W12", "outlier"] and "patient" not in alone.loc["B_W12", "reasons"]


def test_histograms_count_like_numpy_binning():
    """The one-pass histogram kernels bin exactly as numpy arithmetic does: float64 bin
    positions, the upper edge in the last bin, NaN, infinities and out-of-grid values left out."""
    from cytopipe.report.gate_review import _hist1d, _hist2d

    rng = np.random.default_rng(3)
    x = rng.normal(0, 2, 20_000).astype(np.float32)
    y = rng.normal(1, 3, 20_000).astype(np.float32)
    xe, ye = np.linspace(-3, 3, 49), np.linspace(-2.5, 4.5, 49)
    x[:5] = [np.nan, np.inf, -np.inf, 3.0, -3.0]  # 3.0 is the upper edge: the last bin
    y[5:8] = [np.nan, 4.5, 1e30]

    def ref_index(v, e):
        n = len(e) - 1
        f = (v.astype(np.float64) - e[0]) * (n / (e[-1] - e[0]))
        with np.errstate(invalid="ignore"):
            f = np.where(np.isfinite(f), f, -1.0)
            i = np.floor(np.clip(f, -1, n + 1)).astype(np.int64)
        i[i > n] = -1
        i[i == n] = n - 1
        return i

    ix, iy = ref_index(x, xe), ref_index(y, ye)
    ok = (ix >= 0) & (iy >= 0)
    want2 = np.bincount(iy[ok] * 48 + ix[ok], minlength=48 * 48).reshape(48, 48)
    assert np.array_equal(_hist2d(x, y, xe, ye), want2)
    assert want2[:, 47].sum() > 0 and want2.sum() < len(x)
    want1 = np.bincount(ix[ix >= 0], minlength=48)
    assert np.array_equal(_hist1d(x, xe), want1)


def test_a_panel_of_part_of_the_parent_shows_the_whole_parent_behind_it(gated):
    """Treg's CD25 x CD127 panel shows the FOXP3+ CD4 T events over ALL CD4 T events (grey), on a
    grid that holds them all; the panels without a condition carry no separate background."""
    _, _, result, review = gated
    n_cd4 = result.populations["CD4 T"].count
    treg = review[review["population"] == "Treg"].set_index("panel")
    for panel in (0, 1):
        row = treg.loc[panel]
        bg, (_, _, counts) = panel_background(row), panel_arrays(row)
        assert bg.shape == counts.shape
        assert bg.sum() >= 0.98 * n_cd4 and bg.sum() <= n_cd4  # every CD4 T event (grid: robust range)
        assert (counts <= bg).all() and counts.sum() >= 0.98 * row["n_shown"]
        assert 0 < row["n_shown"] < 0.5 * n_cd4  # the shown events are a part of them
    plain = review[review["condition"] == ""]
    assert all(len(b) == 0 for b in plain["background"])


def test_panel_axes_follow_the_events_not_far_gate_vertices(gated):
    """The singlet wedge's apex is at (0, 0), far below the events: the panel's axes span the
    events' own range (0.5-99.5% quantiles, padded), so the events fill most of it."""
    sample, _, result, review = gated
    single = review[review["population"] == "Singlets"].iloc[0]
    vals = result.event_values(sample)
    pop = result.populations["Singlets"]
    idx = result.indices(pop.parent)
    for axis, dim in zip(("x", "y"), pop.gate.dims[:2]):
        v = vals.at(dim, idx, pop.parent)
        lo, hi = np.quantile(v, [0.005, 0.995])
        a, b = single[f"{axis}_range"]
        assert a > 0.0 and a <= lo and b >= hi
        assert (hi - lo) / (b - a) >= 0.6, (axis, a, b, lo, hi)  # the events fill the panel


@pytest.fixture(scope="module")
def tiny_gated(sample_data):
    """Seeded subsets of 30 and 100 events of P001_W00, gated with gates pooled from three whole
    samples (as a run gates a tiny sample): a few events, far from some pooled thresholds."""
    import dataclasses

    from cytopipe.fcs import read_fcs
    from cytopipe.gating import gate, load_template, pool_estimates

    template = load_template(TEMPLATE)
    ids = ["P001_W00", "P002_W00", "P003_W00"]
    samples = {i: read_fcs(sample_data / "fcs" / f"{i}.fcs") for i in ids}
    manifest = pd.DataFrame({"sample_id": ids, "patient_id": [i[:4] for i in ids], "batch": "1"})
    records = pd.concat([gate(s, template, medians=False).fit_records(k) for k, s in samples.items()])
    pooled = pool_estimates(records, manifest)
    full = samples["P001_W00"]
    out = {}
    for n in (30, 100):
        keep = np.sort(np.random.default_rng(0).choice(full.n_events, n, replace=False))
        tiny = dataclasses.replace(full, events=full.events[keep].copy())
        meta = {"sample_id": f"tiny{n}", "patient_id": "P001", "batch": "1"}
        result = gate(tiny, template, pooled=pooled, sample_meta=meta, medians=False)
        out[n] = gate_review_data(tiny, result, f"tiny{n}")
    return out


def test_a_tiny_samples_gates_are_all_kept_on_its_panels(tiny_gated):
    """A gate whose boundary lay outside a tiny sample's data range was cut from its panel:
    the CD56bright NK diagonal of the 100-event subset (2 events) became an empty polygon, the
    Treg FOXP3 threshold of the 30-event subset lay beyond the grid. Every gate is now on its
    panel: its line drawn inside the panel, where the gallery draws it."""
    from cytopipe.report.figures import shape_lines

    for n, review in tiny_gated.items():
        drawn = review[review["shapes"] != "[]"]
        assert len(drawn) >= 15
        for row in drawn.to_dict("records"):
            one_d = not row["y"]
            ylim = (0.0, 1.0) if one_d else row["y_range"]
            for shape in json.loads(row["shapes"]):
                lines, _ = shape_lines(shape, row["x_range"], ylim, one_d)
                assert lines, (n, row["population"], row["panel"], shape, row["x_range"], row["y_range"])
                if shape.get("half_plane"):
                    assert len(shape["line"]) == 2 and len(shape["vertices"]) >= 3
        bright = review[review["population"] == "CD56bright NK"].iloc[0]
        assert bright["source"] == "pooled" and bright["n_shown"] <= 2  # a tiny parent indeed


def test_gallery_figure_draws_the_background_grey_and_the_shown_events_in_colour(gated):
    from cytopipe.report.figures import gallery_figure

    *_, review = gated
    rows = review[(review["population"] == "Treg") & (review["panel"] == 0)].to_dict("records")
    fig = gallery_figure(rows, [""], ["P003_W12"])
    img = np.asarray(fig.axes[0].images[0].get_array())[..., :3] / 255.0  # the mosaic is uint8
    white = (img > 0.999).all(-1)
    grey = ~white & (np.ptp(img, axis=-1) < 1e-9)
    colour = ~white & ~grey
    bg = panel_background(rows[0])
    assert grey.sum() > colour.sum() > 0  # many more CD4 T bins than Treg bins
    assert grey.sum() + colour.sum() >= 0.5 * (bg > 0).sum()  # the mosaic resamples 48x48 bins
    # singlets: the events (coloured pixels) reach across most of the panel, not one corner
    rows = review[review["population"] == "Singlets"].to_dict("records")
    fig = gallery_figure(rows, [""], ["P003_W12"])
    img = np.asarray(fig.axes[0].images[0].get_array())[..., :3] / 255.0  # the mosaic is uint8
    cols, rws = np.nonzero((~(img > 0.999).all(-1)).T)
    assert np.ptp(cols) >= 0.6 * 48 and np.ptp(rws) >= 0.6 * 48
