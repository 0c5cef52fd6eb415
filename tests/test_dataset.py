"""dataset.py: rasterisation, the sample pipeline, the PhraseCut index, the generator, user folders, bad input."""

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import dataset
from model import IMAGENET_MEAN, IMAGENET_STD

SMALL = 64  # sample side for fast pipeline tests


def data_dir(root: Path) -> Path:
    return root / "data" / "VGPhraseCut_v0"


def refer(root: Path, split: str) -> list[dict]:
    return json.loads((data_dir(root) / f"refer_{split}.json").read_text())


@pytest.fixture
def damaged_root(synthetic_root, tmp_path) -> Path:
    """A private copy of the synthetic data (without its index) that a test may break."""
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy, ignore=shutil.ignore_patterns(".clipseg_index"))
    return copy


def denormalise(pixel_values: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) 0..255 floats."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((pixel_values * std + mean) * 255).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------- rasterisation


def test_rasterise_square_includes_outline_and_truncates_vertices():
    mask = dataset.rasterise([[[1.9, 1.2], [4.7, 1.0], [4.2, 4.9], [1.0, 4.5]]], height=7, width=8)
    expected = np.zeros((7, 8), dtype=bool)
    expected[1:5, 1:5] = True  # vertices truncate to 1..4; fill + outline covers both edges
    assert mask.dtype == bool and mask.shape == (7, 8)
    np.testing.assert_array_equal(mask, expected)


def test_rasterise_triangle_by_hand():
    mask = dataset.rasterise([[[0, 0], [4, 0], [0, 4]]], height=5, width=5)
    expected = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_instances_to_mask_is_union_of_all_polygons_of_all_instances():
    instances = [[[[0, 0], [1, 0], [1, 1], [0, 1]], [[5, 5], [6, 5], [6, 6], [5, 6]]], [[[8, 0], [9, 0], [9, 1]]]]
    mask = dataset.instances_to_mask(instances, height=10, width=10)
    assert mask[0:2, 0:2].all() and mask[5:7, 5:7].all() and mask[0, 8:10].all()
    assert mask.sum() == 4 + 4 + 3


def test_rasterise_degenerate_and_outside_polygons():
    assert not dataset.rasterise([], 4, 4).any()
    assert not dataset.rasterise([[[1, 1]]], 4, 4).any()  # a single vertex cannot be drawn
    assert not dataset.rasterise([[[0, 0], [float("nan"), 2], [3, 3]]], 4, 4).any()
    assert not dataset.rasterise([[[10, 10], [20, 10], [20, 20]]], 4, 4).any()
    line = dataset.rasterise([[[0, 1], [3, 1]]], 4, 4)  # two vertices: the official rule draws the outline
    assert line[1].all() and line.sum() == 4
    clipped = dataset.rasterise([[[-5, -5], [2, -5], [2, 2], [-5, 2]]], 4, 4)
    assert clipped.sum() == 9


point = st.tuples(st.floats(0, 30, allow_nan=False), st.floats(0, 30, allow_nan=False))
polygon = st.lists(point, min_size=3, max_size=8)


@settings(max_examples=60, deadline=None)
@given(polygon)
def test_mask_lies_inside_the_polygons_bounding_box(points):
    mask = dataset.rasterise([points], height=32, width=32)
    xs, ys = [int(x) for x, _ in points], [int(y) for _, y in points]
    rows, cols = np.nonzero(mask)
    assert len(rows) > 0
    assert rows.min() >= min(ys) and rows.max() <= max(ys)
    assert cols.min() >= min(xs) and cols.max() <= max(xs)


@settings(max_examples=40, deadline=None)
@given(st.lists(polygon, min_size=1, max_size=4), st.randoms())
def test_union_is_commutative_and_equals_or_of_parts(polygons, random):
    shuffled = list(polygons)
    random.shuffle(shuffled)
    union = dataset.rasterise(polygons, 32, 32)
    np.testing.assert_array_equal(union, dataset.rasterise(shuffled, 32, 32))
    np.testing.assert_array_equal(union, np.any([dataset.rasterise([p], 32, 32) for p in polygons], axis=0))


