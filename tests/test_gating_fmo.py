"""Thresholds from FMO controls (issue 10): with FMO controls in a simulated batch, each dim
marker's threshold lands within 0.1 arcsinh units of the simulator's true one (its FMO 99.5th
percentile on the same parent), and the gate records that the control set it."""

from __future__ import annotations

import numpy as np
import pandas as pd

import cytopipe
from cytopipe.gating import gate, load_template, parse_template, template_to_dict
from tests.conftest import REPO

FMO_GATES = {"cTfh": "CXCR5", "activated cTfh": "PD-1"}


def test_fmo_controls_set_the_dim_marker_thresholds(tmp_path):
    from cytopipe.simulate import instrument_trial

    instrument_trial(
        tmp_path, instrument="random", seed=4321, patients=2, visits=(0, 12), events=10_000, fmo=True
    )
    spec = template_to_dict(load_template(REPO / "gating" / "sle_il2_tcell_nk.yaml"))
    for pop in spec["populations"]:
        if pop["name"] in FMO_GATES:
            pop["gate"] = {"type": "reference", "control": "fmo", "q": 0.995, "pool": "patient"}
    template = parse_template(spec)
    manifest = pd.read_csv(tmp_path / "manifest.csv", dtype={"sample_id": str})
    truth = pd.read_csv(tmp_path / "truth" / "thresholds.csv")
    controls = manifest[manifest["control"].astype(str).str.startswith("fmo:")]
    samples = manifest[manifest["control"].isna()]
    rows = []
    for r in samples.itertuples():
        ctl = controls[controls["batch"] == r.batch]
        fmo = {c.control[4:]: cytopipe.read_fcs(tmp_path / c.file) for c in ctl.itertuples()}
        result = gate(cytopipe.read_fcs(tmp_path / r.file), template, controls=fmo)
        fits = {f.key: f for f in result.fits}
        for pop, marker in FMO_GATES.items():
            assert result.populations[pop].source == "control", result.populations[pop].flags
            cofactor = result.transforms[result.channel_of[marker]]["cofactor"]
            want = truth[(truth["batch"] == r.batch) & (truth["marker"] == marker)]["threshold"].item()
            rows.append(
                {
                    "sample": r.sample_id,
                    "marker": marker,
                    "fitted": fits[pop].params[0],
                    "true": float(np.arcsinh(want / cofactor)),
                }
            )
        assert any("set by the FMO control" in note for _, note in result.sources)
    table = pd.DataFrame(rows)
    table["error"] = table["fitted"] - table["true"]
    print("\n" + table.round(3).to_string())
    assert (table["error"].abs() <= 0.1).all()

    # the same through `cytopipe gate --manifest`: the manifest's `control: fmo:<marker>` rows of
    # each sample's batch are its controls
    import yaml

    from cytopipe.cli import main

    tpl = tmp_path / "fmo_template.yaml"
    tpl.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    rc = main(["gate", "--manifest", str(tmp_path / "manifest.csv"), "--template", str(tpl), "--out", str(out),
               "--no-pool", "--quiet"])  # fmt: skip
    assert rc == 0
    fits = pd.read_parquet(out / "gate_fits.parquet")
    cli = fits[fits["key"] == "cTfh"].set_index("sample_id")["params"].map(lambda p: p[0])
    api = table[table["marker"] == "CXCR5"].set_index("sample")["fitted"]
    np.testing.assert_allclose(cli.loc[api.index].to_numpy(), api.to_numpy(), rtol=1e-6)
