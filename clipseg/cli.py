"""The commands' shared command-line conventions (README, "Command-line conventions"): argument types, help
formatting and flag bookkeeping (each type checks a value and says what is wrong with it in argparse's own error
line); the exit statuses and `stop`, how a command ends with a message; the model flags of every command that loads a
model (`add_model_flags`, `model_source`, `load_command_model`); the SAM model of the commands that refine masks with
SAM, predict.py and app.py (`add_sam_model_flag`, `load_sam_model`); the precision and backend flags of every command
that runs one (`add_precision_flags`, `check_precision_flags`, `add_backend_flag`, `check_backend_flags`); and the
run and data flags of the commands that score a model, score.py and failure_test.py (`add_scoring_arguments`,
`add_data_arguments`, `check_common_arguments`).

Exit statuses, the same in every command: 0 done; 1 (NOTHING_DONE) the command ran but nothing could be processed,
or its results could not be saved; 2 (BAD_INPUT) bad usage or input: argparse's errors, a model that cannot be
loaded, data or output paths that cannot be used."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from torch.utils.data import Dataset

import dataset as datasets
from clipseg.backends import BACKEND_VARIABLE, BACKENDS, auto_backend, backend_flag_error
from clipseg.benchmarks.protocols import BENCHMARKS
from clipseg.config import DEFAULT_BACKBONE
from clipseg.distributed import Distributed, JobError, default_device, distributed_job
from clipseg.loading import (
    CHECKPOINTS_DIR,
    DATA_KINDS,
    DEFAULT_MODEL,
    RUN_NAME,
    LoadError,
    build_eval_dataset,
    input_side,
    load_model,
    resolve_model,
)
from clipseg.onnx.backend import ExportedCLIPSeg
from clipseg.precision import (
    OPENVINO_MIN_VISION_WIDTH,
    PRECISIONS,
    default_precision,
    prepare_model,
    requested_precision,
    resolve_precision,
)
from clipseg.refine import SamRefiner
from clipseg.transforms import RESIZE_RULES
from model import CLIPSeg

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


def int_up_to(limit: int) -> Callable[[str], int]:
    """An argparse type: an integer from 1 to `limit` (sizes a flag builds a model of: beyond it, memory runs out)."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit}, got {text}")
        return value

    parse.__name__ = f"integer from 1 to {limit}"
    return parse


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


def below_one(text: str) -> float:
    """An argparse type: a number in [0, 1) (a threshold, a dropout rate)."""
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
    if not RUN_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"must be a plain directory name (letters, digits, '.', '_', '+', '-'; no '/' or '..'), got {text!r}"
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


def output_folder(text: str) -> str:
    """--out, a folder in every command: a name ending in .json (what score.py's and bench.py's --out once took) is
    refused rather than made into a folder."""
    if text.lower().endswith(".json"):
        raise argparse.ArgumentTypeError(
            f"must name a folder (the command writes its files into it), not a file such as {text!r}: give its folder"
        )
    return text


