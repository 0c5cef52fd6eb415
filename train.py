"""Train CLIPSeg's decoder (the CLIP backbone stays frozen): the released PhraseCut recipe, fine-tuning on your
own data, exact resume, several GPUs.

    python train.py --name=pc --batch-size=64                           # PhraseCut, the released recipe (SPEC 4)
    python train.py --name=pc --resume                                  # continue after a crash, kill or Ctrl-C
    torchrun --nproc_per_node=4 train.py --name=pc --batch-size=64      # 4 GPUs (DDP); 64 is the global batch
    python train.py --name=mine --data=folder --data-root=my_masks.jsonl --init=CIDAS/clipseg-rd64-refined
    python train.py --name=deconv --arch=clip-deconv                    # a baseline of the paper (README, "Baselines")
    python dataset.py synthetic --n-images=1500 && python train.py --name=demo --data=synthetic --backbone=tiny \
        --device=cpu --image-size=128 --batch-size=32 --max-iterations=4400 --ckpt=500 --num-workers=1 --refined \
        --reduce-dim=64 --extract-layers=0,1,2 --lr=1.5e-3 --dropout=0 --whole-image-prob=0.5 --no-amp
                                                                        # the CPU demo (`make demo`): 7.8 min on 2 cores

Everything a run writes goes to `checkpoints/<name>/`: `args.json`, the model (`config.json` +
`model.safetensors`, loadable with `CLIPSeg.from_pretrained("checkpoints/<name>")`), `train_state.pt`
(optimizer, scheduler, scaler, step, sample-stream position), `log.jsonl` and `loss.png`. Every file is written
atomically, so a kill at any moment leaves the last checkpoint intact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import dataset as datasets
from baselines import DEFAULT_VIT, tiny_vit_config
from model import ARCHITECTURES, DEFAULT_BACKBONE, RANDOM_BACKBONES, CLIPSeg, tiny_clip_config
from model import amp_dtype as model_amp_dtype
from outputs import atomic_write
from preprocess import RESIZE_RULES

STATE_NAME = "train_state.pt"
ARGS_NAME = "args.json"
LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
STATE_FORMAT = 1
# Flags that may differ from the stored run arguments when resuming; all others must match.
RESUME_OVERRIDABLE = ("max_iterations", "ckpt", "num_workers", "device", "compile", "log_every", "checkpoints_dir")


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# ------------------------------------------------------------------------------------------ command line


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help text says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def dropout_rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated block indices such as 3,6,9, got {text!r}") from None
    if any(i < 0 for i in layers) or list(layers) != sorted(set(layers)):
        raise argparse.ArgumentTypeError(f"must be strictly increasing non-negative indices, got {text!r}")
    return layers


def run_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(
            f"must be a plain directory name (letters, digits, '.', '_', '-'; no '/' or '..'), got {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the CLIPSeg decoder on PhraseCut, synthetic data or your own folder of masks.",
        formatter_class=DefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--name", type=run_name, default="pc", help="run name: everything goes to <checkpoints-dir>/<name>/"
    )
    run.add_argument("--checkpoints-dir", default="checkpoints", help="parent directory of the run directories")
    run.add_argument("--resume", action="store_true", help="continue the run <name> from its last checkpoint")
    run.add_argument("--seed", type=int, default=0, help="seed of the sample order, augmentation, dropout, init")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    run.add_argument("--compile", action="store_true", help="torch.compile the decoder (faster on GPUs)")
    run.add_argument("--log-every", type=positive_int, default=10, help="iterations per log.jsonl line")

    optim = parser.add_argument_group("optimisation (defaults: the released recipe)")
    optim.add_argument("--batch-size", type=positive_int, default=64, help="global batch (split across GPUs)")
    optim.add_argument("--max-iterations", type=positive_int, default=20000, help="training iterations")
    optim.add_argument("--ckpt", type=positive_int, default=1000, help="save a checkpoint every N iterations")
    optim.add_argument("--lr", "--learning-rate", type=positive_float, default=1e-3, help="AdamW learning rate")
    optim.add_argument(
        "--lrs", choices=("cosine", "none"), default="cosine", help="cosine: decay to lr/10 per iteration"
    )
    optim.add_argument("--wd", type=non_negative_float, default=1e-4, help="AdamW weight decay")
    optim.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision: bf16 where native, fp16 with a gradient scaler on GPUs without bf16; CPUs without "
        "native bf16 (e.g. AVX2) stay in fp32, which is several times faster there",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=("phrasecut", "synthetic", "folder"), default="phrasecut", help="training data")
    data.add_argument(
        "--data-root",
        default=None,
        help=f"phrasecut: dir holding data/VGPhraseCut_v0 (default {datasets_default('phrasecut')}); synthetic: "
        f"generated there if absent (default {datasets_default('synthetic')}); folder: the JSONL/CSV index file",
    )
    data.add_argument("--split", default="train", help="split to train on (phrasecut/synthetic)")
    data.add_argument(
        "--image-size",
        type=positive_int,
        default=352,
        help="training resolution, a multiple of the backbone's patch size (16; ViT-L/14: e.g. 350)",
    )
    data.add_argument("--negative-prob", type=probability, default=0.2, help="share of negatives (other phrase)")
    data.add_argument(
        "--whole-image-prob",
        type=probability,
        default=0.0,
        help="share of samples that show the whole image squashed to --image-size, as scoring does, instead of the "
        "recipe's object-aware square crop (default 0: the released recipe)",
    )
    data.add_argument(
        "--resize",
        choices=RESIZE_RULES,
        default="original",
        help="image resize rule: original = the authors' data pipeline (bilinear, align_corners=True, no "
        "antialiasing; the recipe); pil = PIL's antialiased bilinear, as the HF processor does",
    )
    data.add_argument(
        "--mix", action="store_true", help="PC+: mix text with visual-prompt embeddings, use the 9 prompt templates"
    )
    data.add_argument("--num-workers", type=non_negative_int, default=4, help="DataLoader worker processes")
    data.add_argument(
        "--text-cache-size", type=positive_int, default=100_000, help="phrases whose text embedding is kept"
    )

    arch = parser.add_argument_group("model")
    arch.add_argument(
        "--arch",
        choices=tuple(ARCHITECTURES),
        default=None,
        help="clipseg, or one of the paper's baselines: clip-deconv (one CLIP block, no transformer decoder), vitseg "
        "(ImageNet ViT-B/16 at 384 px for the image, CLIP for the prompt) (default: clipseg, or that of --init)",
    )
    arch.add_argument("--init", default=None, help="start from weights: hub id, checkpoint directory or original .pth")
    arch.add_argument(
        "--backbone",
        default=None,
        help=f"CLIP hub id or local directory (any patch size; default {DEFAULT_BACKBONE}), 'tiny' (small random "
        f"CLIP for tests and the demo) or {', '.join(RANDOM_BACKBONES)} (random-initialised CLIP: the paper's 'no "
        f"CLIP pre-training'); --arch vitseg: the ImageNet ViT (default {DEFAULT_VIT}); with --init only for a .pth",
    )
    arch.add_argument(
        "--text-backbone",
        default=None,
        help=f"--arch vitseg: the CLIP whose text tower encodes prompts (default {DEFAULT_BACKBONE}; tiny: tiny)",
    )
    arch.add_argument(
        "--refined",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refined (3-layer) transposed-conv head (default: plain, or the head of --init)",
    )
    arch.add_argument("--reduce-dim", type=positive_int, default=None, help="decoder width D (default 64; tiny 16)")
    arch.add_argument(
        "--dropout",
        type=dropout_rate,
        default=0.1,
        help="decoder dropout (the released recipe's 0.1; 0 trains faster in short runs such as the CPU demo)",
    )
    arch.add_argument(
        "--extract-layers", type=layer_list, default=None, help="0-based CLIP blocks the decoder reads, e.g. 3,6,9"
    )
    arch.add_argument("--tiny-width", type=positive_int, default=64, help="width of the 'tiny' backbone")
    arch.add_argument("--tiny-layers", type=positive_int, default=6, help="vision blocks of the 'tiny' backbone")
    return parser


def datasets_default(kind: str) -> str:
    return {"phrasecut": datasets.DEFAULT_PHRASECUT_ROOT, "synthetic": datasets.DEFAULT_SYNTHETIC_ROOT}[kind]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data == "folder" and args.data_root is None:
        parser.error("--data=folder needs --data-root=<your JSONL or CSV index file>")
    if args.init is not None and args.backbone is not None and Path(args.init).suffix not in (".pth", ".pt"):
        parser.error("--backbone goes with --init only for an original .pth decoder; HF checkpoints carry their CLIP")
    if args.extract_layers is not None and args.init is not None:
        parser.error("--extract-layers cannot change with --init: the checkpoint's decoder was trained on its layers")
    if args.text_backbone is not None and (args.arch != "vitseg" or args.init is not None):
        parser.error("--text-backbone goes with --arch vitseg, without --init (a checkpoint carries its text tower)")
    patch = known_patch_size(args)
    if patch is not None and args.image_size % patch:
        parser.error(f"--image-size: must be a multiple of {patch} (the patch size), got {args.image_size}")
    args.explicit = sorted(explicit_flags(parser, argv))
    return args


def known_patch_size(args: argparse.Namespace) -> int | None:
    """The patch size the flags fix without loading weights; None when only the backbone's config tells."""
    if args.init is not None:
        return None
    if args.arch == "vitseg" or args.backbone in (None, "tiny"):
        return 16
    if args.backbone in RANDOM_BACKBONES:
        return RANDOM_BACKBONES[args.backbone][0]["patch_size"]
    return None


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Destinations of the flags given on the command line (not defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, argparse.BooleanOptionalAction):
                probe.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kwargs)
            elif action.nargs == 0:
                probe.add_argument(*action.option_strings, action="store_const", const=True, **kwargs)
            else:
                probe.add_argument(*action.option_strings, **kwargs)
    known, _ = probe.parse_known_args(argv)
    return set(vars(known))


