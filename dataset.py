"""Data sets: PhraseCut as downloaded and users' own folders, with the original's sample pipeline.

PhraseCut layout (what the official download script writes, and what `synthetic.make_synthetic_phrasecut` writes):

    <root>/data/VGPhraseCut_v0/refer_{train,val,test,miniv}.json   tasks (docs/original.md §4)
    <root>/data/VGPhraseCut_v0/image_data_split.json               image sizes and splits
    <root>/data/VGPhraseCut_v0/name_att_rel_count.json             vocabulary counts
    <root>/data/VGPhraseCut_v0/images/<image_id>.jpg

A split's JSON is read through its memory-mapped index (clipseg/phrasecut.py), built on first use.

Samples follow the authors' PhraseCut pipeline (docs/original.md §5; the rules themselves are in clipseg/):
ground truth drawn with `polygon2mask`, the training crop of `find_crop`, the `original` resize, negatives drawn
uniformly from the split's unique phrases, and (PC+) a visual support from any task with the same phrase.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from clipseg.augment import choose_crop, colour_jitter_of, random_crop_offsets
from clipseg.benchmarks.classes import removal_rule
from clipseg.images import UnreadableImage, open_rgb, read_mask
from clipseg.metrics import PHRASE_TYPES
from clipseg.phrasecut import (
    DATA_SUBDIR,
    DEFAULT_PHRASECUT_ROOT,
    DEFAULT_SYNTHETIC_ROOT,
    DOWNLOAD_HINT,
    SPLITS,
    TaskTable,
    describe_defects,
    find_data_dir,
    load_task_table,
    usable_polygons,
)
from clipseg.rasterise import instances_to_mask
from clipseg.synthetic import make_synthetic_phrasecut
from clipseg.transforms import IMAGE_SIZE, ImageTransform
from clipseg.visual_prompts import visual_prompt

COMBINED_SPLITS = {"val_miniv": ("val", "miniv")}
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

# ---------------------------------------------------------------------------------------- sample pipeline


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

    A sample is a dict: `pixel_values` (3, S, S) normalised, `mask` (1, S, S) float target (`polygon2mask` ground
    truth, cropped and resized like the image), `phrase` (through a template of `templates`), `negative`,
    `task_id`, `skipped`; with `visual_support` also `prompt_image` (3, S, S) and `has_prompt_image`; in test mode
    also `full_mask` (PhraseCut's official ground truth at the original size), `original_size` (H, W),
    `phrase_type`, `n_instances`, `image_path`. With `prompts_per_image` K > 1 (training), one crop serves K tasks
    of its image: `mask` is (K, 1, S, S), `prompt_image` (K, 3, S, S), and `phrase`, `negative`,
    `has_prompt_image`, `task_ids` are lists of K.
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
            raise ValueError("negative_prob > 0 needs at least two different phrases in the data")
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

    def __getitem__(self, index: int) -> dict:
        """One sample (see the class docstring). When task `index` cannot be used (unreadable image, size
        mismatch, ...) it is warned about and reported as `sample["skipped"] == [(task_id, reason)]`, and the
        sample of the next usable task is returned instead. Only the requested task is reported, so one pass over
        all indices reports every bad task exactly once; in test mode the substitute is a task that is also
        returned for its own index, so a scorer de-duplicates by `task_id` and reports the skip count."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tasks")
        skipped: list[tuple[str, str]] = []
        reason = ""
        for step in range(min(len(self), MAX_CONSECUTIVE_SKIPS)):
            position = (index + step) % len(self)
            try:
                sample = self._sample(position)
            except SkipTask as err:
                reason = str(err)
                if step == 0:  # later bad tasks are reported when their own index is asked for
                    task_id = self.task_info(position).task_id
                    skipped.append((task_id, reason))
                    warnings.warn(f"skipped task {task_id}: {reason}", stacklevel=2)
                continue
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(
            f"{min(len(self), MAX_CONSECUTIVE_SKIPS)} consecutive tasks from index {index} could not be read "
            f"(last: {reason}); the data is broken or incomplete, check the image directory"
        )

    def group_sample(self, tasks: Sequence[int]) -> dict:
        """Test mode: tasks of one image, read once. Returns `pixel_values` (3, S, S), `prompts_per_image` =
        len(tasks) and, per task, lists of the test sample fields (`mask` (N, 1, S, S) stacked); `skipped` lists
        every task when the image cannot be used (then no other field is set)."""
        try:
            _, image = self._read(int(tasks[0]))
        except SkipTask as err:
            skipped = [(self.task_info(int(task)).task_id, str(err)) for task in tasks]
            for task_id, reason in skipped:
                warnings.warn(f"skipped task {task_id}: {reason}", stacklevel=2)
            return {"skipped": skipped}
        box = (0, 0, image.width, image.height)
        parts = [self._task_part(int(task), image, box, self._rng(int(task))) for task in tasks]
        sample = _stack_parts(parts)
        sample.update(pixel_values=self.transform.pixels(image, box), prompts_per_image=len(tasks), skipped=[])
        return sample

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

    def _sample(self, index: int) -> dict:
        rng = self._rng(index)
        _, image = self._read(index)
        mask = self._load_mask(index, image.height, image.width, "polygon2mask")
        box = self._box(mask, rng)
        jitter = colour_jitter_of(rng) if self.colour_jitter else None
        sample = {"pixel_values": self.transform.pixels(image, box, adjust=jitter)}
        tasks = [index] + self._companions(index, rng) if self.prompts_per_image > 1 else [index]
        parts = [self._task_part(task, image, box, rng, mask if task == index else None) for task in tasks]
        if self.prompts_per_image > 1:
            sample |= _stack_parts(parts)
            sample["task_ids"], sample["task_id"] = sample["task_id"], parts[0]["task_id"]
        else:
            sample |= parts[0]
        return sample

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
    ) -> dict:
        """The fields of one task on an image already read and cropped to `box`."""
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
        part = {
            "mask": torch.from_numpy(target.astype(np.float32))[None],
            "phrase": template.format(phrase),
            "negative": negative,
            "task_id": info.task_id,
        }
        if self.visual_support:
            prompt = self._support_prompt(phrase_id, rng)
            part["has_prompt_image"] = prompt is not None
            part["prompt_image"] = prompt if prompt is not None else torch.zeros(3, self.image_size, self.image_size)
        if not self.train:
            full_mask = self._load_mask(index, image.height, image.width, "phrasecut")
            part.update(
                original_size=(image.height, image.width),
                full_mask=np.zeros_like(full_mask) if negative else full_mask,
                phrase_type=info.phrase_type,
                n_instances=info.n_instances,
                image_path=str(info.image_path),
            )
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


