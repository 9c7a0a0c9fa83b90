"""Build FCS files byte by byte for tests: any version, delimiter, data type, byte order,
HEADER/TEXT offsets -- including the broken ones real instruments (and corrupt copies) produce.

Independent of cytopipe.fcs on purpose: the reader is tested against files this module lays
out by hand.
"""

from __future__ import annotations

import numpy as np


def pack_ints(
    values: np.ndarray, bits: list[int], big: bool = False, widths: list[int] | None = None
) -> bytes:
    """Pack an (events x channels) integer array with per-channel widths (bytes)."""
    values = np.asarray(values, dtype=np.uint64)
    widths = widths or [-(-b // 8) for b in bits]
    n = values.shape[0]
    out = np.zeros((n, sum(widths)), dtype=np.uint8)
    col = 0
    for j, w in enumerate(widths):
        for k in range(w):  # k = byte significance (0 = least significant)
            byte = (values[:, j] >> np.uint64(8 * k)) & np.uint64(0xFF)
            pos = col + (w - 1 - k if big else k)
            out[:, pos] = byte.astype(np.uint8)
        col += w
    return out.tobytes()


def build_fcs(
    keywords: dict[str, str],
    data: bytes,
    *,
    version: str = "FCS3.1",
    delimiter: bytes = b"|",
    escape: bool = True,
    text_offsets: bool = True,
    header_data: tuple[int, int] | None = None,
    text_data: tuple[int, int] | None = None,
    gap: bytes = b"",
    trailer: bytes = b"",
    raw_text: bytes | None = None,
) -> bytes:
    """An FCS file: HEADER, TEXT (``keywords`` in order), optional ``gap`` bytes, DATA,
    ``trailer``. ``header_data``/``text_data`` override the offsets written (defaults:
    the true DATA position; ``text_offsets=False`` leaves out $BEGINDATA/$ENDDATA)."""
    d = delimiter
    if raw_text is None:
        items = dict(keywords)
        if text_offsets:
            # fixed-width placeholders so the TEXT length does not depend on the values
            items.setdefault("$BEGINDATA", "0" * 12)
            items.setdefault("$ENDDATA", "0" * 12)
        text = _encode(items, d, escape)
        begin = 58 + len(text) + len(gap)
        end = begin + len(data) - 1
        if text_offsets:
            tb, te = text_data if text_data is not None else (begin, end)
            items["$BEGINDATA"] = str(tb).zfill(12)
            items["$ENDDATA"] = str(te).zfill(12)
            text = _encode(items, d, escape)
    else:
        text = raw_text
        begin = 58 + len(text) + len(gap)
        end = begin + len(data) - 1
    hb, he = header_data if header_data is not None else (begin, end)
    header = f"{version}    {58:>8d}{57 + len(text):>8d}{hb:>8d}{he:>8d}{0:>8d}{0:>8d}".encode("ascii")
    assert len(header) == 58
    return header + text + gap + data + trailer


def _encode(items: dict[str, str], d: bytes, escape: bool) -> bytes:
    parts = [d]
    for k, v in items.items():
        kb, vb = k.encode("utf-8"), v.encode("utf-8") if isinstance(v, str) else v
        if escape:
            kb, vb = kb.replace(d, d + d), vb.replace(d, d + d)
        parts += [kb, d, vb, d]
    return b"".join(parts)


def float_keywords(n_events: int, names: list[str], datatype: str = "F", big: bool = False, **extra) -> dict:
    kw = {
        "$BYTEORD": "4,3,2,1" if big else "1,2,3,4",
        "$DATATYPE": datatype,
        "$MODE": "L",
        "$NEXTDATA": "0",
        "$PAR": str(len(names)),
        "$TOT": str(n_events),
    }
    bits = "32" if datatype == "F" else "64"
    for i, name in enumerate(names, 1):
        kw[f"$P{i}N"] = name
        kw[f"$P{i}B"] = bits
        kw[f"$P{i}E"] = "0,0"
        kw[f"$P{i}R"] = "262144"
    kw.update(extra)
    return kw


def int_keywords(
    n_events: int, names: list[str], bits: list[int], ranges: list[int], big: bool = False, **extra
):
    kw = {
        "$BYTEORD": "4,3,2,1" if big else "1,2,3,4",
        "$DATATYPE": "I",
        "$MODE": "L",
        "$NEXTDATA": "0",
        "$PAR": str(len(names)),
        "$TOT": str(n_events),
    }
    for i, (name, b, r) in enumerate(zip(names, bits, ranges), 1):
        kw[f"$P{i}N"] = name
        kw[f"$P{i}B"] = str(b)
        kw[f"$P{i}E"] = "0,0"
        kw[f"$P{i}R"] = str(r)
    kw.update(extra)
    return kw


def simple_float_file(
    n_events: int = 5, names=("FSC-A", "SSC-A", "CD4"), big: bool = False, seed: int = 0, **kw
):
    """A small valid float32 file and its events."""
    rng = np.random.default_rng(seed)
    events = rng.normal(1000, 300, size=(n_events, len(names))).astype(np.float32)
    data = events.astype(">f4" if big else "<f4").tobytes()
    return build_fcs(float_keywords(n_events, list(names), big=big), data, **kw), events
