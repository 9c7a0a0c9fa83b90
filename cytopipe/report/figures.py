"""The report's figures: matplotlib ``Figure`` objects (no pyplot, Agg canvas), rendered to PNG.

Every function returns a Figure; :func:`render` draws it once, collects every piece of text it
shows (titles, labels, tick labels, legends, annotations) and writes the PNG with that text in its
``Description`` metadata, so that what a figure says can be searched (the blinded-report check
reads it) even though the pixels cannot.

Why one module: every figure shares the style context, the arm palette, the text-overlap check
and the PNG text metadata defined at its top (which the blinding check reads); the figures are
independent functions, so the module is long but flat.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cytopipe.pngchunks import png_chunk

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
STYLE = {
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlepad": 3,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "font.family": "DejaVu Sans",
    "svg.fonttype": "none",
}
STATUS_COLORS = {"ok": "#2f9e44", "flagged": "#f08c00", "failed": "#e03131"}
FLAG_COLOR = "#e03131"
OUTLIER_COLOR = "#f08c00"
CLINICAL_LABELS = {
    "sledai_change": "ΔSLEDAI",
    "anti_dsdna_change": "Δanti-dsDNA",
    "c3_change": "ΔC3",
    "c4_change": "ΔC4",
    "proteinuria_change": "Δproteinuria",
    "pga_change": "ΔPGA",
    "prednisone_mg_change": "Δprednisone",
}


@dataclass
class Rendered:
    """A rendered figure: PNG bytes as a data URI, its pixel size, and the text it shows."""

    name: str
    uri: str
    width: int
    height: int
    alt: str
    texts: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)  # pairs of texts drawn over each other


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def render(fig: Figure, name: str, alt: str) -> Rendered:
    """Draw ``fig`` to a PNG (Agg), with its text in the PNG metadata."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cytopipe.report.fastagg import TextCanvas

    if not isinstance(fig.canvas, FigureCanvasAgg):  # a figure may bring its own Agg canvas
        TextCanvas(fig)  # each text drawn as one raster, PNG rows unfiltered (report/fastagg.py)
    for attempt in range(4):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Title": name, "Software": "cytopipe report (matplotlib)"},
                    pil_kwargs={"compress_level": 3})  # fmt: skip
        overlaps = text_overlaps(fig)
        # a text cut off at the figure's edge (a colour bar's label longer than a heatmap of 3 rows, a
        # title wider than a heatmap of 3 columns): a laid-out figure grows until it fits
        if attempt == 3 or fig.get_layout_engine() is None or not _grow_to_fit(fig):
            break
    # after the draw every text the figure shows exists (tick labels are made while drawing)
    texts = list(dict.fromkeys(t.get_text() for t in shown_texts(fig)))
    png = _add_png_text(buf.getvalue(), "Description", "\n".join([alt, *texts]))
    png = _add_png_text(png, "Layout", "overlapping texts: " + ("; ".join(overlaps) if overlaps else "none"))
    width, height = (int(round(v)) for v in fig.get_size_inches() * DPI)
    # not fig.clear(): that re-initialises every axes before removing it (~4 % of a report's CPU);
    # the figure is dropped here and the garbage collector frees it
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return Rendered(name=name, uri=uri, width=width, height=height, alt=alt, texts=texts, overlaps=overlaps)


def shown_texts(artist: Any) -> list[Any]:
    """``[t for t in artist.findobj(Text) if t.get_visible() and t.get_text().strip()]``: the same
    texts in the same order, without the ticks ``findobj`` makes. matplotlib's ``Axis.get_children``
    makes a tick for every tick location it has none for yet (e.g. the axis of a gallery figure,
    which is never drawn: ~10 ticks at ~1 ms each, 12 % of the helper process's CPU); a new tick's
    label has no text (only drawing an axis gives its labels text), so it is never among these."""
    from matplotlib.axis import Axis
    from matplotlib.text import Text

    out: list[Any] = []

    def walk(artist: Any) -> None:  # findobj's order: the children first, then the artist
        if isinstance(artist, Axis):
            made = vars(artist)  # the tick lists are made on first access: only those that exist
            children = [
                artist.label,
                artist.offsetText,
                *made.get("majorTicks", [])[: len(artist.get_majorticklocs())],
                *made.get("minorTicks", [])[: len(artist.get_minorticklocs())],
            ]
        else:
            children = artist.get_children()
        for child in children:
            walk(child)
        if isinstance(artist, Text) and artist.get_visible() and artist.get_text().strip():
            out.append(artist)

    walk(artist)
    return out


def _grow_to_fit(fig: Figure) -> bool:
    """Enlarge a drawn figure by as much as its texts reach outside it (and a little more);
    ``False`` when every text is inside."""
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    over_x = over_y = 0.0
    for t in drawn_texts(fig):
        if not (t.get_visible() and t.get_text().strip()):
            continue
        bb = t.get_window_extent(renderer)
        if not np.isfinite([bb.x0, bb.y0, bb.x1, bb.y1]).all():
            continue
        over_x = max(over_x, -bb.x0, bb.x1 - width)
        over_y = max(over_y, -bb.y0, bb.y1 - height)
    if over_x <= 1.0 and over_y <= 1.0:
        return False
    w, h = fig.get_size_inches()
    grow = lambda over: 2.2 * over / fig.dpi + 0.1 if over > 1.0 else 0.0  # noqa: E731
    fig.set_size_inches(w + grow(over_x), h + grow(over_y))
    return True


def drawn_texts(fig: Figure) -> list[Any]:
    """The texts a drawn figure shows: its own and its axes' texts, titles, axis labels, legend
    texts, and the tick labels of the ticks inside each axis's view (matplotlib keeps labels of
    ticks outside the view, undrawn)."""
    from matplotlib.text import Text

    out: list[Any] = list(fig.texts)
    for legend in fig.legends:
        out += legend.get_texts()
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        out += list(ax.texts) + [ax.title, ax._left_title, ax._right_title]
        if ax.get_legend() is not None:
            out += ax.get_legend().get_texts()
        if not ax.axison:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if not axis.get_visible():
                continue
            out.append(axis.label)
            for tick in axis._update_ticks():
                for label in (tick.label1, tick.label2):
                    if label.get_visible():
                        out.append(label)
    return [t for t in out if isinstance(t, Text) and t.get_visible() and t.get_text().strip()]


