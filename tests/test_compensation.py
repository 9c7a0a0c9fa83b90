"""Compensation: matrix files, application (exact to FlowKit/flowutils), spillover from controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cytopipe.compensation import Compensation, compensate, compute_spillover, spillover_difference
from cytopipe.errors import CompensationError
from cytopipe.fcs import Sample, Spillover, read_fcs, write_fcs
from tests.conftest import shared_path

EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------------
# matrix files
# --------------------------------------------------------------------------------------------
def test_reads_flowkit_flowjo_flowutils_and_cytoexplorer_csvs():
    flowkit = Compensation.from_csv(shared_path("FlowKit", "data", "comp_complete_example.csv"))
    assert flowkit.channels[:3] == ("Ax488-A", "PE-A", "PE-TR-A") and len(flowkit.channels) == 14
    assert flowkit.matrix[0, 1] == 0.2986 and flowkit.matrix[3, 4] == 0.134
    utils = Compensation.from_csv(shared_path("FlowUtils", "tests", "test_data", "test_comp_matrix.csv"))
    assert utils == flowkit
    den = Compensation.from_csv(
        shared_path("FlowKit", "data", "8_color_data_set", "den_comp.csv")
    )  # '# ' header
    assert den.channels[0] == "TNFa FITC FLR-A" and den.matrix[4, 5] == 0.178821
    null = Compensation.from_csv(
        shared_path("FlowKit", "data", "8_color_data_set", "den_comp_null_channel.csv")
    )
    assert null.channels == den.channels[1:]
    assert np.array_equal(null.matrix, den.matrix[1:, 1:])  # the same matrix without the null channel
    cyto = Compensation.from_csv(
        shared_path("CytoExploreRData", "inst", "extdata", "Compensation-Spillover-Matrix.csv")
    )
    assert cyto.channels[0] == "Alexa Fluor 488-A" and len(cyto.channels) == 11  # quoted, label column
    assert cyto.matrix[1, 2] == 0.529828 and cyto.matrix[9, 0] == -0.000894


def test_missing_row_is_a_clear_error():
    path = shared_path("FlowUtils", "tests", "test_data", "test_comp_matrix_missing_row.csv")
    with pytest.raises(CompensationError, match="13 rows but 14 channels") as info:
        Compensation.from_csv(path)
    assert "test_comp_matrix_missing_row.csv" in str(info.value)


def test_other_layouts(tmp_path):
    names = ["FITC-A", "PE-A", "APC-A"]
    m = np.array([[1, 0.2, 0.01], [0.05, 1, 0.0], [0.0, 0.003, 1]])
    header = ",".join(names)
    rows = ["{},{},{}".format(*r) for r in m]
    cases = {
        "plain.csv": "\n".join([header, *rows]),
        "tab.tsv": "\n".join(["\t".join(names)] + ["\t".join(map(str, r)) for r in m]),
        "semicolon.csv": "\n".join([";".join(names)] + [";".join(map(str, r)) for r in m]),
        "comments.csv": "\n".join(["# exported by FlowJo 10", "", "# " + header, *rows, "# end"]),
        "crlf.csv": "\r\n".join([header, *rows]) + "\r\n",
        # labelled rows in another order than the columns: put back in column order
        "labelled.csv": "\n".join(
            [
                '"",' + header,
                "APC-A,{},{},{}".format(*m[2]),
                "FITC-A,{},{},{}".format(*m[0]),
                "PE-A,{},{},{}".format(*m[1]),
            ]
        ),
        "percent.csv": "\n".join([header] + [",".join(str(v * 100) for v in r) for r in m]),
        "oneline.txt": "3," + header + "," + ",".join(str(v) for v in m.ravel()),
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        comp = Compensation.from_csv(path)
        assert comp.channels == tuple(names), name
        assert np.allclose(comp.matrix, m, rtol=1e-12, atol=0), name
    bare = tmp_path / "bare.csv"
    bare.write_text("\n".join(rows))
    assert np.array_equal(Compensation.from_csv(bare, channels=names).matrix, m)
    with pytest.raises(CompensationError, match="no header row"):
        Compensation.from_csv(bare)


@pytest.mark.parametrize(
    "text, match",
    [
        ("A,B\n1,0.1\n0.2,NA", "'NA', not a number"),
        ("A,B\n1,0.1\n0.2,1\ntotal,3", "3 rows but 2 channels"),
        ("A,B\n1,0.1\n0.2,1\nnotes: made by hand", "line 4 is not a row of numbers"),
        ("A,B\n1,0.1,0\n0.2,1,0", "has 3 values but the matrix has 2"),
        ("A,B,C\n1,0,0\n0,1,0", "2 rows but 3 channels"),
        ("A,A\n1,0\n0,1", "the same channel twice: .A. \\(columns 1 and 2"),
        ("A,B\n1,1\n1,1", "singular"),
        ("A,B\n1,0.999999999\n1,1", "ill-conditioned"),
        ("", "empty"),
        ("just words", "no numeric rows"),
    ],
)
def test_bad_matrices_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(CompensationError, match=match) as info:
        Compensation.from_csv(path)
    assert "m.csv" in str(info.value)


def test_model_validation():
    with pytest.raises(CompensationError, match="square"):
        Compensation(np.ones((2, 3)), ("A", "B"))
    with pytest.raises(CompensationError, match="names 3 channels"):
        Compensation(np.eye(2), ("A", "B", "C"))
    with pytest.raises(CompensationError, match="non-finite.*row 'B', column 'A'"):
        Compensation(np.array([[1, 0], [np.nan, 1]]), ("A", "B"))
    with pytest.raises(CompensationError, match="singular"):
        Compensation(np.zeros((2, 2)), ("A", "B"))


def test_records_roundtrip(tmp_path):
    comp = Compensation.from_csv(shared_path("FlowKit", "data", "comp_complete_example.csv"))
    again = Compensation.from_dict(comp.to_dict())
    assert again == comp and again.hash == comp.hash
    assert Compensation.from_csv(comp.to_csv(tmp_path / "c.csv")) == comp
    record = comp.to_dict()
    record["matrix"][0][1] = 0.3
    with pytest.raises(CompensationError, match="hash"):
        Compensation.from_dict(record)
    # into an FCS file as $SPILLOVER and back
    events = np.ones((5, len(comp.channels)), np.float32)
    path = write_fcs(tmp_path / "x.fcs", events, list(comp.channels), spillover=comp.to_spillover())
    assert Compensation.from_sample(read_fcs(path)) == comp


# --------------------------------------------------------------------------------------------
# application: exact to FlowKit and flowutils
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comp_example():
    """FlowKit's test_comp_example.fcs read by cytopipe: raw events (equal to FlowUtils' plain
    .npy copy of them), $PnN names and the SPILL text."""
    fcs = shared_path("FlowKit", "data", "test_comp_example.fcs")
    sample = read_fcs(fcs)
    raw = np.load(shared_path("FlowUtils", "tests", "test_data", "test_comp_event_data.npy"))
    assert np.array_equal(sample.events, raw.astype(np.float32))
    return fcs, raw, sample.pnn, sample.keywords["SPILL"]


def _bound(raw: np.ndarray, comp: Compensation) -> np.ndarray:
    """Rounding bound of a float32 product: k * eps * |x| @ |inv(S)|."""
    return len(comp.channels) * EPS32 * (np.abs(raw) @ np.abs(comp.inverse))


def test_csv_compensation_equals_flowkit_and_flowutils(comp_example):
    import warnings

    import flowkit as fk
    import flowutils

    fcs, raw, names, _ = comp_example
    csv = shared_path("FlowKit", "data", "comp_complete_example.csv")
    comp = Compensation.from_csv(csv)
    ours = compensate(raw.astype(np.float32), comp, names)
    assert ours.dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = fk.Sample(str(fcs), ignore_offset_error=True)
    sample.apply_compensation(str(csv))
    ref_fk = sample.get_events(source="comp")
    idx = comp.columns_in(names)
    ref_fu = flowutils.compensate.compensate(raw, comp.matrix, list(idx))
    bound = _bound(raw[:, idx], comp)
    for ref in (ref_fk, ref_fu):
        err = np.abs(ours[:, idx] - ref[:, idx])
        assert np.all(err <= bound)
    print(
        f"\nmax |cytopipe - FlowKit| {np.abs(ours[:, idx] - ref_fk[:, idx]).max():.3g} (values up to {np.abs(ref_fk[:, idx]).max():.3g})"
    )
    others = np.setdiff1d(np.arange(raw.shape[1]), idx)
    assert np.array_equal(ours[:, others], raw[:, others].astype(np.float32))


def test_embedded_spill_equals_flowkit(comp_example):
    import flowkit as fk

    _, raw, names, spill_text = comp_example
    from cytopipe.fcs import parse_spillover

    comp = Compensation.from_spillover(parse_spillover(spill_text, "SPILL"))
    assert comp.source == "file:SPILL" and comp.is_identity  # this file's SPILL is the identity
    ours = compensate(raw.astype(np.float32), comp, names)
    ref = fk.Matrix(spill_text, comp.channels).matrix
    idx = comp.columns_in(names)
    import flowutils

    expect = flowutils.compensate.compensate(raw, ref, list(idx))
    assert np.array_equal(ours, expect.astype(np.float32))


def test_any_column_order_inplace_and_inverse(comp_example):
    _, raw, names, _ = comp_example
    comp = Compensation.from_csv(shared_path("FlowKit", "data", "comp_complete_example.csv"))
    ev = raw.astype(np.float32)
    expect = compensate(ev, comp, names)
    perm = np.random.default_rng(0).permutation(len(names))
    shuffled = np.ascontiguousarray(ev[:, perm])
    out = compensate(shuffled, comp, [names[i] for i in perm], inplace=True)
    assert out is shuffled
    assert np.array_equal(out, expect[:, perm])
    # undoing: compensated @ S gives the raw values back
    idx = comp.columns_in(names)
    back = expect[:, idx].astype(np.float64) @ comp.matrix
    assert np.all(np.abs(back - raw[:, idx]) <= 4 * _bound(raw[:, idx], comp) @ np.abs(comp.matrix) + 1e-3)
    with pytest.raises(CompensationError, match="float32"):
        compensate(raw, comp, names, inplace=True)


def test_samples_file_spill_none_and_mismatch_errors(tmp_path):
    path = shared_path("CytoExploreRData", "inst", "extdata", "Activation", "Activation_1.fcs")
    sample = read_fcs(path)
    out = compensate(sample)  # the file's SPILL by default
    assert isinstance(out, Sample) and out is not sample and out.events is not sample.events
    comp = Compensation.from_sample(sample)
    assert comp.source == "file:SPILL" and len(comp.channels) == 11
    assert np.array_equal(out.events, comp.apply(sample.events, sample.pnn))
    none = compensate(sample, "none")
    assert np.array_equal(none.events, sample.events) and none.events is not sample.events
    events = sample.events.copy()
    same = compensate(sample, comp, inplace=True)
    assert same is sample and not np.array_equal(sample.events, events)
    # a matrix for another panel
    other = Compensation.from_csv(shared_path("FlowKit", "data", "comp_complete_example.csv"))
    with pytest.raises(
        CompensationError, match=r"not in the file: \['Ax488-A'.*the file's channels are \['FSC-A'"
    ) as info:
        compensate(read_fcs(path), other)
    assert "Activation_1.fcs" in str(info.value)
    with pytest.raises(CompensationError, match="channels="):
        compensate(sample.events, comp)
    with pytest.raises(CompensationError, match="needs a Sample"):
        compensate(sample.events, "file", sample.pnn)
    bare = write_fcs(tmp_path / "nospill.fcs", sample.events[:10], sample.pnn)
    with pytest.raises(CompensationError, match="no spillover keyword") as info:
        compensate(read_fcs(bare))
    assert "nospill.fcs" in str(info.value)


# --------------------------------------------------------------------------------------------
# spillover from single-stain controls: synthetic controls with a known matrix
# --------------------------------------------------------------------------------------------
DETECTORS = ["FITC-A", "PE-A", "PE-Cy5-A", "PE-Cy7-A", "APC-A", "APC-Cy7-A", "BV421-A", "BV510-A"]
MARKERS = ["CD4", "CD25", "CD3", "CD127", "CD8", "CD45RA", "FOXP3", "Viability"]


def _true_spillover() -> np.ndarray:
    S = np.eye(len(DETECTORS))
    for (i, j), v in {
        (0, 1): 0.22, (1, 2): 0.35, (1, 3): 0.05, (2, 3): 0.18, (2, 4): 0.08, (3, 5): 0.06, (4, 5): 0.12,
        (4, 2): 0.02, (5, 3): 0.03, (6, 7): 0.15, (7, 0): 0.04, (1, 0): 0.01, (0, 6): 0.005, (2, 5): 0.04,
    }.items():  # fmt: skip
        S[i, j] = v
    return S


def _synthetic_control(rng, S, stained: int | None, median: float = 10_000.0, n: int = 30_000) -> Sample:
    """Cells with size-correlated autofluorescence, Poisson + multiplicative + electronic noise,
    40 % stained (log-normal brightness), plus 5 % debris, 4 % doublets and saturation."""
    k = len(DETECTORS)
    size = rng.lognormal(0, 0.25, n)
    fsc_h = 50_000 * size * rng.lognormal(0, 0.05, n)
    fsc = fsc_h * 1.2 * rng.lognormal(0, 0.03, n)
    ssc = 20_000 * size * rng.lognormal(0, 0.3, n)
    af_mean = np.array([300, 200, 150, 120, 80, 60, 400, 350.0])
    af = af_mean * size[:, None] * rng.lognormal(0, 0.3, (n, 1)) * rng.lognormal(0, 0.15, (n, k))
    true = np.zeros((n, k))
    if stained is not None:
        pos = rng.random(n) < 0.4
        true[pos, stained] = rng.lognormal(np.log(median), 0.5, pos.sum())
    signal = true @ S + af
    obs = signal + rng.normal(0, 1, (n, k)) * np.sqrt(30.0**2 + np.abs(signal) + (0.02 * signal) ** 2)
    nd, nb = n // 20, n // 25
    debris = np.column_stack(
        [
            rng.uniform(0, 15_000, nd),
            rng.uniform(0, 12_000, nd),
            rng.uniform(0, 8000, nd),
            rng.lognormal(np.log(200), 1, (nd, k)),
        ]
    )
    i = rng.integers(0, n, (nb, 2))
    doublets = np.column_stack(
        [
            fsc[i[:, 0]] + fsc[i[:, 1]],
            np.maximum(fsc_h[i[:, 0]], fsc_h[i[:, 1]]) * 1.1,
            ssc[i[:, 0]] + ssc[i[:, 1]],
            obs[i[:, 0]] + obs[i[:, 1]],
        ]
    )
    events = np.vstack([np.column_stack([fsc, fsc_h, ssc, obs]), debris, doublets])
    events = np.minimum(events, 262_143.0).astype(np.float32)
    names = ["FSC-A", "FSC-H", "SSC-A", *DETECTORS]
    channels = pd.DataFrame(
        {"n": range(1, len(names) + 1), "pnn": names, "pns": ["", "", "", *MARKERS], "pnr": 262144.0,
         "pnb": 32, "pne": "0,0", "png": 1.0}
    )  # fmt: skip
    return Sample(events, channels, {}, "FCS3.1", spillover=Spillover(np.eye(k), list(DETECTORS)))


def _synthetic_set(seed: int):
    rng = np.random.default_rng(seed)
    S = _true_spillover()
    medians = np.exp(rng.uniform(np.log(2000), np.log(40_000), len(DETECTORS)))
    medians[7] = 3000.0  # the dimmest: a viability dye ~15 negative SDs above the negatives
    controls = {m: _synthetic_control(rng, S, i, medians[i]) for i, m in enumerate(MARKERS)}
    return S, controls, _synthetic_control(rng, S, None)


@pytest.mark.parametrize("seed", [11, 12])
def test_recovers_known_spillover_from_synthetic_controls(seed):
    S, controls, unstained = _synthetic_set(seed)
    comp, quality = compute_spillover(controls, unstained)
    assert comp.channels == tuple(DETECTORS)  # from the controls' spillover keyword
    err = np.abs(comp.matrix - S)
    print(f"\nseed {seed}: max |estimated - true| = {err.max():.4f}")
    assert err.max() <= 0.01
    assert list(quality.columns) == [
        "source", "source_channel", "detector", "coefficient", "residual_slope", "se", "n_positive", "n_negative",
        "separation", "flag",
    ]  # fmt: skip
    assert len(quality) == len(MARKERS) * (len(DETECTORS) - 1)
    assert set(quality["flag"]) == {"ok"} and quality.attrs["converged"]
    assert (quality["residual_slope"].abs() < 1e-4).all()
    # primaries found from the markers ($PnS), as the manifest names them
    assert dict(zip(quality["source"], quality["source_channel"])) == dict(zip(MARKERS, DETECTORS))
    again, _ = compute_spillover(controls, unstained)
    assert again == comp  # deterministic


def test_without_unstained_uses_internal_negatives():
    """Without an unstained control the negatives are each control's own dim events (below
    Otsu's split of the primary detector)."""
    S, controls, _ = _synthetic_set(13)
    comp, quality = compute_spillover(controls, None)
    err = np.abs(comp.matrix - S)
    print(f"\nno unstained: max error {err.max():.4f}")
    assert err.max() <= 0.01
    assert (quality["n_negative"] < 31_000).all()  # the control's own negatives, not a tube


