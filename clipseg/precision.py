"""Inference precision: `fp32`, `bf16` or `int8`, one choice for every script that runs the model.

    precision = resolve_precision(args.precision, device, amp=args.amp)   # None -> default_precision(device)
    prepare_model(model, precision, device)                              # int8: quantises in place
    with torch.no_grad(), precision_context(precision, device):
        logits = model(pixel_values, phrases).logits

- `fp32`: the model as it is (its frozen CLIP blocks run from their parts, `clipseg.frozen_clip`: transformers'
  arithmetic, bit for bit, in fewer tensors).
- `bf16`: `torch.autocast` in `model.amp_dtype(device)` (what `--amp` always meant): bf16 on CPUs with native bf16
  (AVX512-BF16 or AMX) and on GPUs that have it, fp16 on older GPUs. On a CPU without native bf16 PyTorch would
  emulate it several times slower than fp32, so `bf16` runs fp32 there, with a warning. Under autocast the frozen
  CLIP blocks (vision and text) and the patch embedding run from copies of their weights in the autocast dtype,
  made once, not cast again on every call (`clipseg.frozen_clip`); the path follows the autocast state, never the
  CPU, so tests force it anywhere.
- `int8`: dynamic int8 quantisation of the `nn.Linear` layers of the vision blocks that the segmentation pass runs
  (blocks 0 .. max(extract_layers)) with PyTorch's own `torch.ao.quantization.quantize_dynamic` on the CPU
  (fbgemm/oneDNN kernels): int8 weights with a scale per output channel, activations quantised per call, to 8 bits
  on CPUs with VNNI (else to PyTorch's default 7). The text tower and the decoder stay fp32. Image prompts
  (`embed_images`) run through the quantised blocks too. CPU only.
"""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from model import CLIPSeg

PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_HELP = (
    "fp32; bf16 (autocast, where the CPU or GPU computes bf16 natively; fp32 with a warning on CPUs without it); "
    "int8 (dynamic int8 quantisation of the vision tower's linear layers, CPU only; decoder and text in fp32). "
    "Default: the fastest whose masks agree with fp32's on >= 99.5%% of pixels in bench.py: int8 on CPUs with VNNI, "
    "else bf16 where native, else fp32; fp32 on GPUs (README, 'Precision and ONNX')"
)
AMP_HELP = "the same as --precision bf16 (kept for existing command lines)"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX, or oneDNN's AVX512 path)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device: str | torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for `device`: bf16 where it is native (GPUs with bf16, CPUs with native bf16),
    fp16 on older GPUs (training then needs a gradient scaler), None (stay in fp32) elsewhere. On a CPU without
    native bf16 PyTorch emulates it: on an AVX2 EPYC a bf16 linear layer ran 8x slower than fp32 and a training
    step of the demo 5.6x slower, so mixed precision would only cost time there."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: str | torch.device, enabled: bool = True) -> AbstractContextManager:
    """`torch.autocast` in `amp_dtype(device)`; a no-op when not enabled or when fp32 is the better choice."""
    device = torch.device(device)
    dtype = amp_dtype(device) if enabled else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def default_precision(device: str | torch.device) -> str:
    """The precision the scripts use when asked for none.

    On a CPU: the fastest precision whose masks agree with fp32 on >= 99.5% of pixels at the full ViT-B/16
    geometry, as measured by `python bench.py --repeats 3 --only-precision` (README, 'Precision and ONNX'): int8
    where the CPU has VNNI (8-bit activations; with PyTorch's 7-bit ones int8 fell below 99.5%), else bf16 where
    it is native, else fp32. On GPUs: fp32 (not measured here; ask for bf16 with --precision bf16).
    """
    device = torch.device(device)
    if device.type != "cpu":
        return "fp32"
    if cpu_has_vnni():
        return "int8"
    return "bf16" if amp_dtype(device) == torch.bfloat16 else "fp32"  # native bf16 (model.cpu_has_native_bf16)


