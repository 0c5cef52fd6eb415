"""CLIPSeg's decoder: reduce the extracted CLIP activations to D dimensions, FiLM-condition them on the prompt's
embedding, run post-LN transformer blocks (deepest activation first, the others added on the way), and turn the
patch tokens into a mask with a transposed convolution (plain) or the refined head (docs/original.md §2).
The parameter names are HF CLIPSeg's, so the released weights load unchanged.

In training on the CPU, dropout masks come from `dropout_mask` (16-bit draws, 6x faster than `bernoulli_`) and
attention with dropout from `attention_with_dropout` (the CPU's fused attention kernels have no dropout); other
devices use torch's dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipseg.config import CLIPSegConfig


class DecoderAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (the HF CLIPSeg parameter names)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        dropout = self.dropout if self.training else 0.0
        if dropout > 0 and x.device.type == "cpu":
            attended = attention_with_dropout(q, k, v, dropout)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


SCORE_RANGE = 50.0  # attention scores more than this below their row's maximum count as this far below it


def attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, p: float) -> Tensor:
    """softmax(q k^T / sqrt(d)) with dropout on the attention weights, times v: what `F.scaled_dot_product_attention`
    computes with `dropout_p`, whose CPU kernels fall back to a general path for dropout (3x slower in a training
    step). The dropout's 1 / (1 - p) is applied to the (small) output instead of the weights.

    Scores are raised to at least their row's maximum - SCORE_RANGE: a weight of exp(-50) = 2e-22 instead of a
    smaller one changes no sum in fp32, but weights that would be subnormal (below 1e-38) make the CPU's fp32
    products of the forward and backward passes up to 5x slower (subnormal arithmetic is microcoded). The floor is
    applied in place and not differentiated: a raised score passes on the gradient of its weight, ~1e-22 times that
    of the row's largest, where its true gradient is smaller still."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    with torch.no_grad():
        scores.clamp_(min=scores.amax(dim=-1, keepdim=True) - SCORE_RANGE)
    weights = torch.softmax(scores, dim=-1)
    keep, scale = dropout_mask(weights, p)
    return torch.matmul(weights * keep, v) * scale


DROPOUT_LEVELS = 1 << 16  # dropout draws 16 random bits per element: p is used to the nearest 1 / 65536


def dropout_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """Dropout's keep mask for x (1 or 0 in x's dtype, each element kept with probability 1 - p; multiplying by it
    is faster than selecting with a bool mask, forward and backward) and the scale of the kept ones.

    The mask is drawn from the default generator as 16-bit integers, four per 64-bit draw, so p is used to the
    nearest 1/65536 (0.1 -> 0.100006, with the scale of that probability): on the CPU 6x faster than
    `bernoulli_`, which takes most of a dropout's time."""
    dropped = round(p * DROPOUT_LEVELS)
    if dropped >= DROPOUT_LEVELS:
        return torch.zeros_like(x), 0.0
    draws = -(-x.numel() // 4)
    bits = torch.empty(draws, dtype=torch.int64, device=x.device).random_(-(1 << 63), None)
    keep = torch.empty_like(x, memory_format=torch.contiguous_format)  # written by the comparison: 2x faster than .to
    torch.ge(bits.view(torch.int16)[: x.numel()].view(x.shape), dropped - DROPOUT_LEVELS // 2, out=keep)
    return keep, DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped)


class DecoderMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(self.fc1(x))
        if self.training and self.dropout > 0 and x.device.type == "cpu":
            keep, scale = dropout_mask(hidden, self.dropout)  # the scale goes to fc2's (small) weight
            return F.linear(hidden * keep, self.fc2.weight * scale, self.fc2.bias)
        return self.fc2(F.dropout(hidden, self.dropout, self.training))


class DecoderBlock(nn.Module):
    """Post-LN transformer encoder layer (ReLU FFN), as `nn.TransformerEncoderLayer` in the original code: dropout on
    the attention weights, in the FFN and on both residual branches."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = DecoderAttention(dim, heads, dropout)
        self.layer_norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = DecoderMLP(dim, ffn_dim, dropout)
        self.layer_norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer_norm1(x + self.residual_dropout(self.self_attn(x)))
        return self.layer_norm2(x + self.residual_dropout(self.mlp(x)))

    def residual_dropout(self, x: Tensor) -> Tensor:
        if self.training and self.dropout > 0 and x.device.type == "cpu":
            keep, scale = dropout_mask(x, self.dropout)
            return x * keep * scale
        return F.dropout(x, self.dropout, self.training)


class RefinedHead(nn.Sequential):
    """Conv 3x3, ReLU, two 4x transposed convolutions with a ReLU between: the head of the `-refined` weights
    (patch 16 only), its children numbered as in the original so that the weights load unchanged.

    A transposed convolution whose stride equals its kernel maps each input pixel to its own k x k block of
    output pixels, so both upsamplings are matrix products on channels-last rows and the blocks are laid out
    once at the end: the sums of `nn.ConvTranspose2d`, 1.3x (training) to 3x (inference) faster on a CPU
    (`python bench.py --rows head`)."""

    def __init__(self, dim: int):
        super().__init__(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=4, stride=4),
            nn.ReLU(),
            nn.ConvTranspose2d(dim // 2, 1, kernel_size=4, stride=4),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, D, h, w) -> (B, 1, 16h, 16w) logits."""
        conv, _, first, _, second = self
        x = F.relu(conv(x))
        batch, channels, height, width = x.shape
        (k1, _), (k2, _), middle = first.kernel_size, second.kernel_size, first.out_channels
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)
        first_weight = first.weight.permute(0, 2, 3, 1).reshape(channels, k1 * k1 * middle)
        upsampled = torch.addmm(first.bias.repeat(k1 * k1), rows, first_weight)  # (B*h*w, k1*k1*middle)
        upsampled = F.relu(upsampled).view(-1, middle)  # a row per pixel of the first upsampling
        out = torch.addmm(second.bias.repeat_interleave(k2 * k2), upsampled, second.weight.reshape(middle, -1))
        out = out.view(batch, height, width, k1, k1, -1, k2, k2).permute(0, 5, 1, 3, 6, 2, 4, 7)
        return out.reshape(batch, -1, height * k1 * k2, width * k1 * k2)


