"""A generated corpus of malformed FCS files: each gets its own FCSError subclass with a
message naming the file and the problem -- never a raw IndexError/ValueError/
UnicodeDecodeError/MemoryError/OverflowError, never a hang."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cytopipe import errors
from cytopipe.fcs import FCSWarning, read_fcs, read_fcs_header
from tests.fcs_builder import build_fcs, float_keywords, int_keywords, pack_ints, simple_float_file

E = errors


def valid(**kw) -> bytes:
    return simple_float_file(6, **kw)[0]


def with_keywords(**changes) -> bytes:
    """A valid 6-event float file with some keywords changed (None removes one)."""
    kw = float_keywords(6, ["FSC-A", "SSC-A", "CD4"])
    for key, value in changes.items():
        key = key.replace("_", "$", 1) if key.startswith("_") else key
        if value is None:
            kw.pop(key, None)
        else:
            kw[key] = value
    return build_fcs(kw, np.ones((6, 3), np.float32).tobytes())


def header_field(content: bytes, index: int, text: str) -> bytes:
    lo = 10 + 8 * index
    return content[:lo] + text.rjust(8).encode("latin-1")[:8] + content[lo + 8 :]


VALID = valid()
DATA_BEGIN = int(VALID[26:34])
TEXT_END = int(VALID[18:26])

# (id, file content, error class, text the message must contain, read_fcs kwargs)
CORPUS = [
    ("empty file", b"", E.FCSHeaderError, "the file is empty (0 bytes)", {}),
    ("ten garbage bytes", b"oi21j08cn\n", E.FCSHeaderError, "not an FCS file (no FCS header)", {}),
    ("truncated in HEADER", VALID[:30], E.FCSHeaderError, "HEADER is truncated: 30 of 58 bytes", {}),
    ("truncated in TEXT", VALID[: TEXT_END - 20], E.FCSHeaderError, "TEXT segment bytes 58-", {}),
    ("truncated in DATA", VALID[: DATA_BEGIN + 30], E.FCSDataError, "truncated (only 2 of 6 events", {}),
    ("truncated before DATA", VALID[:DATA_BEGIN], E.FCSDataError, "it holds only HEADER and TEXT", {}),
    ("HEADER field not a number", header_field(VALID, 1, "12ab"), E.FCSHeaderError, "field 'TEXT end'", {}),
    (
        "negative HEADER offset",
        header_field(VALID, 0, "-100"),
        E.FCSHeaderError,
        "'    -100', expected a non-negative",
        {},
    ),
    (
        "TEXT beyond the end",
        header_field(VALID, 1, "99999"),
        E.FCSHeaderError,
        "TEXT segment bytes 58-99999",
        {},
    ),
    ("TEXT inside HEADER", header_field(VALID, 0, "10"), E.FCSHeaderError, "not a valid range", {}),
    (
        "no TEXT offsets",
        header_field(header_field(VALID, 0, "0"), 1, "0"),
        E.FCSHeaderError,
        "no TEXT segment",
        {},
    ),
    (
        "DATA offsets beyond EOF",
        build_fcs(float_keywords(6, ["A"]), b"\0" * 24, header_data=(90000, 90023), text_data=(90000, 90023)),
        E.FCSDataError,
        "before the DATA segment starts",
        {},
    ),
    (
        "$TOT larger than DATA",
        with_keywords(_TOT="7"),
        E.FCSDataError,
        "$TOT 7 x 12 bytes per event = 84 bytes",
        {},
    ),
    ("$TOT smaller than DATA", with_keywords(_TOT="4"), E.FCSDataError, "$TOT 4 x 12 bytes per event", {}),
    ("$TOT 10^12 events", with_keywords(_TOT="1000000000000"), E.FCSDataError, "$TOT 1000000000000", {}),
    ("$TOT negative", with_keywords(_TOT="-6"), E.FCSKeywordError, "$TOT is -6", {}),
    (
        "$TOT not a number",
        with_keywords(_TOT="six"),
        E.FCSKeywordError,
        "$TOT is 'six', expected an integer",
        {},
    ),
    ("$TOT missing", with_keywords(_TOT=None), E.FCSKeywordError, "required keyword $TOT is missing", {}),
    (
        "$PAR larger than the parameters",
        with_keywords(_PAR="4"),
        E.FCSKeywordError,
        "$P4B (bits of parameter 4",
        {},
    ),
    ("$PAR smaller than DATA", with_keywords(_PAR="2"), E.FCSDataError, "$TOT 6 x 8 bytes per event", {}),
    ("$PAR 10^9", with_keywords(_PAR="1000000000"), E.FCSKeywordError, "$PAR is 1000000000 but the TEXT", {}),
    ("$PAR zero", with_keywords(_PAR="0"), E.FCSKeywordError, "$PAR is 0", {}),
    (
        "unknown $DATATYPE",
        with_keywords(_DATATYPE="X"),
        E.FCSKeywordError,
        "$DATATYPE is 'X'; expected I",
        {},
    ),
    ("ASCII $DATATYPE", with_keywords(_DATATYPE="A"), E.FCSUnsupportedError, "$DATATYPE A (ASCII", {}),
    ("$DATATYPE missing", with_keywords(_DATATYPE=None), E.FCSKeywordError, "$DATATYPE is missing", {}),
    ("bad byte order", with_keywords(_BYTEORD="9,9,9,9"), E.FCSKeywordError, "$BYTEORD is '9,9,9,9'", {}),
    ("mixed byte order", with_keywords(_BYTEORD="3,4,1,2"), E.FCSUnsupportedError, "mixed byte orders", {}),
    ("$BYTEORD missing", with_keywords(_BYTEORD=None), E.FCSKeywordError, "$BYTEORD is missing", {}),
    ("$PnB missing", with_keywords(_P2B=None), E.FCSKeywordError, "required keyword $P2B", {}),
    ("$PnB not a number", with_keywords(_P2B="sixteen"), E.FCSKeywordError, "$P2B is 'sixteen'", {}),
    (
        "$PnR not a number",
        with_keywords(_P3R="huge"),
        E.FCSKeywordError,
        "$P3R is 'huge', expected a number",
        {},
    ),
    ("$MODE histogram", with_keywords(_MODE="C"), E.FCSUnsupportedError, "$MODE is 'C'", {}),
    (
        "odd number of TEXT fields",
        with_keywords(**{"$FIL": "a|b"}).replace(b"a||b", b"a|b"),
        E.FCSKeywordError,
        "odd number of fields",
        {},
    ),
    (
        "empty keyword name",
        with_keywords(**{"$FIL": "xy"}).replace(b"|$FIL|xy|", b"|    |xy|"),
        E.FCSKeywordError,
        "empty keyword name",
        {},
    ),
    (
        "non-UTF-8 $PAR",
        with_keywords(_PAR="3").replace(b"$PAR|3|", b"$PAR|\xff|"),
        E.FCSKeywordError,
        "$PAR is '\xff'",
        {},
    ),
    ("spillover dimensions", with_keywords(SPILL="2,A,B,1,0,0"), E.SpilloverError, "declares 2 channels", {}),
    (
        "spillover not numbers",
        with_keywords(SPILL="2,A,B,1,x,0,1"),
        E.SpilloverError,
        "value 'x' is not a number",
        {},
    ),
    (
        "spillover count",
        with_keywords(**{"$SPILLOVER": "two,A,B"}),
        E.SpilloverError,
        "first field is 'two'",
        {},
    ),
    (
        "$NEXTDATA nowhere",
        with_keywords(_NEXTDATA="500"),
        E.FCSKeywordError,
        "no FCS HEADER starts at byte 500",
        {"dataset": 1},
    ),
    (
        "$NEXTDATA not a number",
        with_keywords(_NEXTDATA="next"),
        E.FCSKeywordError,
        "$NEXTDATA is 'next'",
        {"dataset": 1},
    ),
    (
        "data set out of range",
        VALID,
        E.FCSError,
        "data set 3 requested but the file has only 1",
        {"dataset": 3},
    ),
    (
        "bad $PnE for preprocessing",
        with_keywords(_P1E="log"),
        E.FCSKeywordError,
        "$P1E is 'log'",
        {"preprocess": True},
    ),
    (
        "bad $TIMESTEP",
        with_keywords(_P1N="Time", _TIMESTEP="fast"),
        E.FCSKeywordError,
        "$TIMESTEP is 'fast'",
        {"preprocess": True},
    ),
    (
        "zero events but DATA",
        build_fcs(float_keywords(0, ["A"]), b"\0" * 8),
        E.FCSDataError,
        "$TOT is 0 but the HEADER gives a DATA segment of 8 bytes",
        {},
    ),
    (
        "integer $PnB 0",
        build_fcs(int_keywords(2, ["A"], [0], [1024]), b"\0" * 4),
        E.FCSKeywordError,
        "$P1B is 0; integer data needs 1 to 64 bits",
        {},
    ),
    (
        "integer $PnB 128",
        build_fcs(int_keywords(2, ["A"], [128], [1024]), b"\0" * 32),
        E.FCSUnsupportedError,
        "$P1B is 128",
        {},
    ),
    (
        "DATA overlapping TEXT",
        build_fcs(float_keywords(1, ["A"]), b"\0" * 4, header_data=(0, 0), text_data=(70, 73)),
        E.FCSDataError,
        "overlaps the TEXT segment",
        {},
    ),
]


@pytest.mark.timeout(60)  # a hang guard, not a timing assertion
@pytest.mark.parametrize(("name", "content", "cls", "text", "kwargs"), CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_file_gets_a_clear_error(tmp_path, name, content, cls, text, kwargs):
    path = tmp_path / "bad file.fcs"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSWarning)
        with pytest.raises(cls) as info:
            read_fcs(path, **kwargs)
    message = str(info.value)
    assert message.startswith(f"file '{path}'"), message
    assert text in message, message
    assert info.value.context["file"] == path


def test_corpus_is_large_and_specific():
    assert len(CORPUS) >= 20
    assert len({c[3] for c in CORPUS}) == len(CORPUS)  # every case has its own message


def test_zero_events_file_reads_as_an_empty_matrix(tmp_path):
    path = tmp_path / "empty.fcs"
    path.write_bytes(build_fcs(float_keywords(0, ["A", "B"]), b""))
    sample = read_fcs(path)
    assert sample.events.shape == (0, 2) and sample.events.dtype == np.float32


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(E.FCSError, match="cannot open the file: No such file"):
        read_fcs(tmp_path / "missing.fcs")
    with pytest.raises(E.NotRegularFileError, match=r"not a regular file \(a folder\)"):
        read_fcs(tmp_path)


def test_every_truncation_and_corruption_fails_cleanly(tmp_path):
    """Cut a small integer file at every byte and flip random bytes: each read either
    succeeds or raises an FCSError -- nothing else escapes."""
    values = np.arange(24, dtype=np.uint64).reshape(8, 3)
    kw = int_keywords(8, ["FSC-A", "SSC-A", "CD4"], [16, 16, 16], [1024] * 3, **{"SPILL": "1,CD4,1"})
    content = build_fcs(kw, pack_ints(values, [16] * 3))
    path = tmp_path / "fuzz.fcs"
    outcomes = {"ok": 0, "error": 0}
    rng = np.random.default_rng(0)
    cases = [content[:cut] for cut in range(len(content))]
    for _ in range(300):
        mutated = bytearray(content)
        for pos in rng.integers(0, len(content), size=rng.integers(1, 4)):
            mutated[pos] = int(rng.integers(0, 256))
        cases.append(bytes(mutated))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSWarning)
        for case in cases:
            path.write_bytes(case)
            for reader in (read_fcs, read_fcs_header):
                try:
                    reader(path)
                    outcomes["ok"] += 1
                except E.FCSError as exc:
                    assert str(path) in str(exc)
                    outcomes["error"] += 1
    assert outcomes["error"] > len(content) and outcomes["ok"] > 0


def test_a_truncated_sample_file_is_described_once_with_what_to_do(tmp_path):
    """HEADER and TEXT give the same DATA offsets: the reason is said once, then the remedy."""
    from tests.conftest import SAMPLE_DATA

    raw = (SAMPLE_DATA / "fcs" / "P005_W00.fcs").read_bytes()
    path = tmp_path / "P005_W00.fcs"
    path.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(E.FCSDataError) as info:
        read_fcs(path)
    message = str(info.value)
    assert message.startswith(
        f"file '{path}': DATA segment does not match the keywords: HEADER and TEXT say bytes"
    )
    assert message.count("truncated (only") == 1
    assert message.endswith("; copy or export the file again from the acquisition computer")
    # a $TOT that disagrees with the DATA length: once too, and what to do
    path.write_bytes(raw.replace(b"$TOT|6203|", b"$TOT|6200|"))
    with pytest.raises(E.FCSDataError) as info:
        read_fcs(path)
    message = str(info.value)
    assert message.count("$TOT 6200 x 72 bytes per event") == 1
    assert message.endswith("export it again from the acquisition software")
