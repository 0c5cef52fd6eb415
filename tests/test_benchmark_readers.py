"""Benchmark data: the generators write each format faithfully, the readers return what was written (255 kept as
void), the new resize rules equal OpenCV (PFENet's test_Resize), and missing files get errors that say where the
data comes from."""

import collections
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg.benchmarks import readers as benchmarks
from clipseg.benchmarks.classes import COCO_CLASSES, coco_fold_classes, pascal_fold_classes
from clipseg.benchmarks.readers import BenchmarkDataError, Coco20i, VocData, read_fold_pickle, read_pair
from clipseg.images import UnreadableImage, read_label
from clipseg.transforms import letterbox, letterbox_size, normalise, resize_labels, resize_pixels, unletterbox

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (requirements-dev.txt) is the reference")


# ------------------------------------------------------------------------------------------------ Pascal VOC


def test_voc_layout_and_png_modes(synthetic_voc):
    voc = synthetic_voc / "VOC2012"
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(val) == 30 and (voc / "ImageSets" / "Segmentation" / "trainval.txt").is_file()
    listing = (synthetic_voc / "lists" / "pascal" / "val.txt").read_text().splitlines()
    assert listing == [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in val]
    for image_id in val[:3]:
        with Image.open(voc / "SegmentationClassAug" / f"{image_id}.png") as aug:
            assert aug.mode == "L"
        with Image.open(voc / "SegmentationClass" / f"{image_id}.png") as palette:
            assert palette.mode == "P" and palette.getpalette()[255 * 3 : 256 * 3] == [224, 224, 192]
    line = (synthetic_voc / "splits" / "pascal" / "val" / "fold0.txt").read_text().splitlines()[0]
    image_id, _, class_text = line.partition("__")
    assert image_id in val and len(class_text) == 2 and int(class_text) in pascal_fold_classes(0)


def test_voc_readers_return_what_was_written(synthetic_voc):
    data = VocData(synthetic_voc)
    items, source = data.pfenet_list()
    assert source.endswith("val.txt") and len(items) == 30
    for item in items[:4]:
        image, labels = read_pair(item)
        written = np.asarray(Image.open(item.label))
        np.testing.assert_array_equal(labels, written)
        np.testing.assert_array_equal(labels, read_label(data.item(item.id, "SegmentationClass").label))
        assert (labels == 255).any() and set(np.unique(labels)) <= set(range(21)) | {255}
        np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(item.image).convert("RGB")))
    pairs = data.hsnet_fold(1)
    assert pairs and all(class_id in pascal_fold_classes(1) for _, class_id in pairs)
    for item, class_id in pairs[:3]:
        assert (read_label(item.label) == class_id).sum() >= 2048
    assert [item.id for item in data.segmentation_val()] == [item.id for item in items]