def test_dim_control_is_flagged():
    rng = np.random.default_rng(16)
    S = _true_spillover()
    controls = {m: _synthetic_control(rng, S, i, 20_000.0) for i, m in enumerate(MARKERS)}
    controls["Viability"] = _synthetic_control(rng, S, 7, 900.0)  # ~7 negative SDs above
    comp, quality = compute_spillover(controls, _synthetic_control(rng, S, None))
    dim = quality[quality["flag"] == "dim"]
    assert set(dim["source"]) == {"Viability"} and len(dim) == len(DETECTORS) - 1
    assert (dim["separation"] < 15).all()


def test_manifest_rows_and_given_primaries(tmp_path):
    S, controls, unstained = _synthetic_set(14)
    rows = [{"file": "unstained.fcs", "control": "unstained", "sample_id": "U"}]
    for m, s in controls.items():
        write_fcs(tmp_path / f"{m}.fcs", s.events, s.channels, spillover=s.spillover)
        rows.append({"file": f"{m}.fcs", "control": f"single:{m}", "sample_id": m})
    write_fcs(tmp_path / "unstained.fcs", unstained.events, unstained.channels, spillover=unstained.spillover)
    rows.append({"file": "P01_W00.fcs", "control": None, "sample_id": "P01"})  # a patient sample: ignored
    manifest = pd.DataFrame(rows)
    from_manifest, _ = compute_spillover(manifest, base_dir=tmp_path)
    from_dict, _ = compute_spillover(controls, unstained, primary=dict(zip(MARKERS, DETECTORS)))
    assert np.allclose(from_manifest.matrix, from_dict.matrix, atol=1e-12)
    assert np.abs(from_manifest.matrix - S).max() <= 0.01


