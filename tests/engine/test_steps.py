"""``score_steps`` (issue 14): the engine's scoring as a generator that pauses between bounded pieces
of device work, so the scheduler can run a small text batch in the middle of an image batch."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from lychee_server.domain import Content, ImageInput, MediaType
from lychee_server.engine import vision
from lychee_server.engine.interface import SteppedEngine
from lychee_server.engine.qwen import QwenRerankEngine


def _png(w: int, h: int) -> ImageInput:
    rng = np.random.default_rng(w + h)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return ImageInput(buf.getvalue(), MediaType.PNG)


def _pairs(engine: QwenRerankEngine) -> list[Any]:
    pq = engine.prepare_query("Find the picture", Content(text="a red square"), 8192)
    docs = [Content(image=_png(900, 700)), Content(text="a passage"), Content(text="x", image=_png(64, 64))]
    return [engine.prepare_pair(pq, d) for d in docs]


def test_steps_pause_often_and_give_the_scores_of_score(tiny_engine: QwenRerankEngine) -> None:
    assert isinstance(tiny_engine, SteppedEngine)
    pairs = _pairs(tiny_engine)
    tiny_engine.vision_cache.clear()
    want = tiny_engine.score(pairs)
    tiny_engine.vision_cache.clear()
    steps = tiny_engine.score_steps(pairs)
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            got = stop.value
            break
        pauses += 1
    # Vision blocks (attention, MLP), full-attention query chunks, decoder half-layers, prefixes.
    assert pauses >= 2 * len(tiny_engine.lm.layers) + 2 * len(tiny_engine.visual.blocks)
    assert got == want


def test_full_attention_query_chunks_are_exact(tiny_engine: QwenRerankEngine, monkeypatch: Any) -> None:
    """Queries attend independently: the chunked full attention equals one call (FP32, 1e-6)."""
    pv, grid = tiny_engine._fast_pre(Image.open(io.BytesIO(_png(500, 400).data)).convert("RGB"))
    with torch.inference_mode():
        whole = tiny_engine.tower([pv], [grid])
        monkeypatch.setattr(vision, "_FULL_ATTENTION_PAIRS", 64 * 64)
        steps = tiny_engine.tower.steps([pv], [grid])
        pauses = 0
        while True:
            try:
                next(steps)
                pauses += 1
            except StopIteration as stop:
                chunked = stop.value
                break
    n = grid[0] * grid[1] * grid[2]
    assert pauses > n // 64  # one pause per chunk of 64 query rows at this budget
    assert (chunked - whole).abs().max().item() <= 1e-6 * max(1.0, whole.abs().max().item())


def test_cuda_pauses_keep_at_most_run_ahead_steps_queued() -> None:
    """On CUDA the host waits at each pause until at most ``run_ahead`` steps are still queued
    (kernel launches are asynchronous: unpaced, every pause would come before the device got there)."""
    from lychee_server.engine.qwen import paced

    log: list[str] = []

    class Event:
        def __init__(self) -> None:
            self.n = sum(1 for e in log if e.startswith("record"))

        def record(self) -> None:
            log.append(f"record {self.n}")

        def synchronize(self) -> None:
            log.append(f"wait {self.n}")

    def steps() -> Any:
        for i in range(4):
            log.append(f"step {i}")
            yield
        return "done"

    gen = paced(steps(), 2, Event)
    pauses = 0
    while True:
        try:
            next(gen)
            pauses += 1
        except StopIteration as stop:
            assert stop.value == "done"
            break
    assert pauses == 4
    assert log == [
        "step 0", "record 0",
        "step 1", "record 1",
        "step 2", "record 2", "wait 0",  # three queued: the host waits for the oldest
        "step 3", "record 3", "wait 1",
    ]  # fmt: skip
