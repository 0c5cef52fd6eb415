"""From a probability map to the mask a user keeps, at the source resolution (numpy and scipy only): the threshold
(`resolve_threshold` says which one and where it came from), grow / shrink, fill holes, minimum area, instances and
feathered edges. One `MaskOptions` holds every choice; `make_mask(probs, options)` applies them in this order:

1. threshold: a pixel is in the mask iff its probability > `threshold` (strictly, as the paper's metrics count), or
   a given start mask (SAM's refinement) instead;
2. shrink by `shrink` pixels, then grow by `grow` pixels (both by N: an opening, which removes specks and bridges
   thinner than 2N + 1 pixels and keeps the rest, its sharp corners rounded; grow > shrink also widens it);
3. fill holes: background regions that do not reach the image border join the mask;
4. minimum area: connected components of fewer than `min_area` pixels are dropped;
5. instances: the connected components ordered by `sort_by` ("area", largest first, or "score", the highest mean
   probability first), the best `max_instances` kept (the mask becomes their union) and labelled 1..K;
6. feather: a soft copy of the final mask whose edge ramps from 1 to 0 over `feather` pixels (`feather_mask`).

Conventions: grow and shrink use a disk of radius N (the pixels at Euclidean distance <= N; computed with distance
transforms, so large radii cost no more than small ones; equal to `scipy.ndimage.binary_dilation` / `binary_erosion`
with `disk(N)`). Connected components are 8-connected (diagonal neighbours join; `CONNECTIVITY`), and holes are
4-connected background (the pairing under which every boundary separates exactly one inside from one outside). The
image border is not an edge: shrinking and feathering do not eat into a mask from the side where it leaves the
picture (a sofa cut by the frame still reaches the frame).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

PAPER_THRESHOLD = 0.3  # the CLIPSeg paper's fixed threshold, for models that record no calibrated one
PAPER_LOGIT = math.log(PAPER_THRESHOLD / (1 - PAPER_THRESHOLD))  # a logit above it: a probability above the threshold
SORT_KEYS = ("area", "score")
MAX_RADIUS = 100_000  # pixels: growing, shrinking or feathering by more covers any image read (1-px strips aside)
MAX_AREA = 1 << 40  # pixels: more than any image read has
CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connected components


@dataclass(frozen=True)
class MaskOptions:
    """The post-processing choices (module docstring for their order). threshold: in [0, 1), default the paper's
    0.3; grow, shrink, min_area: pixels (0 = off); feather: the width of the soft edge in pixels (0 = a hard edge);
    fill_holes: bool; instances: report the connected components (label map and records); sort_by: "area" or
    "score"; max_instances: keep only the best K components in the mask (None = all)."""

    threshold: float = PAPER_THRESHOLD
    grow: int = 0
    shrink: int = 0
    feather: float = 0.0
    fill_holes: bool = False
    min_area: int = 0
    instances: bool = False
    sort_by: str = "area"
    max_instances: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, int | float) and 0 <= self.threshold < 1):
            raise ValueError(f"threshold must be a number in [0, 1), got {self.threshold!r}")
        for name, limit in (("grow", MAX_RADIUS), ("shrink", MAX_RADIUS), ("min_area", MAX_AREA)):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= limit:
                raise ValueError(f"{name} must be a whole number of pixels from 0 to {limit}, got {value!r}")
        if not (isinstance(self.feather, int | float) and 0 <= self.feather <= MAX_RADIUS):
            raise ValueError(f"feather must be a width in pixels from 0 to {MAX_RADIUS}, got {self.feather!r}")
        if self.sort_by not in SORT_KEYS:
            raise ValueError(f"sort_by must be one of {', '.join(SORT_KEYS)}, got {self.sort_by!r}")
        if self.max_instances is not None and (type(self.max_instances) is not int or self.max_instances < 1):
            raise ValueError(f"max_instances must be a whole number >= 1 or None, got {self.max_instances!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Instance:
    """One connected component of the final mask. label: its value in `MaskResult.labels` (1 = first in the
    order); area: pixels; score / max_score: the mean / maximum probability over its pixels; box: (left, top,
    right, bottom) with right and bottom exclusive (PIL's crop box); peak: (x, y) of its highest probability."""

    label: int
    area: int
    score: float
    max_score: float
    box: tuple[int, int, int, int]
    peak: tuple[int, int]

    @property
    def coco_bbox(self) -> list[int]:
        """[x, y, width, height], as COCO annotations give a box."""
        left, top, right, bottom = self.box
        return [left, top, right - left, bottom - top]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "area": self.area,
            "score": round(self.score, 6),
            "max_score": round(self.max_score, 6),
            "bbox": self.coco_bbox,
            "peak": list(self.peak),
        }


