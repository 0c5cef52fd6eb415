"""Segment your own images with text or image prompts: many prompts per image, the image encoded once.

    python predict.py photos/ --prompt "a cat" --prompt "the sofa" --out predictions
    python predict.py room.jpg --visual-prompt support.jpg:support_mask.png --threshold 0.4
    python predict.py photos/ --prompt "a cat" --precision int8          # fp32, bf16 or int8 (clipseg/precision.py)
    python predict.py photos/ --prompt "a cat" --backend onnx --model exported/   # graphs from export.py

For each image and prompt this writes, under `--out/<image>/`, the probability map (`<prompt>.prob.png`, 8- or
16-bit grayscale), the binary mask (`<prompt>.mask.png`, 0/255, probability > threshold) and an overlay
(`<prompt>.overlay.png`); with several prompts also one combined `overlay.png` (a colour per prompt, legend).
`summary.json` lists, per image and prompt, the mask's area fraction, the maximum probability and the files.
All maps are at the original image resolution.

Geometry: by default the image keeps its aspect ratio. It is resized so that its short side is `--image-size`
(the model's training size, 352 for the released weights) and both sides are multiples of 16; the long side is
capped at 3x the short side (more elongated images are squashed to 3:1). `--square` squashes every image to
S x S as the reference implementations do. Logits are resized bilinearly to the original size, then sigmoid.

Python API, in the style of a predictor (encode once, prompt many times):

    predictor = Predictor(CLIPSeg.from_pretrained("CIDAS/clipseg-rd64-refined"))
    predictor.set_image("room.jpg")                          # path, PIL image or (H, W[, C]) array
    probs = predictor.predict(phrases=["a cat", "the sofa"])  # (2, H0, W0) float32 in [0, 1]
    probs = predictor.predict(support=[("dog.jpg", "dog_mask.png")])  # image prompt, engineered for you
"""

from __future__ import annotations

import argparse
import re
import stat
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from torch import Tensor
from tqdm import tqdm

from clipseg.images import ImageInput, UnreadableImage, load_image, open_rgb
from clipseg.onnx.backend import OnnxBackendError, OnnxCLIPSeg
from clipseg.outputs import UnwritableOutput, check_writable, json_text, printable, safe_name, write_text
from clipseg.precision import PRECISIONS, add_precision_arguments, precision_context, prepare_model, resolve_precision
from clipseg.transforms import MAX_ELONGATION, RESIZE_RULES, ImageTransform, NonFiniteOutput, full_size_probabilities
from clipseg.visual_prompts import support_prompt
from model import CLIPSeg, ImageFeatures

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (245, 130, 48), (70, 240, 240), (240, 50, 230), (210, 245, 60), (170, 110, 40),
)  # fmt: skip
OVERLAY_ALPHA = 0.5


# ------------------------------------------------------------------------------------------------ predictor


