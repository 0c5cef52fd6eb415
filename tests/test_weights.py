"""weights.py: damaged, implausible or hostile model files are a CheckpointError naming the file and the problem
(exit 2 from the scripts, no traceback), on every load path: the HF layout (safetensors, pytorch_model.bin), decoder-
only checkpoints, original .pth decoders and CLIP backbones; config values are checked before anything is built."""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from clipseg.weights import MAX_PARAMETERS, CheckpointError, estimated_parameters
from model import CLIPSeg, count_parameters

REPO = Path(__file__).resolve().parents[1]
WEIGHT = "decoder.film_mul.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A tiny complete checkpoint (config.json + model.safetensors)."""
    torch.manual_seed(0)
    return CLIPSeg.from_backbone("tiny").save_pretrained(tmp_path_factory.mktemp("good") / "tiny")


def damaged_copy(good: Path, tmp_path: Path, state_edit=None, config_edit=None, weights_bytes=None) -> Path:
    """A copy of `good` with its weights or config changed."""
    directory = tmp_path / "damaged"
    shutil.copytree(good, directory)
    if state_edit is not None:
        state = load_file(directory / "model.safetensors")
        state_edit(state)
        save_file(state, directory / "model.safetensors")
    if config_edit is not None:
        config = json.loads((directory / "config.json").read_text())
        config_edit(config)
        (directory / "config.json").write_text(json.dumps(config))
    if weights_bytes is not None:
        (directory / "model.safetensors").write_bytes(
            weights_bytes(directory.joinpath("model.safetensors").read_bytes())
        )
    return directory


def set_weight(value):
    return lambda state: state.__setitem__(WEIGHT, value(state[WEIGHT]))


def set_value(*path_and_value):
    *path, key, value = path_and_value

    def edit(config):
        for part in path:
            config = config[part]
        config[key] = value

    return edit


