"""clipseg/mask_gallery.py: one small PNG per step of the mask pipeline, each showing the pipeline's own masks."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from clipseg.mask_gallery import CELL, GAP, MAX_INSTANCES, STEPS, components, main


@pytest.fixture(scope="module")
def pictures(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("masks")
    return folder, main(["--model", str(tiny_checkpoint("gallery", image_size=64)), "--out", str(folder)])


def test_one_png_per_step_with_its_name_size_and_a_small_file(pictures):
    folder, found = pictures
    assert list(found) == list(STEPS)
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"{step}.png" for step in STEPS)
    for step, picture in found.items():
        assert picture.path == folder / f"{step}.png"
        with Image.open(picture.path) as image:
            assert image.format == "PNG" and image.mode == "P"  # saved with a reduced palette
            assert image.size == picture.size
        # three cells of CELL px a row, the tiles' two of 1.5 CELL, with a gap around each
        assert picture.size[0] == (2 * (3 * CELL // 2) + 3 * GAP if step == "tiles" else 3 * CELL + 4 * GAP)
        assert picture.path.stat().st_size < 150_000
    assert sum(picture.path.stat().st_size for picture in found.values()) < 1_000_000


def test_the_panels_show_the_pipelines_masks(pictures):
    _, found = pictures
    steps = found["grow_shrink"].masks
    assert steps["shrink"].sum() < steps["threshold"].sum() < steps["grow"].sum()
    assert not (steps["shrink"] & ~steps["threshold"]).any() and not (steps["threshold"] & ~steps["grow"]).any()
    logic = found["expressions"].masks  # max(a, b) > t iff a > t or b > t; min(a, b) > t iff both
    np.testing.assert_array_equal(logic["or"], logic["a"] | logic["b"])
    np.testing.assert_array_equal(logic["and"], logic["a"] & logic["b"])
    areas, min_area = found["min_area"].masks, found["min_area"].options["min_area"]
    labels, _ = ndimage.label(areas["threshold"], structure=np.ones((3, 3)))  # 8-connected components
    large = np.flatnonzero(np.bincount(labels.ravel())[1:] >= min_area) + 1
    np.testing.assert_array_equal(areas["kept"], np.isin(labels, large))
    instances = found["instances"].masks  # --max-instances keeps the largest components
    labels, count = ndimage.label(instances["instances"], structure=np.ones((3, 3)))
    largest = np.argsort(-np.bincount(labels.ravel())[1:], kind="stable")[:MAX_INSTANCES] + 1
    np.testing.assert_array_equal(instances["kept"], np.isin(labels, largest))
    assert components(instances["kept"]) == min(MAX_INSTANCES, count)
    feather = found["feather"].masks  # the soft edge reaches beyond the hard mask
    assert feather["soft"].sum() > feather["mask"].sum() and not (feather["mask"] & ~feather["soft"]).any()
    holes = found["fill_holes"].masks
    assert not (holes["threshold"] & ~holes["filled"]).any()
    tiles = found["tiles"].masks
    assert tiles["one_pass"].shape == tiles["tiles"].shape and (tiles["one_pass"] != tiles["tiles"]).any()
