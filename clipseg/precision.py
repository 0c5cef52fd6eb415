"""Inference precision: `fp32`, `bf16` or `int8`, one choice for every script that runs the model, and the
default each job takes on each class of CPU (`default_precision`, the rule and its measurements below).

    precision = resolve_precision(args.precision, device, job="predict")  # None -> default_precision(device, job)
    prepare_model(model, precision, device)                               # int8: quantises in place
    with torch.no_grad(), precision_context(precision, device):
        logits = model(pixel_values, phrases).logits

- `fp32`: the model as it is (its frozen CLIP blocks run from their parts, `clipseg.frozen_clip`: transformers'
  arithmetic, bit for bit, in fewer tensors).
- `bf16`: `torch.autocast` in `amp_dtype(device)` (what `--amp` always meant): bf16 on CPUs with native bf16
  (AVX512-BF16 or AMX) and on GPUs that have it, fp16 on older GPUs. On a CPU without native bf16 PyTorch would
  emulate it several times slower than fp32, so `bf16` runs fp32 there, with a warning. Under autocast the frozen
  CLIP blocks (vision and text) and the patch embedding run from copies of their weights in the autocast dtype,
  made once, not cast again on every call (`clipseg.frozen_clip`); the path follows the autocast state, never the
  CPU, so tests force it anywhere.
- `int8`: dynamic int8 quantisation of the `nn.Linear` layers of the image-tower blocks that the segmentation pass
  runs (blocks 0 .. max(extract_layers): CLIP's vision tower, or ViTSeg's ImageNet ViT) with PyTorch's own
  `torch.ao.quantization.quantize_dynamic` on the CPU (fbgemm/oneDNN kernels): int8 weights with a scale per output
  channel, activations quantised per call, to 8 bits on CPUs with VNNI (else to PyTorch's default 7). The text tower
  and the decoder stay fp32. Image prompts (`embed_images`) run through the quantised blocks too. Every CPU runs it
  (without VNNI only slower); CPU only.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from clipseg.baselines import vit_layers
from model import CLIPSeg, ViTSeg

PRECISIONS = ("fp32", "bf16", "int8")
JOBS = ("score", "predict")  # what a command runs the model for: see default_precision
MASK_AGREEMENT_BAR = 0.995  # a default precision's masks agree with fp32's on at least this share of pixels


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


# The default precision of prediction (predict.py, app.py) on a CPU: the fastest path whose masks agree with fp32's
# on >= 99.5% of pixels (MASK_AGREEMENT_BAR), by CPU class, measured with `python bench.py --repeats 3
# --rows precision --threads 1 --clock cpu` at the full ViT-B/16 geometry (352 px, random weights, one prompt per
# image, batch 1, CPU time on one thread; mask agreement: probability > 0.3 against our fp32). Speed-ups over the HF
# class in fp32 (README, "Precision and ONNX", has the full tables):
#
# | CPU class (`cpu_class`)               | measured on                  | bf16                | int8          | rule |
# |---------------------------------------|------------------------------|---------------------|---------------|------|
# | amx: AMX (amx_bf16)                   | Intel Xeon, AMX              | 2.46x, 99.60%       | 1.88x, 99.65% | bf16 |
# | vnni: AVX512-VNNI or AVX-VNNI, no AMX | AMD EPYC, AVX512-VNNI, -BF16 | 1.93x, 99.59%       | 2.88x, 99.66% | int8 |
# | other: neither (e.g. AVX2 only)       | AMD EPYC, AVX2               | emulated, 8x slower | 1.59x, 99.48% | fp32 |
#
# AMX: its bf16 tiles beat int8's VNNI dot products (293 ms against 382 ms, HF fp32 719 ms; an earlier wall-clock
# run on two cores: bf16 2.74x, int8 1.81x at batch 1, 4.01x and 1.19x at batch 8). VNNI without AMX: int8 with
# 8-bit activations beat even native AVX512-BF16. Neither: int8 keeps PyTorch's 7-bit activations and falls below
# the bar, bf16 is emulated, so fp32 (our fp32 forward: 1.20x). `python bench.py --rows precision` prints whether the
# rule picks this machine's fastest measured path that meets the bar (clipseg/speed/models.py, `default_check`).
# Scoring, failure analysis and train.py's validation run fp32 on every CPU: the paper's numbers are fp32. GPUs:
# fp32 (not measured here; --precision bf16 asks for bf16).
FASTEST_BY_CPU_CLASS = {"amx": "bf16", "vnni": "int8", "other": "fp32"}
# Where OpenVINO (optional: requirements-openvino.txt) is installed, prediction on these CPU classes runs the model
# converted to OpenVINO in this precision (`default_path`; the conversion is made once per model and cached,
# clipseg/onnx/openvino_cache.py). The same bench.py command with its OpenVINO rows (README "The OpenVINO backend",
# with the refined head), batch 1, OpenVINO's graphs compiled for the shape:
# - amx, on an AMX Xeon (2026-12-04): OpenVINO int8 5.73x HF fp32 (5.95x in another run), 4.83x shape-generic
#   (99.58% agreement on noise, 99.67% on scenes), against PyTorch bf16 4.23x (99.58%) and OpenVINO bf16 4.25x.
# - vnni, on an AMD EPYC with AVX512-VNNI and AVX512-BF16 (2026-12-04): OpenVINO int8 4.33x (99.57% / 99.66%),
#   against OpenVINO bf16 2.73x, PyTorch int8 2.90x and PyTorch bf16 2.03x.
# - other: not measured on such a CPU. On the EPYC limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 and the like) OpenVINO
#   int8 was no faster than fp32 (its int8 products without VNNI: a generic GEMM at fp32's rate), so it keeps PyTorch.
OPENVINO_BY_CPU_CLASS = {"amx": "int8", "vnni": "int8"}
# ... for models at least as large as the one measured (ViT-B/16: a vision tower 768 wide); smaller ones (the demo's
# tiny model) stay in PyTorch, where a conversion would cost more than it saves.
OPENVINO_MIN_VISION_WIDTH = 768


def cpu_capabilities() -> dict:
    """The CPU's instruction-set extensions as torch detects them (`torch.cpu.get_capabilities()`; {} without it)."""
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


