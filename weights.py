"""Checkpoint files: where a checkpoint's files are (local directory or hub id, one code path), reading them
safely, the original release's decoder names mapped to HF CLIPSeg's, and the errors that say why weights do not fit
a model. model.py's `CLIPSeg.from_pretrained` and `save_pretrained` use these.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from safetensors.torch import load_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from model import CLIPSegConfig

WEIGHTS_NAME = "model.safetensors"
DECODER_WEIGHTS_NAME = "decoder.safetensors"  # a decoder-only checkpoint's weights (`clipseg_weights` in its config)
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def load_backbone(model_cls: type, name: str, what: str = "CLIP backbone", **kwargs) -> nn.Module:
    """`model_cls.from_pretrained(name)` (a transformers class) with an error that says what to give instead."""
    try:
        return model_cls.from_pretrained(name, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load the {what} {name!r}: give a hub id (needs network or a filled HF cache) "
            f"or a local directory saved with {model_cls.__name__}.save_pretrained ({err})"
        ) from err


def portable_location(name_or_path: str) -> str:
    """A checkpoint or backbone reference that stays valid from another working directory."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def clip_weights(source: str | None, checkpoint: str) -> dict[str, Tensor]:
    """The `clip.*` weights a decoder-only checkpoint refers to: from a full CLIPSeg checkpoint or a CLIP model."""
    hint = "keep the checkpoint or CLIP it names, or load a complete model (best/, iter_*/ or a finished run)"
    if source is None:
        raise CheckpointError(f"{checkpoint} holds only the decoder and names no CLIP weights; {hint}")
    try:
        stored = json.loads(Path(resolve_file(source, CONFIG_NAME)).read_text())
        if stored.get("model_type") == "clipseg":
            return {k: v for k, v in load_hf_state_dict(source).items() if k.startswith("clip.")}
        return {f"clip.{k}": v for k, v in load_backbone(transformers.CLIPModel, source).state_dict().items()}
    except OSError as err:
        raise CheckpointError(
            f"{checkpoint} holds only the decoder; its CLIP weights come from {source!r}, which cannot be read: "
            f"{err}; {hint}"
        ) from err


def resolve_file(name_or_path: str, filename: str) -> str:
    """A file of a checkpoint directory or hub repository (the same code path for both)."""
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).exists():
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint directory (expected {filename} in it)")
    try:
        path = transformers.utils.cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not open {filename} of {name_or_path!r}: not a local checkpoint directory and not reachable "
            f"on the HF hub (offline? set HF_HUB_OFFLINE=0 and check the id) ({err})"
        ) from err
    if path is None:
        raise FileNotFoundError(f"{name_or_path!r} has no {filename}: is it a CLIPSeg checkpoint?")
    return path


def load_hf_state_dict(name_or_path: str) -> dict[str, Tensor]:
    try:
        path = transformers.utils.cached_file(name_or_path, WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
    except OSError:
        path = None
    if path is not None:
        return load_file(path)
    return torch_load_safely(Path(resolve_file(name_or_path, "pytorch_model.bin")))


def torch_load_safely(path: Path) -> dict[str, Tensor]:
    """A pickled state dict read with `weights_only=True`: tensors and containers only, no code runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: refused to load; it is not a plain tensor state dict (pickled code or objects are never "
            f"executed) or it is damaged: {err}"
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def original_to_hf_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original-release decoder state dict to HF CLIPSeg names (`decoder.*`); the fused attention
    `in_proj` is split into q/k/v; the unused `reduce` layer is dropped. Unknown keys raise."""
    renames = {"linear1": "mlp.fc1", "linear2": "mlp.fc2", "norm1": "layer_norm1", "norm2": "layer_norm2"}
    out, unknown = {}, []
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] in ("film_mul", "film_add", "reduces"):
            out[f"decoder.{key}"] = tensor
        elif parts[0] == "trans_conv":
            out["decoder.transposed_convolution." + ".".join(parts[1:])] = tensor
        elif parts[0] == "reduce":
            continue
        elif parts[0] == "blocks" and key.endswith(("in_proj_weight", "in_proj_bias")):
            prefix, kind = f"decoder.layers.{parts[1]}.self_attn", parts[-1].split("_")[-1]
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"{prefix}.{proj}.{kind}"] = chunk.clone()
        elif parts[0] == "blocks" and parts[2] in ("self_attn", *renames):
            name = renames.get(parts[2], parts[2])
            out[f"decoder.layers.{parts[1]}.{name}." + ".".join(parts[3:])] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unknown keys in an original CLIPSeg decoder file: {unknown[:10]}")
    return out


def decoder_knobs_from_state(state: dict[str, Tensor]) -> dict:
    """The knobs that HF-named decoder weights show: reduce_dim, head, FFN width."""
    if "decoder.film_mul.weight" not in state or "decoder.layers.0.mlp.fc1.weight" not in state:
        raise CheckpointError("not a CLIPSeg decoder: no film_mul / layers.0 weights")
    return dict(
        reduce_dim=state["decoder.film_mul.weight"].shape[0],
        refined="decoder.transposed_convolution.0.weight" in state,
        decoder_ffn_dim=state["decoder.layers.0.mlp.fc1.weight"].shape[0],
    )


def check_knobs(config: CLIPSegConfig, knobs: dict, checkable: Sequence[str], source: str) -> None:
    for knob in checkable:
        if knob in knobs and _normalise(knobs[knob]) != _normalise(getattr(config, knob)):
            hint = _REFINED_HINT if knob == "refined" else ""
            raise CheckpointError(
                f"{source}: the checkpoint has {knob}={getattr(config, knob)!r} but {knob}={knobs[knob]!r} was "
                f"asked for; its weights do not fit that model{hint}"
            )


def _normalise(value):
    return tuple(value) if isinstance(value, list | tuple) else value


STRUCTURAL_KNOBS = (
    "arch", "extract_layers", "reduce_dim", "decoder_heads", "decoder_ffn_dim", "refined", "conditional_layer",
)  # fmt: skip
FREE_KNOBS = ("dropout", "image_size", "backbone", "text_backbone")
_REFINED_HINT = (
    " (keys decoder.transposed_convolution.{0,2,4}.* belong to the refined head, "
    "decoder.transposed_convolution.weight to the plain one)"
)


def mismatch_message(source, config, missing, unexpected, wrong_shape) -> str:
    def listing(keys):
        return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

    lines = [
        f"{source} does not fit this model (arch={config.arch}, refined={config.refined}, "
        f"reduce_dim={config.reduce_dim}):"
    ]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    if wrong_shape:
        lines.append(f"  wrong shapes ({len(wrong_shape)}): {listing(wrong_shape)}")
    keys = missing + unexpected
    if any("transposed_convolution.0" in k for k in keys) or any(
        k.endswith("transposed_convolution.weight") for k in keys
    ):
        lines.append("  the checkpoint and the model disagree on the head: refined (3 layers) vs plain")
    if any("film_mul" in k or "reduces" in k for k in wrong_shape):
        lines.append("  the checkpoint and the model disagree on reduce_dim")
    return "\n".join(lines)