# ------------------------------------------------------------------------------------------- crop and resize


def test_object_aware_crop_keeps_an_object_at_the_edge():
    mask = np.zeros((100, 400), dtype=bool)
    mask[40:60, 380:400] = True
    for seed in range(50):
        left, top, side = dataset.object_aware_crop(mask, np.random.default_rng(seed))
        assert side == 100 and top == 0 and 0 <= left <= 300
        kept = mask[top : top + side, left : left + side].sum() / mask.sum()
        assert kept > dataset.CROP_MIN_KEPT


def test_object_aware_crop_tall_empty_and_square_masks():
    rng = np.random.default_rng(0)
    tall = np.zeros((300, 100), dtype=bool)
    tall[0:10, 0:10] = True
    left, top, side = dataset.object_aware_crop(tall, rng)
    assert (left, side) == (0, 100) and top <= 10
    offsets = {dataset.object_aware_crop(np.zeros((50, 80), bool), rng)[0] for _ in range(30)}
    assert len(offsets) > 1 and all(0 <= o <= 30 for o in offsets)
    assert dataset.object_aware_crop(np.ones((40, 40), bool), rng) == (0, 0, 40)


def test_resize_mask_matches_pil_nearest():
    mask = np.random.default_rng(0).random((37, 53)) > 0.5
    ours = dataset.resize_mask(mask, (20, 31))
    theirs = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((31, 20), Image.NEAREST)) > 0
    np.testing.assert_array_equal(ours, theirs)


# ------------------------------------------------------------------------------------------- generator


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
        image = np.asarray(dataset.open_rgb(data_dir(synthetic_root) / "images" / f"{task['image_id']}.jpg"))
        colours = [w for w in task["phrase"].split()[:2] if w in dataset.COLOURS]
        for instance in task["Polygons"]:  # the referred shape has the colour the phrase names
            inside = dataset.instances_to_mask([instance], *image.shape[:2])
            mean = image[inside].mean(0)
            if colours and task["phrase_structure"]["type"] == "attribute":
                assert np.abs(mean - dataset.COLOURS[colours[0]]).max() < 40, (task["phrase"], mean)
    assert len({t["task_id"] for t in tasks}) == len(tasks)


def test_generator_is_deterministic_for_a_seed(tmp_path):
    first = dataset.make_synthetic_phrasecut(tmp_path / "a", n_images=5, seed=3)
    second = dataset.make_synthetic_phrasecut(tmp_path / "b", n_images=5, seed=3)
    other = dataset.make_synthetic_phrasecut(tmp_path / "c", n_images=5, seed=4)
    for name in ["refer_train.json", "image_data_split.json", "images/1.jpg", "images/5.jpg"]:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "images/1.jpg").read_bytes() != (other / "images/1.jpg").read_bytes()


# ------------------------------------------------------------------------------------------- PhraseCut samples


def test_test_samples_are_whole_images_with_full_resolution_truth(synthetic_root):
    data = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL)
    tasks = refer(synthetic_root, "test")
    assert len(data) == len(tasks) and data.tasks[0]["task_id"] == tasks[0]["task_id"]
    for index, task in enumerate(tasks):
        sample = data[index]
        image = dataset.open_rgb(sample["image_path"])
        assert sample["task_id"] == task["task_id"] and sample["phrase"] == task["phrase"]
        assert sample["original_size"] == (image.height, image.width)
        assert sample["phrase_type"] == task["phrase_structure"]["type"]
        assert sample["n_instances"] == len(task["Polygons"]) and not sample["negative"]
        truth = dataset.instances_to_mask(task["Polygons"], image.height, image.width)
        assert sample["full_mask"].dtype == bool and truth.any()
        np.testing.assert_array_equal(sample["full_mask"], truth)
        np.testing.assert_array_equal(sample["mask"][0].numpy(), dataset.resize_mask(truth, (SMALL, SMALL)))
        squashed = np.asarray(image.resize((SMALL, SMALL), Image.BILINEAR), dtype=np.float32)
        np.testing.assert_allclose(denormalise(sample["pixel_values"]), squashed, atol=1e-3)
        assert sample["skipped"] == []


