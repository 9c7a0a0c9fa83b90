"""read_fcs against independent truth: FlowIO truth arrays, fcsparser's and FCSFiles.jl's
expected values, FlowUtils' event array, and one real file per quirk of CATALOG section 4."""

from __future__ import annotations

import json
import warnings

import flowio
import numpy as np
import pytest

from cytopipe import errors
from cytopipe.fcs import FCSWarning, count_datasets, read_fcs, read_fcs_header
from tests.conftest import shared_path

CYTOFLOW = ("cytoflow", "cytoflow", "tests", "data", "instruments")
FCSPARSER = ("fcsparser", "fcsparser", "tests", "data", "FlowCytometers")


def quiet_read(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSWarning)
        return read_fcs(path, **kw)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of two float32 arrays (NaN payloads included)."""
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# --------------------------------------------------------------------------------------------
# reference values from other projects
# --------------------------------------------------------------------------------------------
def test_data1_matches_flowio_truth_raw_and_preprocessed():
    path = shared_path("FlowKit", "data", "gate_ref", "data1.fcs")
    raw = np.load(shared_path("FlowIO", "data", "truth", "data1_original_events.npy"))
    pre = np.load(shared_path("FlowIO", "data", "truth", "data1_preprocessed.npy"))
    sample = read_fcs(path)
    assert sample.version == "FCS2.0" and sample.events.dtype == np.float32
    assert sample.events.flags.c_contiguous
    assert same(sample.events, raw)
    processed = read_fcs(path, preprocess=True)
    assert processed.preprocessed and same(processed.events, pre)
    # the CATALOG's first event: gain on FSC-H (3.67) / SSC-H (8), '4,0' log decoding
    assert processed.events[0, :3] == pytest.approx([88.01, 27.25, 7.234], abs=1e-3)
    assert list(sample.channels["pne"])[2] == "4,0"


def test_accuri_b01_matches_flowio_preprocessed_truth():
    path = shared_path("FlowIO", "data", "fcs_files", "B01 KC-A-W---91-US.fcs")
    truth = np.load(shared_path("FlowIO", "data", "truth", "B01 KC-A-W---91-US_preprocessed_events.npy"))
    assert same(read_fcs(path, preprocess=True).events, truth)


def test_fcsparser_expected_values():
    expected = json.loads(
        shared_path("fcsparser", "_expected", "expected_values_from_upstream_tests.json").read_text()
    )
    checked = 0
    for rel, spec in expected["files"].items():
        if "first_rows" not in spec:
            continue
        sample = quiet_read(shared_path("fcsparser", *rel.split("/")))
        rows = np.array(spec["first_rows"], dtype=np.float64)
        # the upstream values are float32 numbers printed in full: equal after rounding to float32
        assert same(sample.events[: len(rows)], rows.astype(np.float32)), rel
        if "shape" in spec:
            assert list(sample.events.shape) == spec["shape"]
        for key, value in spec.get("meta", {}).items():
            assert sample.keywords[key] == value
        checked += 1
    assert checked == 9


def test_fcsfiles_jl_attune_value():
    # fcsexamples' Attune file is byte-identical to cytoflow's copy (same size, same events)
    sample = read_fcs(shared_path(*CYTOFLOW, "Applied Biosystems - Attune.fcs"))
    assert sample.n_events == 22188
    assert sample.events[1, sample.channel_index("FSC-A")] == np.float32(244982.11)


def test_test_comp_example_equals_flowutils_event_array():
    """$ENDDATA one past the data: the raw events equal FlowUtils' stored array exactly."""
    sample = read_fcs(shared_path("FlowKit", "data", "test_comp_example.fcs"))
    truth = np.load(shared_path("FlowUtils", "tests", "test_data", "test_comp_event_data.npy"))
    assert same(sample.events, truth)
    assert sample.spillover is not None and sample.spillover.keyword == "SPILL"
    assert sample.spillover.matrix.shape == (len(sample.spillover.channels),) * 2
    assert set(sample.spillover.channels) <= set(sample.pnn)