# ----------------------------------------------------------------------------------------- distribution


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str | None) -> tuple[Distributed, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device and join the process group (NCCL on GPUs,
    gloo on CPU)."""
    world = Distributed(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )
    name = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device={name} but CUDA is not available; use --device=cpu")
        if device.index is None:
            device = torch.device("cuda", world.local_rank if world.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def all_reduce_sum(values: Sequence[float], world: Distributed, device: torch.device) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if world.enabled:
        dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------------------------------- sample stream


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of `parts` (run seed, step, rank, sample position ...)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class InfiniteBatchSampler:
    """Batches of (dataset index, sample seed) for one rank, from a seeded endless stream of epochs.

    The global stream is a fresh permutation per epoch (seeded by run seed and epoch); global batch `step` holds
    stream positions step*B .. step*B + B - 1, of which rank r takes its contiguous slice of B/world. The stream
    is a pure function of (seed, step), so resuming at step k with any number of workers continues exactly.
    """

    def __init__(self, n_samples: int, global_batch: int, seed: int, start_step: int, world: Distributed):
        if n_samples == 0:
            raise TrainingError("the training set is empty")
        self.n_samples, self.global_batch, self.seed = n_samples, global_batch, seed
        self.start_step, self.world = start_step, world
        self.local_batch = global_batch // world.world_size
        self._epoch, self._order = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_samples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.n_samples, generator=generator).tolist()
        return self._order[offset]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            first = step * self.global_batch + self.world.rank * self.local_batch
            yield [(self._index(p), derived_seed(self.seed, p, 1)) for p in range(first, first + self.local_batch)]
            step += 1


class SeededSamples(Dataset):
    """Wraps a training set so that item (index, seed) is drawn with its own random stream: the crop, negative
    and template choices then depend only on the sample's stream position, not on the worker count or on where
    a run was resumed (tests/test_train.py checks resume bitwise)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        if hasattr(self.dataset, "reseed"):
            self.dataset.reseed(seed)
        return self.dataset[index]


def worker_init(_: int) -> None:
    # Ctrl-C or a SIGTERM to the process group reaches the workers too; the main process saves a checkpoint and then
    # shuts them down itself (a worker killed first would make the DataLoader raise before the save).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset: Dataset, sampler: InfiniteBatchSampler, num_workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=datasets.collate,
        pin_memory=pin,
        worker_init_fn=worker_init if num_workers else None,
    )


