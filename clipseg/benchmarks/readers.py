"""Readers for the one-shot and zero-shot benchmarks as users have them on disk (no conversion step).

Pascal VOC 2012 (`find_voc_dir` accepts the VOC2012 dir, its parent or VOCdevkit's parent):

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClassAug/<id>.png      index PNGs (mode L), 255 = void (SBD-augmented labels)
    VOC2012/SegmentationClass/<id>.png         palette PNGs (mode P), read as indices, 255 = void
    VOC2012/ImageSets/Segmentation/val.txt     1,449 image ids
    <splits>/lists/pascal/val.txt              PFENet's list: "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png"
    <splits>/splits/pascal/val/fold<k>.txt     HSNet's folds: "<id>__<cc>" per (image, 1-based class) pair

COCO-20i, HSNet's layout (what the original scored) or COCO 2014's own files (read with pycocotools):

    <root>/val2014/COCO_val2014_<id>.jpg
    <root>/annotations/val2014/COCO_val2014_<id>.png      per-image class PNGs: COCO index + 1, 0 = other
    <splits>/splits/coco/val/fold<k>.pkl                  {class index 0-79: ["val2014/COCO_val2014_<id>.jpg", ...]}
  or
    <root>/annotations/instances_val2014.json             instances; class lists built from the annotations

`<splits>` is `--splits` (default: the data root); `data/splits/...` (HSNet's repository layout) is found as well.
Images are read on their stored pixel grid (no EXIF rotation: the labels are drawn on it), as RGB. HSNet's fold
pickles are read by `read_fold_pickle`, which builds built-in containers, strings and numbers only: a pickle naming
anything else (a class, a function such as os.system) is refused before it can run.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipseg.benchmarks.classes import COCO_CLASSES, PASCAL_CLASSES, coco_fold_classes, pascal_fold_classes
from clipseg.images import UnreadableImage, open_rgb, read_label

VOC_HINT = (
    "Pascal VOC 2012 comes from the VOC2012 trainval tar (VOCdevkit/VOC2012: JPEGImages, SegmentationClass, "
    "ImageSets); SegmentationClassAug is the SBD-augmented label set most few-shot code uses (e.g. the "
    "SegmentationClassAug.zip linked from PFENet's and HSNet's READMEs). Generated data in this layout: "
    "`python -m clipseg.synthetic voc --root synthetic_voc`."
)
PFENET_LIST = Path("lists") / "pascal" / "val.txt"
HSNET_SPLITS = Path("splits")
COCO_HINT = (
    "COCO-20i as HSNet lays it out: COCO 2014 images (train2014/, val2014/), HSNet's per-image class PNGs "
    "(annotations/val2014/*.png) and its fold lists (data/splits/coco/val/fold<k>.pkl in HSNet's repository); or "
    "COCO 2014's own annotations/instances_val2014.json (needs pycocotools). Generated data in both layouts: "
    "`python -m clipseg.synthetic coco --root synthetic_coco`."
)


class BenchmarkDataError(FileNotFoundError):
    """Benchmark data missing or malformed; the message names the file and where it comes from."""


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes make (dicts, lists, tuples, strings, bytes, numbers, None, bools):
    every global a pickle names (a class, a function such as os.system) is refused, so no code from the file runs."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a fold list never holds")


def read_fold_pickle(path: Path) -> dict[int, list[str]]:
    """HSNet's `fold<k>.pkl`: {class index: [image name, ...]}, read without running code; anything else is a
    BenchmarkDataError naming the file."""
    try:
        with open(path, "rb") as file:
            table = _PlainUnpickler(file).load()
    except OSError as err:
        raise BenchmarkDataError(f"{path}: unreadable ({err}). {COCO_HINT}") from err
    except Exception as err:  # untrusted bytes: whatever the unpickler raises means a bad file
        raise BenchmarkDataError(
            f"{path}: refused, not a plain fold list ({type(err).__name__}: {err}); HSNet's fold files hold a dict "
            f"class index -> image names only. {COCO_HINT}"
        ) from err
    if not isinstance(table, dict) or not all(
        isinstance(c, int) and isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)
        for c, names in table.items()
    ):
        raise BenchmarkDataError(f"{path}: expected a dict class index -> list of image names, got {table!r:.80}")
    return {c: list(names) for c, names in table.items()}


@dataclass(frozen=True)
class LabelledImage:
    """One image of a benchmark and its label map: `id` names it in episodes and prediction files."""

    id: str
    image: Path
    label: Path


def read_pair(item: LabelledImage) -> tuple[Image.Image, np.ndarray]:
    """(RGB image, (H, W) uint8 label map) on the stored pixel grid. Raises UnreadableImage (with the file) for a
    missing or broken file, or an image whose size differs from its label map's."""
    image = open_rgb(item.image, upright=False)
    try:
        labels = read_label(item.label, len(PASCAL_CLASSES))
    except ValueError as err:
        raise UnreadableImage(item.label, str(err)) from err
    if labels.shape != (image.height, image.width):
        raise UnreadableImage(
            item.image, f"is {image.width}x{image.height} but its label map {item.label.name} is "
            f"{labels.shape[1]}x{labels.shape[0]}"
        )  # fmt: skip
    return image, labels


