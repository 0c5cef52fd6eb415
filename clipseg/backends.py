"""Which runtime runs the model of a command: PyTorch (`torch`), or a folder export.py wrote run in onnxruntime
(`onnx`, fp32) or in OpenVINO (`openvino`, fp32, bf16 or int8 as exported). The commands take `--backend`
(`clipseg.cli.add_backend_flag`); what contradicts it among their other flags is `backend_flag_error`, and the
export is opened here (`open_export`, through `clipseg.loading.load_model`); the PyTorch model is loaded as before.

    backend_flag_error("openvino", "exported_ov/", None, "cpu", None, None)  # None, or what to change
    model = open_export("openvino", "exported_ov/", precision=None)           # an ExportedCLIPSeg; model.precision

An export computes in the precision it was written in: `--precision`, when given, must be that one.
"""

from __future__ import annotations

import os

import torch

from clipseg.onnx.backend import ExportedCLIPSeg, OnnxBackendError, OnnxCLIPSeg

BACKENDS = ("torch", "onnx", "openvino")
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
    backend: str, directory: str | os.PathLike, precision: str | None = None, threads: int | None = None
) -> ExportedCLIPSeg:
    """The export folder `directory` opened in `backend`'s runtime, checked (manifest, SHA-256s, for OpenVINO its
    accuracy check), with `threads` threads (default: the runtime's choice). precision: the one the command was
    asked for (None: the export's own); ExportUnusable when the export is in another, or cannot be run."""
    try:
        if backend == "onnx":
            runner = OnnxCLIPSeg(directory, threads=threads)
        elif backend == "openvino":
            from clipseg.onnx.openvino_backend import OpenVinoBackendError, OpenVinoCLIPSeg

            try:
                runner = OpenVinoCLIPSeg(directory, threads=threads)
            except OpenVinoBackendError as err:
                raise ExportUnusable(str(err)) from err
        else:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS[1:])}")
    except OnnxBackendError as err:
        raise ExportUnusable(str(err)) from err
    if precision not in (None, runner.precision):
        raise ExportUnusable(wrong_precision(backend, directory, runner.precision, precision))
    return runner
