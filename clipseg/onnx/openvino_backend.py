"""Run a CLIPSeg exported to OpenVINO IR (`clipseg.onnx.openvino_export`) in OpenVINO on the CPU, through the same
`Predictor` as the PyTorch model.

    model = OpenVinoCLIPSeg("exported_ov/")                  # manifest.json + the four graphs as .xml/.bin
    model.precision                                           # 'fp32', 'bf16' or 'int8': fixed at export
    predictor = Predictor(model)
    logits = model.decode(model.encode_image(pixel_values), model.embed_text(["a cat", "the sofa"]))  # (2, 1, H, W)

The graphs are the four export.py writes (`clipseg.onnx.backend.GRAPH_FILES`: the image encoded once for many
prompts, the vision tower stopping at the deepest block the decoder reads), converted to OpenVINO; any image side
that is a multiple of the patch, any number of prompts. `OpenVinoCLIPSeg` shares `OnnxCLIPSeg`'s interface
(`clipseg.onnx.backend.ExportedCLIPSeg`). Its precision is the export's, applied by OpenVINO:

- `fp32`: OpenVINO's `INFERENCE_PRECISION_HINT` f32 (on AMX and AVX512-BF16 CPUs OpenVINO's default is bf16).
- `bf16`: the hint bf16, on CPUs that compute bf16 natively (`openvino_bf16`); refused elsewhere, where OpenVINO
  would silently run f32.
- `int8`: an image encoder quantised by NNCF (int8 weights and activations) and a text encoder with int8 weights
  (computed in f32); what stays in floating point (the layers left unquantised, the decoder's attention and
  feed-forward layers) computes in bf16 on CPUs with native bf16, else f32; the rest of the decoder in f32.

The graphs take any shape; once a graph has run `static_after` times (default STATIC_AFTER) on one input shape
(the decoder: one patch grid and prompt count), it is also compiled for exactly that shape, which runs faster
(`compile_for`; the image encoder's takes about 7 s at ViT-B/16). The two compilations round differently (ViT-B/16
int8: activations within 0.03 of each other, masks within the export's agreement bar), so an image's logits then
depend on how many images of its shape came before it in the process: scoring (score.py, failure_test.py) turns
it off (`static_after=None`) so that its numbers do not.

The Predictor adds nothing on the PyTorch side (`precisions` is ('fp32',): no autocast, no quantisation).

An export folder is untrusted until checked: manifest.json must be one `export_openvino` wrote (format, version,
precision, a SHA-256 per file, an accuracy check that passed its bar); each .xml and .bin must have the SHA-256 the
manifest records before OpenVINO reads it; whatever OpenVINO refuses is an `OpenVinoBackendError` naming the file.
One call at a time per instance (each graph has one inference request). Optional: pip install -r
requirements-openvino.txt.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import gc
import numbers
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from clipseg.config import CLIPSegConfig
from clipseg.onnx.backend import (
    GRAPH_FILES,
    MANIFEST_NAME,
    SHA256,
    ExportedCLIPSeg,
    check_config_fits,
    check_graph_inputs,
    manifest_of,
    read_checked,
)
from clipseg.onnx.openvino_compiled import compiled_key, import_compiled, keep_compiled
from clipseg.precision import PRECISIONS
from clipseg.weights import CheckpointError

if TYPE_CHECKING:  # openvino is optional: imported by `import_openvino`
    from openvino import Core, InferRequest, Model

REQUIREMENTS_FILE = "requirements-openvino.txt"
FORMAT = "clipseg-openvino"
FORMAT_VERSION = 1
IR_FILES = {name: (f"{name}.xml", f"{name}.bin") for name in GRAPH_FILES}  # graph -> (topology, weights)


class OpenVinoBackendError(RuntimeError):
    """The OpenVINO backend cannot run: openvino is missing, the CPU cannot run the export's precision, or the
    export folder is incomplete, changed, damaged or failed its accuracy check."""


def import_openvino() -> ModuleType:
    """The openvino module, or an OpenVinoBackendError naming the requirements file to install."""
    try:
        import openvino
    except ImportError as err:
        raise OpenVinoBackendError(
            f"the OpenVINO backend needs openvino, which is not installed: pip install -r {REQUIREMENTS_FILE}"
        ) from err
    return openvino


@functools.cache
def openvino_core() -> Core:
    """The process's one OpenVINO Core, its CPU plugin loaded, never released: every model here is read and
    compiled by it.

    On Linux, OpenVINO's CPU plugin gives the thread that loads it an alternate signal stack of its own (one per
    Core; signal frames with AMX state are large) and, when that Core is released, puts back the stack it found
    and unmaps its own. Cores released in another order than they were made leave the thread on an unmapped stack:
    the next signal with a Python handler (Ctrl-C, a SIGTERM handler) writes its frame into whatever memory took
    that place, and the process dies later, in the garbage collector. A Core that lives as long as the process keeps
    its stack valid."""
    core = import_openvino().Core()
    core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")  # the plugin, and its signal stack, now
    return core


class SignalStack(ctypes.Structure):
    """Linux's stack_t: an alternate signal stack as sigaltstack(2) takes and gives it."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def signal_stack() -> SignalStack | None:
    """The calling thread's alternate signal stack (sigaltstack(2)); None off Linux."""
    if sys.platform != "linux":
        return None
    stack = SignalStack()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) != 0:
        return None
    return stack


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Run a block that makes and releases OpenVINO Cores of its own (NNCF's quantisation does), then give the
    thread back the alternate signal stack it had before (`openvino_core`'s, which stays valid): those Cores,
    released in any order, may leave it on an unmapped one. Does nothing off Linux."""
    openvino_core()
    before = signal_stack()
    try:
        yield
    finally:
        gc.collect()  # NNCF's Cores sit in reference cycles: released now, not at some later collection
        if before is not None:
            ctypes.CDLL(None).sigaltstack(ctypes.byref(before), None)


def openvino_bf16() -> bool:
    """Whether OpenVINO computes bf16 on this CPU (AVX512-BF16 or AMX): its CPU plugin lists BF16 among its
    optimisation capabilities. Elsewhere it ignores a bf16 hint and runs f32."""
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_precision_runs(precision: str) -> None:
    """OpenVinoBackendError unless this CPU can run `precision` (an unknown one, or bf16 without native bf16)."""
    if precision not in PRECISIONS:
        raise OpenVinoBackendError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not openvino_bf16():
        raise OpenVinoBackendError(
            "precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where OpenVINO would run f32 instead; "
            "use an fp32 or int8 export"
        )


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an OpenVINO export folder; OpenVinoBackendError when it is not one `export_openvino` wrote,
    its accuracy check did not pass, or files are missing."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    hint = "it is not an OpenVINO export (export_openvino)"
    manifest = manifest_of(directory, (FORMAT, FORMAT_VERSION), OpenVinoBackendError, hint)
    if manifest.get("precision") not in PRECISIONS:
        raise OpenVinoBackendError(f"{path}: precision {manifest.get('precision')!r} is not one of {PRECISIONS}")
    files = manifest.get("files")
    for name in (file for pair in IR_FILES.values() for file in pair):
        digest = files.get(name) if isinstance(files, dict) else None
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise OpenVinoBackendError(f"{path}: no SHA-256 for {name}; export the model again")
    check_accuracy_record(manifest.get("accuracy_check"), path)
    missing = [file for pair in IR_FILES.values() for file in pair if not (directory / file).is_file()]
    if missing:
        raise OpenVinoBackendError(f"{directory}: missing graph files {missing}; export the model again")
    return manifest


def check_accuracy_record(check: object, path: Path) -> None:
    """OpenVinoBackendError unless the manifest's accuracy check is recorded (its mask agreement and bar shares in
    [0, 1]) and its mask agreement reached its bar."""
    numbers_given = isinstance(check, dict) and all(
        isinstance(check.get(key), numbers.Real) and not isinstance(check.get(key), bool) and 0 <= check[key] <= 1
        for key in ("mask_agreement", "bar")
    )
    if not numbers_given:
        raise OpenVinoBackendError(f"{path}: no valid accuracy check recorded; export the model again")
    if not check["mask_agreement"] >= check["bar"]:
        raise OpenVinoBackendError(
            f"{path}: its accuracy check failed (mask agreement with PyTorch fp32 {100 * check['mask_agreement']:.2f}% "
            f"< the bar {100 * check['bar']:.2f}%); refusing to run it"
        )


def read_graph(ov: ModuleType, core: Core, directory: Path, name: str, files: dict) -> Model:
    """The OpenVINO model of graph `name` once its .xml and .bin have the SHA-256s the manifest records;
    OpenVinoBackendError naming the file when they do not, or when OpenVINO cannot read it.

    OpenVINO gets the bytes that were checked (`read_checked`): reading from the paths would memory-map the
    weights, so that a file rewritten after the check would still reach later compilations."""
    topology, weights = (read_checked(directory / file, files[file], OpenVinoBackendError) for file in IR_FILES[name])
    try:
        return core.read_model(topology, ov.Tensor(np.frombuffer(weights, dtype=np.uint8).copy()))
    except Exception as err:  # OpenVINO raises RuntimeError and others for malformed IR
        path = directory / IR_FILES[name][0]
        raise OpenVinoBackendError(f"{path}: OpenVINO cannot read it ({err}); export the model again") from err


def inference_precision_hint(precision: str) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for an export in `precision`: f32 for fp32, bf16 for bf16; for int8 the
    floating-point rest in bf16 on CPUs with native bf16 (on AMX it took the image encoder from 121 to 102 ms, one
    thread, ViT-B/16 at 352 px), else f32."""
    if precision == "int8":
        return "bf16" if openvino_bf16() else "f32"
    return {"fp32": "f32", "bf16": "bf16"}[precision]


# The graphs an int8 export computes in f32. The decoder (1.1M parameters) in bf16 cost int8 about 0.1 points of
# mask agreement with PyTorch fp32 and in f32 about 4 ms a prediction (ViT-B/16 at 352 px with the refined head,
# random weights, one AMX thread: 99.63 / 99.65 / 99.65% on noise / the examples / generated scenes with the
# decoder in bf16, 99.74 / 99.74 / 99.76% in f32), which lets the faster int8 recipe pass the check with margin.
# A decoder whose graph marks the operations to keep in f32 (`precise_layers`; int8 exports mark all but its
# attention and feed-forward layers) takes the int8 hint instead: bf16 where marked nothing, f32 where marked.
FP32_IN_INT8 = ("text_encoder", "decoder")
# The runtime-info key under which OpenVINO holds an IR layer's `precise` attribute (<rt_info><attribute
# name="precise" version="0"/></rt_info>): its CPU plugin computes such an operation in f32 under a bf16 hint.
PRECISE_KEY = "DisablePrecisionConversion_0"


def precise_layers(model: Model) -> list[str]:
    """The names of `model`'s operations marked to compute in f32 whatever the hint (PRECISE_KEY)."""
    return [op.get_friendly_name() for op in model.get_ordered_ops() if PRECISE_KEY in op.get_rt_info()]


def compile_config(precision: str, threads: int | None, graph: str = "image_encoder", marked: bool = False) -> dict:
    """OpenVINO's CPU compile options for `graph` of an export in `precision`: its inference precision, latency mode,
    `threads` threads. An int8 export computes two graphs in f32 (FP32_IN_INT8): the text encoder, whose weights
    are int8 (at a prompt's few tokens f32 was faster than bf16), and the decoder, whose masks moved most in bf16,
    unless `marked`: its graph marks the operations kept in f32 (`precise_layers`), and the rest takes int8's hint."""
    if precision == "int8" and graph in FP32_IN_INT8 and not (graph == "decoder" and marked):
        hint = "f32"
    else:
        hint = inference_precision_hint(precision)
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


# Calls of a graph with one input shape after which it is compiled for that shape. At ViT-B/16 (int8, one AMX
# thread) the image encoder's compilation took about 6.5 s and saved about 9 ms an image (120 -> 111 ms a
# prediction): it pays back after some 700 more images, so only a shape that has already come 256 times gets it.
# The text encoder (0.2 s, 7.2 -> 5.6 ms at a prompt of 8 tokens) and the decoder (0.07 s, 10.0 -> 8.9 ms) pay back
# sooner and follow the same rule.
STATIC_AFTER = 256
STATIC_SHAPES = 4  # at most this many shapes of each graph are compiled so per instance
# Inputs whose values (not only their shapes) set the shapes inside a graph: a graph compiled for a shape has them
# folded in as constants.
VALUE_INPUTS = ("grid",)


class OpenVinoCLIPSeg(ExportedCLIPSeg):
    """CLIPSeg's graphs compiled by OpenVINO for the CPU, with `CLIPSeg`'s inference interface.

    directory: the folder `export_openvino` wrote. threads: OpenVINO's inference threads (default: its own choice).
    manifest and models: the export's manifest and OpenVINO models when the caller has them in memory
    (`export_openvino` checks them before it writes anything); the folder is then not read. static_after: after
    this many calls of a graph with one input shape (for the decoder: one patch grid and prompt count), that graph
    is compiled for that shape (`compile_for`), for up to STATIC_SHAPES shapes per graph; None: never.
    compiled: a folder of graphs compiled for this CPU (`clipseg.onnx.openvino_compiled`): each graph is imported
    from it when it holds it, else compiled and kept there; its .xml and .bin are then read only when needed."""

    runtime = "OpenVINO"

    def __init__(
        self,
        directory: str | os.PathLike,
        threads: int | None = None,
        manifest: dict | None = None,
        models: dict | None = None,
        static_after: int | None = STATIC_AFTER,
        compiled: Path | None = None,
    ):
        super().__init__()
        import_openvino()  # its clear error, also where the Core was made before (it is the process's one)
        self.core = openvino_core()
        self.directory = Path(directory)
        self.manifest = manifest if manifest is not None else read_manifest(self.directory)
        where = self.directory / MANIFEST_NAME
        try:
            self.config = CLIPSegConfig.from_hf_dict(self.manifest["config"], f"{where}")
        except CheckpointError as err:
            raise OpenVinoBackendError(f"{err}; export the model again") from err
        self.precision = self.manifest["precision"]
        check_precision_runs(self.precision)
        self.threads, self.static_after = threads, static_after
        self.models = dict(models or {})
        if compiled is None:
            self.requests = {name: self.compile(self.model(name), name) for name in IR_FILES}
        else:
            self.requests = {name: self.compile_or_import(name, compiled) for name in IR_FILES}
        for name, request in self.requests.items():
            inputs = [node.get_any_name() for node in request.model_inputs]
            check_graph_inputs(name, inputs, self.directory / IR_FILES[name][0], OpenVinoBackendError)
        self.activation_names = [output.get_any_name() for output in self.requests["image_encoder"].model_outputs]
        (width,) = [
            node.get_partial_shape()[-1] for node in self.requests["decoder"].model_inputs
            if node.get_any_name() == "conditional"
        ]  # fmt: skip
        width = width.get_length() if width.is_static else None
        check_config_fits(
            self.config, len(self.activation_names), width, self.directory / MANIFEST_NAME, OpenVinoBackendError
        )
        self.static_requests: dict[tuple, object] = {}  # (graph, shape key) -> request compiled for that shape
        self.shape_counts: collections.Counter = collections.Counter()

    def model(self, graph: str) -> Model:
        """`graph`'s OpenVINO model, read from the folder (and checked, `read_graph`) when first needed."""
        if graph not in self.models:
            self.models[graph] = read_graph(import_openvino(), self.core, self.directory, graph, self.manifest["files"])
        return self.models[graph]

    def compile(self, model: Model, graph: str) -> InferRequest:
        """An inference request of `model` (graph `graph`) compiled for the CPU; OpenVinoBackendError if it cannot."""
        return self._compiled(model, graph, self.options(model, graph)).create_infer_request()

    def options(self, model: Model, graph: str) -> dict:
        """OpenVINO's compile options for `model`, graph `graph` of this export (`compile_config`)."""
        return compile_config(self.precision, self.threads, graph, marked=bool(precise_layers(model)))

    def _compiled(self, model, graph: str, options: dict):
        try:
            return self.core.compile_model(model, "CPU", options)
        except Exception as err:  # OpenVINO's compile errors are RuntimeError and others
            raise OpenVinoBackendError(
                f"{self.directory / IR_FILES[graph][0]}: OpenVINO cannot compile it ({err}); export the model again"
            ) from err

    def compile_or_import(self, graph: str, folder: Path) -> InferRequest:
        """`graph`'s inference request, imported from the compiled graphs in `folder`, else compiled and kept there."""
        digests = [self.manifest["files"][file] for file in IR_FILES[graph]]
        key = compiled_key(self.core, digests, {"precision": self.precision, "threads": self.threads})
        compiled = import_compiled(self.core, folder, key)
        if compiled is None:
            model = self.model(graph)
            options = self.options(model, graph)
            compiled = self._compiled(model, graph, options)
            keep_compiled(folder, key, compiled, options)
        return compiled.create_infer_request()

    def compile_for(self, graph: str, feed: dict[str, np.ndarray]) -> None:
        """Compile `graph` for inputs of exactly the shapes of `feed` (its VALUE_INPUTS folded in as constants), used
        from then on for those. The image encoder: about 7 s at ViT-B/16 (mostly folding the position-embedding
        resize into constants); one AMX thread, 352 px, int8, a prediction then took 111 ms instead of 120: the
        shape-generic graph keeps parts of attention and the elementwise operations apart."""
        key = (graph, shape_key(feed))
        if key in self.static_requests:
            return
        ov = import_openvino()
        model = self.model(graph).clone()
        for parameter in [p for p in model.get_parameters() if p.get_friendly_name() in VALUE_INPUTS]:
            constant = ov.op.Constant(feed[parameter.get_friendly_name()])
            for target in list(parameter.output(0).get_target_inputs()):
                target.replace_source_output(constant.output(0))
            model.remove_parameter(parameter)
        model.reshape({name: list(value.shape) for name, value in feed.items() if name not in VALUE_INPUTS})
        self.static_requests[key] = self.compile(model, graph)

    def checked_elsewhere(self) -> str | None:
        """A note when this int8 export's accuracy check ran on a CPU of another class (`precision.cpu_class`:
        AMX, VNNI, neither) than this one, whose int8 kernels round (and without VNNI, saturate) differently, so
        the check does not vouch for the masks here; None otherwise (and for exports older than the record)."""
        from clipseg.precision import FASTEST_BY_CPU_CLASS, cpu_class

        checked_on, here = self.manifest.get("accuracy_check", {}).get("cpu_class"), cpu_class()
        if self.precision != "int8" or checked_on in (None, here):
            return None
        checked_on = checked_on if checked_on in FASTEST_BY_CPU_CLASS else "unknown"  # the file's text is not echoed
        return (
            f"{self.directory} was checked against PyTorch on a CPU of class {checked_on} and this one is of class "
            f"{here}, whose int8 kernels differ: export it again on this CPU (export.py --openvino "
            "--precision int8) for a check that holds here"
        )

    def inference_precision(self) -> str:
        """The precision OpenVINO compiled the image encoder for ('f32' or 'bf16'), as its CPU plugin reports it."""
        compiled = self.requests["image_encoder"].get_compiled_model()
        return compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def request(self, graph: str, feed: dict[str, np.ndarray]) -> InferRequest:
        """`graph`'s request for `feed`: one compiled for its shapes (made once they were seen `static_after` times,
        up to STATIC_SHAPES shapes per graph), else the shape-generic one."""
        key = (graph, shape_key(feed))
        if key not in self.static_requests and self.static_after is not None:
            self.shape_counts[key] += 1
            compiled = sum(name == graph for name, _ in self.static_requests)
            if self.shape_counts[key] >= self.static_after and compiled < STATIC_SHAPES:
                try:
                    self.compile_for(graph, feed)
                except OpenVinoBackendError as err:  # e.g. the folder was removed since it was opened: not needed
                    self.static_after = None
                    print(f"note: {err}; graphs are no longer compiled per shape in this run", file=sys.stderr)
        return self.static_requests.get(key, self.requests[graph])

    def _run(self, graph: str, **inputs: Tensor) -> list[Tensor]:
        feed = {name: np.ascontiguousarray(value.detach().cpu().numpy()) for name, value in inputs.items()}
        request = self.request(graph, feed)
        if request is not self.requests[graph]:
            feed = {name: value for name, value in feed.items() if name not in VALUE_INPUTS}
        results = request.infer(feed, share_outputs=False)
        return [torch.from_numpy(results[output]) for output in request.model_outputs]


def shape_key(feed: dict[str, np.ndarray]) -> tuple:
    """What a graph compiled for `feed`'s shapes is compiled for: each input's shape, and the values of VALUE_INPUTS."""
    return tuple(
        (name, tuple(value.tolist()) if name in VALUE_INPUTS else value.shape) for name, value in sorted(feed.items())
    )