def find_split_file(splits_dir: Path, relative: Path) -> Path | None:
    """`splits_dir/relative` or `splits_dir/data/relative` (HSNet's repository keeps its splits under data/)."""
    for candidate in (splits_dir / relative, splits_dir / "data" / relative):
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------------------------------------ Pascal VOC


def find_voc_dir(root: str | os.PathLike) -> Path:
    """The VOC2012 directory under `root` (root itself, root/VOC2012 or root/VOCdevkit/VOC2012)."""
    root = Path(root)
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise BenchmarkDataError(f"Pascal VOC 2012 not found under {root}: expected VOC2012/JPEGImages/. {VOC_HINT}")


class VocData:
    """Pascal VOC 2012 on disk: the image lists of the two one-shot protocols and of zero-shot evaluation."""

    def __init__(self, root: str | os.PathLike, splits_dir: str | os.PathLike | None = None):
        self.root = Path(root)
        self.voc_dir = find_voc_dir(root)
        self.splits_dir = Path(splits_dir) if splits_dir is not None else self.root

    def item(self, image_id: str, labels: str = "SegmentationClassAug") -> LabelledImage:
        return LabelledImage(
            image_id, self.voc_dir / "JPEGImages" / f"{image_id}.jpg", self.voc_dir / labels / f"{image_id}.png"
        )

    def pfenet_list(self) -> tuple[list[LabelledImage], str]:
        """PFENet's lists/pascal/val.txt (image and label paths relative to VOC2012), or, when the list is absent,
        ImageSets/Segmentation/val.txt with SegmentationClassAug labels (the same 1,449 images in the same sorted
        order). Returns the images and a note saying which list was read."""
        listing = find_split_file(self.splits_dir, PFENET_LIST)
        if listing is not None:
            items = []
            for number, line in enumerate(list_lines(listing), start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise BenchmarkDataError(f"{listing}:{number}: expected '<image path> <label path>', got {line!r}")
                image, label = (self.voc_dir / part for part in parts)
                items.append(LabelledImage(image.stem, image, label))
            return items, str(listing)
        ids = self._segmentation_ids("val")
        if not (self.voc_dir / "SegmentationClassAug").is_dir():
            raise BenchmarkDataError(
                f"neither PFENet's {PFENET_LIST} (under {self.splits_dir}) nor {self.voc_dir / 'SegmentationClassAug'} "
                f"was found: the original protocol reads SegmentationClassAug labels. {VOC_HINT}"
            )
        source = f"{self.voc_dir / 'ImageSets/Segmentation/val.txt'} (PFENet's {PFENET_LIST} not found)"
        return [self.item(image_id) for image_id in ids], source

    def hsnet_fold(self, fold: int) -> list[tuple[LabelledImage, int]]:
        """HSNet's splits/pascal/val/fold<k>.txt: (image, VOC id) pairs in file order."""
        relative = HSNET_SPLITS / "pascal" / "val" / f"fold{fold}.txt"
        path = find_split_file(self.splits_dir, relative)
        if path is None:
            raise BenchmarkDataError(
                f"{self.splits_dir / relative} not found: the hsnet protocol reads HSNet's fold files (data/splits/"
                f"pascal/val/fold0-3.txt in HSNet's repository); pass their parent with --splits"
            )
        allowed = pascal_fold_classes(fold)
        pairs = []
        for number, line in enumerate(list_lines(path), start=1):
            if not line.strip():
                continue
            name, _, class_text = line.strip().partition("__")
            if not class_text.isdigit() or int(class_text) not in allowed:
                raise BenchmarkDataError(f"{path}:{number}: expected '<image id>__<class {allowed}>', got {line!r}")
            pairs.append((self.item(name), int(class_text)))
        if not pairs:
            raise BenchmarkDataError(f"{path}: lists no episode; restore HSNet's fold file")
        return pairs

    def segmentation_val(self) -> list[LabelledImage]:
        """ImageSets/Segmentation/val.txt with SegmentationClass (palette) labels: the zero-shot evaluation set."""
        if not (self.voc_dir / "SegmentationClass").is_dir():
            raise BenchmarkDataError(f"{self.voc_dir / 'SegmentationClass'} not found. {VOC_HINT}")
        return [self.item(image_id, "SegmentationClass") for image_id in self._segmentation_ids("val")]

    def _segmentation_ids(self, split: str) -> list[str]:
        path = self.voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            raise BenchmarkDataError(f"{path} not found. {VOC_HINT}")
        return [line.strip() for line in list_lines(path) if line.strip()]


def list_lines(path: Path) -> list[str]:
    """The lines of a list file of a benchmark (PFENet's, HSNet's, VOC's ImageSets); BenchmarkDataError naming the
    file when it cannot be read as text."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BenchmarkDataError(f"{path}: cannot be read as a text list ({err}); restore the file") from err


@functools.lru_cache(maxsize=1 << 16)
def label_counts(path: Path) -> dict[int, int]:
    """{label value: pixel count} of a label map, 0 and 255 left out (cached: both protocols and all folds ask)."""
    values, counts = np.unique(read_label(path, len(PASCAL_CLASSES)), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts) if v not in (0, 255)}


# ------------------------------------------------------------------------------------------------ COCO-20i


class Coco20i:
    """COCO-20i validation images of one fold: `classwise` maps each fold class (0-based COCO index) to its image
    names ("val2014/COCO_val2014_<id>.jpg"); `read(name, class_index)` gives the RGB image and its binary mask.

    HSNet's layout (per-image class PNGs + fold pickle) is used when present, else COCO 2014's instances JSON:
    there a class's images are those with an annotation of the class and its mask is the union of them (HSNet's
    PNGs hold one class per pixel; where objects of two classes overlap the two can differ)."""

    def __init__(self, root: str | os.PathLike, fold: int, splits_dir: str | os.PathLike | None = None):
        self.root, self.fold = Path(root), fold
        self.splits_dir = Path(splits_dir) if splits_dir is not None else self.root
        self.classes = coco_fold_classes(fold)
        pickle_path = find_split_file(self.splits_dir, HSNET_SPLITS / "coco" / "val" / f"fold{fold}.pkl")
        json_path = self.root / "annotations" / "instances_val2014.json"
        self._coco = None
        if pickle_path is not None and (self.root / "annotations" / "val2014").is_dir():
            self.source = str(pickle_path)
            self.classwise = self._read_pickle(pickle_path)
        elif json_path.is_file():
            self.source = str(json_path)
            self.classwise = self._read_instances(json_path)
        else:
            raise BenchmarkDataError(
                f"COCO-20i not found: neither {self.splits_dir}/splits/coco/val/fold{fold}.pkl with "
                f"{self.root / 'annotations/val2014'}/ nor {json_path}. {COCO_HINT}"
            )
        empty = [COCO_CLASSES[c] for c in self.classes if len(self.classwise.get(c, ())) < 2]
        if empty:
            raise BenchmarkDataError(f"{self.source}: fold {fold} classes with fewer than 2 images: {empty}")

    def _read_pickle(self, path: Path) -> dict[int, list[str]]:
        table = read_fold_pickle(path)
        return {c: table.get(c, []) for c in self.classes}

    def _read_instances(self, path: Path) -> dict[int, list[str]]:
        try:
            from pycocotools.coco import COCO
        except ImportError as err:
            raise BenchmarkDataError(
                f"reading {path} needs pycocotools: `pip install -r requirements-benchmarks.txt` (or `pip install "
                "pycocotools`); or use HSNet's layout (annotations/val2014/*.png + splits/coco/val/fold<k>.pkl)"
            ) from err
        import contextlib
        import io

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                self._coco = COCO(str(path))
        except Exception as err:  # pycocotools asserts, or fails on whatever the file holds
            raise BenchmarkDataError(f"{path}: not a COCO instances JSON ({type(err).__name__}: {err})") from err
        categories = sorted(self._coco.getCatIds())
        names = [self._coco.loadCats(c)[0]["name"] for c in categories]
        if names != list(COCO_CLASSES):
            raise BenchmarkDataError(f"{path}: its {len(names)} categories are not COCO's 80 ({names[:5]}, ...)")
        self._category = {index: category for index, category in enumerate(categories)}
        self._image_ids: dict[str, int] = {}
        classwise = {}
        for index in self.classes:
            image_ids = sorted(set(self._coco.getImgIds(catIds=[self._category[index]])))
            names = [f"val2014/{self._coco.loadImgs(i)[0]['file_name']}" for i in image_ids]
            self._image_ids.update(zip(names, image_ids))
            classwise[index] = names
        return classwise

    def read(self, name: str, class_index: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, bool (H, W) mask of class `class_index`) of image `name`. Raises UnreadableImage."""
        image = open_rgb(self.root / name, upright=False)
        if self._coco is None:
            label_path = self.root / "annotations" / Path(name).with_suffix(".png")
            try:
                mask = read_label(label_path, len(COCO_CLASSES)) == class_index + 1
            except ValueError as err:
                raise UnreadableImage(label_path, str(err)) from err
        else:
            mask = self._instances_mask(name, class_index)
        if mask.shape != (image.height, image.width):
            raise UnreadableImage(
                self.root / name, f"is {image.width}x{image.height} but its mask is {mask.shape[1]}x{mask.shape[0]}"
            )
        return image, mask

    def _instances_mask(self, name: str, class_index: int) -> np.ndarray:
        image_id = self._image_ids[name]
        info = self._coco.loadImgs(image_id)[0]
        mask = np.zeros((info["height"], info["width"]), dtype=bool)
        for annotation in self._coco.loadAnns(
            self._coco.getAnnIds(imgIds=[image_id], catIds=[self._category[class_index]], iscrowd=None)
        ):
            mask |= self._coco.annToMask(annotation).astype(bool)
        return mask


def coco_query_id(name: str) -> str:
    """'val2014/COCO_val2014_000000000139.jpg' -> 'COCO_val2014_000000000139'."""
    return Path(name).stem
