"""Run a CLIPSeg exported by `export.py` in onnxruntime, through the same `Predictor` as the PyTorch model.

    model = OnnxCLIPSeg("exported/")                         # the folder export.py wrote (manifest.json + graphs)
    predictor = Predictor(model)                              # predict.py --backend onnx --model exported/
    features = model.encode_image(pixel_values)              # (B, 3, H, W), H and W multiples of 16
    logits = model.decode(features, model.embed_text(["a cat", "the sofa"]))  # (2, 1, H, W)

`OnnxCLIPSeg` has the part of `model.CLIPSeg`'s interface that `clipseg.predictor.Predictor` uses: `config`,
`text_cache`, `tokenize`, `embed_text`, `embed_token_ids`, `embed_images`, `encode_image`, `decode`, `eval`, `to`,
`parameters`. It takes and returns torch tensors on the CPU and computes in fp32. That interface over the four
graphs is `ExportedCLIPSeg`, which the OpenVINO backend (`clipseg.onnx.openvino_backend`) shares. onnxruntime is
optional: install it with `pip install -r requirements-export.txt`.

An export folder is untrusted until checked: manifest.json must be one export.py wrote (format, version, a SHA-256
per graph), each graph must have the SHA-256 the manifest records before onnxruntime opens it, and whatever
onnxruntime refuses is an `OnnxBackendError` naming the file. onnxruntime itself refuses graphs whose external-data
paths lead outside their folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from clipseg.config import PATCH_SIZE, CLIPSegConfig
from clipseg.decoder import prompts_per_image_of
from clipseg.outputs import LockHeld, UnwritableOutput, exclusive_lock, read_regular, write_json
from clipseg.tokenizer import CLIPTokenizer
from clipseg.weights import CheckpointError, read_json
from model import CLIPSeg, ImageFeatures

if TYPE_CHECKING:  # onnxruntime is optional: imported by `import_onnxruntime`
    from onnxruntime import InferenceSession, SessionOptions

REQUIREMENTS_FILE = "requirements-export.txt"
MANIFEST_NAME = "manifest.json"
FORMAT = "clipseg-onnx"
FORMAT_VERSION = 2  # 2: each graph's SHA-256 in the manifest
# Graph name -> file. The image prompt head continues the vision tower from the deepest extracted activation, so
# image prompts need no second copy of the early blocks' weights.
GRAPH_FILES = {
    "image_encoder": "image_encoder.onnx",
    "text_encoder": "text_encoder.onnx",
    "decoder": "decoder.onnx",
    "image_prompt_head": "image_prompt_head.onnx",
}
# Each graph's named inputs (the decoder's also takes the image encoder's activations, named by the export).
GRAPH_INPUTS = {
    "image_encoder": ("pixel_values",),
    "text_encoder": ("input_ids", "attention_mask"),
    "decoder": ("grid", "conditional"),
    "image_prompt_head": ("hidden_states",),
}


class OnnxBackendError(RuntimeError):
    """The ONNX backend cannot run: onnxruntime is missing, or the export folder is incomplete, changed or damaged."""


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module, or an OnnxBackendError naming the requirements file to install."""
    try:
        import onnxruntime
    except ImportError as err:
        raise OnnxBackendError(
            f"the ONNX backend needs onnxruntime, which is not installed: pip install -r {REQUIREMENTS_FILE}"
        ) from err
    return onnxruntime


