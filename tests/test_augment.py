"""clipseg/augment.py: the training crop is the original's find_crop(iterations=50, min_frac=0.05)."""

import numpy as np
from helpers import find_crop_reference

from clipseg.augment import choose_crop, random_crop_offsets


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
