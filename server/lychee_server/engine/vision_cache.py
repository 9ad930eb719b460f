"""A bounded, thread-safe LRU of vision-tower outputs keyed by image content.

Why: in reranking the same images come back again and again (the same catalogue photo scored for
many queries). The ViT is a large share of an image pair's cost, and its output depends only on the
image bytes and the processor settings, so those make the key (see :func:`image_key`).

The key also holds a *scope*, the caller's tenant by default (``settings.vision_cache_scope``): a
hit answers many times faster than a miss, so a cache shared by all callers would tell anyone
whether an image was recently scored by someone else. Per-tenant keys close that side channel at
the price of one ViT run per tenant for an image several tenants send.

Bounded by entries *and* bytes: entry size varies ~100x with image resolution (a 1080p image is
~1200 tokens x hidden x 2 bytes, ~9 MiB at 7B/bf16; a thumbnail a few KiB), so an entry count
alone cannot bound device memory.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["VisionCache", "VisionEntry", "image_key"]


def image_key(data: bytes, media_type: str, settings_tag: str, scope: str = "") -> str:
    """sha256 of the bytes plus everything that changes the ViT output (processor bounds, model)
    and the ``scope`` (tenant) that may share the entry. Every field is length-prefixed, so no
    choice of tenant or tag can make two different field tuples hash the same input."""
    h = hashlib.sha256()
    for part in (settings_tag.encode(), scope.encode(), media_type.encode(), data):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class VisionEntry:
    grid: tuple[int, int, int]  # (t, h, w) patch grid before the 2x2 merge
    embeds: torch.Tensor  # (tokens, hidden) merged vision-tower output, on the model device


def _nbytes(entry: VisionEntry) -> int:
    return entry.embeds.numel() * entry.embeds.element_size()


class VisionCache:
    """LRU bounded by ``capacity`` entries and ``max_bytes`` bytes of embeddings (evicts least
    recently used entries until under both); either at 0 disables it. Safe from any thread."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: OrderedDict[str, VisionEntry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        """Bytes of embeddings held now."""
        with self._lock:
            return self._bytes

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
        size = _nbytes(entry)
        if self.capacity <= 0 or (self.max_bytes is not None and size > self.max_bytes):
            return  # disabled, or an entry that could never fit: do not flush the cache for it
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._data[key] = entry
            self._bytes += size
            while len(self._data) > self.capacity or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, evicted = self._data.popitem(last=False)
                self._bytes -= _nbytes(evicted)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
