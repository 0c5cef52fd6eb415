"""Pictures of predictions: overlays with a legend and mask contours, probability PNGs, mask PNGs, heatmaps and
preview sizes. predict.py writes them to files (clipseg/prediction_outputs.py), the app shows them
(clipseg/segmenter.py); both draw them here, so a mask looks the same in either.

Shapes: a mask is an (H, W) bool array, a probability map an (H, W) float array in [0, 1]; sizes are (W, H) as PIL
gives them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from clipseg.outputs import printable

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (245, 130, 48), (70, 240, 240), (240, 50, 230), (210, 245, 60), (170, 110, 40),
)  # fmt: skip
OVERLAY_ALPHA = 0.5
DISPLAY_MAX_SIDE = 1024  # previews (overlay, heatmaps) are at most this large; downloads keep the original size


def text_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` pixels (the fixed bitmap font where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def mask_contour(mask: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: the pixels of `mask` within `width` pixels of its border (image edges are not borders)."""
    padded = np.pad(mask, 1, mode="edge")
    edge = mask & ~ndimage.binary_erosion(padded)[1:-1, 1:-1]
    return mask & ndimage.maximum_filter(edge, size=2 * width - 1) if width > 1 else edge


def draw_overlay(
    image: Image.Image, masks: Sequence[np.ndarray], labels: Sequence[str], first_colour: int = 0
) -> Image.Image:
    """The image with each (H, W) bool mask blended in its own colour (PALETTE order from `first_colour`), its
    contour drawn solid, and a legend of the labels."""
    colours = [PALETTE[(first_colour + i) % len(PALETTE)] for i in range(len(masks))]
    blended = np.asarray(image, dtype=np.float32).copy()
    for mask, colour in zip(masks, colours):
        blended[mask] = (1 - OVERLAY_ALPHA) * blended[mask] + OVERLAY_ALPHA * np.array(colour, dtype=np.float32)
    contour_width = max(2, min(image.size) // 150)
    for mask, colour in zip(masks, colours):
        blended[mask_contour(mask, contour_width)] = colour
    overlay = Image.fromarray(np.round(blended).astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    font = text_font(max(12, overlay.height // 30))
    line = max(12, overlay.height // 30) + 6
    for i, (label, colour) in enumerate(zip(labels, colours)):
        top = 4 + i * line
        text = printable(label, 60)
        try:
            right = draw.textbbox((line + 4, top), text, font=font)[2]
        except UnicodeEncodeError:  # the bitmap fallback font only knows Latin-1
            text = text.encode("ascii", "replace").decode()
            right = draw.textbbox((line + 4, top), text, font=font)[2]
        draw.rectangle((0, top - 2, right + 6, top + line - 2), fill=(0, 0, 0))
        draw.rectangle((4, top + 2, line - 2, top + line - 6), fill=colour)
        draw.text((line + 4, top), text, fill=(255, 255, 255), font=font)
    return overlay


def probability_png(probs: np.ndarray, bits: int) -> Image.Image:
    """(H, W) probabilities in [0, 1] -> 8-bit (0..255) or 16-bit (0..65535) grayscale image."""
    if bits == 16:
        return Image.fromarray(np.round(probs * 65535).astype(np.uint16))
    return Image.fromarray(np.round(probs * 255).astype(np.uint8))


def mask_image(mask: np.ndarray) -> Image.Image:
    """(H, W) bool -> 8-bit grayscale image, 0 outside the mask and 255 inside: the mask PNGs' format."""
    return Image.fromarray(mask.astype(np.uint8) * 255)


def mask_png(mask: np.ndarray) -> bytes:
    """(H, W) bool -> PNG bytes of `mask_image`, with fast compression (twice as fast as the default, on masks of
    a few blobs as small)."""
    buffer = io.BytesIO()
    mask_image(mask).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@cache
def _magma() -> np.ndarray:
    """(256, 3) uint8 colour table of matplotlib's magma map (imported on first use: predict.py does not need it)."""
    from matplotlib import colormaps

    return np.round(colormaps["magma"](np.arange(256))[:, :3] * 255).astype(np.uint8)


def heatmap(probs: np.ndarray) -> Image.Image:
    """(H, W) probabilities in [0, 1] -> RGB image in the magma colour map (black = 0, pale yellow = 1)."""
    return Image.fromarray(_magma()[np.round(np.clip(probs, 0, 1) * 255).astype(np.uint8)])


def display_size(width: int, height: int, limit: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(W, H) of a preview: the image's size scaled so that its long side is at most `limit`."""
    scale = min(1.0, limit / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))
