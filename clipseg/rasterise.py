"""Ground truth from polygons, by the rule of each source (docs/original.md §4 and §8):

- `polygon2mask` (skimage's, as the original CLIPSeg drew PhraseCut's targets): pixel (row r, col c) is set iff the
  point x = c, y = r lies in or on a polygon; used for training targets and the paper's metrics.
- `phrasecut` (PIL fill + outline with vertices truncated, as PhraseCut's official evaluation draws it): used for
  PhraseCut's own metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

RASTER_RULES = ("polygon2mask", "phrasecut")


_VERTEX_TOLERANCE = 1e-12  # skimage's point_in_polygon counts a point this close to a vertex as on it
MAX_COORDINATE = float(1 << 24)  # pixels: a vertex farther from the origin is corrupt data (no image is that large)


def rasterise(polygons: Sequence, height: int, width: int, rule: str = "polygon2mask") -> np.ndarray:
    """Union of polygons -> bool (H, W) mask. polygons: (N, 2) [x, y] point lists in original pixels.

    rule "polygon2mask" (the original CLIPSeg's, skimage `polygon2mask` with [x, y] swapped to (row, col)): pixel
    (r, c) is set iff the point x = c, y = r lies inside the polygon (even-odd rule), on an edge or on a vertex.
    rule "phrasecut" (PhraseCut's official evaluation): PIL polygon with fill and outline, vertices truncated to
    int; about 4% more pixels. Polygons with a coordinate that is not finite or beyond +-`MAX_COORDINATE` are
    skipped; "phrasecut" also skips those with fewer than 2 vertices (PIL cannot draw them). Parts outside the image
    are clipped."""
    if rule not in RASTER_RULES:
        raise ValueError(f"unknown rasterisation rule {rule!r}; choose one of {RASTER_RULES}")
    mask = np.zeros((height, width), dtype=bool)
    canvas = draw = None
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if not len(points) or not (np.abs(points) <= MAX_COORDINATE).all():  # NaN fails the test too
            continue
        if rule == "polygon2mask":
            _fill_polygon2mask(mask, points)
        elif len(points) >= 2:
            if draw is None:
                canvas = Image.new("L", (width, height), 0)
                draw = ImageDraw.Draw(canvas)
            draw.polygon(points.astype(np.int64).ravel().tolist(), fill=1, outline=1)
    return mask | np.asarray(canvas, dtype=bool) if canvas is not None else mask


def instances_to_mask(instances: Sequence[Sequence], height: int, width: int, rule: str = "polygon2mask") -> np.ndarray:
    """PhraseCut `Polygons` (instances -> polygons -> [x, y] points) -> bool (H, W) union of all of them."""
    return rasterise([polygon for instance in instances for polygon in instance], height, width, rule)


def _fill_polygon2mask(mask: np.ndarray, points: np.ndarray) -> None:
    """Set the pixels skimage's `polygon2mask` sets for one polygon ([x, y] points), scanline by scanline.

    skimage tests each pixel of the polygon's bounding box: a pixel on a vertex (within 1e-12) is in; otherwise it
    counts edge crossings of the horizontal ray to its right (edges with exactly one end strictly above the row)
    and to its left (exactly one end strictly below), and the pixel is in when either count is odd (odd: inside;
    different parity: on an edge). Along a row the crossing test of one edge changes once, at the edge's x on that
    row, so each (edge, row) pair needs skimage's own floating-point test only at the pixel nearest that x."""
    height, width = mask.shape
    xs, ys = points[:, 0], points[:, 1]
    top, bottom = int(max(0.0, ys.min())), min(height - 1, math.ceil(ys.max()))
    left, right = int(max(0.0, xs.min())), min(width - 1, math.ceil(xs.max()))
    if top > bottom or left > right:
        return
    n_rows, n_cols = bottom - top + 1, right - left + 1
    x0, y0 = xs, ys  # edge i runs from vertex i - 1 (x1, y1) to vertex i (x0, y0), as skimage walks it
    x1, y1 = np.roll(xs, 1), np.roll(ys, 1)
    inside = np.zeros((n_rows, n_cols), dtype=bool)
    for side in ("right", "left"):
        edges, rows = _edge_rows(np.minimum(y0, y1), np.maximum(y0, y1), top, bottom, side)
        if not len(edges):
            continue
        a, b, c, d = x0[edges], y0[edges], x1[edges], y1[edges]
        nearest = np.floor(a + (rows - b) * (c - a) / (d - b) + 0.5)  # the pixel nearest the crossing
        # skimage's test at that pixel, in its own operation order: (x0*y1 - x1*y0) / (y1 - y0), which is the
        # crossing's x minus the pixel's: pixels left of the crossing have it > 0, pixels right of it < 0
        xa, ya, xb, yb = a - nearest, b - rows, c - nearest, d - rows
        sign = (xa * yb - xb * ya) / (yb - ya)
        # the first pixel on the crossing's far side: the ray to the right crosses for pixels before it, the ray
        # to the left for pixels from it on
        first = nearest + (sign > 0) if side == "right" else nearest + (sign >= 0)
        column = np.clip(first - left, 0, n_cols).astype(np.int64)
        cell = (rows.astype(np.int64) - top) * (n_cols + 1) + column
        counts = np.bincount(cell, minlength=n_rows * (n_cols + 1)).reshape(n_rows, n_cols + 1)
        if side == "right":  # crossings whose first pixel lies beyond this one
            crossings = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
        else:  # crossings whose first pixel is this one or an earlier one
            crossings = np.cumsum(counts, axis=1)[:, :-1]
        inside |= crossings % 2 == 1
    mask[top : bottom + 1, left : right + 1] |= inside
    on_pixel = (np.abs(xs - np.round(xs)) < _VERTEX_TOLERANCE) & (np.abs(ys - np.round(ys)) < _VERTEX_TOLERANCE)
    for x, y in zip(np.round(xs[on_pixel]).astype(np.int64), np.round(ys[on_pixel]).astype(np.int64)):
        if top <= y <= bottom and left <= x <= right:
            mask[y, x] = True


def _edge_rows(low: np.ndarray, high: np.ndarray, top: int, bottom: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(edge index, row) pairs: rows r in [top, bottom] with low <= r < high (ray to the right: exactly one end
    above the row) or low < r <= high (ray to the left: exactly one end below)."""
    if side == "right":
        first, last = np.ceil(low), np.ceil(high) - 1
    else:
        first, last = np.floor(low) + 1, np.floor(high)
    first, last = np.maximum(first, top), np.minimum(last, bottom)
    counts = np.where(high > low, np.maximum(last - first + 1, 0), 0).astype(np.int64)
    edges = np.repeat(np.arange(len(low)), counts)
    starts = np.repeat(first, counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return edges, starts + offsets
