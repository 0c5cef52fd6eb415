"""Segment your own images with text or image prompts: many prompts per image, the image encoded once.

    python predict.py photos/ --prompt "a cat" --prompt "the sofa" --out predictions
    python predict.py room.jpg --visual-prompt support.jpg:support_mask.png --threshold 0.4
    python predict.py photos/ --prompt "a cat" --precision int8          # fp32, bf16 or int8 (clipseg/precision.py)
    python predict.py photos/ --prompt "a cat" --model demo --checkpoint best   # a run of train.py
    python predict.py photos/ --prompt "a cat" --backend onnx --model exported/   # graphs from export.py
    python predict.py photos/ --prompt "a cat" --backend openvino --model exported_ov/   # export.py --openvino
    python predict.py photos/ --prompt "cat | dog" --prompt "person - red shirt" --grow 4 --fill-holes
    python predict.py big.jpg --prompt "a boat" --tile --refine guided --save prob,mask,soft,cutout --feather 8
    python predict.py photos/ --prompt "a cat" --instances --max-instances 3 --coco rle   # OUT/coco.json

For each image and prompt this writes, under `--out/<image>/`, the probability map (`<prompt>.prob.png`, 8- or
16-bit grayscale), the binary mask (`<prompt>.mask.png`, 0/255, probability > threshold, post-processed) and an overlay
(`<prompt>.overlay.png`); with several prompts also one combined `overlay.png` (a colour per prompt, legend).
`summary.json` lists, per image and prompt, the mask's area fraction, the maximum probability and the files.
All maps are at the original image resolution. With `--save` also `<prompt>.soft.png` (the mask with its feathered
edge) and `<prompt>.cutout.png` (RGBA). `<image>` is the image's file name (made from its whole path as given when
there are several inputs); names that are not plain lowercase ASCII become a slug with a hash
(clipseg/outputs.py `safe_name`). Each image's line of `summary.jsonl` is written as soon as its files are, so a run cut
short keeps what it did: `--resume` skips the images that are complete and redoes the rest.

Folders are walked as a stream (never listed whole), so a folder of millions of images costs no memory. Under
torchrun (`torchrun --nproc_per_node=N predict.py photos/ ...`, README "Scale out") every rank segments its share
of the images (a stable hash of the path: a rerun gives each rank the same images) and rank 0 merges the summaries.

Geometry: by default the image keeps its aspect ratio. It is resized so that its short side is `--image-size`
(the model's training size, 352 for the released weights) and both sides are multiples of 16; the long side is
capped at 3x the short side (more elongated images are squashed to 3:1). `--square` squashes every image to
S x S as the reference implementations do. Logits are resized bilinearly to the original size, then sigmoid.

Masks: a `--prompt` is a prompt expression (`cat | dog` union, `a & b` intersection, `a - b` subtraction, `car:1.5`
weights, parentheses; clipseg/expressions.py), all its phrases decoded from one encoding of the image. The mask is
probability > threshold (`--threshold`; without it the model's calibrated threshold, else the paper's 0.3: printed
once with where it came from), then `--shrink`, `--grow`, `--fill-holes`, `--min-area`, `--instances`,
`--feather` (clipseg/postprocess.py); `--refine guided|sam` sharpens edges, `--tile` runs windows over large images
(clipseg/tiling.py); `--coco rle|polygons` writes OUT/coco.json (rank 0 gathers the ranks' annotations).

Precision: without `--precision`, the fastest that keeps fp32's masks on this class of CPU (bf16 with AMX, int8
with VNNI but no AMX, else fp32; clipseg/precision.py); `--backend onnx|openvino` runs an export.py folder in its own
precision. Exit status: 0 at least one image processed; 1 none could be
(unreadable inputs are reported and skipped), or the summary could not be written; 2 an option, output path, model
or visual prompt that cannot be used, or a model whose output is NaN or infinite.

This command reads the flags, runs the images through the library and reports: the Python API (encode once, prompt
many times) is `clipseg.predictor.Predictor`; the walk, the summaries and resuming are clipseg/folder_prediction.py
and clipseg/folders.py; the files and summary entries come from clipseg/prediction_outputs.py, the pictures from
clipseg/drawing.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from clipseg.backends import export_backend
from clipseg.cli import (
    BAD_INPUT,
    NOTHING_DONE,
    add_backend_flag,
    add_device_flag,
    add_model_flags,
    add_precision_flags,
    add_sam_model_flag,
    below_one,
    check_backend_flags,
    load_command_model,
    load_sam_model,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_int,
)
from clipseg.distributed import Distributed, JobError, default_device, distributed_job, in_turn, run_and_exit
from clipseg.expressions import ExpressionError, parse
from clipseg.folder_prediction import (
    FolderOptions,
    FolderRun,
    ResumeMismatch,
    check_same_predictor,
    finish_folder,
    predict_folder,
    summarise_unreadable,
)
from clipseg.folders import IMAGE_SUFFIXES, SUMMARY_JSON_NAME, is_run_file, unreadable_entry
from clipseg.images import UnreadableImage
from clipseg.loading import LoadError
from clipseg.mask_formats import SEGMENTATIONS
from clipseg.mask_pipeline import REFINE_MODES, PipelineOptions
from clipseg.onnx.backend import ExportedCLIPSeg
from clipseg.outputs import UnwritableOutput, check_writable, printable
from clipseg.postprocess import SORT_KEYS, MaskOptions, describe_threshold
from clipseg.prediction_outputs import DEFAULT_SAVE, SAVE_KINDS, build_prompts, merge_duplicates
from clipseg.predictor import Predictor
from clipseg.refine import DEFAULT_SAM_MODEL
from clipseg.transforms import MAX_ELONGATION, RESIZE_RULES
from model import CLIPSeg


def parse_support(spec: str) -> tuple[Path, Path]:
    """'SUPPORT.jpg:MASK.png' -> (support, mask); the split is the first ':' after which both files exist."""
    splits = [(Path(spec[: match.start()]), Path(spec[match.end() :])) for match in re.finditer(":", spec)]
    for support, mask in splits:
        if support.is_file() and mask.is_file():
            return support, mask
    missing = sorted({str(path) for pair in splits for path in pair if path.name and not path.is_file()})
    raise argparse.ArgumentTypeError(
        f"--visual-prompt {spec!r}: expected SUPPORT_IMAGE:MASK_IMAGE, two existing files joined by ':'"
        + (f" (no such file: {', '.join(missing)})" if missing and len(splits) == 1 else "")
    )


def save_list(text: str) -> tuple[str, ...]:
    """'prob,mask,soft' -> the kinds of files to write per prompt (`SAVE_KINDS`), each once."""
    kinds = tuple(dict.fromkeys(kind.strip() for kind in text.split(",") if kind.strip()))
    unknown = [kind for kind in kinds if kind not in SAVE_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(SAVE_KINDS)}, got {text!r}")
    return kinds


def add_mask_flags(parser: argparse.ArgumentParser) -> None:
    """The mask pipeline's flags: post-processing, refinement, tiles, the files and the COCO annotations."""
    parser.add_argument("--grow", type=non_negative_int, default=0, metavar="N", help="grow the mask by N pixels")
    parser.add_argument("--shrink", type=non_negative_int, default=0, metavar="N", help="shrink it by N pixels first")
    parser.add_argument(
        "--feather", type=non_negative_float, default=0.0, metavar="PX", help="soft edge width (soft PNG, cut-out)"
    )
    parser.add_argument("--fill-holes", action="store_true", help="fill the holes of the mask")
    parser.add_argument(
        "--min-area", type=non_negative_int, default=0, metavar="PX", help="drop components smaller than this"
    )
    parser.add_argument(
        "--instances", action="store_true", help="report each connected component (summary, COCO annotations)"
    )
    parser.add_argument("--sort-instances", choices=SORT_KEYS, default="area", help="instance order (default area)")
    parser.add_argument(
        "--max-instances", type=positive_int, default=None, metavar="K", help="keep the best K components"
    )
    parser.add_argument(
        "--refine",
        choices=REFINE_MODES,
        default="none",
        help="sharper edges: guided (edge-aware upsampling, the image as guide) or sam (SAM prompted per component)",
    )
    add_sam_model_flag(parser, f"with --refine sam; default {DEFAULT_SAM_MODEL}")
    parser.add_argument("--tile", action="store_true", help="tiled inference: windows blended without seams")
    parser.add_argument(
        "--tile-size", type=positive_int, default=None, metavar="PX", help="window side (default: --image-size)"
    )
    parser.add_argument(
        "--tile-overlap", type=non_negative_int, default=None, metavar="PX", help="window overlap (default a quarter)"
    )
    parser.add_argument(
        "--tile-context",
        type=non_negative_float,
        default=0.0,
        metavar="W",
        help="weight in [0, 1) of a whole-image pass blended with the windows (default 0)",
    )
    parser.add_argument(
        "--save",
        type=save_list,
        default=DEFAULT_SAVE,
        metavar="LIST",
        help=f"files per prompt, of {', '.join(SAVE_KINDS)} (default {','.join(DEFAULT_SAVE)})",
    )
    parser.add_argument(
        "--coco", choices=SEGMENTATIONS, default=None, help="write OUT/coco.json with every mask (or instance)"
    )


