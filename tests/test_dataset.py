"""dataset.py: the original's sample pipeline, PhraseCut tasks, user folders, bad input."""

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    GOOD_TRIANGLE,
    NAN,
    data_dir,
    find_crop_reference,
    original_pipeline,
    refer,
    skimage_union,
    write_bad_polygons,
)
from PIL import Image

import dataset
from clipseg import sample_pipeline
from clipseg.images import open_rgb
from clipseg.rasterise import instances_to_mask
from clipseg.sample_pipeline import PROMPT_TEMPLATES
from clipseg.samples import Sample
from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD

SMALL = 64  # sample side for fast pipeline tests


def denormalise(pixel_values: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) 0..255 floats."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((pixel_values * std + mean) * 255).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------- PhraseCut samples


def floor_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    values = torch.from_numpy(mask.astype(np.uint8))[None, None]
    return torch.nn.functional.interpolate(values, size=(size, size), mode="nearest")[0, 0].numpy().astype(bool)


def test_test_samples_are_the_originals_whole_image_squash(synthetic_root):
    """pixel_values as the original computes them; the target is polygon2mask ground truth squashed with
    floor-nearest; full_mask is PhraseCut's own ground truth at the original size."""
    data = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL)
    tasks = refer(synthetic_root, "test")
    assert len(data) == len(tasks) and data.tasks[0]["task_id"] == tasks[0]["task_id"]
    for index, task in enumerate(tasks):
        sample = data[index]
        (sample_task,) = sample.tasks
        image = open_rgb(sample.image.path)
        assert sample_task.task_id == task["task_id"] and sample_task.phrase == task["phrase"]
        assert sample.image.original_size == (image.height, image.width)
        assert sample_task.phrase_type == task["phrase_structure"]["type"]
        assert sample_task.n_instances == len(task["Polygons"]) and not sample_task.negative
        polygons = [polygon for instance in task["Polygons"] for polygon in instance]
        original = skimage_union(polygons, image.height, image.width)
        official = instances_to_mask(task["Polygons"], image.height, image.width, rule="phrasecut")
        assert sample_task.full_mask.dtype == bool and original.any() and official.sum() > original.sum()
        np.testing.assert_array_equal(sample_task.full_mask, official)
        np.testing.assert_array_equal(sample.masks[0, 0].numpy().astype(bool), floor_nearest(original, SMALL))
        assert torch.equal(sample.pixel_values, original_pipeline(np.asarray(image), SMALL))
        assert sample.skipped == [] and sample.prompt_images is None


def test_pil_rule_samples_are_what_the_hf_processor_gives(synthetic_root):
    data = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL, resize="pil")
    sample = data[0]
    squashed = np.asarray(open_rgb(sample.image.path).resize((SMALL, SMALL), Image.BILINEAR), dtype=np.float32)
    np.testing.assert_allclose(denormalise(sample.pixel_values), squashed, atol=1e-3)


@pytest.fixture
def offsets_seen(monkeypatch) -> list:
    """The crop offsets the data set draws, recorded as it draws them (cleared by the test between samples)."""
    seen = []
    real_offsets = sample_pipeline.random_crop_offsets

    def recording(rng, height, width, tries=50):
        offsets = real_offsets(rng, height, width, tries)
        seen.extend(offsets.tolist())
        return offsets

    monkeypatch.setattr(sample_pipeline, "random_crop_offsets", recording)
    return seen


def test_training_samples_are_the_originals_crop_then_resize(synthetic_root, offsets_seen):
    data = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL)
    for index in range(12):
        offsets_seen.clear()
        sample = data[index]
        task = data.task(index)
        image = np.asarray(open_rgb(task["image_path"]))
        truth = skimage_union([p for instance in task["Polygons"] for p in instance], *image.shape[:2])
        top, left, side = find_crop_reference(truth, offsets_seen)
        assert side == min(image.shape[:2]) and len(offsets_seen) == 50
        crop = (slice(top, top + side), slice(left, left + side))
        assert torch.equal(sample.pixel_values, original_pipeline(image[crop], SMALL))
        np.testing.assert_array_equal(sample.masks[0, 0].numpy().astype(bool), floor_nearest(truth[crop], SMALL))
        assert sample.masks.shape == (1, 1, SMALL, SMALL) and sample.masks.dtype == torch.float32
        assert sample.tasks[0].full_mask is None and sample.skipped == []


