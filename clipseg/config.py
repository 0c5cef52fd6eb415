"""The model's configuration: `CLIPSegConfig` (the decoder's knobs with documented defaults, the backbone's geometry,
the architecture), its JSON form (HF CLIPSeg's config.json plus our keys), the limits on image sides, and the
geometries of the random and tiny backbones used offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import transformers

from clipseg.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE
from clipseg.transforms import IMAGE_SIZE
from clipseg.weights import CheckpointError, check_config

PATCH_SIZE = 16  # of the released models; other CLIPs bring their own (`CLIPSegConfig.patch_size`)
# The largest image side the model runs at (--image-size, a config's image_size), checked before any image is
# resized. CLIP saw 224 px and CLIPSeg was trained at 352 px; position embeddings are interpolated to any grid, but
# at 4096 px a ViT-B/16 already attends over 65,536 tokens per image, and memory and time grow with their square,
# so a larger side adds cost, not detail. It is also the largest side the ONNX export takes (256 patches of 16).
MAX_IMAGE_SIDE = 4096
DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"
# CLIPSeg and the paper's two baselines (model.py) -> the class config.json names; only the first loads in HF.
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
    """Decoder knobs (paper section 3; docs/original.md §2) plus the geometry of the backbone.

    Defaults are those of the released `rd64` models. `clip` is a `transformers.CLIPConfig`; when it is None the
    backbone's geometry is unknown until `CLIPSeg.from_pretrained`/`from_backbone` fills it in. `arch` picks CLIPSeg
    or one of the paper's baselines (`model.CLIPDeconv`, `model.ViTSeg`); `vit` is the ImageNet ViT's
    `transformers.ViTConfig` of ViTSeg (whose `clip` then only provides the text tower).
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
    # the calibrated mask threshold: train.py's validation records the one that maximised the validation metric
    # (config.json's `clipseg_threshold`, how in `clipseg_threshold_origin`); None: not calibrated (the released
    # models), callers use the paper's 0.3 (`clipseg.postprocess.resolve_threshold`)
    threshold: float | None = None
    threshold_origin: str | None = None
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
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"the calibrated threshold must be in (0, 1), got {self.threshold!r}")
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
        out["clipseg_threshold"] = self.threshold
        out["clipseg_threshold_origin"] = self.threshold_origin
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
            threshold=data.get("clipseg_threshold"),
            threshold_origin=data.get("clipseg_threshold_origin"),
            clip=clip,
            vit=transformers.ViTConfig.from_dict(vit) if vit is not None else None,
        )

    def knobs(self) -> dict:
        """The decoder knobs without the backbone geometry or the calibration (for logs and argument files)."""
        left_out = ("clip", "clip_source", "vit", "threshold", "threshold_origin")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in left_out}


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
            f"use {f'{low} or ' if low else ''}{high} (--image-size)"
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


def tiny_config(**knobs: Any) -> CLIPSegConfig:
    """A tiny CLIPSeg configuration: 6 vision blocks, width 64, decoder reading blocks 1, 3, 4, D = 16."""
    defaults = dict(reduce_dim=16, decoder_ffn_dim=64, backbone="tiny")
    return CLIPSegConfig(**{**defaults, **knobs, "clip": knobs.get("clip") or tiny_clip_config()})
