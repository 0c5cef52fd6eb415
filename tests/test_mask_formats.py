"""clipseg/mask_formats.py: the RGBA cut-out holds the image and the mask as alpha, COCO RLE equals pycocotools'
encoding byte for byte, polygons rasterise (pycocotools) back to the mask, and the COCO JSON is strict and loads in
pycocotools with masks that decode to the ones written."""

import numpy as np
import pytest
from conftest import strict_json
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from scipy import ndimage

from clipseg.mask_formats import CocoDocument, coco_rle, cutout, mask_bbox, polygons
from clipseg.postprocess import MaskOptions, make_mask


def blob(seed: int, shape=(90, 120)) -> np.ndarray:
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 5)
    return ndimage.binary_fill_holes(field > 0.5 * field.std())


def decode(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, dict):
        return coco_mask.decode(segmentation).astype(bool)
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))).astype(bool)


def test_the_cutout_is_the_image_with_the_mask_as_alpha(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    alpha = np.zeros((4, 5), np.float32)
    alpha[1:3, 1:4] = 1.0
    alpha[0, 0] = 0.5
    cut = cutout(Image.fromarray(rgb), alpha)
    assert cut.mode == "RGBA"
    cut.save(tmp_path / "cut.png")
    read = np.asarray(Image.open(tmp_path / "cut.png"))
    assert read.shape == (4, 5, 4)
    np.testing.assert_array_equal(read[..., :3], rgb)
    np.testing.assert_array_equal(read[..., 3], np.round(alpha * 255))
    hard = np.asarray(cutout(Image.fromarray(rgb), alpha == 1.0))
    np.testing.assert_array_equal(hard[..., 3], (alpha == 1.0) * 255)
    with pytest.raises(ValueError, match="alpha of shape \\(3, 3\\) for an image of 4x5"):
        cutout(Image.fromarray(rgb), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        cutout(Image.fromarray(rgb), np.full((4, 5), np.nan))


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 48), (3, 200)])
def test_coco_rle_equals_pycocotools_encoding(shape):
    rng = np.random.default_rng(shape[0])
    masks = [rng.random(shape) < p for p in (0.1, 0.5, 0.9)] + [np.zeros(shape, bool), np.ones(shape, bool)]
    if shape[0] > 5:
        masks.append(blob(2, shape))
    for mask in masks:
        expected = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle = coco_rle(mask)
        assert rle == {"size": list(shape), "counts": expected["counts"].decode("ascii")}
        np.testing.assert_array_equal(decode(rle, *shape), mask)


def test_polygons_of_small_shapes_computed_by_hand():
    pixel = np.zeros((5, 6), bool)
    pixel[2, 3] = True
    assert polygons(pixel) == [[3.0, 2.0, 4.0, 2.0, 4.0, 3.0, 3.0, 3.0]]
    bar = np.zeros((4, 8), bool)
    bar[1, 2:7] = True  # collinear pixel corners are not vertices
    assert polygons(bar) == [[2.0, 1.0, 7.0, 1.0, 7.0, 2.0, 2.0, 2.0]]
    diagonal = np.zeros((4, 4), bool)
    diagonal[0, 0] = diagonal[1, 1] = True  # 8-connected: one outline through the shared corner
    assert len(polygons(diagonal)) == 1
    np.testing.assert_array_equal(decode(polygons(diagonal), 4, 4), diagonal)
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False  # a hole: the polygon is the outer outline
    assert polygons(ring) == [[1.0, 1.0, 6.0, 1.0, 6.0, 6.0, 1.0, 6.0]]
    assert polygons(np.zeros((3, 3), bool)) == []


@pytest.mark.parametrize("seed", range(4))
def test_polygons_rasterise_back_to_the_mask(seed):
    mask = blob(seed)
    two = mask.copy()
    two[:, 60:62] = False  # usually splits a blob: several components
    for each in (mask, two):
        shapes = polygons(each)
        assert all(len(p) >= 8 and len(p) % 2 == 0 for p in shapes)
        decoded = decode(shapes, *each.shape)
        assert (decoded & each).sum() / (decoded | each).sum() >= 0.95
        assert len(shapes) == ndimage.label(ndimage.binary_fill_holes(each), structure=np.ones((3, 3)))[1]


def document_with_two_images(segmentation: str) -> tuple[CocoDocument, list[np.ndarray]]:
    document = CocoDocument()
    first = document.add_image("a.jpg", 120, 90)
    second = document.add_image("b.jpg", 120, 90)
    masks = [blob(5), blob(6), blob(7)]
    assert document.add_mask(first, "cat | dog", masks[0], 0.8, segmentation) == 1
    assert document.add_mask(first, "sofa", masks[1], 0.55, segmentation) == 2
    assert document.add_mask(second, "cat | dog", masks[2], None, segmentation) == 3
    assert document.add_mask(second, "sofa", np.zeros((90, 120), bool), 0.1, segmentation) is None
    return document, masks


