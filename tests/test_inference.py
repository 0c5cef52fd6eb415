"""inference.py: each image is read and encoded once for all its tasks, with the same results as one pass per
task."""

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from clipseg.distributed import Distributed, block_size_for
from clipseg.inference import ImageGroups, predict_batches, predict_tasks
from clipseg.scoring import score
from model import CLIPSeg

SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tiny = CLIPSeg.from_backbone("tiny", image_size=SIZE).eval()
    with torch.no_grad():
        for param in tiny.decoder.transposed_convolution.parameters():
            param.mul_(4.0)
    tiny.text_cache = {}
    return tiny


@pytest.fixture(scope="module")
def data(synthetic_root):
    return dataset.PhraseCut(synthetic_root, "val", train=False, image_size=SIZE)


def count_encoded_images(model: CLIPSeg) -> list[int]:
    """Batch sizes of every vision-tower pass, recorded by a hook on its pre-layer-norm (run in every precision)."""
    sizes: list[int] = []
    model.clip.vision_model.pre_layrnorm.register_forward_hook(
        lambda module, inputs, output: sizes.append(inputs[0].shape[0])
    )
    return sizes


def test_every_task_once_and_every_image_encoded_once(data):
    torch.manual_seed(1)
    tiny = CLIPSeg.from_backbone("tiny").eval()
    encoded = count_encoded_images(tiny)
    seen = [task_id for prediction in predict_tasks(tiny, data, batch_size=5) for task_id in prediction.batch.task_ids]
    images = data.image_groups()
    assert sorted(seen) == sorted(data.task_info(i).task_id for i in range(len(data)))
    assert sum(encoded) == len(images) < len(data)  # several tasks per image, one vision pass each


def test_grouped_scoring_equals_one_pass_per_task(model, data, tmp_path):
    grouped = score(model, data, batch_size=6, save_predictions=tmp_path / "grouped")
    single = score(model, data, batch_size=6, save_predictions=tmp_path / "single", group_by_image=False)
    for key, value in grouped.paper.compute().items():
        assert value == pytest.approx(single.paper.compute()[key], abs=1e-9), key
    official, reference = grouped.official.compute(), single.official.compute()
    assert official["mean_iou"] == pytest.approx(reference["mean_iou"], abs=1e-12)
    assert official["subsets"].keys() == reference["subsets"].keys()
    names = sorted(p.name for p in (tmp_path / "grouped").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "single").iterdir()) and len(names) == len(data)
    for name in names:
        with Image.open(tmp_path / "grouped" / name) as a, Image.open(tmp_path / "single" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_per_task_mode_encodes_each_task(data):
    torch.manual_seed(2)
    tiny = CLIPSeg.from_backbone("tiny").eval()
    encoded = count_encoded_images(tiny)
    list(predict_tasks(tiny, data, batch_size=4, group_by_image=False))
    assert sum(encoded) == len(data)


def test_groups_follow_the_images_and_respect_the_batch_size(data):
    groups = ImageGroups(data, max_tasks=2)
    assert all(len(item) <= 2 for item in groups.items)
    for item in groups.items:
        assert len({data.task_info(int(t)).image_path for t in item}) == 1
    subset = ImageGroups(data, tasks=[0, 3, 5])
    assert sorted(int(t) for item in subset.items for t in item) == [0, 3, 5]
    for batch in groups.batches(3):
        assert sum(len(groups.items[i]) for i in batch) <= 3 or len(batch) == 1


def test_with_a_world_batches_never_cross_a_block_and_say_which_block_they_are_of(model, data):
    groups = data.image_groups()
    per_image = block_size_for(len(groups))
    image_of = {data.task_info(int(t)).task_id: image for image, group in enumerate(groups) for t in group}
    predictions = list(predict_tasks(model, data, batch_size=64, world=Distributed()))
    assert len(predictions) == -(-len(groups) // per_image) > 1  # one batch per block: blocks cut the batches
    for prediction in predictions:
        assert {image_of[task_id] // per_image for task_id in prediction.batch.task_ids} == {prediction.block}
    plain = list(predict_tasks(model, data, batch_size=64))
    assert len(plain) == 1 and plain[0].block == 0
    torch.testing.assert_close(torch.cat([p.logits for p in predictions]), plain[0].logits, atol=1e-5, rtol=0)


def test_predict_batches_with_a_world_deals_items_by_blocks(model, data):
    groups = ImageGroups(data)
    per_item = block_size_for(len(groups))
    blocks = [p.block for p in predict_batches(model, groups, batch_size=64, world=Distributed())]
    assert blocks == list(range(-(-len(groups) // per_item)))


def test_decode_with_prompts_per_image_equals_each_image_alone(model):
    pixels = torch.randn(2, 3, SIZE, SIZE)
    conditional = torch.randn(5, model.config.clip.projection_dim)
    with torch.no_grad():
        features = model.encode_image(pixels)
        together = model.decode(features, conditional, [2, 3])
        first = model.decode(model.encode_image(pixels[:1]), conditional[:2])
        second = model.decode(model.encode_image(pixels[1:]), conditional[2:])
    torch.testing.assert_close(together, torch.cat([first, second]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not split 5 prompts over 2 images"):
        model.decode(features, conditional, [1, 1])
