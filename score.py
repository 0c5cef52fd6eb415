"""Score a CLIPSeg model on a PhraseCut-format split: the paper's metrics and PhraseCut's official ones.

    python score.py pc                                    # checkpoints/pc on the PhraseCut test split
    python score.py --model CIDAS/clipseg-rd64-refined    # the released weights (the default model)
    python score.py --model pc --checkpoint best          # any model: run name, directory, hub id or .pth
    python score.py demo --data synthetic --shuffle-prompts
    python score.py demo --data pascal5i --data-root synthetic_voc    # one-/zero-shot: README, "Benchmarks"

Paper metrics (Table 3: mIoU, IoU_FG, AP; plus IoU_BIN) are computed as the original does: on the S x S
prediction against the ground truth drawn with `polygon2mask` and squashed to S x S (nearest), from per-sample
counts at the 49 thresholds 0.02 .. 0.98, reported at t = 0.3 and at the best threshold; the image is resized by
the original's rule (`--resize original`). PhraseCut's official metrics (mean IoU, cumulative IoU, accuracy at
IoU > 0.5 .. 0.9, per subset) are computed at the original resolution against its own ground truth (PIL fill +
outline): logits resized bilinearly to the image size, then probability > `--threshold`. Results go to
`<out>/scores_<split>.json`, `--out` being the run's folder (`checkpoints/NAME/`, or the model directory) unless
given, `scores/<model>/` for hub ids, .pth files and export folders; skipped samples are counted and listed there
and in the printed table, never dropped silently. Precision: fp32 unless `--precision` asks for another
(clipseg/precision.py).

The output paths are checked before the model is loaded, and the table is printed before the JSON is written.
Exit status: 0 scored; 2 a model, data set, option or output path that cannot be used (before any scoring), or a
model whose output is not finite; 1 nothing could be scored, or the results could not be written.

Under torchrun (`torchrun --nproc_per_node=N score.py ...`, README "Scale out") every rank scores its share of the
images, the metrics are merged exactly, each rank writes its own prediction PNGs and rank 0 prints the table and
writes the JSON: the same results as one process.

This command parses the flags and reports: models and data are loaded by clipseg/loading.py, the scoring and its
table are clipseg/scoring.py, the one-shot and zero-shot runs clipseg/benchmarks/runs.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipseg.benchmarks import runs as fewshot_runs
from clipseg.cli import (
    NOTHING_DONE,
    add_data_arguments,
    add_renamed_flag,
    add_scoring_arguments,
    check_common_arguments,
    load_evaluation,
    model_source,
    output_folder,
    run_job,
    stop,
)
from clipseg.distributed import Distributed, check_same_job, in_turn, run_and_exit
from clipseg.loading import (
    DATA_KINDS,
    DEFAULT_MODEL,
    LoadError,
    default_data_root,
    load_model,
)
from clipseg.metrics import PAPER_THRESHOLDS
from clipseg.outputs import UnwritableOutput, check_writable, safe_name, write_json
from clipseg.scoring import DEFAULT_THRESHOLD, SHUFFLE_SEED, ScoreError, ScoreRun, format_table, results_dict, score
from clipseg.transforms import NonFiniteOutput
from model import CLIPSeg


def default_folder(run_dir: Path | None, model: str) -> Path:
    """Where the scores go without --out: the run's folder (or the model directory); scores/<model>/ for hub ids,
    .pth files and export folders (--backend onnx or openvino: the export stays as export.py wrote it)."""
    return run_dir if run_dir is not None else Path("scores") / safe_name(model.lower())


def scores_name(split: str, shuffled: bool, limit: int | None = None) -> str:
    """scores_<split>.json; partial (--limit) and shuffled-prompt runs get their own files so they never overwrite
    the full scores."""
    return f"scores_{split}" + (f"_first{limit}" if limit else "") + ("_shuffled" if shuffled else "") + ".json"


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
    """The model of a benchmark run (of `fold`, for a model with "{fold}") and where it came from."""
    per_fold = fold is not None and fewshot_runs.FOLD_FIELD in args.model
    model = args.model.replace(fewshot_runs.FOLD_FIELD, str(fold)) if per_fold else args.model
    try:
        source, _ = model_source(argparse.Namespace(**{**vars(args), "model": model}))
        return load_model(source, args.backbone, args.device, args.precision), source
    except LoadError as err:
        stop(str(err))


def run_benchmark(args: argparse.Namespace, world: Distributed) -> dict:
    """score.py's one-shot, zero-shot and visual-prompt runs (clipseg/benchmarks/runs.py): outputs checked, scores
    printed, then written."""
    if args.out:
        folder = Path(args.out)
    elif fewshot_runs.FOLD_FIELD in args.model:  # a model per fold: named after the runs
        folder = default_folder(None, args.model)
    else:  # the run's folder, else named after the model (resolved, not loaded)
        try:
            source, run_dir = model_source(args)
            folder = default_folder(run_dir, source)
        except LoadError as err:
            stop(str(err))
    out = folder / fewshot_runs.scores_name(args)
    in_turn(world, lambda: check_outputs(out, Path(args.save_predictions) if args.save_predictions else None))
    results = fewshot_runs.run(args, lambda fold: benchmark_model(args, fold), world)
    if world.is_main:
        print(format_table(results) if args.data in DATA_KINDS else fewshot_runs.format_results(results))
        save_results(out, results)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Score a model on a PhraseCut-format split: the paper's mIoU, IoU_FG, AP and IoU_BIN (at "
        "S x S, t = 0.3 and best t) and PhraseCut's official metrics (original resolution). Prints a table and "
        "writes a JSON file.",
    )
    parser.add_argument(
        "name",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the same as --model, the older form: python score.py pc scores the run checkpoints/pc",
    )
    add_scoring_arguments(parser)
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
        type=output_folder,
        default=None,
        metavar="DIR",
        help="folder of the results, OUT/scores_<split>[_first<N>][_shuffled].json (default: the run's folder, "
        "checkpoints/NAME, or the model directory; scores/<model> for a hub id, a .pth or an export folder)",
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
    add_renamed_flag(parser, "--prompt", "--prompt-kind", "visual or text; predict.py's --prompt is a text prompt")
    add_renamed_flag(parser, "--splits", "--splits-dir")
    args = parser.parse_args(argv)
    if args.name is not None and args.model is not None:
        parser.error(f"give the model once: MODEL ({args.name}) or --model ({args.model})")
    args.model = args.model or args.name
    check_common_arguments(parser, args)
    args.model = args.model or DEFAULT_MODEL
    fewshot_runs.check_arguments(parser, args)
    if args.backend != "torch" and args.prompt_kind == "visual":
        parser.error(f"--prompt-kind visual runs in PyTorch only; --backend {args.backend} scores text prompts")
    if args.shuffle_prompts and fewshot_runs.handles(args):
        parser.error("--shuffle-prompts is for text prompts on PhraseCut-format data")
    if not np.isclose(PAPER_THRESHOLDS, args.threshold, rtol=0, atol=1e-9).any():
        parser.error(f"--threshold must be one of the paper's 0.02, 0.04, ..., 0.98, got {args.threshold}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """The CLI. Returns the results dict (printed, then written as JSON). Stops with a message and exit status 2
    for unusable input (before any scoring) or a model whose output is not finite, 1 when nothing was scored or
    the results could not be written (see the module docstring)."""
    return run_job(parse_args(argv), run)


def run(args: argparse.Namespace, world: Distributed) -> dict:
    """score.py's work on this rank: results on every rank, printed and written by rank 0."""
    if fewshot_runs.handles(args):  # one-shot, zero-shot and visual-prompt benchmarks (clipseg/benchmarks/runs.py)
        return run_benchmark(args, world)
    try:
        source, run_dir = model_source(args)
    except LoadError as err:
        stop(str(err))
    folder = Path(args.out) if args.out else default_folder(run_dir, source)
    out = folder / scores_name(args.split, args.shuffle_prompts, args.limit)
    save_dir = Path(args.save_predictions) if args.save_predictions else None
    in_turn(world, lambda: check_outputs(out, save_dir))  # one rank at a time: probes of a shared folder
    model, source, image_size, data = load_evaluation(args)
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
    flags = {key: value for key, value in settings.items() if key not in ("model", "data_root")}  # paths may differ
    tasks = (data.task_info(index).task_id for index in range(len(data)))
    check_same_job(world, model, {**flags, "batch_size": args.batch_size}, tasks)
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
            world=world,
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
    if world.is_main:
        print(format_table(results))
        save_results(out, results)
    if run.n_samples == 0:
        stop(f"no sample could be scored ({len(run.skips.reasons)} skipped); see {out}", NOTHING_DONE)
    return results


if __name__ == "__main__":
    run_and_exit(main)  # main returns the results (status 0); errors exit through cli.stop