def _stack_parts(parts: list[dict]) -> dict:
    """Per-task fields of several tasks: tensors stacked, everything else in lists."""
    return {
        key: torch.stack([p[key] for p in parts])
        if isinstance(parts[0][key], torch.Tensor)
        else [p[key] for p in parts]
        for key in parts[0]
    }


def collate(samples: list[dict]) -> dict:
    """Batch samples: tensors are stacked ((B, 3, S, S) pixel_values, (B, 1, S, S) mask, ...), every other key
    becomes a list, and the `skipped` lists of all samples are concatenated into one."""
    batch: dict = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if key == "skipped":
            batch[key] = [entry for value in values for entry in value]
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


# ---------------------------------------------------------------------------------------- PhraseCut dataset


class PhraseCut(SegmentationData):
    """PhraseCut (VGPhraseCut_v0) as it is on disk, for training (`train=True`: the original's crops, optional
    negatives, visual support and templates) or testing (whole image squashed to `image_size`, plus the full-size
    ground truth). `root`: a dir containing data/VGPhraseCut_v0/ or that dir itself. `split`: train, val, test,
    miniv or val_miniv. Ground truth is the union of all polygons of all instances (`clipseg.rasterise.rasterise`: the
    `polygon2mask` rule for targets, PhraseCut's own for `full_mask`). Tasks whose image size differs from its
    annotation size, or with no usable polygon, are excluded up front and listed in `self.excluded` as
    (task_id, reason); polygons with non-finite coordinates or zero area are dropped while indexing and listed per
    task in `self.excluded_polygons` as (task_id, count, description) (clipseg/phrasecut.py). `remove_classes`
    ("pas5i:K", "zs:K" or "aff", `wordnet_classes.removal_rule`) drops the tasks whose phrase names a benchmark's
    test class before anything else sees them (negatives and supports included); their number is `self.removed`.
    `limit` keeps the first N usable tasks. Other keyword arguments (train, image_size, negative_prob,
    visual_support, templates, seed, whole_image_prob, resize) go to `SegmentationData`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        limit: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        remove_classes: str | None = None,
        **pipeline,
    ):
        super().__init__(**pipeline)
        parts = COMBINED_SPLITS.get(split, (split,))
        if any(part not in SPLITS for part in parts):
            valid = ", ".join(SPLITS + tuple(COMBINED_SPLITS))
            raise ValueError(f"unknown PhraseCut split {split!r}; valid splits: {valid}")
        removal = removal_rule(remove_classes) if remove_classes else None
        self.removed = 0
        self.split = split
        self.data_dir = find_data_dir(root)
        if not (self.data_dir / "images").is_dir():
            raise FileNotFoundError(f"{self.data_dir / 'images'} is missing: no images downloaded. {DOWNLOAD_HINT}")
        self.tables = [load_task_table(self.data_dir, part, Path(cache_dir) if cache_dir else None) for part in parts]
        rows, phrase_ids = [], []
        phrase_lookup: dict[str, int] = {}
        for number, table in enumerate(self.tables):
            reasons = table.exclusion_reasons()
            usable = np.ones(len(table), dtype=bool)
            for row, reason in reasons:
                usable[row] = False
                self.excluded.append((table.task_id(row), reason))
            self.excluded_polygons += [(table.task_id(row), n, what) for row, n, what in table.dropped_polygons()]
            if removal is not None:
                removed = usable & _removed_phrases(table, removal)[np.asarray(table.phrase_index)]
                self.removed += int(removed.sum())
                usable &= ~removed
            table_rows = np.flatnonzero(usable)
            rows.append(np.stack([np.full(len(table_rows), number), table_rows], axis=1))
            if len(self.tables) == 1:
                phrase_ids.append(np.asarray(table.phrase_index)[table_rows])
            else:  # different splits number their phrases independently: map through the strings
                n_phrases = len(table.phrase_offsets) - 1
                texts = [table.phrase(p) for p in range(n_phrases)]
                remap = np.array([phrase_lookup.setdefault(text, len(phrase_lookup)) for text in texts], dtype=np.int64)
                phrase_ids.append(remap[np.asarray(table.phrase_index)[table_rows]])
        self._rows = np.concatenate(rows)[:limit]
        self._phrase_ids = np.concatenate(phrase_ids).astype(np.int64)[:limit]
        self._phrase_lookup_inverse = {value: key for key, value in phrase_lookup.items()} if phrase_lookup else None
        if self.excluded or self.excluded_polygons:
            warnings.warn(f"PhraseCut {split}: {exclusion_note(self)}", stacklevel=2)
        self._init_tasks()

    @property
    def tasks(self) -> TaskList:
        """Sequence of task dicts (task_id, image_id, phrase, phrase_type, Polygons, image_path, width, height)."""
        return TaskList(self)

    def __len__(self) -> int:
        return len(self._rows)

    def _image_keys(self) -> np.ndarray:
        keys = np.empty(len(self), dtype=np.int64)
        for number, table in enumerate(self.tables):
            chosen = self._rows[:, 0] == number
            keys[chosen] = np.asarray(table.image_id)[self._rows[chosen, 1]]
        return keys

    def _locate(self, index: int) -> tuple[TaskTable, int]:
        number, row = self._rows[index]
        return self.tables[number], int(row)

    def phrase_text(self, phrase_id: int) -> str:
        if self._phrase_lookup_inverse is not None:
            return self._phrase_lookup_inverse[phrase_id]
        return self.tables[0].phrase(phrase_id)

    def task_info(self, index: int) -> TaskInfo:
        table, row = self._locate(index)
        kind = int(table.phrase_type[row])
        width, height = int(table.annotation_width[row]), int(table.annotation_height[row])
        return TaskInfo(
            task_id=table.task_id(row),
            image_path=table.image_path(row),
            phrase=table.phrase(int(table.phrase_index[row])),
            phrase_type=PHRASE_TYPES[kind] if kind >= 0 else "unknown",
            n_instances=int(table.task_instances[row + 1] - table.task_instances[row]),
            annotation_size=(width, height) if width >= 0 else None,
        )

    def task(self, index: int) -> dict:
        """Task `index` as a dict in the JSON's terms (`Polygons` as float64 (N, 2) arrays)."""
        table, row = self._locate(index)
        info = self.task_info(index)
        return {
            "task_id": info.task_id,
            "image_id": int(table.image_id[row]),
            "phrase": info.phrase,
            "phrase_type": info.phrase_type,
            "Polygons": table.polygons(row),
            "image_path": str(info.image_path),
            "width": info.annotation_size[0] if info.annotation_size else None,
            "height": info.annotation_size[1] if info.annotation_size else None,
        }

    def _load_mask(self, index: int, height: int, width: int, rule: str) -> np.ndarray:
        table, row = self._locate(index)
        return instances_to_mask(table.polygons(row), height, width, rule)


