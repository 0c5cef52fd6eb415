"""Argument types, help formatting and flag bookkeeping shared by the scripts' command lines: each type checks a
value and says what is wrong with it in argparse's own error line. `stop` is how a script ends with a message. The
model and data flags of the commands that score a model (score.py, failure_test.py) are built and checked here too
(`add_model_arguments`, `add_data_arguments`, `check_common_arguments`)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

import dataset as datasets
from clipseg.backends import ExportUnusable, add_backend_argument, check_backend_flags, export_precision
from clipseg.benchmarks.protocols import BENCHMARKS
from clipseg.loading import CHECKPOINTS_DIR, DATA_KINDS
from clipseg.precision import add_precision_arguments, resolve_precision
from clipseg.transforms import RESIZE_RULES

BAD_INPUT = 2  # a model, data set, option or output path that cannot be used (argparse's usage errors are 2 too)
NOTHING_DONE = 1  # the run went ahead but nothing could be processed, or its results could not be saved


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


def step_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated iterations such as 5000,10000, got {text!r}"
        ) from None
    if not steps or steps[0] <= 0:
        raise argparse.ArgumentTypeError(f"must be positive iterations, got {text!r}")
    return steps


def weight_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers A,B such as 0,0.5, got {text!r}") from None
    if not 0 <= low <= high <= 1:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= A <= B <= 1, got {text!r}")
    return low, high


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


def stop(message: str, code: int = BAD_INPUT) -> NoReturn:
    """End the script: `error: <message>` on stderr, exit status `code` (BAD_INPUT or NOTHING_DONE)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ------------------------------------------------------------------------------ the flags of the scoring commands


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, input size, batching, device, precision, backend and resize flags of score.py and failure_test.py."""
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
    add_backend_argument(parser)
    parser.add_argument(
        "--resize",
        choices=RESIZE_RULES,
        default="original",
        help="how images are resized to the model's input: original = the authors' data pipeline (bilinear, "
        "align_corners=True, no antialiasing), as the paper's numbers were measured; pil = PIL's antialiased "
        "bilinear, as the HF processor does (default %(default)s)",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data set, split and limit flags of score.py and failure_test.py."""
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
    """Refuse (argparse errors) the values of `add_model_arguments` and `add_data_arguments` that cannot run; resolve
    the precision that will run."""
    if args.image_size is not None and args.image_size <= 0:
        parser.error(f"--image-size must be positive, got {args.image_size}")  # the patch is checked with the model
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.backend != "torch":
        check_exported_backend(parser, args)
        return
    try:  # the precision that will run: --precision, else the fastest that keeps fp32's masks (clipseg/precision.py)
        args.precision = resolve_precision(args.precision, args.device, args.amp)
    except ValueError as err:
        parser.error(str(err))


def check_exported_backend(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--backend onnx or openvino: the flags it needs (clipseg/backends.py), the text-prompt data sets it scores,
    and the precision that will run (the export's)."""
    if getattr(args, "name", None) is not None:
        parser.error(f"--backend {args.backend} runs an export folder given as --model EXPORT_DIR, not a run NAME")
    wrong = check_backend_flags(args.backend, args.model, args.checkpoint, args.device, args.precision, args.amp)
    if wrong:
        parser.error(wrong)
    if args.data in BENCHMARKS:
        parser.error(
            f"--data {args.data} runs in PyTorch only; --backend {args.backend} scores {', '.join(DATA_KINDS)}"
        )
    try:
        args.precision = export_precision(args.backend, args.model, "bf16" if args.amp else args.precision)
    except ExportUnusable as err:
        parser.error(str(err))
    args.amp = False
