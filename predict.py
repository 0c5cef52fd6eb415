"""Segment your own images with text or image prompts: many prompts per image, the image encoded once.

    python predict.py photos/ --prompt "a cat" --prompt "the sofa" --out predictions
    python predict.py room.jpg --visual-prompt support.jpg:support_mask.png --threshold 0.4
    python predict.py photos/ --prompt "a cat" --model demo --checkpoint best   # a run of train.py
    python predict.py photos/ --prompt "a cat" --precision int8          # fp32, bf16 or int8 (clipseg/precision.py)
    python predict.py photos/ --prompt "a cat" --backend onnx --model exported/   # graphs from export.py
    python predict.py photos/ --prompt "a cat" --backend openvino --model exported_ov/   # export.py --openvino

For each image and prompt this writes, under `--out/<image>/`, the probability map (`<prompt>.prob.png`, 8- or
16-bit grayscale), the binary mask (`<prompt>.mask.png`, 0/255, probability > threshold) and an overlay
(`<prompt>.overlay.png`); with several prompts also one combined `overlay.png` (a colour per prompt, legend).
`summary.json` lists, per image and prompt, the mask's area fraction, the maximum probability and the files.
All maps are at the original image resolution.

Geometry: by default the image keeps its aspect ratio. It is resized so that its short side is `--image-size`
(the model's training size, 352 for the released weights) and both sides are multiples of 16; the long side is
capped at 3x the short side (more elongated images are squashed to 3:1). `--square` squashes every image to
S x S as the reference implementations do. Logits are resized bilinearly to the original size, then sigmoid.

Precision: without `--precision`, the fastest that keeps fp32's masks on this class of CPU (bf16 with AMX, int8
with VNNI but no AMX, else fp32; clipseg/precision.py); `--backend onnx|openvino` runs an export.py folder in its own
precision. Exit status: 0 at least one image processed; 1 none could be
(unreadable inputs are reported and skipped), or the summary could not be written; 2 an option, output path, model
or visual prompt that cannot be used, or a model whose output is NaN or infinite.

This command reads the flags, collects the images, runs them through the library and reports: the Python API
(encode once, prompt many times) is `clipseg.predictor.Predictor`; the files and summary entries come from
clipseg/prediction_outputs.py, the pictures from clipseg/drawing.py.
"""

from __future__ import annotations

import argparse
import re
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from clipseg.cli import (
    BAD_INPUT,
    NOTHING_DONE,
    add_backend_flag,
    add_model_flags,
    add_precision_flags,
    check_backend_flags,
    load_command_model,
    output_folder,
)
from clipseg.images import UnreadableImage, open_rgb
from clipseg.loading import LoadError
from clipseg.onnx.backend import ExportedCLIPSeg
from clipseg.outputs import UnwritableOutput, check_writable, json_text, printable, write_text
from clipseg.prediction_outputs import (
    Prompt,
    build_prompts,
    image_output_names,
    image_summary,
    merge_duplicates,
    write_image_outputs,
)
from clipseg.predictor import Predictor
from clipseg.transforms import MAX_ELONGATION, RESIZE_RULES, NonFiniteOutput
from model import CLIPSeg

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def collect_images(inputs: Sequence[str]) -> tuple[list[Path], list[dict]]:
    """Files as given and the image files (by suffix, sorted, not recursive) of folders. Inputs and folder entries
    that cannot be read (missing, a symlink loop, a broken link, no permission, not a regular file) and folders
    without images become error entries. Duplicates are dropped."""
    paths, errors, seen = [], [], set()
    for item in inputs:
        path, files = Path(item), [Path(item)]
        if path.is_dir():
            try:
                files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as err:
                files = []
                errors.append({"image": str(path), "error": f"cannot list the folder ({err.strerror or err})"})
            else:
                if not files:
                    errors.append({"image": str(path), "error": f"folder has no images ({', '.join(IMAGE_SUFFIXES)})"})
        for file in files:
            problem = unreadable_entry(file)
            if problem:
                errors.append({"image": str(file), "error": problem})
            elif file.resolve() not in seen:
                seen.add(file.resolve())
                paths.append(file)
    return paths, errors