def manifest_of(directory: Path, form: tuple[str, int], error: type[Exception], missing_hint: str) -> dict:
    """The manifest of the export folder `directory` once it is a JSON object of the format and version `form`
    with a model config; else `error` naming the file (`missing_hint`: what to do when there is no manifest). Each
    backend then checks the files it lists (`read_manifest`, `openvino_backend.read_manifest`)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise error(f"{directory}: no {MANIFEST_NAME}; {missing_hint}")
    try:
        manifest = read_json(path)
    except (OSError, CheckpointError) as err:
        raise error(f"{err}; export the model again") from err
    if (manifest.get("format"), manifest.get("format_version")) != form:
        raise error(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, this code reads "
            f"{form[0]!r} version {form[1]}; export the model again with this export.py"
        )
    if not isinstance(manifest.get("config"), dict):
        raise error(f"{path}: no model config; export the model again")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an export folder; OnnxBackendError when it is not one export.py wrote, or files are missing."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    hint = "write the folder with `python export.py --model MODEL --out DIR`"
    manifest = manifest_of(directory, (FORMAT, FORMAT_VERSION), OnnxBackendError, hint)
    graphs = manifest.get("graphs")
    for name in GRAPH_FILES:
        entry = graphs.get(name) if isinstance(graphs, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise OnnxBackendError(f"{path}: no SHA-256 for the {name} graph; export the model again")
    missing = [name for name, file in GRAPH_FILES.items() if not (directory / file).is_file()]
    if missing:
        raise OnnxBackendError(f"{directory}: missing graph files {[GRAPH_FILES[m] for m in missing]}; export again")
    return manifest


SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_GRAPH_BYTES = 32 << 30  # a graph file read whole: ViT-L/14's weights in fp32 take 1.2 GB


STAGING_PREFIX = ".export-in-progress-"  # inside an export folder: the files of an export not yet checked


def check_export_targets(out_dir: Path, names: Sequence[str]) -> None:
    """UnwritableOutput naming the path unless each of the export's files `names` can take its place in `out_dir`:
    a folder of that name would stop the export halfway through moving its files."""
    for name in names:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            raise UnwritableOutput(f"{target} is a folder in the way of the export's file {name}: move it")


@contextlib.contextmanager
def staged_export(out_dir: Path, names: Sequence[str]) -> Iterator[Path]:
    """A fresh folder inside `out_dir` (made if needed) where an export writes and checks its files `names` before
    `install_export` moves them into place, so that an export that fails its check, or is killed, leaves the export
    already in `out_dir` as it was. While it is open no other export can write `out_dir` (UnwritableOutput);
    the leftovers of a killed export are removed. The folder is removed on the way out."""
    check_export_targets(out_dir, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(out_dir, wait=False):
            for leftover in out_dir.glob(STAGING_PREFIX + "*"):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=STAGING_PREFIX))
            try:
                yield staging
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except LockHeld as err:
        raise UnwritableOutput(
            f"{out_dir}: another export is writing there; wait for it to end, or choose another --out"
        ) from err


def install_export(staging: Path, out_dir: Path, manifest: dict) -> None:
    """Move the checked files of `staging` into `out_dir` and write `manifest` there last (a folder without one is
    not an export): only renames lie between the old manifest's removal and the new one's writing, and each target
    is checked before the old manifest goes."""
    files = sorted(staging.iterdir())
    check_export_targets(out_dir, [file.name for file in files])
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for file in files:
        os.replace(file, out_dir / file.name)
    write_json(out_dir / MANIFEST_NAME, manifest)


def graph_sha256(path: Path) -> str:
    """The SHA-256 of a graph file (hex), as the manifest records it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_graph_inputs(graph: str, names: Sequence[str], path: Path, error: type[Exception]) -> None:
    """`error` naming the file unless the graph at `path` takes the inputs of graph `graph` (GRAPH_INPUTS): a graph
    file swapped for another of the export, its recorded SHA-256 with it, is found when opened, not mid-run."""
    missing = [name for name in GRAPH_INPUTS[graph] if name not in names]
    if missing:
        raise error(
            f"{path}: takes the inputs {list(names)}, not those of the {graph.replace('_', ' ')} ({missing} missing): "
            "the export's files were mixed up; export the model again"
        )


def check_config_fits(
    config: CLIPSegConfig, activations: int, conditional_width: int | None, path: Path, error: type[Exception]
) -> None:
    """`error` naming the manifest unless its model config describes the graphs: the patch size they cut (16), the
    number of activations the image encoder hands the decoder (one per extracted layer) and the width of the
    decoder's conditional input (`conditional_width`, None when the graph leaves it open). An edited config would
    resize images for another patch size, or fail mid-run."""
    problems = []
    if config.clip.vision_config.patch_size != PATCH_SIZE:
        problems.append(f"patch_size {config.clip.vision_config.patch_size}, the graphs cut {PATCH_SIZE}-px patches")
    if len(config.extract_layers) != activations:
        problems.append(f"{len(config.extract_layers)} extract_layers, the image encoder gives {activations}")
    if conditional_width is not None and conditional_width != config.clip.projection_dim:
        problems.append(f"projection_dim {config.clip.projection_dim}, the decoder takes {conditional_width}")
    if problems:
        raise error(f"{path}: its config does not describe the graphs ({'; '.join(problems)}); export the model again")