def resolve_precision(
    precision: str | None,
    device: str | torch.device,
    amp: bool = False,
    supported: Sequence[str] = PRECISIONS,
) -> str:
    """The precision a run will use: `precision` as asked (None: `default_precision(device)`, or the first of
    `supported` when a backend cannot run the default); `amp` is the old spelling of 'bf16'.

    Raises ValueError with the fix for combinations that cannot run: an unknown precision, `amp` with another
    precision, int8 on a non-CPU device, a precision the backend does not support. bf16 on a CPU without native
    bf16 returns 'fp32' with a warning (emulated bf16 would be several times slower than fp32)."""
    device = torch.device(device)
    if amp:
        if precision not in (None, "bf16"):
            raise ValueError(f"--amp means --precision bf16; it contradicts --precision {precision}: give one")
        precision = "bf16"
    if precision is None:
        default = default_precision(device)
        return default if default in supported else supported[0]
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision not in supported:
        raise ValueError(f"precision {precision} is not available for this backend; it runs {', '.join(supported)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(
            f"--precision int8 is dynamic int8 quantisation for the CPU; on {device.type} use --precision bf16 or fp32"
        )
    if precision == "bf16" and amp_dtype(device) is None:
        warnings.warn(
            f"--precision bf16: this {device.type} has no native bf16 and emulating it is several times slower "
            "than fp32, so the model runs in fp32",
            stacklevel=2,
        )
        return "fp32"
    return precision


def prepare_model(model: CLIPSeg, precision: str, device: str | torch.device | None = None) -> CLIPSeg:
    """Make `model` ready to run in `precision` (from `resolve_precision`) and return it.

    fp32 and bf16 leave the weights alone (bf16 is autocast at run time). int8 quantises the linear layers of
    vision blocks 0 .. max(extract_layers) in place (the model can no longer be trained or saved; load a fresh one
    for other precisions); it is idempotent. Raises ValueError for int8 on a model that is not on the CPU."""
    if precision != "int8":
        return model
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not on_cpu or (device is not None and torch.device(device).type != "cpu"):
        raise ValueError("int8 quantisation runs on the CPU only: move the model to the CPU (--device cpu)")
    quantize_vision_linears(model)
    return model


def quantize_vision_linears(model: CLIPSeg) -> int:
    """Replace the `nn.Linear` layers of vision blocks 0 .. max(extract_layers) by dynamic int8 ones; returns how
    many layers were replaced (0 when already done)."""
    blocks = model.clip.vision_model.encoder.layers[: max(model.config.extract_layers) + 1]
    return sum(quantize_linears(block) for block in blocks)


def quantize_linears(module: nn.Module, full_range: bool | None = None) -> int:
    """Replace the `nn.Linear` layers inside `module` (not `module` itself) by dynamic int8 ones, in place: qint8
    weights with a scale per output channel, activations quantised per call (one scale per tensor). Returns how
    many were replaced.

    full_range: quantise activations to 8 bits instead of PyTorch's default 7 (`reduce_range`, which keeps the
    pairwise int16 sums of CPUs without VNNI from saturating). Default: where the CPU has VNNI (AVX512-VNNI,
    AVX-VNNI or AMX), whose int8 dot products accumulate in int32. At the full ViT-B/16 geometry the masks agreed
    with fp32 on 99.66% of pixels with 8-bit activations against 99.43% with 7 (README, 'Precision and ONNX')."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as err:  # announced for removal; torch 2.13 still ships it (with a DeprecationWarning)
        raise RuntimeError(
            f"--precision int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} no "
            "longer has: use --precision bf16 or fp32, or torch<=2.13"
        ) from err
    if full_range is None:
        full_range = cpu_has_vnni()
    mapping = {"mapping": {nn.Linear: _full_range_dynamic_linear()}} if full_range else {}
    count = sum(isinstance(m, nn.Linear) for m in module.modules() if m is not module)
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.ao.quantization (moving to torchao) and quantized tensors; both still work.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True, **mapping)
    return count


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot products that accumulate in int32 (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(capabilities.get(name) for name in ("avx512_vnni", "avx_vnni", "amx_int8"))


@functools.cache
def _full_range_dynamic_linear() -> type:
    """A dynamic int8 linear layer that quantises its input to the full 8 bits (reduce_range=False)."""
    from torch.ao.nn.quantized.dynamic import Linear

    class FullRangeDynamicQuantizedLinear(Linear):
        def _get_name(self) -> str:
            return "FullRangeDynamicQuantizedLinear"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed = self._packed_params._packed_params
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)

    return FullRangeDynamicQuantizedLinear


def precision_context(precision: str, device: str | torch.device) -> AbstractContextManager:
    """The context to run a prepared model in: autocast for bf16 (`model.autocast`), nothing for fp32 and int8."""
    return autocast(device) if precision == "bf16" else nullcontext()


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """`--precision` and `--amp` (the old flag, = --precision bf16) for a script's command line."""
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    parser.add_argument("--amp", action="store_true", help=AMP_HELP)