def test_training_samples_shapes_and_crops_keep_the_object(synthetic_root):
    data = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL)
    for index in range(len(data)):
        sample = data[index]
        assert sample["pixel_values"].shape == (3, SMALL, SMALL) and sample["pixel_values"].dtype == torch.float32
        assert sample["mask"].shape == (1, SMALL, SMALL) and sample["mask"].dtype == torch.float32
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
        assert sample["mask"].sum() > 0, sample["task_id"]
        assert "full_mask" not in sample and sample["skipped"] == []
    values = denormalise(data[0]["pixel_values"])
    assert values.min() > -1 and values.max() < 256


def test_whole_image_samples_are_the_test_squash_at_the_requested_rate(synthetic_root):
    squashed = dataset.PhraseCut(synthetic_root, "train", train=False, image_size=SMALL)
    rectangular = [i for i in range(len(squashed)) if len(set(squashed[i]["original_size"])) == 2][:100]

    def is_whole_image(sample: dict, index: int) -> bool:
        reference = squashed[index]
        same = torch.equal(sample["mask"], reference["mask"])
        if same:  # training decodes the JPEG at a reduced scale: the same picture up to rounding
            difference = np.abs(denormalise(sample["pixel_values"]) - denormalise(reference["pixel_values"]))
            assert difference.mean() < 2, difference.mean()
        return same

    always = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, whole_image_prob=1.0)
    never = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL)
    assert all(is_whole_image(always[i], i) for i in rectangular)
    assert not any(is_whole_image(never[i], i) for i in rectangular)
    half = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, whole_image_prob=0.5, seed=3)
    draws = [is_whole_image(half[i], i) for i in rectangular * 4]
    assert len(draws) >= 100 and abs(np.mean(draws) - 0.5) < 3 * 0.5 / np.sqrt(len(draws))  # 3 sigma
    with pytest.raises(ValueError, match="whole_image_prob must be in"):
        dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, whole_image_prob=1.5)


def test_negatives_at_requested_rate_with_empty_targets(synthetic_root):
    data = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, negative_prob=0.3, seed=1)
    phrases = {t["task_id"]: t["phrase"] for t in refer(synthetic_root, "train")}
    draws = [data[i % len(data)] for i in range(400)]
    negatives = [s for s in draws if s["negative"]]
    assert abs(len(negatives) / len(draws) - 0.3) < 0.07  # 3 sigma for n = 400
    for sample in negatives:
        assert sample["mask"].sum() == 0 and sample["phrase"] != phrases[sample["task_id"]]
        assert sample["phrase"] in set(phrases.values())
    assert all(s["mask"].sum() > 0 for s in draws if not s["negative"])


def test_visual_support_and_templates(synthetic_root):
    data = dataset.PhraseCut(
        synthetic_root, "train", train=False, image_size=SMALL, visual_support=True, templates=True
    )
    tasks = refer(synthetic_root, "train")
    counts = {}
    for task in tasks:
        counts[task["phrase"]] = counts.get(task["phrase"], 0) + 1
    seen = set()
    for index, task in enumerate(tasks):
        sample = data[index]
        assert sample["prompt_image"].shape == (3, SMALL, SMALL)
        assert sample["has_prompt_image"] == (counts[task["phrase"]] > 1)
        if sample["has_prompt_image"]:
            assert sample["prompt_image"].abs().sum() > 0
        else:
            assert not sample["prompt_image"].any()
        assert any(sample["phrase"] == t.format(task["phrase"]) for t in dataset.TEMPLATES)
        seen.add(sample["has_prompt_image"])
    assert seen == {True, False}


def test_training_draws_differ_but_test_samples_are_reproducible(synthetic_root):
    train = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, templates=True)
    assert len({train[0]["phrase"] for _ in range(12)}) > 1
    test = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL, negative_prob=0.5)
    again = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL, negative_prob=0.5)
    assert [test[i]["negative"] for i in range(len(test))] == [again[i]["negative"] for i in range(len(test))]


