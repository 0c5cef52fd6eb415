"""What a segmented image leaves behind: the prompt records that label and name its outputs, the files written per
image and prompt, and the entries of the JSON summary. predict.py writes these files and summary.json; the app's
zip holds the masks and the same summary (clipseg/segmenter.py).

Files, under one folder per image (`clipseg.folders.output_name`), the kinds `save` picks (`SAVE_KINDS`; by default
prob, mask, overlay): `<slug>.prob.png` (the probability map, 8- or 16-bit grayscale), `<slug>.mask.png` (0/255, the
post-processed mask), `<slug>.overlay.png`, `<slug>.soft.png` (the mask with its feathered edge, 8-bit) and
`<slug>.cutout.png` (RGBA: the image with the soft mask as alpha) per prompt, and with several prompts one combined
`overlay.png` (a colour per prompt, legend); all at the image's original size. A
prompt's slug is `clipseg.outputs.safe_name` of its text, so no prompt names a path outside the folder.

Summary entries: per image `image_summary` (name, original size, the size the model saw, its prompts), per prompt
`prompt_summary` (label, kind, the mask's area fraction, the maximum probability, the files). A text prompt is a
prompt expression (`clipseg.expressions`): a plain phrase as before, or `cat | dog`, `a & b`, `a - b`, `car:1.5`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipseg.drawing import draw_overlay, mask_image, probability_png
from clipseg.expressions import Expression, parse
from clipseg.mask_formats import cutout
from clipseg.outputs import safe_name

SAVE_KINDS = ("prob", "mask", "overlay", "soft", "cutout")  # the per-prompt files `write_image_outputs` can write
DEFAULT_SAVE = ("prob", "mask", "overlay")
FILE_NAMES = {"prob": ("probability", "prob"), "mask": ("mask", "mask"), "overlay": ("overlay", "overlay")}
FILE_NAMES |= {"soft": ("soft", "soft"), "cutout": ("cutout", "cutout")}  # kind -> (summary key, file suffix)


@dataclass
class Prompt:
    """A prompt as the outputs show and name it: a text (`text`) or an image prompt (`support` = the support image
    and its mask)."""

    label: str  # shown in overlays and the summary
    kind: str  # "text" or "visual"
    slug: str  # file-name part
    text: str | None = None
    support: tuple[Path, Path] | None = None
    expression: Expression | None = None  # a text prompt, parsed


def build_prompts(phrases: Sequence[str], supports: Sequence[tuple[Path, Path]]) -> list[Prompt]:
    """The text prompts (prompt expressions, parsed: `clipseg.expressions.ExpressionError` names the column of a
    syntax error), then the image prompts (support image, mask), as records with labels and slugs."""
    prompts = [Prompt(label=p, kind="text", slug=safe_name(p), text=p, expression=parse(p)) for p in phrases]
    for support, mask in supports:
        label = f"visual: {support.name}"
        slug = safe_name(f"visual {support.stem} {support}:{mask}")
        prompts.append(Prompt(label, "visual", slug, support=(support, mask)))
    return prompts


def merge_duplicates(prompts: Sequence[Prompt]) -> tuple[list[Prompt], list[dict]]:
    """Prompts given more than once are segmented once (their files would overwrite each other): the distinct
    prompts in order, and {"prompt", "times"} for each one given more than once."""
    times = Counter(prompt.slug for prompt in prompts)  # distinct prompts have distinct slugs (outputs.safe_name)
    distinct = list({prompt.slug: prompt for prompt in prompts}.values())
    return distinct, [{"prompt": p.label, "times": times[p.slug]} for p in distinct if times[p.slug] > 1]


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


def image_summary(name: str, size: tuple[int, int], inference_size: tuple[int, int], prompts: list[dict]) -> dict:
    """One image's summary entry: its name, original `size` = (W, H), the (W, H) the model saw and its prompts'
    entries (`prompt_summary`)."""
    width, height = size
    return {"image": name, "width": width, "height": height, "inference_size": list(inference_size), "prompts": prompts}


def prompt_files(folder: Path, prompt: Prompt, save: Sequence[str] = DEFAULT_SAVE) -> dict[str, Path]:
    """The files written for one prompt of an image, by summary key, for the kinds in `save` (`SAVE_KINDS`)."""
    names = [FILE_NAMES[kind] for kind in SAVE_KINDS if kind in save]
    return {key: folder / f"{prompt.slug}.{suffix}.png" for key, suffix in names}


def image_files(folder: Path, prompts: Sequence[Prompt], save: Sequence[str] = DEFAULT_SAVE) -> list[Path]:
    """Every file `write_image_outputs` writes for an image into `folder`."""
    files = [path for prompt in prompts for path in prompt_files(folder, prompt, save).values()]
    return files + ([folder / "overlay.png"] if len(prompts) > 1 and "overlay" in save else [])


def write_image_outputs(
    image: Image.Image,
    probs: np.ndarray,
    prompts: Sequence[Prompt],
    folder: Path,
    masks: Sequence[np.ndarray],
    bits: int,
    soft: Sequence[np.ndarray] | None = None,
    save: Sequence[str] = DEFAULT_SAVE,
) -> dict:
    """Write, per prompt of the (K, H, W) `probs` and its (H, W) bool mask of `masks`, the files `save` asks for
    into `folder` (the soft mask and the cut-out from `soft`, the feathered masks; the masks when None), plus the
    combined overlay; return {"prompts": the prompts' summary entries, "overlay": the overlay showing them all}."""
    folder.mkdir(parents=True, exist_ok=True)
    soft = masks if soft is None else soft
    entries = []
    for i, (prompt, prob, mask) in enumerate(zip(prompts, probs, masks)):
        files = prompt_files(folder, prompt, save)
        for key, path in files.items():
            _picture(key, image, prompt.label, i, prob, mask, soft[i], bits).save(path)
        entries.append(prompt_summary(prompt, prob, mask, {name: str(path) for name, path in files.items()}))
    combined = None
    if len(prompts) > 1 and "overlay" in save:
        combined = folder / "overlay.png"
        draw_overlay(image, list(masks), [p.label for p in prompts]).save(combined)
    single = entries[0]["files"].get("overlay") if len(prompts) == 1 else None
    return {"prompts": entries, "overlay": str(combined) if combined else single}


def _picture(key: str, image: Image.Image, label: str, colour: int, prob, mask, soft, bits: int) -> Image.Image:
    """The file `key` (`prompt_files`' keys) of one prompt: its picture."""
    if key == "probability":
        return probability_png(prob, bits)
    if key == "mask":
        return mask_image(mask)
    if key == "overlay":
        return draw_overlay(image, [mask], [label], first_colour=colour)
    if key == "soft":
        return probability_png(np.asarray(soft, dtype=np.float32), 8)
    return cutout(image, soft)
