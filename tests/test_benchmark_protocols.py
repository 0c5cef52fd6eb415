"""clipseg/benchmarks/protocols.py and score.py's benchmarks: episodes are the protocols' (seeded, never the query as
its own support), the demo model scores every benchmark end to end from the CLI, the reported per-class IoUs and
zero-shot scores equal a brute-force recomputation from the saved prediction PNGs, and 2 processes under torchrun
write the same results and PNGs as one, scoring each episode, image or task once."""

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
import torch.nn.functional as F
from conftest import score_outputs
from PIL import Image

import score
from clipseg.benchmarks import protocols as fewshot
from clipseg.benchmarks.classes import PASCAL_CLASSES, coco_fold_classes, pascal_fold_classes, zero_shot_unseen
from clipseg.benchmarks.protocols import coco_episodes, hsnet_pascal_episodes, pascal_original_episodes
from clipseg.benchmarks.readers import Coco20i, VocData, label_counts
from clipseg.outputs import safe_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZE = 64  # the tiny model's input side
THRESHOLD_INDEX = {0.3: 14, 0.1: 4}


def run_cli(tiny_checkpoints, *arguments):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = score.main(
            ["demo", "--checkpoints-dir", str(tiny_checkpoints), "--num-workers", "0", "--batch-size", "4", *arguments]
        )
    return results, printed.getvalue()


# ------------------------------------------------------------------------------------------------ episodes


def test_pascal_original_episodes_follow_pfenet(synthetic_voc):
    items, _ = VocData(synthetic_voc).pfenet_list()
    for fold in range(4):
        episodes = pascal_original_episodes(items, fold, seed=123)
        assert episodes == pascal_original_episodes(items, fold, seed=123)
        assert episodes != pascal_original_episodes(items, fold, seed=124)
        classes = pascal_fold_classes(fold)
        listed = [i.id for i in items if any(label_counts(i.label).get(c, 0) >= 2048 for c in classes)]
        assert [e.query for e in episodes] == listed  # one episode per listed image, in list order
        by_id = {item.id: item for item in items}
        for episode in episodes:
            assert episode.support != episode.query
            assert episode.class_id in label_counts(by_id[episode.query].label)  # present, any pixel count
            assert label_counts(by_id[episode.support].label)[episode.class_id] >= 2048


def test_a_label_of_the_pfenet_list_that_cannot_be_read_is_a_message(synthetic_voc, tmp_path):
    import dataclasses

    items, _ = VocData(synthetic_voc).pfenet_list()
    items[1] = dataclasses.replace(items[1], label=tmp_path / "gone.png")
    with pytest.raises(fewshot.BenchmarkError, match=r"gone.png.*PFENet's episodes are drawn from the labels of"):
        pascal_original_episodes(items, 0, progress=False)


def test_only_the_ranks_asked_to_show_the_label_reading_bar(synthetic_voc, capsys):
    items, _ = VocData(synthetic_voc).pfenet_list()
    shown = pascal_original_episodes(items, 0, seed=123)
    assert "reading labels" in capsys.readouterr().err
    assert pascal_original_episodes(items, 0, seed=123, progress=False) == shown  # torchrun's other ranks
    assert "reading labels" not in capsys.readouterr().err


def hsnet_reference(pairs, n_episodes, seed):
    """HSNet's DatasetPASCAL.sample_episode as its code reads, on numpy's global generator."""
    np.random.seed(seed)
    classwise = {}
    for name, class_id in pairs:
        classwise.setdefault(class_id, []).append(name)
    episodes = []
    for index in range(n_episodes):
        query, class_id = pairs[index % len(pairs)]
        while True:
            support = np.random.choice(classwise[class_id], 1, replace=False)[0]
            if support != query:
                break
        episodes.append((query, class_id, support))
    return episodes


def test_hsnet_episodes_equal_hsnets_sampler(synthetic_voc):
    pairs = [(item.id, class_id) for item, class_id in VocData(synthetic_voc).hsnet_fold(3)]
    episodes = hsnet_pascal_episodes(pairs, 40, seed=0)
    assert [(e.query, e.class_id, e.support) for e in episodes] == hsnet_reference(pairs, 40, 0)
    assert episodes != hsnet_pascal_episodes(pairs, 40, seed=1)
    assert all(e.support != e.query for e in episodes)


