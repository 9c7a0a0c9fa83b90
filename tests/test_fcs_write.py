"""write_fcs: exact round trips, and flowio and fcsparser read our files identically."""

from __future__ import annotations

import warnings

import fcsparser
import flowio
import numpy as np
import pandas as pd
import pytest

from cytopipe import errors
from cytopipe.fcs import FCSWarning, Spillover, _layout_text, read_fcs, write_fcs
from tests.conftest import shared_path


def bits_equal(a, b) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def events(n=500, p=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.lognormal(6, 2, size=(n, p)) - 50).astype(np.float32)


CHANNELS = pd.DataFrame(
    {
        "pnn": ["FSC-A", "SSC-A", "BV421-A", "PE-Cy7-A"],
        "pns": ["", "", "CD25 \u2013 Treg\u2122 \u00b5", "FOXP3|PE/Cy7"],
    }
)


def read_with_peers(path):
    fd = flowio.FlowData(str(path))
    meta, frame = fcsparser.parse(str(path), reformat_meta=False, channel_naming="$PnN", dtype=None)
    return fd, meta, frame


def test_round_trip_is_exact_and_peers_agree(tmp_path):
    data = events()
    data[0, 0], data[1, 1], data[2, 2] = np.nan, -0.0, 3.4e38
    spill = Spillover(np.array([[1.0, 0.123456789012345], [0.0731, 1.0]]), ["BV421-A", "PE-Cy7-A"])
    path = write_fcs(
        tmp_path / "rt.fcs", data, CHANNELS, {"$CYT": "Simulator", "STUDY": "NCT04077684"}, spill
    )
    sample = read_fcs(path)
    assert bits_equal(sample.events, data) and sample.warnings == []
    assert sample.version == "FCS3.1" and sample.pnn == list(CHANNELS["pnn"])
    assert sample.markers == list(CHANNELS["pns"])
    assert sample.keywords["STUDY"] == "NCT04077684"
    assert (
        np.array_equal(sample.spillover.matrix, spill.matrix) and sample.spillover.channels == spill.channels
    )
    fd, meta, frame = read_with_peers(path)
    assert bits_equal(fd.as_array(preprocess=False), data)
    assert bits_equal(fd.as_array(preprocess=True), data)  # linear, no gain: preprocessing is a no-op
    assert fd.pnn_labels == sample.pnn and fd.pns_labels == sample.markers
    assert bits_equal(frame.to_numpy(), data)
    assert list(frame.columns) == sample.pnn and meta["$P3S"] == CHANNELS["pns"][2]
    assert meta["$SPILLOVER"] == sample.keywords["$SPILLOVER"]


def test_delimiter_everywhere_falls_back_to_escapes(tmp_path):
    candidates = "|/\\*!#%&;~@\x0c\x1e\x1f"
    data = events(20, 2)
    keywords = {"NOTE": f"all of {candidates} here", "OTHER": "a||b"}
    path = write_fcs(tmp_path / "esc.fcs", data, [("A", "m|1"), ("B", "m/2")], keywords)
    sample = read_fcs(path)
    assert sample.keywords["NOTE"] == keywords["NOTE"] and sample.keywords["OTHER"] == "a||b"
    assert sample.markers == ["m|1", "m/2"] and bits_equal(sample.events, data)
    fd, meta, frame = read_with_peers(path)
    assert meta["NOTE"] == keywords["NOTE"] and bits_equal(frame.to_numpy(), data)
    assert bits_equal(fd.as_array(False), data)


def test_zero_events(tmp_path):
    path = write_fcs(tmp_path / "zero.fcs", np.zeros((0, 3), np.float32), ["A", "B", "C"])
    sample = read_fcs(path)
    assert sample.events.shape == (0, 3) and sample.keywords["$TOT"] == "0"
    fd, meta, frame = read_with_peers(path)
    assert fd.event_count == 0 and frame.shape == (0, 3)


def test_large_data_moves_offsets_out_of_the_header():
    """> 99,999,999 bytes of DATA: HEADER data offsets are 0, $BEGINDATA/$ENDDATA hold them."""
    text = {"$PAR": "1", "$TOT": "30000000", "$P1N": "A", "$P1B": "32", "$P1E": "0,0", "$P1R": "1"}
    header, body = _layout_text(text, 120_000_000, None)
    assert header[26:42] == b"       0       0"
    assert int(header[10:18]) == 58 and int(header[18:26]) == 57 + len(body)
    tokens = body[1:].split(body[:1])
    kw = dict(zip(tokens[0::2], tokens[1::2]))
    begin = int(kw[b"$BEGINDATA"])
    assert begin == 58 + len(body) and int(kw[b"$ENDDATA"]) == begin + 120_000_000 - 1
    small_header, _ = _layout_text(text, 1000, None)
    assert int(small_header[26:34]) > 0


@pytest.mark.slow
def test_large_file_round_trip_with_peers(tmp_path):
    data = np.arange(26_000_000, dtype=np.float32).reshape(-1, 2)  # 104 MB of DATA
    path = write_fcs(tmp_path / "big.fcs", data, ["A", "B"])
    assert path.read_bytes()[26:42] == b"       0       0"
    assert bits_equal(read_fcs(path).events, data)
    assert bits_equal(flowio.FlowData(str(path)).as_array(False), data)


