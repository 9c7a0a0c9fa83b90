"""The one PNG chunk framing (cytopipe/pngchunks.py) makes PNGs a real decoder reads back exactly:
the gate-review pages' tiny density images (review/plot.py) and a report figure's added text."""

from __future__ import annotations

import base64
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from cytopipe.pngchunks import SIGNATURE, ihdr, png_chunk


@pytest.mark.parametrize("channels", [3, 4])
def test_the_review_density_png_decodes_to_its_pixels(channels):
    from cytopipe.review.plot import _png

    rgb = np.random.default_rng(channels).integers(0, 256, size=(7, 11, channels), dtype=np.uint8)
    image = Image.open(io.BytesIO(base64.b64decode(_png(rgb))))
    image.load()  # Pillow checks every chunk's CRC while reading
    assert image.mode == ("RGBA" if channels == 4 else "RGB")
    assert np.array_equal(np.asarray(image), rgb)


def test_a_chunk_is_framed_as_the_png_specification_says():
    chunk = png_chunk(b"tEXt", b"Title\0gate")
    assert chunk[:4] == (10).to_bytes(4, "big") and chunk[4:8] == b"tEXt" and chunk[8:18] == b"Title\0gate"
    assert chunk[18:] == zlib.crc32(b"tEXtTitle\0gate").to_bytes(4, "big")
    # a grey 2 x 1 image built from the chunks alone, text included, is read back with its text
    raw = bytes([0, 10, 20, 30, 40, 50, 60])  # one row: filter byte 0, then two RGB pixels
    png = SIGNATURE + ihdr(2, 1, 2) + chunk + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.info["Title"] == "gate"
    assert np.asarray(image).tolist() == [[[10, 20, 30], [40, 50, 60]]]


def test_a_report_figures_added_text_is_read_back():
    from cytopipe.report.figures import _add_png_text

    png = SIGNATURE + ihdr(1, 1, 2) + png_chunk(b"IDAT", zlib.compress(bytes(4))) + png_chunk(b"IEND", b"")
    image = Image.open(io.BytesIO(_add_png_text(png, "Description", "Treg · % of CD4")))
    image.load()
    assert image.info["Description"] == "Treg · % of CD4"
