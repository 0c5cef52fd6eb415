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

The logic lives in `Segmenter` (inputs in, images, files and messages out; no Gradio); `build_page` lays the page
out on top of it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no telemetry, no version check

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from model import CLIPSeg
from outputs import safe_name
from precision import add_precision_arguments, resolve_precision
from predict import Predictor, Prompt, build_prompts, draw_overlay, prompt_summary
from preprocess import UnreadableImage, open_rgb, read_mask

DEMO_MODEL = Path("checkpoints") / "demo"
DEFAULT_THRESHOLD = 0.3
MAX_PROMPTS = 20
DISPLAY_MAX_SIDE = 1024  # previews (overlay, heatmaps) are at most this large; downloads keep the original size
MAX_UPLOAD = "100mb"
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
_MAGMA = np.round(colormaps["magma"](np.arange(256))[:, :3] * 255).astype(np.uint8)  # (256, 3) colour table


class InputError(ValueError):
    """Input the page cannot use; its message is shown in the page as it is."""


# ------------------------------------------------------------------------------------------------ inputs


def parse_prompts(text: str | None) -> list[str]:
    """Prompts typed one per line and/or comma-separated -> stripped, non-empty, first occurrence kept."""
    pieces = (piece.strip() for line in (text or "").splitlines() for piece in line.split(","))
    return list(dict.fromkeys(piece for piece in pieces if piece))


def payload_file(payload: Any, what: str) -> tuple[bytes, str] | None:
    """A Gradio file payload (a dict with `path` or a data: `url`, as events with `preprocess=False` receive it,
    a path, or None) -> (file bytes, original file name), or None when nothing was given."""
    if payload is None:
        return None
    if isinstance(payload, str | os.PathLike):
        path, name, url = str(payload), Path(payload).name, None
    else:
        path, name, url = payload.get("path"), payload.get("orig_name"), payload.get("url")
    if path:
        try:
            return Path(path).read_bytes(), name or Path(path).name
        except OSError as err:
            raise InputError(f"{what}: the uploaded file cannot be read ({err.strerror}); upload it again") from err
    if url and url.startswith("data:") and "," in url:
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True), name or "pasted image"
        except (binascii.Error, ValueError) as err:
            raise InputError(f"{what}: the pasted data is not valid base64 ({err})") from err
    return None


def read_rgb(data: bytes, name: str, what: str) -> Image.Image:
    """Image file bytes -> upright RGB (`preprocess.open_rgb`: EXIF rotation, alpha on black, size limit)."""
    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix) as file:
        file.write(data)
        file.flush()
        try:
            return open_rgb(file.name)
        except UnreadableImage as err:
            fix = "Downscale it" if err.reason.startswith("too large") else "Upload a JPEG, PNG or WebP image"
            raise InputError(f"{what} {name!r} cannot be used: {err.reason}. {fix}.") from err


def painted_mask(layers: Sequence[Any], size: tuple[int, int]) -> np.ndarray | None:
    """The object painted on a support image: (H, W) bool, True where any editor layer is not transparent.

    layers: Gradio ImageEditor layer payloads (RGBA images); size: (W, H) of the support image (layers of
    another size, e.g. a scaled canvas, are resized nearest). None when no layer was given."""
    mask = None
    for layer in layers or ():
        found = payload_file(layer, "painted mask")
        if found is None:
            continue
        try:
            with Image.open(io.BytesIO(found[0])) as image:
                alpha = np.asarray(image.getchannel("A") if "A" in image.getbands() else image.convert("L")) > 0
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"The painted mask cannot be read ({err}); paint it again") from err
        if alpha.shape != (size[1], size[0]):
            alpha = np.asarray(Image.fromarray(alpha).resize(size, Image.NEAREST))
        mask = alpha if mask is None else mask | alpha
    return mask


# ----------------------------------------------------------------------------------------------- outputs