# --------------------------------------------------------------------------------------------
# CATALOG section 4, one real file per quirk
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("parts", "versions", "events"),
    [
        (("FlowKit", "data", "multi_dataset_fcs", "coulter.lmd"), ["FCS2.0", "FCS3.0"], 18110),
        ((*CYTOFLOW, "Beckman Coulter - Gallios.LMD"), ["FCS2.0", "FCS3.0"], 26383),
        ((*CYTOFLOW, "Beckman Coulter - Cytomics FC500.LMD"), ["FCS2.0", "FCS3.0"], 27072),
    ],
)
def test_multiple_data_sets(parts, versions, events):
    path = shared_path(*parts)
    assert count_datasets(path) == 2
    for index, version in enumerate(versions):
        sample = quiet_read(path, dataset=index)
        assert (sample.dataset, sample.n_datasets, sample.version) == (index, 2, version)
        assert sample.n_events == events
    reference = flowio.read_multiple_data_sets(str(path), ignore_offset_error=True)
    for index, fd in enumerate(reference):
        if index == 0 and "FC500" in path.name:
            continue  # 10-bit values in 16-bit words: flowio cannot read them (see the next test)
        assert same(quiet_read(path, dataset=index).events, fd.as_array(preprocess=False))
    with pytest.raises(errors.FCSError, match="has only 2"):
        read_fcs(path, dataset=2)


def test_pnb_10_stored_in_16_bit_words_matches_the_32_bit_data_set():
    """FC500 data set 0 stores 10-bit values in 16-bit words; data set 1 holds the same
    events at 20-bit resolution, so dropping its 10 low bits must give data set 0."""
    path = shared_path(*CYTOFLOW, "Beckman Coulter - Cytomics FC500.LMD")
    low, high = quiet_read(path, dataset=0), quiet_read(path, dataset=1)
    assert list(low.channels["pnb"]) == [10] * 4 and low.events.max() <= 1023
    for name, hi_name in (("FS Lin", "FS"), ("SS Lin", "SS")):
        coarse = np.floor(high.events[:, high.channel_index(hi_name)] / 1024)
        assert np.array_equal(low.events[:, low.channel_index(name)], coarse)


@pytest.mark.parametrize(
    ("parts", "used"),
    [
        (("FlowKit", "data", "noncompliant", "data_start_offset_discrepancy_example.fcs"), "TEXT"),
        (("FlowKit", "data", "noncompliant", "data_stop_offset_discrepancy_example.fcs"), "TEXT"),
        ((*CYTOFLOW, "Beckman Coulter - Cyan.fcs"), "HEADER"),
        ((*CYTOFLOW, "Accuri - C6.fcs"), "HEADER"),
    ],
)
def test_header_and_text_offsets_disagree(parts, used):
    path = shared_path(*parts)
    with pytest.warns(FCSWarning, match="HEADER and TEXT disagree"):
        sample = read_fcs(path)
    assert any(f"used the {used} offsets" in w for w in sample.warnings)
    option = {"use_header_offsets": True} if used == "HEADER" else {"ignore_offset_discrepancy": True}
    fd = flowio.FlowData(str(path), ignore_offset_error=True, **option)
    assert same(sample.events, fd.as_array(preprocess=False))


def test_cyan_header_offsets_keep_the_event_counter_aligned():
    """The Cyan's TEXT offsets are 46 bytes late; with the HEADER's, 'Event Count' counts up by one."""
    sample = quiet_read(shared_path(*CYTOFLOW, "Beckman Coulter - Cyan.fcs"))
    counter = sample.events[:, sample.channel_index("Event Count")]
    assert np.all(np.diff(counter[:50]) == 1)


def test_truncated_aria_file_is_rejected_with_the_event_count():
    path = shared_path("fcs-npm", "test", "testdata", "AriaFile1.fcs")
    with pytest.raises(errors.FCSDataError, match=r"truncated \(only 6052 of 10000 events") as info:
        read_fcs(path)
    assert str(path) in str(info.value)


def test_header_data_offsets_zero_use_begindata():
    path = shared_path(*FCSPARSER, "fake_large_fcs", "fake_large_fcs.fcs")
    info = read_fcs_header(path)
    raw = path.read_bytes()
    assert int(raw[26:34].strip() or 0) == 0 and int(info.keywords["$BEGINDATA"]) > 0
    sample = read_fcs(path)
    twin = read_fcs(shared_path(*FCSPARSER, "Fortessa", "FCS_3.0_Fortessa_PBS_Specimen_001_A1_A01.fcs"))
    assert same(sample.events, twin.events)  # the 'large' file is the Fortessa file re-laid out


def test_enddata_one_past_the_data_is_read_without_warning():
    path = shared_path(*FCSPARSER, "MiltenyiBiotec", "FCS3.1", "EY_2013-07-19_PBS_FCS_3.1_Well_A1.001.fcs")
    info = read_fcs_header(path)
    begin, end = int(info.keywords["$BEGINDATA"]), int(info.keywords["$ENDDATA"])
    assert end - begin + 1 == info.n_events * info.n_channels * 4 + 1
    sample = quiet_read(path)
    assert not [w for w in sample.warnings if "DATA" in w]


