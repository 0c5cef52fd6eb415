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
        --reduce-dim=64 --extract-layers=0,1,2 --lr=1.5e-3 --dropout=0 --whole-image-prob=0.5 --no-amp \
        --val-interval=1100 --val-samples=200 --prompts-per-image=2 --negative-prob=0.1

Everything a run writes goes to `checkpoints/<name>/` (see checkpoints.py): `args.json`, the model
(`CLIPSeg.from_pretrained("checkpoints/<name>")`; decoder-only while training, complete at the end), `best/` and
`iter_NNNNNN/` (complete models), `train_state.pt`, `log.jsonl` and `loss.png`. Every file is written atomically, so
a kill at any moment leaves the last checkpoint intact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

import dataset as datasets
from clipseg import runs
from clipseg.baselines import tiny_vit_config
from clipseg.benchmarks.classes import WordNetMissing
from clipseg.config import DEFAULT_BACKBONE, RANDOM_BACKBONES, tiny_clip_config
from clipseg.inference import predict_tasks
from clipseg.metrics import PaperMetrics
from clipseg.outputs import json_text
from clipseg.precision import amp_dtype as model_amp_dtype
from clipseg.runs import RunFiles
from clipseg.sampling import (
    Distributed,
    InfiniteBatchSampler,
    all_reduce_sum,
    batches_from,
    build_loader,
    derived_seed,
    setup_distributed,
    threads_beside_workers,
)
from clipseg.train_args import datasets_default, parse_args
from clipseg.transforms import NonFiniteOutput
from model import CLIPSeg, TextCache

# Flags that may differ from the stored run arguments when resuming; all others must match.
RESUME_OVERRIDABLE = (
    "max_iterations", "ckpt", "num_workers", "device", "compile", "log_every", "checkpoints_dir", "keep_checkpoints",
)  # fmt: skip


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def build_training_set(args: argparse.Namespace) -> Dataset:
    root = data_root(args)
    if args.data == "phrasecut" and not Path(root).exists():
        raise TrainingError(
            f"PhraseCut not found at {root}: download it (README, 'Getting PhraseCut') or pass --data-root; "
            "--data=synthetic trains on generated data instead"
        )
    if args.data == "folder" and not Path(root).is_file():
        raise TrainingError(f"--data-root={root}: no such index file (a JSONL or CSV of image, phrase, mask)")
    removal = {"remove_classes": args.remove_classes} if getattr(args, "remove_classes", None) else {}
    try:
        return datasets.build_dataset(
            args.data,
            root,
            args.split,
            train=True,
            image_size=args.image_size,
            negative_prob=args.negative_prob,
            whole_image_prob=args.whole_image_prob,
            resize=args.resize,
            visual_support=args.mix,
            templates=datasets.PROMPT_TEMPLATES[prompt_templates(args)],
            colour_jitter=args.aug_color,
            prompts_per_image=args.prompts_per_image,
            seed=args.seed,
            **removal,
        )
    except WordNetMissing as err:
        raise TrainingError(f"--remove-classes {args.remove_classes}: {err}") from err


def data_root(args: argparse.Namespace) -> str | None:
    return args.data_root or (datasets_default(args.data) if args.data != "folder" else None)


def prompt_templates(args: argparse.Namespace) -> str:
    """The template list: --prompt-templates, else the released runs' choice (shuffle+ with --mix, plain without)."""
    return args.prompt_templates or ("shuffle+" if args.mix else "plain")


# --------------------------------------------------------------------------------------------- the model


