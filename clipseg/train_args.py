"""train.py's command line: every flag with its default, its check and its help (`python train.py --help`), the
checks between flags, what --resume keeps of a run's stored flags (`stored_args`), and the data set and model the
flags describe (`build_training_set`, `build_model`, `resume_model`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

import dataset as datasets
from clipseg import runs
from clipseg.baselines import DEFAULT_VIT, tiny_vit_config
from clipseg.benchmarks.classes import WordNetMissing, parse_removal
from clipseg.cli import (
    TRAINING_PRECISIONS,
    DefaultsHelpFormatter,
    add_device_flag,
    add_precision_flags,
    below_one,
    explicit_flags,
    int_up_to,
    layer_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    run_name,
    step_list,
    weight_range,
)
from clipseg.config import (
    ARCHITECTURES,
    DEFAULT_BACKBONE,
    MAX_IMAGE_SIDE,
    RANDOM_BACKBONES,
    check_image_side,
    tiny_clip_config,
)
from clipseg.loading import CHECKPOINTS_DIR, DATA_KINDS, LoadError, default_data_root, resolve_model
from clipseg.precision import requested_precision
from clipseg.runs import RunFiles
from clipseg.sample_pipeline import PROMPT_TEMPLATES
from clipseg.sampling import (
    Distributed,
    default_workers,
    derived_seed,
)
from clipseg.transforms import RESIZE_RULES
from clipseg.weights import DECODER_LIMITS
from model import CLIPSeg


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# The 'tiny' backbone is for tests and the offline demo: these bounds keep a mistyped flag from allocating until
# memory runs out (ViT-B is 768 wide and 12 blocks deep).
MAX_TINY_WIDTH = 1024
MAX_TINY_LAYERS = 48
VAL_METRICS = ("miou", "iou_fg", "ap", "loss")  # the paper's metrics at t = 0.3, or the validation loss


def removal_spec(text: str) -> str:
    try:
        parse_removal(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


# ------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the CLIPSeg decoder on PhraseCut, synthetic data or your own folder of masks.",
        formatter_class=DefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--name", type=run_name, default="pc", help="run name: everything goes to <checkpoints-dir>/<name>/"
    )
    run.add_argument("--checkpoints-dir", default=str(CHECKPOINTS_DIR), help="parent directory of the run directories")
    run.add_argument("--resume", action="store_true", help="continue the run <name> from its last checkpoint")
    run.add_argument("--seed", type=int, default=0, help="seed of the sample order, augmentation, dropout, init")
    add_device_flag(run, later="; under torchrun, each process's own GPU")
    run.add_argument("--compile", action="store_true", help="torch.compile the decoder (faster on GPUs)")
    run.add_argument("--log-every", type=positive_int, default=10, help="iterations per log.jsonl line")
    run.add_argument(
        "--ckpt", type=positive_int, default=1000, help="save a checkpoint (decoder and training state) every N"
    )
    run.add_argument(
        "--keep-checkpoints",
        type=step_list,
        default=None,
        help="iterations whose complete model is kept in iter_NNNNNN/, e.g. 5000,10000",
    )

    optim = parser.add_argument_group("optimisation (defaults: the released recipe)")
    optim.add_argument(
        "--batch-size", type=positive_int, default=64, help="global batch of samples (prompt + target), over GPUs"
    )
    optim.add_argument("--max-iterations", type=positive_int, default=20000, help="training iterations")
    optim.add_argument("--lr", "--learning-rate", type=positive_float, default=1e-3, help="AdamW learning rate")
    optim.add_argument(
        "--lrs",
        choices=("cosine", "warmup_cosine", "none"),
        default="cosine",
        help="cosine: per-iteration decay to lr/10 (the recipe); warmup_cosine: the original trainer's linear "
        "warm-up over --warmup iterations, then cosine to 0; none: constant",
    )
    optim.add_argument("--warmup", type=non_negative_int, default=0, help="warm-up iterations of --lrs warmup_cosine")
    optim.add_argument("--wd", type=non_negative_float, default=1e-4, help="AdamW weight decay")
    add_precision_flags(optim, "train")

    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=DATA_KINDS, default="phrasecut", help="training data")
    data.add_argument(
        "--data-root",
        default=None,
        help=f"phrasecut: dir holding data/VGPhraseCut_v0 (default {default_data_root('phrasecut')}); synthetic: "
        f"generated there if absent (default {default_data_root('synthetic')}); folder: the JSONL/CSV index file",
    )
    data.add_argument("--split", default="train", help="split to train on (phrasecut/synthetic)")
    data.add_argument(
        "--image-size",
        type=positive_int,
        default=352,
        help="training resolution, a multiple of the backbone's patch size (16; ViT-L/14: e.g. 350), at most "
        f"{MAX_IMAGE_SIDE}",
    )
    data.add_argument("--negative-prob", type=probability, default=0.2, help="share of negatives (other phrase)")
    data.add_argument(
        "--whole-image-prob",
        type=probability,
        default=0.0,
        help="share of samples that show the whole image squashed to --image-size, as scoring does, instead of the "
        "recipe's square crop (default 0: the released recipe)",
    )
    data.add_argument(
        "--resize",
        choices=RESIZE_RULES,
        default="original",
        help="image resize rule: original = the authors' data pipeline (bilinear, align_corners=True, no "
        "antialiasing; the recipe); pil = PIL's antialiased bilinear, as the HF processor does",
    )
    data.add_argument("--mix", action="store_true", help="PC+: mix text with visual-prompt embeddings")
    data.add_argument(
        "--mix-range",
        type=weight_range,
        default=(0.0, 0.5),
        help="with --mix, the text weight w ~ U(A, B) per sample (w = 1 without a support); the released PC+ "
        "models used 0,0.5 (the paper writes 0,1)",
    )
    data.add_argument(
        "--prompt-templates",
        choices=tuple(PROMPT_TEMPLATES),
        default=None,
        help="templates a phrase is put into, one drawn per sample (the original's lists): plain = the phrase; "
        "fixed = 'a photo of a {}.'; shuffle = 4; shuffle+ = 9 (default: shuffle+ with --mix, plain without, as "
        "the released runs)",
    )
    data.add_argument(
        "--aug-color",
        action="store_true",
        help="the original's colour jitter (brightness 0.5, contrast 0.5, saturation 0.2, hue 0.05; off in the "
        "released runs)",
    )
    data.add_argument(
        "--prompts-per-image",
        type=positive_int,
        default=1,
        help="K: each image crop serves K of that image's tasks (targets in the same crop, negatives as usual) and "
        "the vision tower runs once per crop; a batch then holds batch-size / K crops (a departure from the "
        "recipe: fewer distinct images per batch). Default 1 = the recipe",
    )
    data.add_argument(
        "--remove-classes",
        type=removal_spec,
        default=None,
        metavar="pas5i:K|zs:K|aff",
        help="fold-aware training: drop the PhraseCut tasks whose phrase names a test class of Pascal-5i fold K, "
        "of the first K zero-shot pairs (WordNet hyponyms included; needs nltk and WordNet, README) or an "
        "affordance word",
    )
    data.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=default_workers(),
        help="DataLoader worker processes (default: one fewer than the cores, at most 4: %(default)s here)",
    )
    data.add_argument(
        "--text-cache-size", type=positive_int, default=100_000, help="phrases whose text embedding is kept"
    )

    val = parser.add_argument_group("validation")
    val.add_argument("--val-interval", type=non_negative_int, default=0, help="validate every N iterations (0: never)")
    val.add_argument(
        "--val-split",
        default="val",
        help="split to validate on (phrasecut/synthetic; for a folder: the rows marked split 'val')",
    )
    val.add_argument(
        "--val-samples",
        type=positive_int,
        default=500,
        help="a fixed, seeded subset of this many validation tasks, scored as score.py does (whole images, raw "
        "phrases, no negatives)",
    )
    val.add_argument(
        "--val-metric",
        choices=VAL_METRICS,
        default="miou",
        help="the paper's metric at t = 0.3 (or the loss) that picks best/",
    )

    arch = parser.add_argument_group("model")
    arch.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="start from a model's weights, named as every command's --model: a run name (a folder of "
        "--checkpoints-dir), a run or checkpoint directory (e.g. checkpoints/NAME/best), a hub id or an original .pth "
        "(with --backbone)",
    )
    arch.add_argument(
        "--arch",
        choices=tuple(ARCHITECTURES),
        default=None,
        help="clipseg, or one of the paper's baselines: clip-deconv (one CLIP block, no transformer decoder), vitseg "
        "(ImageNet ViT-B/16 at 384 px for the image, CLIP for the prompt) (default: clipseg, or that of --init)",
    )
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
    arch.add_argument(
        "--reduce-dim",
        type=int_up_to(DECODER_LIMITS["reduce_dim"][1]),
        default=None,
        help="decoder width D (default 64; tiny 16)",
    )
    arch.add_argument(
        "--dropout",
        type=below_one,
        default=0.1,
        help="decoder dropout (the released recipe's 0.1; 0 trains faster in short runs such as the CPU demo)",
    )
    arch.add_argument(
        "--extract-layers", type=layer_list, default=None, help="0-based CLIP blocks the decoder reads, e.g. 3,6,9"
    )
    arch.add_argument(
        "--tiny-width", type=int_up_to(MAX_TINY_WIDTH), default=64, help="width of the 'tiny' backbone (even)"
    )
    arch.add_argument(
        "--tiny-layers", type=int_up_to(MAX_TINY_LAYERS), default=6, help="vision blocks of the 'tiny' backbone"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    try:  # --amp / --no-amp are the older spellings of --precision bf16 / fp32; the default is bf16 (where native)
        args.precision = requested_precision(args.precision, args.amp) or TRAINING_PRECISIONS[1]
    except ValueError as err:
        parser.error(str(err))
    if "amp" in explicit:
        explicit = (explicit - {"amp"}) | {"precision"}
    del args.amp
    if args.init is not None:  # the model --init names, resolved as every command's --model (clipseg/loading.py)
        try:
            args.init = resolve_model(args.init, Path(args.checkpoints_dir))[0]
        except LoadError as err:
            parser.error(f"--init: {err}")
    if args.data == "folder" and args.data_root is None:
        parser.error("--data=folder needs --data-root=<your JSONL or CSV index file>")
    if args.data == "folder" and args.remove_classes:
        parser.error("--remove-classes filters PhraseCut-format data (--data phrasecut or synthetic)")
    if args.init is not None and args.backbone is not None and Path(args.init).suffix not in (".pth", ".pt"):
        parser.error("--backbone goes with --init only for an original .pth decoder; HF checkpoints carry their CLIP")
    if args.extract_layers is not None and args.init is not None:
        parser.error("--extract-layers cannot change with --init: the checkpoint's decoder was trained on its layers")
    if args.text_backbone is not None and (args.arch != "vitseg" or args.init is not None):
        parser.error("--text-backbone goes with --arch vitseg, without --init (a checkpoint carries its text tower)")
    try:
        check_image_side(args.image_size, known_patch_size(args), args.backbone or "the backbone")
    except ValueError as err:
        parser.error(str(err))
    if args.batch_size % args.prompts_per_image:
        parser.error(
            f"--batch-size={args.batch_size} must be a multiple of --prompts-per-image={args.prompts_per_image}"
        )
    if args.tiny_width % 2:
        parser.error(f"--tiny-width must be even (the tiny backbone has 2 attention heads), got {args.tiny_width}")
    if args.warmup and args.lrs != "warmup_cosine":
        parser.error("--warmup goes with --lrs warmup_cosine")
    if args.warmup >= args.max_iterations:
        parser.error(f"--warmup={args.warmup} must be below --max-iterations={args.max_iterations}")
    args.explicit = sorted(explicit)
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


# Flags that may differ from the stored run arguments when resuming; all others must match. The run's length and
# checkpointing stay as stored unless given again (a new value is stored for later resumes); the machine's are
# this invocation's, given or default.
RUN_PLAN_FLAGS = ("max_iterations", "ckpt", "log_every", "keep_checkpoints")
MACHINE_FLAGS = ("num_workers", "device", "compile", "checkpoints_dir")
RESUME_OVERRIDABLE = RUN_PLAN_FLAGS + MACHINE_FLAGS


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
            templates=PROMPT_TEMPLATES[prompt_templates(args)],
            colour_jitter=args.aug_color,
            prompts_per_image=args.prompts_per_image,
            seed=args.seed,
            **removal,
        )
    except WordNetMissing as err:
        raise TrainingError(f"--remove-classes {args.remove_classes}: {err}") from err
    except (OSError, ValueError, KeyError) as err:  # an index or data file that cannot be read: the message names it
        raise TrainingError(f"cannot read the {args.data} data at {root}: {err}") from err


def data_root(args: argparse.Namespace) -> str | None:
    return args.data_root or (default_data_root(args.data) if args.data != "folder" else None)


def prompt_templates(args: argparse.Namespace) -> str:
    """The template list: --prompt-templates, else the released runs' choice (shuffle+ with --mix, plain without)."""
    return args.prompt_templates or ("shuffle+" if args.mix else "plain")


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


