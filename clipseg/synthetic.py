"""Synthetic data in the exact on-disk formats of the benchmarks, for the demo and the tests.

`make_synthetic_phrasecut` writes a PhraseCut (VGPhraseCut_v0) in the official layout and JSON schema: scenes of a
few coloured shapes on textured backgrounds, phrases from a small grammar that refer to exactly the shapes they
describe. `make_synthetic_voc` writes Pascal VOC 2012 (SegmentationClassAug and SegmentationClass PNGs with 255
borders, ImageSets) with PFENet's list and HSNet's fold files; `make_synthetic_coco` writes COCO-20i in HSNet's
layout (class PNGs, fold pickles) and COCO 2014's instances JSON. In the VOC and COCO scenes every class is one
shape in one colour. Deterministic for a seed.

    python -m clipseg.synthetic phrasecut --root synthetic_phrasecut --n-images 400 --seed 0
    python -m clipseg.synthetic voc --root synthetic_voc --n-images 40
    python -m clipseg.synthetic coco --root synthetic_coco --n-images 60
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pickle
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from clipseg.benchmarks.classes import COCO_CLASSES, COCO_FOLDS, PASCAL_CLASSES, PASCAL_FOLDS, pascal_fold_classes
from clipseg.outputs import json_text, write_json
from clipseg.phrasecut import DATA_SUBDIR, DEFAULT_SYNTHETIC_ROOT, SPLITS

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
DEFAULT_VOC_ROOT, DEFAULT_COCO_ROOT = "synthetic_voc", "synthetic_coco"
OBJECT_AREA = 3600  # pixels of a "large" VOC/COCO object, well above PFENet's 2 * 32 * 32 filter
SMALL_OBJECT_AREA = 500  # below it
BORDER = 2  # VOC's void band: pixels each side of an object's outline labelled 255
# COCO's category ids of its 80 classes (the JSON's ids are not contiguous)
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)
)  # fmt: skip


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


def background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A `width` x `height` RGB background: a muted base colour, a smooth low-frequency texture and fine noise."""
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
    return Image.fromarray(np.clip(base + smooth + rng.normal(0, 5, size=(height, width, 3)), 0, 255).astype(np.uint8))


def _synthetic_image(rng: np.random.Generator, image_id: int, size: tuple[int, int] | None) -> tuple[Image.Image, list]:
    width, height = size if size is not None else (int(rng.integers(240, 501)), int(rng.integers(240, 501)))
    shapes = _place_shapes(rng, width, height, first_ann_id=image_id * 100)
    canvas = background(rng, width, height)
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
        write_json(data_dir / f"refer_{split}.json", tasks, indent=None)
    write_json(data_dir / "image_data_split.json", image_data, indent=None)
    write_json(data_dir / "name_att_rel_count.json", _vocabulary_counts(tasks_by_split), indent=None)
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


# ------------------------------------------------------------------------------------------- VOC and COCO


