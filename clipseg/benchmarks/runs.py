"""score.py's benchmark runs: the command-line options, one run per fold (per-fold models with a `{fold}` run
name), the results JSON and the printed tables. The protocols and the scoring loop are in
clipseg/benchmarks/protocols.py.

    python score.py --model CIDAS/clipseg-rd64-refined --data pascal5i --data-root VOCdevkit --fold all
    python score.py pas5i-{fold} --data pascal5i --protocol hsnet --splits-dir hsnet/data   # one model per fold
    python score.py --model ... --data coco20i --data-root COCO-20i --prompt-kind text
    python score.py zs5 --data voc-zeroshot --data-root VOCdevkit --unseen 10
    python score.py pc --data phrasecut --prompt-kind visual
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import dataset as datasets
from clipseg.benchmarks.classes import COCO_FOLDS, PASCAL_FOLDS, ZERO_SHOT_UNSEEN
from clipseg.benchmarks.protocols import (
    BENCHMARKS,
    DEFAULT_EPISODES,
    PROMPTS,
    PROTOCOLS,
    BenchmarkError,
    EpisodeData,
    FoldRun,
    PhraseCutVisual,
    ZeroShotData,
    default_seed,
    fold_episodes,
    fold_results,
    mean_over_folds,
    score_episodes,
    score_phrasecut_visual,
    score_zero_shot,
    zero_shot_results,
    zero_shot_split,
)
from clipseg.benchmarks.readers import BenchmarkDataError, VocData
from clipseg.cli import NOTHING_DONE, stop
from clipseg.distributed import Distributed, check_same_job
from clipseg.metrics import EpisodeMetrics, ZeroShotMetrics
from clipseg.samples import SkipLog
from clipseg.scoring import ScoreRun, percent

DEFAULT_THRESHOLDS = {"coco20i": 0.1}  # the paper's COCO-20i threshold (Table 6); 0.3 everywhere else
DEFAULT_ROOTS = {"pascal5i": "VOCdevkit", "voc-zeroshot": "VOCdevkit", "coco20i": "COCO-20i"}
FOLD_FIELD = "{fold}"

# (fold or None) -> (model, its source): score.py loads models; a `{fold}` run name gives one model per fold.
ModelLoader = Callable[[int | None], tuple[object, str]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark options of score.py."""
    group = parser.add_argument_group("one-shot and zero-shot benchmarks (README, 'Benchmarks')")
    group.add_argument(
        "--fold", default="all", help="pascal5i / coco20i fold: 0, 1, 2, 3 or all (mean over folds; default all)"
    )
    group.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="original",
        help="episodes: original = the authors' (PFENet's list and sampler for Pascal-5i, seed 123); hsnet = "
        f"HSNet's fold files, {DEFAULT_EPISODES} episodes per fold, seed 0 (default %(default)s)",
    )
    group.add_argument(
        "--prompt-kind",
        choices=PROMPTS,
        default=None,
        help="visual = a support image and its mask (default for pascal5i / coco20i); text = the class name "
        "(default for phrasecut); phrasecut --prompt-kind visual takes the support from another task with the phrase",
    )
    group.add_argument(
        "--splits-dir", default=None, metavar="DIR", help="folder holding lists/pascal/val.txt (PFENet) and "
        "[data/]splits/ (HSNet) (default: --data-root)"
    )  # fmt: skip
    group.add_argument(
        "--unseen",
        type=int,
        choices=ZERO_SHOT_UNSEEN,
        default=10,
        help="voc-zeroshot: unseen classes (10 for models trained with --remove-classes zs:5, 4 for zs:2; "
        "default %(default)s)",
    )
    group.add_argument("--seed", type=int, default=None, help="episode seed (default: the protocol's, 123 or 0)")
    group.add_argument(
        "--episodes", type=int, default=DEFAULT_EPISODES, help="episodes per fold of hsnet and coco20i (default 1000)"
    )


