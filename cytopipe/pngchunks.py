"""PNG chunks as bytes: the one place that frames a chunk (length, type, data, CRC-32).

The report writes its figures' PNGs itself (``report/fastagg.py``: unfiltered rows), adds their
texts as chunks (``report/figures.py``), and the gate-review pages draw tiny density PNGs
(``review/plot.py``); each needs the same framing (PNG specification, section 5.3).
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: big-endian length, the 4-byte type, the data, the CRC-32 of type and data."""
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def ihdr(width: int, height: int, color_type: int) -> bytes:
    """The IHDR chunk of an 8-bit image (color type 2: RGB, 6: RGBA), no interlace."""
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
