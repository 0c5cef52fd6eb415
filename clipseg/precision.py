"""Inference precision: `fp32`, `bf16` or `int8`, one choice for every script that runs the model.

    precision = resolve_precision(args.precision, device, amp=args.amp)   # None -> default_precision(device)
    prepare_model(model, precision, device)                              # int8: quantises in place
    with torch.no_grad(), precision_context(precision, device):
        logits = model(pixel_values, phrases).logits

- `fp32`: the model as it is (its frozen vision blocks through `run_frozen_block`: transformers' arithmetic, bit for
  bit, in fewer tensors).
- `bf16`: `torch.autocast` in `model.amp_dtype(device)` (what `--amp` always meant): bf16 on CPUs with native bf16
  (AVX512-BF16 or AMX) and on GPUs that have it, fp16 on older GPUs. On a CPU without native bf16 PyTorch would
  emulate it several times slower than fp32, so `bf16` runs fp32 there, with a warning. Under autocast the frozen
  CLIP blocks (vision and text) and the patch embedding run from copies of their weights in the autocast dtype,
  made once (`frozen_block_weights`, `patch_embedding`), not cast again on every call; the path follows the
  autocast state, never the CPU, so tests force it anywhere.
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
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # precision.py sits below model.py, which runs its frozen blocks through `run_frozen_block`
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


# ----------------------------------- the frozen CLIP blocks: fp32 from the weights, bf16 from persistent copies

QUICK_GELU_SCALE = 1.702  # CLIP's quick GELU: x * sigmoid(1.702 x) = silu(1.702 x) / 1.702
BIAS_COLUMNS = 32  # q/k/v and fc1 take their bias inside the product: a ones column, zeros up to a 32-wide tile
KEY_ROWS = 16  # keys padded (and masked) to a multiple of 16 tokens: the CPU attention kernel's fast shapes


def low_precision(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on `x`'s device (bf16 for `--precision bf16`), or None outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def can_run_frozen(layer: nn.Module) -> bool:
    """Whether `run_frozen_block` may stand in for this `CLIPEncoderLayer`: its linear layers are plain (not the int8
    ones of `quantize_linears`, which run as modules) and no gradient is asked of its weights."""
    linears = (*_projections(layer.self_attn), layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2)
    if not all(type(linear) is nn.Linear for linear in linears):
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters()))


class FrozenBlockWeights(NamedTuple):
    """A frozen `CLIPEncoderLayer`'s linear weights in a low precision (see `frozen_block_weights`)."""

    qkv: Tensor  # (3 width, width + BIAS_COLUMNS): q, k, v stacked, their biases in column `width`
    out_weight: Tensor
    out_bias: Tensor
    fc1: Tensor  # (mlp, width + BIAS_COLUMNS), bias in column `width`; x 1.702 for quick GELU
    fc2_weight: Tensor  # / 1.702 for quick GELU
    fc2_bias: Tensor


_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (signature, its low-precision copies)


def _copies_of(module: nn.Module, dtype: torch.dtype, masters: list[Tensor], make: Callable[[], Any]) -> Any:
    """`make()` (copies of `masters` in `dtype`) the first time, then the same until a master changes: an in-place
    load bumps its version, `.to()` gives it new storage. Kept outside the module: not in its state dict, not
    copied with it."""
    signature = (dtype, tuple((t.data_ptr(), t._version, t.device) for t in masters))
    cached = _copies.get(module)
    if cached is None or cached[0] != signature:
        with torch.no_grad():
            cached = _copies[module] = (signature, make())
    return cached[1]


def frozen_block_weights(layer: nn.Module, dtype: torch.dtype) -> FrozenBlockWeights:
    """The linear weights of a frozen `CLIPEncoderLayer` in `dtype`, made once (`_copies_of`: autocast would cast
    every weight again on every call). q, k and v are one product; q/k/v and fc1 carry their bias as an extra input
    column (a broadcast bias costs a pass over the product's output on the CPU); for CLIP's quick GELU, 1.702 is
    folded into fc1 (and its inverse into fc2) so that the activation is one `silu`."""
    attention, mlp = layer.self_attn, layer.mlp
    linears = [*_projections(attention), attention.out_proj, mlp.fc1, mlp.fc2]
    fold = QUICK_GELU_SCALE if _uses_quick_gelu(layer) else 1.0

    def make() -> FrozenBlockWeights:
        q_k_v = _projections(attention)
        weights = FrozenBlockWeights(
            qkv=_with_bias_column(torch.cat([p.weight for p in q_k_v]), torch.cat([p.bias for p in q_k_v])),
            out_weight=attention.out_proj.weight,
            out_bias=attention.out_proj.bias,
            fc1=_with_bias_column(mlp.fc1.weight * fold, mlp.fc1.bias * fold),
            fc2_weight=mlp.fc2.weight / fold,
            fc2_bias=mlp.fc2.bias,
        )
        return FrozenBlockWeights(*(w.to(dtype) for w in weights))

    return _copies_of(layer, dtype, [t for m in linears for t in (m.weight, m.bias)], make)


