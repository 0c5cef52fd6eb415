"""The web page's logic without Gradio: `Segmenter` takes the page's inputs (an image, typed prompts, an image
prompt, a threshold, a geometry) and returns what the page shows (`Output`: an overlay, a heatmap per prompt, a zip
of the masks with predict.py's summary, a status line); app.py lays the page out on top of it.

    segmenter = Segmenter(CLIPSeg.from_pretrained("checkpoints/demo"), "demo")
    session, output = segmenter.segment(None, "room.jpg", "a cat, the sofa", threshold=0.4)
    session, output = segmenter.rethreshold(session, 0.5)     # no model call
    output.overlay, output.heatmaps, output.zip_path, output.summary

A browser session (`Session`) keeps its image encoded once (`Encoded`: the image's features in a `Predictor` and
a preview at most `clipseg.drawing.DISPLAY_MAX_SIDE` on its long side): new prompts re-run only the text tower and
the decoder. Its last result (`Result`: (K, 1, h, w) float32 logits at the model's input size) lets a new threshold
only re-threshold: the maps at the preview's and at the original size are made from the logits when drawn. An image
prompt's (1, 512) embedding is kept per session too. Sessions are bounded in memory and time (`clipseg.sessions`);
every input is checked as it comes (`clipseg.uploads`): bad input is a message, never an exception.
"""

from __future__ import annotations

import hashlib
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

from clipseg.drawing import display_size, draw_overlay, heatmap, mask_png
from clipseg.images import read_mask
from clipseg.outputs import safe_name
from clipseg.prediction_outputs import Prompt, build_prompts, image_summary, prompt_summary
from clipseg.predictor import Predictor
from clipseg.sessions import MB, SessionStore
from clipseg.transforms import NonFiniteOutput, full_size_probabilities
from clipseg.uploads import (
    MAX_PROMPTS,
    InputError,
    check_threshold,
    painted_mask,
    parse_prompts,
    payload_file,
    read_rgb,
)
from model import CLIPSeg, TextCache

DEMO_MODEL = Path("checkpoints") / "demo"
DEFAULT_THRESHOLD = 0.3
MAX_CACHED_PHRASES = 1000  # the model's phrase cache (2 KB per phrase at ViT-B/16)
SESSION_MEMORY_MB = 1024  # default cap on what all sessions retain together
IDLE_MINUTES = 30  # default: a session unused this long is dropped
NATIVE = "native aspect"
NO_MODEL_HELP = (
    "No model is loaded. Train the small demo model with `make demo` (about 10 minutes on a CPU; the app then "
    f"finds it in {DEMO_MODEL}/), or start the app with `python app.py --model CIDAS/clipseg-rd64-refined` (the "
    "released weights, downloaded from the Hugging Face hub: needs network access), a checkpoint directory such as "
    "`checkpoints/<name>`, or an original `.pth` decoder with `--backbone`."
)


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


@dataclass
class Encoded:
    """An image encoded for one geometry: `key` = SHA-1 of the file's bytes + the geometry. The original's pixels
    are not kept: its size, a preview and the model's features of it are."""

    key: str
    name: str
    size: tuple[int, int]  # (W, H) of the upright original
    preview: Image.Image  # the image at most DISPLAY_MAX_SIDE on its long side
    predictor: Predictor  # its image set


