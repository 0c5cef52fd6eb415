"""The paper's two baselines (SPEC section 8), as subclasses of `model.CLIPSeg` with the same interface
(`encode_image` / `decode` / `embed_text` / `embed_images` / `forward` / `save_pretrained` / `from_pretrained`):

- CLIP-Deconv (`arch="clip-deconv"`, the original's `CLIPDenseBaseline`): the frozen CLIP, one block read (9 of 12),
  Linear(width, D), FiLM, Linear(D, D)-ReLU-Linear(D, D), drop CLS, ConvTranspose2d(D, 1, p, stride p). No
  transformer, no skip connections: 139,585 trainable parameters at ViT-B/16, D = 64.
- ViTSeg (`arch="vitseg"`, the original's `VITDensePredT`): an ImageNet ViT-B/16 at 384 px (`transformers.ViTModel`,
  `google/vit-base-patch16-384`) replaces CLIP's image tower. The input is nearest-resized to the ViT's native size
  (352 -> 384, no position-embedding interpolation), blocks (3, 7, 9) feed the plain CLIPSeg decoder, whose
  384-px logits are nearest-resized back to the input size. CLIP's text tower gives the conditional.

Where the original deviates from what the paper describes, we follow the paper (README, "Baselines"): ViTSeg's CLIP
text tower is frozen (the original's optimizer also trained it); its ViT sees the normalisation it was trained with
(mean = std = 0.5; the original fed ImageNet-normalised pixels). Kept as the original: ViTSeg's image prompts are
the ViT's final-norm CLS through a random Linear(768, 512) that stays frozen, part of the frozen image tower.

    model = CLIPSeg.from_backbone("google/vit-base-patch16-384", arch="vitseg")  # or arch="clip-deconv"
    model = CLIPSeg.from_pretrained("checkpoints/vitseg")                        # the class the checkpoint names

`python baselines.py counts` builds every full-size configuration with random weights (no download) and prints
its parameter counts.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipseg.weights import load_backbone
from model import (
    DEFAULT_BACKBONE,
    RANDOM_BACKBONES,
    CLIPSeg,
    CLIPSegConfig,
    CLIPSegDecoder,
    ImageFeatures,
    count_parameters,
    random_clip_config,
    tiny_config,
    tokens_to_map,
)

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


class CLIPDeconv(CLIPSeg):
    """Frozen CLIP, one block read, `DeconvDecoder` (SPEC section 8). Everything else is CLIPSeg's."""

    arch = "clip-deconv"

    def build_decoder(self, config: CLIPSegConfig) -> nn.Module:
        return DeconvDecoder(config)


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


