"""The paper's one-shot and zero-shot benchmarks: episode protocols, their samples and their scoring.

| benchmark, protocol | episodes | input (S = the model's side) | scored at |
|---|---|---|---|
| pascal5i original | PFENet's: one per listed image, `random` seed 123 | PFENet's test_Resize | original size |
| pascal5i hsnet | HSNet's fold file, 1,000, numpy seed 0 | PIL resize to S x S | S x S (nearest) |
| coco20i (both) | HSNet's sampler, 1,000, numpy seed 0 | PIL resize to S x S | S x S (nearest) |
| voc-zeroshot | every val image, 21 text prompts, argmax | bilinear, half-pixel | S x S (nearest) |
| phrasecut visual | test tasks whose phrase another task has | PhraseCut's test pipeline | S x S, original |

Void (255) is ignored everywhere.

Prompts: `visual` = the support image and mask through the original's `crop_blur_highlight352`
(`clipseg.visual_prompts.visual_prompt`), the support pipeline equal to the query's; `text` = "a photo of a <name>."
(Pascal) or the bare class name (COCO). The query is never its own support. Metrics: `metrics.EpisodeMetrics` per fold
(the original averages folds unweighted) and `metrics.ZeroShotMetrics`. Where the original scorer had bugs
(zero-shot seen/unseen swapped; unseen-5 scored for models trained without 5 *pairs*), this does what the paper
reports (README, "Benchmarks").

The data sets here yield `clipseg.samples.Sample`s and every benchmark predicts through `clipseg.inference`'s loop
(`predict_batches`); PhraseCut with visual prompts is scored as score.py scores text (`clipseg.scoring.ScoreRun`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from clipseg.benchmarks.classes import (
    COCO_CLASSES,
    PASCAL_CLASSES,
    PASCAL_TEXT_TEMPLATE,
    VOC_ZERO_SHOT_NAMES,
    coco_fold_classes,
    pascal_fold_classes,
    zero_shot_unseen,
)
from clipseg.benchmarks.readers import Coco20i, LabelledImage, VocData, coco_query_id, label_counts, read_pair
from clipseg.distributed import Distributed, gather_blocks, gather_lists, merge_rank_metrics
from clipseg.images import VOID_LABEL, UnreadableImage, open_rgb, read_label
from clipseg.inference import predict_batches
from clipseg.metrics import EpisodeMetrics, ZeroShotMetrics
from clipseg.outputs import json_text, safe_name, write_text
from clipseg.rasterise import instances_to_mask
from clipseg.samples import ImageInfo, Sample, Skip, SkipLog, Task
from clipseg.scoring import ScoreRun
from clipseg.transforms import (
    ImageTransform,
    letterbox,
    resize_labels,
    resize_pixels,
    unletterbox,
)
from clipseg.visual_prompts import visual_prompt
from model import CLIPSeg

if TYPE_CHECKING:
    from dataset import PhraseCut

BENCHMARKS = ("pascal5i", "coco20i", "voc-zeroshot")
PROTOCOLS = ("original", "hsnet")
PROMPTS = ("text", "visual")
PFENET_MIN_PIXELS = 2 * 32 * 32  # PFENet lists an image for a class from this many pixels on
PFENET_SEED, HSNET_SEED = 123, 0
DEFAULT_EPISODES = 1000
BACKGROUND_WEIGHT = 3.0  # zero-shot: the background's probability counts 3 times (the original's CLIPSegMultiLabel)
ZERO_SHOT_OFFSET = -10.0


class BenchmarkError(Exception):
    """Options or data that cannot be scored; the message says what to do."""


@dataclass(frozen=True)
class Episode:
    """One one-shot episode: the query image, the class asked for and the support image (ids)."""

    index: int
    query: str
    class_id: int
    support: str


def default_seed(benchmark: str, protocol: str) -> int:
    """123 for Pascal-5i's original protocol (PFENet seeds Python's `random` with it), else HSNet's 0."""
    return PFENET_SEED if benchmark == "pascal5i" and protocol == "original" else HSNET_SEED


