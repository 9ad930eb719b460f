"""LycheeRerank inside a real ContextualCompressionRetriever, against a real server.

The server runs on the test loop, so sync LangChain calls go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
from pathlib import Path
from typing import Any

import grpc
import pytest
from adapter_support import corpus, png
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from server_support import tiny_server

from langchain_lychee import LycheeRerank
from lychee.rerank.client import (
    AsyncLycheeClient,
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    LycheeClient,
    LycheeError,
    RetryPolicy,
    UnavailableError,
)

QUESTION = "How are travel expenses refunded?"


def _pipeline(compressor: LycheeRerank, base: Any) -> ContextualCompressionRetriever:
    return ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)


def _check_annotated(out: list[Document], originals: dict[str | None, Document]) -> None:
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores == sorted(scores, reverse=True)
    for d in out:
        src = originals[d.id]
        assert d is not src and d.metadata is not src.metadata
        assert d.page_content == src.page_content and type(d) is type(src)
        assert {k: v for k, v in d.metadata.items() if k != "relevance_score"} == src.metadata
        assert "relevance_score" not in src.metadata


async def test_sync_and_async_retrieval(
    adapter_server: Any, documents: list[Document], vector_retriever: Any
) -> None:
    pipeline = _pipeline(LycheeRerank(target=adapter_server.address, top_n=3), vector_retriever)
    sync_docs = await asyncio.to_thread(pipeline.invoke, QUESTION)
    async_docs = await pipeline.ainvoke(QUESTION)
    originals = {d.id: d for d in documents}
    for out in (sync_docs, async_docs):
        assert len(out) == 3
        _check_annotated(out, originals)
    assert [d.id for d in sync_docs] == [d.id for d in async_docs]
    for a, b in zip(sync_docs, async_docs, strict=True):
        assert a.metadata["relevance_score"] == pytest.approx(b.metadata["relevance_score"], abs=1e-5)


async def test_text_and_image_documents_are_all_scored(
    adapter_server: Any, documents: list[Document]
) -> None:
    reranker = LycheeRerank(target=adapter_server.address, top_n=None)
    ranked = await reranker.arerank(documents, QUESTION)
    assert sorted(r["index"] for r in ranked) == list(range(len(documents)))
    assert all(0.0 <= r["relevance_score"] <= 1.0 for r in ranked)
    out = await reranker.acompress_documents(documents, QUESTION)
    assert {d.id for d in out} == {d.id for d in documents}
    sync_ranked = await asyncio.to_thread(reranker.rerank, documents, QUESTION)
    by_index = {r["index"]: r["relevance_score"] for r in ranked}
    for r in sync_ranked:
        assert r["relevance_score"] == pytest.approx(by_index[r["index"]], abs=1e-5)


async def test_image_queries(adapter_server: Any, documents: list[Document], vector_retriever: Any) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png(42)).decode()
    pipeline = _pipeline(LycheeRerank(target=adapter_server.address, top_n=2), vector_retriever)
    out = await pipeline.ainvoke(uri)  # the retriever passes the string through; the reranker sees an image
    assert len(out) == 2 and all("relevance_score" in d.metadata for d in out)
    reranker = LycheeRerank(target=adapter_server.address, top_n=2)
    both = await reranker.acompress_documents(documents, "which chart is this?", query_image=png(42))
    assert len(both) == 2
    sync_both = await asyncio.to_thread(
        reranker.compress_documents, documents, "which chart is this?", query_image=png(42)
    )
    assert [d.id for d in sync_both] == [d.id for d in both]


async def test_top_n_threshold_and_order(adapter_server: Any, documents: list[Document]) -> None:
    full = await LycheeRerank(target=adapter_server.address, top_n=None).arerank(documents, QUESTION)
    scores = [r["relevance_score"] for r in full]
    top3 = await LycheeRerank(target=adapter_server.address, top_n=3).arerank(documents, QUESTION)
    assert [r["index"] for r in top3] == [r["index"] for r in full[:3]]
    threshold = (scores[1] + scores[2]) / 2  # keeps exactly the best two
    kept = await LycheeRerank(target=adapter_server.address, top_n=None, score_threshold=threshold).arerank(
        documents, QUESTION
    )
    assert [r["index"] for r in kept] == [r["index"] for r in full[:2]]
    # top_n first, then the threshold: top_n=1 with the same threshold keeps one.
    one = await LycheeRerank(target=adapter_server.address, top_n=1, score_threshold=threshold).arerank(
        documents, QUESTION
    )
    assert [r["index"] for r in one] == [full[0]["index"]]
    none = await LycheeRerank(
        target=adapter_server.address, score_threshold=scores[0] + 1
    ).acompress_documents(documents, QUESTION)
    assert none == []


async def test_identical_documents_tie_in_input_order(adapter_server: Any) -> None:
    docs = [
        Document(id=f"d{i}", page_content=text)
        for i, text in enumerate(
            ["Refund policy for travel.", "Cafeteria hours.", "Refund policy for travel."]
        )
    ]
    out = await LycheeRerank(target=adapter_server.address, top_n=None).acompress_documents(docs, QUESTION)
    by_id = {d.id: d.metadata["relevance_score"] for d in out}
    assert by_id["d0"] == pytest.approx(by_id["d2"], abs=1e-6)
    order = [d.id for d in out]
    if by_id["d0"] == by_id["d2"]:
        assert order.index("d0") < order.index("d2")


async def test_inputs_never_mutated_and_ids_kept(adapter_server: Any, documents: list[Document]) -> None:
    before = copy.deepcopy(documents)
    reranker = LycheeRerank(target=adapter_server.address, top_n=None)
    out = await reranker.acompress_documents(documents, QUESTION)
    out_sync = await asyncio.to_thread(reranker.compress_documents, documents, QUESTION)
    assert documents == before
    assert [d.id for d in out] == [d.id for d in out_sync]
    assert all(d.id is not None for d in out)
    out[0].metadata["extra"] = 1  # results are independent copies
    assert "extra" not in documents[[d.id for d in documents].index(out[0].id)].metadata


async def test_injected_clients_are_used(adapter_server: Any, documents: list[Document]) -> None:
    sync_client = LycheeClient(adapter_server.address, stream_threshold_bytes=0)
    async_client = AsyncLycheeClient(adapter_server.address, stream_threshold_bytes=0)
    reranker = LycheeRerank(target="127.0.0.1:1", client=sync_client, async_client=async_client, top_n=2)
    assert len(await reranker.acompress_documents(documents, QUESTION)) == 2
    assert len(await asyncio.to_thread(reranker.compress_documents, documents, QUESTION)) == 2
    sync_client.close()
    await async_client.close()


async def test_local_image_paths(adapter_server: Any, tmp_path: Path) -> None:
    p = tmp_path / "diagram.png"
    p.write_bytes(png(7))
    docs = [Document(page_content="a diagram", metadata={"image": str(p)}), Document(page_content="text")]
    with pytest.raises(ValueError, match="allow_local_paths"):
        await LycheeRerank(target=adapter_server.address).acompress_documents(docs, QUESTION)
    out = await LycheeRerank(target=adapter_server.address, allow_local_paths=True).acompress_documents(
        docs, QUESTION
    )
    assert len(out) == 2


# -- error mapping --------------------------------------------------------------------------------


async def test_server_invalid_argument_is_value_error(adapter_server: Any, vector_retriever: Any) -> None:
    blank = [Document(page_content="fine"), Document(page_content="   ")]  # only the server judges blanks
    reranker = LycheeRerank(target=adapter_server.address)
    with pytest.raises(ValueError) as info:
        await reranker.acompress_documents(blank, QUESTION)
    assert isinstance(info.value, InvalidRequestError) and info.value.reason == "EMPTY_TEXT"
    assert info.value.field_violations[0].field == "documents[1].content.text"
    assert isinstance(info.value.__cause__, grpc.RpcError)
    with pytest.raises(ValueError):
        await asyncio.to_thread(reranker.compress_documents, blank, QUESTION)
    pipeline = _pipeline(LycheeRerank(target=adapter_server.address, instruction="  "), vector_retriever)
    with pytest.raises(ValueError) as through_chain:
        await pipeline.ainvoke(QUESTION)
    assert isinstance(through_chain.value, InvalidRequestError)


async def test_deadline_is_timeout_error(adapter_server: Any, documents: list[Document]) -> None:
    reranker = LycheeRerank(target=adapter_server.address, timeout=1e-4)
    with pytest.raises(TimeoutError) as info:
        await reranker.acompress_documents(documents, QUESTION)
    assert isinstance(info.value, DeadlineExceededError) and isinstance(info.value.__cause__, grpc.RpcError)
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(reranker.compress_documents, documents, QUESTION)


async def test_unreachable_server_is_unavailable_error(
    documents: list[Document], vector_retriever: Any
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quick = RetryPolicy(max_attempts=2, initial_backoff=0.01)
    reranker = LycheeRerank(
        target=f"127.0.0.1:{port}",
        client=LycheeClient(f"127.0.0.1:{port}", retry=quick),
        async_client=AsyncLycheeClient(f"127.0.0.1:{port}", retry=quick),
    )
    pipeline = _pipeline(reranker, vector_retriever)
    with pytest.raises(UnavailableError) as info:
        await pipeline.ainvoke(QUESTION)
    assert isinstance(info.value, LycheeError) and not isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, grpc.RpcError)
    with pytest.raises(UnavailableError):
        await asyncio.to_thread(pipeline.invoke, QUESTION)


async def test_authentication_error(request: pytest.FixtureRequest, documents: list[Document]) -> None:
    async with tiny_server(request, api_keys=("k3y",)) as srv:
        with pytest.raises(AuthenticationError) as info:
            await LycheeRerank(target=srv.address, api_key=None).acompress_documents(documents, QUESTION)
        assert isinstance(info.value.__cause__, grpc.RpcError)
        ok = LycheeRerank(target=srv.address, api_key="k3y")  # type: ignore[arg-type]
        assert len(await ok.acompress_documents(corpus(), QUESTION)) == 3