def test_coco_episodes_are_seeded_and_never_self_supported(synthetic_coco):
    coco = Coco20i(synthetic_coco, fold=0)
    episodes = coco_episodes(coco.classwise, coco_fold_classes(0), 60, seed=0)
    assert episodes == coco_episodes(coco.classwise, coco_fold_classes(0), 60, seed=0)
    assert episodes != coco_episodes(coco.classwise, coco_fold_classes(0), 60, seed=5)
    for episode in episodes:
        assert episode.support != episode.query and episode.class_id in coco_fold_classes(0)
        assert {episode.query, episode.support} <= set(coco.classwise[episode.class_id])


def test_a_class_without_another_support_image_is_an_error():
    with pytest.raises(fewshot.BenchmarkError, match="other than the query"):
        hsnet_pascal_episodes([("a", 1), ("b", 2)], 1)


# ------------------------------------------------------------------------------------------------ one-shot CLI


@pytest.fixture(scope="module")
def pascal_run(tiny_checkpoints, synthetic_voc, tmp_path_factory):
    predictions = tmp_path_factory.mktemp("pascal_predictions")
    results, printed = run_cli(
        tiny_checkpoints, "--data", "pascal5i", "--data-root", str(synthetic_voc), "--fold", "all",
        "--limit", "4", "--save-predictions", str(predictions),
    )  # fmt: skip
    return results, printed, predictions


def per_class_from_pngs(predictions, fold, ground_truth):
    """{class: IoU} with the paper's +1, from each episode's PNG and `ground_truth(record) -> (h, w) uint8`."""
    sums = {}
    for line in (predictions / f"fold{fold}" / "episodes.jsonl").read_text().splitlines():
        record = json.loads(line)
        predicted = np.asarray(Image.open(predictions / f"fold{fold}" / record["png"])) > 127
        gt = ground_truth(record)
        assert predicted.shape == gt.shape
        valid = gt != 255
        truth = gt == 1
        tp, fp, fn = (predicted & truth & valid).sum(), (predicted & ~truth & valid).sum(), (~predicted & truth).sum()
        total = sums.setdefault(record["class_id"], np.zeros(3))
        total += (tp, fp, fn)
    return {c: tp / (1 + tp + fp + fn) for c, (tp, fp, fn) in sums.items()}


def test_pascal_per_class_iou_equals_the_saved_pngs(pascal_run, synthetic_voc):
    results, printed, predictions = pascal_run
    labels = synthetic_voc / "VOC2012" / "SegmentationClassAug"

    def original_size_gt(record):
        raw = np.asarray(Image.open(labels / f"{record['query']}.png"))
        return np.where(raw == 255, 255, raw == record["class_id"]).astype(np.uint8)

    assert results["folds"] == [0, 1, 2, 3] and results["n_samples"] == 16
    for fold in range(4):
        expected = per_class_from_pngs(predictions, fold, original_size_gt)
        reported = {row["class_id"]: row["iou"] for row in results["per_fold"][str(fold)]["per_class"]}
        assert reported.keys() == expected.keys()
        for class_id, iou in expected.items():
            assert reported[class_id] == pytest.approx(iou, abs=1e-9)
        fold_paper = results["per_fold"][str(fold)]["paper"]
        assert fold_paper["miou"] == pytest.approx(np.mean(list(expected.values())), abs=1e-9)
    assert results["paper"]["miou"] == pytest.approx(
        np.mean([results["per_fold"][str(f)]["paper"]["miou"] for f in range(4)])
    )
    assert "| mean | 16 |" in printed and "aeroplane" in printed