def check_mask_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Prompt expressions parsed and the post-processing checked (usage errors, exit 2); `args.mask_options`."""
    for prompt in args.prompt:
        try:
            parse(prompt)
        except ExpressionError as err:
            parser.error(f"--prompt {printable(prompt, 60)!r}: {err}")
    try:
        args.mask_options = MaskOptions(  # its threshold is set once the model's is known (`segment`)
            grow=args.grow, shrink=args.shrink, feather=args.feather, fill_holes=args.fill_holes,
            min_area=args.min_area, instances=args.instances, sort_by=args.sort_instances,
            max_instances=args.max_instances,
        )  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    if not args.tile and (args.tile_size or args.tile_overlap is not None or args.tile_context):
        parser.error("--tile-size, --tile-overlap and --tile-context need --tile")
    if not 0 <= args.tile_context < 1:
        parser.error(f"--tile-context must be in [0, 1), got {args.tile_context}")
    if args.sam_model and args.refine != "sam":
        parser.error("--sam-model is the checkpoint of --refine sam")
    if args.refine == "sam":
        args.sam_model = args.sam_model or DEFAULT_SAM_MODEL


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Segment images with text and/or image prompts. Writes, per image and prompt, a probability "
        "map, a binary mask and an overlay at the original resolution, plus summary.json. Exit code 0 when at "
        "least one image was processed, 1 when none could be (unreadable files are reported and skipped), 2 for an "
        "output path, model or visual prompt that cannot be used or a model whose output is NaN or infinite.",
        epilog="Files: OUT/<image>/<prompt>.prob.png, .mask.png (0/255), .overlay.png; OUT/<image>/overlay.png "
        "with all prompts when there are several; OUT/summary.json (per image and prompt: area_fraction, "
        "max_probability, files; skipped inputs under 'errors'). <prompt> is a slug of the prompt plus a hash.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--prompt", action="append", default=[], help="a text prompt; repeat for several")
    parser.add_argument(
        "--visual-prompt",
        action="append",
        default=[],
        type=parse_support,
        metavar="SUPPORT:MASK",
        help="an image prompt: a support image and its object mask of the same size (object = pixels at least "
        "half the mask's maximum), engineered as in the paper (crop + blur + 10%% background); repeat for several",
    )
    parser.add_argument(
        "--threshold",
        type=below_one,
        default=None,
        help="a pixel is in the mask iff probability > this (default: the threshold calibrated on the model's "
        "validation data when its config records one, else 0.3, the paper's)",
    )
    parser.add_argument(
        "--out",
        type=output_folder,
        default="predictions",
        metavar="DIR",
        help="output folder, one subfolder per image (default predictions)",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="short side the model sees, a multiple of the model's patch size (16 for the released models; "
        "default: the size the model was trained at, from its config; 352 for the released models)",
    )
    parser.add_argument(
        "--square",
        action="store_true",
        help="squash each image to IMAGE_SIZE x IMAGE_SIZE (reference behaviour) instead of keeping its aspect "
        f"(native aspect caps the long side at {MAX_ELONGATION}x the short side)",
    )
    parser.add_argument(
        "--resize",
        choices=RESIZE_RULES,
        default="pil",
        help="how images are resized to the model's input: pil = PIL's antialiased bilinear, as the HF processor and "
        "the original Quickstart do; original = the authors' training/scoring pipeline (bilinear, align_corners=True, "
        "no antialiasing) (default %(default)s)",
    )
    parser.add_argument(
        "--prob-bits", type=int, choices=(8, 16), default=8, help="bit depth of probability PNGs (default 8)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        help="images taken from the walk per step (default 4); the mask pipeline encodes each image on its own",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a run cut short into the same --out: images whose files and summary line are complete are "
        "skipped, the rest (a half-written image too) done again",
    )
    parser.add_argument(
        "--summary", default=None, help="where to write the JSON summary ('-' = stdout; default OUT/summary.json)"
    )
    add_device_flag(parser, later="; the exported backends run on the CPU")
    add_precision_flags(parser, "predict")
    add_backend_flag(parser, auto=True)
    add_mask_flags(parser)
    add_model_flags(parser)
    args = parser.parse_args(argv)
    if not args.prompt and not args.visual_prompt:
        parser.error("give at least one --prompt or --visual-prompt")
    if any(not p.strip() for p in args.prompt):
        parser.error("--prompt must not be empty")
    check_mask_flags(parser, args)
    check_backend_and_precision(parser, args)
    return args


def check_backend_and_precision(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in --device for the backend (the exported ones run on the CPU) and resolve --precision/--amp to the
    precision that will run (`args.precision`, `clipseg.cli.check_backend_flags`); combinations that cannot run are
    usage errors that say what to change."""
    exported = args.backend in ("onnx", "openvino") or (args.backend == "auto" and export_backend(args.model))
    args.device = args.device or ("cpu" if exported else default_device())
    check_backend_flags(parser, args, "predict")