def unreadable_entry(path: Path) -> str | None:
    """Why `path` cannot be read as an image file, or None for a regular file."""
    try:
        if stat.S_ISREG(path.stat().st_mode):
            return None
        return "not a regular file"
    except FileNotFoundError:
        return "file not found" if not path.is_symlink() else "broken symbolic link"
    except OSError as err:
        return f"cannot read ({err.strerror or err})"


def parse_support(spec: str) -> tuple[Path, Path]:
    """'SUPPORT.jpg:MASK.png' -> (support, mask); the split is the first ':' after which both files exist."""
    for match in re.finditer(":", spec):
        support, mask = Path(spec[: match.start()]), Path(spec[match.end() :])
        if support.is_file() and mask.is_file():
            return support, mask
    raise argparse.ArgumentTypeError(
        f"--visual-prompt {spec!r}: expected SUPPORT_IMAGE:MASK_IMAGE, two existing files joined by ':'"
    )


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
        type=float,
        default=0.3,
        help="a pixel is in the mask iff probability > this (default 0.3, the paper's)",
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
        type=int,
        default=None,
        help="short side the model sees, a multiple of the model's patch size (16 for the released models; "
        "default: the model's training size, 352)",
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
        type=int,
        default=4,
        help="images read and encoded together; those of one inference size share a forward pass (default 4)",
    )
    parser.add_argument(
        "--summary", default=None, help="where to write the JSON summary ('-' = stdout; default OUT/summary.json)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda:0 (default cuda when available, else cpu; the exported backends: cpu)",
    )
    add_precision_flags(parser, "predict")
    add_backend_flag(parser)
    add_model_flags(parser)
    args = parser.parse_args(argv)
    if not args.prompt and not args.visual_prompt:
        parser.error("give at least one --prompt or --visual-prompt")
    if any(not p.strip() for p in args.prompt):
        parser.error("--prompt must not be empty")
    if args.image_size is not None and args.image_size <= 0:
        parser.error(f"--image-size must be positive, got {args.image_size}")  # the patch is checked with the model
    if not 0 <= args.threshold < 1:
        parser.error(f"--threshold must be in [0, 1), got {args.threshold}")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    check_backend_and_precision(parser, args)
    return args