def stored_args(files: RunFiles, args: argparse.Namespace) -> argparse.Namespace:
    """For --resume: the run's stored arguments, with the flags that may change taken from the command line.
    Any other flag given with a different value is an error (it would silently not apply)."""
    if not files.state.exists():
        raise TrainingError(
            f"--resume: {files.state} does not exist: {files.dir} has no checkpoint yet; start the run without --resume"
        )
    if not files.args.exists():
        raise TrainingError(f"--resume: {files.args} not found; is {files.dir} a run directory of train.py?")
    stored = read_stored_args(files.args)
    if "amp" in stored:  # a run older than --precision: amp true/false was --precision bf16/fp32
        stored.setdefault("precision", "bf16" if stored.pop("amp") else "fp32")
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
        if key in MACHINE_FLAGS or key in args.explicit or stored.get(key) is None:
            merged[key] = getattr(args, key)
    merged["resume"], merged["explicit"] = True, args.explicit
    for key in ("extract_layers", "mix_range", "keep_checkpoints"):
        if merged.get(key) is not None:
            merged[key] = tuple(merged[key])
    resumed = argparse.Namespace(**merged)
    try:
        if resumed.batch_size % resumed.prompts_per_image:
            raise ValueError(f"batch_size {resumed.batch_size} is not a multiple of prompts_per_image")
        check_image_side(resumed.image_size, known_patch_size(resumed), resumed.backbone or "the backbone")
    except (ValueError, TypeError, AttributeError) as err:
        raise TrainingError(f"{files.args}: {err}; the run's arguments are damaged: restore the file") from err
    return resumed


