"""Which runtime runs the model of a command: PyTorch (`torch`), or a folder export.py wrote run in onnxruntime
(`onnx`, fp32) or in OpenVINO (`openvino`, fp32, bf16 or int8 as exported). The commands take `--backend`
(`clipseg.cli.add_backend_flag`); what contradicts it among their other flags is `backend_flag_error`, and the
export is opened here (`open_export`, through `clipseg.loading.load_model`); the PyTorch model is loaded as before.

    backend_flag_error("openvino", "exported_ov/", None, "cpu", None, None)  # None, or what to change
    model = open_export("openvino", "exported_ov/", precision=None)           # an ExportedCLIPSeg; model.precision

An export computes in the precision it was written in: `--precision`, when given, must be that one.

predict.py and app.py also take `--backend auto`, their default (or $CLIPSEG_BACKEND's value): `auto_backend` picks
the backend of an export folder given as --model, PyTorch when a precision or a device is asked for, else the
fastest measured path of this CPU (`clipseg.precision.default_path`), which may be OpenVINO run from a conversion of
the PyTorch model made once and cached (`clipseg.onnx.openvino_cache`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from clipseg.onnx.backend import MANIFEST_NAME, ExportedCLIPSeg, OnnxBackendError, OnnxCLIPSeg
from clipseg.precision import default_path

BACKENDS = ("torch", "onnx", "openvino")
BACKEND_VARIABLE = "CLIPSEG_BACKEND"  # the default of predict.py's and app.py's --backend when set (else auto)
EXPORT_FORMATS = {"clipseg-onnx": "onnx", "clipseg-openvino": "openvino"}  # manifest.json "format" -> backend
EXPORT_COMMANDS = {
    "onnx": "python export.py MODEL EXPORT_DIR",
    "openvino": "python export.py MODEL EXPORT_DIR --openvino",
}


class ExportUnusable(RuntimeError):
    """An export folder that cannot run here: its runtime is missing, or the folder is not a checked export, or it
    is in another precision than the one asked for. The message says what to do."""


def backend_flag_error(
    backend: str, model: str | None, checkpoint: str | None, device: str, precision: str | None, amp: bool | None
) -> str | None:
    """What makes `--backend` contradict the other flags (a usage error to print), or None. An export needs
    --model EXPORT_DIR and no --checkpoint, runs on the CPU, and the ONNX one in fp32 only (`precision` and `amp`
    as given: amp True is --amp, the old spelling of --precision bf16)."""
    if backend == "torch":
        return None
    if model is None:
        return f"--backend {backend} needs --model EXPORT_DIR: the folder `{EXPORT_COMMANDS[backend]}` wrote"
    if checkpoint:
        return f"--checkpoint picks a PyTorch checkpoint; with --backend {backend} give the export folder as --model"
    runtime = "onnxruntime" if backend == "onnx" else "OpenVINO"
    if torch.device(device).type != "cpu":
        return f"--backend {backend} runs on the CPU ({runtime}), not on --device {device}"
    if backend == "onnx" and (amp or precision not in (None, "fp32")):
        asked = "--amp" if amp else f"--precision {precision}"
        return f"--backend onnx runs the fp32 graphs export.py wrote; {asked} is for --backend torch or openvino"
    return None


def wrong_precision(backend: str, directory: str | os.PathLike, exported: str, asked: str) -> str:
    return (
        f"{directory} is a {exported} export; --precision {asked} needs an export in {asked}: "
        f"{EXPORT_COMMANDS[backend]} --precision {asked}"
    )


def open_export(
    backend: str,
    directory: str | os.PathLike,
    precision: str | None = None,
    threads: int | None = None,
    compiled: Path | None = None,
) -> ExportedCLIPSeg:
    """The export folder `directory` opened in `backend`'s runtime, checked (manifest, SHA-256s, for OpenVINO its
    accuracy check), with `threads` threads (default: the runtime's choice). precision: the one the command was
    asked for (None: the export's own); ExportUnusable when the export is in another, or cannot be run. compiled:
    for OpenVINO, a folder where its graphs compiled for this CPU are kept (`clipseg.onnx.openvino_compiled`)."""
    try:
        if backend == "onnx":
            runner = OnnxCLIPSeg(directory, threads=threads)
        elif backend == "openvino":
            from clipseg.onnx.openvino_backend import OpenVinoBackendError, OpenVinoCLIPSeg

            try:
                runner = OpenVinoCLIPSeg(directory, threads=threads, compiled=compiled)
            except OpenVinoBackendError as err:
                raise ExportUnusable(str(err)) from err
        else:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS[1:])}")
    except OnnxBackendError as err:
        raise ExportUnusable(str(err)) from err
    if precision not in (None, runner.precision):
        raise ExportUnusable(wrong_precision(backend, directory, runner.precision, precision))
    return runner


def export_backend(model: str | None) -> str | None:
    """The backend of the export folder `model` names ('onnx' or 'openvino', by its manifest's format), or None when
    it is not an export folder (a run, a hub id, a file)."""
    manifest = Path(model) / MANIFEST_NAME if model else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        return EXPORT_FORMATS.get(json.loads(manifest.read_text()).get("format"))
    except (OSError, ValueError, AttributeError):
        return None  # opened as an export or a model later, where the error is reported


def auto_backend(model: str | None, device: str, precision_asked: bool, job: str = "predict") -> tuple[str, str | None]:
    """What `--backend auto` runs: (backend, precision to convert to, or None). An export folder runs in its backend;
    an asked precision or a non-CPU device runs PyTorch; else this CPU's fastest measured path (`default_path`): for
    OpenVINO, the PyTorch model converted to it in that precision (`clipseg.onnx.openvino_cache`)."""
    exported = export_backend(model)
    if exported:
        return exported, None
    if precision_asked or torch.device(device).type != "cpu":
        return "torch", None
    backend, precision = default_path(device, job)
    return (backend, precision) if backend != "torch" else ("torch", None)
