"""The web page's logic without Gradio: `Segmenter` takes the page's inputs (an image, typed prompt expressions, an
image prompt, a threshold, a geometry, the mask `Controls`) and returns what the page shows (`Output`: an overlay, a
heatmap per prompt, a zip of the masks with predict.py's summary, a status line); app.py lays the page out on top.

    segmenter = Segmenter(CLIPSeg.from_pretrained("checkpoints/demo"), "demo")
    session, output = segmenter.segment(None, "room.jpg", "a cat, the sofa", threshold=0.4)
    session, output = segmenter.rethreshold(session, 0.5)     # no model call
    controls = Controls(grow=4, feather=8, instances=True, refine="guided", tile=True, formats=("mask", "cutout"))
    session, output = segmenter.segment(session, "room.jpg", "cat | dog\nsofa - cushion", None, None, None,
                                        controls=controls)  # threshold None: the model's calibrated one, else 0.3

Masks follow the library's mask pipeline (`clipseg.mask_pipeline`, as predict.py and `Predictor.predict_masks`):
each line of the prompt box is an expression (a line without operators is split on commas as before), all phrases
decoded from one encoding of the image (of each window with tiles), evaluated, refined (guided or SAM), then
post-processed at the original size (`Controls`: grow, shrink, feather, fill holes, minimum area, instances). The zip
holds the chosen formats (FORMATS: mask, prob, soft, cutout PNGs per prompt; coco: one COCO JSON with RLE).
    output.overlay, output.heatmaps, output.zip_path, output.summary

A browser session (`Session`) keeps its image encoded once (`Encoded`: the image's features in a `Predictor` and
a preview at most `clipseg.drawing.DISPLAY_MAX_SIDE` on its long side): new prompts re-run only the text tower and
the decoder. Its last result (`Result`: (K, 1, h, w) float32 logits of the phrases at the model's input size, or
with tiles or guided refinement the (E, H, W) maps at the original size) lets a new threshold or new post-processing
run without the model: the maps at the preview's and at the original size are made from the logits when drawn. An image
prompt's (1, 512) embedding is kept per session too. Sessions are bounded in memory and time (`clipseg.sessions`);
every input is checked as it comes (`clipseg.uploads`): bad input is a message, never an exception.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipseg.drawing import display_size, draw_overlay, heatmap, mask_png, probability_png
from clipseg.expressions import Expression, distinct_phrases, evaluate
from clipseg.images import read_mask
from clipseg.mask_formats import CocoDocument, cutout
from clipseg.mask_pipeline import REFINE_MODES, PipelineOptions, mask_from_map
from clipseg.outputs import json_text, safe_name
from clipseg.postprocess import MaskOptions, describe_threshold, resolve_threshold
from clipseg.prediction_outputs import Prompt, build_prompts, image_summary, prompt_summary
from clipseg.predictor import Predictor
from clipseg.refine import SamRefiner, guided_refine
from clipseg.sessions import MB, SessionStore
from clipseg.tiling import TooManyWindows, default_overlap, tiled_probabilities
from clipseg.transforms import NonFiniteOutput, full_size_probabilities
from clipseg.uploads import (
    MAX_PROMPTS,
    InputError,
    check_threshold,
    painted_mask,
    parse_expressions,
    payload_file,
    read_rgb,
)
from model import CLIPSeg, TextCache

FORMATS = ("mask", "prob", "soft", "cutout", "coco")  # what the zip can hold

MAX_CACHED_PHRASES = 1000  # the model's phrase cache (2 KB per phrase at ViT-B/16)
SESSION_MEMORY_MB = 1024  # default cap on what all sessions retain together
IDLE_MINUTES = 30  # default: a session unused this long is dropped
NATIVE = "native aspect"


# ---------------------------------------------------------------------------------------------- results


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def dropped_message(reason: str | None) -> str | None:
    """What a user whose session was released (`Session.dropped`) is told at their next threshold change."""
    if reason is None:
        return None
    return f"**Note:** this page's last result was dropped because {reason}. Press Segment to compute it again."


@dataclass
class Output:
    """What the page shows after an event. message: Markdown for the status line (an error, or the timings)."""

    message: str
    overlay: Image.Image | None = None
    heatmaps: list[tuple[Image.Image, str]] = field(default_factory=list)
    zip_path: str | None = None
    summary: dict | None = None

    @property
    def ok(self) -> bool:
        return self.overlay is not None


@dataclass
class ImagePrompt:
    """An image prompt: the support image (upright RGB), its (H, W) bool object mask, and their content key."""

    image: Image.Image
    mask: np.ndarray
    name: str
    mask_name: str
    key: str

    def prompt(self) -> Prompt:
        (prompt,) = build_prompts([], [(Path(self.name or "support"), Path(self.mask_name))])
        return prompt


@dataclass(frozen=True)
class Controls:
    """The page's mask controls as its widgets give them, checked when the pipeline is made: the post-processing at
    the original size (`MaskOptions`' fields but the threshold, under the same names; a slider's whole float is
    taken as an int, 0 max_instances as None), refine (one of REFINE_MODES; "sam" needs the Segmenter's
    SamRefiner), tile (windows of the model's input side, a quarter overlapping) and the zip's formats (of FORMATS)."""

    grow: int = 0
    shrink: int = 0
    feather: float = 0.0
    fill_holes: bool = False
    min_area: int = 0
    instances: bool = False
    sort_by: str = "area"
    max_instances: int | None = None
    refine: str = "none"
    tile: bool = False
    formats: tuple[str, ...] = ("mask",)

    def mask_options(self, threshold: float) -> MaskOptions:
        """MaskOptions of these controls at `threshold`; ValueError or TypeError naming a value out of range."""
        typed = {name: _typed(name, getattr(self, name), kind) for name, kind in MASK_CONTROLS.items()}
        return MaskOptions(threshold=threshold, **{**typed, "max_instances": typed["max_instances"] or None})

    def pipeline(self, threshold: float, tile_side: int) -> PipelineOptions:
        """The pipeline options; InputError naming the control when a value is out of range."""
        formats = self.formats if isinstance(self.formats, tuple | list) else [self.formats]
        unknown = [name for name in formats if name not in FORMATS]
        if unknown or not formats:
            raise InputError(f"The zip's formats must be some of {', '.join(FORMATS)}, got {list(formats)}.")
        if self.refine not in REFINE_MODES:
            raise InputError(f"Refine must be one of {', '.join(REFINE_MODES)}, got {self.refine!r}.")
        try:
            mask = self.mask_options(threshold)
        except (TypeError, ValueError) as err:
            raise InputError(f"The mask controls: {err}.") from err
        side = tile_side if self.tile else None
        return PipelineOptions(mask, self.refine, side, default_overlap(side) if side else None)


# The controls that are MaskOptions' fields, with the type a widget's value is converted to (None: checked as is).
MASK_CONTROLS = {"grow": None, "shrink": None, "feather": float, "fill_holes": bool, "min_area": None,
                 "instances": bool, "sort_by": None, "max_instances": None}  # fmt: skip


def _typed(name: str, value: Any, kind: type | None) -> Any:
    """A widget's value as MaskOptions takes it: a slider's float that holds a whole number -> int; a check box's
    true/false (or 0/1) -> bool, anything else a ValueError naming the control; a number -> float for `kind` float.
    Other values are left for MaskOptions to refuse."""
    value = int(value) if isinstance(value, float) and value.is_integer() else value
    if kind is bool:
        if value not in (True, False) or not isinstance(value, bool | int):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return bool(value)
    return float(value) if kind is float and isinstance(value, int | float) and not isinstance(value, bool) else value


@dataclass
class Encoded:
    """An image encoded for one geometry: `key` = SHA-1 of the file's bytes + the geometry. The original's pixels
    are not kept: its size, a preview, the model's features of it and the file's bytes are (`pixels` decodes them
    for tiles, refinement and cut-outs)."""

    key: str
    name: str
    size: tuple[int, int]  # (W, H) of the upright original
    preview: Image.Image  # the image at most DISPLAY_MAX_SIDE on its long side
    predictor: Predictor  # its image set (encoded, pixels dropped)
    data: bytes = b""  # the uploaded file

    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8: the upright original, decoded again from the file's bytes."""
        return np.asarray(read_rgb(self.data, self.name, "The image"))


@dataclass
class Result:
    """A session's last segmentation: all a change of threshold or post-processing needs. prompts: the expressions'
    (E), then the image prompt's; phrases: the expressions' distinct phrases. logits: (K, 1, h, w) float32 at the
    model's input size, the phrases' then the image prompt's; the maps at the preview's and at the original size are
    made from them when drawn, as predict.py makes its maps (`clipseg.transforms.full_size_probabilities`), and the
    expressions evaluated on them. maps: with tiles or guided refinement, the prompts' (E[+1], H, W) maps at the
    original size instead. options: the pipeline they were made with."""

    encoded: Encoded
    prompts: list[Prompt]
    logits: torch.Tensor | None
    timings: dict[str, str]
    expressions: list[Expression] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    maps: np.ndarray | None = None
    options: PipelineOptions = field(default_factory=PipelineOptions)
    controls: Controls = field(default_factory=Controls)

    def probabilities(self, size: tuple[int, int] | None = None, index: int | None = None) -> np.ndarray:
        """(P, H, W) maps of the P prompts at `size` = (W, H) (default: the original's), or the (H, W) map of
        prompt `index`."""
        width, height = size or self.encoded.size
        if index is None:
            return np.stack([self.probabilities(size, i) for i in range(len(self.prompts))])
        if self.maps is not None:
            prob = self.maps[index]
            if prob.shape != (height, width):
                prob = np.clip(np.asarray(Image.fromarray(prob).resize((width, height), Image.BILINEAR)), 0, 1)
            return prob
        if index >= len(self.expressions):  # the image prompt: the last row
            return full_size_probabilities(self.logits[-1], (height, width))
        expression = self.expressions[index]
        rows = {phrase: self.phrases.index(phrase) for phrase in expression.phrases}
        maps = {phrase: full_size_probabilities(self.logits[row], (height, width)) for phrase, row in rows.items()}
        return evaluate(expression, maps)


@dataclass
class Session:
    """Per browser session: the encoded image, the last image-prompt embedding and the last result, until they
    are released (`sessions.SessionStore`); `dropped` then says why."""

    encoded: Encoded | None = None
    support: tuple[str, torch.Tensor] | None = None  # (key, (1, 512) embedding)
    result: Result | None = None
    zip_dir: Path | None = None
    dropped: str | None = None

    def release(self, reason: str) -> None:
        """Free the image, the embedding, the result and the zip on disk."""
        if self.zip_dir is not None:
            shutil.rmtree(self.zip_dir, ignore_errors=True)
        self.encoded = self.support = self.result = self.zip_dir = None
        self.dropped = reason


# ------------------------------------------------------------------------------------------------ logic


class Segmenter:
    """The page's logic without Gradio: `segment` (image + prompts -> Output) and `rethreshold`.

    model: a loaded CLIPSeg; its phrase cache is bounded to MAX_CACHED_PHRASES. Predictions follow predict.py: native
    aspect (short side = the model's size) or square, maps at the original size, mask = probability > threshold.
    Calls are serialised by a lock; several sessions share the model. Sessions together retain at most `memory_mb`
    MB and are dropped after `idle_minutes` unused (`sessions.SessionStore`; `clock` for tests). upload_folders: the
    only folders files are read from (`build_page` sets Gradio's upload folder); None: any regular file, for use from
    Python."""

    def __init__(
        self,
        model: CLIPSeg,
        model_name: str,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        workdir: str | os.PathLike | None = None,
        memory_mb: float = SESSION_MEMORY_MB,
        idle_minutes: float = IDLE_MINUTES,
        clock: Callable[[], float] = time.monotonic,
        sam: SamRefiner | None = None,
    ):
        self.model, self.model_name, self.precision, self.sam = model, model_name, precision, sam
        model.eval()
        model.text_cache = TextCache(MAX_CACHED_PHRASES)
        if device is not None:
            model.to(device)
        self.image_size = model.config.image_size
        self.square_label = f"square {self.image_size}"
        calibrated = getattr(model.config, "threshold", None)
        self.default_threshold, self.threshold_source = resolve_threshold(None, calibrated)
        origin = getattr(model.config, "threshold_origin", None)
        self.threshold_note = describe_threshold(self.default_threshold, self.threshold_source, origin)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="clipseg-app-"))
        self.sessions = SessionStore(int(memory_mb * MB), idle_minutes * 60, clock)
        self.upload_folders: tuple[Path, ...] | None = None
        self._lock = threading.Lock()

    def segment(
        self,
        session: Session | None,
        image: Any,
        prompts_text: str | None,
        support: Any = None,
        support_mask: Any = None,
        threshold: float | None = None,
        geometry: str = NATIVE,
        controls: Controls = Controls(),
    ) -> tuple[Session, Output]:
        """Segment `image` (a Gradio image payload or a path) with the typed prompts and/or an image prompt.

        support: a Gradio ImageEditor payload ({"background", "layers", ...}) or a path of the support image;
        support_mask: an uploaded mask (payload or path), else the strokes painted on the support are the mask.
        threshold: None takes `default_threshold` (the model's calibrated one, else the paper's 0.3).
        Bad input returns an Output whose message says what is wrong and how to fix it; nothing is raised."""
        session = session or Session()
        with self._lock:
            self.sessions.expire()
            try:
                threshold = self.default_threshold if threshold is None else threshold
                output = self._segment(
                    session, image, prompts_text, support, support_mask, threshold, geometry, controls
                )
            except (InputError, NonFiniteOutput, TooManyWindows) as err:
                session.result = None
                output = Output(f"**Error:** {err}")
            except Exception as err:  # a bug: the page says so briefly, the terminal gets the traceback
                traceback.print_exc()
                session.result = None
                output = Output(f"**Error:** segmentation failed ({type(err).__name__}: {err}); see the terminal")
            self.sessions.update(session)
        return session, output

    def rethreshold(
        self, session: Session | None, threshold: float, controls: Controls | None = None
    ) -> tuple[Session, Output]:
        """Re-threshold and post-process the session's last result again (no model call), with `controls` (None:
        those it was made with); a change of tiles or guided refinement needs the model (Segment)."""
        session = session or Session()
        with self._lock:
            self.sessions.expire()
            if session.result is None:
                first = "Segment an image first; a new threshold then applies at once."
                return session, Output(dropped_message(session.dropped) or first)
            result = session.result
            controls = controls or result.controls
            try:
                check_threshold(threshold)
                options = controls.pipeline(threshold, self.image_size)
                if _map_steps(options) != _map_steps(result.options):
                    raise InputError("Tiles and guided refinement change the maps: press Segment to apply them.")
                self._check_sam(options)
            except InputError as err:
                return session, Output(f"**Error:** {err}")
            started = time.perf_counter()
            result.options, result.controls = options, controls
            output = self._render(session, result)
            timings = {"threshold + draw": format_seconds(time.perf_counter() - started), "model": "not run"}
            output.message = self._status(session.result, timings, f"Re-thresholded at {threshold:.2f}:")
            self.sessions.touch(session)
        return session, output

    def forget(self, session: Session | None) -> None:
        """Free what a session holds, on disk too (its last zip). Gradio calls this from its event loop when a
        closed tab's state expires, so it does not wait for a segmentation to finish."""
        if session is not None:
            self.sessions.forget(session)
            session.release("the page was closed")

    # -- steps --------------------------------------------------------------------------------------

    def _segment(self, session, image, prompts_text, support, support_mask, threshold, geometry, controls) -> Output:
        check_threshold(threshold)
        options = controls.pipeline(threshold, self.image_size)
        self._check_sam(options)
        if geometry not in (NATIVE, self.square_label):
            raise InputError(f"What the model sees must be {NATIVE!r} or {self.square_label!r}, got {geometry!r}.")
        expressions = parse_expressions(prompts_text)
        phrases = distinct_phrases(expressions)
        image_prompt = self._image_prompt(support, support_mask)
        count = len(expressions) + (image_prompt is not None)
        if count == 0:
            raise InputError("Enter at least one text prompt (one per line or comma-separated) or an image prompt.")
        if count > MAX_PROMPTS:
            raise InputError(f"{count} prompts given; at most {MAX_PROMPTS} at once: split them over several runs.")
        found = payload_file(image, "The image", self.upload_folders)
        if found is None:
            raise InputError("Upload, paste or photograph an image first (or pick an example below).")
        timings: dict[str, str] = {}
        encoded = self._encode(session, *found, square=geometry != NATIVE, timings=timings)
        started = time.perf_counter()
        predictor = encoded.predictor
        self.model.text_cache.touch(phrases)  # adding this call's new phrases cannot drop its cached ones
        parts = [predictor.embed_prompts(phrases=phrases)] if phrases else []
        prompts = build_prompts([str(expression) for expression in expressions], [])
        if image_prompt is not None:
            parts.append(self._support_embedding(session, predictor, image_prompt))
            prompts.append(image_prompt.prompt())
        conditional = torch.cat(parts)
        timings["embed prompts"] = format_seconds(time.perf_counter() - started)
        started = time.perf_counter()
        result = Result(encoded, prompts, None, timings, expressions, phrases, None, options, controls)
        if options.tile is None and options.refine != "guided":
            result.logits = predictor.logits(conditional).cpu()
        else:
            result.maps = self._full_maps(result, conditional)
        timings["decode" + (" (tiles)" if options.tile else "")] = format_seconds(time.perf_counter() - started)
        session.result = result
        started = time.perf_counter()
        output = self._render(session, session.result)
        timings["masks + draw"] = format_seconds(time.perf_counter() - started)
        output.message = self._status(session.result, timings)
        if session.dropped:
            output.message += f" (This page's earlier image and result had been dropped: {session.dropped}.)"
            session.dropped = None
        return output

    def _full_maps(self, result: Result, conditional: torch.Tensor) -> np.ndarray:
        """The prompts' (P, H, W) maps at the original size, tiled and/or refined with the image as guide."""
        predictor, options = result.encoded.predictor, result.options
        pixels = result.encoded.pixels()
        if options.tile is None:
            probs = predictor.window_probabilities(pixels, conditional)
        else:
            window = lambda crop: predictor.window_probabilities(crop, conditional)  # noqa: E731
            probs = tiled_probabilities(pixels, window, options.tile, options.overlap, options.tile_context)
        phrase_maps = dict(zip(result.phrases, probs))
        maps = [evaluate(expression, phrase_maps) for expression in result.expressions]
        maps += list(probs[len(result.phrases) :])  # the image prompt's
        maps = np.stack(maps).astype(np.float32)
        return guided_refine(maps, pixels) if options.refine == "guided" else maps

    def _threshold_record(self, threshold: float) -> dict:
        """summary.json's threshold, as predict.py writes it: its value, its source ("calibrated" or "paper" for the
        default value, else "given") and the note that says where it came from."""
        if threshold == self.default_threshold:
            return {"value": threshold, "source": self.threshold_source, "note": self.threshold_note}
        return {"value": threshold, "source": "given", "note": describe_threshold(threshold, "given")}

    def _check_sam(self, options: PipelineOptions) -> None:
        if options.refine == "sam" and self.sam is None:
            raise InputError("Refine with SAM needs a SAM model: start the app with --sam-model (a hub id or folder).")

    def _encode(self, session: Session, data: bytes, name: str, square: bool, timings: dict) -> Encoded:
        """The session's encoded image, re-encoded only when the image's bytes or the geometry changed."""
        key = hashlib.sha1(data + f"|square={square}|{self.image_size}".encode()).hexdigest()
        if session.encoded is not None and session.encoded.key == key:
            timings["read + encode image"] = "cached"
            return session.encoded
        started = time.perf_counter()
        rgb = read_rgb(data, name, "The image")
        predictor = Predictor(self.model, square=square, precision=self.precision)
        predictor.set_image(rgb, keep=False)
        preview = display_size(*rgb.size)
        preview_image = rgb if preview == rgb.size else rgb.resize(preview, Image.LANCZOS)
        session.encoded = Encoded(key, name, rgb.size, preview_image, predictor, data)
        timings["read + encode image"] = format_seconds(time.perf_counter() - started)
        return session.encoded

    def _image_prompt(self, support: Any, support_mask: Any) -> ImagePrompt | None:
        """The image prompt from the support editor and the mask upload, or None when no support is given."""
        layers: list = []
        if isinstance(support, dict) and "path" not in support:  # an ImageEditor payload
            layers = support.get("layers") or []
            support = support.get("background")
        image = payload_file(support, "The support image", self.upload_folders)
        mask = payload_file(support_mask, "The support mask", self.upload_folders)
        if image is None:
            if mask is not None:
                raise InputError("The image prompt has a mask but no support image: upload the support image too.")
            return None
        rgb = read_rgb(*image, "The support image")
        if mask is not None:
            (object_mask, _), mask_name = read_mask(read_rgb(*mask, "The support mask")), mask[1]
            if object_mask.shape != (rgb.height, rgb.width):
                raise InputError(
                    f"The support mask {mask_name!r} is {object_mask.shape[1]}x{object_mask.shape[0]} but the support "
                    f"image is {rgb.width}x{rgb.height}: upload a mask of the support image's size (or paint one)."
                )
        else:
            object_mask, mask_name = painted_mask(layers, rgb.size, self.upload_folders), "painted mask"
        if object_mask is None or not object_mask.any():
            raise InputError(
                "The image prompt has no object: paint over the object on the support image with the brush, or "
                "upload its mask (white = object)."
            )
        key = hashlib.sha1(image[0] + np.packbits(object_mask).tobytes() + str(object_mask.shape).encode()).hexdigest()
        return ImagePrompt(rgb, object_mask, image[1], mask_name, key)

    @staticmethod
    def _support_embedding(session: Session, predictor: Predictor, image_prompt: ImagePrompt) -> torch.Tensor:
        """(1, 512) embedding of the engineered image prompt, cached per session by support and mask content."""
        if session.support is None or session.support[0] != image_prompt.key:
            embedding = predictor.embed_prompts(support=[(image_prompt.image, image_prompt.mask)])
            session.support = (image_prompt.key, embedding)
        return session.support[1]

    def _render(self, session: Session, result: Result) -> Output:
        """Masks (post-processed at the original size), previews, the zip and the summary of `result` with its
        options."""
        labels = [prompt.label for prompt in result.prompts]
        threshold = result.options.mask.threshold
        preview = result.encoded.preview
        preview_probs = result.probabilities(preview.size)
        zip_path, summary, masks = self._write_zip(session, result)
        previews = [np.asarray(Image.fromarray(mask).resize(preview.size, Image.NEAREST)) for mask in masks]
        overlay = draw_overlay(preview, previews, labels)
        heatmaps = [
            (heatmap(p), f"{label} (max {p.max():.2f}, {m.mean():.1%} in the mask at {threshold:.2f})")
            for p, m, label in zip(preview_probs, previews, labels)
        ]
        return Output("", overlay, heatmaps, zip_path, summary)

    def _write_zip(self, session: Session, result: Result) -> tuple[str, dict, list[np.ndarray]]:
        """<image>-masks.zip: per prompt the chosen formats at the original size (`<prompt>.mask.png` 0/255,
        `.prob.png`, `.soft.png` the feathered mask, `.cutout.png` RGBA), `coco.json` (per-instance COCO RLE) when
        chosen, and predict.py's summary.json (files are names inside the zip); returns its path, the summary and
        the (H, W) masks. One full-size map is made at a time. The session's previous zip is deleted (Gradio serves
        its own copy)."""
        if session.zip_dir is not None:
            shutil.rmtree(session.zip_dir, ignore_errors=True)
        session.zip_dir = Path(tempfile.mkdtemp(dir=self.workdir))
        encoded, options, formats = result.encoded, result.options, result.controls.formats
        path = session.zip_dir / f"{safe_name(Path(encoded.name).stem or 'image')}-masks.zip"
        needs_pixels = options.refine == "sam" or "cutout" in formats
        pixels = encoded.pixels() if needs_pixels else None
        coco = CocoDocument(description=f"clipseg masks ({self.model_name})")
        image_id = coco.add_image(encoded.name, *encoded.size)
        entries, masks = [], []
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for index, prompt in enumerate(result.prompts):
                prob = result.probabilities(index=index)
                found, refined = mask_from_map(pixels, prob, options, self.sam)
                files = {}
                for kind in formats:
                    name = f"{prompt.slug}.{kind}.png"
                    if kind == "mask":
                        archive.writestr(name, mask_png(found.mask), compress_type=zipfile.ZIP_STORED)
                    elif kind in ("prob", "soft"):
                        picture = probability_png(prob if kind == "prob" else found.soft, 8)
                        archive.writestr(name, _png(picture))
                    elif kind == "cutout":
                        alpha = found.soft if options.mask.feather else found.mask
                        archive.writestr(
                            name, _png(cutout(Image.fromarray(pixels), alpha)), compress_type=zipfile.ZIP_STORED
                        )
                    else:
                        continue
                    files[kind] = name
                if "coco" in formats:
                    coco.add_result(image_id, prompt.label, found, "rle")
                entry = prompt_summary(prompt, prob, found.mask, files)
                entry.update(found.summary())
                if index < len(result.expressions):
                    entry["expression"] = result.expressions[index].to_dict()
                if refined is not None:
                    entry["sam_scores"] = [round(score, 6) for score in refined.scores]
                entries.append(entry)
                masks.append(found.mask)
            if "coco" in formats:
                archive.writestr("coco.json", json_text(coco.to_dict()) + "\n")
            image_entry = image_summary(encoded.name, encoded.size, encoded.predictor.input_size, entries)
            summary = {
                "model": self.model_name,
                "threshold": self._threshold_record(options.mask.threshold),
                "pipeline": options.to_dict(),
                "formats": list(formats),
                "square": encoded.predictor.transform.square,
                "image_size": self.image_size,
                "processed": 1,
                "skipped": 0,
                "interrupted": False,
                "images": [image_entry],
                "errors": [],
            }
            archive.writestr("summary.json", json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        return str(path), summary, masks

    @staticmethod
    def _status(result: Result, timings: dict[str, str], what: str = "Segmented") -> str:
        """The status line: what was done to which image, and the time of each step."""
        encoded = result.encoded
        width, height = encoded.size
        model_width, model_height = encoded.predictor.input_size
        steps = " · ".join(f"{step} {value}" for step, value in timings.items())
        name = encoded.name.replace("`", "'")
        return (
            f"{what} `{name}` ({width}x{height}; the model sees {model_width}x{model_height}), "
            f"{len(result.prompts)} prompt(s). Times: {steps}."
        )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _map_steps(options: PipelineOptions) -> tuple:
    """What the kept maps were made with: the tiling and whether they were refined with the guided filter."""
    return options.tile, options.refine == "guided"