def voc_palette() -> list[int]:
    """VOC's 256-colour palette (the bits of the index spread over R, G, B): 0 black, 255 = (224, 224, 192)."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [red, green, blue]
    return palette


def _class_style(class_id: int) -> tuple[str, tuple[int, int, int]]:
    """Class -> (shape kind, RGB colour): one shape and one saturated colour per class."""
    hue = (class_id * 0.61803398875) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200 + class_id % 3 * 25, 150 + class_id % 4 * 30)).convert("RGB")
    return SHAPES[class_id % len(SHAPES)], rgb.getpixel((0, 0))


def _object_polygon(kind: str, cx: float, cy: float, area: float, rng: np.random.Generator) -> np.ndarray:
    factor = {"circle": 24 / 2 * math.sin(2 * math.pi / 24), "square": 2.0, "triangle": 3 * math.sqrt(3) / 4}[kind]
    return _shape_polygon(kind, cx, cy, math.sqrt(area / factor), float(rng.uniform(-0.3, 0.3)))


def _draw_scene(
    rng: np.random.Generator, size: tuple[int, int], objects: list[tuple[int, float, float, float]]
) -> tuple[Image.Image, np.ndarray, list[tuple[int, np.ndarray]]]:
    """objects: (class id, centre x, centre y, area) -> (RGB image, uint8 class map without borders, polygons)."""
    width, height = size
    canvas = background(rng, width, height)
    labels = Image.new("L", size, 0)
    draw, draw_labels = ImageDraw.Draw(canvas), ImageDraw.Draw(labels)
    polygons = []
    for class_id, cx, cy, area in objects:
        kind, colour = _class_style(class_id)
        polygon = _object_polygon(kind, cx, cy, area, rng)
        points = polygon.astype(np.int64).ravel().tolist()
        draw.polygon(points, fill=tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in colour))
        draw_labels.polygon(points, fill=class_id)
        polygons.append((class_id, polygon))
    return canvas, np.asarray(labels).copy(), polygons


def _void_borders(labels: np.ndarray, width: int = BORDER) -> np.ndarray:
    """Label map with a band of 255 `width` pixels each side of every boundary between different labels."""
    padded = np.pad(labels, width, mode="edge")
    height, breadth = labels.shape
    edge = np.zeros(labels.shape, dtype=bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            edge |= padded[width + dy : width + dy + height, width + dx : width + dx + breadth] != labels
    return np.where(edge, 255, labels).astype(np.uint8)


def _save_png(path: Path, labels: np.ndarray, palette: list[int] | None = None) -> None:
    image = Image.fromarray(labels, mode="L")
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def make_synthetic_voc(root: str | os.PathLike = DEFAULT_VOC_ROOT, n_images: int = 40, seed: int = 0) -> Path:
    """Write a synthetic Pascal VOC 2012 at `<root>/VOC2012/` plus PFENet's and HSNet's lists; returns the VOC dir.

    VOC2012/JPEGImages/<id>.jpg; SegmentationClassAug/<id>.png (mode L) and SegmentationClass/<id>.png (mode P,
    VOC palette): class ids 1-20, 0 background, 255 on a band around every object; ImageSets/Segmentation/
    {train,val,trainval}.txt (a quarter of the images train, at least 20 val). <root>/lists/pascal/val.txt (PFENet:
    "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png" per val image) and <root>/splits/pascal/val/fold<k>.txt
    (HSNet: "<id>__<cc>" for each val image and fold class with at least 2,048 pixels). Val image j holds two
    large objects of classes 2j mod 20 + 1 and 2j + 1 mod 20 + 1 (every class twice in 20 images) and sometimes a
    small one (under PFENet's 2,048-pixel filter)."""
    if n_images < 20:
        raise ValueError(f"n_images must be at least 20 (every class in two val images), got {n_images}")
    root = Path(root)
    voc = root / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    palette, n_val = voc_palette(), max(20, n_images - n_images // 4)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    hsnet: dict[int, list[str]] = {fold: [] for fold in range(PASCAL_FOLDS)}
    n_classes = len(PASCAL_CLASSES)
    for number in range(n_images):
        rng = np.random.default_rng([seed, number, 7])
        image_id = f"{2007 + number // 1000}_{number % 1000:06d}"
        split = "val" if number < n_val else "train"
        width, height = int(rng.integers(260, 321)), int(rng.integers(180, 241))
        first, second = 2 * number % n_classes + 1, (2 * number + 1) % n_classes + 1
        objects = [
            (first, width * 0.25 + rng.uniform(-8, 8), height / 2 + rng.uniform(-10, 10), OBJECT_AREA),
            (second, width * 0.75 + rng.uniform(-8, 8), height / 2 + rng.uniform(-10, 10), OBJECT_AREA),
        ]
        if rng.random() < 0.5:
            corner_x, corner_y = rng.choice([0.12, 0.88]) * width, rng.choice([0.15, 0.85]) * height
            objects.append((int(rng.integers(1, n_classes + 1)), corner_x, corner_y, SMALL_OBJECT_AREA))
        image, labels, _ = _draw_scene(rng, (width, height), objects)
        labels = _void_borders(labels)
        image.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=92)
        _save_png(voc / "SegmentationClassAug" / f"{image_id}.png", labels)
        _save_png(voc / "SegmentationClass" / f"{image_id}.png", labels, palette)
        splits[split].append(image_id)
        if split == "val":
            for fold in range(PASCAL_FOLDS):
                classes = [c for c in pascal_fold_classes(fold) if (labels == c).sum() >= 2 * 32 * 32]
                hsnet[fold] += [f"{image_id}__{c:02d}" for c in classes]
    sets = voc / "ImageSets" / "Segmentation"
    for name, ids in (
        ("train", splits["train"]),
        ("val", splits["val"]),
        ("trainval", splits["train"] + splits["val"]),
    ):
        _write_lines(sets / f"{name}.txt", ids)
    _write_lines(
        root / "lists" / "pascal" / "val.txt",
        [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in splits["val"]],
    )
    for fold, lines in hsnet.items():
        _write_lines(root / "splits" / "pascal" / "val" / f"fold{fold}.txt", lines)
    return voc


def make_synthetic_coco(root: str | os.PathLike = DEFAULT_COCO_ROOT, n_images: int = 60, seed: int = 0) -> Path:
    """Write a synthetic COCO-20i validation set at `root` in HSNet's layout and COCO 2014's; returns `root`.

    val2014/COCO_val2014_<id:012d>.jpg; annotations/val2014/<same stem>.png (mode L: COCO class index + 1, 0 other);
    annotations/instances_val2014.json (COCO's schema: polygon segmentations, COCO's 80 categories and ids);
    splits/coco/val/fold<k>.pkl ({class index: ["val2014/<file>.jpg", ...]} for all 80 classes, non-empty only
    for the fold's). Image j holds 3 objects of classes 3j, 3j + 1, 3j + 2 (mod 80) in separate thirds of the
    image, so every class is in at least 2 images once n_images >= 54."""
    if n_images < 54:
        raise ValueError(f"n_images must be at least 54 (every class in two images), got {n_images}")
    root = Path(root)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    n_classes = len(COCO_CLASSES)
    images, annotations = [], []
    classwise: dict[int, list[str]] = {c: [] for c in range(n_classes)}
    for number in range(n_images):
        rng = np.random.default_rng([seed, number, 11])
        image_id = 100 + number * 7
        stem = f"COCO_val2014_{image_id:012d}"
        width, height = int(rng.integers(300, 361)), int(rng.integers(150, 201))
        classes = [(3 * number + k) % n_classes for k in range(3)]
        objects = [
            (c + 1, width * (2 * k + 1) / 6 + rng.uniform(-5, 5), height / 2 + rng.uniform(-8, 8), OBJECT_AREA / 2)
            for k, c in enumerate(classes)
        ]
        image, labels, polygons = _draw_scene(rng, (width, height), objects)
        image.save(root / "val2014" / f"{stem}.jpg", quality=92)
        _save_png(root / "annotations" / "val2014" / f"{stem}.png", labels)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height})
        for value, polygon in polygons:
            (left, top), (right, bottom) = polygon.min(axis=0), polygon.max(axis=0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[value - 1],
                    "segmentation": [np.round(polygon, 2).ravel().tolist()],
                    "area": float(np.count_nonzero(labels == value)),
                    "bbox": [round(float(v), 2) for v in (left, top, right - left, bottom - top)],
                    "iscrowd": 0,
                }
            )
            classwise[value - 1].append(f"val2014/{stem}.jpg")
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    (root / "annotations" / "instances_val2014.json").write_text(
        json_text({"images": images, "annotations": annotations, "categories": categories})
    )
    for fold in range(COCO_FOLDS):
        table = {c: (sorted(classwise[c]) if c % COCO_FOLDS == fold else []) for c in range(n_classes)}
        path = root / "splits" / "coco" / "val" / f"fold{fold}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(table))
    return root


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    formats = parser.add_subparsers(dest="format", required=True)
    phrasecut = formats.add_parser("phrasecut", help="a synthetic PhraseCut in the official layout")
    phrasecut.add_argument(
        "--root",
        default=DEFAULT_SYNTHETIC_ROOT,
        help="output dir; data goes to ROOT/data/VGPhraseCut_v0 (default: %(default)s)",
    )
    phrasecut.add_argument(
        "--n-images",
        type=int,
        default=400,
        help="number of images, split ~70/15/10/5%% train/val/test/miniv (default: %(default)s)",
    )
    phrasecut.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed writes the same data (default: %(default)s)"
    )
    for name, maker, default_root, default_images in (
        ("voc", "Pascal VOC 2012 with PFENet's list and HSNet's folds", DEFAULT_VOC_ROOT, 40),
        ("coco", "COCO-20i val in HSNet's layout and COCO's instances JSON", DEFAULT_COCO_ROOT, 60),
    ):
        sub = formats.add_parser(name, help=f"a synthetic {maker}")
        sub.add_argument("--root", default=default_root, help="output dir (default: %(default)s)")
        sub.add_argument("--n-images", type=int, default=default_images, help="number of images (default: %(default)s)")
        sub.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.format == "voc":
        print(f"wrote {args.n_images} images to {make_synthetic_voc(args.root, args.n_images, args.seed)}")
        return
    if args.format == "coco":
        print(f"wrote {args.n_images} images to {make_synthetic_coco(args.root, args.n_images, args.seed)}")
        return
    data_dir = make_synthetic_phrasecut(args.root, args.n_images, args.seed, progress=True)
    counts = {split: len(json.loads((data_dir / f"refer_{split}.json").read_text())) for split in SPLITS}
    print(f"wrote {args.n_images} images to {data_dir}; tasks per split: {counts}")


if __name__ == "__main__":
    main()