def text_overlaps(fig: Figure, texts: Sequence[Any] | None = None, tolerance: float = 1.0) -> list[str]:
    """``["'a' over 'b'", ...]`` for every two texts of a drawn figure whose boxes overlap by more
    than ``tolerance`` pixels each way (tick labels, axis labels, titles, legends, annotations),
    and for texts that reach outside the figure."""

    renderer = fig.canvas.get_renderer()
    if texts is None:
        texts = drawn_texts(fig)
    boxes = []
    for t in texts:
        if t.get_text().strip() and t.get_visible():
            try:
                bb = t.get_window_extent(renderer)
                rect = _text_rect(t, bb, renderer)
            except Exception:  # a text without a position (never drawn)
                continue
            if np.isfinite([bb.x0, bb.y0, bb.x1, bb.y1]).all() and bb.width > 0:
                boxes.append((t.get_text(), bb, rect))
    width, height = fig.bbox.width, fig.bbox.height
    out = []
    for text, bb, _ in boxes:
        if (
            bb.x0 < -tolerance
            or bb.y0 < -tolerance
            or bb.x1 > width + tolerance
            or bb.y1 > height + tolerance
        ):
            out.append(f"{text!r} outside the figure")
    if len(boxes) < 2:
        return out
    # the boxes' overlaps all at once (a gallery figure of 336 panels has ~350 texts: ~60,000
    # pairs), then the exact test of the turned rectangles only where the boxes overlap, in order
    x0, y0, x1, y1 = np.array([[bb.x0, bb.y0, bb.x1, bb.y1] for _, bb, _ in boxes]).T
    dx = np.minimum.outer(x1, x1) - np.maximum.outer(x0, x0)
    dy = np.minimum.outer(y1, y1) - np.maximum.outer(y0, y0)
    for i, j in zip(*np.nonzero(np.triu((dx > tolerance) & (dy > tolerance), k=1))):
        (a_text, _, ra), (b_text, _, rb) = boxes[i], boxes[j]
        if _rects_overlap(ra, rb, tolerance):
            out.append(f"{a_text!r} over {b_text!r}")
    return out


def _text_rect(t: Any, bb: Any, renderer: Any) -> np.ndarray:
    """The corners (4 x 2, pixels) of a text's own rectangle: its box turned by its rotation
    (the axis-aligned box of rotated tick labels overlaps its neighbours' although the words do
    not)."""
    angle = np.deg2rad(t.get_rotation() % 180)
    if abs(np.sin(angle)) < 1e-6:
        return np.array([[bb.x0, bb.y0], [bb.x1, bb.y0], [bb.x1, bb.y1], [bb.x0, bb.y1]])
    rotation = t.get_rotation()
    t.set_rotation(0)
    try:
        flat = t.get_window_extent(renderer)
    finally:
        t.set_rotation(rotation)
    w, h = flat.width / 2, flat.height / 2
    c = np.array([(bb.x0 + bb.x1) / 2, (bb.y0 + bb.y1) / 2])
    u, v = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    return np.array([c - w * u - h * v, c + w * u - h * v, c + w * u + h * v, c - w * u + h * v])


def _rects_overlap(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """Separating-axis test of two convex quadrilaterals (overlap deeper than ``tolerance``)."""
    for poly in (a, b):
        for k in range(4):
            edge = poly[(k + 1) % 4] - poly[k]
            axis = np.array([-edge[1], edge[0]])
            norm = float(np.hypot(*axis))
            if norm == 0:
                continue
            axis = axis / norm
            pa, pb = a @ axis, b @ axis
            if min(pa.max(), pb.max()) - max(pa.min(), pb.min()) <= tolerance:
                return False
    return True


def _add_png_text(png: bytes, key: str, text: str) -> bytes:
    """Insert an iTXt chunk (UTF-8 text) before the PNG's IEND chunk."""
    chunk = png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))
    end = png.rindex(b"IEND") - 4  # the IEND chunk starts with its 4-byte length
    return png[:end] + chunk + png[end:]


def style_context():
    import matplotlib

    return matplotlib.rc_context(STYLE)


# ------------------------------------------------------------------------------------------------
# arm colours
# ------------------------------------------------------------------------------------------------
#: the reference (placebo) arm: neutral grey, in every figure
REFERENCE_COLOR = "#a6a6a6"
#: qualitative colour-blind-safe palette (Okabe & Ito 2008, without its grey and yellow) for arms
#: without a dose order, and for every blinded report (no arm singled out)
QUALITATIVE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#000000"]