def _removed_phrases(table: TaskTable, removal) -> np.ndarray:
    """bool per phrase of a split's table: True where `removal(phrase)` says the phrase must go."""
    return np.array([removal(table.phrase(p)) for p in range(len(table.phrase_offsets) - 1)], dtype=bool)


class TaskList(Sequence):
    """Read-only list view of a PhraseCut dataset's tasks (built on access, nothing stored)."""

    def __init__(self, dataset: PhraseCut):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.dataset.task(i) for i in range(*index.indices(len(self)))]
        return self.dataset.task(index if index >= 0 else index + len(self))


# ---------------------------------------------------------------------------------------- user folders


class UserFolder(SegmentationData):
    """Fine-tuning data from a JSONL or CSV index of records `{image, phrase, mask}`.

    `image`: path (relative to the index file's directory or absolute). `mask`: a mask image path (object = pixels
    at least half the mask's maximum, `clipseg.images.read_mask`; a mask of more than two levels is warned about once)
    or PhraseCut-style polygons, either a list of polygons
    `[[[x, y], ...], ...]` or a list of instances of polygons (in CSV as a JSON string). Optional fields: `id`
    (task id; default `<file name>:<line>`), `split` (records are kept when it equals the `split` argument, or
    has no value and `unmarked` is True),
    `phrase_type`. Same sample pipeline, keyword arguments and sample dict as `PhraseCut`. Polygons with non-finite
    coordinates or zero area are dropped and listed in `self.excluded_polygons`; a record left with none is excluded
    (`self.excluded`). A record given no polygons at all is kept: its target is empty, as with an empty mask image.
    """

    def __init__(
        self,
        index_file: str | os.PathLike,
        *,
        limit: int | None = None,
        split: str | None = None,
        unmarked: bool = True,
        **pipeline,
    ):
        super().__init__(**pipeline)
        self.index_file = Path(index_file)
        accepted = (split, None) if unmarked else (split,)
        records = [
            record for record in read_records(self.index_file) if split is None or record.get("split") in accepted
        ]
        records = [record for record in records if self._drop_bad_polygons(record)]
        if not records:
            raise ValueError(
                f"{self.index_file}: no usable records" + (f" with split {split!r}" if split else "")
                + (f" ({exclusion_note(self)})" if self.excluded else "")
            )  # fmt: skip
        if self.excluded or self.excluded_polygons:
            warnings.warn(f"{self.index_file}: {exclusion_note(self)}", stacklevel=2)
        self.records = records[:limit]
        phrases = sorted({record["phrase"] for record in self.records})
        self._phrases = phrases
        lookup = {phrase: number for number, phrase in enumerate(phrases)}
        self._phrase_ids = np.array([lookup[record["phrase"]] for record in self.records], dtype=np.int64)
        self._warned_non_binary = False
        self._init_tasks()

    def _drop_bad_polygons(self, record: dict) -> bool:
        """Leave the record's unusable polygons out (counted); False when it had polygons and none is usable."""
        if not isinstance(record["mask"], list):
            return True
        try:
            record["mask"], defects = usable_polygons(record["mask"])
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{self.index_file}: record {record['id']}: polygon points must be [x, y] numbers"
            ) from err
        if sum(defects.values()):
            self.excluded_polygons.append((record["id"], sum(defects.values()), describe_defects(defects)))
            if not any(record["mask"]):
                self.excluded.append((record["id"], f"no usable polygon ({describe_defects(defects)})"))
                return False
        return True

    def __len__(self) -> int:
        return len(self.records)

    def phrase_text(self, phrase_id: int) -> str:
        return self._phrases[phrase_id]

    def _image_keys(self) -> np.ndarray:
        return np.array([str(record["image"]) for record in self.records])

    def task_info(self, index: int) -> TaskInfo:
        record = self.records[index]
        mask = record["mask"]
        return TaskInfo(
            task_id=record["id"],
            image_path=record["image"],
            phrase=record["phrase"],
            phrase_type=record.get("phrase_type", "unknown"),
            n_instances=len(mask) if isinstance(mask, list) else 1,
            annotation_size=None,
        )

    def _load_mask(self, index: int, height: int, width: int, rule: str) -> np.ndarray:
        """Polygons are drawn by `rule`; a mask image is read by `clipseg.images.read_mask`'s rule."""
        mask = self.records[index]["mask"]
        if isinstance(mask, list):
            return instances_to_mask(mask, height, width, rule)
        try:
            values, binary = read_mask(mask)
        except UnreadableImage as err:
            raise SkipTask(f"mask {err}") from err
        if values.shape != (height, width):
            raise SkipTask(f"mask {mask} is {values.shape[1]}x{values.shape[0]} but the image is {width}x{height}")
        if not binary and not self._warned_non_binary:
            self._warned_non_binary = True
            warnings.warn(
                f"mask {mask} has more than two levels: the object is every pixel at least half its maximum",
                stacklevel=2,
            )
        return values


