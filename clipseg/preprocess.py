"""From pixels and polygons to model inputs, and from logits back to pictures: one definition of each rule.

Each rule names its source (README, "Fidelity"); train, score, failure_test, predict and the app all come here.

- Image resize, rule `original` (the authors' data pipeline, SPEC 1b; default of training and scoring): the uint8
  image as float, `interpolate(bilinear, align_corners=True)`, no antialiasing; masks `interpolate(nearest)`
  (floor). Rule `pil` (the HF processor and the original Quickstart; default of predict.py and the app): PIL's
  antialiased bilinear resize; masks PIL nearest (pixel centres).
- Rule `linear` (the Pascal-5i and VOC zero-shot benchmarks, SPEC 9 and 11): bilinear with half-pixel centres and
  no antialiasing, as OpenCV's INTER_LINEAR and torchvision's tensor Resize (before 0.17) do; masks and label maps
  OpenCV's INTER_NEAREST (source floor(i / (h / H)) in double precision). `letterbox` is PFENet's test_Resize.
- Normalisation: x / 255, then (x - ImageNet mean) / ImageNet std, in float32 (every rule).
- Ground truth from polygons: `polygon2mask` (skimage, as the original CLIPSeg drew PhraseCut: pixel (row r,
  col c) is set iff the point x = c, y = r lies in or on a polygon) for the training target and the paper's
  metrics; `phrasecut` (PIL fill + outline, vertices truncated: PhraseCut's official evaluation) for its metrics.
- Training crop (the authors' `find_crop`): side min(H, W); the first of 50 random offsets whose foreground
  exceeds 5% of the whole image's area, else the try with the most foreground.
- Visual prompt (`crop_blur_highlight352`): object + 10% of the blurred image around it, box + 10%, square, 352.
- Logits to pictures: bilinear (`align_corners=False`) to the original size, then sigmoid.

Reading images (`open_rgb`, `load_image`), masks (`read_mask`) and benchmark label maps (`read_label`) lives here
too, with one rule for every mask a user gives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFile, ImageOps
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # CLIPSeg normalises with ImageNet statistics, not CLIP's
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 352  # training and test resolution of the released models
RESIZE_RULES = ("original", "pil")  # the rules a user chooses between (--resize)
BENCHMARK_RULES = ("linear",)  # rules only benchmark pipelines use
RASTER_RULES = ("polygon2mask", "phrasecut")
MAX_ASPECT = 3  # native-aspect inputs cap the long side at this multiple of the short side
CROP_TRIES = 50  # the original's find_crop(iterations=50, min_frac=0.05)
CROP_MIN_FRACTION = 0.05
MAX_IMAGE_PIXELS = 8192 * 8192
VOID_LABEL = 255  # label maps: "void" (object borders, unlabelled) and padding, ignored by the benchmarks
LABEL_MODES = ("P", "L", "I", "I;16")  # index PNGs: palette (VOC SegmentationClass) or grayscale values
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the camera was turned
_VERTEX_TOLERANCE = 1e-12  # skimage's point_in_polygon counts a point this close to a vertex as on it

# Refuse decompression bombs instead of allocating gigabytes for one image (PIL's own guard only warns below 2x).
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageInput = Image.Image | str | os.PathLike | np.ndarray

# ------------------------------------------------------------------------------------------- reading images


class UnreadableImage(Exception):
    """An image file that is missing, empty, truncated, corrupt or too large."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def open_rgb(path: str | os.PathLike, upright: bool = True) -> Image.Image:
    """Open an image file as upright RGB: EXIF rotation applied (unless `upright=False`: the stored pixel grid,
    which benchmark label maps are drawn on); grayscale (8 and 16 bit), palette, CMYK and alpha converted
    (transparent pixels composited on black). Raises `UnreadableImage` with the reason."""
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UnreadableImage(path, f"too large ({width}x{height} > {MAX_IMAGE_PIXELS} pixels)")
            image.load()
            if upright and image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even upright ones
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except UnreadableImage:
        raise
    except FileNotFoundError as err:
        raise UnreadableImage(path, "file not found") from err
    except Image.DecompressionBombError as err:
        raise UnreadableImage(path, f"too large ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImage(path, f"cannot decode ({err})") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """An in-memory image as RGB: 16-bit grayscale scaled, palette expanded, alpha composited on black."""
    if image.mode.startswith("I"):
        image = _sixteen_bit_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale -> 8 bit (PIL's own conversion clips everything above 255 to white)."""
    values = np.asarray(image, dtype=np.float64)
    if values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")


def upright_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of an image after EXIF rotation, from its header only; None if it cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            sideways = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            return (height, width) if sideways else (width, height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def load_image(image: ImageInput) -> Image.Image:
    """A path (opened upright with `open_rgb`), a PIL image or an array -> RGB PIL image.

    PIL images and arrays are taken as they are (no EXIF rotation). Arrays: (H, W), (H, W, 1), (H, W, 3) or
    (H, W, 4); uint8, bool, or float in [0, 1]. Alpha is composited on black, as for files."""
    if isinstance(image, str | os.PathLike):
        return open_rgb(image)
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")
    return to_rgb(image)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4) (channels last), got {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (np.isnan(array).any() or np.nanmin(array) < 0 or np.nanmax(array) > 1):
            raise ValueError("float image arrays must hold values in [0, 1]; divide uint8-range data by 255")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, bool or float in [0, 1], got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


# ------------------------------------------------------------------------------------------------ masks


def read_mask(mask: ImageInput) -> tuple[np.ndarray, bool]:
    """A mask (file, PIL image or array) -> (bool (H, W) mask, was_binary).

    The object is every pixel at least half the mask's maximum, in any channel: 0/1, 0/255, 0/100, colour masks on
    black and slightly noisy (JPEG) masks all work. `was_binary` is False when the mask held other values than 0 and
    one other level, so a caller can warn that it was thresholded. Files: EXIF rotation applied, 16-bit scaled.
    Raises `UnreadableImage` for files that cannot be read."""
    if isinstance(mask, np.ndarray) and mask.ndim in (2, 3) and mask.dtype != np.uint8:
        values = np.asarray(mask, dtype=np.float32)
    else:
        values = np.asarray(load_image(mask), dtype=np.float32)
    if values.ndim == 3:
        values = values.max(axis=-1)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0:
        return np.zeros(values.shape, dtype=bool), True
    return values >= peak / 2, len(np.unique(values)) <= 2


def read_label(path: str | os.PathLike) -> np.ndarray:
    """An index PNG (VOC's SegmentationClass palette PNGs, SegmentationClassAug and HSNet's COCO-20i grayscale
    PNGs) -> (H, W) uint8 of the stored values: class ids, 255 = void. The palette is not looked up and no EXIF
    rotation is applied (as PIL's `np.array(Image.open(path))`). Raises `UnreadableImage` for a missing or broken
    file and ValueError for colour PNGs or values above 255."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            values = np.asarray(image)
    except FileNotFoundError as err:
        raise UnreadableImage(path, "file not found") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImage(path, f"cannot decode ({err})") from err
    if mode not in LABEL_MODES:
        raise ValueError(
            f"{path}: a {mode} image is not a label map; expected an index PNG (mode P or L) whose values are class "
            "ids, as VOC's SegmentationClass / SegmentationClassAug and HSNet's COCO-20i annotations are"
        )
    if values.size and values.max() > 255:
        raise ValueError(f"{path}: label values go up to {values.max()}; class ids must be 0-255")
    return values.astype(np.uint8)


def rasterise(polygons: Sequence, height: int, width: int, rule: str = "polygon2mask") -> np.ndarray:
    """Union of polygons -> bool (H, W) mask. polygons: (N, 2) [x, y] point lists in original pixels.

    rule "polygon2mask" (the original CLIPSeg's, skimage `polygon2mask` with [x, y] swapped to (row, col)): pixel
    (r, c) is set iff the point x = c, y = r lies inside the polygon (even-odd rule), on an edge or on a vertex.
    rule "phrasecut" (PhraseCut's official evaluation): PIL polygon with fill and outline, vertices truncated to
    int; about 4% more pixels. Polygons with non-finite coordinates are skipped; "phrasecut" also skips those
    with fewer than 2 vertices (PIL cannot draw them). Parts outside the image are clipped."""
    if rule not in RASTER_RULES:
        raise ValueError(f"unknown rasterisation rule {rule!r}; choose one of {RASTER_RULES}")
    mask = np.zeros((height, width), dtype=bool)
    canvas = draw = None
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if not len(points) or not np.isfinite(points).all():
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


# ----------------------------------------------------------------------------------------- resize and crop

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalise(pixels: Tensor, adjust: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(3, H, W) float pixels on the 0-255 scale -> ImageNet-normalised: x / 255, then (x - mean) / std, in the
    order and precision the original applies them (`img / 255.0`, then torchvision's `Normalize`). `adjust` (such
    as `colour_jitter_of(rng)`) acts on the [0, 1] image in between, where the original applies its jitter."""
    unit = pixels / 255.0
    return ((adjust(unit) if adjust is not None else unit) - _MEAN) / _STD


def denormalise(pixel_values: Tensor) -> Tensor:
    """(3, H, W) normalised pixels -> (H, W, 3) uint8 (for pictures of what the model saw)."""
    rgb = (pixel_values.float().cpu() * _STD + _MEAN).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0)


def check_rule(rule: str) -> str:
    if rule not in RESIZE_RULES + BENCHMARK_RULES:
        raise ValueError(f"unknown resize rule {rule!r}; choose one of {', '.join(RESIZE_RULES + BENCHMARK_RULES)}")
    return rule


def resize_pixels(
    image: Image.Image | np.ndarray, size: tuple[int, int], rule: str, adjust: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """RGB image (PIL, or (H, W, 3) uint8 array) -> (3, h, w) float32 ImageNet-normalised, size = (w, h).

    rule "original": the uint8 image as float, `interpolate(bilinear, align_corners=True)`, no antialiasing;
    rule "pil": PIL's bilinear resize (antialiased when shrinking), as the HF processor does; rule "linear":
    `interpolate(bilinear, align_corners=False)`, no antialiasing (OpenCV's INTER_LINEAR on float images).
    `adjust`: see `normalise`."""
    width, height = size
    if check_rule(rule) == "pil":
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        if pil.size != (width, height):
            pil = pil.resize((width, height), Image.BILINEAR)
        return normalise(torch.from_numpy(np.array(pil, dtype=np.float32)).permute(2, 0, 1), adjust)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    if (height, width) != tuple(pixels.shape[-2:]):
        corners = rule == "original"
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=corners)
    return normalise(pixels[0], adjust)


def resize_mask(mask: np.ndarray, size: tuple[int, int], rule: str) -> np.ndarray:
    """bool (H, W) mask -> bool (h, w), size = (w, h), by `resize_labels`'s nearest-neighbour rule."""
    return resize_labels(np.asarray(mask, dtype=np.uint8), size, rule).astype(bool)


def resize_labels(labels: np.ndarray, size: tuple[int, int], rule: str) -> np.ndarray:
    """(H, W) uint8 label map -> (h, w) uint8 by nearest neighbour, size = (w, h). Rule "original":
    `interpolate(mode="nearest")`, source pixel floor(i * H / h); "pil": PIL's nearest, which samples pixel
    centres; "linear": OpenCV's INTER_NEAREST, source floor(i * (1 / (h / H))) in double precision."""
    width, height = size
    if check_rule(rule) == "original":
        values = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))[None, None]
        return F.interpolate(values, size=(height, width), mode="nearest")[0, 0].numpy()
    if rule == "pil":
        rows = ((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64)
        cols = ((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64)
    else:
        rows = np.minimum(np.floor(np.arange(height) * (1.0 / (height / labels.shape[0]))), labels.shape[0] - 1)
        cols = np.minimum(np.floor(np.arange(width) * (1.0 / (width / labels.shape[1]))), labels.shape[1] - 1)
    return np.ascontiguousarray(labels[rows.astype(np.int64)][:, cols.astype(np.int64)])


def letterbox_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) PFENet's test_Resize(size) gives an image: unchanged when max(H, W) <= size; else the long side
    becomes `size` and the short side int(short * size / long), both floored to multiples of 8."""
    if max(height, width) <= size:
        return height, width
    if height >= width:
        new_height, new_width = size, int(width * (size * 1.0 / height))
    else:
        new_height, new_width = int(height * (size * 1.0 / width)), size
    return new_height // 8 * 8, new_width // 8 * 8


def letterbox(image: Image.Image | np.ndarray, labels: np.ndarray, size: int) -> tuple[Tensor, np.ndarray]:
    """PFENet's test_Resize (the original's Pascal-5i pipeline, SPEC 9): the image resized to `letterbox_size`
    by rule "linear" and placed top-left on a size x size canvas of zeros (black after normalisation, not the
    mean colour); the label map likewise by OpenCV's nearest on a canvas of 255 (void).
    image: RGB (H, W); labels: (H, W) uint8. Returns (3, size, size) normalised pixels and (size, size) uint8."""
    height, width = labels.shape
    new_height, new_width = letterbox_size(height, width, size)
    pixels = normalise(torch.zeros(3, size, size))
    pixels[:, :new_height, :new_width] = resize_pixels(image, (new_width, new_height), "linear")
    canvas = np.full((size, size), VOID_LABEL, dtype=np.uint8)
    canvas[:new_height, :new_width] = resize_labels(labels, (new_width, new_height), "linear")
    return pixels, canvas


def unletterbox(probabilities: Tensor, height: int, width: int) -> Tensor:
    """(S, S) probabilities on a `letterbox` canvas -> (H, W) on the original image. As the original scores
    Pascal-5i: bilinear (`align_corners=True`) up to max(H, W) squared, of which the image is the top-left part.
    An image that was not resized (max(H, W) <= S) is the canvas's top-left H x W as it is (the original resizes
    the whole canvas to max(H, W) there too, which shifts the prediction off the image)."""
    size = probabilities.shape[-1]
    longest = max(height, width)
    if longest <= size:
        return probabilities[:height, :width]
    resized = F.interpolate(
        probabilities[None, None].float(), size=(longest, longest), mode="bilinear", align_corners=True
    )
    return resized[0, 0, :height, :width]


def choose_crop(mask: np.ndarray, offsets: Sequence[tuple[int, int]], min_fraction: float = CROP_MIN_FRACTION):
    """The original's training crop (`find_crop`): a square of side min(H, W) at the first (top, left) offset
    whose crop holds more than `min_fraction` of the *whole image's* area in foreground pixels; when none of the
    offsets does, the one with the most foreground (the first such). mask: bool (H, W); offsets: the tries in
    order. Returns (top, left, side)."""
    if not len(offsets):
        raise ValueError("choose_crop needs at least one offset")
    height, width = mask.shape
    side = min(height, width)
    # the square spans the whole short axis: its foreground is a window sum of the long axis's profile
    profile = mask.sum(axis=0 if width > height else 1, dtype=np.int64)
    window = np.concatenate([[0], np.cumsum(profile)])
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = offsets[:, 1] if width > height else offsets[:, 0]
    counts = window[starts + side] - window[starts]
    passing = np.flatnonzero(counts > min_fraction * height * width)
    chosen = passing[0] if len(passing) else np.argmax(counts)  # argmax: the first maximum
    return int(offsets[chosen, 0]), int(offsets[chosen, 1]), side


def random_crop_offsets(rng: np.random.Generator, height: int, width: int, tries: int = CROP_TRIES) -> np.ndarray:
    """`tries` random (top, left) offsets of a min(H, W) square, each uniform over its axis's range: (tries, 2)."""
    side = min(height, width)
    return np.stack([rng.integers(0, height - side + 1, tries), rng.integers(0, width - side + 1, tries)], axis=1)


