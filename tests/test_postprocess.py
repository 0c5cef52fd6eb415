"""clipseg/postprocess.py: grow, shrink, fill holes, minimum area and instances against their scipy.ndimage
references, the feathered edge against hand-computed ramps, and `make_mask` against the same steps composed by hand
in the documented order."""

import json

import numpy as np
import pytest
from scipy import ndimage

from clipseg.postprocess import (
    PAPER_THRESHOLD,
    MaskOptions,
    disk,
    feather_mask,
    fill_holes,
    find_instances,
    grow,
    make_mask,
    remove_small,
    resolve_threshold,
    shrink,
)

EIGHT = np.ones((3, 3), dtype=bool)


def blobs(seed: int, shape=(60, 80), smooth: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random probabilities (H, W) and their mask at 0.5: blobs of varied size, some touching the border."""
    noise = np.random.default_rng(seed).normal(size=shape)
    field = ndimage.gaussian_filter(noise, smooth)
    probs = 1 / (1 + np.exp(-field / field.std() * 2))
    return probs.astype(np.float32), probs > 0.5


def test_disk_is_the_pixels_within_the_radius():
    expected = np.array(
        [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=bool
    )
    np.testing.assert_array_equal(disk(2), expected)
    assert disk(0).tolist() == [[True]]
    assert disk(5).sum() == 81  # the lattice points of a disk of radius 5


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 5, 8])
def test_grow_equals_binary_dilation_with_the_disk(radius):
    for seed in range(3):
        _, mask = blobs(seed)
        expected = ndimage.binary_dilation(mask, disk(radius)) if radius else mask
        np.testing.assert_array_equal(grow(mask, radius), expected)
    assert not grow(np.zeros((5, 5), bool), 3).any()


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 5, 8])
def test_shrink_equals_binary_erosion_with_the_disk_the_border_not_an_edge(radius):
    for seed in range(3):
        _, mask = blobs(seed)
        expected = ndimage.binary_erosion(mask, disk(radius), border_value=1) if radius else mask
        np.testing.assert_array_equal(shrink(mask, radius), expected)
    assert shrink(np.ones((5, 5), bool), 2).all()
    edge = np.zeros((10, 10), bool)
    edge[:, :4] = True  # touches the left border: only its right side moves
    np.testing.assert_array_equal(shrink(edge, 1), np.pad(np.ones((10, 3), bool), ((0, 0), (0, 7))))


def test_a_small_object_far_from_the_border_grows_shrinks_and_feathers_as_on_the_whole_image():
    mask = np.zeros((80, 100), bool)
    mask[30:45, 40:60] = blobs(8, shape=(15, 20), smooth=2.0)[1] | (np.arange(20) % 7 == 0)  # ragged, with holes
    for radius in (1, 3, 6):
        np.testing.assert_array_equal(grow(mask, radius), ndimage.binary_dilation(mask, disk(radius)))
        np.testing.assert_array_equal(shrink(mask, radius), ndimage.binary_erosion(mask, disk(radius), border_value=1))
    inside = ndimage.distance_transform_edt(mask) - 0.5
    outside = ndimage.distance_transform_edt(~mask) - 0.5
    expected = np.clip(0.5 + np.where(mask, inside, -outside) / 6, 0, 1)
    np.testing.assert_allclose(feather_mask(mask, 6), expected, atol=1e-6)


def test_fill_holes_equals_binary_fill_holes():
    for seed in range(3):
        _, mask = blobs(seed, smooth=1.5)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    assert fill_holes(ring)[3:6, 3:6].all()
    ring[4, 2] = False  # the hole opens to the outside: not a hole any more
    np.testing.assert_array_equal(fill_holes(ring), ring)
    ring[4, 2], ring[2, 2] = True, False  # a gap at a corner touches the hole only diagonally: still a hole
    assert fill_holes(ring)[4, 4]


def reference_remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=EIGHT)
    out = np.zeros_like(mask)
    for k in range(1, count + 1):
        if (labels == k).sum() >= min_area:
            out |= labels == k
    return out


@pytest.mark.parametrize("min_area", [0, 1, 2, 10, 50, 400])
def test_remove_small_equals_the_reference_on_8_connected_components(min_area):
    for seed in range(3):
        _, mask = blobs(seed, smooth=1.5)
        np.testing.assert_array_equal(remove_small(mask, min_area), reference_remove_small(mask, min_area))
    diagonal = np.zeros((4, 4), bool)
    diagonal[0, 0] = diagonal[1, 1] = True  # one component of 2 pixels (8-connected)
    assert remove_small(diagonal, 2).sum() == 2 and remove_small(diagonal, 3).sum() == 0


def three_blobs() -> tuple[np.ndarray, np.ndarray]:
    """A 20 x 30 map: a 6x6 square (p 0.6), a 3x8 bar (p 0.9, peak 0.95 at x=22, y=3) and a 2x2 dot (p 0.99)."""
    probs = np.zeros((20, 30), np.float32)
    probs[10:16, 2:8] = 0.6
    probs[2:5, 15:23] = 0.9
    probs[3, 22] = 0.95
    probs[17:19, 27:29] = 0.99
    return probs, probs > 0.5


def test_instances_by_area_and_by_score_with_their_records():
    probs, mask = three_blobs()
    labels, instances = find_instances(mask, probs, "area")
    assert [i.area for i in instances] == [36, 24, 4] and [i.label for i in instances] == [1, 2, 3]
    square, bar, dot = instances
    assert square.box == (2, 10, 8, 16) and square.coco_bbox == [2, 10, 6, 6] and square.score == pytest.approx(0.6)
    assert bar.box == (15, 2, 23, 5) and bar.peak == (22, 3) and bar.max_score == pytest.approx(0.95)
    assert bar.score == pytest.approx((23 * 0.9 + 0.95) / 24)
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(labels == 1, probs == np.float32(0.6))
    np.testing.assert_array_equal(labels == 3, probs == np.float32(0.99))
    _, by_score = find_instances(mask, probs, "score")
    assert [i.area for i in by_score] == [4, 24, 36]
    kept, best_two = find_instances(mask, probs, "score", max_instances=2)
    assert [i.area for i in best_two] == [4, 24] and (kept > 0).sum() == 28 and kept.max() == 2
    boxes = ndimage.find_objects(ndimage.label(mask, structure=EIGHT)[0])
    assert sorted(i.box for i in instances) == sorted((c.start, r.start, c.stop, r.stop) for r, c in boxes)


def test_instances_of_an_empty_mask():
    labels, instances = find_instances(np.zeros((4, 5), bool), np.zeros((4, 5), np.float32))
    assert instances == [] and labels.shape == (4, 5) and not labels.any()


def test_feather_ramps_across_a_straight_edge_as_computed_by_hand():
    mask = np.zeros((5, 20), bool)
    mask[:, :10] = True  # the edge lies between columns 9 and 10
    soft = feather_mask(mask, 4)
    # column 9 is 0.5 px inside: 0.5 + 0.5 / 4; column 10 is 0.5 px outside: 0.5 - 0.5 / 4
    expected = [1, 1, 1, 1, 1, 1, 1, 1, 0.875, 0.625, 0.375, 0.125, 0, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(soft, np.tile(expected, (5, 1)), atol=1e-6)
    assert soft.dtype == np.float32


@pytest.mark.parametrize("width", [1, 3, 7.5, 20])
def test_feather_is_one_deep_inside_zero_far_outside_and_above_half_exactly_on_the_mask(width):
    _, mask = blobs(4)
    soft = feather_mask(mask, width)
    assert soft.min() >= 0 and soft.max() <= 1
    np.testing.assert_array_equal(soft > 0.5, mask)
    deep = ndimage.distance_transform_edt(mask) >= width / 2 + 0.5
    far = ndimage.distance_transform_edt(~mask) >= width / 2 + 0.5
    assert deep.any() and far.any()
    assert np.all(soft[deep] == 1) and np.all(soft[far] == 0)
    assert np.all(soft[mask & ~deep] < 1) and np.all(soft[~mask & ~far] > 0)


def test_feather_zero_and_trivial_masks_are_hard():
    _, mask = blobs(5)
    np.testing.assert_array_equal(feather_mask(mask, 0), mask.astype(np.float32))
    assert feather_mask(np.ones((3, 3), bool), 5).min() == 1
    assert feather_mask(np.zeros((3, 3), bool), 5).max() == 0


@pytest.mark.parametrize(
    "options",
    [
        MaskOptions(),
        MaskOptions(threshold=0.4, grow=3),
        MaskOptions(threshold=0.6, shrink=2, grow=2, fill_holes=True),
        MaskOptions(threshold=0.45, shrink=1, fill_holes=True, min_area=30, feather=5),
        MaskOptions(threshold=0.5, grow=1, min_area=10, instances=True, sort_by="score", max_instances=3),
    ],
)
def test_make_mask_applies_the_steps_in_the_documented_order(options):
    probs, _ = blobs(7, shape=(70, 90), smooth=2.0)
    mask = probs > options.threshold
    if options.shrink:
        mask = ndimage.binary_erosion(mask, disk(options.shrink), border_value=1)
    if options.grow:
        mask = ndimage.binary_dilation(mask, disk(options.grow))
    if options.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    mask = reference_remove_small(mask, options.min_area)
    if options.max_instances:
        labels, _ = find_instances(mask, probs, options.sort_by, options.max_instances)
        mask = labels > 0
    result = make_mask(probs, options)
    np.testing.assert_array_equal(result.mask, mask)
    np.testing.assert_array_equal(result.soft, feather_mask(mask, options.feather))
    assert result.threshold == options.threshold
    assert (result.labels is not None) == options.instances
    if options.instances:
        assert len(result.instances) == 3 and [m.sum() for m in result.instance_masks()] == [
            i.area for i in result.instances
        ]
        scores = [i.score for i in result.instances]
        assert scores == sorted(scores, reverse=True)
    json.dumps(result.summary(), allow_nan=False)


def test_make_mask_from_a_start_mask_scores_instances_by_the_probabilities():
    probs, mask = three_blobs()
    start = np.zeros_like(mask)
    start[10:16, 2:9] = True  # the square, one column wider, as a refinement might give it
    result = make_mask(probs, MaskOptions(threshold=0.99, grow=1, instances=True), start=start)
    np.testing.assert_array_equal(result.mask, ndimage.binary_dilation(start, disk(1)))
    assert [i.area for i in result.instances] == [int(result.mask.sum())]
    assert result.instances[0].score == pytest.approx(probs[result.mask].mean())
    with pytest.raises(ValueError, match="start mask of shape"):
        make_mask(probs, MaskOptions(), start=mask[:5])


def test_make_mask_thresholds_strictly():
    probs = np.array([[0.3, 0.30001, 0.0, 1.0]], np.float32)
    assert make_mask(probs).mask.tolist() == [[False, True, False, True]]


def test_make_mask_refuses_what_is_not_a_probability_map():
    for bad in (np.full((3, 3), np.nan), np.full((3, 3), 1.2), np.zeros((2, 3, 3))):
        with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
            make_mask(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"grow": -1}, "grow"),
        ({"shrink": 1.5}, "shrink"),
        ({"min_area": True}, "min_area"),
        ({"feather": float("nan")}, "feather"),
        ({"grow": 10**9}, "grow must be a whole number of pixels from 0 to 100000, got 1000000000"),
        ({"feather": 1e308}, "feather must be a width in pixels from 0 to 100000"),
        ({"min_area": 10**300}, "min_area must be a whole number of pixels from 0 to 1099511627776"),
        ({"sort_by": "size"}, "sort_by"),
        ({"max_instances": 0}, "max_instances"),
    ],
)
def test_mask_options_refuse_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskOptions(**kwargs)


def test_mask_options_defaults_and_dict():
    assert MaskOptions().to_dict() == {
        "threshold": PAPER_THRESHOLD,
        "grow": 0,
        "shrink": 0,
        "feather": 0.0,
        "fill_holes": False,
        "min_area": 0,
        "instances": False,
        "sort_by": "area",
        "max_instances": None,
    }


def test_resolve_threshold_prefers_the_given_then_the_calibrated_then_the_papers():
    assert resolve_threshold(0.45, 0.2) == (0.45, "given")
    assert resolve_threshold(None, 0.2) == (0.2, "calibrated")
    assert resolve_threshold(None, None) == (0.3, "paper")
    assert resolve_threshold(0.0, None) == (0.0, "given")