@pytest.mark.parametrize("segmentation", ["rle", "polygons"])
def test_the_coco_json_loads_in_pycocotools_with_the_written_masks(tmp_path, segmentation):
    document, masks = document_with_two_images(segmentation)
    document.write(tmp_path / "masks.json")
    data = strict_json((tmp_path / "masks.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in data["categories"]] == ["cat | dog", "sofa"]
    assert [(a["image_id"], a["category_id"]) for a in data["annotations"]] == [(1, 1), (1, 2), (2, 1)]
    assert [a.get("score") for a in data["annotations"]] == [0.8, 0.55, None]
    coco = COCO(str(tmp_path / "masks.json"))
    for annotation, mask in zip(coco.loadAnns(coco.getAnnIds()), masks):
        decoded = coco.annToMask(annotation).astype(bool)
        if segmentation == "rle":
            np.testing.assert_array_equal(decoded, mask)
        else:
            assert (decoded & mask).sum() / (decoded | mask).sum() >= 0.95
        assert annotation["area"] == int(mask.sum()) and annotation["iscrowd"] == 0
        assert annotation["bbox"] == coco_mask.toBbox(coco_rle(mask)).tolist() == mask_bbox(mask)


def test_the_coco_json_is_strict_and_checks_its_input(tmp_path):
    document = CocoDocument()
    image = document.add_image("a.jpg", 10, 8)
    document.add_mask(image, "cat", np.ones((8, 10), bool), float("nan"))
    with pytest.raises(ValueError, match="not a finite number"):
        document.write(tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(ValueError, match="mask of shape \\(10, 8\\)"):
        document.add_mask(image, "cat", np.ones((10, 8), bool))
    with pytest.raises(ValueError, match="segmentation must be one of rle, polygons"):
        document.add_mask(image, "cat", np.ones((8, 10), bool), segmentation="mask")


@pytest.mark.parametrize("seed", range(4))
def test_the_rle_of_a_crop_placed_in_the_image_equals_the_rle_of_the_whole_mask(seed):
    rng = np.random.default_rng(seed)
    height, width = 9, 11
    for _ in range(20):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        bottom, right = int(rng.integers(top + 1, height + 1)), int(rng.integers(left + 1, width + 1))
        if rng.random() < 0.3:
            top, bottom = 0, height  # whole columns: runs continue from one column into the next
        crop = rng.random((bottom - top, right - left)) < rng.choice([0.2, 0.6, 1.0])
        whole = np.zeros((height, width), bool)
        whole[top:bottom, left:right] = crop
        expected = coco_mask.encode(np.asfortranarray(whole.astype(np.uint8)))["counts"].decode("ascii")
        assert coco_rle(crop, (top, left), (height, width)) == {"size": [height, width], "counts": expected}
    with pytest.raises(ValueError, match="does not fit an image of"):
        coco_rle(np.ones((3, 3), bool), (7, 0), (9, 11))


def test_instances_are_annotated_from_their_boxes_without_a_full_size_map_each():
    """A map of 201 components: each annotation equals the one of its full-size mask, and encoding them all
    allocates far less than one full-size map per instance (3,851 of them on a 2000 x 2000 image took 15.6 GB)."""
    import tracemalloc

    probs = np.zeros((400, 400), np.float32)
    probs[5::20, 5::20] = 0.9  # 400 one-pixel dots
    probs[100:300, 0:400] = 0.8  # and one band across the image
    result = make_mask(probs, MaskOptions(threshold=0.5, instances=True))
    assert len(result.instances) == 201  # the band swallowed the dots it crosses
    for segmentation in ("rle", "polygons"):
        document, reference = CocoDocument(), CocoDocument()
        image, same = document.add_image("a.png", 400, 400), reference.add_image("a.png", 400, 400)
        tracemalloc.start()
        document.add_result(image, "dot", result, segmentation)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        for mask, instance in zip(result.instance_masks(), result.instances):
            reference.add_mask(same, "dot", mask, instance.score, segmentation)
        assert document.annotations == reference.annotations
        assert peak < 20 * probs.size  # one full-size bool map per instance: 201 times its size


def test_add_result_writes_one_annotation_per_instance_or_the_whole_mask():
    probs = np.zeros((20, 30), np.float32)
    probs[2:8, 2:10] = 0.9
    probs[12:18, 15:28] = 0.6
    document = CocoDocument()
    image = document.add_image("a.jpg", 30, 20)
    with_instances = make_mask(probs, MaskOptions(threshold=0.5, instances=True))
    assert document.add_result(image, "cat", with_instances) == [1, 2]
    assert [a["area"] for a in document.annotations] == [78, 48]
    assert [a["score"] for a in document.annotations] == [pytest.approx(0.6), pytest.approx(0.9)]
    assert document.add_result(image, "cat", make_mask(probs, MaskOptions(threshold=0.5))) == [3]
    assert document.annotations[2]["area"] == 126 and "score" not in document.annotations[2]
    assert document.add_result(image, "dog", make_mask(probs, MaskOptions(threshold=0.95))) == []