@contextlib.contextmanager
def batches_from(loader: DataLoader) -> Iterator[Iterator[dict]]:
    """Iterate the loader and stop its workers on the way out. Left to interpreter exit, the workers (which
    ignore SIGTERM, see worker_init) would make multiprocessing's exit handler wait for them forever."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # only the multi-process iterator has workers
        if shutdown is not None:
            shutdown()


@contextlib.contextmanager
def threads_beside_workers(device: torch.device, num_workers: int) -> Iterator[None]:
    """On the CPU, leave one core to each DataLoader worker: the training step's threads otherwise compete with
    the workers (the demo ran 1.46x faster on 2 cores with 1 worker and 1 thread than with 1 worker and 2
    threads). OMP_NUM_THREADS, when set (torchrun sets it), is respected."""
    if device.type != "cpu" or num_workers == 0 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    previous = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores - num_workers))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_training_set(args: argparse.Namespace) -> Dataset:
    root = args.data_root or (datasets_default(args.data) if args.data != "folder" else None)
    if args.data == "phrasecut" and not Path(root).exists():
        raise TrainingError(
            f"PhraseCut not found at {root}: download it (README, 'Getting PhraseCut') or pass --data-root; "
            "--data=synthetic trains on generated data instead"
        )
    if args.data == "folder" and not Path(root).is_file():
        raise TrainingError(f"--data-root={root}: no such index file (a JSONL or CSV of image, phrase, mask)")
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
        templates=args.mix,
        seed=args.seed,
    )


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
    except ValueError as err:
        raise TrainingError(f"cannot build the model from these flags: {err}") from err


class TextCache(OrderedDict):
    """`model.text_cache` with a size bound (least recently used phrases are dropped): PhraseCut x 9 templates
    would otherwise hold millions of embeddings on the GPU."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def __setitem__(self, key: str, value: Tensor) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)

    def touch(self, phrases: Sequence[str]) -> None:
        for phrase in phrases:
            if phrase in self:
                self.move_to_end(phrase)