def test_voc_fallbacks_and_errors(synthetic_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(synthetic_voc / "VOC2012", root / "VOCdevkit" / "VOC2012")
    data = VocData(root)  # VOCdevkit/VOC2012 is found; no PFENet list: ImageSets/Segmentation/val.txt instead
    items, source = data.pfenet_list()
    assert "PFENet" in source and "not found" in source and len(items) == 30
    with pytest.raises(BenchmarkDataError, match="fold2.txt.*HSNet"):
        data.hsnet_fold(2)
    with pytest.raises(BenchmarkDataError, match="JPEGImages.*VOC2012 trainval"):
        VocData(tmp_path / "nowhere")
    fold = tmp_path / "splits" / "pascal" / "val" / "fold1.txt"
    fold.parent.mkdir(parents=True)
    fold.write_text("\n")
    with pytest.raises(BenchmarkDataError, match="fold1.txt: lists no episode"):
        VocData(root, splits_dir=tmp_path).hsnet_fold(1)
    fold.write_bytes(b"\xff\xfe")
    with pytest.raises(BenchmarkDataError, match="fold1.txt: cannot be read as a text list"):
        VocData(root, splits_dir=tmp_path).hsnet_fold(1)
    label = root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug" / f"{items[0].id}.png"
    Image.open(label).convert("RGB").save(label)
    with pytest.raises(UnreadableImage, match="index PNG"):
        read_pair(items[0])
    Image.fromarray(np.full((30, 40), 77, np.uint8)).save(label)  # not a VOC class id: all background otherwise
    with pytest.raises(UnreadableImage, match=r"label values \[77\] are not class ids \(0-20\) or void \(255\)"):
        read_pair(items[0])
    label.unlink()
    with pytest.raises(UnreadableImage, match="file not found"):
        read_pair(items[0])


# ------------------------------------------------------------------------------------------------ COCO-20i


def test_coco_hsnet_layout_is_read_as_written(synthetic_coco):
    coco = Coco20i(synthetic_coco, fold=2)
    assert coco.source.endswith("fold2.pkl") and set(coco.classwise) == set(coco_fold_classes(2))
    with open(synthetic_coco / "splits" / "coco" / "val" / "fold2.pkl", "rb") as file:
        table = pickle.load(file)
    assert set(table) == set(range(80)) and not table[0] and table[2]
    name = coco.classwise[2][0]
    image, mask = coco.read(name, 2)
    png = np.asarray(Image.open(synthetic_coco / "annotations" / name.replace(".jpg", ".png")))
    np.testing.assert_array_equal(mask, png == 3)
    assert mask.any() and image.size == (png.shape[1], png.shape[0])


def test_coco_instances_json_gives_the_same_classes_and_masks(synthetic_coco, tmp_path):
    pytest.importorskip("pycocotools", reason="pycocotools (requirements-benchmarks.txt) reads COCO's JSON")
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco / "val2014", root / "val2014")
    (root / "annotations").mkdir()
    shutil.copy(synthetic_coco / "annotations" / "instances_val2014.json", root / "annotations")
    from_json, from_hsnet = Coco20i(root, fold=1), Coco20i(synthetic_coco, fold=1)
    assert from_json.source.endswith("instances_val2014.json")
    assert from_json.classwise == from_hsnet.classwise
    categories = json.loads((root / "annotations" / "instances_val2014.json").read_text())["categories"]
    assert [c["name"] for c in categories] == list(COCO_CLASSES) and categories[-1]["id"] == 90
    for class_index in coco_fold_classes(1)[:4]:
        name = from_json.classwise[class_index][0]
        _, polygons = from_json.read(name, class_index)
        _, pixels = from_hsnet.read(name, class_index)
        assert (polygons & pixels).sum() / (polygons | pixels).sum() > 0.9  # two rasterisers, same objects


def test_coco_errors_name_the_missing_files(tmp_path, monkeypatch, synthetic_coco):
    with pytest.raises(BenchmarkDataError, match="fold0.pkl.*instances_val2014.json"):
        Coco20i(tmp_path, fold=0)
    (tmp_path / "annotations").mkdir()
    shutil.copy(synthetic_coco / "annotations" / "instances_val2014.json", tmp_path / "annotations")
    (tmp_path / "annotations" / "instances_val2014.json").write_text("[]")
    with pytest.raises(BenchmarkDataError, match="instances_val2014.json: not a COCO instances JSON"):
        Coco20i(tmp_path, fold=0)
    monkeypatch.setitem(__import__("sys").modules, "pycocotools.coco", None)
    with pytest.raises(BenchmarkDataError, match="pycocotools"):
        Coco20i(tmp_path, fold=0)
    assert "python -m clipseg.synthetic coco" in benchmarks.COCO_HINT


# ------------------------------------------------------------------------------------------------ resize rules


def pfenet_test_resize(image: np.ndarray, label: np.ndarray, size: int):
    """PFENet's test_Resize with OpenCV, as its code reads (reference)."""

    def new_hw(height, width):
        if max(height, width) <= size:
            return height, width
        if height >= width:
            new_height, new_width = size, int(width * (size * 1.0 / height))
        else:
            new_height, new_width = int(height * (size * 1.0 / width)), size
        return int(new_height / 8) * 8, int(new_width / 8) * 8

    new_height, new_width = new_hw(*label.shape)
    resized = cv2.resize(image.astype(np.float32), (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:new_height, :new_width] = resized
    labels = cv2.resize(label.astype(np.float32), (new_width, new_height), interpolation=cv2.INTER_NEAREST)
    label_canvas = np.full((size, size), 255.0)
    label_canvas[:new_height, :new_width] = labels
    return normalise(torch.from_numpy(canvas).permute(2, 0, 1)), label_canvas.astype(np.uint8)


@pytest.mark.parametrize(("height", "width", "size"), [(375, 500, 352), (500, 333, 352), (181, 260, 64), (50, 40, 64)])
def test_letterbox_equals_pfenets_test_resize(height, width, size):
    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 1, 255], np.uint8), (height, width))
    pixels, labels = letterbox(image, label, size)
    reference_pixels, reference_labels = pfenet_test_resize(image, label, size)
    np.testing.assert_array_equal(labels, reference_labels)
    assert (pixels - reference_pixels).abs().max() < 1e-3  # OpenCV's float kernel rounds its weights
    assert letterbox_size(height, width, size)[0] % 8 == 0 or max(height, width) <= size


