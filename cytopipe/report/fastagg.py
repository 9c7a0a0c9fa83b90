"""Cheaper Agg drawing for the report: each text one raster, the gallery's mosaic scaled in numpy, PNG unfiltered.

The gate gallery is most of a report's drawing, and most of that went to three things matplotlib
3.11 and Pillow do slowly for figures like these (dozens of short texts, one large upsampled image).
Every report figure is drawn on a :class:`TextCanvas` (:func:`cytopipe.report.figures.render`:
the other figures' text and PNG cost the same way, ~1 s of a 150-file trial's report); only the
gallery uses :class:`ScaledImage`:

- **Text.** Agg renders a string glyph by glyph, each glyph placed by a Python loop (a FreeType
  transform built with numpy, one C call to render it, one to blend it), after laying the string
  out once to measure it and once more to draw it: ~1.4 ms a panel title. :class:`TextCanvas`
  draws each plain string as one raster (FreeType lays out and renders the whole string in one
  call: matplotlib's own Agg text path up to 3.10), made when the string is measured: ~0.3 ms.
  The glyphs sit on whole pixels instead of sub-pixel offsets; text, font, size, colour, anchor
  and rotation are the same, and layout, extents and every ``Text`` object are matplotlib's own
  (what :func:`~cytopipe.report.figures.shown_texts` and the overlap check read is unchanged).
  Math text goes matplotlib's way.
- **The mosaic.** ``imshow`` resamples its image through Agg's general affine resampler at the
  figure's resolution. :class:`ScaledImage` scales it by nearest neighbour in numpy (which source
  pixel each output pixel's centre falls in, as ``interpolation="nearest"``: the same pixels)
  and blends it once at whole-pixel position.
- **PNG.** Pillow picks every row's PNG filter by trying all five; :func:`encode_png` leaves the
  rows unfiltered, which compresses these figures about as well in half the time.

Text and mosaic use matplotlib internals (``RendererAgg._prepare_font``, the C renderer's
``draw_text_image``, FT2Font's layout calls, ``AxesImage.make_image``'s signature; 3.7-3.11 have
them). :data:`FAST_TEXT` and :data:`FAST_IMAGE` say whether this matplotlib has them; when not,
the text and the mosaic are drawn matplotlib's own way (slower, the same figures), never broken.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg, get_hinting_flag
from matplotlib.image import AxesImage

log = logging.getLogger(__name__)


def _has_fast_text() -> bool:
    """Whether this matplotlib has the internals :class:`TextRenderer` draws with."""
    try:
        from matplotlib.backends import _backend_agg
        from matplotlib.ft2font import FT2Font
    except ImportError:
        return False
    font_calls = ("set_text", "draw_glyphs_to_bitmap", "get_image", "get_bitmap_offset", "get_descent",
                  "get_width_height")  # fmt: skip
    return (
        callable(getattr(RendererAgg, "_prepare_font", None))
        and callable(getattr(_backend_agg.RendererAgg, "draw_text_image", None))
        and all(callable(getattr(FT2Font, name, None)) for name in font_calls)
    )


def _has_fast_image() -> bool:
    """Whether ``AxesImage.make_image`` is still ``(renderer, magnification, unsampled)`` ->
    ``(image, x, y, transform)``, as :class:`ScaledImage` overrides it."""
    params = list(inspect.signature(AxesImage.make_image).parameters)
    return params == ["self", "renderer", "magnification", "unsampled"]


#: this matplotlib has what :class:`TextRenderer` needs (else: matplotlib's own text drawing)
FAST_TEXT = _has_fast_text()
#: this matplotlib has what :class:`ScaledImage` needs (else: matplotlib's own resampling)
FAST_IMAGE = _has_fast_image()
if not (FAST_TEXT and FAST_IMAGE):
    log.info("matplotlib %s: report figures drawn matplotlib's own way (text %s, mosaic %s)",
             __import__("matplotlib").__version__, "fast" if FAST_TEXT else "plain",
             "fast" if FAST_IMAGE else "plain")  # fmt: skip


class TextRenderer(RendererAgg):
    """:class:`RendererAgg` drawing each plain (non-math) string as one raster, made when the
    string is measured (laying a string out is most of the cost: done once, not twice)."""

    def __init__(self, width: float, height: float, dpi: float):
        super().__init__(width, height, dpi)
        # (string, font properties) -> its antialiased raster, the raster's offset and the descent
        self._rasters: dict[tuple[str, int], tuple[np.ndarray, tuple[int, int], int]] = {}

    def _layout(self, s: str, prop: Any, antialiased: bool = True) -> Any:
        font = self._prepare_font(prop)
        # angle 0 here: the raster is rotated as it is blended (draw_text_image)
        font.set_text(s, 0.0, flags=get_hinting_flag())
        font.draw_glyphs_to_bitmap(antialiased=antialiased)
        return font

    def get_text_width_height_descent(self, s, prop, ismath):  # noqa: ANN001
        if ismath or not FAST_TEXT:
            return super().get_text_width_height_descent(s, prop, ismath)
        font = self._layout(s, prop)
        w, h = font.get_width_height()  # as RendererAgg measures it
        d = font.get_descent()
        self._rasters[s, hash(prop)] = (np.array(font.get_image()), font.get_bitmap_offset(), d)
        return w / 64.0, h / 64.0, d / 64.0

    def draw_text(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):  # noqa: ANN001
        if ismath or not FAST_TEXT:
            return super().draw_text(gc, x, y, s, prop, angle, ismath, mtext)
        made = self._rasters.get((s, hash(prop))) if gc.get_antialiased() else None
        if made is None:
            font = self._layout(s, prop, gc.get_antialiased())
            made = np.asarray(font.get_image()), font.get_bitmap_offset(), font.get_descent()
        image, (xo, yo), descent = made
        # x, y: the text's origin, y downwards; the raster is placed by its bottom-left corner
        # (matplotlib 3.10's RendererAgg.draw_text)
        sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
        x = round(x + xo / 64.0 + descent / 64.0 * sin)
        y = round(y + yo / 64.0 + descent / 64.0 * cos)
        self._renderer.draw_text_image(image, x, y + 1, angle, gc)
        return None


class TextCanvas(FigureCanvasAgg):
    """An Agg canvas whose renderer is a :class:`TextRenderer`."""

    def get_renderer(self) -> RendererAgg:  # FigureCanvasAgg.get_renderer, with TextRenderer
        w, h = self.get_width_height(physical=True)
        key = w, h, self.figure.dpi
        if getattr(self, "_lastKey", None) != key:
            self.renderer = TextRenderer(w, h, self.figure.dpi)
            self._lastKey = key
        return self.renderer

    def print_png(self, filename_or_obj: Any, *, metadata: dict | None = None, pil_kwargs: dict | None = None,
                  **_: Any) -> None:  # fmt: skip
        """``FigureCanvasAgg.print_png`` through :func:`encode_png` (the same pixels, RGBA). The
        other keywords (dpi, facecolor, ...) ``print_figure`` has set on the figure already;
        ``pil_kwargs`` (Pillow's compression level) do not apply."""
        import matplotlib

        FigureCanvasAgg.draw(self)
        meta = {
            "Software": f"Matplotlib version{matplotlib.__version__}, https://matplotlib.org/",
            **(metadata or {}),
        }
        png = encode_png(np.asarray(self.buffer_rgba()), {k: v for k, v in meta.items() if v is not None},
                         self.figure.dpi)  # fmt: skip
        if hasattr(filename_or_obj, "write"):
            filename_or_obj.write(png)
        else:
            with open(filename_or_obj, "wb") as f:
                f.write(png)


#: zlib level of :func:`encode_png` (levels 1-3 cost the same; 4-6 ~1.7-2.1x for 6-30 % fewer bytes)
PNG_LEVEL = 3


def encode_png(rgba: np.ndarray, texts: dict[str, str], dpi: float) -> bytes:
    """An RGBA image (rows top first) as PNG: every row unfiltered, zlib level :data:`PNG_LEVEL`;
    ``texts`` as tEXt chunks (iTXt when not Latin-1), the resolution as pHYs.

    Pillow picks each row's filter by trying all five (~60 % of its PNG encoding here, ~15 ms a
    gallery figure); unfiltered, a gallery figure compresses as well (the same size within 10 %)
    in half the time."""
    import struct
    import zlib

    from cytopipe.pngchunks import SIGNATURE, ihdr
    from cytopipe.pngchunks import png_chunk as chunk

    h, w = rgba.shape[:2]
    raw = np.empty((h, 1 + 4 * w), dtype=np.uint8)
    raw[:, 0] = 0  # filter type None
    raw[:, 1:] = rgba.reshape(h, 4 * w)
    per_metre = int(dpi / 0.0254 + 0.5)
    out = [SIGNATURE, ihdr(w, h, 6), chunk(b"pHYs", struct.pack(">IIB", per_metre, per_metre, 1))]
    for key, value in texts.items():
        try:
            out.append(chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
        except UnicodeEncodeError:
            out.append(chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")))
    out += [chunk(b"IDAT", zlib.compress(raw, PNG_LEVEL)), chunk(b"IEND", b"")]
    return b"".join(out)


class ScaledImage(AxesImage):
    """An ``AxesImage`` of an RGBA uint8 array (``origin="lower"``, no interpolation between
    pixels), scaled to the output by nearest neighbour in numpy and blended unresampled; used
    only where :data:`FAST_IMAGE` (else a plain ``AxesImage``)."""

    def make_image(self, renderer: Any, magnification: float = 1.0, unsampled: bool = False) -> tuple:
        rgba = np.asarray(self.get_array())
        x0, x1, y0, y1 = self.get_extent()
        (dx0, dy0), (dx1, dy1) = self.get_transform().transform([(x0, y0), (x1, y1)]) * magnification
        h, w = rgba.shape[:2]
        # the output pixels whose centres fall inside the extent (display y upwards)
        i0, i1 = math.ceil(dx0 - 0.5), math.ceil(dx1 - 0.5)
        j0, j1 = math.ceil(dy0 - 0.5), math.ceil(dy1 - 0.5)
        if i1 <= i0 or j1 <= j0:
            return None, 0, 0, None
        cols = np.clip(((np.arange(i0, i1) + 0.5 - dx0) * (w / (dx1 - dx0))).astype(np.intp), 0, w - 1)
        rows = np.clip(((np.arange(j0, j1) + 0.5 - dy0) * (h / (dy1 - dy0))).astype(np.intp), 0, h - 1)
        # each pixel's 4 bytes gathered as one uint32: rows, then columns (a 2-D fancy index costs
        # ~10x more); bottom row first, as origin="lower" (Agg's draw_image reads the rows upwards)
        pixels = np.ascontiguousarray(rgba).view(np.uint32)[..., 0]
        out = pixels.take(rows, axis=0).take(cols, axis=1)
        return out.view(np.uint8).reshape(len(rows), len(cols), 4), i0, j0, None
