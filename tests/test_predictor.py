"""clipseg.predictor: the Predictor API against plain forward passes, its image inputs and their errors, batches of
images, and bf16 where the CPU has it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image, write_support
from PIL import Image, ImageOps

from clipseg import precision as precision_module
from clipseg.images import load_image
from clipseg.predictor import Predictor
from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipseg.visual_prompts import visual_prompt
from model import CLIPSeg

SIZE = 64  # short side used in these tests (the tiny CLIP takes any multiple of 16)
PHRASES = ["a red circle", "the blue square", "sky"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def model(tiny_dir):
    return CLIPSeg.from_pretrained(tiny_dir).eval()


@pytest.fixture
def predictor(model):
    return Predictor(model, image_size=SIZE)


def normalised(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Independent reference preprocessing: (3, H, W) ImageNet-normalised pixels at `size` = (W, H)."""
    array = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def reference_probs(model, pixels, original_size, **prompt) -> np.ndarray:
    """One plain forward pass of one prompt, logits resized bilinearly to (W0, H0), then sigmoid: (H0, W0)."""
    with torch.no_grad():
        logits = model(pixels[None], **prompt).logits
    width, height = original_size
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[0, 0].numpy()


def test_k_prompts_equal_k_independent_forward_passes(model, predictor, tmp_path):
    image = random_image(80, 50)
    support, mask = write_support(tmp_path)
    prompt_image = random_image(40, 40, seed=3)
    predictor.set_image(image)
    probs = predictor.predict(phrases=PHRASES, prompt_images=[prompt_image], support=[(support, mask)])

    assert predictor.input_size == (96, 64)  # short side 50 -> 64, long side 80 * 64 / 50 = 102.4 -> 96
    assert probs.shape == (len(PHRASES) + 2, 50, 80) and probs.dtype == np.float32
    pixels = normalised(image, (96, 64))
    side = model.config.image_size
    support_mask = torch.from_numpy(np.asarray(Image.open(mask).resize((side, side), Image.NEAREST)) > 0)
    engineered = visual_prompt(normalised(Image.open(support), (side, side)), support_mask)
    expected = [reference_probs(model, pixels, image.size, phrases=[p]) for p in PHRASES]
    expected.append(
        reference_probs(model, pixels, image.size, prompt_images=normalised(prompt_image, (side, side))[None])
    )
    expected.append(reference_probs(model, pixels, image.size, prompt_images=engineered[None]))
    for got, want in zip(probs, expected):
        assert np.abs(got - want).max() <= 1e-5
    assert np.abs(probs[0] - probs[1]).max() > 1e-3  # the prompts really differ


def test_maps_are_at_the_original_size_of_rectangular_images(predictor):
    for width, height in [(120, 45), (33, 77), (400, 20)]:
        predictor.set_image(random_image(width, height))
        probs = predictor.predict(phrases=PHRASES[:2])
        assert probs.shape == (2, height, width)
        assert probs.min() >= 0 and probs.max() <= 1
        input_width, input_height = predictor.input_size
        assert input_width % 16 == 0 and input_height % 16 == 0 and min(predictor.input_size) == SIZE
    assert predictor.input_size == (3 * SIZE, SIZE)  # 20:1 is capped at 3:1


def test_square_mode_squashes_and_still_returns_the_original_size(model):
    image = random_image(90, 60)
    square = Predictor(model, image_size=SIZE, square=True)
    square.set_image(image)
    probs = square.predict(phrases=PHRASES[:1])
    assert square.input_size == (SIZE, SIZE) and probs.shape == (1, 60, 90)
    expected = reference_probs(model, normalised(image, (SIZE, SIZE)), image.size, phrases=PHRASES[:1])
    assert np.abs(probs[0] - expected).max() <= 1e-5