def read_checked(path: Path, expected_sha256: str, error: type[Exception]) -> bytes:
    """The bytes of an exported file once their SHA-256 is the one the manifest records, else `error` naming the
    file. The file is read once: a runtime given these bytes loads what was checked, whatever happens to the file
    afterwards."""
    try:
        data = read_regular(path, MAX_GRAPH_BYTES)
    except OSError as err:
        raise error(f"cannot read {path} ({err}); export the model again") from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise error(
            f"{path}: its SHA-256 {actual[:16]}... is not the {expected_sha256[:16]}... that {MANIFEST_NAME} "
            "records: the file was changed or replaced after the export; export the model again"
        )
    return data


def open_graph(ort: ModuleType, path: Path, expected_sha256: str, options: SessionOptions) -> InferenceSession:
    """An onnxruntime session of the graph at `path` (`read_checked`); OnnxBackendError naming the file when its
    SHA-256 is not the manifest's or onnxruntime cannot load it."""
    data = read_checked(path, expected_sha256, OnnxBackendError)
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's load errors (InvalidProtobuf, Fail, ...) derive from Exception only
        raise OnnxBackendError(f"{path}: onnxruntime cannot load it ({err}); export the model again") from err


class ExportedCLIPSeg:
    """`CLIPSeg`'s inference interface over the four exported graphs (`GRAPH_FILES`), whatever runs them: a
    subclass sets `config` and `activation_names` (the image encoder's outputs, which the decoder takes by name) and
    runs a graph in `_run`. CPU only; takes and returns torch tensors."""

    # The precision the graphs compute in, fixed at export: fp32 for ONNX. `Predictor` runs them as they are (no
    # autocast or quantisation on the PyTorch side) and accepts no other precision.
    precision = "fp32"
    runtime = ""  # the engine's name, for messages
    config: CLIPSegConfig
    activation_names: list[str]

    def __init__(self) -> None:
        self.text_cache: dict[str, Tensor] | None = None
        self._tokenizer = None

    @property
    def precisions(self) -> tuple[str]:
        """The precisions a caller may ask for (`clipseg.precision.resolve_precision` reads this): the export's."""
        return (self.precision,)

    def _run(self, graph: str, **inputs: Tensor) -> list[Tensor]:
        """Run `graph` (a key of GRAPH_FILES) on named inputs; its outputs in order."""
        raise NotImplementedError

    # -- the torch.nn.Module calls a caller makes ---------------------------------------------------------------

    def eval(self) -> ExportedCLIPSeg:
        return self

    def to(self, device: str | torch.device) -> ExportedCLIPSeg:
        if torch.device(device).type != "cpu":
            raise ValueError(f"this backend runs on the CPU ({self.runtime}), not on {device}: use --device cpu")
        return self

    def parameters(self) -> Iterator[Tensor]:
        """No torch parameters: one empty CPU tensor, so that callers reading the device from them find the CPU."""
        yield torch.empty(0)

    # -- prompts: the same tokenisation and text cache as the PyTorch model ----------------------------------

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            self._tokenizer = CLIPTokenizer.from_directory()
        return self._tokenizer

    tokenize = CLIPSeg.tokenize
    embed_text = CLIPSeg.embed_text

    def embed_token_ids(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(K, L) token ids [+ (K, L) mask] -> (K, 512) CLIP text embeddings."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        (embedding,) = self._run("text_encoder", input_ids=input_ids.long(), attention_mask=attention_mask.long())
        return embedding

    def embed_images(self, prompt_images: Tensor) -> Tensor:
        """(K, 3, h, w) engineered prompt images -> (K, 512) projected CLS embeddings (the full vision tower)."""
        deepest = self.encode_image(prompt_images).activations[-1]
        (embedding,) = self._run("image_prompt_head", hidden_states=deepest)
        return embedding

    # -- image encoding and decoding -------------------------------------------------------------------------

    def encode_image(self, pixel_values: Tensor) -> ImageFeatures:
        """(B, 3, H, W) normalised pixels, H and W multiples of 16 -> the extracted blocks' activations, each
        (B, 1 + h*w, width)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        height, width = pixel_values.shape[-2:]
        if height % PATCH_SIZE or width % PATCH_SIZE:
            raise ValueError(f"image size {height}x{width} must be a multiple of {PATCH_SIZE} in both sides")
        activations = self._run("image_encoder", pixel_values=pixel_values.float())
        return ImageFeatures(activations, (height // PATCH_SIZE, width // PATCH_SIZE))

    def decode(
        self, features: ImageFeatures, conditional: Tensor, prompts_per_image: Sequence[int] | None = None
    ) -> Tensor:
        """Image features (batch B) + (N, 512) conditionals -> (N, 1, H, W) logits, as `CLIPSeg.decode`: image b
        against the b-th run of `prompts_per_image[b]` consecutive prompts (default: N / B each; one image takes any
        N). The decoder graph takes one image against its prompts; a batch runs image by image."""
        batch = features.activations[0].shape[0]
        projection_dim = self.config.clip.projection_dim
        prompts_per_image = prompts_per_image_of(conditional, batch, projection_dim, prompts_per_image)
        starts = [sum(prompts_per_image[:row]) for row in range(batch)]
        return torch.cat(
            [
                self._decode_one(
                    [a[row : row + 1] for a in features.activations],
                    conditional[start : start + count],
                    features.grid,
                )
                for row, (start, count) in enumerate(zip(starts, prompts_per_image))
                if count
            ]
        )

    def _decode_one(self, activations: list[Tensor], conditional: Tensor, grid: tuple[int, int]) -> Tensor:
        inputs = dict(zip(self.activation_names, activations))
        (logits,) = self._run("decoder", grid=torch.tensor(grid), conditional=conditional.float(), **inputs)
        return logits


class OnnxCLIPSeg(ExportedCLIPSeg):
    """CLIPSeg's exported graphs in onnxruntime sessions (CPU), with `CLIPSeg`'s inference interface.

    directory: the folder `export.py` wrote. threads: onnxruntime intra-op threads (default: its own choice).
    manifest: the folder's manifest when the caller has it already (`clipseg.onnx.export`, before it writes it)."""

    runtime = "onnxruntime"

    def __init__(self, directory: str | os.PathLike, threads: int | None = None, manifest: dict | None = None):
        super().__init__()
        ort = import_onnxruntime()
        self.directory = Path(directory)
        self.manifest = manifest if manifest is not None else read_manifest(self.directory)
        try:
            self.config = CLIPSegConfig.from_hf_dict(self.manifest["config"], f"{self.directory / MANIFEST_NAME}")
        except CheckpointError as err:
            raise OnnxBackendError(f"{err}; export the model again") from err
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        graphs = self.manifest["graphs"]
        self.sessions = {
            name: open_graph(ort, self.directory / file, graphs[name]["sha256"], options)
            for name, file in GRAPH_FILES.items()
        }
        for name, session in self.sessions.items():
            inputs = [node.name for node in session.get_inputs()]
            check_graph_inputs(name, inputs, self.directory / GRAPH_FILES[name], OnnxBackendError)
        self.activation_names = [output.name for output in self.sessions["image_encoder"].get_outputs()]
        (width,) = [node.shape[-1] for node in self.sessions["decoder"].get_inputs() if node.name == "conditional"]
        width = width if isinstance(width, int) else None
        check_config_fits(
            self.config, len(self.activation_names), width, self.directory / MANIFEST_NAME, OnnxBackendError
        )

    def _run(self, graph: str, **inputs: Tensor) -> list[Tensor]:
        feed = {name: np.ascontiguousarray(value.detach().cpu().numpy()) for name, value in inputs.items()}
        return [torch.from_numpy(output) for output in self.sessions[graph].run(None, feed)]
