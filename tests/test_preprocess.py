"""preprocess.py: each rule equals its source (skimage's polygon2mask, F.interpolate, the HF processor, the
original's find_crop and crop_blur_highlight352), and images and masks are read robustly."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage.draw import polygon2mask

from clipseg import images
from clipseg.augment import choose_crop, random_crop_offsets
from clipseg.images import UnreadableImage, open_rgb, read_mask, upright_size
from clipseg.rasterise import RASTER_RULES, instances_to_mask, rasterise
from clipseg.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    NonFiniteOutput,
    full_size_probabilities,
    resize_mask,
    resize_pixels,
)
from clipseg.visual_prompts import gaussian_blur, support_prompt, visual_prompt

PIL = "phrasecut"


def skimage_union(polygons, height: int, width: int) -> np.ndarray:
    """The original CLIPSeg's ground truth: skimage polygon2mask per polygon, [x, y] swapped, logical max."""
    masks = [polygon2mask((height, width), np.asarray(p, dtype=float)[:, ::-1]) for p in polygons]
    return np.stack(masks).max(0) if masks else np.zeros((height, width), bool)


# ------------------------------------------------------------------------------- ground truth: polygon2mask

coordinate = st.floats(-8, 40, allow_nan=False, allow_infinity=False)
float_polygon = st.lists(st.tuples(coordinate, coordinate), min_size=1, max_size=12)
grid_polygon = st.lists(st.tuples(st.integers(-4, 70), st.integers(-4, 70)), min_size=1, max_size=10).map(
    lambda points: [(x / 2, y / 2) for x, y in points]  # integers and half-integers: vertices on pixels and edges
)


@settings(max_examples=300, deadline=None)
@given(st.lists(float_polygon | grid_polygon, min_size=1, max_size=4), st.integers(1, 33), st.integers(1, 33))
def test_polygon2mask_rule_equals_skimage(polygons, height, width):
    """Random float polygons (concave, self-intersecting, outside or touching the border, several per
    instance) and polygons on the pixel grid (vertices and edges through pixel centres)."""
    ours = rasterise(polygons, height, width, rule="polygon2mask")
    np.testing.assert_array_equal(ours, skimage_union(polygons, height, width))


def test_polygon2mask_rule_on_annotation_like_polygons():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 40))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(5, 120, n)
        centre = rng.uniform(0, 300, 2)
        points = np.round(centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1), 2)
        np.testing.assert_array_equal(rasterise([points], 240, 320), skimage_union([points], 240, 320))


def test_the_two_ground_truth_rules_differ_as_the_sources_do():
    square = [[[1.5, 1.5], [5.5, 1.5], [5.5, 5.5], [1.5, 5.5]]]
    original = rasterise(square, 8, 8, rule="polygon2mask")  # pixel centres 2..5 lie inside
    official = rasterise(square, 8, 8, rule=PIL)  # vertices truncated to 1 and 5, outline included
    assert original[2:6, 2:6].all() and original.sum() == 16
    assert official[1:6, 1:6].all() and official.sum() == 25
    circle = [[100 + 60 * np.cos(a), 80 + 45 * np.sin(a)] for a in np.linspace(0, 2 * np.pi, 50, endpoint=False)]
    counts = rasterise([circle], 200, 200).sum(), rasterise([circle], 200, 200, rule=PIL).sum()
    assert 0.9 < counts[0] / counts[1] < 1.0  # the original's rule draws fewer pixels
    with pytest.raises(ValueError, match="unknown rasterisation rule 'skimage'"):
        rasterise(square, 8, 8, rule="skimage")


# ---------------------------------------------------------------------------------- ground truth: PhraseCut


def test_rasterise_square_includes_outline_and_truncates_vertices():
    mask = rasterise([[[1.9, 1.2], [4.7, 1.0], [4.2, 4.9], [1.0, 4.5]]], height=7, width=8, rule=PIL)
    expected = np.zeros((7, 8), dtype=bool)
    expected[1:5, 1:5] = True  # vertices truncate to 1..4; fill + outline covers both edges
    assert mask.dtype == bool and mask.shape == (7, 8)
    np.testing.assert_array_equal(mask, expected)


