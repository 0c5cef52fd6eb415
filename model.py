"""CLIPSeg: a frozen CLIP ViT-B/16 and a small FiLM-conditioned transformer decoder that turns a text or image
prompt into a segmentation mask (Lüddecke & Ecker, CVPR 2022).

The CLIP towers come from `transformers`; the decoder, the early-exit vision pass (it stops after the deepest
extracted block), position-embedding interpolation for any image shape and the weight loaders are ours (reading
checkpoint files: `weights.py`); the tokenizer is OpenAI's (`tokenizer.py`) and the input rules are in
`preprocess.py`. Weights load from:

- an HF CLIPSeg checkpoint (hub id such as `CIDAS/clipseg-rd64-refined`, or a directory with `config.json` and
  `model.safetensors`/`pytorch_model.bin`); our own `save_pretrained` writes that same layout;
- an original-release decoder file (`rd64-uni.pth`, `rd64-uni-refined.pth`, `rd16-uni.pth`) plus a CLIP
  backbone (hub id such as `openai/clip-vit-base-patch16` or a local directory).

    model = CLIPSeg.from_pretrained("CIDAS/clipseg-rd64-refined").eval()
    logits = model(pixel_values, phrases=["a cat", "a sofa"])          # (2, 1, H, W)
    features = model.encode_image(pixel_values[:1])                   # run the vision tower once ...
    logits = model.decode(features, model.embed_text(["a", "b", "c"]))  # ... decode many prompts: (3, 1, H, W)
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from clipseg.outputs import atomic_write, write_text
from clipseg.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, CLIPTokenizer
from clipseg.transforms import IMAGE_SIZE
from clipseg.weights import (
    CONFIG_NAME,
    DECODER_WEIGHTS_NAME,
    FREE_KNOBS,
    STRUCTURAL_KNOBS,
    WEIGHTS_NAME,
    CheckpointError,
    check_config,
    check_knobs,
    clip_weights,
    decoder_knobs_from_state,
    is_weight,
    load_backbone,
    load_hf_state_dict,
    load_safetensors,
    mismatch_message,
    original_to_hf_names,
    portable_location,
    read_config,
    resolve_file,
    save_safetensors,
    torch_load_safely,
)

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

PATCH_SIZE = 16  # of the released models; other CLIPs bring their own (`CLIPSegConfig.patch_size`)
# The largest image side the model runs at (--image-size, a config's image_size), checked before any image is
# resized. CLIP saw 224 px and CLIPSeg was trained at 352 px; position embeddings are interpolated to any grid, but
# at 4096 px a ViT-B/16 already attends over 65,536 tokens per image, and memory and time grow with their square,
# so a larger side adds cost, not detail. It is also the largest side the ONNX export takes (256 patches of 16).
MAX_IMAGE_SIDE = 4096
DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"
# CLIPSeg and the paper's two baselines (baselines.py) -> the class config.json names; only the first loads in HF.
ARCHITECTURES = {"clipseg": "CLIPSegForImageSegmentation", "clip-deconv": "CLIPDeconv", "vitseg": "ViTSeg"}
# The paper's blocks (0-based, of 12) per architecture; deeper or shallower backbones read the same relative depths.
PAPER_LAYERS = {"clipseg": (3, 6, 9), "clip-deconv": (9,), "vitseg": (3, 7, 9)}
# Random-initialised CLIPs of OpenAI's geometries (no download): the paper's "no CLIP pre-training" row.
# name -> (vision config, text config, projection_dim); unset values are transformers' ViT-B defaults.
RANDOM_BACKBONES = {
    "random-vit-b16": (dict(patch_size=16), {}, 512),
    "random-vit-b32": (dict(patch_size=32), {}, 512),
    "random-vit-l14": (
        dict(patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        768,
    ),
}


@dataclass
class CLIPSegConfig:
    """Decoder knobs (paper section 3, SPEC section 1) plus the geometry of the backbone.

    Defaults are those of the released `rd64` models. `clip` is a `transformers.CLIPConfig`; when it is None the
    backbone's geometry is unknown until `CLIPSeg.from_pretrained`/`from_backbone` fills it in. `arch` picks CLIPSeg
    or one of the paper's baselines (`baselines.py`); `vit` is the ImageNet ViT's `transformers.ViTConfig` of ViTSeg
    (whose `clip` then only provides the text tower).
    """

    extract_layers: tuple[int, ...] | None = None  # 0-based blocks read (default: `default_extract_layers`)
    reduce_dim: int = 64  # D: decoder width (16 for rd16, 128 in one paper row)
    decoder_heads: int = 4
    decoder_ffn_dim: int = 2048
    refined: bool = False  # the "complex transposed convolution" head of the -refined weights (patch 16 only)
    conditional_layer: int = 0  # FiLM is applied before this decoder block
    dropout: float = 0.1  # decoder dropout during training (attention weights, residual branches, FFN)
    backbone: str = DEFAULT_BACKBONE  # where the image tower's weights came from (informational)
    # where the frozen CLIP weights can be loaded from again (a CLIP or CLIPSeg hub id or directory; None for a
    # random backbone): what lets a checkpoint hold only the decoder (`save_pretrained(decoder_only=True)`)
    clip_source: str | None = None
    image_size: int | None = None  # default input side (default: 352, or the nearest multiple of the patch below)
    arch: str = "clipseg"  # one of ARCHITECTURES
    text_backbone: str | None = None  # ViTSeg: where the CLIP text tower came from (informational)
    clip: transformers.CLIPConfig | None = field(default=None, repr=False)
    vit: transformers.ViTConfig | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.arch == "vitseg" and self.clip is not None and self.vit is None:
            raise ValueError("arch vitseg needs the ImageNet ViT's geometry (config.vit)")
        if self.extract_layers is None:
            self.extract_layers = default_extract_layers(self.arch, self.vision_depth or 12)
        self.extract_layers = tuple(int(i) for i in self.extract_layers)
        if not self.extract_layers or list(self.extract_layers) != sorted(set(self.extract_layers)):
            raise ValueError(f"extract_layers must be strictly increasing, got {self.extract_layers}")
        if self.arch == "clip-deconv" and len(self.extract_layers) != 1:
            raise ValueError(f"clip-deconv reads exactly one block (the paper: 9), got {self.extract_layers}")
        if self.arch == "clip-deconv" and self.refined:
            raise ValueError("clip-deconv has its own single transposed convolution: drop refined (--refined)")
        if self.reduce_dim % self.decoder_heads:
            raise ValueError(f"reduce_dim {self.reduce_dim} is not divisible by decoder_heads {self.decoder_heads}")
        if not 0 <= self.conditional_layer < len(self.extract_layers):
            raise ValueError(f"conditional_layer {self.conditional_layer} must index one of the decoder blocks")
        depth = self.vision_depth
        if depth is not None and (self.extract_layers[0] < 0 or self.extract_layers[-1] >= depth):
            raise ValueError(f"extract_layers {self.extract_layers} out of range for a {depth}-block backbone")
        patch = self.patch_size
        if self.refined and patch not in (None, PATCH_SIZE):
            raise ValueError(
                f"the refined head upsamples 4 x 4 = 16-fold and fits patch-16 backbones only; {self.backbone} has "
                f"patch {patch}: use the plain head (drop --refined / refined=False) or a patch-16 CLIP such as "
                f"{DEFAULT_BACKBONE}"
            )
        if self.image_size is None:
            self.image_size = IMAGE_SIZE // (patch or PATCH_SIZE) * (patch or PATCH_SIZE)
        else:
            self.input_side(self.image_size)

    def input_side(self, requested: int | None = None) -> int:
        """The side an image is resized to: `requested` (a script's --image-size) or the model's default; a
        ValueError (`check_image_side`) when it is not a positive multiple of the patch size up to MAX_IMAGE_SIDE."""
        side = self.image_size if requested is None else requested
        return check_image_side(side, self.patch_size or PATCH_SIZE, self.backbone)

    @property
    def image_tower(self) -> transformers.PretrainedConfig | None:
        """The config of the tower whose blocks the decoder reads: CLIP's vision tower, or ViTSeg's ViT."""
        if self.arch == "vitseg":
            return self.vit
        return self.clip.vision_config if self.clip is not None else None

    @property
    def patch_size(self) -> int | None:
        return self.image_tower.patch_size if self.image_tower is not None else None

    @property
    def vision_depth(self) -> int | None:
        return self.image_tower.num_hidden_layers if self.image_tower is not None else None

    @property
    def vision_width(self) -> int | None:
        return self.image_tower.hidden_size if self.image_tower is not None else None

    def to_hf_dict(self) -> dict:
        """The config as `transformers.CLIPSegConfig` JSON; our extra knobs ride along as extra keys."""
        if self.clip is None:
            raise ValueError("config has no CLIP geometry (clip=None)")
        hf = transformers.CLIPSegConfig(
            text_config=self.clip.text_config.to_dict(),
            vision_config=self.clip.vision_config.to_dict(),
            projection_dim=self.clip.projection_dim,
            logit_scale_init_value=self.clip.logit_scale_init_value,
            extract_layers=list(self.extract_layers),
            reduce_dim=self.reduce_dim,
            decoder_num_attention_heads=self.decoder_heads,
            decoder_intermediate_size=self.decoder_ffn_dim,
            conditional_layer=self.conditional_layer,
            use_complex_transposed_convolution=self.refined,
        )
        out = hf.to_dict()
        out["architectures"] = [ARCHITECTURES[self.arch]]
        out["clipseg_decoder_dropout"] = self.dropout
        out["clipseg_backbone"] = self.backbone
        out["clipseg_clip_source"] = self.clip_source
        out["clipseg_image_size"] = self.image_size
        out["clipseg_arch"] = self.arch
        if self.arch == "vitseg":
            out["clipseg_vit_config"] = self.vit.to_dict()
            out["clipseg_text_backbone"] = self.text_backbone
        return out

    @classmethod
    def from_hf_dict(cls, data: dict, source: str = "config") -> CLIPSegConfig:
        """The config of a CLIPSeg config.json (`to_hf_dict`), its values checked (`weights.check_config`) before
        anything is built from them; a CheckpointError naming `source` when they do not make a model."""
        if data.get("model_type") != "clipseg":
            raise CheckpointError(f"{source}: not a CLIPSeg config (model_type={data.get('model_type')!r})")
        check_config(data, source)
        try:
            return cls._from_checked_dict(data)
        except Exception as err:  # transformers' own validation raises huggingface_hub errors, not ValueError
            raise CheckpointError(f"{source}: {err}") from err

    @classmethod
    def _from_checked_dict(cls, data: dict) -> CLIPSegConfig:
        hf = transformers.CLIPSegConfig.from_dict(data)
        clip = transformers.CLIPConfig(
            text_config=hf.text_config.to_dict(),
            vision_config=hf.vision_config.to_dict(),
            projection_dim=hf.projection_dim,
            logit_scale_init_value=hf.logit_scale_init_value,
        )
        vit = data.get("clipseg_vit_config")
        return cls(
            extract_layers=tuple(hf.extract_layers),
            reduce_dim=hf.reduce_dim,
            decoder_heads=hf.decoder_num_attention_heads,
            decoder_ffn_dim=hf.decoder_intermediate_size,
            refined=bool(hf.use_complex_transposed_convolution),
            conditional_layer=hf.conditional_layer,
            dropout=data.get("clipseg_decoder_dropout", 0.1),
            backbone=data.get("clipseg_backbone", data.get("_name_or_path") or DEFAULT_BACKBONE),
            clip_source=data.get("clipseg_clip_source"),
            image_size=data.get("clipseg_image_size"),
            arch=data.get("clipseg_arch", "clipseg"),
            text_backbone=data.get("clipseg_text_backbone"),
            clip=clip,
            vit=transformers.ViTConfig.from_dict(vit) if vit is not None else None,
        )

    def knobs(self) -> dict:
        """The decoder knobs without the backbone geometry (for logs and argument files)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("clip", "clip_source", "vit")}


