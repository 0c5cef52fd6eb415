"""The mask pipeline: an image and prompt expressions in, one post-processed mask per expression out, at the source
resolution. One definition of the order of the steps, for the Predictor, predict.py and the app:

1. decode: the distinct phrases of all expressions (`clipseg.expressions.distinct_phrases`) against one encoding of
   the image, or of each window with tiling (`clipseg.tiling.tiled_probabilities`, optionally with a context pass);
2. evaluate each expression's soft logic on those maps (`clipseg.expressions.evaluate_many`);
3. refine: "none"; "guided", the guided filter with the image as guide (`clipseg.refine.guided_refine`); or "sam",
   SAM prompted per connected component of the thresholded map (components smaller than `min_area` and beyond
   `max_instances` left out; `clipseg.refine.SamRefiner`), whose union replaces the threshold in step 4;
4. post-process (`clipseg.postprocess.make_mask`): threshold, shrink / grow, fill holes, minimum area, instances,
   feather.

The model is a callable, `predict(pixels, phrases) -> (K, h, w)` probabilities for an (h, w, 3) uint8 image or
crop, e.g. `lambda pixels, phrases: (predictor.set_image(pixels), predictor.predict(phrases=phrases))[1]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from clipseg.expressions import Expression, distinct_phrases, evaluate_many
from clipseg.images import ImageInput, load_image
from clipseg.postprocess import Instance, MaskOptions, MaskResult, find_instances, make_mask, remove_small
from clipseg.refine import SamRefinement, SamRefiner, guided_refine
from clipseg.tiling import check_tiling, default_overlap, tiled_probabilities

PhrasePredictor = Callable[[np.ndarray, Sequence[str]], np.ndarray]
REFINE_MODES = ("none", "guided", "sam")


@dataclass(frozen=True)
class PipelineOptions:
    """mask: the post-processing (`MaskOptions`); refine: one of REFINE_MODES; tile: the window side in pixels
    (None: one pass over the whole image; callers offer the model's input side and suggest it with
    `clipseg.tiling.should_tile`); tile_overlap: pixels shared by neighbouring windows (None: a quarter of the
    tile); tile_context: the weight in [0, 1) of a whole-image pass mixed into the tiled maps."""

    mask: MaskOptions = field(default_factory=MaskOptions)
    refine: str = "none"
    tile: int | None = None
    tile_overlap: int | None = None
    tile_context: float = 0.0

    def __post_init__(self) -> None:
        if self.refine not in REFINE_MODES:
            raise ValueError(f"refine must be one of {', '.join(REFINE_MODES)}, got {self.refine!r}")
        if self.tile is not None:
            check_tiling(self.tile, self.overlap)
        elif self.tile_overlap is not None or self.tile_context:
            raise ValueError("tile_overlap and tile_context need tiling (a tile side)")
        if not 0 <= self.tile_context < 1:
            raise ValueError(f"tile_context must be in [0, 1), got {self.tile_context!r}")

    @property
    def overlap(self) -> int:
        """The overlap in pixels that tiling uses (tile_overlap, or a quarter of the tile)."""
        return self.tile_overlap if self.tile_overlap is not None else default_overlap(self.tile or 0)

    def to_dict(self) -> dict:
        """The options as strict JSON for a summary (the overlap resolved)."""
        return {**asdict(self), "tile_overlap": self.overlap if self.tile is not None else None}


@dataclass
class ExpressionMask:
    """One expression's outcome at the source resolution: probs (H, W) float32, the evaluated (and refined) map;
    mask: the post-processed `MaskResult`; sam: SAM's per-component masks with refine="sam", else None."""

    expression: Expression
    probs: np.ndarray
    mask: MaskResult
    sam: SamRefinement | None = None

    def summary(self) -> dict:
        """Strict JSON: the parsed expression, the mask's record and the maximum probability."""
        entry = {"expression": self.expression.to_dict(), "max_probability": round(float(self.probs.max()), 6)}
        entry.update(self.mask.summary())
        if self.sam is not None:
            entry["sam_scores"] = [round(score, 6) for score in self.sam.scores]
        return entry