def build_model(args: argparse.Namespace) -> CLIPSeg:
    """A fresh decoder on a backbone (CLIPSeg or the baseline --arch names), or weights from --init; structural
    flags left unset keep the defaults of the architecture, the backbone or the checkpoint. Flags that do not fit
    the backbone (an image size off its patch grid, the refined head on another patch size) are a TrainingError."""
    knobs = {"image_size": args.image_size, "dropout": args.dropout}
    for knob in ("arch", "refined", "reduce_dim", "extract_layers", "text_backbone"):
        if getattr(args, knob, None) is not None:
            knobs[knob] = getattr(args, knob)
    torch.manual_seed(derived_seed(args.seed, 0, 2))  # same random init on every rank
    try:
        if args.init is not None:
            return CLIPSeg.from_pretrained(args.init, backbone=args.backbone, **knobs)
        if args.backbone == "tiny":
            knobs["clip"] = tiny_clip_config(vision_layers=args.tiny_layers, width=args.tiny_width)
            if args.arch == "vitseg":
                knobs["vit"] = tiny_vit_config(layers=args.tiny_layers, width=args.tiny_width)
        return CLIPSeg.from_backbone(args.backbone, **knobs)
    except (OSError, ValueError) as err:
        raise TrainingError(f"cannot build the model from these flags: {err}") from err


def resume_model(files: RunFiles, args: argparse.Namespace) -> CLIPSeg:
    """The run's model as its last checkpoint wrote it (decoder-only or complete). Its CLIP keeps coming from the
    run's own source (--init or --backbone), never from the run directory, whose complete weights the next
    decoder-only checkpoint replaces."""
    try:
        model = CLIPSeg.from_pretrained(files.dir)
    except (OSError, ValueError) as err:
        raise TrainingError(f"--resume: cannot load the run's model: {err}") from err
    if model.config.clip_source == str(files.dir.resolve()):
        model.config.clip_source = build_model_source(args)
    return model


def build_model_source(args: argparse.Namespace) -> str | None:
    """Where build_model(args) takes its CLIP from, as `config.clip_source` records it (None: random)."""
    if args.init is not None and Path(args.init).suffix not in (".pth", ".pt"):
        return str(Path(args.init).resolve()) if Path(args.init).exists() else args.init
    backbone = args.backbone or DEFAULT_BACKBONE
    if backbone == "tiny" or backbone in RANDOM_BACKBONES or getattr(args, "arch", None) == "vitseg":
        return None
    return str(Path(backbone).resolve()) if Path(backbone).exists() else backbone


@dataclass
class Prompts:
    """A training batch's N = B x K prompts, flattened: phrases, (N, 1, S, S) targets, and (PC+) which prompts
    have a support image and the (N, 3, S, S) prompt images."""

    phrases: list[str]
    targets: Tensor
    has_support: Tensor | None = None
    prompt_images: Tensor | None = None

    @classmethod
    def of(cls, batch: dict) -> Prompts:
        """The prompts of a collated batch, one per sample or (--prompts-per-image K) K per sample."""
        several = batch["mask"].ndim == 5

        def flat(values):
            return [v for vs in values for v in vs] if several else list(values)

        prompts = cls(flat(batch["phrase"]), batch["mask"].flatten(0, 1) if several else batch["mask"])
        if "prompt_image" in batch:
            prompts.has_support = torch.as_tensor(flat(batch["has_prompt_image"]), dtype=torch.bool)
            images = batch["prompt_image"]
            prompts.prompt_images = images.flatten(0, 1) if several else images
        return prompts


def conditionals(model: CLIPSeg, prompts: Prompts, mix_range: tuple[float, float], device: torch.device) -> Tensor:
    """(N, 512) conditional vectors: the text embeddings (through the bounded cache; the batch's cached phrases
    are marked as recently used so that adding the new ones cannot evict them), or with supports (PC+)
    w * text + (1 - w) * visual with w ~ U(A, B) per prompt, and w = 1 for prompts without a support image."""
    model.text_cache.touch(prompts.phrases)
    text = model.embed_text(prompts.phrases).float()
    if prompts.has_support is None or not prompts.has_support.any():
        return text
    low, high = mix_range
    has = prompts.has_support
    weights = torch.ones(len(text))
    weights[has] = low + (high - low) * torch.rand(int(has.sum()))
    visual = torch.zeros_like(text)
    visual[has.to(device)] = model.embed_images(prompts.prompt_images[has].to(device)).float()
    weights = weights.to(device)[:, None]
    return weights * text + (1 - weights) * visual


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """--amp: bf16 where native, fp16 with a gradient scaler on GPUs without bf16, fp32 on CPUs without native bf16
    (see `model.amp_dtype`); None without --amp."""
    return model_amp_dtype(device) if amp else None