def text_embeddings(model: CLIPSeg, phrases: Sequence[str]) -> Tensor:
    """(B, 512) fp32 text embeddings through the cache; the batch's cached phrases are marked as recently used so
    that adding the new ones cannot evict them (the capacity is at least twice the batch)."""
    model.text_cache.touch(phrases)
    return model.embed_text(phrases).float()


def conditionals(model: CLIPSeg, batch: dict, mix: bool, device: torch.device) -> Tensor:
    """(B, 512) conditional vectors: the text embedding, or with --mix (PC+) w*text + (1-w)*visual with
    w ~ U(0, 0.5) per sample, and w = 1 for samples without a support image."""
    text = text_embeddings(model, batch["phrase"])
    if not mix:
        return text
    has_prompt = torch.as_tensor(batch["has_prompt_image"], dtype=torch.bool)
    weights = torch.ones(len(text))
    weights[has_prompt] = 0.5 * torch.rand(int(has_prompt.sum()))
    weights = weights.to(device)[:, None]
    if not has_prompt.any():
        return text
    visual = torch.zeros_like(text)
    visual[has_prompt.to(device)] = model.embed_images(batch["prompt_image"][has_prompt].to(device)).float()
    return weights * text + (1 - weights) * visual


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """--amp: bf16 where native, fp16 with a gradient scaler on GPUs without bf16, fp32 on CPUs without native bf16
    (see `model.amp_dtype`); None without --amp."""
    return model_amp_dtype(device) if amp else None


