"""Scoring a model on a PhraseCut-format split, and its report.

`score` runs the model over a test-mode data set (each image encoded once for all its tasks,
clipseg/inference.py) and accumulates, in a `ScoreRun`, the paper's metrics (at S x S against the squashed ground
truth) and PhraseCut's official ones (at the original resolution, probability > threshold), counting what could not
be scored; `--shuffle-prompts` runs give each task another task's phrase (`shuffled_phrases`). Under torchrun
(`world`) each rank scores the images of its blocks (clipseg/inference.py) into per-block sums and `ScoreRun.finish`
adds every rank's blocks in block order, so the results equal one process's bit for bit; each rank writes the PNGs
of its own tasks. `results_dict` is the JSON report and `format_table` its printed tables. The command is score.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import dataset as datasets
from clipseg.distributed import Distributed, gather_blocks
from clipseg.inference import Predictions, predict_tasks
from clipseg.metrics import PaperMetrics, PhraseCutMetrics, sum_states
from clipseg.outputs import safe_name
from clipseg.samples import SkipLog
from clipseg.transforms import full_size_probabilities
from model import CLIPSeg

DEFAULT_THRESHOLD = 0.3
SHUFFLE_SEED = 0


class ScoreError(Exception):
    """A scoring option that cannot be used on this data; the message says why."""


def task_phrases(data: Dataset) -> list[tuple[str, str]]:
    """(task_id, phrase) of every task of the data set, in order (no image is read)."""
    return [(info.task_id, info.phrase) for info in map(data.task_info, range(len(data)))]


def shuffled_phrases(pairs: Sequence[tuple[str, str]], seed: int = SHUFFLE_SEED) -> dict[str, str]:
    """task_id -> the phrase of another task: a random cyclic derangement (no task keeps its own task's phrase)."""
    if len(pairs) < 2:
        raise ScoreError("--shuffle-prompts needs at least 2 samples")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return {pairs[order[k]][0]: pairs[order[(k + 1) % len(order)]][1] for k in range(len(order))}


def save_prediction_png(mask: np.ndarray, directory: Path, task_id: str) -> Path:
    """Write a binary (H, W) mask as `<task_id>.png` (single channel, 0 / 255, original size)."""
    path = directory / f"{safe_name(task_id)}.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)  # uint8 (H, W): mode L
    return path


# ---------------------------------------------------------------------------------------------------- scoring


@dataclass
class ScoreRun:
    """Metrics accumulated so far (bounded memory: counts, not pixels) and what could not be scored. Batches are
    added into sums per block of images (`blocks`); `finish` loads their total into `paper` and `official`."""

    threshold: float = DEFAULT_THRESHOLD
    paper: PaperMetrics | None = None  # reports at `threshold` unless given
    official: PhraseCutMetrics = field(default_factory=PhraseCutMetrics)
    skips: SkipLog = field(default_factory=SkipLog)
    n_samples: int = 0
    blocks: dict[int, tuple[PaperMetrics, PhraseCutMetrics]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.paper is None:
            self.paper = PaperMetrics(report_threshold=self.threshold)

    def update(self, prediction: Predictions, save_dir: Path | None = None) -> None:
        """Add a batch of test-mode PhraseCut tasks into its block's sums: paper metrics at S x S, official metrics
        at the original size (and the PNGs)."""
        if prediction.block not in self.blocks:
            report = float(self.paper.thresholds[self.paper.report_index])
            self.blocks[prediction.block] = (PaperMetrics(report), PhraseCutMetrics())
        paper, official = self.blocks[prediction.block]
        batch = prediction.batch
        paper.update(torch.sigmoid(prediction.logits), batch.masks)
        for i, (task, image) in enumerate(zip(batch.tasks, batch.image_of_task)):
            pred = full_size_probabilities(prediction.logits[i], batch.images[image].original_size) > self.threshold
            official.update(pred, np.asarray(task.full_mask, dtype=bool), task.phrase_type, task.n_instances)
            if save_dir is not None:
                save_prediction_png(pred, save_dir, task.task_id)
        self.n_samples += len(batch)

    def finish(self, world: Distributed | None = None) -> ScoreRun:
        """Load the sum of every rank's blocks, in block order, into `paper` and `official`; count every rank's
        samples and skips (a collective under torchrun: every rank calls it). Returns self."""
        world = world or Distributed()
        states = {block: (paper.state(), official.state()) for block, (paper, official) in self.blocks.items()}
        gathered = gather_blocks(states, world)
        self.paper.load_state(sum_states(paper for paper, _ in gathered))
        self.official.load_state(sum_states(official for _, official in gathered))
        self.skips.merge_ranks(world)
        self.n_samples = sum(gather_blocks({world.rank: self.n_samples}, world))
        return self


def score(
    model: CLIPSeg,
    data: Dataset,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    precision: str = "fp32",
    shuffle_prompts: bool = False,
    save_predictions: Path | None = None,
    run: ScoreRun | None = None,
    tasks: Sequence[int] | None = None,
    group_by_image: bool = True,
    world: Distributed | None = None,
) -> ScoreRun:
    """Score `model` on every task of a test-mode data set (or the task indices `tasks`). Each image is encoded
    once for all its tasks (`clipseg.inference.predict_tasks`); `group_by_image=False` encodes it once per task, as the
    reference implementations do. Pass `run` to keep partial results on interrupt (this rank's). world: score this
    rank's blocks of images and merge every rank's (results on every rank; give it on one process too for results
    equal to any number of ranks')."""
    run = run or ScoreRun(threshold=threshold)
    phrase_for_task = shuffled_phrases(task_phrases(data)) if shuffle_prompts else None
    if save_predictions is not None:
        save_predictions.mkdir(parents=True, exist_ok=True)
    predictions = predict_tasks(
        model,
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        tasks=tasks,
        phrase_for_task=phrase_for_task,
        skips=run.skips,
        group_by_image=group_by_image,
        world=world,
    )
    try:
        for prediction in predictions:
            run.update(prediction, save_predictions)
    except KeyboardInterrupt:
        run.finish()  # the blocks scored here: partial results
        raise
    return run.finish(world)


# ----------------------------------------------------------------------------------------------------- report


def results_dict(run: ScoreRun, settings: dict, data: Dataset, seconds: float, interrupted: bool) -> dict:
    """The JSON report of a run: `settings`, the metrics, the skipped and excluded tasks, the time taken."""
    return {
        **settings,
        "n_samples": run.n_samples,
        "paper": to_builtin(run.paper.compute()) if run.n_samples else {},
        "phrasecut": to_builtin(run.official.compute()) if run.n_samples else {},
        "skipped": {"count": len(run.skips.reasons), "samples": run.skips.reasons},
        **datasets.exclusion_report(data),  # "excluded" tasks and "excluded_polygons"
        "seconds": round(seconds, 2),
        "interrupted": interrupted,
    }


def to_builtin(value: object) -> object:
    """numpy scalars/arrays and tuples -> JSON-ready Python values."""
    if isinstance(value, dict):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_builtin(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal, "-" when missing."""
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(results: dict) -> str:
    """The paper's three columns first (mIoU, IoU_FG, AP), then IoU_BIN, the best-threshold values and
    PhraseCut's official metrics, as Markdown tables (values in %)."""
    paper, official = results.get("paper") or {}, results.get("phrasecut") or {}
    bad_polygons = results.get("excluded_polygons", {}).get("count")
    lines = [
        f"{results['model']} on {results['data']} {results['split']}: {results['n_samples']} samples, "
        f"{results['skipped']['count']} skipped, {results['excluded']['count']} excluded"
        + (f" ({bad_polygons} bad polygons left out)" if bad_polygons else "")
        + (" (shuffled prompts)" if results["shuffle_prompts"] else "")
        + (" (INTERRUPTED: partial)" if results["interrupted"] else ""),
        "",
        "| threshold | mIoU | IoU_FG | AP | IoU_BIN |",
        "|---|---|---|---|---|",
        f"| t = {results['threshold']:.2f} | {percent(paper.get('miou'))} | {percent(paper.get('iou_fg'))} "
        f"| {percent(paper.get('ap'))} | {percent(paper.get('iou_bin'))} |",
        f"| best t | {best(paper, 'miou')} | {best(paper, 'iou_fg')} | {percent(paper.get('ap'))} "
        f"| {best(paper, 'iou_bin')} |",
        "",
    ]
    accuracies = [key for key in official if key.startswith("acc@")]
    header = ["subset", "tasks", "mean IoU", "cum IoU", *accuracies]
    lines += [
        f"PhraseCut official (original resolution, probability > {results['threshold']:.2f}):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    rows = [("all", official)] + list((official.get("subsets") or {}).items())
    for subset, stats in rows:
        cells = [stats.get("mean_iou"), stats.get("cum_iou"), *(stats.get(key) for key in accuracies)]
        lines.append(f"| {subset} | {stats.get('n_tasks', '-')} | " + " | ".join(percent(c) for c in cells) + " |")
    return "\n".join(lines)


def best(paper: dict, key: str) -> str:
    """The best value of a paper metric over the thresholds, with the threshold it is reached at."""
    value, at = paper.get(f"{key}_best"), paper.get(f"{key}_best_threshold")
    return percent(value) + ("" if at is None else f" (t={at:.2f})")
