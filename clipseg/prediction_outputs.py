"""What a segmented image leaves behind: the prompt records that label and name its outputs, the files written per
image and prompt, and the entries of the JSON summary. predict.py writes these files and summary.json; the app's
zip holds the masks and the same summary (clipseg/segmenter.py).

Files, under one folder per image (`image_output_names`): `<slug>.prob.png` (the probability map, 8- or 16-bit
grayscale), `<slug>.mask.png` (0/255, probability > threshold) and `<slug>.overlay.png` per prompt, and with
several prompts one combined `overlay.png` (a colour per prompt, legend); all at the image's original size. A
prompt's slug is `clipseg.outputs.safe_name` of its text, so no prompt names a path outside the folder.

Summary entries: per image `image_summary` (name, original size, the size the model saw, its prompts), per prompt
`prompt_summary` (label, kind, the mask's area fraction, the maximum probability, the files).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipseg.drawing import draw_overlay, mask_image, probability_png
from clipseg.outputs import safe_name


@dataclass
class Prompt:
    """A prompt as the outputs show and name it: a text (`text`) or an image prompt (`support` = the support image
    and its mask)."""

    label: str  # shown in overlays and the summary
    kind: str  # "text" or "visual"
    slug: str  # file-name part
    text: str | None = None
    support: tuple[Path, Path] | None = None


def build_prompts(phrases: Sequence[str], supports: Sequence[tuple[Path, Path]]) -> list[Prompt]:
    """The text prompts, then the image prompts (support image, mask), as records with labels and slugs."""
    prompts = [Prompt(label=p, kind="text", slug=safe_name(p), text=p) for p in phrases]
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


def image_output_names(paths: Sequence[Path]) -> list[str]:
    """One output folder name per image (`clipseg.outputs.safe_name` of its stem; of its whole path where stems
    collide)."""
    stems = [safe_name(path.stem) for path in paths]
    counts = Counter(stems)
    return [safe_name(str(path)) if counts[stem] > 1 else stem for path, stem in zip(paths, stems)]


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


def prompt_files(folder: Path, prompt: Prompt) -> dict[str, Path]:
    """The files written for one prompt of an image: probability map, mask and overlay."""
    return {
        "probability": folder / f"{prompt.slug}.prob.png",
        "mask": folder / f"{prompt.slug}.mask.png",
        "overlay": folder / f"{prompt.slug}.overlay.png",
    }


def image_files(folder: Path, prompts: Sequence[Prompt]) -> list[Path]:
    """Every file `write_image_outputs` writes for an image into `folder`."""
    files = [path for prompt in prompts for path in prompt_files(folder, prompt).values()]
    return files + ([folder / "overlay.png"] if len(prompts) > 1 else [])


def write_image_outputs(
    image: Image.Image, probs: np.ndarray, prompts: Sequence[Prompt], folder: Path, threshold: float, bits: int
) -> dict:
    """Write the probability map, mask and overlay per prompt of the (K, H, W) `probs` (+ the combined overlay)
    into `folder`; return {"prompts": the prompts' summary entries, "overlay": the overlay showing them all}."""
    folder.mkdir(parents=True, exist_ok=True)
    masks, entries = [], []
    for i, (prompt, prob) in enumerate(zip(prompts, probs)):
        mask = prob > threshold
        masks.append(mask)
        files = prompt_files(folder, prompt)
        probability_png(prob, bits).save(files["probability"])
        mask_image(mask).save(files["mask"])
        draw_overlay(image, [mask], [prompt.label], first_colour=i).save(files["overlay"])
        entries.append(prompt_summary(prompt, prob, mask, {name: str(path) for name, path in files.items()}))
    combined = None
    if len(prompts) > 1:
        combined = folder / "overlay.png"
        draw_overlay(image, masks, [p.label for p in prompts]).save(combined)
    return {"prompts": entries, "overlay": str(combined) if combined else entries[0]["files"]["overlay"]}
