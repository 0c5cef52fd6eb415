"""CLIPSeg: a frozen CLIP ViT-B/16 and a small FiLM-conditioned transformer decoder that turns a text or image
prompt into a segmentation mask (Lüddecke & Ecker, CVPR 2022).

The CLIP towers come from `transformers`; the decoder, the early-exit vision pass (it stops after the deepest
extracted block), position-embedding interpolation for any image shape and the weight loaders are ours (reading
checkpoint files: `clipseg/weights.py`); the tokenizer is OpenAI's (`clipseg/tokenizer.py`) and the input rules are in
`clipseg/transforms.py`. Weights load from:

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
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from clipseg.baselines import DEFAULT_VIT, DeconvDecoder, ViTSegDecoder, tiny_vit_config, vit_blocks, vit_name
from clipseg.config import DEFAULT_BACKBONE, RANDOM_BACKBONES, CLIPSegConfig, random_clip_config, tiny_config
from clipseg.decoder import CLIPSegDecoder, prompts_per_image_of
from clipseg.frozen_clip import (
    Scratch,
    can_run_frozen,
    low_precision,
    patch_embedding,
    resized_positions,
    run_clip_block,
    run_frozen_block,
    run_frozen_text,
)
from clipseg.outputs import atomic_write, write_text
from clipseg.tokenizer import CONTEXT_LENGTH, CLIPTokenizer
from clipseg.weights import (
    CONFIG_NAME,
    DECODER_WEIGHTS_NAME,
    FREE_KNOBS,
    STRUCTURAL_KNOBS,
    WEIGHTS_NAME,
    CheckpointError,
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
    logits are (B, 1, p*h, p*w) for patch size p: the token grid, except for ViTSeg (`clipseg/baselines.py`), whose
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

    The paper's baselines (`CLIPDeconv`, `ViTSeg`) are subclasses with another decoder or image tower; `from_backbone`
    and `from_pretrained` return the class that `config.arch` names."""

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
        self._positions: tuple | None = None  # (grid and table version, position embeddings): `_position_embedding`

    # -- construction and weights --------------------------------------------------------------------

    def build_clip(self, config: CLIPSegConfig) -> nn.Module:
        """The CLIP towers (frozen by the caller): text for prompts, vision for images and image prompts."""
        return transformers.CLIPModel(config.clip)

    def build_decoder(self, config: CLIPSegConfig) -> nn.Module:
        """The trainable part: called as decoder(activations, conditional, grid) -> logits."""
        return CLIPSegDecoder(config)

    @classmethod
    def from_backbone(cls, backbone: str | None = None, **knobs: Any) -> CLIPSeg:
        """A CLIP backbone and a fresh decoder. backbone: a hub id or local directory (default
        openai/clip-vit-base-patch16), "tiny" (a small random CLIP for tests and the demo) or one of RANDOM_BACKBONES
        ("random-vit-b16": a random-initialised CLIP ViT-B/16). knobs: CLIPSegConfig values; `arch` picks CLIPSeg or
        a baseline (`clipseg/baselines.py`; ViTSeg's backbone is an ImageNet ViT)."""
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
    def from_pretrained(cls, name_or_path: str | os.PathLike, backbone: str | None = None, **knobs: Any) -> CLIPSeg:
        """Load an HF CLIPSeg checkpoint (hub id or directory, ours included) or an original `.pth` decoder.

        backbone: the CLIP weights for an original `.pth` (default `openai/clip-vit-base-patch16`).
        knobs: config values the caller relies on. Structural ones (`refined`, `reduce_dim`, ...) are checked
        against the checkpoint and a mismatch raises `CheckpointError` naming the knob; for a `.pth` the ones
        its weights cannot show (`extract_layers`, `decoder_heads`, `conditional_layer`) are taken as given.
        `dropout` and `image_size` override the stored values. Keys and shapes are matched strictly. The class
        built is the one the checkpoint's `arch` names (CLIPSeg or a baseline (`clipseg/baselines.py`)).
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
        check_knobs(config.knobs(), knobs, STRUCTURAL_KNOBS, name)
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
        check_knobs(CLIPSegConfig(**inferred).knobs(), knobs, tuple(inferred), str(path))
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

        Tokens as OpenAI's CLIP makes them (`clipseg/tokenizer.py`: its text cleaning, then BPE). Longer phrases are
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
        text, dtype = self.clip.text_model, low_precision(input_ids)
        if dtype is not None and all(can_run_frozen(layer) for layer in text.encoder.layers):
            hidden = run_frozen_text(text, input_ids, mask, dtype)  # bf16: from bf16 copies of the weights
        else:
            hidden = text(input_ids=input_ids, attention_mask=mask).last_hidden_state
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
        batch = features.activations[0].shape[0]
        projection_dim = self.config.clip.projection_dim
        prompts_per_image = prompts_per_image_of(conditional, batch, projection_dim, prompts_per_image)
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
        `prompt_images` (N, 3, h, w) already engineered (see `clipseg.visual_prompts.visual_prompt`), `conditional` (N,
        512). The vision tower runs once per image, whatever N."""
        cond = self.conditional(phrases, input_ids, attention_mask, prompt_images, conditional)
        logits = self.decode(self.encode_image(pixel_values), cond)
        if labels is None:
            return SegmentationOutput(logits)
        if labels.shape != logits.shape:
            raise ValueError(f"labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.device, torch.float32))
        return SegmentationOutput(logits, loss)

    @torch.no_grad()
    def predict_prompts(self, pixel_values: Tensor, **prompt: Any) -> Tensor:
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
        vision, grid = self.clip.vision_model, self.check_pixels(pixel_values)
        conv = vision.embeddings.patch_embedding
        pixel_values = pixel_values.to(conv.weight.device, conv.weight.dtype)
        dtype = low_precision(pixel_values)  # bf16: the products from bf16 copies of the weights, made once
        patches = patch_embedding(conv, pixel_values, dtype)
        cls_token = vision.embeddings.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)
        x = torch.cat([cls_token, patches], dim=1)
        x = vision.pre_layrnorm(x + self._position_embedding(grid).to(x.dtype))
        layers = vision.encoder.layers
        last = len(layers) - 1 if stop_after is None else stop_after
        wanted = set(self.config.extract_layers)
        activations, scratch = [], Scratch()
        for i in range(last + 1):
            frozen = can_run_frozen(layers[i])
            x = run_frozen_block(layers[i], x, dtype, scratch) if frozen else run_clip_block(layers[i], x)
            if i in wanted:
                activations.append(x)
        return x, activations, grid

    def _position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """CLIP's position embeddings, the patch part resized bicubically to `grid`: (1, 1 + h*w, width). Those of
        the last grid are kept (remade when the table changes), except while the model is traced for an export (the
        grid is symbolic there) or when the table takes gradients."""
        table = self.clip.vision_model.embeddings.position_embedding.weight
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or (torch.is_grad_enabled() and table.requires_grad):
            return resized_positions(table, grid)
        key = (grid, table.data_ptr(), table._version, table.device)
        if self._positions is None or self._positions[0] != key:
            self._positions = (key, resized_positions(table, grid))
        return self._positions[1]