def check_image_side(side: int, patch: int | None, backbone: str = "the backbone") -> int:
    """`side` when it is an integer from 1 to MAX_IMAGE_SIDE and a multiple of `patch` (None: not known yet); else a
    ValueError naming the bound or the patch size and the two nearest sides that fit."""
    if type(side) is not int or not 0 < side <= MAX_IMAGE_SIDE:
        raise ValueError(
            f"image size {side!r} is not a side from 1 to {MAX_IMAGE_SIDE} pixels, the largest the model runs at "
            "(MAX_IMAGE_SIDE; the released models were trained at 352) (--image-size)"
        )
    if patch is not None and side % patch:
        low, high = side // patch * patch, (side // patch + 1) * patch
        raise ValueError(
            f"image size {side} is not a multiple of the patch size {patch} of {backbone}: "
            f"use {low or high} or {high} (--image-size)"
        )
    return side


def default_extract_layers(arch: str, depth: int) -> tuple[int, ...]:
    """The paper's blocks for `arch` at the same relative depth of a `depth`-block tower: block i of 12 (0-based)
    becomes round((i + 1) * depth / 12) - 1, so 12 blocks keep (3, 6, 9) and ViT-L/14's 24 read (7, 13, 19)."""
    layers = tuple(round((i + 1) * depth / 12) - 1 for i in PAPER_LAYERS[arch])
    if len(set(layers)) < len(layers):
        raise ValueError(f"no default extract_layers for a {depth}-block backbone: give them (--extract-layers)")
    return layers


