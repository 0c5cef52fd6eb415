"""Segmentation metrics: the CLIPSeg paper's (Table 3) and PhraseCut's official ones, streaming with bounded memory.

| metric | definition |
|---|---|
| mIoU (paper) | mean over samples of tp / (1 + tp + fp + fn), at t = 0.3 and at the best of the 49 thresholds |
| IoU_FG (paper) | pooled over the data set: sum tp / (1 + sum tp + sum fp + sum fn) |
| AP (paper) | Simpson's rule over the pooled precision tp / (1 + tp + fp) against recall tp / (1 + tp + fn) |
| IoU_BIN (paper) | (IoU_FG + IoU_BG) / 2, IoU_BG = sum tn / (1 + sum tn + sum fp + sum fn) |
| mean IoU (PhraseCut) | mean over tasks of I / U at the original resolution; I = 0 gives 0 |
| cum IoU (PhraseCut) | sum I / sum U over tasks |
| acc@x (PhraseCut) | fraction of tasks with IoU > x, x in 0.5, 0.6, 0.7, 0.8, 0.9 |
| mIoU (one-shot) | mean over classes of tp_c / (1 + tp_c + fp_c + fn_c), counts summed over the class's episodes |
| mIoU, FB-IoU (HSNet) | class mean of sum I / max(sum U, 1); mean of pooled foreground and background sum I / sum U |
| mIoU seen/unseen (zero-shot) | IoU_c = diag / (row + column - diag) of the pixel confusion matrix, mean per group |

A pixel is positive iff its probability p > t. `PaperMetrics` keeps 49-long sums (never pixels or per-sample
arrays), `PhraseCutMetrics` keeps a few sums per subset, `EpisodeMetrics` 49-long sums per class and
`ZeroShotMetrics` one confusion matrix: all use the same memory after 10 or 10 million samples.
All values are fractions in [0, 1] (the paper prints percent).

Every class can hand over its sums: `state()` returns them as named int64 / float64 arrays, `load_state()` takes
them back, and states add: `sum_states` of the states of disjoint sets of samples is the state of their union (how
clipseg/distributed.py merges the ranks of a torchrun job). Counts add exactly; the float sums (of per-sample IoUs)
are exact up to rounding, which depends on the order they are added in.

    paper, official = PaperMetrics(), PhraseCutMetrics()
    paper.update(torch.sigmoid(logits), masks)            # (B, 1, 352, 352) probabilities and {0, 1} targets
    official.update(full_size_probs > 0.3, full_size_gt, phrase_type="name", n_instances=2)
    paper.compute()["miou"], official.compute()["mean_iou"]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.integrate import simpson

Maps = np.ndarray | torch.Tensor  # probabilities or binary masks, as numpy arrays or torch tensors
Thresholds = Sequence[float] | np.ndarray
# 0.02, 0.04, ..., 0.98: the original's linspace(0, 1, 51)[1:-1], rounded to the doubles nearest the decimals.
PAPER_THRESHOLDS: np.ndarray = np.round(np.arange(1, 50) * 0.02, 2)
PAPER_REPORT_THRESHOLD = 0.3  # the paper's Table 3 threshold
ACCURACY_IOUS = (0.5, 0.6, 0.7, 0.8, 0.9)  # PhraseCut's acc@x: IoU strictly greater than x
SMALL_FRACTION, LARGE_FRACTION = 0.02, 0.2  # PhraseCut size subsets: gt area / image area < 2 %, > 20 %
MANY_INSTANCES = 5  # PhraseCut's "many instances" subset: >= 5
PHRASE_TYPES = ("name", "attribute", "relation", "verbose")  # PhraseCut's phrase_structure["type"] values


# ---------------------------------------------------------------------------------------------------- inputs


def _as_tensor(values, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach()
    array = np.asarray(values)
    if array.dtype == object or not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise TypeError(f"{name} must be a numeric or bool array or tensor, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_probabilities(probs: torch.Tensor, name: str = "probs") -> None:
    if not probs.is_floating_point():
        raise TypeError(f"{name} must hold probabilities in [0, 1] (floating point), got {probs.dtype}")
    if probs.numel() == 0:
        return
    low, high = probs.min().item(), probs.max().item()
    if not (low >= 0 and high <= 1):  # written this way so that NaN fails too
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values in [{low}, {high}]: "
            "apply torch.sigmoid to the model's logits first"
        )


def _as_binary(values, name: str) -> torch.Tensor:
    """A bool tensor from bool or {0, 1} input; anything else (0/255 images, probabilities) is an error."""
    tensor = _as_tensor(values, name)
    if tensor.dtype == torch.bool:
        return tensor
    if tensor.numel() and not ((tensor == 0) | (tensor == 1)).all():
        low, high = tensor.min().item(), tensor.max().item()
        raise ValueError(
            f"{name} must be a binary mask (bool or 0/1 values), got values in [{low}, {high}]: "
            "threshold probabilities (probs > 0.3) or 0/255 images (png > 127) first"
        )
    return tensor != 0


def _drop_channel(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) -> (B, H, W)."""
    if tensor.dim() == 4 and tensor.shape[1] == 1:
        return tensor[:, 0]
    if tensor.dim() == 3:
        return tensor
    raise ValueError(
        f"{name} must be a batch (B, H, W) or (B, 1, H, W), got shape {tuple(tensor.shape)}; "
        "add the batch dimension for a single sample (x[None])"
    )


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def sum_states(states: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The elementwise sum of metric states (`state()` of any class below), added in the order given; a key that
    a state lacks (a subset or class it never saw) counts as zero there. The sum of no states is {}, which
    `load_state` reads as no samples."""
    total: dict[str, np.ndarray] = {}
    for state in states:
        for key, value in state.items():
            total[key] = total[key] + value if key in total else np.array(value)
    return total


def _state_array(state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """state[key] as a fresh `dtype` array of `shape` (zeros when missing); another shape is an error."""
    if key not in state:
        return np.zeros(shape, dtype=dtype)
    value = np.array(state[key], dtype=dtype)
    if value.shape != shape:
        raise ValueError(f"metric state {key!r} has shape {value.shape}, expected {shape}")
    return value


# ---------------------------------------------------------------------------------------------------- counting


def confusion_counts(
    probs: Maps, targets: Maps, thresholds: Thresholds = PAPER_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample confusion counts at every threshold, in one pass over the pixels.

    probs: (B, H, W) or (B, 1, H, W) probabilities in [0, 1] (torch or numpy, any device);
    targets: same shape (the channel dimension may differ), bool or {0, 1}.
    Returns tp, fp, fn, tn, each (B, T) int64, where a pixel is positive at threshold t iff p > t (compared in
    float64). Each pixel is bucketed once by how many thresholds lie strictly below it, and the counts at each
    threshold are cumulative sums of the bucket histogram (instead of T comparisons over the image).
    """
    probs = _drop_channel(_as_tensor(probs, "probs"), "probs")
    targets = _drop_channel(_as_binary(targets, "targets"), "targets")
    _check_same_shape(probs, targets, "probs and targets")
    _check_probabilities(probs)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or thresholds.size == 0 or not np.isfinite(thresholds).all():
        raise ValueError(f"thresholds must be a non-empty 1-D sequence of finite numbers, got {thresholds!r}")
    order = np.argsort(thresholds, kind="stable")
    histogram = _threshold_histogram(probs, targets, thresholds[order])
    # positives at sorted threshold j = pixels with more than j thresholds below them
    positives = np.flip(np.cumsum(np.flip(histogram, -1), -1), -1)[..., 1:]
    fp_sorted, tp_sorted = positives[:, 0], positives[:, 1]
    negatives_total, positives_total = histogram.sum(-1).T[:, :, None]
    tp, fp = np.empty_like(tp_sorted), np.empty_like(fp_sorted)
    tp[:, order], fp[:, order] = tp_sorted, fp_sorted
    return tp, fp, positives_total - tp, negatives_total - fp


def _threshold_histogram(probs: torch.Tensor, targets: torch.Tensor, sorted_thresholds: np.ndarray) -> np.ndarray:
    """(B, 2, T + 1) int64: pixels per sample, per target class (0 background, 1 foreground) and per number of
    thresholds strictly below the probability; probs, targets (B, H, W)."""
    batch, bins = probs.shape[0], len(sorted_thresholds) + 1
    flat_probs = probs.reshape(batch, -1).to(torch.float64)
    below = torch.bucketize(flat_probs, torch.as_tensor(sorted_thresholds, device=flat_probs.device))
    sample_offset = torch.arange(batch, device=below.device)[:, None] * (2 * bins)
    index = below + bins * targets.reshape(batch, -1).to(below.device, torch.int64) + sample_offset
    return torch.bincount(index.reshape(-1), minlength=2 * bins * batch).reshape(batch, 2, bins).cpu().numpy()


def binary_iou(pred: Maps, gt: Maps, both_empty: float = 0.0) -> float:
    """Intersection over union of two same-shape binary masks (bool or {0, 1}, numpy or torch). An empty
    intersection gives 0, as in PhraseCut's evaluation; two empty masks give `both_empty` (PhraseCut's: 0)."""
    intersection, union = _intersection_union(pred, gt)
    return intersection / union if intersection else (0.0 if union else both_empty)


def _intersection_union(pred, gt) -> tuple[int, int]:
    pred, gt = _as_binary(pred, "pred"), _as_binary(gt, "gt")
    _check_same_shape(pred, gt, "pred and gt")
    gt = gt.to(pred.device)
    return int((pred & gt).sum()), int((pred | gt).sum())


def ious_at_thresholds(probs: Maps, gt: Maps, thresholds: Thresholds = PAPER_THRESHOLDS) -> np.ndarray:
    """IoU of one sample at each threshold: (T,) float64, entry j equal to `binary_iou(probs > t_j, gt)`.

    probs: (H, W) probabilities in [0, 1] (any shape, all pixels belong to the one sample); gt: same shape,
    bool or {0, 1}. Plain I / U (no +1 smoothing), empty intersection gives 0."""
    probs, gt = _as_tensor(probs, "probs"), _as_binary(gt, "gt")
    _check_same_shape(probs, gt, "probs and gt")
    tp, fp, fn, _ = confusion_counts(probs.reshape(1, 1, -1), gt.reshape(1, 1, -1), thresholds)
    union = tp[0] + fp[0] + fn[0]
    return np.where(tp[0] > 0, tp[0] / np.maximum(union, 1), 0.0)


# ---------------------------------------------------------------------------------------------------- paper


def average_precision(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """The paper's AP from pooled counts at each threshold, tp, fp, fn: (T,).

    Precision tp / (1 + tp + fp) and recall tp / (1 + tp + fn) at the thresholds where something is predicted
    (tp + fp > 0); duplicate (recall, precision) pairs removed; sorted by recall (pairs with equal recall by
    precision, which the original left to set order); integrated with `scipy.integrate.simpson(precision,
    x=recall)`. Fewer than two distinct pairs (e.g. a hard 0/1 prediction, nothing predicted) give 0.
    Simpson's rule is the paper's choice: it is not guaranteed monotone, and equal recalls make zero-width
    intervals whose handling is scipy's (recent scipy uses Cartwright's correction for an even point count)."""
    tp, fp, fn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn))
    predicted = tp + fp > 0
    precision = tp[predicted] / (1 + tp[predicted] + fp[predicted])
    recall = tp[predicted] / (1 + tp[predicted] + fn[predicted])
    pairs = np.unique(np.stack([recall, precision], axis=1), axis=0)  # sorted by recall, then precision
    if len(pairs) < 2:
        return 0.0
    return float(simpson(pairs[:, 1], x=pairs[:, 0]))


