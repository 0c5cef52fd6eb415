"""Export a CLIPSeg model to ONNX and check it: the graph modules, their export with dynamic sizes, the comparison
with PyTorch and the manifest that `clipseg.onnx.backend` checks before it runs the graphs. export.py is its
command line (and describes the files it writes).

    manifest = export(model, "exported/", source="CIDAS/clipseg-rd64-refined")  # graphs, checked, then manifest
    manifest["difference_to_torch"]    # {check: {"absolute", "relative"}}, each relative one <= VERIFY_TOLERANCE

Four graphs (`GRAPH_FILES`), fp32 at opset OPSET; their tensor shapes are in the graph modules' docstrings:
`ImageEncoderGraph` (pixels -> one activation per extracted block), `TextEncoderGraph` (token ids -> (K, 512)),
`DecoderGraph` (K prompts against one image's activations -> (K, 1, H, W) logits) and `ImagePromptHeadGraph` (the
deepest activation of K prompt images -> (K, 512)). Image sides are any multiple of the patch up to MAX_GRID
patches; batch and prompt counts up to 1024.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipseg.config import MAX_IMAGE_SIDE, PATCH_SIZE
from clipseg.frozen_clip import run_clip_block
from clipseg.onnx.backend import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    GRAPH_INPUTS,
    REQUIREMENTS_FILE,
    ExportedCLIPSeg,
    OnnxBackendError,
    OnnxCLIPSeg,
    graph_sha256,
    import_onnxruntime,
    install_export,
    staged_export,
)
from clipseg.outputs import check_writable
from clipseg.tokenizer import CONTEXT_LENGTH
from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD
from model import CLIPSeg, ImageFeatures

OPSET = 20
MAX_GRID = MAX_IMAGE_SIDE // PATCH_SIZE  # the largest patch grid side the graphs accept: 256 (4096 px)
VERIFY_TOLERANCE = 1e-4  # largest difference to PyTorch an export may have, relative to the largest |value|


# ------------------------------------------------------------------------------------------ graph modules


class ImageEncoderGraph(nn.Module):
    """pixel_values (B, 3, H, W) -> the activations of the extracted blocks, each (B, 1 + h*w, width)."""

    def __init__(self, model: CLIPSeg):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model.encode_image(pixel_values).activations)


class TextEncoderGraph(nn.Module):
    """input_ids, attention_mask (K, L) -> (K, 512) text embeddings."""

    def __init__(self, model: CLIPSeg):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.embed_token_ids(input_ids, attention_mask)


class DecoderGraph(nn.Module):
    """grid (2,) int64, conditional (K, 512), activations (1, 1 + h*w, width) each -> (K, 1, 16h, 16w) logits."""

    def __init__(self, model: CLIPSeg):
        super().__init__()
        self.model = model

    def forward(self, grid: Tensor, conditional: Tensor, *activations: Tensor) -> Tensor:
        height, width = grid.tolist()
        torch._check(height >= 1)
        torch._check(width >= 1)
        torch._check(height * width + 1 == activations[0].shape[1])
        return self.model.decode(ImageFeatures(list(activations), (height, width)), conditional)


class ImagePromptHeadGraph(nn.Module):
    """hidden_states (K, T, width) after block max(extract_layers) -> (K, 512): the remaining vision blocks, the
    final layer norm of the CLS token and the visual projection (what `CLIPSeg.embed_images` does after them)."""

    def __init__(self, model: CLIPSeg):
        super().__init__()
        self.model = model

    def forward(self, hidden_states: Tensor) -> Tensor:
        vision = self.model.clip.vision_model
        for layer in vision.encoder.layers[max(self.model.config.extract_layers) + 1 :]:
            hidden_states = run_clip_block(layer, hidden_states)
        return self.model.clip.visual_projection(vision.post_layernorm(hidden_states[:, 0]))


# ------------------------------------------------------------------------------------------------- export


def example_grids(model: CLIPSeg) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two patch grids, neither CLIP's own (so the export keeps the position-embedding resize dynamic): the
    export example and a second shape to check the graphs on."""
    side = model.config.clip.vision_config.image_size // PATCH_SIZE
    return (side + 1, side + 2), (side + 3, side - 1)


