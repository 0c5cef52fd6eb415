"""Export a CLIPSeg model to ONNX: four graphs and a manifest, checked against PyTorch before they are kept.

    python export.py CIDAS/clipseg-rd64-refined exported/      # MODEL as predict.py takes it
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
"""

from __future__ import annotations

import argparse
import sys

from clipseg.onnx.backend import GRAPH_FILES, MANIFEST_NAME, OnnxBackendError
from clipseg.onnx.export import export
from clipseg.outputs import UnwritableOutput, check_writable
from model import CLIPSeg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="HF hub id or checkpoint directory, or an original .pth decoder (as predict.py)")
    parser.add_argument("out_dir", help="folder to write the graphs and manifest.json into")
    parser.add_argument(
        "--backbone", default=None, help="CLIP backbone for an original .pth (default openai/clip-vit-base-patch16)"
    )
    args = parser.parse_args(argv)
    try:
        check_writable(args.out_dir, folder=True)  # before the model is loaded
    except UnwritableOutput as err:
        parser.error(str(err))
    try:
        model = CLIPSeg.from_pretrained(args.model, backbone=args.backbone)
    except (OSError, ValueError) as err:
        print(f"error: cannot load {args.model}: {err}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
