"""precision.py: bf16 and int8 masks against fp32, the default per job and CPU class, int8 quantisation, every
architecture in every precision (also through score.py and predict.py), and the CLI flags."""

import copy
import json
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import transformers
from conftest import AMX_XEON, CPU_CLASSES, simulate_cpu
from PIL import Image
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

import model as model_module
import score
from clipseg import precision as precision_module
from clipseg.config import tiny_clip_config
from clipseg.frozen_clip import (
    Scratch,
    can_run_frozen,
    frozen_block_weights,
    patch_embedding,
    run_frozen_block,
    run_frozen_text,
)
from clipseg.precision import (
    PRECISIONS,
    cpu_has_vnni,
    default_precision,
    precision_context,
    prepare_model,
    quantize_linears,
    quantize_vision_linears,
    resolve_precision,
    segmentation_blocks,
)
from model import CLIPSeg
from predict import main

PHRASES = ["a red circle", "the blue square", "sky"]
LOGIT_THRESHOLD = float(np.log(0.3 / 0.7))  # probability > 0.3, the paper's threshold
NATIVE_BF16 = precision_module.cpu_has_native_bf16()


def logits_in(model: CLIPSeg, precision: str) -> torch.Tensor:
    """(8, 1, 64, 96) logits of four images x two phrases, run as `precision` prescribes."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(4, 3, 64, 96, generator=generator)
    with torch.no_grad(), precision_context(precision, "cpu"):
        return torch.cat([model(pixels, [phrase] * 4).logits for phrase in PHRASES[:2]]).float()


def mask_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a > LOGIT_THRESHOLD) == (b > LOGIT_THRESHOLD)).float().mean().item()


def test_int8_masks_agree_with_fp32(model):
    reference = logits_in(model, "fp32")
    positive = (reference > LOGIT_THRESHOLD).float().mean().item()
    assert 0.1 < positive < 0.9  # masks that are neither empty nor full: agreement means something
    quantised = prepare_model(copy.deepcopy(model), "int8", "cpu")
    int8 = logits_in(quantised, "int8")
    assert 0 < (int8 - reference).abs().max() < 0.5  # int8 really ran, and stayed close
    assert mask_agreement(int8, reference) >= 0.99


@pytest.mark.skipif(not NATIVE_BF16, reason="no native bf16 on this CPU (AVX512-BF16/AMX): --precision bf16 runs fp32")
def test_bf16_masks_agree_with_fp32(model):
    reference = logits_in(model, "fp32")
    bf16 = logits_in(model, resolve_precision("bf16", "cpu"))
    assert 0 < (bf16 - reference).abs().max() < 0.5  # autocast really ran in bf16
    assert mask_agreement(bf16, reference) >= 0.99


def test_int8_quantises_only_the_vision_blocks_the_segmentation_pass_runs(model):
    quantised = copy.deepcopy(model)
    blocks = quantised.clip.vision_model.encoder.layers
    deepest = max(quantised.config.extract_layers)
    assert quantize_vision_linears(quantised) == 6 * (deepest + 1)  # q, k, v, out, fc1, fc2 per block
    assert quantize_vision_linears(quantised) == 0  # idempotent
    assert not any(isinstance(m, torch.nn.Linear) for m in blocks[: deepest + 1].modules())
    for untouched in (blocks[deepest + 1 :], quantised.clip.text_model, quantised.decoder):
        kinds = {type(m) for m in untouched.modules()}
        assert torch.nn.Linear in kinds and not any("Quantized" in kind.__name__ for kind in kinds)


ARCHITECTURES = {  # knobs of CLIPSeg.from_backbone("tiny", ...)
    "plain": {},
    "refined": {"refined": True},
    "clip-deconv": {"arch": "clip-deconv"},
    "vitseg": {"arch": "vitseg"},
    "patch-32 CLIP": {"clip": tiny_clip_config(patch_size=32)},
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_runs_in_every_precision(monkeypatch, arch, precision):
    """bf16 is forced (emulated on a CPU without it), int8 runs on any CPU: no path is left to the CPU at hand."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    model = CLIPSeg.from_backbone("tiny", **ARCHITECTURES[arch]).eval()
    reference = logits_in(model, "fp32")
    prepared = prepare_model(copy.deepcopy(model), resolve_precision(precision, "cpu"), "cpu")
    blocks = segmentation_blocks(prepared)
    assert len(blocks) == max(model.config.extract_layers) + 1
    quantised = [m for block in blocks for m in block.modules() if "QuantizedLinear" in m._get_name()]
    assert len(quantised) == (6 * len(blocks) if precision == "int8" else 0)  # q, k, v, out, and the MLP's two
    logits = logits_in(prepared, precision)
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    if precision != "fp32":
        assert (logits - reference).abs().max() > 0  # really ran in another precision
    assert mask_agreement(logits, reference) >= 0.95