def heatmap(probs: np.ndarray) -> Image.Image:
    """(H, W) probabilities in [0, 1] -> RGB image in the magma colour map (black = 0, pale yellow = 1)."""
    return Image.fromarray(_MAGMA[np.round(np.clip(probs, 0, 1) * 255).astype(np.uint8)])


def display_size(width: int, height: int, limit: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(W, H) of a preview: the image's size scaled so that its long side is at most `limit`."""
    scale = min(1.0, limit / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, H, W) float32 -> (K, h, w) bilinearly resized to `size` = (w, h)."""
    if probs.shape[2:0:-1] == size:
        return probs
    return np.stack([np.asarray(Image.fromarray(p, mode="F").resize(size, Image.BILINEAR)) for p in probs])


def mask_png(mask: np.ndarray) -> bytes:
    """(H, W) bool -> 8-bit grayscale PNG bytes, 0/255 (predict.py's mask format)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


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
    """An image encoded for one geometry: `key` = SHA-1 of the file's bytes + the geometry."""

    key: str
    name: str
    image: Image.Image  # the original, upright RGB
    predictor: Predictor  # its image set


@dataclass
class Result:
    """A session's last segmentation: all a threshold change needs. probs: (K, H0, W0); previews: (K, h, w)."""

    encoded: Encoded
    prompts: list[Prompt]
    probs: np.ndarray
    preview_image: Image.Image
    preview_probs: np.ndarray
    timings: dict[str, str]


@dataclass
class Session:
    """Per browser session: the encoded image, the last image-prompt embedding and the last result."""

    encoded: Encoded | None = None
    support: tuple[str, torch.Tensor] | None = None  # (key, (1, 512) embedding)
    result: Result | None = None
    zip_dir: Path | None = None


# ------------------------------------------------------------------------------------------------ logic


class Segmenter:
    """The page's logic without Gradio: `segment` (image + prompts -> Output) and `rethreshold`.

    model: a loaded CLIPSeg, or None (every call then answers with `no_model_message`). Predictions follow
    predict.py: native aspect (short side = the model's size) or square, maps at the original size, mask =
    probability > threshold. Calls are serialised by a lock; several sessions share the model."""

    def __init__(
        self,
        model: CLIPSeg | None,
        model_name: str,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        workdir: str | os.PathLike | None = None,
        no_model_message: str = NO_MODEL_HELP,
    ):
        self.model, self.model_name, self.precision = model, model_name, precision
        if model is not None:
            model.eval()
            if device is not None:
                model.to(device)
        self.image_size = model.config.image_size if model is not None else 352
        self.square_label = f"square {self.image_size}"
        self.no_model_message = no_model_message
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="clipseg-app-"))
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
        try:
            with self._lock:
                return session, self._segment(session, image, prompts_text, support, support_mask, threshold, geometry)
        except InputError as err:
            session.result = None
            return session, Output(f"**Error:** {err}")
        except Exception as err:  # a bug: the page says so briefly, the terminal gets the traceback
            traceback.print_exc()
            session.result = None
            return session, Output(f"**Error:** segmentation failed ({type(err).__name__}: {err}); see the terminal")

    def rethreshold(self, session: Session | None, threshold: float) -> tuple[Session, Output]:
        """Re-threshold the session's last result (no model call)."""
        session = session or Session()
        if session.result is None:
            return session, Output("Segment an image first; a new threshold then applies at once.")
        if not 0 <= threshold < 1:
            return session, Output(f"**Error:** the threshold must be in [0, 1), got {threshold}.")
        with self._lock:
            started = time.perf_counter()
            output = self._render(session, session.result, threshold)
            timings = {"threshold + draw": format_seconds(time.perf_counter() - started), "model": "not run"}
            output.message = self._status(session.result, timings, f"Re-thresholded at {threshold:.2f}:")
        return session, output

    @staticmethod
    def forget(session: Session | None) -> None:
        """Delete what a session left on disk (its last zip)."""
        if session is not None and session.zip_dir is not None:
            shutil.rmtree(session.zip_dir, ignore_errors=True)

    # -- steps --------------------------------------------------------------------------------------

    def _segment(self, session, image, prompts_text, support, support_mask, threshold, geometry) -> Output:
        if self.model is None:
            raise InputError(self.no_model_message)
        phrases = parse_prompts(prompts_text)
        image_prompt = self._image_prompt(support, support_mask)
        count = len(phrases) + (image_prompt is not None)
        if count == 0:
            raise InputError("Enter at least one text prompt (one per line or comma-separated) or an image prompt.")
        if count > MAX_PROMPTS:
            raise InputError(f"{count} prompts given; at most {MAX_PROMPTS} at once: split them over several runs.")
        found = payload_file(image, "The image")
        if found is None:
            raise InputError("Upload, paste or photograph an image first (or pick an example below).")
        if not 0 <= threshold < 1:
            raise InputError(f"The threshold must be in [0, 1), got {threshold}.")
        timings: dict[str, str] = {}
        encoded = self._encode(session, *found, square=geometry != NATIVE, timings=timings)
        started = time.perf_counter()
        predictor = encoded.predictor
        parts = [predictor.embed_prompts(phrases=phrases)] if phrases else []
        prompts = build_prompts(phrases, [])
        if image_prompt is not None:
            parts.append(self._support_embedding(session, predictor, image_prompt))
            prompts.append(image_prompt.prompt())
        conditional = torch.cat(parts)
        timings["embed prompts"] = format_seconds(time.perf_counter() - started)
        started = time.perf_counter()
        probs = predictor.predict(conditional=conditional)
        timings["decode"] = format_seconds(time.perf_counter() - started)
        preview = display_size(*encoded.image.size)
        preview_image = encoded.image if preview == encoded.image.size else encoded.image.resize(preview, Image.LANCZOS)
        session.result = Result(encoded, prompts, probs, preview_image, resize_probs(probs, preview), timings)
        started = time.perf_counter()
        output = self._render(session, session.result, threshold)
        timings["threshold + draw"] = format_seconds(time.perf_counter() - started)
        output.message = self._status(session.result, timings)
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
        session.encoded = Encoded(key, name, rgb, predictor)
        timings["read + encode image"] = format_seconds(time.perf_counter() - started)
        return session.encoded

    @staticmethod
    def _image_prompt(support: Any, support_mask: Any) -> ImagePrompt | None:
        """The image prompt from the support editor and the mask upload, or None when no support is given."""
        layers: list = []
        if isinstance(support, dict):  # an ImageEditor payload
            layers = support.get("layers") or []
            support = support.get("background")
        image, mask = payload_file(support, "The support image"), payload_file(support_mask, "The support mask")
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
            object_mask, mask_name = painted_mask(layers, rgb.size), "painted mask"
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
        previews = result.preview_probs > threshold
        overlay = draw_overlay(result.preview_image, list(previews), labels)
        heatmaps = [
            (heatmap(p), f"{label} (max {p.max():.2f}, {m.mean():.1%} above {threshold:.2f})")
            for p, m, label in zip(result.preview_probs, previews, labels)
        ]
        summary = self._summary(result, threshold)
        return Output("", overlay, heatmaps, self._write_zip(session, result, summary, threshold), summary)

    def _summary(self, result: Result, threshold: float) -> dict:
        """predict.py's summary.json for one image; files are names inside the zip."""
        encoded = result.encoded
        width, height = encoded.image.size
        entries = [
            prompt_summary(prompt, prob, prob > threshold, {"mask": f"{prompt.slug}.mask.png"})
            for prompt, prob in zip(result.prompts, result.probs)
        ]
        image_entry = {
            "image": encoded.name,
            "width": width,
            "height": height,
            "inference_size": list(encoded.predictor.input_size),
            "prompts": entries,
        }
        return {
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

    def _write_zip(self, session: Session, result: Result, summary: dict, threshold: float) -> str:
        """<image>-masks.zip: `<prompt>.mask.png` (0/255, original size) per prompt and summary.json. The
        session's previous zip is deleted (Gradio serves its own copy)."""
        if session.zip_dir is not None:
            shutil.rmtree(session.zip_dir, ignore_errors=True)
        session.zip_dir = Path(tempfile.mkdtemp(dir=self.workdir))
        stem = safe_name(Path(result.encoded.name).stem or "image")
        path = session.zip_dir / f"{stem}-masks.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for prompt, prob in zip(result.prompts, result.probs):
                archive.writestr(f"{prompt.slug}.mask.png", mask_png(prob > threshold))
            archive.writestr("summary.json", json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        return str(path)

    @staticmethod
    def _status(result: Result, timings: dict[str, str], what: str = "Segmented") -> str:
        """The status line: what was done to which image, and the time of each step."""
        encoded = result.encoded
        width, height = encoded.image.size
        model_width, model_height = encoded.predictor.input_size
        steps = " · ".join(f"{step} {value}" for step, value in timings.items())
        name = encoded.name.replace("`", "'")
        return (
            f"{what} `{name}` ({width}x{height}; the model sees {model_width}x{model_height}), "
            f"{len(result.prompts)} prompt(s). Times: {steps}."
        )


# ------------------------------------------------------------------------------------------------ the page


def build_page(segmenter: Segmenter, threshold: float = DEFAULT_THRESHOLD, notice: str | None = None):
    """The Gradio page over `segmenter` (a `gr.Blocks`, not launched). notice: Markdown shown at the top."""
    import gradio as gr

    def outputs_of(session: Session, output: Output) -> tuple:
        return session, output.message, output.overlay, output.heatmaps or None, output.zip_path, output.summary

    def on_segment(session, image, prompts, support, support_mask, threshold, geometry):
        return outputs_of(*segmenter.segment(session, image, prompts, support, support_mask, threshold, geometry))

    def on_threshold(session, threshold):
        return outputs_of(*segmenter.rethreshold(session, threshold))

    def on_geometry(session, image, prompts, support, support_mask, threshold, geometry):
        if session is None or session.result is None:  # nothing shown yet: nothing to redo
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
                status = gr.Markdown(elem_id="status")
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
                    summary = gr.JSON(show_label=False, elem_id="summary")
        examples = [[str(EXAMPLES_DIR / name), text] for name, text in EXAMPLES if (EXAMPLES_DIR / name).is_file()]
        if examples:
            gr.Examples(examples, inputs=[image, prompts], label="Examples")
        inputs = [session, image, prompts, support, support_mask, threshold_slider, geometry]
        outputs = [session, status, overlay, heatmaps, download, summary]
        # preprocess=False: the handlers get the uploaded files as they are and report unreadable ones themselves
        run.click(on_segment, inputs, outputs, preprocess=False)
        geometry.change(on_geometry, inputs, outputs, preprocess=False)
        threshold_slider.input(
            on_threshold, [session, threshold_slider], outputs, preprocess=False, trigger_mode="always_last"
        )
    return page


def launch(page, port: int, share: bool = False) -> tuple[str, str | None]:
    """Serve `page` on 127.0.0.1:`port` (plus a public link with `share`) in a background thread; returns the
    local URL and the public one. `page.block_thread()` waits; `page.close()` stops the server."""
    _, local_url, share_url = page.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1",
        server_port=port,
        share=share,
        prevent_thread_lock=True,
        max_file_size=MAX_UPLOAD,
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
    """`CLIPSeg.from_pretrained` with the text cache on; OSError/ValueError name the source."""
    model = CLIPSeg.from_pretrained(source, backbone=backbone)
    model.text_cache = {}
    return model


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
    add_precision_arguments(parser)
    args = parser.parse_args(argv)
    try:  # the precision that will run: --precision, else the fastest that keeps fp32's masks (precision.py)
        args.precision = resolve_precision(args.precision, args.device, args.amp)
    except ValueError as err:
        parser.error(str(err))
    if not 0 <= args.threshold < 1:
        parser.error(f"--threshold must be in [0, 1), got {args.threshold}")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
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
    segmenter = Segmenter(model, source or "none", args.device, args.precision)
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
