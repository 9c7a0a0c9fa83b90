"""Every FCS data set under ../shared/data (enumerated from _inventory/FCS_INVENTORY.tsv) is
read bit for bit like flowio -- raw and preprocessed -- or rejected with a clear CytopipeError.

Where flowio itself cannot read a file (24-bit integers, 10-bit values in 16-bit words, blank
HEADER fields, keywords with leading spaces), an independent minimal decoder in this module is
the reference instead."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import flowio
import numpy as np
import pytest

import cytopipe.fcs as fcs
from cytopipe.errors import CytopipeError, FCSDataError, FCSKeywordError
from cytopipe.fcs import FCSWarning, read_fcs, read_fcs_header
from tests.conftest import SHARED_DATA, missing_data

INVENTORY = SHARED_DATA / "_inventory" / "FCS_INVENTORY.tsv"


def inventory() -> list[tuple[str, int]]:
    if not INVENTORY.exists():
        return []
    with open(INVENTORY, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [(r["file"], int(r["dataset_no"]) - 1) for r in rows if (SHARED_DATA / r["file"]).exists()]


ENTRIES = inventory()

# Files that are broken in the data itself; the reader must say exactly this.
REJECTED = {
    "fcs-npm/test/testdata/AriaFile1.fcs": (FCSDataError, "truncated (only 6052 of 10000 events"),
    "fcsparser/fcsparser/tests/data/FlowCytometers/cytek-nl-2000/sample_header.fcs": (
        FCSDataError,
        "it holds only HEADER and TEXT",
    ),
}
# $TIMESTEP is 'xxxxxxxxx' (anonymised): raw events read; preprocessing refuses, as flowio does.
BAD_TIMESTEP = {
    "FlowIO/data/fcs_files/data_start_offset_discrepancy_example.fcs",
    "FlowIO/data/fcs_files/data_stop_offset_discrepancy_example.fcs",
    "FlowIO/data/fcs_files/variable_int_example.fcs",
    "FlowKit/data/noncompliant/data_start_offset_discrepancy_example.fcs",
    "FlowKit/data/noncompliant/data_stop_offset_discrepancy_example.fcs",
}


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def minimal_reference(path: Path, start: int, begin: int) -> tuple[np.ndarray, dict]:
    """Independent decoder for the files flowio cannot read: plain TEXT split, every
    parameter assembled from its bytes, masked with $PnR rounded up to a power of two."""
    raw = path.read_bytes()
    t0, t1 = int(raw[start + 10 : start + 18]), int(raw[start + 18 : start + 26])
    text = raw[start + t0 : start + t1 + 1]
    tokens = text[1:].split(text[:1])
    kw = {tokens[i].strip().upper().decode(): tokens[i + 1].decode() for i in range(0, len(tokens) - 1, 2)}
    tot, par = int(kw["$TOT"]), int(kw["$PAR"])
    big = kw["$BYTEORD"].strip() in ("4,3,2,1", "2,1")
    bits = [int(kw[f"$P{n}B"]) for n in range(1, par + 1)]
    widths = [-(-b // 8) for b in bits]
    widths = [1 << (w - 1).bit_length() if w not in (1, 2, 3, 4, 8) else w for w in widths]
    grid = np.frombuffer(raw, np.uint8, tot * sum(widths), begin).reshape(tot, sum(widths))
    out = np.empty((tot, par), np.float32)
    col = 0
    for j, w in enumerate(widths):
        block = grid[:, col : col + w].astype(np.uint64)
        if kw["$DATATYPE"].strip() == "F":
            out[:, j] = np.frombuffer(grid[:, col : col + 4].tobytes(), ">f4" if big else "<f4")
        else:
            order = range(w) if big else range(w - 1, -1, -1)
            value = np.zeros(tot, np.uint64)
            for k in order:
                value = (value << np.uint64(8)) | block[:, k]
            rng = int(float(kw[f"$P{j + 1}R"]))
            keep = min(bits[j], (rng - 1).bit_length())
            out[:, j] = value & np.uint64((1 << keep) - 1)
        col += w
    return out, kw


def minimal_preprocess(raw: np.ndarray, kw: dict) -> np.ndarray:
    """FlowIO's preprocessing written out: timestep on 'time', $PnE log decoding, gain."""
    ev = raw.astype(np.float64)
    names = [kw.get(f"$P{n}N", "").strip() for n in range(1, raw.shape[1] + 1)]
    time = max((j for j, n in enumerate(names) if n.lower() == "time"), default=None)
    if time is not None and kw.get("$TIMESTEP", "").strip():
        ev[:, time] = ev[:, time] * float(kw["$TIMESTEP"])
    for j in range(raw.shape[1]):
        decades, log0 = (float(x) for x in kw.get(f"$P{j + 1}E", "0,0").split(","))
        if decades > 0:
            ev[:, j] = (10 ** (decades * ev[:, j] / float(kw[f"$P{j + 1}R"]))) * (log0 or 1.0)
        gain = float(kw.get(f"$P{j + 1}G", "1") or 1)
        if j != time and gain not in (0.0, 1.0):
            ev[:, j] = ev[:, j] / gain
    return ev.astype(np.float32)