@pytest.mark.parametrize("arch", ["plain", "vitseg"])
def test_int8_runs_without_vnni_with_7_bit_activations(monkeypatch, arch):
    monkeypatch.setattr(precision_module, "cpu_capabilities", lambda: {"avx2": True})
    assert not precision_module.cpu_has_vnni()
    torch.manual_seed(0)
    model = CLIPSeg.from_backbone("tiny", **ARCHITECTURES[arch]).eval()
    reference = logits_in(model, "fp32")
    prepared = prepare_model(copy.deepcopy(model), "int8", "cpu")
    kinds = {m._get_name() for block in segmentation_blocks(prepared) for m in block.modules()}
    assert "DynamicQuantizedLinear" in kinds and "FullRangeDynamicQuantizedLinear" not in kinds
    assert mask_agreement(logits_in(prepared, "int8"), reference) >= 0.95


@pytest.mark.skipif(not cpu_has_vnni(), reason="no VNNI on this CPU: int8 keeps PyTorch's 7-bit activations")
def test_int8_activations_use_all_8_bits_where_the_cpu_has_vnni(monkeypatch):
    torch.manual_seed(0)
    layer, rows = torch.nn.Linear(256, 256), torch.randn(64, 256)
    errors = {}
    for full_range in (True, False):
        monkeypatch.setattr(precision_module, "cpu_has_vnni", lambda full_range=full_range: full_range)
        quantised = torch.nn.Sequential(copy.deepcopy(layer))
        assert quantize_linears(quantised) == 1  # the default follows cpu_has_vnni
        expected = "FullRangeDynamicQuantizedLinear" if full_range else "DynamicQuantizedLinear"
        assert quantised[0]._get_name() == expected
        with torch.no_grad():
            errors[full_range] = (quantised(rows) - layer(rows)).abs().mean().item()
    assert errors[True] < 0.75 * errors[False]  # half the activation step: a clearly smaller error


@pytest.mark.parametrize(("capabilities", "cpu_class", "fastest"), CPU_CLASSES)
def test_the_default_follows_the_job_and_the_cpu_class(monkeypatch, capabilities, cpu_class, fastest):
    simulate_cpu(monkeypatch, capabilities)
    assert precision_module.cpu_class() == cpu_class
    assert default_precision("cpu", "predict") == fastest == precision_module.FASTEST_BY_CPU_CLASS[cpu_class]
    assert default_precision("cpu", "score") == default_precision("cpu") == "fp32"  # the paper's numbers: fp32
    assert default_precision("cuda", "predict") == default_precision("cuda", "score") == "fp32"
    assert resolve_precision(None, "cpu", job="predict") == fastest
    assert resolve_precision(None, "cpu", job="score") == resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision(None, "cpu", supported=("fp32",), job="predict") == "fp32"  # a backend without it
    with pytest.raises(ValueError, match="unknown job 'train'"):
        default_precision("cpu", "train")


def test_amx_without_native_bf16_in_torch_predicts_in_fp32(monkeypatch):
    """A CPU torch reports AMX on but whose bf16 its kernels do not run natively never defaults to emulated bf16."""
    simulate_cpu(monkeypatch, AMX_XEON)
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert default_precision("cpu", "predict") == "fp32"


