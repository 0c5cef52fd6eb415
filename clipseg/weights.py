"""Checkpoint files: where a checkpoint's files are (local directory or hub id, one code path), reading and writing
them safely, the original release's decoder names mapped to HF CLIPSeg's, and the errors that say why weights do
not fit a model. model.py's `CLIPSeg.from_pretrained` and `save_pretrained` use these.

A model file is untrusted until checked: a config.json must be a JSON object whose geometry lies in sane ranges
(`check_config`, before anything is built from it), and every weight must be a finite floating-point tensor
(`check_tensors`). A file that fails is a `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.activations import ACT2FN

from clipseg.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE

WEIGHTS_NAME = "model.safetensors"
DECODER_WEIGHTS_NAME = "decoder.safetensors"  # a decoder-only checkpoint's weights (`clipseg_weights` in its config)
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint file is damaged, implausible or does not fit the model it is loaded into."""


def load_backbone(model_cls: type, name: str, what: str = "CLIP backbone", **kwargs: Any) -> nn.Module:
    """`model_cls.from_pretrained(name)` (a transformers class) with an error that says what to give instead. Its
    config.json is checked (`check_config`) before transformers builds anything from it, and the weights after."""
    try:
        config_path = resolve_file(name, CONFIG_NAME)
    except OSError:
        config_path = None  # not found: transformers' error below says so
    if config_path is not None:
        check_config(read_json(Path(config_path)), config_path)
    try:
        module, loading = model_cls.from_pretrained(name, output_loading_info=True, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load the {what} {name!r}: give a hub id (needs network or a filled HF cache) "
            f"or a local directory saved with {model_cls.__name__}.save_pretrained ({err})"
        ) from err
    except SafetensorError as err:
        raise CheckpointError(f"the {what} {name!r}: {_DAMAGED} ({err})") from err
    except RuntimeError as err:  # weights whose shapes are not the config's
        raise CheckpointError(f"the {what} {name!r}: its weights do not fit its config.json ({err})") from err
    missing = list(loading.get("missing_keys") or [])
    if missing:  # transformers would leave them random and only warn
        raise CheckpointError(
            f"the {what} {name!r}: {len(missing)} weight(s) missing from its weights file, e.g. "
            f"{', '.join(sorted(missing)[:3])}: the file is damaged or of another model"
        )
    check_tensors(module.state_dict(), f"the {what} {name!r}")
    return module


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
        stored, _ = read_config(source)
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
    if path is None and not Path(name_or_path).is_dir() and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{name_or_path!r} is not in the local HF cache, and HF_HUB_OFFLINE is set")
    if path is None:
        raise FileNotFoundError(f"{name_or_path!r} has no {filename}: is it a CLIPSeg checkpoint?")
    return path


def read_config(name_or_path: str) -> tuple[dict, str]:
    """The config.json of a checkpoint directory or hub repository as a JSON object, and its path. Its values are
    checked where a model is built from them (`check_config`)."""
    path = resolve_file(name_or_path, CONFIG_NAME)
    return read_json(Path(path)), path