def learning_rate_factor(step: int, max_iterations: int, schedule: str) -> float:
    """Cosine from 1 to 0.1 over the run (no warm-up), or constant."""
    if schedule == "none":
        return 1.0
    progress = min(step, max_iterations) / max_iterations
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------- checkpoints


class RunFiles:
    """The files of `checkpoints/<name>/`."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.args, self.state = directory / ARGS_NAME, directory / STATE_NAME
        self.log, self.plot = directory / LOG_NAME, directory / PLOT_NAME


def check_writable(directory: Path, needed_bytes: int) -> None:
    """Fail before training if the run directory cannot be created or written, or the disk is too full."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise TrainingError(
            f"cannot write to {directory}: {err.strerror or err}; choose a writable --checkpoints-dir"
        ) from err
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise TrainingError(
            f"not enough disk space in {directory}: a checkpoint needs about {needed_bytes / 2**20:.0f} MiB "
            f"(old and new copy during the atomic write), {free / 2**20:.0f} MiB free"
        )


def checkpoint_bytes(model: CLIPSeg) -> int:
    """Room for writing one checkpoint while the previous one still exists: 2 x (model + decoder with the two
    AdamW moments)."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    decoder_bytes = sum(p.numel() * p.element_size() for p in model.decoder.parameters())
    return 2 * (model_bytes + 3 * decoder_bytes) + 2**20


def save_checkpoint(files: RunFiles, model: CLIPSeg, state: dict) -> None:
    """The model (HF layout) then the training state, each atomic. The state carries its own copy of the decoder,
    so a kill between the two writes cannot pair a model with the wrong optimizer state: resume trusts the state."""
    model.save_pretrained(files.dir)
    atomic_write(files.state, lambda path: torch.save(state, path))


def training_state(step: int, model: CLIPSeg, optimizer, scheduler, scaler, args: argparse.Namespace) -> dict:
    """Plain containers and tensors only, so that resume can load it with `torch.load(weights_only=True)`.

    The RNG streams are functions of (seed, step, rank) (reseeded every iteration), so seed and step restore
    them exactly."""
    return {
        "format": STATE_FORMAT,
        "step": step,
        "seed": args.seed,
        "global_batch": args.batch_size,
        "samples_seen": step * args.batch_size,
        "decoder": {k: v.detach().cpu().clone() for k, v in model.decoder.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }


def load_training_state(files: RunFiles) -> dict:
    try:
        state = torch.load(files.state, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingError(f"{files.state} is damaged or not a training state ({err})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{files.state}: unknown training-state format; was it written by this train.py?")
    return state


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
    merged = {**vars(args), **stored}  # a flag newer than the run keeps its default, which is the older behaviour
    for key in RESUME_OVERRIDABLE:
        merged[key] = getattr(args, key)
    merged["resume"], merged["explicit"] = True, args.explicit
    if merged.get("extract_layers") is not None:
        merged["extract_layers"] = tuple(merged["extract_layers"])
    return argparse.Namespace(**merged)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def write_args(files: RunFiles, args: argparse.Namespace, world: Distributed) -> None:
    record = {k: _jsonable(v) for k, v in vars(args).items() if k not in ("explicit", "resume")}
    record["world_size"] = world.world_size
    text = json.dumps(record, indent=2, sort_keys=True)
    atomic_write(files.args, lambda path: Path(path).write_text(text))


# ------------------------------------------------------------------------------------------ log and plot


def read_log(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Log records, skipping a line cut short by a kill and (when resuming) records after the checkpoint."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if up_to_step is None or record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


def rewrite_log(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda p: Path(p).write_text(text))


def plot_loss(files: RunFiles, name: str) -> None:
    """loss.png: the logged loss per iteration and its running mean, with the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(files.log) if "loss" in r]
    if not records:
        return
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="loss (per log interval)")
    axis.plot(steps[window - 1 :], smooth, color="tab:blue", lw=2, label=f"running mean ({window} points)")
    axis.set_xlabel("iteration")
    axis.set_ylabel("BCE loss")
    axis.set_yscale("log")
    axis.set_title(f"{name}: training loss")
    lr_axis = axis.twinx()
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=1, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    handles = axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    axis.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    figure.tight_layout()
    atomic_write(files.plot, lambda p: figure.savefig(p, format="png"))
    plt.close(figure)


