"""sessions.py: what a session retains, and the store that drops idle and least recently used sessions."""

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from clipseg.sessions import MB, SessionStore, retained_bytes


@dataclass
class Held:
    """A session holding `megabytes` MB of float32 until released."""

    megabytes: int
    data: np.ndarray | None = None
    released: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.data = np.zeros(self.megabytes * MB // 4, dtype=np.float32)

    def release(self, reason: str) -> None:
        self.data = None
        self.released.append(reason)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_retained_bytes_counts_arrays_tensors_and_images_once_and_skips_modules():
    array = np.zeros((100, 10), dtype=np.float32)
    tensor = torch.zeros(50, dtype=torch.float64)
    model = torch.nn.Linear(1000, 1000)  # shared by sessions: not theirs
    state = {
        "arrays": [array, array[10:20], array.T],  # views of one buffer
        "tensors": (tensor, tensor[5:], tensor.view(5, 10)),
        "images": [Image.new("RGB", (30, 20)), Image.new("L", (30, 20))],
        "bytes": b"x" * 7,
        "model": model,
        "nested": Held(1),
    }
    state["cycle"] = state
    assert retained_bytes(state) == 4000 + 400 + 30 * 20 * 4 + 30 * 20 + 7 + MB
    assert retained_bytes(model) == 0 and retained_bytes(None) == 0


def test_the_least_recently_used_sessions_go_first_when_all_hold_too_much():
    store = SessionStore(max_bytes=5 * MB, idle_seconds=60, clock=Clock())
    first, second, third = Held(2), Held(2), Held(2)
    for session in (first, second, third):
        store.update(session)
    assert first.released and "at most 5 MB of results for all pages together" in first.released[0]
    assert not second.released and not third.released and store.total_bytes == 4 * MB and len(store) == 2
    store.touch(second)  # now third is the least recently used
    store.update(Held(2))
    assert third.released and not second.released
    alone = SessionStore(max_bytes=1 * MB, idle_seconds=60)
    big = Held(3)
    alone.update(big)  # the session being updated is never dropped by its own update
    assert not big.released and alone.total_bytes == 3 * MB
    big.release("done")
    alone.update(big)  # holds nothing now: not tracked
    assert len(alone) == 0 and alone.total_bytes == 0


def test_sessions_idle_for_too_long_are_released_and_forgotten_ones_are_not_tracked():
    clock = Clock()
    store = SessionStore(max_bytes=100 * MB, idle_seconds=600, clock=clock)
    idle, busy, closed = Held(1), Held(1), Held(1)
    for session in (idle, busy, closed):
        store.update(session)
    store.forget(closed)
    clock.now = 500
    store.touch(busy)
    clock.now = 700
    store.expire()
    assert idle.released == ["it was not used for 10 minutes"] and idle.data is None
    assert not busy.released and not closed.released and len(store) == 1 and store.total_bytes == MB