class ViTSeg(CLIPSeg):
    """A frozen ImageNet ViT (`self.vit`) for the image, CLIP's frozen text tower (`self.clip`) for the prompt, the
    plain CLIPSeg decoder between them (SPEC section 8)."""

    arch = "vitseg"

    def __init__(self, config: CLIPSegConfig):
        super().__init__(config)
        self.vit = transformers.ViTModel(config.vit, add_pooling_layer=False).requires_grad_(False).eval()
        # Image prompts: the final-norm CLS through a random projection that stays frozen, as in the original.
        self.image_projection = nn.Linear(config.vit.hidden_size, config.clip.projection_dim).requires_grad_(False)
        shift = [(m - vm) / vs for m, vm, vs in zip(IMAGENET_MEAN, VIT_MEAN, VIT_STD)]
        scale = [s / vs for s, vs in zip(IMAGENET_STD, VIT_STD)]
        self.register_buffer("to_vit_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("to_vit_shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    def build_clip(self, config: CLIPSegConfig) -> nn.Module:
        """CLIP's text tower and text projection only (its state-dict names stay `clip.text_model.*`,
        `clip.text_projection.weight`)."""
        text = {**config.clip.text_config.to_dict(), "projection_dim": config.clip.projection_dim}
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(text))

    def build_decoder(self, config: CLIPSegConfig) -> nn.Module:
        return ViTSegDecoder(config)

    @classmethod
    def from_backbone(cls, backbone: str | None = None, **knobs) -> CLIPSeg:
        """An ImageNet ViT (hub id or local directory, default google/vit-base-patch16-384; "tiny": a small random
        ViT and CLIP) and CLIP's text tower (`text_backbone`, default openai/clip-vit-base-patch16), a fresh decoder."""
        arch = knobs.setdefault("arch", cls.arch)
        if arch != cls.arch:
            return super().from_backbone(backbone, **knobs)
        backbone = backbone or DEFAULT_VIT
        if backbone == "tiny":
            knobs.setdefault("vit", tiny_vit_config())
            return cls(tiny_config(**{"text_backbone": "tiny", **knobs}))
        if backbone in RANDOM_BACKBONES:
            raise ValueError(
                f"{backbone} is a random CLIP image tower, but ViTSeg's image tower is an ImageNet ViT: give its hub "
                f"id ({DEFAULT_VIT}) or a local directory (--backbone), or use --arch clipseg / clip-deconv"
            )
        vit = load_backbone(transformers.ViTModel, backbone, "ImageNet ViT", add_pooling_layer=False)
        clip = load_backbone(transformers.CLIPModel, knobs.setdefault("text_backbone", DEFAULT_BACKBONE))
        model = cls(CLIPSegConfig(**knobs, backbone=backbone, clip=clip.config, vit=vit.config))
        model.vit = vit.requires_grad_(False).eval()
        text_parts = ("text_model.", "text_projection.")
        model.clip.load_state_dict({k: v for k, v in clip.state_dict().items() if k.startswith(text_parts)})
        return model

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        """The state with the ViT's parameters under their transformers 4.x names (`VIT_NAMES`), whichever version
        runs: `save_pretrained` writes them and `load_weights` matches against them."""
        state = super().state_dict(*args, **kwargs)
        return type(state)((_vit_name(key, legacy=True), value) for key, value in state.items())

    def load_state_dict(self, state_dict: dict[str, Tensor], *args, **kwargs):
        """Takes the ViT's parameters under either version's names."""
        renamed = {_vit_name(key, legacy=not self._renamed_vit): value for key, value in state_dict.items()}
        return super().load_state_dict(renamed, *args, **kwargs)

    @property
    def _renamed_vit(self) -> bool:
        return hasattr(self.vit, "layers")  # transformers 5; 4.x has vit.encoder.layer

    def train(self, mode: bool = True) -> ViTSeg:
        super().train(mode)
        self.vit.eval()  # frozen, always in inference mode
        return self

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor) -> ImageFeatures:
        """(B, 3, H, W) ImageNet-normalised pixels, H and W multiples of 16 -> activations of the ViT blocks read,
        at the ViT's native size. The tower stops after block max(extract_layers)."""
        grid = self.check_pixels(pixel_values)
        _, activations = self._vit_tower(pixel_values, stop_after=max(self.config.extract_layers))
        return ImageFeatures(activations, grid)

    @torch.no_grad()
    def embed_images(self, prompt_images: Tensor) -> Tensor:
        """(K, 3, h, w) engineered prompt images -> (K, 512) conditionals: the ViT's final-norm CLS, projected."""
        hidden, _ = self._vit_tower(prompt_images, stop_after=None)
        return self.image_projection(self.vit.layernorm(hidden[:, 0]))

    def _vit_tower(self, pixel_values: Tensor, stop_after: int | None) -> tuple[Tensor, list[Tensor]]:
        """Blocks 0..stop_after (all when None) of the ViT on the input nearest-resized to its native size.
        Returns the last hidden state and the activations after each extracted block."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        weight = self.vit.embeddings.patch_embeddings.projection.weight
        x = pixel_values.to(weight.device, weight.dtype) * self.to_vit_scale.to(weight.dtype)
        x = x + self.to_vit_shift.to(weight.dtype)
        side = self.config.vit.image_size
        x = self.vit.embeddings(F.interpolate(x, size=(side, side), mode="nearest"))
        layers = self.vit.layers if self._renamed_vit else self.vit.encoder.layer
        last = len(layers) - 1 if stop_after is None else stop_after
        wanted, activations = set(self.config.extract_layers), []
        for i in range(last + 1):
            out = layers[i](x)
            x = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
            if i in wanted:
                activations.append(x)
        return x, activations


def _vit_name(key: str, legacy: bool) -> str:
    """A ViTSeg state-dict key under transformers 4.x's ViT names (legacy) or 5.x's; other keys unchanged."""
    if not key.startswith("vit."):
        return key
    for old, new in VIT_NAMES if not legacy else reversed(VIT_NAMES):
        key = key.replace(old, new) if not legacy else key.replace(new, old)
    return key


ARCHITECTURE_CLASSES: dict[str, type[CLIPSeg]] = {"clip-deconv": CLIPDeconv, "vitseg": ViTSeg}


# ------------------------------------------------------------------------------------------ parameter counts


def full_size_models() -> Iterator[tuple[str, str, CLIPSeg]]:
    """(name, SPEC section 8's trainable figure, model) for each full-size configuration, random weights."""
    b16 = random_clip_config("random-vit-b16")
    yield "CLIPSeg ViT-B/16, D=64", "1,073,153", CLIPSeg(CLIPSegConfig(clip=b16))
    yield "CLIPSeg ViT-B/16, D=64, refined", "1,127,009", CLIPSeg(CLIPSegConfig(clip=b16, refined=True))
    yield "CLIPSeg ViT-B/32, D=64", "-", CLIPSeg(CLIPSegConfig(clip=random_clip_config("random-vit-b32")))
    yield "CLIPSeg ViT-L/14, D=64", "-", CLIPSeg(CLIPSegConfig(clip=random_clip_config("random-vit-l14")))
    yield "CLIP-Deconv ViT-B/16, D=64", "about 139.6k", CLIPDeconv(CLIPSegConfig(arch="clip-deconv", clip=b16))
    vit = transformers.ViTConfig(image_size=384)  # google/vit-base-patch16-384's geometry
    yield "ViTSeg ViT-B/16-384, D=64", "-", ViTSeg(CLIPSegConfig(arch="vitseg", clip=b16, vit=vit))


def parameter_table() -> str:
    """A markdown table of total and trainable parameters of `full_size_models()`."""
    rows = [
        "| configuration | total | trainable | trainable share | SPEC section 8 |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, spec, model in full_size_models():
        total, trainable = count_parameters(model, trainable_only=False), count_parameters(model)
        rows.append(f"| {name} | {total:,} | {trainable:,} | {100 * trainable / total:.2f}% | {spec} |")
        del model
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The paper's baselines; `counts` prints full-size parameter counts.")
    parser.add_argument("command", choices=("counts",), help="counts: build each full-size model with random weights")
    parser.parse_args(argv)
    torch.manual_seed(0)
    print(parameter_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