@pytest.mark.parametrize(("source", "target"), [((500, 375), (264, 352)), ((7, 9), (3, 4)), ((20, 13), (40, 27))])
def test_linear_rule_equals_opencv(source, target):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 256, source, dtype=np.uint8)
    expected = cv2.resize(labels, target[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resize_labels(labels, target[::-1], "linear"), expected)
    image = rng.integers(0, 256, (*source, 3), dtype=np.uint8)
    reference = cv2.resize(image.astype(np.float32), target[::-1], interpolation=cv2.INTER_LINEAR)
    ours = resize_pixels(image, target[::-1], "linear")
    assert (ours - normalise(torch.from_numpy(reference).permute(2, 0, 1))).abs().max() < 1e-3


def test_unletterbox_maps_the_canvas_back_onto_the_image():
    probabilities = torch.rand(64, 64)
    resized = torch.nn.functional.interpolate(
        probabilities[None, None], (120, 120), mode="bilinear", align_corners=True
    )
    assert torch.equal(unletterbox(probabilities, 90, 120), resized[0, 0, :90, :120])
    assert torch.equal(unletterbox(probabilities, 40, 30), probabilities[:40, :30])  # small images were not resized


class RunsAShellCommand:
    """Pickles as a call of os.system: what a crafted fold file would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hsnet_layout_with_fold0(root, payload: bytes):
    (root / "annotations" / "val2014").mkdir(parents=True)
    (root / "splits" / "coco" / "val").mkdir(parents=True)
    (root / "splits" / "coco" / "val" / "fold0.pkl").write_bytes(payload)
    return root


def test_a_crafted_fold_pickle_runs_no_code_and_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "marker"
    crafted = {0: ["val2014/x.jpg", RunsAShellCommand(f"touch {marker}")], 4: ["val2014/y.jpg"]}
    for number, payload in enumerate(
        [
            pickle.dumps(crafted),
            pickle.dumps(RunsAShellCommand(f"touch {marker}"), protocol=2),
            pickle.dumps(collections.OrderedDict(crafted)),
        ]
    ):
        root = hsnet_layout_with_fold0(tmp_path / f"root{number}", payload)
        with pytest.raises(BenchmarkDataError, match=r"fold0.pkl: refused, not a plain fold list .*it names"):
            Coco20i(root, fold=0)
    assert not marker.exists()
    for payload, message in [
        (pickle.dumps({0: ["a.jpg"]})[:-5], "fold0.pkl: refused"),  # truncated
        (pickle.dumps(["val2014/x.jpg"]), "fold0.pkl: expected a dict class index -> list of image names"),
        (pickle.dumps({0: [3]}), "fold0.pkl: expected a dict class index"),
    ]:
        root = hsnet_layout_with_fold0(tmp_path / f"bad{len(message)}{len(payload)}", payload)
        with pytest.raises(BenchmarkDataError, match=message):
            Coco20i(root, fold=0)


def test_fold_pickles_of_every_protocol_are_read(tmp_path):
    table = {c: [f"val2014/{c}_{k}.jpg" for k in range(2)] for c in range(0, 80, 4)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(table, protocol=protocol))
        assert read_fold_pickle(path) == table
    path.write_bytes(pickle.dumps({0: ("a.jpg", "b.jpg"), 4: []}, protocol=2))
    assert read_fold_pickle(path) == {0: ["a.jpg", "b.jpg"], 4: []}