@pytest.mark.parametrize("native", [True, False])
def test_amp_and_no_amp_are_bf16_and_fp32(monkeypatch, native):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision(None, "cpu", amp=False, job="predict") == "fp32"  # --no-amp
    if native:
        assert resolve_precision(None, "cpu", amp=True) == resolve_precision("bf16", "cpu") == "bf16"  # --amp
    else:
        for asked in ({"precision": "bf16"}, {"precision": None, "amp": True}):
            with pytest.warns(UserWarning, match="no native bf16"):
                assert resolve_precision(device="cpu", **asked) == "fp32"


def test_precision_errors_say_what_to_change():
    with pytest.raises(ValueError, match="CPU; on cuda use --precision bf16"):
        resolve_precision("int8", "cuda")
    with pytest.raises(ValueError, match="--amp means --precision bf16; it contradicts --precision int8"):
        resolve_precision("int8", "cpu", amp=True)
    with pytest.raises(ValueError, match="--no-amp means --precision fp32; it contradicts --precision bf16"):
        resolve_precision("bf16", "cpu", amp=False)
    with pytest.raises(ValueError, match="choose one of fp32, bf16, int8"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="not available for this backend"):
        resolve_precision("int8", "cpu", supported=("fp32",))
    with pytest.raises(ValueError, match="CPU only"):
        prepare_model(CLIPSeg.from_backbone("tiny"), "int8", "cuda")
    assert PRECISIONS == ("fp32", "bf16", "int8")


# ------------------------------------------------------------------- bf16: frozen blocks from bf16 copies
# Forced with torch.autocast, so that these run on any CPU (bf16 is emulated, slowly, where it is not native).


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("tokens", [25, 32])  # keys padded to 32 and masked; already a multiple of 16
def test_frozen_block_equals_the_layer_in_fp32_and_is_as_close_to_it_in_bf16_as_autocast(activation, tokens):
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    config.hidden_act, config._attn_implementation = activation, "sdpa"
    layer = CLIPEncoderLayer(config).eval()
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.2)
    x = torch.randn(3, tokens, 32)
    with torch.no_grad():
        reference, fp32 = layer(x, None), run_frozen_block(layer, x, None)
        with bf16_autocast():
            autocast_only, frozen = layer(x, None), run_frozen_block(layer, x, torch.bfloat16)
    error, autocast_error = (frozen - reference).abs().max(), (autocast_only - reference).abs().max()
    assert frozen.dtype == torch.float32  # the residual stream stays fp32
    assert 0 < error <= 2 * autocast_error and error < 0.01 * reference.abs().max()
    assert torch.equal(fp32, reference)  # fp32: the layer's arithmetic, bit for bit
    scratch = Scratch()  # the buffers of a pass, reused by its next block: the same values as fresh ones
    for dtype, context in ((None, nullcontext()), (torch.bfloat16, bf16_autocast())):
        with torch.no_grad(), context:
            fresh = run_frozen_block(layer, run_frozen_block(layer, x, dtype), dtype)
            reused = run_frozen_block(layer, run_frozen_block(layer, x, dtype, scratch), dtype, scratch)
        assert torch.equal(fresh, reused)


def test_bf16_runs_each_vision_block_from_bf16_copies_and_masks_agree(model, monkeypatch):
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    calls = []

    def counted(layer, x, dtype, scratch):
        calls.append(dtype)
        return run_frozen_block(layer, x, dtype, scratch)

    monkeypatch.setattr(model_module, "run_frozen_block", counted)
    blocks = max(model.config.extract_layers) + 1
    with torch.no_grad():
        fp32 = model(pixels, PHRASES[:2]).logits
        assert calls == [None] * blocks  # fp32: the layers' own weights
        with bf16_autocast():
            bf16 = model(pixels, PHRASES[:2]).logits.float()
    assert calls == [None] * blocks + [torch.bfloat16] * blocks
    assert 0 < (bf16 - fp32).abs().max() < 0.5
    assert mask_agreement(bf16, fp32) >= 0.99


