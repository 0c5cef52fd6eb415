"""synthetic.py: the generated PhraseCut follows the official layout and schema, and its phrases fit its images."""

import json

import numpy as np
from helpers import data_dir, refer
from PIL import Image

import dataset
from clipseg import synthetic
from clipseg.images import open_rgb
from clipseg.rasterise import instances_to_mask

TASK_KEYS = {"task_id", "image_id", "ann_ids", "instance_boxes", "Polygons", "phrase", "phrase_structure"}
STRUCTURE_KEYS = {"name", "attributes", "relation_ids", "relation_descriptions", "type"}
IMAGE_KEYS = {"image_id", "coco_id", "flickr_id", "width", "height", "url", "split"}


def test_generator_writes_the_phrasecut_schema(synthetic_root):
    directory = data_dir(synthetic_root)
    names = {path.name for path in directory.iterdir() if not path.name.startswith(".")}
    assert {f"refer_{s}.json" for s in dataset.SPLITS} | {"image_data_split.json", "name_att_rel_count.json"} <= names
    sizes = {
        e["image_id"]: (e["width"], e["height"]) for e in json.loads((directory / "image_data_split.json").read_text())
    }
    for split in dataset.SPLITS:
        for task in refer(synthetic_root, split):
            assert set(task) == TASK_KEYS
            assert isinstance(task["task_id"], str) and task["task_id"].startswith(f"{task['image_id']}__")
            assert isinstance(task["image_id"], int) and all(isinstance(a, int) for a in task["ann_ids"])
            assert isinstance(task["phrase"], str) and task["phrase"]
            assert len(task["ann_ids"]) == len(task["instance_boxes"]) == len(task["Polygons"]) >= 1
            structure = task["phrase_structure"]
            assert set(structure) == STRUCTURE_KEYS and structure["type"] in dataset.PHRASE_TYPES
            assert structure["name"] in task["phrase"] and all(a in task["phrase"] for a in structure["attributes"])
            assert len(structure["relation_ids"]) == len(structure["relation_descriptions"])
            width, height = sizes[task["image_id"]]
            for box, instance in zip(task["instance_boxes"], task["Polygons"]):
                assert len(box) == 4 and all(isinstance(v, float) for v in box)
                points = np.array([p for poly in instance for p in poly])
                assert all(isinstance(v, float) for poly in instance for p in poly for v in p)
                np.testing.assert_allclose(points.min(0), box[:2], atol=0.02)
                np.testing.assert_allclose(points.max(0) - points.min(0), box[2:], atol=0.02)
                assert (points >= 0).all() and (points[:, 0] < width).all() and (points[:, 1] < height).all()
    for entry in json.loads((directory / "image_data_split.json").read_text()):
        assert set(entry) == IMAGE_KEYS and entry["split"] in dataset.SPLITS
        with Image.open(directory / "images" / f"{entry['image_id']}.jpg") as image:
            assert image.format == "JPEG" and image.size == (entry["width"], entry["height"])
    counts = json.loads((directory / "name_att_rel_count.json").read_text())
    assert set(counts) == {"cat", "att", "rel"}
    assert all(isinstance(name, str) and isinstance(n, int) for name, n in counts["cat"])


def test_generator_splits_are_disjoint_by_image_and_rectangular(synthetic_root):
    entries = json.loads((data_dir(synthetic_root) / "image_data_split.json").read_text())
    images_of = {split: {t["image_id"] for t in refer(synthetic_root, split)} for split in dataset.SPLITS}
    for a in dataset.SPLITS:
        for b in dataset.SPLITS:
            assert a == b or not images_of[a] & images_of[b]
        assert images_of[a] and images_of[a] <= {e["image_id"] for e in entries if e["split"] == a}
    assert sum(e["split"] == "train" for e in entries) >= 0.6 * len(entries)
    sizes = {(e["width"], e["height"]) for e in entries}
    assert len(sizes) > 10 and all(240 <= w <= 500 and 240 <= h <= 500 for w, h in sizes)
    assert any(w != h for w, h in sizes)


def test_generator_phrase_types_and_referred_shapes(synthetic_root):
    tasks = [t for s in dataset.SPLITS for t in refer(synthetic_root, s)]
    types = [t["phrase_structure"]["type"] for t in tasks]
    assert {"name", "attribute", "relation"} <= set(types)
    for task in tasks:
        image = np.asarray(open_rgb(data_dir(synthetic_root) / "images" / f"{task['image_id']}.jpg"))
        colours = [w for w in task["phrase"].split()[:2] if w in synthetic.COLOURS]
        for instance in task["Polygons"]:  # the referred shape has the colour the phrase names
            inside = instances_to_mask([instance], *image.shape[:2], rule="phrasecut")
            mean = image[inside].mean(0)
            if colours and task["phrase_structure"]["type"] == "attribute":
                assert np.abs(mean - synthetic.COLOURS[colours[0]]).max() < 40, (task["phrase"], mean)
    assert len({t["task_id"] for t in tasks}) == len(tasks)


def test_generator_is_deterministic_for_a_seed(tmp_path):
    first = synthetic.make_synthetic_phrasecut(tmp_path / "a", n_images=5, seed=3)
    second = synthetic.make_synthetic_phrasecut(tmp_path / "b", n_images=5, seed=3)
    other = synthetic.make_synthetic_phrasecut(tmp_path / "c", n_images=5, seed=4)
    for name in ["refer_train.json", "image_data_split.json", "images/1.jpg", "images/5.jpg"]:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "images/1.jpg").read_bytes() != (other / "images/1.jpg").read_bytes()


def test_cli_writes_the_same_layout_as_the_function(tmp_path, capsys):
    synthetic.main(["phrasecut", "--root", str(tmp_path / "a"), "--n-images", "4", "--seed", "1"])
    assert "wrote 4 images" in capsys.readouterr().out
    synthetic.make_synthetic_phrasecut(tmp_path / "b", n_images=4, seed=1)
    for name in ("refer_train.json", "image_data_split.json", "images/4.jpg"):
        assert (data_dir(tmp_path / "a") / name).read_bytes() == (data_dir(tmp_path / "b") / name).read_bytes()