def test_rasterise_triangle_by_hand():
    mask = rasterise([[[0, 0], [4, 0], [0, 4]]], height=5, width=5, rule=PIL)
    expected = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_instances_to_mask_is_union_of_all_polygons_of_all_instances():
    instances = [[[[0, 0], [1, 0], [1, 1], [0, 1]], [[5, 5], [6, 5], [6, 6], [5, 6]]], [[[8, 0], [9, 0], [9, 1]]]]
    mask = instances_to_mask(instances, height=10, width=10, rule=PIL)
    assert mask[0:2, 0:2].all() and mask[5:7, 5:7].all() and mask[0, 8:10].all()
    assert mask.sum() == 4 + 4 + 3


def test_phrasecut_rule_degenerate_and_outside_polygons():
    assert not rasterise([], 4, 4, rule=PIL).any()
    assert not rasterise([[[1, 1]]], 4, 4, rule=PIL).any()  # a single vertex cannot be drawn
    assert not rasterise([[[0, 0], [float("nan"), 2], [3, 3]]], 4, 4, rule=PIL).any()
    assert not rasterise([[[10, 10], [20, 10], [20, 20]]], 4, 4, rule=PIL).any()
    line = rasterise([[[0, 1], [3, 1]]], 4, 4, rule=PIL)  # two vertices: the official rule draws the outline
    assert line[1].all() and line.sum() == 4
    clipped = rasterise([[[-5, -5], [2, -5], [2, 2], [-5, 2]]], 4, 4, rule=PIL)
    assert clipped.sum() == 9


point = st.tuples(st.floats(0, 30, allow_nan=False), st.floats(0, 30, allow_nan=False))
polygon = st.lists(point, min_size=3, max_size=8)


@settings(max_examples=60, deadline=None)
@given(polygon)
def test_mask_lies_inside_the_polygons_bounding_box(points):
    mask = rasterise([points], height=32, width=32, rule=PIL)
    xs, ys = [int(x) for x, _ in points], [int(y) for _, y in points]
    rows, cols = np.nonzero(mask)
    assert len(rows) > 0
    assert rows.min() >= min(ys) and rows.max() <= max(ys)
    assert cols.min() >= min(xs) and cols.max() <= max(xs)


@settings(max_examples=40, deadline=None)
@given(st.lists(polygon, min_size=1, max_size=4), st.randoms(), st.sampled_from(RASTER_RULES))
def test_union_is_commutative_and_equals_or_of_parts(polygons, random, rule):
    shuffled = list(polygons)
    random.shuffle(shuffled)
    union = rasterise(polygons, 32, 32, rule=rule)
    np.testing.assert_array_equal(union, rasterise(shuffled, 32, 32, rule=rule))
    np.testing.assert_array_equal(union, np.any([rasterise([p], 32, 32, rule=rule) for p in polygons], axis=0))


# -------------------------------------------------------------------------------------------- training crop


def find_crop_reference(mask: np.ndarray, offsets, min_fraction=0.05):
    """The authors' find_crop(iterations=50, min_frac=0.05) as docs/original.md §5.6 states it, on given offsets."""
    height, width = mask.shape
    side = min(height, width)
    threshold = height * width * min_fraction
    best = (float("-inf"), None)
    for top, left in offsets:
        count = mask[top : top + side, left : left + side].sum()
        if count > threshold:
            return top, left, side
        if count > best[0]:
            best = (count, (top, left))
    return (*best[1], side)


def test_crop_rule_takes_the_first_offset_over_5_percent_of_the_whole_image():
    mask = np.zeros((100, 400), dtype=bool)
    mask[10:90, 300:340] = True  # 3200 pixels: 8% of the image
    # threshold 0.05 * 40,000 = 2,000 pixels: offset 0 keeps nothing, 220 keeps 1,600, 250 keeps 3,200
    assert choose_crop(mask, [(0, 0), (0, 220), (0, 250), (0, 300)]) == (0, 250, 100)
    # none passes: the first of the offsets keeping the most foreground
    assert choose_crop(mask, [(0, 0), (0, 215), (0, 220), (0, 10), (0, 220)]) == (0, 220, 100)
    small = np.zeros((100, 400), dtype=bool)
    small[40:50, 300:310] = True  # 100 pixels: below 5% of the image wherever the crop is: the best try wins
    assert choose_crop(small, [(0, 0), (0, 280), (0, 290)]) == (0, 280, 100)
    tall = np.zeros((300, 100), dtype=bool)
    tall[200:280, :] = True
    assert choose_crop(tall, [(0, 0), (190, 0)]) == (190, 0, 100)


