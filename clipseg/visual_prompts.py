"""Image prompts: a support image and its object mask engineered into a prompt image the way the original does
(`crop_blur_highlight352`: the object plus 10% of the blurred image around it, cropped to its box grown by 10%,
padded square, resized to the model's side; docs/original.md §6).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clipseg.images import ImageInput, load_image, read_mask
from clipseg.transforms import IMAGE_SIZE, ImageTransform


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
    both squashed to S x S by `transform`'s rule, then `visual_prompt`. Raises ValueError for a size mismatch or a
    mask without an object (the prompt would be the whole support image, blurred)."""
    rgb, (object_mask, _) = load_image(image), read_mask(mask)
    if object_mask.shape != (rgb.height, rgb.width):
        raise ValueError(
            f"support mask is {object_mask.shape[1]}x{object_mask.shape[0]} but its image is {rgb.width}x"
            f"{rgb.height}: give a mask of the support image's size"
        )
    if not object_mask.any():
        raise ValueError("the support mask has no object: give a mask whose object is white on black")
    square = ImageTransform(transform.rule, transform.size, square=True)
    return visual_prompt(square.pixels(rgb), square.mask(object_mask), size=transform.size)
