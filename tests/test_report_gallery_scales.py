"""The gate gallery of a study measured on cytometers of different ranges.

Found on a `cytopipe simulate --instrument random` trial: its sites had an 18-bit (262,144) and a
22-bit (4,194,304) instrument, and the gallery shared the linear scatter axes of every panel, so
the 18-bit samples' FSC-A x SSC-A (and FSC-A x FSC-H) events were a dot in a corner of otherwise
empty panels. Here two sample files, one written again with its scatter 16 times larger (as a
22-bit instrument records it), are gated and reported.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from tests.report_support import build_gated_run

SCATTER = ["FSC-A", "FSC-H", "SSC-A"]


@pytest.fixture(scope="module")
def two_instruments(sample_data, tmp_path_factory):
    from cytopipe.fcs import read_fcs, write_fcs
    from cytopipe.report import write_report

    trial = tmp_path_factory.mktemp("two-instruments")
    manifest = pd.read_csv(sample_data / "manifest.csv", dtype=str, keep_default_na=False)
    rows = manifest[manifest["sample_id"].isin(["P001_W00", "P002_W00"])].copy()
    (trial / "fcs").mkdir()
    for row in rows.itertuples():
        sample = read_fcs(sample_data / row.file)
        events, channels = sample.events.copy(), sample.channels.copy()
        if row.sample_id == "P002_W00":  # the 22-bit instrument
            wide = channels["pnn"].isin(SCATTER).to_numpy()
            events[:, wide] *= 16
            channels.loc[wide, "pnr"] = 4194304.0
        write_fcs(trial / row.file, events, channels, keywords=sample.keywords)
    rows.to_csv(trial / "manifest.csv", index=False)
    run = build_gated_run(trial, trial / "run")
    html = write_report(run).read_text(encoding="utf-8")
    return run, html


def test_scatter_panels_of_other_instruments_each_get_their_own_axes(two_instruments):
    from cytopipe.report import figures as F
    from cytopipe.report.gate_review import read_gate_review

    run, html = two_instruments
    review = read_gate_review(run)
    for population in ("Lymphocytes", "Singlets"):
        rows = review[review["population"] == population].to_dict("records")
        assert [r["sample_id"] for r in rows] == ["P001_W00", "P002_W00"]
        fig = F.gallery_figure(rows, ["", ""], ["P001_W00", "P002_W00"])
        mosaic = fig.axes[0].images[0].get_array()  # the panels' densities, side by side
        half = mosaic.shape[1] // 2
        for panel in (mosaic[:, :half], mosaic[:, half:]):
            drawn = (np.asarray(panel)[..., :3] < 250).any(axis=-1).mean()
            assert drawn > 0.03, (population, drawn)  # the events fill the panel, not a corner
        # each panel carries its own tick values: the 18-bit sample's and the 22-bit sample's
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert any(float(t) >= 1e6 for t in texts if re.fullmatch(r"[\d.e+]+", t))
        assert any(5e4 <= float(t) < 1e6 for t in texts if re.fullmatch(r"[\d.e+]+", t))
    # the report says why these panels do not share their axes; the fluorescence ones still do
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    apart = [c for c in captions if "differ too much to share axes" in c]
    assert [c.split(":")[0] for c in apart] == ["Lymphocytes", "Singlets"]
    figures = re.findall(r'<figure id="fig-(gate-[^"]+)"><img src="data:image/png;base64,([^"]+)"', html)
    assert len(figures) >= 16 and all(base64.b64decode(png)[:4] == b"\x89PNG" for _, png in figures)


# --- the outlier rule on a simulated multi-instrument study ------------------------------------
@pytest.fixture(scope="module")
def multi_instrument(tmp_path_factory):
    """`cytopipe simulate --instrument random` (seed 24): site S1 measures on an 18-bit
    instrument, S2 and S3 on 22-bit ones; every sample gated as a run gates it."""
    from cytopipe.report.gate_review import read_gate_review
    from cytopipe.simulate.trial import instrument_trial

    folder = tmp_path_factory.mktemp("multi-instrument")
    trial = instrument_trial(folder / "trial", instrument="random", seed=24, patients=6, visits=(0, 12),
                             events=10_000)  # fmt: skip
    run = build_gated_run(folder / "trial", folder / "run")
    samples = pd.read_parquet(run / "samples.parquet")
    return trial, read_gate_review(run), samples[samples["control"].isna()]


SCATTER_GATES = ["Lymphocytes", "Singlets"]


def test_outlier_rule_compares_scatter_gates_of_other_instruments_like_with_like(multi_instrument):
    """In raw units the 18-bit site's Lymphocytes gates were outliers (|z| 4.6 against the 22-bit
    sites' centres, 15-23 times larger); relative to each sample's own events they are not."""
    from cytopipe.report.outliers import gate_outliers

    trial, review, samples = multi_instrument
    pnr = {site: inst.pnr for site, inst in trial.instruments.items()}
    assert pnr == {"S1": 262144.0, "S2": 4194304.0, "S3": 4194304.0}
    lymph = review[(review["population"] == "Lymphocytes") & (review["panel"] == 0)]
    fsc = (
        lymph.merge(samples[["sample_id", "site"]])
        .groupby("site")["params"]
        .agg(lambda p: float(np.median([v[0] for v in p])))
    )
    assert fsc["S2"] > 10 * fsc["S1"] and fsc["S3"] > 10 * fsc["S1"]  # raw FSC-A centres
    out = gate_outliers(review[review["population"].isin(SCATTER_GATES)], samples)
    assert len(out) == 2 * 12 and not out["outlier"].any(), out[out["outlier"]][["sample_id", "reasons"]]
    assert out["score"].max() < 3.0


def test_a_scatter_gate_moved_by_hand_is_still_an_outlier(multi_instrument):
    """One 18-bit sample's Lymphocytes ellipse moved 30% right along FSC-A (the events stay): it is
    the one outlier, and the reason gives its centre raw and relative to the sample's events."""
    from cytopipe.report.outliers import gate_outliers

    _, review, samples = multi_instrument
    moved = review.copy()
    i = moved.index[(moved["population"] == "Lymphocytes") & (moved["sample_id"] == "P004_W12")][0]
    assert samples.set_index("sample_id").loc["P004_W12", "site"] == "S1"
    params = list(moved.at[i, "params"])
    params[0] *= 1.3
    moved.at[i, "params"] = params
    out = gate_outliers(moved[moved["population"].isin(SCATTER_GATES)], samples)
    hit = out[out["outlier"]]
    assert list(zip(hit["sample_id"], hit["population"])) == [("P004_W12", "Lymphocytes")]
    reason = hit["reasons"].iloc[0]
    assert reason.startswith("threshold FSC-A centre ") and "x the sample's median FSC-A)" in reason
    assert hit["score"].iloc[0] > 4.5
