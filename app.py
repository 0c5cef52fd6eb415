"""A local web page to segment images with text or image prompts (Gradio; `pip install -r requirements-app.txt`).

    python app.py                                      # the model of `make demo` (checkpoints/demo)
    python app.py --model CIDAS/clipseg-rd64-refined   # the released weights (fetched from the HF hub once)
    python app.py --model checkpoints/myrun --port 8000 --threshold 0.4

Then open http://127.0.0.1:7860 (or your --port). Upload, paste or photograph an image, type prompts (one per line
or comma-separated), optionally add an image prompt (a support image with the object painted over or its mask
uploaded), and press Segment. The page shows an overlay (a colour and legend entry per prompt), a probability
heatmap per prompt, the time each step took, and offers a zip of the masks (a 0/255 PNG per prompt at the image's
original size) with the summary JSON that predict.py writes.

The image is encoded once per session: new prompts re-run only the text tower and the decoder, a new threshold
only re-thresholds. Nothing is fetched from the network unless --model names a hub id (or --share asks for a
public link); Gradio's analytics are off.

What the server accepts and keeps: files only from Gradio's upload folder (regular files of at most 100 MB); at
most 20 prompts of at most 1,000 characters (`clipseg/uploads.py`); at most 64 waiting requests; per session the
image's features, a preview and the logits at the model's input size (full-size maps are made from them for each
zip: about 50 MB at most at 352 px); sessions idle for --idle-minutes, and the least recently used ones when all
hold more than --session-memory, are dropped, and their users are told so when they act again (`clipseg/sessions.py`).

The logic lives in `Segmenter` (inputs in, images, files and messages out; no Gradio); `build_page` lays the page
out on top of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no telemetry, no version check

import numpy as np
import torch
from PIL import Image

from clipseg.drawing import display_size, draw_overlay, heatmap, mask_png
from clipseg.images import read_mask
from clipseg.outputs import safe_name
from clipseg.precision import add_precision_arguments, resolve_precision
from clipseg.prediction_outputs import Prompt, build_prompts, image_summary, prompt_summary
from clipseg.predictor import Predictor
from clipseg.sessions import MB, SessionStore
from clipseg.transforms import NonFiniteOutput, full_size_probabilities
from clipseg.uploads import (
    MAX_PROMPTS,
    MAX_UPLOAD_BYTES,
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
MAX_QUEUE = 64  # requests waiting to run (one runs at a time); more are refused
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES = (  # (image in examples/, prompts): scenes of `synthetic.make_synthetic_phrasecut`
    ("shapes_1.jpg", "purple square, green circle, red triangle"),
    ("shapes_2.jpg", "yellow circle, red square, blue triangle"),
    ("shapes_3.jpg", "blue square, green triangle, purple triangle"),
)
NATIVE = "native aspect"
NO_MODEL_HELP = (
    "No model is loaded. Train the small demo model with `make demo` (about 10 minutes on a CPU; the app then "
    f"finds it in {DEMO_MODEL}/), or start the app with `python app.py --model CIDAS/clipseg-rd64-refined` (the "
    "released weights, downloaded from the Hugging Face hub: needs network access), a checkpoint directory such as "
    "`checkpoints/<name>`, or an original `.pth` decoder with `--backbone`."
)


# ----------------------------------------------------------------------------------------------- outputs


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


# ------------------------------------------------------------------------------------------------ the page


def build_page(segmenter: Segmenter, threshold: float = DEFAULT_THRESHOLD, notice: str | None = None):
    """The Gradio page over `segmenter` (a `gr.Blocks`, not launched), which from now on reads files only from
    Gradio's upload folder. notice: Markdown shown at the top. API: `/segment` and `/rethreshold`."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    segmenter.upload_folders = (Path(os.path.realpath(get_upload_folder())),)

    def outputs_of(session: Session, output: Output) -> tuple:
        return session, output.message, output.overlay, output.heatmaps or None, output.zip_path, output.summary

    def on_segment(session, image, prompts, support, support_mask, threshold, geometry):
        return outputs_of(*segmenter.segment(session, image, prompts, support, support_mask, threshold, geometry))

    def on_threshold(session, threshold):
        return outputs_of(*segmenter.rethreshold(session, threshold))

    def on_geometry(session, image, prompts, support, support_mask, threshold, geometry):
        if session is None or (session.result is None and session.dropped is None):  # nothing shown: nothing to redo
            return (gr.skip(),) * 6
        return on_segment(session, image, prompts, support, support_mask, threshold, geometry)

    with gr.Blocks(title="CLIPSeg", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            "# CLIPSeg: segment an image by text or image prompts\n"
            f"Model: `{segmenter.model_name}`. Masks are the pixels whose probability is above the threshold."
        )
        if notice:
            gr.Markdown(f"**{notice}**", elem_id="notice")
        session = gr.State(delete_callback=segmenter.forget)  # called when a closed tab's state expires
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    label="Image (upload, paste or webcam)",
                    sources=["upload", "clipboard", "webcam"],
                    type="filepath",
                    elem_id="image",
                )
                prompts = gr.Textbox(
                    label=f"Text prompts: one per line or comma-separated (at most {MAX_PROMPTS})",
                    lines=3,
                    placeholder="a cat\nthe sofa",
                    elem_id="prompts",
                )
                with gr.Accordion("Image prompt (optional): an example of the object", open=False):
                    support = gr.ImageEditor(
                        label="Support image: upload it, then paint over the object with the brush",
                        sources=["upload", "clipboard"],
                        brush=gr.Brush(colors=["#ff3030"], color_mode="fixed"),
                        layers=False,
                        transforms=(),
                        elem_id="support",
                    )
                    # Gradio's ImageEditor keeps every blob posted to its `accept_blobs` route in memory (up to 100 MB
                    # each, any number) until an event preprocesses that editor, which never happens here; its page
                    # posts blobs only to editors with a change listener, which this one has not: the route is off.
                    support.accept_blobs = None
                    support_mask = gr.Image(
                        label="... or upload its mask (same size as the support image; white = object)",
                        sources=["upload", "clipboard"],
                        type="filepath",
                        elem_id="support-mask",
                    )
                threshold_slider = gr.Slider(
                    0, 0.99, value=threshold, step=0.01, label="Threshold", elem_id="threshold"
                )
                geometry = gr.Radio(
                    [NATIVE, segmenter.square_label],
                    value=NATIVE,
                    label="What the model sees",
                    info=f"native aspect: short side {segmenter.image_size}, aspect kept; square: squashed as in "
                    "the paper",
                    elem_id="geometry",
                )
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                status = gr.Markdown(label="Status", elem_id="status")
                overlay = gr.Image(label="Overlay", format="png", interactive=False, elem_id="overlay")
                heatmaps = gr.Gallery(
                    label="Probability per prompt (black 0, yellow 1)",
                    columns=3,
                    height="auto",
                    object_fit="contain",
                    format="png",
                    interactive=False,
                    elem_id="heatmaps",
                )
                download = gr.File(
                    label="Masks: a PNG per prompt at the original size + summary.json",
                    interactive=False,
                    elem_id="download",
                )
                with gr.Accordion("Summary (predict.py's summary.json)", open=False):
                    summary = gr.JSON(label="Summary", show_label=False, elem_id="summary")
        examples = [[str(EXAMPLES_DIR / name), text] for name, text in EXAMPLES if (EXAMPLES_DIR / name).is_file()]
        if examples:
            gr.Examples(examples, inputs=[image, prompts], label="Examples")
        inputs = [session, image, prompts, support, support_mask, threshold_slider, geometry]
        outputs = [session, status, overlay, heatmaps, download, summary]
        # Events with files keep preprocess=False. Gradio 6.31 checks a file payload before any handler whatever this
        # flag says (Blocks.preprocess_data): one carrying meta {"_type": "gradio.FileData"} must lie in its upload
        # folder (processing_utils._check_allowed), and ImageEditor's payloads must carry that meta. gr.Image's
        # payloads need no meta, and its own preprocess then opens any path a client names with PIL (a FIFO hangs
        # it) and turns an unreadable upload into a bare "Error". So Segmenter reads each file itself: only from
        # the upload folder, only regular files, at most MAX_UPLOAD_BYTES (`read_upload`), and checks the other
        # inputs as they come.
        run.click(on_segment, inputs, outputs, preprocess=False, api_name="segment")
        geometry.change(on_geometry, inputs, outputs, preprocess=False, api_visibility="private")
        threshold_slider.input(
            on_threshold, [session, threshold_slider], outputs, api_name="rethreshold", trigger_mode="always_last"
        )
    return page