def test_several_prompts_per_image_share_the_crop_and_keep_each_tasks_target(synthetic_root, offsets_seen):
    data = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, prompts_per_image=4)
    for index in range(6):
        offsets_seen.clear()
        sample = data[index]
        assert sample.masks.shape == (4, 1, SMALL, SMALL) and len(sample.tasks) == 4
        task_ids = [task.task_id for task in sample.tasks]
        by_id = {task["task_id"]: task for task in data.tasks[:]}
        primary = by_id[task_ids[0]]
        assert primary["task_id"] == data.tasks[index]["task_id"]  # the sample's own task first
        assert {by_id[t]["image_id"] for t in task_ids} == {primary["image_id"]}
        image = np.asarray(open_rgb(primary["image_path"]))
        truth = [skimage_union([p for i in by_id[t]["Polygons"] for p in i], *image.shape[:2]) for t in task_ids]
        top, left, side = find_crop_reference(truth[0], offsets_seen)  # the crop follows the primary task
        crop = (slice(top, top + side), slice(left, left + side))
        assert torch.equal(sample.pixel_values, original_pipeline(image[crop], SMALL))
        for k, mask in enumerate(truth):
            np.testing.assert_array_equal(sample.masks[k, 0].numpy().astype(bool), floor_nearest(mask[crop], SMALL))
            assert sample.tasks[k].phrase == by_id[task_ids[k]]["phrase"]
    with pytest.raises(ValueError, match="prompts_per_image must be 1, or more in training"):
        dataset.PhraseCut(synthetic_root, "test", train=False, prompts_per_image=2)


@pytest.mark.slow
def test_whole_image_samples_are_the_test_squash_at_the_requested_rate(synthetic_root):
    squashed = dataset.PhraseCut(synthetic_root, "train", train=False, image_size=SMALL)
    rectangular = [i for i in range(len(squashed)) if len(set(squashed[i].image.original_size)) == 2][:100]

    def is_whole_image(sample: Sample, index: int) -> bool:
        return torch.equal(sample.pixel_values, squashed[index].pixel_values)

    always = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, whole_image_prob=1.0)
    never = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL)
    assert all(is_whole_image(always[i], i) for i in rectangular)
    assert not any(is_whole_image(never[i], i) for i in rectangular)
    half = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, whole_image_prob=0.5, seed=3)
    draws = [is_whole_image(half[i], i) for i in rectangular * 4]
    assert len(draws) >= 100 and abs(np.mean(draws) - 0.5) < 3 * 0.5 / np.sqrt(len(draws))  # 3 sigma
    with pytest.raises(ValueError, match="whole_image_prob must be in"):
        dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, whole_image_prob=1.5)


def test_negatives_are_uniform_over_unique_phrases_with_empty_targets(synthetic_root):
    data = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=16, negative_prob=0.3, seed=1)
    phrases = {t["task_id"]: t["phrase"] for t in refer(synthetic_root, "train")}
    draws = [data[i % len(data)] for i in range(600)]
    negatives = [s for s in draws if s.tasks[0].negative]
    assert abs(len(negatives) / len(draws) - 0.3) < 0.06  # 3 sigma for n = 600
    for sample in negatives:
        assert sample.masks.sum() == 0 and sample.tasks[0].phrase != phrases[sample.tasks[0].task_id]
        assert sample.tasks[0].phrase in set(phrases.values())
    # uniform over the split's unique phrases: a phrase of many tasks is drawn no more often than a rare one
    frequent = max(set(phrases.values()), key=list(phrases.values()).count)
    share = sum(s.tasks[0].phrase == frequent for s in negatives) / len(negatives)
    n_unique = len(set(phrases.values()))
    assert share < 3 / n_unique + 0.05, (frequent, share, n_unique)


