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