def read_records(index_file: Path) -> list[dict]:
    """Read and validate a JSONL or CSV index; paths are resolved against the index file's directory and
    polygons normalised to instances -> polygons -> points. Errors name the file and line."""
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{index_file} not found: expected a JSONL or CSV file of records with fields image, phrase, mask"
        )
    base = index_file.parent
    if index_file.suffix.lower() == ".csv":
        with open(index_file, newline="", encoding="utf-8") as file:
            raw = [(number + 2, dict(row)) for number, row in enumerate(csv.DictReader(file))]
    else:
        raw = []
        with open(index_file, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    raw.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{index_file}:{number}: not valid JSON ({err})") from err
    return [_normalise_record(record, index_file, number, base) for number, record in raw]


def _normalise_record(record: object, index_file: Path, number: int, base: Path) -> dict:
    where = f"{index_file}:{number}"
    if not isinstance(record, dict) or not {"image", "phrase", "mask"} <= record.keys():
        raise ValueError(f"{where}: each record needs the fields image, phrase and mask, got {record!r}")
    if not isinstance(record["phrase"], str) or not record["phrase"].strip():
        raise ValueError(f"{where}: phrase must be a non-empty string")
    mask = record["mask"]
    if isinstance(mask, str) and mask.lstrip().startswith("["):
        try:
            mask = json.loads(mask)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: mask looks like polygons but is not valid JSON ({err})") from err
    if isinstance(mask, list):
        mask = _as_instances(mask, where)
    elif isinstance(mask, str) and mask:
        mask = base / mask
    else:
        raise ValueError(f"{where}: mask must be a mask image path or a list of polygons, got {mask!r}")
    normalised = dict(record)
    normalised.update(
        image=base / str(record["image"]),
        phrase=record["phrase"].strip(),
        mask=mask,
        id=str(record.get("id") or f"{index_file.name}:{number}"),
    )
    return normalised


def _as_instances(polygons: list, where: str) -> list:
    """[[x, y], ...] polygons or instances of them -> instances -> polygons -> points."""
    depth, probe = 0, polygons
    while isinstance(probe, list) and probe:
        depth, probe = depth + 1, probe[0]
    if depth == 3 or (depth == 0 and not polygons):
        return [polygons]
    if depth == 4:
        return polygons
    raise ValueError(f"{where}: polygons must be [[[x, y], ...], ...] or a list of such lists")


def exclusion_report(data: Dataset) -> dict:
    """What a data set left out while indexing, for results files: {"excluded": {"count": tasks, "tasks": [[id,
    reason], ...]}, "excluded_polygons": {"count": polygons, "tasks": [[id, count, description], ...]}}."""
    excluded, dropped = getattr(data, "excluded", []), getattr(data, "excluded_polygons", [])
    return {
        "excluded": {"count": len(excluded), "tasks": [list(entry) for entry in excluded]},
        "excluded_polygons": {"count": sum(n for _, n, _ in dropped), "tasks": [list(entry) for entry in dropped]},
    }


def exclusion_summary(data: Dataset) -> dict:
    """The counts of `exclusion_report` with the first example of each (None when there is none), for logs."""
    report = exclusion_report(data)
    tasks, polygons = report["excluded"], report["excluded_polygons"]
    return {
        "excluded": tasks["count"],
        "excluded_example": tasks["tasks"][0] if tasks["tasks"] else None,
        "excluded_polygons": polygons["count"],
        "excluded_polygons_example": polygons["tasks"][0] if polygons["tasks"] else None,
    }


def exclusion_note(data: Dataset) -> str:
    """`exclusion_summary` as one line for warnings and the training log ("" when nothing was left out)."""
    summary = exclusion_summary(data)
    parts = []
    if summary["excluded"]:
        task_id, reason = summary["excluded_example"]
        parts.append(f"excluded {summary['excluded']} tasks (first: {task_id}: {reason})")
    if summary["excluded_polygons"]:
        task_id, _, what = summary["excluded_polygons_example"]
        parts.append(f"{summary['excluded_polygons']} bad polygons left out (first: {task_id}: {what})")
    return "; ".join(parts)


def build_dataset(kind: str, root: str | os.PathLike | None, split: str, **kwargs) -> Dataset:
    """kind "phrasecut" (root: PhraseCut dir, default PhraseCutDataset), "synthetic" (generated at root, default
    synthetic_phrasecut, when absent) or "folder" (root: the JSONL/CSV index; `split` filters its split column).
    kwargs go to the dataset (train=..., image_size=..., ...)."""
    if kind == "phrasecut":
        return PhraseCut(root or DEFAULT_PHRASECUT_ROOT, split, **kwargs)
    if kind == "synthetic":
        root = Path(root or DEFAULT_SYNTHETIC_ROOT)
        if (
            not (root / DATA_SUBDIR / "image_data_split.json").is_file()
            and not (root / "image_data_split.json").is_file()
        ):
            make_synthetic_phrasecut(root)
        return PhraseCut(root, split, **kwargs)
    if kind == "folder":
        if root is None:
            raise ValueError("a folder dataset needs the path of its JSONL/CSV index file")
        return UserFolder(root, split=split, **kwargs)
    raise ValueError(f"unknown dataset kind {kind!r}; choose phrasecut, synthetic or folder")
