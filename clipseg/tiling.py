"""Tiled inference for images much larger than the model's input: overlapping windows, each predicted at the
model's resolution, blended without seams into one probability map per prompt at the source resolution, optionally
mixed with a whole-image pass for context. `should_tile` tells callers when to suggest it.

The model is a callable, so the Predictor, the ONNX backend and test fakes all fit:

    predict_window(crop)  # crop: (h, w, 3) uint8 -> (K, h, w) float32 probabilities at the crop's size

for example `lambda crop: (predictor.set_image(crop), predictor.predict(phrases))[1]`: one image encoding per
window serves all K phrases. The CLIPSeg paper notes that ViT-B/16's quality drops for images larger than about
350 px; a window the size of the model's input (`tile` = its side) shows objects at their full resolution.

Windows: `tile` x `tile` source pixels (the image's side where it is smaller), stepped by `tile - overlap`, the last
one flush with the far border, so every pixel is covered. Blending: each window's weight is the outer product of two
1-D profiles that rise linearly, (i + 0.5) / overlap, over the `overlap` pixels of each side shared with a
neighbour (sides on the image border stay at 1) and are 1 elsewhere; the weights are divided by their sum, so they
sum to exactly 1 at every pixel. A window's influence thus fades to zero at its inner edges: no seams, and a model
whose output does not depend on the window gives exactly the single-pass map. With `context` c > 0 the result is
(1 - c) * tiled + c * the whole image's prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

WindowPredictor = Callable[[np.ndarray], np.ndarray]
TILE_FACTOR = 2.0  # tiling is advisable when the model would see the image shrunk by this factor or more
DEFAULT_OVERLAP = 0.25  # of the tile side, the callers' default
# The most windows one image is tiled into: the largest image read (134 Mpx) as a square in windows of 352 px takes
# 1,936; a 130,000,000 x 1 px image (a 126 kB PNG) would take 492,424, hours of a server's only worker.
MAX_WINDOWS = 4096


class TooManyWindows(ValueError):
    """An image that would be tiled into more than MAX_WINDOWS windows; the message says how many and what to do."""


@dataclass(frozen=True)
class Window:
    """A crop of the image: rows top..bottom-1, columns left..right-1."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.bottom), slice(self.left, self.right)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), PIL's crop box."""
        return self.left, self.top, self.right, self.bottom


def should_tile(height: int, width: int, model_side: int, factor: float = TILE_FACTOR) -> bool:
    """True when a (height, width) image is at least `factor` times the model's input side `model_side` on its
    short side: kept at its aspect, the model would see it shrunk `factor` times or more, small objects with it."""
    return min(height, width) >= factor * model_side


def default_overlap(tile: int) -> int:
    """The overlap the callers use by default: DEFAULT_OVERLAP of the tile side, in pixels."""
    return int(tile * DEFAULT_OVERLAP)


def window_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of `tile` pixels along a side of `length`: every `tile - overlap` pixels, the last
    flush with the end. One window when the side fits."""
    check_tiling(tile, overlap)
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """The windows covering a (height, width) image, row by row."""
    return [
        Window(top, left, min(top + tile, height), min(left + tile, width))
        for top in window_starts(height, tile, overlap)
        for left in window_starts(width, tile, overlap)
    ]


def window_weights(windows: list[Window], height: int, width: int, overlap: int) -> list[np.ndarray]:
    """One (h, w) float32 weight map per window (module docstring), normalised so that they sum to 1 at every
    pixel of the (height, width) image."""
    raw = [
        np.outer(_profile(w.top, w.bottom, height, overlap), _profile(w.left, w.right, width, overlap)) for w in windows
    ]
    total = np.zeros((height, width), dtype=np.float64)
    for window, weight in zip(windows, raw):
        total[window.slices] += weight
    return [(weight / total[window.slices]).astype(np.float32) for window, weight in zip(windows, raw)]


def _profile(start: int, stop: int, length: int, overlap: int) -> np.ndarray:
    """1 along a window's side, rising as (i + 0.5) / overlap over `overlap` pixels at each end inside the image."""
    size = stop - start
    profile = np.ones(size, dtype=np.float64)
    if overlap == 0:
        return profile
    ramp = (np.arange(size) + 0.5) / overlap
    if start > 0:
        profile = np.minimum(profile, ramp)
    if stop < length:
        profile = np.minimum(profile, ramp[::-1])
    return profile


def tiled_probabilities(
    image: Image.Image | np.ndarray,
    predict_window: WindowPredictor,
    tile: int,
    overlap: int,
    context: float = 0.0,
) -> np.ndarray:
    """(K, H, W) float32 probabilities for an RGB image (PIL or (H, W, 3) uint8), blended from the windows'
    predictions (module docstring); `context` in [0, 1): the weight of a whole-image pass. `predict_window` is called
    once per window (row by row), then once on the whole image when context > 0. Raises ValueError when it returns
    maps of the wrong shape, a varying number of prompts or values outside [0, 1]; TooManyWindows (before any
    window is predicted) when the image would take more than MAX_WINDOWS."""
    check_tiling(tile, overlap)
    if not 0 <= context < 1:
        raise ValueError(f"context must be in [0, 1), got {context!r}")
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    count = len(window_starts(height, tile, overlap)) * len(window_starts(width, tile, overlap))
    if count > MAX_WINDOWS:
        raise TooManyWindows(
            f"tiling this {width} x {height} image in windows of {tile} px takes {count:,} windows (at most "
            f"{MAX_WINDOWS:,}): use larger tiles, or crop or resize the image"
        )
    windows = tile_windows(height, width, tile, overlap)
    blended = None
    for window, weight in zip(windows, window_weights(windows, height, width, overlap)):
        probs = _checked(predict_window(pixels[window.slices]), window, blended)
        if blended is None:
            blended = np.zeros((probs.shape[0], height, width), dtype=np.float32)
        blended[(slice(None), *window.slices)] += weight * probs
    if context > 0:
        whole = _checked(predict_window(pixels), Window(0, 0, height, width), blended)
        blended = (1 - context) * blended + context * whole
    return np.clip(blended, 0.0, 1.0, out=blended)  # rounding may leave a sum of weights a hair above 1


def _checked(probs: np.ndarray, window: Window, blended: np.ndarray | None) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float32)
    size = (window.bottom - window.top, window.right - window.left)
    if probs.ndim != 3 or probs.shape[1:] != size:
        raise ValueError(f"window {window.box}: expected (K, {size[0]}, {size[1]}) maps, got shape {probs.shape}")
    if blended is not None and probs.shape[0] != blended.shape[0]:
        raise ValueError(f"window {window.box}: {probs.shape[0]} maps, the first window gave {blended.shape[0]}")
    if not np.all((probs >= 0) & (probs <= 1)):
        raise ValueError(f"window {window.box}: the maps hold values outside [0, 1] (or NaN)")
    return probs


def check_tiling(tile: int, overlap: int) -> None:
    """ValueError unless tile >= 1 and 0 <= overlap < tile (whole pixels)."""
    if type(tile) is not int or tile < 1:
        raise ValueError(f"the tile side must be a whole number of pixels >= 1, got {tile!r}")
    if type(overlap) is not int or not 0 <= overlap < tile:
        raise ValueError(f"the overlap must be a whole number of pixels in [0, {tile}), got {overlap!r}")