# --------------------------------------------------------------------------------------------- training


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

    def line(self) -> str:
        reasons = "; ".join(f"{n}x {r}" for r, n in self.skip_reasons.most_common(3))
        return (
            f"{'stopped' if self.stopped_early else 'finished'} at iteration {self.step}/{self.max_iterations}: "
            + (f"loss {self.final_loss:.4f} (last log interval), " if math.isfinite(self.final_loss) else "")
            + f"{self.samples_per_second:.1f} samples/s overall, "
            f"{self.seconds / 60:.1f} min; {self.skipped} sample(s) skipped"
            + (f" ({reasons})" if reasons else "")
            + f"; model in {self.run_dir}"
        )


class NonFiniteLoss(TrainingError):
    pass


def train(args: argparse.Namespace, dataset: Dataset | None = None) -> Summary:
    """Run (or resume) the training described by `args`; `dataset` replaces the one --data names (tests)."""
    world, device = setup_distributed(args.device)
    files = RunFiles(Path(args.checkpoints_dir) / args.name)
    if args.resume:
        args = stored_args(files, args)
    elif files.state.exists():
        raise TrainingError(
            f"{files.dir} already holds a run (checkpoint {files.state.name}); pass --resume to continue it or "
            "choose another --name"
        )
    if args.batch_size % world.world_size:
        raise TrainingError(f"--batch-size={args.batch_size} is not divisible by the {world.world_size} processes")

    state = load_training_state(files) if args.resume else None
    model = CLIPSeg.from_pretrained(files.dir) if args.resume else build_model(args)
    if state is not None:
        model.decoder.load_state_dict(state["decoder"])
    model.text_cache = TextCache(max(args.text_cache_size, 2 * args.batch_size))
    model.to(device).train()
    if world.is_main:
        check_writable(files.dir, checkpoint_bytes(model))
        if not args.resume:
            write_args(files, args, world)
    if world.enabled:
        dist.barrier()

    dataset = dataset if dataset is not None else build_training_set(args)
    start_step = state["step"] if state else 0
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=args.lr, weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, args.max_iterations, args.lrs)
    )
    dtype = amp_dtype(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    decoder = model.decoder
    if world.enabled:
        decoder = nn.parallel.DistributedDataParallel(
            decoder, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        decoder = torch.compile(decoder)

    sampler = InfiniteBatchSampler(len(dataset), args.batch_size, args.seed, start_step, world)
    loader = build_loader(dataset, sampler, args.num_workers, pin=device.type == "cuda")
    if world.is_main:
        announce(args, model, dataset, world, device, dtype, start_step)
        rewrite_log(files.log, read_log(files.log, up_to_step=start_step))
        for leftover in files.dir.glob(".*.tmp"):  # from a write cut short by a kill
            leftover.unlink()
    loop = TrainingLoop(args, model, decoder, optimizer, scheduler, scaler, dtype, device, world, files)
    loop.last_saved_step = state["step"] if state else None
    if start_step >= args.max_iterations:
        print(f"{files.dir} is already at iteration {start_step}: raise --max-iterations to train longer")
    try:
        with batches_from(loader) as batches, threads_beside_workers(device, args.num_workers):
            return loop.run(batches, start_step)
    finally:
        if world.enabled:
            dist.destroy_process_group()


def announce(args, model: CLIPSeg, dataset: Dataset, world: Distributed, device, dtype, start_step: int) -> None:
    trainable = sum(p.numel() for p in model.decoder.parameters())
    excluded = getattr(dataset, "excluded", None)
    print(
        f"{'resuming' if start_step else 'training'} {args.name} at iteration {start_step}/{args.max_iterations}: "
        f"{len(dataset)} training samples ({args.data}), {trainable:,} trainable parameters, batch {args.batch_size}"
        f" on {world.world_size} x {device}, amp {amp_description(args.amp, dtype, device)}"
        + (f"; {len(excluded)} task(s) excluded while indexing (e.g. {excluded[0]})" if excluded else ""),
        flush=True,
    )


def amp_description(requested: bool, dtype: torch.dtype | None, device: torch.device) -> str:
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    if not requested:
        return "off"
    if device.type == "cpu":
        return "off (no native bf16 on this CPU: fp32 is faster)"
    return f"off (no mixed precision on {device.type})"


class TrainingLoop:
    def __init__(self, args, model, decoder, optimizer, scheduler, scaler, dtype, device, world, files):
        self.args, self.model, self.decoder = args, model, decoder
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.dtype, self.device, self.world, self.files = dtype, device, world, files
        self.skip_reasons: Counter = Counter()
        self.skipped = 0
        self.last_saved_step: int | None = None
        self.optimising = False
        self.step = 0

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step_loss(self, batch: dict) -> Tensor:
        """One forward pass: (B, 1, S, S) logits against the (B, 1, S, S) masks, BCE-with-logits in fp32."""
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        with self.autocast():
            features = self.model.encode_image(pixels)
            conditional = conditionals(self.model, batch, self.args.mix, self.device)
            logits = self.decoder(features.activations, conditional, features.grid)
        return F.binary_cross_entropy_with_logits(logits.float(), masks)

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
        self.save(self.step, log)

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

    def save(self, step: int, log) -> None:
        checksums = self.replica_checksums()
        if len(set(checksums)) > 1:
            raise TrainingError(f"the {len(checksums)} DDP replicas hold different weights at iteration {step}")
        if self.world.is_main:
            state = training_state(step, self.model, self.optimizer, self.scheduler, self.scaler, self.args)
            try:
                save_checkpoint(self.files, self.model, state)
                plot_loss(self.files, self.args.name)
            except OSError as err:
                kept = f"iteration {self.last_saved_step}" if self.last_saved_step is not None else "none yet"
                raise TrainingError(
                    f"could not write the checkpoint of iteration {step} to {self.files.dir}: {err}; the previous "
                    f"checkpoint ({kept}) is intact; free space and continue with --resume"
                ) from err
            if log is not None:
                log.write(json.dumps({"step": step, "checkpoint": True, "replica_checksums": checksums}) + "\n")
                log.flush()
        self.last_saved_step = step

    def run(self, batches: Iterator[dict], start_step: int) -> Summary:
        args, world = self.args, self.world
        self.step, self.started = start_step, time.perf_counter()
        self.interval = [0.0, 0, time.perf_counter()]  # loss sum, iterations, start time
        self.last_loss = float("nan")
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
        )
        if world.is_main:
            print(summary.line(), flush=True)
        return summary

    def iteration(self, batches: Iterator[dict], stop: StopRequest, log, progress: tqdm) -> bool:
        """One optimizer step, then logging and checkpointing as due; returns whether a stop was requested."""
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
        self.interval[0] += loss_sum / world.world_size
        self.interval[1] += 1
        progress.update(1)
        step = self.step
        if step % args.log_every == 0 or step == args.max_iterations or stop_flag:
            self.log_interval(log, progress)
        if step % args.ckpt == 0 or step == args.max_iterations or stop_flag:
            self.save(step, log)
            self.interval[2] = time.perf_counter()  # the throughput shown excludes checkpoint writes
        return bool(stop_flag)

    def log_interval(self, log, progress: tqdm) -> None:
        loss_sum, iterations, start = self.interval
        now = time.perf_counter()
        samples_per_second = iterations * self.args.batch_size / (now - start)
        self.last_loss = loss_sum / iterations
        lr = self.scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_second:.1f}")
        if log is not None:
            record = dict(step=self.step, loss=self.last_loss, lr=lr, samples_per_s=samples_per_second,
                          skipped=self.skipped, time=round(now - self.started, 3))  # fmt: skip
            log.write(json.dumps(record) + "\n")
            log.flush()
        self.interval = [0.0, 0, now]

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