class Predictor:
    """Set an image once, then predict masks for many prompts; maps come back at the original image size.

    model: a `CLIPSeg` (put in eval mode; moved to `device` when given) or an `onnx_backend.OnnxCLIPSeg`.
    image_size: the short side the model sees (default `model.config.image_size`), a multiple of the patch. square:
    squash to image_size x image_size instead of keeping the aspect. resize: "pil" (the HF processor's and the
    original Quickstart's resize, the default here) or "original" (the authors' data pipeline, as in training and
    scoring; see clipseg/transforms.py). precision: 'fp32' (default), 'bf16' or 'int8' for the image encoder and decoder
    (see clipseg/precision.py; int8 quantises `model` in place); the scripts' default is
    `precision.default_precision(device)`. amp: the old spelling of precision='bf16'.
    The model's text cache is switched on, so each phrase is encoded once.
    """

    def __init__(
        self,
        model: CLIPSeg,
        image_size: int | None = None,
        square: bool = False,
        device: str | torch.device | None = None,
        amp: bool = False,
        resize: str = "pil",
        precision: str | None = None,
    ):
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        supported = getattr(model, "precisions", PRECISIONS)  # the ONNX backend runs fp32 only
        if precision is None and not amp:
            precision = "fp32"  # the API's default; the scripts default to precision.default_precision(device)
        self.precision = resolve_precision(precision, self.device, amp, supported)
        prepare_model(self.model, self.precision, self.device)
        image_size, patch = model.config.input_side(image_size), model.config.patch_size
        self.transform = ImageTransform(resize, image_size, square, multiple=patch)
        self.prompt_transform = ImageTransform(resize, model.config.image_size, square=True)
        if self.model.text_cache is None:
            self.model.text_cache = {}
        self.original_size: tuple[int, int] | None = None  # (W0, H0) of the image set last
        self.input_size: tuple[int, int] | None = None  # (W, H) the model saw
        self._features: ImageFeatures | None = None

    def set_image(self, image: ImageInput) -> None:
        """Encode one image (path, PIL image or array; see `clipseg.images.load_image`) for the following `predict`
        calls."""
        rgb = load_image(image)
        self.original_size = rgb.size
        self.input_size = self.transform.input_size(*rgb.size)
        self._features = self._encode([rgb])

    def predict(
        self,
        phrases: Sequence[str] | None = None,
        prompt_images: Sequence[ImageInput] | Tensor | None = None,
        support: Sequence[tuple[ImageInput, ImageInput]] | None = None,
        conditional: Tensor | None = None,
    ) -> np.ndarray:
        """Probability maps (K, H0, W0) float32 for the image set last, one per prompt.

        Prompts, in this order when several kinds are given: `phrases`; `prompt_images` used as they are
        (images squashed to the model's size, or an already normalised (K, 3, h, w) tensor); `support` pairs
        (image, mask) engineered into prompt images; or `conditional` vectors from `embed_prompts`."""
        if self._features is None:
            raise RuntimeError("call set_image(image) before predict(...)")
        if conditional is None:
            conditional = self.embed_prompts(phrases, prompt_images, support)
        return self._decode(self._features, conditional, self.original_size)

    def predict_batch(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str] | None = None,
        prompt_images: Sequence[ImageInput] | Tensor | None = None,
        support: Sequence[tuple[ImageInput, ImageInput]] | None = None,
        conditional: Tensor | None = None,
        batch_size: int = 4,
    ) -> list[np.ndarray]:
        """The same prompts on many images: a (K, H0, W0) map array per image, in order. Images that share an
        inference size are encoded together, up to `batch_size` at once; the prompts are embedded once."""
        if conditional is None:
            conditional = self.embed_prompts(phrases, prompt_images, support)
        rgbs = [load_image(image) for image in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, rgb in enumerate(rgbs):
            groups.setdefault(self.transform.input_size(*rgb.size), []).append(index)
        results: list[np.ndarray | None] = [None] * len(rgbs)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                features = self._encode([rgbs[i] for i in chunk])
                for row, index in enumerate(chunk):
                    one = ImageFeatures([a[row : row + 1] for a in features.activations], features.grid)
                    results[index] = self._decode(one, conditional, rgbs[index].size)
        return results

    def embed_prompts(
        self,
        phrases: Sequence[str] | None = None,
        prompt_images: Sequence[ImageInput] | Tensor | None = None,
        support: Sequence[tuple[ImageInput, ImageInput]] | None = None,
    ) -> Tensor:
        """Prompts -> (K, 512) conditional vectors (phrases, then prompt images, then support pairs), computed
        in full precision. Reuse them across images with `predict(conditional=...)`."""
        if isinstance(phrases, str):
            raise TypeError("phrases must be a list of strings, not a single string")
        parts = []
        if phrases:
            parts.append(self.model.embed_text(list(phrases)))
        if prompt_images is not None and len(prompt_images):
            if isinstance(prompt_images, Tensor):
                pixels = prompt_images
            else:
                pixels = torch.stack([self.prompt_transform.pixels(load_image(image)) for image in prompt_images])
            parts.append(self.model.embed_images(pixels.to(self.device)))
        if support:
            pixels = torch.stack([support_prompt(image, mask, self.prompt_transform) for image, mask in support])
            parts.append(self.model.embed_images(pixels.to(self.device)))
        if not parts:
            raise ValueError("no prompt given: pass phrases, prompt_images or support")
        return torch.cat(parts)

    @torch.no_grad()
    def _encode(self, rgbs: list[Image.Image]) -> ImageFeatures:
        """Images of one input size -> their features (batch len(rgbs))."""
        pixels = torch.stack([self.transform.pixels(rgb) for rgb in rgbs]).to(self.device)
        with precision_context(self.precision, self.device):
            return self.model.encode_image(pixels)

    def logits(self, conditional: Tensor) -> Tensor:
        """(K, 512) conditional vectors -> (K, 1, h, w) float32 logits at the model's input size for the image set
        last: `clipseg.transforms.full_size_probabilities(logits, (H0, W0))` makes `predict`'s maps of them."""
        if self._features is None:
            raise RuntimeError("call set_image(image) before logits(...)")
        return self._logits(self._features, conditional)

    @torch.no_grad()
    def _logits(self, features: ImageFeatures, conditional: Tensor) -> Tensor:
        with precision_context(self.precision, self.device):
            return self.model.decode(features, conditional.to(self.device)).float()

    def _decode(self, features: ImageFeatures, conditional: Tensor, original_size: tuple[int, int]) -> np.ndarray:
        """One image's features (batch 1) x (K, 512) -> (K, H0, W0) probabilities at `original_size` = (W0, H0)."""
        width, height = original_size
        return full_size_probabilities(self._logits(features, conditional), (height, width))


# ------------------------------------------------------------------------------------------------ outputs


def image_output_names(paths: Sequence[Path]) -> list[str]:
    """One output folder name per image (`clipseg.outputs.safe_name` of its stem; of its whole path where stems
    collide)."""
    stems = [safe_name(path.stem) for path in paths]
    counts = Counter(stems)
    return [safe_name(str(path)) if counts[stem] > 1 else stem for path, stem in zip(paths, stems)]


def _font(image_height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(12, image_height // 30)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def mask_contour(mask: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: the pixels of `mask` within `width` pixels of its border (image edges are not borders)."""
    padded = np.pad(mask, 1, mode="edge")
    edge = mask & ~ndimage.binary_erosion(padded)[1:-1, 1:-1]
    return mask & ndimage.maximum_filter(edge, size=2 * width - 1) if width > 1 else edge


def draw_overlay(
    image: Image.Image, masks: Sequence[np.ndarray], labels: Sequence[str], first_colour: int = 0
) -> Image.Image:
    """The image with each (H, W) bool mask blended in its own colour (PALETTE order from `first_colour`), its
    contour drawn solid, and a legend of the labels."""
    colours = [PALETTE[(first_colour + i) % len(PALETTE)] for i in range(len(masks))]
    blended = np.asarray(image, dtype=np.float32).copy()
    for mask, colour in zip(masks, colours):
        blended[mask] = (1 - OVERLAY_ALPHA) * blended[mask] + OVERLAY_ALPHA * np.array(colour, dtype=np.float32)
    contour_width = max(2, min(image.size) // 150)
    for mask, colour in zip(masks, colours):
        blended[mask_contour(mask, contour_width)] = colour
    overlay = Image.fromarray(np.round(blended).astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    font = _font(overlay.height)
    line = max(12, overlay.height // 30) + 6
    for i, (label, colour) in enumerate(zip(labels, colours)):
        top = 4 + i * line
        text = printable(label, 60)
        try:
            right = draw.textbbox((line + 4, top), text, font=font)[2]
        except UnicodeEncodeError:  # the bitmap fallback font only knows Latin-1
            text = text.encode("ascii", "replace").decode()
            right = draw.textbbox((line + 4, top), text, font=font)[2]
        draw.rectangle((0, top - 2, right + 6, top + line - 2), fill=(0, 0, 0))
        draw.rectangle((4, top + 2, line - 2, top + line - 6), fill=colour)
        draw.text((line + 4, top), text, fill=(255, 255, 255), font=font)
    return overlay


def probability_png(probs: np.ndarray, bits: int) -> Image.Image:
    """(H, W) probabilities in [0, 1] -> 8-bit (0..255) or 16-bit (0..65535) grayscale image."""
    if bits == 16:
        return Image.fromarray(np.round(probs * 65535).astype(np.uint16))
    return Image.fromarray(np.round(probs * 255).astype(np.uint8))


@dataclass
class Prompt:
    label: str  # shown in overlays and the summary
    kind: str  # "text" or "visual"
    slug: str  # file-name part
    text: str | None = None
    support: tuple[Path, Path] | None = None


def prompt_summary(prompt: Prompt, prob: np.ndarray, mask: np.ndarray, files: dict[str, str]) -> dict:
    """One prompt's summary entry: label, kind, the (H, W) bool mask's area fraction, the maximum of the (H, W)
    probabilities, and the files written for it."""
    return {
        "prompt": prompt.label,
        "kind": prompt.kind,
        "area_fraction": round(float(mask.mean()), 6),
        "max_probability": round(float(prob.max()), 6),
        "files": files,
    }


def write_image_outputs(
    image: Image.Image, probs: np.ndarray, prompts: Sequence[Prompt], folder: Path, threshold: float, bits: int
) -> dict:
    """Write the probability map, mask and overlay per prompt (+ the combined overlay); return the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    masks, entries = [], []
    for i, (prompt, prob) in enumerate(zip(prompts, probs)):
        mask = prob > threshold
        masks.append(mask)
        files = {
            "probability": folder / f"{prompt.slug}.prob.png",
            "mask": folder / f"{prompt.slug}.mask.png",
            "overlay": folder / f"{prompt.slug}.overlay.png",
        }
        probability_png(prob, bits).save(files["probability"])
        Image.fromarray(mask.astype(np.uint8) * 255).save(files["mask"])
        draw_overlay(image, [mask], [prompt.label], first_colour=i).save(files["overlay"])
        entries.append(prompt_summary(prompt, prob, mask, {name: str(path) for name, path in files.items()}))
    combined = None
    if len(prompts) > 1:
        combined = folder / "overlay.png"
        draw_overlay(image, masks, [p.label for p in prompts]).save(combined)
    return {"prompts": entries, "overlay": str(combined) if combined else entries[0]["files"]["overlay"]}


# ---------------------------------------------------------------------------------------------------- CLI


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


def merge_duplicates(prompts: Sequence[Prompt]) -> tuple[list[Prompt], list[dict]]:
    """Prompts given more than once are segmented once (their files would overwrite each other): the distinct
    prompts in order, and {"prompt", "times"} for each one given more than once."""
    times = Counter(prompt.slug for prompt in prompts)  # distinct prompts have distinct slugs (outputs.safe_name)
    distinct = list({prompt.slug: prompt for prompt in prompts}.values())
    return distinct, [{"prompt": p.label, "times": times[p.slug]} for p in distinct if times[p.slug] > 1]


def parse_support(spec: str) -> tuple[Path, Path]:
    """'SUPPORT.jpg:MASK.png' -> (support, mask); the split is the first ':' after which both files exist."""
    for match in re.finditer(":", spec):
        support, mask = Path(spec[: match.start()]), Path(spec[match.end() :])
        if support.is_file() and mask.is_file():
            return support, mask
    raise argparse.ArgumentTypeError(
        f"--visual-prompt {spec!r}: expected SUPPORT_IMAGE:MASK_IMAGE, two existing files joined by ':'"
    )


def build_prompts(phrases: Sequence[str], supports: Sequence[tuple[Path, Path]]) -> list[Prompt]:
    prompts = [Prompt(label=p, kind="text", slug=safe_name(p), text=p) for p in phrases]
    for support, mask in supports:
        label = f"visual: {support.name}"
        slug = safe_name(f"visual {support.stem} {support}:{mask}")
        prompts.append(Prompt(label, "visual", slug, support=(support, mask)))
    return prompts


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
        "--model",
        default=None,
        help="HF hub id or checkpoint directory, or an original .pth decoder (on openai/clip-vit-base-patch16); "
        f"default {DEFAULT_MODEL}. With --backend onnx: the folder export.py wrote",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a model inside the --model directory, e.g. best or iter_005000 of a train.py run "
        "(--model checkpoints/NAME --checkpoint best)",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="CLIP backbone (hub id or directory) for an original .pth decoder (default openai/clip-vit-base-patch16)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.3,
        help="a pixel is in the mask iff probability > this (default 0.3, the paper's)",
    )
    parser.add_argument(
        "--out", default="predictions", help="output folder, one subfolder per image (default predictions)"
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
        help="torch device, e.g. cpu, cuda:0 (default cuda when available, else cpu; the ONNX backend: cpu)",
    )
    add_precision_arguments(parser)
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch: run the model in PyTorch (default); onnx: run the graphs export.py wrote to the folder given "
        "as --model in onnxruntime (CPU, fp32; pip install -r requirements-export.txt)",
    )
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
    """Fill in --model and --device for the backend and resolve --precision/--amp to the precision that will run
    (`args.precision`); combinations that cannot run are usage errors that say what to change."""
    onnx = args.backend == "onnx"
    if onnx and args.model is None:
        parser.error("--backend onnx needs --model EXPORT_DIR: the folder `python export.py MODEL EXPORT_DIR` wrote")
    if onnx and args.checkpoint:
        parser.error("--checkpoint picks a PyTorch checkpoint; with --backend onnx give the export folder as --model")
    args.model = args.model or DEFAULT_MODEL
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not onnx else "cpu")
    if onnx and torch.device(args.device).type != "cpu":
        parser.error(f"--backend onnx runs on the CPU (onnxruntime), not on --device {args.device}")
    if onnx and (args.amp or args.precision not in (None, "fp32")):
        asked = "--amp" if args.amp else f"--precision {args.precision}"
        parser.error(f"--backend onnx runs the fp32 graphs export.py wrote; {asked} is for --backend torch")
    try:
        args.precision = resolve_precision(args.precision, args.device, args.amp, ("fp32",) if onnx else PRECISIONS)
    except ValueError as err:
        parser.error(str(err))
    args.amp = False  # folded into args.precision


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
                run.images.append(
                    {"image": str(path), "width": image.width, "height": image.height, "inference_size": list(size)}
                    | entry
                )
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


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. Returns 0 when at least one image was processed, 1 when none could be (or the summary could not be
    written), 2 for an output path, model or visual-prompt file that cannot be used or a model whose output is not
    finite."""
    args = parse_args(argv)
    unwritable = check_outputs(args)
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        return 2
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
        return 1
    try:
        source = str(Path(args.model) / args.checkpoint) if args.checkpoint else args.model
        if args.backend == "onnx":
            model = OnnxCLIPSeg(args.model)
        else:
            model = CLIPSeg.from_pretrained(source, backbone=args.backbone)
    except (OSError, ValueError, OnnxBackendError) as err:
        print(f"error: cannot load --model {args.model}: {err}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(
            model, args.image_size, args.square, args.device, resize=args.resize, precision=args.precision
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        conditional = predictor.embed_prompts(
            phrases=[p.text for p in prompts if p.kind == "text"],
            support=[p.support for p in prompts if p.kind == "visual"],
        )
    except (UnreadableImage, ValueError) as err:
        print(f"error: --visual-prompt: {err}", file=sys.stderr)
        return 2
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
        return 2
    return 0 if run.images and written else 1


if __name__ == "__main__":
    sys.exit(main())
