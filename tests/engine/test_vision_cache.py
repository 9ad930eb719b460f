"""The vision cache is an LRU bounded by entry count and by bytes at the same time."""

from __future__ import annotations

import threading

import torch

from lychee_server.engine.vision_cache import VisionCache, VisionEntry


def _entry(tokens: int, hidden: int = 16, dtype: torch.dtype = torch.float32) -> VisionEntry:
    return VisionEntry((1, 2, 2 * tokens), torch.zeros(tokens, hidden, dtype=dtype))


def test_bounded_by_bytes_evicts_lru_first() -> None:
    kib = 1024
    cache = VisionCache(capacity=100, max_bytes=10 * kib)
    for i in range(5):
        cache.put(f"k{i}", _entry(32))  # 32 x 16 x 4 B = 2 KiB each
    assert len(cache) == 5 and cache.nbytes == 10 * kib
    assert cache.get("k0") is not None  # k0 becomes most recently used
    cache.put("big", _entry(64))  # 4 KiB: k1 and k2 (least recent) must go
    assert cache.get("k1") is None and cache.get("k2") is None
    assert cache.get("k0") is not None and cache.get("big") is not None
    assert cache.nbytes == 10 * kib and cache.evictions == 2


def test_bounded_by_entries_and_bytes_together() -> None:
    cache = VisionCache(capacity=3, max_bytes=1 << 30)
    for i in range(5):
        cache.put(f"k{i}", _entry(4))
    assert len(cache) == 3 and cache.get("k1") is None and cache.get("k4") is not None
    assert cache.nbytes == 3 * 4 * 16 * 4


def test_oversized_entry_is_not_cached_and_flushes_nothing() -> None:
    cache = VisionCache(capacity=10, max_bytes=4096)
    cache.put("small", _entry(8))
    cache.put("huge", _entry(1000))
    assert cache.get("huge") is None and cache.get("small") is not None


def test_replacing_a_key_keeps_the_byte_count_right() -> None:
    cache = VisionCache(capacity=10, max_bytes=1 << 20)
    cache.put("k", _entry(8))
    cache.put("k", _entry(16, dtype=torch.bfloat16))
    assert len(cache) == 1 and cache.nbytes == 16 * 16 * 2
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_disabled_by_zero_entries_or_zero_bytes() -> None:
    for cache in (VisionCache(0, 1 << 20), VisionCache(10, 0)):
        cache.put("k", _entry(1))
        assert len(cache) == 0


def test_thread_safe_under_concurrent_puts() -> None:
    cache = VisionCache(capacity=50, max_bytes=40 * 2048)

    def work(t: int) -> None:
        for i in range(200):
            cache.put(f"{t}-{i}", _entry(32))
            cache.get(f"{t}-{i - 1}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(cache) <= 40 and cache.nbytes == len(cache) * 2048


def test_engine_cache_uses_settings_bytes(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    assert tiny_engine.vision_cache.max_bytes == tiny_engine.settings.vision_cache_mib * 2**20
    assert tiny_engine.vision_cache.capacity == tiny_engine.settings.vision_cache_entries