def patch_embedding(conv: nn.Conv2d, pixels: Tensor, dtype: torch.dtype) -> Tensor:
    """CLIP's patch embedding (a convolution whose stride is its kernel) as one product in `dtype` with a copy of
    its weight made once: (B, C, H, W) -> (B, h*w, width), the patches in the convolution's row-major order. Under
    autocast the convolution took twice as long (its weight cast, its output reordered and transposed)."""
    patch, width = conv.kernel_size[0], conv.out_channels

    def make() -> tuple[Tensor, Tensor | None]:
        return conv.weight.reshape(width, -1).to(dtype), None if conv.bias is None else conv.bias.to(dtype)

    weight, bias = _copies_of(conv, dtype, [t for t in (conv.weight, conv.bias) if t is not None], make)
    batch, channels, height, image_width = pixels.shape
    rows = pixels.reshape(batch, channels, height // patch, patch, image_width // patch, patch)
    rows = rows.permute(0, 2, 4, 1, 3, 5).to(dtype, memory_format=torch.contiguous_format).reshape(-1, weight.shape[1])
    return F.linear(rows, weight, bias).view(batch, -1, width)


def _with_bias_column(weight: Tensor, bias: Tensor) -> Tensor:
    """(out, in) weight, (out,) bias -> (out, in + BIAS_COLUMNS): the bias in column `in`, zeros after it."""
    return torch.cat([weight, bias[:, None], weight.new_zeros(weight.shape[0], BIAS_COLUMNS - 1)], dim=1)


def _uses_quick_gelu(layer: nn.Module) -> bool:
    return getattr(layer.mlp.config, "hidden_act", None) == "quick_gelu"


class Scratch:
    """Buffers reused by the frozen blocks of one pass through a tower (all its blocks have the same shapes): their
    largest intermediates are allocated once per pass instead of once per block. Fresh memory comes from the OS a
    page at a time; at ViT-B/16 and batch 8 these page faults took 6% of a bf16 forward."""

    def __init__(self):
        self._buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised (shape) tensor on like's device, in `dtype` (default like's), the same one each call."""
        dtype = dtype or like.dtype
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != like.device:
            buffer = self._buffers[name] = like.new_empty(shape, dtype=dtype)
        return buffer


def _normed_rows(x: Tensor, norm: nn.LayerNorm, out: Tensor) -> Tensor:
    """`norm(x)` (computed in x's dtype) written into the first tokens rows and width columns of out, a (B, rows,
    width + BIAS_COLUMNS) buffer: then a ones column (the bias of `_with_bias_column` weights), zeros after it and
    in the rows past x's tokens. Returns out."""
    _, tokens, width = x.shape
    out[:, :tokens, :width] = norm(x)
    out[:, :tokens, width] = 1
    out[:, :tokens, width + 1 :] = 0
    out[:, tokens:] = 0
    return out