def handles(args: argparse.Namespace) -> bool:
    """True when score.py must hand the run to this module."""
    return args.data in BENCHMARKS or args.prompt_kind == "visual"


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve the defaults that depend on the benchmark and refuse what cannot run (argparse errors)."""
    if args.threshold is None:
        args.threshold = DEFAULT_THRESHOLDS.get(args.data, 0.3)
    if args.prompt_kind is None:
        args.prompt_kind = "visual" if args.data in ("pascal5i", "coco20i") else "text"
    if args.data == "voc-zeroshot" and args.prompt_kind != "text":
        parser.error("voc-zeroshot is scored with the 21 class names: --prompt-kind text")
    if args.prompt_kind == "visual" and args.data in ("folder", "voc-zeroshot"):
        parser.error("--prompt-kind visual works with pascal5i, coco20i and phrasecut/synthetic")
    if args.data in ("pascal5i", "coco20i"):
        folds = PASCAL_FOLDS if args.data == "pascal5i" else COCO_FOLDS
        if args.fold != "all" and not (args.fold.isdigit() and int(args.fold) < folds):
            parser.error(f"--fold must be 0 .. {folds - 1} or all, got {args.fold}")
        args.folds = list(range(folds)) if args.fold == "all" else [int(args.fold)]
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    if FOLD_FIELD in args.model and len(getattr(args, "folds", [])) < 1:
        parser.error("a model name with {fold} needs --data pascal5i or coco20i")
    if args.seed is None:
        args.seed = default_seed(args.data, args.protocol)


class NothingScored(BenchmarkError):
    """Every episode, image or task was skipped."""


def run(args: argparse.Namespace, load: ModelLoader, world: Distributed | None = None) -> dict:
    """Score the benchmark `args` names and return the results (score.py prints and writes them). Data or a model
    that cannot be used stops with a message and exit status 2; nothing scored, exit status 1. world: under
    torchrun, this rank's share of every fold's episodes (images, tasks), every rank's merged (on every rank);
    ranks started with different models, flags or data stop with `RanksDisagree`."""
    world = world or Distributed()
    started = time.perf_counter()
    root = Path(args.data_root or DEFAULT_ROOTS.get(args.data) or datasets.DEFAULT_PHRASECUT_ROOT)
    splits = Path(args.splits_dir) if args.splits_dir else None
    settings = {
        "data": args.data,
        "data_root": str(root),
        "splits": str(splits or root),
        "protocol": args.protocol if args.data in ("pascal5i", "coco20i") else None,
        "prompt": args.prompt_kind,
        "seed": args.seed,
        "limit": args.limit,
        "threshold": args.threshold,
        "precision": args.precision,
    }
    save = Path(args.save_predictions) if args.save_predictions else None
    try:
        if args.data in ("pascal5i", "coco20i"):
            results = run_one_shot(args, load, root, splits, settings, save, world)
        elif args.data == "voc-zeroshot":
            results = run_zero_shot(args, load, root, settings, save, world)
        else:
            results = run_phrasecut_visual(args, load, root, settings, save, world)
    except NothingScored as err:
        stop(str(err), NOTHING_DONE)
    except (BenchmarkDataError, BenchmarkError, ValueError, OSError) as err:  # ValueError: NonFiniteOutput too
        stop(str(err))
    results["seconds"] = round(time.perf_counter() - started, 2)
    return results


def scores_name(args: argparse.Namespace) -> str:
    """The results file in score.py's --out folder: scores_<data>_<protocol>_<prompt kind>_fold<K>[_first<N>].json
    (pascal5i, coco20i), scores_voc-zeroshot_unseen<N>[...].json, scores_<data>_<split>_visual[...].json."""
    parts = [args.data]
    if args.data in ("pascal5i", "coco20i"):
        parts += [args.protocol, args.prompt_kind, f"fold{args.fold}"]
    elif args.data == "voc-zeroshot":
        parts.append(f"unseen{args.unseen}")
    else:
        parts += [args.split, "visual"]
    return "scores_" + "_".join(parts) + (f"_first{args.limit}" if args.limit else "") + ".json"


def job_flags(args: argparse.Namespace, settings: dict) -> dict:
    """The settings and flags that shape a benchmark's results, for the ranks' start-up check (no paths: the data
    may be mounted elsewhere on another node; its identity is checked by content)."""
    flags = {key: value for key, value in settings.items() if key not in ("data_root", "splits")}
    return {**flags, "batch_size": args.batch_size, "image_size": args.image_size, "resize": args.resize}


def run_one_shot(
    args: argparse.Namespace,
    load: ModelLoader,
    root: Path,
    splits: Path | None,
    settings: dict,
    save: Path | None,
    world: Distributed,
) -> dict:
    """Every fold of `args.folds`: its episodes, its model (per fold with a `{fold}` name), its metrics."""
    folds, skipped, sources, notes = {}, [], {}, {}
    model = source = None
    for fold in args.folds:
        if model is None or FOLD_FIELD in args.model:
            model, source = load(fold)
        episodes, reader, notes[fold] = fold_episodes(
            args.data, args.protocol, fold, root, splits, args.seed, args.episodes, progress=world.is_main
        )
        episodes = episodes[: args.limit]
        size = model.config.input_side(args.image_size)
        data = EpisodeData(args.data, args.protocol, args.prompt_kind, episodes, reader, size)
        keys = (f"{e.index} {e.query} {e.class_id} {e.support}" for e in episodes)
        check_same_job(world, model, {**job_flags(args, settings), "fold": fold}, keys)
        fold_run = FoldRun(EpisodeMetrics(args.threshold))
        score_episodes(
            model,
            data,
            fold_run,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            precision=args.precision,
            save_dir=save / f"fold{fold}" if save else None,
            description=f"fold {fold}",
            world=world,
        )
        sources[fold] = source
        folds[str(fold)] = {"model": source, "list": notes[fold], **fold_results(fold_run, args.data)}
        skipped += [{"fold": fold, **entry} for entry in fold_run.skips.reasons]
    if not any(fold["n_episodes"] for fold in folds.values()):
        raise NothingScored(f"no episode could be scored ({len(skipped)} skipped, e.g. {skipped[:1]})")
    models = sorted(set(sources.values()))
    return {
        "model": models[0] if len(models) == 1 else args.model,
        **settings,
        "image_size": size,
        "folds": args.folds,
        "n_samples": sum(fold["n_episodes"] for fold in folds.values()),
        "paper": mean_over_folds(folds, "paper"),
        "hsnet": mean_over_folds(folds, "hsnet"),
        "per_fold": folds,
        "per_class": [{"fold": int(f), **row} for f, fold in folds.items() for row in fold["per_class"]],
        "skipped": {"count": len(skipped), "episodes": skipped},
        "interrupted": False,
    }


def run_zero_shot(
    args: argparse.Namespace, load: ModelLoader, root: Path, settings: dict, save: Path | None, world: Distributed
) -> dict:
    model, source = load(None)
    seen, unseen = zero_shot_split(args.unseen)
    items = VocData(root).segmentation_val()[: args.limit]
    check_same_job(world, model, {**job_flags(args, settings), "unseen": args.unseen}, (item.id for item in items))
    size = model.config.input_side(args.image_size)
    metrics, skips = ZeroShotMetrics(seen, unseen), SkipLog()
    scored = score_zero_shot(
        model,
        ZeroShotData(items, size),
        metrics,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        precision=args.precision,
        save_dir=save,
        skips=skips,
        world=world,
    )
    skipped = skips.reasons
    if not scored:
        raise NothingScored(f"no image could be scored ({len(skipped)} skipped, e.g. {skipped[:1]})")
    return {
        "model": source,
        **settings,
        "image_size": size,
        "unseen": args.unseen,
        "unseen_classes": unseen,
        "n_samples": scored,
        **zero_shot_results(metrics),
        "skipped": {"count": len(skipped), "images": skipped},
        "interrupted": False,
    }


def run_phrasecut_visual(
    args: argparse.Namespace, load: ModelLoader, root: Path, settings: dict, save: Path | None, world: Distributed
) -> dict:
    """PhraseCut (or synthetic) with visual prompts; results in score.py's PhraseCut shape."""
    model, source = load(None)
    size = model.config.input_side(args.image_size)
    base = datasets.build_dataset(args.data, str(root), args.split, train=False, image_size=size, resize=args.resize)
    data = PhraseCutVisual(base, seed=args.seed)
    if args.limit:
        data.indices = data.indices[: args.limit]
    check_same_job(world, model, job_flags(args, settings), (base.task_info(i).task_id for i in data.indices))
    scores = score_phrasecut_visual(
        model,
        data,
        ScoreRun(threshold=args.threshold),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        precision=args.precision,
        save_dir=save,
        world=world,
    )
    skipped = scores.skips.reasons
    if not scores.n_samples:
        raise NothingScored(f"no task could be scored ({len(skipped)} skipped, {len(data.excluded)} unique phrases)")
    report = datasets.exclusion_report(base)
    report["excluded"]["tasks"] += [list(entry) for entry in data.excluded]  # tasks whose phrase is unique
    report["excluded"]["count"] = len(report["excluded"]["tasks"])
    return {
        "model": source,
        **settings,
        "split": args.split,
        "image_size": size,
        "resize": args.resize,
        "shuffle_prompts": False,
        "n_samples": scores.n_samples,
        "paper": scores.paper.compute(),
        "phrasecut": scores.official.compute(),
        "skipped": {"count": len(skipped), "samples": skipped},
        "duplicates_ignored": 0,
        **report,
        "interrupted": False,
    }