def launch(page, port: int, share: bool = False) -> tuple[str, str | None]:
    """Serve `page` on 127.0.0.1:`port` (plus a public link with `share`) in a background thread; returns the
    local URL and the public one. `page.block_thread()` waits; `page.close()` stops the server."""
    _, local_url, share_url = page.queue(default_concurrency_limit=1, max_size=MAX_QUEUE).launch(
        server_name="127.0.0.1",
        server_port=port,
        share=share,
        prevent_thread_lock=True,
        max_file_size=MAX_UPLOAD_BYTES,
        ssr_mode=False,
        footer_links=[],
        quiet=True,
    )
    return local_url, share_url


# ---------------------------------------------------------------------------------------------------- CLI


def resolve_model(model: str | None, checkpoint: str | None = None, demo: Path = DEMO_MODEL) -> str | None:
    """--model as given (plus --checkpoint, a model inside it); without --model `checkpoints/demo` when it holds a
    model, else None."""
    if not model and not (demo / "config.json").is_file():
        return None
    source = model or str(demo)
    return str(Path(source) / checkpoint) if checkpoint else source


def load_model(source: str, backbone: str | None) -> CLIPSeg:
    """`CLIPSeg.from_pretrained`; OSError/ValueError name the source."""
    return CLIPSeg.from_pretrained(source, backbone=backbone)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A local web page to segment images by text or image prompts. Open the printed URL.",
        epilog="Without --model the app uses checkpoints/demo (make demo) when present; otherwise the page says how "
        "to get a model. Nothing is fetched from the network unless --model is a hub id or --share is given.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="HF hub id (e.g. CIDAS/clipseg-rd64-refined; needs network once), checkpoint directory (e.g. "
        f"checkpoints/<name>) or original .pth decoder; default {DEMO_MODEL} when present",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a model inside the --model directory, e.g. best or iter_005000 of a train.py run",
    )
    parser.add_argument(
        "--backbone", default=None, help="CLIP backbone for an original .pth (default openai/clip-vit-base-patch16)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device, e.g. cpu, cuda:0 (default cuda when available, else cpu)",
    )
    parser.add_argument("--port", type=int, default=7860, help="local port (default 7860)")
    parser.add_argument(
        "--share",
        action="store_true",
        help="also serve through a public gradio.live link (needs network; anyone with the link can use the page)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"initial threshold of the slider (default {DEFAULT_THRESHOLD}, the paper's)",
    )
    parser.add_argument(
        "--session-memory",
        type=float,
        default=SESSION_MEMORY_MB,
        metavar="MB",
        help=f"what all open pages' results may hold together; the least recently used are dropped first (default "
        f"{SESSION_MEMORY_MB}, at least 64: one page holds up to about 50 MB at 352 px)",
    )
    parser.add_argument(
        "--idle-minutes",
        type=float,
        default=IDLE_MINUTES,
        help=f"a page's image and result are dropped after this long unused (default {IDLE_MINUTES})",
    )
    add_precision_arguments(parser)
    args = parser.parse_args(argv)
    try:  # the precision that will run: --precision, else the fastest that keeps fp32's masks (clipseg/precision.py)
        args.precision = resolve_precision(args.precision, args.device, args.amp)
    except ValueError as err:
        parser.error(str(err))
    if not 0 <= args.threshold < 1:
        parser.error(f"--threshold must be in [0, 1), got {args.threshold}")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if not 64 <= args.session_memory < math.inf:
        parser.error(f"--session-memory must be at least 64 (MB), got {args.session_memory}")
    if not 0 < args.idle_minutes < math.inf:
        parser.error(f"--idle-minutes must be positive, got {args.idle_minutes}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 after the server stops, 2 when Gradio is missing, the model cannot be loaded or the port is
    taken."""
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: app.py needs Gradio: pip install -r requirements-app.txt (or run make app)", file=sys.stderr)
        return 2
    source = resolve_model(args.model, args.checkpoint)
    model, notice = None, None
    if source is None:
        notice = NO_MODEL_HELP
        print(f"note: {NO_MODEL_HELP}", file=sys.stderr)
    else:
        try:
            model = load_model(source, args.backbone)
        except (OSError, ValueError) as err:
            print(f"error: cannot load --model {source}: {err}", file=sys.stderr)
            return 2
    segmenter = Segmenter(
        model,
        source or "none",
        args.device,
        args.precision,
        memory_mb=args.session_memory,
        idle_minutes=args.idle_minutes,
    )
    page = build_page(segmenter, args.threshold, notice)
    try:
        local_url, share_url = launch(page, args.port, args.share)
        print(f"serving {source or 'no model'} on {local_url}" + (f" and {share_url}" if share_url else ""))
        print("open it in a browser; Ctrl+C stops the server", flush=True)
        page.block_thread()
    except OSError as err:
        print(f"error: cannot serve on port {args.port} ({err}); pick another with --port", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(segmenter.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
