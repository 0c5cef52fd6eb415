"""A local web page to segment images with text or image prompts (Gradio; `pip install -r requirements-app.txt`).

    python app.py --model demo                         # the run of `make demo` (checkpoints/demo; make app)
    python app.py                                      # the released weights, CIDAS/clipseg-rd64-refined (fetched
                                                       # from the HF hub once)
    python app.py --model myrun --checkpoint best --port 8000 --threshold 0.4
    python app.py --backend openvino --model exported_ov/  # a folder of export.py --openvino, in OpenVINO
    python app.py --model demo --sam-model ./sam-vit-base  # also offer refining the masks with SAM

Then open http://127.0.0.1:7860 (or your --port). Upload, paste or photograph an image, type prompts (one per line
or comma-separated), optionally add an image prompt (a support image with the object painted over or its mask
uploaded), and press Segment. The page shows an overlay (a colour and legend entry per prompt), a probability
heatmap per prompt, the time each step took, and offers a zip of the masks (a 0/255 PNG per prompt at the image's
original size) with the summary JSON that predict.py writes.

The image is encoded once per session: new prompts re-run only the text tower and the decoder, a new threshold
only re-thresholds. Nothing is fetched from the network unless --model or --sam-model names a hub id (the default
--model does) or --share asks for a public link; Gradio's analytics are off. The model runs in the fastest precision
that keeps fp32's masks on this class of CPU unless --precision asks for another (clipseg/precision.py).

The page's "Mask" accordion holds predict.py's mask steps; refining with SAM is offered when --sam-model names a SAM
model (a hub id or a directory, as predict.py's --sam-model), which is loaded and checked at start-up.

Exit status: 0 after the server stops; 2 for bad flags, a model or SAM model that cannot be loaded, Gradio missing or
a port that cannot be served.

What the server accepts and keeps: files only from Gradio's upload folder (regular files of at most 100 MB); at
most 20 prompts of at most 1,000 characters (`clipseg/uploads.py`); at most 64 waiting requests; per session the
image's features, a preview and the logits at the model's input size (full-size maps are made from them for each
zip: about 50 MB at most at 352 px); sessions idle for --idle-minutes, and the least recently used ones when all
hold more than --session-memory, are dropped, and their users are told so when they act again (`clipseg/sessions.py`).

The logic lives in `clipseg.segmenter.Segmenter` (inputs in, images, files and messages out; no Gradio); this
command lays the page out on top of it (`build_page`), serves it (`launch`) and reads its flags.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no telemetry, no version check


from clipseg.cli import (
    BAD_INPUT,
    add_backend_flag,
    add_device_flag,
    add_model_flags,
    add_precision_flags,
    add_sam_model_flag,
    below_one,
    check_backend_flags,
    load_command_model,
    load_sam_model,
)
from clipseg.loading import LoadError
from clipseg.mask_pipeline import REFINE_MODES
from clipseg.postprocess import SORT_KEYS
from clipseg.scenes import EXAMPLES_DIR
from clipseg.segmenter import (
    FORMATS,
    IDLE_MINUTES,
    NATIVE,
    SESSION_MEMORY_MB,
    Controls,
    Output,
    Segmenter,
    Session,
)
from clipseg.uploads import MAX_PROMPTS, MAX_UPLOAD_BYTES

if TYPE_CHECKING:
    import gradio as gr

MAX_QUEUE = 64  # requests waiting to run (one runs at a time); more are refused
EXAMPLES = (  # (image in examples/, prompts): scenes of `synthetic.make_synthetic_phrasecut`
    ("shapes_1.jpg", "purple square, green circle, red triangle"),
    ("shapes_2.jpg", "yellow circle, red square, blue triangle"),
    ("shapes_3.jpg", "blue square, green triangle, purple triangle"),
)


# ------------------------------------------------------------------------------------------------ the page


def build_page(segmenter: Segmenter, threshold: float | None = None) -> gr.Blocks:
    """The Gradio page over `segmenter` (a `gr.Blocks`, not launched), which from now on reads files only from
    Gradio's upload folder. API: `/segment` and `/rethreshold`. The threshold slider starts at `threshold`, else at
    the model's calibrated threshold, else the paper's 0.3 (`Segmenter.default_threshold`, said under the slider)."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    segmenter.upload_folders = (Path(os.path.realpath(get_upload_folder())),)
    on_segment, on_threshold, on_geometry = page_handlers(segmenter)
    with gr.Blocks(title="CLIPSeg", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            "# CLIPSeg: segment an image by text or image prompts\n"
            f"Model: `{segmenter.model_name}`. Masks are the pixels whose probability is above the threshold."
        )
        session = gr.State(delete_callback=segmenter.forget)  # called when a closed tab's state expires
        with gr.Row():
            with gr.Column():
                image, prompts, support, support_mask = prompt_widgets()
                threshold_slider, geometry = view_widgets(segmenter, threshold)
                with gr.Accordion("Mask: post-processing, refinement, tiles, formats", open=False):
                    mask_controls = mask_control_widgets(segmenter)
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                status, overlay, heatmaps, download, summary = output_widgets()
        examples = [[str(EXAMPLES_DIR / name), text] for name, text in EXAMPLES if (EXAMPLES_DIR / name).is_file()]
        if examples:
            gr.Examples(examples, inputs=[image, prompts], label="Examples")
        inputs = [session, image, prompts, support, support_mask, threshold_slider, geometry, *mask_controls]
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
            on_threshold,
            [session, threshold_slider, *mask_controls],
            outputs,
            api_name="rethreshold",
            trigger_mode="always_last",
        )
    return page