def test_header_and_text_only_file():
    path = shared_path(*FCSPARSER, "cytek-nl-2000", "sample_header.fcs")
    info = read_fcs_header(path)
    # fcsparser's test expects 200 entries: these 199 keywords plus its own '__header__' entry
    assert len(info.keywords) == 199 and info.keywords["$P9B"] == "32"
    assert info.data_segment is None and "only HEADER and TEXT" in info.data_error
    with pytest.raises(errors.FCSDataError, match="only HEADER and TEXT") as exc:
        read_fcs(path)
    assert str(path) in str(exc.value)


def test_corrupted_ten_byte_file():
    path = shared_path(*FCSPARSER, "corrupted", "corrupted.fcs")
    with pytest.raises(errors.FCSHeaderError, match="not an FCS file") as exc:
        read_fcs(path)
    assert str(path) in str(exc.value)


def reference_24_bit(path):
    """Independent decode of a big-endian 24-bit file (values assembled from bytes)."""
    raw = path.read_bytes()
    t0, t1 = int(raw[10:18]), int(raw[18:26])
    text = raw[t0 : t1 + 1]
    tokens = text[1:].split(text[:1])
    kw = {tokens[i].strip().upper(): tokens[i + 1] for i in range(0, len(tokens) - 1, 2)}
    tot, par = int(kw[b"$TOT"]), int(kw[b"$PAR"])
    begin = int(raw[26:34].strip() or 0) or int(kw[b"$BEGINDATA"])
    grid = np.frombuffer(raw, np.uint8, tot * par * 3, begin).reshape(tot, par, 3).astype(np.uint32)
    values = (grid[..., 0] << 16) | (grid[..., 1] << 8) | grid[..., 2]
    ranges = [int(float(kw[b"$P%dR" % n])) for n in range(1, par + 1)]
    masks = np.array([(1 << min(24, (r - 1).bit_length())) - 1 for r in ranges], dtype=np.uint32)
    return (values & masks).astype(np.float32)


@pytest.mark.parametrize(
    "parts",
    [
        (*FCSPARSER, "Cytek_xP5", "Cytek_xP5.fcs"),
        ("FlowCal", "test", "Data003.fcs"),
        ("FlowCal", "examples", "FCFiles", "sample001.fcs"),
    ],
)
def test_24_bit_integers(parts):
    path = shared_path(*parts)
    sample = read_fcs(path)
    assert set(sample.channels["pnb"]) == {24}
    assert same(sample.events, reference_24_bit(path))


@pytest.mark.parametrize(
    "parts",
    [
        (*CYTOFLOW, "Stratedigm - S1400.fcs"),
        ("FlowIO", "data", "fcs_files", "variable_int_example.fcs"),
    ],
)
def test_mixed_pnb_matches_flowio(parts):
    path = shared_path(*parts)
    sample = quiet_read(path)
    assert len(set(sample.channels["pnb"])) > 1
    assert same(sample.events, flowio.FlowData(str(path)).as_array(preprocess=False))


def test_mixed_pnb_16_32_8_cyflow_cube():
    sample = read_fcs(shared_path(*FCSPARSER, "cyflow_cube_8", "cyflow_cube_8.fcs"))
    assert sorted(set(sample.channels["pnb"])) == [8, 16, 32]
    assert sample.events.shape == (725, 10)


def test_bits_above_pnr_are_masked_system_ii():
    """'extra info in bits D10-D15': values must be masked to $PnR (1024), and said so."""
    path = shared_path(*CYTOFLOW, "System II listmode with extra info in bits D10-D15.LMD")
    with pytest.warns(FCSWarning, match="bits above the \\$PnR range"):
        sample = read_fcs(path)
    ranges = sample.channels["pnr"].to_numpy()
    assert (sample.events < ranges).all()
    raw = read_fcs_header(path)
    begin = raw.data_segment[0]
    unmasked = np.frombuffer(path.read_bytes(), "<u2", sample.n_events * sample.n_channels, begin)
    assert unmasked.max() >= 1024  # the bits really were there
    assert same(sample.events, (unmasked.reshape(sample.events.shape) & 1023).astype(np.float32))


def test_bitmask_fcs1_cleaned_lmd():
    sample = quiet_read(shared_path(*FCSPARSER, "fake_bitmask_error", "fcs1_cleaned.lmd"))
    assert sample.events.max() < 1024  # raw 16912 becomes 528 after masking with $PnR - 1
    assert 528 in sample.events


def test_little_endian_1_2_sixteen_bit():
    path = shared_path("FlowKit", "data", "multi_dataset_fcs", "coulter.lmd")
    sample = quiet_read(path, dataset=0)
    assert sample.keywords["$BYTEORD"] == "1,2" and set(sample.channels["pnb"]) == {16}


