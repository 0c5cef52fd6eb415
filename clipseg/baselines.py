"""The parts of the paper's two baselines (docs/original.md §10); their model classes, `model.CLIPDeconv` and
`model.ViTSeg`, are `CLIPSeg` with these parts in place of its decoder or its image tower:

- CLIP-Deconv (`arch="clip-deconv"`, the original's `CLIPDenseBaseline`): the frozen CLIP, one block read (9 of 12),
  Linear(width, D), FiLM, Linear(D, D)-ReLU-Linear(D, D), drop CLS, ConvTranspose2d(D, 1, p, stride p)
  (`DeconvDecoder`). No transformer, no skip connections: 139,585 trainable parameters at ViT-B/16, D = 64.
- ViTSeg (`arch="vitseg"`, the original's `VITDensePredT`): an ImageNet ViT-B/16 at 384 px (`transformers.ViTModel`,
  `google/vit-base-patch16-384`) replaces CLIP's image tower (`vit_blocks`). The input is nearest-resized to the
  ViT's native size (352 -> 384, no position-embedding interpolation), blocks (3, 7, 9) feed the plain CLIPSeg
  decoder, whose 384-px logits are nearest-resized back to the input size (`ViTSegDecoder`). CLIP's text tower
  gives the conditional.

Where the original deviates from what the paper describes, we follow the paper (README, "Baselines"): ViTSeg's CLIP
text tower is frozen (the original's optimizer also trained it); its ViT sees the normalisation it was trained with
(mean = std = 0.5; the original fed ImageNet-normalised pixels). Kept as the original: ViTSeg's image prompts are
the ViT's final-norm CLS through a random Linear(768, 512) that stays frozen, part of the frozen image tower.

    model = CLIPSeg.from_backbone("google/vit-base-patch16-384", arch="vitseg")  # or arch="clip-deconv"
    model = CLIPSeg.from_pretrained("checkpoints/vitseg")                        # the class the checkpoint names
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from clipseg.config import CLIPSegConfig
from clipseg.decoder import CLIPSegDecoder, tokens_to_map
from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_VIT = "google/vit-base-patch16-384"
VIT_MEAN = VIT_STD = (0.5, 0.5, 0.5)  # google/vit-base-patch16-384's (and timm's vit_base_patch16_384's) normalisation
# transformers 5 renamed the ViT's submodules; checkpoints keep the names of transformers 4.x and of the hub's files
# (google/vit-base-patch16-384), so that they load under either version. (4.x name, 5.x name), in renaming order.
VIT_NAMES = (
    ("vit.encoder.layer.", "vit.layers."),
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)


# ----------------------------------------------------------------------------------------------- CLIP-Deconv


class DeconvDecoder(nn.Module):
    """CLIP-Deconv's head: one block's activations + conditional -> logits, without a transformer."""

    def __init__(self, config: CLIPSegConfig):
        super().__init__()
        dim, patch = config.reduce_dim, config.patch_size
        self.reduce = nn.Linear(config.vision_width, dim)
        self.film_mul = nn.Linear(config.clip.projection_dim, dim)
        self.film_add = nn.Linear(config.clip.projection_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.transposed_convolution = nn.ConvTranspose2d(dim, 1, kernel_size=patch, stride=patch)

    def forward(self, activations: Sequence[Tensor], conditional: Tensor, grid: tuple[int, int]) -> Tensor:
        """activations: [(B or 1, 1 + h*w, width)]; conditional: (K, 512) with K = B, or any K when B = 1;
        grid: (h, w). Returns (K, 1, p*h, p*w) logits."""
        (activation,) = activations
        x = self.reduce(activation)
        x = self.film_mul(conditional)[:, None] * x + self.film_add(conditional)[:, None]
        return self.transposed_convolution(tokens_to_map(self.mlp(x), grid))


# ---------------------------------------------------------------------------------------------------- ViTSeg


def tiny_vit_config(layers: int = 6, width: int = 64, image_size: int = 80) -> transformers.ViTConfig:
    """A small random ImageNet-style ViT (patch 16) for tests; its native 80 px (5 x 5 patches) makes a 64 px
    input go through the same up- and down-resizing as 352 -> 384 px."""
    return transformers.ViTConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        image_size=image_size,
        patch_size=16,
    )


class ViTSegDecoder(CLIPSegDecoder):
    """The plain CLIPSeg decoder on the ViT's fixed token grid; its logits are nearest-resized to the input size."""

    def __init__(self, config: CLIPSegConfig):
        super().__init__(config)
        self.patch = config.vit.patch_size
        side = config.vit.image_size // self.patch
        self.token_grid = (side, side)

    def forward(self, activations: Sequence[Tensor], conditional: Tensor, grid: tuple[int, int]) -> Tensor:
        """activations: each (B or 1, 1 + tokens of the ViT's grid, width); grid: (H / 16, W / 16) of the input.
        Returns (K, 1, H, W) logits."""
        logits = super().forward(activations, conditional, self.token_grid)
        size = (grid[0] * self.patch, grid[1] * self.patch)
        return logits if tuple(logits.shape[-2:]) == size else F.interpolate(logits, size=size, mode="nearest")


def vit_name(key: str, legacy: bool) -> str:
    """A ViTSeg state-dict key under transformers 4.x's ViT names (legacy) or 5.x's; other keys unchanged."""
    if not key.startswith("vit."):
        return key
    for old, new in VIT_NAMES if not legacy else reversed(VIT_NAMES):
        key = key.replace(old, new) if not legacy else key.replace(new, old)
    return key


def vit_layers(vit: nn.Module) -> nn.ModuleList:
    """The blocks of a `transformers.ViTModel`: `vit.layers` in transformers 5, `vit.encoder.layer` in 4.x."""
    return vit.layers if hasattr(vit, "layers") else vit.encoder.layer


def vit_blocks(
    vit: nn.Module, pixel_values: Tensor, native_side: int, extract_layers: Sequence[int], stop_after: int | None
) -> tuple[Tensor, list[Tensor]]:
    """Blocks 0..stop_after (all when None) of a `transformers.ViTModel` on (B, 3, H, W) ImageNet-normalised pixels,
    re-normalised for the ViT (`VIT_MEAN`, `VIT_STD`) and nearest-resized to its native `native_side`. Returns the
    last hidden state and the activations after each block of `extract_layers`."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
    weight = vit.embeddings.patch_embeddings.projection.weight
    scale = torch.tensor([s / vs for s, vs in zip(IMAGENET_STD, VIT_STD)], device=weight.device).view(1, 3, 1, 1)
    shift = [(m - vm) / vs for m, vm, vs in zip(IMAGENET_MEAN, VIT_MEAN, VIT_STD)]
    shift = torch.tensor(shift, device=weight.device).view(1, 3, 1, 1)
    x = pixel_values.to(weight.device, weight.dtype) * scale.to(weight.dtype) + shift.to(weight.dtype)
    x = vit.embeddings(F.interpolate(x, size=(native_side, native_side), mode="nearest"))
    layers = vit_layers(vit)
    last = len(layers) - 1 if stop_after is None else stop_after
    wanted, activations = set(extract_layers), []
    for i in range(last + 1):
        out = layers[i](x)
        x = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
        if i in wanted:
            activations.append(x)
    return x, activations
