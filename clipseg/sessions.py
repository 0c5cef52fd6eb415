"""Sessions of a server under a memory budget: how much each holds, for how long, and which are dropped.

`SessionStore` tracks the sessions that hold something: the bytes each retains (`retained_bytes`) and when each was
last used. A session idle for longer than `idle_seconds` is dropped; when all sessions together would retain more
than `max_bytes`, the least recently used ones are dropped first (never the session being updated). Dropping calls
the session's `release(reason)`, which frees what it holds and keeps the reason, so that its user can be told why
at their next action.

`retained_bytes` measures what an object graph holds in numpy arrays, torch tensors (each storage once), PIL images
and bytes; modules (`torch.nn.Module`, such as a model that sessions share) are not followed.

No Gradio and no model here: the app decides what a session holds (clipseg/segmenter.py); this module, how much and
how long.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import FunctionType, MethodType, ModuleType
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

MB = 1024 * 1024
_NOT_FOLLOWED = (str, int, float, complex, bool, type, ModuleType, FunctionType, MethodType, torch.nn.Module)


class Releasable(Protocol):
    def release(self, reason: str) -> None:
        """Free what the session holds; `reason` says why (shown to its user)."""


def image_bytes(image: Image.Image) -> int:
    """The memory of a PIL image's pixels: 1 byte per pixel for modes 1, L and P, 2 for 16-bit, else 4 (PIL keeps
    RGB as 32-bit pixels)."""
    per_pixel = 1 if image.mode in ("1", "L", "P") else 2 if image.mode.startswith("I;16") else 4
    return image.width * image.height * per_pixel


def retained_bytes(root: Any) -> int:
    """Bytes of numpy arrays (their owning array, once), torch tensors (their storage, once), PIL images and bytes
    reachable from `root` through attributes, dicts, lists, tuples and sets; modules are not followed."""
    seen: set[int] = set()
    buffers: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, _NOT_FOLLOWED) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            owner = item
            while isinstance(owner.base, np.ndarray):
                owner = owner.base
            if id(owner) not in buffers:
                buffers.add(id(owner))
                total += owner.nbytes
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in buffers:
                buffers.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, Image.Image):
            total += image_bytes(item)
        elif isinstance(item, bytes | bytearray):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return total


class SessionStore:
    """The sessions that retain memory, least recently used first. Thread-safe."""

    def __init__(self, max_bytes: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.idle_seconds, self.clock = max_bytes, idle_seconds, clock
        self._sessions: OrderedDict[int, tuple[Releasable, int, float]] = OrderedDict()  # id -> (session, bytes, used)
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        """What all tracked sessions retain together, as measured at their last update."""
        with self._lock:
            return sum(size for _, size, _ in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def expire(self) -> None:
        """Release the sessions not used for longer than `idle_seconds`."""
        minutes = self.idle_seconds / 60
        with self._lock:
            now = self.clock()
            for key, (_, _, used) in list(self._sessions.items()):  # least recently used first
                if now - used <= self.idle_seconds:
                    break
                self._release(key, f"it was not used for {minutes:g} minutes")

    def touch(self, session: Releasable) -> None:
        """Mark a tracked session as used now."""
        with self._lock:
            if id(session) in self._sessions:
                _, size, _ = self._sessions[id(session)]
                self._sessions[id(session)] = (session, size, self.clock())
                self._sessions.move_to_end(id(session))

    def update(self, session: Releasable) -> None:
        """Measure what `session` retains now and mark it used, then release the least recently used other sessions
        while all together retain more than `max_bytes`. A session that retains nothing is not tracked."""
        size = retained_bytes(session)
        with self._lock:
            self._sessions.pop(id(session), None)
            if size == 0:
                return
            self._sessions[id(session)] = (session, size, self.clock())
            total = sum(size for _, size, _ in self._sessions.values())
            for key in list(self._sessions)[:-1]:
                if total <= self.max_bytes:
                    break
                total -= self._sessions[key][1]
                self._release(
                    key,
                    f"the server keeps at most {self.max_bytes / MB:g} MB of results for all pages together and "
                    "this page's was the least recently used",
                )

    def forget(self, session: Releasable) -> None:
        """Stop tracking a session (its owner frees it)."""
        with self._lock:
            self._sessions.pop(id(session), None)

    def _release(self, key: int, reason: str) -> None:
        session, _, _ = self._sessions.pop(key)
        session.release(reason)