def check_backend_and_precision(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in --device for the backend (the exported ones run on the CPU) and resolve --precision/--amp to the
    precision that will run (`args.precision`, `clipseg.cli.check_backend_flags`); combinations that cannot run are
    usage errors that say what to change."""
    exported = args.backend != "torch"
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not exported else "cpu")
    check_backend_flags(parser, args, "predict")


@dataclass
class Run:
    """What a CLI run has done so far: the summary's image entries and the skipped inputs."""

    images: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    merged_prompts: list[dict] = field(default_factory=list)
    interrupted: bool = False
    stopped: str | None = None  # why the run ended before its last image

    def skip(self, image: Path | str, reason: str) -> None:
        tqdm.write(f"skipped {image}: {reason}", file=sys.stderr)
        self.errors.append({"image": str(image), "error": reason})


def process(
    predictor: Predictor,
    conditional: Tensor,
    paths: Sequence[Path],
    prompts: Sequence[Prompt],
    args: argparse.Namespace,
    run: Run,
) -> None:
    """Read, segment and write every image, `batch_size` at a time; images that cannot be read, or whose outputs
    cannot be written, are reported and skipped. NaN or infinite model outputs raise `NonFiniteOutput`."""
    names = image_output_names(paths)
    progress = tqdm(total=len(paths), unit="image", disable=len(paths) <= 1, file=sys.stderr)
    for start in range(0, len(paths), args.batch_size):
        loaded = []
        for path, name in zip(paths[start : start + args.batch_size], names[start : start + args.batch_size]):
            try:
                loaded.append((path, name, open_rgb(path)))
            except UnreadableImage as err:
                run.skip(path, err.reason)
                progress.update(1)
        images = [image for _, _, image in loaded]
        all_probs = predictor.predict_batch(images, conditional=conditional, batch_size=args.batch_size)
        for (path, name, image), probs in zip(loaded, all_probs):
            folder = Path(args.out) / name
            try:
                entry = write_image_outputs(image, probs, prompts, folder, args.threshold, args.prob_bits)
            except OSError as err:
                run.skip(path, f"cannot write its outputs ({err})")
            else:
                size = predictor.transform.input_size(*image.size)
                summary = image_summary(str(path), image.size, size, entry["prompts"])
                run.images.append(summary | {"overlay": entry["overlay"]})
            progress.update(1)
    progress.close()


def check_outputs(args: argparse.Namespace) -> str | None:
    """What makes `--out` or `--summary` unwritable (checked before any work), or None."""
    try:
        check_writable(args.out, folder=True)
        if args.summary not in (None, "-"):
            check_writable(args.summary)
    except UnwritableOutput as err:
        return f"{err}; choose another --out or --summary"
    return None


def write_summary(run: Run, args: argparse.Namespace, image_size: int | None) -> str | None:
    """Write the JSON summary (atomically) to `--summary` or OUT/summary.json, or print it for '-'. Returns where it
    went; None when it could not be written (it is then printed to stdout, so nothing is lost)."""
    summary = {
        "model": args.model,
        "backend": args.backend,
        "precision": args.precision,
        "threshold": args.threshold,
        "square": args.square,
        "image_size": image_size,
        "processed": len(run.images),
        "skipped": len(run.errors),
        "interrupted": run.interrupted,
        "stopped": run.stopped,
        "merged_prompts": run.merged_prompts,
        "images": run.images,
        "errors": run.errors,
    }
    destination = args.summary or str(Path(args.out) / "summary.json")
    text = json_text(summary, indent=2, ensure_ascii=False)
    if destination == "-":
        print(text)
        return "stdout"
    try:
        write_text(destination, text + "\n")
    except OSError as err:
        print(f"error: cannot write the summary ({err}); here it is instead:", file=sys.stderr)
        print(text)
        return None
    return destination


def load(args: argparse.Namespace) -> CLIPSeg | ExportedCLIPSeg:
    """The model --model names for --backend (`clipseg.cli.load_command_model`), recording its source and the
    precision that runs for the summary. Raises LoadError with the reason."""
    model, args.model = load_command_model(args)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. Returns 0 when at least one image was processed, 1 when none could be (or the summary could not be
    written), 2 for an output path, model or visual-prompt file that cannot be used or a model whose output is not
    finite."""
    args = parse_args(argv)
    unwritable = check_outputs(args)
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        return BAD_INPUT
    prompts, merged = merge_duplicates(build_prompts(args.prompt, args.visual_prompt))
    paths, input_errors = collect_images(args.inputs)
    run = Run(errors=input_errors, merged_prompts=merged)
    for entry in merged:
        note = f"note: prompt {printable(entry['prompt'], 60)!r} given {entry['times']} times: segmented once"
        print(note, file=sys.stderr)
    for error in input_errors:
        print(f"skipped {error['image']}: {error['error']}", file=sys.stderr)
    if not paths:
        write_summary(run, args, args.image_size)
        print("error: no readable input images", file=sys.stderr)
        return NOTHING_DONE
    try:
        predictor = Predictor(
            load(args), args.image_size, args.square, args.device, resize=args.resize, precision=args.precision
        )
    except (LoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    try:
        conditional = predictor.embed_prompts(
            phrases=[p.text for p in prompts if p.kind == "text"],
            support=[p.support for p in prompts if p.kind == "visual"],
        )
    except (UnreadableImage, ValueError) as err:
        print(f"error: --visual-prompt: {err}", file=sys.stderr)
        return BAD_INPUT
    try:
        process(predictor, conditional, paths, prompts, args, run)
    except KeyboardInterrupt:
        run.interrupted = True
        raise
    except NonFiniteOutput as err:
        run.stopped = f"stopped after {len(run.images)} image(s): {err}"
    finally:
        written = write_summary(run, args, predictor.transform.size)
    print(f"processed {len(run.images)} image(s), skipped {len(run.errors)}; summary: {written}", file=sys.stderr)
    if run.stopped:
        print(f"error: {run.stopped}", file=sys.stderr)
        return BAD_INPUT
    return 0 if run.images and written else NOTHING_DONE


if __name__ == "__main__":
    sys.exit(main())