def test_control_errors():
    S, controls, unstained = _synthetic_set(15)
    few = {"CD4": controls["CD4"], "CD25": controls["CD25"]}
    # an unstained tube passed off as a CD25 control
    with pytest.raises(
        CompensationError,
        match="control 'CD25' has no clear positive population in its primary detector 'PE-A'",
    ):
        compute_spillover({"CD4": controls["CD4"], "CD25": unstained}, unstained, primary={"CD25": "PE-A"})
    with pytest.raises(CompensationError, match="both have primary detector 'FITC-A'"):
        compute_spillover(few, unstained, primary={"CD4": "FITC-A", "CD25": "FITC-A"})
    with pytest.raises(CompensationError, match="lacks detector.*'BV605-A'"):
        compute_spillover(few, unstained, channels=[*DETECTORS, "BV605-A"])
    with pytest.raises(CompensationError, match="not one of the matrix detectors"):
        compute_spillover(few, unstained, primary={"CD4": "FSC-A"})
    with pytest.raises(CompensationError, match="not given"):
        compute_spillover(few, unstained, primary={"CD8": "APC-A"})
    with pytest.raises(CompensationError, match="at least one"):
        compute_spillover({}, unstained)


# --------------------------------------------------------------------------------------------
# the simulator's controls (beads + a cell-based viability control) with its true matrix
# --------------------------------------------------------------------------------------------
def _check_against_truth(folder, label: str) -> None:
    truth = Compensation.from_csv(folder / "truth" / "spillover.csv")
    comp, quality = compute_spillover(folder / "manifest.csv")  # unstained + single:<marker> rows
    ours = comp.to_dataframe().loc[list(truth.channels), list(truth.channels)].to_numpy()
    err = np.abs(ours - truth.matrix)
    per_row = pd.Series(err.max(axis=1), index=truth.channels)
    print(f"\n{label}: max |estimated - true| = {err.max():.4f}; worst per source row:")
    print(per_row.sort_values(ascending=False).head(4).round(4).to_string())
    assert err.max() <= 0.01
    assert set(quality["flag"]) == {"ok"} and quality.attrs["converged"]
    # each control's primary was found from its marker ($PnS through the panel aliases)
    from cytopipe.panel import resolve_markers

    unstained = read_fcs(folder / "fcs" / "controls" / "CTRL_unstained.fcs")
    expected = resolve_markers(unstained, sorted(set(quality["source"])))
    assert dict(zip(quality["source"], quality["source_channel"])) == expected


