"""Export a CLIPSeg model to ONNX: four graphs and a manifest, checked against PyTorch before they are kept.

    python export.py --model CIDAS/clipseg-rd64-refined --out exported/   # --model as every command takes it
    python export.py CIDAS/clipseg-rd64-refined exported/                 # the same, the older positional form
    python export.py --model demo --checkpoint best --out exported_demo/  # a run of train.py
    python predict.py photo.jpg --prompt "a cat" --backend onnx --model exported/
    python export.py --model CIDAS/clipseg-rd64-refined --out exported_ov/ --openvino --precision int8
    python predict.py photo.jpg --prompt "a cat" --backend openvino --model exported_ov/

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

--openvino writes the same four graphs as OpenVINO IR (<graph>.xml + .bin) in --precision fp32, bf16 (CPUs with
native bf16) or int8 (the image encoder quantised by NNCF, calibrated on --calibration images, default the shipped
examples/), after an accuracy check against PyTorch fp32: the masks (probability > 0.3) on the calibration images
against a few phrases must agree on at least --bar of the pixels (default 99.5%), else nothing is written. Its
manifest.json records the check; the OpenVINO backend refuses a folder whose check failed or whose files changed
(clipseg/onnx/openvino_export.py). Needs `pip install -r requirements-openvino.txt`.

Exit status: 0 exported; 2 bad flags, a model that cannot be loaded, an output folder that cannot be written or has
too little room, calibration images that cannot be read, the ONNX or OpenVINO packages missing; 1 the export ran but
could not be kept (graphs that disagree with PyTorch, an OpenVINO export below --bar, a write that failed).
"""

from __future__ import annotations

import argparse
import sys

from clipseg.cli import BAD_INPUT, NOTHING_DONE, add_model_flags, model_source, output_folder, probability
from clipseg.images import UnreadableImage
from clipseg.loading import LoadError, load_model
from clipseg.onnx.backend import GRAPH_FILES, MANIFEST_NAME, OnnxBackendError
from clipseg.onnx.export import export
from clipseg.onnx.openvino_backend import OpenVinoBackendError
from clipseg.onnx.openvino_export import AccuracyCheckFailed, export_openvino, image_files
from clipseg.outputs import UnwritableOutput, check_writable
from clipseg.precision import MASK_AGREEMENT_BAR, PRECISIONS
from model import CLIPSeg

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
    parser.add_argument("--openvino", action="store_true", help="write OpenVINO IR instead of ONNX (see above)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="--openvino: fp32 (default), bf16, int8"
    )
    parser.add_argument(
        "--calibration",
        action="append",
        default=None,
        metavar="IMAGE_OR_DIR",
        help="--openvino: images (files, or folders of .jpg/.jpeg/.png) to calibrate int8 on and to check the export "
        "with; repeat for several (default: examples/*.jpg)",
    )
    parser.add_argument(
        "--bar",
        type=probability,
        default=MASK_AGREEMENT_BAR,
        help="--openvino: the share of mask pixels that must agree with PyTorch fp32 (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.openvino and (args.precision != "fp32" or args.calibration):
        parser.error("--precision and --calibration are for --openvino; the ONNX graphs are fp32")
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
    if args.openvino:
        return write_openvino(model, source, args)
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


def write_openvino(model: CLIPSeg, source: str, args: argparse.Namespace) -> int:
    """export.py --openvino: 0 when written, 1 when the accuracy check failed, 2 for what cannot be used."""
    print(f"exporting {source} to {args.out} as OpenVINO {args.precision} (minutes at ViT-B/16) ...", file=sys.stderr)
    try:
        calibration = image_files(args.calibration) if args.calibration else None
        manifest = export_openvino(
            model, args.out, args.precision, calibration_images=calibration, bar=args.bar, source=source
        )
    except (OpenVinoBackendError, OnnxBackendError, UnreadableImage, UnwritableOutput) as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    except (AccuracyCheckFailed, OSError) as err:  # below the bar, a write that failed
        print(f"error: {err}", file=sys.stderr)
        return NOTHING_DONE
    check = manifest["accuracy_check"]
    print(
        f"wrote {args.precision} OpenVINO graphs and {MANIFEST_NAME} to {args.out}; masks agree with PyTorch fp32 "
        f"on {100 * check['mask_agreement']:.2f}% of pixels (bar {100 * check['bar']:.2f}%, "
        f"{len(check['images'])} images x {len(check['phrases'])} phrases)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
