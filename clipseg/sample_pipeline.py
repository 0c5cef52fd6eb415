"""The sample pipeline of `dataset.PhraseCut` and `dataset.UserFolder`: a task (image, phrase, ground truth) to a
`clipseg.samples.Sample`, following the authors' PhraseCut pipeline (docs/original.md §5; the rules themselves are
in clipseg/): ground truth drawn with `polygon2mask`, the training crop of `find_crop`, the `original` resize,
negatives drawn uniformly from the split's unique phrases, (PC+) a visual support from any task with the same phrase,
prompt templates, colour jitter, and K tasks of one image sharing its crop. A training sample depends only on its
seed (`reseed`), a test sample only on (seed, index). Unreadable tasks are skipped, warned about and reported once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from clipseg.augment import choose_crop, colour_jitter_of, random_crop_offsets
from clipseg.images import UnreadableImage, open_rgb
from clipseg.samples import ImageInfo, Sample, Skip, Task
from clipseg.transforms import IMAGE_SIZE, ImageTransform
from clipseg.visual_prompts import visual_prompt

# The original's prompt template lists (`get_prompt_list`); training samples one template per prompt. The released
# PC+ models used "shuffle+" with --mix, the raw phrase ("plain") otherwise (docs/original.md §5.11).
PROMPT_TEMPLATES = {
    "plain": ("{}",),
    "fixed": ("a photo of a {}.",),
    "shuffle": ("a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}."),
    "shuffle+": (
        "a photo of a {}.",
        "a photograph of a {}.",
        "an image of a {}.",
        "{}.",
        "a cropped photo of a {}.",
        "a good photo of a {}.",
        "a photo of one {}.",
        "a bad photo of a {}.",
        "a photo of the {}.",
    ),
}
MAX_CONSECUTIVE_SKIPS = 50
SUPPORT_TRIES = 3  # supports tried (other tasks with the phrase) before a sample goes without one


class SkipTask(Exception):
    """A task that cannot produce a sample (unreadable image, size mismatch, no ground truth)."""


@dataclass
class TaskInfo:
    """What the sample pipeline needs to know about one task before reading its files."""

    task_id: str
    image_path: Path
    phrase: str
    phrase_type: str
    n_instances: int
    annotation_size: tuple[int, int] | None  # (width, height) the annotations were made for, if known


def _worker_key() -> int | None:
    """The DataLoader worker's seed (None in the main process): a new worker or epoch gets a new stream."""
    worker = get_worker_info()
    return worker.seed if worker is not None else None