def export_graph(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: dict[str, Any],
) -> None:
    """torch.onnx.export with torch.export (dynamo) at OPSET, weights inside the file, the exporter's chatter off."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _dim(name: str, low: int, high: int):
    return torch.export.Dim(name, min=low, max=high)


def activation_names(model: CLIPSeg) -> list[str]:
    """The image encoder's outputs and the decoder's inputs: activation_<block> per extracted block."""
    return [f"activation_{layer}" for layer in model.config.extract_layers]


def example_pixels(model: CLIPSeg, batch: int) -> Tensor:
    grid, _ = example_grids(model)
    return torch.randn(batch, 3, grid[0] * PATCH_SIZE, grid[1] * PATCH_SIZE)


def export_image_encoder(model: CLIPSeg, out_dir: Path) -> None:
    height, width = _dim("grid_height", 1, MAX_GRID), _dim("grid_width", 1, MAX_GRID)
    export_graph(
        ImageEncoderGraph(model),
        (example_pixels(model, 2),),
        out_dir / GRAPH_FILES["image_encoder"],
        GRAPH_INPUTS["image_encoder"],
        activation_names(model),
        {"pixel_values": {0: _dim("batch", 1, 1024), 2: PATCH_SIZE * height, 3: PATCH_SIZE * width}},
    )


def export_text_encoder(model: CLIPSeg, out_dir: Path) -> None:
    ids, mask = model.tokenize(["a photo of a cat on a sofa", "a dog"])
    prompts, length = _dim("prompts", 1, 1024), _dim("length", 2, CONTEXT_LENGTH)
    export_graph(
        TextEncoderGraph(model),
        (ids, mask),
        out_dir / GRAPH_FILES["text_encoder"],
        GRAPH_INPUTS["text_encoder"],
        ["text_embedding"],
        {"input_ids": {0: prompts, 1: length}, "attention_mask": {0: prompts, 1: length}},
    )


def export_decoder(model: CLIPSeg, out_dir: Path) -> None:
    features = model.encode_image(example_pixels(model, 1))
    conditional = torch.randn(3, model.config.clip.projection_dim)
    tokens, names = _dim("tokens", 2, MAX_GRID * MAX_GRID + 1), activation_names(model)
    export_graph(
        DecoderGraph(model),
        (torch.tensor(features.grid), conditional, *features.activations),
        out_dir / GRAPH_FILES["decoder"],
        [*GRAPH_INPUTS["decoder"], *names],
        ["logits"],
        {"grid": None, "conditional": {0: _dim("prompts", 1, 1024)}, "activations": tuple({1: tokens} for _ in names)},
    )


def export_image_prompt_head(model: CLIPSeg, out_dir: Path) -> None:
    deepest = model.encode_image(example_pixels(model, 2)).activations[-1]
    export_graph(
        ImagePromptHeadGraph(model),
        (deepest,),
        out_dir / GRAPH_FILES["image_prompt_head"],
        GRAPH_INPUTS["image_prompt_head"],
        ["image_embedding"],
        {"hidden_states": {0: _dim("prompts", 1, 1024), 1: _dim("tokens", 2, MAX_GRID * MAX_GRID + 1)}},
    )


@torch.no_grad()
def verify(model: CLIPSeg, runner: ExportedCLIPSeg) -> dict[str, dict[str, float]]:
    """How far the graphs are from PyTorch: logits at two image shapes with one and three prompts, and the text and
    image-prompt embeddings. Per check: `absolute`, the largest |difference|, and `relative`, that divided by the
    largest |PyTorch value| (at least 1): random weights can give logits in the thousands, where fp32 rounding
    alone differs by more than 1e-3."""
    phrases = ["a cat", "the red car on the left", "sky"]
    conditional = model.embed_text(phrases)
    prompt_images = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    pairs = {
        "text_embedding": (runner.embed_text(phrases), conditional),
        "image_embedding": (runner.embed_images(prompt_images), model.embed_images(prompt_images)),
    }
    for grid in example_grids(model):
        pixels = torch.randn(1, 3, grid[0] * PATCH_SIZE, grid[1] * PATCH_SIZE)
        theirs, ours = runner.encode_image(pixels), model.encode_image(pixels)
        for count in (1, 3):
            name = f"logits_{pixels.shape[2]}x{pixels.shape[3]}_{count}_prompts"
            pairs[name] = (runner.decode(theirs, conditional[:count]), model.decode(ours, conditional[:count]))
    report = {}
    for name, (got, expected) in pairs.items():
        absolute = (got - expected).abs().max().item()
        report[name] = {"absolute": absolute, "relative": absolute / max(1.0, expected.abs().max().item())}
    return report


def graph_signature(path: Path) -> dict:
    """The SHA-256, input and output names, element types and shapes (ints, or names of dynamic sizes) of an ONNX
    file."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values) -> dict:
        out = {}
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            out[value.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}
        return out

    return {
        "file": path.name,
        "sha256": graph_sha256(path),
        "inputs": describe(graph.input),
        "outputs": describe(graph.output),
    }


