"""The paper's baselines (CLIP-Deconv, ViTSeg), CLIP backbones of any patch size and the random-initialised
backbone: training, saving and reloading, scoring, HF compatibility and the errors for what cannot work."""

import contextlib
import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import PARITY_PHRASES as PHRASES
from helpers import assert_parity, hf_reference, recompute

import score
import train
from clipseg import runs, train_args
from clipseg.baselines import DeconvDecoder, tiny_vit_config
from clipseg.config import CLIPSegConfig, default_extract_layers, random_clip_config, tiny_clip_config, tiny_config
from clipseg.predictor import Predictor
from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipseg.weights import CheckpointError
from model import CLIPDeconv, CLIPSeg, ViTSeg, count_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = ["--backbone=tiny", "--device=cpu", "--image-size=64", "--batch-size=4", "--num-workers=0", "--log-every=1"]
CLASSES = {"clipseg": CLIPSeg, "clip-deconv": CLIPDeconv, "vitseg": ViTSeg}


# ------------------------------------------------------------------------------- train, save, reload, score


@pytest.fixture(scope="module", params=["clip-deconv", "vitseg", "clipseg"])
def trained(request, tmp_path_factory, synthetic_root):
    """A 30-iteration tiny run of one architecture: (arch, checkpoints dir, its run directory "demo")."""
    arch, checkpoints = request.param, tmp_path_factory.mktemp(f"ck-{request.param}")
    data = ["--data=synthetic", f"--data-root={synthetic_root}", f"--checkpoints-dir={checkpoints}"]
    argv = [*TINY, *data, f"--arch={arch}", "--name=demo", "--max-iterations=30", "--ckpt=30", "--lr=3e-3"]
    assert train.train(train.parse_args(argv)).step == 30
    return arch, checkpoints, checkpoints / "demo"


def test_each_architecture_trains_with_a_falling_loss(trained):
    _, _, run_dir = trained
    curve = [r["loss"] for r in runs.read_log(run_dir / "log.jsonl") if "loss" in r]
    assert len(curve) == 30
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5])


def test_each_architecture_reloads_as_its_class_with_identical_logits(trained, tmp_path):
    arch, _, run_dir = trained
    model = CLIPSeg.from_pretrained(run_dir).eval()
    assert type(model) is CLASSES[arch] and model.config.arch == arch
    state = torch.load(run_dir / "train_state.pt", weights_only=True)
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, state["decoder"][key]), key
    model.save_pretrained(tmp_path)
    again = CLIPSeg.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(pixels, PHRASES).logits
        assert logits.shape == (2, 1, 64, 96)
        assert torch.equal(logits, again(pixels, PHRASES).logits)
        prompts = torch.randn(2, 3, 64, 64)
        assert torch.equal(model(pixels, prompt_images=prompts).logits, again(pixels, prompt_images=prompts).logits)


