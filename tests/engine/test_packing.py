"""Pairs of different requests (different prefixes) packed into one forward equal the reference."""

from __future__ import annotations

from typing import Any

import pytest
from reference import reference_logit

from helpers import image_input
from lychee_server.domain import DEFAULT_INSTRUCTION, Content
from lychee_server.engine import qwen
from lychee_server.engine.qwen import QwenRerankEngine

TOL = 1e-5


def test_small_requests_share_one_packed_batch(
    tiny_engine: QwenRerankEngine, monkeypatch: pytest.MonkeyPatch, ref_model: Any, ref_processor: Any
) -> None:
    queries = [
        Content(text="short"),
        Content(text="a much longer query about rivers, mountains and the capital of France " * 3),
        Content(image=image_input(64, 90, seed=11)),
        Content(text="picture and words", image=image_input(120, 40, seed=12, fmt="JPEG")),
    ]
    docs = [Content(text="Paris is the capital of France."), Content(image=image_input(50, 50, seed=13))]
    pqs = [tiny_engine.prepare_query(DEFAULT_INSTRUCTION, q, 3200) for q in queries]
    pairs = [tiny_engine.prepare_pair(pq, d) for d in docs for pq in pqs]
    built: list[Any] = []
    original = QwenRerankEngine._batch_prefix

    def spy(self: QwenRerankEngine, row_queries: list[Any], vis: Any = None) -> Any:
        out = original(self, row_queries, vis)
        built.append(out)
        return out

    monkeypatch.setattr(QwenRerankEngine, "_batch_prefix", spy)
    got = tiny_engine.score(pairs)
    assert len(built) == 1 and isinstance(built[0], qwen._PackedPrefix)
    assert len({int(n) for n in built[0].lengths}) == len(queries)  # four different prefix lengths
    for pair, g in zip(pairs, got, strict=True):
        q = queries[pqs.index(pair.query)]
        doc = docs[0] if pair.num_images == 0 else docs[1]
        want, _ = reference_logit(ref_model, ref_processor, DEFAULT_INSTRUCTION, q, doc, 3200)
        assert abs(g - want) <= TOL, (q.text, doc.text, g, want)
    for pq in pqs:
        tiny_engine.release(pq)


def test_live_prefix_bytes_follow_prepare_score_and_release(tiny_engine: QwenRerankEngine) -> None:
    """What admission reads (issue 12): the device bytes of prefix K/V not yet released."""
    before = tiny_engine.live_prefix_bytes
    pqs = [tiny_engine.prepare_query(DEFAULT_INSTRUCTION, Content(text=t), 3200) for t in ("a", "bb bb")]
    assert tiny_engine.live_prefix_bytes == before  # preparing runs nothing on the device
    tiny_engine.score([tiny_engine.prepare_pair(pq, Content(text="doc")) for pq in pqs])
    held = [pq.state for pq in pqs]
    assert all(st is not None for st in held)
    want = sum(t.numel() * t.element_size() for st in held for t in (*st.keys, *st.values))  # type: ignore[union-attr]
    assert tiny_engine.live_prefix_bytes - before == want > 0
    for pq in pqs:
        tiny_engine.release(pq)
    assert tiny_engine.live_prefix_bytes == before
