"""clipseg/transforms.py: the resize rules equal their sources (F.interpolate with align_corners=True, the HF
processor), the transform crops then resizes, and logits come back as probabilities at the original size."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import original_pipeline
from PIL import Image

from clipseg.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    NonFiniteOutput,
    full_size_probabilities,
    resize_mask,
    resize_pixels,
)


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (100, 100), (40, 30)])
def test_original_resize_equals_interpolate_align_corners_exactly(shape):
    array = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for image in (array, Image.fromarray(array)):
        assert torch.equal(resize_pixels(image, (352, 352), "original"), original_pipeline(array, 352))
    pil = resize_pixels(array, (352, 352), "pil")
    assert not torch.equal(pil, original_pipeline(array, 352))  # the other rule is really another one


def test_pil_resize_equals_the_hf_processor():
    import transformers

    processor_class = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    processor = processor_class(
        size={"height": 352, "width": 352}, resample=Image.BILINEAR, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(resize_pixels(image, (352, 352), "pil"), expected, rtol=0, atol=1e-6)


def test_mask_resize_rules():
    mask = np.random.default_rng(0).random((37, 53)) > 0.5
    floor = F.interpolate(torch.from_numpy(mask.astype(np.uint8))[None, None], size=(20, 31), mode="nearest")
    np.testing.assert_array_equal(resize_mask(mask, (31, 20), "original"), floor[0, 0].numpy().astype(bool))
    centres = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((31, 20), Image.NEAREST)) > 0
    np.testing.assert_array_equal(resize_mask(mask, (31, 20), "pil"), centres)
    assert not np.array_equal(resize_mask(mask, (31, 20), "original"), centres)


def test_image_transform_crops_then_resizes_and_keeps_aspect_when_asked():
    array = np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    square = ImageTransform("original", 32)
    box = (20, 0, 80, 60)
    assert torch.equal(square.pixels(image, box), resize_pixels(array[:, 20:80], (32, 32), "original"))
    mask = np.zeros((60, 90), dtype=bool)
    mask[10:20, 30:40] = True
    np.testing.assert_array_equal(square.mask(mask, box), resize_mask(mask[:, 20:80], (32, 32), "original"))
    native = ImageTransform("pil", 64, square=False)
    assert native.input_size(33, 77) == (64, 144)  # 77 * 64 / 33 = 149.3 -> 144
    assert native.input_size(1000, 100) == (192, 64)  # capped at 3x the short side
    assert native.pixels(image).shape == (3, 64, 96)
    with pytest.raises(ValueError, match="unknown resize rule 'bicubic'"):
        ImageTransform("bicubic")
    with pytest.raises(ValueError, match="image size must be positive"):
        ImageTransform("pil", 0)


# ------------------------------------------------------------------------------------------- visual prompt


def test_full_size_probabilities_is_bilinear_then_sigmoid():
    logits = torch.randn(3, 1, 16, 16)
    expected = torch.sigmoid(F.interpolate(logits, size=(30, 45), mode="bilinear", align_corners=False))[:, 0]
    np.testing.assert_allclose(full_size_probabilities(logits, (30, 45)), expected.numpy(), atol=1e-7)
    assert full_size_probabilities(logits[0], (30, 45)).shape == (30, 45)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_full_size_probabilities_refuses_logits_that_are_not_finite(bad):
    logits = torch.zeros(2, 1, 8, 8)
    logits[1, 0, 3, 4] = bad
    with pytest.raises(NonFiniteOutput, match=r"holds 1 NaN or infinite values \(of 128\)"):
        full_size_probabilities(logits, (16, 16))


# -------------------------------------------------------------------------------------------- reading images