def test_visual_support_and_templates(synthetic_root):
    data = dataset.PhraseCut(
        synthetic_root,
        "train",
        train=False,
        image_size=SMALL,
        visual_support=True,
        templates=PROMPT_TEMPLATES["shuffle+"],
    )
    tasks = refer(synthetic_root, "train")
    counts = {}
    for task in tasks:
        counts[task["phrase"]] = counts.get(task["phrase"], 0) + 1
    seen = set()
    for index, task in enumerate(tasks):
        sample = data[index]
        (sample_task,) = sample.tasks
        assert sample.prompt_images.shape == (1, 3, SMALL, SMALL)
        assert sample_task.has_prompt_image == (counts[task["phrase"]] > 1)
        if sample_task.has_prompt_image:
            assert sample.prompt_images.abs().sum() > 0
        else:
            assert not sample.prompt_images.any()
        assert any(sample_task.phrase == t.format(task["phrase"]) for t in PROMPT_TEMPLATES["shuffle+"])
        seen.add(sample_task.has_prompt_image)
    assert seen == {True, False}


def test_training_draws_differ_but_test_samples_are_reproducible(synthetic_root):
    train = dataset.PhraseCut(
        synthetic_root, "train", train=True, image_size=SMALL, templates=PROMPT_TEMPLATES["shuffle+"]
    )
    assert len({train[0].tasks[0].phrase for _ in range(12)}) > 1
    test = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL, negative_prob=0.5)
    again = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL, negative_prob=0.5)
    assert [test[i].tasks[0].negative for i in range(len(test))] == [
        again[i].tasks[0].negative for i in range(len(test))
    ]


def test_val_miniv_is_both_splits_and_limit(synthetic_root):
    both = dataset.PhraseCut(synthetic_root, "val_miniv", train=False)
    ids = [t["task_id"] for t in refer(synthetic_root, "val") + refer(synthetic_root, "miniv")]
    assert [both.tasks[i]["task_id"] for i in range(len(both))] == ids
    assert len(dataset.PhraseCut(data_dir(synthetic_root), "val", train=False, limit=3)) == 3


# ------------------------------------------------------------------------------------------- bad input


def test_missing_dataset_dir_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        dataset.PhraseCut(tmp_path / "nowhere", "train", train=True)
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "data" / "VGPhraseCut_v0") in message and "download_dataset.py" in message
    assert "python -m clipseg.synthetic phrasecut" in message


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
    assert [s.tasks[0].task_id for s in samples[: len(bad)]] == [first_good] * len(bad)  # substitutes
    reported = [skip for s in samples for skip in s.skipped]
    assert [skip.item for skip in reported] == [{"task_id": task_id} for task_id in bad]  # each once over a pass
    assert all(reason in skip.reason and f"{tasks[0]['image_id']}.jpg" in skip.reason for skip in reported)


def test_skips_survive_dataloader_workers(damaged_root):
    tasks = refer(damaged_root, "val")
    (data_dir(damaged_root) / "images" / f"{tasks[0]['image_id']}.jpg").unlink()
    data = dataset.PhraseCut(damaged_root, "val", train=False, image_size=16)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, collate_fn=dataset.collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped = [skip for batch in loader for skip in batch.skipped]
    n_bad = sum(t["image_id"] == tasks[0]["image_id"] for t in tasks)
    assert sorted(skip.item["task_id"] for skip in skipped) == sorted(t["task_id"] for t in tasks[:n_bad])


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
    assert sample.skipped and sample.tasks[0].task_id != data.tasks[0]["task_id"]


def test_degenerate_polygons_are_excluded(damaged_root):
    tasks = refer(damaged_root, "test")
    tasks[0]["Polygons"] = [[]]
    tasks[1]["Polygons"] = [[[[3.0, 4.0]]]]
    (data_dir(damaged_root) / "refer_test.json").write_text(json.dumps(tasks))
    with pytest.warns(UserWarning, match="excluded 2 tasks"):
        data = dataset.PhraseCut(damaged_root, "test", train=False)
    assert [reason for _, reason in data.excluded] == [
        "no polygon",
        "no usable polygon (1 polygon dropped: 1 of zero area)",
    ]