def cpu_class() -> str:
    """'amx' (AMX bf16 tiles), 'vnni' (AVX512-VNNI or AVX-VNNI without AMX) or 'other' (e.g. AVX2 only): the classes
    of `FASTEST_BY_CPU_CLASS`."""
    capabilities = cpu_capabilities()
    if capabilities.get("amx_bf16"):
        return "amx"
    if capabilities.get("avx512_vnni") or capabilities.get("avx_vnni"):
        return "vnni"
    return "other"


def default_precision(device: str | torch.device, job: str = "score") -> str:
    """The precision a command runs when asked for none. job 'score' (score.py, failure_test.py, train.py's
    validation): fp32 everywhere, as the paper's numbers were measured. job 'predict' (predict.py, app.py): on a CPU
    the fastest that keeps fp32's masks, by CPU class (`FASTEST_BY_CPU_CLASS`, with the measurements above); fp32 on
    GPUs."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; one of {', '.join(JOBS)}")
    if job == "score" or torch.device(device).type != "cpu":
        return "fp32"
    fastest = FASTEST_BY_CPU_CLASS[cpu_class()]
    return "fp32" if fastest == "bf16" and amp_dtype(device) is None else fastest  # never emulated bf16


def openvino_installed() -> bool:
    """Whether the OpenVINO backend's requirements (openvino, and nncf for int8) can be imported; not imported here."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


def default_path(device: str | torch.device, job: str = "score") -> tuple[str, str]:
    """The (backend, precision) a command runs when asked for neither: prediction on a CPU whose class is in
    `OPENVINO_BY_CPU_CLASS` runs OpenVINO when it is installed; everything else PyTorch in `default_precision`."""
    if job == "predict" and torch.device(device).type == "cpu":
        precision = OPENVINO_BY_CPU_CLASS.get(cpu_class())
        if precision and openvino_installed():
            return "openvino", precision
    return "torch", default_precision(device, job)


def requested_precision(precision: str | None, amp: bool | None) -> str | None:
    """--precision merged with its old spelling: --amp means bf16, --no-amp fp32 (amp None: not given). Raises
    ValueError when the two contradict each other."""
    if amp is None:
        return precision
    alias, flag = ("bf16", "--amp") if amp else ("fp32", "--no-amp")
    if precision not in (None, alias):
        raise ValueError(f"{flag} means --precision {alias}; it contradicts --precision {precision}: give one")
    return alias


def resolve_precision(
    precision: str | None,
    device: str | torch.device,
    amp: bool | None = None,
    supported: Sequence[str] = PRECISIONS,
    job: str = "score",
) -> str:
    """The precision a run will use: `precision` as asked (None: `default_precision(device, job)`, or the first of
    `supported` when a backend cannot run the default); `amp` is the old spelling (True: 'bf16', False: 'fp32').

    Raises ValueError with the fix for combinations that cannot run: an unknown precision, `amp` with another
    precision, int8 on a non-CPU device, a precision the backend does not support. bf16 on a CPU without native
    bf16 returns 'fp32' with a warning (emulated bf16 would be several times slower than fp32)."""
    device = torch.device(device)
    precision = requested_precision(precision, amp)
    if precision is None:
        default = default_precision(device, job)
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
    """Replace the `nn.Linear` layers of image-tower blocks 0 .. max(extract_layers) by dynamic int8 ones; returns
    how many layers were replaced (0 when already done)."""
    return sum(quantize_linears(block) for block in segmentation_blocks(model))


def segmentation_blocks(model: CLIPSeg) -> list[nn.Module]:
    """The image-tower blocks a segmentation pass runs, 0 .. max(extract_layers): CLIP's vision blocks (CLIPSeg,
    CLIP-Deconv, any CLIP backbone) or, for ViTSeg, its ImageNet ViT's."""
    tower = vit_layers(model.vit) if isinstance(model, ViTSeg) else model.clip.vision_model.encoder.layers
    return list(tower[: max(model.config.extract_layers) + 1])


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
    capabilities = cpu_capabilities()
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
            try:
                return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)
            except RuntimeError:  # its input's range cannot be quantised: NaN or infinite values already
                if bool(torch.isfinite(x).all()):
                    raise
                return torch.full(x.shape[:-1] + (self.out_features,), torch.nan, dtype=x.dtype, device=x.device)

    return FullRangeDynamicQuantizedLinear


def precision_context(precision: str, device: str | torch.device) -> AbstractContextManager:
    """The context to run a prepared model in: autocast for bf16 (`autocast`), nothing for fp32 and int8."""
    return autocast(device) if precision == "bf16" else nullcontext()
