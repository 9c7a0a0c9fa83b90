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


CALIBRATED = {"Th17[CXCR3]": "CXCR3", "Th17[CCR6]": "CCR6", "cTfh": "CXCR5", "activated cTfh": "PD-1"}


def test_fmo_calibrated_landmark_thresholds_follow_each_files_drift(tmp_path):
    """The canonical template's `auto ... control: fmo` thresholds with one FMO set per site:
    the FMO sets the level (a stained negative's non-specific staining lifts the landmark rule
    above the FMO convention), each file's own landmark follows its drift. Each file's true
    threshold is its batch's FMO 99.5th percentile times the file's detector drift."""
    from cytopipe.simulate import instrument_trial

    instrument_trial(tmp_path, instrument="random", seed=4323, patients=2, visits=(0, 4, 12), events=10_000,
                     fmo="site", fmo_events=30_000)  # fmt: skip
    template = load_template(REPO / "gating" / "sle_il2_tcell_nk.yaml")
    manifest = pd.read_csv(tmp_path / "manifest.csv", dtype={"sample_id": str})
    truth = pd.read_csv(tmp_path / "truth" / "thresholds.csv")
    drift = pd.read_csv(tmp_path / "truth" / "samples.csv", dtype={"sample_id": str}).set_index("sample_id")
    fmo = manifest[manifest["control"].astype(str).str.startswith("fmo:")]
    assert fmo.groupby("site")["batch"].nunique().eq(1).all()  # one FMO set per site
    rows = []
    for r in manifest[manifest["control"].isna()].itertuples():
        ctl = {
            c.control[4:]: cytopipe.read_fcs(tmp_path / c.file)
            for c in fmo[fmo["site"] == r.site].itertuples()
        }
        sample = cytopipe.read_fcs(tmp_path / r.file)
        with_fmo, alone = gate(sample, template, controls=ctl), gate(sample, template)
        own = {f.key: f.params[0] for f in alone.fits if f.params}
        for f in with_fmo.fits:
            if f.key in CALIBRATED:
                marker = CALIBRATED[f.key]
                cofactor = with_fmo.transforms[with_fmo.channel_of[marker]]["cofactor"]
                t = truth[(truth["batch"] == r.batch) & (truth["marker"] == marker)]["threshold"].item()
                true = float(np.arcsinh(t * drift.loc[r.sample_id, f"drift_{marker}"] / cofactor))
                rows.append({"sample": r.sample_id, "marker": marker, "calibrated": f.params[0] - true,
                             "landmark_only": own[f.key] - true})  # fmt: skip
        assert with_fmo.populations["cTfh"].source == "control"
        assert any("set by the FMO control" in note for _, note in with_fmo.sources)
        assert alone.populations["cTfh"].source == "fitted"  # no control: the landmark rule
    err = (
        pd.DataFrame(rows).groupby("marker")[["calibrated", "landmark_only"]].agg(lambda v: v.abs().median())
    )
    print("\nmedian |threshold - true| (arcsinh units)\n" + err.round(3).to_string())
    assert (err["calibrated"] <= 0.1).all()
    assert err["calibrated"].mean() < err["landmark_only"].mean()


def test_align_on_names_a_population_of_the_template():
    """`align_on` (the population whose negative peak reads a file's drift) must exist; it is a
    dependency of the gate, so it is gated first."""
    import pytest

    from cytopipe.errors import TemplateError

    spec = template_to_dict(load_template(REPO / "gating" / "sle_il2_tcell_nk.yaml"))
    tfh = next(p for p in spec["populations"] if p["name"] == "cTfh")
    assert tfh["gate"]["align_on"] == ["Memory CD4", "CD4 T", "T cells"] and tfh["gate"]["align"] == "affine"
    assert {"Memory CD4", "CD4 T", "T cells"} <= set(parse_template(spec).populations["cTfh"].depends_on)
    tfh["gate"]["align"] = "sideways"
    with pytest.raises(TemplateError, match="align"):
        parse_template(spec)
    tfh["gate"]["align"] = "affine"
    tfh["gate"]["align_on"] = "B cells"
    with pytest.raises(TemplateError, match="unknown population 'B cells'"):
        parse_template(spec)
    tfh["gate"]["align_on"] = [""]
    with pytest.raises(TemplateError, match="align_on"):
        parse_template(spec)