def test_recovers_true_spillover_of_a_freshly_simulated_trial(tmp_path):
    from cytopipe.simulate import simulate_trial

    folder = tmp_path / "trial"
    simulate_trial(folder, n_patients=1, visits=(0,), events=500, control_events=5000, seed=4242)
    _check_against_truth(folder, "fresh simulation, seed 4242")


def test_recovers_true_spillover_of_sample_data(sample_data):
    """sample_data has one control set per site (45 controls; its FMO rows are not part of them):
    one matrix per set, each within 0.01 of that site's true matrix; the plain call says how to
    handle several sets."""
    from cytopipe.compensation import compute_spillover_sets
    from cytopipe.errors import CompensationError

    with pytest.raises(CompensationError, match="one matrix per set"):
        compute_spillover(sample_data / "manifest.csv")
    col, sets = compute_spillover_sets(sample_data / "manifest.csv")
    assert col == "site" and sorted(sets) == ["S1", "S2", "S3"]
    for site, (comp, quality) in sets.items():
        truth = Compensation.from_csv(sample_data / "truth" / f"spillover_{site}.csv")
        ours = comp.to_dataframe().loc[list(truth.channels), list(truth.channels)].to_numpy()
        err = np.abs(ours - truth.matrix)
        print(f"\nsample_data site {site}: max |estimated - true| = {err.max():.4f}")
        assert err.max() <= 0.01
        assert quality.attrs["converged"]
        assert set(quality["flag"]) == {"ok"}


