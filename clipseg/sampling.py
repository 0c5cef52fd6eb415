"""The training sample stream: seeded, resumable at any iteration, sharded over torchrun ranks, read by DataLoader
workers that leave the main process one core each on the CPU.

A sample is a pure function of (run seed, its position in the stream), whatever the number of workers or where a
run resumed, which is what makes `train.py --resume` bitwise (tests/test_train_resume.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# The job's place and process group are clipseg/distributed.py's; train.py still imports them from here.
from clipseg.distributed import Distributed as Distributed
from clipseg.distributed import all_reduce_sum as all_reduce_sum
from clipseg.distributed import setup_distributed as setup_distributed
from clipseg.samples import Batch, Sample, collate

# ---------------------------------------------------------------------------------------- sample stream


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of `parts` (run seed, step, rank, sample position ...)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class InfiniteBatchSampler:
    """Batches of (dataset index, sample seed) for one rank, from a seeded endless stream of epochs.

    The global stream is a fresh permutation per epoch (seeded by run seed and epoch); global batch `step` holds
    stream positions step*B .. step*B + B - 1, of which rank r takes its contiguous slice of B/world. The stream
    is a pure function of (seed, step), so resuming at step k with any number of workers continues exactly.
    """

    def __init__(self, n_samples: int, global_batch: int, seed: int, start_step: int, world: Distributed):
        if n_samples == 0:
            raise ValueError("the training set is empty")
        self.n_samples, self.global_batch, self.seed = n_samples, global_batch, seed
        self.start_step, self.world = start_step, world
        self.local_batch = global_batch // world.world_size
        self._epoch, self._order = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_samples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.n_samples, generator=generator).tolist()
        return self._order[offset]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            first = step * self.global_batch + self.world.rank * self.local_batch
            yield [(self._index(p), derived_seed(self.seed, p, 1)) for p in range(first, first + self.local_batch)]
            step += 1


class SeededSamples(Dataset):
    """Wraps a training set so that item (index, seed) is drawn with its own random stream: the crop, negative
    and template choices then depend only on the sample's stream position, not on the worker count or on where
    a run was resumed (tests/test_train_resume.py checks resume bitwise)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, seed = key
        if hasattr(self.dataset, "reseed"):
            self.dataset.reseed(seed)
        return self.dataset[index]


def worker_init(_: int) -> None:
    # Ctrl-C or a SIGTERM to the process group reaches the workers too; the main process saves a checkpoint and then
    # shuts them down itself (a worker killed first would make the DataLoader raise before the save).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset: Dataset, sampler: InfiniteBatchSampler, num_workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin,
        worker_init_fn=worker_init if num_workers else None,
    )


@contextlib.contextmanager
def batches_from(loader: DataLoader) -> Iterator[Iterator[Batch]]:
    """Iterate the loader and stop its workers on the way out. Left to interpreter exit, the workers (which
    ignore SIGTERM, see worker_init) would make multiprocessing's exit handler wait for them forever."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # only the multi-process iterator has workers
        if shutdown is not None:
            shutdown()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity; all of them where it cannot be read)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """train.py's --num-workers default: one fewer than the usable cores, at most 4: a core stays with the training
    step (on 2 cores of an AMD EPYC, one run each: 7.8 samples/s with 4 workers, 11.2 with 1)."""
    return min(4, usable_cores() - 1)


@contextlib.contextmanager
def threads_beside_workers(device: torch.device, num_workers: int) -> Iterator[None]:
    """On the CPU, leave one core to each DataLoader worker: the training step's threads otherwise compete with
    the workers (the demo ran 1.46x faster on 2 cores with 1 worker and 1 thread than with 1 worker and 2
    threads). OMP_NUM_THREADS, when set (torchrun sets it), is respected."""
    if device.type != "cpu" or num_workers == 0 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, usable_cores() - num_workers))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