class RenamedFlag(argparse.Action):
    """A flag's older name, hidden from --help: giving it is a usage error that names the flag to use instead."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", why: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        parser.error(f"{option_string} was renamed {self.new}{f' ({self.why})' if self.why else ''}")


def add_renamed_flag(parser: argparse.ArgumentParser, old: str, new: str, why: str = "") -> None:
    """Make `old` (e.g. score.py's --prompt) a usage error naming `new` (--prompt-kind); an exact match, so argparse
    no longer takes `old` as an abbreviation of `new`."""
    parser.add_argument(old, action=RenamedFlag, new=new, why=why)


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


# ------------------------------------------------------------------- the model flags of every command that loads one

MODEL_HELP = (
    "the model: a run name (a folder of --checkpoints-dir), a run or checkpoint directory, a hub id (OWNER/NAME) or "
    f"an original .pth decoder (with --backbone) (default {DEFAULT_MODEL}, the released weights)"
)
CHECKPOINT_HELP = (
    "a model inside the run or directory: best (the best validation of train.py --val-interval) or iter_NNNNNN "
    "(train.py --keep-checkpoints) (default: the run's latest)"
)
BACKBONE_HELP = f"the CLIP (hub id or directory) an original .pth decoder runs on (default {DEFAULT_BACKBONE})"
CHECKPOINTS_DIR_HELP = f"the folder of the runs --model names (default {CHECKPOINTS_DIR})"


def add_device_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, later: str = "") -> None:
    """--device, with the same help in every command. Its default is this machine's (`distributed.default_device`),
    or None when the command picks it later (`later` then says how, e.g. the exported backends run on the CPU)."""
    parser.add_argument(
        "--device",
        default=None if later else default_device(),
        help=f"torch device: cpu, cuda or cuda:N (default: cuda when available, else cpu{later})",
    )


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --checkpoint, --backbone and --checkpoints-dir, with the same help in every command."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help=MODEL_HELP)
    group.add_argument("--checkpoint", default=None, metavar="best|iter_NNNNNN", help=CHECKPOINT_HELP)
    group.add_argument("--backbone", default=None, help=BACKBONE_HELP)
    group.add_argument("--checkpoints-dir", default=str(CHECKPOINTS_DIR), metavar="DIR", help=CHECKPOINTS_DIR_HELP)


def model_source(args: argparse.Namespace) -> tuple[str, Path | None]:
    """Where the model of `add_model_flags` is loaded from and the directory its scores go to
    (`clipseg.loading.resolve_model`; LoadError when there is none). With --backend onnx or openvino, --model is
    the export folder itself (checked when it is opened) and has no scores directory."""
    if getattr(args, "backend", "torch") != "torch" and not getattr(args, "convert_to", None):
        return args.model, None
    return resolve_model(args.model or DEFAULT_MODEL, Path(args.checkpoints_dir), args.checkpoint)


def load_command_model(args: argparse.Namespace, reference: bool = False) -> tuple[CLIPSeg | ExportedCLIPSeg, str]:
    """The model the flags name (`model_source`) loaded for `args.backend` (`clipseg.loading.load_model`), and its
    source. An export runs in its own precision, so `args.precision` becomes it. reference: for scoring, where an
    image's logits must depend on the image alone (merged multi-process scores equal one process's), so OpenVINO
    keeps its shape-generic image encoder (`OpenVinoCLIPSeg.static_after`). Raises LoadError."""
    source, _ = model_source(args)
    if getattr(args, "convert_to", None):
        return converted_model(args, source), source
    compiled = None
    if args.backend == "openvino":  # its graphs compiled for this CPU are kept in the cache, as a conversion's are
        from clipseg.onnx.openvino_cache import compiled_graphs

        compiled = compiled_graphs()
    model = load_model(source, args.backbone, args.device, args.precision, args.backend, compiled)
    if args.backend != "torch":
        args.precision = model.precision
    if args.backend == "openvino" and (note := model.checked_elsewhere()):
        print(f"note: {note}", file=sys.stderr, flush=True)
    if reference and args.backend == "openvino":
        model.static_after = None
    return model, source


def load_evaluation(args: argparse.Namespace) -> tuple[CLIPSeg | ExportedCLIPSeg, str, int, Dataset]:
    """score.py's and failure_test.py's model (`load_command_model` for scoring), its source, the input side it
    runs at (`input_side`) and the evaluation data the flags name (`build_eval_dataset`); stops with the message
    (exit 2) when either cannot be loaded."""
    try:
        model, source = load_command_model(args, reference=True)
        image_size = input_side(model, args.image_size)
    except LoadError as err:
        stop(str(err))
    try:
        data = build_eval_dataset(args.data, args.data_root, args.split, image_size, args.limit, args.resize)
    except LoadError as err:
        stop(f"{err}{run_data_hint(args)}")
    return model, source, image_size, data


def run_data_hint(args: argparse.Namespace) -> str:
    """When --model is a run of train.py trained on other data than --data names: a hint that gives its --data and
    --data-root (`python score.py demo` on the demo run, trained on synthetic data, looked for PhraseCut); else ''."""
    named = Path(args.checkpoints_dir) / (args.model or "")
    run_dir = named if args.model and named.is_dir() else Path(args.model or "")
    for folder in (run_dir, run_dir.parent):
        try:
            stored = json.loads((folder / "args.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        data, root = (stored.get("data"), stored.get("data_root")) if isinstance(stored, dict) else (None, None)
        if data in DATA_KINDS and data != args.data:
            flags = f"--data {data}" + (f" --data-root {root}" if isinstance(root, str) else "")
            return f"\n(the run {folder} was trained with {flags}: give those flags to score it on its own data)"
    return ""


def run_job(args: argparse.Namespace, work: Callable[[argparse.Namespace, Distributed], dict]) -> dict:
    """`work(args, world)` as one rank of a torchrun job, or rank 0 of 1, on the device --device names (then
    `args.device`); a job that cannot run as started (the device is not there, the ranks disagree) stops with
    the message."""
    try:
        with distributed_job(args.device) as (world, device):
            args.device = str(device)
            return work(args, world)
    except JobError as err:
        stop(str(err))


def converted_model(args: argparse.Namespace, source: str) -> CLIPSeg | ExportedCLIPSeg:
    """`source` run in OpenVINO from its cached conversion in `args.convert_to`: the one recorded for its files as
    they are (`clipseg.onnx.openvino_cache.recorded_conversion`: PyTorch is not even loaded), else `source` loaded
    in PyTorch and converted or found (`cached_export`). When it cannot be converted, the PyTorch model in the
    predict job's default precision, with a note on stderr (`args.backend` and `args.precision` say which runs)."""
    from clipseg.onnx.openvino_cache import (
        ConversionFailed,
        cached_export,
        compiled_graphs,
        recorded_conversion,
        say_cached,
        source_key,
    )

    key = source_key(source, args.backbone, args.convert_to)
    if (recorded := recorded_conversion(key)) is not None:
        try:
            runner = load_model(str(recorded), None, "cpu", args.convert_to, "openvino", compiled_graphs())
        except LoadError:
            runner = None  # a damaged conversion: the long way below finds it again and says what is wrong
        if runner is not None and (runner.config.vision_width or 0) >= OPENVINO_MIN_VISION_WIDTH:
            say_cached(args.convert_to, source, recorded)
            args.backend, args.precision = "openvino", runner.precision
            return runner
    model = load_model(source, args.backbone, "cpu", "fp32", "torch")
    if key != source_key(source, args.backbone, args.convert_to):
        key = None  # a file changed while it was read: nothing is recorded for it
    try:
        width = model.config.vision_width or 0
        if width < OPENVINO_MIN_VISION_WIDTH:
            raise ConversionFailed(
                f"a model with a {width}-wide vision tower is not converted to OpenVINO (only from "
                f"{OPENVINO_MIN_VISION_WIDTH}, ViT-B, where it was measured faster)"
            )
        folder = cached_export(model, args.convert_to, source, source_key=key)
        runner = load_model(str(folder), None, "cpu", args.convert_to, "openvino", compiled_graphs())
    except (ConversionFailed, LoadError) as err:
        args.backend, args.precision = "torch", default_precision("cpu", "predict")
        print(f"note: {err}; running PyTorch {args.precision} instead", file=sys.stderr, flush=True)
        return prepare_model(model, args.precision, "cpu")
    args.backend, args.precision = "openvino", runner.precision
    return runner