def colour_jitter_of(
    rng: np.random.Generator, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.2, hue: float = 0.05
) -> Callable[[Tensor], Tensor]:
    """The original's optional colour augmentation, torchvision's `ColorJitter(0.5, 0.5, 0.2, 0.05)` on a [0, 1]
    image (SPEC 1b; off in the released runs): brightness, contrast and saturation factors drawn from
    U(1 - x, 1 + x) and a hue shift from U(-h, h), applied in a random order, each result clipped to [0, 1]."""
    factors = {
        "brightness": rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
        "contrast": rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
        "saturation": rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
        "hue": rng.uniform(-hue, hue),
    }
    order = [list(factors)[i] for i in rng.permutation(4)]

    def jitter(image: Tensor) -> Tensor:
        for name in order:
            factor = float(factors[name])
            if name == "brightness":
                image = (image * factor).clamp(0, 1)
            elif name == "contrast":
                mean = _grey(image).mean()
                image = (factor * image + (1 - factor) * mean).clamp(0, 1)
            elif name == "saturation":
                image = (factor * image + (1 - factor) * _grey(image)).clamp(0, 1)
            else:
                image = _shift_hue(image, factor)
        return image

    return jitter


def _grey(image: Tensor) -> Tensor:
    """ITU-R 601-2 luma of a (3, H, W) [0, 1] image, (1, H, W), as torchvision's rgb_to_grayscale."""
    return (0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def _shift_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate the hue of a (3, H, W) [0, 1] image by `shift` turns (through HSV)."""
    red, green, blue = image
    value, _ = image.max(dim=0)
    chroma = value - image.min(dim=0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == red,
        ((green - blue) / safe) % 6,
        torch.where(value == green, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0
    saturation = torch.where(
        value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value)
    )
    sector = hue * 6
    channels = []
    for offset in (5, 3, 1):  # the standard HSV -> RGB formula, one channel per offset
        k = (offset + sector) % 6
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels)


def native_size(width: int, height: int, short_side: int, multiple: int = 16) -> tuple[int, int]:
    """(W, H) of the model input that keeps an image's aspect: the short side becomes `short_side`, the long side
    is scaled alike and rounded to a multiple of `multiple` (the patch size), capped at MAX_ASPECT x the short
    side."""
    scale = short_side / min(width, height)

    def on_grid(length: float) -> int:
        return min(MAX_ASPECT * short_side, max(multiple, int(length * scale / multiple + 0.5) * multiple))

    return on_grid(width), on_grid(height)


@dataclass(frozen=True)
class ImageTransform:
    """How an image (and its mask) becomes model input; one object shared by the data sets, the predictor and the
    app. rule: "original" or "pil" (see the module table); size: the side S (the short side with `square=False`);
    square: squash every image to S x S (the paper, the HF processor) or keep the aspect (`native_size`);
    multiple: the model's patch size, to which `native_size` rounds the long side."""

    rule: str = "original"
    size: int = IMAGE_SIZE
    square: bool = True
    multiple: int = 16

    def __post_init__(self) -> None:
        check_rule(self.rule)
        if self.size <= 0:
            raise ValueError(f"image size must be positive, got {self.size}")

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) the model sees for a `width` x `height` image (or crop)."""
        return (self.size, self.size) if self.square else native_size(width, height, self.size, self.multiple)

    def pixels(
        self,
        image: Image.Image,
        box: tuple[int, int, int, int] | None = None,
        adjust: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """RGB image, cropped to `box` = (left, top, right, bottom) first -> (3, H, W) normalised pixels.
        `adjust` acts on the resized [0, 1] image before normalisation (see `normalise`)."""
        if box is not None:
            image = image.crop(box) if self.rule == "pil" else np.asarray(image)[box[1] : box[3], box[0] : box[2]]
        width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        return resize_pixels(image, self.input_size(width, height), self.rule, adjust)

    def mask(self, mask: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """bool (H0, W0) mask, cropped to `box` first -> bool (H, W) at the model's input size."""
        if box is not None:
            mask = mask[box[1] : box[3], box[0] : box[2]]
        return resize_mask(mask, self.input_size(mask.shape[1], mask.shape[0]), self.rule)