def test_crop_rule_equals_the_reference_on_random_masks_and_offsets():
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(5, 60, 2))
        mask = rng.random((height, width)) < rng.uniform(0, 0.2)
        offsets = random_crop_offsets(rng, height, width, tries=int(rng.integers(1, 60))).tolist()
        assert choose_crop(mask, offsets) == find_crop_reference(mask, offsets)


def test_random_crop_offsets_are_uniform_along_the_long_axis_only():
    rng = np.random.default_rng(1)
    offsets = random_crop_offsets(rng, 40, 100)
    assert offsets.shape == (50, 2) and (offsets[:, 0] == 0).all() and (0 <= offsets[:, 1]).all()
    assert offsets[:, 1].max() <= 60 and len(set(offsets[:, 1])) > 20
    assert not random_crop_offsets(rng, 30, 30).any()


# ------------------------------------------------------------------------------------------------ resizing


def original_pipeline(array: np.ndarray, size: int) -> torch.Tensor:
    """The authors' image steps (docs/original.md §5.7): float image, interpolate bilinear align_corners=True,
    / 255, then torchvision's Normalize (subtract, divide)."""
    image = torch.from_numpy(np.array(array)).permute(2, 0, 1).unsqueeze(0).float()
    image = F.interpolate(image, (size, size), mode="bilinear", align_corners=True)[0] / 255.0
    return (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


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


def blur_reference(image: torch.Tensor) -> torch.Tensor:
    """cv2.GaussianBlur(15x15, sigma 3, BORDER_REFLECT_101) as a direct 2-D sum."""
    x = np.arange(15) - 7
    kernel = np.exp(-(x**2) / 18.0)
    kernel = np.outer(kernel, kernel) / kernel.sum() ** 2
    array = image.double().numpy()
    padded = np.pad(array, ((0, 0), (7, 7), (7, 7)), mode="reflect")  # numpy's reflect = reflect-101
    out = np.zeros_like(array)
    for dy in range(15):
        for dx in range(15):
            out += kernel[dy, dx] * padded[:, dy : dy + array.shape[1], dx : dx + array.shape[2]]
    return torch.from_numpy(out).float()


def test_blur_is_cv2s_gaussian_with_reflect_101_borders():
    image = torch.randn(3, 40, 30)
    torch.testing.assert_close(gaussian_blur(image), blur_reference(image), atol=1e-5, rtol=0)


def test_empty_mask_prompt_is_a_tenth_of_the_blurred_image():
    image = torch.randn(3, 64, 64)
    prompt = visual_prompt(image, torch.zeros(64, 64), size=64)
    torch.testing.assert_close(prompt, 0.1 * gaussian_blur(image), atol=1e-6, rtol=0)
    torch.testing.assert_close(prompt, 0.1 * blur_reference(image), atol=1e-5, rtol=0)


def test_visual_prompt_crops_blurs_and_pads():
    image = torch.randn(3, 100, 100)
    mask = torch.zeros(100, 100)
    mask[40:60, 20:80] = 1  # 20 x 60 box, grown by 10%: rows 38..62, cols 14..86 -> 24 x 72, padded to 72 x 72
    prompt = visual_prompt(image, mask, size=72)
    assert prompt.shape == (3, 72, 72)
    assert torch.equal(prompt[:, :24], torch.zeros(3, 24, 72))  # top padding of (72 - 24) / 2 rows
    assert torch.equal(prompt[:, 24 + 2 : 24 + 22, 6:66], image[:, 40:60, 20:80])  # object kept as is
    torch.testing.assert_close(prompt[:, 24, :], 0.1 * gaussian_blur(image)[:, 38, 14:86])  # context: 10% blurred
    with pytest.raises(ValueError, match="must match"):
        visual_prompt(image, torch.zeros(10, 10))


def test_visual_prompt_box_grows_by_a_tenth_of_its_extent_truncated_and_clamped():
    image = torch.randn(3, 50, 50)
    mask = np.zeros((50, 50), dtype=bool)
    mask[3:10, 41:48] = True  # rows/cols 3..9 and 41..47; 7 wide: each side grows by 0.7, truncated
    prompt = visual_prompt(image, mask, size=8)  # int(3 - 0.7) = 2, int(10 + 0.7) = 10: rows 2..9, cols 40..47
    composite = image * torch.from_numpy(mask) + 0.1 * gaussian_blur(image) * ~torch.from_numpy(mask)
    torch.testing.assert_close(prompt, composite[:, 2:10, 40:48])


def test_support_prompt_reads_files_and_checks_sizes(tmp_path):
    array = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "support.png")
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    transform = ImageTransform("original", 32)
    prompt = support_prompt(tmp_path / "support.png", tmp_path / "mask.png", transform)
    expected = visual_prompt(transform.pixels(Image.fromarray(array)), transform.mask(mask > 0), size=32)
    assert torch.equal(prompt, expected)
    Image.fromarray(mask[:20]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="support mask is 60x20 but its image is 60x40"):
        support_prompt(tmp_path / "support.png", tmp_path / "small.png", transform)