# ------------------------------------------------------------- the SAM model of the commands that refine with SAM

SAM_MODEL_HELP = (
    "the Segment Anything model that refines masks with SAM (refine sam): a hub id or a directory where transformers' "
    "SamModel and SamProcessor were saved (save_pretrained); loaded and checked at start-up"
)


def add_sam_model_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """`--sam-model ID_OR_DIR`, with the same help in every command that has it; `default` says what the command
    does without it."""
    parser.add_argument("--sam-model", default=None, metavar="ID_OR_DIR", help=f"{SAM_MODEL_HELP} ({default})")


def load_sam_model(args: argparse.Namespace) -> SamRefiner | None:
    """The SAM model `args.sam_model` names on `args.device`, loaded and checked (`clipseg.refine.load_sam`: config,
    processor, finite weights), or None without one. Raises LoadError "--sam-model: <what is wrong>" naming it."""
    if not args.sam_model:
        return None
    try:
        return SamRefiner.from_pretrained(args.sam_model, device=args.device)
    except (OSError, ValueError) as err:
        raise LoadError(f"--sam-model: {err}") from err


# ------------------------------------------------------------------ the precision flags of every command that runs one

PRECISION_HELP = {
    "score": "fp32 (the default: the paper's numbers are fp32); bf16 (autocast where the CPU or GPU computes bf16 "
    "natively, fp32 with a warning elsewhere); int8 (dynamic int8 quantisation of the image tower's linear layers, "
    "CPU only; text tower and decoder in fp32)",
    "predict": "fp32; bf16 (autocast where the CPU or GPU computes bf16 natively, fp32 with a warning elsewhere); int8 "
    "(dynamic int8 quantisation of the image tower's linear layers, CPU only; text tower and decoder in fp32). "
    "Default: the fastest that keeps >= 99.5%% of fp32's mask pixels on this class of CPU: bf16 with AMX, int8 with "
    "VNNI but no AMX, else fp32; fp32 on GPUs (clipseg/precision.py); with AMX or VNNI and OpenVINO installed, "
    "--backend auto runs OpenVINO int8 unless a precision is given",
    "train": "mixed precision of the training steps: bf16 (the default: bf16 where the CPU or GPU computes it "
    "natively, fp16 with a gradient scaler on GPUs without bf16, fp32 on CPUs without native bf16, where it is "
    "several times faster) or fp32; validation runs in fp32",
}
TRAINING_PRECISIONS = ("fp32", "bf16")
AMP_HELP = "the older flags: --amp = --precision bf16, --no-amp = --precision fp32 (kept for existing command lines)"


