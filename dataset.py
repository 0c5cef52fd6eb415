"""Datasets: PhraseCut as downloaded, a synthetic PhraseCut-format generator, and users' own folders."""

from __future__ import annotations

import os

from PIL import Image, ImageFile, ImageOps

# Refuse decompression bombs instead of allocating gigabytes for one image (PIL's own guard only warns below 2x).
Image.MAX_IMAGE_PIXELS = 8192 * 8192
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(Exception):
    """An image file that is missing, empty, truncated, corrupt or too large."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as upright RGB: EXIF rotation applied; grayscale, palette, CMYK and alpha converted
    (transparent pixels composited on black). Raises `UnreadableImage` with the reason."""
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode == "P":
                image = image.convert("RGBA")
            if image.mode in ("RGBA", "LA", "PA"):
                background = Image.new("RGB", image.size)
                background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
                return background
            return image.convert("RGB")
    except UnreadableImage:
        raise
    except FileNotFoundError as err:
        raise UnreadableImage(path, "file not found") from err
    except Image.DecompressionBombError as err:
        raise UnreadableImage(path, f"too large ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImage(path, f"cannot decode ({err})") from err
