"""clipseg/samples.py: one collate for every data set (images stacked, tasks and their tensors in image order, skips
joined, unusable samples left out) and one skip convention (each item reported once, with its reason)."""

import numpy as np
import pytest
import torch

import dataset
from clipseg.distributed import Distributed
from clipseg.samples import ImageInfo, Sample, Skip, SkipLog, Task, collate

SMALL = 64


def test_collate_stacks_images_lists_tasks_and_joins_skips(synthetic_root):
    data = dataset.PhraseCut(synthetic_root, "test", train=False, image_size=SMALL, visual_support=True)
    samples = [data[0], Sample(skipped=[Skip({"task_id": "x"}, "file not found")]), data[1]]
    samples[2].skipped = [Skip({"task_id": "y"}, "truncated")]
    batch = collate(samples)
    assert batch.pixel_values.shape == (2, 3, SMALL, SMALL) and batch.masks.shape == (2, 1, SMALL, SMALL)
    assert torch.equal(batch.pixel_values[1], samples[2].pixel_values) and torch.equal(batch.masks[1], data[1].masks[0])
    assert batch.prompt_images.shape == (2, 3, SMALL, SMALL)
    assert batch.task_ids == [samples[0].tasks[0].task_id, samples[2].tasks[0].task_id]
    assert batch.images == [samples[0].image, samples[2].image] and batch.prompts_per_image == [1, 1]
    assert [skip.record() for skip in batch.skipped] == [
        {"task_id": "x", "reason": "file not found"},
        {"task_id": "y", "reason": "truncated"},
    ]


def test_several_tasks_per_image_follow_their_image():
    def sample(k: int, fill: float) -> Sample:
        tasks = [Task(task_id=f"{fill}-{i}", phrase=f"p{i}", has_prompt_image=i == 0) for i in range(k)]
        return Sample(
            pixel_values=torch.full((3, 4, 4), fill),
            tasks=tasks,
            masks=torch.arange(k, dtype=torch.float32).view(k, 1, 1, 1).expand(k, 1, 4, 4) + fill,
            prompt_images=torch.zeros(k, 3, 4, 4),
            image=ImageInfo(original_size=(k, 9)),
        )

    batch = collate([sample(3, 10.0), sample(1, 20.0)])
    assert batch.prompts_per_image == [3, 1] and batch.image_of_task == [0, 0, 0, 1] and len(batch) == 4
    assert batch.phrases == ["p0", "p1", "p2", "p0"]
    assert batch.masks[:, 0, 0, 0].tolist() == [10.0, 11.0, 12.0, 20.0]
    assert batch.has_prompt_image.tolist() == [True, False, False, True]
    assert [batch.images[b].original_size for b in batch.image_of_task] == [(3, 9)] * 3 + [(1, 9)]


def test_a_batch_of_skips_only_has_no_image_and_mixed_targets_are_refused():
    skips = [Skip({"index": 0, "query": "a"}, "unreadable"), Skip({"index": 1, "query": "b"}, "missing")]
    batch = collate([Sample(skipped=skips[:1]), Sample(skipped=skips[1:])])
    assert batch.pixel_values is None and batch.tasks == [] and batch.skipped == skips
    with_target = Sample(pixel_values=torch.zeros(3, 4, 4), tasks=[Task()], masks=torch.zeros(1, 1, 4, 4))
    without = Sample(pixel_values=torch.zeros(3, 4, 4), tasks=[Task()])
    with pytest.raises(ValueError, match="must all have masks or none"):
        collate([with_target, without])


def test_a_skip_log_reports_each_item_once_in_order():
    log = SkipLog()
    log.add([Skip({"task_id": "a"}, "first"), Skip({"task_id": "b"}, "other")])
    log.add([Skip({"task_id": "a"}, "again")])
    log.add([Skip({"index": 3, "query": "q", "class_id": 2}, "gone")])
    assert log.reasons == [
        {"task_id": "a", "reason": "first"},
        {"task_id": "b", "reason": "other"},
        {"index": 3, "query": "q", "class_id": 2, "reason": "gone"},
    ]


def test_a_skip_log_merges_its_blocks_in_block_order_each_item_once():
    log = SkipLog()
    log.add([Skip({"task_id": "late"}, "unreadable")], block=4)
    log.add([Skip({"task_id": "early"}, "unreadable"), Skip({"task_id": "late"}, "again")], block=1)
    log.add([Skip({"index": 0, "query": "q"}, "missing")], block=2)
    assert log.merge_ranks(Distributed()) is log  # one process: its own blocks, in block order
    assert log.reasons == [
        {"task_id": "early", "reason": "unreadable"},
        {"index": 0, "query": "q", "reason": "missing"},
        {"task_id": "late", "reason": "unreadable"},
    ]
    assert log.blocks == [1, 2, 4]


def test_dataset_batches_with_the_one_collate(synthetic_root):
    assert dataset.collate is collate
    data = dataset.PhraseCut(synthetic_root, "train", train=True, image_size=SMALL, prompts_per_image=2)
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=dataset.collate)
    batch = next(iter(loader))
    assert batch.pixel_values.shape == (3, 3, SMALL, SMALL) and batch.masks.shape == (6, 1, SMALL, SMALL)
    assert batch.prompts_per_image == [2, 2, 2] and np.all([isinstance(p, str) for p in batch.phrases])
