"""Inference over a test-mode data set, one vision pass per image.

PhraseCut's test split has about 5.6 tasks per image (14,354 tasks on 2,545 images). Here each image is read and
encoded once and all of its tasks' prompts are decoded against those features in one decoder batch (at ViT-B/16
and 352 px: 91.6 + K x 1.8 GFLOPs for K tasks instead of K x 93.4, docs/original.md §9). score.py, failure_test.py and
train.py's validation all predict through `predict_tasks`, so their numbers agree.

Under torchrun (`world`, clipseg/distributed.py) the images are sharded: image i belongs to block
i // block_size_for(n_images), block b to rank b % world_size; a batch never crosses a block and says which block
it is of (`TaskBatch.block`), so a caller can keep per-block sums that add up to one process's results exactly.

    for batch in predict_tasks(model, data, batch_size=16):
        batch.logits        # (N, 1, S, S) float32 on the CPU, one per task
        batch.fields["task_id"], batch.fields["mask"], batch.phrases
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clipseg.distributed import Distributed, GlobalProgress, block_size_for, gather_lists, owned_blocks
from clipseg.precision import precision_context
from clipseg.transforms import check_finite
from model import CLIPSeg


@dataclass
class SkipLog:
    """Tasks that could not be predicted (unreadable image, size mismatch), each once with its reason (and the
    block of images it belongs to, for merging ranks' logs in block order)."""

    reasons: list[dict] = field(default_factory=list)
    skipped_ids: set[str] = field(default_factory=set)
    blocks: list[int] = field(default_factory=list)

    def add(self, task_id: str, reason: str, block: int = 0) -> None:
        if str(task_id) not in self.skipped_ids:
            self.skipped_ids.add(str(task_id))
            self.reasons.append({"task_id": str(task_id), "reason": str(reason)})
            self.blocks.append(block)

    def merged(self, world: Distributed) -> SkipLog:
        """The skips of every rank, in block order (on one process: as logged)."""
        by_block: dict[int, list[dict]] = {}
        for block, reason in zip(self.blocks, self.reasons):
            by_block.setdefault(block, []).append(reason)
        log = SkipLog()
        for reason in gather_lists(by_block, world):
            log.add(reason["task_id"], reason["reason"])
        return log


@dataclass
class TaskBatch:
    """Predictions for a batch of tasks. fields: the data set's test-mode fields per task (`task_id`, `mask`
    (N, 1, S, S), `full_mask`, `original_size`, `phrase_type`, `n_instances`, `image_path`, `pixel_values`
    (N, 3, S, S) of each task's image, ...); phrases: the N prompts used; logits: (N, 1, S, S) float32 on the CPU."""

    fields: dict
    phrases: list[str]
    logits: Tensor
    block: int = 0  # the block of images the batch is of (one block per batch)

    def __len__(self) -> int:
        return len(self.phrases)

    def get(self, key: str, index: int):
        """The value of `key` for task `index`, as a plain Python value (None when the data set has no such field)."""
        values = self.fields.get(key)
        if values is None:
            return None
        value = values[index]
        return value.item() if isinstance(value, torch.Tensor | np.generic) and value.ndim == 0 else value


class ImageGroups(Dataset):
    """A test-mode data set seen by image: item g is `data.group_sample` of image g's tasks (the image is read
    once). `tasks` restricts to a subset of task indices; images with more than `max_tasks` tasks are split.
    `world`: only the images of this rank's blocks (image i is in block i // block_size_for(n_images); `blocks[g]`
    is item g's)."""

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

    def __getitem__(self, item: int) -> dict:
        return self.data.group_sample(self.items[item])

    def batches(self, batch_size: int) -> list[list[int]]:
        """Consecutive images packed into batches of at most `batch_size` tasks (an image is never split)."""
        batches, current, size = [], [], 0
        for item, tasks in enumerate(self.items):
            if current and (size + len(tasks) > batch_size or self.blocks[item] != self.blocks[current[0]]):
                batches.append(current)
                current, size = [], 0
            current.append(item)
            size += len(tasks)
        return batches + ([current] if current else [])


def collate_groups(samples: list[dict]) -> dict:
    """Image groups -> one batch: `pixel_values` (G, 3, S, S), `prompts_per_image` (G,), per-task fields
    concatenated over the images (tensors along dim 0, lists joined), `skipped` joined."""
    batch: dict = {"skipped": [entry for sample in samples for entry in sample["skipped"]]}
    usable = [sample for sample in samples if "pixel_values" in sample]
    if not usable:
        return batch
    batch["pixel_values"] = torch.stack([sample["pixel_values"] for sample in usable])
    batch["prompts_per_image"] = [sample["prompts_per_image"] for sample in usable]
    for key in usable[0]:
        if key in batch:
            continue
        values = [sample[key] for sample in usable]
        batch[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
    return batch


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
) -> Iterator[TaskBatch]:
    """Predict every task of a test-mode data set (or the subset `tasks`), images encoded once, with a progress
    bar. batch_size: tasks per decoder batch (an image with more tasks gets a batch of its own); precision: fp32,
    bf16 or int8, the model prepared for it (clipseg/precision.py); phrase_for_task: replaces phrases by task id
    (score.py
    --shuffle-prompts). Tasks whose image cannot be read are recorded in `skips` and not yielded; NaN or infinite
    logits raise `clipseg.transforms.NonFiniteOutput`. world: predict this rank's images only (module docstring),
    one progress bar on rank 0 counting every rank's tasks.
    group_by_image=False reads and encodes the image once per task instead (the reference implementations' way;
    for comparisons)."""
    device = next(model.parameters()).device
    groups = ImageGroups(data, tasks, max_tasks=batch_size if group_by_image else 1, world=world)
    plan = groups.batches(batch_size)
    loader = DataLoader(
        groups,
        batch_sampler=plan,
        num_workers=num_workers,
        collate_fn=collate_groups,
        pin_memory=device.type == "cuda",
    )
    skips = skips if skips is not None else SkipLog()
    progress = GlobalProgress(world or Distributed(), total=groups.n_tasks, desc=description, unit="task")
    for items, batch in zip(plan, loader):
        block = groups.blocks[items[0]]
        for task_id, reason in batch["skipped"]:
            skips.add(task_id, reason, block)
        progress.update(len(batch["skipped"]))
        if "pixel_values" not in batch:
            continue
        phrases = list(batch["phrase"])
        if phrase_for_task is not None:
            phrases = [phrase_for_task[task_id] for task_id in batch["task_id"]]
        counts = batch["prompts_per_image"]
        with torch.no_grad(), precision_context(precision, device):
            features = model.encode_image(batch["pixel_values"].to(device))
            logits = check_finite(model.decode(features, model.embed_text(phrases), counts))
        batch["pixel_values"] = batch["pixel_values"].repeat_interleave(torch.tensor(counts), dim=0)
        progress.update(len(phrases))
        yield TaskBatch(batch, phrases, logits.float().cpu(), block)
    progress.close()  # a collective under torchrun: every rank gets here once its images are done
