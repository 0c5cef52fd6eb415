"""Finding a model's failure cases and showing them: the samples whose IoU stays below 0.5 at every threshold of
0.1 .. 0.5, each drawn as a PNG panel, listed in failures.csv and shown in an index.html gallery, worst first.

`find_failures` predicts a test-mode data set (clipseg/inference.py), measures each task's IoU at the original
resolution (logits resized bilinearly, as PhraseCut's official metric does) and writes the panel of each failure as
soon as it is found; `write_gallery` writes the CSV and the gallery of the cases found. The command is
failure_test.py.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import Dataset

from clipseg.distributed import Distributed, gather_blocks, gather_lists
from clipseg.drawing import display_size
from clipseg.images import UnreadableImage, open_rgb
from clipseg.inference import predict_tasks
from clipseg.metrics import ious_at_thresholds
from clipseg.outputs import is_safe_name, printable, safe_name, write_text
from clipseg.samples import SkipLog
from clipseg.transforms import denormalise, full_size_probabilities
from model import CLIPSeg

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
FAILURE_IOU = 0.5  # a sample fails when its IoU is below this at every threshold
PANEL_MAX_SIDE = 320  # images are shown at most this many pixels wide/high in a panel
CSV_NAME, INDEX_NAME = "failures.csv", "index.html"


@dataclass
class FailureCase:
    """One failing sample: what the gallery and the CSV show. ious: one per threshold of THRESHOLDS."""

    task_id: str
    phrase: str
    phrase_type: str | None
    n_instances: int | None
    ious: tuple[float, ...]
    panel: str  # file name of the panel inside the output folder

    @property
    def best_iou(self) -> float:
        return max(self.ious)


def is_failure(ious: Sequence[float]) -> bool:
    """True when the IoU is below FAILURE_IOU at every threshold."""
    return all(iou < FAILURE_IOU for iou in ious)


# ------------------------------------------------------------------------------------------------- panels


def resize_for_display(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    if array.dtype == bool:
        return np.asarray(Image.fromarray(array.astype(np.uint8)).resize((width, height), resample)) > 0
    return np.asarray(Image.fromarray(array).resize((width, height), resample))  # float32 -> mode F


def display_image(image_path: str | None, pixel_values: torch.Tensor, original_size: tuple[int, int]) -> np.ndarray:
    """The sample's image as (H, W, 3) uint8 at its original size: read from disk, or (if that fails) the model's
    normalised input un-normalised and resized."""
    if image_path:
        try:
            return np.asarray(open_rgb(image_path))
        except UnreadableImage:
            pass
    rgb = denormalise(pixel_values).numpy()
    height, width = original_size
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def render_panel(image: np.ndarray, gt: np.ndarray, probs: np.ndarray, case: FailureCase, path: Path) -> None:
    """Write a 2 x 4 panel: image, ground truth overlay, heat map, and the mask at each threshold with its IoU.

    image: (H, W, 3) uint8; gt: (H, W) bool; probs: (H, W) float in [0, 1]; all at the original resolution."""
    width, height = display_size(gt.shape[1], gt.shape[0], PANEL_MAX_SIDE)
    size = (height, width)
    image = resize_for_display(image, size, Image.BILINEAR)
    gt = resize_for_display(gt, size, Image.NEAREST)
    probs = resize_for_display(probs.astype(np.float32), size, Image.BILINEAR)
    figure = Figure(figsize=(13, 7), dpi=72)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 4, gridspec_kw=dict(left=0.01, right=0.97, bottom=0.01, top=0.86, hspace=0.15)).ravel()
    overlay = image.astype(np.float32) / 255
    overlay[gt] = 0.5 * overlay[gt] + 0.5 * np.array([0.0, 1.0, 0.0])
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(overlay)
    axes[1].set_title(f"ground truth ({gt.mean():.1%} of the image)")
    heat = axes[2].imshow(probs, cmap="magma", vmin=0, vmax=1)
    axes[2].set_title(f"probability (max {probs.max():.2f})")
    figure.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.02)
    for ax, threshold, iou in zip(axes[3:], THRESHOLDS, case.ious):
        ax.imshow(probs > threshold, cmap="gray", vmin=0, vmax=1)
        ax.contour(gt, levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"p > {threshold:.1f}: IoU {iou:.2f}")
    for ax in axes:
        ax.set_axis_off()
    figure.suptitle(
        f"“{printable(case.phrase)}”\ntask {printable(case.task_id, 60)}, best IoU {case.best_iou:.2f}",
        fontsize=13,
        parse_math=False,
    )
    figure.savefig(path)


# -------------------------------------------------------------------------------------------- index and csv


def write_csv(cases: Sequence[FailureCase], path: Path) -> None:
    """failures.csv: task_id, phrase, phrase_type, n_instances, iou@t per threshold, best_iou, panel."""
    header = ["task_id", "phrase", "phrase_type", "n_instances", *(f"iou@{t:.1f}" for t in THRESHOLDS)]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([*header, "best_iou", "panel"])
    for case in cases:
        ious = [f"{iou:.4f}" for iou in case.ious]
        row = [case.task_id, case.phrase, case.phrase_type or "", case.n_instances or ""]
        writer.writerow([*row, *ious, f"{case.best_iou:.4f}", case.panel])
    write_text(path, text.getvalue())


def write_index(cases: Sequence[FailureCase], path: Path, title: str, summary: str) -> None:
    """index.html: every panel, worst case first, with phrase, task id and the IoU at each threshold."""
    threshold_cells = "".join(f"<th>IoU@{t:.1f}</th>" for t in THRESHOLDS)
    rows = []
    for rank, case in enumerate(cases, start=1):
        src = html.escape(quote(case.panel))
        iou_cells = "".join(f"<td>{iou:.3f}</td>" for iou in case.ious)
        rows.append(
            f'<tr><td>{rank}</td><td><a href="{src}"><img src="{src}" alt="{html.escape(case.task_id)}" '
            f'loading="lazy" width="480"></a></td><td>{html.escape(case.phrase)}</td>'
            f"<td><code>{html.escape(case.task_id)}</code></td>{iou_cells}<td>{case.best_iou:.3f}</td></tr>"
        )
    document = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}</p>
<table>
<thead><tr><th>#</th><th>panel</th><th>phrase</th><th>task id</th>{threshold_cells}<th>best IoU</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
</body>
</html>
"""
    write_text(path, document)