# ------------------------------------------------------------------------------------------------ episodes


def pascal_original_episodes(
    items: Sequence[LabelledImage], fold: int, seed: int = PFENET_SEED, progress: bool = True
) -> list[Episode]:
    """PFENet's validation episodes (SemData, mode val, 1 shot): one per listed image, in list order.

    An image is listed when a fold class has at least 2,048 pixels in it; so is it in that class's support list.
    The query class is drawn uniformly (`random.randint`) over the fold classes present in any amount; PFENet then
    draws a support index it discards, and draws again until the support is not the query. A class whose support
    list holds only the query (PFENet would loop forever) raises BenchmarkError. progress: show a bar while the
    labels are read (under torchrun, on rank 0 only)."""
    classes = set(pascal_fold_classes(fold))
    labelled = tqdm(items, desc="reading labels", unit="image", disable=not progress)
    try:
        counts = {item.id: label_counts(item.label) for item in labelled}
    except UnreadableImage as err:  # the episodes depend on every label: none can be left out
        raise BenchmarkError(
            f"{err}; PFENet's episodes are drawn from the labels of every listed image, so each must be readable: "
            "restore the file (SegmentationClassAug) or score with --protocol hsnet"
        ) from err
    listed = [item for item in items if any(counts[item.id].get(c, 0) >= PFENET_MIN_PIXELS for c in classes)]
    supports = {c: [item.id for item in listed if counts[item.id].get(c, 0) >= PFENET_MIN_PIXELS] for c in classes}
    rng = random.Random(seed)
    episodes = []
    for index, item in enumerate(listed):
        present = sorted(c for c in counts[item.id] if c in classes)
        chosen = present[rng.randint(1, len(present)) - 1]
        candidates = supports[chosen]
        if not set(candidates) - {item.id}:
            raise BenchmarkError(f"class {PASCAL_CLASSES[chosen - 1]} of {item.id} has no other support image")
        rng.randint(1, len(candidates))  # PFENet's first draw, overwritten inside its loop
        support = item.id
        while support == item.id:
            support = candidates[rng.randint(1, len(candidates)) - 1]
        episodes.append(Episode(index, item.id, chosen, support))
    return episodes


def _draw_other(rng: np.random.RandomState, names: Sequence[str], query: str) -> str:
    """HSNet's support draw: `np.random.choice(names, 1, replace=False)[0]` until it differs from the query."""
    if not set(names) - {query}:
        raise BenchmarkError(f"no support image other than the query {query} in a class list of {len(names)}")
    while True:
        support = names[rng.choice(len(names), 1, replace=False)[0]]
        if support != query:
            return support


def hsnet_pascal_episodes(
    pairs: Sequence[tuple[str, int]], n_episodes: int = DEFAULT_EPISODES, seed: int = HSNET_SEED
) -> list[Episode]:
    """HSNet's Pascal-5i test episodes: the query of episode i is fold-file entry i mod N; the support is uniform
    over the fold file's images of the class, redrawn while it is the query (numpy's legacy generator)."""
    classwise: dict[int, list[str]] = {}
    for name, class_id in pairs:
        classwise.setdefault(class_id, []).append(name)
    rng = np.random.RandomState(seed)
    episodes = []
    for index in range(n_episodes):
        query, class_id = pairs[index % len(pairs)]
        episodes.append(Episode(index, query, class_id, _draw_other(rng, classwise[class_id], query)))
    return episodes


def coco_episodes(
    classwise: dict[int, list[str]], classes: Sequence[int], n_episodes: int = DEFAULT_EPISODES, seed: int = HSNET_SEED
) -> list[Episode]:
    """HSNet's COCO-20i episodes (the index is ignored): class uniform over the fold's 20, query uniform over the
    class's images, support uniform and not the query."""
    rng = np.random.RandomState(seed)
    episodes = []
    for index in range(n_episodes):
        class_id = classes[rng.choice(len(classes), 1, replace=False)[0]]
        names = classwise[class_id]
        query = names[rng.choice(len(names), 1, replace=False)[0]]
        episodes.append(Episode(index, query, class_id, _draw_other(rng, names, query)))
    return episodes


