"""Training-time sampling of a view: the original's square crop (`find_crop`: side min(H, W), the first of 50 random
offsets whose foreground exceeds 5% of the whole image's area, else the try with the most foreground) and its
optional colour jitter (docs/original.md §5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

CROP_TRIES = 50  # the original's find_crop(iterations=50, min_frac=0.05)


CROP_MIN_FRACTION = 0.05


def choose_crop(
    mask: np.ndarray, offsets: Sequence[tuple[int, int]], min_fraction: float = CROP_MIN_FRACTION
) -> tuple[int, int, int]:
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
    image (docs/original.md §5.7; off in the released runs): brightness, contrast and saturation factors drawn from
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