def flowio_reader(path: Path, start: int, begin: int, text_begin: int | None) -> flowio.FlowData:
    """flowio told to use the same DATA offsets cytopipe chose (it refuses discrepancies)."""
    option = (
        {"ignore_offset_discrepancy": True} if begin - start == text_begin else {"use_header_offsets": True}
    )
    return flowio.FlowData(str(path), ignore_offset_error=True, nextdata_offset=start, **option)


def test_inventory_covers_every_fcs_file_present():
    if not ENTRIES:
        missing_data(f"shared test data not available: {INVENTORY}")  # a failure in CI
    listed = {f for f, _ in ENTRIES}
    on_disk = set()
    for path in SHARED_DATA.rglob("*"):
        if path.is_file() and not path.name.endswith((".npy", ".csv", ".json", ".txt", ".xml", ".wsp")):
            with open(path, "rb") as fh:
                if fh.read(3) == b"FCS":
                    on_disk.add(str(path.relative_to(SHARED_DATA)))
    assert on_disk == listed
    assert len(ENTRIES) >= 200


# without the data, one placeholder case that skips (fails in CI) instead of an empty parameter set
_CASES = ENTRIES or [("_inventory/FCS_INVENTORY.tsv", 0)]


@pytest.mark.parametrize(("rel", "dataset"), _CASES, ids=[f"{f}#{d}" for f, d in _CASES])
def test_dataset_read_like_flowio_or_rejected_clearly(rel: str, dataset: int, monkeypatch):
    if not ENTRIES:
        missing_data(f"shared test data not available: {INVENTORY}")
    path = SHARED_DATA / rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FCSWarning notes are checked in test_fcs_read
        try:
            sample = read_fcs(path, dataset=dataset)
        except CytopipeError as exc:
            assert rel in REJECTED, f"unexpected rejection: {exc}"
            cls, text = REJECTED[rel]
            assert isinstance(exc, cls) and text in str(exc) and str(path) in str(exc)
            return
        assert rel not in REJECTED
        info = read_fcs_header(path, dataset=dataset)
        start, begin = info.dataset_start, info.data_segment[0]
        text_begin = info.keywords.get("$BEGINDATA", "").strip()
        try:
            fd = flowio_reader(path, start, begin, int(text_begin) if text_begin.isdigit() else None)
            ref_raw = fd.as_array(preprocess=False)
            reference = "flowio"
        except Exception:  # flowio cannot read this file: use the minimal decoder
            ref_raw, kw = minimal_reference(path, start, begin)
            reference = "minimal"
        assert sample.events.dtype == np.float32 and sample.events.flags.c_contiguous
        assert bits_equal(sample.events, ref_raw), "raw events differ from the reference"
        # the numba kernels reading the mapped DATA pages (the path of files >= 4 MB), on every file
        with monkeypatch.context() as patch:
            patch.setattr(fcs, "_KERNEL_MIN_BYTES", 0)
            fast = read_fcs(path, dataset=dataset)
        assert bits_equal(fast.events, ref_raw), "raw events of the numba decode differ from the reference"

        if rel in BAD_TIMESTEP:
            with pytest.raises(FCSKeywordError, match=r"\$TIMESTEP is 'xxxxxxxxx'"):
                read_fcs(path, dataset=dataset, preprocess=True)
            return
        processed = read_fcs(path, dataset=dataset, preprocess=True)
        ref_pre = fd.as_array(preprocess=True) if reference == "flowio" else minimal_preprocess(ref_raw, kw)
        assert bits_equal(processed.events, ref_pre), "preprocessed events differ from flowio"


def test_no_fcs_warning_on_clean_files():
    """Quirk notes are for quirks: a clean modern file reads without any warning."""
    path = SHARED_DATA / "FlowKit" / "data" / "100715.fcs"
    if not path.exists():
        missing_data(f"shared test data not available: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FCSWarning)
        assert read_fcs(path).warnings == []
