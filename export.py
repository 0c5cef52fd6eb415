"""Export a CLIPSeg model to ONNX: four graphs and a manifest, checked against PyTorch before they are kept.

    python export.py --model CIDAS/clipseg-rd64-refined --out exported/   # --model as every command takes it
    python export.py CIDAS/clipseg-rd64-refined exported/                 # the same, the older positional form
    python export.py --model demo --checkpoint best --out exported_demo/  # a run of train.py
    python predict.py photo.jpg --prompt "a cat" --backend onnx --model exported/

Graphs (all fp32, opset 20, every size that can vary is dynamic):
- image_encoder.onnx: pixel_values (B, 3, H, W), ImageNet-normalised, H and W multiples of 16 -> one activation
  (B, 1 + H/16 * W/16, width) per extracted block, named activation_<block>. CLIP's position embeddings are
  resized (bicubic) to the patch grid inside the graph, so any H and W work.
- text_encoder.onnx: input_ids, attention_mask (K, L) int64 (CLIP BPE ids, end-of-text padding, L <= 77) ->
  text_embedding (K, 512).
- decoder.onnx: grid (2,) int64 = (H/16, W/16), conditional (K, 512) and one image's activations (batch 1) ->
  logits (K, 1, H, W): K prompts against one image.
- image_prompt_head.onnx: hidden_states (K, T, width), the deepest extracted activation of a prompt image ->
  image_embedding (K, 512): the rest of the vision tower, its final layer norm and projection.

manifest.json lists the files with their SHA-256 (the ONNX backend refuses a graph that does not match), the opset,
each graph's input and output names and shapes, the model config, the extracted blocks, the image size, the
normalisation, the torch/onnx/onnxruntime versions and the differences to PyTorch measured at export (absolute, and
relative to the values' scale; above 1e-4 relative the export is refused). The output folder is checked to be
writable, with room for the graphs, before the export starts. Needs `pip install -r requirements-export.txt`
(onnx, onnxscript for torch's exporter, onnxruntime for the check and for running).

Exit status: 0 exported; 2 bad flags, a model that cannot be loaded, an output folder that cannot be written or has
too little room, the ONNX packages missing; 1 the export ran but could not be kept (graphs that disagree with
PyTorch, a write that failed).
"""

from __future__ import annotations

import argparse
import sys

from clipseg.cli import BAD_INPUT, NOTHING_DONE, add_model_flags, model_source, output_folder
from clipseg.loading import LoadError, load_model
from clipseg.onnx.backend import GRAPH_FILES, MANIFEST_NAME, OnnxBackendError
from clipseg.onnx.export import export
from clipseg.outputs import UnwritableOutput, check_writable

DEFAULT_OUT = "exported"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "positional",
        nargs="*",
        metavar="MODEL OUT_DIR",
        help="the older form of --model MODEL --out OUT_DIR: both, or neither",
    )
    parser.add_argument(
        "--out",
        type=output_folder,
        default=None,
        metavar="DIR",
        help=f"folder to write the graphs and manifest.json into (default {DEFAULT_OUT})",
    )
    add_model_flags(parser)
    args = parser.parse_args(argv)
    if args.positional:
        if len(args.positional) != 2:
            parser.error(f"give MODEL and OUT_DIR together, or --model and --out; got {args.positional}")
        if args.model is not None or args.out is not None:
            parser.error("give the model and the folder once: as MODEL OUT_DIR, or as --model and --out")
        args.model, args.out = args.positional
    args.out = args.out or DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> int:
    """The CLI: returns the exit status of the module docstring."""
    args = parse_args(argv)
    try:
        check_writable(args.out, folder=True)  # before the model is loaded
    except UnwritableOutput as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    try:
        source, _ = model_source(args)
        model = load_model(source, args.backbone, "cpu")
    except LoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    print(f"exporting {source} to {args.out} (a minute or two at ViT-B/16) ...", file=sys.stderr)
    try:
        manifest = export(model, args.out, source=source)
    except (OnnxBackendError, UnwritableOutput) as err:  # the packages or the room for the graphs: before any work
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    except (RuntimeError, OSError) as err:  # graphs that disagree with PyTorch, a write that failed
        print(f"error: {err}", file=sys.stderr)
        return NOTHING_DONE
    worst = max(check["absolute"] for check in manifest["difference_to_torch"].values())
    relative = max(check["relative"] for check in manifest["difference_to_torch"].values())
    files = ", ".join(GRAPH_FILES.values())
    print(
        f"wrote {files} and {MANIFEST_NAME} to {args.out}; largest difference to PyTorch {worst:.1e} "
        f"({relative:.1e} of the values' scale)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
