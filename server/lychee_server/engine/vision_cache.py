"""A bounded, thread-safe LRU of vision-tower outputs keyed by image content.

Why: in reranking the same images come back again and again (the same catalogue photo scored for
many queries). The ViT is a large share of an image pair's cost, and its output depends only on the
image bytes and the processor settings, so those make the key (see :func:`image_key`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["VisionCache", "VisionEntry", "image_key"]


def image_key(data: bytes, media_type: str, settings_tag: str) -> str:
    """sha256 of the bytes plus everything that changes the ViT output (processor bounds, model)."""
    h = hashlib.sha256()
    h.update(settings_tag.encode())
    h.update(b"\0")
    h.update(media_type.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class VisionEntry:
    grid: tuple[int, int, int]  # (t, h, w) patch grid before the 2x2 merge
    embeds: torch.Tensor  # (tokens, hidden) merged vision-tower output, on the model device


class VisionCache:
    """LRU by entry count; ``capacity == 0`` disables it. All methods are safe from any thread."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._data: OrderedDict[str, VisionEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> VisionEntry | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return entry

    def peek_grid(self, key: str) -> tuple[int, int, int] | None:
        """The grid of a cached image without touching LRU order or counters (used by prepare)."""
        with self._lock:
            entry = self._data.get(key)
            return None if entry is None else entry.grid

    def put(self, key: str, entry: VisionEntry) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = entry
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