# ------------------------------------------------------------------------------------------------ samples


class EpisodeData(Dataset):
    """Model inputs of one-shot episodes. Item i is a `clipseg.samples.Sample`: the query's `pixel_values`
    (3, S, S), one task prompted by the class's `phrase` (text) or the support's prompt image (3, S, S, visual), and
    the query's `image`: `labels` (h, w) uint8 (1 object, 0 not, 255 ignored) at the resolution the episode is
    scored at, `letterboxed` (the prediction maps back with `clipseg.transforms.unletterbox`), the episode's fields;
    or only a skip when a file cannot be read."""

    def __init__(
        self,
        benchmark: str,
        protocol: str,
        prompt: str,
        episodes: Sequence[Episode],
        source: Coco20i | VocData,
        size: int,
    ):
        self.benchmark, self.protocol, self.prompt = benchmark, protocol, prompt
        self.episodes, self.source, self.size = list(episodes), source, size
        self.square = ImageTransform("pil", size)  # torchvision's Resize((S, S)) on PIL images, as HSNet does

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> Sample:
        episode = asdict(self.episodes[index])
        try:
            pixels, gt, letterboxed = self._view(episode["query"], episode["class_id"], query=True)
            if self.prompt == "text":
                task, prompt_images = Task(phrase=self.class_phrase(episode["class_id"])), None
            else:
                support_pixels, support_gt, _ = self._view(episode["support"], episode["class_id"], query=False)
                task = Task(has_prompt_image=True)
                prompt_images = visual_prompt(support_pixels, torch.from_numpy(support_gt == 1), self.size)[None]
        except UnreadableImage as err:
            return Sample(skipped=[Skip(episode, str(err))])
        image = ImageInfo(labels=gt, letterboxed=letterboxed, episode=episode)
        return Sample(pixel_values=pixels, tasks=[task], prompt_images=prompt_images, image=image)

    def class_phrase(self, class_id: int) -> str:
        if self.benchmark == "coco20i":
            return COCO_CLASSES[class_id]
        return PASCAL_TEXT_TEMPLATE.format(PASCAL_CLASSES[class_id - 1])

    def _view(self, name: str, class_id: int, query: bool) -> tuple[torch.Tensor, np.ndarray, bool]:
        """(pixels (3, S, S), target (h, w) uint8 with 255 ignored, letterboxed) of one image for a class."""
        if self.benchmark == "coco20i":
            image, mask = self.source.read(name, class_id)
            target = resize_labels(mask.astype(np.uint8), (self.size, self.size), "original")
            return self.square.pixels(image), target, False
        image, labels = read_pair(self.source.item(name))
        target = np.where(labels == VOID_LABEL, VOID_LABEL, labels == class_id).astype(np.uint8)
        if self.protocol == "original":
            pixels, canvas = letterbox(image, target, self.size)
            return pixels, (target if query else canvas), True
        return self.square.pixels(image), resize_labels(target, (self.size, self.size), "original"), False


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class FoldRun:
    """What one fold's scoring produced: metrics so far and the episodes that could not be read."""

    metrics: EpisodeMetrics
    skips: SkipLog = field(default_factory=SkipLog)
    n_episodes: int = 0