def test_affine_alignment_follows_the_files_mis_compensation(tmp_path):
    """A file whose detectors drifted after the batch's compensation was set carries spill from its
    other stains on the CXCR5 / PD-1 axes: for memory CD4 (CD3+ CD4+) an offset, shared by CD4 T.
    `align: affine` reads a gain (negative peak's width) and an offset (its mode) on CD4 T and T
    cells. The file's true threshold on its own measured scale is the batch's FMO percentile times
    the file's drift plus the parent's median mis-compensation (simulator: measured minus the
    values compensated with the file's own spillover). Seed 4323 (not tuned on)."""
    from cytopipe.simulate import instrument_trial, load_labels
    from cytopipe.simulate import params as P
    from cytopipe.simulate.instrument_events import fluor_slice
    from cytopipe.simulate.multi import load_instruments
    from cytopipe.simulate.populations import unpack_membership

    instrument_trial(tmp_path, instrument="random", seed=4323, patients=2, visits=(0, 12), events=10_000,
                     fmo="site", fmo_events=30_000)  # fmt: skip
    spec = template_to_dict(load_template(REPO / "gating" / "sle_il2_tcell_nk.yaml"))
    assert next(p for p in spec["populations"] if p["name"] == "cTfh")["gate"]["align"] == "affine"
    for p in spec["populations"]:  # the same template reading a gain only
        if p["name"] in FMO_GATES:
            p["gate"].pop("align")
    templates = {
        "affine": load_template(REPO / "gating" / "sle_il2_tcell_nk.yaml"),
        "gain": parse_template(spec),
    }
    insts = load_instruments(tmp_path)
    manifest = pd.read_csv(tmp_path / "manifest.csv", dtype={"sample_id": str})
    thr = pd.read_csv(tmp_path / "truth" / "thresholds.csv")
    drift = pd.read_csv(tmp_path / "truth" / "samples.csv", dtype={"sample_id": str}).set_index("sample_id")
    fmo = manifest[manifest["control"].astype(str).str.startswith("fmo:")]
    rows = []
    for r in manifest[manifest["control"].isna()].itertuples():
        inst = insts.get(r.batch) or insts[r.site]
        ctl = {
            c.control[4:]: cytopipe.read_fcs(tmp_path / c.file)
            for c in fmo[fmo["site"] == r.site].itertuples()
        }
        sample = cytopipe.read_fcs(tmp_path / r.file)
        lab = load_labels(tmp_path / "truth" / "labels" / f"{r.sample_id}.npz")
        raw = sample.events[:, fluor_slice(inst)].astype(np.float64)
        d = np.array([drift.loc[r.sample_id, f"drift_{m}"] for m in P.MARKERS])
        inv = np.linalg.inv(inst.spillover)
        miscomp = raw @ inv - (raw / d) @ inv * d
        for how, tpl in templates.items():
            res = gate(sample, tpl, controls=ctl)
            for pop, marker in FMO_GATES.items():
                parent = "Memory CD4" if marker == "CXCR5" else "cTfh"
                j = P.MI[marker]
                off = np.median(
                    miscomp[unpack_membership(lab["membership"], parent) & (lab["fault"] == 0), j]
                )
                t = thr[(thr["batch"] == r.batch) & (thr["marker"] == marker)]["threshold"].item()
                cofactor = res.transforms[res.channel_of[marker]]["cofactor"]
                fit = next(f for f in res.fits if f.key == pop)
                rows.append({"how": how, "marker": marker,
                             "error": abs(fit.params[0] - np.arcsinh((t * d[j] + off) / cofactor))})  # fmt: skip
    err = pd.DataFrame(rows).groupby(["marker", "how"])["error"].median().unstack()
    print(
        "\nmedian |threshold - true threshold on the file's measured scale| (arcsinh units)\n"
        + err.round(3).to_string()
    )
    # (on this seed's 8 files the gain-only reading is as close: 0.033 / 0.054 vs 0.042 / 0.054;
    # over the tuning seeds 8421-8440 the affine reading gave activated cTfh concordance 0.912 vs
    # 0.876, docs/gating.md)
    assert (err["affine"] <= 0.1).all()