# ------------------------------------------------------------------------------------------------ tables


def format_results(results: dict) -> str:
    """Markdown tables of a one-shot or zero-shot run (values in %)."""
    if results["data"] == "voc-zeroshot":
        return format_zero_shot(results)
    header = (
        f"{results['model']} on {results['data']} ({results['protocol']} protocol, {results['prompt']} prompts, "
        f"seed {results['seed']}): {results['n_samples']} episodes, {results['skipped']['count']} skipped"
    )
    lines = [
        header,
        "",
        f"| fold | episodes | mIoU | IoU_FG | IoU_BIN | AP | best mIoU (t) | HSNet mIoU | FB-IoU |  (t = "
        f"{results['threshold']:.2f})",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(f, fold["n_episodes"], fold["paper"], fold["hsnet"]) for f, fold in results["per_fold"].items()]
    if len(rows) > 1:
        rows.append(("mean", results["n_samples"], results["paper"], results["hsnet"]))
    for name, count, paper, hsnet in rows:
        best = f"{percent(paper.get('miou_best'))} ({paper.get('miou_best_threshold', 0):.2f})" if paper else "-"
        lines.append(
            f"| {name} | {count} | {percent(paper.get('miou'))} | {percent(paper.get('iou_fg'))} | "
            f"{percent(paper.get('iou_bin'))} | {percent(paper.get('ap'))} | {best} | {percent(hsnet.get('miou'))} | "
            f"{percent(hsnet.get('fb_iou'))} |"
        )
    lines += ["", "| fold | class | episodes | IoU | IoU (HSNet) |", "|---|---|---|---|---|"]
    for row in results["per_class"]:
        lines.append(
            f"| {row['fold']} | {row['class']} | {row['n_episodes']} | {percent(row['iou'])} | "
            f"{percent(row['iou_hsnet'])} |"
        )
    return "\n".join(lines)


def format_zero_shot(results: dict) -> str:
    values = results["zero_shot"]
    lines = [
        f"{results['model']} on VOC zero-shot, unseen-{results['unseen']}: {results['n_samples']} images, "
        f"{results['skipped']['count']} skipped",
        "",
        "| mIoU seen | mIoU unseen | harmonic | mIoU (21) |",
        "|---|---|---|---|",
        f"| {percent(values['miou_seen'])} | {percent(values['miou_unseen'])} | {percent(values['harmonic'])} | "
        f"{percent(values['miou'])} |",
        "",
        "| class | seen | IoU |",
        "|---|---|---|",
    ]
    lines += [f"| {r['class']} | {'yes' if r['seen'] else 'no'} | {percent(r['iou'])} |" for r in results["per_class"]]
    return "\n".join(lines)
