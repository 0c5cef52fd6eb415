"""clipseg/tiling.py: windows cover every pixel, the blending weights sum to 1, an image that fits one tile gives
the single pass, a model with constant (or window-independent) output gives the single-pass map without seams, and
the context pass is mixed in by its weight."""

import numpy as np
import pytest
from PIL import Image

from clipseg.tiling import (
    MAX_WINDOWS,
    TooManyWindows,
    Window,
    default_overlap,
    should_tile,
    tile_windows,
    tiled_probabilities,
    window_starts,
    window_weights,
)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def crop_model(crop: np.ndarray) -> np.ndarray:
    """A fake whose output depends on the whole crop (its mean) and on where a pixel is in it: (2, h, w)."""
    h, w = crop.shape[:2]
    position = np.add.outer(np.arange(h) / max(h, 1), np.arange(w) / max(w, 1)) / 2
    return np.stack([position, np.full((h, w), crop.mean() / 255)]).astype(np.float32)


def pixel_model(crop: np.ndarray) -> np.ndarray:
    """A fake whose output at a pixel depends on that pixel only: (1, h, w)."""
    return (crop[None, :, :, 0] / 255.0).astype(np.float32)


def test_window_starts_step_by_the_stride_and_end_flush():
    assert window_starts(1000, 352, 88) == [0, 264, 528, 648]
    assert window_starts(352, 352, 88) == [0] and window_starts(100, 352, 88) == [0]
    assert window_starts(353, 352, 0) == [0, 1]


@pytest.mark.parametrize("shape, tile, overlap", [((1000, 700), 352, 88), ((353, 2000), 352, 0), ((90, 60), 32, 31)])
def test_windows_cover_every_pixel_and_stay_inside(shape, tile, overlap):
    height, width = shape
    windows = tile_windows(height, width, tile, overlap)
    covered = np.zeros(shape, dtype=int)
    for w in windows:
        assert 0 <= w.top < w.bottom <= height and 0 <= w.left < w.right <= width
        assert w.bottom - w.top == min(tile, height) and w.right - w.left == min(tile, width)
        covered[w.slices] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("shape, tile, overlap", [((1000, 700), 352, 88), ((500, 353), 352, 0), ((90, 60), 32, 31)])
def test_normalised_weights_sum_to_one_and_are_positive_on_each_window(shape, tile, overlap):
    windows = tile_windows(*shape, tile, overlap)
    weights = window_weights(windows, *shape, overlap)
    total = np.zeros(shape)
    for window, weight in zip(windows, weights):
        assert weight.shape == (window.bottom - window.top, window.right - window.left) and weight.min() > 0
        total[window.slices] += weight
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_weights_ramp_linearly_across_a_shared_side():
    windows = tile_windows(1, 12, 8, 4)  # columns 0-7 and 4-11 share columns 4-7
    first, second = window_weights(windows, 1, 12, 4)
    np.testing.assert_allclose(first[0], [1, 1, 1, 1, 0.875, 0.625, 0.375, 0.125])
    np.testing.assert_allclose(second[0], [0.125, 0.375, 0.625, 0.875, 1, 1, 1, 1])


@pytest.mark.parametrize("shape", [(352, 352), (200, 300), (352, 100)])
def test_an_image_that_fits_one_tile_gives_the_single_pass(shape):
    pixels = image(*shape)
    np.testing.assert_array_equal(tiled_probabilities(pixels, crop_model, 352, 88), crop_model(pixels))


def test_a_constant_model_gives_a_constant_map():
    def constant(crop):
        return np.full((2, *crop.shape[:2]), [[[0.25]], [[0.8]]], dtype=np.float32)

    probs = tiled_probabilities(image(1000, 777), constant, 352, 88)
    assert probs.shape == (2, 1000, 777)
    np.testing.assert_allclose(probs[0], 0.25, atol=1e-6)
    np.testing.assert_allclose(probs[1], 0.8, atol=1e-6)


@pytest.mark.parametrize("overlap", [0, 40, 88, 300])
def test_a_window_independent_model_gives_the_single_pass_map(overlap):
    pixels = image(900, 1300, seed=1)
    np.testing.assert_allclose(tiled_probabilities(pixels, pixel_model, 352, overlap), pixel_model(pixels), atol=1e-6)


