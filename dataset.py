"""Datasets: PhraseCut as downloaded, a synthetic PhraseCut-format generator, and users' own folders.

PhraseCut layout (what the official download script writes, and what `make_synthetic_phrasecut` writes):

    <root>/data/VGPhraseCut_v0/refer_{train,val,test,miniv}.json   tasks (SPEC section 5)
    <root>/data/VGPhraseCut_v0/image_data_split.json               image sizes and splits
    <root>/data/VGPhraseCut_v0/name_att_rel_count.json             vocabulary counts
    <root>/data/VGPhraseCut_v0/images/<image_id>.jpg

The first use of a split parses its JSON once (streaming, bounded memory) into a compact index of flat numpy
arrays (`<VGPhraseCut_v0>/.clipseg_index/<split>/`, or a user cache dir when the data dir is read-only) that
later runs memory-map: DataLoader workers share its pages instead of copying millions of Python objects.

Command line: `python dataset.py synthetic --root DIR`, `python dataset.py bench-pipeline`,
`python dataset.py bench-index --tasks 300000` (see `--help`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageOps
from torch.utils.data import Dataset, get_worker_info
from tqdm import tqdm

from model import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, visual_prompt

DEFAULT_PHRASECUT_ROOT = "PhraseCutDataset"
DEFAULT_SYNTHETIC_ROOT = "synthetic_phrasecut"
DATA_SUBDIR = Path("data") / "VGPhraseCut_v0"
SPLITS = ("train", "val", "test", "miniv")
COMBINED_SPLITS = {"val_miniv": ("val", "miniv")}
PHRASE_TYPES = ("name", "attribute", "relation", "verbose")
# The 9 "shuffle+" prompt templates of the released PC+ training (SPEC section 1).
TEMPLATES = (
    "a photo of a {}.",
    "a photograph of a {}.",
    "an image of a {}.",
    "{}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a photo of one {}.",
    "a bad photo of a {}.",
    "a photo of the {}.",
)
CROP_MIN_KEPT = 0.05
MAX_CONSECUTIVE_SKIPS = 50
INDEX_VERSION = 1
MAX_IMAGE_PIXELS = 8192 * 8192
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the camera was turned
DOWNLOAD_HINT = (
    "Get PhraseCut with its official download script (about 75k Visual Genome images, ~20 GB): "
    "`git clone https://github.com/ChenyunWu/PhraseCutDataset && cd PhraseCutDataset && python download_dataset.py`, "
    "then pass the clone's directory as the data root. For generated data in the same format run "
    "`python dataset.py synthetic --root synthetic_phrasecut`."
)

# Refuse decompression bombs instead of allocating gigabytes for one image (PIL's own guard only warns below 2x).
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

# ---------------------------------------------------------------------------------------- reading images


class UnreadableImage(Exception):
    """An image file that is missing, empty, truncated, corrupt or too large."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def open_rgb(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Open an image as upright RGB: EXIF rotation applied; grayscale (8 and 16 bit), palette, CMYK and alpha
    converted (transparent pixels composited on black). Raises `UnreadableImage` with the reason.

    With `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (the decoder's DCT scaling, several times
    faster) as long as its shorter side stays >= min_side. `image.info["full_size"]` is always the upright
    (width, height) at full scale, the size annotations refer to."""
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UnreadableImage(path, f"too large ({width}x{height} > {MAX_IMAGE_PIXELS} pixels)")
            full_size = _upright_size(image)
            if min_side is not None and image.format == "JPEG" and min(width, height) >= 2 * min_side:
                scale = min_side / min(width, height)
                image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even upright images
                image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
            rgb.info["full_size"] = full_size
            return rgb
    except UnreadableImage:
        raise
    except FileNotFoundError as err:
        raise UnreadableImage(path, "file not found") from err
    except Image.DecompressionBombError as err:
        raise UnreadableImage(path, f"too large ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImage(path, f"cannot decode ({err})") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """An in-memory image as RGB: 16-bit grayscale scaled, palette expanded, alpha composited on black."""
    if image.mode.startswith("I"):
        image = _sixteen_bit_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale -> 8 bit (PIL's own conversion clips everything above 255 to white)."""
    values = np.asarray(image, dtype=np.float64)
    if values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")


def upright_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of an image after EXIF rotation, from its header only; None if it cannot be read."""
    try:
        with Image.open(path) as image:
            return _upright_size(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened, not yet decoded image once its EXIF rotation is applied."""
    width, height = image.size
    sideways = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (height, width) if sideways else (width, height)


# ---------------------------------------------------------------------------------------- masks


def rasterise(polygons: Sequence[np.ndarray | Sequence], height: int, width: int) -> np.ndarray:
    """Union of polygons -> bool (H, W) mask, by the official PhraseCut rule: PIL polygon drawn with fill and
    outline, vertices truncated to int (the original CLIPSeg used skimage polygon2mask, ~4% fewer pixels).

    polygons: sequence of (N, 2) [x, y] point lists in original pixels. Polygons with fewer than 2 vertices or
    non-finite coordinates are ignored (PIL cannot draw them); parts outside the image are clipped.
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if len(points) < 2 or not np.isfinite(points).all():
            continue
        draw.polygon(points.astype(np.int64).ravel().tolist(), fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def instances_to_mask(instances: Sequence[Sequence], height: int, width: int) -> np.ndarray:
    """PhraseCut `Polygons` (instances -> polygons -> [x, y] points) -> bool (H, W) union of all of them."""
    return rasterise([polygon for instance in instances for polygon in instance], height, width)


def load_mask_png(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """A mask image -> (bool (H, W) mask, was_binary). 0/1 and 0/255 masks are read exactly; anything else is
    thresholded at > 127 (was_binary False, so the caller can warn). Raises `UnreadableImage`."""
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):
                image = _sixteen_bit_to_l(image)
            values = np.asarray(image.convert("L"))
    except UnreadableImage:
        raise
    except FileNotFoundError as err:
        raise UnreadableImage(path, "file not found") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(path, f"cannot decode ({err})") from err
    present = np.unique(values)
    if set(present.tolist()) <= {0, 1}:
        return values == 1, True
    if set(present.tolist()) <= {0, 255}:
        return values == 255, True
    return values > 127, False


# ---------------------------------------------------------------------------------------- sample pipeline

_PIXEL_SCALE = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(3, 1, 1)
_PIXEL_OFFSET = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)


def to_pixel_values(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, ImageNet-normalised (model.IMAGENET_MEAN/STD)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return torch.addcmul(_PIXEL_OFFSET, pixels.float(), _PIXEL_SCALE)


def object_aware_crop(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """Random square crop of side min(H, W) that keeps > 5% of the mask's pixels (SPEC section 4).

    mask: bool (H, W). The recipe tries up to 50 random offsets along the long side and takes the first that
    keeps more than 5% of the object; here the offset is drawn uniformly from all offsets that do (the same
    distribution, without the recipe's chance of missing a small object near an edge), or is the one that keeps
    most when none does. An empty mask gives a uniformly random crop. Returns (left, top, side).
    """
    height, width = mask.shape
    side = min(height, width)
    span = max(height, width) - side
    if span == 0:
        return 0, 0, side
    profile = mask.sum(axis=0 if width > height else 1, dtype=np.int64)
    total = int(profile.sum())
    if total == 0:
        offset = int(rng.integers(0, span + 1))
    else:
        cumulative = np.concatenate([[0], np.cumsum(profile)])
        kept = (cumulative[side:] - cumulative[: span + 1]) / total  # kept fraction for every offset 0..span
        good = np.flatnonzero(kept > CROP_MIN_KEPT)
        offset = int(good[rng.integers(len(good))] if len(good) else np.argmax(kept))
    return (offset, 0, side) if width > height else (0, offset, side)


def resize_mask(mask: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Nearest-neighbour resize of a bool (H, W) mask (or its `box` = (left, top, right, bottom)) to size (h, w),
    sampling pixel centres as PIL's NEAREST does."""
    left, top, right, bottom = box if box is not None else (0, 0, mask.shape[1], mask.shape[0])
    rows = top + ((np.arange(size[0]) + 0.5) * (bottom - top) / size[0]).astype(np.int64)
    cols = left + ((np.arange(size[1]) + 0.5) * (right - left) / size[1]).astype(np.int64)
    return mask[rows][:, cols]


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
    """Shared sample pipeline of `PhraseCut` and `UserFolder` (SPEC section 4).

    Subclasses set `self._phrase_ids` (int array, one per task) and implement `__len__`, `task_info(i)`,
    `phrase_text(phrase_id)` and `_load_mask(i, height, width)`; then call `_init_phrases()`.
    """

    def __init__(
        self,
        *,
        train: bool,
        image_size: int,
        negative_prob: float,
        visual_support: bool,
        templates: bool,
        seed: int,
        whole_image_prob: float = 0.0,
    ):
        for name, value in (("negative_prob", negative_prob), ("whole_image_prob", whole_image_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.train, self.image_size, self.negative_prob = train, image_size, negative_prob
        self.visual_support, self.templates, self.seed = visual_support, templates, seed
        self.whole_image_prob = whole_image_prob
        self.excluded: list[tuple[str, str]] = []
        self._stream: np.random.Generator | None = None
        self._stream_key: object = None

    def _init_phrases(self) -> None:
        """Group tasks by phrase id (for visual support) and check that negatives are possible."""
        self._by_phrase = np.argsort(self._phrase_ids, kind="stable")
        self._sorted_phrase_ids = self._phrase_ids[self._by_phrase]
        self._unique_phrase_ids = np.unique(self._phrase_ids)
        if len(self) == 0:
            raise ValueError(f"{type(self).__name__}: no usable tasks (excluded: {len(self.excluded)})")
        if self.negative_prob > 0 and len(self._unique_phrase_ids) < 2:
            raise ValueError("negative_prob > 0 needs at least two different phrases in the data")

    def __len__(self) -> int:
        raise NotImplementedError

    def task_info(self, index: int) -> TaskInfo:
        raise NotImplementedError

    def phrase_text(self, phrase_id: int) -> str:
        raise NotImplementedError

    def _load_mask(self, index: int, height: int, width: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        """One sample (keys in the module's sample-dict contract). When task `index` cannot be used (unreadable
        image, size mismatch, ...) it is warned about and reported as `sample["skipped"] == [(task_id, reason)]`,
        and the sample of the next usable task is returned instead. Only the requested task is reported, so one
        pass over all indices reports every bad task exactly once; in test mode the substitute is a task that is
        also returned for its own index, so a scorer de-duplicates by `task_id` and reports the skip count."""
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

    def _read(self, index: int, rng: np.random.Generator) -> tuple[TaskInfo, Image.Image, np.ndarray, tuple]:
        """Open a task's image and mask; returns (info, image, full mask, crop box). Raises SkipTask."""
        info = self.task_info(index)
        try:  # training crops are resized to image_size anyway: decoding at a reduced scale is enough
            image = open_rgb(info.image_path, min_side=self.image_size if self.train else None)
        except UnreadableImage as err:
            raise SkipTask(str(err)) from err
        width, height = image.info["full_size"]
        if info.annotation_size is not None and (width, height) != tuple(info.annotation_size):
            raise SkipTask(
                f"{info.image_path} is {width}x{height} but its annotations are for "
                f"{info.annotation_size[0]}x{info.annotation_size[1]}"
            )
        mask = self._load_mask(index, height, width)
        if self.train and not (self.whole_image_prob > 0 and rng.random() < self.whole_image_prob):
            left, top, side = object_aware_crop(mask, rng)
            box = (left, top, left + side, top + side)
        else:
            box = (0, 0, width, height)
        return info, image, mask, box

    def _pixels(self, image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        """(3, S, S) normalised pixels of `box` (full-scale coordinates) of a possibly reduced-scale image."""
        width, height = image.info["full_size"]
        x_scale, y_scale = image.width / width, image.height / height
        left, top, right, bottom = box
        scaled = (left * x_scale, top * y_scale, min(right * x_scale, image.width), min(bottom * y_scale, image.height))
        size = self.image_size
        return to_pixel_values(image.resize((size, size), Image.BILINEAR, box=scaled))

    def _sample(self, index: int) -> dict:
        rng = self._rng(index)
        info, image, mask, box = self._read(index, rng)
        if self.train and not mask.any():
            raise SkipTask("no ground-truth pixel lies inside the image")
        size = self.image_size
        pixel_values = self._pixels(image, box)
        target = resize_mask(mask, (size, size), box)
        phrase_id = int(self._phrase_ids[index])
        negative = bool(self.negative_prob > 0 and rng.random() < self.negative_prob)
        if negative:
            phrase_id = self._other_phrase(phrase_id, rng)
            target = np.zeros_like(target)
        phrase = self.phrase_text(phrase_id)
        sample = {
            "pixel_values": pixel_values,
            "mask": torch.from_numpy(target.astype(np.float32))[None],
            "phrase": TEMPLATES[rng.integers(len(TEMPLATES))].format(phrase) if self.templates else phrase,
            "negative": negative,
            "task_id": info.task_id,
        }
        if self.visual_support:
            prompt = self._support_prompt(index, phrase_id, rng)
            sample["has_prompt_image"] = prompt is not None
            sample["prompt_image"] = prompt if prompt is not None else torch.zeros(3, size, size)
        if not self.train:
            sample.update(
                original_size=tuple(mask.shape),
                full_mask=np.zeros_like(mask) if negative else mask,
                phrase_type=info.phrase_type,
                n_instances=info.n_instances,
                image_path=str(info.image_path),
            )
        return sample

    def _other_phrase(self, phrase_id: int, rng: np.random.Generator) -> int:
        """A different phrase of the split, drawn by task frequency (uniform over phrases as a fallback)."""
        for _ in range(10):
            candidate = int(self._phrase_ids[rng.integers(len(self))])
            if candidate != phrase_id:
                return candidate
        others = self._unique_phrase_ids[self._unique_phrase_ids != phrase_id]
        return int(others[rng.integers(len(others))])

    def _support_prompt(self, index: int, phrase_id: int, rng: np.random.Generator) -> torch.Tensor | None:
        """(3, S, S) prompt image from another task with this phrase (model.visual_prompt), or None."""
        start, stop = np.searchsorted(self._sorted_phrase_ids, [phrase_id, phrase_id + 1])
        candidates = self._by_phrase[start:stop]
        candidates = candidates[candidates != index]
        for support in rng.permutation(candidates)[:3]:
            try:
                _, image, mask, box = self._read(int(support), rng)
            except SkipTask:
                continue
            size = self.image_size
            pixels = self._pixels(image, box)
            support_mask = torch.from_numpy(resize_mask(mask, (size, size), box))
            return visual_prompt(pixels, support_mask, size=size)
        return None


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


# ---------------------------------------------------------------------------------------- PhraseCut index


def find_data_dir(root: str | os.PathLike) -> Path:
    """`root` (a dir containing data/VGPhraseCut_v0/, or that dir itself) -> the VGPhraseCut_v0 dir, or a
    FileNotFoundError saying where the data must be and how to get it."""
    root = Path(root)
    for candidate in (root / DATA_SUBDIR, root):
        if (candidate / "image_data_split.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"PhraseCut not found under {root}: expected {root / DATA_SUBDIR}/ with refer_<split>.json, "
        f"image_data_split.json and images/. {DOWNLOAD_HINT}"
    )


def iter_json_array(path: Path, chunk_chars: int = 1 << 24) -> Iterator[dict]:
    """Stream the elements of a top-level JSON list without holding the whole document (bounded memory)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as file:
        buffer, position = file.read(chunk_chars), 0

        def skip_separators() -> bool:
            nonlocal buffer, position
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n,":
                    position += 1
                if position < len(buffer):
                    return True
                buffer, position = file.read(chunk_chars), 0
                if not buffer:
                    return False

        if not skip_separators() or buffer[position] != "[":
            raise ValueError(f"{path}: expected a JSON list of tasks")
        position += 1
        while skip_separators():
            if buffer[position] == "]":
                return
            try:
                element, position = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as err:
                more = file.read(chunk_chars)
                if not more:
                    raise ValueError(f"{path}: malformed JSON ({err}); re-download the file") from err
                buffer, position = buffer[position:] + more, 0
                continue
            yield element
        raise ValueError(f"{path}: truncated JSON (no closing ']'); re-download the file")


# Arrays of one split's index: name -> dtype. Points are float64 so int truncation matches the JSON exactly.
_INDEX_ARRAYS = {
    "task_id_bytes": np.uint8,
    "task_id_offsets": np.int64,
    "phrase_bytes": np.uint8,
    "phrase_offsets": np.int64,
    "phrase_index": np.int32,
    "phrase_type": np.int8,
    "image_id": np.int64,
    "annotation_width": np.int32,
    "annotation_height": np.int32,
    "image_width": np.int32,
    "image_height": np.int32,
    "task_instances": np.int64,
    "instance_polygons": np.int64,
    "polygon_points": np.int64,
    "points": np.float64,
    "drawable": np.bool_,
}


class IndexWriter:
    """Accumulates tasks into the index arrays, spilling the big ones to disk as it goes."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.columns = {name: array("q") for name in ("task_id_offsets", "phrase_offsets")}
        self.columns["task_id_offsets"].append(0)
        self.columns["phrase_offsets"].append(0)
        for name in ("phrase_index", "phrase_type", "image_id", "task_instances", "instance_polygons"):
            self.columns[name] = array("q", [0] if name in ("task_instances", "instance_polygons") else [])
        self.columns["polygon_points"] = array("q", [0])
        self.columns["drawable"] = array("b")
        self.task_id_bytes, self.phrase_bytes = bytearray(), bytearray()
        self.phrases: dict[str, int] = {}
        self.points = array("d")
        self.n_points = 0
        self.points_file = open(directory / "points.bin", "wb")  # noqa: SIM115 (closed in finish)

    def add(self, task: dict) -> None:
        encoded = task["task_id"].encode()
        self.task_id_bytes += encoded
        self.columns["task_id_offsets"].append(len(self.task_id_bytes))
        phrase = task["phrase"]
        if phrase not in self.phrases:
            self.phrases[phrase] = len(self.phrases)
            self.phrase_bytes += phrase.encode()
            self.columns["phrase_offsets"].append(len(self.phrase_bytes))
        self.columns["phrase_index"].append(self.phrases[phrase])
        structure = task.get("phrase_structure") or {}
        kind = structure.get("type")
        self.columns["phrase_type"].append(PHRASE_TYPES.index(kind) if kind in PHRASE_TYPES else -1)
        self.columns["image_id"].append(int(task["image_id"]))
        drawable = False
        instance_polygons, polygon_points = self.columns["instance_polygons"], self.columns["polygon_points"]
        for instance in task["Polygons"]:
            for polygon in instance:
                before = len(self.points)
                self.points.extend(itertools.chain.from_iterable(polygon))
                if len(self.points) - before != 2 * len(polygon):
                    raise ValueError("a polygon point is not an [x, y] pair")
                self.n_points += len(polygon)
                polygon_points.append(self.n_points)
                drawable = drawable or len(polygon) >= 2
            instance_polygons.append(len(polygon_points) - 1)
        self.columns["task_instances"].append(len(instance_polygons) - 1)
        self.columns["drawable"].append(drawable)
        if len(self.points) > 1 << 22:
            self._spill_points()

    def _spill_points(self) -> None:
        self.points_file.write(self.points.tobytes())
        self.points = array("d")

    def finish(self, image_sizes: dict[int, tuple[int, int]], actual_sizes: dict[int, tuple[int, int]]) -> dict:
        """Write all arrays; returns {name: [dtype, shape]} for the metadata."""
        self._spill_points()
        self.points_file.close()
        arrays = {
            name: np.frombuffer(values, dtype=np.int64) for name, values in self.columns.items() if name != "drawable"
        }
        arrays["drawable"] = np.frombuffer(self.columns["drawable"], dtype=np.int8).astype(bool)
        arrays["task_id_bytes"] = np.frombuffer(bytes(self.task_id_bytes), dtype=np.uint8)
        arrays["phrase_bytes"] = np.frombuffer(bytes(self.phrase_bytes), dtype=np.uint8)
        for prefix, sizes in (("annotation", image_sizes), ("image", actual_sizes)):
            width_height = np.array([sizes.get(int(i), (-1, -1)) for i in arrays["image_id"]], dtype=np.int32)
            width_height = width_height.reshape(-1, 2)
            arrays[f"{prefix}_width"], arrays[f"{prefix}_height"] = width_height[:, 0], width_height[:, 1]
        layout = {"points": ["float64", [self.n_points, 2]]}
        for name, dtype in _INDEX_ARRAYS.items():
            if name == "points":
                continue
            values = np.ascontiguousarray(arrays[name], dtype=dtype)
            values.tofile(self.directory / f"{name}.bin")
            layout[name] = [np.dtype(dtype).name, list(values.shape)]
        return layout


def _fingerprint(paths: Sequence[Path]) -> list:
    return [INDEX_VERSION] + [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in paths]


def _cache_dirs(data_dir: Path, split: str) -> list[Path]:
    """Where a split's index may live: next to the data, else a per-user cache dir keyed by the data path."""
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipseg" / f"phrasecut-{digest}"
    return [data_dir / ".clipseg_index" / split, user_cache / split]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe")  # noqa: SIM115
        probe.close()
        return True
    except OSError:
        return False


class TaskTable:
    """One split's tasks as memory-mapped flat arrays (fork/copy-on-write friendly: no per-task objects)."""

    def __init__(self, directory: Path, images_dir: Path):
        meta = json.loads((directory / "meta.json").read_text())
        self.directory, self.images_dir = directory, images_dir
        for name, (dtype, shape) in meta["arrays"].items():
            setattr(self, name, _map_array(directory / f"{name}.bin", np.dtype(dtype), tuple(shape)))

    def __getstate__(self) -> dict:
        # Pickled for spawn-started DataLoader workers: send the paths and re-map, never copy the arrays.
        return {"directory": self.directory, "images_dir": self.images_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["images_dir"])

    def __len__(self) -> int:
        return len(self.image_id)

    def task_id(self, row: int) -> str:
        return bytes(self.task_id_bytes[self.task_id_offsets[row] : self.task_id_offsets[row + 1]]).decode()

    def phrase(self, phrase_index: int) -> str:
        return bytes(
            self.phrase_bytes[self.phrase_offsets[phrase_index] : self.phrase_offsets[phrase_index + 1]]
        ).decode()

    def polygons(self, row: int) -> list[list[np.ndarray]]:
        """Instances -> polygons -> (N, 2) float64 points, as in the JSON's `Polygons`."""
        instances = []
        for instance in range(self.task_instances[row], self.task_instances[row + 1]):
            first, last = self.instance_polygons[instance], self.instance_polygons[instance + 1]
            instances.append(
                [np.array(self.points[self.polygon_points[p] : self.polygon_points[p + 1]]) for p in range(first, last)]
            )
        return instances

    def image_path(self, row: int) -> Path:
        return self.images_dir / f"{int(self.image_id[row])}.jpg"

    def exclusion_reasons(self) -> list[tuple[int, str]]:
        """(row, reason) for tasks that cannot be used: annotation/image size mismatch, nothing to draw."""
        mismatch = (
            (self.image_width >= 0)
            & (self.annotation_width >= 0)
            & ((self.image_width != self.annotation_width) | (self.image_height != self.annotation_height))
        )
        reasons = []
        for row in np.flatnonzero(mismatch | ~self.drawable):
            if mismatch[row]:
                reasons.append(
                    (
                        int(row),
                        f"image {self.image_path(row).name} is {self.image_width[row]}x{self.image_height[row]} "
                        f"but annotated as {self.annotation_width[row]}x{self.annotation_height[row]}",
                    )
                )
            else:
                reasons.append((int(row), "no polygon with at least 2 vertices"))
        return reasons


def _map_array(path: Path, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def load_task_table(data_dir: Path, split: str, cache_dir: Path | None = None) -> TaskTable:
    """The index of `refer_<split>.json`, built on first use (streaming parse + image header checks) and
    memory-mapped afterwards. Rebuilt when the JSON files change."""
    refer = data_dir / f"refer_{split}.json"
    if not refer.is_file():
        raise FileNotFoundError(f"{refer} is missing: the PhraseCut download is incomplete. {DOWNLOAD_HINT}")
    sources = [refer, data_dir / "image_data_split.json"]
    fingerprint = _fingerprint(sources)
    candidates = [cache_dir / split] if cache_dir is not None else _cache_dirs(data_dir, split)
    for directory in candidates:
        meta = directory / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
            return TaskTable(directory, data_dir / "images")
    for directory in candidates:
        if _writable(directory.parent):
            _build_index(data_dir, split, directory, fingerprint)
            return TaskTable(directory, data_dir / "images")
    raise PermissionError(f"cannot write a PhraseCut index in any of {[str(d) for d in candidates]}")


def _build_index(data_dir: Path, split: str, directory: Path, fingerprint: list) -> None:
    refer = data_dir / f"refer_{split}.json"
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{split}-building-"))
    try:
        writer = IndexWriter(staging)
        quiet = refer.stat().st_size < 20_000_000  # progress bars only where indexing takes a while
        with tqdm(desc=f"indexing {refer.name} (once)", unit="task", mininterval=1.0, disable=quiet) as progress:
            for number, task in enumerate(iter_json_array(refer)):
                try:
                    writer.add(task)
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(
                        f"{refer}: task #{number} ({task.get('task_id', '?') if isinstance(task, dict) else task!r})"
                        f" is malformed ({type(err).__name__}: {err}); re-download the file"
                    ) from err
                progress.update()
        image_sizes = _annotation_sizes(data_dir / "image_data_split.json")
        image_ids = sorted(set(writer.columns["image_id"]))
        actual_sizes = {}
        for image_id in tqdm(
            image_ids, desc="checking image sizes (once)", unit="image", mininterval=1.0, disable=quiet
        ):
            size = upright_size(data_dir / "images" / f"{image_id}.jpg")
            if size is not None:
                actual_sizes[image_id] = size
        layout = writer.finish(image_sizes, actual_sizes)
        meta = {"fingerprint": fingerprint, "split": split, "arrays": layout}
        (staging / "meta.json").write_text(json.dumps(meta))
        if directory.exists():
            shutil.rmtree(directory)
        try:
            os.replace(staging, directory)
        except OSError:  # another process finished the same index first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _annotation_sizes(path: Path) -> dict[int, tuple[int, int]]:
    """image_data_split.json -> {image_id: (width, height)}."""
    try:
        entries = json.loads(path.read_text())
        return {int(entry["image_id"]): (int(entry["width"]), int(entry["height"])) for entry in entries}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed ({type(err).__name__}: {err}); re-download the file") from err


# ---------------------------------------------------------------------------------------- PhraseCut dataset


class PhraseCut(SegmentationData):
    """PhraseCut (VGPhraseCut_v0) as it is on disk, for training (`train=True`: object-aware crops, optional
    negatives, visual support and templates) or testing (whole image squashed to `image_size`, plus the full-size
    ground truth). `root`: a dir containing data/VGPhraseCut_v0/ or that dir itself. `split`: train, val, test,
    miniv or val_miniv. Ground truth is the union of all polygons of all instances (official PIL rule, see
    `rasterise`). Tasks whose image size differs from its annotation size, or with nothing to draw, are excluded up
    front and listed in `self.excluded` as (task_id, reason). `limit` keeps the first N usable tasks.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        train: bool,
        image_size: int = IMAGE_SIZE,
        negative_prob: float = 0.0,
        visual_support: bool = False,
        templates: bool = False,
        seed: int = 0,
        whole_image_prob: float = 0.0,
        limit: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        super().__init__(
            train=train,
            image_size=image_size,
            negative_prob=negative_prob,
            visual_support=visual_support,
            templates=templates,
            seed=seed,
            whole_image_prob=whole_image_prob,
        )
        parts = COMBINED_SPLITS.get(split, (split,))
        if any(part not in SPLITS for part in parts):
            valid = ", ".join(SPLITS + tuple(COMBINED_SPLITS))
            raise ValueError(f"unknown PhraseCut split {split!r}; valid splits: {valid}")
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
        if self.excluded:
            warnings.warn(
                f"PhraseCut {split}: excluded {len(self.excluded)} tasks (first: {self.excluded[0][0]}: "
                f"{self.excluded[0][1]}); see dataset.excluded",
                stacklevel=2,
            )
        self._init_phrases()

    @property
    def tasks(self) -> TaskList:
        """Sequence of task dicts (task_id, image_id, phrase, phrase_type, Polygons, image_path, width, height)."""
        return TaskList(self)

    def __len__(self) -> int:
        return len(self._rows)

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

    def _load_mask(self, index: int, height: int, width: int) -> np.ndarray:
        table, row = self._locate(index)
        return instances_to_mask(table.polygons(row), height, width)


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

    `image`: path (relative to the index file's directory or absolute). `mask`: a mask image path (0/1 or 0/255;
    other values are thresholded at > 127 with a warning) or PhraseCut-style polygons, either a list of polygons
    `[[[x, y], ...], ...]` or a list of instances of polygons (in CSV as a JSON string). Optional fields: `id`
    (task id; default `<file name>:<line>`), `split` (records are kept when it equals the `split` argument),
    `phrase_type`. Same sample pipeline and sample dict as `PhraseCut`.
    """

    def __init__(
        self,
        index_file: str | os.PathLike,
        *,
        train: bool,
        image_size: int = IMAGE_SIZE,
        negative_prob: float = 0.0,
        visual_support: bool = False,
        templates: bool = False,
        seed: int = 0,
        whole_image_prob: float = 0.0,
        limit: int | None = None,
        split: str | None = None,
    ):
        super().__init__(
            train=train,
            image_size=image_size,
            negative_prob=negative_prob,
            visual_support=visual_support,
            templates=templates,
            seed=seed,
            whole_image_prob=whole_image_prob,
        )
        self.index_file = Path(index_file)
        records = [
            record for record in read_records(self.index_file) if split is None or record.get("split") in (None, split)
        ]
        if not records:
            raise ValueError(f"{self.index_file}: no records" + (f" with split {split!r}" if split else ""))
        self.records = records[:limit]
        phrases = sorted({record["phrase"] for record in self.records})
        self._phrases = phrases
        lookup = {phrase: number for number, phrase in enumerate(phrases)}
        self._phrase_ids = np.array([lookup[record["phrase"]] for record in self.records], dtype=np.int64)
        self._warned_non_binary = False
        self._init_phrases()

    def __len__(self) -> int:
        return len(self.records)

    def phrase_text(self, phrase_id: int) -> str:
        return self._phrases[phrase_id]

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

    def _load_mask(self, index: int, height: int, width: int) -> np.ndarray:
        mask = self.records[index]["mask"]
        if isinstance(mask, list):
            return instances_to_mask(mask, height, width)
        try:
            values, binary = load_mask_png(mask)
        except UnreadableImage as err:
            raise SkipTask(f"mask {err}") from err
        if values.shape != (height, width):
            raise SkipTask(f"mask {mask} is {values.shape[1]}x{values.shape[0]} but the image is {width}x{height}")
        if not binary and not self._warned_non_binary:
            self._warned_non_binary = True
            warnings.warn(
                f"mask {mask} is not binary (values other than 0/1 or 0/255): thresholded at > 127", stacklevel=2
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


# ---------------------------------------------------------------------------------------- synthetic PhraseCut

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (145, 55, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZE_WORDS = {"small": (0.09, 0.12), "large": (0.17, 0.22)}  # radius as a fraction of the image's short side
RELATIONS = ("left of", "right of", "above", "below")
PHRASE_TYPE_SHARES = {"name": 0.3, "attribute": 0.5, "relation": 0.2}
SPLIT_SHARES = (("val", 0.15), ("test", 0.10), ("miniv", 0.05))


@dataclass
class Shape:
    kind: str
    colour: str
    size: str
    polygon: np.ndarray  # (N, 2) float [x, y]
    ann_id: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        (left, top), (right, bottom) = self.polygon.min(axis=0), self.polygon.max(axis=0)
        return float(left), float(top), float(right), float(bottom)


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    corners = {"circle": 24, "square": 4, "triangle": 3}[kind]
    start = {"circle": 0.0, "square": math.pi / 4, "triangle": -math.pi / 2}[kind] + angle
    theta = start + np.arange(corners) * 2 * math.pi / corners
    return np.round(np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1), 2)


def _place_shapes(rng: np.random.Generator, width: int, height: int, first_ann_id: int) -> list[Shape]:
    """2-4 shapes of distinct colours, well apart (bounding circles at least 6% of the short side apart)."""
    short = min(width, height)
    count = int(rng.integers(2, 5))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    placed: list[tuple[float, float, float]] = []
    shapes = []
    for colour in colours:
        kind = SHAPES[rng.integers(len(SHAPES))]
        size = "large" if rng.random() < 0.5 else "small"
        radius = float(rng.uniform(*SIZE_WORDS[size])) * short
        for _ in range(60):
            cx, cy = rng.uniform(radius + 2, width - radius - 2), rng.uniform(radius + 2, height - radius - 2)
            if all(math.hypot(cx - x, cy - y) > radius + r + 0.06 * short for x, y, r in placed):
                placed.append((cx, cy, radius))
                angle = float(rng.uniform(-0.3, 0.3))
                polygon = _shape_polygon(kind, cx, cy, radius, angle)
                shapes.append(Shape(kind, str(colour), size, polygon, first_ann_id + len(shapes)))
                break
    return shapes


def _related(subject: Shape, relation: str, anchor: Shape) -> bool:
    s_left, s_top, s_right, s_bottom = subject.box
    a_left, a_top, a_right, a_bottom = anchor.box
    return {
        "left of": s_right < a_left,
        "right of": s_left > a_right,
        "above": s_bottom < a_top,
        "below": s_top > a_bottom,
    }[relation]


def _candidate_phrases(shapes: list[Shape]) -> dict[str, list[tuple[str, dict, tuple[Shape, ...]]]]:
    """Every phrase of the grammar that refers to a non-empty set of shapes in this scene, by phrase type:
    {type: [(phrase, phrase_structure, referred shapes)]}. The referred shapes are exactly those matching."""
    found: dict[str, list] = {kind: [] for kind in PHRASE_TYPE_SHARES}

    def add(kind: str, phrase: str, name: str, attributes: list, relations: list, targets: list) -> None:
        if targets:
            structure = {
                "name": name,
                "attributes": attributes,
                "relation_ids": [],
                "relation_descriptions": relations,
                "type": kind,
            }
            found[kind].append((phrase, structure, tuple(targets)))

    for kind in sorted({shape.kind for shape in shapes}):
        add("name", kind, kind, [], [], [s for s in shapes if s.kind == kind])
        for colour in COLOURS:
            targets = [s for s in shapes if s.kind == kind and s.colour == colour]
            add("attribute", f"{colour} {kind}", kind, [colour], [], targets)
            for size in SIZE_WORDS:
                targets = [s for s in shapes if s.kind == kind and s.colour == colour and s.size == size]
                add("attribute", f"{size} {colour} {kind}", kind, [size, colour], [], targets)
        for size in SIZE_WORDS:
            add(
                "attribute",
                f"{size} {kind}",
                kind,
                [size],
                [],
                [s for s in shapes if s.kind == kind and s.size == size],
            )
        for relation in RELATIONS:
            for anchor in shapes:
                targets = [s for s in shapes if s.kind == kind and s is not anchor and _related(s, relation, anchor)]
                anchor_words = f"{anchor.colour} {anchor.kind}"
                phrase = f"{kind} {relation} the {anchor_words}"
                add("relation", phrase, kind, [], [[relation, anchor_words]], targets)
    return found


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Muted base colour + smooth low-frequency texture + fine noise, (H, W, 3) float."""
    grey = rng.uniform(90, 190)
    base = grey + rng.uniform(-20, 20, size=3)
    coarse = rng.uniform(-22, 22, size=(6, 8, 3)).astype(np.float32)
    smooth = np.stack(
        [
            np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((width, height), Image.BICUBIC))
            for c in range(3)
        ],
        axis=-1,
    )
    return base + smooth + rng.normal(0, 5, size=(height, width, 3))


def _synthetic_image(rng: np.random.Generator, image_id: int, size: tuple[int, int] | None) -> tuple[Image.Image, list]:
    width, height = size if size is not None else (int(rng.integers(240, 501)), int(rng.integers(240, 501)))
    shapes = _place_shapes(rng, width, height, first_ann_id=image_id * 100)
    canvas = Image.fromarray(np.clip(_background(rng, width, height), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        colour = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[shape.colour])
        draw.polygon(shape.polygon.astype(np.int64).ravel().tolist(), fill=colour, outline=colour)
    return canvas, shapes


def _synthetic_tasks(rng: np.random.Generator, image_id: int, shapes: list[Shape], relation_ids: Iterator) -> list:
    """3-6 tasks for one scene, phrase types drawn by PHRASE_TYPE_SHARES, one phrase per referred set."""
    candidates = _candidate_phrases(shapes)
    kinds, shares = list(PHRASE_TYPE_SHARES), np.array(list(PHRASE_TYPE_SHARES.values()))
    used: set[tuple[int, ...]] = set()
    tasks = []
    for kind in rng.choice(kinds, size=int(rng.integers(3, 7)), p=shares):
        fresh = [c for c in candidates[kind] if tuple(s.ann_id for s in c[2]) not in used]
        if not fresh:
            continue
        phrase, structure, targets = fresh[rng.integers(len(fresh))]
        ann_ids = [shape.ann_id for shape in targets]
        used.add(tuple(ann_ids))
        structure = dict(structure, relation_ids=[next(relation_ids) for _ in structure["relation_descriptions"]])
        boxes = [
            [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)]
            for b in (s.box for s in targets)
        ]
        tasks.append(
            {
                "task_id": f"{image_id}__{'_'.join(map(str, ann_ids))}",
                "image_id": image_id,
                "ann_ids": ann_ids,
                "instance_boxes": boxes,
                "Polygons": [[shape.polygon.tolist()] for shape in targets],
                "phrase": phrase,
                "phrase_structure": structure,
            }
        )
    return tasks


def _assign_splits(n_images: int, seed: int) -> list[str]:
    order = np.random.default_rng([seed, 1 << 30]).permutation(n_images)
    splits = ["train"] * n_images
    start = 0
    for name, share in SPLIT_SHARES:
        count = max(1, round(share * n_images)) if n_images >= 4 else 0
        for position in order[start : start + count]:
            splits[position] = name
        start += count
    return splits


def make_synthetic_phrasecut(
    root: str | os.PathLike = DEFAULT_SYNTHETIC_ROOT,
    n_images: int = 400,
    seed: int = 0,
    *,
    fixed_size: tuple[int, int] | None = None,
    progress: bool = False,
) -> Path:
    """Write a synthetic PhraseCut at `<root>/data/VGPhraseCut_v0/` in the exact official layout and schema
    (refer_{train,val,test,miniv}.json, image_data_split.json, name_att_rel_count.json, images/<id>.jpg).

    Scenes: 2-4 well-separated shapes (circle, square, triangle) of distinct saturated colours (red, green, blue,
    yellow, purple) and two sizes (small, large) over mildly textured backgrounds, 240-500 px per side (or
    `fixed_size` = (width, height)). Phrases from a small grammar, ~30% name ("circle"), ~50% attribute
    ("large blue square"), ~20% relation ("triangle left of the green circle"); each phrase refers to exactly the
    shapes that match it (possibly several). Splits are disjoint by image (~70/15/10/5% train/val/test/miniv).
    Deterministic for a seed. Returns the VGPhraseCut_v0 dir.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    data_dir = Path(root) / DATA_SUBDIR
    images_dir = data_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    splits = _assign_splits(n_images, seed)
    tasks_by_split: dict[str, list] = {split: [] for split in SPLITS}
    image_data = []
    relation_ids = itertools.count(1)
    for number in tqdm(range(n_images), desc="synthetic PhraseCut", unit="image", disable=not progress):
        image_id = number + 1
        rng = np.random.default_rng([seed, number])
        image, shapes = _synthetic_image(rng, image_id, fixed_size)
        image.save(images_dir / f"{image_id}.jpg", quality=92)
        tasks_by_split[splits[number]] += _synthetic_tasks(rng, image_id, shapes, relation_ids)
        image_data.append(
            {
                "image_id": image_id,
                "coco_id": None,
                "flickr_id": None,
                "width": image.width,
                "height": image.height,
                "url": f"synthetic://{seed}/{image_id}.jpg",
                "split": splits[number],
            }
        )
    for split, tasks in tasks_by_split.items():
        _write_json(data_dir / f"refer_{split}.json", tasks)
    _write_json(data_dir / "image_data_split.json", image_data)
    _write_json(data_dir / "name_att_rel_count.json", _vocabulary_counts(tasks_by_split))
    return data_dir


def _vocabulary_counts(tasks_by_split: dict[str, list]) -> dict:
    names, attributes, relations = Counter(), Counter(), Counter()
    for task in itertools.chain.from_iterable(tasks_by_split.values()):
        structure = task["phrase_structure"]
        names[structure["name"]] += 1
        attributes.update(structure["attributes"])
        relations.update(predicate for predicate, _ in structure["relation_descriptions"])
    return {
        key: [list(item) for item in counter.most_common()]
        for key, counter in (("cat", names), ("att", attributes), ("rel", relations))
    }


def _write_json(path: Path, value: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------- benchmarks


def pipeline_samples_per_second(
    n_samples: int = 300, image_size: int = IMAGE_SIZE, visual_support: bool = False, negative_prob: float = 0.2
) -> float:
    """Training-pipeline samples/s (wall clock) in this process = one DataLoader worker, one torch thread."""
    return time_pipeline(n_samples, image_size, visual_support, negative_prob)["wall"]


def time_pipeline(
    n_samples: int = 300, image_size: int = IMAGE_SIZE, visual_support: bool = False, negative_prob: float = 0.2
) -> dict[str, float]:
    """Training samples/s on generated 500x375 JPEGs: JPEG decode, polygon rasterisation, object-aware crop,
    resize, normalisation (and the visual prompt if asked). {"wall": per wall-clock second, "cpu": per second of
    this process's CPU time, i.e. per core, which other load on the machine does not distort}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="clipseg-bench-") as root:
            make_synthetic_phrasecut(root, n_images=60, seed=0, fixed_size=(500, 375))
            data = PhraseCut(
                root,
                "train",
                train=True,
                image_size=image_size,
                negative_prob=negative_prob,
                visual_support=visual_support,
                cache_dir=Path(root) / "index",
            )
            for index in range(10):
                data[index % len(data)]
            wall, cpu = time.perf_counter(), time.process_time()
            for index in tqdm(range(n_samples), desc="pipeline", unit="sample", leave=False):
                data[index % len(data)]
            return {"wall": n_samples / (time.perf_counter() - wall), "cpu": n_samples / (time.process_time() - cpu)}
    finally:
        torch.set_num_threads(threads)


_INDEX_PROBE = """
import json, sys, time, resource
import dataset
def rss_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
before = rss_mb()
start = time.perf_counter()
data = dataset.PhraseCut(sys.argv[1], 'train', train=True, cache_dir=sys.argv[2])
seconds = time.perf_counter() - start
data[len(data) // 2]
print(json.dumps({'seconds': seconds, 'tasks': len(data), 'rss_mb': rss_mb(), 'rss_growth_mb': rss_mb() - before,
                  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_large_split(data_dir: Path, n_tasks: int) -> int:
    """Overwrite refer_train.json with `n_tasks` tasks cycling through the existing tasks of all splits (unique
    task ids, the same few images); streamed, so memory stays small. Returns the file size in bytes."""
    base = [task for split in SPLITS for task in json.loads((data_dir / f"refer_{split}.json").read_text())]
    path = data_dir / "refer_train.json"
    with open(path, "w", encoding="utf-8") as file:
        file.write("[")
        for number in tqdm(range(n_tasks), desc="writing refer_train.json", unit="task", mininterval=1.0):
            task = dict(base[number % len(base)], task_id=f"{base[number % len(base)]['task_id']}_{number}")
            file.write(("," if number else "") + json.dumps(task))
        file.write("]")
    return path.stat().st_size


def bench_index(n_tasks: int) -> dict:
    """Build and load the index of an `n_tasks`-task refer_train.json, each in a fresh process: seconds, RSS."""
    with tempfile.TemporaryDirectory(prefix="clipseg-index-") as root:
        data_dir = make_synthetic_phrasecut(root, n_images=40, seed=0)
        json_bytes = write_large_split(data_dir, n_tasks)
        cache = Path(root) / "index"
        command = [sys.executable, "-c", _INDEX_PROBE, root, str(cache)]
        here = str(Path(__file__).resolve().parent)
        env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
        runs = {}
        for name in ("build", "cached_load"):
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            runs[name] = json.loads(output.strip().splitlines()[-1])
        index_bytes = sum(path.stat().st_size for path in cache.rglob("*") if path.is_file())
        return {"tasks": n_tasks, "json_mb": json_bytes / 1e6, "index_mb": index_bytes / 1e6, **runs}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="write a synthetic PhraseCut in the official layout")
    synthetic.add_argument(
        "--root",
        default=DEFAULT_SYNTHETIC_ROOT,
        help="output dir; data goes to ROOT/data/VGPhraseCut_v0 (default: %(default)s)",
    )
    synthetic.add_argument(
        "--n-images",
        type=int,
        default=400,
        help="number of images, split ~70/15/10/5%% train/val/test/miniv (default: %(default)s)",
    )
    synthetic.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed writes the same data (default: %(default)s)"
    )
    pipeline = commands.add_parser("bench-pipeline", help="training-pipeline samples/s per worker on 500x375 JPEGs")
    pipeline.add_argument("--samples", type=int, default=300, help="samples to time (default: %(default)s)")
    pipeline.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="output side in px (default: %(default)s)")
    pipeline.add_argument("--visual-support", action="store_true", help="also build a visual prompt image per sample")
    index = commands.add_parser("bench-index", help="index build time, cached load time and RSS for a large split")
    index.add_argument(
        "--tasks", type=int, default=300_000, help="tasks in the generated refer_train.json (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        data_dir = make_synthetic_phrasecut(args.root, args.n_images, args.seed, progress=True)
        counts = {split: len(json.loads((data_dir / f"refer_{split}.json").read_text())) for split in SPLITS}
        print(f"wrote {args.n_images} images to {data_dir}; tasks per split: {counts}")
    elif args.command == "bench-pipeline":
        rates = time_pipeline(args.samples, args.image_size, args.visual_support)
        print(
            f"training pipeline, 500x375 JPEGs -> {args.image_size} px, one worker with one thread: "
            f"{rates['cpu']:.1f} samples per CPU-second (per core), {rates['wall']:.1f} samples/s wall clock"
        )
    else:
        result = bench_index(args.tasks)
        print(json.dumps(result, indent=2))
        build, load = result["build"], result["cached_load"]
        print(
            f"{args.tasks} tasks ({result['json_mb']:.0f} MB JSON, {result['index_mb']:.0f} MB index): build "
            f"{build['seconds']:.1f} s (peak RSS {build['peak_rss_mb']:.0f} MB), cached load {load['seconds']:.2f} s "
            f"(RSS {load['rss_mb']:.0f} MB, +{load['rss_growth_mb']:.0f} MB over imports)"
        )


if __name__ == "__main__":
    main()