@dataclass
class MaskResult:
    """`make_mask`'s output, all (H, W) at the probabilities' size. mask: bool; soft: float32 in [0, 1] (the mask
    feathered; 0/1 without feather); labels: int32 instance labels (0 = background), None unless instances or
    max_instances were asked for; instances: their records in order; threshold: the one applied."""

    mask: np.ndarray
    soft: np.ndarray
    threshold: float
    labels: np.ndarray | None = None
    instances: list[Instance] = field(default_factory=list)

    def instance_masks(self) -> list[np.ndarray]:
        """One (H, W) bool mask per instance, in order."""
        return [] if self.labels is None else [self.labels == instance.label for instance in self.instances]

    def summary(self) -> dict:
        """The strict-JSON record of the mask: threshold, area fraction, instances (when reported)."""
        entry = {"threshold": self.threshold, "area_fraction": round(float(self.mask.mean()), 6)}
        if self.labels is not None:
            entry["instances"] = [instance.to_dict() for instance in self.instances]
        return entry


def resolve_threshold(given: float | None, calibrated: float | None) -> tuple[float, str]:
    """The threshold to use and where it came from: the user's ("given"), else the model's calibrated one
    ("calibrated", recorded by training), else the paper's 0.3 ("paper")."""
    if given is not None:
        return float(given), "given"
    if calibrated is not None:
        return float(calibrated), "calibrated"
    return PAPER_THRESHOLD, "paper"


def describe_threshold(value: float, source: str, origin: str | None = None) -> str:
    """What predict.py and the app say about the threshold they use: its value and where it came from (`source`
    from `resolve_threshold`; `origin`: how a calibrated one was found, the model config's `threshold_origin`)."""
    if source == "given":
        return f"threshold {value:g} (given)"
    if source == "calibrated":
        return f"threshold {value:g} (calibrated, from the model's config: {origin or 'no note'})"
    return f"threshold {value:g} (the CLIPSeg paper's; the model records no calibrated threshold)"


def make_mask(probs: np.ndarray, options: MaskOptions = MaskOptions(), start: np.ndarray | None = None) -> MaskResult:
    """(H, W) probabilities in [0, 1] -> `MaskResult`, the steps of the module docstring in its order. `start`: an
    (H, W) bool mask that replaces step 1 (e.g. SAM's refinement, `clipseg.refine.SamRefinement.union`); the
    probabilities still score the instances."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or not np.all((probs >= 0) & (probs <= 1)):
        raise ValueError(f"expected an (H, W) map of probabilities in [0, 1], got shape {probs.shape} or NaN")
    if start is not None and np.shape(start) != probs.shape:
        raise ValueError(f"a start mask of shape {np.shape(start)} for probabilities of shape {probs.shape}")
    mask = probs > options.threshold if start is None else np.asarray(start, dtype=bool)
    mask = grow(shrink(mask, options.shrink), options.grow)
    if options.fill_holes:
        mask = fill_holes(mask)
    mask = remove_small(mask, options.min_area)
    labels, instances = None, []
    if options.instances or options.max_instances is not None:
        labels, instances = find_instances(mask, probs, options.sort_by, options.max_instances)
        mask = labels > 0
    return MaskResult(mask, feather_mask(mask, options.feather), options.threshold, labels, instances)


def disk(radius: int) -> np.ndarray:
    """(2r + 1, 2r + 1) bool structuring element: the pixels whose centres lie within `radius` of the centre."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation of the (H, W) bool mask by `disk(radius)`: the pixels within `radius` of a mask pixel."""
    mask = np.asarray(mask, dtype=bool)
    if radius == 0 or not mask.any():
        return mask.copy()
    return _outside_distance(mask, radius) <= radius