def load_hf_state_dict(name_or_path: str) -> dict[str, Tensor]:
    local = Path(name_or_path) / WEIGHTS_NAME
    if os.path.lexists(local) and not local.is_file():  # a folder, a device, a FIFO, a dangling link
        raise CheckpointError(f"{local}: not a regular file; copy the checkpoint's {WEIGHTS_NAME} there")
    try:
        path = transformers.utils.cached_file(name_or_path, WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
    except OSError:
        path = None
    if path is not None:
        return load_safetensors(path)
    return torch_load_safely(Path(resolve_file(name_or_path, "pytorch_model.bin")))


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """A safetensors file's tensors, checked (`check_tensors`); a damaged file is a CheckpointError naming it."""
    try:
        state = load_file(path)
    except SafetensorError as err:
        raise CheckpointError(f"{path}: {_DAMAGED} ({err})") from err
    check_tensors(state, str(path))
    return state


def save_safetensors(state: dict[str, Tensor], path: str | Path) -> None:
    """`safetensors.torch.save_file` whose write errors (a full disk) are OSError, as Python's own writes are:
    safetensors raises its own SafetensorError, which callers that handle failed writes would not catch."""
    try:
        save_file(state, path, metadata={"format": "pt"})
    except SafetensorError as err:
        raise OSError(f"could not write {path}: {err}") from err


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
    check_tensors(state, str(path))
    return state


_DAMAGED = "not a readable safetensors file (cut short by an interrupted download or copy, or damaged)"


# --------------------------------------------------------------------------------- checking what a file holds


def is_weight(key: str) -> bool:
    """False for the index buffers some checkpoints carry (`position_ids`, int64): the model makes its own."""
    return not key.endswith("position_ids")


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float8 and others are refused


def check_tensors(state: dict[str, Tensor], source: str) -> None:
    """Every weight floating point and finite: integer or boolean tensors would be converted without a word, and
    one NaN spreads through the network to empty masks and NaN scores. Raises CheckpointError naming `source`."""
    weights = {key: tensor for key, tensor in state.items() if is_weight(key)}
    not_float = [f"{key} ({tensor.dtype})" for key, tensor in weights.items() if tensor.dtype not in WEIGHT_DTYPES]
    if not_float:
        raise CheckpointError(
            f"{source}: {len(not_float)} weight(s) are not float32, float16, bfloat16 or float64, e.g. "
            f"{', '.join(not_float[:3])}: the file is damaged or not a model of this kind"
        )
    non_finite = [key for key, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if non_finite:
        raise CheckpointError(
            f"{source}: {len(non_finite)} weight(s) hold NaN or infinite values, e.g. {', '.join(non_finite[:3])}: "
            "the model would give empty masks and NaN scores; use a checkpoint saved before training diverged"
        )


MAX_JSON_BYTES = 1 << 20  # a config.json or manifest.json is a few KB


def read_json(path: Path) -> dict:
    """A JSON object from a file of at most MAX_JSON_BYTES; anything else is a CheckpointError naming the file."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than a JSON config ever needs")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# Ranges of the integers that shape a backbone tower: CLIP's text and vision towers, ViTSeg's ImageNet ViT. They are
# generous (OpenCLIP's ViT-bigG/14, the largest CLIP released, has width 1664, FFN 8192, 48 blocks and 16 heads) and
# exist so that a damaged or hostile config.json is refused before anything is built from it. The text tower must
# take every id and length the tokenizer makes.
TOWER_LIMITS = {
    "hidden_size": (1, 16384),
    "intermediate_size": (1, 65536),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 256),
    "patch_size": (1, 256),
    "image_size": (1, 4096),  # the pre-training side, which sets the size of the position table
    "num_channels": (3, 3),
    "vocab_size": (VOCAB_SIZE, 1 << 20),
    "max_position_embeddings": (CONTEXT_LENGTH, 4096),
}
# The decoder's integers, by their HF CLIPSeg names (the released models: projection 512, D = 64, 4 heads, FFN 2048).
DECODER_LIMITS = {
    "projection_dim": (1, 16384),
    "reduce_dim": (1, 4096),
    "decoder_num_attention_heads": (1, 256),
    "decoder_intermediate_size": (1, 65536),
    "conditional_layer": (0, 255),
}
# The largest model a config may describe: 16 GB of fp32 weights, 1.6 times the largest CLIP released (ViT-bigG/14,
# 2.5e9). Counted from the config alone (`estimated_parameters`), so that no combination of in-range values makes
# the loader allocate more.
MAX_PARAMETERS = 4_000_000_000
# Our keys in a CLIPSeg config.json and the types their values may have (None: not set).
_EXTRA_KEYS = {
    "clipseg_arch": (str,),
    "clipseg_backbone": (str, type(None)),
    "clipseg_clip_source": (str, type(None)),
    "clipseg_text_backbone": (str, type(None)),
    "clipseg_weights": (str, type(None)),
    "clipseg_image_size": (int, type(None)),
    "clipseg_vit_config": (dict, type(None)),
    "clipseg_threshold": (float, type(None)),
    "clipseg_threshold_origin": (str, type(None)),
    "use_complex_transposed_convolution": (bool,),
}


def check_config(data: dict, source: str) -> None:
    """The values of a CLIPSeg, CLIP or ViT config.json, before anything is built from them: every geometry value an
    integer in its range (TOWER_LIMITS, DECODER_LIMITS), widths divisible by the head counts, our own keys of the
    right types, and the model no larger than MAX_PARAMETERS. Raises CheckpointError naming `source` and the value.
    Relations between the decoder's values (extract_layers against the depth, ...) are `CLIPSegConfig`'s to check."""
    if data.get("model_type") == "clipseg":
        _check_clipseg_keys(data, source)
    towers = _tower_geometry(data, source)
    for prefix, tower in towers.items():
        _check_integers(tower, TOWER_LIMITS, source, prefix)
        if tower["hidden_size"] % tower["num_attention_heads"]:
            raise CheckpointError(
                f"{source}: {prefix}hidden_size {tower['hidden_size']} is not divisible by "
                f"{prefix}num_attention_heads {tower['num_attention_heads']}"
            )
        activation = tower.get("hidden_act", "quick_gelu")
        if not isinstance(activation, str) or activation not in ACT2FN:
            raise CheckpointError(
                f"{source}: {prefix}hidden_act = {activation!r} is not an activation transformers knows (CLIP's is "
                "'quick_gelu', ViT's 'gelu')"
            )
        if tower.get("patch_size", 0) > tower.get("image_size", 0):
            raise CheckpointError(
                f"{source}: {prefix}patch_size {tower['patch_size']} is larger than {prefix}image_size "
                f"{tower['image_size']}: the tower would have no patches"
            )
    _check_integers(_decoder_geometry(data), DECODER_LIMITS, source, "")
    parameters = estimated_parameters(data)
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(
            f"{source}: describes a model of about {parameters:.1e} parameters ({4 * parameters / 1e9:.0f} GB in "
            f"fp32), more than the {MAX_PARAMETERS:.0e} this code loads (MAX_PARAMETERS); the config is damaged"
        )


def estimated_parameters(data: dict) -> int:
    """A lower bound of the parameters of the model a config.json (`data`, of valid types) describes, within a
    fraction of a percent: biases, layer norms and the decoder's head are left out."""
    towers, decoder = _tower_geometry(data, "config"), _decoder_geometry(data)
    if data.get("clipseg_arch") == "vitseg":  # ViTSeg builds CLIP's text tower only; the ViT sees the image
        towers = {prefix: tower for prefix, tower in towers.items() if prefix != "vision_config."}
    total = 0
    for prefix, tower in towers.items():
        width, ffn = tower["hidden_size"], tower["intermediate_size"]
        total += tower["num_hidden_layers"] * (4 * width * width + 2 * width * ffn)
        if "patch_size" in tower:
            patches = (tower["image_size"] // tower["patch_size"]) ** 2
            total += width * (tower["num_channels"] * tower["patch_size"] ** 2 + patches + 1)
        if "vocab_size" in tower:
            total += width * (tower["vocab_size"] + tower["max_position_embeddings"])
        if prefix in ("text_config.", "vision_config."):
            total += width * decoder["projection_dim"]
    if data.get("model_type") == "clipseg":
        image = towers.get("clipseg_vit_config.") or towers["vision_config."]
        dim, ffn, blocks = decoder["reduce_dim"], decoder["decoder_intermediate_size"], len(data["extract_layers"])
        total += blocks * (image["hidden_size"] * dim + 4 * dim * dim + 2 * dim * ffn)
    return total


def _check_clipseg_keys(data: dict, source: str) -> None:
    for key, types in _EXTRA_KEYS.items():
        if key in data and type(data[key]) not in types:
            raise CheckpointError(f"{source}: {key} = {data[key]!r} has the wrong type")
    if data.get("clipseg_arch") == "vitseg" and not data.get("clipseg_vit_config"):
        raise CheckpointError(f"{source}: clipseg_arch 'vitseg' needs clipseg_vit_config, the config of its ViT")
    dropout = data.get("clipseg_decoder_dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise CheckpointError(f"{source}: clipseg_decoder_dropout = {dropout!r} is not a probability")
    threshold = data.get("clipseg_threshold")
    if threshold is not None and not 0 < threshold < 1:
        raise CheckpointError(f"{source}: clipseg_threshold = {threshold!r} is not a threshold in (0, 1)")
    layers = data.get("extract_layers")
    if (
        not isinstance(layers, list)
        or not 0 < len(layers) <= TOWER_LIMITS["num_hidden_layers"][1]
        or not all(type(i) is int for i in layers)
    ):
        raise CheckpointError(f"{source}: extract_layers = {layers!r} is not a list of block numbers")


def _tower_geometry(data: dict, source: str) -> dict[str, dict]:
    """prefix -> the geometry values of each tower `data` describes, transformers' defaults filled in: a ViT's own
    keys, or CLIP's `text_config` and `vision_config` (and ViTSeg's `clipseg_vit_config`)."""
    if data.get("model_type") == "vit":
        return {"": {**_tower_defaults("vit"), **data}}
    towers = {}
    for name in ("text_config", "vision_config", "clipseg_vit_config"):
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise CheckpointError(f"{source}: {name} must be a JSON object, got {type(values).__name__}")
        if values or name != "clipseg_vit_config":
            towers[f"{name}."] = {**_tower_defaults(name), **values}
    return towers


def _check_integers(values: dict, limits: dict[str, tuple[int, int]], source: str, prefix: str) -> None:
    for key, (low, high) in limits.items():
        if key not in values:
            continue
        value = values[key]
        if type(value) is not int or not low <= value <= high:
            raise CheckpointError(
                f"{source}: {prefix}{key} = {value!r} is out of range: expected an integer from {low} to {high}"
            )


@cache
def _tower_defaults(name: str) -> dict:
    """The geometry transformers gives a tower whose config.json leaves a value out."""
    classes = {"text_config": transformers.CLIPTextConfig, "vision_config": transformers.CLIPVisionConfig}
    full = classes.get(name, transformers.ViTConfig)().to_dict()
    return {key: full[key] for key in TOWER_LIMITS if full.get(key) is not None}


def _decoder_geometry(data: dict) -> dict:
    """The decoder's values (DECODER_LIMITS' keys) of a config.json, transformers' defaults filled in."""
    return {**_decoder_defaults(), **{key: value for key, value in data.items() if key in DECODER_LIMITS}}


@cache
def _decoder_defaults() -> dict:
    full = transformers.CLIPSegConfig().to_dict()
    return {key: full[key] for key in DECODER_LIMITS}


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


def check_knobs(stored: dict, knobs: dict, checkable: Sequence[str], source: str) -> None:
    """CheckpointError when a knob the caller asked for (`knobs`) differs from the checkpoint's (`stored`, its
    `CLIPSegConfig.knobs()`), for the knobs in `checkable`."""
    for knob in checkable:
        if knob in knobs and _normalise(knobs[knob]) != _normalise(stored[knob]):
            hint = _REFINED_HINT if knob == "refined" else ""
            raise CheckpointError(
                f"{source}: the checkpoint has {knob}={stored[knob]!r} but {knob}={knobs[knob]!r} was "
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


def mismatch_message(
    source: str, config: Any, missing: list[str], unexpected: list[str], wrong_shape: list[str]
) -> str:
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
