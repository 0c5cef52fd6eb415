"""clipseg.drawing: overlays blend each mask in its colour, draw its contour and a legend."""

import numpy as np
from PIL import Image

from clipseg.drawing import PALETTE, draw_overlay


def test_overlay_blends_each_mask_in_its_colour_with_a_legend():
    image = Image.new("RGB", (200, 120), (0, 0, 0))
    first, second = np.zeros((120, 200), dtype=bool), np.zeros((120, 200), dtype=bool)
    first[60:, :100] = True
    second[60:, 100:] = True
    overlay = np.asarray(draw_overlay(image, [first, second], ["cat", "sofa"]))
    np.testing.assert_array_equal(overlay[100, 50], np.round(0.5 * np.array(PALETTE[0])))
    np.testing.assert_array_equal(overlay[100, 150], np.round(0.5 * np.array(PALETTE[1])))
    np.testing.assert_array_equal(overlay[60, 50], PALETTE[0])  # solid contour on the mask's border ...
    np.testing.assert_array_equal(overlay[119, 50], np.round(0.5 * np.array(PALETTE[0])))  # ... not the image's
    assert not overlay[40:60, 120:].any()  # unmasked and away from the legend: untouched
    legend = overlay[:30, :60]
    assert (legend == 255).all(axis=-1).any()  # white label text
    assert (legend == np.array(PALETTE[0])).all(axis=-1).any() and (legend == np.array(PALETTE[1])).all(axis=-1).any()