# --------------------------------------------------------------------------------------------
# real controls: CytoExploreRData (7 LSRII single stains + unstained)
# --------------------------------------------------------------------------------------------
def test_cytoexplorer_controls_report():
    """Compute a matrix from CytoExploreR's 6 single-stain controls + unstained and compare it
    with CytoExploreR's own estimate and with the acquisition SPILL (tables printed).

    Neither reference is the truth: they differ from each other by up to 0.077 (7-AAD and
    APC-Cy7 rows). Bounds: ours is within 0.06 of CytoExploreR's and 0.07 of the SPILL
    everywhere, i.e. no further from either than they are from each other; on the clean, bright
    FITC, PE and APC controls it is within 0.015 of the SPILL and 0.025 of CytoExploreR; the
    big coefficients (PE -> PE-Texas Red 0.53, APC -> AF700 0.37) within 0.01 of both."""
    base = ("CytoExploreRData", "inst", "extdata")
    table = pd.read_csv(shared_path(*base, "Compensation-Channels.csv"))
    controls, primary, unstained = {}, {}, None
    for _, row in table.iterrows():
        sample = read_fcs(shared_path(*base, "Compensation", row["name"]))
        if row["channel"] == "Unstained":
            unstained = sample
        else:
            controls[row["name"]] = sample
            primary[row["name"]] = row["channel"]
    comp, quality = compute_spillover(controls, unstained, primary)
    auto, _ = compute_spillover(controls, unstained)  # primaries found by brightness
    assert auto == comp
    theirs = Compensation.from_csv(shared_path(*base, "Compensation-Spillover-Matrix.csv"))
    acquisition = Compensation.from_sample(unstained)
    sources = list(primary.values())
    vs_theirs = spillover_difference(comp, theirs).loc[sources]
    vs_acq = spillover_difference(comp, acquisition).loc[sources]
    theirs_vs_acq = spillover_difference(theirs, acquisition).loc[sources]
    summary = pd.DataFrame(
        {
            "max|cytopipe-CytoExploreR|": vs_theirs.abs().max(axis=1),
            "max|cytopipe-SPILL|": vs_acq.abs().max(axis=1),
            "max|CytoExploreR-SPILL|": theirs_vs_acq.abs().max(axis=1),
            "separation": quality.groupby("source_channel")["separation"].first(),
            "flags": quality.groupby("source_channel")["flag"].agg(lambda f: ",".join(sorted(set(f)))),
        }
    ).loc[sources]
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(
            "\ncytopipe spillover (controlled rows):\n"
            + comp.to_dataframe().loc[sources].round(4).to_string()
        )
        print("\ncytopipe - CytoExploreR:\n" + vs_theirs.round(4).to_string())
        print("\ncytopipe - acquisition SPILL:\n" + vs_acq.round(4).to_string())
        print("\nper control:\n" + summary.round(4).to_string())
    assert vs_theirs.abs().to_numpy().max() < 0.06
    assert vs_acq.abs().to_numpy().max() < 0.07
    assert theirs_vs_acq.abs().to_numpy().max() > 0.07  # the references' own disagreement
    bright = ["Alexa Fluor 488-A", "PE-A", "Alexa Fluor 647-A"]
    assert vs_acq.loc[bright].abs().to_numpy().max() < 0.015
    assert vs_theirs.loc[bright].abs().to_numpy().max() < 0.025
    ours = comp.to_dataframe()
    for (src, det), (ref1, ref2) in {
        ("PE-A", "PE-Texas Red-A"): (theirs, acquisition),
        ("Alexa Fluor 647-A", "Alexa Fluor 700-A"): (theirs, acquisition),
    }.items():
        for ref in (ref1, ref2):
            assert abs(ours.loc[src, det] - ref.to_dataframe().loc[src, det]) < 0.01