def learning_rate_factor(step: int, max_iterations: int, schedule: str, warmup: int = 0) -> float:
    """The learning rate at iteration `step` over --lr. cosine: from 1 to 0.1 over the run (the recipe's
    CosineAnnealingLR to 1e-4 from 1e-3, no warm-up); warmup_cosine: the original trainer's (step + 1) / (warmup +
    1) for `warmup` iterations, then a cosine from 1 to 0; none: constant."""
    if schedule == "none":
        return 1.0
    if schedule == "warmup_cosine":
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 + 0.5 * math.cos(math.pi * min(step - warmup, max_iterations - warmup) / (max_iterations - warmup))
    progress = min(step, max_iterations) / max_iterations
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------- validation


@dataclass
class Validation:
    """The validation pass: a fixed, seeded subset of a test-mode split, predicted as score.py does
    (`inference.predict_tasks`: whole images, raw phrases, no negatives)."""

    data: Dataset
    tasks: list[int]
    batch_size: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Validation:
        try:
            data = datasets.build_dataset(
                args.data, data_root(args), args.val_split, train=False, image_size=args.image_size,
                resize=args.resize, **({"unmarked": False} if args.data == "folder" else {}),
            )  # fmt: skip
        except (OSError, ValueError) as err:
            raise TrainingError(f"cannot read the validation split {args.val_split!r} of {args.data}: {err}") from err
        order = np.random.default_rng(derived_seed(args.seed, 4)).permutation(len(data))
        return cls(data, sorted(int(i) for i in order[: args.val_samples]), max(1, args.batch_size // 4))

    def run(self, model: CLIPSeg, precision: str) -> dict[str, float]:
        """val_loss (mean per-task BCE at S x S) and the paper's val_miou, val_iou_fg, val_ap at t = 0.3."""
        was_training = model.training
        model.eval()
        paper, loss_sum, count = PaperMetrics(), 0.0, 0
        for batch in predict_tasks(
            model,
            self.data,
            batch_size=self.batch_size,
            precision=precision,
            tasks=self.tasks,
            description="validation",
        ):
            targets = batch.fields["mask"]
            paper.update(torch.sigmoid(batch.logits), targets)
            losses = F.binary_cross_entropy_with_logits(batch.logits, targets, reduction="none").mean(dim=(1, 2, 3))
            loss_sum, count = loss_sum + float(losses.sum()), count + len(batch)
        model.train(was_training)
        if not count:
            raise TrainingError("no validation task could be read (see the warnings above)")
        scores = paper.compute()
        return {"val_loss": loss_sum / count, **{f"val_{key}": scores[key] for key in ("miou", "iou_fg", "ap")}}


@dataclass
class Best:
    """The best validation so far (lower is better for the loss, higher for the paper's metrics)."""

    metric: str
    value: float | None = None
    step: int | None = None

    def improved_by(self, value: float) -> bool:
        if self.value is None:
            return True
        return value < self.value if self.metric == "loss" else value > self.value


# --------------------------------------------------------------------------------------------- training


# ------------------------------------------------------------------------------------------ stopping


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits at the end of the iteration. A second
    Ctrl-C interrupts at once (the last checkpoint stays intact)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this iteration (Ctrl-C again to abort)")

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class Summary:
    """What a finished (or stopped) run reports."""

    step: int
    max_iterations: int
    final_loss: float
    samples_per_second: float
    seconds: float
    skipped: int
    skip_reasons: Counter = field(default_factory=Counter)
    stopped_early: bool = False
    run_dir: str = ""
    best: Best | None = None

    def line(self) -> str:
        reasons = "; ".join(f"{n}x {r}" for r, n in self.skip_reasons.most_common(3))
        return (
            f"{'stopped' if self.stopped_early else 'finished'} at iteration {self.step}/{self.max_iterations}: "
            + (f"loss {self.final_loss:.4f} (last log interval), " if math.isfinite(self.final_loss) else "")
            + f"{self.samples_per_second:.1f} samples/s overall, "
            f"{self.seconds / 60:.1f} min; {self.skipped} sample(s) skipped"
            + (f" ({reasons})" if reasons else "")
            + f"; model in {self.run_dir}"
            + (
                f"; best validation {self.best.metric} {self.best.value:.4f} at iteration {self.best.step} in "
                f"{self.run_dir}/{runs.BEST_NAME}"
                if self.best is not None
                else ""
            )
        )


class NonFiniteLoss(TrainingError):
    pass


@dataclass
class LogInterval:
    """Sums over the iterations since the last log line."""

    loss_sum: float = 0.0
    iterations: int = 0
    started: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds spent validating and writing checkpoints


class TrainingLoop:
    """One run: the optimiser, schedule and precision for the decoder, the training step through
    `CLIPSeg.forward(labels=...)`, validation, checkpoints and logs."""

    def __init__(
        self,
        args: argparse.Namespace,
        model: CLIPSeg,
        files: RunFiles,
        world: Distributed,
        device: torch.device,
        validation: Validation | None = None,
    ):
        self.args, self.model, self.files, self.world, self.device = args, model, files, world, device
        self.validation = validation
        self.dtype = amp_dtype(device, args.amp)
        self.optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=args.lr, weight_decay=args.wd)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: learning_rate_factor(step, args.max_iterations, args.lrs, getattr(args, "warmup", 0)),
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        if args.compile:
            model.decoder.compile()
        self.network = model
        if world.enabled:  # gradients of the trainable decoder are averaged; the frozen CLIP needs none
            self.network = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.best = Best(getattr(args, "val_metric", "miou"))
        self.keep = set(getattr(args, "keep_checkpoints", None) or ())
        self.step = 0
        self.last_saved_step: int | None = None
        self.optimising = False
        self.skipped = 0
        self.skip_reasons: Counter = Counter()
        self.interval = LogInterval()
        self.last_loss = float("nan")
        self.last_validation: dict[str, float] = {}
        self.started = time.perf_counter()

    def restore(self, state: dict) -> None:
        """Continue from a training state (train_state.pt)."""
        self.model.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.last_saved_step = state["step"]
        best = state.get("best") or {}
        self.best = Best(self.best.metric, best.get("value"), best.get("step"))

    def state(self) -> dict:
        """Plain containers and tensors only, so that resume can load it with `torch.load(weights_only=True)`.

        The RNG streams are functions of (seed, step, rank) (reseeded every iteration), so seed and step restore
        them exactly."""
        return {
            "format": runs.STATE_FORMAT,
            "step": self.step,
            "seed": self.args.seed,
            "global_batch": self.args.batch_size,
            "samples_seen": self.step * self.args.batch_size,
            "decoder": {k: v.detach().cpu().clone() for k, v in self.model.decoder.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best": {"metric": self.best.metric, "value": self.best.value, "step": self.best.step},
        }

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step_loss(self, batch: dict) -> Tensor:
        """One forward pass of a batch: B image crops, N = B x K prompts with their (N, 1, S, S) targets; the
        model's BCE-with-logits loss (fp32)."""
        prompts = Prompts.of(batch)
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        with self.autocast():
            conditional = conditionals(self.model, prompts, self.args.mix_range, self.device)
            labels = prompts.targets.to(self.device, non_blocking=True)
            return self.network(pixels, conditional=conditional, labels=labels).loss

    def optimise(self, loss: Tensor) -> None:
        self.optimising = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():  # the schedule is per iteration, also when the fp16 scaler skipped a step
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        self.step += 1
        self.optimising = False

    def save_after_crash(self, log, err: Exception) -> None:
        """An unexpected error (a killed DataLoader worker, a data bug) raised outside the optimizer update leaves
        the weights of iteration `self.step` complete and consistent: save them before the error propagates. Not
        under DDP, where the other ranks may be gone."""
        if self.optimising or self.world.enabled or self.step == self.last_saved_step:
            return
        tqdm.write(f"{type(err).__name__}: saving iteration {self.step} before stopping")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the DataLoader's handler would re-raise a worker's death
        self.save(log)

    def replica_checksums(self) -> list[float]:
        """One float64 checksum of the decoder weights per rank; DDP keeps replicas identical, so any
        difference means the gradient averaging failed and the run stops."""
        weights = torch.cat([p.detach().double().flatten() for p in self.model.decoder.parameters()])
        positions = torch.arange(1, len(weights) + 1, dtype=torch.float64, device=weights.device)
        local = (weights * (1 + positions.remainder(97))).sum().reshape(1)
        if not self.world.enabled:
            return local.tolist()
        gathered = [torch.zeros_like(local) for _ in range(self.world.world_size)]
        dist.all_gather(gathered, local)
        return torch.cat(gathered).tolist()

    def save(self, log, complete: bool = False) -> None:
        """A checkpoint: the model (decoder-only unless `complete` or the backbone is random), then the training
        state, each atomic (the state is the commit point: --resume reads it); then the kept copy when this
        iteration is one of --keep-checkpoints, and the loss plot."""
        checksums = self.replica_checksums()
        if len(set(checksums)) > 1:
            raise TrainingError(f"the {len(checksums)} DDP replicas hold different weights at iteration {self.step}")
        if self.world.is_main:
            with self.writing(f"the checkpoint of iteration {self.step}"):
                runs.save_model(self.model, self.files.dir, complete)
                runs.save_state(self.files, self.state())
            self.last_saved_step = self.step
            if self.step in self.keep:
                with self.writing(f"the kept copy {self.files.kept(self.step).name}"):
                    runs.save_complete(self.model, self.files.kept(self.step))
            with self.writing("the loss plot"):
                runs.plot_log(self.files, self.args.name)
            if log is not None:
                log.write(json_text({"step": self.step, "checkpoint": True, "replica_checksums": checksums}) + "\n")
                log.flush()
        self.last_saved_step = self.step

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """A failed write (a full disk, permissions) of the run's files is a TrainingError saying that the last
        checkpoint written is intact (every file is replaced atomically) and how to go on."""
        try:
            yield
        except OSError as err:
            kept = f"iteration {self.last_saved_step}" if self.last_saved_step is not None else "none yet"
            raise TrainingError(
                f"could not write {what} to {self.files.dir}: {err}; the last checkpoint written ({kept}) is intact; "
                "free space and continue with --resume"
            ) from err

    def validate(self, log, progress: tqdm) -> None:
        """Score the validation subset; a better --val-metric replaces best/ (a complete model)."""
        if self.world.is_main:
            try:
                scores = self.validation.run(self.model, "fp32" if self.dtype is None else "bf16")
            except NonFiniteOutput as err:
                raise TrainingError(f"validation at iteration {self.step} stopped: {err}") from err
            value = scores[f"val_{self.best.metric}"]
            improved = self.best.improved_by(value)
            if improved:
                self.best = Best(self.best.metric, value, self.step)
                info = {"step": self.step, "metric": self.best.metric, "value": value, **scores}
                with self.writing(f"the best model ({self.files.best.name}/) of iteration {self.step}"):
                    runs.save_complete(self.model, self.files.best, info)
            self.last_validation = scores
            progress.set_postfix(self.postfix())
            if log is not None:
                log.write(json_text({"step": self.step, **scores, "best": improved}) + "\n")
                log.flush()
        if self.world.enabled:
            dist.barrier()

    def postfix(self) -> dict[str, str]:
        shown = {"loss": f"{self.last_loss:.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}
        if self.last_validation:
            shown["val_" + self.best.metric] = f"{self.last_validation['val_' + self.best.metric]:.3f}"
        return shown

    def run(self, batches: Iterator[dict]) -> Summary:
        args, world = self.args, self.world
        start_step, self.started = self.step, time.perf_counter()
        self.interval = LogInterval()
        progress = tqdm(
            total=args.max_iterations, initial=start_step, disable=not world.is_main, desc=args.name, dynamic_ncols=True
        )
        with (
            progress,
            StopRequest() as stop,
            open(self.files.log, "a") if world.is_main else contextlib.nullcontext() as log,
        ):
            stop_flag = False
            while self.step < args.max_iterations and not stop_flag:
                try:
                    stop_flag = self.iteration(batches, stop, log, progress)
                except TrainingError:
                    raise
                except Exception as err:
                    self.save_after_crash(log, err)
                    raise
        seconds = time.perf_counter() - self.started
        summary = Summary(
            step=self.step,
            max_iterations=args.max_iterations,
            final_loss=self.last_loss,
            samples_per_second=(self.step - start_step) * args.batch_size / seconds,
            seconds=seconds,
            skipped=self.skipped,
            skip_reasons=self.skip_reasons,
            stopped_early=self.step < args.max_iterations,
            run_dir=str(self.files.dir),
            best=self.best if self.best.step is not None else None,
        )
        if world.is_main:
            print(summary.line(), flush=True)
        return summary

    def iteration(self, batches: Iterator[dict], stop: StopRequest, log, progress: tqdm) -> bool:
        """One optimizer step, then logging, validation and checkpointing as due; returns whether a stop was
        requested."""
        args, world = self.args, self.world
        torch.manual_seed(derived_seed(args.seed, self.step, world.rank, 3))  # dropout, mixing weights
        batch = next(batches)
        loss = self.step_loss(batch)
        loss_sum, non_finite, stop_flag, skipped = all_reduce_sum(
            [loss.item(), float(not torch.isfinite(loss)), float(stop.requested), len(batch["skipped"])],
            world,
            self.device,
        )
        self.skipped += int(skipped)
        self.skip_reasons.update(reason for _, reason in batch["skipped"])
        if non_finite:
            self.fail_non_finite(self.step + 1, batch)
        self.optimise(loss)
        self.interval.loss_sum += loss_sum / world.world_size
        self.interval.iterations += 1
        progress.update(1)
        step, last = self.step, self.step == args.max_iterations
        if step % args.log_every == 0 or last or stop_flag:
            self.log_interval(log, progress)
        paused = time.perf_counter()  # throughput excludes validation and checkpoint writes
        if self.validation is not None and (step % args.val_interval == 0 or last):
            self.validate(log, progress)
        if step % args.ckpt == 0 or last or stop_flag or step in self.keep:
            self.save(log, complete=last)
        self.interval.paused += time.perf_counter() - paused
        return bool(stop_flag)

    def log_interval(self, log, progress: tqdm) -> None:
        now = time.perf_counter()
        seconds = now - self.interval.started - self.interval.paused
        samples_per_second = self.interval.iterations * self.args.batch_size / seconds
        self.last_loss = self.interval.loss_sum / self.interval.iterations
        progress.set_postfix(self.postfix() | {"samples_s": f"{samples_per_second:.1f}"})
        if log is not None:
            record = dict(step=self.step, loss=self.last_loss, lr=self.scheduler.get_last_lr()[0],
                          samples_per_s=samples_per_second, skipped=self.skipped,
                          time=round(now - self.started, 3))  # fmt: skip
            log.write(json_text(record) + "\n")
            log.flush()
        self.interval = LogInterval(started=now)

    def fail_non_finite(self, step: int, batch: dict) -> None:
        kept = (
            f"the last good checkpoint (iteration {self.last_saved_step}) in {self.files.dir} is kept"
            if self.last_saved_step is not None
            else "no checkpoint was written in this session"
        )
        tasks = ", ".join(str(t) for t in batch.get("task_id", [])[:4])
        raise NonFiniteLoss(
            f"non-finite loss at iteration {step} (batch tasks {tasks} ...): stopping without saving; {kept}. "
            "Lower --lr, try --no-amp, or check the data; continue from the checkpoint with --resume"
        )


def train(args: argparse.Namespace, dataset: Dataset | None = None) -> Summary:
    """Run (or resume) the training described by `args`; `dataset` replaces the one --data names (tests)."""
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
        if not args.resume:
            write_args(files, args, world)
    if world.enabled:
        dist.barrier()

    dataset = dataset if dataset is not None else build_training_set(args)
    validation = Validation.of(args) if args.val_interval else None
    loop = TrainingLoop(args, model, files, world, device, validation)
    if state is not None:
        loop.restore(state)
    if not len(dataset):
        raise TrainingError("the training set is empty")
    sampler = InfiniteBatchSampler(len(dataset), crops, args.seed, loop.step, world)
    loader = build_loader(dataset, sampler, args.num_workers, pin=device.type == "cuda")
    if world.is_main:
        announce(args, model, dataset, world, device, loop.dtype, loop.step, validation)
        runs.rewrite_log(files.log, runs.read_log(files.log, up_to_step=loop.step))
        if getattr(args, "remove_classes", None):
            record = {"step": loop.step, "remove_classes": args.remove_classes, "removed": removed_count(dataset)}
            with open(files.log, "a") as log:
                log.write(json_text(record) + "\n")
        if datasets.exclusion_note(dataset):  # tasks and bad polygons left out while indexing: counts and examples
            with open(files.log, "a") as log:
                log.write(json_text({"step": loop.step, **datasets.exclusion_summary(dataset)}) + "\n")
        for leftover in files.dir.glob(".*.tmp"):  # from a write cut short by a kill
            leftover.unlink()
    if loop.step >= args.max_iterations:
        print(f"{files.dir} is already at iteration {loop.step}: raise --max-iterations to train longer")
    try:
        with batches_from(loader) as batches, threads_beside_workers(device, args.num_workers):
            return loop.run(batches)
    finally:
        if world.enabled:
            dist.destroy_process_group()


def announce(args, model, dataset, world, device, dtype, start_step: int, validation: Validation | None) -> None:
    trainable = sum(p.numel() for p in model.decoder.parameters())
    left_out = datasets.exclusion_note(dataset)
    per_image = f", {args.prompts_per_image} prompts per image crop" if args.prompts_per_image > 1 else ""
    print(
        f"{'resuming' if start_step else 'training'} {args.name} at iteration {start_step}/{args.max_iterations}: "
        f"{len(dataset)} training samples ({args.data}), {trainable:,} trainable parameters, batch {args.batch_size}"
        f"{per_image} on {world.world_size} x {device}, amp {amp_description(args.amp, dtype, device)}"
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


def amp_description(requested: bool, dtype: torch.dtype | None, device: torch.device) -> str:
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    if not requested:
        return "off"
    if device.type == "cpu":
        return "off (no native bf16 on this CPU: fp32 is faster)"
    return f"off (no mixed precision on {device.type})"


def stored_args(files: RunFiles, args: argparse.Namespace) -> argparse.Namespace:
    """For --resume: the run's stored arguments, with the flags that may change taken from the command line.
    Any other flag given with a different value is an error (it would silently not apply)."""
    if not files.state.exists():
        raise TrainingError(
            f"--resume: {files.state} does not exist: {files.dir} has no checkpoint yet; start the run without --resume"
        )
    if not files.args.exists():
        raise TrainingError(f"--resume: {files.args} not found; is {files.dir} a run directory of train.py?")
    stored = json.loads(files.args.read_text())
    conflicts = [
        f"--{key.replace('_', '-')}={getattr(args, key)} (run has {stored.get(key)})"
        for key in args.explicit
        if key not in RESUME_OVERRIDABLE + ("resume", "name") and _jsonable(getattr(args, key)) != stored.get(key)
    ]
    if conflicts:
        raise TrainingError(
            f"--resume continues {files.dir} with its stored arguments; these differ: {', '.join(conflicts)}. "
            f"Drop them, or start a new run with another --name (only {', '.join(RESUME_OVERRIDABLE)} may change)"
        )
    merged = {**vars(args), **stored}  # a flag newer than the run keeps its default (the run did without it)
    for key in RESUME_OVERRIDABLE:
        merged[key] = getattr(args, key)
    merged["resume"], merged["explicit"] = True, args.explicit
    for key in ("extract_layers", "mix_range", "keep_checkpoints"):
        if merged.get(key) is not None:
            merged[key] = tuple(merged[key])
    return argparse.Namespace(**merged)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def write_args(files: RunFiles, args: argparse.Namespace, world: Distributed) -> None:
    record = {k: _jsonable(v) for k, v in vars(args).items() if k not in ("explicit", "resume")}
    record["world_size"] = world.world_size
    runs.write_args(files, record)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = train(args)
    except TrainingError as err:
        print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 130 if summary.stopped_early else 0


if __name__ == "__main__":
    sys.exit(main())