def arm_colors(arms: Sequence[str], reference: str | None, dose_ordered: bool) -> dict[str, str]:
    """One colour per arm, used by every figure of a report: the reference arm grey; with a dose
    order, the active arms on a colour-blind-safe sequential scale (matplotlib's ``magma``, salmon
    for the lowest dose to dark indigo for the highest: distinct hue and lightness, still distinct
    from each other and from the grey under protan-, deutan- and tritanopia; tests check it);
    otherwise (and for blinded codes) the Okabe-Ito qualitative palette."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    arms = list(arms)
    colors: dict[str, str] = {}
    if reference in arms:
        colors[reference] = REFERENCE_COLOR
    active = [a for a in arms if a not in colors]
    if dose_ordered and reference in arms:
        stops = np.linspace(0.75, 0.12, len(active)) if len(active) > 1 else [0.45]
        colors.update({a: to_hex(colormaps["magma"](float(t))) for a, t in zip(active, stops)})
    else:
        colors.update({a: QUALITATIVE[i % len(QUALITATIVE)] for i, a in enumerate(active)})
    return {a: colors[a] for a in arms}


def _arm_legend(fig: Figure, colors: Mapping[str, str], arms: Sequence[str], ncol: int | None = None) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[a], lw=2.2, marker="o", ms=4) for a in arms]
    if fig.get_layout_engine() is None:  # hand-placed axes: the legend sits in the top margin
        fig.legend(handles, list(arms), loc="upper center", ncol=ncol or len(arms), frameon=False,
                   bbox_to_anchor=(0.5, 1.0))  # fmt: skip
    else:
        fig.legend(handles, list(arms), loc="outside upper center", ncol=ncol or len(arms), frameon=False)


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return int(math.ceil(n / ncols)), ncols


def _panel_grid(
    n: int,
    ncols: int,
    panel: tuple[float, float] = (1.85, 1.35),
    gaps: tuple[float, float] = (0.62, 0.62),
    margins: tuple[float, float, float, float] = (0.62, 0.12, 0.5, 0.42),
) -> tuple[Figure, list[Axes], int, int]:
    """A figure with ``n`` axes on a grid placed by hand (inches): small multiples without the
    cost of a layout engine. ``margins`` = (left, right, top, bottom); the top holds the legend."""
    nrows, ncols = _grid(n, ncols)
    (pw, ph), (gw, gh), (ml, mr, mt, mb) = panel, gaps, margins
    width = ml + ncols * pw + (ncols - 1) * gw + mr
    height = mt + nrows * ph + (nrows - 1) * gh + mb
    fig = new_figure(width, height)
    fig.set_layout_engine(None)
    axes = []
    for i in range(n):
        r, c = divmod(i, ncols)
        x = (ml + c * (pw + gw)) / width
        y = (height - mt - (r + 1) * ph - r * gh) / height
        axes.append(fig.add_axes((x, y, pw / width, ph / height)))
    return fig, axes, nrows, ncols


# ------------------------------------------------------------------------------------------------
# run summary / QC
# ------------------------------------------------------------------------------------------------
def qc_events_figure(samples: pd.DataFrame) -> Figure:
    """Events before QC (x) against the share kept after QC (y), one point per file."""
    # imported here: the gallery's helper process draws from this module without pandas
    import pandas as pd

    fig = new_figure(6.4, 2.8)
    ax = fig.add_subplot()
    before = pd.to_numeric(samples["events_before_qc"], errors="coerce").astype(float)
    after = pd.to_numeric(samples["events_after_qc"], errors="coerce").astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        kept = 100 * after / before
    for status, color in STATUS_COLORS.items():
        sel = (samples["status"].astype(str) == status).to_numpy()
        if not sel.any():
            continue
        y = kept[sel].to_numpy()
        y = np.where(np.isfinite(y), y, 0.0)  # failed files have no events after QC: drawn at 0
        x = before[sel].to_numpy()
        unread = int((~np.isfinite(x)).sum())  # e.g. a damaged file: its size in events is unknown
        label = f"{status} ({int(sel.sum())}" + (f", {unread} unreadable, not drawn)" if unread else ")")
        ax.scatter(x, y, s=18, color=color, label=label, edgecolor="white", lw=0.4)
    ax.set_xlabel("events in the file (before QC)")
    ax.set_ylabel("% of events kept by QC")
    top = np.nanmax(kept.to_numpy()) if np.isfinite(kept.to_numpy()).any() else 100
    ax.set_ylim(min(-3, 0), max(top, 100) + 3)
    ax.legend(frameon=False, loc="lower left")
    ax.grid(alpha=0.25)
    return fig


# ------------------------------------------------------------------------------------------------
# gate review gallery
# ------------------------------------------------------------------------------------------------
def _clip_vertices(v: np.ndarray, xlim: tuple[float, float], ylim: tuple[float, float]) -> np.ndarray:
    """Open-ended polygon vertices (infinite or huge, e.g. the singlet wedge's rays from the
    origin) pulled in to just beyond the axes, keeping their direction from the origin."""
    v = np.array(v, dtype=float)
    reach = 4 * max(abs(xlim[0]), abs(xlim[1]), abs(ylim[0]), abs(ylim[1]), 1.0)
    for i in range(len(v)):
        x, y = v[i]
        if not (np.isfinite(x) and np.isfinite(y)):
            v[i] = [np.clip(np.nan_to_num(x, posinf=reach, neginf=-reach), -reach, reach),
                    np.clip(np.nan_to_num(y, posinf=reach, neginf=-reach), -reach, reach)]  # fmt: skip
        elif max(abs(x), abs(y)) > reach:
            v[i] = v[i] * (reach / max(abs(x), abs(y)))
    return v


#: a gallery axis is drawn per panel when one sample's own range spans less than this share of the
#: range of all the figure's samples (samples of other instruments: a linear FSC-A of 262,144 beside
#: one of 4,194,304 would be a dot in a corner of its panel)
OWN_AXES_SHARE = 0.25


def own_axes(rows: Sequence[Mapping[str, Any]]) -> tuple[bool, bool]:
    """(x, y): whether the gallery draws that axis per panel (each sample on its own range) rather
    than shared by every panel, because the samples' ranges are too different (see
    :data:`OWN_AXES_SHARE`)."""

    def own(key: str) -> bool:
        spans = [(float(r[key][0]), float(r[key][1])) for r in rows]
        whole = max(hi for _, hi in spans) - min(lo for lo, _ in spans)
        return whole > 0 and min(hi - lo for lo, hi in spans) < OWN_AXES_SHARE * whole

    return own("x_range"), bool(rows[0]["y"]) and own("y_range")


def _to_byte(values: np.ndarray) -> np.ndarray:
    """Colour components 0-1 as uint8, truncated (as matplotlib converts a float image)."""
    return (np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _viridis_bytes() -> np.ndarray:
    """viridis's colours (its lookup table) as RGBA uint8."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return _to_byte(cmap(np.arange(cmap.N)))  # an integer picks that entry of the table


def _log_scaled(values: np.ndarray, peak: int) -> np.ndarray:
    """``LogNorm(vmin=1, vmax=max(peak, 2), clip=True)(values)`` where values >= 1 (else 0): the
    same operations, without the masked arrays (a panel's counts are never masked)."""
    top = np.log10(np.array([1.0, float(max(peak, 2))]))
    scaled = np.log10(np.clip(np.where(values > 0, values, 1.0), 1.0, float(max(peak, 2))))
    scaled -= top[0]
    scaled /= top[1] - top[0]
    return scaled


def _colour_index(scaled: np.ndarray, n: int) -> np.ndarray:
    """The colormap entry of each value 0-1, as ``Colormap.__call__`` picks it."""
    index = scaled * n
    index[index == n] = n - 1
    return index.astype(int)


