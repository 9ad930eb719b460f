"""``rerank(..., on_progress=...)``: the client follows the server's progress stream (sync and async)
against a real in-process server on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from lychee.rerank.client import AsyncLycheeClient, LycheeClient, Progress

DOCS = [f"passage {i} on subject {i % 4}" for i in range(10)]


def check(seen: list[Progress], n: int) -> None:
    assert seen and all(isinstance(p, Progress) and p.pairs_total == n for p in seen)
    for a, b in itertools.pairwise(seen):
        assert b.pairs_scored >= a.pairs_scored and b.pairs_prepared >= a.pairs_prepared
    assert seen[-1].phase == "done" and seen[-1].pairs_scored == n


async def test_sync_progress_then_the_same_ranking(server: Any) -> None:
    seen: list[Progress] = []

    def calls() -> tuple[Any, Any]:  # a blocking client: off the loop that serves it
        with LycheeClient(server.address) as client:
            return client.rerank("subject 2", DOCS, on_progress=seen.append), client.rerank("subject 2", DOCS)

    with_progress, plain = await asyncio.to_thread(calls)
    check(seen, len(DOCS))
    assert [r.index for r in with_progress.results] == [r.index for r in plain.results]
    expected = [r.score for r in plain.results]
    assert [r.score for r in with_progress.results] == pytest.approx(expected, abs=1e-6)
    assert not with_progress.streamed


async def test_async_progress(server: Any) -> None:
    seen: list[Progress] = []
    async with AsyncLycheeClient(server.address) as client:
        result = await client.rerank("subject 1", DOCS, top_n=3, on_progress=seen.append)
    check(seen, len(DOCS))
    assert len(result.results) == 3
