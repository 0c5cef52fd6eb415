"""The Python API for segmenting your own images, in the style of a predictor: encode an image once, then prompt it
many times; maps come back at the original image size.

    from clipseg.predictor import Predictor
    from model import CLIPSeg

    predictor = Predictor(CLIPSeg.from_pretrained("CIDAS/clipseg-rd64-refined"))
    predictor.set_image("room.jpg")                          # path, PIL image or (H, W[, C]) array
    probs = predictor.predict(phrases=["a cat", "the sofa"])  # (2, H0, W0) float32 in [0, 1]
    probs = predictor.predict(support=[("dog.jpg", "dog_mask.png")])  # image prompt, engineered for you
    conditional = predictor.embed_prompts(phrases=["a cat"])  # (1, 512): reuse across images
    maps = predictor.predict_batch(["a.jpg", "b.jpg"], conditional=conditional)  # [(1, Ha, Wa), (1, Hb, Wb)]
    found = predictor.predict_masks(["cat | dog", "sofa - cushion"], options=MaskOptions(grow=2, instances=True))
    found.masks, found.probs, found.instances, found.threshold, found.threshold_source  # see MaskPrediction

Masks (`predict_masks`): the library's one mask pipeline (`clipseg.mask_pipeline`: prompt expressions, tiling,
guided or SAM refinement, post-processing at the original size). All the phrases of all the expressions are decoded
from the one encoding of the image set last; with `tile`, each window is encoded once instead (and the image set
with `set_image(image, encode=False)` is never encoded as a whole unless a context pass asks for it).

Geometry: by default the image keeps its aspect ratio. It is resized so that its short side is `image_size` (the
model's training size, 352 for the released weights) and both sides are multiples of the patch (16); the long side
is capped at `clipseg.transforms.MAX_ELONGATION` (3) times the short side (more elongated images are squashed to
3:1). `square=True` squashes every image to S x S as the reference implementations do. Logits (K, 1, H, W) at the
input size are resized bilinearly to the original (H0, W0), then sigmoid (`clipseg.transforms.full_size_probabilities`).

predict.py and the app (clipseg/segmenter.py) predict through this class; the ONNX and OpenVINO backends
(`clipseg.onnx.backend.ExportedCLIPSeg`) run behind it like a PyTorch model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from clipseg.expressions import Expression, parse
from clipseg.images import ImageInput, load_image
from clipseg.mask_pipeline import MaskPrediction, PipelineOptions, segment
from clipseg.onnx.backend import ExportedCLIPSeg
from clipseg.postprocess import MaskOptions, describe_threshold, resolve_threshold
from clipseg.precision import PRECISIONS, precision_context, prepare_model, resolve_precision
from clipseg.refine import SamRefiner
from clipseg.transforms import ImageTransform, full_size_probabilities
from clipseg.visual_prompts import support_prompt
from model import CLIPSeg, ImageFeatures


class Predictor:
    """Set an image once, then predict masks for many prompts; maps come back at the original image size.

    model: a `CLIPSeg` (put in eval mode; moved to `device` when given) or an export in its runtime
    (`clipseg.onnx.backend.ExportedCLIPSeg`: ONNX or OpenVINO), which runs in the precision it was exported in.
    image_size: the short side the model sees (default `model.config.image_size`), a multiple of the patch. square:
    squash to image_size x image_size instead of keeping the aspect. resize: "pil" (the HF processor's and the
    original Quickstart's resize, the default here) or "original" (the authors' data pipeline, as in training and
    scoring; see clipseg/transforms.py). precision: 'fp32' (default), 'bf16' or 'int8' for the image encoder and decoder
    (see clipseg/precision.py; int8 quantises `model` in place); the scripts' default is
    `clipseg.precision.default_precision(device, job)`. amp: the old spelling of precision='bf16'.
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
        exported = isinstance(model, ExportedCLIPSeg)  # computes in the precision it was exported in
        if (
            precision is None and not amp
        ):  # the API's default; the commands' is precision.default_precision(device, job)
            precision = model.precision if exported else "fp32"
        supported = model.precisions if exported else PRECISIONS
        self.precision = resolve_precision(precision, self.device, amp or None, supported)
        self._torch_precision = "fp32" if exported else self.precision  # what PyTorch adds around the model
        if not exported:
            prepare_model(self.model, self.precision, self.device)
        image_size, patch = model.config.input_side(image_size), model.config.patch_size
        self.transform = ImageTransform(resize, image_size, square, multiple=patch)
        self.prompt_transform = ImageTransform(resize, model.config.image_size, square=True)
        if self.model.text_cache is None:
            self.model.text_cache = {}
        self.original_size: tuple[int, int] | None = None  # (W0, H0) of the image set last
        self.input_size: tuple[int, int] | None = None  # (W, H) the model saw
        self._image: Image.Image | None = None
        self._features: ImageFeatures | None = None

    def set_image(self, image: ImageInput, encode: bool = True, keep: bool = True) -> None:
        """Set one image (path, PIL image or array; see `clipseg.images.load_image`) for the following `predict`
        and `predict_masks` calls and encode it (one vision pass); encode=False leaves the encoding to the first
        call that needs it (a tiled `predict_masks` encodes its windows instead). keep=False (with encode) drops
        the pixels once encoded: `predict` and `logits` work, `predict_masks` and windows need them."""
        rgb = load_image(image)
        self.original_size = rgb.size
        self.input_size = self.transform.input_size(*rgb.size)
        self._image, self._features = rgb, None
        if encode:
            self._image_features()
        if encode and not keep:
            self._image = None

    def _image_features(self) -> ImageFeatures:
        """The features of the image set last, encoded once."""
        if self._features is None:
            if self._image is None:
                raise RuntimeError("call set_image(image) first")
            self._features = self._encode([self._image])
        return self._features

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
        if conditional is None:
            conditional = self.embed_prompts(phrases, prompt_images, support)
        return self._decode(self._image_features(), conditional, self.original_size)

    def predict_masks(
        self,
        expressions: Sequence[str | Expression],
        threshold: float | None = None,
        options: MaskOptions | None = None,
        refine: str = "none",
        tile: int | None = None,
        tile_overlap: int | None = None,
        tile_context: float = 0.0,
        sam: SamRefiner | None = None,
    ) -> MaskPrediction:
        """One mask per prompt expression for the image set last, at its original size (`MaskPrediction`: probs,
        masks, soft masks, instances, the threshold and its source, a JSON summary).

        expressions: text (`clipseg.expressions.parse`: `cat | dog`, `a & b`, `a - b`, `car:1.5`, parentheses; a
        plain phrase works as before; a syntax error is an `ExpressionError` naming the column) or parsed
        `Expression`s. threshold: None takes `default_threshold()` (the model's calibrated one, else the paper's
        0.3); it replaces `options.threshold`. options: the post-processing (`clipseg.postprocess.MaskOptions`:
        grow, shrink, feather, fill_holes, min_area, instances, sort_by, max_instances). refine: "none", "guided"
        (edge-aware upsampling, the image as guide) or "sam" (needs `sam`, a `clipseg.refine.SamRefiner`). tile: the
        window side in source pixels for tiled inference (e.g. the model's `image_size`; None: one pass), with
        tile_overlap pixels (None: a quarter) and tile_context, the weight of a whole-image pass in [0, 1).
        Raises ValueError (ExpressionError included) on bad expressions or options."""
        parsed = [parse(e) if isinstance(e, str) else e for e in expressions]
        if not parsed:
            raise ValueError("no expression given")
        value, source = self.default_threshold(threshold)
        mask_options = replace(options or MaskOptions(), threshold=value)
        pipeline = PipelineOptions(mask_options, refine, tile, tile_overlap, tile_context)
        if self._image is None:
            raise RuntimeError("call set_image(image) first")
        results = segment(self._image, parsed, self._phrase_maps, pipeline, sam)
        origin = getattr(self.model.config, "threshold_origin", None)
        return MaskPrediction(results, value, source, pipeline, describe_threshold(value, source, origin))

    def default_threshold(self, given: float | None = None) -> tuple[float, str]:
        """(threshold, source): `given` ("given"), else the calibrated one the model's config holds
        ("calibrated"), else the paper's 0.3 ("paper"); see `clipseg.postprocess.resolve_threshold`."""
        return resolve_threshold(given, getattr(self.model.config, "threshold", None))

    @property
    def image(self) -> Image.Image | None:
        """The (upright RGB) image set last."""
        return self._image

    def window_probabilities(self, pixels: np.ndarray, conditional: Tensor) -> np.ndarray:
        """(K, h, w) probabilities of (K, 512) conditional vectors for an (h, w, 3) uint8 crop of the image set last
        (encoded here), or for the whole image (its size: its kept encoding). The model of tiled inference
        (`clipseg.tiling.tiled_probabilities`)."""
        height, width = pixels.shape[:2]
        if (width, height) == self.original_size:
            return self._decode(self._image_features(), conditional, self.original_size)
        return self._decode(self._encode([Image.fromarray(pixels)]), conditional, (width, height))

    def _phrase_maps(self, pixels: np.ndarray, phrases: Sequence[str]) -> np.ndarray:
        """The mask pipeline's model: `window_probabilities` of `phrases` (embedded once: the model's text cache)."""
        return self.window_probabilities(pixels, self.embed_prompts(phrases=phrases))

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
        with precision_context(self._torch_precision, self.device):
            return self.model.encode_image(pixels)

    def logits(self, conditional: Tensor) -> Tensor:
        """(K, 512) conditional vectors -> (K, 1, h, w) float32 logits at the model's input size for the image set
        last: `clipseg.transforms.full_size_probabilities(logits, (H0, W0))` makes `predict`'s maps of them."""
        return self._logits(self._image_features(), conditional)

    @torch.no_grad()
    def _logits(self, features: ImageFeatures, conditional: Tensor) -> Tensor:
        with precision_context(self._torch_precision, self.device):
            return self.model.decode(features, conditional.to(self.device)).float()

    def _decode(self, features: ImageFeatures, conditional: Tensor, original_size: tuple[int, int]) -> np.ndarray:
        """One image's features (batch 1) x (K, 512) -> (K, H0, W0) probabilities at `original_size` = (W0, H0)."""
        width, height = original_size
        return full_size_probabilities(self._logits(features, conditional), (height, width))
