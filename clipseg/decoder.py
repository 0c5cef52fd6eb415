"""CLIPSeg's decoder: reduce the extracted CLIP activations to D dimensions, FiLM-condition them on the prompt's
embedding, run post-LN transformer blocks (deepest activation first, the others added on the way), and turn the
patch tokens into a mask with a transposed convolution (plain) or the refined head (docs/original.md §2).
The parameter names are HF CLIPSeg's, so the released weights load unchanged.
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
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class DecoderMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class DecoderBlock(nn.Module):
    """Post-LN transformer encoder layer (ReLU FFN), as `nn.TransformerEncoderLayer` in the original code."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = DecoderAttention(dim, heads, dropout)
        self.layer_norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = DecoderMLP(dim, ffn_dim, dropout)
        self.layer_norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer_norm1(x + self.dropout(self.self_attn(x)))
        return self.layer_norm2(x + self.dropout(self.mlp(x)))


class RefinedHead(nn.Sequential):
    """Conv 3x3, ReLU, two 4x transposed convolutions with a ReLU between: the head of the `-refined` weights
    (patch 16 only), its children numbered as in the original so that the weights load unchanged.

    A transposed convolution whose stride equals its kernel maps each input pixel to its own k x k block of
    output pixels, so both upsamplings are matrix products on channels-last rows and the blocks are laid out
    once at the end: the sums of `nn.ConvTranspose2d`, 1.3x (training) to 3x (inference) faster on a CPU
    (`python bench.py --only-head`)."""

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