def add_precision_flags(parser: argparse.ArgumentParser, job: str) -> None:
    """--precision (its default is the job's: 'score', 'predict' or 'train') and its older spelling --amp/--no-amp."""
    choices = TRAINING_PRECISIONS if job == "train" else PRECISIONS
    parser.add_argument("--precision", choices=choices, default=None, help=PRECISION_HELP[job])
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)


def check_precision_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, job: str, supported: Sequence[str] = PRECISIONS
) -> None:
    """Set `args.precision` to the precision that will run on `args.device` (`clipseg.precision.resolve_precision`:
    --precision, --amp/--no-amp, else the job's default); combinations that cannot run are usage errors."""
    try:
        args.precision = resolve_precision(args.precision, args.device, args.amp, supported, job)
    except ValueError as err:
        parser.error(str(err))
    args.amp = None  # folded into args.precision


# --------------------------------------------------------------- the backend flag of every command that runs a model

BACKEND_HELP = (
    "torch: the model in PyTorch; onnx: the graphs `python export.py --model MODEL --out DIR` wrote, given as "
    "--model DIR, in onnxruntime (CPU, fp32; pip install -r requirements-export.txt); openvino: the folder `python "
    "export.py --model MODEL --out DIR --openvino --precision P` wrote, given as --model DIR, in OpenVINO (CPU, in "
    "the export's precision P; pip install -r requirements-openvino.txt)"
)


AUTO_BACKEND_HELP = (
    "auto (the default, or $CLIPSEG_BACKEND's value): an export folder given as --model runs in its backend; with "
    "--precision, --amp or a GPU, torch; else this CPU's fastest measured path (clipseg/precision.py): OpenVINO int8 "
    "on CPUs with AMX or VNNI when requirements-openvino.txt is installed, for models from ViT-B up (converted once, "
    "a few minutes, and cached; PyTorch if the conversion fails its accuracy check), otherwise torch in the precision "
    "of --precision's default. "
)


