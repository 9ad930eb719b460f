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


def test_image_key_separates_scopes_and_fields() -> None:
    from lychee_server.engine.vision_cache import image_key

    base = image_key(b"img", "image/png", "model|a", "tenant-a")
    assert base == image_key(b"img", "image/png", "model|a", "tenant-a")
    assert base != image_key(b"img", "image/png", "model|a", "tenant-b")
    assert base != image_key(b"img", "image/png", "model|a")
    # Length-prefixed fields: moving bytes from one field to the next changes the key.
    assert image_key(b"img", "image/png", "ab", "c") != image_key(b"img", "image/png", "a", "bc")
    assert image_key(b"\0img", "image/png", "t", "") != image_key(b"img", "image/png", "t", "\0")


def _image_pair(engine, tenant: str, image):  # type: ignore[no-untyped-def]
    from lychee_server.domain import DEFAULT_INSTRUCTION, Content

    pq = engine.prepare_query(DEFAULT_INSTRUCTION, Content(text="which photo?"), 3200, tenant)
    pair = engine.prepare_pair(pq, Content(text="a photo", image=image))
    cached = pair.images[0].pixel_values is None  # a hit skips decoding and preprocessing too
    hits = engine.vision_cache.hits
    score = engine.score([pair])[0]
    engine.release(pq)
    return score, cached, engine.vision_cache.hits - hits


def test_cache_is_per_tenant_by_default(tiny_engine, fresh_vision_cache) -> None:  # type: ignore[no-untyped-def]
    """One tenant's images never answer another tenant from the cache (no timing side channel);
    the same tenant still hits, and every path scores the same."""
    from helpers import image_input

    assert tiny_engine.settings.vision_cache_scope == "tenant"
    image = image_input(80, 60, seed=21)
    first, cached_a1, hits_a1 = _image_pair(tiny_engine, "tenant-a", image)
    again, cached_a2, hits_a2 = _image_pair(tiny_engine, "tenant-a", image)
    other, cached_b, hits_b = _image_pair(tiny_engine, "tenant-b", image)
    anon, cached_anon, _ = _image_pair(tiny_engine, "", image)
    assert (cached_a1, hits_a1) == (False, 0)
    assert (cached_a2, hits_a2) == (True, 1)
    assert (cached_b, hits_b) == (False, 0)
    assert not cached_anon
    assert len(tiny_engine.vision_cache) == 3  # one entry per tenant ("tenant-a", "tenant-b", "")
    assert max(abs(s - first) for s in (again, other, anon)) <= 1e-5


def test_global_scope_shares_entries_across_tenants(tiny_engine, fresh_vision_cache) -> None:  # type: ignore[no-untyped-def]
    from helpers import image_input
    from lychee_server.engine.qwen import QwenRerankEngine

    shared = QwenRerankEngine(
        tiny_engine.loaded, tiny_engine.settings.model_copy(update={"vision_cache_scope": "global"})
    )
    try:
        image = image_input(80, 60, seed=22)
        first, cached_a, _ = _image_pair(shared, "tenant-a", image)
        other, cached_b, hits_b = _image_pair(shared, "tenant-b", image)
        assert not cached_a and cached_b and hits_b == 1
        assert abs(first - other) <= 1e-5
    finally:
        shared.close()