class SegmentationData(Dataset):
    """Shared sample pipeline of `PhraseCut` and `UserFolder` (docs/original.md §5 and §7).

    Subclasses set `self._phrase_ids` (int array, one per task) and implement `__len__`, `task_info(i)`,
    `phrase_text(phrase_id)`, `_image_keys()` and `_load_mask(i, height, width, rule)`; then call `_init_tasks()`.

    Item i is a `clipseg.samples.Sample`: `pixel_values` (3, S, S) normalised, the image's `path` and
    `original_size` (H, W), and task i: its `masks` row (1, S, S) the float target (`polygon2mask` ground truth,
    cropped and resized like the image), `phrase` (through a template of `templates`), `negative`, `task_id`; with
    `visual_support` also its `prompt_images` row (3, S, S) (zeros when the phrase has no other task, see
    `has_prompt_image`); in test mode also `full_mask` (PhraseCut's official ground truth at the original size),
    `phrase_type`, `n_instances`. With `prompts_per_image` K > 1 (training), one crop serves K tasks of its image,
    task i first.
    """

    def __init__(
        self,
        *,
        train: bool,
        image_size: int = IMAGE_SIZE,
        negative_prob: float = 0.0,
        visual_support: bool = False,
        templates: Sequence[str] = PROMPT_TEMPLATES["plain"],
        seed: int = 0,
        whole_image_prob: float = 0.0,
        resize: str = "original",
        colour_jitter: bool = False,
        prompts_per_image: int = 1,
    ):
        for name, value in (("negative_prob", negative_prob), ("whole_image_prob", whole_image_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if prompts_per_image < 1 or (prompts_per_image > 1 and not train):
            raise ValueError(f"prompts_per_image must be 1, or more in training, got {prompts_per_image}")
        if not templates or any("{}" not in template for template in templates):
            raise ValueError(f"templates must be a non-empty list of strings with '{{}}', got {templates!r}")
        self.transform = ImageTransform(resize, image_size, square=True)
        self.train, self.image_size, self.negative_prob = train, image_size, negative_prob
        self.visual_support, self.templates, self.seed = visual_support, tuple(templates), seed
        self.whole_image_prob, self.colour_jitter = whole_image_prob, colour_jitter
        self.prompts_per_image = prompts_per_image
        self.excluded: list[tuple[str, str]] = []  # (task id, reason): tasks left out
        self.excluded_polygons: list[tuple[str, int, str]] = []  # (task id, count, what): bad polygons left out
        self._stream: np.random.Generator | None = None
        self._stream_key: object = None

    def _init_tasks(self) -> None:
        """Group tasks by phrase (visual support, negatives) and by image (several prompts per image, grouped
        scoring), and check that negatives are possible."""
        if len(self) == 0:
            raise ValueError(f"{type(self).__name__}: no usable tasks (excluded: {len(self.excluded)})")
        self._by_phrase = np.argsort(self._phrase_ids, kind="stable")
        self._sorted_phrase_ids = self._phrase_ids[self._by_phrase]
        self._unique_phrase_ids = np.unique(self._phrase_ids)
        if self.negative_prob > 0 and len(self._unique_phrase_ids) < 2:
            raise ValueError(
                "negative_prob > 0 needs at least two different phrases in the data (train.py: --negative-prob 0)"
            )
        _, first, image_of_task = np.unique(self._image_keys(), return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # images numbered by their first task
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self._image_of_task = rank[image_of_task.reshape(-1)]
        by_image = np.argsort(self._image_of_task, kind="stable")
        bounds = np.searchsorted(self._image_of_task[by_image], np.arange(len(order) + 1))
        self._tasks_of_image = [by_image[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def __len__(self) -> int:
        raise NotImplementedError

    def task_info(self, index: int) -> TaskInfo:
        raise NotImplementedError

    def phrase_text(self, phrase_id: int) -> str:
        raise NotImplementedError

    def _image_keys(self) -> np.ndarray:
        """One key per task naming its image (tasks with the same key share the image file)."""
        raise NotImplementedError

    def _load_mask(self, index: int, height: int, width: int, rule: str) -> np.ndarray:
        raise NotImplementedError

    def image_groups(self) -> list[np.ndarray]:
        """The tasks of each image (task indices in order), images in the order of their first task."""
        return list(self._tasks_of_image)

    def __getitem__(self, index: int) -> Sample:
        """One sample (see the class docstring). When task `index` cannot be used (unreadable image, size
        mismatch, ...) it is warned about and reported as `sample.skipped == [Skip({"task_id": ...}, reason)]`, and
        the sample of the next usable task is returned instead. Only the requested task is reported, so one pass over
        all indices reports every bad task exactly once; in test mode the substitute is a task that is also
        returned for its own index, so a scorer de-duplicates by `task_id` and reports the skip count."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tasks")
        skipped: list[Skip] = []
        reason = ""
        for step in range(min(len(self), MAX_CONSECUTIVE_SKIPS)):
            position = (index + step) % len(self)
            try:
                sample = self._sample(position)
            except SkipTask as err:
                reason = str(err)
                if step == 0:  # later bad tasks are reported when their own index is asked for
                    skipped.append(self._skip(position, reason))
                continue
            sample.skipped = skipped
            return sample
        raise RuntimeError(
            f"{min(len(self), MAX_CONSECUTIVE_SKIPS)} consecutive tasks from index {index} could not be read "
            f"(last: {reason}); the data is broken or incomplete, check the image directory"
        )

    def group_sample(self, tasks: Sequence[int]) -> Sample:
        """Test mode: the tasks of one image (task indices), the image read once: a sample with one task each, as
        the tasks' own samples would have them. A task whose ground truth cannot be used (a mask file missing or of
        another size) is skipped and reported; when the image cannot be used, a sample with no image that skips
        every task."""
        try:
            info, image = self._read(int(tasks[0]))
        except SkipTask as err:
            return Sample(skipped=[self._skip(int(task), str(err)) for task in tasks])
        box = (0, 0, image.width, image.height)
        parts, skipped = [], []
        for task in map(int, tasks):
            try:
                parts.append(self._task_part(task, image, box, self._rng(task)))
            except SkipTask as err:
                skipped.append(self._skip(task, str(err)))
        if not parts:
            return Sample(skipped=skipped)
        sample = self._assemble(self.transform.pixels(image, box), parts, info, image)
        sample.skipped = skipped
        return sample

    def _skip(self, index: int, reason: str) -> Skip:
        """Task `index` skipped for `reason`: warned about and reported."""
        task_id = self.task_info(index).task_id
        warnings.warn(f"skipped task {task_id}: {reason}", stacklevel=3)
        return Skip({"task_id": task_id}, reason)

    def reseed(self, seed: int) -> None:
        """Draw the following training samples from a fresh stream seeded by `seed`. train.py reseeds before every
        sample, so a sample depends only on its position in the run, not on worker count or where a run resumed."""
        self._stream = np.random.default_rng(seed)
        self._stream_key = _worker_key()

    def _rng(self, index: int) -> np.random.Generator:
        """Test samples are a pure function of (seed, index); training draws from one stream per worker, seeded
        by the DataLoader's per-epoch worker seed so epochs differ and runs are reproducible."""
        if not self.train:
            return np.random.default_rng([self.seed, index])
        key = _worker_key()
        if self._stream is None or self._stream_key != key:
            self._stream = np.random.default_rng([self.seed] + ([] if key is None else [key % 2**63]))
            self._stream_key = key
        return self._stream

    def _read(self, index: int) -> tuple[TaskInfo, Image.Image]:
        """A task's info and upright RGB image, checked against the annotation size. Raises SkipTask."""
        info = self.task_info(index)
        try:
            image = open_rgb(info.image_path)
        except UnreadableImage as err:
            raise SkipTask(str(err)) from err
        if info.annotation_size is not None and image.size != tuple(info.annotation_size):
            raise SkipTask(
                f"{info.image_path} is {image.width}x{image.height} but its annotations are for "
                f"{info.annotation_size[0]}x{info.annotation_size[1]}"
            )
        return info, image

    def _box(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the region a sample shows: in training the original's square crop
        (`clipseg.augment.choose_crop`), or with `whole_image_prob` the whole image; in test mode the whole image."""
        height, width = mask.shape
        if self.train and not (self.whole_image_prob > 0 and rng.random() < self.whole_image_prob):
            top, left, side = choose_crop(mask, random_crop_offsets(rng, height, width))
            return left, top, left + side, top + side
        return 0, 0, width, height

    def _sample(self, index: int) -> Sample:
        rng = self._rng(index)
        info, image = self._read(index)
        mask = self._load_mask(index, image.height, image.width, "polygon2mask")
        box = self._box(mask, rng)
        jitter = colour_jitter_of(rng) if self.colour_jitter else None
        pixel_values = self.transform.pixels(image, box, adjust=jitter)
        tasks = [index] + self._companions(index, rng) if self.prompts_per_image > 1 else [index]
        parts = [self._task_part(task, image, box, rng, mask if task == index else None) for task in tasks]
        return self._assemble(pixel_values, parts, info, image)

    def _assemble(
        self, pixel_values: torch.Tensor, parts: list[_TaskPart], info: TaskInfo, image: Image.Image
    ) -> Sample:
        """A sample of an image's pixels and its tasks' parts: targets (and prompt images) stacked row for row."""
        return Sample(
            pixel_values=pixel_values,
            tasks=[part.task for part in parts],
            masks=torch.stack([part.mask for part in parts]),
            prompt_images=torch.stack([part.prompt_image for part in parts]) if self.visual_support else None,
            image=ImageInfo(path=str(info.image_path), original_size=(image.height, image.width)),
        )

    def _companions(self, index: int, rng: np.random.Generator) -> list[int]:
        """K - 1 other tasks of the sample's image, drawn without replacement; an image with fewer tasks repeats
        them (each draw still has its own negative and template)."""
        others = self._tasks_of_image[self._image_of_task[index]]
        others = others[others != index]
        wanted = self.prompts_per_image - 1
        if not len(others):
            return [index] * wanted
        order = np.concatenate([rng.permutation(others) for _ in range(-(-wanted // len(others)))])
        return [int(task) for task in order[:wanted]]

    def _task_part(
        self, index: int, image: Image.Image, box: tuple, rng: np.random.Generator, mask: np.ndarray | None = None
    ) -> _TaskPart:
        """One task on an image already read and cropped to `box`."""
        info = self.task_info(index)
        if mask is None:
            mask = self._load_mask(index, image.height, image.width, "polygon2mask")
        target = self.transform.mask(mask, box)
        phrase_id = int(self._phrase_ids[index])
        negative = bool(self.negative_prob > 0 and rng.random() < self.negative_prob)
        if negative:
            phrase_id = self._other_phrase(phrase_id, rng)
            target = np.zeros_like(target)
        phrase = self.phrase_text(phrase_id)
        template = self.templates[rng.integers(len(self.templates))] if len(self.templates) > 1 else self.templates[0]
        task = Task(task_id=info.task_id, phrase=template.format(phrase), negative=negative)
        part = _TaskPart(task, torch.from_numpy(target.astype(np.float32))[None])
        if self.visual_support:
            prompt = self._support_prompt(phrase_id, rng)
            task.has_prompt_image = prompt is not None
            part.prompt_image = prompt if prompt is not None else torch.zeros(3, self.image_size, self.image_size)
        if not self.train:
            full_mask = self._load_mask(index, image.height, image.width, "phrasecut")
            task.full_mask = np.zeros_like(full_mask) if negative else full_mask
            task.phrase_type, task.n_instances = info.phrase_type, info.n_instances
        return part

    def _other_phrase(self, phrase_id: int, rng: np.random.Generator) -> int:
        """A negative's phrase: uniform over the split's unique phrases, redrawn while it is the sample's own."""
        while True:
            candidate = int(self._unique_phrase_ids[rng.integers(len(self._unique_phrase_ids))])
            if candidate != phrase_id:
                return candidate

    def _support_prompt(self, phrase_id: int, rng: np.random.Generator) -> torch.Tensor | None:
        """(3, S, S) prompt image from a task with this phrase, or None when the phrase is unique (the original's
        rule: any task with the phrase, the sample's own included, with its own crop;
        `clipseg.visual_prompts.visual_prompt`). An unreadable support is replaced by another draw, SUPPORT_TRIES times
        at most."""
        start, stop = np.searchsorted(self._sorted_phrase_ids, [phrase_id, phrase_id + 1])
        if stop - start < 2:
            return None
        for _ in range(SUPPORT_TRIES):
            support = int(self._by_phrase[start + rng.integers(stop - start)])
            try:
                _, image = self._read(support)
            except SkipTask:
                continue
            mask = self._load_mask(support, image.height, image.width, "polygon2mask")
            box = self._box(mask, rng)
            pixels, support_mask = self.transform.pixels(image, box), self.transform.mask(mask, box)
            return visual_prompt(pixels, torch.from_numpy(support_mask), size=self.image_size)
        return None


@dataclass
class _TaskPart:
    """A task of a sample being built, with its rows of the sample's tensors."""

    task: Task
    mask: torch.Tensor  # (1, S, S)
    prompt_image: torch.Tensor | None = None  # (3, S, S), with visual_support
