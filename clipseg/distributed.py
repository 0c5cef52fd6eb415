"""One command on many processes (torchrun): each process's place in the job and its process group, the rules that
split the work between ranks, merging what the ranks computed, the start-up check that every rank runs the same
model, flags and data, and one progress bar for the whole job. Without torchrun everything here is rank 0 of 1 and
no collective is called.

    world, device = setup_distributed(args.device)              # NCCL on GPUs, gloo on the CPU
    check_same_everywhere(world, model=model_digest(model), flags=flags, data=sequence_digest(task_ids))
    for block, items in owned_blocks(len(images), world):       # indexed data: blocks dealt round-robin
        ...                                                     # score the block into its own accumulators
    paper = merge_metrics(PaperMetrics(0.3), states_by_block, world)    # every rank gets the merged metrics
    entries = iter_inputs(folders, owns=world.owns)             # streams: a stable hash of each item's key

Sharding: two pure rules, so that every rank (and a rerun) computes the same split without talking to the others.

- Indexed data (score.py, failure_test.py): items 0 .. n-1, in the data set's own order (the images of PhraseCut's
  `image_groups()`, the episodes of a fold), are cut into blocks of `block_size_for(n)` consecutive items (at most
  `BLOCK_ITEMS`, fewer for small data sets so that there are about `MIN_BLOCKS` blocks to spread: a function of n
  alone); block b goes to rank b % world_size. Every block is scored into accumulators of its own, batches never
  cross a block, and the blocks' states are added in block order, on one process as on many. A float sum (the
  per-sample IoUs behind mIoU) is then computed in one order whatever the number of ranks, so merged results equal
  one process's bit for bit, and so do the batches each image is predicted in.
- Streams (predict.py's folders, never listed whole): an item with key k (its path as given on the command line)
  belongs to rank `stable_hash(k) % world_size` (clipseg/folders.py: 8 bytes of BLAKE2b of the key's UTF-8 bytes):
  the same on every node and in every run (Python's `hash()` is salted per process and cannot be used), and it
  does not depend on the order a file system lists a folder in. A rerun with the same world size gives every rank
  the same images; ranks get about n / world_size items each (binomial spread).

Merging: the metrics classes of clipseg/metrics.py expose `state()` (their sums, as int64 and float64 arrays) and
`load_state()`; states add (`clipseg.metrics.sum_states`). `gather_blocks` collects per-block results from every rank
in block order, `merge_metrics` sums metric states with it.

Progress: `GlobalProgress` is a tqdm bar on rank 0 showing the count of all ranks; the ranks add their counts to the
job's key-value store (the one the process group rendezvoused through) at most every `interval` seconds, so no rank
waits for another while it works.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from clipseg.folders import stable_hash
from clipseg.metrics import sum_states
from clipseg.outputs import printable

BLOCK_ITEMS = 32  # items (images, episodes) per block of indexed data at most; results depend on it, the world size not
MIN_BLOCKS = 64  # smaller data sets get smaller blocks, so that up to this many ranks all get work
FINGERPRINT_PREVIEW = 60  # characters of a differing value shown in the fingerprint error

T = TypeVar("T")
Metrics = TypeVar("Metrics")


# ------------------------------------------------------------------------------------------------- the job


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, key: str) -> bool:
        """Whether the stream item with `key` is this rank's (`owner_of`)."""
        return owner_of(key, self.world_size) == self.rank


