"""clipseg/refine.py: the guided filter moves a blocky low-resolution map's boundary onto the image's edge (boundary
F-score at 2 px and the error near the edge, against bilinear upsampling) and keeps a constant map constant;
refine=sam runs end to end on a tiny random SAM loaded through the hub-id code path, prompts SAM with the
components' boxes, peaks and logits in SAM's mask frame, and refuses SAM files that are missing, not SAM's, or
damaged, naming the file."""

import json
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage

from clipseg.mask_eval import boundary_f_score
from clipseg.postprocess import find_instances
from clipseg.refine import FLOOR_LOGIT, SamRefiner, guided_refine, load_sam
from clipseg.transforms import full_size_probabilities
from clipseg.weights import CheckpointError


def ellipse_scene(size: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image (noisy red ellipse on blue) and the ellipse's mask."""
    rows, cols = np.mgrid[:size, :size]
    truth = (cols - 0.55 * size) ** 2 + (rows - 0.5 * size) ** 2 / 0.6 < (0.3 * size) ** 2
    colours = np.where(truth[..., None], [200.0, 80.0, 60.0], [60.0, 120.0, 190.0])
    noisy = colours + np.random.default_rng(seed).normal(0, 12, colours.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), truth


def patch_grid_map(truth: np.ndarray, patch: int = 16) -> np.ndarray:
    """A map on a ViT/16's patch grid, with its squares: 0.9 on patches the object covers at least half of, else 0.1."""
    h, w = truth.shape
    fraction = truth.reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3))
    return np.where(fraction >= 0.5, 0.9, 0.1).astype(np.float32)


def test_guided_refinement_puts_the_boundary_on_the_images_edge():
    image, truth = ellipse_scene()
    low = patch_grid_map(truth)
    bilinear = full_size_probabilities(torch.from_numpy(np.log(low / (1 - low))), truth.shape)
    refined = guided_refine(low, image)
    assert refined.shape == truth.shape and refined.dtype == np.float32
    near_edge = ndimage.distance_transform_edt(~(truth ^ ndimage.binary_erosion(truth))) <= 8
    assert boundary_f_score(refined > 0.5, truth) >= 0.95 > 0.6 >= boundary_f_score(bilinear > 0.5, truth)
    assert np.abs(refined - truth)[near_edge].mean() < np.abs(bilinear - truth)[near_edge].mean() - 0.05
    assert ((refined > 0.5) != truth).mean() < ((bilinear > 0.5) != truth).mean() / 10


def test_a_constant_map_stays_constant_and_shapes_follow_the_image():
    image = np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    refined = guided_refine(np.full((2, 9, 13), [[[0.3]], [[0.75]]], np.float32), image)
    assert refined.shape == (2, 90, 130)
    np.testing.assert_allclose(refined[0], 0.3, atol=1e-5)
    np.testing.assert_allclose(refined[1], 0.75, atol=1e-5)
    full = guided_refine(np.random.default_rng(2).random((90, 130)).astype(np.float32), image, working_side=40)
    assert full.shape == (90, 130) and full.min() >= 0 and full.max() <= 1


def test_guided_refinement_refuses_bad_input():
    image = np.zeros((20, 20, 3), np.uint8)
    for bad in (np.full((4, 4), np.nan), np.full((4, 4), 2.0), np.zeros((1, 1, 4, 4))):
        with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
            guided_refine(bad, image)
    with pytest.raises(ValueError, match="radius >= 1, eps > 0"):
        guided_refine(np.zeros((4, 4)), image, radius=0)


# ----------------------------------------------------------------------------------------------- SAM


def two_components() -> tuple[np.ndarray, np.ndarray]:
    """A 48 x 80 image and probabilities with two components: peaks 0.95 at (x=20, y=9) and 0.9 at (60, 30)."""
    probs = np.full((48, 80), 0.05, np.float32)
    probs[5:15, 10:30] = 0.7
    probs[9, 20] = 0.95
    probs[25:41, 50:70] = 0.8
    probs[30, 60] = 0.9
    image = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    return image, probs


@pytest.fixture(scope="module")
def sam_path(tiny_sam):
    return tiny_sam()


def capture_calls(model) -> list[dict]:
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


def test_sam_refinement_runs_end_to_end_and_prompts_with_the_components(sam_path):
    image, probs = two_components()
    _, instances = find_instances(probs > 0.5, probs)
    refiner = SamRefiner.from_pretrained(str(sam_path))
    calls = capture_calls(refiner.model)
    result = refiner.refine(image, probs, instances)
    assert result.masks.shape == (2, 48, 80) and result.masks.dtype == bool
    np.testing.assert_array_equal(result.union, result.masks[0] | result.masks[1])
    assert len(result.scores) == 2 and all(np.isfinite(result.scores))
    assert result.boxes == [(50, 25, 69, 40), (10, 5, 29, 14)]  # by area: the 16 x 20 block first; inclusive ends
    assert result.points == [(60, 30), (20, 9)]
    # the processor resizes the longest side to 64: 80 x 48 -> 64 x 38 (int(48 * 0.8 + 0.5))
    scale = torch.tensor([64 / 80, 38 / 48])
    assert len(calls) == 2
    for call, box, point in zip(calls, result.boxes, result.points):
        expected_box = torch.tensor(box, dtype=torch.float32).view(2, 2) * scale
        torch.testing.assert_close(call["input_boxes"], expected_box.view(1, 1, 4))
        torch.testing.assert_close(
            call["input_points"], (torch.tensor(point, dtype=torch.float32) * scale).view(1, 1, 1, 2)
        )
        assert call["input_labels"].tolist() == [[[1]]]
        assert call["input_masks"].shape == (1, 1, 16, 16) == (1, 1, refiner.mask_prompt_side, refiner.mask_prompt_side)
        assert call["multimask_output"] is False and call["image_embeddings"].shape == (1, 32, 4, 4)