def read_stored_args(path: Path) -> dict:
    """A run's stored arguments (args.json) once each value is one its flag takes (its type and choices, as the
    command line is checked); TrainingError naming the file and the value otherwise."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TrainingError(f"{path}: cannot be read ({err}); the run's arguments are damaged") from err
    if not isinstance(stored, dict):
        raise TrainingError(f"{path}: not a JSON object; the run's arguments are damaged: restore the file")
    for action in build_parser()._actions:
        value = stored.get(action.dest)
        problem = None if value is None else _stored_value_problem(action, value)
        if problem:
            raise TrainingError(
                f"{path}: {action.dest} = {value!r} {problem}; the run's arguments are damaged: restore the file"
            )
    return stored


def _stored_value_problem(action: argparse.Action, value: object) -> str | None:
    """What is wrong with `value` stored for `action`'s flag, or None."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # on/off flags
        return None if isinstance(value, bool) else "is not true or false"
    if isinstance(value, bool) or not isinstance(value, int | float | str | list):
        return "has the wrong type"
    items = value if isinstance(value, list) else [value]
    if action.choices is not None and any(item not in action.choices for item in items):
        return f"is not one of {', '.join(map(str, action.choices))}"
    if action.type is not None:
        try:
            parsed = action.type(",".join(map(str, items)))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            return f"is not valid ({err})"
        if (list(parsed) if isinstance(parsed, tuple) else parsed) != value:
            return "has the wrong type"
    return None


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def write_args(files: RunFiles, args: argparse.Namespace, world: Distributed) -> None:
    record = {k: _jsonable(v) for k, v in vars(args).items() if k not in ("explicit", "resume")}
    record["world_size"] = world.world_size
    runs.write_args(files, record)