def check_outputs(args: argparse.Namespace) -> str | None:
    """What makes `--out` or `--summary` unwritable (checked before any work), or None."""
    try:
        check_writable(args.out, folder=True)
        if args.summary not in (None, "-"):
            check_writable(args.summary)
    except UnwritableOutput as err:
        return f"{err}; choose another --out or --summary"
    out = os.path.realpath(args.out)
    for given in args.inputs:
        folder = given if os.path.isdir(given) else os.path.dirname(given) or "."
        if os.path.realpath(folder) == out:
            return (
                f"--out {args.out} is the folder of the input {given}: each image's outputs go into a folder named "
                "after it, beside it; choose another --out"
            )
    return None if args.summary in (None, "-") else summary_conflict(args.summary, out, args.inputs)


def summary_conflict(summary: str, out: str, inputs: Sequence[str]) -> str | None:
    """Why writing the JSON summary to `summary` would overwrite something it must not (an input image, a file of
    the run in `out`, a realpath), or None."""
    real = Path(os.path.realpath(summary))
    if real.suffix.lower() in IMAGE_SUFFIXES or any(os.path.realpath(given) == str(real) for given in inputs):
        return f"--summary {summary} names an image: the summary is JSON; choose a .json file"
    if real.parent == Path(out) and is_run_file(real.name) and real.name != SUMMARY_JSON_NAME:
        return f"--summary {summary} is the run's own {real.name} in --out; choose another file"
    if Path(out) in real.parents and real.parent != Path(out):
        return (
            f"--summary {summary} lies in a subfolder of --out, where the images' output folders go; put it in --out "
            "itself or elsewhere"
        )
    return None


