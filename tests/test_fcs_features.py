"""Layouts and TEXT quirks on generated files, where the expected events are known exactly."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import cytopipe.fcs as fcs
from cytopipe import errors
from cytopipe.fcs import FCSWarning, count_datasets, parse_text, read_fcs, read_fcs_header
from tests.fcs_builder import build_fcs, float_keywords, int_keywords, pack_ints, simple_float_file


def write(tmp_path, content: bytes, name: str = "f.fcs"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def quiet(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSWarning)
        return read_fcs(path, **kw)


@pytest.fixture(params=["numpy", "numba", "numba-unmapped"])
def kernels(request, monkeypatch):
    """Run a test through the small-file numpy path and the numba kernels (reading from the
    file's mapped pages, and from a chunk buffer as where a file cannot be mapped), with tiny
    chunks so that chunk boundaries fall inside the data."""
    monkeypatch.setattr(fcs, "_KERNEL_MIN_BYTES", 1 << 60 if request.param == "numpy" else 0)
    monkeypatch.setattr(fcs, "_CHUNK_BYTES", 64)
    if request.param == "numba-unmapped":
        monkeypatch.setattr(fcs._FCSFile, "_mapped", lambda self, layout, dtype: None)
    return request.param


# --------------------------------------------------------------------------------------------
# data layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("bits", [8, 16, 24, 32, 64])
def test_integer_widths(tmp_path, kernels, bits, big):
    rng = np.random.default_rng(bits)
    top = min(2**bits, 2**24)  # exactly representable in float32
    values = rng.integers(0, top, size=(37, 3), dtype=np.uint64)
    kw = int_keywords(37, ["A", "B", "C"], [bits] * 3, [2**bits] * 3, big=big)
    path = write(tmp_path, build_fcs(kw, pack_ints(values, [bits] * 3, big=big)))
    sample = read_fcs(path)
    assert np.array_equal(sample.events, values.astype(np.float32))
    assert sample.warnings == []


def test_integers_above_2_24_round_like_flowio(tmp_path, kernels):
    """int32/int64 values above 2**24 are rounded to the nearest float32 (documented)."""
    values = np.array([[2**24 + 1, 2**32 - 1], [123456789, 2**31 + 3]], dtype=np.uint64)
    kw = int_keywords(2, ["A", "B"], [32, 32], [2**32, 2**32])
    sample = read_fcs(write(tmp_path, build_fcs(kw, pack_ints(values, [32, 32]))))
    assert np.array_equal(sample.events, values.astype(np.float64).astype(np.float32))
    big = np.array([[2**53 + 1, 2**63 + 2**40]], dtype=np.uint64)
    kw = int_keywords(1, ["A", "B"], [64, 64], [2**64, 2**64])
    sample = read_fcs(write(tmp_path, build_fcs(kw, pack_ints(big, [64, 64])), "b.fcs"))
    assert np.array_equal(sample.events, big.astype(np.float32))


@pytest.mark.parametrize("big", [False, True])
def test_mixed_widths_including_24_bit(tmp_path, kernels, big):
    bits = [16, 32, 8, 24, 64, 16]
    rng = np.random.default_rng(1)
    values = np.stack([rng.integers(0, 2 ** min(b, 24), 50, dtype=np.uint64) for b in bits], axis=1)
    kw = int_keywords(50, list("ABCDEF"), bits, [2**b for b in bits], big=big)
    sample = read_fcs(write(tmp_path, build_fcs(kw, pack_ints(values, bits, big=big))))
    assert np.array_equal(sample.events, values.astype(np.float32))


@pytest.mark.parametrize("big", [False, True])
def test_range_mask_removes_bits_above_pnr(tmp_path, kernels, big):
    rng = np.random.default_rng(2)
    values = rng.integers(0, 1024, size=(40, 3), dtype=np.uint64)
    flags = rng.integers(0, 64, size=(40, 1), dtype=np.uint64) << np.uint64(10)
    stored = values.copy()
    stored[:, 1:2] |= flags  # extra bits only in channel B
    kw = int_keywords(40, ["A", "B", "C"], [16, 16, 16], [1024, 1000, 65536], big=big)
    with pytest.warns(FCSWarning, match=r"bits above the \$PnR range were set in \$P2;"):
        sample = read_fcs(write(tmp_path, build_fcs(kw, pack_ints(stored, [16] * 3, big=big))))
    assert np.array_equal(sample.events, values.astype(np.float32))


@pytest.mark.parametrize("chunk", [1 << 20, 1000])
@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("big", [False, True])
def test_integer_kernels_with_per_channel_ranges(tmp_path, monkeypatch, big, bits, chunk):
    """The numba decode on a file of thousands of rows (several mask blocks per chunk, chunks
    that end inside a block): per-channel $PnR masks, flags above the range in one channel."""
    monkeypatch.setattr(fcs, "_KERNEL_MIN_BYTES", 0)
    monkeypatch.setattr(fcs, "_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(bits)
    ranges = [1024, 2**bits, 4096, 262144 if bits == 32 else 65536, 2]
    n = 3001
    values = np.stack([rng.integers(0, r, n, dtype=np.uint64) for r in ranges], axis=1)
    stored = values.copy()
    stored[::7, 2] |= np.uint64(1) << np.uint64(bits - 1)  # a flag bit above $P3R
    kw = int_keywords(n, list("ABCDE"), [bits] * 5, ranges, big=big)
    path = write(tmp_path, build_fcs(kw, pack_ints(stored, [bits] * 5, big=big)))
    with pytest.warns(FCSWarning, match=r"bits above the \$PnR range were set in \$P3;"):
        sample = read_fcs(path)
    assert np.array_equal(sample.events, values.astype(np.float32))


def test_pnb_smaller_than_the_storage_word(tmp_path):
    """10-bit values in 16-bit words (Beckman FC500): the DATA size says the word size."""
    values = np.arange(60, dtype=np.uint64).reshape(20, 3) * 17
    stored = values | (np.uint64(1) << np.uint64(12))  # a stray flag bit above $PnB
    kw = int_keywords(20, ["A", "B", "C"], [10, 10, 10], [1024] * 3, big=False, **{"$BYTEORD": "1,2"})
    path = write(tmp_path, build_fcs(kw, pack_ints(stored, [10] * 3, widths=[2, 2, 2])))
    assert np.array_equal(quiet(path).events, values.astype(np.float32))
    packed = build_fcs(kw, b"\0" * (20 * 3 * 10 // 8))  # truly bit-packed 10-bit data
    with pytest.raises(errors.FCSDataError, match="bytes per event"):
        read_fcs(write(tmp_path, packed, "packed.fcs"))


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("datatype", ["F", "D"])
def test_floats_both_byte_orders(tmp_path, kernels, datatype, big):
    rng = np.random.default_rng(3)
    events = rng.normal(0, 1e4, size=(33, 4))
    events[0, 0], events[1, 1], events[2, 2] = np.nan, np.inf, -0.0
    dtype = ("<" if not big else ">") + ("f4" if datatype == "F" else "f8")
    kw = float_keywords(33, list("ABCD"), datatype=datatype, big=big)
    sample = read_fcs(write(tmp_path, build_fcs(kw, events.astype(dtype).tobytes())))
    expected = events.astype(np.float32)
    assert np.array_equal(sample.events.view(np.uint32), expected.view(np.uint32))


def test_little_endian_float32_is_read_without_a_copy(tmp_path):
    content, events = simple_float_file(1000)
    sample = read_fcs(write(tmp_path, content))
    assert sample.events.base is None and sample.events.flags.owndata
    assert np.array_equal(sample.events, events)


@pytest.mark.parametrize("big", [False, True])
def test_read_into_a_reused_buffer(tmp_path, kernels, big):
    """out=: one buffer reused for files of different sizes and layouts gives each file's events
    exactly, as a view of the buffer; a buffer that cannot hold the data set is refused."""
    rng = np.random.default_rng(5)
    ints = rng.integers(0, 1024, size=(300, 3), dtype=np.uint64)
    int_path = write(
        tmp_path,
        build_fcs(
            int_keywords(300, list("ABC"), [16] * 3, [1024] * 3, big=big), pack_ints(ints, [16] * 3, big=big)
        ),
        "i.fcs",
    )
    floats = rng.normal(0, 1e3, size=(120, 4)).astype(np.float32)
    dtype = ">f4" if big else "<f4"
    float_path = write(
        tmp_path,
        build_fcs(float_keywords(120, list("ABCD"), big=big), floats.astype(dtype).tobytes()),
        "f.fcs",
    )
    buffer = np.full(2000, np.nan, dtype=np.float32)
    for path, expected in [
        (int_path, ints.astype(np.float32)),
        (float_path, floats),
        (int_path, ints.astype(np.float32)),
    ]:
        sample = read_fcs(path, out=buffer)
        assert np.shares_memory(sample.events, buffer) and sample.events.flags.c_contiguous
        assert np.array_equal(sample.events, expected)
        assert np.array_equal(
            read_fcs(path, preprocess=True, out=buffer).events, read_fcs(path, preprocess=True).events
        )
    for bad in (
        np.empty(899, np.float32),
        np.empty(2000, np.float64),
        np.empty((2000, 2), np.float32)[:, 0],
        np.frombuffer(bytes(8000), np.float32),
    ):
        with pytest.raises(errors.FCSDataError, match="out=.*at least 300 events x 3 channels") as info:
            read_fcs(int_path, out=bad)
        assert str(int_path) in str(info.value)


def test_fcs32_per_parameter_datatype(tmp_path):
    """FCS 3.2 $PnDATATYPE mixes integer and float parameters in one event."""
    rng = np.random.default_rng(4)
    ints = rng.integers(0, 4096, 10, dtype=np.uint64)
    floats = rng.normal(size=10).astype(np.float32)
    kw = int_keywords(10, ["I", "F"], [16, 32], [4096, 262144], **{"$P2DATATYPE": "F"})
    rows = b"".join(int(i).to_bytes(2, "little") + np.float32(f).tobytes() for i, f in zip(ints, floats))
    sample = read_fcs(write(tmp_path, build_fcs(kw, rows, version="FCS3.2")))
    assert sample.version == "FCS3.2"
    assert np.array_equal(sample.events[:, 0], ints.astype(np.float32))
    assert np.array_equal(sample.events[:, 1], floats)


# --------------------------------------------------------------------------------------------
# segments and offsets
# --------------------------------------------------------------------------------------------
def test_header_data_offsets_zero(tmp_path):
    content, events = simple_float_file(10, header_data=(0, 0))
    assert np.array_equal(read_fcs(write(tmp_path, content)).events, events)


def test_enddata_one_past_the_data_and_trailing_crc(tmp_path):
    rng = np.random.default_rng(5)
    events = rng.normal(size=(8, 2)).astype(np.float32)
    data = events.tobytes()
    n = len(data)
    kw = float_keywords(8, ["A", "B"])
    content = build_fcs(kw, data, trailer=b"00000000")  # FCS 3.x CRC field after DATA
    begin = 58 + content[58:].index(data[:8])
    exclusive = build_fcs(
        kw, data, header_data=(begin, begin + n), text_data=(begin, begin + n), trailer=b"0" * 8
    )
    sample = read_fcs(write(tmp_path, exclusive))
    assert np.array_equal(sample.events, events) and sample.warnings == []


def test_disagreeing_offsets_choose_the_consistent_one(tmp_path):
    rng = np.random.default_rng(6)
    events = rng.normal(size=(6, 2)).astype(np.float32)
    n = events.nbytes
    kw = float_keywords(6, ["A", "B"])
    begin = len(build_fcs(kw, events.tobytes())) - n
    true = (begin, begin + n - 1)
    # HEADER starts inside the HEADER itself: TEXT is used
    content = build_fcs(kw, events.tobytes(), header_data=(40, true[1]), text_data=true)
    with pytest.warns(FCSWarning, match="used the TEXT offsets"):
        assert np.array_equal(read_fcs(write(tmp_path, content)).events, events)
    # TEXT's segment runs past the end of the file: the HEADER is used
    content = build_fcs(kw, events.tobytes(), header_data=true, text_data=(true[0] + 4, true[1] + 4))
    with pytest.warns(FCSWarning, match="used the HEADER offsets"):
        assert np.array_equal(read_fcs(write(tmp_path, content, "b.fcs")).events, events)
    # both plausible and inside the file: the one that starts right after TEXT wins (here the
    # HEADER, although FCS 3.1 otherwise prefers TEXT)
    padded = events.tobytes() + b"\0" * 8
    content = build_fcs(kw, padded, header_data=true, text_data=(true[0] + 8, true[1] + 8))
    with pytest.warns(FCSWarning, match="used the HEADER offsets .* because it starts right after TEXT"):
        assert np.array_equal(read_fcs(write(tmp_path, content, "c.fcs")).events, events)


def test_text_end_one_byte_too_far(tmp_path):
    content, events = simple_float_file(4)
    t_end = int(content[18:26])
    patched = content[:18] + f"{t_end + 1:>8d}".encode() + content[26:]
    sample = read_fcs(write(tmp_path, patched))
    assert np.array_equal(sample.events, events)
    assert any("stray byte" in w for w in sample.warnings)


def test_supplemental_text_is_merged(tmp_path):
    stext = b"|EXTRA KEY|hello|$CYT|Supplemental|"
    events = np.ones((2, 2), np.float32)
    kw = float_keywords(2, ["A", "B"], **{"$CYT": "Primary", "$BEGINSTEXT": "0" * 8, "$ENDSTEXT": "0" * 8})
    base = build_fcs(kw, events.tobytes(), trailer=stext)
    begin = len(base) - len(stext)
    kw.update({"$BEGINSTEXT": str(begin).zfill(8), "$ENDSTEXT": str(begin + len(stext) - 1).zfill(8)})
    sample = read_fcs(write(tmp_path, build_fcs(kw, events.tobytes(), trailer=stext)))
    assert sample.keywords["EXTRA KEY"] == "hello" and sample.keywords["$CYT"] == "Primary"


def test_three_data_sets_with_relative_nextdata(tmp_path):
    parts = []
    for i in range(3):
        events = np.full((i + 2, 2), float(i), np.float32)
        parts.append(
            build_fcs(float_keywords(i + 2, ["A", "B"], **{"$NEXTDATA": "0" * 10}), events.tobytes())
        )
    chain = b""
    for i in range(2, -1, -1):  # fill $NEXTDATA backwards: offset of the next data set, relative
        part = parts[i]
        if i < 2:
            part = part.replace(b"$NEXTDATA|" + b"0" * 10, b"$NEXTDATA|" + str(len(part)).zfill(10).encode())
        chain = part + chain
    path = write(tmp_path, chain)
    assert count_datasets(path) == 3
    for i in range(3):
        sample = read_fcs(path, dataset=i)
        assert sample.n_datasets == 3 and sample.events.shape == (i + 2, 2) and (sample.events == i).all()


# --------------------------------------------------------------------------------------------
# TEXT parsing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("delimiter", [b"|", b"/", b"\\", b"!", b"#", b"\x0c", b" ", b"*", b","])
def test_any_delimiter_with_escapes(tmp_path, delimiter):
    d = delimiter.decode()
    kw = float_keywords(
        3, ["FSC-A", "CD4"], **{"$P2S": f"CD4{d}PE", "NOTE": f"a{d}b{d}{d}c", "$FIL": "x.fcs"}
    )
    content = build_fcs(kw, np.zeros((3, 2), np.float32).tobytes(), delimiter=delimiter)
    sample = read_fcs(write(tmp_path, content))
    assert sample.markers == ["", f"CD4{d}PE"]
    assert sample.keywords["NOTE"] == f"a{d}b{d}{d}c"


def test_fcs2_empty_values_and_escapes_are_told_apart():
    assert parse_text(b"\\$A\\\\$B\\x\\") == {"$A": "", "$B": "x"}  # FCS 2.0 empty value
    assert parse_text(b"|$A|a||b|$B|x|") == {"$A": "a|b", "$B": "x"}  # escaped delimiter
    assert parse_text(b"/$DATE/01//02//03/$B/x/") == {"$DATE": "01/02/03", "$B": "x"}
    assert parse_text(b"/K/v/   \x00") == {"K": "v"}  # padding after the final delimiter
    assert parse_text(b"/K/v/K2/last") == {"K": "v", "K2": "last"}  # final delimiter missing


def test_repeated_keywords_keep_the_first_place_and_the_last_value():
    # keys are compared stripped and upper-cased; only a repeat with a different value is noted
    keywords, notes = fcs._parse_text(b"|$A|1|$B|x| $b |y|$a|1|$C|z|", None, "TEXT segment")
    assert list(keywords.items()) == [("$A", "1"), ("$B", "y"), ("$C", "z")]
    assert notes == ["keyword $B appears more than once ('x', 'y'); kept the last"]
    keywords, notes = fcs._parse_text("|$A|\u00b5|$A|\u00e9|".encode(), None, "TEXT segment")  # not ASCII
    assert keywords == {"$A": "\u00e9"} and notes == [
        "keyword $A appears more than once ('\u00b5', '\u00e9'); kept the last"
    ]
    assert parse_text(b"|$A|1|$A|2|$A|2|") == {"$A": "2"}


def test_non_utf8_text_is_decoded_as_latin1(tmp_path):
    kw = float_keywords(2, ["FSC-A", "CD25"], **{"$P2S": b"CD25 \xb5\xe9", "$CYT": "Cyt\u2122"})
    sample = read_fcs(write(tmp_path, build_fcs(kw, np.zeros((2, 2), np.float32).tobytes())))
    assert sample.markers[1] == "CD25 \xb5\xe9"  # not UTF-8: Latin-1 keeps the bytes' meaning
    assert sample.keywords["$CYT"] == "Cyt\u2122"  # valid UTF-8 in the same TEXT


def test_duplicate_names_are_kept_and_index_lookup_is_ambiguous(tmp_path):
    content, events = simple_float_file(3, names=("FSC-A", "CD4", "CD4"))
    path = write(tmp_path, content)
    with pytest.warns(FCSWarning, match="duplicate channel names"):
        sample = read_fcs(path)
    assert sample.pnn == ["FSC-A", "CD4", "CD4"] and np.array_equal(sample.events, events)
    with pytest.raises(errors.FCSKeywordError, match="ambiguous: 2 channels") as exc:
        sample.channel_index("CD4")
    assert str(path) in str(exc.value) and "column indices 1, 2" in str(exc.value)
    assert sample.channel_index("FSC-A") == 0


def test_empty_pnn_is_kept_with_a_warning(tmp_path):
    kw = float_keywords(2, ["FSC-A", "X"])
    kw["$P2N"] = " "
    with pytest.warns(FCSWarning, match=r"empty or missing \$PnN"):
        sample = read_fcs(write(tmp_path, build_fcs(kw, np.zeros((2, 2), np.float32).tobytes())))
    assert sample.pnn == ["FSC-A", ""]


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
def test_preprocessing_gain_log_and_timestep(tmp_path, kernels):
    raw = np.array([[100, 512, 1023, 7], [0, 256, 1, 9], [2**20, 3, 0, 11]], dtype=np.uint64)
    kw = int_keywords(3, ["FSC-A", "FL1-H", "FL2-H", "Time"], [32] * 4, [2**21, 1024, 1024, 2**21])
    kw.update(
        {"$P1G": "4", "$P2E": "4,0", "$P3E": "4.0,0.1024", "$P3G": "2", "$P4G": "0.01", "$TIMESTEP": "0.5"}
    )
    path = write(tmp_path, build_fcs(kw, pack_ints(raw, [32] * 4)))
    sample = read_fcs(path, preprocess=True)
    ev = raw.astype(np.float64)
    expected = np.stack(
        [
            ev[:, 0] / 4.0,
            10 ** (4.0 * ev[:, 1] / 1024.0) * 1.0,  # '4,0' reads as 4 decades from 1
            (10 ** (4.0 * ev[:, 2] / 1024.0)) * 0.1024 / 2.0,  # log, then gain
            ev[:, 3] * 0.5,  # timestep; the time channel's gain is ignored
        ],
        axis=1,
    ).astype(np.float32)
    assert np.array_equal(sample.events, expected)
    assert sample.preprocessed and list(sample.channels["png"]) == [4.0, 1.0, 2.0, 0.01]


def test_preprocessing_uses_raw_integers_not_their_float32(tmp_path):
    raw = np.array([[2**24 + 1], [2**31 - 1]], dtype=np.uint64)
    kw = int_keywords(2, ["FSC-A"], [32], [2**32], **{"$P1G": "3"})
    sample = read_fcs(write(tmp_path, build_fcs(kw, pack_ints(raw, [32]))), preprocess=True)
    assert np.array_equal(sample.events[:, 0], (raw[:, 0].astype(np.float64) / 3).astype(np.float32))


def test_read_fcs_header_reports_layout(tmp_path):
    kw = int_keywords(5, ["A", "B"], [16, 16], [1024, 1024], big=True)
    path = write(tmp_path, build_fcs(kw, pack_ints(np.zeros((5, 2)), [16, 16], big=True)))
    info = read_fcs_header(path)
    assert (info.datatype, info.byte_order, info.n_events, info.n_channels) == ("I", "big", 5, 2)
    assert info.data_segment[1] - info.data_segment[0] + 1 == 20 and info.data_error is None


def test_broken_nextdata_after_the_read_data_set_is_a_warning(tmp_path):
    content, events = simple_float_file(3)
    content = content.replace(b"$NEXTDATA|0|", b"$NEXTDATA|9|")  # same length: points to garbage
    path = write(tmp_path, content)
    with pytest.warns(FCSWarning, match="data set 1 cannot be read"):
        sample = read_fcs(path)
    assert sample.n_datasets == 1 and np.array_equal(sample.events, events)
    with pytest.raises(errors.FCSKeywordError, match="no FCS HEADER starts at byte 9"):
        read_fcs(path, dataset=1)
    with pytest.raises(errors.FCSError, match="non-negative integer"):
        read_fcs(path, dataset=-1)


def test_is_fcs_file(tmp_path):
    content, _ = simple_float_file(2)
    assert fcs.is_fcs_file(write(tmp_path, content, "noext"))
    assert not fcs.is_fcs_file(write(tmp_path, b"FCSX.1 nope", "x.fcs"))
    assert not fcs.is_fcs_file(tmp_path / "missing")
