"""model.py against the reference `transformers.CLIPSegForImageSegmentation`, weight loading and saving."""

import os
import pickle
import re
import resource
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers import assert_parity, hf_logits, hf_reference
from safetensors.torch import load_file, save_file

from clipseg.config import MAX_IMAGE_SIDE, CLIPSegConfig, tiny_config
from clipseg.decoder import CLIPSegDecoder, RefinedHead
from clipseg.weights import CheckpointError
from model import CLIPSeg, TextCache, count_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
PHRASES = ["a red circle", "the large blue square on the left"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny HF CLIPSeg checkpoint directory written by transformers itself (the path a hub id takes)."""
    directory = tmp_path_factory.mktemp("tiny_hf")
    hf_reference(tiny_config()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return CLIPSeg.from_pretrained(tiny_dir).eval()


@pytest.mark.parametrize("refined", [False, True])
@pytest.mark.parametrize("reduce_dim", [16, 64])
def test_tiny_parity_with_hf(tmp_path, refined, reduce_dim):
    hf = hf_reference(tiny_config(refined=refined, reduce_dim=reduce_dim))
    hf.save_pretrained(tmp_path)
    ours = CLIPSeg.from_pretrained(tmp_path).eval()
    assert ours.config.refined is refined and ours.config.reduce_dim == reduce_dim
    assert_parity(hf, ours, size=96, tol=1e-4)  # 96 px: a 6x6 grid, interpolated from the 4x4 position table


@pytest.fixture(scope="module")
def full_clip_config():
    return transformers.CLIPConfig(
        text_config={},  # CLIP ViT-B/16 geometry: text width 512, 12 layers
        vision_config=dict(patch_size=16, image_size=224),
        projection_dim=512,
    )


@pytest.mark.slow
@pytest.mark.parametrize("refined,reduce_dim", [(True, 64), (False, 16)])
def test_full_geometry_parity_at_352(tmp_path, full_clip_config, refined, reduce_dim):
    config = CLIPSegConfig(refined=refined, reduce_dim=reduce_dim, clip=full_clip_config)
    hf = hf_reference(config)
    hf.save_pretrained(tmp_path)
    ours = CLIPSeg.from_pretrained(tmp_path).eval()
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 352, 352)
    ids, mask = ours.tokenize(PHRASES[:1])
    with torch.no_grad():
        text = ours(pixels, PHRASES[:1]).logits
        image = ours(pixels, prompt_images=pixels.flip(-1)).logits
    assert text.shape == (1, 1, 352, 352)
    assert (text - hf_logits(hf, pixels, ids, mask)).abs().max() <= 1e-4
    assert (image - hf_logits(hf, pixels, prompt_images=pixels.flip(-1))).abs().max() <= 1e-4


def test_trainable_parameter_counts(full_clip_config):
    plain = CLIPSegDecoder(CLIPSegConfig(clip=full_clip_config))
    refined = CLIPSegDecoder(CLIPSegConfig(refined=True, clip=full_clip_config))
    assert count_parameters(plain) == 1_073_153
    assert count_parameters(refined) == 1_127_009


def test_only_decoder_trains(tiny):
    assert count_parameters(tiny) == count_parameters(tiny.decoder) > 0
    assert all(not p.requires_grad for p in tiny.clip.parameters())
    tiny.train()
    assert not tiny.clip.training and tiny.decoder.training
    tiny.eval()


def test_our_checkpoint_loads_in_hf_with_same_logits(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.CLIPSegForImageSegmentation.from_pretrained(tmp_path).eval()
    assert_parity(hf, tiny, size=64, tol=1e-5)
    again = CLIPSeg.from_pretrained(tmp_path)
    assert again.config.knobs() == tiny.config.knobs()


def to_original_layout(hf_state: dict) -> dict:
    """The released `rd64-uni*.pth` naming (docs/original.md §3.2), built from HF decoder weights."""
    out = {}
    for key, value in hf_state.items():
        if not key.startswith("decoder."):
            continue
        key = key[len("decoder.") :]
        key = key.replace("layers.", "blocks.").replace("transposed_convolution", "trans_conv")
        key = key.replace("mlp.fc1", "linear1").replace("mlp.fc2", "linear2")
        key = key.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
        if ".self_attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            fused = [hf_state[f"decoder.{k}"] for k in _qkv_names(key)]
            out[key.split(".self_attn.")[0] + f".self_attn.in_proj_{kind}"] = torch.cat(fused)
        elif ".self_attn." in key and "out_proj" not in key:
            continue
        else:
            out[key] = value
    dim = hf_state["decoder.film_mul.weight"].shape[0]
    out["reduce.weight"] = torch.randn(dim, hf_state["decoder.reduces.0.weight"].shape[1])  # unused in the release
    out["reduce.bias"] = torch.randn(dim)
    return out


def _qkv_names(original_q_key: str) -> list[str]:
    hf_key = original_q_key.replace("blocks.", "layers.")
    return [hf_key.replace("q_proj", proj) for proj in ("q_proj", "k_proj", "v_proj")]


@pytest.mark.parametrize("refined", [False, True])
def test_original_release_file_loads_with_same_logits(tmp_path, refined):
    hf = hf_reference(tiny_config(refined=refined))
    hf.save_pretrained(tmp_path / "hf")
    ours_hf = CLIPSeg.from_pretrained(tmp_path / "hf").eval()
    ours_hf.clip.save_pretrained(tmp_path / "clip")  # the CLIP backbone, as openai/clip-vit-base-patch16 is
    original = to_original_layout(hf.state_dict())
    assert any("in_proj_weight" in k for k in original)
    torch.save(original, tmp_path / "rd-uni.pth")

    loaded = CLIPSeg.from_pretrained(tmp_path / "rd-uni.pth", backbone=str(tmp_path / "clip"), extract_layers=(1, 3, 4))
    loaded.eval()
    assert loaded.config.refined is refined
    pixels = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert (loaded(pixels, PHRASES).logits - ours_hf(pixels, PHRASES).logits).abs().max() <= 1e-6


def test_refined_checkpoint_into_plain_head_is_an_error(tiny_dir, tmp_path):
    hf_reference(tiny_config(refined=True)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"refined=True but refined=False.*transposed_convolution"):
        CLIPSeg.from_pretrained(tmp_path, refined=False)
    with pytest.raises(CheckpointError, match=r"reduce_dim=16 but reduce_dim=64"):
        CLIPSeg.from_pretrained(tiny_dir, reduce_dim=64)


def test_state_dict_mismatches_name_the_keys(tiny_dir, tmp_path):
    plain = tiny_config()
    refined_state = CLIPSeg(tiny_config(refined=True)).state_dict()
    model = CLIPSeg(plain)
    with pytest.raises(CheckpointError) as err:
        model.load_weights(refined_state, source="refined.safetensors")
    message = str(err.value)
    assert "missing keys (2): decoder.transposed_convolution.bias, decoder.transposed_convolution.weight" in message
    assert "decoder.transposed_convolution.0.weight" in message and "refined (3 layers) vs plain" in message

    wide_state = CLIPSeg(tiny_config(reduce_dim=32)).state_dict()
    with pytest.raises(CheckpointError, match=r"wrong shapes .*decoder.film_mul.weight: checkpoint \(32, 64\)"):
        model.load_weights(wide_state)

    state = load_file(tiny_dir / "model.safetensors")
    del state["decoder.reduces.1.bias"]
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): decoder.reduces.1.bias"):
        CLIPSeg.from_pretrained(tmp_path)


def test_original_file_with_unknown_keys_or_wrong_head_is_an_error(tmp_path, tiny):
    tiny.clip.save_pretrained(tmp_path / "clip")
    original = to_original_layout({f"decoder.{k}": v for k, v in tiny.decoder.state_dict().items()})
    torch.save({**original, "something.else": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="unknown keys .*something.else"):
        CLIPSeg.from_pretrained(tmp_path / "bad.pth", backbone=str(tmp_path / "clip"))
    torch.save(original, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="refined=False but refined=True"):
        CLIPSeg.from_pretrained(tmp_path / "plain.pth", backbone=str(tmp_path / "clip"), refined=True)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    _Payload.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"film_mul.weight": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        CLIPSeg.from_pretrained(tmp_path / "evil.pth", backbone="tiny")
    assert not _Payload.marker.exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises((OSError, FileNotFoundError), match="config.json"):
        CLIPSeg.from_pretrained(tmp_path / "nothing-here")


def test_encode_once_decode_many_equals_separate_passes(tiny):
    pixels = torch.randn(1, 3, 64, 96)
    phrases = ["red circle", "blue square", "triangle left of the green circle", "the sky"]
    with torch.no_grad():
        many = tiny.predict_prompts(pixels, phrases=phrases)
        single = torch.cat([tiny(pixels, [p]).logits for p in phrases])
        prompt_images = torch.randn(3, 3, 64, 64)
        many_images = tiny.predict_prompts(pixels[0], prompt_images=prompt_images)
        single_images = torch.cat([tiny(pixels, prompt_images=p[None]).logits for p in prompt_images])
    assert many.shape == (4, 1, 64, 96)
    assert (many - single).abs().max() <= 1e-5
    assert (many_images - single_images).abs().max() <= 1e-5


def test_vision_tower_stops_at_the_deepest_extracted_block(tiny):
    calls = []
    hooks = [  # on each block's first layer norm: the frozen blocks run from their parts (clipseg.precision)
        layer.layer_norm1.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, layer in enumerate(tiny.clip.vision_model.encoder.layers)
    ]
    try:
        features = tiny.encode_image(torch.randn(1, 3, 64, 64))
        assert calls == [0, 1, 2, 3, 4] and len(features.activations) == 3  # tiny: 6 blocks, extract (1, 3, 4)
        calls.clear()
        tiny.embed_images(torch.randn(1, 3, 64, 64))  # image prompts need the pooled embedding: all blocks
        assert calls == [0, 1, 2, 3, 4, 5]
    finally:
        for hook in hooks:
            hook.remove()


def test_position_embeddings_are_resized_once_per_grid_and_follow_the_table(tiny_dir):
    model = CLIPSeg.from_pretrained(tiny_dir).eval()
    first = model._position_embedding((6, 5))
    assert model._position_embedding((6, 5)) is first  # kept: no bicubic resize on every call
    other = model._position_embedding((3, 4))
    assert other.shape == (1, 1 + 3 * 4, first.shape[-1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["clip.vision_model.embeddings.position_embedding.weight"] += 1.0
    model.load_weights(state)  # a new table: resized again
    renewed = model._position_embedding((6, 5))
    torch.testing.assert_close(renewed, first + 1.0)  # bicubic weights sum to 1
    model.clip.vision_model.embeddings.position_embedding.weight.requires_grad_(True)
    assert model._position_embedding((6, 5)).requires_grad  # a table that learns is resized in the graph


def test_rectangular_input_and_batch_of_one(tiny):
    with torch.no_grad():
        logits = tiny(torch.randn(1, 3, 352, 512), ["a cat"]).logits
    assert logits.shape == (1, 1, 352, 512)
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny(torch.randn(1, 3, 100, 64), ["a cat"])


def test_refined_head_matmuls_equal_the_convolutions_forward_and_backward():
    torch.manual_seed(0)
    head = RefinedHead(16)
    x = torch.randn(3, 16, 2, 5, requires_grad=True)
    ours = head(x)
    assert ours.shape == (3, 1, 32, 80)
    convolutions = torch.nn.Sequential.forward(head, x)  # the plain layer-by-layer path
    torch.testing.assert_close(ours, convolutions, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, [x, *head.parameters()], upstream)
    reference_grads = torch.autograd.grad(convolutions, [x, *head.parameters()], upstream)
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_prompt_arguments_are_validated(tiny):
    pixels = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="exactly one of"):
        tiny(pixels, PHRASES, conditional=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="exactly one of"):
        tiny(pixels)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        tiny(pixels, ["a", "b", "c"])
    with pytest.raises(ValueError, match="conditional must be"):
        tiny(pixels, conditional=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="phrase 1 is empty"):
        tiny(pixels, ["a", "  "])
    with pytest.raises(TypeError, match="list of strings"):
        tiny.tokenize("a cat")


def test_token_ids_and_conditionals_give_the_same_logits_as_phrases(tiny):
    pixels = torch.randn(2, 3, 64, 64)
    ids, mask = tiny.tokenize(PHRASES)
    with torch.no_grad():
        by_phrase = tiny(pixels, PHRASES).logits
        by_ids = tiny(pixels, input_ids=ids, attention_mask=mask).logits
        by_vector = tiny(pixels, conditional=tiny.embed_text(PHRASES)).logits
    assert torch.equal(by_phrase, by_ids) and torch.equal(by_phrase, by_vector)


def test_text_cache_returns_the_same_embeddings(tiny):
    expected = tiny.embed_text(PHRASES + PHRASES[:1])
    tiny.text_cache = {}
    try:
        cached = tiny.embed_text(PHRASES + PHRASES[:1])
        assert set(tiny.text_cache) == set(PHRASES)
        assert torch.allclose(cached, expected, atol=1e-6)
    finally:
        tiny.text_cache = None


def test_new_weights_empty_the_text_cache_and_keep_its_bound(tiny):
    tiny.text_cache = TextCache(capacity=2)
    try:
        tiny.embed_text(PHRASES[:2])
        tiny.load_weights(tiny.state_dict())
        assert isinstance(tiny.text_cache, TextCache) and tiny.text_cache.capacity == 2 and not tiny.text_cache
    finally:
        tiny.text_cache = None


def test_cached_embedding_does_not_depend_on_the_phrases_it_was_batched_with(tiny):
    """Resume starts with an empty cache and sees phrases in other company: the embedding must be bitwise equal."""
    embeddings = []
    for batch in (PHRASES, ["a much longer phrase about a cat sitting on a red sofa", PHRASES[0]]):
        tiny.text_cache = {}
        try:
            embeddings.append(tiny.embed_text(batch)[batch.index(PHRASES[0])])
        finally:
            tiny.text_cache = None
    assert torch.equal(*embeddings)


def test_model_tokenizes_with_the_original_cleaning(tiny):
    ids, mask = tiny.tokenize(["the man’s hat", "a photo of a cat"])
    assert ids[0].tolist() == [49406, 518, 786, 568, 3801, 49407, 49407]  # padded with the end token
    assert ids[1].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and mask[0].tolist() == [1] * 6 + [0]


def test_long_phrase_is_truncated_with_a_warning(tiny):
    long_phrase = " ".join(["red"] * 120)
    with pytest.warns(UserWarning, match="longer than CLIP's 77 tokens were truncated"):
        ids, mask = tiny.tokenize([long_phrase, "cat"])
    assert ids.shape == (2, 77) and ids[0, -1] == 49407 and mask[1].sum() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.tokenize(["a short phrase"])


def test_forward_with_labels_returns_the_bce_loss_of_its_logits(tiny):
    pixels, labels = torch.randn(2, 3, 64, 64), (torch.rand(4, 1, 64, 64) > 0.5).float()
    output = tiny(pixels, ["a", "b", "c", "d"], labels=labels)  # two prompts per image
    assert output.logits.shape == (4, 1, 64, 64)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(output.logits, labels)
    assert torch.equal(output.loss, expected)
    assert tiny(pixels, ["a", "b"]).loss is None
    with pytest.raises(ValueError, match="labels must have the logits' shape"):
        tiny(pixels, ["a", "b"], labels=labels)


def test_image_side_has_an_upper_bound_with_a_message():
    config = tiny_config()
    assert config.input_side(MAX_IMAGE_SIDE) == MAX_IMAGE_SIDE == 4096
    for side in (1_600_000, MAX_IMAGE_SIDE + 16, 0, -16, "352", 352.0):
        message = re.escape(f"image size {side!r} is not a side from 1 to 4096 pixels") + ".*MAX_IMAGE_SIDE"
        with pytest.raises(ValueError, match=message):
            config.input_side(side)
    with pytest.raises(ValueError, match="not a side from 1 to 4096"):
        tiny_config(image_size=8192)


def test_predict_refuses_a_huge_image_size_before_allocating_it(tmp_path, tiny_dir):
    """`--image-size 1600000` used to be accepted and then killed by the kernel at 16.8 GB; the address space is
    limited here so that a regression fails instead of exhausting the machine."""
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "photo.png")
    result = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), str(tmp_path / "photo.png"), "--prompt", "a cat"]
        + ["--model", str(tiny_dir), "--image-size", "1600000", "--out", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: image size 1600000 is not a side from 1 to 4096 pixels" in result.stderr
    assert "Traceback" not in result.stderr


def test_saved_weights_get_the_mode_open_would(tmp_path):
    """safetensors replaces the file it writes with a private (0600) one; checkpoints are readable like any file."""
    previous = os.umask(0o022)
    try:
        CLIPSeg(tiny_config()).save_pretrained(tmp_path / "saved")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "saved" / name).stat().st_mode) == 0o644, name
