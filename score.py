"""Score a CLIPSeg model on a PhraseCut-format split: the paper's metrics and PhraseCut's official ones.

    python score.py pc                                    # checkpoints/pc on the PhraseCut test split
    python score.py --model CIDAS/clipseg-rd64-refined    # the released weights (hub id, directory or .pth)
    python score.py demo --data synthetic --shuffle-prompts
    python score.py demo --data pascal5i --data-root synthetic_voc    # one-/zero-shot: README, "Benchmarks"

Paper metrics (Table 3: mIoU, IoU_FG, AP; plus IoU_BIN) are computed as the original does: on the S x S
prediction against the ground truth drawn with `polygon2mask` and squashed to S x S (nearest), from per-sample
counts at the 49 thresholds 0.02 .. 0.98, reported at t = 0.3 and at the best threshold; the image is resized by
the original's rule (`--resize original`). PhraseCut's official metrics (mean IoU, cumulative IoU, accuracy at
IoU > 0.5 .. 0.9, per subset) are computed at the original resolution against its own ground truth (PIL fill +
outline): logits resized bilinearly to the image size, then probability > `--threshold`. Results go to
`checkpoints/NAME/scores_<split>.json` (or `--out`); skipped samples are counted and listed there and in the
printed table, never dropped silently.

The output paths are checked before the model is loaded, and the table is printed before the JSON is written.
Exit status: 0 scored; 2 a model, data set, option or output path that cannot be used (before any scoring), or a
model whose output is not finite; 1 nothing could be scored, or the results could not be written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import dataset as datasets
from clipseg.benchmarks import runs as fewshot_runs
from clipseg.benchmarks.protocols import BENCHMARKS
from clipseg.cli import NOTHING_DONE, stop
from clipseg.inference import SkipLog, TaskBatch, predict_tasks
from clipseg.metrics import PAPER_THRESHOLDS, PaperMetrics, PhraseCutMetrics
from clipseg.outputs import UnwritableOutput, check_writable, safe_name, write_json
from clipseg.precision import add_precision_arguments, prepare_model, resolve_precision
from clipseg.transforms import RESIZE_RULES, NonFiniteOutput, full_size_probabilities
from model import CLIPSeg

CHECKPOINTS_DIR = Path("checkpoints")
DEFAULT_THRESHOLD = 0.3
SHUFFLE_SEED = 0
DATA_KINDS = ("phrasecut", "synthetic", "folder")


class ScoreError(Exception):
    """A model, data set or option that cannot be used; the message says what to do."""


# ------------------------------------------------------------------------------------------ model and data


def available_runs(checkpoints_dir: Path = CHECKPOINTS_DIR) -> list[str]:
    """Names of the runs under `checkpoints_dir` that hold a saved model (`config.json`)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p.parent.name for p in checkpoints_dir.glob("*/config.json"))


def resolve_model(
    name: str | None, model: str | None, checkpoints_dir: Path = CHECKPOINTS_DIR, checkpoint: str | None = None
) -> tuple[str, Path | None]:
    """Where to load the model from and which directory its scores go to (None for hub ids and .pth files).

    name: a run under `checkpoints_dir`; model: a hub id, a checkpoint directory or an original `.pth`;
    checkpoint: a model inside the run or directory (`best`, `iter_005000`), default the run's latest."""
    if name is not None and model is not None:
        raise ScoreError(f"give either a run NAME ({name}) or --model ({model}), not both")
    if name is None and model is None:
        raise ScoreError("give a run NAME (a folder of checkpoints/) or --model HUB_ID_OR_DIR_OR_PTH")
    if name is None and checkpoint is None:
        local = Path(model)
        return model, local if (local / "config.json").is_file() else None
    run_dir = checkpoints_dir / name if name is not None else Path(model)
    directory = run_dir / checkpoint if checkpoint else run_dir
    if not (directory / "config.json").is_file():
        kept = sorted(p.parent.name for p in run_dir.glob("*/config.json"))
        if name is not None and not run_dir.is_dir():
            runs = available_runs(checkpoints_dir)
            listing = ", ".join(runs) if runs else "none yet (train one with train.py --name NAME)"
            raise ScoreError(
                f"no trained model in {run_dir} (config.json missing). Runs in {checkpoints_dir}/: {listing}. "
                "For other weights use --model HUB_ID_OR_DIR_OR_PTH."
            )
        raise ScoreError(
            f"no trained model in {directory} (config.json missing); models in {run_dir}: the latest"
            + (f", {', '.join(kept)}" if kept else "")
            + " (--checkpoint best exists once a run validates, see train.py --val-interval)"
        )
    return str(directory), directory