def test_each_architecture_is_scored_by_score_py(trained, synthetic_root):
    """score.py's numbers equal those computed by hand from the model's logits (tests/test_score.py)."""
    _, checkpoints, _ = trained
    argv = ["demo", "--checkpoints-dir", str(checkpoints), "--data", "synthetic", "--data-root", str(synthetic_root),
            "--limit", "6", "--batch-size", "4", "--num-workers", "0", "--precision", "fp32"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        results = score.main(argv)
    paper, ious, _, _, _ = recompute(checkpoints, synthetic_root)
    at_03 = int(np.argmin(np.abs(np.linspace(0.02, 0.98, 49) - 0.3)))
    assert results["n_samples"] == 6
    # Text embeddings batched differently in the two paths: a pixel at the threshold may round the other way.
    assert results["paper"]["miou"] == pytest.approx(paper["miou"][at_03], abs=1e-6)
    assert results["paper"]["ap"] == pytest.approx(paper["ap"], abs=1e-6)
    assert results["phrasecut"]["mean_iou"] == pytest.approx(ious.mean(), abs=1e-6)


def test_only_the_decoder_trains_and_the_towers_stay_in_inference_mode():
    for arch in CLASSES:
        model = CLIPSeg.from_backbone("tiny", arch=arch).train()
        assert count_parameters(model) == count_parameters(model.decoder) > 0, arch
        assert not model.clip.training and model.decoder.training
    assert not model.vit.training and not model.image_projection.weight.requires_grad  # ViTSeg, built last


# ------------------------------------------------------------------------------------------------ CLIP-Deconv


def full_size(arch: str = "clipseg", **knobs) -> CLIPSegConfig:
    vit = transformers.ViTConfig(image_size=384) if arch == "vitseg" else None
    return CLIPSegConfig(arch=arch, clip=random_clip_config("random-vit-b16"), vit=vit, **knobs)


def test_clip_deconv_reads_block_9_and_has_the_papers_parameter_count():
    config = full_size("clip-deconv")
    assert config.extract_layers == (9,)
    assert (
        count_parameters(DeconvDecoder(config)) == 139_585
    )  # the original's head: about 139.6k (docs/original.md §10.1)
    model = CLIPSeg.from_backbone("tiny", arch="clip-deconv")
    assert model.config.extract_layers == (4,)  # block 9 of 12 at the same depth of the tiny 6-block CLIP
    assert [name for name, _ in model.decoder.named_children()] == [
        "reduce", "film_mul", "film_add", "mlp", "transposed_convolution"
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- ViTSeg


def test_vitseg_runs_the_vit_as_transformers_does_on_the_resized_input():
    torch.manual_seed(0)
    model = CLIPSeg.from_backbone("tiny", arch="vitseg").eval()
    assert model.config.extract_layers == (1, 3, 4) and model.config.vit.image_size == 80
    pixels = torch.randn(2, 3, 64, 96)
    rgb = pixels * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    vit_pixels = F.interpolate((rgb - 0.5) / 0.5, size=(80, 80), mode="nearest")  # the ViT's own normalisation
    with torch.no_grad():
        reference = model.vit(vit_pixels, output_hidden_states=True)
        features = model.encode_image(pixels)
        for activation, block in zip(features.activations, (1, 3, 4)):
            torch.testing.assert_close(activation, reference.hidden_states[block + 1], rtol=1e-5, atol=1e-5)
        assert features.grid == (4, 6)
        expected = model.image_projection(reference.last_hidden_state[:, 0])
        torch.testing.assert_close(model.embed_images(pixels), expected, rtol=1e-5, atol=1e-5)
        logits = model.decode(features, model.embed_text(PHRASES))
    assert logits.shape == (2, 1, 64, 96)
    # The decoder works on the ViT's 5 x 5 grid (80 px) and its logits are nearest-resized to the input.
    coarse = super(type(model.decoder), model.decoder).forward(features.activations, model.embed_text(PHRASES), (5, 5))
    torch.testing.assert_close(logits, F.interpolate(coarse, size=(64, 96), mode="nearest"))


def test_vitseg_checkpoints_keep_the_hub_files_vit_names(tmp_path):
    model = CLIPSeg.from_backbone("tiny", arch="vitseg")
    keys = set(model.state_dict())
    assert "vit.encoder.layer.0.attention.attention.query.weight" in keys
    assert "vit.encoder.layer.0.output.dense.weight" in keys and "vit.encoder.layer.0.intermediate.dense.bias" in keys
    assert {"clip.text_projection.weight", "image_projection.weight"} <= keys
    assert not any(k.startswith("clip.vision_model") for k in keys)  # ViTSeg holds CLIP's text tower only
    other = CLIPSeg.from_backbone("tiny", arch="vitseg")
    other.load_state_dict(model.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_vitseg_loads_its_vit_and_text_tower_from_directories(tmp_path):
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(tiny_vit_config())  # the hub id's class, with its "vit." prefix
    vit.save_pretrained(tmp_path / "vit")
    clip = transformers.CLIPModel(tiny_clip_config())
    clip.save_pretrained(tmp_path / "clip")
    model = CLIPSeg.from_backbone(str(tmp_path / "vit"), arch="vitseg", text_backbone=str(tmp_path / "clip"))
    assert type(model) is ViTSeg and model.config.backbone == str(tmp_path / "vit")
    for key, value in vit.vit.state_dict().items():
        assert torch.equal(model.vit.state_dict()[key], value), key
    assert torch.equal(model.clip.text_projection.weight, clip.text_projection.weight)
    ids, mask = model.tokenize(PHRASES)
    with torch.no_grad():
        expected = clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        torch.testing.assert_close(model.embed_text(PHRASES), expected)


# ------------------------------------------------------------------------------------------ other patch sizes


@pytest.mark.parametrize("patch", [32, 14])
def test_patch_32_and_14_give_full_resolution_logits_at_two_shapes(patch):
    model = CLIPSeg(tiny_config(clip=tiny_clip_config(patch_size=patch))).eval()
    assert model.decoder.transposed_convolution.kernel_size == (patch, patch)
    assert model.config.image_size == {32: 352, 14: 350}[patch]  # the default side: a multiple of the patch
    for height, width in [(4 * patch, 4 * patch), (3 * patch, 7 * patch)]:
        with torch.no_grad():
            logits = model(torch.randn(2, 3, height, width), PHRASES).logits
        assert logits.shape == (2, 1, height, width)


@pytest.mark.parametrize("patch, square", [(32, False), (14, False), (14, True)])
def test_predictor_keeps_inputs_on_the_patch_grid(patch, square):
    model = CLIPSeg(tiny_config(clip=tiny_clip_config(patch_size=patch), image_size=2 * patch))
    predictor = Predictor(model, square=square)
    predictor.set_image(np.zeros((50, 90, 3), dtype=np.uint8))
    width, height = predictor.input_size
    assert width % patch == 0 and height == 2 * patch and (width == height) == square
    assert predictor.predict(phrases=["a cat", "a dog"]).shape == (2, 50, 90)
    with pytest.raises(ValueError, match=f"image size {3 * patch + 1} is not a multiple of the patch size {patch}"):
        Predictor(model, image_size=3 * patch + 1)


def test_patch_32_plain_head_matches_transformers_both_ways(tmp_path):
    hf = hf_reference(tiny_config(clip=tiny_clip_config(patch_size=32)))
    hf.save_pretrained(tmp_path / "hf")
    ours = CLIPSeg.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.patch_size == 32
    assert_parity(hf, ours, size=96, tol=1e-4)  # a 3 x 3 grid, interpolated from the 2 x 2 position table
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.CLIPSegForImageSegmentation.from_pretrained(tmp_path / "ours").eval()
    assert_parity(back, ours, size=64, tol=1e-5)


def test_default_extract_layers_keep_the_papers_relative_depth():
    assert default_extract_layers("clipseg", 12) == (3, 6, 9)
    assert default_extract_layers("clipseg", 24) == (7, 13, 19)  # ViT-L/14
    assert default_extract_layers("clip-deconv", 24) == (19,)
    assert default_extract_layers("vitseg", 12) == (3, 7, 9)
    config = CLIPSegConfig(clip=random_clip_config("random-vit-l14"))
    assert config.extract_layers == (7, 13, 19) and config.image_size == 350 and config.vision_width == 1024
    with pytest.raises(ValueError, match="no default extract_layers for a 2-block backbone: give them"):
        default_extract_layers("clipseg", 2)


def test_unsupported_combinations_name_themselves_and_the_fix(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"refined head .* patch-16 backbones only; tiny has patch 14: use the plain"):
        tiny_config(refined=True, clip=tiny_clip_config(patch_size=14))
    with pytest.raises(ValueError, match=r"image size 352 is not a multiple of the patch size 14 .*use 350 or 364"):
        tiny_config(image_size=352, clip=tiny_clip_config(patch_size=14))
    model = CLIPSeg(tiny_config(clip=tiny_clip_config(patch_size=14)))
    assert model.config.input_side(210) == 210  # the scripts' --image-size: the model's patch, not 16
    assert Predictor(model, image_size=210).transform.size == 210
    with pytest.raises(ValueError, match=r"image size 352 is not a multiple of the patch size 14 .*use 350 or 364"):
        model.config.input_side(352)
    with pytest.raises(ValueError, match=r"image size 100x64 is not a multiple of the patch size 14 .* e\.g\. 98x70"):
        model(torch.randn(1, 3, 100, 64), ["a cat"])
    with pytest.raises(ValueError, match="clip-deconv has its own single transposed convolution: drop refined"):
        CLIPSeg.from_backbone("tiny", arch="clip-deconv", refined=True)
    # Through train.py: an argparse error where the flags fix the patch, a TrainingError where the backbone does.
    with pytest.raises(SystemExit):
        train.parse_args(["--backbone=random-vit-l14", "--image-size=352"])
    assert (
        "image size 352 is not a multiple of the patch size 14 of random-vit-l14: use 350 or 364"
        in capsys.readouterr().err
    )
    argv = ["--backbone=random-vit-l14", "--refined", "--image-size=350", f"--checkpoints-dir={tmp_path}"]
    assert train.main([*argv, "--data=synthetic", f"--data-root={tmp_path}"]) == 2  # cannot start: bad flags
    assert "refined head upsamples 4 x 4 = 16-fold and fits patch-16 backbones only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--text-backbone=tiny"])
    assert "--text-backbone goes with --arch vitseg" in capsys.readouterr().err


def test_loading_a_checkpoint_as_another_architecture_is_an_error(tmp_path):
    CLIPSeg.from_backbone("tiny", arch="clip-deconv").save_pretrained(tmp_path / "deconv")
    CLIPSeg.from_backbone("tiny").save_pretrained(tmp_path / "clipseg")
    with pytest.raises(CheckpointError, match="has arch='clip-deconv' but arch='clipseg' was asked for"):
        CLIPSeg.from_pretrained(tmp_path / "deconv", arch="clipseg")
    with pytest.raises(CheckpointError, match="holds an arch='clipseg' model: load it with CLIPSeg.from_pretrained"):
        ViTSeg.from_pretrained(tmp_path / "clipseg")
    torch.save({}, tmp_path / "rd64-uni.pth")
    with pytest.raises(CheckpointError, match="an original release file holds a CLIPSeg decoder, not arch='vitseg'"):
        CLIPSeg.from_pretrained(tmp_path / "rd64-uni.pth", arch="vitseg")


# ------------------------------------------------------------------------------------- random full-size CLIP


def test_random_vit_b16_backbone_is_a_full_size_clip_built_offline():
    args = train.parse_args(["--backbone=random-vit-b16"])
    model = train_args.build_model(args)
    vision = model.config.clip.vision_config
    assert (vision.patch_size, vision.num_hidden_layers, vision.hidden_size) == (16, 12, 768)
    assert model.config.clip.text_config.hidden_size == 512 and model.config.backbone == "random-vit-b16"
    assert count_parameters(model) == 1_073_153  # the released decoder's size
    fc1 = model.clip.vision_model.encoder.layers[0].mlp.fc1.weight
    assert fc1.std() == pytest.approx((2 * 768) ** -0.5, rel=0.02)  # transformers' CLIP initialisation
    assert model.decoder.reduces[0].weight.abs().max() <= 1 / 768**0.5  # torch's default Linear init