def run_frozen_block(
    layer: nn.Module, x: Tensor, dtype: torch.dtype | None, scratch: Scratch | None = None, mask: Tensor | None = None
) -> Tensor:
    """One frozen `CLIPEncoderLayer` (pre-LN; see `can_run_frozen`) on the (B, T, width) residual stream x; `scratch`:
    the buffers of the pass, for a block after the first; mask: (B or 1, 1, T, T) bool, the keys each token attends
    to (None: all).

    dtype None (fp32): the layer's own weights and arithmetic, bit for bit, with the quick GELU computed in place
    (1.06x faster at ViT-B/16; folding 1.702 into the products, as bf16 does, would move the logits by up to 5e-7
    of their scale, more than the parity with transformers allows). A low precision (bf16 under
    autocast): the products in `dtype` from `frozen_block_weights`, attention by `F.scaled_dot_product_attention`
    in `dtype` over keys padded to a multiple of KEY_ROWS (the padding masked out); the layer norms and the residual
    stream keep x's dtype (fp32 from the embeddings), as under autocast alone."""
    scratch = scratch or Scratch()
    if dtype is None:
        return _run_full_precision_block(layer, x, scratch, mask)
    weights = frozen_block_weights(layer, dtype)
    attention = layer.self_attn
    batch, tokens, width = x.shape
    rows = -(-tokens // KEY_ROWS) * KEY_ROWS
    h = _normed_rows(x, layer.layer_norm1, scratch("norm1", (batch, rows, width + BIAS_COLUMNS), x, dtype))
    qkv = scratch("qkv", (batch * rows, weights.qkv.shape[0]), x, dtype)
    q, k, v = (
        torch.mm(h.view(batch * rows, -1), weights.qkv.t(), out=qkv)
        .view(batch, rows, 3, attention.num_heads, -1)
        .permute(2, 0, 3, 1, 4)
    )
    if rows > tokens:  # the padded keys are never attended to
        keys = torch.arange(rows, device=x.device) < tokens
        mask = keys.view(1, 1, 1, rows) if mask is None else F.pad(mask, (0, rows - tokens), value=False)
    attended = F.scaled_dot_product_attention(q[:, :, :tokens], k, v, attn_mask=mask, scale=attention.scale)
    x = x + F.linear(attended.transpose(1, 2).reshape(batch, tokens, width), weights.out_weight, weights.out_bias)
    h = _normed_rows(x, layer.layer_norm2, scratch("norm2", (batch, tokens, width + BIAS_COLUMNS), x, dtype))
    hidden = scratch("hidden", (batch * tokens, weights.fc1.shape[0]), x, dtype)
    h = torch.mm(h.view(batch * tokens, -1), weights.fc1.t(), out=hidden)
    h = F.silu(h, inplace=True) if _uses_quick_gelu(layer) else layer.mlp.activation_fn(h)
    return x + F.linear(h, weights.fc2_weight, weights.fc2_bias).view(batch, tokens, width)


def _run_full_precision_block(layer: nn.Module, x: Tensor, scratch: Scratch, mask: Tensor | None) -> Tensor:
    attention, mlp = layer.self_attn, layer.mlp
    batch, tokens, width = x.shape
    h = layer.layer_norm1(x)
    q, k, v = (p(h).view(batch, tokens, attention.num_heads, -1).transpose(1, 2) for p in _projections(attention))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scale)
    x = x + attention.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width))
    hidden = scratch("hidden", (batch * tokens, mlp.fc1.out_features), x)
    h = torch.addmm(mlp.fc1.bias, layer.layer_norm2(x).view(batch * tokens, width), mlp.fc1.weight.t(), out=hidden)
    if _uses_quick_gelu(layer):  # transformers' x * sigmoid(1.702 x), bit for bit, in reused buffers
        h = h.mul_(torch.mul(h, QUICK_GELU_SCALE, out=scratch("gate", h.shape, h)).sigmoid_())
    else:
        h = mlp.activation_fn(h)
    return x + mlp.fc2(h).view(batch, tokens, width)


def run_frozen_text(text_model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, dtype) -> Tensor:
    """CLIP's frozen text tower (transformers' `text_model`) on (K, L) token ids with `run_frozen_block`: the final
    layer norm's (K, L, width) output. Each token attends to itself and to the tokens before it that
    `attention_mask` keeps (all without one), so the tokens it keeps get transformers' values (padded ones too:
    they attend to themselves rather than to nothing)."""
    embeddings, length = text_model.embeddings, input_ids.shape[1]
    x = embeddings.token_embedding(input_ids) + embeddings.position_embedding.weight[:length]
    mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()[None, None]
    if attention_mask is not None:
        itself = torch.eye(length, dtype=torch.bool, device=x.device)
        mask = mask & (attention_mask.bool()[:, None, None, :] | itself)
    scratch = Scratch()
    for layer in text_model.encoder.layers:
        x = run_frozen_block(layer, x, dtype, scratch, mask)
    return text_model.final_layer_norm(x)


def _projections(attention: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    return attention.q_proj, attention.k_proj, attention.v_proj
