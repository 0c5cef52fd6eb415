"""One rank of tests/test_distributed.py's multi-process tests, started by torchrun or with its environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python tests/distributed_worker.py score OUT_DIR     # score items block by block, merge, write OUT_DIR/rank<k>.json
    python tests/distributed_worker.py disagree OUT_DIR  # each rank names another model: exit 2 with the error

`score_items` is also called in-process (one rank of one) for the single-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from clipseg.distributed import (
    Distributed,
    GlobalProgress,
    RanksDisagree,
    check_same_everywhere,
    gather_blocks,
    merge_metrics,
    owned_blocks,
    setup_distributed,
)
from clipseg.metrics import EpisodeMetrics, PaperMetrics, PhraseCutMetrics, ZeroShotMetrics

N_ITEMS = 150  # 50 blocks of 3 items: rank 0 of 2 scores the even blocks, rank 1 the odd ones
SKIPPED_EVERY = 37  # items 0, 37, 74, ... stand for unreadable images


def fresh_metrics() -> dict:
    return {
        "paper": PaperMetrics(),
        "phrasecut": PhraseCutMetrics(),
        "episodes": EpisodeMetrics(),
        "zero_shot": ZeroShotMetrics([0, 1, 2], [3, 4], n_classes=5),
    }


def add_item(metrics: dict, item: int) -> None:
    """Item `item`'s made-up prediction and ground truth, a pure function of the item, into every metric."""
    rng = np.random.default_rng(item)
    probs = rng.random((1, 9, 11)).astype(np.float32)
    target = rng.random((1, 9, 11)) < rng.random()
    metrics["paper"].update(probs, target)
    kind = ["name", "attribute", "relation"][item % 3]
    metrics["phrasecut"].update(probs[0] > 0.3, target[0], phrase_type=kind, n_instances=1 + item % 6)
    metrics["episodes"].update(probs[0], target[0], class_id=1 + item % 4, valid=probs[0] < 0.95)
    metrics["zero_shot"].update(rng.integers(0, 5, (7, 7)), rng.integers(0, 5, (7, 7)))


def score_items(world: Distributed) -> dict:
    """This rank's blocks scored into per-block metrics, merged across ranks; what the test compares."""
    states: dict[str, dict] = {name: {} for name in fresh_metrics()}
    skipped, scored = {}, []
    progress = GlobalProgress(world, total=N_ITEMS, interval=0, desc="items")
    for block, items in owned_blocks(N_ITEMS, world):
        metrics, skipped[block] = fresh_metrics(), []
        for item in items:
            if item % SKIPPED_EVERY == 0:
                skipped[block].append(f"item {item}")
            else:
                add_item(metrics, item)
                scored.append(item)
            progress.update(1)
        for name, values in metrics.items():
            states[name][block] = values.state()
    progress.close()
    merged = {name: merge_metrics(fresh_metrics()[name], states[name], world).compute() for name in states}
    return {
        "metrics": json.loads(json.dumps(merged)),  # as a results file holds them (class ids become strings)
        "skipped": [entry for block in gather_blocks(skipped, world) for entry in block],
        "scored_here": scored,
        "progress": progress.count,
    }


def main(scenario: str, out: Path) -> int:
    world, _ = setup_distributed("cpu")
    try:
        if scenario == "score":
            check_same_everywhere(world, model="weights", flags={"threshold": 0.3}, data=N_ITEMS)
            result = score_items(world)
            (out / f"rank{world.rank}.json").write_text(json.dumps(result))
        elif scenario == "disagree":
            model = "weights-a" if world.rank == 0 else "weights-b"
            check_same_everywhere(world, model=model, flags={"threshold": 0.3}, data=N_ITEMS)
            print("ranks agreed", file=sys.stderr)
    except RanksDisagree as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if world.enabled:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