# ---------------------------------------------------------------------------------- visual prompt, outputs


def gaussian_blur(image: Tensor, kernel_size: int = 15, sigma: float = 3.0) -> Tensor:
    """Separable Gaussian blur of (C, H, W) or (B, C, H, W), border reflect-101 (cv2.GaussianBlur's default)."""
    squeeze = image.ndim == 3
    x = image[None] if squeeze else image
    coords = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype).to(x.device)
    channels, pad = x.shape[1], kernel_size // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)
    return x[0] if squeeze else x


def visual_prompt(
    image: Tensor, mask: Tensor | np.ndarray, size: int = IMAGE_SIZE, background: float = 0.1, context: float = 0.1
) -> Tensor:
    """Support image + mask -> prompt image, the original's `crop_blur_highlight352` (the paper's best, Table 2).

    image: (3, H, W) ImageNet-normalised support (352 x 352 in the paper); mask: (H, W), non-zero = object.
    The object is kept and the rest replaced by `background` x the blurred image (Gaussian 15x15, sigma 3); the
    result is cropped to the mask's box grown by `context` of its extent on each side (truncated, clamped), padded
    with zeros (the mean colour) to a square, half before and the rest after, and resized to `size` (nearest).
    An empty mask gives the whole frame at `background` x the blurred image, as in the original (its box search
    returns the whole frame). Returns (3, size, size)."""
    if image.ndim != 3 or tuple(mask.shape) != tuple(image.shape[1:]):
        raise ValueError(f"image (3, H, W) and mask (H, W) must match, got {tuple(image.shape)} / {tuple(mask.shape)}")
    mask = torch.as_tensor(mask, device=image.device) > 0
    weight = mask.to(image.dtype)
    composite = image * weight + background * gaussian_blur(image) * (1 - weight)
    height, width = mask.shape
    rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    top, bottom = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, height)
    left, right = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, width)
    grow_y, grow_x = context * (bottom - top), context * (right - left)
    top, bottom = int(max(0, top - grow_y)), int(min(height, bottom + grow_y))
    left, right = int(max(0, left - grow_x)), int(min(width, right + grow_x))
    crop = composite[:, top:bottom, left:right]
    crop_height, crop_width = crop.shape[1:]
    pad_y, pad_x = max(0, crop_width - crop_height), max(0, crop_height - crop_width)
    square = F.pad(crop, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2))
    return F.interpolate(square[None], size=(size, size), mode="nearest")[0]