@pytest.mark.parametrize(
    ("parts", "spill"),
    [
        (("FlowKit", "data", "100715.fcs"), True),
        (("cytofkit", "inst", "extdata", "130515_C2_stim_CD19-.fcs"), False),  # no SPILL in this copy
    ],
)
def test_fcs2_float(parts, spill):
    path = shared_path(*parts)
    sample = quiet_read(path)
    assert sample.version == "FCS2.0" and sample.keywords["$DATATYPE"] == "F"
    assert (sample.spillover is not None) == spill
    if spill:
        assert set(sample.spillover.channels) <= set(sample.pnn)
        assert sample.spillover.matrix.shape == (13, 13)
    assert same(sample.events, flowio.FlowData(str(path), ignore_offset_error=True).as_array(False))


def _delimiter(path):
    raw = path.read_bytes()
    return raw[int(raw[10:18]) : int(raw[10:18]) + 1]


@pytest.mark.parametrize(
    ("parts", "delimiter"),
    [
        ((*CYTOFLOW, "System II listmode with extra info in bits D10-D15.LMD"), b"!"),
        (("FlowCal", "test", "Data002.fcs"), b"\x0c"),
        ((*CYTOFLOW, "Beckman Coulter - Cyan.fcs"), b"|"),
        ((*CYTOFLOW, "Beckman Coulter - MoFlo XDP.fcs"), b"|"),
        (("FlowIO", "data", "fcs_files", "3FITC_4PE_004.fcs"), b"/"),
    ],
)
def test_odd_text_delimiters(parts, delimiter):
    path = shared_path(*parts)
    assert _delimiter(path) == delimiter
    sample = quiet_read(path)
    n = int(sample.keywords["$PAR"])
    assert len(sample.channels) == n and all(f"$P{i}B" in sample.keywords for i in range(1, n + 1))
    assert sample.n_events == int(sample.keywords["$TOT"])


def test_pne_oddities_preprocess_like_flowio():
    cases = [
        ((*CYTOFLOW, "Beckman Coulter - Cytomics FC500.LMD"), 0, " 4.0,0.1024"),
        ((*CYTOFLOW, "Beckman Coulter - MoFlo XDP.fcs"), 0, "5.0,0.00"),
        ((*CYTOFLOW, "System II listmode with extra info in bits D10-D15.LMD"), 0, "4,0.1"),
        (("FlowKit", "data", "gate_ref", "data1.fcs"), 0, "4,0"),
    ]
    for parts, dataset, pne in cases:
        path = shared_path(*parts)
        sample = quiet_read(path, dataset=dataset, preprocess=True)
        assert pne.strip() in set(sample.channels["pne"]), path.name
        if "FC500" in path.name:  # flowio cannot read 10-bit words: decode by hand
            raw = quiet_read(path, dataset=0)
            j = sample.channel_index("FL1 Log")
            expected = (10 ** (4.0 * raw.events[:, j].astype(np.float64) / 1024.0)) * 0.1024
            assert same(sample.events[:, j], expected)
        else:
            fd = flowio.FlowData(str(path), ignore_offset_error=True)
            assert same(sample.events, fd.as_array(preprocess=True))


def test_blank_pns_and_fcs2_empty_values():
    sample = read_fcs(shared_path("FlowSOM", "inst", "extdata", "68983.fcs"))
    assert sample.keywords["$P1S"] == " " and sample.markers[0] == ""
    assert "CD4" in sample.markers
    diva = read_fcs(shared_path("flowWorkspaceData", "inst", "extdata", "diva", "124500.fcs"))
    assert diva.markers[:8] == [""] * 8 and diva.markers[8] == "CD3"
    # CATALOG lists an empty $P6N here; read correctly, the doubled backslashes are the empty
    # values of $P3S and $P4S (FCS 2.0), and $P6N is FL1-A (FlowIO's regex merges those
    # keywords and loses $P6N).
    flowcore = read_fcs(shared_path("flowCore", "inst", "extdata", "0877408774.B08"))
    assert flowcore.keywords["$P3S"] == "" and flowcore.keywords["$P4S"] == ""
    assert flowcore.pnn == ["FSC-H", "SSC-H", "FL1-H", "FL2-H", "FL3-H", "FL1-A", "FL4-H", "Time"]
    assert flowcore.markers[2:4] == ["", ""] and flowcore.keywords["$P6R"] == "1024"


