"""Export a CLIPSeg model to OpenVINO IR in fp32, bf16 or int8, checked against PyTorch fp32 before anything is
written: the ONNX graphs of `clipseg.onnx.export` converted by OpenVINO, the image encoder quantised by NNCF for
int8, the accuracy check that refuses a graph whose masks agree too little with PyTorch's, and the files and
manifest that `clipseg.onnx.openvino_backend` checks before it runs them.

    manifest = export_openvino(model, "exported_ov/", "int8")        # calibrated and checked on examples/*.jpg
    manifest = export_openvino(model, "out/", "int8", calibration_images=["a.jpg", "b.jpg"], bar=0.99)
    manifest["accuracy_check"]["mask_agreement"]                     # >= the bar, else AccuracyCheckFailed

Files: manifest.json (written last) and per graph of `GRAPH_FILES` <name>.xml (topology) and <name>.bin (weights,
fp32; int8 for the quantised image encoder). bf16 stores fp32 weights too: OpenVINO computes in bf16 at run time.

The check: each check image (default: the calibration images) at the model's input size with its aspect kept, as
the Predictor feeds it, against each of `phrases`; a pixel agrees when both sides put its probability on the same
side of 0.3 (the paper's threshold); the mask agreement is the share of agreeing pixels over all images and
phrases. Below `bar` (default 99.5%) the export raises AccuracyCheckFailed and writes nothing. fp32 must also stay
within `clipseg.onnx.export.VERIFY_TOLERANCE` of PyTorch's logits and embeddings, as the ONNX export does.

int8: NNCF post-training quantisation of the image encoder (the vision blocks up to the deepest extracted one; most
of the time of a prediction), as a transformer (`ModelType.TRANSFORMER`) with SmoothQuant, calibrated on the
calibration images (default: the shipped examples and `CALIBRATION_SCENES` generated scenes) and their mirror
images. The patch embedding and some of the first blocks' linear layers stay in floating point, and the decoder
computes in f32 but for its attention and feed-forward layers, which compute in bf16 on CPUs with native bf16
(`decoder_f32_layers`, written into decoder.xml as OpenVINO's `precise` attribute), or all in f32: the recipes of
`FLOAT_RECIPES` x `DECODER_MIXED`, `DECODER_F32` are tried in order, fastest first, and the first whose accuracy
check passes is kept (all but the last with RECIPE_MARGIN to spare; the manifest records each one tried). The text
encoder's weights are stored in int8 (NNCF weight compression; it computes in f32, faster than bf16 from float
weights at a few tokens); the image-prompt head computes in bf16 on CPUs with native bf16, else f32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from xml.etree import ElementTree

import numpy as np
import torch
from torch import Tensor

from clipseg.images import load_image
from clipseg.onnx import export as onnx_export
from clipseg.onnx.backend import (
    GRAPH_FILES,
    OnnxBackendError,
    check_export_targets,
    graph_sha256,
    install_export,
    staged_export,
)
from clipseg.onnx.backend import read_manifest as read_onnx_manifest
from clipseg.onnx.openvino_backend import (
    FORMAT,
    FORMAT_VERSION,
    IR_FILES,
    REQUIREMENTS_FILE,
    OpenVinoBackendError,
    OpenVinoCLIPSeg,
    check_precision_runs,
    import_openvino,
    inference_precision_hint,
    openvino_bf16,
    openvino_core,
    precise_layers,
    signal_stack_kept,
)
from clipseg.outputs import check_writable
from clipseg.postprocess import PAPER_LOGIT, PAPER_THRESHOLD
from clipseg.precision import MASK_AGREEMENT_BAR, cpu_class
from clipseg.scenes import EXAMPLES_DIR
from clipseg.transforms import ImageTransform
from model import CLIPSeg

if TYPE_CHECKING:  # openvino is optional: imported by `import_openvino`
    from openvino import Model, Node

# The check's prompts: the shapes and colours of the shipped scenes (clipseg.synthetic's vocabulary), and a few
# everyday phrases for users' own calibration images.
CHECK_PHRASES = (
    "purple square",
    "green circle",
    "red triangle",
    "yellow circle",
    "blue square",
    "a person",
    "the background",
)


class AccuracyCheckFailed(RuntimeError):
    """The converted graphs' masks agree with PyTorch fp32 less than the bar (or fp32 logits drift): nothing was
    written."""


def import_nncf() -> ModuleType:
    """The nncf module (quiet), or an OpenVinoBackendError naming the requirements file to install."""
    try:
        import nncf
    except ImportError as err:
        raise OpenVinoBackendError(
            f"int8 export needs nncf, which is not installed: pip install -r {REQUIREMENTS_FILE}"
        ) from err
    nncf.set_log_level(logging.ERROR)
    return nncf


def default_calibration_images() -> list[Path]:
    """The shipped examples/*.jpg; OpenVinoBackendError when they are not there (an installed package)."""
    images = sorted(EXAMPLES_DIR.glob("*.jpg"))
    if not images:
        raise OpenVinoBackendError(f"no calibration images: {EXAMPLES_DIR} has no *.jpg; give calibration_images")
    return images


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given and the .jpg/.jpeg/.png files of folders (sorted); OpenVinoBackendError when none is found
    or a path does not exist."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise OpenVinoBackendError(f"calibration image {path}: no such file or folder")
    if not files:
        raise OpenVinoBackendError(f"no calibration images (.jpg, .jpeg, .png) in {', '.join(map(str, paths))}")
    return files


def image_pixels(model: CLIPSeg, images: Sequence[str | os.PathLike]) -> list[Tensor]:
    """Image files -> (1, 3, H, W) normalised pixels each, at the model's input size with the aspect kept (the
    Predictor's geometry). Raises clipseg.images.UnreadableImage naming a file that cannot be read."""
    transform = ImageTransform("pil", model.config.image_size, square=False, multiple=model.config.patch_size)
    return [transform.pixels(load_image(Path(image)))[None] for image in images]


def convert_graphs(model: CLIPSeg, onnx_dir: Path, written: bool) -> tuple[dict, dict]:
    """The four ONNX graphs export.py writes, converted to OpenVINO models, and their ONNX manifest. written: the
    folder holds `model`'s export already (its manifest and config are checked); else the graphs are exported into
    it first. Each graph must have the SHA-256 its manifest records (OpenVinoBackendError naming the file)."""
    ov = import_openvino()
    if written:
        try:
            manifest = read_onnx_manifest(onnx_dir)
        except OnnxBackendError as err:
            raise OpenVinoBackendError(str(err)) from err
        if manifest["config"] != json.loads(json.dumps(model.config.to_hf_dict())):  # as the manifest holds it
            raise OpenVinoBackendError(f"{onnx_dir}: the ONNX export is of another model than the one given")
    else:
        with torch.no_grad():
            for export_one in (
                onnx_export.export_image_encoder,
                onnx_export.export_text_encoder,
                onnx_export.export_decoder,
                onnx_export.export_image_prompt_head,
            ):
                export_one(model, onnx_dir)
        manifest = onnx_export.build_manifest(model, "", onnx_dir)
    models = {}
    for name, file in GRAPH_FILES.items():  # each graph read once: the bytes checked are the bytes converted
        data = (onnx_dir / file).read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["graphs"][name]["sha256"]:
            raise OpenVinoBackendError(f"{onnx_dir / file}: changed after its export; export the model again")
        models[name] = ov.convert_model(io.BytesIO(data))
    return models, manifest


KEPT_BLOCKS = 3  # the image encoder's first blocks, some of whose linear layers int8 leaves in floating point
BLOCK_LAYERS = ("q", "k", "v", "out", "fc1", "fc2")  # a block's linear layers, in graph order
# What int8 keeps in floating point besides the patch embedding, tried in this order (fastest first): the first
# KEPT_BLOCKS blocks' layers named. Measured on ViT-B/16 at 352 px, random weights, the refined head, calibrated on
# the examples and the generated scenes, the decoder in f32 (mask agreement with PyTorch fp32 on noise / the
# examples' check / bench.py's scenes; image encoder compiled for the shape, one AMX thread, a prediction timed
# alone): the attention projections 99.61 / 99.65 / 99.67% at 103 ms, all six 99.74 / 99.74 / 99.76% at 111 ms.
# With the decoder in bf16 they gave 99.53 / 99.58 / 99.59% and 99.63 / 99.65 / 99.65%, and nothing kept but the
# patch embedding 99.52 / 99.53 / 99.56% (too close to the bar).
FLOAT_RECIPES = (("q", "k", "v", "out"), BLOCK_LAYERS)
# How the decoder computes, tried in this order for each recipe (the second only on CPUs with native bf16):
# `decoder_f32_layers` in f32 and its attention and feed-forward layers in the image encoder's floating-point
# precision (bf16 there), or all of it in f32 (`openvino_backend.compile_config`).
DECODER_MIXED = "f32 but its attention and feed-forward layers"
DECODER_F32 = "f32"
# A recipe before the last must pass the bar by this much: the check's few images estimate the agreement elsewhere
# only so well (the attention projections with the decoder in bf16: 99.57% on the examples, 99.49-99.52% on
# bench.py's noise image in two runs of `python bench.py --rows precision --refined`).
RECIPE_MARGIN = 0.001


def sensitive_layers(encoder: Model, blocks: int, layers: Sequence[str] = BLOCK_LAYERS) -> list[str]:
    """The image encoder's operations kept in floating point: the patch embedding (a convolution of the raw pixels)
    and the `layers` (of BLOCK_LAYERS) of its first KEPT_BLOCKS of `blocks` transformer blocks (its weighted
    MatMuls in graph order). A graph without six weighted MatMuls per block keeps those blocks whole."""
    convolutions = [op.get_friendly_name() for op in encoder.get_ordered_ops() if op.get_type_name() == "Convolution"]
    weighted = [op.get_friendly_name() for op in encoder.get_ordered_ops() if is_weighted_matmul(op)]
    if not weighted or len(weighted) % blocks:
        return convolutions  # not the graph this module converts: keep the patch embedding only
    per_block = len(weighted) // blocks
    kept = range(min(KEPT_BLOCKS, blocks))
    if per_block != len(BLOCK_LAYERS):
        return convolutions + weighted[: per_block * len(kept)]
    indices = [BLOCK_LAYERS.index(layer) for layer in layers]
    return convolutions + [weighted[per_block * block + index] for block in kept for index in indices]


def is_weighted_matmul(op: Node) -> bool:
    """Whether `op` is a MatMul by a constant (a linear layer's weights), through converts and transposes."""
    if op.get_type_name() != "MatMul":
        return False
    for port in op.inputs():
        source = port.get_source_output().get_node()
        while source.get_type_name() in ("Convert", "Transpose", "Reshape") and source.inputs():
            source = source.input(0).get_source_output().get_node()
        if source.get_type_name() == "Constant":
            return True
    return False


def decoder_f32_layers(decoder: Model) -> list[str]:
    """The decoder's operations an int8 export marks to compute in f32 where the rest computes in bf16: all but its
    attention (ScaledDotProductAttention) and its blocks' feed-forward layers (`feed_forward_layers`). OpenVINO's
    CPU plugin then keeps the layer norms, residual additions and FiLM in f32 (at ViT-B/16 the other linear layers
    too; at the tiny test model's sizes it computes every linear layer in bf16 all the same). Measured (ViT-B/16 at
    352 px, refined head, random weights, the attention projections of blocks 0-2 kept, one AMX thread, every graph
    compiled for the shape): the decoder all in f32 99.65 / 99.68% mask agreement on the examples / bench.py's
    scenes at 105.4 ms a prediction, so with the feed-forward layers' bias and ReLU still marked 99.63 / 99.67% at
    101.4 ms, all in bf16 99.57 / 99.60% at 99.5 ms. Leaving the bias and ReLU to bf16 as well (the hidden
    activations then stay in bf16 between the two products, without a conversion) kept 99.63 / 99.66% (the same as
    before in that run) and took the decoder from 6.2-6.5 to 5.1-5.2 ms run alone; the decoder's first linear layers
    (768 -> 64, of the encoder's activations) in bf16 too lost 0.02-0.04 points and no time."""
    in_bf16 = feed_forward_layers(decoder)
    return [
        op.get_friendly_name()
        for op in decoder.get_ordered_ops()
        if op.get_type_name() not in ("Constant", "Parameter", "Result", "ScaledDotProductAttention")
        and op.get_friendly_name() not in in_bf16
    ]


def feed_forward_layers(graph: Model) -> set[str]:
    """The names of `graph`'s feed-forward layers: each pair of weighted MatMuls with a ReLU between, with the first's
    bias Add and the ReLU (so that the hidden activations stay in one precision between the two)."""
    names = set()
    for relu in (op for op in graph.get_ordered_ops() if op.get_type_name() == "Relu"):
        producer = relu.input(0).get_source_output().get_node()
        between = [relu]
        candidates = [producer]
        if producer.get_type_name() == "Add":
            between.append(producer)
            candidates = [port.get_source_output().get_node() for port in producer.inputs()]
        first = next((op for op in candidates if is_weighted_matmul(op)), None)
        consumers = [target.get_node() for target in relu.output(0).get_target_inputs()]
        if first is not None and len(consumers) == 1 and is_weighted_matmul(consumers[0]):
            names.update(op.get_friendly_name() for op in (first, *between, consumers[0]))
    return names


def with_precise_layers(topology: bytes, names: Sequence[str]) -> bytes:
    """An IR topology (.xml) with OpenVINO's `precise` runtime attribute on the layers `names`: its CPU plugin
    computes them in f32 under a bf16 hint (`openvino_backend.PRECISE_KEY`). OpenVINO's Python API can neither set
    the attribute nor write it (save_model drops it), so it is written into the XML."""
    root = ElementTree.fromstring(topology)
    wanted = set(names)
    for layer in root.iter("layer"):
        if layer.get("name") not in wanted:
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ElementTree.Element("rt_info")
            layer.insert(0, rt_info)
        if not any(attribute.get("name") == "precise" for attribute in rt_info.iter("attribute")):
            ElementTree.SubElement(rt_info, "attribute", name="precise", version="0")
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def with_f32_layers(model: Model, names: Sequence[str]) -> Model:
    """`model` (marked nowhere yet) read again from its IR with the layers `names` marked precise
    (`with_precise_layers`), as `save` writes it."""
    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="clipseg-ir-") as folder:
        xml = Path(folder) / "graph.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        topology, weights = with_precise_layers(xml.read_bytes(), names), xml.with_suffix(".bin").read_bytes()
    return openvino_core().read_model(topology, ov.Tensor(np.frombuffer(weights, dtype=np.uint8).copy()))


SMOOTH_QUANT_ALPHA = 0.5  # NNCF's SmoothQuant on the MatMuls: activation outliers moved into the weights
CALIBRATION_SCENES = 12  # generated scenes added to the default calibration images (the examples)
CALIBRATION_SEED = 1234  # their seed: apart from the examples' and from bench.py's check scenes


def calibration_scenes(model: CLIPSeg, count: int = CALIBRATION_SCENES) -> list[Tensor]:
    """`count` generated scenes (`clipseg.scenes.photo_like_images`), as `image_pixels` makes them: more varied
    calibration than the three examples alone."""
    from clipseg.scenes import photo_like_images

    transform = ImageTransform("pil", model.config.image_size, square=False, multiple=model.config.patch_size)
    return [transform.pixels(image)[None] for image in photo_like_images(CALIBRATION_SEED, count)]


def quantize_image_encoder(
    encoder: Model, calibration: list[Tensor], blocks: int, layers: Sequence[str] = BLOCK_LAYERS
) -> Model:
    """The image encoder (`blocks` transformer blocks) with int8 weights and activations: NNCF post-training
    quantisation as a transformer with SmoothQuant, calibrated on `calibration` ((1, 3, H, W) pixels each) and their
    mirror images; `sensitive_layers(encoder, blocks, layers)` stay in floating point."""
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    samples = [pixels.numpy() for pixels in calibration] + [pixels.flip(-1).numpy() for pixels in calibration]
    smooth_quant = AdvancedSmoothQuantParameters(matmul=SMOOTH_QUANT_ALPHA)
    # NNCF prints progress bars, and makes and releases OpenVINO Cores of its own (see signal_stack_kept)
    with contextlib.redirect_stdout(io.StringIO()), signal_stack_kept():
        return nncf.quantize(
            encoder,
            nncf.Dataset(samples),
            subset_size=len(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(names=sensitive_layers(encoder, blocks, layers)),
            advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=smooth_quant),
        )


def compress_text_encoder(encoder: Model) -> Model:
    """The text encoder with int8 weights (NNCF weight compression, symmetric, a scale per output channel): 4x
    smaller; at a prompt's few tokens its time is reading weights (one AMX thread, 8 tokens: 7.7 ms computing in f32
    against 9.7 ms in bf16 from float weights), and the masks agreed as before."""
    nncf = import_nncf()
    with contextlib.redirect_stdout(io.StringIO()), signal_stack_kept():
        return nncf.compress_weights(encoder, mode=nncf.CompressWeightsMode.INT8_SYM)


@torch.no_grad()
def mask_agreement(
    model: CLIPSeg, runner: OpenVinoCLIPSeg, images: list[Tensor], names: list[str], phrases: Sequence[str]
) -> dict:
    """How many mask pixels (probability > PAPER_THRESHOLD) of `runner` agree with `model` in fp32, over
    `images` ((1, 3, H, W) pixels, named by `names`) against each of `phrases`: the share over all pixels, and the
    worst image and phrase."""
    conditional, theirs = model.embed_text(list(phrases)), runner.embed_text(list(phrases))
    agreeing = total = 0
    worst = {"agreement": 1.0}
    for name, pixels in zip(names, images):
        expected = model.decode(model.encode_image(pixels), conditional) > PAPER_LOGIT
        got = runner.decode(runner.encode_image(pixels), theirs) > PAPER_LOGIT
        same = (got == expected).flatten(1).float()
        agreeing, total = agreeing + same.sum().item(), total + same.numel()
        for phrase, share in zip(phrases, same.mean(1).tolist()):
            if share < worst["agreement"]:
                worst = {"agreement": share, "image": name, "phrase": phrase}
    return {"mask_agreement": agreeing / total, "worst": worst}


def export_openvino(
    model: CLIPSeg,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    calibration_images: Sequence[str | os.PathLike] | None = None,
    check_images: Sequence[str | os.PathLike] | None = None,
    phrases: Sequence[str] = CHECK_PHRASES,
    bar: float = MASK_AGREEMENT_BAR,
    source: str = "",
    threads: int | None = None,
    onnx_dir: str | os.PathLike | None = None,
) -> dict:
    """Export `model` to OpenVINO IR in `precision` into `out_dir`, after checking it; returns the manifest.

    calibration_images: image files for int8's calibration (default: the shipped examples/*.jpg and
    CALIBRATION_SCENES generated scenes); check_images: the accuracy check's images (default: the calibration image
    files); phrases: its prompts; bar: the mask agreement
    with PyTorch fp32 it needs, in [0, 1]; threads: OpenVINO's threads for the check; onnx_dir: a folder export.py
    wrote from `model`, converted instead of exporting the graphs again.

    Raises OpenVinoBackendError when openvino (or, for int8, nncf) is missing or the CPU cannot run `precision`
    (bf16 without native bf16), clipseg.images.UnreadableImage for an image that cannot be read, OSError when
    `out_dir` cannot be written or lacks space (all before the conversion starts), and AccuracyCheckFailed when
    the check fails. Nothing is written to `out_dir` unless the check passes; then the IR files, and manifest.json
    last (a folder without it is not an export)."""
    import_openvino()
    check_precision_runs(precision)
    onnx_export.import_onnxruntime()  # the ONNX export's requirements (onnx, onnxscript) come with it
    if precision == "int8":
        import_nncf()
    if not 0 <= bar <= 1:
        raise ValueError(f"bar must be a share of pixels in [0, 1], got {bar}")
    if not phrases:
        raise ValueError("the accuracy check needs at least one phrase")
    scenes = CALIBRATION_SCENES if calibration_images is None else 0  # the user's images replace the defaults
    calibration_images = list(calibration_images or default_calibration_images())
    check_images = list(check_images or calibration_images)
    out_dir = Path(out_dir)
    needed = onnx_export.export_bytes(model)
    check_writable(out_dir, folder=True, needed_bytes=needed, what="the export")
    check_export_targets(out_dir, [file for files in IR_FILES.values() for file in files])
    check_writable(tempfile.gettempdir(), folder=True, needed_bytes=needed, what="the temporary ONNX graphs")
    model = model.float().cpu().eval()
    calibration = []
    if precision == "int8":
        calibration = image_pixels(model, calibration_images) + calibration_scenes(model, scenes)
    check = AccuracyCheck(model, precision, out_dir, threads, image_pixels(model, check_images), check_images, phrases)
    with tempfile.TemporaryDirectory(prefix="clipseg-onnx-") as work_dir:
        models, check.onnx_manifest = convert_graphs(model, Path(onnx_dir or work_dir), written=onnx_dir is not None)
    check.onnx_manifest["source_model"] = source
    if precision != "int8":
        manifest = check.manifest(models, bar)
    else:
        manifest = quantise_until_checked(models, check, calibration, bar)
        manifest["quantisation"].update(
            calibration_images=[Path(image).name for image in calibration_images], generated_scenes=scenes
        )
    refuse_failed_check(manifest, precision, out_dir)
    save(models, manifest, out_dir)
    return manifest


class AccuracyCheck:
    """The check of an export's graphs against `model` in PyTorch fp32 (`mask_agreement` on the check images and
    phrases, `onnx_export.verify`), run in OpenVINO as predict.py will run them; `manifest(models, bar)` is the
    manifest of `models` with its results."""

    def __init__(
        self,
        model: CLIPSeg,
        precision: str,
        out_dir: Path,
        threads: int | None,
        pixels: list[Tensor],
        images: Sequence[str | os.PathLike],
        phrases: Sequence[str],
    ) -> None:
        self.model, self.precision, self.out_dir, self.threads = model, precision, out_dir, threads
        self.pixels, self.names, self.phrases = pixels, [Path(image).name for image in images], list(phrases)
        self.onnx_manifest: dict = {}

    def manifest(self, models: dict, bar: float) -> dict:
        manifest = describe(self.onnx_manifest, models, self.precision)
        runner = OpenVinoCLIPSeg(self.out_dir, threads=self.threads, manifest=manifest, models=models)
        manifest["accuracy_check"] = {
            **mask_agreement(self.model, runner, self.pixels, self.names, self.phrases),
            "bar": bar,
            "images": self.names,
            "phrases": self.phrases,
            "probability_threshold": PAPER_THRESHOLD,
            "reference": "PyTorch fp32",
            "inference_precision": runner.inference_precision(),
            "cpu_class": cpu_class(),  # int8's kernels, and so its masks, differ between classes
        }
        manifest["difference_to_torch"] = onnx_export.verify(self.model, runner)
        return manifest


def quantise_until_checked(models: dict, check: AccuracyCheck, calibration: list[Tensor], bar: float) -> dict:
    """int8: the text encoder's weights compressed, the image encoder quantised by the recipes of FLOAT_RECIPES
    (fewest layers kept in floating point first) with the decoder mixed or, where bf16 is native, all f32; the
    first recipe whose check passes `bar` (by RECIPE_MARGIN, but the last) is kept in `models`. Returns its
    manifest, with the recipes tried under "quantisation"."""
    blocks = max(check.model.config.extract_layers) + 1
    models["text_encoder"] = compress_text_encoder(models["text_encoder"])
    decoders = {DECODER_MIXED: with_f32_layers(models["decoder"], decoder_f32_layers(models["decoder"]))}
    if openvino_bf16():  # elsewhere the two compute alike, in f32
        decoders[DECODER_F32] = models["decoder"]
    recipes = [(layers, decoder) for layers in FLOAT_RECIPES for decoder in decoders]
    float_encoder, tried, quantised = models["image_encoder"], [], {}
    for layers, decoder in recipes:  # fastest first; the first that passes the check is kept
        if layers not in quantised:
            quantised[layers] = quantize_image_encoder(float_encoder.clone(), calibration, blocks, layers)
        models["image_encoder"], models["decoder"] = quantised[layers], decoders[decoder]
        manifest = check.manifest(models, bar)
        kept = f"the patch embedding and blocks 0-{min(KEPT_BLOCKS, blocks) - 1}'s {', '.join(layers)}"
        agreement = manifest["accuracy_check"]["mask_agreement"]
        tried.append({"kept_in_floating_point": kept, "decoder": decoder, "mask_agreement": agreement})
        if agreement >= bar + (RECIPE_MARGIN if (layers, decoder) != recipes[-1] else 0):
            break
    manifest["quantisation"] = {
        "tool": "nncf",
        "graphs": ["image_encoder"],
        "model_type": "transformer",
        "smooth_quant_alpha": SMOOTH_QUANT_ALPHA,
        "kept_in_floating_point": kept,
        "decoder": decoder,
        "recipes_tried": tried,
        "mirrored": True,
        "int8_weights_only": ["text_encoder"],
    }
    return manifest


def describe(onnx_manifest: dict, models: dict, precision: str) -> dict:
    """The OpenVINO manifest from the ONNX export's (config, normalisation, tokenizer, versions), without the
    ONNX files' signatures (those files are gone): format, precision, each graph's inputs and outputs."""
    manifest = {key: value for key, value in onnx_manifest.items() if key not in ("graphs", "format_version")}
    manifest.update(format=FORMAT, format_version=FORMAT_VERSION, precision=precision)
    manifest["inference_precision_hint"] = inference_precision_hint(precision)  # on the exporting CPU
    manifest["graphs"] = {
        name: {
            "xml": IR_FILES[name][0],
            "bin": IR_FILES[name][1],
            "inputs": {port.get_any_name(): str(port.get_partial_shape()) for port in model.inputs},
            "outputs": {port.get_any_name(): str(port.get_partial_shape()) for port in model.outputs},
        }
        for name, model in models.items()
    }
    manifest["versions"]["openvino"] = import_openvino().__version__
    if precision == "int8":
        manifest["versions"]["nncf"] = import_nncf().__version__
    return manifest


def refuse_failed_check(manifest: dict, precision: str, out_dir: Path) -> None:
    """AccuracyCheckFailed when the masks agree less than the bar, or fp32 logits drift from PyTorch's."""
    check = manifest["accuracy_check"]
    nothing = f"nothing was written to {out_dir}"
    if check["mask_agreement"] < check["bar"]:
        worst = check["worst"]
        raise AccuracyCheckFailed(
            f"the {precision} OpenVINO graphs' masks agree with PyTorch fp32 on {100 * check['mask_agreement']:.2f}% "
            f"of pixels, below the bar of {100 * check['bar']:.2f}% (worst: {100 * worst['agreement']:.2f}% on "
            f"{worst.get('image')} with {worst.get('phrase')!r}); {nothing}"
        )
    worst_relative = max(difference["relative"] for difference in manifest["difference_to_torch"].values())
    if precision == "fp32" and worst_relative > onnx_export.VERIFY_TOLERANCE:
        raise AccuracyCheckFailed(
            f"the fp32 OpenVINO graphs differ from PyTorch by up to {worst_relative:.2e} of the values' scale "
            f"(> {onnx_export.VERIFY_TOLERANCE}): {manifest['difference_to_torch']}; {nothing}"
        )


def save(models: dict, manifest: dict, out_dir: Path) -> None:
    """The IR files (weights as they are: no fp16 compression; precise layers marked, `with_precise_layers`) and
    their SHA-256s into the manifest, written beside `out_dir`'s files and moved into place, the manifest last
    (`install_export`): an export killed while saving leaves an older export in `out_dir` whole."""
    ov = import_openvino()
    names = [file for name in models for file in IR_FILES[name]]
    with staged_export(out_dir, names) as staging:
        manifest["files"] = {}
        for name, model in models.items():
            xml, weights = (staging / file for file in IR_FILES[name])
            ov.save_model(model, str(xml), compress_to_fp16=False)
            names = precise_layers(model)
            if names:  # save_model does not write them
                xml.write_bytes(with_precise_layers(xml.read_bytes(), names))
            manifest["files"].update({xml.name: graph_sha256(xml), weights.name: graph_sha256(weights)})
        install_export(staging, out_dir, manifest)