def score_episodes(
    model: CLIPSeg,
    data: EpisodeData,
    run: FoldRun,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    precision: str = "fp32",
    save_dir: Path | None = None,
    description: str = "episodes",
    world: Distributed | None = None,
) -> FoldRun:
    """Score every episode of `data` into `run`. With `save_dir`: one PNG per episode (0/255, probability > the
    report threshold, at the resolution it was scored at) named `<episode>__<query>__<class>__<support>.png`,
    listed in `episodes.jsonl` with its counts. world: this rank's blocks of episodes, every rank's merged into
    `run` (PNGs written by the rank that made them, episodes.jsonl by rank 0, in episode order)."""
    world = world or Distributed()
    threshold = float(run.metrics.thresholds[run.metrics.report_index])
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    records, n_episodes = {}, 0
    predictions = predict_batches(
        model,
        data,
        batch_size=batch_size,
        world=world,
        num_workers=num_workers,
        precision=precision,
        skips=run.skips,
        description=description,
        visual_prompts=data.prompt == "visual",
    )
    for prediction in predictions:
        probabilities = torch.sigmoid(prediction.logits[:, 0])
        for i, image in enumerate(prediction.batch.images):
            episode, gt = image.episode, image.labels
            probs = unletterbox(probabilities[i], *gt.shape) if image.letterboxed else probabilities[i]
            counts = run.metrics.update(probs, gt == 1, episode["class_id"], valid=gt != VOID_LABEL)
            n_episodes += 1
            if save_dir is not None:
                png = save_episode_png(save_dir, data, episode, probs.numpy() > threshold)
                tp, fp, fn, tn = (int(c) for c in counts[:, run.metrics.report_index])
                record = {**episode, "class": class_name(data.benchmark, episode["class_id"]), "png": png}
                record.update(height=gt.shape[0], width=gt.shape[1], threshold=threshold, tp=tp, fp=fp, fn=fn, tn=tn)
                records.setdefault(prediction.block, []).append(json_text(record) + "\n")
    merge_rank_metrics(run.metrics, world)
    run.skips.merge_ranks(world)
    run.n_episodes += sum(gather_blocks({world.rank: n_episodes}, world))
    records = gather_lists(records, world)
    if save_dir is not None and world.is_main:
        write_text(save_dir / "episodes.jsonl", "".join(records))
    return run


def class_name(benchmark: str, class_id: int) -> str:
    return COCO_CLASSES[class_id] if benchmark == "coco20i" else PASCAL_CLASSES[class_id - 1]


def save_episode_png(directory: Path, data: EpisodeData, episode: dict, mask: np.ndarray) -> str:
    """Write a binary (h, w) mask as `<episode>__<query>__<class>__<support>.png` (0/255, mode L); returns the name."""
    parts = [
        f"{episode['index']:05d}",
        episode["query"],
        class_name(data.benchmark, episode["class_id"]),
        episode["support"],
    ]
    stem = safe_name("__".join(coco_query_id(p).lower().replace(" ", "-") for p in parts))
    Image.fromarray(mask.astype(np.uint8) * 255).save(directory / f"{stem}.png")
    return f"{stem}.png"


# ------------------------------------------------------------------------------------------------ folds


def fold_episodes(
    benchmark: str,
    protocol: str,
    fold: int,
    root: Path,
    splits: Path | None,
    seed: int,
    n_episodes: int,
    progress: bool = True,
) -> tuple[list[Episode], object, str]:
    """(episodes, reader, note on the list read) of one fold; progress: bars while reading (rank 0's only)."""
    if benchmark == "coco20i":
        coco = Coco20i(root, fold, splits)
        return coco_episodes(coco.classwise, coco_fold_classes(fold), n_episodes, seed), coco, coco.source
    voc = VocData(root, splits)
    if protocol == "original":
        items, note = voc.pfenet_list()
        return pascal_original_episodes(items, fold, seed, progress), voc, note
    pairs = [(item.id, class_id) for item, class_id in voc.hsnet_fold(fold)]
    return hsnet_pascal_episodes(pairs, n_episodes, seed), voc, f"HSNet fold{fold}.txt"


def fold_results(run: FoldRun, benchmark: str) -> dict:
    """One fold's JSON: paper metrics, HSNet's, per-class rows, skips."""
    values = run.metrics.compute() if run.n_episodes else {}
    per_class = values.pop("per_class", {})
    hsnet = {"miou": values.pop("hsnet_miou", None), "fb_iou": values.pop("fb_iou", None)}
    rows = [{"class_id": c, "class": class_name(benchmark, c), **row} for c, row in per_class.items()]
    return {
        "n_episodes": run.n_episodes,
        "paper": values,
        "hsnet": hsnet,
        "per_class": rows,
        "skipped": {"count": len(run.skips.reasons), "episodes": run.skips.reasons},
    }