def test_duplicate_markers_and_the_duplicate_names_file():
    # Despite its name, this MACSQuant file has unique $PnN (fcsparser's test is about its
    # $PnS naming); duplicate $PnN are tested on a generated file in test_fcs_features.
    path = shared_path(*FCSPARSER, "MiltenyiBiotec", "FCS3.1", "SG_2014-09-26_Duplicate_Names.fcs")
    sample = quiet_read(path)
    assert len(set(sample.pnn)) == sample.n_channels == 9
    with pytest.raises(errors.FCSKeywordError, match="no channel named 'nope'") as exc:
        sample.channel_index("nope")
    assert str(path) in str(exc.value)
    markers = quiet_read(shared_path("cytofkit", "inst", "extdata", "130515_C2_stim_CD19-.fcs")).markers
    assert sum("CD14" in m for m in markers) == 2


def test_non_ascii_text():
    g11 = read_fcs(shared_path("FlowIO", "data", "fcs_files", "G11.fcs"))
    assert any("\u2122" in m for m in g11.markers)  # UTF-8 trade mark sign in $PnS
    data1 = read_fcs(shared_path("FlowKit", "data", "gate_ref", "data1.fcs"))
    assert data1.keywords["CREATOR"] == "CELLQuest\xaa 3.3"  # not UTF-8: Latin-1 keeps the byte
    assert data1.keywords["&5DATA FILE PREFIX PART #1"] == ""  # FCS 2.0 empty value


def test_channel_names_with_slashes():
    sample = read_fcs(shared_path("CytoPipeline", "inst", "extdata", "Donor1.fcs"))
    assert "730//45Red-A" in sample.pnn and sample.n_channels == 22


def test_spillover_keyword_variants():
    diva = read_fcs(shared_path("FlowKit", "data", "test_comp_example.fcs"))
    assert diva.spillover.keyword == "SPILL"
    accuri = read_fcs(shared_path("FlowIO", "data", "fcs_files", "B01 KC-A-W---91-US.fcs"))
    # Accuri C6: $SPILLOVER over the 8 area and height channels (two identical 4x4 blocks)
    assert accuri.spillover.keyword == "$SPILLOVER" and accuri.spillover.channels[:4] == [
        "FL1-A",
        "FL2-A",
        "FL3-A",
        "FL4-A",
    ]
    assert accuri.spillover.matrix[0, 1] == pytest.approx(0.1203)
    aurora = read_fcs(shared_path("CytometryInR", "course", "00_Floreada", "data").glob("*.fcs").__next__())
    assert aurora.spillover.keyword == "$SPILLOVER"
    with pytest.warns(FCSWarning, match="by parameter number"):
        gallios = read_fcs(shared_path(*CYTOFLOW, "Beckman Coulter - Gallios.LMD"), dataset=1)
    assert gallios.spillover.keyword == "$SPILLOVER" and set(gallios.spillover.channels) <= set(gallios.pnn)
    strat = quiet_read(shared_path(*CYTOFLOW, "Stratedigm - S1400.fcs"))
    assert "DET_SPILL" in strat.keywords and strat.spillover.keyword == "SPILL"
    with pytest.warns(FCSWarning, match="no matrix values"):
        macs = read_fcs(
            shared_path(*FCSPARSER, "MiltenyiBiotec", "FCS3.1", "EY_2013-07-19_PBS_FCS_3.1_Well_A1.001.fcs")
        )
    assert macs.spillover is None


def test_already_transformed_and_tiny_and_extensionless_files():
    trans = quiet_read(shared_path("PeacoQC", "inst", "extdata", "111_Comp_Trans.fcs"))
    assert trans.n_events == 9617
    one = read_fcs(
        shared_path("fcexpr", "inst", "extdata", "_extracted", "Part_1", "Specimen_001_Tube_001_001.fcs")
    )
    assert one.events.shape == (1, 22)
    diamond = read_fcs(shared_path("FlowKit", "data", "simple_diamond_example", "test_data_diamond_01.fcs"))
    assert diamond.events.shape == (200000, 2)
    noext = quiet_read(shared_path("flowCore", "inst", "extdata", "compdata", "data", "060909.001"))
    assert noext.n_events > 0 and noext.version == "FCS2.0"


def test_read_fcs_header_matches_read_fcs():
    path = shared_path("FlowKit", "data", "100715.fcs")
    info = read_fcs_header(path)
    sample = read_fcs(path)
    assert (info.n_events, info.n_channels) == sample.events.shape
    assert info.keywords == sample.keywords and info.datatype == "F" and info.byte_order == "big"
    assert info.data_segment[1] - info.data_segment[0] + 1 == sample.events.nbytes
    assert info.spillover.channels == sample.spillover.channels