def gallery_figure(
    rows: Sequence[Mapping[str, Any]],
    marks: Sequence[str],
    labels: Sequence[str],
    ncols: int = 6,
) -> Figure:
    """A grid of one gate's panel across samples: the parent's density on the gate's axes, the
    fitted gate, the % inside. ``marks``: "flag", "outlier" or "" per sample (frames the panel);
    ``labels``: the panel titles.

    Drawn as small multiples inside ONE axes (each panel a unit square placed on a grid, its
    density image and gate shapes mapped there by an affine transform and clipped to the square):
    a figure of 36 panels renders in a fraction of a second, where 36 matplotlib axes take
    seconds. All panels share the axis ranges; the bottom-left panel carries the tick values.
    When the samples' ranges differ too much (:func:`own_axes`, e.g. samples of other instruments),
    that axis is drawn per panel instead, with every panel's own tick values.
    """
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.image import AxesImage

    from cytopipe.report.fastagg import FAST_IMAGE, ScaledImage, TextCanvas
    from cytopipe.report.panels import panel_arrays, panel_background

    n = len(rows)
    nrows, ncols = _grid(n, ncols)
    one_d = not rows[0]["y"]
    own_x, own_y = own_axes(rows)
    # mosaic pixels per panel side and between panels (more room for every panel's own tick values)
    px, gap_x, gap_y = 48, 18 if own_y else 5, 24 if own_x else 14
    gx, gy = gap_x / px, gap_y / px  # the same gaps in panel units (panel = 1 unit)
    left, bottom, top = 0.42, 0.42, 0.12  # margins for tick values and labels
    width = ncols * (1 + gx) - gx
    y_min = -(nrows - 1) * (1 + gy) - bottom  # below the last row: tick values and axis name
    y_max = 1 + gy * 0.7 + top  # above the first row: its titles
    inch = 1.35  # inches per panel
    right = 0.22 if own_x else 0.08  # room for the last panel's own tick values
    fig = new_figure(inch * (width + left + right), inch * (y_max - y_min))
    fig.set_layout_engine(None)
    TextCanvas(fig)  # each text drawn as one raster (render keeps this canvas)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(-left, width + right)
    ax.set_ylim(y_min, y_max)
    shared_x = (min(r["x_range"][0] for r in rows), max(r["x_range"][1] for r in rows))
    shared_y = (0.0, 1.0)
    if not one_d:
        shared_y = (min(r["y_range"][0] for r in rows), max(r["y_range"][1] for r in rows))
    lut = _viridis_bytes()
    fills: list[np.ndarray] = []
    grey_fills: list[np.ndarray] = []
    shades: list[np.ndarray] = []
    solid: list[np.ndarray] = []
    dashed: list[np.ndarray] = []
    frames: list[tuple[np.ndarray, str, float]] = []
    ticks: list[np.ndarray] = []  # tick marks
    fonts: dict[float, Any] = {}  # font properties by size
    mosaic = np.full((nrows * (px + gap_y), ncols * (px + gap_x) - gap_x, 4), 255, dtype=np.uint8)  # white
    centres = (np.arange(px) + 0.5) / px  # pixel centres in panel units
    for i, row in enumerate(rows):
        r, c = divmod(i, ncols)
        x0, y0 = c * (1 + gx), -r * (1 + gy)
        xlo, xhi = (float(row["x_range"][0]), float(row["x_range"][1])) if own_x else shared_x
        ylo, yhi = (float(row["y_range"][0]), float(row["y_range"][1])) if own_y else shared_y
        sx = 1.0 / (xhi - xlo)
        if own_x or own_y:
            ticks += _panel_ticks(
                ax, fonts, x0, y0, (xlo, xhi) if own_x else None, (ylo, yhi) if own_y else None, nbins=3
            )
        xe, ye, counts = panel_arrays(row)
        background = panel_background(row)  # the whole parent, when the panel shows part of it
        if one_d:
            peak = max(int(counts.max()), int(background.max()) if background.size else 0, 1)
            bx = x0 + (xe - xlo) * sx
            xs = np.repeat(np.clip(bx, x0, x0 + 1), 2)[1:-1]
            for values, into in ((background, grey_fills), (counts, fills)):
                if values.size:
                    ys = y0 + np.repeat(0.92 * np.clip(values / peak, 0, 1), 2)
                    into.append(np.column_stack([np.r_[xs[0], xs, xs[-1]], np.r_[y0, ys, y0]]))
        else:
            # resample this sample's histogram (its own grid) onto the shared panel grid
            ix = np.floor((xlo + centres * (xhi - xlo) - xe[0]) / (xe[1] - xe[0])).astype(int)
            iy = np.floor((ylo + centres * (yhi - ylo) - ye[0]) / (ye[1] - ye[0])).astype(int)
            okx = (ix >= 0) & (ix < counts.shape[1])
            oky = (iy >= 0) & (iy < counts.shape[0])
            img = np.zeros((px, px))
            img[np.ix_(oky, okx)] = counts[np.ix_(iy[oky], ix[okx])]
            rgba = lut[_colour_index(_log_scaled(img, int(counts.max())), len(lut))]
            rgba[img == 0] = 255
            if background.size:  # the parent's other events in grey, the shown ones in colour
                bg = np.zeros((px, px))
                bg[np.ix_(oky, okx)] = background[np.ix_(iy[oky], ix[okx])]
                grey = _to_byte(0.9 - 0.45 * _log_scaled(bg, int(background.max())))
                only_bg = (img == 0) & (bg > 0)
                rgba[only_bg, :3] = grey[only_bg, None]
            top_row = (nrows - 1 - r) * (px + gap_y)  # origin="lower": row 0 of the array is the bottom
            left_col = c * (px + gap_x)
            mosaic[top_row : top_row + px, left_col : left_col + px] = rgba
        for shape in json.loads(row["shapes"]):
            lines, polys = shape_lines(shape, (xlo, xhi), (ylo, yhi), one_d)
            offset = np.array([x0, y0])
            (dashed if shape.get("negate") else solid).extend(ln + offset for ln in lines)
            shades.extend(pg + offset for pg in polys)
        mark = marks[i]
        color = FLAG_COLOR if mark == "flag" else OUTLIER_COLOR if mark == "outlier" else "#adb5bd"
        frame = np.array([[x0, y0], [x0 + 1, y0], [x0 + 1, y0 + 1], [x0, y0 + 1], [x0, y0]])
        frames.append((frame, color, 2.2 if mark else 0.6))
        _add_text(ax, fonts, x0 + 0.5, y0 + 1.03, labels[i], 6.5, ha="center", va="bottom",
                  color=color if mark else "#343a40")  # fmt: skip
    if not one_d:
        bottom_y = -(nrows - 1) * (1 + gy)
        # imshow's pixels, scaled in numpy (matplotlib's own resampling where FAST_IMAGE is not)
        image = (ScaledImage if FAST_IMAGE else AxesImage)(ax, origin="lower", interpolation="nearest")
        image.set_data(mosaic)
        image.set_extent((0, width, bottom_y, bottom_y + nrows * (1 + gy)))
        ax.add_image(image)
    gate_color = "#d6336c"
    if grey_fills:
        ax.add_collection(
            PolyCollection(grey_fills, facecolors="#ced4da", edgecolors="none", alpha=0.9, zorder=1.5),
            autolim=False,
        )
    if fills:
        ax.add_collection(
            PolyCollection(fills, facecolors="#5c7cfa", edgecolors="none", alpha=0.75, zorder=2),
            autolim=False,
        )
    if shades:
        ax.add_collection(
            PolyCollection(shades, facecolors=gate_color, edgecolors="none", alpha=0.10, zorder=3),
            autolim=False,
        )
    if solid:
        ax.add_collection(LineCollection(solid, colors=gate_color, linewidths=1.1, zorder=4), autolim=False)
    if dashed:
        ax.add_collection(
            LineCollection(dashed, colors=gate_color, linewidths=1.1, linestyles="--", zorder=4),
            autolim=False,
        )
    ax.add_collection(LineCollection([f[0] for f in frames], colors=[f[1] for f in frames],
                                     linewidths=[f[2] for f in frames], zorder=5), autolim=False)  # fmt: skip
    # tick values of the shared axes on the bottom-left panel, axis names once
    r_last = (n - 1) // ncols
    bx, by = 0.0, -r_last * (1 + gy)
    ticks += _panel_ticks(
        ax, fonts, bx, by, None if own_x else shared_x, None if one_d or own_y else shared_y
    )
    # the tick marks as one collection (a Line2D each cost ~0.3 ms): as Line2D draws them
    ax.add_collection(LineCollection(ticks, colors="#495057", linewidths=0.6, capstyle="projecting",
                                     zorder=2), autolim=False)  # fmt: skip
    ax.text(bx + 0.5, by - (0.28 if own_x else 0.2), rows[0]["x"], ha="center", va="top", fontsize=7.5)
    if not one_d:
        ax.text(bx - 0.34, by + 0.5, rows[0]["y"], ha="center", va="center", rotation=90, fontsize=7.5)
    return fig


