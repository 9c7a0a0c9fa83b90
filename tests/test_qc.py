"""Event QC: margins, time-resolved anomalies, count flags and Wilson intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cytopipe import qc
from cytopipe.errors import QCError
from cytopipe.fcs import read_fcs
from cytopipe.qc import QCSettings
from tests.conftest import shared_path

PNR = 262144.0


def acquisition(n=120_000, p=8, seed=0, clog=None, shift=None, pileup=0):
    """A synthetic acquisition (bimodal channels, Poisson arrivals, 10 ms time ticks) with
    optional injected faults; returns events, channel table and the per-event fault truth."""
    rng = np.random.default_rng(seed)
    events = np.empty((n, p + 3), np.float32)
    events[:, 0] = rng.normal(60_000, 9_000, n)  # FSC-A
    events[:, 1] = rng.gamma(16, 25_000 / 16, n)  # SSC-A (positive)
    for j in range(p):
        pos = rng.random(n) < 0.2 + 0.07 * j
        events[:, 2 + j] = np.where(pos, rng.lognormal(8, 0.5, n), rng.normal(0, 200, n))
    dt = rng.exponential(1 / 2000, n)
    truth = np.zeros(n, bool)
    if clog is not None:  # event rate drops to 15% for a stretch
        a, b = clog
        dt[a:b] = rng.exponential(1 / 300, b - a)
        truth[a:b] = True
    if shift is not None:  # a channel's signal moves for a stretch of time
        a, b, j = shift
        events[a:b, 2 + j] += 1500
        truth[a:b] = True
    if pileup:
        rows = rng.choice(n, pileup, replace=False)
        events[rows, 3] = PNR - 1
        truth[rows] = True
    events[:, -1] = np.floor(np.cumsum(dt) * 100)  # Time in 10 ms ticks
    names = ["FSC-A", "SSC-A"] + [f"FL{j + 1}-A" for j in range(p)] + ["Time"]
    channels = pd.DataFrame({"pnn": names, "pns": [""] * len(names), "pnr": [PNR] * (len(names) - 1) + [1e9]})
    return events, channels, truth


def precision_recall(removed, truth):
    tp = int((removed & truth).sum())
    return tp / max(int(removed.sum()), 1), tp / max(int(truth.sum()), 1)


def test_injected_faults_are_found_and_removed():
    events, channels, truth = acquisition(clog=(50_000, 56_000), shift=(90_000, 100_000, 3), pileup=400)
    report = qc.event_qc(events, channels, QCSettings())
    precision, recall = precision_recall(report.removed, truth)
    print(
        f"\nsynthetic faults: removed {report.removed.sum()} of {len(truth)} events, "
        f"injected {truth.sum()}: precision {precision:.3f}, recall {recall:.3f}"
    )
    assert recall >= 0.97 and precision >= 0.9
    m = report.metrics(QCSettings())
    assert m["qc_margin_events"] == 400 and m["qc_margin_by_channel"] == "FL2-A=400"
    assert m["qc_rate_bins_flagged"] > 0 and m["qc_signal_bins_flagged"] > 0
    assert m["qc_worst_channel"] == "FL4-A"
    assert m["events_after_qc"] == len(truth) - int(report.removed.sum())
    assert m["qc_flags"] == []  # ~14% lost: below the 20% flag


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_clean_acquisition_loses_almost_nothing(seed):
    events, channels, _ = acquisition(seed=seed)
    report = qc.event_qc(events, channels)
    assert report.removed.mean() < 0.005, report.metrics(QCSettings())


def test_each_check_alone_finds_its_fault():
    events, channels, truth = acquisition(clog=(50_000, 56_000))
    rate_only = qc.event_qc(events, channels, QCSettings(signal=False))
    p, r = precision_recall(rate_only.removed, truth)
    assert r >= 0.97 and p >= 0.9
    events, channels, truth = acquisition(shift=(90_000, 100_000, 5))
    signal_only = qc.event_qc(events, channels, QCSettings(flow_rate=False))
    p, r = precision_recall(signal_only.removed, truth)
    assert r >= 0.97 and p >= 0.9
    off = qc.event_qc(events, channels, QCSettings(time=False))
    assert not off.removed.any()


def test_acquisition_order_is_taken_from_the_time_channel():
    events, channels, truth = acquisition(clog=(50_000, 56_000), shift=(90_000, 100_000, 3))
    ordered = qc.event_qc(events, channels).removed
    perm = np.random.default_rng(5).permutation(len(events))
    shuffled = qc.event_qc(events[perm], channels).removed
    # same events judged the same way, up to ties of the 10 ms time ticks at bin edges
    assert (ordered[perm] != shuffled).mean() < 0.002


def test_rows_restrict_time_qc_without_copying():
    events, channels, _ = acquisition(clog=(50_000, 56_000))
    rows = np.arange(0, len(events), 3)
    by_rows = qc.time_qc(events, channels, QCSettings(), rows=rows)
    by_copy = qc.time_qc(events[rows].copy(), channels, QCSettings())
    np.testing.assert_array_equal(by_rows.bad, by_copy.bad)


def test_margins_upper_on_every_channel_lower_on_scatter():
    events, channels, _ = acquisition(n=5000)
    events[:10, 0] = PNR - 1  # FSC saturated
    events[10:15, 0] = 0  # FSC at zero: lower margin (scatter)
    events[15:20, 4] = -5000  # a negative fluorescence value is not a margin
    events[20:22, 5] = PNR  # above the detector top still counts as saturated
    res = qc.margin_qc(events, channels, QCSettings())
    assert res.counts == {"FSC-A": 15, "FL4-A": 2}
    assert res.bad.sum() == 17
    allch = qc.margin_qc(events, channels, QCSettings(lower_channels="all"))
    assert allch.counts["FL3-A"] >= 5
    off = qc.margin_qc(events, channels, QCSettings(margins=False))
    assert not off.bad.any()


def test_a_range_keyword_the_data_ignore_is_not_a_detector_limit():
    events, channels, _ = acquisition(n=5000)
    channels.loc[4, "pnr"] = 1024.0  # a nominal range, exceeded by the data
    res = qc.margin_qc(events, channels, QCSettings())
    assert "FL3-A" not in res.counts


def test_event_counters_are_not_judged():
    events, channels, _ = acquisition(n=20_000)
    events[:, 4] = np.arange(len(events), dtype=np.float32) * 3  # an ID column, like Original_ID
    assert 4 not in qc.measured_channels(events, channels)
    report = qc.event_qc(events, channels)
    assert report.removed.sum() == 0


def test_too_few_events_skip_time_qc_and_flag_the_sample():
    events, channels, _ = acquisition(n=800)
    report = qc.event_qc(events, channels)
    assert "too few events" in report.time_result.note
    flags = report.metrics(QCSettings())["qc_flags"]
    assert any(f.startswith("too_few_events") for f in flags)


def test_short_good_stretches_between_bad_bins_are_removed():
    bad = np.zeros(30, bool)
    bad[[5, 9, 20, 27]] = True
    out = qc._close_short_gaps(bad, 5)
    assert out[5:10].all()  # 3 good bins between 5 and 9: removed
    assert not out[10:20].any()  # 10 good bins: kept
    assert not out[21:27].any()  # 6 good bins: kept (>= 5)
    assert (qc._close_short_gaps(bad, 0) == bad).all()


def test_high_loss_is_flagged_not_dropped():
    events, channels, truth = acquisition(clog=(30_000, 60_000))
    report = qc.event_qc(events, channels)
    m = report.metrics(QCSettings())
    assert m["qc_removed_fraction"] > 0.2
    assert any(f.startswith("high_qc_loss") for f in m["qc_flags"])
    assert m["events_after_qc"] > 0


def test_loss_outliers_among_the_study():
    losses = pd.Series([0.01, 0.02, 0.015, 0.012, 0.018, 0.3, 0.03, np.nan])
    flags = qc.flag_loss_outliers(losses, QCSettings())
    assert flags.tolist() == [False] * 5 + [True, False, False]


def test_wilson_interval_matches_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    from cytopipe.intervals import wilson_interval

    k = np.array([0, 1, 5, 50, 99, 100, 3])
    n = np.array([10, 10, 100, 100, 100, 100, 2000])
    lo, hi = wilson_interval(k, n, 0.05)
    ref_lo, ref_hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(hi, ref_hi, rtol=1e-12, atol=1e-15)
    # the interval always contains the observed proportion, also at 0 and n
    k = np.arange(0, 2001)
    lo, hi = wilson_interval(k, 2000)
    assert (lo <= k / 2000).all() and (hi >= k / 2000).all()
    for n in range(1, 300):
        lo, hi = wilson_interval(np.array([0, n]), n)
        assert lo[0] == 0.0 and hi[1] == 1.0
    lo, hi = wilson_interval(np.array([0, 5, -1]), np.array([0, 4, 10]))
    assert np.isnan(lo).all() and np.isnan(hi).all()
    assert np.isnan(lo[0]) and np.isnan(hi[0])


def test_count_qc_columns():
    stats = pd.DataFrame(
        {"count": [40, 950, 0], "parent_count": [80, 1000, 0], "pct_parent": [50.0, 95.0, np.nan]}
    )
    out = qc.add_count_qc(stats, QCSettings(min_parent_events=100))
    assert out["low_parent_count"].tolist() == [True, False, True]
    assert (out["pct_parent_ci_low"] < out["pct_parent"]).iloc[:2].all()
    assert (out["pct_parent_ci_high"] > out["pct_parent"]).iloc[:2].all()
    assert np.isnan(out["pct_parent_ci_low"].iloc[2])


def test_settings_from_a_workflow_section():
    s = QCSettings.from_mapping({"margins": {"enabled": False}, "time": {"mad": 4.0}, "min_events": 10})
    assert s.margins is False and s.mad == 4.0 and s.min_events == 10 and s.consecutive_bins == 5
    assert QCSettings.from_mapping(None) == QCSettings()


@pytest.mark.parametrize(
    "parts",
    [
        ("PeacoQC", "inst", "extdata", "111.fcs"),
        ("CytoPipeline", "inst", "extdata", "Donor1.fcs"),
        ("FlowKit", "data", "100715.fcs"),
    ],
)
def test_real_files(parts):
    """Real acquisitions: margins agree with a direct count, QC keeps most events."""
    sample = read_fcs(shared_path(*parts))
    report = qc.event_qc(sample.events, sample.channels)
    m = report.metrics(QCSettings())
    print(
        f"\n{parts[-1]}: {m['qc_removed_fraction']:.1%} removed, margins {m['qc_margin_by_channel']}, "
        f"signal bins {m['qc_signal_bins_flagged']}, rate bins {m['qc_rate_bins_flagged']}"
    )
    ev, ch = sample.events, sample.channels
    roles = qc.channel_roles(ch)
    for name, count in report.margin_counts.items():
        j = int(np.flatnonzero(ch["pnn"] == name)[0])
        direct = (ev[:, j] >= ch["pnr"].iloc[j] - 1) | ((roles[j] == "scatter") & (ev[:, j] <= 0))
        assert count == int(direct.sum())
    assert m["qc_removed_fraction"] < 0.15
    if "Original_ID" in set(ch["pnn"]):  # a subsampled file's event index is not a measurement
        assert "Original_ID" not in report.margin_counts and m["qc_worst_channel"] != "Original_ID"


def test_mass_cytometry_pnr_is_not_a_detector_limit():
    """CytoNorm's CyTOF files (Helios; no scatter): the software writes each channel's $PnR from the
    data, its observed maximum rounded up (Event_length: $PnR 75, maximum 75 or 74; Nd145Di: $PnR
    285, maximum 284.2). Margin QC called the top event or few of such channels saturated and
    removed 1-8 events of every 1 000-event file (and the fits left them out). No event of these
    files is a margin event; a flow file's saturated events (SDY736, LSRII, 18-bit: events at
    exactly 262143) still are."""
    files = sorted(shared_path("CytoNorm", "inst", "extdata").glob("Gates_*.fcs"))
    assert len(files) == 6
    for path in files:
        s = read_fcs(path)
        j = list(s.channels["pnn"]).index("Event_length")
        assert s.events[:, j].max() >= s.channels["pnr"].iloc[j] - 1  # the top event sits at $PnR - 1
        margins = qc.margin_qc(s.events, s.channels, QCSettings())
        assert not margins.bad.any() and margins.counts == {}, (path.name, margins.counts)
        assert np.isinf(qc.saturation_limits(s.events, s.channels)).all()
        assert qc.is_mass_cytometry(s.channels), path.name
    flow = read_fcs(shared_path("MetaCyto", "inst", "extdata", "SDY736", "ResultFiles", "Flow_cytometry_result",
                                "Hs90211C20090205_00.583066.fcs"))  # fmt: skip
    assert not qc.is_mass_cytometry(flow.channels)
    counts = qc.margin_qc(flow.events, flow.channels, QCSettings(lower_channels="none")).counts
    assert counts == {"FSC-A": 9, "SSC-A": 25, "PE-A": 20, "PE-Texas Red-A": 5, "PE-Cy7-A": 2}
    names = {"pnn": ["Time", "Event_length", "CD3(Nd145)Dd", "Ir191Di", "Y89Di", "beadDist"]}
    assert qc.is_mass_cytometry(pd.DataFrame(names))
    assert not qc.is_mass_cytometry(pd.DataFrame({"pnn": ["FSC-A", "SSC-A", "Nd145Di", "Event_length"]}))
    assert qc.is_mass_cytometry(pd.DataFrame({"pnn": ["Time", "Nd145Di", "Ir191Di", "Pt195Di", "CD3"]}))


@pytest.fixture(scope="module")
def faulty_trial(tmp_path_factory):
    """Simulated files of 30k events: four with a clog, four with a signal shift, four with a
    margin pile-up (the simulator's fault injection, with per-event truth)."""
    import cytopipe.simulate as simulate

    out = tmp_path_factory.mktemp("faults") / "trial"
    kinds = ["clog", "shift", "margin"]
    ids = [f"P{p:03d}_W{v:02d}" for p in range(1, 5) for v in (0, 4, 12)]
    simulate.simulate_trial(
        out, n_patients=4, visits=(0, 4, 12), events=30_000, seed=77, control_events=500,
        faults={sid: [kinds[i % 3]] for i, sid in enumerate(ids)},
    )  # fmt: skip
    return out


def test_qc_finds_the_simulators_injected_faults(faulty_trial):
    rows = []
    manifest = pd.read_csv(faulty_trial / "manifest.csv")
    for _, r in manifest[manifest["control"].isna()].iterrows():
        s = read_fcs(faulty_trial / r["file"])
        with np.load(faulty_trial / "truth" / "labels" / f"{r['sample_id']}.npz") as z:
            truth = z["fault"] > 0
            kind = str(z["faults"][int(z["fault"].max())])
        removed = qc.event_qc(s.events, s.channels).removed
        rows.append({"kind": kind, "tp": int((removed & truth).sum()), "removed": int(removed.sum()),
                     "injected": int(truth.sum())})  # fmt: skip
    df = pd.DataFrame(rows).groupby("kind").sum()
    df.loc["all"] = df.sum()
    df["precision"] = df["tp"] / df["removed"]
    df["recall"] = df["tp"] / df["injected"]
    print("\nQC vs the simulator's injected faults (events):\n" + df.round(3).to_string())
    assert set(df.index) == {"clog", "shift", "margin", "all"}
    assert df.loc["all", "precision"] >= 0.95 and df.loc["all", "recall"] >= 0.95
    assert (df["recall"] >= 0.9).all() and (df["precision"] >= 0.85).all()
    assert df.loc["margin", "precision"] == 1.0 and df.loc["margin", "recall"] == 1.0


def test_qc_settings_take_their_defaults_from_the_schema_and_refuse_unknown_keys():
    from cytopipe.config import defaults

    d = defaults(qc.QC_SCHEMA)
    s = QCSettings()
    assert (s.mad, s.min_cells, s.margins, s.confidence) == (
        d["time"]["mad"],
        d["time"]["min_cells"],
        d["margins"]["enabled"],
        d["confidence"],
    )
    assert QCSettings.from_mapping({"time": {"mad": 4.0}}).mad == 4.0
    with pytest.raises(QCError, match="'madd' \\(did you mean 'mad'\\?\\)"):
        QCSettings.from_mapping({"time": {"madd": 4.0}})