def test_nan_infinite_and_zero_area_polygons_are_counted_exclusions(damaged_root):
    first, second, third = write_bad_polygons(damaged_root, "test")
    with pytest.warns(UserWarning, match="excluded 2 tasks .*; 4 bad polygons left out"):
        data = dataset.PhraseCut(damaged_root, "test", train=False, image_size=SMALL)
    assert data.excluded == [
        (
            second,
            "no usable polygon (2 polygons dropped: 1 with non-finite or out-of-range coordinates, 1 of zero area)",
        ),
        (third, "no usable polygon (1 polygon dropped: 1 of zero area)"),
    ]
    assert data.excluded_polygons == [
        (first, 1, "1 polygon dropped: 1 with non-finite or out-of-range coordinates"),
        (second, 2, "2 polygons dropped: 1 with non-finite or out-of-range coordinates, 1 of zero area"),
        (third, 1, "1 polygon dropped: 1 of zero area"),
    ]
    assert len(data) == len(refer(damaged_root, "test")) - 2
    kept = data.tasks[0]
    assert kept["task_id"] == first and [[p.tolist() for p in i] for i in kept["Polygons"]] == [[GOOD_TRIANGLE]]
    sample = data[0]
    expected = instances_to_mask([[np.array(GOOD_TRIANGLE)]], *sample.image.original_size, "phrasecut")
    np.testing.assert_array_equal(sample.tasks[0].full_mask, expected)
    assert expected.any()
    report = dataset.exclusion_report(data)
    assert report["excluded"]["count"] == 2 and report["excluded_polygons"]["count"] == 4


def test_user_folder_bad_polygons_are_dropped_and_counted(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    records = [
        {"image": "a.jpg", "phrase": "kept", "mask": [GOOD_TRIANGLE, [[1, 1], [2, 2]]], "id": "one"},
        {"image": "a.jpg", "phrase": "gone", "mask": [[[NAN, 1], [2, 2], [3, 1]]], "id": "two"},
        {"image": "a.jpg", "phrase": "nothing there", "mask": [], "id": "three"},  # an intended empty target
    ]
    index = tmp_path / "train.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning, match="excluded 1 tasks .*; 2 bad polygons left out"):
        data = dataset.UserFolder(index, train=False, image_size=SMALL)
    assert [r["id"] for r in data.records] == ["one", "three"]
    assert data.records[0]["mask"] == [[GOOD_TRIANGLE]] and not data[1].tasks[0].full_mask.any()
    assert data.excluded == [
        ("two", "no usable polygon (1 polygon dropped: 1 with non-finite or out-of-range coordinates)")
    ]
    assert [entry[:2] for entry in data.excluded_polygons] == [("one", 1), ("two", 1)]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("phrase", None, r"KeyError"),  # deleted
        ("phrase", 5, r"TypeError: phrase = 5 is not a string"),
        ("task_id", 5, r"TypeError: task_id = 5 is not a string"),
        ("image_id", 12.7, r"TypeError: image_id = 12.7 is not an int"),
        ("image_id", 10**30, r"ValueError: image_id = 10{30} is out of range"),
        ("phrase_structure", [1], r"TypeError: phrase_structure is not an object"),
    ],
)
def test_malformed_task_names_the_file_and_task(damaged_root, key, value, message):
    tasks = refer(damaged_root, "miniv")
    if value is None:
        del tasks[0][key]
    else:
        tasks[0][key] = value
    (data_dir(damaged_root) / "refer_miniv.json").write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=rf"refer_miniv.json: task #0 .* is malformed \({message}"):
        dataset.PhraseCut(damaged_root, "miniv", train=False)


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
    (first,), (second,) = data[0].tasks, data[1].tasks
    assert first.task_id == "train.jsonl:1" and second.task_id == "corner-1"
    np.testing.assert_array_equal(first.full_mask, mask == 1)
    assert second.full_mask.sum() == 16 and second.full_mask[:4, :4].all()
    assert data[0].masks.shape == (1, 1, 40, 40) and data[0].image.original_size == (30, 40)