def test_text_tower_from_its_blocks_keeps_transformers_values_and_bf16_is_as_close_as_autocast(model, monkeypatch):
    phrases = ["a red circle", "the large blue square on the left side", "sky"]  # padded to the longest
    ids, mask = model.tokenize(phrases)
    text = model.clip.text_model
    with torch.no_grad():
        for attention_mask in (mask, None):
            ours = run_frozen_text(text, ids, attention_mask, None)
            theirs = text(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            kept = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            assert torch.equal(ours[kept], theirs[kept])  # fp32, bit for bit, on every token the mask keeps
        reference = model.embed_token_ids(ids, mask)
        with bf16_autocast():
            frozen = model.embed_token_ids(ids, mask).float()
            monkeypatch.setattr(model_module, "can_run_frozen", lambda layer: False)
            autocast_only = model.embed_token_ids(ids, mask).float()
    error, autocast_error = (frozen - reference).abs().max(), (autocast_only - reference).abs().max()
    assert 0 < error <= 2 * autocast_error and error < 0.02 * reference.abs().max()


@pytest.mark.parametrize("bias", [False, True])  # CLIP's has none
def test_patch_embedding_is_the_convolution_as_one_product(bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, kernel_size=8, stride=8, bias=bias)
    pixels = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        reference = conv(pixels).flatten(2).transpose(1, 2)  # (B, h*w, width), row-major patches
        torch.testing.assert_close(patch_embedding(conv, pixels, torch.float32), reference, rtol=1e-5, atol=1e-5)
        with bf16_autocast():
            bf16 = patch_embedding(conv, pixels, torch.bfloat16)
            autocast_only = conv(pixels).flatten(2).transpose(1, 2)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - reference).abs().max() <= 2 * (autocast_only.float() - reference).abs().max()


def test_bf16_copies_are_made_once_and_follow_their_master_weights(tiny_dir):
    model = CLIPSeg.from_pretrained(tiny_dir).eval()
    keys = set(model.state_dict())
    layer = model.clip.vision_model.encoder.layers[0]
    first = frozen_block_weights(layer, torch.bfloat16)
    assert frozen_block_weights(layer, torch.bfloat16) is first  # not re-cast on every call
    with torch.no_grad(), bf16_autocast():
        model(torch.randn(1, 3, 64, 64), PHRASES[:1])
    assert set(model.state_dict()) == keys  # the copies are not weights: checkpoints keep their names
    assert frozen_block_weights(copy.deepcopy(layer), torch.bfloat16) is not first  # a copy makes its own
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["clip.vision_model.encoder.layers.0.mlp.fc2.bias"] += 1.0
    model.load_weights(state)  # new weights in place: the copies follow
    renewed = frozen_block_weights(layer, torch.bfloat16)
    assert renewed is not first
    assert torch.equal(renewed.fc2_bias, (first.fc2_bias.float() + 1.0).bfloat16())


def test_int8_and_trainable_blocks_keep_the_module_path(model):
    quantised = prepare_model(copy.deepcopy(model), "int8", "cpu")
    assert not can_run_frozen(quantised.clip.vision_model.encoder.layers[0])
    trainable = copy.deepcopy(model).requires_grad_(True)
    layer = trainable.clip.vision_model.encoder.layers[0]
    assert can_run_frozen(model.clip.vision_model.encoder.layers[0])
    assert not can_run_frozen(layer)  # gradients asked: the copies would cut them
    with torch.no_grad():
        assert can_run_frozen(layer)


# --------------------------------------------------------------------------------------------------- CLI


def run_cli(tiny_dir, tmp_path, out, *extra) -> int:
    image = tmp_path / "photo.png"
    if not image.exists():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(image)
    args = [str(image), "--model", str(tiny_dir), "--image-size", "64", "--out", str(tmp_path / out)]
    return main([*args, "--prompt", PHRASES[0], "--prompt", PHRASES[1], "--prob-bits", "16", *extra])


