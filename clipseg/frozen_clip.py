"""How CLIP's frozen towers run in our model: each `CLIPEncoderLayer` from its parts (`run_frozen_block`) instead of
through the module, and the vision tower's embeddings (patch products, resized position embeddings).

- fp32: the layer's own weights and transformers' arithmetic, bit for bit, in fewer tensors (the quick GELU in
  place, the largest intermediates in buffers reused by every block of a pass: `Scratch`).
- bf16 (under `torch.autocast`, `--precision bf16`): the products from copies of the weights in the autocast dtype
  made once (`frozen_block_weights`, `patch_embedding`; autocast alone would cast every weight on every call), q/k/v
  in one product, biases inside the products, the quick GELU as one `silu`, keys padded for the CPU attention
  kernel; the layer norms and the residual stream stay fp32, as under autocast alone.

int8 layers (`clipseg.precision.quantize_linears`) and layers asked for gradients keep the module path
(`can_run_frozen`). model.py chooses per layer; the path follows the autocast state, never the CPU.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

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


def patch_embedding(conv: nn.Conv2d, pixels: Tensor, dtype: torch.dtype | None) -> Tensor:
    """CLIP's patch embedding (a convolution whose stride is its kernel): (B, C, H, W) -> (B, h*w, width), the patches
    in row-major order. dtype None (fp32): the convolution itself. A dtype: one product in it with a copy of the
    weight made once (under autocast the convolution took twice as long: its weight cast, its output reordered and
    transposed)."""
    if dtype is None:
        return conv(pixels).flatten(2).transpose(1, 2)
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


def run_frozen_text(
    text_model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, dtype: torch.dtype | None
) -> Tensor:
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


def resized_positions(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """A (1 + s*s, width) position table, its patch part resized bicubically to `grid`: (1, 1 + h*w, width)."""
    side = math.isqrt(table.shape[0] - 1)
    cls_pos, patch_pos = table[:1], table[1:]
    if grid != (side, side):
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([cls_pos, patch_pos])[None]


def run_clip_block(layer: nn.Module, x: Tensor) -> Tensor:
    """One `CLIPEncoderLayer` as a module, without masks (transformers 5 returns a tensor, 4.x a tuple with a causal
    mask): the path of int8 layers and of layers asked for gradients, and of the exported graphs."""
    out = layer(x, None) if _TRANSFORMERS_MAJOR >= 5 else layer(x, None, None)
    return out[0] if isinstance(out, tuple) else out


_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