# ------------------------------------------------------------------------------------------- masks, logits


@pytest.mark.parametrize(
    "values, expected, binary",
    [
        ([[0, 1], [1, 0]], [[0, 1], [1, 0]], True),
        ([[0, 255], [255, 0]], [[0, 1], [1, 0]], True),
        ([[0, 100], [100, 0]], [[0, 1], [1, 0]], True),  # a mask that is not white still has its object
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], True),
        ([[0, 250], [120, 130]], [[0, 1], [0, 1]], False),  # soft: at least half the maximum
    ],
)
def test_read_mask_rule(tmp_path, values, expected, binary):
    array = np.array(values, dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "mask.png")
    for source in (tmp_path / "mask.png", Image.fromarray(array), array):
        mask, was_binary = read_mask(source)
        np.testing.assert_array_equal(mask, np.array(expected, dtype=bool))
        assert was_binary == binary


def test_read_mask_colour_sixteen_bit_and_bad_files(tmp_path):
    blue = np.zeros((4, 4, 3), np.uint8)
    blue[1:3, 1:3] = (0, 0, 255)  # a blue object on black: its luminance is only 29
    Image.fromarray(blue).save(tmp_path / "blue.png")
    assert read_mask(tmp_path / "blue.png")[0].sum() == 4
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "deep.png")[0], [[False, True]])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty.png: empty file"):
        read_mask(tmp_path / "empty.png")


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


def solid(mode: str, value, size=(6, 4)) -> Image.Image:
    return Image.new(mode, size, value)


@pytest.mark.parametrize(
    "image, suffix, expected",
    [
        (solid("L", 100), ".png", (100, 100, 100)),
        (solid("RGBA", (200, 10, 10, 0)), ".png", (0, 0, 0)),
        (solid("RGBA", (200, 10, 10, 255)), ".png", (200, 10, 10)),
        (solid("CMYK", (0, 255, 255, 0)), ".jpg", (255, 0, 0)),
        (solid("I;16", 65535), ".png", (255, 255, 255)),
        (solid("RGB", (1, 2, 3), size=(1, 1)), ".png", (1, 2, 3)),
    ],
    ids=["grayscale", "transparent", "opaque-rgba", "cmyk", "16-bit", "1x1"],
)
def test_open_rgb_converts_modes(tmp_path, image, suffix, expected):
    path = tmp_path / f"image{suffix}"
    image.save(path)
    rgb = open_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == image.size
    np.testing.assert_allclose(np.asarray(rgb)[0, 0], expected, atol=3)


def test_open_rgb_palette_and_exif_rotation(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "palette.png"))[0, 0], (10, 200, 30))
    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(wide).save(tmp_path / "rotated.png", exif=exif)
    upright = np.asarray(open_rgb(tmp_path / "rotated.png"))
    assert upright.shape == (8, 4, 3)
    assert (upright[:4, :, 0] == 255).all() and (upright[4:, :, 0] == 0).all()  # left half became the top
    assert upright_size(tmp_path / "rotated.png") == (4, 8)


def test_open_rgb_refuses_decompression_bombs(tmp_path, monkeypatch):
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(UnreadableImage, match="big.png: too large"):
        open_rgb(tmp_path / "big.png")