def mean_over_folds(folds: dict[str, dict], key: str) -> dict:
    """Unweighted mean over folds of each numeric value of `key` (as the original averages its fold scores)."""
    tables = [fold[key] for fold in folds.values() if fold[key]]
    names = [name for name, value in tables[0].items() if isinstance(value, int | float)] if tables else []
    return {name: float(np.mean([table[name] for table in tables])) for name in names if name != "n_episodes"}


# ------------------------------------------------------------------------------------------------ zero-shot


class ZeroShotData(Dataset):
    """VOC val images for zero-shot scoring (JoEm's pipeline), as `clipseg.samples.Sample`s without tasks (every
    image is asked for the 21 classes): `pixel_values` (3, S, S) by the half-pixel bilinear rule (torchvision's
    tensor Resize), the image's `labels` (S, S) uint8 by nearest (255 kept) and `episode` (index, query id)."""

    def __init__(self, items: Sequence[LabelledImage], size: int):
        self.items, self.size = list(items), size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        episode = {"index": index, "query": item.id}
        try:
            image = open_rgb(item.image, upright=False)
            labels = read_label(item.label, len(PASCAL_CLASSES))
        except (UnreadableImage, ValueError) as err:
            return Sample(skipped=[Skip(episode, str(err))])
        if labels.shape != (image.height, image.width):
            return Sample(skipped=[Skip(episode, f"{item.image}: size differs from label")])
        return Sample(
            pixel_values=resize_pixels(image, (self.size, self.size), "linear"),
            image=ImageInfo(labels=resize_labels(labels, (self.size, self.size), "original"), episode=episode),
        )


def zero_shot_classes(logits: torch.Tensor) -> torch.Tensor:
    """(B * 21, 1, S, S) logits of B images against the 21 class names, image by image -> (B, S, S) int64 class
    map: argmax over the classes of -10 + sigmoid(logit) x weight (weight 3 for background, 1 otherwise; the
    original's CLIPSegMultiLabel)."""
    per_class = logits.reshape(-1, len(VOC_ZERO_SHOT_NAMES), *logits.shape[-2:])
    scores = []
    for index in range(len(VOC_ZERO_SHOT_NAMES)):
        weight = BACKGROUND_WEIGHT if index == 0 else 1.0
        scores.append(ZERO_SHOT_OFFSET + torch.sigmoid(per_class[:, index]) * weight)
    return torch.stack(scores, dim=1).argmax(dim=1)


def score_zero_shot(
    model: CLIPSeg,
    data: ZeroShotData,
    metrics: ZeroShotMetrics,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    precision: str = "fp32",
    save_dir: Path | None = None,
    skips: SkipLog | None = None,
    world: Distributed | None = None,
) -> int:
    """Score every image into `metrics`, each against the 21 class names; returns the number scored. `save_dir`:
    `<id>.png`, the predicted class ids (mode L) at S x S. world: this rank's blocks of images, every rank's merged
    into `metrics` and `skips` (as `score_episodes`)."""
    world, skips = world or Distributed(), skips if skips is not None else SkipLog()
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    scored = 0
    for prediction in predict_batches(
        model,
        data,
        batch_size=batch_size,
        world=world,
        num_workers=num_workers,
        precision=precision,
        skips=skips,
        description="zero-shot",
        shared_phrases=VOC_ZERO_SHOT_NAMES,
    ):
        classes = zero_shot_classes(prediction.logits).numpy()
        for i, image in enumerate(prediction.batch.images):
            metrics.update(image.labels, classes[i])
            if save_dir is not None:
                Image.fromarray(classes[i].astype(np.uint8)).save(save_dir / f"{safe_name(image.episode['query'])}.png")
            scored += 1
    merge_rank_metrics(metrics, world)
    skips.merge_ranks(world)
    return sum(gather_blocks({world.rank: scored}, world))


