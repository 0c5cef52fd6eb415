"""Reading what users and data sets give: images (upright RGB, EXIF rotation, alpha, 16-bit, size limit), masks
(one rule for every mask a user gives) and benchmark label maps (index PNGs with a void label).

Decompression bombs are refused: PIL's pixel limit is MAX_IMAGE_PIXELS, and an image over it is an `UnreadableImage`
that callers count as a skip.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageFile, ImageOps

MAX_IMAGE_PIXELS = 8192 * 8192


VOID_LABEL = 255  # label maps: "void" (object borders, unlabelled) and padding, ignored by the benchmarks


LABEL_MODES = ("P", "L", "I", "I;16")  # index PNGs: palette (VOC SegmentationClass) or grayscale values


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the camera was turned


# Refuse decompression bombs instead of allocating gigabytes for one image (PIL's own guard only warns below 2x).
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


ImageFile.LOAD_TRUNCATED_IMAGES = False


ImageInput = Image.Image | str | os.PathLike | np.ndarray


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
    """An in-memory image as RGB: 16/32-bit and float grayscale scaled, palette expanded, alpha composited on
    black."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _wide_gray_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8 bit by the range its values use (PIL's own conversion clips
    everything above 255 to white, and a float image in [0, 1] to black): floats of [0, 1] x 255 (a few overshoots,
    as resampling leaves, clipped), 8-bit values as they are, 16-bit ones / 257, wider ones by their maximum. NaN is
    black."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = values.max(initial=0)
    if image.mode == "F" and (top <= 1.5 or np.quantile(values, 0.99) <= 1):
        values = values * 255
    elif top > 65535:
        values = values * (255 / top)
    elif top > 255:
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


def read_label(path: str | os.PathLike, classes: int = 254) -> np.ndarray:
    """An index PNG (VOC's SegmentationClass palette PNGs, SegmentationClassAug and HSNet's COCO-20i grayscale
    PNGs) -> (H, W) uint8 of the stored values: class ids, 255 = void. The palette is not looked up and no EXIF
    rotation is applied (as PIL's `np.array(Image.open(path))`). Raises `UnreadableImage` for a missing or broken
    file and ValueError for colour PNGs or values that are neither a class id (1 to `classes`), background (0)
    nor void: a map of another data set would otherwise score as all background."""
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
    foreign = np.setdiff1d(np.unique(values), [*range(classes + 1), VOID_LABEL])
    if foreign.size:
        raise ValueError(
            f"{path}: label values {foreign[:5].tolist()} are not class ids (0-{classes}) or void ({VOID_LABEL}); "
            "is it a label map of this data set?"
        )
    return values.astype(np.uint8)
