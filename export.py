"""Export a CLIPSeg model to ONNX: four graphs and a manifest, checked against PyTorch before they are kept.

    python export.py CIDAS/clipseg-rd64-refined exported/      # MODEL as predict.py takes it
    python predict.py photo.jpg --prompt "a cat" --backend onnx --model exported/
    python export.py CIDAS/clipseg-rd64-refined exported_ov/ --openvino --precision int8 --calibration photos/
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
against a few phrases must agree on at least --bar of the pixels (default 99.5%), else nothing is written and the
exit status is 1. Its manifest.json records the check; the OpenVINO backend refuses a folder whose check failed or
whose files changed (clipseg/onnx/openvino_export.py). Needs `pip install -r requirements-openvino.txt`.
"""

from __future__ import annotations

import argparse
import sys

from clipseg.images import UnreadableImage
from clipseg.onnx.backend import GRAPH_FILES, MANIFEST_NAME, OnnxBackendError
from clipseg.onnx.export import export
from clipseg.onnx.openvino_backend import PRECISIONS, OpenVinoBackendError
from clipseg.onnx.openvino_export import AGREEMENT_BAR, AccuracyCheckFailed, export_openvino, image_files
from clipseg.outputs import UnwritableOutput, check_writable
from model import CLIPSeg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="HF hub id or checkpoint directory, or an original .pth decoder (as predict.py)")
    parser.add_argument("out_dir", help="folder to write the graphs and manifest.json into")
    parser.add_argument(
        "--backbone", default=None, help="CLIP backbone for an original .pth (default openai/clip-vit-base-patch16)"
    )
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
        type=float,
        default=AGREEMENT_BAR,
        help="--openvino: the share of mask pixels that must agree with PyTorch fp32 (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.openvino and (args.precision != "fp32" or args.calibration):
        parser.error("--precision and --calibration are for --openvino; the ONNX graphs are fp32")
    if not 0 <= args.bar <= 1:
        parser.error(f"--bar must be a share of pixels in [0, 1], got {args.bar}")
    try:
        check_writable(args.out_dir, folder=True)  # before the model is loaded
    except UnwritableOutput as err:
        parser.error(str(err))
    try:
        model = CLIPSeg.from_pretrained(args.model, backbone=args.backbone)
    except (OSError, ValueError) as err:
        print(f"error: cannot load {args.model}: {err}", file=sys.stderr)
        return 2
    if args.openvino:
        return write_openvino(model, args)
    print(f"exporting {args.model} to {args.out_dir} (a minute or two at ViT-B/16) ...", file=sys.stderr)
    try:
        manifest = export(model, args.out_dir, source=args.model)
    except (OnnxBackendError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    worst = max(check["absolute"] for check in manifest["difference_to_torch"].values())
    relative = max(check["relative"] for check in manifest["difference_to_torch"].values())
    files = ", ".join(GRAPH_FILES.values())
    print(
        f"wrote {files} and {MANIFEST_NAME} to {args.out_dir}; largest difference to PyTorch {worst:.1e} "
        f"({relative:.1e} of the values' scale)"
    )
    return 0


def write_openvino(model, args: argparse.Namespace) -> int:
    """export.py --openvino: 0 when written, 1 when the accuracy check failed, 2 for what cannot be used."""
    print(
        f"exporting {args.model} to {args.out_dir} as OpenVINO {args.precision} (minutes at ViT-B/16) ...",
        file=sys.stderr,
    )
    try:
        calibration = image_files(args.calibration) if args.calibration else None
        manifest = export_openvino(
            model, args.out_dir, args.precision, calibration_images=calibration, bar=args.bar, source=args.model
        )
    except (OpenVinoBackendError, OnnxBackendError, UnreadableImage, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except AccuracyCheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    check = manifest["accuracy_check"]
    print(
        f"wrote {args.precision} OpenVINO graphs and {MANIFEST_NAME} to {args.out_dir}; masks agree with PyTorch fp32 "
        f"on {100 * check['mask_agreement']:.2f}% of pixels (bar {100 * check['bar']:.2f}%, "
        f"{len(check['images'])} images x {len(check['phrases'])} phrases)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
