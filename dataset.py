"""Data sets: PhraseCut as downloaded and users' own folders, through the original's sample pipeline.

PhraseCut layout (what the official download script writes, and what `synthetic.make_synthetic_phrasecut` writes):

    <root>/data/VGPhraseCut_v0/refer_{train,val,test,miniv}.json   tasks (docs/original.md §4)
    <root>/data/VGPhraseCut_v0/image_data_split.json               image sizes and splits
    <root>/data/VGPhraseCut_v0/name_att_rel_count.json             vocabulary counts
    <root>/data/VGPhraseCut_v0/images/<image_id>.jpg

A split's JSON is read through its memory-mapped index (clipseg/phrasecut.py), built on first use. `build_dataset`
makes either kind from score.py's and train.py's flags; what indexing left out is in `exclusion_report`.

Items are `clipseg.samples.Sample`s made by the authors' PhraseCut pipeline (`clipseg.sample_pipeline`, docs/original.md
§5); batch them with `collate` (`clipseg.samples.collate`):

    data = PhraseCut("PhraseCutDataset", "train", train=True)
    loader = DataLoader(data, batch_size=32, collate_fn=collate)
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from clipseg.benchmarks.classes import removal_rule
from clipseg.images import UnreadableImage, read_mask
from clipseg.metrics import PHRASE_TYPES
from clipseg.outputs import printable
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
from clipseg.sample_pipeline import SegmentationData, SkipTask, TaskInfo
from clipseg.samples import collate
from clipseg.synthetic import make_synthetic_phrasecut

__all__ = [
    "PhraseCut",
    "UserFolder",
    "TaskList",
    "build_dataset",
    "collate",
    "read_records",
    "exclusion_report",
    "exclusion_summary",
    "exclusion_note",
    "SPLITS",
    "DEFAULT_PHRASECUT_ROOT",
    "DEFAULT_SYNTHETIC_ROOT",
]

COMBINED_SPLITS = {"val_miniv": ("val", "miniv")}


# ---------------------------------------------------------------------------------------- PhraseCut dataset


class PhraseCut(SegmentationData):
    """PhraseCut (VGPhraseCut_v0) as it is on disk, for training (`train=True`: the original's crops, optional
    negatives, visual support and templates) or testing (whole image squashed to `image_size`, plus the full-size
    ground truth). `root`: a dir containing data/VGPhraseCut_v0/ or that dir itself. `split`: train, val, test,
    miniv or val_miniv. Ground truth is the union of all polygons of all instances (`clipseg.rasterise.rasterise`: the
    `polygon2mask` rule for targets, PhraseCut's own for `full_mask`). Tasks whose image size differs from its
    annotation size, or with no usable polygon, are excluded up front and listed in `self.excluded` as (task_id,
    reason); polygons with non-finite or out-of-range coordinates, or of zero area, are dropped while indexing and
    listed per task in `self.excluded_polygons` as (task_id, count, description) (clipseg/phrasecut.py).
    `remove_classes` ("pas5i:K", "zs:K" or "aff", `wordnet_classes.removal_rule`) drops the tasks whose phrase names a
    benchmark's test class before anything else sees them (negatives and supports included); their number is
    `self.removed`. `limit` keeps the first N usable tasks. Other keyword arguments (train, image_size,
    negative_prob, visual_support, templates, seed, whole_image_prob, resize) go to `SegmentationData`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        limit: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        remove_classes: str | None = None,
        **pipeline: Any,
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
    `phrase_type`. Same sample pipeline, keyword arguments and samples as `PhraseCut`. Polygons with non-finite
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
        **pipeline: Any,
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
        with open(index_file, newline="", encoding="utf-8-sig") as file:
            raw = [(number + 2, dict(row)) for number, row in enumerate(csv.DictReader(file))]
    else:
        raw = []
        with open(index_file, encoding="utf-8-sig") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    raw.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{index_file}:{number}: not valid JSON ({err})") from err
    records, lines = [], {}
    for number, record in raw:
        records.append(_normalise_record(record, index_file, number, base))
        first = lines.setdefault(records[-1]["id"], number)
        if first != number:
            raise ValueError(
                f"{index_file}:{number}: id {printable(records[-1]['id'], 60)!r} is also the id of line {first}; "
                "give each record its own id (ids name the tasks in scores and the saved predictions)"
            )
    return records


def _normalise_record(record: object, index_file: Path, number: int, base: Path) -> dict:
    where = f"{index_file}:{number}"
    if not isinstance(record, dict) or not {"image", "phrase", "mask"} <= record.keys():
        raise ValueError(f"{where}: each record needs the fields image, phrase and mask, got {record!r}")
    if not isinstance(record["phrase"], str) or not record["phrase"].strip():
        raise ValueError(f"{where}: phrase must be a non-empty string")
    if not isinstance(record["image"], str) or not record["image"].strip():
        raise ValueError(f"{where}: image must be the image file's path, got {record['image']!r}")
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
        image=base / record["image"],
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


def build_dataset(kind: str, root: str | os.PathLike | None, split: str, **kwargs: Any) -> Dataset:
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
