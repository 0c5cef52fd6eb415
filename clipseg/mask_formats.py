"""Masks in the formats editing and labelling tools read, beyond the mask and probability PNGs (`clipseg.drawing`'s
`mask_image`, 0/255, and `probability_png`, which also writes a feathered soft mask): an RGBA cut-out (the image with
the mask as alpha), and per-instance COCO annotations (`CocoDocument`: one JSON of images, categories = prompts, and
annotations whose segmentation is COCO's compressed RLE or polygons, with bbox, area and score) that pycocotools,
CVAT, Label Studio, FiftyOne and detectron2 import.

No dependency beyond numpy and PIL at run time: `coco_rle` writes COCO's compressed RLE string itself (the column-major
run lengths, each stored as the difference to the run two before in 5-bit groups, as pycocotools' maskApi.c
`rleToString` does; equal to `pycocotools.mask.encode` byte for byte), and `polygons` traces the mask's outline along
pixel edges. Coordinates are COCO's: x to the right, y down, pixel (row r, column c) covering [c, c + 1] x [r, r + 1];
a polygon's vertices are pixel corners. Polygons cannot hold holes: `polygons` gives the outer outline of each
8-connected component (holes filled); RLE is exact.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
from PIL import Image

from clipseg.outputs import write_json
from clipseg.postprocess import MaskResult

SEGMENTATIONS = ("rle", "polygons")
_STEPS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # (dx, dy) of the directions east, south, west, north


def cutout(image: Image.Image, alpha: np.ndarray) -> Image.Image:
    """The RGB image with `alpha` (H, W) as its transparency: bool (255 / 0) or values in [0, 1] (soft edges)."""
    rgb = np.asarray(image.convert("RGB"))
    if rgb.shape[:2] != np.shape(alpha):
        raise ValueError(f"an alpha of shape {np.shape(alpha)} for an image of {rgb.shape[0]}x{rgb.shape[1]}")
    return Image.fromarray(np.dstack([rgb, _alpha(alpha)]))  # (H, W, 4) uint8: RGBA


def _alpha(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == bool:
        return values.astype(np.uint8) * 255
    if values.ndim != 2 or not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"expected an (H, W) map of values in [0, 1], got shape {values.shape} or NaN")
    return np.round(values * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- COCO


def coco_rle(mask: np.ndarray, offset: tuple[int, int] = (0, 0), size: tuple[int, int] | None = None) -> dict:
    """(H, W) bool -> COCO compressed RLE {"size": [H, W], "counts": str}, as `pycocotools.mask.encode` of the
    Fortran-ordered uint8 mask gives it (with counts decoded to text, as COCO JSON files hold them). `mask` may be a
    crop of the image (an instance's box): `size` is then the image's (H, W) and `offset` the crop's (top, left);
    only the crop is scanned."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"expected a non-empty (H, W) mask, got shape {mask.shape}")
    height, width = size or mask.shape
    top, left = offset
    if not (0 <= top and top + mask.shape[0] <= height and 0 <= left and left + mask.shape[1] <= width):
        raise ValueError(f"a crop of shape {mask.shape} at {offset} does not fit an image of {(height, width)}")
    padded = np.pad(mask, ((1, 1), (0, 0)))  # background above and below each column: no run crosses a column
    flat = padded.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a run of mask pixels starts or ends
    column, row = np.divmod(changes, padded.shape[0])
    places = (column + left) * height + (row - 1 + top)  # Fortran-order positions in the whole image
    starts, ends = places[flat[changes]], places[~flat[changes]]
    joined = np.flatnonzero(starts[1:] == ends[:-1])  # a run down one column's end that the next column continues
    starts, ends = np.delete(starts, joined + 1), np.delete(ends, joined)
    bounds = np.concatenate([[0], np.stack([starts, ends], axis=1).ravel(), [height * width]])
    runs = np.diff(bounds)  # background, mask, background, ..., background
    runs = runs[:-1] if len(runs) > 1 and runs[-1] == 0 else runs
    return {"size": [int(height), int(width)], "counts": _rle_text(runs.tolist())}


def _rle_text(runs: list[int]) -> str:
    """maskApi.c's rleToString: each run minus the run two before (from the third on), 5 bits per character with a
    continuation bit, offset by 48."""
    characters = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5  # arithmetic shift: negative values end at -1
            more = value != -1 if chunk & 0x10 else value != 0
            characters.append(chr(chunk + (0x20 if more else 0) + 48))
    return "".join(characters)


def polygons(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[list[float]]:
    """The outlines of the (H, W) bool mask's 8-connected components, COCO style: one flat [x1, y1, x2, y2, ...]
    list per component, its vertices the pixel corners where the outline turns. Holes are not represented. `offset`
    (top, left): where the mask lies in the image when it is a crop."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : rows[-1] + 1, left : cols[-1] + 1]
    top, left = top + offset[0], left + offset[1]
    return [[float(v) for x, y in loop for v in (x + left, y + top)] for loop in _outlines(crop) if _area(loop) > 0]


def _outlines(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """All closed outlines of a bool mask along pixel edges, each as its turning vertices. Edges run with the mask
    on their right (clockwise on screen: outer outlines have positive shoelace area, holes negative); where two
    pixels touch only at a corner the walk turns left, which keeps them in one outline (8-connectivity)."""
    padded = np.pad(mask, 1)
    edges = []  # (x0, y0, direction) in the unpadded frame
    for direction, (dr, dc) in enumerate(((-1, 0), (0, 1), (1, 0), (0, -1))):  # background above, right, below, left
        r, c = np.nonzero(
            padded[1:-1, 1:-1] & ~padded[1 + dr : padded.shape[0] - 1 + dr, 1 + dc : padded.shape[1] - 1 + dc]
        )
        x0 = c + (direction in (1, 2))
        y0 = r + (direction in (2, 3))
        edges.extend(zip(x0.tolist(), y0.tolist(), [direction] * len(r)))
    leaving: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (x, y, _) in enumerate(edges):
        leaving[(x, y)].append(index)
    used = [False] * len(edges)
    loops = []
    for start in range(len(edges)):
        if used[start]:
            continue
        loop, index, previous = [], start, None
        while not used[index]:
            used[index] = True
            x, y, direction = edges[index]
            if direction != previous:
                loop.append((x, y))
            previous = direction
            dx, dy = _STEPS[direction]
            leaving_end = leaving[(x + dx, y + dy)]
            left_turn = (direction - 1) % 4
            index = (
                leaving_end[0] if len(leaving_end) == 1 else next(i for i in leaving_end if edges[i][2] == left_turn)
            )
        if edges[start][2] == previous:
            loop.pop(0)  # the start lies on a straight stretch: not a vertex
        loops.append(loop)
    return loops


def _area(loop: list[tuple[int, int]]) -> float:
    """Shoelace area, positive for outer outlines (clockwise on screen)."""
    xs, ys = np.array(loop, dtype=np.float64).T
    return float(np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys) / 2)


def mask_bbox(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of the (H, W) bool mask's pixels (COCO's bbox); [0, 0, 0, 0] when empty."""
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


class CocoDocument:
    """A COCO-style annotation file built image by image: `add_image`, then `add_mask` or `add_result` per prompt,
    then `to_dict` or `write`. Categories are the prompts (their canonical text), numbered from 1 in order of first
    use; annotations are numbered from 1; area is the mask's pixel count; iscrowd is 0."""

    def __init__(self, description: str = "clipseg masks") -> None:
        self.info = {"description": description}
        self.images: list[dict] = []
        self.categories: dict[str, int] = {}
        self.annotations: list[dict] = []

    def add_image(self, file_name: str, width: int, height: int) -> int:
        """Register an image; returns its id."""
        self.images.append({"id": len(self.images) + 1, "file_name": str(file_name), "width": width, "height": height})
        return len(self.images)

    def add_mask(
        self,
        image_id: int,
        category: str,
        mask: np.ndarray,
        score: float | None = None,
        segmentation: str = "rle",
        offset: tuple[int, int] | None = None,
    ) -> int | None:
        """One annotation of the (H, W) bool mask on image `image_id` (its size), segmented as "rle" or "polygons";
        returns its id, or None for an empty mask (nothing to annotate). With `offset` (top, left) the mask is a crop
        of the image placed there (an instance's box), and only the crop is read."""
        if segmentation not in SEGMENTATIONS:
            raise ValueError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}, got {segmentation!r}")
        image = self.images[image_id - 1]
        mask = np.asarray(mask, dtype=bool)
        size = (image["height"], image["width"])
        top, left = offset or (0, 0)
        if not (0 <= top and top + mask.shape[0] <= size[0] and 0 <= left and left + mask.shape[1] <= size[1]) or (
            offset is None and mask.shape != size
        ):
            raise ValueError(f"a mask of shape {mask.shape} at {(top, left)} for image {image['file_name']!r}")
        if not mask.any():
            return None
        x, y, box_width, box_height = mask_bbox(mask)
        category_id = self.categories.setdefault(category, len(self.categories) + 1)
        annotation = {
            "id": len(self.annotations) + 1,
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": coco_rle(mask, (top, left), size) if segmentation == "rle" else polygons(mask, (top, left)),
            "area": int(mask.sum()),
            "bbox": [x + left, y + top, box_width, box_height],
            "iscrowd": 0,
        }
        if score is not None:
            annotation["score"] = round(float(score), 6)
        self.annotations.append(annotation)
        return annotation["id"]

    def add_result(self, image_id: int, category: str, result: MaskResult, segmentation: str = "rle") -> list[int]:
        """The annotations of a `clipseg.postprocess.MaskResult`: one per instance (scored by its mean
        probability) when instances were found, else one of the whole mask (no score). Returns their ids. Each
        instance is read from its box only: a mask of a few thousand instances needs no full-size map per instance."""
        if result.labels is None:
            found = self.add_mask(image_id, category, result.mask, None, segmentation)
            return [] if found is None else [found]
        ids = []
        for instance in result.instances:
            left, top, right, bottom = instance.box
            crop = result.labels[top:bottom, left:right] == instance.label
            ids.append(self.add_mask(image_id, category, crop, instance.score, segmentation, (top, left)))
        return [i for i in ids if i is not None]

    def records(self) -> list[dict]:
        """The annotations, each naming its category instead of the ids (to move them into another document with
        `add_record`: predict.py's ranks annotate their images, rank 0 gathers them into one document)."""
        names = {i: name for name, i in self.categories.items()}
        hidden = ("id", "image_id", "category_id")
        return [
            {"category": names[a["category_id"]], **{k: v for k, v in a.items() if k not in hidden}}
            for a in self.annotations
        ]

    def add_record(self, image_id: int, record: dict) -> int:
        """Add one of `records()` to image `image_id`, its category by name (numbered here); returns its id."""
        fields = {key: value for key, value in record.items() if key != "category"}
        category_id = self.categories.setdefault(str(record["category"]), len(self.categories) + 1)
        annotation = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category_id, **fields}
        self.annotations.append(annotation)
        return annotation["id"]

    def to_dict(self) -> dict:
        return {
            "info": self.info,
            "images": self.images,
            "categories": [{"id": i, "name": name, "supercategory": ""} for name, i in self.categories.items()],
            "annotations": self.annotations,
        }

    def write(self, path: str | os.PathLike) -> None:
        """Written atomically as strict JSON (`clipseg.outputs.write_json`)."""
        write_json(path, self.to_dict(), indent=None)