BROKEN_WEIGHTS = {
    "truncated": (dict(weights_bytes=lambda data: data[: len(data) // 2]), "not a readable safetensors file"),
    "empty": (dict(weights_bytes=lambda data: b""), "not a readable safetensors file"),
    "garbage": (dict(weights_bytes=lambda data: b"\xff" * 64), "not a readable safetensors file"),
    "nan": (dict(state_edit=set_weight(lambda t: torch.full_like(t, float("nan")))), "NaN or infinite values"),
    "inf": (dict(state_edit=set_weight(lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))), "NaN or inf"),
    "int64": (dict(state_edit=set_weight(lambda t: (t * 100).long())), f"{WEIGHT} (torch.int64)"),
    "bool": (dict(state_edit=set_weight(lambda t: t > 0)), f"{WEIGHT} (torch.bool)"),
    "float8": (dict(state_edit=set_weight(lambda t: t.to(torch.float8_e4m3fn))), f"{WEIGHT} (torch.float8_e4m3fn)"),
}


@pytest.mark.parametrize("kind", BROKEN_WEIGHTS)
def test_damaged_or_implausible_weights_are_named_errors(good, tmp_path, kind):
    edit, message = BROKEN_WEIGHTS[kind]
    directory = damaged_copy(good, tmp_path, **edit)
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        CLIPSeg.from_pretrained(directory)
    assert str(err.value).startswith(f"{directory / 'model.safetensors'}: ")


@pytest.mark.parametrize("target", ["/dev/zero", "missing", "folder"])
def test_weights_that_are_not_a_regular_file_are_named(good, tmp_path, target):
    directory = damaged_copy(good, tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "folder").mkdir()
    (directory / "model.safetensors").symlink_to(target if target.startswith("/") else directory / target)
    with pytest.raises(CheckpointError, match="model.safetensors: not a regular file; copy the checkpoint's"):
        CLIPSeg.from_pretrained(directory)


BROKEN_CONFIGS = {
    "hidden_size 1e9": (set_value("vision_config", "hidden_size", 10**9), "vision_config.hidden_size = 1000000000"),
    "0 heads": (set_value("vision_config", "num_attention_heads", 0), "vision_config.num_attention_heads = 0"),
    "patch size 0": (set_value("vision_config", "patch_size", 0), "vision_config.patch_size = 0"),
    "negative width": (set_value("text_config", "hidden_size", -64), "text_config.hidden_size = -64"),
    "a million layers": (set_value("vision_config", "num_hidden_layers", 10**6), "num_hidden_layers = 1000000"),
    "width as text": (set_value("vision_config", "hidden_size", "64"), "vision_config.hidden_size = '64'"),
    "width as float": (set_value("vision_config", "hidden_size", 64.0), "vision_config.hidden_size = 64.0"),
    "heads as bool": (set_value("text_config", "num_attention_heads", True), "num_attention_heads = True"),
    "width not divisible": (set_value("vision_config", "num_attention_heads", 3), "not divisible by"),
    "huge pre-training side": (set_value("vision_config", "image_size", 10**6), "vision_config.image_size = 1000000"),
    "patch above the side": (set_value("vision_config", "patch_size", 128), "no patches"),
    "vocabulary below the tokenizer's": (set_value("text_config", "vocab_size", 100), "vocab_size = 100"),
    "projection 0": (set_value("projection_dim", 0), "projection_dim = 0"),
    "reduce_dim 1e9": (set_value("reduce_dim", 10**9), "reduce_dim = 1000000000"),
    "decoder heads 0": (set_value("decoder_num_attention_heads", 0), "decoder_num_attention_heads = 0"),
    "decoder ffn negative": (set_value("decoder_intermediate_size", -1), "decoder_intermediate_size = -1"),
    "input side 1600000": (set_value("clipseg_image_size", 1_600_000), "image size 1600000 is not a side from 1"),
    "input side as text": (set_value("clipseg_image_size", "352"), "clipseg_image_size = '352'"),
    "extract layers as text": (set_value("extract_layers", "1,3,4"), "extract_layers = '1,3,4'"),
    "calibrated threshold 1.5": (set_value("clipseg_threshold", 1.5), "clipseg_threshold = 1.5 is not a threshold"),
    "calibrated threshold NaN": (set_value("clipseg_threshold", float("nan")), "clipseg_threshold = nan is not"),
    "calibrated threshold as text": (set_value("clipseg_threshold", "0.4"), "clipseg_threshold = '0.4' has the wrong"),
    "extract layer beyond the depth": (set_value("extract_layers", [1, 3, 40]), "out of range for a 6-block"),
    "dropout 2": (set_value("clipseg_decoder_dropout", 2), "clipseg_decoder_dropout = 2"),
    "arch as list": (set_value("clipseg_arch", ["clipseg"]), "clipseg_arch = ['clipseg']"),
    "towers not objects": (set_value("text_config", [1, 2]), "text_config must be a JSON object"),
    "not CLIPSeg": (set_value("model_type", "bert"), "not a CLIPSeg config"),
    "unknown activation": (set_value("text_config", "hidden_act", "bogus"), "text_config.hidden_act = 'bogus' is not"),
    "activation as number": (set_value("vision_config", "hidden_act", 3), "vision_config.hidden_act = 3 is not"),
    "vitseg without its ViT": (set_value("clipseg_arch", "vitseg"), "clipseg_arch 'vitseg' needs clipseg_vit_config"),
    "in range, absurd together": (
        lambda config: config["vision_config"].update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=64),
        "more than the 4e+09 this code loads",
    ),
}


@pytest.mark.parametrize("kind", BROKEN_CONFIGS)
def test_config_values_outside_sane_ranges_are_named_errors(good, tmp_path, kind, monkeypatch):
    edit, message = BROKEN_CONFIGS[kind]
    directory = damaged_copy(good, tmp_path, config_edit=edit)

    def no_weights_read(*args):
        raise AssertionError("the weights were read before the config was checked")

    monkeypatch.setattr("clipseg.weights.load_file", no_weights_read)
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        CLIPSeg.from_pretrained(directory)
    assert str(err.value).startswith(f"{directory / 'config.json'}: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list"), ("[" * 100_000, "not valid")],
)
def test_config_that_is_not_a_json_object_is_a_named_error(good, tmp_path, text, message):
    directory = damaged_copy(good, tmp_path)
    (directory / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        CLIPSeg.from_pretrained(directory)


def test_index_buffers_of_older_checkpoints_still_load(good, tmp_path):
    """transformers 4.x saved `position_ids` (int64) with CLIP; they are not weights and stay accepted."""
    key = "clip.text_model.embeddings.position_ids"
    directory = damaged_copy(good, tmp_path, state_edit=lambda state: state.__setitem__(key, torch.arange(77)[None]))
    CLIPSeg.from_pretrained(directory)


def test_pytorch_bin_and_original_pth_files_are_checked_too(good, tmp_path):
    state = load_file(good / "model.safetensors")
    state[WEIGHT] = torch.full_like(state[WEIGHT], float("nan"))
    hf_bin = tmp_path / "bin"
    hf_bin.mkdir()
    shutil.copy(good / "config.json", hf_bin)
    torch.save(state, hf_bin / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"{hf_bin / 'pytorch_model.bin'}: 1 weight.*NaN"):
        CLIPSeg.from_pretrained(hf_bin)
    decoder = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    decoder["film_mul.weight"] = decoder["film_mul.weight"].long()
    torch.save(decoder, tmp_path / "rd16-uni.pth")
    with pytest.raises(CheckpointError, match="rd16-uni.pth: 1 weight.*film_mul.weight \\(torch.int64\\)"):
        CLIPSeg.from_pretrained(tmp_path / "rd16-uni.pth", backbone="tiny")


def test_decoder_only_checkpoint_and_its_clip_source_are_checked(good, tmp_path):
    model = CLIPSeg.from_pretrained(good)  # its CLIP can be loaded again from `good`
    decoder_only = model.save_pretrained(tmp_path / "decoder_only", decoder_only=True)
    weights = decoder_only / "decoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        CLIPSeg.from_pretrained(decoder_only)

    key = "clip.text_projection.weight"
    source = damaged_copy(good, tmp_path, state_edit=lambda state: state.__setitem__(key, state[key].bool()))
    model.config.clip_source = str(source)
    model.save_pretrained(decoder_only, decoder_only=True)
    with pytest.raises(CheckpointError, match=f"{source / 'model.safetensors'}: 1 weight.*{key} \\(torch.bool"):
        CLIPSeg.from_pretrained(decoder_only)


def test_clip_backbone_directories_are_checked(good, tmp_path):
    CLIPSeg.from_pretrained(good).clip.save_pretrained(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 10**9
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_config.hidden_size = 1000000000 is out of range"):
        CLIPSeg.from_backbone(str(tmp_path / "clip"))
    config["vision_config"]["hidden_size"] = 64
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "clip" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        CLIPSeg.from_backbone(str(tmp_path / "clip"))


@pytest.mark.parametrize("arch", ["clipseg", "vitseg", "clip-deconv"])
def test_the_parameter_estimate_is_a_close_lower_bound(arch):
    model = CLIPSeg.from_backbone("tiny", arch=arch, refined=arch == "clipseg")
    real = count_parameters(model, trainable_only=False)
    estimate = estimated_parameters(json.loads(json.dumps(model.config.to_hf_dict())))
    assert 0.99 * real <= estimate <= real
    assert MAX_PARAMETERS >= 2.5e9  # ViT-bigG/14, the largest CLIP released, fits


# --------------------------------------------------------------------------------------- through the scripts


def limit_memory() -> None:
    """A guard: a check that failed would make the script allocate, and fail here instead of on the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (BROKEN_WEIGHTS["truncated"][0], "model.safetensors: not a readable safetensors file"),
        (BROKEN_WEIGHTS["nan"][0], "model.safetensors: 1 weight(s) hold NaN or infinite values"),
        (BROKEN_WEIGHTS["int64"][0], "model.safetensors: 1 weight(s) are not float32, float16, bfloat16 or float64"),
        (BROKEN_WEIGHTS["bool"][0], "model.safetensors: 1 weight(s) are not float32, float16, bfloat16 or float64"),
        (dict(config_edit=BROKEN_CONFIGS["hidden_size 1e9"][0]), "config.json: vision_config.hidden_size = 1000000000"),
        (dict(config_edit=BROKEN_CONFIGS["0 heads"][0]), "config.json: vision_config.num_attention_heads = 0"),
        (dict(config_edit=BROKEN_CONFIGS["patch size 0"][0]), "config.json: vision_config.patch_size = 0"),
    ],
    ids=["truncated", "nan", "int64", "bool", "hidden_size 1e9", "0 heads", "patch size 0"],
)
@pytest.mark.slow
def test_predict_reports_a_bad_model_file_with_exit_2_and_no_traceback(good, tmp_path, edit, message):
    directory = damaged_copy(good, tmp_path, **edit)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "photo.png")
    result = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), str(tmp_path / "photo.png"), "--prompt", "a cat"]
        + ["--model", str(directory), "--out", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_memory,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: cannot load the model {directory}: {directory}/{message}" in result.stderr
    assert "Traceback" not in result.stderr