def build_manifest(model: CLIPSeg, source: str, out_dir: Path) -> dict:
    import onnx
    import transformers

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source_model": source,
        "opset": OPSET,
        "graphs": {name: graph_signature(out_dir / file) for name, file in GRAPH_FILES.items()},
        "config": model.config.to_hf_dict(),
        "extract_layers": list(model.config.extract_layers),
        "image_size": model.config.image_size,
        "patch_size": PATCH_SIZE,
        "normalisation": {
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "how": "RGB / 255, then (x - mean) / std per channel, channels first",
        },
        "tokenizer": "CLIP BPE (clip_tokenizer/ of the repository), end-of-text token as padding, at most "
        f"{CONTEXT_LENGTH} tokens",
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": import_onnxruntime().__version__,
            "transformers": transformers.__version__,
        },
    }


def export(model: CLIPSeg, out_dir: str | Path, source: str = "") -> dict:
    """Export `model` into `out_dir`, check the graphs against PyTorch and write manifest.json last (a folder
    without it is not an export). Returns the manifest. Raises OnnxBackendError when the ONNX packages are
    missing, OSError when `out_dir` cannot be written or has too little space (checked before the export starts),
    RuntimeError when the graphs disagree with PyTorch by more than VERIFY_TOLERANCE (relative)."""
    import_onnxruntime()
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as err:
            raise OnnxBackendError(
                f"export needs {package}, which is not installed: pip install -r {REQUIREMENTS_FILE}"
            ) from err
    out_dir = Path(out_dir)
    check_writable(out_dir, folder=True, needed_bytes=export_bytes(model), what="the export")
    with staged_export(out_dir, list(GRAPH_FILES.values())) as staging:
        model = model.float().cpu().eval()
        with torch.no_grad():
            for export_one in (export_image_encoder, export_text_encoder, export_decoder, export_image_prompt_head):
                export_one(model, staging)
        manifest = build_manifest(model, source, staging)
        manifest["difference_to_torch"] = verification = verify(model, OnnxCLIPSeg(staging, manifest=manifest))
        worst = max(check["relative"] for check in verification.values())
        if worst > VERIFY_TOLERANCE:
            raise RuntimeError(
                f"the ONNX graphs differ from PyTorch by up to {worst:.2e} of the values' scale (> "
                f"{VERIFY_TOLERANCE}): {verification}; nothing was written to {out_dir}"
            )
        install_export(staging, out_dir, manifest)
    return manifest


def export_bytes(model: CLIPSeg) -> int:
    """Room for the graphs: together they hold every weight once in fp32 (the vision blocks are split between the
    image encoder and the image prompt head), plus a tenth for their structure (the tiny test model: 14.1 MB of
    weights, 15.0 MB of graphs)."""
    return 44 * sum(t.numel() for t in model.state_dict().values()) // 10 + 2**20