def load(args: argparse.Namespace) -> CLIPSeg | ExportedCLIPSeg:
    """The model --model names for --backend (`clipseg.cli.load_command_model`), recording its source and the
    precision that runs for the summary. Raises LoadError with the reason."""
    model, args.model = load_command_model(args)
    return model


def load_in_turn(args: argparse.Namespace, world: Distributed) -> CLIPSeg | ExportedCLIPSeg:
    """`load(args)`; under torchrun, when the model is to be converted to OpenVINO (`--backend auto`), one rank after
    another, so that rank 0 converts it and the others open its cached conversion. Raises LoadError."""
    if not (world.enabled and args.convert_to):
        return load(args)

    def load_or_error() -> CLIPSeg | ExportedCLIPSeg | LoadError:
        try:
            return load(args)
        except LoadError as err:  # returned, so that every rank still reaches in_turn's barriers
            return err

    loaded = in_turn(world, load_or_error)
    if isinstance(loaded, LoadError):
        raise loaded
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. Returns 0 when at least one image was processed, 1 when none could be (or the summary could not be
    written), 2 for an output path, model or visual-prompt file that cannot be used, a model whose output is not
    finite, or ranks of a torchrun job started differently."""
    args = parse_args(argv)
    prompts, merged = merge_duplicates(build_prompts(args.prompt, args.visual_prompt))
    for entry in merged:
        note = f"note: prompt {printable(entry['prompt'], 60)!r} given {entry['times']} times: segmented once"
        print(note, file=sys.stderr)
    try:
        with distributed_job(args.device) as (world, device):  # one rank of a torchrun job, or rank 0 of 1
            args.device = str(device)
            return segment(args, prompts, merged, world)
    except (JobError, ResumeMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT


def segment(args: argparse.Namespace, prompts: list, merged: list[dict], world: Distributed) -> int:
    """Load the model and the prompts, segment this rank's images, report (rank 0); main's exit status."""
    unwritable = in_turn(world, lambda: check_outputs(args))  # one rank at a time: probes of a shared folder
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        return BAD_INPUT
    unreadable = {item: unreadable_entry(item) for item in args.inputs if not Path(item).is_dir()}
    if all(unreadable.get(item) for item in args.inputs):  # nothing to walk: said before any model is loaded
        for item, problem in unreadable.items():
            print(f"skipped {item}: {problem}", file=sys.stderr)
        if world.is_main:
            header = {key: getattr(args, key) for key in ("model", "backend", "precision", "square")}
            header["threshold"] = None  # the model was not loaded: its calibrated threshold is not known
            if args.threshold is not None:
                note = describe_threshold(args.threshold, "given")
                header["threshold"] = {"value": args.threshold, "source": "given", "note": note}
            header |= {"image_size": args.image_size, "interrupted": False, "merged_prompts": merged}
            summarise_unreadable(Path(args.out), header, unreadable, args.summary)
        print("error: no readable input images", file=sys.stderr)
        return NOTHING_DONE
    try:
        model = load_in_turn(args, world)
        predictor = Predictor(
            model, args.image_size, args.square, args.device, resize=args.resize, precision=args.precision
        )
    except (LoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    supports = [p.support for p in prompts if p.kind == "visual"]
    try:
        conditional = predictor.embed_prompts(support=supports) if supports else None
    except (UnreadableImage, ValueError) as err:
        print(f"error: --visual-prompt: {err}", file=sys.stderr)
        return BAD_INPUT
    try:
        sam = load_sam_model(args)  # None unless --refine sam (check_mask_flags)
    except LoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    threshold, source = predictor.default_threshold(args.threshold)
    note = describe_threshold(threshold, source, getattr(predictor.model.config, "threshold_origin", None))
    if world.is_main:
        print(note, file=sys.stderr)
    tile = (args.tile_size or predictor.transform.size) if args.tile else None
    masks = replace(args.mask_options, threshold=threshold)
    pipeline = PipelineOptions(masks, args.refine, tile, args.tile_overlap, args.tile_context)
    header = {
        "model": args.model,
        "backend": args.backend,
        "precision": args.precision,
        "threshold": {"value": threshold, "source": source, "note": note},
        "square": args.square,
        "image_size": predictor.transform.size,
        "pipeline": pipeline.to_dict(),
        "save": list(args.save),
        "coco": args.coco,
        "interrupted": False,
        "merged_prompts": merged,
    }
    settings = {key: header[key] for key in ("model", "backend", "precision", "square", "image_size")}
    options = FolderOptions(
        out=Path(args.out), threshold=threshold, prob_bits=args.prob_bits, batch_size=args.batch_size,
        resume=args.resume, settings=settings, masks=pipeline, save=args.save, coco=args.coco, sam=sam,
    )  # fmt: skip
    check_same_predictor(world, predictor, prompts, options, args.inputs)
    try:
        run = predict_folder(predictor, conditional, prompts, args.inputs, options, world)
    except KeyboardInterrupt:
        if not world.enabled:  # the lines written so far, summarised; a torchrun job resumes with --resume
            finish_folder(FolderRun(), world, options.out, header | {"interrupted": True}, args.summary)
        raise
    job = finish_folder(run, world, options.out, header, args.summary)
    if not world.is_main:
        return BAD_INPUT if job["stopped"] else 0
    resumed = ""
    if args.resume:
        rank = ", on this rank" if world.enabled else ""
        resumed = f" ({run.processed} now, {run.reused} done before{rank}"
        others = job["processed"] - run.processed - run.reused
        if others > 0 and not world.enabled:  # lines of earlier runs of this folder with other inputs
            resumed += f"; {others} from earlier runs into {options.out} with other inputs"
        resumed += ")"
    large = f"; {run.large_images} much larger than the model's input, --tile may help" if run.large_images else ""
    print(
        f"processed {job['processed']} image(s){resumed}, skipped {job['skipped']}{large}; summary: {job['summary']}",
        file=sys.stderr,
    )
    if job["stopped"]:
        print(f"error: {job['stopped']}", file=sys.stderr)
        return BAD_INPUT
    if not job["processed"]:
        print("error: no readable input images", file=sys.stderr)
    return 0 if job["processed"] and job["summary"] else NOTHING_DONE


if __name__ == "__main__":
    run_and_exit(main)
