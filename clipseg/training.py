"""The training loop of train.py: the conditional vectors of a batch's prompts, the learning-rate schedule,
the step (mixed precision, gradient scaling, non-finite losses), logging, validation with a best model, checkpoints
with exact resume, stop requests (Ctrl-C, SIGTERM) and the run's summary.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

import dataset as datasets
from clipseg import runs
from clipseg.inference import predict_tasks
from clipseg.metrics import PaperMetrics
from clipseg.outputs import json_text
from clipseg.precision import amp_dtype as model_amp_dtype
from clipseg.runs import RunFiles
from clipseg.samples import Batch
from clipseg.sampling import (
    Distributed,
    all_reduce_sum,
    derived_seed,
)
from clipseg.train_args import TrainingError, data_root
from clipseg.transforms import NonFiniteOutput
from model import CLIPSeg

CURVE_METRICS = ("miou", "iou_fg")  # validation metrics with one value per threshold


def conditionals(model: CLIPSeg, batch: Batch, mix_range: tuple[float, float], device: torch.device) -> Tensor:
    """(N, 512) conditional vectors of a batch's N = B x K prompts: the text embeddings (through the bounded cache;
    the batch's cached phrases are marked as recently used so that adding the new ones cannot evict them), or with
    supports (PC+) w * text + (1 - w) * visual with w ~ U(A, B) per prompt, and w = 1 for prompts without a support
    image."""
    phrases = batch.phrases
    model.text_cache.touch(phrases)
    text = model.embed_text(phrases).float()
    if batch.prompt_images is None or not batch.has_prompt_image.any():
        return text
    low, high = mix_range
    has = batch.has_prompt_image
    weights = torch.ones(len(text))
    weights[has] = low + (high - low) * torch.rand(int(has.sum()))
    visual = torch.zeros_like(text)
    visual[has.to(device)] = model.embed_images(batch.prompt_images[has].to(device)).float()
    weights = weights.to(device)[:, None]
    return weights * text + (1 - weights) * visual


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """--precision bf16 (amp): bf16 where native, fp16 with a gradient scaler on GPUs without bf16, fp32 on CPUs
    without native bf16 (see `clipseg.precision.amp_dtype`); None for --precision fp32."""
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


@dataclass
class Validation:
    """The validation pass: a fixed, seeded subset of a test-mode split, predicted as score.py does
    (`clipseg.inference.predict_tasks`: whole images, raw phrases, no negatives). Its phrases' text embeddings have
    a cache of their own, computed in the validation's precision: shared with the training steps (bf16 autocast),
    a phrase's embedding would depend on which of the two encoded it first, so neither would run in its own
    precision and a resumed run would not repeat an uninterrupted one."""

    data: Dataset
    tasks: list[int]
    batch_size: int
    metric: str = "miou"  # --val-metric: its curve calibrates the threshold (`calibration`)
    text_cache: dict = field(default_factory=dict)  # phrase -> embedding; the text tower is frozen while training

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
        tasks = sorted(int(i) for i in order[: args.val_samples])
        return cls(data, tasks, max(1, args.batch_size // 4), getattr(args, "val_metric", "miou"))

    def run(self, model: CLIPSeg, precision: str) -> dict:
        """val_loss (mean per-task BCE at S x S) and the paper's val_miou, val_iou_fg, val_ap at t = 0.3; the
        calibrated threshold val_threshold and the curve it maximises, val_threshold_curve (`calibration`)."""
        was_training, training_cache = model.training, model.text_cache
        model.eval()
        model.text_cache = self.text_cache
        paper, loss_sum, count = PaperMetrics(), 0.0, 0
        try:
            for prediction in predict_tasks(
                model,
                self.data,
                batch_size=self.batch_size,
                precision=precision,
                tasks=self.tasks,
                description="validation",
            ):
                logits, targets = prediction.logits, prediction.batch.masks
                paper.update(torch.sigmoid(logits), targets)
                losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(1, 2, 3))
                loss_sum, count = loss_sum + float(losses.sum()), count + len(prediction)
        finally:
            model.train(was_training)
            model.text_cache = training_cache
        if not count:
            raise TrainingError("no validation task could be read (see the warnings above)")
        scores = paper.compute()
        threshold, curve = calibration(paper, self.metric)
        return {
            "val_loss": loss_sum / count,
            **{f"val_{key}": scores[key] for key in ("miou", "iou_fg", "ap")},
            "val_threshold": threshold,
            "val_threshold_curve": curve,
        }


def calibration(paper: PaperMetrics, metric: str) -> tuple[float | None, dict]:
    """The calibrated mask threshold: the argmax of the validation curve of `metric` over the paper's thresholds
    0.02, 0.04, ..., 0.98 (the lowest of equal maxima, as `PaperMetrics.compute`), and that curve
    ({"metric", "thresholds", "values"}). Threshold-free metrics (ap, loss) calibrate on the mIoU curve. The CLIPSeg
    paper notes that the best threshold can strongly deviate from 0.5 and differs per data set. A flat curve (no
    threshold better than another: targets all empty, or a model that predicts nothing) calibrates nothing: None,
    where its argmax, 0.02, would make every later mask cover nearly the whole image."""
    metric = metric if metric in CURVE_METRICS else "miou"
    curves = paper.curves()
    values = [round(float(v), 6) for v in curves[metric]]
    thresholds = [round(float(t), 4) for t in curves["thresholds"]]
    best = None if max(values) == min(values) else thresholds[int(np.argmax(curves[metric]))]
    return best, {"metric": metric, "thresholds": thresholds, "values": values}


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
        self.dtype = amp_dtype(device, args.precision == "bf16")
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
        model.config.threshold = model.config.threshold_origin = None  # an --init model's calibration is not this run's
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
        calibrated = state.get("threshold") or {}
        self.model.config.threshold = calibrated.get("value")
        self.model.config.threshold_origin = calibrated.get("origin")

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
            "threshold": {"value": self.model.config.threshold, "origin": self.model.config.threshold_origin},
        }

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step_loss(self, batch: Batch) -> Tensor:
        """One forward pass of a batch: B image crops, N = B x K prompts with their (N, 1, S, S) targets; the
        model's BCE-with-logits loss (fp32)."""
        pixels = batch.pixel_values.to(self.device, non_blocking=True)
        with self.autocast():
            conditional = conditionals(self.model, batch, self.args.mix_range, self.device)
            labels = batch.masks.to(self.device, non_blocking=True)
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

    def save_after_crash(self, log: BinaryIO | None, err: Exception) -> None:
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

    def save(self, log: BinaryIO | None, complete: bool = False) -> None:
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
                self.append_log(log, {"step": self.step, "checkpoint": True, "replica_checksums": checksums})
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

    def append_log(self, log: BinaryIO, record: dict) -> None:
        """One line of log.jsonl (unbuffered: nothing is left to fail again when the file is closed); a failed write
        (a full disk) stops the run as a checkpoint's does (`writing`): exit 1 with the message, the last checkpoint
        intact."""
        with self.writing("a line of log.jsonl"):
            log.write((json_text(record) + "\n").encode())

    def validate(self, log: BinaryIO | None, progress: tqdm) -> None:
        """Score the validation subset; a better --val-metric replaces best/ (a complete model)."""
        if self.world.is_main:
            try:
                scores = self.validation.run(self.model, "fp32")  # as score.py scores: the paper's numbers are fp32
            except NonFiniteOutput as err:
                raise TrainingError(f"validation at iteration {self.step} stopped: {err}") from err
            self.calibrate(scores)
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
                self.append_log(log, {"step": self.step, **scores, "best": improved})
        if self.world.enabled:
            dist.barrier()

    def calibrate(self, scores: dict) -> None:
        """The validated weights' calibrated threshold into the model's config: best/ and the run's next checkpoint
        (written right after a validation) carry it as config.json's `clipseg_threshold`; none after a flat curve
        (`calibration`), so that predict.py and the app fall back to the paper's 0.3."""
        curve = scores["val_threshold_curve"]
        self.model.config.threshold = scores["val_threshold"]
        self.model.config.threshold_origin = None
        if scores["val_threshold"] is None:
            tqdm.write(
                f"{self.args.name}: validation at iteration {self.step}: {curve['metric']} is "
                f"{curve['values'][0]:g} at every threshold, so no threshold is calibrated (predictions use the "
                "paper's 0.3)"
            )
            return
        self.model.config.threshold_origin = (
            f"train.py validation of iteration {self.step}: the threshold of the highest {curve['metric']} over "
            f"{curve['thresholds'][0]}, {curve['thresholds'][1]}, ..., {curve['thresholds'][-1]} on "
            f"{len(self.validation.tasks)} {self.args.val_split} tasks"
        )

    def postfix(self) -> dict[str, str]:
        shown = {"loss": f"{self.last_loss:.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}
        if self.last_validation:
            shown["val_" + self.best.metric] = f"{self.last_validation['val_' + self.best.metric]:.3f}"
        return shown

    def run(self, batches: Iterator[Batch]) -> Summary:
        args, world = self.args, self.world
        start_step, self.started = self.step, time.perf_counter()
        self.interval = LogInterval()
        progress = tqdm(
            total=args.max_iterations, initial=start_step, disable=not world.is_main, desc=args.name, dynamic_ncols=True
        )
        with (
            progress,
            StopRequest() as stop,
            open(self.files.log, "ab", buffering=0) if world.is_main else contextlib.nullcontext() as log,
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

    def iteration(self, batches: Iterator[Batch], stop: StopRequest, log: BinaryIO | None, progress: tqdm) -> bool:
        """One optimizer step, then logging, validation and checkpointing as due; returns whether a stop was
        requested."""
        args, world = self.args, self.world
        torch.manual_seed(derived_seed(args.seed, self.step, world.rank, 3))  # dropout, mixing weights
        batch = next(batches)
        loss = self.step_loss(batch)
        loss_sum, non_finite, stop_flag, skipped = all_reduce_sum(
            [loss.item(), float(not torch.isfinite(loss)), float(stop.requested), len(batch.skipped)],
            world,
            self.device,
        )
        self.skipped += int(skipped)
        self.skip_reasons.update(skip.reason for skip in batch.skipped)
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

    def log_interval(self, log: BinaryIO | None, progress: tqdm) -> None:
        now = time.perf_counter()
        seconds = now - self.interval.started - self.interval.paused
        samples_per_second = self.interval.iterations * self.args.batch_size / seconds
        self.last_loss = self.interval.loss_sum / self.interval.iterations
        progress.set_postfix(self.postfix() | {"samples_s": f"{samples_per_second:.1f}"})
        if log is not None:
            record = dict(step=self.step, loss=self.last_loss, lr=self.scheduler.get_last_lr()[0],
                          samples_per_s=samples_per_second, skipped=self.skipped,
                          time=round(now - self.started, 3))  # fmt: skip
            self.append_log(log, record)
        self.interval = LogInterval(started=now)

    def fail_non_finite(self, step: int, batch: Batch) -> None:
        kept = (
            f"the last good checkpoint (iteration {self.last_saved_step}) in {self.files.dir} is kept"
            if self.last_saved_step is not None
            else "no checkpoint was written in this session"
        )
        tasks = ", ".join(batch.task_ids[:4])
        raise NonFiniteLoss(
            f"non-finite loss at iteration {step} (batch tasks {tasks} ...): stopping without saving; {kept}. "
            "Lower --lr, try --precision fp32, or check the data; continue from the checkpoint with --resume"
        )
