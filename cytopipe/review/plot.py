"""A gate drawn over its parent's density as inline SVG, from a gate-review row (no events).

The density is the row's histogram (48 x 48 cells in 2-D, 96 bars in 1-D) on a log colour
scale, over the parent's full events in grey when the panel shows part of them (``background``); gate lines carry ``data-param`` (e.g. ``CD25 >=``) so the page's script can drag them.
Drawing costs the same for a 1,000- or 1,000,000-event parent: the histogram is all it reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from html import escape
from typing import Any

import numpy as np

WIDTH, HEIGHT = 380, 320
MARGIN = (12, 14, 40, 52)  # top, right, bottom, left
_RAMP = ("#f8f9fa", "#d0ebff", "#74c0fc", "#339af0", "#1971c2", "#5f3dc4", "#e64980", "#f59f00")


_RGB = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in _RAMP], dtype=np.uint8)


def _png(rgb: np.ndarray) -> str:
    """A tiny RGB or RGBA PNG (no filter, zlib level 1), base64: ~1 ms for a 48 x 48 grid."""
    import base64
    import zlib

    from cytopipe.pngchunks import SIGNATURE, ihdr, png_chunk

    h, w, channels = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * channels)], axis=1).tobytes()
    png = SIGNATURE + ihdr(w, h, 6 if channels == 4 else 2)
    png += png_chunk(b"IDAT", zlib.compress(raw, 1)) + png_chunk(b"IEND", b"")
    return base64.b64encode(png).decode("ascii")


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def panel_svg(row: Mapping[str, Any], width: int = WIDTH, height: int = HEIGHT) -> str:
    """SVG of one gate-review row: density, axes and the gate's shapes."""
    top, right, bottom, left = MARGIN
    pw, ph = width - left - right, height - top - bottom
    nx, ny = int(row["x_bins"]), int(row["y_bins"])
    xr = [float(v) for v in row["x_range"]] if len(row["x_range"]) else [0.0, 1.0]
    yr = [float(v) for v in row["y_range"]] if len(row["y_range"]) else [0.0, 1.0]
    counts = np.asarray(row["counts"], dtype=np.float64)
    background = _background(row, counts.size)

    def px(x: float) -> float:
        return left + (x - xr[0]) / (xr[1] - xr[0] or 1.0) * pw

    def py(y: float) -> float:
        return top + ph - (y - yr[0]) / (yr[1] - yr[0] or 1.0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="gate-plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" data-x0="{xr[0]}" data-x1="{xr[1]}" data-y0="{yr[0]}" data-y1="{yr[1]}" '
        f'data-left="{left}" data-top="{top}" data-pw="{pw}" data-ph="{ph}" role="img" '
        f'aria-label="{escape(str(row["population"]))} gate on {escape(str(row["x"]))}'
        f'{" x " + escape(str(row["y"])) if row["y"] else ""}">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#adb5bd"/>',
    ]
    if nx and ny and counts.size == nx * ny:  # the density as one small PNG image, scaled up crisp
        if background.size:  # the parent's other events in grey, behind the shown ones
            bg = background.reshape(ny, nx)[::-1]
            shade = np.log1p(bg) / (np.log1p(bg.max()) or 1.0)
            grey = (230 - 115 * shade).astype(np.uint8)
            rgba = np.stack([grey, grey, grey, np.where(bg > 0, 255, 0).astype(np.uint8)], axis=-1)
            out.append(
                f'<image x="{left}" y="{top}" width="{pw}" height="{ph}" preserveAspectRatio="none" '
                f'class="background" href="data:image/png;base64,{_png(rgba)}"/>'
            )
        grid = counts.reshape(ny, nx)[::-1]  # row 0 at the top
        levels = np.log1p(grid) / (np.log1p(grid.max()) or 1.0)
        rgb = _RGB[np.minimum((levels * (len(_RAMP) - 1) + 0.5).astype(int), len(_RAMP) - 1)]
        alpha = np.where(grid > 0, 255, 0 if background.size else 255).astype(np.uint8)
        rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
        rgba[grid == 0, :3] = 255
        out.append(
            f'<image x="{left}" y="{top}" width="{pw}" height="{ph}" preserveAspectRatio="none" '
            f'class="density" href="data:image/png;base64,{_png(rgba)}"/>'
        )
    elif nx and counts.size == nx:
        peak = max(counts.max(), background.max() if background.size else 0.0) or 1.0
        cw = pw / nx
        for values, fill, cls in ((background, "#ced4da", "background"), (counts, "#74c0fc", "density")):
            for i in np.nonzero(values)[0]:
                h = values[i] / peak * ph
                out.append(
                    f'<rect class="{cls}" x="{_fmt(left + i * cw)}" y="{_fmt(top + ph - h)}" '
                    f'width="{_fmt(cw + 0.3)}" height="{_fmt(h)}" fill="{fill}"/>'
                )
    shapes = json.loads(row["shapes"]) if isinstance(row["shapes"], str) else list(row["shapes"] or [])
    # polygons and ellipses are clipped to the plot's frame: an overridden diagonal (Treg's CD25 x
    # CD127) is a polygon reaching far past the events' grid, and its line was drawn over the axes.
    # The id is the panel's own (several panels on one page); the page's script redraws a dragged
    # polygon inside the same group, so it stays clipped too.
    key = f"{row.get('sample_id', '')}|{row.get('population', '')}|{row.get('panel', '')}"
    clip = "frame-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
    gates: list[str] = []  # drawn inside the clipped group
    for shape in shapes:
        dash = ' stroke-dasharray="5 3"' if shape.get("negate") else ""
        kind = shape.get("kind")
        if kind in ("rect", "range"):
            x = shape.get("x") or [None, None]
            y = shape.get("y") or [None, None]
            for v, op in zip(x, (">=", "<")):
                if v is not None:
                    out.append(_line(px(v), top, px(v), top + ph, f"{row['x']} {op}", "x", v, dash))
            if kind == "rect":
                for v, op in zip(y, (">=", "<")):
                    if v is not None:
                        out.append(_line(left, py(v), left + pw, py(v), f"{row['y']} {op}", "y", v, dash))
        elif kind == "polygon":
            pts = np.clip(np.asarray(shape["vertices"], dtype=float), -1e6, 1e6)
            text = " ".join(f"{_fmt(px(a))},{_fmt(py(b))}" for a, b in pts)
            gates.append(
                f'<polygon class="gate" points="{text}" fill="none" stroke="#c92a2a" stroke-width="2"{dash}/>'
            )
        elif kind == "ellipse":
            c = np.asarray(shape["center"], dtype=float)
            cov = np.asarray(shape["covariance"], dtype=float) * float(shape.get("distance_square", 1.0))
            w, v = np.linalg.eigh(cov)
            t = np.linspace(0, 2 * np.pi, 60)
            pts = c[:, None] + v @ (np.sqrt(np.maximum(w, 0))[:, None] * np.vstack([np.cos(t), np.sin(t)]))
            text = " ".join(f"{_fmt(px(a))},{_fmt(py(b))}" for a, b in pts.T)
            gates.append(
                f'<polygon class="gate" points="{text}" fill="none" stroke="#c92a2a" stroke-width="2"{dash}/>'
            )
    if gates:
        out.append(
            f'<clipPath id="{clip}"><rect x="{left}" y="{top}" width="{pw}" height="{ph}"/></clipPath>'
        )
        out.append(f'<g class="gates" clip-path="url(#{clip})">' + "".join(gates) + "</g>")
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle" font-size="12">'
        f"{escape(str(row['x']))} ({escape(str(row['x_scale']))})</text>"
    )
    if row["y"]:
        out.append(
            f'<text x="14" y="{top + ph / 2}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 14 {top + ph / 2})">{escape(str(row["y"]))}</text>'
        )
    for v in (xr[0], xr[1]):
        out.append(
            f'<text x="{_fmt(px(v))}" y="{top + ph + 14}" text-anchor="middle" font-size="10">{v:.2g}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _background(row: Mapping[str, Any], size: int) -> np.ndarray:
    """The parent's full events per bin when the panel shows part of them (same grid), else empty."""
    values = row.get("background") if hasattr(row, "get") else None
    if values is None or isinstance(values, float) or len(values) != size:
        return np.empty(0)
    return np.asarray(values, dtype=np.float64)


def _line(x1: float, y1: float, x2: float, y2: float, param: str, axis: str, value: float, dash: str) -> str:
    return (
        f'<line class="thr" data-param="{escape(param)}" data-axis="{axis}" data-value="{value}" '
        f'x1="{_fmt(x1)}" y1="{_fmt(y1)}" x2="{_fmt(x2)}" y2="{_fmt(y2)}" stroke="#c92a2a" stroke-width="3"{dash}/>'
    )
