"""Sharper edges than the model's 16-pixel patch grid, two ways:

- `guided_refine` (refine=guided): the fast guided filter (He, Sun and Tang, "Guided Image Filtering", TPAMI 2013;
  He and Sun, "Fast Guided Filter", 2015) with the RGB image as the guide: in every window the refined map is a
  linear function of the image's colours fitted to the probability map, so its edges follow the image's. The
  coefficients are fitted at a working resolution (short side GUIDED_WORKING_SIDE) with box filters
  (`scipy.ndimage.uniform_filter`), smoothed, upsampled bilinearly and applied to the full-resolution image. Cost:
  a few box filters at the working size plus one multiply-add per pixel and colour.
- `SamRefiner` (refine=sam): the Segment Anything model as transformers ships it (`SamModel`, `SamProcessor`),
  prompted once per connected component of the thresholded CLIPSeg mask (`clipseg.postprocess.Instance`) with its
  bounding box, its highest-probability pixel as a positive point and the CLIPSeg logits inside the box as SAM's mask
  prompt. The image is encoded once; each component costs one pass of SAM's small mask decoder.

SAM checkpoints (a hub id such as facebook/sam-vit-base, or a local directory saved with `save_pretrained`, model
and processor) are untrusted files: `load_sam` refuses a config.json that is not a SAM model's or whose values are
out of range, a processor whose sizes do not fit the model, and weights that are not finite, each with a message
naming the file (`clipseg.weights.CheckpointError`) or saying what is missing (OSError).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from scipy import ndimage

from clipseg.images import ImageInput, load_image
from clipseg.postprocess import Instance
from clipseg.weights import CONFIG_NAME, CheckpointError, load_backbone, read_json, resolve_file

GUIDED_WORKING_SIDE = 512  # short side (pixels) at which the guided filter's coefficients are fitted
GUIDED_RADIUS = 16  # window radius in working pixels: at 512, about a patch of a model seeing 352 (16 -> 23 px)
GUIDED_EPS = 1e-3  # regularisation: colour variance (image in [0, 1]) below which a window is treated as flat
PROBABILITY_FLOOR = 1e-6  # probabilities are clipped to [floor, 1 - floor] before logits: at most +-13.8
FLOOR_LOGIT = float(np.log(PROBABILITY_FLOOR) - np.log1p(-PROBABILITY_FLOOR))  # SAM's mask prompt outside a box
DEFAULT_SAM_MODEL = "facebook/sam-vit-base"  # predict.py's --refine sam without --sam-model
SAM_MODEL_TYPES = ("sam",)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # hub repositories; transformers 5 saves
MAX_SAM_SIDE = 4096  # the largest input side a SAM config or processor may ask for
SAM_DECODER_LIMITS = {  # integers that size the prompt encoder's and mask decoder's tensors
    "hidden_size": (1, 16384),
    "mlp_dim": (1, 65536),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 256),
    "num_multimask_outputs": (1, 16),
    "iou_head_depth": (1, 64),
    "iou_head_hidden_dim": (1, 16384),
    "mask_input_channels": (4, 4096),
    "num_point_embeddings": (4, 64),
    "image_size": (1, MAX_SAM_SIDE),
    "patch_size": (1, 256),
}


# ------------------------------------------------------------------------------------------- guided


def guided_refine(
    probs: np.ndarray,
    image: ImageInput,
    radius: int = GUIDED_RADIUS,
    eps: float = GUIDED_EPS,
    working_side: int = GUIDED_WORKING_SIDE,
) -> np.ndarray:
    """Probability maps (K, h, w) or (h, w) at any resolution (the model's, or already the image's) -> the same
    maps at the image's size (H, W), float32 in [0, 1], their edges moved to the image's (module docstring). radius:
    window radius in working pixels; eps: the smoothing of low-contrast windows (larger: closer to bilinear)."""
    if radius < 1 or eps <= 0 or working_side < 1:
        raise ValueError(f"guided filter: radius >= 1, eps > 0 and working_side >= 1 needed, got {radius}, {eps}")
    rgb = np.asarray(load_image(image), dtype=np.float32) / 255.0
    maps = np.asarray(probs, dtype=np.float32)
    single = maps.ndim == 2
    maps = maps[None] if single else maps
    if maps.ndim != 3 or not np.all((maps >= 0) & (maps <= 1)):
        raise ValueError(f"expected (K, h, w) or (h, w) probabilities in [0, 1], got shape {np.shape(probs)} or NaN")
    height, width = rgb.shape[:2]
    scale = min(1.0, working_side / min(height, width))
    small = (max(1, round(height * scale)), max(1, round(width * scale)))
    guide = _resize(rgb.transpose(2, 0, 1), small).transpose(1, 2, 0)
    refined = np.empty((len(maps), height, width), dtype=np.float32)
    for index, low in enumerate(maps):
        a, b = _guided_coefficients(guide, _resize(low[None], small)[0], radius, eps)
        full = _resize(np.concatenate([a.transpose(2, 0, 1), b[None]]), (height, width))
        refined[index] = full[3] + np.einsum("chw,hwc->hw", full[:3], rgb)
    np.clip(refined, 0.0, 1.0, out=refined)
    return refined[0] if single else refined


def _guided_coefficients(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The colour guided filter's box-averaged linear coefficients: a (h, w, 3) and b (h, w) such that the filtered
    `src` (h, w) is sum_c a_c * guide_c + b, for a (h, w, 3) guide in [0, 1]."""
    guide, src = guide.astype(np.float64), src.astype(np.float64)

    def mean(x: np.ndarray) -> np.ndarray:
        size = (2 * radius + 1, 2 * radius + 1) + (1,) * (x.ndim - 2)
        return ndimage.uniform_filter(x, size=size, mode="reflect")

    mean_guide, mean_src = mean(guide), mean(src)
    covariance = mean(guide * src[..., None]) - mean_guide * mean_src[..., None]
    products = mean(guide[..., :, None] * guide[..., None, :])  # (h, w, 3, 3)
    variance = products - mean_guide[..., :, None] * mean_guide[..., None, :] + eps * np.eye(3)
    a = np.linalg.solve(variance, covariance[..., None])[..., 0]
    b = mean_src - np.sum(a * mean_guide, axis=-1)
    return mean(a).astype(np.float32), mean(b).astype(np.float32)