def _add_text(
    ax: Axes, fonts: dict[float, Any], x: float, y: float, text: str, size: float, **props: Any
) -> None:
    """``ax.text(x, y, text, fontsize=size, **props)``, ~4x cheaper: the font properties made once
    per size (``fonts``, one figure's), no clip path (an ``Axes.text`` is not clipped anyway)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.text import Text

    if size not in fonts:
        fonts[size] = FontProperties(size=size)
    text_ = Text(x, y, text, fontproperties=fonts[size], clip_on=False, **props)
    # Axes._add_text: Axes.text's own (private) call; add_artist (public) where it is gone
    getattr(ax, "_add_text", ax.add_artist)(text_)


def _panel_ticks(ax: Axes, fonts: dict[float, Any], x0: float, y0: float, xlim: tuple[float, float] | None,
                 ylim: tuple[float, float] | None, nbins: int = 4) -> list[np.ndarray]:  # fmt: skip
    """Tick values of the panel at (x0, y0) (a unit square) for the axes given (``None``: none);
    returns the tick marks (segments)."""
    from matplotlib.ticker import MaxNLocator

    marks: list[np.ndarray] = []
    for lim, horizontal in ((xlim, True), (ylim, False)):
        if lim is None:
            continue
        lo, hi = lim
        for t in MaxNLocator(nbins).tick_values(lo, hi):
            if lo <= t <= hi:
                w = (t - lo) / (hi - lo)
                if horizontal:
                    marks.append(np.array([[x0 + w, y0], [x0 + w, y0 - 0.04]]))
                    _add_text(ax, fonts, x0 + w, y0 - 0.06, f"{t:g}", 6, ha="center", va="top")
                else:
                    marks.append(np.array([[x0, y0 + w], [x0 - 0.04, y0 + w]]))
                    _add_text(ax, fonts, x0 - 0.06, y0 + w, f"{t:g}", 6, ha="right", va="center")
    return marks


def _clip_polyline(points: np.ndarray) -> list[np.ndarray]:
    """Pieces of a polyline (panel units) inside the unit square (Liang-Barsky per segment;
    consecutive kept segments stay one piece, so dashes run on)."""
    pieces: list[list[np.ndarray]] = []
    current: list[np.ndarray] = []
    for a, b in zip(points[:-1], points[1:]):
        d = b - a
        t0, t1, ok = 0.0, 1.0, True
        for axis in (0, 1):
            for bound, sign in ((0.0, -1.0), (1.0, 1.0)):
                p, q = sign * d[axis], sign * (bound - a[axis])
                if p == 0:
                    ok &= q >= 0
                elif p < 0:
                    t0 = max(t0, q / p)
                else:
                    t1 = min(t1, q / p)
        if not ok or t0 > t1:
            if current:
                pieces.append(current)
                current = []
            continue
        start, end = a + t0 * d, a + t1 * d
        if not current:
            current = [start]
        elif t0 > 0:  # re-entered the square: a new piece
            pieces.append(current)
            current = [start]
        current.append(end)
        if t1 < 1:
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    return [np.asarray(p) for p in pieces if len(p) >= 2]


def shape_lines(
    shape: Mapping[str, Any], xlim, ylim, one_d: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A gate shape (gate-review JSON) as polylines and filled polygons in the unit square of a
    panel whose axes span ``xlim`` x ``ylim`` (for 1-D panels y is 0-1)."""
    sx, sy = 1.0 / (xlim[1] - xlim[0]), 1.0 / (ylim[1] - ylim[0])
    big = 1e3

    def unit_x(v):
        return (np.clip(v, xlim[0] - big / sx, xlim[1] + big / sx) - xlim[0]) * sx

    def unit_y(v):
        return (np.clip(v, ylim[0] - big / sy, ylim[1] + big / sy) - ylim[0]) * sy

    lines: list[np.ndarray] = []
    fills: list[np.ndarray] = []
    kind = shape["kind"]
    if kind == "range" or (one_d and kind == "rect"):
        lo, hi = shape["x"]
        a = 0.0 if lo is None else float(np.clip(unit_x(lo), 0, 1))
        b = 1.0 if hi is None else float(np.clip(unit_x(hi), 0, 1))
        if b > a:
            fills.append(np.array([[a, 0], [b, 0], [b, 1], [a, 1]]))
        for t in (lo, hi):
            if t is not None:
                lines += _clip_polyline(np.array([[unit_x(t), 0.0], [unit_x(t), 1.0]]))
    elif kind == "rect":
        (x0, x1), (y0, y1) = shape["x"], shape["y"]
        ux0 = -big if x0 is None else unit_x(x0)
        ux1 = big if x1 is None else unit_x(x1)
        uy0 = -big if y0 is None else unit_y(y0)
        uy1 = big if y1 is None else unit_y(y1)
        edges = []  # only the finite edges: a quadrant is drawn as its two threshold lines
        if x0 is not None:
            edges.append([[ux0, uy0], [ux0, uy1]])
        if x1 is not None:
            edges.append([[ux1, uy0], [ux1, uy1]])
        if y0 is not None:
            edges.append([[ux0, uy0], [ux1, uy0]])
        if y1 is not None:
            edges.append([[ux0, uy1], [ux1, uy1]])
        for e in edges:
            lines += _clip_polyline(np.asarray(e, dtype=float))
    elif kind == "polygon" and ("line" in shape or shape.get("half_plane")):
        # a half-plane (diagonal gate): its boundary (gate_review's grid always reaches it, even
        # for a tiny sample whose few events lie far from a pooled diagonal)
        v = np.asarray(shape.get("line") or [], dtype=float).reshape(-1, 2)
        if len(v) == 2:
            lines += _clip_polyline(np.column_stack([unit_x(v[:, 0]), unit_y(v[:, 1])]))
    elif kind == "polygon":
        v = np.asarray(shape["vertices"], dtype=float).reshape(-1, 2)
        if len(v) >= 2:
            v = _clip_vertices(v, xlim, ylim)
            u = np.column_stack([unit_x(v[:, 0]), unit_y(v[:, 1])])
            lines += _clip_polyline(np.vstack([u, u[:1]]))
    elif kind == "ellipse":
        cov = np.asarray(shape["covariance"], dtype=float)
        vals, vecs = np.linalg.eigh(cov)
        radii = np.sqrt(np.clip(vals, 0, None) * shape["distance_square"])
        t = np.linspace(0, 2 * np.pi, 73)
        circle = np.column_stack([np.cos(t), np.sin(t)]) * radii
        pts = circle @ vecs.T + np.asarray(shape["center"], dtype=float)
        lines += _clip_polyline(np.column_stack([unit_x(pts[:, 0]), unit_y(pts[:, 1])]))
    return lines, fills


