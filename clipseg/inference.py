"""The inference loop: a model over any data set of `clipseg.samples.Sample`s, one vision pass per image.

`predict_batches` is the one loop every evaluation runs through (score.py's PhraseCut scoring and benchmarks,
failure_test.py, train.py's validation): it batches the samples with `clipseg.samples.collate` in a DataLoader,
shows progress, records what the data set skipped, runs the model in the precision asked for, stops on NaN or
infinite logits (`clipseg.transforms.NonFiniteOutput`) and yields the logits with their batch. Each image is
encoded once and all of its tasks' prompts are decoded against those features in one decoder batch; the prompts
are the tasks' phrases, or their prompt images (`visual_prompts=True`), or one list of phrases for every image
(`shared_phrases`, the zero-shot benchmark).

`predict_tasks` predicts a test-mode PhraseCut or folder data set by image: PhraseCut's test split has about 5.6
tasks per image (14,354 tasks on 2,545 images), so each image is read and encoded once for all its tasks (at ViT-B/16
and 352 px: 91.6 + K x 1.8 GFLOPs for K tasks instead of K x 93.4, docs/original.md §9).

Under torchrun (`world`, clipseg/distributed.py) the data is sharded by blocks: item i (an episode, an image;
`predict_tasks`: an image of `image_groups()`) belongs to block i // block_size_for(n_items), block b to rank
b % world_size. A batch never crosses a block and says which block it is of (`Predictions.block`), so a caller can
keep per-block sums that add up to one process's results exactly (given `world` on one process too); what the
data set skipped is logged with its block, and one progress bar on rank 0 counts every rank's work.

    for prediction in predict_tasks(model, data, batch_size=16):
        prediction.logits               # (N, 1, S, S) float32 on the CPU, one per task
        prediction.batch.tasks[i].task_id, prediction.batch.masks, prediction.phrases, prediction.block
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clipseg.distributed import Distributed, GlobalProgress, block_batches, block_size_for, owned_blocks
from clipseg.precision import precision_context
from clipseg.samples import Batch, Sample, SkipLog, collate
from clipseg.transforms import check_finite
from model import CLIPSeg, ImageFeatures


@dataclass
class Predictions:
    """The model's output on a batch: `logits` (N, 1, S, S) float32 on the CPU, row i for the i-th (image, prompt)
    pair, image by image (the batch's tasks, or each image's `shared_phrases`); `phrases`: the N text prompts
    decoded (None for visual prompts); `block`: the block of the data set the batch is of (0 without `world`)."""

    batch: Batch
    phrases: list[str] | None
    logits: Tensor
    block: int = 0

    def __len__(self) -> int:
        return len(self.logits)


def predict_batches(
    model: CLIPSeg,
    data: Dataset,
    *,
    batch_size: int = 16,
    plan: Sequence[tuple[int, list[int]]] | None = None,
    world: Distributed | None = None,
    num_workers: int = 0,
    precision: str = "fp32",
    skips: SkipLog | None = None,
    description: str = "predicting",
    total: int | None = None,
    visual_prompts: bool = False,
    phrase_for_task: dict[str, str] | None = None,
    shared_phrases: Sequence[str] | None = None,
) -> Iterator[Predictions]:
    """Predict every sample of `data` in batches of `batch_size` samples, or the (block, item indices) batches of
    `plan`. world: only this rank's blocks of `data` (`clipseg.distributed.block_batches`, unless `plan` is given),
    one progress bar for the job; without it, one block (0) of consecutive batches.

    The prompts: each task's phrase (`phrase_for_task` replaces them by task id: score.py --shuffle-prompts), or
    each task's prompt image (`visual_prompts`), or with `shared_phrases` the same K phrases for every image,
    decoded one phrase at a time over the batch (the original's zero-shot CLIPSegMultiLabel). precision: fp32, bf16
    or int8, the model prepared for it (clipseg/precision.py). What the data set skipped goes to `skips`, each item
    once. The progress bar counts tasks out of `total` (default: one per sample), or images with `shared_phrases`."""
    device = next(model.parameters()).device
    if plan is None and world is not None:
        plan = block_batches(len(data), world, batch_size)
    batching = {"batch_sampler": [items for _, items in plan]} if plan is not None else {"batch_size": batch_size}
    blocks = (block for block, _ in plan) if plan is not None else itertools.repeat(0)
    loader = DataLoader(
        data, **batching, num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda"
    )  # fmt: skip
    skips = skips if skips is not None else SkipLog()
    unit = "image" if shared_phrases is not None else "task"
    progress = GlobalProgress(world or Distributed(), total=total or len(data), desc=description, unit=unit)
    for block, batch in zip(blocks, loader):
        skips.add(batch.skipped, block)
        progress.update(len(batch.skipped))
        if batch.pixel_values is None:
            continue
        phrases = prompt_phrases(batch, visual_prompts, phrase_for_task, shared_phrases)
        with torch.no_grad(), precision_context(precision, device):
            features = model.encode_image(batch.pixel_values.to(device))
            if shared_phrases is not None:
                logits = decode_each_phrase(model, features, shared_phrases, len(batch.images))
            elif visual_prompts:
                conditional = model.embed_images(batch.prompt_images.to(device))
                logits = model.decode(features, conditional, batch.prompts_per_image)
            else:
                logits = model.decode(features, model.embed_text(phrases), batch.prompts_per_image)
            logits = check_finite(logits)
        progress.update(len(batch.images) if shared_phrases is not None else len(batch.tasks))
        yield Predictions(batch, phrases, logits.float().cpu(), block)
    progress.close()  # a collective under torchrun: every rank gets here once its batches are done


def prompt_phrases(
    batch: Batch, visual: bool, phrase_for_task: dict[str, str] | None, shared: Sequence[str] | None
) -> list[str] | None:
    """The text prompts of a batch, one per logit row (None for visual prompts; then every task must have one)."""
    if shared is not None:
        return list(shared) * len(batch.images)
    if visual:
        if batch.prompt_images is None or not bool(batch.has_prompt_image.all()):
            raise ValueError("visual prompts: every task of the data set needs a prompt image")
        return None
    if phrase_for_task is not None:
        return [phrase_for_task[task_id] for task_id in batch.task_ids]
    return batch.phrases


def decode_each_phrase(model: CLIPSeg, features: ImageFeatures, phrases: Sequence[str], n_images: int) -> Tensor:
    """(B * K, 1, S, S) logits of B images against the same K phrases, image by image: phrase k decoded for all B
    images at once, as the original's CLIPSegMultiLabel does."""
    texts = model.embed_text(list(phrases))
    per_phrase = [model.decode(features, texts[k : k + 1].expand(n_images, -1)) for k in range(len(phrases))]
    return torch.stack(per_phrase, dim=1).flatten(0, 1)


# ------------------------------------------------------------------------------------------- tasks by image


class ImageGroups(Dataset):
    """A test-mode data set seen by image: item g is `data.group_sample` of image g's tasks (the image is read
    once). `tasks` restricts to a subset of task indices; images with more than `max_tasks` tasks are split.
    `world`: only the images of this rank's blocks (image i is in block i // block_size_for(n_images); `blocks[g]`
    is item g's); `n_tasks` counts the tasks of every rank."""

    def __init__(
        self, data: Dataset, tasks: Sequence[int] | None = None, max_tasks: int = 64, world: Distributed | None = None
    ):
        groups = data.image_groups()
        if tasks is not None:
            wanted = np.asarray(sorted(set(int(t) for t in tasks)), dtype=np.int64)
            groups = [group[np.isin(group, wanted)] for group in groups]
        self.data, self.n_tasks = data, sum(len(group) for group in groups)
        images = [i for _, block in owned_blocks(len(groups), world) for i in block] if world else range(len(groups))
        self.items, self.blocks = [], []
        for image in images:
            group = groups[image]
            for start in range(0, len(group), max_tasks):
                self.items.append(group[start : start + max_tasks])
                self.blocks.append(image // block_size_for(len(groups)) if world else 0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> Sample:
        return self.data.group_sample(self.items[item])

    def batches(self, batch_size: int) -> list[list[int]]:
        """Consecutive images packed into batches of at most `batch_size` tasks (an image is never split, a batch
        never crosses a block; its block is `blocks[batch[0]]`)."""
        batches, current, size = [], [], 0
        for item, tasks in enumerate(self.items):
            if current and (size + len(tasks) > batch_size or self.blocks[item] != self.blocks[current[0]]):
                batches.append(current)
                current, size = [], 0
            current.append(item)
            size += len(tasks)
        return batches + ([current] if current else [])


def predict_tasks(
    model: CLIPSeg,
    data: Dataset,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    precision: str = "fp32",
    tasks: Sequence[int] | None = None,
    phrase_for_task: dict[str, str] | None = None,
    skips: SkipLog | None = None,
    description: str = "scoring",
    group_by_image: bool = True,
    world: Distributed | None = None,
) -> Iterator[Predictions]:
    """Predict every task of a test-mode data set (or the subset `tasks`), images encoded once, through
    `predict_batches`. batch_size: tasks per decoder batch (an image with more tasks gets a batch of its own).
    Tasks whose image cannot be read are recorded in `skips` and not yielded. group_by_image=False reads and
    encodes the image once per task instead (the reference implementations' way; for comparisons). world: this
    rank's blocks of images only (module docstring), one progress bar counting every rank's tasks."""
    groups = ImageGroups(data, tasks, max_tasks=batch_size if group_by_image else 1, world=world)
    return predict_batches(
        model,
        groups,
        plan=[(groups.blocks[items[0]], items) for items in groups.batches(batch_size)],
        world=world,
        num_workers=num_workers,
        precision=precision,
        skips=skips,
        description=description,
        total=groups.n_tasks,
        phrase_for_task=phrase_for_task,
    )