def _resize(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W) float32: bilinear (align_corners=False, the project's rule for maps), antialiased
    when shrinking."""
    if maps.shape[-2:] == tuple(size):
        return maps.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    shrinking = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrinking)[0].numpy()


# ---------------------------------------------------------------------------------------------- SAM


@dataclass
class SamRefinement:
    """SAM's masks for the components it was prompted with, in their order. masks: (N, H, W) bool; union: (H, W)
    bool; scores: SAM's predicted IoU per mask; boxes: the (x0, y0, x1, y1) boxes prompted, in source pixels, x1
    and y1 inclusive (as SAM's own mask-to-box gives them); points: the (x, y) positive points."""

    masks: np.ndarray
    union: np.ndarray
    scores: list[float]
    boxes: list[tuple[int, int, int, int]]
    points: list[tuple[int, int]]


class SamRefiner:
    """A SAM model and its processor. `SamRefiner.from_pretrained("facebook/sam-vit-base")` (or a directory)
    loads through `load_sam`; `refine(image, probs, instances)` prompts SAM once per instance."""

    def __init__(
        self, model: transformers.SamModel, processor: transformers.SamProcessor, use_mask_prompt: bool = True
    ):
        self.model, self.processor, self.use_mask_prompt = model.eval(), processor, use_mask_prompt

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu", **kwargs: Any) -> SamRefiner:
        model, processor = load_sam(name_or_path)
        return cls(model.to(device), processor, **kwargs)

    @property
    def mask_prompt_side(self) -> int:
        """The side of SAM's square mask prompt: 4 x its image embedding's (256 for the released models)."""
        return 4 * self.model.config.prompt_encoder_config.image_embedding_size

    @torch.no_grad()
    def refine(self, image: ImageInput, probs: np.ndarray, instances: Sequence[Instance]) -> SamRefinement:
        """SAM's mask per instance for an RGB image (H, W) whose CLIPSeg probabilities are `probs` (H, W) and whose
        components are `instances` (`clipseg.postprocess.find_instances`): each prompted with its box, its peak as
        a positive point and (use_mask_prompt) the logits inside its box. The image is encoded once."""
        rgb = load_image(image)
        height, width = rgb.height, rgb.width
        if np.shape(probs) != (height, width):
            raise ValueError(f"probabilities of shape {np.shape(probs)} for an image of {height}x{width}")
        boxes = [(i.box[0], i.box[1], i.box[2] - 1, i.box[3] - 1) for i in instances]
        points = [i.peak for i in instances]
        masks = np.zeros((len(instances), height, width), dtype=bool)
        if not instances:
            return SamRefinement(masks, masks.any(axis=0), [], boxes, points)
        device = next(self.model.parameters()).device
        inputs = self.processor(
            images=rgb,
            input_boxes=[[list(box) for box in boxes]],
            input_points=[[[list(point)] for point in points]],
            return_tensors="pt",
        )
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(device))
        scores = []
        for index, instance in enumerate(instances):
            prompt = self.mask_prompt(probs, instance.box, tuple(inputs["reshaped_input_sizes"][0].tolist()))
            output = self.model(
                image_embeddings=embeddings,
                input_boxes=inputs["input_boxes"][:, index : index + 1].float().to(device),
                input_points=inputs["input_points"][:, index : index + 1].float().to(device),
                input_labels=torch.ones(1, 1, 1, dtype=torch.long, device=device),
                input_masks=prompt.to(device) if self.use_mask_prompt else None,
                multimask_output=False,
            )
            logits = self.processor.post_process_masks(
                output.pred_masks.float().cpu(),
                inputs["original_sizes"],
                inputs["reshaped_input_sizes"],
                binarize=False,
            )[0]
            masks[index] = logits[0, 0].numpy() > 0
            scores.append(float(output.iou_scores[0, 0, 0]))
        return SamRefinement(masks, masks.any(axis=0), scores, boxes, points)

    def mask_prompt(self, probs: np.ndarray, box: tuple[int, int, int, int], resized: tuple[int, int]) -> torch.Tensor:
        """SAM's mask prompt (1, 1, M, M) for one component: the logits of `probs` (H, W) inside `box` (left, top,
        right, bottom exclusive; probability 0 outside), in SAM's frame: the image resized to `resized` (h', w',
        the processor's longest-side resize) on the top-left of the padded square, at M / padded side."""
        left, top, right, bottom = box
        inside = np.zeros_like(probs, dtype=np.float32)
        inside[top:bottom, left:right] = probs[top:bottom, left:right]
        clipped = np.clip(inside, PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
        logits = np.log(clipped) - np.log1p(-clipped)
        side, padded = self.mask_prompt_side, self.processor.image_processor.pad_size["height"]
        frame = (max(1, round(resized[0] * side / padded)), max(1, round(resized[1] * side / padded)))
        prompt = np.full((side, side), FLOOR_LOGIT, dtype=np.float32)
        prompt[: frame[0], : frame[1]] = _resize(logits[None], frame)[0]
        return torch.from_numpy(prompt)[None, None]


def load_sam(name_or_path: str) -> tuple[transformers.SamModel, transformers.SamProcessor]:
    """A SAM model and its processor from a hub id or a directory (one code path), checked before use: the config
    (`check_sam_config`), the processor's sizes (`check_sam_processor`) and finite weights."""
    config_path = _sam_file(name_or_path, (CONFIG_NAME,))
    config = read_json(Path(config_path))
    check_sam_config(config, config_path)
    processor_path = _sam_file(name_or_path, PROCESSOR_FILES)
    check_sam_processor(read_json(Path(processor_path)), config, processor_path)
    model = load_backbone(transformers.SamModel, name_or_path, what="SAM model")
    return model, transformers.SamProcessor.from_pretrained(name_or_path)


def check_sam_config(data: dict, source: str) -> None:
    """CheckpointError naming `source` unless `data` is a SAM config.json (model_type in SAM_MODEL_TYPES) whose
    prompt encoder and mask decoder integers lie in SAM_DECODER_LIMITS and agree on their width. The vision tower is
    checked with CLIP's (`clipseg.weights.check_config`) where it is loaded."""
    model_type = data.get("model_type")
    if model_type not in SAM_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a SAM model (expected {' or '.join(SAM_MODEL_TYPES)}: "
            "transformers' SamModel, e.g. facebook/sam-vit-base)"
        )
    parts = {part: data.get(part) or {} for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config")}
    for part, values in parts.items():
        if not isinstance(values, dict):
            raise CheckpointError(f"{source}: {part} must be a JSON object, got {type(values).__name__}")
    for part in ("prompt_encoder_config", "mask_decoder_config"):
        for key, (low, high) in SAM_DECODER_LIMITS.items():
            value = parts[part].get(key)
            if value is not None and (type(value) is not int or not low <= value <= high):
                raise CheckpointError(f"{source}: {part}.{key} = {value!r} is out of range ({low} to {high})")
    widths = {
        parts["vision_config"].get("output_channels", 256),  # transformers' default width of all three
        parts["prompt_encoder_config"].get("hidden_size", 256),
        parts["mask_decoder_config"].get("hidden_size", 256),
    }
    if len(widths) > 1:
        raise CheckpointError(f"{source}: the vision output, prompt encoder and mask decoder widths differ: {widths}")


def check_sam_processor(data: dict, config: dict, source: str) -> None:
    """CheckpointError naming `source` unless the processor resizes the longest side to, and pads to, the model's
    input side (vision_config.image_size, 1024 by default) with the SAM processor's keys."""
    values = data.get("image_processor", data)  # transformers 5 nests the image processor in processor_config.json
    side = (config.get("vision_config") or {}).get("image_size", 1024)
    longest = (values.get("size") or {}).get("longest_edge") if isinstance(values, dict) else None
    pad = (values.get("pad_size") or {}) if isinstance(values, dict) else {}
    if longest != side or pad.get("height") != side or pad.get("width") != side:
        raise CheckpointError(
            f"{source}: expected a SAM processor that resizes the longest side to {side} and pads to {side}x{side} "
            f"(the model's input), got size {longest!r} and pad_size {pad!r}"
        )


def _sam_file(name_or_path: str, names: Sequence[str]) -> str:
    """The path of the first of `names` in a SAM directory or hub repository; OSError saying what is missing."""
    for name in names:
        try:
            return resolve_file(name_or_path, name)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise OSError(f"could not open the SAM model {name_or_path!r}: {err}") from err
    where = "" if Path(name_or_path).expanduser().is_dir() else " (no such directory, nor a hub repository in reach)"
    raise FileNotFoundError(
        f"the SAM model {name_or_path!r} has no {' or '.join(names)}{where}: give a hub id such as "
        "facebook/sam-vit-base (downloads need HF_HUB_OFFLINE=0) or a directory where SamModel and SamProcessor were "
        "saved (save_pretrained)"
    )