def test_pascal_hsnet_text_prompts_score_at_the_model_size(tiny_checkpoints, synthetic_voc, tmp_path):
    results, _ = run_cli(
        tiny_checkpoints, "--data", "pascal5i", "--data-root", str(synthetic_voc), "--protocol", "hsnet",
        "--prompt-kind", "text", "--fold", "2", "--episodes", "6", "--save-predictions", str(tmp_path), "--out",
        str(tmp_path / "scores"),
    )  # fmt: skip
    labels = synthetic_voc / "VOC2012" / "SegmentationClassAug"

    def model_size_gt(record):
        raw = np.asarray(Image.open(labels / f"{record['query']}.png"))
        target = np.where(raw == 255, 255, raw == record["class_id"]).astype(np.uint8)
        import torch

        resized = F.interpolate(torch.from_numpy(target)[None, None], size=(SIZE, SIZE), mode="nearest")
        return resized[0, 0].numpy()

    expected = per_class_from_pngs(tmp_path, 2, model_size_gt)
    reported = {row["class_id"]: row["iou"] for row in results["per_class"]}
    assert reported == pytest.approx(expected, abs=1e-9)
    assert results["protocol"] == "hsnet" and results["prompt"] == "text" and results["n_samples"] == 6
    written = tmp_path / "scores" / "scores_pascal5i_hsnet_text_fold2.json"  # named after what was scored
    assert json.loads(written.read_text())["per_fold"]["2"]["n_episodes"] == 6


def test_coco_scores_end_to_end_at_the_papers_threshold(tiny_checkpoints, synthetic_coco, tmp_path):
    results, printed = run_cli(
        tiny_checkpoints, "--data", "coco20i", "--data-root", str(synthetic_coco), "--fold", "1", "--episodes",
        "5", "--save-predictions", str(tmp_path),
    )  # fmt: skip
    assert results["threshold"] == 0.1 and results["n_samples"] == 5 and "(t = 0.10)" in printed

    def coco_gt(record):
        name = record["query"].replace(".jpg", ".png")
        raw = np.asarray(Image.open(synthetic_coco / "annotations" / name)) == record["class_id"] + 1
        import torch

        resized = F.interpolate(torch.from_numpy(raw.astype(np.uint8))[None, None], size=(SIZE, SIZE), mode="nearest")
        return resized[0, 0].numpy()

    expected = per_class_from_pngs(tmp_path, 1, coco_gt)
    assert {row["class_id"]: row["iou"] for row in results["per_class"]} == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------------------ zero-shot CLI


def test_zero_shot_scores_equal_a_confusion_matrix_of_the_saved_pngs(tiny_checkpoints, synthetic_voc, tmp_path):
    results, printed = run_cli(
        tiny_checkpoints, "--data", "voc-zeroshot", "--data-root", str(synthetic_voc), "--unseen", "4",
        "--limit", "6", "--save-predictions", str(tmp_path),
    )  # fmt: skip
    unseen = list(zero_shot_unseen(4))
    assert results["unseen_classes"] == unseen == [1, 10, 14, 18]
    matrix = np.zeros((21, 21), np.int64)
    ids = (synthetic_voc / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:6]
    for image_id in ids:
        predicted = np.asarray(Image.open(tmp_path / f"{image_id}.png")).astype(np.int64)
        raw = np.asarray(Image.open(synthetic_voc / "VOC2012" / "SegmentationClass" / f"{image_id}.png"))
        import torch

        gt = F.interpolate(torch.from_numpy(raw.copy())[None, None], size=(SIZE, SIZE), mode="nearest")[0, 0].numpy()
        for g, p in zip(gt.ravel(), predicted.ravel()):
            if g < 21:
                matrix[g, p] += 1
    iou = [matrix[c, c] / u if (u := matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]) else 0.0 for c in range(21)]
    seen = [c for c in range(21) if c not in unseen]
    values = results["zero_shot"]
    assert values["miou_seen"] == pytest.approx(np.mean([iou[c] for c in seen]))
    assert values["miou_unseen"] == pytest.approx(np.mean([iou[c] for c in unseen]))
    assert [row["iou"] for row in results["per_class"]] == pytest.approx(iou)
    assert "mIoU seen" in printed and "| background | yes |" in printed


# ------------------------------------------------------------------------------------------------ PhraseCut