def test_val_miniv_is_both_splits_and_limit(synthetic_root):
    both = dataset.PhraseCut(synthetic_root, "val_miniv", train=False)
    ids = [t["task_id"] for t in refer(synthetic_root, "val") + refer(synthetic_root, "miniv")]
    assert [both.tasks[i]["task_id"] for i in range(len(both))] == ids
    assert len(dataset.PhraseCut(data_dir(synthetic_root), "val", train=False, limit=3)) == 3


def test_collate_stacks_tensors_and_aggregates_skips(synthetic_root):
    data = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL, visual_support=True)
    samples = [data[0], data[1]]
    samples[1]["skipped"] = [("x", "file not found")]
    batch = dataset.collate(samples)
    assert batch["pixel_values"].shape == (2, 3, SMALL, SMALL) and batch["mask"].shape == (2, 1, SMALL, SMALL)
    assert batch["prompt_image"].shape == (2, 3, SMALL, SMALL)
    assert batch["task_id"] == [samples[0]["task_id"], samples[1]["task_id"]]
    assert isinstance(batch["full_mask"], list) and batch["skipped"] == [("x", "file not found")]


# ------------------------------------------------------------------------------------------- index and cache


def test_index_is_cached_and_rebuilt_when_the_json_changes(damaged_root, monkeypatch):
    first = dataset.PhraseCut(damaged_root, "val", train=False)
    assert (data_dir(damaged_root) / ".clipseg_index" / "val" / "meta.json").is_file()

    def no_parsing(*args, **kwargs):
        raise AssertionError("the JSON was parsed again")

    with monkeypatch.context() as patch:
        patch.setattr(dataset, "iter_json_array", no_parsing)
        cached = dataset.PhraseCut(damaged_root, "val", train=False)
        assert [t["task_id"] for t in cached.tasks] == [t["task_id"] for t in first.tasks]
    tasks = refer(damaged_root, "val")[:2]
    (data_dir(damaged_root) / "refer_val.json").write_text(json.dumps(tasks))
    assert len(dataset.PhraseCut(damaged_root, "val", train=False)) == 2


def test_index_falls_back_to_user_cache_when_data_dir_is_read_only(damaged_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_writable = dataset._writable
    monkeypatch.setattr(dataset, "_writable", lambda d: ".clipseg_index" not in str(d) and real_writable(d))
    data = dataset.PhraseCut(damaged_root, "test", train=False)
    assert len(data) == len(refer(damaged_root, "test"))
    assert list((tmp_path / "cache" / "clipseg").glob("phrasecut-*/test/meta.json"))
    assert not (data_dir(damaged_root) / ".clipseg_index").exists()


def test_streaming_json_reader_matches_json_load(tmp_path):
    tasks = [{"task_id": f"{i}", "phrase": "é " * i, "Polygons": [[[1.5, 2.0]]]} for i in range(50)]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks, indent=1))
    assert list(dataset.iter_json_array(path, chunk_chars=7)) == tasks
    path.write_text(json.dumps(tasks)[:-40])
    with pytest.raises(ValueError, match="tasks.json.*re-download"):
        list(dataset.iter_json_array(path, chunk_chars=64))


# ------------------------------------------------------------------------------------------- bad input


def test_missing_dataset_dir_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        dataset.PhraseCut(tmp_path / "nowhere", "train", train=True)
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "data" / "VGPhraseCut_v0") in message and "download_dataset.py" in message
    assert "dataset.py synthetic" in message