def test_pnr_defaults_and_given_ranges(tmp_path):
    data = np.array([[1.0, 5e6, np.inf], [2.0, -3.0, np.nan]], np.float32)
    table = pd.DataFrame({"pnn": ["A", "B", "C"], "pnr": [1024.0, np.nan, np.nan]})
    sample = read_fcs(write_fcs(tmp_path / "r.fcs", data, table))
    assert list(sample.channels["pnr"]) == [1024.0, 2.0**23, 262144.0]


def test_sample_from_a_real_file_round_trips(tmp_path):
    source = read_fcs(shared_path("FlowKit", "data", "100715.fcs"))  # FCS 2.0, big-endian, SPILL
    path = write_fcs(tmp_path / "copy.fcs", source.events, source.channels, source.keywords, source.spillover)
    copy = read_fcs(path)
    assert bits_equal(copy.events, source.events)
    assert copy.pnn == source.pnn and copy.markers == source.markers
    assert np.array_equal(copy.spillover.matrix, source.spillover.matrix)
    assert copy.keywords["$CYT"] == source.keywords["$CYT"]
    assert "SPILL" not in copy.keywords and copy.spillover.keyword == "$SPILLOVER"


def test_parameter_keywords_follow_their_channel(tmp_path):
    source = read_fcs(shared_path("FlowKit", "data", "100715.fcs"))
    subset = source.channels.iloc[[5, 2]]
    path = write_fcs(tmp_path / "sub.fcs", source.events[:, [5, 2]], subset, source.keywords)
    copy = read_fcs(path)
    assert copy.pnn == list(subset["pnn"]) and copy.keywords["$PAR"] == "2"
    for new, old in ((1, 6), (2, 3)):
        if f"$P{old}V" in source.keywords:
            assert copy.keywords[f"$P{new}V"] == source.keywords[f"$P{old}V"]
    assert "$P3N" not in copy.keywords and "$P6V" not in copy.keywords


def test_parameter_keywords_without_n_column_belong_to_the_given_channels(tmp_path):
    keywords = {"$P2V": "450", "$P3V": "999", "$P1N": "ignored", "$TIMESTEP": "0.01"}
    sample = read_fcs(write_fcs(tmp_path / "v.fcs", events(5, 2), ["FSC-A", "CD4"], keywords))
    assert sample.keywords["$P2V"] == "450" and "$P3V" not in sample.keywords
    assert sample.pnn == ["FSC-A", "CD4"] and sample.keywords["$TIMESTEP"] == "0.01"


def test_gain_is_kept_for_raw_events(tmp_path):
    table = pd.DataFrame({"pnn": ["FSC-A", "SSC-A"], "png": [2.0, 1.0]})
    data = np.array([[10.0, 20.0]], np.float32)
    path = write_fcs(tmp_path / "g.fcs", data, table)
    assert read_fcs(path).keywords["$P1G"] == "2"
    assert read_fcs(path, preprocess=True).events.tolist() == [[5.0, 20.0]]


def test_write_is_atomic_and_cleans_up(tmp_path):
    target = tmp_path / "keep.fcs"
    write_fcs(target, events(5, 2), ["A", "B"])
    before = target.read_bytes()
    with pytest.raises(errors.FCSKeywordError, match="duplicate channel names"):
        write_fcs(target, events(5, 2), ["A", "A"])
    with pytest.raises(errors.FCSDataError, match="2-D array"):
        write_fcs(target, np.zeros(5), ["A"])
    with pytest.raises(errors.FCSKeywordError, match="contains a comma"):
        write_fcs(target, events(5, 2), ["A,1", "B"])
    with pytest.raises(errors.SpilloverError, match="not among the written channels"):
        write_fcs(target, events(5, 2), ["A", "B"], spillover=Spillover(np.eye(1), ["C"]))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.fcs"]


def test_same_input_same_bytes(tmp_path):
    a = write_fcs(tmp_path / "a.fcs", events(), CHANNELS, {"$FIL": "x"})
    b = write_fcs(tmp_path / "b.fcs", events(), CHANNELS, {"$FIL": "x"})
    assert a.read_bytes() == b.read_bytes()


def test_reading_writing_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FCSWarning)
        read_fcs(write_fcs(tmp_path / "w.fcs", events(), CHANNELS))


def test_a_copied_spillover_keyword_keeps_only_the_written_channels(tmp_path):
    """Writing a subset of a sample file's channels with its keywords: its $SPILLOVER named the
    left-out channel, so the written file could not be compensated (a run failed it); now the
    matrix of the written channels is kept, exactly the source's values."""
    from tests.conftest import SAMPLE_DATA

    sample = read_fcs(SAMPLE_DATA / "fcs" / "P006_W00.fcs")
    keep = [i for i, pns in enumerate(sample.channels["pns"]) if "FoxP3" not in pns]
    out = write_fcs(
        tmp_path / "no_foxp3.fcs",
        sample.events[:, keep],
        sample.channels.iloc[keep],
        keywords=sample.keywords,
    )
    copy = read_fcs(out)
    assert "APC-A" in sample.spillover.channels and "APC-A" not in copy.spillover.channels
    rows = [sample.spillover.channels.index(c) for c in copy.spillover.channels]
    assert copy.spillover.channels == [c for c in sample.spillover.channels if c != "APC-A"]
    np.testing.assert_array_equal(copy.spillover.matrix, sample.spillover.matrix[np.ix_(rows, rows)])
    assert copy.warnings == []
    # none of the matrix's channels written: no spillover keyword at all
    out = write_fcs(
        tmp_path / "scatter.fcs", sample.events[:, :3], sample.channels.iloc[:3], keywords=sample.keywords
    )
    assert read_fcs(out).spillover is None