class PaperMetrics:
    """The paper's metrics (the original `FixedIntervalMetrics`), streaming: update per batch, compute at the end.

    Computed in the paper on 352 x 352 predictions against nearest-resized ground truth (the caller resizes).
    State: pooled tp, fp, fn, tn and the sum of per-sample IoUs at each of the 49 thresholds, plus a sample
    count; memory does not depend on the number of samples.

    Decisions where the paper is silent (as in the original code): mIoU treats every sample as its own class
    (PhraseCut), so a sample with empty ground truth and empty prediction scores 0 and a perfect mask scores
    P / (1 + P) for P foreground pixels; IoU_BIN is the mean of the pooled foreground and pooled background IoU
    (both +1 smoothed); the best threshold is the lowest one reaching the maximum.
    """

    def __init__(self, report_threshold: float = PAPER_REPORT_THRESHOLD):
        matches = np.flatnonzero(np.isclose(PAPER_THRESHOLDS, report_threshold))
        if len(matches) != 1:
            raise ValueError(f"report_threshold must be one of 0.02, 0.04, ..., 0.98, got {report_threshold}")
        self.report_index = int(matches[0])
        self.thresholds = PAPER_THRESHOLDS
        n_thresholds = len(PAPER_THRESHOLDS)
        self.tp = np.zeros(n_thresholds, dtype=np.int64)
        self.fp = np.zeros(n_thresholds, dtype=np.int64)
        self.fn = np.zeros(n_thresholds, dtype=np.int64)
        self.tn = np.zeros(n_thresholds, dtype=np.int64)
        self.sample_iou_sum = np.zeros(n_thresholds, dtype=np.float64)
        self.n_samples = 0

    def update(self, probs: Maps, targets: Maps) -> None:
        """Add a batch. probs: (B, H, W) or (B, 1, H, W) probabilities in [0, 1], torch or numpy;
        targets: same (channel dimension optional), bool / {0, 1} of any dtype."""
        tp, fp, fn, tn = confusion_counts(probs, targets, self.thresholds)
        self.tp += tp.sum(0)
        self.fp += fp.sum(0)
        self.fn += fn.sum(0)
        self.tn += tn.sum(0)
        self.sample_iou_sum += (tp / (1 + tp + fp + fn)).sum(0)
        self.n_samples += tp.shape[0]

    def curves(self) -> dict[str, np.ndarray]:
        """Every metric at every threshold, (49,) each: thresholds, miou, iou_fg, iou_bg, iou_bin, precision,
        recall (pooled, +1 smoothed)."""
        if not self.n_samples:
            raise ValueError("PaperMetrics has no samples: call update() before compute()")
        tp, fp, fn, tn = (c.astype(np.float64) for c in (self.tp, self.fp, self.fn, self.tn))
        iou_fg = tp / (1 + tp + fp + fn)
        iou_bg = tn / (1 + tn + fp + fn)
        return {
            "thresholds": self.thresholds.copy(),
            "miou": self.sample_iou_sum / self.n_samples,
            "iou_fg": iou_fg,
            "iou_bg": iou_bg,
            "iou_bin": (iou_fg + iou_bg) / 2,
            "precision": tp / (1 + tp + fp),
            "recall": tp / (1 + tp + fn),
        }

    def compute(self) -> dict[str, float]:
        """miou, iou_fg, iou_bin at the report threshold ("threshold", 0.3 by default); ap; each of the three at
        its best threshold ("miou_best", "miou_best_threshold", ...); n_samples. Fractions in [0, 1]."""
        curves = self.curves()
        results: dict[str, float] = {"threshold": float(self.thresholds[self.report_index])}
        for name in ("miou", "iou_fg", "iou_bin"):
            results[name] = float(curves[name][self.report_index])
        results["ap"] = average_precision(self.tp, self.fp, self.fn)
        for name in ("miou", "iou_fg", "iou_bin"):
            best = int(np.argmax(curves[name]))
            results[f"{name}_best"] = float(curves[name][best])
            results[f"{name}_best_threshold"] = float(self.thresholds[best])
        results["n_samples"] = self.n_samples
        return results

    def state(self) -> dict[str, np.ndarray]:
        """The sums every metric is computed from: tp, fp, fn, tn (49,) int64; sample_iou_sum (49,) float64;
        n_samples () int64. `sum_states` adds them, `load_state` takes them back."""
        counts = {name: getattr(self, name).copy() for name in ("tp", "fp", "fn", "tn")}
        return {**counts, "sample_iou_sum": self.sample_iou_sum.copy(), "n_samples": np.array(self.n_samples)}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the sums by `state` (a `state()`, or a `sum_states` of several); missing keys are zeros."""
        shape = self.tp.shape
        for name in ("tp", "fp", "fn", "tn"):
            setattr(self, name, _state_array(state, name, shape, np.int64))
        self.sample_iou_sum = _state_array(state, "sample_iou_sum", shape, np.float64)
        self.n_samples = int(_state_array(state, "n_samples", (), np.int64))


# ---------------------------------------------------------------------------------------------------- PhraseCut


@dataclass
class IoUTotals:
    """Running sums for one PhraseCut subset: task count, sum of IoUs, sum of I and U, tasks above each level."""

    n_tasks: int = 0
    iou_sum: float = 0.0
    intersection: int = 0
    union: int = 0
    above: list[int] = field(default_factory=lambda: [0] * len(ACCURACY_IOUS))

    def add(self, iou: float, intersection: int, union: int) -> None:
        self.n_tasks += 1
        self.iou_sum += iou
        self.intersection += intersection
        self.union += union
        for i, level in enumerate(ACCURACY_IOUS):
            self.above[i] += iou > level

    def summary(self) -> dict[str, float]:
        """mean_iou, cum_iou (0 if every union was empty), acc@0.5 ... acc@0.9, n_tasks."""
        results = {
            "mean_iou": self.iou_sum / self.n_tasks,
            "cum_iou": self.intersection / self.union if self.union else 0.0,
        }
        results.update({f"acc@{level}": count / self.n_tasks for level, count in zip(ACCURACY_IOUS, self.above)})
        results["n_tasks"] = self.n_tasks
        return results

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """The sums as arrays named `<prefix>n_tasks`, `iou_sum` (float64), `intersection`, `union`, `above` (5,)."""
        values = {
            "n_tasks": np.array(self.n_tasks),
            "iou_sum": np.array(self.iou_sum, dtype=np.float64),
            "intersection": np.array(self.intersection),
            "union": np.array(self.union),
            "above": np.array(self.above, dtype=np.int64),
        }
        return {prefix + name: value for name, value in values.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], prefix: str) -> IoUTotals:
        return cls(
            n_tasks=int(_state_array(state, prefix + "n_tasks", (), np.int64)),
            iou_sum=float(_state_array(state, prefix + "iou_sum", (), np.float64)),
            intersection=int(_state_array(state, prefix + "intersection", (), np.int64)),
            union=int(_state_array(state, prefix + "union", (), np.int64)),
            above=_state_array(state, prefix + "above", (len(ACCURACY_IOUS),), np.int64).tolist(),
        )


def phrasecut_subsets(gt_fraction: float, phrase_type: str | None = None, n_instances: int | None = None) -> list[str]:
    """The PhraseCut subsets a task belongs to (the official evaluation's, renamed).

    "type=<phrase_type>" (name, attribute, relation, verbose); by instance count, exclusive as in the official
    code (utils/subset.py): "instances=1" (i_single), "instances>1" (i_multi: 2 to 4 instances, despite the
    official docstring's "more than 1") and "instances>=5" (i_many); "size=small" (gt area < 2 % of the image),
    "size=large" (> 20 %), else "size=mid". Type and instance subsets only when that field is given."""
    subsets = []
    if phrase_type:
        subsets.append(f"type={phrase_type}")
    if n_instances is not None:
        if n_instances < 1:
            raise ValueError(
                f"n_instances must be >= 1 (a PhraseCut task has at least one instance), got {n_instances}"
            )
        if n_instances == 1:
            subsets.append("instances=1")
        elif n_instances < MANY_INSTANCES:
            subsets.append("instances>1")
        else:
            subsets.append(f"instances>={MANY_INSTANCES}")
    if gt_fraction < SMALL_FRACTION:
        subsets.append("size=small")
    elif gt_fraction > LARGE_FRACTION:
        subsets.append("size=large")
    else:
        subsets.append("size=mid")
    return subsets


KNOWN_SUBSETS = (
    *(f"type={t}" for t in PHRASE_TYPES),
    "instances=1",
    "instances>1",
    f"instances>={MANY_INSTANCES}",
    "size=small",
    "size=mid",
    "size=large",
)


def _subset_order(name: str) -> tuple[int, int, str]:
    """Type, instances, size; the known subsets in their natural order, other phrase types after them."""
    group = next(i for i, prefix in enumerate(("type=", "instances", "size=")) if name.startswith(prefix))
    rank = KNOWN_SUBSETS.index(name) if name in KNOWN_SUBSETS else len(KNOWN_SUBSETS)
    return group, rank, name


class PhraseCutMetrics:
    """PhraseCut's official evaluation at the original image resolution, streaming.

    Each task contributes I and U of its binary prediction against the union of its instance polygons. Memory:
    one `IoUTotals` per subset seen (at most a dozen for PhraseCut), independent of the number of tasks."""

    def __init__(self):
        self.totals = IoUTotals()
        self.subset_totals: dict[str, IoUTotals] = {}

    def update(self, pred: Maps, gt: Maps, phrase_type: str | None = None, n_instances: int | None = None) -> float:
        """Add one task. pred, gt: (H, W) binary masks (bool or {0, 1}, numpy or torch) at the original image
        size. phrase_type and n_instances select subsets (see `phrasecut_subsets`). Returns the task's IoU."""
        pred_tensor, gt_tensor = _as_binary(pred, "pred"), _as_binary(gt, "gt")
        _check_same_shape(pred_tensor, gt_tensor, "pred and gt")
        if pred_tensor.dim() != 2 or not pred_tensor.numel():
            raise ValueError(f"pred and gt must be one task's (H, W) masks, got shape {tuple(pred_tensor.shape)}")
        intersection, union = _intersection_union(pred_tensor, gt_tensor)
        iou = intersection / union if intersection else 0.0
        self.totals.add(iou, intersection, union)
        gt_fraction = int(gt_tensor.sum()) / gt_tensor.numel()
        for subset in phrasecut_subsets(gt_fraction, phrase_type, None if n_instances is None else int(n_instances)):
            self.subset_totals.setdefault(subset, IoUTotals()).add(iou, intersection, union)
        return iou

    def compute(self) -> dict:
        """mean_iou, cum_iou, acc@0.5 ... acc@0.9, n_tasks, and "subsets": {name: the same keys} for every subset
        with at least one task, ordered type, instances, size."""
        if not self.totals.n_tasks:
            raise ValueError("PhraseCutMetrics has no tasks: call update() before compute()")
        results: dict = self.totals.summary()
        results["subsets"] = {
            name: self.subset_totals[name].summary() for name in sorted(self.subset_totals, key=_subset_order)
        }
        return results

    def state(self) -> dict[str, np.ndarray]:
        """The sums of all tasks (`all/<sum>`) and of each subset seen (`subset/<name>/<sum>`), see
        `IoUTotals.state`."""
        state = self.totals.state("all/")
        for name, totals in self.subset_totals.items():
            state.update(totals.state(f"subset/{name}/"))
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the sums by `state` (a `state()`, or a `sum_states` of several)."""
        self.totals = IoUTotals.from_state(state, "all/")
        names = dict.fromkeys(key[len("subset/") :].rsplit("/", 1)[0] for key in state if key.startswith("subset/"))
        self.subset_totals = {name: IoUTotals.from_state(state, f"subset/{name}/") for name in names}


# ---------------------------------------------------------------------------------------------------- one-shot


class EpisodeMetrics:
    """One-shot metrics per class (Pascal-5i, COCO-20i; docs/original.md §11-12), streaming.

    Each episode adds its confusion counts at the 49 thresholds, over the pixels that are not ignored, to its
    class's sums; memory is (classes x 49) counts whatever the number of episodes.

    - mIoU (paper): mean over the classes seen of tp_c / (1 + tp_c + fp_c + fn_c), counts summed over the class's
      episodes; IoU_FG, IoU_BIN and AP from the counts pooled over all episodes, as `PaperMetrics`.
    - HSNet's mIoU: mean over the classes seen of sum I / max(sum U, 1) (no +1); FB-IoU: the mean of the pooled
      foreground and background sum I / sum U. Both at the report threshold (HSNet's argmax is p > 0.5).
    """

    def __init__(self, report_threshold: float = PAPER_REPORT_THRESHOLD):
        self.report_index = PaperMetrics(report_threshold).report_index
        self.thresholds = PAPER_THRESHOLDS
        self.counts: dict[int, np.ndarray] = {}  # class -> (4, 49) int64: tp, fp, fn, tn
        self.episodes: dict[int, int] = {}

    def update(self, probs: Maps, target: Maps, class_id: int, valid: Maps | None = None) -> np.ndarray:
        """Add one episode. probs: (H, W) probabilities; target: (H, W) bool / {0, 1}; valid: (H, W) bool, the
        pixels that count (None: all). Returns the episode's (4, 49) tp, fp, fn, tn."""
        probs, target = _as_tensor(probs, "probs"), _as_binary(target, "target")
        _check_same_shape(probs, target, "probs and target")
        if valid is not None:
            valid = _as_binary(valid, "valid")
            _check_same_shape(probs, valid, "probs and valid")
            probs, target = probs[valid.to(probs.device)], target[valid.to(target.device)]
        counts = np.stack(confusion_counts(probs.reshape(1, 1, -1), target.reshape(1, 1, -1), self.thresholds))[:, 0]
        class_id = int(class_id)
        self.counts[class_id] = self.counts.get(class_id, 0) + counts
        self.episodes[class_id] = self.episodes.get(class_id, 0) + 1
        return counts

    def compute(self) -> dict:
        """miou, iou_fg, iou_bin (report threshold), ap, each of the three at its best threshold (+ "_threshold"),
        hsnet_miou, fb_iou, n_episodes, and "per_class": {class id: {iou, iou_hsnet, n_episodes}} at the report
        threshold. Fractions in [0, 1]."""
        if not self.counts:
            raise ValueError("EpisodeMetrics has no episodes: call update() before compute()")
        classes = sorted(self.counts)
        by_class = np.stack([self.counts[c] for c in classes]).astype(np.float64)  # (C, 4, 49)
        tp, fp, fn = by_class[:, 0], by_class[:, 1], by_class[:, 2]
        class_iou = tp / (1 + tp + fp + fn)
        hsnet_iou = tp / np.maximum(tp + fp + fn, 1)
        pooled = by_class.sum(axis=0)
        iou_fg = pooled[0] / (1 + pooled[0] + pooled[1] + pooled[2])
        iou_bg = pooled[3] / (1 + pooled[3] + pooled[1] + pooled[2])
        curves = {"miou": class_iou.mean(axis=0), "iou_fg": iou_fg, "iou_bin": (iou_fg + iou_bg) / 2}
        at = self.report_index
        results: dict = {"threshold": float(self.thresholds[at])}
        results.update({name: float(curve[at]) for name, curve in curves.items()})
        results["ap"] = average_precision(pooled[0], pooled[1], pooled[2])
        for name, curve in curves.items():
            best = int(np.argmax(curve))
            results[f"{name}_best"], results[f"{name}_best_threshold"] = (
                float(curve[best]),
                float(self.thresholds[best]),
            )
        union_fg, union_bg = pooled[0] + pooled[1] + pooled[2], pooled[3] + pooled[1] + pooled[2]
        fg = pooled[0][at] / union_fg[at] if union_fg[at] else 0.0
        bg = pooled[3][at] / union_bg[at] if union_bg[at] else 0.0
        results["hsnet_miou"], results["fb_iou"] = float(hsnet_iou[:, at].mean()), float((fg + bg) / 2)
        results["n_episodes"] = int(sum(self.episodes.values()))
        results["per_class"] = {
            c: {"iou": float(class_iou[i, at]), "iou_hsnet": float(hsnet_iou[i, at]), "n_episodes": self.episodes[c]}
            for i, c in enumerate(classes)
        }
        return results

    def state(self) -> dict[str, np.ndarray]:
        """Per class seen: `class/<id>/counts` (4, 49) int64 (tp, fp, fn, tn) and `class/<id>/episodes` () int64."""
        state = {}
        for class_id, counts in self.counts.items():
            state[f"class/{class_id}/counts"] = np.array(counts, dtype=np.int64)
            state[f"class/{class_id}/episodes"] = np.array(self.episodes[class_id])
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the sums by `state` (a `state()`, or a `sum_states` of several)."""
        classes = dict.fromkeys(int(key.split("/")[1]) for key in state if key.startswith("class/"))
        shape = (4, len(self.thresholds))
        self.counts = {c: _state_array(state, f"class/{c}/counts", shape, np.int64) for c in classes}
        self.episodes = {c: int(_state_array(state, f"class/{c}/episodes", (), np.int64)) for c in classes}


# ---------------------------------------------------------------------------------------------------- zero-shot


class ZeroShotMetrics:
    """Generalised zero-shot segmentation metrics (JoEm's evaluator, docs/original.md §13), streaming.

    A (classes x classes) pixel confusion matrix, rows ground truth, columns prediction, over the pixels whose
    ground truth is a class (255 and other values >= n_classes are ignored). IoU_c = diag / (row + column - diag),
    0 for a class absent from both; mIoU over the `seen` classes (background included) and the `unseen` ones;
    harmonic = 2 S U / (S + U)."""

    def __init__(self, seen: Sequence[int], unseen: Sequence[int], n_classes: int = 21):
        self.seen, self.unseen, self.n_classes = list(seen), list(unseen), n_classes
        if set(self.seen) & set(self.unseen) or not self.seen or not self.unseen:
            raise ValueError(f"seen {self.seen} and unseen {self.unseen} must be non-empty and disjoint")
        self.matrix = np.zeros((n_classes, n_classes), dtype=np.int64)

    def update(self, gt: Maps, pred: Maps) -> None:
        """Add images: gt, pred: same-shape integer class maps (any shape; pred values < n_classes)."""
        gt, pred = np.asarray(gt).reshape(-1), np.asarray(pred).reshape(-1)
        if gt.shape != pred.shape:
            raise ValueError(f"gt and pred must have the same shape, got {gt.shape} and {pred.shape}")
        keep = (gt >= 0) & (gt < self.n_classes)
        if keep.any() and (pred[keep].min() < 0 or pred[keep].max() >= self.n_classes):
            raise ValueError(f"pred must hold class ids 0 .. {self.n_classes - 1}")
        cells = gt[keep].astype(np.int64) * self.n_classes + pred[keep].astype(np.int64)
        self.matrix += np.bincount(cells, minlength=self.n_classes**2).reshape(self.n_classes, self.n_classes)

    def iou_per_class(self) -> np.ndarray:
        """(n_classes,) float64: diag / (row + column - diag), NaN (class absent everywhere) -> 0."""
        diagonal = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=1) + self.matrix.sum(axis=0) - diagonal
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(diagonal / union)

    def compute(self) -> dict:
        """miou_seen, miou_unseen, harmonic, miou (all classes), pixels, per_class {class id: IoU}."""
        iou = self.iou_per_class()
        seen, unseen = float(iou[self.seen].mean()), float(iou[self.unseen].mean())
        return {
            "miou_seen": seen,
            "miou_unseen": unseen,
            "harmonic": 2 * seen * unseen / (seen + unseen) if seen + unseen else 0.0,
            "miou": float(iou.mean()),
            "pixels": int(self.matrix.sum()),
            "per_class": {c: float(iou[c]) for c in range(self.n_classes)},
        }

    def state(self) -> dict[str, np.ndarray]:
        """The pixel confusion matrix: `matrix` (n_classes, n_classes) int64."""
        return {"matrix": self.matrix.copy()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the matrix by `state`'s (a `state()`, or a `sum_states` of several)."""
        self.matrix = _state_array(state, "matrix", (self.n_classes, self.n_classes), np.int64)