# ------------------------------------------------------------------------------------- the paper's baselines


class CLIPDeconv(CLIPSeg):
    """Frozen CLIP, one block read, `baselines.DeconvDecoder` (docs/original.md §10). Everything else is
    CLIPSeg's."""

    arch = "clip-deconv"

    def build_decoder(self, config: CLIPSegConfig) -> nn.Module:
        return DeconvDecoder(config)


class ViTSeg(CLIPSeg):
    """A frozen ImageNet ViT (`self.vit`) for the image, CLIP's frozen text tower (`self.clip`) for the prompt, the
    plain CLIPSeg decoder between them (docs/original.md §10; the parts are in `clipseg.baselines`)."""

    arch = "vitseg"

    def __init__(self, config: CLIPSegConfig):
        super().__init__(config)
        self.vit = transformers.ViTModel(config.vit, add_pooling_layer=False).requires_grad_(False).eval()
        # Image prompts: the final-norm CLS through a random projection that stays frozen, as in the original.
        self.image_projection = nn.Linear(config.vit.hidden_size, config.clip.projection_dim).requires_grad_(False)

    def build_clip(self, config: CLIPSegConfig) -> nn.Module:
        """CLIP's text tower and text projection only (its state-dict names stay `clip.text_model.*`,
        `clip.text_projection.weight`)."""
        text = {**config.clip.text_config.to_dict(), "projection_dim": config.clip.projection_dim}
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(text))

    def build_decoder(self, config: CLIPSegConfig) -> nn.Module:
        return ViTSegDecoder(config)

    @classmethod
    def from_backbone(cls, backbone: str | None = None, **knobs: Any) -> CLIPSeg:
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

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The state with the ViT's parameters under their transformers 4.x names (`baselines.VIT_NAMES`), whichever
        version runs: `save_pretrained` writes them and `load_weights` matches against them."""
        state = super().state_dict(*args, **kwargs)
        return type(state)((vit_name(key, legacy=True), value) for key, value in state.items())

    def load_state_dict(self, state_dict: dict[str, Tensor], *args: Any, **kwargs: Any) -> tuple[list[str], list[str]]:
        """Takes the ViT's parameters under either version's names."""
        legacy = not hasattr(self.vit, "layers")  # transformers 4.x has vit.encoder.layer
        renamed = {vit_name(key, legacy=legacy): value for key, value in state_dict.items()}
        return super().load_state_dict(renamed, *args, **kwargs)

    def train(self, mode: bool = True) -> ViTSeg:
        super().train(mode)
        self.vit.eval()  # frozen, always in inference mode
        return self

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor) -> ImageFeatures:
        """(B, 3, H, W) ImageNet-normalised pixels, H and W multiples of 16 -> activations of the ViT blocks read,
        at the ViT's native size. The tower stops after block max(extract_layers)."""
        grid = self.check_pixels(pixel_values)
        layers = self.config.extract_layers
        _, activations = vit_blocks(self.vit, pixel_values, self.config.vit.image_size, layers, max(layers))
        return ImageFeatures(activations, grid)

    @torch.no_grad()
    def embed_images(self, prompt_images: Tensor) -> Tensor:
        """(K, 3, h, w) engineered prompt images -> (K, 512) conditionals: the ViT's final-norm CLS, projected."""
        layers = self.config.extract_layers
        hidden, _ = vit_blocks(self.vit, prompt_images, self.config.vit.image_size, layers, stop_after=None)
        return self.image_projection(self.vit.layernorm(hidden[:, 0]))


# ---------------------------------------------------------------------------------------- loading

# config.arch -> the class that builds it (`CLIPSeg.from_backbone` and `from_pretrained` dispatch on it)
ARCHITECTURE_CLASSES: dict[str, type[CLIPSeg]] = {cls.arch: cls for cls in (CLIPSeg, CLIPDeconv, ViTSeg)}


def model_class(arch: str) -> type[CLIPSeg]:
    """The class that builds `arch` (CLIPSeg or one of the paper's baselines)."""
    return ARCHITECTURE_CLASSES[arch]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