def test_unknown_split_lists_valid_ones(synthetic_root):
    with pytest.raises(ValueError, match="unknown PhraseCut split 'training'.*train, val, test, miniv, val_miniv"):
        dataset.PhraseCut(synthetic_root, "training", train=True)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda path: path.unlink(), "file not found"),
        (lambda path: path.write_bytes(b""), "empty file"),
        (lambda path: path.write_bytes(b"\xff\xd8 this is not a JPEG"), "cannot decode"),
        (lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]), "cannot decode"),
    ],
    ids=["missing", "zero-byte", "corrupt", "truncated"],
)
def test_bad_image_is_skipped_warned_and_reported(damaged_root, damage, reason):
    tasks = refer(damaged_root, "test")
    damage(data_dir(damaged_root) / "images" / f"{tasks[0]['image_id']}.jpg")
    data = dataset.PhraseCut(damaged_root, "test", train=False, image_size=SMALL)
    bad = [t["task_id"] for t in tasks if t["image_id"] == tasks[0]["image_id"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [data[i] for i in range(len(data))]
    assert [str(w.message).split(":")[0] for w in caught] == [f"skipped task {task_id}" for task_id in bad]
    assert all(reason in str(w.message) for w in caught)
    first_good = tasks[len(bad)]["task_id"]
    assert [s["task_id"] for s in samples[: len(bad)]] == [first_good] * len(bad)  # substitutes
    reported = [entry for s in samples for entry in s["skipped"]]
    assert [task_id for task_id, _ in reported] == bad  # each bad task exactly once over a pass
    assert all(reason in why and f"{tasks[0]['image_id']}.jpg" in why for _, why in reported)


def test_skips_survive_dataloader_workers(damaged_root):
    tasks = refer(damaged_root, "val")
    (data_dir(damaged_root) / "images" / f"{tasks[0]['image_id']}.jpg").unlink()
    data = dataset.PhraseCut(damaged_root, "val", train=False, image_size=16)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, collate_fn=dataset.collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped = [entry for batch in loader for entry in batch["skipped"]]
    n_bad = sum(t["image_id"] == tasks[0]["image_id"] for t in tasks)
    assert sorted(task_id for task_id, _ in skipped) == sorted(t["task_id"] for t in tasks[:n_bad])


def test_all_images_missing_is_an_error_not_an_endless_loop(damaged_root):
    shutil.rmtree(data_dir(damaged_root) / "images")
    (data_dir(damaged_root) / "images").mkdir()
    data = dataset.PhraseCut(damaged_root, "test", train=False)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="consecutive tasks.*check the image"):
        warnings.simplefilter("ignore")
        data[0]


def test_size_mismatch_is_excluded_and_counted(damaged_root):
    split_file = data_dir(damaged_root) / "image_data_split.json"
    entries = json.loads(split_file.read_text())
    tasks = refer(damaged_root, "train")
    victim = tasks[0]["image_id"]
    for entry in entries:
        if entry["image_id"] == victim:
            entry["width"] += 7
    split_file.write_text(json.dumps(entries))
    with pytest.warns(UserWarning, match="excluded"):
        data = dataset.PhraseCut(damaged_root, "train", train=True, image_size=SMALL)
    bad = {t["task_id"] for t in tasks if t["image_id"] == victim}
    assert {task_id for task_id, _ in data.excluded} == bad and len(data) == len(tasks) - len(bad)
    assert all(f"{victim}.jpg" in reason and "annotated as" in reason for _, reason in data.excluded)
    assert bad.isdisjoint(data.tasks[i]["task_id"] for i in range(len(data)))


def test_image_replaced_after_indexing_is_skipped_for_size(damaged_root):
    data = dataset.PhraseCut(damaged_root, "test", train=False, image_size=SMALL)
    path = Path(data.tasks[0]["image_path"])
    Image.new("RGB", (50, 40)).save(path)
    with pytest.warns(UserWarning, match="is 50x40 but its annotations are for"):
        sample = data[0]
    assert sample["skipped"] and sample["task_id"] != data.tasks[0]["task_id"]


def test_degenerate_polygons_are_excluded(damaged_root):
    tasks = refer(damaged_root, "test")
    tasks[0]["Polygons"] = [[]]
    tasks[1]["Polygons"] = [[[[3.0, 4.0]]]]
    (data_dir(damaged_root) / "refer_test.json").write_text(json.dumps(tasks))
    with pytest.warns(UserWarning, match="excluded 2 tasks"):
        data = dataset.PhraseCut(damaged_root, "test", train=False)
    assert [reason for _, reason in data.excluded] == ["no polygon with at least 2 vertices"] * 2


def test_malformed_task_names_the_file_and_task(damaged_root):
    tasks = refer(damaged_root, "miniv")
    del tasks[0]["phrase"]
    (data_dir(damaged_root) / "refer_miniv.json").write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=r"refer_miniv.json: task #0 .* is malformed \(KeyError"):
        dataset.PhraseCut(damaged_root, "miniv", train=False)


