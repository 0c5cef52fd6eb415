"""clipseg/distributed.py: the sharding rules cover every item once for any world size and do not change between
runs; two gloo processes on the CPU merge metrics to exactly one process's results, show one progress count and
stop together, with the error, when they were started with different models; the digests tell models, data and
files apart."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port  # noqa: E402
from distributed_worker import N_ITEMS, SKIPPED_EVERY, add_item, fresh_metrics, score_items  # noqa: E402
from helpers import assert_close

from clipseg import distributed
from clipseg.distributed import (
    BLOCK_ITEMS,
    Distributed,
    GlobalProgress,
    block_ranges,
    check_same_everywhere,
    files_digest,
    gather_blocks,
    model_digest,
    owned_blocks,
    owner_of,
    sequence_digest,
)
from clipseg.precision import prepare_model
from model import CLIPSeg

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n_items", [0, 1, BLOCK_ITEMS - 1, BLOCK_ITEMS, BLOCK_ITEMS + 1, 150, 1000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_blocks_give_every_item_to_exactly_one_rank(n_items, world_size):
    shards = [owned_blocks(n_items, Distributed(rank, world_size)) for rank in range(world_size)]
    items = [item for shard in shards for _, block in shard for item in block]
    assert sorted(items) == list(range(n_items)) and len(items) == len(set(items))
    blocks = sorted(block for shard in shards for block, _ in shard)
    assert blocks == list(range(len(block_ranges(n_items))))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1  # dealt round-robin: at most one block more than another rank
    assert shards == [owned_blocks(n_items, Distributed(rank, world_size)) for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_stream_keys_go_to_exactly_one_rank_with_a_fair_share(world_size):
    keys = [f"photos/img{i:05d}.jpg" for i in range(4000)]
    owners = [[Distributed(rank, world_size).owns(key) for rank in range(world_size)] for key in keys]
    assert all(sum(flags) == 1 for flags in owners)
    counts = np.sum(owners, axis=0)
    assert counts.min() > 0.9 * len(keys) / world_size  # binomial spread: about 1% here


def test_the_stream_rule_is_the_same_in_another_process_with_another_hash_seed():
    keys = ["photos/cat.jpg", "猫.png", os.fsdecode(b"caf\xe9.jpg"), "x" * 300]
    code = "import sys; from clipseg.distributed import owner_of; print([owner_of(k, 7) for k in sys.argv[1:]])"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    keys_arg = [os.fsencode(k) for k in keys]
    other = subprocess.run([sys.executable, "-c", code, *keys_arg], capture_output=True, text=True, env=env)
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.strip() == str([owner_of(key, 7) for key in keys])


# ------------------------------------------------------------------------------------------------- merging


def test_one_process_gathers_blocks_in_block_order_and_merges_like_a_plain_accumulator():
    assert gather_blocks({3: "c", 0: "a", 1: "b"}, Distributed()) == ["a", "b", "c"]
    blocked = score_items(Distributed())
    plain = fresh_metrics()  # one accumulator fed item after item: the same metrics up to float rounding
    for item in range(N_ITEMS):
        if item % SKIPPED_EVERY:
            add_item(plain, item)
    expected = json.loads(json.dumps({name: metrics.compute() for name, metrics in plain.items()}))
    assert_close(blocked["metrics"], expected, rel=1e-12, same_types=False)
    assert blocked["skipped"] == [f"item {i}" for i in range(0, N_ITEMS, SKIPPED_EVERY)]
    assert blocked["progress"] == N_ITEMS


def launch(scenario: str, out: Path, world_size: int = 2) -> list[subprocess.CompletedProcess]:
    """`world_size` ranks of tests/distributed_worker.py with torchrun's environment, rendezvous on 127.0.0.1."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        command = [sys.executable, str(WORKER), scenario, str(out)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=180)
        finally:
            process.kill()
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def test_two_gloo_processes_merge_to_exactly_one_processs_results(tmp_path):
    results = launch("score", tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    single = score_items(Distributed())
    for merged in ranks:  # every rank holds the merged results
        assert merged["metrics"] == single["metrics"]  # bit for bit: the same sums in the same order
        assert merged["skipped"] == single["skipped"]
    scored = [set(r["scored_here"]) for r in ranks]
    assert not scored[0] & scored[1] and scored[0] | scored[1] == set(single["scored_here"])
    assert ranks[0]["progress"] == N_ITEMS  # rank 0's bar counted both ranks' items
    assert f"{N_ITEMS}/{N_ITEMS}" in results[0].stderr and "items" not in results[1].stderr  # one bar, on rank 0


def test_ranks_started_differently_all_stop_with_an_error_naming_the_field_and_ranks(tmp_path):
    results = launch("disagree", tmp_path)
    for result in results:
        assert result.returncode == 2, result.stderr[-2000:]
        assert (
            'error: the ranks were not started alike: they differ in model (rank 0 "weights-a"; rank 1 '
            '"weights-b"). Start every rank with the same model, flags and data'
        ) in result.stderr
        assert "ranks agreed" not in result.stderr and "Traceback" not in result.stderr


def test_one_process_has_nothing_to_compare_and_counts_its_own_progress():
    check_same_everywhere(Distributed(), model="anything", flags={"threshold": 0.3})
    progress = GlobalProgress(Distributed(), total=5, interval=3600, disable=True)
    for _ in range(5):
        progress.update(1)
    assert progress.count == 0  # not flushed yet (interval)
    progress.close()
    assert progress.count == 5


# ------------------------------------------------------------------------------------------------- digests


def test_model_digest_tells_weights_configs_and_precisions_apart():
    torch.manual_seed(0)
    model = CLIPSeg.from_backbone("tiny", image_size=64).eval()
    same = CLIPSeg.from_backbone("tiny", image_size=64).eval()
    same.load_state_dict(model.state_dict())
    digest = model_digest(model)
    assert model_digest(same) == digest and len(digest) == 64
    with torch.no_grad():
        same.decoder.film_mul.weight[0, 0] += 1e-6
    assert model_digest(same) != digest
    bigger = CLIPSeg.from_backbone("tiny", image_size=96).eval()
    bigger.load_state_dict(model.state_dict())
    assert model_digest(bigger) != digest  # same weights, another configuration
    assert model_digest(prepare_model(model, "int8", "cpu")) != digest  # quantised weights hash too


def test_sequence_and_file_digests_follow_content_order_and_names(tmp_path):
    assert sequence_digest(["ab", "c"]) != sequence_digest(["a", "bc"]) != sequence_digest(["c", "ab"])
    assert sequence_digest(iter(["t1", "t2"])) == sequence_digest(["t1", "t2"])
    (tmp_path / "a.onnx").write_bytes(b"graph")
    (tmp_path / "b.json").write_bytes(b"{}")
    digest = files_digest(tmp_path.iterdir())
    assert files_digest(sorted(tmp_path.iterdir(), reverse=True)) == digest
    (tmp_path / "b.json").write_bytes(b"{ }")
    assert files_digest(tmp_path.iterdir()) != digest
    (tmp_path / "b.json").rename(tmp_path / "c.json")
    assert files_digest(tmp_path.iterdir()) != digest


@pytest.mark.parametrize(
    ("raised", "calls"),
    [
        (None, ["barrier", "destroy"]),  # a normal end: every rank is there
        (distributed.RanksDisagree("differ"), ["barrier", "destroy"]),  # raised by every rank from one exchange
        (RuntimeError("this rank failed"), ["destroy"]),  # other ranks may be gone: no waiting for them
    ],
)
def test_the_ranks_meet_before_leaving_the_process_group_when_all_of_them_are_there(monkeypatch, raised, calls):
    made = []
    monkeypatch.setattr(distributed, "setup_distributed", lambda flag: (Distributed(0, 2, 0), torch.device("cpu")))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: made.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: made.append("destroy"))
    with pytest.raises(type(raised)) if raised else contextlib.nullcontext():
        with distributed.distributed_job("cpu"):
            if raised:
                raise raised
    assert made == calls


RANK_EXIT_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from clipseg.distributed import run_and_exit

out = Path(sys.argv[1])
def main():
    atexit.register(lambda: (out / "exit_handler").write_text("ran"))
    def late_writer():
        time.sleep(0.3)
        (out / "thread").write_text("finished")
    threading.Thread(target=late_writer).start()
    print("the last line of output", end="")  # buffered: no newline, no flush
    if sys.argv[2] == "return":
        return 3
    if sys.argv[2] == "results":
        return {"miou": 0.5}  # score.py returns its results: status 0
    sys.exit("error: a message")
run_and_exit(main)
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
@pytest.mark.parametrize("how, status", [("return", 3), ("results", 0), ("message", 1)])
def test_a_command_exits_with_its_status_after_its_output_threads_and_exit_handlers(tmp_path, world_size, how, status):
    env = {**os.environ, "WORLD_SIZE": world_size, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", RANK_EXIT_SCRIPT, str(tmp_path), how], capture_output=True, text=True, env=env
    )
    assert done.returncode == status
    assert done.stdout == "the last line of output"
    assert done.stderr == ("error: a message\n" if how == "message" else "")
    assert (tmp_path / "thread").read_text() == "finished" and (tmp_path / "exit_handler").read_text() == "ran"