def random_clip_config(name: str) -> transformers.CLIPConfig:
    """The geometry of one of OpenAI's CLIPs (`RANDOM_BACKBONES`), for a random-initialised backbone."""
    vision, text, projection_dim = RANDOM_BACKBONES[name]
    return transformers.CLIPConfig(
        text_config=text, vision_config=dict(image_size=224, **vision), projection_dim=projection_dim
    )


def tiny_clip_config(vision_layers: int = 6, width: int = 64, patch_size: int = PATCH_SIZE) -> transformers.CLIPConfig:
    """A small random CLIP with the real tokenizer's vocabulary, for tests and the offline demo; its position table
    is 4 x 4 patches."""
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CONTEXT_LENGTH,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=4 * patch_size,
            patch_size=patch_size,
        ),
        projection_dim=width,
    )


def tiny_config(**knobs) -> CLIPSegConfig:
    """A tiny CLIPSeg configuration: 6 vision blocks, width 64, decoder reading blocks 1, 3, 4, D = 16."""
    defaults = dict(reduce_dim=16, decoder_ffn_dim=64, backbone="tiny")
    return CLIPSegConfig(**{**defaults, **knobs, "clip": knobs.get("clip") or tiny_clip_config()})


# --------------------------------------------------------------------------------------------------- decoder


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


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class SegmentationOutput:
    """What `CLIPSeg.forward` returns. logits: (N, 1, H, W); loss: BCE-with-logits against the labels given,
    a scalar (None without labels)."""

    logits: Tensor
    loss: Tensor | None = None