# ------------------------------------------------------------------------------------------------
# dynamics
# ------------------------------------------------------------------------------------------------
def _dodge(arms: Sequence[str], visits: Sequence[int]) -> dict[str, float]:
    """x offset of each arm at a visit: the arms side by side over 60% of the narrowest gap
    between visits, so their means and intervals never sit on top of each other."""
    v = sorted(set(visits))
    gap = float(min(np.diff(v))) if len(v) > 1 else 1.0
    step = 0.6 * gap / max(len(arms), 1)
    mid = (len(arms) - 1) / 2
    return {a: (i - mid) * step for i, a in enumerate(arms)}


def _visit_axis(ax: Axes, visits: Sequence[int], bottom: bool) -> None:
    """Visits as x ticks; their labels and the axis name only on the lowest panel of a column
    (every panel of a grid shares the visits)."""
    ax.set_xticks(visits)
    if bottom:
        ax.set_xlabel("week")
    else:
        ax.tick_params(labelbottom=False)


def _set_xlim(ax: Axes, visits: Sequence[int], dodge: Mapping[str, float]) -> None:
    reach = max((abs(v) for v in dodge.values()), default=0.0)
    room = max(0.04 * _span(visits), 1.5 * reach)
    ax.set_xlim(visits[0] - room, visits[-1] + room)


def _span(visits: Sequence[int]) -> float:
    return float(max(visits) - min(visits)) if len(visits) > 1 else 1.0