def test_docs_examples_run(monkeypatch):
    """Every python block of docs/compensation.md runs as written (from the repository root)."""
    import re
    from pathlib import Path

    shared_path("CytoExploreRData", "inst", "extdata", "Compensation")
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "compensation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(root)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/compensation.md", "exec"), namespace)
    assert abs(namespace["comp"].to_dataframe().loc["PE-A", "PE-Texas Red-A"] - 0.527) < 0.005


def _csv_matrix_run(tmp_path, visits, matrix_names, edit=None):
    """A simulated trial run with `compensation: {source: csv}`: its true matrix, channels renamed
    by ``matrix_names`` (the CLI, synchronous); ``edit(trial_folder)`` changes files first."""
    import yaml

    from cytopipe.simulate import simulate_trial
    from tests.pipeline_support import TEMPLATE, cli

    simulate_trial(tmp_path / "trial", n_patients=1, visits=visits, events=2000, control_events=100)
    if edit is not None:
        edit(tmp_path / "trial")
    matrix = Compensation.from_csv(tmp_path / "trial" / "truth" / "spillover.csv")
    renamed = [matrix_names(c) for c in matrix.channels]
    Compensation(matrix.matrix, tuple(renamed), "test").to_csv(tmp_path / "other_panel.csv")
    spec = {"study": "csv matrix", "manifest": "trial/manifest.csv", "template": str(TEMPLATE),
            "compensation": {"source": "csv", "path": "other_panel.csv"}, "clustering": {"enabled": False},
            "statistics": {"enabled": False}, "report": {"enabled": False}}  # fmt: skip
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return cli("run", str(tmp_path / "w.yaml"), "--out", str(tmp_path / "run"), "--scheduler", "synchronous")