def shrink(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erosion of the (H, W) bool mask by `disk(radius)`, the image border not an edge: the mask pixels farther
    than `radius` from every background pixel (`binary_erosion(mask, disk(radius), border_value=1)`)."""
    mask = np.asarray(mask, dtype=bool)
    if radius == 0 or mask.all() or not mask.any():
        return mask.copy()
    return _inside_distance(mask) > radius


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The (H, W) bool mask with its holes (4-connected background regions that do not touch the border) filled."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The (H, W) bool mask without its 8-connected components of fewer than `min_area` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 1:
        return mask.copy()
    labels, count = ndimage.label(mask, structure=CONNECTIVITY)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]


def find_instances(
    mask: np.ndarray, probs: np.ndarray, sort_by: str = "area", max_instances: int | None = None
) -> tuple[np.ndarray, list[Instance]]:
    """The 8-connected components of the (H, W) bool mask as instances, scored by the (H, W) probabilities:
    ordered by area (ties: higher score first) or by score (ties: larger area first), then by position, the best
    `max_instances` kept. Returns the (H, W) int32 label map (0 = background, k = the k-th instance) and the
    records."""
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by must be one of {', '.join(SORT_KEYS)}, got {sort_by!r}")
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY)
    flat, values = labels.ravel(), np.asarray(probs, dtype=np.float32).ravel()
    areas = np.bincount(flat, minlength=count + 1)
    scores = np.bincount(flat, weights=values.astype(np.float64), minlength=count + 1) / np.maximum(areas, 1)
    maxima = np.full(count + 1, -1.0, dtype=np.float32)
    np.maximum.at(maxima, flat, values)
    at_maximum = np.flatnonzero((values == maxima[flat]) & (flat > 0))
    _, first = np.unique(flat[at_maximum], return_index=True)  # the first maximum of labels 1..count, row-major
    peak_rows, peak_cols = np.divmod(at_maximum[first], labels.shape[1])
    keys = (-areas[1:], -scores[1:]) if sort_by == "area" else (-scores[1:], -areas[1:])
    order = np.lexsort((np.arange(count), keys[1], keys[0]))[:max_instances]  # the last key is the primary one
    boxes = ndimage.find_objects(labels)
    relabel = np.zeros(count + 1, dtype=np.int32)
    instances = []
    for rank, component in enumerate(order, start=1):
        relabel[component + 1] = rank
        rows, cols = boxes[component]
        instances.append(
            Instance(
                label=rank,
                area=int(areas[component + 1]),
                score=float(scores[component + 1]),
                max_score=float(maxima[component + 1]),
                box=(cols.start, rows.start, cols.stop, rows.stop),
                peak=(int(peak_cols[component]), int(peak_rows[component])),
            )
        )
    return relabel[labels], instances


def feather_mask(mask: np.ndarray, width: float) -> np.ndarray:
    """A soft (H, W) float32 copy of the bool mask whose edge ramps linearly over `width` pixels, centred on the
    edge: a pixel whose centre is d pixels inside the edge gets clip(0.5 + d / width, 0, 1), one d pixels outside
    clip(0.5 - d / width, 0, 1), so it is 1 deeper than width / 2 inside, 0 farther than width / 2 outside, and
    > 0.5 exactly on the mask. d is the distance to the nearest pixel on the other side minus half a pixel (exact
    for straight edges). width 0: the mask as 0.0 / 1.0. To keep the whole object at 1, grow by width / 2 first."""
    mask = np.asarray(mask, dtype=bool)
    if width == 0 or mask.all() or not mask.any():
        return mask.astype(np.float32)
    inside = _inside_distance(mask) - 0.5
    outside = _outside_distance(mask, math.ceil(width / 2) + 1) - 0.5
    signed = np.where(mask, inside, -outside)
    return np.clip(0.5 + signed / np.float32(width), 0.0, 1.0).astype(np.float32)


def _outside_distance(mask: np.ndarray, reach: int) -> np.ndarray:
    """(H, W) float32: each pixel's distance to the nearest pixel of the (non-empty) mask, exact up to `reach`
    (farther ones are infinite). The distance transform runs on the mask's bounding box grown by `reach` only."""
    box = _around(mask, reach)
    distances = np.full(mask.shape, np.inf, dtype=np.float32)
    distances[box] = ndimage.distance_transform_edt(~mask[box])
    return distances


def _inside_distance(mask: np.ndarray) -> np.ndarray:
    """(H, W) float32: each mask pixel's distance to the nearest background pixel, the image border not an edge;
    0 on the background. The transform runs on the bounding box grown by one pixel (background all round, except
    where the image ends), which holds a nearest background pixel of every mask pixel."""
    box = _around(mask, 1)
    distances = np.zeros(mask.shape, dtype=np.float32)
    distances[box] = ndimage.distance_transform_edt(mask[box])
    return distances


def _around(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The bounding box of the (non-empty) mask's pixels grown by `margin` on every side, within the image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(int(rows[0]) - margin, 0), int(rows[-1]) + margin + 1),
        slice(max(int(cols[0]) - margin, 0), int(cols[-1]) + margin + 1),
    )
