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
    full = Predictor(model, image_size=SIZE)
    if native_bf16:
        mixed = Predictor(model, image_size=SIZE, amp=True)
    else:
        with pytest.warns(UserWarning, match="this cpu has no native bf16 .* so the model runs in fp32"):
            mixed = Predictor(model, image_size=SIZE, amp=True)
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


# ------------------------------------------------------------------------------------------------ masks


@pytest.fixture
def vision_passes(model):
    """Input shapes (B, 3, H, W) of every run of the vision tower, recorded by a hook on its patch embedding."""
    shapes = []
    hook = model.clip.vision_model.embeddings.patch_embedding.register_forward_hook(
        lambda module, inputs, output: shapes.append(tuple(inputs[0].shape))
    )
    yield shapes
    hook.remove()


def test_all_phrases_of_all_expressions_come_from_one_image_encoding(predictor, vision_passes):
    image = random_image(96, 64, seed=3)
    predictor.set_image(image)
    expressions = ["a red circle | the blue square - sky:0.5", "(sky & grass) | a red circle", "grass"]
    found = predictor.predict_masks(expressions)
    assert vision_passes == [(1, 3, SIZE, 96)]  # set_image's pass; predict_masks added none
    red, blue, sky, grass = predictor.predict(phrases=["a red circle", "the blue square", "sky", "grass"])
    expected = [
        np.maximum(red, np.minimum(blue, 1 - np.clip(0.5 * sky, 0, 1))),
        np.maximum(np.minimum(sky, grass), red),
        grass,
    ]
    assert found.probs.shape == (3, 64, 96)
    np.testing.assert_allclose(found.probs, np.stack(expected), atol=1e-6)
    np.testing.assert_array_equal(found.masks, found.probs > 0.3)
    assert (found.threshold, found.threshold_source) == (0.3, "paper")
    assert found.summary()["expressions"][0]["expression"]["phrases"] == ["a red circle", "the blue square", "sky"]


def test_mask_options_and_a_given_threshold_apply_at_the_original_size(predictor):
    from scipy import ndimage

    from clipseg.postprocess import MaskOptions

    predictor.set_image(random_image(80, 48, seed=4))
    probs = predictor.predict(phrases=["a red circle"])[0]
    threshold = float(np.quantile(probs, 0.7))
    found = predictor.predict_masks(["a red circle"], threshold, MaskOptions(threshold=0.99, grow=2, instances=True))
    assert (found.threshold, found.threshold_source) == (threshold, "given")
    disk = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2
    grown = ndimage.binary_dilation(probs > threshold, disk)
    np.testing.assert_array_equal(found.masks[0], grown)
    labels, count = ndimage.label(grown, np.ones((3, 3)))
    assert len(found.instances[0]) == count
    assert sorted(i.area for i in found.instances[0]) == sorted(np.bincount(labels.ravel())[1:].tolist())


def test_tiled_masks_encode_each_window_once_and_blend_them(model, predictor, vision_passes):
    from clipseg.tiling import tile_windows, tiled_probabilities

    image = random_image(160, 96, seed=5)
    windows = tile_windows(96, 160, SIZE, 16)
    assert len(windows) > 2
    predictor.set_image(image, encode=False)
    found = predictor.predict_masks(["a red circle | sky", "sky"], tile=SIZE, tile_overlap=16)
    assert vision_passes == [(1, 3, SIZE, SIZE)] * len(windows)  # one pass per window, none of the whole image

    reference = Predictor(model, image_size=SIZE)

    def window(crop):
        reference.set_image(crop)
        return reference.predict(phrases=["a red circle", "sky"])

    red, sky = tiled_probabilities(np.asarray(image), window, SIZE, 16)
    np.testing.assert_allclose(found.probs, np.stack([np.maximum(red, sky), sky]), atol=1e-6)

    vision_passes.clear()
    predictor.predict_masks(["sky"], tile=SIZE, tile_overlap=16, tile_context=0.25)
    assert vision_passes == [(1, 3, SIZE, SIZE)] * len(windows) + [
        (1, 3, SIZE, predictor.input_size[0])
    ]  # + the whole image


def test_predict_masks_errors(predictor):
    from clipseg.expressions import ExpressionError

    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(predictor.model, image_size=SIZE).predict_masks(["sky"])
    predictor.set_image(random_image(64, 64))
    with pytest.raises(ExpressionError, match="column"):
        predictor.predict_masks(["sky | (grass"])
    with pytest.raises(ValueError, match="refine"):
        predictor.predict_masks(["sky"], refine="sharpen")
    with pytest.raises(ValueError, match="SamRefiner"):
        predictor.predict_masks(["sky"], refine="sam")
    with pytest.raises(ValueError, match="no expression"):
        predictor.predict_masks([])


def test_the_default_threshold_is_the_models_calibrated_one_else_the_papers(model, tmp_path):
    from dataclasses import replace

    predictor = Predictor(model, image_size=SIZE)
    assert predictor.default_threshold() == (0.3, "paper")
    predictor.set_image(random_image(64, 48, seed=6))
    found = predictor.predict_masks(["sky"])
    assert (found.threshold, found.threshold_source) == (0.3, "paper") and "paper" in found.threshold_note

    calibrated = CLIPSeg(replace(model.config, threshold=0.62, threshold_origin="validation of iteration 400"))
    calibrated.load_state_dict(model.state_dict())
    loaded = CLIPSeg.from_pretrained(calibrated.save_pretrained(tmp_path / "calibrated"))
    assert loaded.config.threshold == 0.62
    predictor = Predictor(loaded, image_size=SIZE)
    assert predictor.default_threshold() == (0.62, "calibrated")
    predictor.set_image(random_image(64, 48, seed=6))
    found = predictor.predict_masks(["sky"])
    assert (found.threshold, found.threshold_source) == (0.62, "calibrated")
    note = found.summary()["threshold"]["note"]
    assert note == "threshold 0.62 (calibrated, from the model's config: validation of iteration 400)"
    np.testing.assert_array_equal(found.masks[0], predictor.predict(phrases=["sky"])[0] > 0.62)
    found = predictor.predict_masks(["sky"], threshold=0.1)
    assert (found.threshold, found.threshold_source) == (0.1, "given")