def zero_shot_results(metrics: ZeroShotMetrics) -> dict:
    values = metrics.compute()
    per_class = values.pop("per_class")
    rows = [
        {"class_id": c, "class": VOC_ZERO_SHOT_NAMES[c], "iou": iou, "seen": c in metrics.seen}
        for c, iou in per_class.items()
    ]
    return {"zero_shot": values, "per_class": rows}


def zero_shot_split(n_unseen: int) -> tuple[list[int], list[int]]:
    """(seen, unseen) VOC ids of JoEm's unseen-n split; seen includes background (0)."""
    unseen = list(zero_shot_unseen(n_unseen))
    return [c for c in range(len(VOC_ZERO_SHOT_NAMES)) if c not in unseen], unseen


# ------------------------------------------------------------------------------------------------ PhraseCut


class PhraseCutVisual(Dataset):
    """PhraseCut test samples with a visual prompt instead of the phrase (the paper's Table 9): the support is
    another task with the same phrase (drawn with a seed per task), through the same test pipeline (whole image
    squashed to S) and `visual_prompt`. Tasks whose phrase no other task shares are excluded and listed."""

    def __init__(self, data: PhraseCut, seed: int = 0):
        self.data, self.seed = data, seed
        phrases = [data.task_info(i).phrase for i in range(len(data))]
        groups: dict[str, list[int]] = {}
        for index, phrase in enumerate(phrases):
            groups.setdefault(phrase, []).append(index)
        self.others = {i: [j for j in groups[p] if j != i] for i, p in enumerate(phrases) if len(groups[p]) > 1}
        self.indices = sorted(self.others)
        self.excluded = [
            (data.task_info(i).task_id, "unique phrase: no other task to take a support from")
            for i in range(len(data))
            if i not in self.others
        ]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Sample:
        index = self.indices[position]
        sample = self.data[index]
        task_id = self.data.task_info(index).task_id
        if sample.tasks[0].task_id != task_id:  # the data set moved on past an unreadable task: score it once, later
            return Sample(skipped=[Skip({"task_id": task_id}, "; ".join(skip.reason for skip in sample.skipped))])
        rng = np.random.default_rng([self.seed, index])
        others = list(self.others[index])
        while others:
            support = others.pop(int(rng.integers(len(others))))
            try:
                prompt = self._prompt(support)
            except UnreadableImage:
                continue
            task = replace(sample.tasks[0], has_prompt_image=True, support_task_id=self.data.task_info(support).task_id)
            return replace(sample, tasks=[task], prompt_images=prompt[None])
        return Sample(skipped=[Skip({"task_id": task_id}, "no readable support image")])

    def _prompt(self, index: int) -> torch.Tensor:
        task = self.data.task(index)
        image = open_rgb(task["image_path"])
        mask = instances_to_mask(task["Polygons"], image.height, image.width, "polygon2mask")
        transform = self.data.transform
        return visual_prompt(transform.pixels(image), torch.from_numpy(transform.mask(mask)), self.data.image_size)


def score_phrasecut_visual(
    model: CLIPSeg,
    data: PhraseCutVisual,
    run: ScoreRun,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    precision: str = "fp32",
    save_dir: Path | None = None,
    world: Distributed | None = None,
) -> ScoreRun:
    """Score with visual prompts into `run`, as score.py scores text (`clipseg.scoring.ScoreRun`: paper metrics at
    S x S, PhraseCut's at the original size); `save_dir`: `<task_id>.png` (0/255, original size). world: this
    rank's blocks of tasks into per-block sums, every rank's added in block order (`ScoreRun.finish`)."""
    world = world or Distributed()
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    for prediction in predict_batches(
        model,
        data,
        batch_size=batch_size,
        world=world,
        num_workers=num_workers,
        precision=precision,
        skips=run.skips,
        description="visual prompts",
        visual_prompts=True,
    ):
        run.update(prediction, save_dir)
    return run.finish(world)