@dataclass
class MaskPrediction:
    """What `clipseg.predictor.Predictor.predict_masks` returns for one image: one `ExpressionMask` per expression
    (`results`, in order), the threshold used and where it came from ("given", "calibrated" from the model's config,
    or "paper": 0.3; see `clipseg.postprocess.resolve_threshold`), the options, and a line saying which threshold
    and where from (`clipseg.postprocess.describe_threshold`)."""

    results: list[ExpressionMask]
    threshold: float
    threshold_source: str
    options: PipelineOptions
    threshold_note: str = ""

    @property
    def probs(self) -> np.ndarray:
        """(E, H, W) float32: each expression's evaluated (and refined) probability map."""
        return _stack([result.probs for result in self.results], np.float32)

    @property
    def masks(self) -> np.ndarray:
        """(E, H, W) bool: each expression's post-processed mask."""
        return _stack([result.mask.mask for result in self.results], bool)

    @property
    def soft(self) -> np.ndarray:
        """(E, H, W) float32: each mask with its feathered edge (equal to `masks` without feather)."""
        return _stack([result.mask.soft for result in self.results], np.float32)

    @property
    def instances(self) -> list[list[Instance]]:
        """Per expression, its instances (empty unless the options ask for instances or max_instances)."""
        return [result.mask.instances for result in self.results]

    def summary(self) -> dict:
        """Strict JSON: the threshold and its source, the options, one `ExpressionMask.summary` per expression."""
        return {
            "threshold": {"value": self.threshold, "source": self.threshold_source, "note": self.threshold_note},
            "pipeline": self.options.to_dict(),
            "expressions": [result.summary() for result in self.results],
        }


def _stack(maps: list[np.ndarray], dtype) -> np.ndarray:
    return np.stack(maps).astype(dtype, copy=False) if maps else np.zeros((0, 0, 0), dtype=dtype)


def segment(
    image: ImageInput,
    expressions: Sequence[Expression],
    predict: PhrasePredictor,
    options: PipelineOptions = PipelineOptions(),
    sam: SamRefiner | None = None,
) -> list[ExpressionMask]:
    """The module docstring's steps for one image (path, PIL image or array) -> one `ExpressionMask` per
    expression, in order: `expression_maps`, then `masks_from_maps`. refine="sam" needs `sam`."""
    _check_sam(options, sam)
    pixels = np.asarray(load_image(image))
    return masks_from_maps(pixels, expressions, expression_maps(pixels, expressions, predict, options), options, sam)


def expression_maps(
    image: ImageInput, expressions: Sequence[Expression], predict: PhrasePredictor, options: PipelineOptions
) -> np.ndarray:
    """Steps 1 to 3 but SAM: (E, H, W) float32 probabilities, one map per expression, at the image's size.
    `predict` is called once, or once per window and context pass with tiling, each time with all distinct phrases.
    Keep them to re-run `masks_from_maps` with other post-processing without the model (the app does)."""
    pixels = np.asarray(load_image(image))
    if not expressions:
        return np.zeros((0, *pixels.shape[:2]), dtype=np.float32)
    phrases = distinct_phrases(expressions)
    if options.tile is None:
        probs = predict(pixels, phrases)
    else:

        def window(crop: np.ndarray) -> np.ndarray:
            return predict(crop, phrases)

        probs = tiled_probabilities(pixels, window, options.tile, options.overlap, options.tile_context)
    maps = evaluate_many(expressions, phrases, probs)
    return guided_refine(maps, pixels) if options.refine == "guided" else maps


def masks_from_maps(
    image: ImageInput,
    expressions: Sequence[Expression],
    maps: np.ndarray,
    options: PipelineOptions,
    sam: SamRefiner | None = None,
) -> list[ExpressionMask]:
    """Steps 3 (SAM) and 4 on `expression_maps`' (E, H, W) maps of `expressions` for the same image."""
    _check_sam(options, sam)
    if len(maps) != len(expressions):
        raise ValueError(f"{len(maps)} maps for {len(expressions)} expressions")
    pixels = np.asarray(load_image(image)) if options.refine == "sam" else None
    return [
        ExpressionMask(e, probs, *mask_from_map(pixels, probs, options, sam)) for e, probs in zip(expressions, maps)
    ]


def mask_from_map(
    pixels: np.ndarray | None, probs: np.ndarray, options: PipelineOptions, sam: SamRefiner | None = None
) -> tuple[MaskResult, SamRefinement | None]:
    """Steps 3 (SAM) and 4 for one (H, W) map of any prompt (an image prompt's too): its `MaskResult` and SAM's
    refinement (None unless refine="sam", which needs the (H, W, 3) `pixels` and `sam`)."""
    if options.refine != "sam":
        return make_mask(probs, options.mask), None
    _check_sam(options, sam)
    refined = sam.refine(pixels, probs, sam_components(probs, options.mask))
    return make_mask(probs, options.mask, refined.union), refined


def _check_sam(options: PipelineOptions, sam: SamRefiner | None) -> None:
    if options.refine == "sam" and sam is None:
        raise ValueError('refine="sam" needs a SamRefiner (SamRefiner.from_pretrained("facebook/sam-vit-base"))')


def sam_components(probs: np.ndarray, options: MaskOptions) -> list[Instance]:
    """The components SAM is prompted with: those of probs > threshold of at least min_area pixels, the best
    max_instances by `options.sort_by`."""
    mask = remove_small(probs > options.threshold, options.min_area)
    return find_instances(mask, probs, options.sort_by, options.max_instances)[1]
