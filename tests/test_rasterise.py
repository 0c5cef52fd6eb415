"""clipseg/rasterise.py: both ground-truth rules equal their sources (skimage's polygon2mask; PhraseCut's PIL fill
and outline), by hand, on annotation-like polygons and as properties."""

import numpy as np
import pytest
from helpers import skimage_union
from hypothesis import given, settings
from hypothesis import strategies as st

from clipseg.rasterise import RASTER_RULES, instances_to_mask, rasterise

PIL = "phrasecut"


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


@pytest.mark.parametrize("rule", RASTER_RULES)
def test_far_out_coordinates_are_skipped_without_overflow(rule, recwarn):
    """A vertex at 1e30 is corrupt data: casting it to pixels overflowed (a RuntimeWarning, and under the PhraseCut
    rule a one-pixel mask). Such a polygon draws nothing; the others of the union still draw."""
    square = [[1, 1], [2, 1], [2, 2], [1, 2]]
    mask = rasterise([[[0, 0], [1e30, 0], [0, 1e30]], square], 6, 8, rule=rule)
    assert mask.sum() == 4 and mask[1:3, 1:3].all()
    assert not [warning for warning in recwarn if issubclass(warning.category, RuntimeWarning)]


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
