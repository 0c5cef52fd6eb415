"""train.py's command line: every flag with its default, its check and its help (`python train.py --help`), and
the checks between flags. train.py keeps what a run does with them; `stored_args` there decides what --resume keeps.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import dataset as datasets
from clipseg.baselines import DEFAULT_VIT
from clipseg.benchmarks.classes import parse_removal
from clipseg.cli import (
    DefaultsHelpFormatter,
    dropout_rate,
    explicit_flags,
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
from clipseg.config import ARCHITECTURES, DEFAULT_BACKBONE, MAX_IMAGE_SIDE, RANDOM_BACKBONES, check_image_side
from clipseg.transforms import RESIZE_RULES

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
    run.add_argument("--checkpoints-dir", default="checkpoints", help="parent directory of the run directories")
    run.add_argument("--resume", action="store_true", help="continue the run <name> from its last checkpoint")
    run.add_argument("--seed", type=int, default=0, help="seed of the sample order, augmentation, dropout, init")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
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
        choices=tuple(datasets.PROMPT_TEMPLATES),
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
    data.add_argument("--num-workers", type=non_negative_int, default=4, help="DataLoader worker processes")
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
    arch.add_argument("--init", default=None, help="start from weights: hub id, checkpoint directory or original .pth")
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
    if args.warmup and args.lrs != "warmup_cosine":
        parser.error("--warmup goes with --lrs warmup_cosine")
    if args.warmup >= args.max_iterations:
        parser.error(f"--warmup={args.warmup} must be below --max-iterations={args.max_iterations}")
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