def default_device() -> str:
    """The device a command runs on unless --device says otherwise: "cuda" when PyTorch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_distributed(device_flag: str | None) -> tuple[Distributed, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device and join the process group (NCCL on GPUs,
    gloo on CPU)."""
    world = Distributed(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )
    name = device_flag or default_device()
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={name} but CUDA is not available; use --device=cpu")
        if device.index is None:
            device = torch.device("cuda", world.local_rank if world.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


class JobError(RuntimeError):
    """A job that cannot run as started: the device asked for is not there, or the ranks disagree."""


@contextmanager
def distributed_job(device_flag: str | None) -> Iterator[tuple[Distributed, torch.device]]:
    """`setup_distributed` (its ValueError as `JobError`), and the process group left at the end (however the
    command ends). After a normal end, and after `RanksDisagree` (which every rank raises from the same exchange),
    the ranks meet at a barrier first, so that no rank tears gloo down while another still talks to it; after another
    error they do not wait for ranks that may be gone. (A rank that aborted at exit in this project's CI after its
    work was done was first put down to a missing barrier; it came again with it: `run_and_exit`.)"""
    try:
        world, device = setup_distributed(device_flag)
    except ValueError as err:
        raise JobError(str(err)) from err
    all_ranks_here = False
    try:
        yield world, device
        all_ranks_here = True
    except RanksDisagree:
        all_ranks_here = True
        raise
    finally:
        if world.enabled and dist.is_initialized():
            if all_ranks_here:
                dist.barrier()
            dist.destroy_process_group()


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """A command's end: run `main` and exit with its status (its int result, else 0; a SystemExit's code). In a
    rank of a torchrun job (WORLD_SIZE > 1) the process then leaves without the interpreter's final teardown, once
    its output is flushed, its other threads have ended and its exit handlers have run: torch's C++ teardown of the
    gloo process group at that point sometimes aborted a rank whose work was complete ("terminate called without an
    active exception", exit status -6; three times in this project's CI in many runs, after the ranks had met at a
    barrier and left the process group), and torchrun then reports the whole job failed (pytorch/pytorch#179291
    and #190489 describe gloo's threads at interpreter exit)."""
    try:
        result = main()
        status = result if isinstance(result, int) and not isinstance(result, bool) else 0
    except SystemExit as stop:
        status = stop.code
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        sys.exit(status)
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit's rule: a message goes to stderr, status 1
        print(status, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what sys.exit would run before the teardown (temporary folders, logging)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def all_reduce_sum(values: Sequence[float], world: Distributed, device: torch.device) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if world.enabled:
        dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: Distributed) -> None:
    """Wait for every rank (nothing to wait for on one process)."""
    if world.enabled:
        dist.barrier()


def in_turn(world: Distributed, action: Callable[[], T]) -> T:
    """`action()` on one rank after another, in rank order (checks that create and remove probe folders in a
    folder the ranks share would race); its result on each rank."""
    result = None
    for rank in range(world.world_size):
        if rank == world.rank:
            result = action()
        barrier(world)
    return result


# ------------------------------------------------------------------------------------------------ sharding


def block_size_for(n_items: int) -> int:
    """Items per block of a data set of `n_items`: BLOCK_ITEMS, or fewer so that there are MIN_BLOCKS blocks."""
    return max(1, min(BLOCK_ITEMS, -(-n_items // MIN_BLOCKS)))


def block_ranges(n_items: int, block_size: int | None = None) -> list[range]:
    """Items 0 .. n_items - 1 cut into consecutive blocks of `block_size` (default `block_size_for(n_items)`; the
    last one shorter)."""
    block_size = block_size or block_size_for(n_items)
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    return [range(start, min(start + block_size, n_items)) for start in range(0, n_items, block_size)]


def owned_blocks(n_items: int, world: Distributed, block_size: int | None = None) -> list[tuple[int, range]]:
    """(block id, its items) of this rank's blocks: block b is rank b % world_size's."""
    blocks = enumerate(block_ranges(n_items, block_size))
    return [(block, items) for block, items in blocks if block % world.world_size == world.rank]


def block_batches(
    n_items: int, world: Distributed, batch_size: int, block_size: int | None = None
) -> list[tuple[int, list[int]]]:
    """This rank's batches of indexed data as (block id, item indices): consecutive items of its blocks, at most
    `batch_size` per batch, never crossing a block, so that a batch holds the same items on any number of ranks."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [
        (block, list(items[start : start + batch_size]))
        for block, items in owned_blocks(n_items, world, block_size)
        for start in range(0, len(items), batch_size)
    ]


def owner_of(key: str, world_size: int) -> int:
    """The rank a stream item belongs to: `stable_hash(key) % world_size`."""
    return stable_hash(key) % world_size


# ------------------------------------------------------------------------------------------------- merging


def gather_blocks(results: Mapping[int, T], world: Distributed) -> list[T]:
    """Every rank's per-block results (block id -> a picklable value), in block order, on every rank."""
    if not world.enabled:
        return [results[block] for block in sorted(results)]
    gathered: list = [None] * world.world_size
    dist.all_gather_object(gathered, dict(results))
    merged: dict[int, T] = {}
    for rank, part in enumerate(gathered):
        for block, value in part.items():
            if block in merged:
                raise RuntimeError(f"block {block} was computed twice (again by rank {rank})")
            merged[block] = value
    return [merged[block] for block in sorted(merged)]


def gather_lists(lists_by_block: Mapping[int, list], world: Distributed) -> list:
    """Every rank's per-block lists (skipped samples, cases found) joined in block order, on every rank."""
    return [entry for part in gather_blocks(lists_by_block, world) for entry in part]


def merge_rank_metrics(metrics: Metrics, world: Distributed) -> Metrics:
    """Replace `metrics` (counts only: `EpisodeMetrics`, `ZeroShotMetrics`) by the sum of every rank's; integer
    sums are the same in any order. Returns `metrics`."""
    metrics.load_state(sum_states(gather_blocks({world.rank: metrics.state()}, world)))
    return metrics


def merge_metrics(target: Metrics, states_by_block: Mapping[int, dict], world: Distributed) -> Metrics:
    """Load into `target` (a fresh metrics object of clipseg/metrics.py) the sum, in block order, of every rank's
    per-block `state()`s; returns `target`. The same sums in the same order on any number of ranks."""
    target.load_state(sum_states(gather_blocks(states_by_block, world)))
    return target


# ------------------------------------------------------------------------------------------------ fingerprint


class RanksDisagree(JobError):
    """The ranks were started with different models, flags or data; the message names the fields and ranks."""


def check_same_everywhere(world: Distributed, **fields: object) -> None:
    """Compare `fields` (JSON-able values: digests, flags, data set identities) across ranks; raise `RanksDisagree`
    on every rank when any differs, naming the field, which ranks hold which value, and what to do. A collective:
    every rank calls it once at start, with the same field names."""
    mine = {name: json.dumps(value, sort_keys=True, default=str) for name, value in fields.items()}
    if not world.enabled:
        return
    gathered: list = [None] * world.world_size
    dist.all_gather_object(gathered, mine)
    problems = []
    for name in dict.fromkeys(itertools.chain.from_iterable(gathered)):
        holders: dict[str, list[int]] = {}
        for rank, part in enumerate(gathered):
            holders.setdefault(part.get(name, "(not given)"), []).append(rank)
        if len(holders) > 1:
            sides = [f"{_ranks(ranks)} {printable(value, FINGERPRINT_PREVIEW)}" for value, ranks in holders.items()]
            problems.append(f"{name} ({'; '.join(sides)})")
    if problems:
        raise RanksDisagree(
            f"the ranks were not started alike: they differ in {', '.join(problems)}. Start every rank with the same "
            "model, flags and data (same files on every node)"
        )


def check_same_job(world: Distributed, model: torch.nn.Module, flags: Mapping, items: Iterable[str]) -> None:
    """`check_same_everywhere` of the model's digest, the flags that shape the results and the data (`items`: its
    task ids, episode keys, ... in order); nothing is hashed on one process."""
    if world.enabled:
        check_same_everywhere(world, model=model_digest(model), flags=dict(flags), data=sequence_digest(items))


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's config (when it has `config.to_hf_dict()`) and every entry of its state dict (names,
    dtypes, shapes and bytes; quantised tensors by their dequantised values), as hex. Two ranks that loaded
    different weights, or the same weights at another precision, get different digests. An exported model (ONNX,
    OpenVINO) is digested by its config, precision and manifest (which lists its graph files' hashes)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if hasattr(config, "to_hf_dict"):
        digest.update(json.dumps(config.to_hf_dict(), sort_keys=True, default=str).encode())
    if not isinstance(model, torch.nn.Module):  # an export (clipseg/backends.py): its manifest holds its files' hashes
        manifest = getattr(model, "manifest", None)
        digest.update(json.dumps([model.precision, manifest], sort_keys=True, default=str).encode())
        return digest.hexdigest()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        _digest_value(digest, value)
    return digest.hexdigest()


def _digest_value(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        tensor = tensor.dequantize() if tensor.is_quantized else tensor
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, tuple | list):
        for item in value:
            _digest_value(digest, item)
    else:  # dtypes and numbers of packed (quantised) parameters
        digest.update(repr(value).encode())


def sequence_digest(items: Iterable[str]) -> str:
    """SHA-256 (hex) of a sequence of strings in order (task ids, episode keys): a data set's identity."""
    digest = hashlib.sha256()
    for item in items:
        data = item.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 (hex) of files' names and contents, in name order (an ONNX export folder, a weights file)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode("utf-8", "surrogatepass") + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ progress


class GlobalProgress:
    """A progress bar for the whole job: shown by rank 0 with the count of every rank; the other ranks show none.

    Each rank calls `update(n)` for its own items; counts reach the job's store at most every `interval` seconds
    (and at `close`). `close()` is a collective (every rank calls it, in the same order as the other bars): after it,
    rank 0's `count` is the job's total. Bars are told apart by the order they are made in, the same on every rank.
    """

    _made = 0  # bars made by this process: the store key of the next one

    def __init__(self, world: Distributed, total: int | None = None, interval: float = 0.5, **bar_options: Any):
        self.world, self.interval = world, interval
        self.key = f"clipseg/progress/{GlobalProgress._made}"
        GlobalProgress._made += 1
        self.pending, self.count, self.flushed_at = 0, 0, time.monotonic()
        self.store = dist.distributed_c10d._get_default_store() if world.enabled else None
        hidden = bar_options.pop("disable", False) or not world.is_main
        self.bar = tqdm(total=total, disable=hidden, **{"file": sys.stderr, "dynamic_ncols": True, **bar_options})

    def update(self, n: int = 1) -> None:
        self.pending += n
        if time.monotonic() - self.flushed_at >= self.interval:
            self._flush()

    def _flush(self) -> None:
        if self.store is not None:
            self.count = int(self.store.add(self.key, self.pending))  # the job's count, this rank's included
        else:
            self.count += self.pending
        self.pending, self.flushed_at = 0, time.monotonic()
        if self.world.is_main:
            self.bar.update(self.count - self.bar.n)

    def close(self) -> None:
        self._flush()
        if self.store is not None:
            dist.barrier()  # every rank has added its last count
            self.pending = 0
            self._flush()
        self.bar.close()