def load_model(source: str, backbone: str | None, device: str, precision: str = "fp32") -> CLIPSeg:
    """`CLIPSeg.from_pretrained(source)` in eval mode on `device`, prepared for `precision` (clipseg/precision.py), with
    the text cache on; errors become `ScoreError` naming the source."""
    try:
        model = CLIPSeg.from_pretrained(source, backbone=backbone)
    except (OSError, ValueError) as err:
        raise ScoreError(f"cannot load the model {source}: {err}") from err
    model.eval().to(device)
    model.text_cache = {}
    return prepare_model(model, precision, device)


def input_side(model: CLIPSeg, requested: int | None) -> int:
    """--image-size, or the model's own, checked against the model's patch size."""
    try:
        return model.config.input_side(requested)
    except ValueError as err:
        raise ScoreError(str(err)) from err


def default_data_root(kind: str) -> str:
    if kind == "phrasecut":
        return datasets.DEFAULT_PHRASECUT_ROOT
    if kind == "synthetic":
        return datasets.DEFAULT_SYNTHETIC_ROOT
    raise ScoreError("--data folder needs --data-root INDEX_FILE (a JSONL or CSV of image, phrase, mask)")


def build_eval_dataset(
    kind: str, root: str | None, split: str, image_size: int, limit: int | None, resize: str = "original"
) -> Dataset:
    """The test-mode data set (whole images squashed to `image_size` by the `resize` rule, no negatives,
    original-size masks)."""
    root = root or default_data_root(kind)
    try:
        return datasets.build_dataset(kind, root, split, train=False, image_size=image_size, limit=limit, resize=resize)
    except (OSError, ValueError, KeyError) as err:
        raise ScoreError(f"cannot read the {kind} data at {root} (split {split}): {err}") from err


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF hub id, checkpoint directory or original .pth file")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a model inside the run or directory: best (the best validation of train.py --val-interval) or "
        "iter_NNNNNN (--keep-checkpoints); default: the run's latest",
    )
    parser.add_argument(
        "--backbone", default=None, help="CLIP backbone for an original .pth (default openai/clip-vit-base-patch16)"
    )
    parser.add_argument(
        "--checkpoints-dir", default=str(CHECKPOINTS_DIR), help="parent folder of the runs (default %(default)s)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side S the model sees, a multiple of the model's patch size (16 for the released models; default: "
        "the model's)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default %(default)s)")
    parser.add_argument(
        "--num-workers", type=int, default=2, help="DataLoader worker processes, 0 = main process (default %(default)s)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device, e.g. cpu, cuda:0 (default %(default)s)",
    )
    add_precision_arguments(parser)
    parser.add_argument(
        "--resize",
        choices=RESIZE_RULES,
        default="original",
        help="how images are resized to the model's input: original = the authors' data pipeline (bilinear, "
        "align_corners=True, no antialiasing), as the paper's numbers were measured; pil = PIL's antialiased "
        "bilinear, as the HF processor does (default %(default)s)",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        choices=DATA_KINDS + BENCHMARKS,
        default="phrasecut",
        help="phrasecut: the downloaded data set; synthetic: generated PhraseCut-format data (made if absent); "
        "folder: your own JSONL/CSV index of image, phrase, mask; pascal5i, coco20i (one-shot), voc-zeroshot: the "
        "paper's other benchmarks, see the benchmark options (default %(default)s)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help=f"phrasecut/synthetic: folder containing data/VGPhraseCut_v0 (default {datasets.DEFAULT_PHRASECUT_ROOT} "
        f"/ {datasets.DEFAULT_SYNTHETIC_ROOT}); folder: the index file",
    )
    parser.add_argument("--split", default="test", help="split to score: train, val, test, miniv (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N samples")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.image_size is not None and args.image_size <= 0:
        parser.error(f"--image-size must be positive, got {args.image_size}")  # the patch is checked with the model
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    try:  # the precision that will run: --precision, else the fastest that keeps fp32's masks (clipseg/precision.py)
        args.precision = resolve_precision(args.precision, args.device, args.amp)
    except ValueError as err:
        parser.error(str(err))


# ------------------------------------------------------------------------------------------------ inference


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
    """Metrics accumulated so far (bounded memory: counts, not pixels) and what could not be scored."""

    threshold: float = DEFAULT_THRESHOLD
    paper: PaperMetrics | None = None  # reports at `threshold` unless given
    official: PhraseCutMetrics = field(default_factory=PhraseCutMetrics)
    skips: SkipLog = field(default_factory=SkipLog)
    n_samples: int = 0

    def __post_init__(self) -> None:
        if self.paper is None:
            self.paper = PaperMetrics(report_threshold=self.threshold)

    def update(self, batch: TaskBatch, save_dir: Path | None = None) -> None:
        """Add a batch: paper metrics at S x S, official metrics at the original size (and the PNGs)."""
        self.paper.update(torch.sigmoid(batch.logits), batch.fields["mask"])
        for i, task_id in enumerate(batch.fields["task_id"]):
            pred = full_size_probabilities(batch.logits[i], batch.get("original_size", i)) > self.threshold
            gt = np.asarray(batch.get("full_mask", i), dtype=bool)
            self.official.update(pred, gt, batch.get("phrase_type", i), batch.get("n_instances", i))
            if save_dir is not None:
                save_prediction_png(pred, save_dir, task_id)
        self.n_samples += len(batch)


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
) -> ScoreRun:
    """Score `model` on every task of a test-mode data set (or the task indices `tasks`). Each image is encoded
    once for all its tasks (`clipseg.inference.predict_tasks`); `group_by_image=False` encodes it once per task, as the
    reference implementations do. Pass `run` to keep partial results on interrupt."""
    run = run or ScoreRun(threshold=threshold)
    phrase_for_task = shuffled_phrases(task_phrases(data)) if shuffle_prompts else None
    if save_predictions is not None:
        save_predictions.mkdir(parents=True, exist_ok=True)
    for batch in predict_tasks(
        model,
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        tasks=tasks,
        phrase_for_task=phrase_for_task,
        skips=run.skips,
        group_by_image=group_by_image,
    ):
        run.update(batch, save_predictions)
    return run