def page_handlers(segmenter: Segmenter) -> tuple[Callable, Callable, Callable]:
    """The page's event handlers over `segmenter`: segment, re-threshold, and redo on a change of geometry; each
    takes the page's inputs in order and returns its six outputs."""
    import gradio as gr

    def outputs_of(session: Session, output: Output) -> tuple:
        return session, output.message, output.overlay, output.heatmaps or None, output.zip_path, output.summary

    def controls_of(
        grow, shrink, feather, fill_holes, min_area, instances, max_instances, sort_by, refine, tile, formats
    ):
        """The page's mask controls as `Controls` (their order); max instances 0 keeps all."""
        return Controls(grow=grow, shrink=shrink, feather=feather, fill_holes=fill_holes, min_area=min_area,
                        instances=instances, sort_by=sort_by, max_instances=max_instances or None, refine=refine,
                        tile=tile, formats=tuple(formats or ()))  # fmt: skip

    def on_segment(session, image, prompts, support, support_mask, threshold, geometry, grow, shrink, feather,
                   fill_holes, min_area, instances, max_instances, sort_by, refine, tile, formats):  # fmt: skip
        controls = controls_of(grow, shrink, feather, fill_holes, min_area, instances, max_instances, sort_by,
                               refine, tile, formats)  # fmt: skip
        result = segmenter.segment(session, image, prompts, support, support_mask, threshold, geometry, controls)
        return outputs_of(*result)

    def on_threshold(session, threshold, grow, shrink, feather, fill_holes, min_area, instances, max_instances,
                     sort_by, refine, tile, formats):  # fmt: skip
        controls = controls_of(grow, shrink, feather, fill_holes, min_area, instances, max_instances, sort_by,
                               refine, tile, formats)  # fmt: skip
        return outputs_of(*segmenter.rethreshold(session, threshold, controls))

    def on_geometry(session, image, prompts, support, support_mask, threshold, geometry, *mask):
        if session is None or (session.result is None and session.dropped is None):  # nothing shown: nothing to redo
            return (gr.skip(),) * 6
        return on_segment(session, image, prompts, support, support_mask, threshold, geometry, *mask)

    return on_segment, on_threshold, on_geometry


def prompt_widgets() -> tuple:
    """The image and the prompts: the image, the text prompts, and the image prompt (a support image with its
    object painted, or its mask uploaded)."""
    import gradio as gr

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
    return image, prompts, support, support_mask


def view_widgets(segmenter: Segmenter, threshold: float | None) -> tuple:
    """The threshold slider (starting at `threshold`, else the model's default) and what the model sees."""
    import gradio as gr

    threshold_slider = gr.Slider(
        0,
        0.99,
        value=segmenter.default_threshold if threshold is None else threshold,
        step=0.01,
        label="Threshold",
        info=segmenter.threshold_note if threshold is None else "given with --threshold",
        elem_id="threshold",
    )
    geometry = gr.Radio(
        [NATIVE, segmenter.square_label],
        value=NATIVE,
        label="What the model sees",
        info=f"native aspect: short side {segmenter.image_size}, aspect kept; square: squashed as in the paper",
        elem_id="geometry",
    )
    return threshold_slider, geometry