def add_backend_flag(parser: argparse.ArgumentParser, auto: bool = False) -> None:
    """`--backend torch|onnx|openvino` (default torch), with the same help in every command that has it; auto:
    `auto` too, the default unless $CLIPSEG_BACKEND names another (predict.py and app.py)."""
    if not auto:
        parser.add_argument("--backend", choices=BACKENDS, default="torch", help="default torch. " + BACKEND_HELP)
        return
    default = os.environ.get(BACKEND_VARIABLE) or "auto"
    parser.add_argument(
        "--backend", choices=("auto", *BACKENDS), default=default, help=AUTO_BACKEND_HELP + BACKEND_HELP
    )


def check_backend_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, job: str) -> None:
    """--backend against the model, device and precision flags (`clipseg.backends.backend_flag_error`), then the
    precision: torch resolves it for the job (`check_precision_flags`); an export runs in its own, so
    `args.precision` stays the one asked for (None: the export's), checked when the export is opened. auto: the
    backend `clipseg.backends.auto_backend` picks; `args.convert_to` is the precision of an OpenVINO conversion
    of the PyTorch model to make or reuse (`load_command_model`), else None."""
    args.convert_to = None
    if args.backend not in ("auto", *BACKENDS):
        parser.error(f"${BACKEND_VARIABLE}={args.backend} is not a backend; choose auto, {', '.join(BACKENDS)}")
    if args.backend == "auto":
        asked = args.precision is not None or args.amp is not None
        args.backend, args.convert_to = auto_backend(args.model, args.device or "cpu", asked, job)
        if args.convert_to:
            args.precision, args.amp = args.convert_to, None
            return
    if args.backend == "torch":
        check_precision_flags(parser, args, job)
        return
    wrong = backend_flag_error(args.backend, args.model, args.checkpoint, args.device, args.precision, args.amp)
    if wrong:
        parser.error(wrong)
    try:
        args.precision = requested_precision(args.precision, args.amp)
    except ValueError as err:
        parser.error(str(err))
    args.amp = None  # folded into args.precision


# ------------------------------------------------------------------------------ the flags of the scoring commands


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags and the input size, batching, device, precision, backend and resize flags of score.py and
    failure_test.py."""
    add_model_flags(parser)
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
    add_device_flag(parser)
    add_precision_flags(parser, "score")
    add_backend_flag(parser)
    parser.add_argument(
        "--resize",
        choices=RESIZE_RULES,
        default="original",
        help="how images are resized to the model's input: original = the authors' data pipeline (bilinear, "
        "align_corners=True, no antialiasing), as the paper's numbers were measured; pil = PIL's antialiased "
        "bilinear, as the HF processor does (default %(default)s)",
    )


def add_data_arguments(parser: argparse.ArgumentParser, benchmarks: bool = True) -> None:
    """The data set, split and limit flags of score.py and failure_test.py (`benchmarks`: whether --data offers
    the paper's other benchmarks, which score.py runs and failure_test.py does not)."""
    other = (
        "; pascal5i, coco20i (one-shot), voc-zeroshot: the paper's other benchmarks, see the benchmark options"
        if benchmarks
        else ""
    )
    parser.add_argument(
        "--data",
        choices=DATA_KINDS + (BENCHMARKS if benchmarks else ()),
        default="phrasecut",
        help="phrasecut: the downloaded data set; synthetic: generated PhraseCut-format data (made if absent); "
        f"folder: your own JSONL/CSV index of image, phrase, mask{other} (default %(default)s)",
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
    """Refuse (argparse errors) the values of `add_scoring_arguments` and `add_data_arguments` that cannot run;
    resolve the precision that will run (fp32 unless asked; an export's own with --backend onnx or openvino).
    `args.model` None here means none was given (an export needs one)."""
    if args.image_size is not None and args.image_size <= 0:
        parser.error(f"--image-size must be positive, got {args.image_size}")  # the patch is checked with the model
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.backend != "torch" and args.data in BENCHMARKS:
        parser.error(
            f"--data {args.data} runs in PyTorch only; --backend {args.backend} scores {', '.join(DATA_KINDS)}"
        )
    check_backend_flags(parser, args, "score")