def read_maps(tmp_path, out) -> tuple[dict, list[np.ndarray]]:
    summary = json.loads((tmp_path / out / "summary.json").read_text())
    prompts = summary["images"][0]["prompts"]
    return summary, [np.asarray(Image.open(p["files"]["probability"])) / 65535 for p in prompts]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_cli_precision_writes_maps_that_agree_with_fp32(tiny_dir, tmp_path, precision):
    if precision == "bf16" and not NATIVE_BF16:
        pytest.skip("no native bf16 on this CPU (AVX512-BF16/AMX): --precision bf16 runs fp32")
    assert run_cli(tiny_dir, tmp_path, "fp32", "--precision", "fp32") == 0
    assert run_cli(tiny_dir, tmp_path, precision, "--precision", precision) == 0
    (reference_summary, reference), (summary, maps) = read_maps(tmp_path, "fp32"), read_maps(tmp_path, precision)
    assert (reference_summary["precision"], summary["precision"]) == ("fp32", precision)
    for got, want in zip(maps, reference):
        assert 0 < np.abs(got - want).max() < 0.1
        assert ((got > 0.3) == (want > 0.3)).mean() >= 0.99


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ["clip-deconv", "vitseg"])
def test_clip_deconv_and_vitseg_models_score_and_predict_in_every_precision(
    arch, precision, tiny_checkpoint, synthetic_root, tmp_path, monkeypatch
):
    """Scoring a ViTSeg model in int8 once crashed (the quantiser assumed a CLIP vision tower). bf16 is forced
    (emulated, only slower, on a CPU without it) and int8 runs on any CPU, so this CPU decides no path."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    saved = tiny_checkpoint(arch, arch=arch, image_size=64)
    data = ["--data", "synthetic", "--data-root", str(synthetic_root), "--limit", "4", "--num-workers", "0"]
    results = score.main(["--model", str(saved), *data, "--precision", precision, "--out", str(tmp_path / "scores")])
    assert (results["precision"], results["n_samples"]) == (precision, 4) and np.isfinite(results["paper"]["miou"])
    assert json.loads((tmp_path / "scores" / "scores_test_first4.json").read_text())["precision"] == precision
    assert run_cli(saved, tmp_path, "predicted", "--precision", precision) == 0
    summary, maps = read_maps(tmp_path, "predicted")
    assert summary["precision"] == precision and len(maps) == 2 and all(np.isfinite(m).all() for m in maps)


@pytest.mark.parametrize(("capabilities", "cpu_class", "fastest"), CPU_CLASSES)
def test_cli_default_precision_is_the_rules_for_the_cpu_class(
    tiny_dir, tmp_path, monkeypatch, capabilities, cpu_class, fastest
):
    simulate_cpu(monkeypatch, capabilities)
    assert run_cli(tiny_dir, tmp_path, "default") == 0
    assert read_maps(tmp_path, "default")[0]["precision"] == fastest
    assert run_cli(tiny_dir, tmp_path, "no_amp", "--no-amp") == 0
    assert read_maps(tmp_path, "no_amp")[0]["precision"] == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU without native bf16 warns that --amp runs fp32
        assert run_cli(tiny_dir, tmp_path, "amp", "--amp") == 0
    assert read_maps(tmp_path, "amp")[0]["precision"] == ("bf16" if precision_module.cpu_has_native_bf16() else "fp32")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precision", "int8", "--device", "cuda"], "on cuda use --precision bf16"),
        (["--precision", "int8", "--amp"], "--amp means --precision bf16"),
        (["--precision", "int8", "--no-amp"], "--no-amp means --precision fp32"),
        (["--precision", "fp16"], "invalid choice: 'fp16'"),
    ],
)
def test_cli_bad_precision_combinations_are_usage_errors(tiny_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_dir, tmp_path, "out", *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_amp_dtype_is_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    assert precision_module.amp_dtype("cpu") == torch.bfloat16
    with precision_module.autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert precision_module.amp_dtype("cpu") is None
    with precision_module.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