def results_dict(run: ScoreRun, settings: dict, data: Dataset, seconds: float, interrupted: bool) -> dict:
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


def to_builtin(value):
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


# ---------------------------------------------------------------------------------------------------- output


def percent(value) -> str:
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
    value, at = paper.get(f"{key}_best"), paper.get(f"{key}_best_threshold")
    return percent(value) + ("" if at is None else f" (t={at:.2f})")


def default_output(run_dir: Path | None, model: str, split: str, shuffled: bool, limit: int | None = None) -> Path:
    """checkpoints/NAME/scores_<split>.json (or a model directory); scores/<model>_<split>.json for hub ids
    and .pth files. Partial (--limit) and shuffled-prompt runs get their own files so they never overwrite the
    full scores."""
    suffix = (f"_first{limit}" if limit else "") + ("_shuffled" if shuffled else "")
    if run_dir is not None:
        return run_dir / f"scores_{split}{suffix}.json"
    return Path("scores") / f"{safe_name(model.lower())}_{split}{suffix}.json"


def check_outputs(out: Path, save_dir: Path | None) -> None:
    """Stop (exit 2) before any work when the results JSON or the --save-predictions folder cannot be written."""
    try:
        check_writable(out)
        if save_dir is not None:
            check_writable(save_dir, folder=True)
    except UnwritableOutput as err:
        stop(f"{err}; choose another --out or --save-predictions")


def save_results(out: Path, results: dict) -> None:
    """Write the results (already printed) as JSON; a write that fails is a message and exit 1."""
    try:
        write_json(out, results)
    except (OSError, ValueError) as err:
        stop(f"the scores printed above were NOT saved: {err}", NOTHING_DONE)
    print(f"\nscores written to {out}", file=sys.stderr)


def benchmark_model(args: argparse.Namespace, fold: int | None) -> tuple[CLIPSeg, str]:
    """The model of a benchmark run (of `fold`, for a run name with "{fold}") and where it came from."""
    name = args.name.replace("{fold}", str(fold)) if args.name and fold is not None else args.name
    try:
        source, _ = resolve_model(name, args.model, Path(args.checkpoints_dir), args.checkpoint)
        return load_model(source, args.backbone, args.device, args.precision), source
    except ScoreError as err:
        stop(str(err))