def test_blending_leaves_no_seam_where_windows_disagree():
    pixels = image(700, 700, seed=2)
    probs = tiled_probabilities(pixels, crop_model, 352, 88)[0]
    # the fake's position ramp drops by about 0.4 at a window edge; blended, steps stay as small as the ramp's
    steps = max(np.abs(np.diff(probs, axis=0)).max(), np.abs(np.diff(probs, axis=1)).max())
    assert steps < 0.02
    hard = np.zeros_like(probs)  # the same windows pasted without blending: a seam
    for window in tile_windows(700, 700, 352, 88):
        hard[window.slices] = crop_model(pixels[window.slices])[0]
    assert np.abs(np.diff(hard, axis=1)).max() > 0.3


def test_the_context_pass_is_mixed_in_by_its_weight_after_one_call_per_window():
    calls = []

    def fake(crop):
        calls.append(crop.shape[:2])
        value = 0.9 if crop.shape[:2] == (800, 600) else 0.1
        return np.full((1, *crop.shape[:2]), value, dtype=np.float32)

    probs = tiled_probabilities(Image.fromarray(image(800, 600)), fake, 352, 88, context=0.25)
    np.testing.assert_allclose(probs, 0.75 * 0.1 + 0.25 * 0.9, atol=1e-6)
    assert len(calls) == len(tile_windows(800, 600, 352, 88)) + 1 and calls[-1] == (800, 600)


def test_the_crops_are_the_windows_pixels():
    pixels, seen = image(400, 500, seed=3), []

    def fake(crop):
        seen.append(crop.copy())
        return np.zeros((1, *crop.shape[:2]), dtype=np.float32)

    tiled_probabilities(pixels, fake, 256, 64)
    windows = tile_windows(400, 500, 256, 64)
    assert len(seen) == len(windows)
    for crop, window in zip(seen, windows):
        np.testing.assert_array_equal(crop, pixels[window.slices])


def test_bad_model_outputs_and_settings_are_errors():
    pixels = image(500, 500)
    with pytest.raises(ValueError, match=r"window \(0, 0, 352, 352\): expected \(K, 352, 352\)"):
        tiled_probabilities(pixels, lambda crop: np.zeros((1, 10, 10)), 352, 88)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        tiled_probabilities(pixels, lambda crop: np.full((1, *crop.shape[:2]), np.nan), 352, 88)
    counts = iter([1, 2, 2, 2])
    with pytest.raises(ValueError, match="2 maps, the first window gave 1"):
        tiled_probabilities(pixels, lambda crop: np.zeros((next(counts), *crop.shape[:2])), 352, 88)
    for tile, overlap in ((0, 0), (352, 352), (352, -1), (352, 8.5)):
        with pytest.raises(ValueError, match="tile side|overlap"):
            tiled_probabilities(pixels, pixel_model, tile, overlap)
    with pytest.raises(ValueError, match="context"):
        tiled_probabilities(pixels, pixel_model, 352, 88, context=1.0)


def test_an_image_of_too_many_windows_is_refused_before_any_is_predicted():
    calls = []

    def counting(crop: np.ndarray) -> np.ndarray:
        calls.append(crop.shape)
        return pixel_model(crop)

    width = 16 * MAX_WINDOWS  # windows of 16 without overlap: exactly the most
    assert tiled_probabilities(image(1, width), counting, 16, 0).shape == (1, 1, width) and len(calls) == MAX_WINDOWS
    calls.clear()
    with pytest.raises(TooManyWindows, match=rf"this {width + 1} x 1 image in windows of 16 px takes 4,097 windows"):
        tiled_probabilities(image(1, width + 1), counting, 16, 0)
    assert calls == []


def test_should_tile_when_the_short_side_is_twice_the_models_input_or_more():
    assert not should_tile(600, 4000, 352) and should_tile(704, 1000, 352) and should_tile(2048, 2048, 352)
    assert should_tile(1000, 1000, 352, factor=2.5) is True and should_tile(800, 1000, 352, factor=2.5) is False
    assert default_overlap(352) == 88
    assert Window(1, 2, 3, 4).box == (2, 1, 4, 3)
