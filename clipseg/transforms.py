"""Model inputs from pixels, and pictures from logits: resizing, normalisation, the native-aspect geometry,
letterboxing, and the way back from logits to probabilities at the original size. One definition of each rule:

- rule `original` (the authors' data pipeline; default of training and scoring): the uint8 image as float,
  `interpolate(bilinear, align_corners=True)`, no antialiasing; masks `interpolate(nearest)` (floor).
- rule `pil` (the HF processor and the original Quickstart; default of predict.py and the app): PIL's antialiased
  bilinear resize; masks PIL nearest (pixel centres).
- rule `linear` (the Pascal-5i and VOC zero-shot benchmarks): bilinear with half-pixel centres and no antialiasing,
  as OpenCV's INTER_LINEAR and torchvision's tensor Resize (before 0.17) do; masks and label maps OpenCV's
  INTER_NEAREST. `letterbox` is PFENet's test_Resize.
- normalisation: x / 255, then (x - ImageNet mean) / ImageNet std, in float32 (every rule).
- logits to pictures: bilinear (`align_corners=False`) to the original size, then sigmoid; logits that are not
  finite are an error (`NonFiniteOutput`).

Sources and line numbers: docs/original.md §5 and §11-13.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from clipseg.images import VOID_LABEL

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # CLIPSeg normalises with ImageNet statistics, not CLIP's


IMAGENET_STD = (0.229, 0.224, 0.225)


IMAGE_SIZE = 352  # training and test resolution of the released models


RESIZE_RULES = ("original", "pil")  # the rules a user chooses between (--resize)


BENCHMARK_RULES = ("linear",)  # rules only benchmark pipelines use


MAX_ELONGATION = 3  # native-aspect inputs cap the long side at this multiple of the short side


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
    """PFENet's test_Resize (the original's Pascal-5i pipeline, docs/original.md §11.4): the image resized to
    `letterbox_size` by rule "linear" and placed top-left on a size x size canvas of zeros (black after
    normalisation, not the mean colour); the label map likewise by OpenCV's nearest on a canvas of 255 (void).
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


def native_size(width: int, height: int, short_side: int, multiple: int = 16) -> tuple[int, int]:
    """(W, H) of the model input that keeps an image's aspect: the short side becomes `short_side`, the long side
    is scaled alike and rounded to a multiple of `multiple` (the patch size), capped at MAX_ELONGATION x the short
    side."""
    scale = short_side / min(width, height)

    def on_grid(length: float) -> int:
        return min(MAX_ELONGATION * short_side, max(multiple, int(length * scale / multiple + 0.5) * multiple))

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


class NonFiniteOutput(ValueError):
    """The model's logits hold NaN or infinite values (damaged weights, or an overflow): no result can be made."""


def check_finite(logits: Tensor) -> Tensor:
    """`logits` unchanged, or `NonFiniteOutput` if any value is NaN or infinite. Every prediction path checks here
    (`full_size_probabilities`, `clipseg.inference.predict_tasks`, the benchmarks'), so a broken model stops a run with
    a message instead of giving empty masks and NaN scores."""
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