def test_phrasecut_visual_prompts_come_from_another_task_with_the_phrase(tiny_checkpoints, synthetic_root, tmp_path):
    import dataset

    base = dataset.build_dataset("synthetic", synthetic_root, "train", train=False, image_size=SIZE)
    visual = fewshot.PhraseCutVisual(base, seed=0)
    assert len(visual) + len(visual.excluded) == len(base) and len(visual) >= 8
    for position in range(4):
        sample = visual[position]
        (task,) = sample.tasks
        support = next(i for i in range(len(base)) if base.task_info(i).task_id == task.support_task_id)
        assert task.support_task_id != task.task_id and task.has_prompt_image
        assert base.task_info(support).phrase == task.phrase
        assert sample.prompt_images.shape == (1, 3, SIZE, SIZE)
    results, printed = run_cli(
        tiny_checkpoints, "--data", "synthetic", "--data-root", str(synthetic_root), "--split", "train",
        "--prompt-kind", "visual", "--limit", "6", "--out", str(tmp_path),
    )  # fmt: skip
    assert results["prompt"] == "visual" and results["n_samples"] == 6
    assert json.loads((tmp_path / "scores_synthetic_train_visual_first6.json").read_text())["n_samples"] == 6
    assert results["excluded"]["count"] == len(visual.excluded) and "PhraseCut official" in printed


def test_benchmark_options_are_checked(tiny_checkpoints, capsys):
    for arguments, message in (
        (["--data", "pascal5i", "--fold", "4"], "--fold must be 0 .. 3"),
        (["--data", "voc-zeroshot", "--prompt-kind", "visual"], "21 class names: --prompt-kind text"),
        (["--data", "coco20i", "--threshold", "0.25"], "--threshold must be one of"),
        (["--data", "pascal5i", "--shuffle-prompts"], "--shuffle-prompts"),
    ):
        with pytest.raises(SystemExit):
            score.parse_args(["demo", *arguments])
        assert message in capsys.readouterr().err
    assert PASCAL_CLASSES[0] == "aeroplane"