def test_the_mask_prompt_holds_the_logits_inside_the_box_in_sams_frame(sam_path):
    refiner = SamRefiner.from_pretrained(str(sam_path))
    probs = np.full((48, 80), 0.6, np.float32)
    probs[8:40, 20:60] = 0.8
    prompt = refiner.mask_prompt(probs, (20, 8, 60, 40), (38, 64))[0, 0].numpy()
    # the frame is 16 / 64 of the processor's: the image covers rows 0-9 (38 / 4 = 9.5) and columns 0-15
    inside = prompt[3:7, 6:11]  # source rows 14-34, columns 30-55: well inside the box
    np.testing.assert_allclose(inside, np.log(0.8 / 0.2), atol=1e-4)
    assert np.allclose(prompt[11:], FLOOR_LOGIT) and np.allclose(prompt[:, 0], FLOOR_LOGIT)  # padding, outside


def test_sam_without_the_mask_prompt_and_without_components(sam_path):
    image, probs = two_components()
    _, instances = find_instances(probs > 0.5, probs)
    model, processor = load_sam(str(sam_path))
    refiner = SamRefiner(model, processor, use_mask_prompt=False)
    calls = capture_calls(model)
    refiner.refine(image, probs, instances[:1])
    assert len(calls) == 1 and calls[0]["input_masks"] is None
    empty = refiner.refine(image, probs, [])
    assert len(calls) == 1 and empty.masks.shape == (0, 48, 80) and not empty.union.any()
    with pytest.raises(ValueError, match="shape \\(10, 10\\) for an image of 48x80"):
        refiner.refine(image, np.zeros((10, 10), np.float32), instances)


def test_load_sam_refuses_a_missing_directory_and_missing_files(tmp_path, sam_path):
    with pytest.raises(FileNotFoundError, match="the SAM model .*nowhere.* has no config.json \\(no such directory"):
        load_sam(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="'nobody/no-such-sam' has no config.json \\(no such directory"):
        load_sam("nobody/no-such-sam")  # a hub id that is not in the cache, offline
    copy = tmp_path / "no_processor"
    shutil.copytree(sam_path, copy)
    (copy / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no preprocessor_config.json or processor_config.json: give"):
        load_sam(str(copy))


def test_load_sam_refuses_a_model_that_is_not_sam(tiny_checkpoint):
    path = tiny_checkpoint("not_sam", image_size=64)
    with pytest.raises(CheckpointError, match="config.json: model_type 'clipseg' is not a SAM model"):
        load_sam(str(path))


def test_load_sam_refuses_non_finite_weights(tiny_sam):
    with pytest.raises(CheckpointError, match="SAM model .* hold NaN or infinite values, e.g. mask_decoder.iou_token"):
        load_sam(str(tiny_sam("nan_sam", broken="nan")))


def test_load_sam_refuses_weights_that_would_leave_it_partly_random(tiny_sam, tiny_checkpoint, tmp_path):
    """transformers only warns and initialises missing weights at random; a SAM run with them would look fine."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_sam("whole"), tmp_path / "partial")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("mask_decoder.")}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"SAM model .*: \d+ weight\(s\) missing from its weights file"):
        load_sam(str(folder))
    shutil.copy(tiny_checkpoint("other", image_size=64) / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing from its weights file"):  # another model's weights
        load_sam(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 64  # the config no longer fits the weights
    shutil.copy(tiny_sam("again") / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="its weights do not fit its config.json"):
        load_sam(str(folder))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["mask_decoder_config"].update(num_multimask_outputs=10**6), "num_multimask_outputs"),
        (lambda c: c["prompt_encoder_config"].update(hidden_size=64), "widths differ"),
        (lambda c: c.update(mask_decoder_config=[1]), "must be a JSON object"),
    ],
)
def test_load_sam_refuses_configs_out_of_range(tmp_path, sam_path, edit, message):
    copy = tmp_path / "edited"
    shutil.copytree(sam_path, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json: .*{message}"):
        load_sam(str(copy))


def test_load_sam_refuses_a_processor_that_does_not_fit_the_model(tmp_path, sam_path):
    copy = tmp_path / "edited"
    shutil.copytree(sam_path, copy)
    processor = json.loads((copy / "processor_config.json").read_text())
    processor["image_processor"]["size"]["longest_edge"] = 100000
    (copy / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(CheckpointError, match="processor_config.json: expected a SAM processor .* longest side to 64"):
        load_sam(str(copy))