# ------------------------------------------------------------------------------------------- open_rgb


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
    rgb = dataset.open_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == image.size
    np.testing.assert_allclose(np.asarray(rgb)[0, 0], expected, atol=3)


def test_open_rgb_palette_and_exif_rotation(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(np.asarray(dataset.open_rgb(tmp_path / "palette.png"))[0, 0], (10, 200, 30))
    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(wide).save(tmp_path / "rotated.png", exif=exif)
    upright = np.asarray(dataset.open_rgb(tmp_path / "rotated.png"))
    assert upright.shape == (8, 4, 3)
    assert (upright[:4, :, 0] == 255).all() and (upright[4:, :, 0] == 0).all()  # left half became the top
    assert dataset.upright_size(tmp_path / "rotated.png") == (4, 8)


def test_open_rgb_min_side_decodes_jpegs_smaller_but_reports_the_full_size(tmp_path):
    rows, cols = np.mgrid[0:300, 0:440]
    gradient = np.stack([rows * 255 // 300, cols * 255 // 440, (rows + cols) % 256], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    Image.fromarray(gradient).save(tmp_path / "photo.jpg", quality=95)
    Image.fromarray(gradient).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    Image.fromarray(gradient).save(tmp_path / "photo.png")
    full = dataset.open_rgb(tmp_path / "photo.jpg")
    assert full.size == full.info["full_size"] == (440, 300)
    for min_side, expected in ((64, (110, 75)), (100, (220, 150)), (150, (220, 150)), (151, (440, 300))):
        reduced = dataset.open_rgb(tmp_path / "photo.jpg", min_side=min_side)
        assert reduced.size == expected and reduced.info["full_size"] == (440, 300)
        assert min(reduced.size) >= min_side
        squash = np.asarray(reduced.resize((64, 64), Image.BILINEAR), dtype=float)
        assert np.abs(squash - np.asarray(full.resize((64, 64), Image.BILINEAR), dtype=float)).mean() < 2
    sideways = dataset.open_rgb(tmp_path / "sideways.jpg", min_side=64)
    assert sideways.size == (75, 110) and sideways.info["full_size"] == (300, 440)
    png = dataset.open_rgb(tmp_path / "photo.png", min_side=64)
    assert png.size == png.info["full_size"] == (440, 300)


def test_open_rgb_refuses_decompression_bombs(tmp_path, monkeypatch):
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(dataset, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(dataset.UnreadableImage, match="big.png: too large"):
        dataset.open_rgb(tmp_path / "big.png")


# ------------------------------------------------------------------------------------------- user folders


def make_folder(tmp_path: Path, records: list[dict]) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    index = tmp_path / "train.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in records))
    return index


def test_user_folder_png_and_polygon_masks(tmp_path):
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.jpg")
    mask = np.zeros((30, 40), np.uint8)
    mask[5:15, 10:20] = 1  # a 0/1 mask must not be thresholded away
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    index = make_folder(
        tmp_path,
        [
            {"image": "a.jpg", "phrase": "box", "mask": "a_mask.png"},
            {"image": "a.jpg", "phrase": "corner", "mask": [[[0, 0], [3, 0], [3, 3], [0, 3]]], "id": "corner-1"},
        ],
    )
    data = dataset.UserFolder(index, train=False, image_size=40)
    first, second = data[0], data[1]
    assert first["task_id"] == "train.jsonl:1" and second["task_id"] == "corner-1"
    np.testing.assert_array_equal(first["full_mask"], mask == 1)
    assert second["full_mask"].sum() == 16 and second["full_mask"][:4, :4].all()
    assert first["mask"].shape == (1, 40, 40) and first["original_size"] == (30, 40)


def test_user_folder_csv_split_filter_and_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "dot.png")
    Image.new("L", (1, 1), 255).save(tmp_path / "dot_mask.png")
    (tmp_path / "data.csv").write_text(
        "image,phrase,mask,split\n"
        "dot.png,red dot,dot_mask.png,train\n"
        'dot.png,whole dot,"[[[0, 0], [1, 0], [1, 1]]]",val\n'
    )
    train = dataset.build_dataset("folder", tmp_path / "data.csv", "train", train=True, image_size=8)
    assert len(train) == 1
    sample = train[0]
    assert sample["mask"].sum() == 64 and sample["phrase"] == "red dot"
    val = dataset.build_dataset("folder", tmp_path / "data.csv", "val", train=False, image_size=8)
    assert val[0]["full_mask"].tolist() == [[True]]


def test_user_folder_non_binary_mask_is_thresholded_with_one_warning(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    Image.fromarray(np.tile(np.arange(0, 250, 25, dtype=np.uint8), (10, 1))).save(tmp_path / "soft.png")
    index = make_folder(tmp_path, [{"image": "a.png", "phrase": "p", "mask": "soft.png"}] * 2)
    data = dataset.UserFolder(index, train=False, image_size=10)
    with pytest.warns(UserWarning, match="soft.png is not binary.*> 127") as caught:
        sample = data[0]
        data[1]
    assert len([w for w in caught if "not binary" in str(w.message)]) == 1
    np.testing.assert_array_equal(sample["full_mask"][0], np.arange(0, 250, 25) > 127)


def test_user_folder_bad_records_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found.*image, phrase, mask"):
        dataset.UserFolder(tmp_path / "missing.jsonl", train=True)
    index = tmp_path / "bad.jsonl"
    index.write_text('{"image": "a.png", "phrase": "p", "mask": "m.png"}\n{"image": "a.png", "phrase": "p"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each record needs the fields image, phrase and mask"):
        dataset.UserFolder(index, train=True)
    index.write_text('{"image": "a.png", "phrase": "p", "mask": "m.png"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        dataset.UserFolder(index, train=True)


def test_user_folder_missing_files_and_mask_size_mismatch_are_skipped(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    Image.new("L", (5, 5), 255).save(tmp_path / "small_mask.png")
    Image.new("L", (10, 10), 255).save(tmp_path / "good_mask.png")
    index = make_folder(
        tmp_path,
        [
            {"image": "gone.png", "phrase": "p", "mask": "good_mask.png"},
            {"image": "a.png", "phrase": "p", "mask": "small_mask.png"},
            {"image": "a.png", "phrase": "q", "mask": "good_mask.png"},
        ],
    )
    data = dataset.UserFolder(index, train=True, image_size=8)
    with pytest.warns(UserWarning):
        first, second = data[0], data[1]
    assert first["phrase"] == second["phrase"] == "q"
    (task_1, reason_1), (task_2, reason_2) = first["skipped"] + second["skipped"]
    assert task_1 == "train.jsonl:1" and "file not found" in reason_1 and "gone.png" in reason_1
    assert task_2 == "train.jsonl:2" and "mask" in reason_2 and "5x5 but the image is 10x10" in reason_2


def test_build_dataset_kinds(synthetic_root):
    data = dataset.build_dataset("synthetic", synthetic_root, "test", train=False, image_size=SMALL)
    assert isinstance(data, dataset.PhraseCut) and len(data) == len(refer(synthetic_root, "test"))
    with pytest.raises(ValueError, match="unknown dataset kind 'coco'"):
        dataset.build_dataset("coco", synthetic_root, "test", train=False)


def test_pickled_dataset_maps_the_index_instead_of_copying_it(synthetic_root):
    data = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL)
    payload = pickle.dumps(data)
    clone = pickle.loads(payload)
    assert isinstance(clone.tables[0].points, np.memmap)
    assert data.tables[0].points.nbytes > 1000 and len(payload) < data.tables[0].points.nbytes
    assert clone.tasks[3]["task_id"] == data.tasks[3]["task_id"] and clone[3]["mask"].shape == (1, SMALL, SMALL)