@dataclass
class Result:
    """A session's last segmentation: all a threshold change needs. logits: (K, 1, h, w) float32 at the model's
    input size; the maps at the preview's and at the original size are made from them when drawn, as predict.py
    makes its maps (`clipseg.transforms.full_size_probabilities`)."""

    encoded: Encoded
    prompts: list[Prompt]
    logits: torch.Tensor
    timings: dict[str, str]

    def probabilities(self, size: tuple[int, int] | None = None, index: int | None = None) -> np.ndarray:
        """(K, H, W) maps at `size` = (W, H) (default: the original's), or the (H, W) map of prompt `index`."""
        width, height = size or self.encoded.size
        return full_size_probabilities(self.logits if index is None else self.logits[index], (height, width))


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

    model: a loaded CLIPSeg, or None (every call then answers with `no_model_message`); its phrase cache is bounded
    to MAX_CACHED_PHRASES. Predictions follow predict.py: native aspect (short side = the model's size) or square,
    maps at the original size, mask = probability > threshold. Calls are serialised by a lock; several sessions
    share the model. Sessions together retain at most `memory_mb` MB and are dropped after `idle_minutes` unused
    (`sessions.SessionStore`; `clock` for tests). upload_folders: the only folders files are read from (`build_page`
    sets Gradio's upload folder); None: any regular file, for use from Python."""

    def __init__(
        self,
        model: CLIPSeg | None,
        model_name: str,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        workdir: str | os.PathLike | None = None,
        no_model_message: str = NO_MODEL_HELP,
        memory_mb: float = SESSION_MEMORY_MB,
        idle_minutes: float = IDLE_MINUTES,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model, self.model_name, self.precision = model, model_name, precision
        if model is not None:
            model.eval()
            model.text_cache = TextCache(MAX_CACHED_PHRASES)
            if device is not None:
                model.to(device)
        self.image_size = model.config.image_size if model is not None else 352
        self.square_label = f"square {self.image_size}"
        self.no_model_message = no_model_message
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
        threshold: float = DEFAULT_THRESHOLD,
        geometry: str = NATIVE,
    ) -> tuple[Session, Output]:
        """Segment `image` (a Gradio image payload or a path) with the typed prompts and/or an image prompt.

        support: a Gradio ImageEditor payload ({"background", "layers", ...}) or a path of the support image;
        support_mask: an uploaded mask (payload or path), else the strokes painted on the support are the mask.
        Bad input returns an Output whose message says what is wrong and how to fix it; nothing is raised."""
        session = session or Session()
        with self._lock:
            self.sessions.expire()
            try:
                output = self._segment(session, image, prompts_text, support, support_mask, threshold, geometry)
            except (InputError, NonFiniteOutput) as err:
                session.result = None
                output = Output(f"**Error:** {err}")
            except Exception as err:  # a bug: the page says so briefly, the terminal gets the traceback
                traceback.print_exc()
                session.result = None
                output = Output(f"**Error:** segmentation failed ({type(err).__name__}: {err}); see the terminal")
            self.sessions.update(session)
        return session, output

    def rethreshold(self, session: Session | None, threshold: float) -> tuple[Session, Output]:
        """Re-threshold the session's last result (no model call)."""
        session = session or Session()
        with self._lock:
            self.sessions.expire()
            if session.result is None:
                first = "Segment an image first; a new threshold then applies at once."
                return session, Output(dropped_message(session.dropped) or first)
            try:
                check_threshold(threshold)
            except InputError as err:
                return session, Output(f"**Error:** {err}")
            started = time.perf_counter()
            output = self._render(session, session.result, threshold)
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

    def _segment(self, session, image, prompts_text, support, support_mask, threshold, geometry) -> Output:
        if self.model is None:
            raise InputError(self.no_model_message)
        check_threshold(threshold)
        if geometry not in (NATIVE, self.square_label):
            raise InputError(f"What the model sees must be {NATIVE!r} or {self.square_label!r}, got {geometry!r}.")
        phrases = parse_prompts(prompts_text)
        image_prompt = self._image_prompt(support, support_mask)
        count = len(phrases) + (image_prompt is not None)
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
        prompts = build_prompts(phrases, [])
        if image_prompt is not None:
            parts.append(self._support_embedding(session, predictor, image_prompt))
            prompts.append(image_prompt.prompt())
        conditional = torch.cat(parts)
        timings["embed prompts"] = format_seconds(time.perf_counter() - started)
        started = time.perf_counter()
        logits = predictor.logits(conditional).cpu()
        timings["decode"] = format_seconds(time.perf_counter() - started)
        session.result = Result(encoded, prompts, logits, timings)
        started = time.perf_counter()
        output = self._render(session, session.result, threshold)
        timings["threshold + draw"] = format_seconds(time.perf_counter() - started)
        output.message = self._status(session.result, timings)
        if session.dropped:
            output.message += f" (This page's earlier image and result had been dropped: {session.dropped}.)"
            session.dropped = None
        return output

    def _encode(self, session: Session, data: bytes, name: str, square: bool, timings: dict) -> Encoded:
        """The session's encoded image, re-encoded only when the image's bytes or the geometry changed."""
        key = hashlib.sha1(data + f"|square={square}|{self.image_size}".encode()).hexdigest()
        if session.encoded is not None and session.encoded.key == key:
            timings["read + encode image"] = "cached"
            return session.encoded
        started = time.perf_counter()
        rgb = read_rgb(data, name, "The image")
        predictor = Predictor(self.model, square=square, precision=self.precision)
        predictor.set_image(rgb)
        preview = display_size(*rgb.size)
        preview_image = rgb if preview == rgb.size else rgb.resize(preview, Image.LANCZOS)
        session.encoded = Encoded(key, name, rgb.size, preview_image, predictor)
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

    def _render(self, session: Session, result: Result, threshold: float) -> Output:
        """Masks, previews, the zip and the summary of `result` at `threshold`."""
        labels = [prompt.label for prompt in result.prompts]
        preview_probs = result.probabilities(result.encoded.preview.size)
        previews = preview_probs > threshold
        overlay = draw_overlay(result.encoded.preview, list(previews), labels)
        heatmaps = [
            (heatmap(p), f"{label} (max {p.max():.2f}, {m.mean():.1%} above {threshold:.2f})")
            for p, m, label in zip(preview_probs, previews, labels)
        ]
        zip_path, summary = self._write_zip(session, result, threshold)
        return Output("", overlay, heatmaps, zip_path, summary)

    def _write_zip(self, session: Session, result: Result, threshold: float) -> tuple[str, dict]:
        """<image>-masks.zip: `<prompt>.mask.png` (0/255, original size) per prompt and predict.py's summary.json
        (files are names inside the zip); returns its path and the summary. One full-size map is made at a time.
        The session's previous zip is deleted (Gradio serves its own copy)."""
        if session.zip_dir is not None:
            shutil.rmtree(session.zip_dir, ignore_errors=True)
        session.zip_dir = Path(tempfile.mkdtemp(dir=self.workdir))
        encoded = result.encoded
        path = session.zip_dir / f"{safe_name(Path(encoded.name).stem or 'image')}-masks.zip"
        entries = []
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for index, prompt in enumerate(result.prompts):
                prob = result.probabilities(index=index)
                mask, mask_name = prob > threshold, f"{prompt.slug}.mask.png"
                archive.writestr(mask_name, mask_png(mask), compress_type=zipfile.ZIP_STORED)
                entries.append(prompt_summary(prompt, prob, mask, {"mask": mask_name}))
            image_entry = image_summary(encoded.name, encoded.size, encoded.predictor.input_size, entries)
            summary = {
                "model": self.model_name,
                "threshold": threshold,
                "square": encoded.predictor.transform.square,
                "image_size": self.image_size,
                "processed": 1,
                "skipped": 0,
                "interrupted": False,
                "images": [image_entry],
                "errors": [],
            }
            archive.writestr("summary.json", json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        return str(path), summary

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
