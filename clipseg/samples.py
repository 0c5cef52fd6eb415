"""Samples and batches: what every data set gives the model, and the one way they are batched and skipped.

A data set item is a `Sample`: one image at the model's input with the tasks asked on it (one task per prompt), or,
when nothing of it can be used, no image and only the `Skip`s that say why. `collate` batches samples for a
DataLoader: images stacked, tasks listed image by image, their tensors concatenated, skips joined. The data sets
(`dataset.PhraseCut` and `dataset.UserFolder` through `clipseg.sample_pipeline`; the benchmarks' `EpisodeData`,
`ZeroShotData` and `PhraseCutVisual` in `clipseg.benchmarks.protocols`) all yield `Sample`s, and the training loop
(`clipseg.training`) and the inference loop (`clipseg.inference`) read `Batch`es.

Shapes (S = the model's input side; a sample has K tasks, a batch B images and N tasks in all; H x W an image's
original size, h x w the size a benchmark scores at):

    Sample.pixel_values   (3, S, S) float32, normalised        Batch.pixel_values   (B, 3, S, S)
    Sample.masks          (K, 1, S, S) float32 targets          Batch.masks          (N, 1, S, S)
    Sample.prompt_images  (K, 3, S, S) float32 visual prompts   Batch.prompt_images  (N, 3, S, S)
    Task.full_mask        (H, W) bool (PhraseCut's test-mode ground truth at the original size)
    ImageInfo.labels      (h, w) uint8 (benchmarks; 255 = void)

Skips: a sample lists in `skipped` what it could not use (a `Skip`: the item's identity and the reason), whether or
not it is usable itself (a PhraseCut sample stands in for an unreadable task with the next readable one); a sample
without `pixel_values` is left out of its batch. Reports list each skip once (`SkipLog`) as `{**item, "reason": ...}`;
under torchrun the ranks' logs are joined in block order (`SkipLog.merge_ranks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clipseg.distributed import Distributed, gather_lists


@dataclass(frozen=True)
class Skip:
    """An item that could not be used: `item` names it ({"task_id": ...} for a PhraseCut or folder task, an
    episode's fields for a benchmark) and `reason` says why."""

    item: dict[str, Any]
    reason: str

    def record(self) -> dict[str, Any]:
        """The skip as a report lists it: the item's fields and the reason."""
        return {**self.item, "reason": self.reason}


@dataclass
class SkipLog:
    """What a run could not use, each item once (a PhraseCut task may be reported by more than one sample), with the
    block of the data set it was reported in (`clipseg.distributed`: under torchrun each rank logs its own blocks,
    and `merge_ranks` joins the ranks' logs in block order)."""

    skips: list[Skip] = field(default_factory=list)  # each item's first `Skip`, in the order first reported
    blocks: list[int] = field(default_factory=list)  # the block each of `skips` was reported in
    seen: set[tuple] = field(default_factory=set)

    @property
    def reasons(self) -> list[dict]:
        """`Skip.record()` of each item, in the order first reported."""
        return [skip.record() for skip in self.skips]

    def add(self, skips: Sequence[Skip], block: int = 0) -> None:
        for skip in skips:
            key = tuple(skip.item.items())
            if key not in self.seen:
                self.seen.add(key)
                self.skips.append(skip)
                self.blocks.append(block)

    def merge_ranks(self, world: Distributed) -> SkipLog:
        """Replace the log by every rank's, in block order (on one process: its own in block order), each item once;
        a collective under torchrun (every rank calls it). Returns the log."""
        by_block: dict[int, list[tuple[int, Skip]]] = {}
        for block, skip in zip(self.blocks, self.skips):
            by_block.setdefault(block, []).append((block, skip))
        entries = gather_lists(by_block, world)
        self.skips, self.blocks, self.seen = [], [], set()
        for block, skip in entries:
            self.add([skip], block)
        return self


@dataclass
class Task:
    """One prompt asked on a sample's image and what it is scored against (its tensors are in the sample's `masks`
    and `prompt_images`, row for row)."""

    task_id: str = ""
    phrase: str | None = None  # the text prompt (PhraseCut: the task's phrase through a template)
    negative: bool = False  # training: the phrase of another task, the target empty
    has_prompt_image: bool = False  # its row of `prompt_images` is a prompt (zeros otherwise)
    support_task_id: str | None = None  # PhraseCut with visual prompts: the task whose image and mask prompt
    full_mask: np.ndarray | None = None  # PhraseCut test mode: (H, W) bool ground truth, PhraseCut's own rule
    phrase_type: str | None = None  # PhraseCut test mode: the phrase's structure (metrics' subsets)
    n_instances: int | None = None  # PhraseCut test mode: annotated instances


@dataclass
class ImageInfo:
    """Where a sample's image comes from and what its predictions map back to."""

    path: str | None = None
    original_size: tuple[int, int] | None = None  # (H, W) before resizing to S x S
    labels: np.ndarray | None = None  # benchmarks: one-shot 1 = the episode's class, 0 = not; zero-shot class ids
    letterboxed: bool = False  # the prediction maps back with `clipseg.transforms.unletterbox`
    episode: dict[str, Any] | None = None  # benchmarks: the episode or image (index, query, class_id, support)


@dataclass
class Sample:
    """One image and its K tasks, or (no `pixel_values`) only the skips of what could not be read."""

    pixel_values: Tensor | None = None
    tasks: list[Task] = field(default_factory=list)
    masks: Tensor | None = None  # (K, 1, S, S) targets in [0, 1], cropped and resized like the image
    prompt_images: Tensor | None = None  # (K, 3, S, S) visual prompts (`clipseg.visual_prompts.visual_prompt`)
    image: ImageInfo = field(default_factory=ImageInfo)
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Batch:
    """The usable samples of a DataLoader batch: B images, their N tasks image by image (image b holds
    `prompts_per_image[b]` consecutive tasks), and the skips of all its samples."""

    pixel_values: Tensor | None  # (B, 3, S, S); None when no sample of the batch could be used
    masks: Tensor | None  # (N, 1, S, S), when the samples have targets
    prompt_images: Tensor | None  # (N, 3, S, S), when the samples have visual prompts (zeros for tasks without)
    tasks: list[Task]
    images: list[ImageInfo]
    prompts_per_image: list[int]
    skipped: list[Skip]

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def phrases(self) -> list[str | None]:
        return [task.phrase for task in self.tasks]

    @property
    def task_ids(self) -> list[str]:
        return [task.task_id for task in self.tasks]

    @property
    def has_prompt_image(self) -> Tensor:
        """(N,) bool: which tasks have a visual prompt."""
        return torch.tensor([task.has_prompt_image for task in self.tasks], dtype=torch.bool)

    @property
    def image_of_task(self) -> list[int]:
        """For each task, the index of its image in the batch."""
        return [b for b, count in enumerate(self.prompts_per_image) for _ in range(count)]

    def pin_memory(self) -> Batch:
        """The batch with its tensors in page-locked memory (DataLoader(pin_memory=True) calls this)."""
        pinned = {
            name: getattr(self, name).pin_memory()
            for name in ("pixel_values", "masks", "prompt_images")
            if getattr(self, name) is not None
        }
        return replace(self, **pinned)


def collate(samples: Sequence[Sample]) -> Batch:
    """The one collate function of the project (pass it as a DataLoader's `collate_fn`): the usable samples'
    images stacked, their tasks listed and their tensors concatenated in order, every sample's skips joined."""
    usable = [sample for sample in samples if sample.pixel_values is not None]
    return Batch(
        pixel_values=torch.stack([sample.pixel_values for sample in usable]) if usable else None,
        masks=_concatenate([sample.masks for sample in usable], "masks"),
        prompt_images=_concatenate([sample.prompt_images for sample in usable], "prompt_images"),
        tasks=[task for sample in usable for task in sample.tasks],
        images=[sample.image for sample in usable],
        prompts_per_image=[len(sample.tasks) for sample in usable],
        skipped=[skip for sample in samples for skip in sample.skipped],
    )


def _concatenate(values: list[Tensor | None], name: str) -> Tensor | None:
    present = [value is not None for value in values]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"the samples of a batch must all have {name} or none")
    return torch.cat(values)