def test_a_task_whose_mask_is_missing_is_skipped_beside_the_images_other_tasks(tmp_path):
    """Scoring and validation read an image's tasks together: one bad mask skips that task, not the run."""
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.jpg")
    Image.new("L", (20, 10), 255).save(tmp_path / "small_mask.png")
    index = make_folder(
        tmp_path,
        [
            {"image": "a.jpg", "phrase": "box", "mask": [[[0, 0], [3, 0], [3, 3], [0, 3]]], "id": "good"},
            {"image": "a.jpg", "phrase": "gone", "mask": "missing_mask.png", "id": "missing"},
            {"image": "a.jpg", "phrase": "small", "mask": "small_mask.png", "id": "small"},
        ],
    )
    data = dataset.UserFolder(index, train=False, image_size=40)
    (group,) = data.image_groups()
    with pytest.warns(UserWarning) as caught:
        sample = data.group_sample(group)
    said = [str(warning.message) for warning in caught]
    assert len(said) == 2 and "skipped task missing" in said[0] and "skipped task small" in said[1]
    assert [task.task_id for task in sample.tasks] == ["good"] and sample.masks.shape == (1, 1, 40, 40)
    assert [skip.item["task_id"] for skip in sample.skipped] == ["missing", "small"]
    assert "file not found" in sample.skipped[0].reason and "20x10 but the image is 40x30" in sample.skipped[1].reason


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
    assert sample.masks.sum() == 64 and sample.tasks[0].phrase == "red dot"
    val = dataset.build_dataset("folder", tmp_path / "data.csv", "val", train=False, image_size=8)
    assert val[0].tasks[0].full_mask.tolist() == [[True]]


@pytest.mark.parametrize("name", ["data.csv", "data.jsonl"])
def test_user_folder_index_saved_with_a_byte_order_mark_is_read(tmp_path, name):
    """Excel's "CSV UTF-8" (and some editors' UTF-8) start the file with a byte-order mark; it was read into the
    first field's name ('\ufeffimage'), and the index refused as lacking the field image."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "m.png")
    if name.endswith(".csv"):
        text = "image,phrase,mask\na.png,a thing,m.png\n"
    else:
        text = json.dumps({"image": "a.png", "phrase": "a thing", "mask": "m.png"}) + "\n"
    (tmp_path / name).write_text(text, encoding="utf-8-sig")
    data = dataset.build_dataset("folder", tmp_path / name, "train", train=False, image_size=8)
    assert len(data) == 1 and data[0].tasks[0].phrase == "a thing"


def test_user_folder_non_binary_mask_is_thresholded_with_one_warning(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    Image.fromarray(np.tile(np.arange(0, 250, 25, dtype=np.uint8), (10, 1))).save(tmp_path / "soft.png")
    index = make_folder(tmp_path, [{"image": "a.png", "phrase": "p", "mask": "soft.png"}] * 2)
    data = dataset.UserFolder(index, train=False, image_size=10)
    with pytest.warns(UserWarning, match="soft.png has more than two levels.*at least half its maximum") as caught:
        sample = data[0]
        data[1]
    assert len([w for w in caught if "more than two levels" in str(w.message)]) == 1
    np.testing.assert_array_equal(sample.tasks[0].full_mask[0], np.arange(0, 250, 25) >= 225 / 2)


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
    index.write_text('{"image": "a.png", "phrase": "p", "mask": [[[1, 2], [3, 4], [5]]]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: record bad.jsonl:1: polygon points must be \[x, y\] numbers"):
        dataset.UserFolder(index, train=True)
    for image in ("123", "null", '""'):
        index.write_text(f'{{"image": {image}, "phrase": "p", "mask": "m.png"}}\n')
        with pytest.raises(ValueError, match=r"bad.jsonl:1: image must be the image file's path"):
            dataset.UserFolder(index, train=True)


def test_user_folder_ids_must_be_unique(tmp_path):
    """Two records with one id were both scored, but --save-predictions kept one file for the two."""
    record = {"image": "a.png", "phrase": "p", "mask": "m.png", "id": "t1"}
    index = make_folder(tmp_path, [record, {**record, "id": "t2"}, record])
    with pytest.raises(ValueError, match=r"train.jsonl:3: id 't1' is also the id of line 1; give each record its"):
        dataset.UserFolder(index, train=False)


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
    assert first.tasks[0].phrase == second.tasks[0].phrase == "q"
    skip_1, skip_2 = first.skipped + second.skipped
    assert skip_1.item == {"task_id": "train.jsonl:1"} and "file not found" in skip_1.reason
    assert "gone.png" in skip_1.reason
    assert skip_2.item == {"task_id": "train.jsonl:2"} and "mask" in skip_2.reason
    assert "5x5 but the image is 10x10" in skip_2.reason


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
    assert clone.tasks[3]["task_id"] == data.tasks[3]["task_id"] and clone[3].masks.shape == (1, 1, SMALL, SMALL)
