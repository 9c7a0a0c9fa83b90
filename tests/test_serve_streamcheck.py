"""The upload's validation while it streams (``cytopipe.serve.streamcheck``) against the
reference, ``cytopipe validate``'s rules on the stored file (``validate_blob``): on real files
of many instruments and writers, cut into blocks three different ways, and on broken copies of
them (truncated, NaN values, integer bits above ``$PnR``). Every file either gives exactly the
reference's row (status, reason, notes, events, channels, markers, keywords) or ``None`` (the
server then validates the stored file), and ``None`` only where the streaming check says it
does not go: several data sets, channels of mixed widths, an unknown final size."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from cytopipe.fcs import count_datasets, is_fcs_file, read_fcs_header
from cytopipe.serve.storage import validate_blob
from cytopipe.serve.streamcheck import StreamCheck
from tests.conftest import shared_path

pytestmark = pytest.mark.filterwarnings("ignore::cytopipe.fcs.FCSWarning")  # the quirks are the point

# reader-robustness sets with independent expectations (see ../shared/data/CATALOG.md)
SETS = [("FlowIO",), ("fcsparser",), ("FlowKit",), ("fcs-npm",)]


def fed(data: bytes, sizes: list[int], name: str = "f.fcs", declared: int | None = -1):
    check = StreamCheck(name, len(data) if declared == -1 else declared)
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        check.feed(data[pos : pos + n])
        pos, i = pos + n, i + 1
    return check.result(len(data))


def reference(path: Path, name: str = "f.fcs") -> dict:
    return validate_blob(path, name, "0" * 64)


def mixed_widths(path: Path) -> bool:
    info = read_fcs_header(path)
    kinds = {(b, info.datatype) for b in info.channels["pnb"]}
    return len(kinds) > 1 or any(int(b) % 8 or int(b) not in (8, 16, 32, 64) for b, _ in kinds)


def real_files() -> list[Path]:
    files = []
    for parts in SETS:
        root = shared_path(*parts)
        files += [p for p in sorted(root.rglob("*")) if p.is_file() and is_fcs_file(p)]
    return files


def test_streamed_validation_equals_validate_on_real_files_whatever_the_blocks():
    rng = random.Random(20261203)
    files = real_files()
    assert len(files) >= 35
    streamed = 0
    for path in files:
        data = path.read_bytes()
        want = reference(path)
        for sizes in ([1 << 20], [1, 7, 65536, 3], [rng.randint(1, 300_000)]):
            got = fed(data, sizes)
            if got is None:  # only where the streaming check does not go
                assert count_datasets(path) > 1 or mixed_widths(path), (path, sizes)
                continue
            assert got == want, (path, sizes)
            streamed += 1
    assert streamed >= 0.6 * 3 * len(files)


def test_broken_copies_get_validates_verdict(tmp_path):
    source = shared_path("FlowIO", "data", "fcs_files", "100715.fcs")  # float32, 65016 events
    data = source.read_bytes()
    info = read_fcs_header(source)
    begin, end = info.data_segment
    cases = {
        "data_cut.fcs": data[: begin + (end - begin) // 2],  # truncated inside DATA
        "text_cut.fcs": data[: info.text_segment[1] - 10],  # truncated inside TEXT
        "header_only.fcs": data[:58],
        "header_cut.fcs": data[:40],
    }
    nan = bytearray(data)
    values = np.frombuffer(nan, dtype="<f4" if info.byte_order == "little" else ">f4",
                           count=(end - begin + 1) // 4, offset=begin)  # fmt: skip
    values.flags.writeable = True
    values[[5, 77, 40_000]] = [np.nan, np.inf, -np.inf]
    cases["nan.fcs"] = bytes(nan)
    seen = set()
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        want = reference(path, name)
        seen.add(want["status"])
        for sizes in ([1 << 20], [3, 4096], [1000]):
            assert fed(content, sizes, name) == want, (name, sizes)
    assert seen == {"rejected", "warning"}
    assert "3 event values are NaN or infinite" in reference(tmp_path / "nan.fcs")["notes"]


def test_integer_bits_above_the_range_are_noted_as_validate_does(tmp_path):
    source = shared_path("FlowKit", "data", "gate_ref", "data1.fcs")  # int16, $PnR 1024, big-endian
    data = bytearray(source.read_bytes())
    info = read_fcs_header(source)
    begin = info.data_segment[0]
    p = info.n_channels
    raw = np.frombuffer(data, dtype=">u2", count=info.n_events * p, offset=begin).reshape(-1, p)
    raw.flags.writeable = True
    raw[100, 2] |= 0x8000  # a flag bit above $P3R
    path = tmp_path / "flagged.fcs"
    path.write_bytes(bytes(data))
    want = reference(path, "flagged.fcs")
    assert any("bits above the $PnR range" in n and "$P3" in n for n in want["notes"]), want
    for sizes in ([1 << 20], [5, 999], [7]):
        assert fed(bytes(data), sizes, "flagged.fcs") == want


@pytest.mark.parametrize("declared", [None, 10])
def test_an_unknown_or_wrong_size_leaves_validation_to_the_stored_file(declared):
    data = shared_path("FlowIO", "data", "fcs_files", "100715.fcs").read_bytes()
    assert fed(data, [1 << 20], declared=declared) is None