class CLIPSegDecoder(nn.Module):
    """Activations of the extracted blocks + conditional vector -> mask logits.

    The FiLM modulation and the `reduces` projections broadcast over the batch, so one image's activations
    (batch 1) can be decoded against K conditionals at once.
    """

    def __init__(self, config: CLIPSegConfig):
        super().__init__()
        assert config.clip is not None, "CLIPSegDecoder needs the backbone geometry (config.clip)"
        width, dim, patch = config.vision_width, config.reduce_dim, config.patch_size
        self.conditional_layer = config.conditional_layer
        self.film_mul = nn.Linear(config.clip.projection_dim, dim)
        self.film_add = nn.Linear(config.clip.projection_dim, dim)
        self.reduces = nn.ModuleList(nn.Linear(width, dim) for _ in config.extract_layers)
        self.layers = nn.ModuleList(
            DecoderBlock(dim, config.decoder_heads, config.decoder_ffn_dim, config.dropout)
            for _ in config.extract_layers
        )
        if config.refined:
            self.transposed_convolution = RefinedHead(dim)
        else:
            self.transposed_convolution = nn.ConvTranspose2d(dim, 1, kernel_size=patch, stride=patch)

    def forward(self, activations: Sequence[Tensor], conditional: Tensor, grid: tuple[int, int]) -> Tensor:
        """activations: shallowest first, each (B or 1, 1 + h*w, width); conditional: (K, 512), where the
        batch of the activations is K or 1; grid: (h, w). Returns (K, 1, p*h, p*w) logits for patch size p."""
        x = None
        for i, (activation, reduce, layer) in enumerate(zip(reversed(activations), self.reduces, self.layers)):
            x = reduce(activation) if x is None else reduce(activation) + x
            if i == self.conditional_layer:
                x = self.film_mul(conditional)[:, None] * x + self.film_add(conditional)[:, None]
            x = layer(x)
        return self.transposed_convolution(tokens_to_map(x, grid))


def tokens_to_map(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, 1 + h*w, D) tokens -> (B, D, h, w): the CLS token dropped, the patch tokens laid out on their grid."""
    batch, _, dim = x.shape
    return x[:, 1:].transpose(1, 2).reshape(batch, dim, *grid)


def prompts_per_image_of(
    conditional: Tensor, images: int, projection_dim: int, prompts_per_image: Sequence[int] | None = None
) -> list[int]:
    """How many of the (N, projection_dim) `conditional` rows each of `images` images is decoded against: the given
    split, checked, or N / images each. Raises ValueError for a shape or split that does not fit."""
    prompts = conditional.shape[0]
    if conditional.ndim != 2 or conditional.shape[1] != projection_dim:
        raise ValueError(f"conditional must be (N, {projection_dim}), got {tuple(conditional.shape)}")
    if prompts_per_image is None:
        if prompts % images:
            raise ValueError(f"{prompts} prompts for {images} images: give each image the same number of prompts")
        return [prompts // images] * images
    if len(prompts_per_image) != images or sum(prompts_per_image) != prompts:
        raise ValueError(
            f"prompts_per_image {list(prompts_per_image)} does not split {prompts} prompts over {images} images"
        )
    return list(prompts_per_image)