@dataclass
class ImageFeatures:
    """What the decoder needs from one pass of the vision tower.

    activations: per extracted block (shallowest first), (B, 1 + tokens, width); grid: (h, w) such that the
    logits are (B, 1, p*h, p*w) for patch size p: the token grid, except for ViTSeg (`baselines.py`), whose
    tokens lie on its ViT's fixed grid.
    """

    activations: list[Tensor]
    grid: tuple[int, int]


class TextCache(OrderedDict):
    """A bounded `CLIPSeg.text_cache`: phrase -> (512,) embedding, the least recently used phrases dropped first
    (PhraseCut x 9 templates, or an app's many users, would otherwise grow it without end). `touch` marks phrases
    as used, so that adding new ones cannot drop them."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def __setitem__(self, key: str, value: Tensor) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)

    def touch(self, phrases: Sequence[str]) -> None:
        for phrase in phrases:
            if phrase in self:
                self.move_to_end(phrase)


class CLIPSeg(nn.Module):
    """Frozen CLIP + trainable decoder. All inputs are ImageNet-normalised pixels; outputs are logits.

    The paper's baselines (`baselines.py`) are subclasses with another decoder or image tower; `from_backbone` and
    `from_pretrained` return the class that `config.arch` names."""

    arch = "clipseg"

    def __init__(self, config: CLIPSegConfig):
        super().__init__()
        if config.clip is None:
            raise ValueError("CLIPSeg needs config.clip; use CLIPSeg.from_backbone or from_pretrained")
        if config.arch != self.arch:
            raise ValueError(
                f"an arch={config.arch!r} config builds {model_class(config.arch).__name__}, not "
                f"{type(self).__name__}; CLIPSeg.from_backbone / from_pretrained pick the class"
            )
        self.config = config
        self.clip = self.build_clip(config).requires_grad_(False).eval()
        self.decoder = self.build_decoder(config)
        self._tokenizer = None
        self.text_cache: dict[str, Tensor] | None = None  # phrase -> (512,) text embedding, when enabled

    # -- construction and weights --------------------------------------------------------------------

    def build_clip(self, config: CLIPSegConfig) -> nn.Module:
        """The CLIP towers (frozen by the caller): text for prompts, vision for images and image prompts."""
        return transformers.CLIPModel(config.clip)

    def build_decoder(self, config: CLIPSegConfig) -> nn.Module:
        """The trainable part: called as decoder(activations, conditional, grid) -> logits."""
        return CLIPSegDecoder(config)

    @classmethod
    def from_backbone(cls, backbone: str | None = None, **knobs) -> CLIPSeg:
        """A CLIP backbone and a fresh decoder. backbone: a hub id or local directory (default
        openai/clip-vit-base-patch16), "tiny" (a small random CLIP for tests and the demo) or one of RANDOM_BACKBONES
        ("random-vit-b16": a random-initialised CLIP ViT-B/16). knobs: CLIPSegConfig values; `arch` picks CLIPSeg or
        a baseline (`baselines.py`; ViTSeg's backbone is an ImageNet ViT)."""
        arch = knobs.setdefault("arch", cls.arch)
        if arch != cls.arch:
            return model_class(arch).from_backbone(backbone, **knobs)
        backbone = backbone or DEFAULT_BACKBONE
        if backbone == "tiny":
            return cls(tiny_config(**knobs))
        if backbone in RANDOM_BACKBONES:
            with no_init_weights():  # construction would initialise CLIP twice: 4x slower at B/16
                model = cls(CLIPSegConfig(**knobs, backbone=backbone, clip=random_clip_config(backbone)))
            model.clip.init_weights()  # transformers' CLIP initialisation
            model.decoder.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
            return model
        clip = load_backbone(transformers.CLIPModel, backbone)
        source = portable_location(backbone)
        model = cls(CLIPSegConfig(**knobs, backbone=backbone, clip_source=source, clip=clip.config))
        model.clip = clip.requires_grad_(False).eval()
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, backbone: str | None = None, **knobs) -> CLIPSeg:
        """Load an HF CLIPSeg checkpoint (hub id or directory, ours included) or an original `.pth` decoder.

        backbone: the CLIP weights for an original `.pth` (default `openai/clip-vit-base-patch16`).
        knobs: config values the caller relies on. Structural ones (`refined`, `reduce_dim`, ...) are checked
        against the checkpoint and a mismatch raises `CheckpointError` naming the knob; for a `.pth` the ones
        its weights cannot show (`extract_layers`, `decoder_heads`, `conditional_layer`) are taken as given.
        `dropout` and `image_size` override the stored values. Keys and shapes are matched strictly. The class
        built is the one the checkpoint's `arch` names (CLIPSeg or a baseline of `baselines.py`).
        """
        unknown = set(knobs) - set(STRUCTURAL_KNOBS) - set(FREE_KNOBS)
        if unknown:
            raise TypeError(f"unknown config knobs {sorted(unknown)}; known: {STRUCTURAL_KNOBS + FREE_KNOBS}")
        name = str(name_or_path)
        if Path(name).suffix in (".pth", ".pt") and Path(name).is_file():
            return cls._from_original(Path(name), backbone or DEFAULT_BACKBONE, knobs)
        if backbone is not None:
            raise ValueError("backbone= is only for original .pth decoder files; HF checkpoints carry their CLIP")
        stored, config_path = read_config(name)
        config = CLIPSegConfig.from_hf_dict(stored, config_path)
        check_knobs(config, knobs, STRUCTURAL_KNOBS, name)
        target = model_class(config.arch)
        if not issubclass(target, cls):
            raise CheckpointError(f"{name} holds an arch={config.arch!r} model: load it with CLIPSeg.from_pretrained")
        if stored.get("clipseg_weights") == DECODER_WEIGHTS_NAME:
            decoder = load_safetensors(resolve_file(name, DECODER_WEIGHTS_NAME))
            state = {**clip_weights(config.clip_source, name), **decoder}
        else:
            state = load_hf_state_dict(name)
            config = replace(config, clip_source=portable_location(name))  # this checkpoint holds the CLIP weights
        with no_init_weights():  # every weight is overwritten below: skip CLIP's random init (seconds at B/16)
            model = target(replace(config, **{k: v for k, v in knobs.items() if k in FREE_KNOBS}))
        model.load_weights(state, source=name)
        return model

    @classmethod
    def _from_original(cls, path: Path, backbone: str, knobs: dict) -> CLIPSeg:
        arch = knobs.get("arch", cls.arch)
        if arch != "clipseg":
            raise CheckpointError(f"{path}: an original release file holds a CLIPSeg decoder, not arch={arch!r}")
        state = original_to_hf_names(torch_load_safely(path))
        inferred = decoder_knobs_from_state(state)
        check_knobs(CLIPSegConfig(**inferred), knobs, tuple(inferred), str(path))
        model = cls.from_backbone(backbone, **{**knobs, **inferred})
        clip_state = {f"clip.{k}": v for k, v in model.clip.state_dict().items()}
        model.load_weights({**clip_state, **state}, source=str(path))
        return model

    def load_weights(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Copy a full HF-named state dict into the model after checking every key and shape."""
        own = self.state_dict()
        state = {k: v for k, v in state.items() if is_weight(k)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong_shape = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(state))
            if state[k].shape != own[k].shape
        ]
        if missing or unexpected or wrong_shape:
            raise CheckpointError(mismatch_message(source, self.config, missing, unexpected, wrong_shape))
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key])
        if self.text_cache is not None:  # embeddings of the old weights; the cache keeps its kind (and bound)
            self.text_cache.clear()

    def save_pretrained(self, directory: str | os.PathLike, decoder_only: bool = False) -> Path:
        """Write the HF CLIPSeg layout, `config.json` + `model.safetensors`, each atomically: loadable here and by
        `transformers.CLIPSegForImageSegmentation`. With `decoder_only`, `decoder.safetensors` (the trainable
        weights, 4 MB at D = 64) replaces `model.safetensors` (600 MB at ViT-B/16) and the config names where the
        frozen CLIP comes from (`config.clip_source`): loadable here only. The config is written after the weights
        and names the weights file, so a kill at any moment leaves a loadable directory; the other layout's
        weights file is removed last."""
        directory = Path(directory)
        if decoder_only and self.config.clip_source is None:
            raise ValueError(
                "a decoder-only checkpoint needs config.clip_source, and this model's CLIP is random (it cannot be "
                "loaded again from a reference): save the whole model"
            )
        weights, stale = (DECODER_WEIGHTS_NAME, WEIGHTS_NAME) if decoder_only else (WEIGHTS_NAME, DECODER_WEIGHTS_NAME)
        module, prefix = (self.decoder, "decoder.") if decoder_only else (self, "")
        state = {prefix + k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        atomic_write(directory / weights, lambda p: save_safetensors(state, p))
        config = self.config.to_hf_dict() | ({"clipseg_weights": DECODER_WEIGHTS_NAME} if decoder_only else {})
        write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True, allow_nan=False))
        (directory / stale).unlink(missing_ok=True)
        return directory

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def train(self, mode: bool = True) -> CLIPSeg:
        super().train(mode)
        self.clip.eval()  # the backbone is frozen and always in inference mode
        return self

    # -- tokenizer and conditional vectors -----------------------------------------------------------

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            self._tokenizer = CLIPTokenizer.from_directory()
        return self._tokenizer

    def tokenize(self, phrases: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Phrases -> (input_ids, attention_mask), each (K, L) with L the longest prompt (at most 77 tokens).

        Tokens as OpenAI's CLIP makes them (`tokenizer.py`: its text cleaning, then BPE). Longer phrases are
        truncated (keeping the end-of-text token) with a warning; the original raises instead."""
        if isinstance(phrases, str):
            raise TypeError("phrases must be a list of strings, not a single string")
        for i, phrase in enumerate(phrases):
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"phrase {i} is empty or not a string: {phrase!r}")
        ids = [self.tokenizer.encode(phrase) for phrase in phrases]
        too_long = [p for p, t in zip(phrases, ids) if len(t) > CONTEXT_LENGTH]
        if too_long:
            warnings.warn(
                f"{len(too_long)} phrase(s) longer than CLIP's {CONTEXT_LENGTH} tokens were truncated, "
                f"e.g. {too_long[0][:60]!r}...",
                stacklevel=2,
            )
        ids = [t[: CONTEXT_LENGTH - 1] + t[-1:] if len(t) > CONTEXT_LENGTH else t for t in ids]
        length = max(len(t) for t in ids)
        pad = self.tokenizer.end_id  # the features are read at the first end token, so padding never shows
        input_ids = torch.tensor([t + [pad] * (length - len(t)) for t in ids])
        attention_mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in ids])
        return input_ids, attention_mask

    @torch.no_grad()
    def embed_token_ids(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(K, L) token ids -> (K, 512) CLIP text embeddings (end-of-text token, final LN, projection)."""
        device = self.clip.text_projection.weight.device
        input_ids = input_ids.to(device)
        mask = attention_mask.to(device) if attention_mask is not None else None
        hidden = self.clip.text_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0], device=device), input_ids.argmax(dim=-1)]
        return self.clip.text_projection(pooled)

    @torch.no_grad()
    def embed_text(self, phrases: Sequence[str]) -> Tensor:
        """Phrases -> (K, 512) text embeddings. With `text_cache` enabled ({}), each phrase is encoded once.

        A phrase new to the cache is encoded on its own, not batched with the others: a batch's shape changes the
        summation order of the CPU kernels, so a batched embedding would depend on which phrases happened to
        share its batch, and a resumed run (empty cache) would drift from an uninterrupted one."""
        if self.text_cache is None:
            return self.embed_token_ids(*self.tokenize(phrases))
        for phrase in dict.fromkeys(p for p in phrases if p not in self.text_cache):
            self.text_cache[phrase] = self.embed_token_ids(*self.tokenize([phrase]))[0]
        return torch.stack([self.text_cache[p] for p in phrases])

    @torch.no_grad()
    def embed_images(self, prompt_images: Tensor) -> Tensor:
        """(K, 3, h, w) engineered prompt images -> (K, 512) projected CLS embeddings (full vision tower)."""
        hidden, _, _ = self._vision_tower(prompt_images, stop_after=None)
        pooled = self.clip.vision_model.post_layernorm(hidden[:, 0])
        return self.clip.visual_projection(pooled)

    # -- image encoding and decoding -----------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor) -> ImageFeatures:
        """(B, 3, H, W) normalised pixels, H and W multiples of the patch size -> activations of the extracted blocks.

        The vision tower stops after block max(extract_layers); later blocks are never run."""
        _, activations, grid = self._vision_tower(pixel_values, stop_after=max(self.config.extract_layers))
        return ImageFeatures(activations, grid)

    def decode(
        self, features: ImageFeatures, conditional: Tensor, prompts_per_image: Sequence[int] | None = None
    ) -> Tensor:
        """Image features (batch B) + (N, 512) conditionals -> (N, 1, H, W) logits. Image b is decoded against the
        b-th run of `prompts_per_image[b]` consecutive prompts (default: N / B each; one image takes any N)."""
        batch, prompts = features.activations[0].shape[0], conditional.shape[0]
        if conditional.ndim != 2 or conditional.shape[1] != self.config.clip.projection_dim:
            raise ValueError(
                f"conditional must be (N, {self.config.clip.projection_dim}), got {tuple(conditional.shape)}"
            )
        if prompts_per_image is None:
            if prompts % batch:
                raise ValueError(f"{prompts} prompts for {batch} images: give each image the same number of prompts")
            prompts_per_image = [prompts // batch] * batch
        elif len(prompts_per_image) != batch or sum(prompts_per_image) != prompts:
            raise ValueError(
                f"prompts_per_image {list(prompts_per_image)} does not split {prompts} prompts over {batch} images"
            )
        activations = features.activations
        if batch > 1 and any(n != 1 for n in prompts_per_image):  # one image broadcasts; several are repeated
            repeats = torch.as_tensor(prompts_per_image, device=activations[0].device)
            activations = [a.repeat_interleave(repeats, dim=0) for a in activations]
        if not torch.is_autocast_enabled(conditional.device.type):
            dtype = self.decoder.film_mul.weight.dtype
            conditional, activations = conditional.to(dtype), [a.to(dtype) for a in activations]
        return self.decoder(activations, conditional, features.grid)

    def conditional(
        self,
        phrases: Sequence[str] | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        prompt_images: Tensor | None = None,
        conditional: Tensor | None = None,
    ) -> Tensor:
        """Exactly one of the four prompt kinds -> (K, 512) conditional vectors."""
        given = [n for n, v in [("phrases", phrases), ("input_ids", input_ids), ("prompt_images", prompt_images),
                                ("conditional", conditional)] if v is not None]  # fmt: skip
        if len(given) != 1:
            raise ValueError(f"give exactly one of phrases, input_ids, prompt_images, conditional; got {given}")
        if phrases is not None:
            return self.embed_text(phrases)
        if input_ids is not None:
            return self.embed_token_ids(input_ids, attention_mask)
        if prompt_images is not None:
            return self.embed_images(prompt_images.to(self.clip.text_projection.weight.device))
        return conditional

    def forward(
        self,
        pixel_values: Tensor,
        phrases: Sequence[str] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        prompt_images: Tensor | None = None,
        conditional: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> SegmentationOutput:
        """(B, 3, H, W) normalised pixels + N prompts, N a multiple of B (image b takes the b-th group of N/B
        consecutive prompts) -> `SegmentationOutput` with (N, 1, H, W) logits; with `labels` (N, 1, H, W) targets
        in [0, 1] also the training loss, BCE-with-logits averaged over all pixels (computed in fp32).

        The prompt is exactly one of: `phrases` (N strings), `input_ids` (N, L) [+ `attention_mask`],
        `prompt_images` (N, 3, h, w) already engineered (see `preprocess.visual_prompt`), `conditional` (N, 512).
        The vision tower runs once per image, whatever N."""
        cond = self.conditional(phrases, input_ids, attention_mask, prompt_images, conditional)
        logits = self.decode(self.encode_image(pixel_values), cond)
        if labels is None:
            return SegmentationOutput(logits)
        if labels.shape != logits.shape:
            raise ValueError(f"labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.device, torch.float32))
        return SegmentationOutput(logits, loss)

    @torch.no_grad()
    def predict_prompts(self, pixel_values: Tensor, **prompt) -> Tensor:
        """One image (1, 3, H, W) or (3, H, W) and K prompts (any one kind, as in `forward`) -> (K, 1, H, W)
        logits, running the vision tower once."""
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        if pixel_values.shape[0] != 1:
            raise ValueError(f"predict_prompts takes one image, got a batch of {pixel_values.shape[0]}")
        return self.decode(self.encode_image(pixel_values), self.conditional(**prompt))

    def check_pixels(self, pixel_values: Tensor) -> tuple[int, int]:
        """A (B, 3, H, W) batch whose sides are multiples of the patch size -> the grid (H / p, W / p)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        (height, width), patch = pixel_values.shape[-2:], self.config.patch_size
        if height % patch or width % patch:
            fix = "x".join(str(max(patch, round(side / patch) * patch)) for side in (height, width))
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {patch} of {self.config.backbone} "
                f"in both sides: resize to a multiple of {patch}, e.g. {fix}"
            )
        return height // patch, width // patch

    def _vision_tower(self, pixel_values: Tensor, stop_after: int | None) -> tuple[Tensor, list[Tensor], tuple]:
        """Run CLIP's vision blocks 0..stop_after (all when None) on any (H, W) multiple of the patch size.

        Returns the last hidden state, the activations after each extracted block, and the patch grid."""
        vision = self.clip.vision_model
        self.check_pixels(pixel_values)
        weight = vision.embeddings.patch_embedding.weight
        patches = vision.embeddings.patch_embedding(pixel_values.to(weight.device, weight.dtype))
        grid = (patches.shape[-2], patches.shape[-1])
        cls_token = vision.embeddings.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)
        x = torch.cat([cls_token, patches.flatten(2).transpose(1, 2)], dim=1)
        x = vision.pre_layrnorm(x + self._position_embedding(grid).to(x.dtype))
        layers = vision.encoder.layers
        last = len(layers) - 1 if stop_after is None else stop_after
        wanted = set(self.config.extract_layers)
        activations = []
        for i in range(last + 1):
            x = _run_clip_block(layers[i], x)
            if i in wanted:
                activations.append(x)
        return x, activations, grid

    def _position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """CLIP's position embeddings, the patch part resized bicubically to `grid`: (1, 1 + h*w, width)."""
        table = self.clip.vision_model.embeddings.position_embedding.weight
        side = math.isqrt(table.shape[0] - 1)
        cls_pos, patch_pos = table[:1], table[1:]
        if grid != (side, side):
            patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
        return torch.cat([cls_pos, patch_pos])[None]


def _run_clip_block(layer: nn.Module, x: Tensor) -> Tensor:
    """One `CLIPEncoderLayer` without masks (transformers 5 returns a tensor, 4.x a tuple with a causal mask)."""
    out = layer(x, None) if _TRANSFORMERS_MAJOR >= 5 else layer(x, None, None)
    return out[0] if isinstance(out, tuple) else out


_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


# ---------------------------------------------------------------------------------------- loading


def model_class(arch: str) -> type[CLIPSeg]:
    """The class that builds `arch`: CLIPSeg, or a baseline of `baselines.py` (imported here, on first use, since
    baselines.py builds on this module)."""
    if arch == "clipseg":
        return CLIPSeg
    from clipseg import baselines

    return baselines.ARCHITECTURE_CLASSES[arch]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


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


AMP_HELP = (
    "mixed precision: bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs; fp32 on CPUs without native "
    "bf16, where bf16 is emulated and slower"
)


def autocast(device: str | torch.device, enabled: bool = True) -> AbstractContextManager:
    """`torch.autocast` in `amp_dtype(device)`; a no-op when not enabled or when fp32 is the better choice."""
    device = torch.device(device)
    dtype = amp_dtype(device) if enabled else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