def test_grayscale_rgba_and_exif_rotated_inputs(predictor, tmp_path):
    gray = random_image(70, 50, mode="L")
    gray.save(tmp_path / "gray.png")
    rgba = random_image(70, 50, mode="RGBA")
    rgba.save(tmp_path / "rgba.png")
    stored = random_image(70, 50, seed=5)  # stored 70x50, EXIF says rotate 90 degrees: upright 50x70
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    on_black = Image.new("RGB", rgba.size)
    on_black.paste(rgba, mask=rgba.getchannel("A"))
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).convert("RGB")

    cases = [("gray.png", gray.convert("RGB")), ("rgba.png", on_black), ("rotated.jpg", upright)]
    for name, equivalent_rgb in cases:
        predictor.set_image(tmp_path / name)
        from_file = predictor.predict(phrases=PHRASES[:1])
        predictor.set_image(equivalent_rgb)
        assert from_file.shape == (1, equivalent_rgb.height, equivalent_rgb.width), name
        assert np.abs(from_file - predictor.predict(phrases=PHRASES[:1])).max() <= 1e-6, name
    assert upright.size == (50, 70)


def test_array_inputs_and_their_errors(predictor):
    array = np.asarray(random_image(48, 40))
    predictor.set_image(array)
    from_uint8 = predictor.predict(phrases=PHRASES[:1])
    predictor.set_image(array.astype(np.float32) / 255)
    assert np.abs(predictor.predict(phrases=PHRASES[:1]) - from_uint8).max() <= 1e-6
    predictor.set_image(array[..., 0])
    assert predictor.predict(phrases=PHRASES[:1]).shape == (1, 40, 48)
    with pytest.raises(ValueError, match="channels last"):
        predictor.set_image(array.transpose(2, 0, 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predictor.set_image(array.astype(np.float32))
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        predictor.set_image(42)


def test_predict_needs_an_image_and_a_prompt(model):
    fresh = Predictor(model, image_size=SIZE)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(phrases=["a"])
    fresh.set_image(random_image(32, 32))
    with pytest.raises(ValueError, match="no prompt"):
        fresh.predict()
    with pytest.raises(TypeError, match="list of strings"):
        fresh.predict(phrases="a cat")
    with pytest.raises(ValueError, match="multiple of the patch size 16 of .*use 48 or 64"):
        Predictor(model, image_size=50)


def test_support_mask_of_another_size_is_an_error(predictor, tmp_path):
    support, _ = write_support(tmp_path)
    predictor.set_image(random_image(32, 32))
    with pytest.raises(ValueError, match="support image's size"):
        predictor.predict(support=[(support, np.ones((10, 10), dtype=bool))])


def test_batched_images_equal_one_at_a_time(predictor):
    images = [random_image(80, 50, seed=1), random_image(64, 40, seed=2), random_image(50, 90, seed=3)]
    batched = predictor.predict_batch(images, phrases=PHRASES, batch_size=2)  # first two share the 96x64 input
    for image, probs in zip(images, batched):
        predictor.set_image(image)
        assert probs.shape == (len(PHRASES), image.height, image.width)
        assert np.abs(probs - predictor.predict(phrases=PHRASES)).max() <= 1e-5


@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_is_bf16_only_where_the_cpu_has_it(model, monkeypatch, native_bf16):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native_bf16)
    image = random_image(80, 50)
    full, mixed = Predictor(model, image_size=SIZE), Predictor(model, image_size=SIZE, amp=True)
    full.set_image(image)
    mixed.set_image(image)
    reference, approximate = full.predict(phrases=PHRASES), mixed.predict(phrases=PHRASES)
    assert approximate.dtype == np.float32 and approximate.shape == reference.shape
    if native_bf16:
        assert 0 < np.abs(approximate - reference).max() < 0.05  # bf16 really ran, and stayed close
    else:
        assert np.array_equal(approximate, reference)  # emulated bf16 would only be slower: fp32


def test_in_memory_sixteen_bit_and_transparent_images_become_rgb():
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(load_image(sixteen))[0, :, 0], [0, 128, 255])  # scaled, not clipped
    half_transparent = Image.fromarray(np.array([[[200, 100, 50, 0], [200, 100, 50, 255]]], dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(load_image(half_transparent))[0], [[0, 0, 0], [200, 100, 50]])