def _ci_bars(mean, low, high, n, min_n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Error-bar lengths below/above the mean; no bar for arms with fewer than ``min_n``
    patients (a t interval on 2 patients spans the whole plot and says nothing)."""
    m = np.asarray(mean, dtype=float)
    lo = np.asarray(m - np.asarray(low, dtype=float))
    hi = np.asarray(np.asarray(high, dtype=float) - m)
    few = np.asarray(n, dtype=float) < min_n
    lo[few | ~np.isfinite(lo)] = 0.0
    hi[few | ~np.isfinite(hi)] = 0.0
    return lo, hi


def _set_ylim(
    ax: Axes,
    lows: Sequence[float],
    highs: Sequence[float],
    floor: float | None = None,
    ceiling: float | None = None,
) -> None:
    """Data-driven y range with a little room; never below ``floor`` or above ``ceiling`` (a
    percentage axis stays within 0-100). NaN values (a population not measured in some samples,
    an arm with no value at a visit) are left out; with none finite the range stays matplotlib's."""
    lows_ = np.asarray(lows, dtype=float)
    highs_ = np.asarray(highs, dtype=float)
    lows_, highs_ = lows_[np.isfinite(lows_)], highs_[np.isfinite(highs_)]
    if not (lows_.size and highs_.size):
        return
    lo, hi = float(lows_.min()), float(highs_.max())
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
    lo, hi = lo - pad, hi + pad
    if floor is not None:
        lo = max(lo, floor)
    if ceiling is not None:
        hi = min(hi, ceiling)
    ax.set_ylim(lo, hi)


def _patient_lines(d: pd.DataFrame, dodge: float) -> list[np.ndarray]:
    """Each patient's (visit + dodge, % of parent) points, from rows sorted by patient and visit:
    cut where the patient changes (a groupby made a frame per patient: ~5 s for 1,167 patients)."""
    d = d[d["patient_id"].notna()]
    if d.empty:
        return []
    xy = np.column_stack([d["visit"].to_numpy(float) + dodge, d["pct_parent"].to_numpy(float)])
    pid = d["patient_id"].to_numpy()
    return np.split(xy, np.flatnonzero(pid[1:] != pid[:-1]) + 1)


def dynamics_figure(
    per_sample: pd.DataFrame,
    summary: pd.DataFrame,
    populations: Sequence[str],
    arms: Sequence[str],
    colors: Mapping[str, str],
    *,
    show_sample_ci: bool,
    ncols: int = 4,
) -> Figure:
    """Each population over visits: patients' thin lines by arm, the arm means with 95% CI; with
    ``show_sample_ci`` each sample's Wilson interval (from its event counts) as a thin bar."""
    from matplotlib.collections import LineCollection

    fig, axes, nrows, ncols = _panel_grid(len(populations), ncols)
    visits = sorted(int(v) for v in per_sample["visit"].dropna().unique())
    dodge = _dodge(arms, visits)
    n_patients = per_sample["patient_id"].nunique()
    alpha = float(np.clip(6 / max(n_patients, 1) ** 0.5, 0.12, 0.5))
    by_pop = dict(tuple(per_sample.groupby("population", sort=False)))
    sum_pop = dict(tuple(summary.groupby("population", sort=False)))
    for i, ax in enumerate(axes):
        pop = populations[i]
        d = by_pop.get(pop)
        if d is None:
            ax.set_visible(False)
            continue
        lows, highs = [d["pct_parent"].min()], [d["pct_parent"].max()]
        d = d.sort_values(["patient_id", "visit"])
        for arm in arms:
            da = d[d["arm"] == arm]
            if da.empty:
                continue
            segs = _patient_lines(da, dodge[arm])
            ax.add_collection(LineCollection(segs, colors=colors[arm], linewidths=0.6, alpha=alpha))
            if show_sample_ci and {"pct_ci_low", "pct_ci_high"} <= set(da.columns):
                x = da["visit"].to_numpy(float) + dodge[arm]
                bars = [[(xx, lo), (xx, hi)] for xx, lo, hi in zip(x, da["pct_ci_low"], da["pct_ci_high"])]
                ax.add_collection(
                    LineCollection(bars, colors=colors[arm], linewidths=0.6, alpha=min(1, 2 * alpha))
                )
        s = sum_pop.get(pop)
        if s is not None:
            for arm in arms:
                sa = s[s["arm"] == arm].sort_values("visit")
                if sa.empty:
                    continue
                x = sa["visit"].to_numpy(float) + dodge[arm]
                lo, hi = _ci_bars(sa["mean"], sa["ci_low"], sa["ci_high"], sa["n"])
                ax.errorbar(x, sa["mean"], yerr=np.vstack([lo, hi]),
                            color=colors[arm], lw=2, marker="o", ms=3.5, capsize=2, elinewidth=1.1, zorder=3)  # fmt: skip
                lows.extend(sa["mean"].to_numpy(float) - lo)  # NaN means: left out by _set_ylim
                highs.extend(sa["mean"].to_numpy(float) + hi)
        parent = d["parent"].iloc[0] if "parent" in d.columns else ""
        ax.set_title(f"{pop} · % of {parent if parent and parent != 'root' else 'all events'}")
        _visit_axis(ax, visits, bottom=i >= len(populations) - ncols)
        _set_ylim(ax, lows, highs, floor=0.0, ceiling=100.0)
        _set_xlim(ax, visits, dodge)
        ax.grid(alpha=0.2)
    _arm_legend(fig, colors, arms)
    return fig


def change_figure(
    summary: pd.DataFrame,
    populations: Sequence[str],
    arms: Sequence[str],
    colors: Mapping[str, str],
    baseline_visit: int,
    ncols: int = 4,
) -> Figure:
    """Mean change from baseline (percentage points) per arm and visit, with 95% CI."""
    fig, axes, nrows, ncols = _panel_grid(len(populations), ncols)
    visits = sorted(int(v) for v in summary["visit"].dropna().unique())
    dodge = _dodge(arms, visits)
    by_pop = dict(tuple(summary.groupby("population", sort=False)))
    for i, ax in enumerate(axes):
        if populations[i] not in by_pop:
            ax.set_visible(False)
            continue
        s = by_pop[populations[i]]
        ax.axhline(0, color="#adb5bd", lw=0.8)
        lows, highs = [0.0], [0.0]
        for arm in arms:
            sa = s[s["arm"] == arm].sort_values("visit")
            if sa.empty:
                continue
            x = sa["visit"].to_numpy(float) + dodge[arm]
            m = sa["mean_change"].to_numpy(float)
            lo, hi = _ci_bars(sa["mean_change"], sa["change_ci_low"], sa["change_ci_high"], sa["n"])
            ax.errorbar(x, m, yerr=np.vstack([lo, hi]), color=colors[arm], lw=1.8, marker="o", ms=3.5,
                        capsize=2, elinewidth=1.0)  # fmt: skip
            lows.extend(m - lo)  # NaN changes: left out by _set_ylim
            highs.extend(m + hi)
        ax.set_title(populations[i])
        if i % ncols == 0:
            ax.set_ylabel(f"change from wk {baseline_visit} (pp)")
        _visit_axis(ax, visits, bottom=i >= len(populations) - ncols)
        _set_ylim(ax, lows, highs)
        _set_xlim(ax, visits, dodge)
        ax.grid(alpha=0.2)
    _arm_legend(fig, colors, arms)
    return fig


# ------------------------------------------------------------------------------------------------
# clinical endpoints
# ------------------------------------------------------------------------------------------------
def rates_figure(
    rates: Mapping[str, pd.DataFrame],
    titles: Mapping[str, str],
    arms: Sequence[str],
    colors: Mapping[str, str],
) -> Figure:
    """Response rate (%) per arm over visits with Wilson 95% CI, one panel per endpoint."""
    names = list(rates)
    fig = new_figure(0.8 + 3.4 * len(names), 2.9)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        r = rates[name]
        visits = sorted(int(v) for v in r["visit"].unique())
        dodge = _dodge(arms, visits)
        for arm in arms:
            ra = r[r["arm"] == arm].sort_values("visit")
            if ra.empty:
                continue
            x = ra["visit"].to_numpy(float) + dodge[arm]
            y = 100 * ra["rate"].to_numpy(float)
            lo = np.nan_to_num(y - 100 * ra["ci_low"].to_numpy(float))
            hi = np.nan_to_num(100 * ra["ci_high"].to_numpy(float) - y)
            ax.errorbar(x, y, yerr=np.vstack([lo, hi]), color=colors[arm], lw=1.8, marker="o", ms=4,
                        capsize=2, elinewidth=1.0)  # fmt: skip
        ax.set_title(titles.get(name, name))
        ax.set_ylim(-3, 103)
        ax.set_ylabel("responders (%)")
        ax.set_xlabel("week")
        ax.set_xticks(visits)
        ax.grid(alpha=0.2)
    _arm_legend(fig, colors, arms)
    return fig


# ------------------------------------------------------------------------------------------------
# correlations
# ------------------------------------------------------------------------------------------------
def format_q(q: float) -> str:
    """A q- (or p-) value as the report prints it: ``< 0.001``, else 2 significant digits."""
    if not np.isfinite(q):
        return "–"
    if q < 0.001:
        return "< 0.001"
    return f"{q:.2g}"


def _eq(text: str) -> str:
    return text if text.startswith("<") else f"= {text}"


def format_estimate(v: float) -> str:
    """A signed effect for a heatmap cell: 2 significant digits, never an exponent (a numerically
    zero estimate prints as 0)."""
    if not np.isfinite(v):
        return ""
    if abs(v) < 0.005:
        return "0"
    if abs(v) >= 100:
        return f"{v:+.0f}"
    return f"{v:+.2g}" if abs(v) < 1 else f"{v:+.1f}"


def correlation_heatmap(corr: pd.DataFrame, populations: Sequence[str]) -> Figure:
    """Spearman rho of each subset's change (rows) with each clinical change at each visit
    (columns), annotated with BH q-values; q < 0.05 is outlined."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    items = list(dict.fromkeys(corr["endpoint"]))
    visits = sorted(int(v) for v in corr["visit"].dropna().unique())
    cols = [(it, v) for it in items for v in visits]
    rows = [p for p in populations if p in set(corr["population"])]
    rho = np.full((len(rows), len(cols)), np.nan)
    qv = np.full_like(rho, np.nan)
    index = {(r.population, r.endpoint, int(r.visit)): (r.estimate, r.q) for r in corr.itertuples()}
    for i, p in enumerate(rows):
        for j, (it, v) in enumerate(cols):
            est, q = index.get((p, it, v), (np.nan, np.nan))
            rho[i, j], qv[i, j] = est, q
    fig = new_figure(2.2 + 0.5 * len(cols), 1.3 + 0.28 * len(rows))
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="#f1f3f5")
    im = ax.imshow(np.ma.masked_invalid(rho), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(rho[i, j]):
                ax.text(j, i, format_q(qv[i, j]).replace("< ", "<"), ha="center", va="center", fontsize=5.5,
                        color="white" if abs(rho[i, j]) > 0.6 else "#212529")  # fmt: skip
                if np.isfinite(qv[i, j]) and qv[i, j] < 0.05:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.3))
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), [f"{CLINICAL_LABELS.get(it, it)} wk {v}" for it, v in cols], rotation=60,
                  ha="right")  # fmt: skip
    for j in range(1, len(items)):
        ax.axvline(j * len(visits) - 0.5, color="white", lw=2)
    ax.spines[:].set_visible(False)
    cb = fig.colorbar(im, ax=ax, shrink=0.6, pad=0.01)
    cb.set_label("Spearman ρ (change vs change)")
    return fig


def correlation_scatter(
    pairs: Sequence[Mapping[str, Any]], arms: Sequence[str], colors: Mapping[str, str]
) -> Figure:
    """Scatter plots of the strongest pairs: each patient's subset change (x) and clinical change (y)."""
    fig = new_figure(0.6 + 2.7 * len(pairs), 2.8)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        d = pair["data"]
        for arm in arms:
            da = d[d["arm"] == arm]
            if len(da):
                ax.scatter(da["x"], da["y"], s=14, color=colors[arm], edgecolor="white", lw=0.3)
        ax.axhline(0, color="#ced4da", lw=0.7)
        ax.axvline(0, color="#ced4da", lw=0.7)
        ax.set_title(
            f"{pair['population']} · wk {pair['visit']}\nρ = {pair['rho']:.2f}, q {_eq(format_q(pair['q']))}"
        )
        ax.set_xlabel(f"Δ {pair['population']} (pp)")
        ax.set_ylabel(CLINICAL_LABELS.get(pair["endpoint"], pair["endpoint"]))
        ax.grid(alpha=0.2)
    _arm_legend(fig, colors, arms)
    return fig


# ------------------------------------------------------------------------------------------------
# model tables
# ------------------------------------------------------------------------------------------------
def effect_map(mixed: pd.DataFrame, populations: Sequence[str], arms: Sequence[str]) -> Figure:
    """Mixed-model arm x visit effects: colour = Wald z (estimate / SE), text = estimate (pp);
    * marks q < 0.05."""
    from matplotlib import colormaps

    m = mixed.copy()
    m["arm"] = m["comparison"].astype(str).str.split(" vs ").str[0]
    visits = sorted(int(v) for v in m["visit"].dropna().unique())
    arm_list = [a for a in arms if a in set(m["arm"])] + sorted(set(m["arm"]) - set(arms))
    cols = [(a, v) for a in arm_list for v in visits]
    rows = [p for p in populations if p in set(m["population"])]
    z = np.full((len(rows), len(cols)), np.nan)
    est = np.full_like(z, np.nan)
    q = np.full_like(z, np.nan)
    index = {(r.population, r.arm, int(r.visit)): r for r in m.itertuples()}
    for i, p in enumerate(rows):
        for j, (a, v) in enumerate(cols):
            r = index.get((p, a, v))
            if r is not None:
                z[i, j], est[i, j], q[i, j] = r.statistic, r.estimate, r.q
    fig = new_figure(2.4 + 0.55 * len(cols), 1.3 + 0.28 * len(rows))
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="#f1f3f5")
    im = ax.imshow(np.ma.masked_invalid(np.clip(z, -6, 6)), cmap=cmap, vmin=-6, vmax=6, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(est[i, j]):
                star = "*" if np.isfinite(q[i, j]) and q[i, j] < 0.05 else ""
                ax.text(j, i, f"{format_estimate(est[i, j])}{star}", ha="center", va="center", fontsize=6,
                        color="white" if np.isfinite(z[i, j]) and abs(z[i, j]) > 4 else "#212529")  # fmt: skip
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), [f"{a} · wk {v}" for a, v in cols], rotation=60, ha="right")
    for j in range(1, len(arm_list)):
        ax.axvline(j * len(visits) - 0.5, color="white", lw=2)
    ax.spines[:].set_visible(False)
    cb = fig.colorbar(im, ax=ax, shrink=0.6, pad=0.01)
    cb.set_label("Wald z of the arm × visit effect")
    return fig


# ------------------------------------------------------------------------------------------------
# clusters (optional section)
# ------------------------------------------------------------------------------------------------
def marker_heatmap(medians: pd.DataFrame, title: str) -> Figure:
    """Metacluster x marker heatmap (colour scaled 0-1 per marker, text = median); a marker with no
    median at all (measured in no file) is left out."""
    medians = medians.loc[:, medians.notna().any()]
    v = medians.to_numpy(dtype=float)
    lo, hi = np.nanmin(v, axis=0), np.nanmax(v, axis=0)
    scaled = (v - lo) / np.where(hi > lo, hi - lo, 1.0)
    fig = new_figure(1.6 + 0.55 * v.shape[1], 1.2 + 0.3 * v.shape[0])
    ax = fig.add_subplot()
    ax.imshow(scaled, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if v.size <= 600:
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                if np.isfinite(v[i, j]):
                    ax.text(j, i, f"{v[i, j]:.3g}", ha="center", va="center", fontsize=5.5,
                            color="white" if scaled[i, j] < 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(v.shape[1]), list(medians.columns), rotation=60, ha="right")
    ax.set_yticks(range(v.shape[0]), [str(i) for i in medians.index])
    ax.set_title(title)
    ax.spines[:].set_visible(False)
    return fig
