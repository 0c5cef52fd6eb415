"""Train CLIPSeg's decoder (the CLIP backbone stays frozen): the released PhraseCut recipe, fine-tuning on your
own data, validation with a best model, exact resume, several GPUs.

    python train.py --name=pc --batch-size=64                           # the released recipe (docs/original.md §7)
    python train.py --name=pc --resume                                  # continue after a crash, kill or Ctrl-C
    python train.py --name=deconv --arch=clip-deconv                    # a baseline of the paper (README, "Baselines")
    python train.py --name=pc --val-interval=1000 --keep-checkpoints=10000,20000    # best/ by validation mIoU
    torchrun --nproc_per_node=4 train.py --name=pc --batch-size=64      # 4 GPUs (DDP); 64 is the global batch
    python train.py --name=mine --data=folder --data-root=my_masks.jsonl --init=CIDAS/clipseg-rd64-refined
    python -m clipseg.synthetic phrasecut --n-images=1500   # generated data for the CPU demo (`make demo`), then
    python train.py --name=demo --data=synthetic --backbone=tiny \
        --device=cpu --image-size=128 --batch-size=32 --max-iterations=4400 --ckpt=500 --num-workers=1 --refined \
        --reduce-dim=64 --extract-layers=0,1,2 --lr=1.5e-3 --dropout=0 --whole-image-prob=0.5 --precision=fp32 \
        --val-interval=1100 --val-samples=200 --prompts-per-image=2 --negative-prob=0.1

Everything a run writes goes to `checkpoints/<name>/` (see clipseg/runs.py): `args.json`, the model
(`CLIPSeg.from_pretrained("checkpoints/<name>")`; decoder-only while training, complete at the end), `best/` and
`iter_NNNNNN/` (complete models), `train_state.pt`, `log.jsonl` and `loss.png`. Every file is written atomically, so
a kill at any moment leaves the last checkpoint intact.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import dataset as datasets
from clipseg import runs
from clipseg.cli import BAD_INPUT, NOTHING_DONE
from clipseg.distributed import Distributed, run_and_exit
from clipseg.runs import RunFiles
from clipseg.sampling import (
    InfiniteBatchSampler,
    batches_from,
    build_loader,
    setup_distributed,
    threads_beside_workers,
)
from clipseg.train_args import (
    RUN_PLAN_FLAGS,
    TrainingError,
    build_model,
    build_training_set,
    parse_args,
    resume_model,
    stored_args,
    write_args,
)
from clipseg.training import Summary, TrainingLoop, Validation
from model import CLIPSeg, TextCache


class RunNotStarted(TrainingError):
    """The run could not start: flags, data, a model, a run to resume or a run folder that cannot be used."""


def train(args: argparse.Namespace, dataset: Dataset | None = None) -> Summary:
    """Run (or resume) the training described by `args`; `dataset` replaces the one --data names (tests). Raises
    RunNotStarted when the run cannot start, TrainingError when it stops."""
    try:
        args, world, device, loop, loader = start(args, dataset)
    except TrainingError as err:
        raise RunNotStarted(str(err)) from err
    try:
        with batches_from(loader) as batches, threads_beside_workers(device, args.num_workers):
            return loop.run(batches)
    finally:
        if world.enabled:
            dist.destroy_process_group()


def start(args: argparse.Namespace, dataset: Dataset | None) -> tuple:
    """Set the run up: (args, stored ones on --resume; the process group; the device; the training loop, restored on
    --resume; the batches' loader). Raises TrainingError when it cannot."""
    try:
        world, device = setup_distributed(args.device)
    except ValueError as err:
        raise TrainingError(str(err)) from err
    files = RunFiles(Path(args.checkpoints_dir) / args.name)
    if args.resume:
        args = stored_args(files, args)
    elif files.state.exists():
        raise TrainingError(
            f"{files.dir} already holds a run (checkpoint {files.state.name}); pass --resume to continue it or "
            "choose another --name"
        )
    crops = args.batch_size // args.prompts_per_image
    if crops % world.world_size:
        raise TrainingError(
            f"--batch-size={args.batch_size} gives {crops} image crops per batch, not divisible by the "
            f"{world.world_size} processes"
        )
    try:
        state = runs.load_state(files) if args.resume else None
    except ValueError as err:
        raise TrainingError(str(err)) from err
    model = resume_model(files, args) if args.resume else build_model(args)
    model.text_cache = TextCache(max(args.text_cache_size, 2 * args.batch_size))
    model.to(device).train()
    if world.is_main:
        try:
            runs.check_run_writable(files.dir, runs.checkpoint_bytes(model))
        except runs.CheckpointWriteError as err:
            raise TrainingError(str(err)) from err
        if not args.resume or set(RUN_PLAN_FLAGS) & set(args.explicit):  # a resume that changes the plan records it
            try:
                write_args(files, args, world)
            except OSError as err:
                raise TrainingError(f"{files.args} cannot be written ({err}); free space and start again") from err
    if world.enabled:
        dist.barrier()

    dataset = dataset if dataset is not None else build_training_set(args)
    validation = Validation.of(args) if args.val_interval else None
    loop = TrainingLoop(args, model, files, world, device, validation)
    if state is not None:
        try:
            loop.restore(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:  # parts of another model or optimiser
            raise TrainingError(f"{files.state} does not fit this run ({err}): it is damaged or from another") from err
    if not len(dataset):
        raise TrainingError("the training set is empty")
    sampler = InfiniteBatchSampler(len(dataset), crops, args.seed, loop.step, world)
    loader = build_loader(dataset, sampler, args.num_workers, pin=device.type == "cuda")
    if world.is_main:
        announce(args, model, dataset, world, device, loop.dtype, loop.step, validation)
        records = runs.read_log(files.log, up_to_step=loop.step)
        if getattr(args, "remove_classes", None):
            removed = removed_count(dataset)
            records.append({"step": loop.step, "remove_classes": args.remove_classes, "removed": removed})
        if datasets.exclusion_note(dataset):  # tasks and bad polygons left out while indexing: counts and examples
            records.append({"step": loop.step, **datasets.exclusion_summary(dataset)})
        try:
            runs.rewrite_log(files.log, records)
        except OSError as err:
            raise TrainingError(f"{files.log} cannot be written ({err}); free space and try again") from err
        for leftover in files.dir.glob(".*.tmp"):  # from a write cut short by a kill
            leftover.unlink()
    if loop.step >= args.max_iterations:
        print(f"{files.dir} is already at iteration {loop.step}: raise --max-iterations to train longer")
    return args, world, device, loop, loader


def announce(
    args: argparse.Namespace,
    model: CLIPSeg,
    dataset: Dataset,
    world: Distributed,
    device: torch.device,
    dtype: torch.dtype | None,
    start_step: int,
    validation: Validation | None,
) -> None:
    trainable = sum(p.numel() for p in model.decoder.parameters())
    left_out = datasets.exclusion_note(dataset)
    per_image = f", {args.prompts_per_image} prompts per image crop" if args.prompts_per_image > 1 else ""
    print(
        f"{'resuming' if start_step else 'training'} {args.name} at iteration {start_step}/{args.max_iterations}: "
        f"{len(dataset)} training samples ({args.data}), {trainable:,} trainable parameters, batch {args.batch_size}"
        f"{per_image} on {world.world_size} x {device}, precision "
        f"{precision_description(args.precision, dtype, device)}"
        + (
            f"; validating {len(validation.tasks)} {args.val_split} tasks every {args.val_interval}"
            if validation
            else ""
        )
        + (f"; while indexing: {left_out}" if left_out else "")
        + (
            f"; --remove-classes {args.remove_classes} removed {removed_count(dataset)} task(s)"
            if getattr(args, "remove_classes", None)
            else ""
        ),
        flush=True,
    )


def removed_count(dataset: Dataset) -> int | None:
    """Tasks --remove-classes dropped (None for a data set that was not filtered)."""
    return getattr(dataset, "removed", None)


def precision_description(precision: str, dtype: torch.dtype | None, device: torch.device) -> str:
    """What the training steps run in: mixed bf16 or fp16 where --precision bf16 has them, else fp32 (and why)."""
    if dtype is not None:
        return f"{precision} (mixed, {str(dtype).removeprefix('torch.')})"
    if precision == "fp32":
        return "fp32"
    if device.type == "cpu":
        return "fp32 (no native bf16 on this CPU: fp32 is faster)"
    return f"fp32 (no mixed precision on {device.type})"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 trained (or nothing left to train); 2 bad flags or a run that cannot start (its data, model, run to
    resume or run folder); 1 a run that stopped (a checkpoint that could not be written, a loss or validation that
    is not finite); 130 stopped by Ctrl-C or SIGTERM after saving a checkpoint."""
    args = parse_args(argv)
    try:
        summary = train(args)
    except TrainingError as err:
        print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        return BAD_INPUT if isinstance(err, RunNotStarted) else NOTHING_DONE
    return 130 if summary.stopped_early else 0


if __name__ == "__main__":
    run_and_exit(main)