def mask_control_widgets(segmenter: Segmenter) -> list:
    """The mask controls, in `controls_of`'s order: grow, shrink, feather, fill holes, minimum area, instances,
    keep at most, sort by, refine, tiles, the zip's formats."""
    import gradio as gr

    mask_controls = [
        gr.Slider(0, 64, value=0, step=1, label="Grow (px)", elem_id="grow"),
        gr.Slider(0, 64, value=0, step=1, label="Shrink (px, before growing)", elem_id="shrink"),
        gr.Slider(0, 64, value=0, step=1, label="Feather (px, the soft mask's edge)", elem_id="feather"),
        gr.Checkbox(label="Fill holes", elem_id="fill-holes"),
        gr.Number(0, minimum=0, precision=0, label="Minimum area (px)", elem_id="min-area"),
        gr.Checkbox(label="Instances (connected components)", elem_id="instances"),
        gr.Number(0, minimum=0, precision=0, label="Keep at most (0 = all)", elem_id="max-instances"),
        gr.Radio(list(SORT_KEYS), value=SORT_KEYS[0], label="Instances by", elem_id="sort-by"),
        gr.Radio(
            [mode for mode in REFINE_MODES if mode != "sam" or segmenter.sam is not None],
            value="none",
            label="Refine the edges",
            info="guided: the mask's edge moved onto the image's edges; "
            + ("sam: SAM prompted per component" if segmenter.sam else "sam needs --sam-model"),
            elem_id="refine",
        ),
        gr.Checkbox(label="Tiles (large images, small objects)", elem_id="tile"),
        gr.CheckboxGroup(list(FORMATS), value=["mask"], label="In the zip", elem_id="formats"),
    ]
    return mask_controls


def output_widgets() -> tuple:
    """The status line, the overlay, the heat maps, the zip and the summary."""
    import gradio as gr

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
    return status, overlay, heatmaps, download, summary


def launch(page: gr.Blocks, port: int, share: bool = False) -> tuple[str, str | None]:
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A local web page to segment images by text or image prompts. Open the printed URL.",
        epilog="Nothing is fetched from the network unless --model or --sam-model is a hub id (the default --model is) "
        "or --share is given; "
        "offline, give --model a run (make demo trains the run demo), a directory or a .pth.",
    )
    add_model_flags(parser)
    add_device_flag(parser)
    parser.add_argument("--port", type=int, default=7860, help="local port (default 7860)")
    parser.add_argument(
        "--share",
        action="store_true",
        help="also serve through a public gradio.live link (needs network; anyone with the link can use the page)",
    )
    parser.add_argument(
        "--threshold",
        type=below_one,
        default=None,
        help="initial threshold of the slider (default: the threshold train.py calibrated for the model, else 0.3, "
        "the paper's)",
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
    add_sam_model_flag(parser, "without it the page does not offer sam")
    add_precision_flags(parser, "predict")
    add_backend_flag(parser, auto=True)
    args = parser.parse_args(argv)
    check_backend_flags(parser, args, "predict")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if not 64 <= args.session_memory < math.inf:
        parser.error(f"--session-memory must be at least 64 (MB), got {args.session_memory}")
    if not 0 < args.idle_minutes < math.inf:
        parser.error(f"--idle-minutes must be positive, got {args.idle_minutes}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 after the server stops, 2 when Gradio is missing, the model or the SAM model cannot be loaded or
    the port is taken."""
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: app.py needs Gradio: pip install -r requirements-app.txt (or run make app)", file=sys.stderr)
        return BAD_INPUT
    try:
        model, source = load_command_model(args)
        sam = load_sam_model(args)
    except LoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    segmenter = Segmenter(
        model, source, args.device, args.precision, memory_mb=args.session_memory, idle_minutes=args.idle_minutes,
        sam=sam,
    )  # fmt: skip
    page = build_page(segmenter, args.threshold)
    try:
        local_url, share_url = launch(page, args.port, args.share)
        print(f"serving {source} on {local_url}" + (f" and {share_url}" if share_url else ""))
        print("open it in a browser; Ctrl+C stops the server", flush=True)
        page.block_thread()
    except OSError as err:
        print(f"error: cannot serve on port {args.port} ({err}); pick another with --port", file=sys.stderr)
        return BAD_INPUT
    finally:
        shutil.rmtree(segmenter.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