def previous_panels(out: Path) -> set[str]:
    """Panel names listed in an earlier run's failures.csv in `out` (only plain file names inside `out`)."""
    path = out / CSV_NAME
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as handle:
        names = {row.get("panel") or "" for row in csv.DictReader(handle)}
    return {name for name in names if name.endswith(".png") and is_safe_name(name[: -len(".png")])}


# --------------------------------------------------------------------------------------------------- search


@dataclass
class FailureSearch:
    """The outcome of a run over a split."""

    cases: list[FailureCase]
    n_samples: int
    skips: SkipLog
    blocks: list[int] = field(default_factory=list)  # the block of images of each case


def find_failures(
    model: CLIPSeg,
    data: Dataset,
    out: Path,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    precision: str = "fp32",
    search: FailureSearch | None = None,
    world: Distributed | None = None,
) -> FailureSearch:
    """Predict every sample, keep those with IoU < 0.5 at all THRESHOLDS and write their panels into `out`.

    Only per-case records are kept in memory; each panel is written as soon as its case is found. world: this
    rank's blocks of images (panels written by this rank); `merge_search` then joins every rank's cases."""
    search = search or FailureSearch([], 0, SkipLog())
    batches = predict_tasks(
        model,
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        skips=search.skips,
        description="finding failures",
        world=world,
    )
    for prediction in batches:
        batch = prediction.batch
        for i, (task, b) in enumerate(zip(batch.tasks, batch.image_of_task)):
            original_size = batch.images[b].original_size
            probs = full_size_probabilities(prediction.logits[i], original_size)
            gt = np.asarray(task.full_mask, dtype=bool)
            ious = tuple(float(v) for v in ious_at_thresholds(probs, gt, THRESHOLDS))
            search.n_samples += 1
            if not is_failure(ious):
                continue
            case = FailureCase(
                task_id=task.task_id,
                phrase=prediction.phrases[i],
                phrase_type=task.phrase_type,
                n_instances=task.n_instances,
                ious=ious,
                panel=f"{safe_name(task.task_id)}.png",
            )
            image = display_image(batch.images[b].path, batch.pixel_values[b], original_size)
            render_panel(image, gt, probs, case, out / case.panel)
            search.cases.append(case)
            search.blocks.append(prediction.block)
    return search


def merge_search(search: FailureSearch, world: Distributed) -> FailureSearch:
    """Every rank's cases, samples and skips, in block order (a collective under torchrun)."""
    by_block: dict[int, list[FailureCase]] = {}
    for block, case in zip(search.blocks, search.cases):
        by_block.setdefault(block, []).append(case)
    n_samples = sum(gather_blocks({world.rank: search.n_samples}, world))
    return FailureSearch(gather_lists(by_block, world), n_samples, search.skips.merge_ranks(world))


def write_gallery(search: FailureSearch, out: Path, model_name: str, split: str, interrupted: bool) -> str | None:
    """failures.csv and index.html for the cases found so far, worst (lowest best IoU) first. Returns None, or what
    could not be written."""
    cases = sorted(search.cases, key=lambda case: (case.best_iou, case.task_id))
    thresholds = ", ".join(f"{t:.1f}" for t in THRESHOLDS)
    summary = (
        f"{len(cases)} of {search.n_samples} samples have IoU < {FAILURE_IOU} at every threshold ({thresholds}); "
        f"IoU at the original resolution; {len(search.skips.reasons)} samples skipped by the data set"
        + ("; INTERRUPTED: partial results" if interrupted else "")
        + "."
    )
    try:
        write_csv(cases, out / CSV_NAME)
        write_index(cases, out / INDEX_NAME, f"Failure cases: {model_name} on {split}", summary)
    except OSError as err:
        return f"the gallery was not written ({err}); the panels written so far are in {out}"
    return None