def test_a_study_csv_matrix_that_fits_no_file_stops_the_run_before_any_work(tmp_path):
    """`compensation: {source: csv}` whose channels are in no file (e.g. another panel's matrix): one
    error before any gating, naming the CSV, its channels and the files' channels (exit 2; it failed
    every sample one by one, exit 3)."""
    proc = _csv_matrix_run(tmp_path, (0,), lambda c: c.replace("-A", "_A"))  # exported with other names
    assert proc.returncode == 2, proc.stderr + proc.stdout
    csv = (tmp_path / "other_panel.csv").resolve()
    assert f"file '{csv}': the spillover matrix's channels ['BUV395_A'," in proc.stderr
    assert "are not all in any of the 1 file(s) (did you mean 'BUV395-A' instead of 'BUV395_A'" in proc.stderr
    assert "the files' channels are ['FSC-A', 'FSC-H', 'SSC-A', 'BUV395-A'," in proc.stderr
    assert "(1 file(s): P001_W00.fcs)" in proc.stderr
    assert not (tmp_path / "run" / "population_stats.parquet").exists()


def test_a_study_csv_matrix_that_fits_some_files_fails_only_the_others(tmp_path):
    """A matrix that fits one file but not another: the run goes on, and only the file it does not fit
    fails, with an error naming the CSV (not the file's own `file:$SPILLOVER`)."""

    def rename_w04_channels(trial):  # the W04 file, acquired with other channel names
        path = trial / "fcs" / "P001_W04.fcs"
        sample = read_fcs(path)
        channels = sample.channels.copy()
        channels["pnn"] = [c.replace("-A", "_A") for c in channels["pnn"]]
        keywords = {k: v for k, v in sample.keywords.items() if k not in ("$SPILLOVER", "SPILL", "$COMP")}
        write_fcs(path, sample.events, channels, keywords)

    proc = _csv_matrix_run(tmp_path, (0, 4), lambda c: c, edit=rename_w04_channels)
    assert proc.returncode == 3, proc.stderr + proc.stdout
    samples = pd.read_parquet(tmp_path / "run" / "samples.parquet").set_index("sample_id")
    assert samples.loc["P001_W00", "error"] in (None, "") or pd.isna(samples.loc["P001_W00", "error"])
    error = samples.loc["P001_W04", "error"]
    assert f"the spillover matrix (csv:{(tmp_path / 'other_panel.csv').resolve()}) names channels" in error
    assert "$SPILLOVER" not in error
    assert error.startswith("file 'fcs/P001_W04.fcs', channel 'BUV395-A'")  # the file, as in the manifest