def support_prompt(image: ImageInput, mask: ImageInput, transform: ImageTransform) -> Tensor:
    """A support image and its object mask (files, PIL images or arrays, the same size) -> (3, S, S) prompt image:
    both squashed to S x S by `transform`'s rule, then `visual_prompt`. Raises ValueError for a size mismatch."""
    rgb, (object_mask, _) = load_image(image), read_mask(mask)
    if object_mask.shape != (rgb.height, rgb.width):
        raise ValueError(
            f"support mask is {object_mask.shape[1]}x{object_mask.shape[0]} but its image is {rgb.width}x"
            f"{rgb.height}: give a mask of the support image's size"
        )
    square = ImageTransform(transform.rule, transform.size, square=True)
    return visual_prompt(square.pixels(rgb), square.mask(object_mask), size=transform.size)


class NonFiniteOutput(ValueError):
    """The model's logits hold NaN or infinite values (damaged weights, or an overflow): no result can be made."""


def check_finite(logits: Tensor) -> Tensor:
    """`logits` unchanged, or `NonFiniteOutput` if any value is NaN or infinite. Every prediction path checks here
    (`full_size_probabilities`, `inference.predict_tasks`, the benchmarks'), so a broken model stops a run with a
    message instead of giving empty masks and NaN scores."""
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        raise NonFiniteOutput(
            f"the model's output holds {int((~finite).sum())} NaN or infinite values (of {finite.numel()}): its "
            "weights are damaged (NaN, infinite or huge values, e.g. from a diverged training run) or a reduced "
            "precision overflowed; check the model, or try --precision fp32"
        )
    return logits


def full_size_probabilities(logits: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Logits (K, 1, h, w), (1, h, w) or (h, w) -> float32 probabilities at size = (H, W): bilinear
    (`align_corners=False`) resize of the logits, then sigmoid. Returns (K, H, W), or (H, W) for one map. Raises
    `NonFiniteOutput` for NaN or infinite logits."""
    check_finite(logits)
    single = logits.ndim < 4
    maps = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    resized = F.interpolate(maps, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)
    probabilities = torch.sigmoid(resized[:, 0]).cpu().numpy()
    return probabilities[0] if single else probabilities