def run_benchmark(args: argparse.Namespace) -> dict:
    """score.py's one-shot, zero-shot and visual-prompt runs (clipseg/benchmarks/runs.py): outputs checked, scores
    printed, then written."""
    if args.out:
        out = Path(args.out)
    else:  # named after the run, else after the model (resolved, not loaded)
        try:
            model = args.name or resolve_model(None, args.model, Path(args.checkpoints_dir), args.checkpoint)[0]
        except ScoreError as err:
            stop(str(err))
        out = fewshot_runs.default_output(args, model)
    check_outputs(out, Path(args.save_predictions) if args.save_predictions else None)
    results = fewshot_runs.run(args, lambda fold: benchmark_model(args, fold))
    print(format_table(results) if args.data in DATA_KINDS else fewshot_runs.format_results(results))
    save_results(out, results)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Score a model on a PhraseCut-format split: the paper's mIoU, IoU_FG, AP and IoU_BIN (at "
        "S x S, t = 0.3 and best t) and PhraseCut's official metrics (original resolution). Prints a table and "
        "writes a JSON file.",
    )
    parser.add_argument("name", nargs="?", default=None, help="a run: loads checkpoints/NAME (see --checkpoints-dir)")
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="a pixel is positive iff probability > this: the paper metrics' reporting threshold (one of 0.02, "
        f"0.04, ..., 0.98), PhraseCut's metrics and the PNGs (default {DEFAULT_THRESHOLD}; coco20i 0.1)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default: checkpoints/NAME/scores_<split>[_first<N>][_shuffled].json; for a hub id or "
        ".pth: scores/<model>_<split>[...].json)",
    )
    parser.add_argument(
        "--save-predictions",
        default=None,
        metavar="DIR",
        help="also write PhraseCut's interchange format: DIR/<task_id>.png, single channel 0/255, original size",
    )
    parser.add_argument(
        "--shuffle-prompts",
        action="store_true",
        help=f"give every sample the phrase of another sample (fixed seed {SHUFFLE_SEED}): scores should collapse "
        "if the model uses the prompt",
    )
    fewshot_runs.add_arguments(parser)
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    fewshot_runs.check_arguments(parser, args)
    if args.shuffle_prompts and fewshot_runs.handles(args):
        parser.error("--shuffle-prompts is for text prompts on PhraseCut-format data")
    if not np.isclose(PAPER_THRESHOLDS, args.threshold, rtol=0, atol=1e-9).any():
        parser.error(f"--threshold must be one of the paper's 0.02, 0.04, ..., 0.98, got {args.threshold}")
    if args.name is None and args.model is None:
        parser.error("give a run NAME (loads checkpoints/NAME) or --model HUB_ID_OR_DIR_OR_PTH")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """The CLI. Returns the results dict (printed, then written as JSON). Stops with a message and exit status 2
    for unusable input (before any scoring) or a model whose output is not finite, 1 when nothing was scored or
    the results could not be written (see the module docstring)."""
    args = parse_args(argv)
    if fewshot_runs.handles(args):  # one-shot, zero-shot and visual-prompt benchmarks (clipseg/benchmarks/runs.py)
        return run_benchmark(args)
    try:
        source, run_dir = resolve_model(args.name, args.model, Path(args.checkpoints_dir), args.checkpoint)
    except ScoreError as err:
        stop(str(err))
    out = Path(args.out) if args.out else default_output(run_dir, source, args.split, args.shuffle_prompts, args.limit)
    save_dir = Path(args.save_predictions) if args.save_predictions else None
    check_outputs(out, save_dir)
    try:
        model = load_model(source, args.backbone, args.device, args.precision)
        image_size = input_side(model, args.image_size)
        data = build_eval_dataset(args.data, args.data_root, args.split, image_size, args.limit, args.resize)
    except ScoreError as err:
        stop(str(err))
    settings = {
        "model": source,
        "data": args.data,
        "data_root": args.data_root or default_data_root(args.data),
        "split": args.split,
        "limit": args.limit,
        "image_size": image_size,
        "threshold": args.threshold,
        "shuffle_prompts": args.shuffle_prompts,
        "shuffle_seed": SHUFFLE_SEED if args.shuffle_prompts else None,
        "precision": args.precision,
        "resize": args.resize,
    }
    run, started = ScoreRun(threshold=args.threshold), time.perf_counter()
    try:
        score(
            model,
            data,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            threshold=args.threshold,
            precision=args.precision,
            shuffle_prompts=args.shuffle_prompts,
            save_predictions=save_dir,
            run=run,
        )
    except (ScoreError, NonFiniteOutput) as err:
        stop(f"scoring stopped after {run.n_samples} samples: {err}")
    except KeyboardInterrupt:
        partial = results_dict(run, settings, data, time.perf_counter() - started, True)
        print(format_table(partial))
        save_results(out.with_name(out.stem + ".interrupted.json"), partial)
        print(f"interrupted after {run.n_samples} samples", file=sys.stderr)
        raise
    results = results_dict(run, settings, data, time.perf_counter() - started, False)
    print(format_table(results))
    save_results(out, results)
    if run.n_samples == 0:
        stop(f"no sample could be scored ({len(run.skips.reasons)} skipped); see {out}", NOTHING_DONE)
    return results


if __name__ == "__main__":
    main()  # returns the results; errors exit through cli.stop