def test_benchmark_runs_stop_with_a_message_and_exit_status(
    tiny_checkpoints, overflowing_checkpoint, synthetic_coco, tmp_path, capsys, monkeypatch
):
    crafted = tmp_path / "crafted" / "splits" / "coco" / "val" / "fold1.pkl"
    crafted.parent.mkdir(parents=True)
    crafted.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "marker").encode() + b"'\ntR.")  # os.system(...)
    demo = ["demo", "--checkpoints-dir", str(tiny_checkpoints), "--num-workers", "0", "--precision", "fp32"]
    coco = ["--data", "coco20i", "--data-root", str(synthetic_coco), "--fold", "1", "--episodes", "2"]
    for arguments, message in [
        (["--model", str(overflowing_checkpoint), *demo[3:]], "the model's output holds .* NaN or infinite values"),
        ([*demo, "--splits-dir", str(tmp_path / "crafted")], r"crafted/splits/coco/val/fold1.pkl: refused"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            score.main([*arguments, *coco, "--out", str(tmp_path / "scores")])
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "marker").exists() and not (tmp_path / "scores").exists()
    monkeypatch.setattr(score, "load_model", lambda *args, **kwargs: pytest.fail("loaded before --out was checked"))
    with pytest.raises(SystemExit) as exit_info:
        score.main([*demo, *coco, "--out", str(crafted)])
    assert exit_info.value.code == 2 and "fold1.pkl is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ torchrun


def one_and_two_processes(tiny_checkpoints, tmp_path, *arguments):
    """score.py's demo on ARGUMENTS as one process, then as 2 gloo processes under torchrun: two (results without
    the time taken, {file under --save-predictions: bytes}, stdout)."""
    argv = ["demo", "--checkpoints-dir", tiny_checkpoints, *arguments, "--batch-size", "4", "--num-workers", "0"]
    argv += ["--precision", "fp32", "--device", "cpu"]
    return score_outputs(argv, tmp_path / "one"), score_outputs(argv, tmp_path / "two", nproc=2)


def episode_records(files: dict[str, bytes], fold: int) -> list[dict]:
    """A fold's episodes.jsonl, one record per scored episode."""
    return [json.loads(line) for line in files[f"fold{fold}/episodes.jsonl"].decode().splitlines()]


@pytest.mark.slow
def test_torchrun_pascal_scores_and_pngs_equal_one_processs(tiny_checkpoints, synthetic_voc, tmp_path):
    (one, one_files, _), (two, two_files, _) = one_and_two_processes(
        tiny_checkpoints, tmp_path, "--data", "pascal5i", "--data-root", synthetic_voc, "--fold", "0"
    )
    assert two == one  # metrics, per-class rows, skips
    assert two_files == one_files  # every episode PNG and episodes.jsonl
    assert two["n_samples"] > 4 and len(two_files) == two["n_samples"] + 1


@pytest.mark.slow
def test_torchrun_coco_scores_and_pngs_equal_one_processs(tiny_checkpoints, synthetic_coco, tmp_path):
    (one, one_files, _), (two, two_files, printed) = one_and_two_processes(
        tiny_checkpoints, tmp_path, "--data", "coco20i", "--data-root", synthetic_coco, "--fold", "all",
        "--episodes", "6",
    )  # fmt: skip
    assert one["folds"] == [0, 1, 2, 3] and one["n_samples"] == 24
    for fold in range(4):
        scored = one["per_fold"][str(fold)]
        assert scored["n_episodes"] == 6 and scored["paper"]["miou"] is not None and scored["per_class"]
        records = episode_records(one_files, fold)
        assert [record["index"] for record in records] == list(range(6))  # each episode once, in episode order
        pngs = {name for name in one_files if name.startswith(f"fold{fold}/") and name.endswith(".png")}
        assert pngs == {f"fold{fold}/{record['png']}" for record in records}
    assert two == one  # bit for bit: per-fold and per-class rows, the means over folds, skips
    assert two_files == one_files  # every episode's PNG and each fold's episodes.jsonl
    assert printed.count("| fold | episodes |") == 1  # the table printed once, by rank 0


@pytest.mark.slow
def test_torchrun_zero_shot_scores_and_pngs_equal_one_processs(tiny_checkpoints, synthetic_voc, tmp_path):
    (one, one_files, _), (two, two_files, printed) = one_and_two_processes(
        tiny_checkpoints, tmp_path, "--data", "voc-zeroshot", "--data-root", synthetic_voc, "--unseen", "10"
    )
    ids = (synthetic_voc / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert one["n_samples"] == len(ids) == 30 and sorted(one_files) == sorted(f"{safe_name(i)}.png" for i in ids)
    assert len(one["per_class"]) == 21 and len(one["unseen_classes"]) == 10
    assert None not in (one["zero_shot"]["miou_seen"], one["zero_shot"]["miou_unseen"])
    assert two == one  # the confusion matrix's IoUs, seen / unseen / harmonic, skips
    assert two_files == one_files  # every image's class map
    assert printed.count("| mIoU seen |") == 1


@pytest.mark.slow
def test_torchrun_phrasecut_visual_prompts_scores_and_pngs_equal_one_processs(
    tiny_checkpoints, synthetic_root, tmp_path
):
    import dataset

    base = dataset.build_dataset("synthetic", synthetic_root, "train", train=False, image_size=SIZE)
    visual = fewshot.PhraseCutVisual(base, seed=0)
    tasks = [base.task_info(i).task_id for i in visual.indices]
    (one, one_files, _), (two, two_files, printed) = one_and_two_processes(
        tiny_checkpoints, tmp_path, "--data", "synthetic", "--data-root", synthetic_root, "--split", "train",
        "--prompt-kind", "visual",
    )  # fmt: skip
    assert one["n_samples"] == one["phrasecut"]["n_tasks"] == len(tasks) >= 16
    assert sorted(one_files) == sorted(f"{safe_name(task)}.png" for task in tasks)  # each task once
    assert one["paper"]["miou"] is not None and one["excluded"]["count"] >= len(visual.excluded) > 0
    assert two == one  # bit for bit: the paper's and PhraseCut's metrics, exclusions, skips
    assert two_files == one_files
    assert printed.count("| threshold | mIoU") == 1
