"""The gate gallery's cheaper Agg drawing (cytopipe/report/fastagg.py) against matplotlib's own."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cytopipe.report.fastagg import ScaledImage, TextCanvas, encode_png


def _pixels(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


@pytest.mark.parametrize("seed", range(6))
def test_the_scaled_image_draws_the_pixels_imshow_draws(seed):
    """Nearest-neighbour scaling in numpy = imshow(interpolation="nearest"), pixel for pixel, at
    scales up and down and at extents that do not start on whole pixels."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 80, 2)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    size = rng.uniform(1.5, 5.0, 2)
    lo = rng.uniform(-0.6, -0.05, 2)
    extent = (0.0, float(rng.uniform(0.5, 1.0)), 0.0, float(rng.uniform(0.5, 1.0)))
    images = []
    for scaled in (False, True):
        fig = Figure(figsize=tuple(size), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()
        ax.set_xlim(lo[0], 1.1)
        ax.set_ylim(lo[1], 1.1)
        if scaled:
            image = ScaledImage(ax, origin="lower", interpolation="nearest")
            image.set_data(rgba)
            image.set_extent(extent)
            ax.add_image(image)
        else:
            ax.imshow(rgba, origin="lower", interpolation="nearest", aspect="auto", extent=extent)
        images.append(_pixels(fig))
    old, new = images
    assert (old != 255).any()  # something was drawn
    assert np.array_equal(old, new)


def _ink_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero((pixels[..., :3] < 200).any(-1))
    return rows.min(), rows.max(), cols.min(), cols.max()


@pytest.mark.parametrize(
    ("text", "props"),
    [
        ("P008_W12  84.9%", {"ha": "center", "va": "bottom", "fontsize": 6.5}),
        ("150000", {"ha": "center", "va": "top", "fontsize": 6}),
        ("CD4 T cells (Δ)", {"ha": "right", "va": "center", "fontsize": 6}),
        ("SSC-A", {"ha": "center", "va": "center", "rotation": 90, "fontsize": 7.5}),
        ("a$^2$ math", {"ha": "left", "va": "baseline", "fontsize": 8}),
    ],
)
def test_the_text_canvas_draws_each_text_where_agg_does(text, props):
    """Each string drawn as one raster lands where Agg draws it glyph by glyph (within a pixel),
    the same size and as dark; measuring it is matplotlib's own (the same window extent)."""
    drawn, extents = [], []
    for canvas in (FigureCanvasAgg, TextCanvas):
        fig = Figure(figsize=(2.0, 1.2), dpi=100)
        canvas(fig)
        t = fig.text(0.503, 0.497, text, **props)
        drawn.append(_pixels(fig))
        extents.append(t.get_window_extent(fig.canvas.get_renderer()).bounds)
    old, new = drawn
    assert np.allclose(extents[0], extents[1])
    assert np.abs(np.subtract(_ink_box(old), _ink_box(new))).max() <= 1
    ink = [255 * 3 - p[..., :3].astype(int).sum(-1) for p in (old, new)]
    assert abs(ink[1].sum() - ink[0].sum()) <= 0.1 * ink[0].sum()


def test_png_encoding_keeps_every_pixel_and_text():
    rng = np.random.default_rng(3)
    for h, w in ((1, 1), (7, 13), (120, 91)):
        rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        png = encode_png(rgba, {"Title": "gate-cd4-t-0", "Note": "ΔCD25 ≥ 1"}, 100)
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.mode == "RGBA" and np.array_equal(np.asarray(image), rgba)
        assert image.info["Title"] == "gate-cd4-t-0" and image.info["Note"] == "ΔCD25 ≥ 1"
        assert image.info["dpi"] == pytest.approx((100, 100), abs=0.01)


def _gallery_rows(n: int) -> list[dict]:
    """``n`` gate-review rows of one 2-D gate (a 4x4 density, a rectangle) for gallery_figure."""
    xe = [0.0, 1.0]
    return [
        {"x": "FSC-A", "y": "SSC-A", "x_range": xe, "y_range": xe, "x_bins": 4, "y_bins": 4,
         "counts": list(range(16)), "shapes": '[{"kind": "rect", "x": [0.2, 0.8], "y": [0.1, null]}]'}
        for _ in range(n)
    ]  # fmt: skip


def test_a_gallery_figure_on_the_text_canvas_keeps_its_canvas_and_texts():
    """render() draws a gallery figure on its own TextCanvas (not a plain Agg canvas) and still
    lists every text it shows in the PNG's Description."""
    from cytopipe.report import figures as F

    rows = _gallery_rows(3)
    with F.style_context():
        fig = F.gallery_figure(rows, ["", "flag", ""], ["S1  50.0%", "S2  12.5%", "S3  99.9%"])
        assert isinstance(fig.canvas, TextCanvas)
        rendered = F.render(fig, "gate-x", "alt")
    assert isinstance(fig.canvas, TextCanvas)
    assert {"S1  50.0%", "S2  12.5%", "S3  99.9%", "FSC-A", "SSC-A"} <= set(rendered.texts)
    assert rendered.overlaps == []


def test_the_fast_paths_are_on_where_matplotlib_has_their_internals():
    """matplotlib 3.7-3.11 (pyproject's floor up to the version this was written on) have every
    internal the fast text and mosaic use: the fast paths are on there, not silently off."""
    import matplotlib

    from cytopipe.report import fastagg

    major, minor = (int(p) for p in matplotlib.__version__.split(".")[:2])
    if (major, minor) <= (3, 11):
        assert fastagg.FAST_TEXT and fastagg.FAST_IMAGE


def test_without_the_internals_the_figures_are_drawn_matplotlibs_own_way(monkeypatch):
    """A matplotlib without the internals (FAST_TEXT / FAST_IMAGE off): a gallery figure is still
    drawn, its texts are Agg's own pixels and its mosaic is a plain AxesImage."""
    from matplotlib.image import AxesImage

    from cytopipe.report import fastagg
    from cytopipe.report import figures as F

    monkeypatch.setattr(fastagg, "FAST_TEXT", False)
    monkeypatch.setattr(fastagg, "FAST_IMAGE", False)
    rows = _gallery_rows(2)
    with F.style_context():
        fig = F.gallery_figure(rows, ["", ""], ["S1  50.0%", "S2  12.5%"])
        images = fig.axes[0].get_images()
        assert len(images) == 1 and type(images[0]) is AxesImage
        rendered = F.render(fig, "gate-x", "alt")
        plain = _pixels(fig)
        FigureCanvasAgg(fig)  # matplotlib's own canvas and renderer
        assert np.array_equal(plain, _pixels(fig))
    assert {"S1  50.0%", "S2  12.5%", "FSC-A", "SSC-A"} <= set(rendered.texts)
    assert rendered.width > 100 and rendered.uri.startswith("data:image/png;base64,")
