"""The client against a real server (tiny random-weight checkpoint, in-process harness).

The server runs on this test's event loop, so sync-client calls go through ``asyncio.to_thread``
(a blocking call on the loop thread would starve the server it is waiting for).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import pytest
from server_support import noise_image

from lychee.rerank.client import (
    AsyncLycheeClient,
    DeadlineExceededError,
    Doc,
    DocumentInput,
    InvalidRequestError,
    LycheeClient,
    Query,
    QueryInput,
    RerankResult,
)

pytest.importorskip("PIL")

TEXT = "a red square on a white background"
IMG_A = noise_image(40, 30, seed=1)
IMG_B = noise_image(30, 40, seed=2, fmt="JPEG")
IMG_C = noise_image(32, 32, seed=3, fmt="WEBP")

QUERIES: dict[str, QueryInput] = {
    "text": TEXT,
    "image": IMG_A,
    "text_image": Query(text="what does this chart show?", image=IMG_B),
}
DOCUMENTS: list[DocumentInput] = [
    Doc(text="The quarterly report shows revenue growth.", id="t"),
    Doc(image=IMG_C, id="i"),
    Doc(text="A diagram of the network", image=IMG_A, id="ti"),
    "plain string document",
    IMG_B,
]
DOC_IMAGES = 3


def _server_calls(server: Any, method: str) -> float:
    import harness

    text = harness.fetch_metrics(server.metrics_url)
    return harness.metric_value(text, "lychee_requests_total", {"method": method, "code": "OK"}) or 0.0


def _check_ranking(result: RerankResult, n: int, *, streamed: bool) -> None:
    assert result.streamed is streamed
    assert sorted(r.index for r in result.results) == list(range(n))
    scores = [r.score for r in result.results]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert result.usage.pairs == n
    assert result.model
    assert result.timings.total > 0


@pytest.mark.parametrize("transport", ["unary", "stream"])
@pytest.mark.parametrize("query_kind", list(QUERIES))
async def test_every_content_combination_round_trips(server: Any, transport: str, query_kind: str) -> None:
    threshold = 0 if transport == "stream" else None
    async with AsyncLycheeClient(server.address, stream_threshold_bytes=threshold) as client:
        result = await client.rerank(QUERIES[query_kind], DOCUMENTS)
    _check_ranking(result, len(DOCUMENTS), streamed=transport == "stream")
    ids = {r.index: r.id for r in result.results}
    assert ids == {0: "t", 1: "i", 2: "ti", 3: None, 4: None}
    query_images = 0 if query_kind == "text" else 1
    assert result.usage.images == query_images + DOC_IMAGES


@pytest.mark.parametrize("query_kind", list(QUERIES))
async def test_sync_client_both_transports_agree(server: Any, query_kind: str) -> None:
    def run(threshold: int | None) -> RerankResult:
        with LycheeClient(server.address, stream_threshold_bytes=threshold) as client:
            return client.rerank(QUERIES[query_kind], DOCUMENTS, instruction="Find the matching item")

    unary, streamed = await asyncio.gather(asyncio.to_thread(run, None), asyncio.to_thread(run, 0))
    _check_ranking(unary, len(DOCUMENTS), streamed=False)
    _check_ranking(streamed, len(DOCUMENTS), streamed=True)
    by_index = {r.index: r.score for r in streamed.results}
    for r in unary.results:
        assert r.score == pytest.approx(by_index[r.index], abs=1e-5)


async def test_images_and_query_split_across_many_chunks(server: Any) -> None:
    big_query = noise_image(90, 80, seed=11)  # ~21 KiB of PNG: streamed as the first item
    big_doc = noise_image(120, 100, seed=12)  # ~36 KiB
    assert len(big_query) > 5 * 4096 and len(big_doc) > 8 * 4096
    docs: list[DocumentInput] = [Doc(text="x" * 10_000 + "é", image=big_doc), "short text"]
    query = Query(text="find it", image=big_query)
    stream_calls_before = await asyncio.to_thread(_server_calls, server, "RerankStream")
    async with AsyncLycheeClient(server.address, stream_threshold_bytes=0, max_chunk_bytes=4096) as chunked:
        streamed = await chunked.rerank(query, docs, return_text=True)
    # The server, not just the client's flag, saw a RerankStream call.
    assert await asyncio.to_thread(_server_calls, server, "RerankStream") == stream_calls_before + 1
    async with AsyncLycheeClient(server.address) as client:
        unary = await client.rerank(query, docs, return_text=True)
    _check_ranking(streamed, 2, streamed=True)
    assert {r.index: r.text for r in streamed.results} == {0: "x" * 10_000 + "é", 1: "short text"}
    by_index = {r.index: r.score for r in unary.results}
    for r in streamed.results:
        assert r.score == pytest.approx(by_index[r.index], abs=1e-5)


async def test_options_top_n_logit_return_text(server: Any) -> None:
    async with AsyncLycheeClient(server.address) as client:
        probs = await client.rerank(TEXT, DOCUMENTS)
        logits = await client.rerank(TEXT, DOCUMENTS, score_kind="logit", return_text=True)
        top = await client.rerank(TEXT, DOCUMENTS, top_n=2)
    assert [r.index for r in top.results] == [r.index for r in probs.results[:2]]
    # p("yes") is the sigmoid of logit("yes") - logit("no"): both kinds must tell the same story.
    prob_by_index = {r.index: r.score for r in probs.results}
    for r in logits.results:
        assert 1 / (1 + math.exp(-r.score)) == pytest.approx(prob_by_index[r.index], abs=1e-4)
    texts = {r.index: r.text for r in logits.results}
    assert texts[0] == "The quarterly report shows revenue growth."
    assert texts[1] is None  # image-only: image bytes are never echoed


async def test_server_info(server: Any) -> None:
    async with AsyncLycheeClient(server.address) as client:
        assert client.cached_server_info is None
        info = await client.server_info()
        assert client.cached_server_info is info
    assert info.query_modalities == {"text", "image"}
    assert info.limits.max_documents == server.settings.max_documents
    assert info.limits.max_chunk_bytes == server.settings.max_chunk_bytes
    assert info.device == "cpu" and info.server_version
    sync_info = await asyncio.to_thread(lambda: LycheeClient(server.address).server_info())
    assert sync_info == info


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "field"), [("unary", "documents[1].content.text"), ("stream", "documents[1].text")]
)
async def test_malformed_request_maps_to_invalid_request(server: Any, transport: str, field: str) -> None:
    threshold = 0 if transport == "stream" else None
    async with AsyncLycheeClient(server.address, stream_threshold_bytes=threshold) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.rerank("query", ["fine", "   "])
    err = info.value
    assert isinstance(err, ValueError)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (err.reason, err.domain) == ("EMPTY_TEXT", "lychee.rerank.v1")
    assert [v.field for v in err.field_violations] == [field]
    assert err.field_violations[0].reason == "EMPTY_TEXT"
    assert err.request_id
    assert isinstance(err.__cause__, grpc.RpcError)


async def test_several_violations_and_options(server: Any) -> None:
    async with AsyncLycheeClient(server.address) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.rerank("q", ["ok", ""], top_n=0, max_length=10)
    fields = {v.field: v.reason for v in info.value.field_violations}
    assert fields == {
        "documents[1].content.text": "EMPTY_TEXT",
        "options.top_n": "OUT_OF_RANGE",
        "options.max_length": "OUT_OF_RANGE",
    }


async def test_no_documents(server: Any) -> None:
    async with AsyncLycheeClient(server.address) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.rerank("q", [])
    assert info.value.reason == "NO_DOCUMENTS"


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_undecodable_image_names_the_document(server: Any, transport: str) -> None:
    corrupt = IMG_A[:40] + b"\x00" * 200  # a PNG signature, then garbage
    threshold = 0 if transport == "stream" else None
    async with AsyncLycheeClient(server.address, stream_threshold_bytes=threshold) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.rerank("q", ["fine", Doc(text="caption", image=corrupt)])
    err = info.value
    assert err.reason == "IMAGE_DECODE_FAILED"
    assert err.field_violations and all(v.field.startswith("documents[1]") for v in err.field_violations)


async def test_invalid_request_is_not_retried(server: Any, counting_policy: Any) -> None:
    policy = counting_policy(max_attempts=5)
    async with AsyncLycheeClient(server.address, retry=policy) as client:
        with pytest.raises(InvalidRequestError):
            await client.rerank("q", [""])
    assert policy.calls == [(1, None)]


async def test_deadline_exceeded_is_a_timeout(server: Any) -> None:
    async with AsyncLycheeClient(server.address) as client:
        with pytest.raises(TimeoutError) as info:
            await client.rerank(TEXT, DOCUMENTS, timeout=1e-4)
    assert isinstance(info.value, DeadlineExceededError)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED

    def sync_call() -> None:
        with LycheeClient(server.address, timeout=1e-4) as client:
            client.rerank(TEXT, DOCUMENTS)

    with pytest.raises(DeadlineExceededError):
        await asyncio.to_thread(sync_call)
