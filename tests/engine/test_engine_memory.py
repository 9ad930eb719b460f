"""Device memory the engine must not hold on to: a failed (out-of-memory) attempt's tensors, and the
rest of a vision-tower chunk behind one cached image."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch

from helpers import image_input
from lychee_server.domain import DEFAULT_INSTRUCTION, Content
from lychee_server.errors import DeviceOutOfMemory


def test_oom_frees_the_failed_attempt_before_the_caller_retries(tiny_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pq = tiny_engine.prepare_query(DEFAULT_INSTRUCTION, Content(text="q"), 512)
    pairs = [tiny_engine.prepare_pair(pq, Content(text=f"doc {i}")) for i in range(2)]
    held: list[weakref.ref[torch.Tensor]] = []

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        activations = torch.ones(1024)  # stands in for the activations of the failed forward
        held.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny_engine, "_forward_steps", forward)
    try:
        # The scheduler splits and retries while it still holds the error (inside its handler): by
        # then nothing may keep the failed attempt's tensors alive.
        with pytest.raises(DeviceOutOfMemory) as info:
            tiny_engine.score(pairs)
        assert held and held[0]() is None
        assert "out of memory" in str(info.value)
    finally:
        tiny_engine.release(pq)


def test_cached_vision_embeddings_do_not_pin_the_whole_chunk(tiny_engine, fresh_vision_cache) -> None:  # type: ignore[no-untyped-def]
    pq = tiny_engine.prepare_query(DEFAULT_INSTRUCTION, Content(text="q"), 2048)
    docs = [Content(image=image_input(64 + 8 * i, 48, seed=i)) for i in range(3)]
    try:
        pairs = [tiny_engine.prepare_pair(pq, d) for d in docs]
        tiny_engine.score(pairs)  # one ViT call for the three images
    finally:
        tiny_engine.release(pq)
    assert len(tiny_engine.vision_cache) == 3
    for pair in pairs:
        entry = tiny_engine.vision_cache.get(pair.images[0].key)
        assert entry is not None
        emb = entry.embeds
        # What the byte bound counts is what the entry keeps alive.
        assert emb.untyped_storage().nbytes() == emb.numel() * emb.element_size()
