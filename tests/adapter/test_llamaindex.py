"""``llamaindex_lychee.LycheeRerank`` inside a real LlamaIndex query engine, against a real server.

The pipeline is LlamaIndex's own: ``VectorStoreIndex`` (``MockEmbedding``) -> its retriever ->
our postprocessor -> the response synthesizer with ``MockLLM`` (which echoes the prompt, so the
answer shows the context the reranker chose). Expected scores come from the project's client
called directly with the same inputs. The server runs on the test loop, so sync calls go
through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("llama_index.core")

from adapter_support import png
from llama_index.core import VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import (
    ImageDocument,
    ImageNode,
    MediaResource,
    MetadataMode,
    Node,
    NodeWithScore,
    QueryBundle,
    TextNode,
)

from llamaindex_lychee import LycheeRerank
from lychee.rerank.client import (
    AsyncLycheeClient,
    DeadlineExceededError,
    Doc,
    EncodedImage,
    InvalidRequestError,
    LycheeClient,
    Query,
    RetryPolicy,
    UnavailableError,
)

QUESTION = "How are travel expenses refunded?"
B64 = base64.b64encode(png(3)).decode()


def uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def nodes() -> list[TextNode]:
    """Text nodes plus image nodes in each form the postprocessor reads."""
    return [
        TextNode(id_="t1", text="Travel expenses are refunded within 30 days.", metadata={"src": "hr"}),
        TextNode(id_="t2", text="Passwords must be rotated every 90 days.", metadata={"src": "it"}),
        TextNode(id_="t3", text="The cafeteria opens at 8 am."),
        TextNode(id_="t4", text="Expense reports need a manager's approval."),
        ImageNode(
            id_="i1", text="Chart of travel expenses by quarter", image=base64.b64encode(png(1)).decode()
        ),
        ImageNode(id_="i2", text="", image_url=f"data:image/png;base64,{B64}"),
        ImageNode(
            id_="i3",
            text="Screenshot of the expense tool",
            image=base64.b64encode(png(4)).decode(),
            image_mimetype="image/png",
        ),
        TextNode(id_="i4", text="Scanned receipt", metadata={"image": uri(png(5))}),
    ]


# What the client is sent for each node, written out by hand: (text, image bytes).
EXPECTED_INPUTS: dict[str, Doc] = {
    "t1": Doc(text="Travel expenses are refunded within 30 days."),
    "t2": Doc(text="Passwords must be rotated every 90 days."),
    "t3": Doc(text="The cafeteria opens at 8 am."),
    "t4": Doc(text="Expense reports need a manager's approval."),
    "i1": Doc(text="Chart of travel expenses by quarter", image=png(1)),
    "i2": Doc(image=png(3)),
    "i3": Doc(text="Screenshot of the expense tool", image=png(4)),
    "i4": Doc(text="Scanned receipt", image=png(5)),
}


async def client_scores(address: str, query: Any, instruction: str | None = None) -> dict[str, float]:
    ids = list(EXPECTED_INPUTS)
    async with AsyncLycheeClient(address) as client:
        result = await client.rerank(query, [EXPECTED_INPUTS[i] for i in ids], instruction=instruction)
    return {ids[r.index]: r.score for r in result.results}


def _index() -> VectorStoreIndex:
    return VectorStoreIndex(nodes(), embed_model=MockEmbedding(embed_dim=16))


def _check_against_client(
    out: list[NodeWithScore], expected: dict[str, float], top_n: int, among: set[str] | None = None
) -> None:
    """``out`` is the best ``top_n`` of ``among`` (default: every node) by the client's scores."""
    if among is not None:
        expected = {i: s for i, s in expected.items() if i in among}
    assert len(out) == top_n
    scores = [n.score for n in out]
    assert all(s is not None for s in scores)
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    best = sorted(expected, key=lambda i: -expected[i])[:top_n]
    assert {n.node.node_id for n in out} == set(best)
    for n in out:
        assert n.score == pytest.approx(expected[n.node.node_id], abs=1e-5)


async def test_query_engine_sync_and_async(adapter_server: Any) -> None:
    reranker = LycheeRerank(target=adapter_server.address, top_n=3)
    debug = LlamaDebugHandler()
    engine = RetrieverQueryEngine.from_args(
        _index().as_retriever(similarity_top_k=len(EXPECTED_INPUTS)),
        llm=MockLLM(),
        node_postprocessors=[reranker],
        callback_manager=CallbackManager([debug]),
    )
    expected = await client_scores(adapter_server.address, QUESTION)
    sync_response = await asyncio.to_thread(engine.query, QUESTION)
    async_response = await engine.aquery(QUESTION)
    # VectorStoreIndex skips nodes without text (i2 is image-only): the rest reach the reranker.
    indexed = set(EXPECTED_INPUTS) - {"i2"}
    for response in (sync_response, async_response):
        _check_against_client(response.source_nodes, expected, 3, among=indexed)
        # MockLLM echoes its prompt: the context is the reranked nodes, best first.
        answer = str(response)
        texts = [n.node.get_content() for n in response.source_nodes if n.node.get_content()]
        positions = [answer.index(t) for t in texts]
        assert positions == sorted(positions)
    assert [n.node.node_id for n in sync_response.source_nodes] == [
        n.node.node_id for n in async_response.source_nodes
    ]
    # Both calls reported a RERANKING event to LlamaIndex's callbacks, with the kept nodes.
    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 2
    for _, end in pairs:
        assert end.payload is not None and len(end.payload[EventPayload.NODES]) == 3


async def test_retriever_then_postprocessor_keeps_inputs(adapter_server: Any) -> None:
    retrieved = await _index().as_retriever(similarity_top_k=len(EXPECTED_INPUTS)).aretrieve(QUESTION)
    indexed = {n.node.node_id for n in retrieved}
    assert indexed == set(EXPECTED_INPUTS) - {"i2"}  # the image-only node has no text to index
    before = copy.deepcopy(retrieved)
    reranker = LycheeRerank(target=adapter_server.address, top_n=None, keep_retrieval_score=True)
    out = await reranker.apostprocess_nodes(retrieved, query_str=QUESTION)
    out_sync = await asyncio.to_thread(reranker.postprocess_nodes, retrieved, query_str=QUESTION)
    assert retrieved == before  # neither the list, the NodeWithScore objects nor the nodes changed
    expected = await client_scores(adapter_server.address, QUESTION)
    _check_against_client(out, expected, len(indexed), among=indexed)
    assert [n.node.node_id for n in out] == [n.node.node_id for n in out_sync]
    first_stage = {n.node.node_id: n.score for n in retrieved}
    for n in out:
        assert n.node.metadata["retrieval_score"] == first_stage[n.node.node_id]
        assert all(n is not r and n.node is not r.node for r in retrieved)
    assert all("retrieval_score" not in r.node.metadata for r in retrieved)


async def test_top_n_threshold_and_instruction(adapter_server: Any) -> None:
    retrieved = [NodeWithScore(node=n, score=0.5) for n in nodes()]
    full = await LycheeRerank(target=adapter_server.address, top_n=None).apostprocess_nodes(
        retrieved, query_str=QUESTION
    )
    scores = [n.get_score() for n in full]
    threshold = (scores[1] + scores[2]) / 2
    kept = await LycheeRerank(
        target=adapter_server.address, top_n=None, score_threshold=threshold
    ).apostprocess_nodes(retrieved, query_str=QUESTION)
    assert [n.node.node_id for n in kept] == [n.node.node_id for n in full[:2]]
    one = await LycheeRerank(
        target=adapter_server.address, top_n=1, score_threshold=threshold
    ).apostprocess_nodes(retrieved, query_str=QUESTION)
    assert [n.node.node_id for n in one] == [full[0].node.node_id]
    assert await LycheeRerank(target=adapter_server.address).apostprocess_nodes([], query_str=QUESTION) == []

    instruction = "Given an employee question, retrieve the policy that answers it"
    with_instruction = await LycheeRerank(
        target=adapter_server.address, top_n=None, instruction=instruction
    ).apostprocess_nodes(retrieved, query_str=QUESTION)
    expected = await client_scores(adapter_server.address, QUESTION, instruction)
    _check_against_client(with_instruction, expected, len(EXPECTED_INPUTS))
    default = await client_scores(adapter_server.address, QUESTION)
    assert any(abs(expected[i] - default[i]) > 1e-6 for i in expected)  # the instruction reached the model


async def test_image_queries(adapter_server: Any, tmp_path: Path) -> None:
    retrieved = [NodeWithScore(node=n) for n in nodes()]
    path = tmp_path / "query.png"
    path.write_bytes(png(42))
    bundle = QueryBundle(query_str="which chart is this?", image_path=str(path))
    with pytest.raises(ValueError, match="allow_local_paths"):
        await LycheeRerank(target=adapter_server.address).apostprocess_nodes(retrieved, bundle)
    reranker = LycheeRerank(target=adapter_server.address, top_n=2, allow_local_paths=True)
    out = await reranker.apostprocess_nodes(retrieved, bundle)
    _check_against_client(
        out, await client_scores(adapter_server.address, Query(text="which chart is this?", image=png(42))), 2
    )
    image_only = await LycheeRerank(target=adapter_server.address, top_n=2).apostprocess_nodes(
        retrieved, query_str=uri(png(42))
    )
    _check_against_client(image_only, await client_scores(adapter_server.address, png(42)), 2)


async def test_metadata_mode_puts_metadata_in_the_text(adapter_server: Any) -> None:
    node = TextNode(id_="m", text="Refunds take 30 days.", metadata={"src": "hr", "image": png(5)})
    reranker = LycheeRerank(target=adapter_server.address, metadata_mode=MetadataMode.EMBED)
    doc = reranker._to_doc(NodeWithScore(node=node), 0)
    assert doc.text == "src: hr\n\nRefunds take 30 days." and doc.image == png(5)  # image key left out
    out = await reranker.apostprocess_nodes([NodeWithScore(node=node)], query_str=QUESTION)
    async with AsyncLycheeClient(adapter_server.address) as client:
        direct = await client.rerank(QUESTION, [Doc(text="src: hr\n\nRefunds take 30 days.", image=png(5))])
    assert out[0].score == pytest.approx(direct.results[0].score, abs=1e-5)


# -- errors ---------------------------------------------------------------------------------------


async def test_server_rejection_is_value_error_through_the_engine(adapter_server: Any) -> None:
    engine = _index().as_query_engine(
        llm=MockLLM(),
        similarity_top_k=3,
        node_postprocessors=[LycheeRerank(target=adapter_server.address, instruction="   ")],
    )
    with pytest.raises(ValueError) as info:
        await engine.aquery(QUESTION)
    assert isinstance(info.value, InvalidRequestError)
    assert isinstance(info.value.__cause__, grpc.RpcError)
    with pytest.raises(InvalidRequestError):
        await asyncio.to_thread(engine.query, QUESTION)


async def test_deadline_and_unreachable(adapter_server: Any) -> None:
    retrieved = [NodeWithScore(node=n) for n in nodes()]
    slow = LycheeRerank(target=adapter_server.address, timeout=1e-4)
    with pytest.raises(TimeoutError) as info:
        await slow.apostprocess_nodes(retrieved, query_str=QUESTION)
    assert isinstance(info.value, DeadlineExceededError) and isinstance(info.value.__cause__, grpc.RpcError)

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quick = RetryPolicy(max_attempts=2, initial_backoff=0.01)
    down = LycheeRerank(
        target=f"127.0.0.1:{port}",
        client=LycheeClient(f"127.0.0.1:{port}", retry=quick),
        async_client=AsyncLycheeClient(f"127.0.0.1:{port}", retry=quick),
    )
    with pytest.raises(UnavailableError) as unavailable:
        await down.apostprocess_nodes(retrieved, query_str=QUESTION)
    assert isinstance(unavailable.value.__cause__, grpc.RpcError)
    with pytest.raises(UnavailableError):
        await asyncio.to_thread(down.postprocess_nodes, retrieved, query_str=QUESTION)


# -- no server needed -----------------------------------------------------------------------------


def _bytes(image: object) -> object:
    return image.data if isinstance(image, EncodedImage) else image


def test_image_forms_and_refusals(tmp_path: Path) -> None:
    r = LycheeRerank()
    docs = [r._to_doc(NodeWithScore(node=n), i) for i, n in enumerate(nodes())]
    assert [(d.text, _bytes(d.image)) for d in docs] == [(e.text, e.image) for e in EXPECTED_INPUTS.values()]
    assert docs[6].image == EncodedImage(png(4), "image/png")  # a declared media type is kept
    multimodal = Node(text_resource=MediaResource(text="cap"), image_resource=MediaResource(data=png(7)))
    assert _bytes(r._to_doc(NodeWithScore(node=multimodal), 0).image) == png(7)
    assert r._to_doc(NodeWithScore(node=TextNode(text="", metadata={"image": png(6)})), 0) == Doc(
        image=png(6)
    )
    path = tmp_path / "p.png"
    path.write_bytes(png(6))
    for node in (
        ImageNode(text="x", image_path=str(path)),
        ImageDocument(text="x", image_path=str(path)),  # what SimpleDirectoryReader makes of an image
        TextNode(text="x", metadata={"image": str(path)}),
    ):
        with pytest.raises(ValueError, match="allow_local_paths"):
            r._to_doc(NodeWithScore(node=node), 0)
        assert LycheeRerank(allow_local_paths=True)._to_doc(NodeWithScore(node=node), 0).image == path
    bad = [
        (ImageNode(text="x", image_url="https://example.com/cat.png"), ValueError, "not fetched"),
        (TextNode(text="x", metadata={"image": "data:image/png;base64,@@"}), ValueError, "invalid base64"),
        (TextNode(text="x", metadata={"image": 42}), TypeError, "unsupported image value"),
        (TextNode(text=""), ValueError, "neither text nor an image"),
    ]
    for node, kind, match in bad:
        with pytest.raises(kind, match=match):
            r._to_doc(NodeWithScore(node=node), 0)
    with pytest.raises(ValueError, match="needs a query"):
        r.postprocess_nodes([NodeWithScore(node=nodes()[0])])


def test_configuration_and_serialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LYCHEE_API_KEY", "from-env")
    r = LycheeRerank(target="rerank:50051", top_n=5, instruction="find it")
    assert r.api_key is not None and r.api_key.get_secret_value() == "from-env"
    data = r.to_dict()
    assert data["class_name"] == "LycheeRerank" and "api_key" not in data and "from-env" not in r.to_json()
    again = LycheeRerank.from_dict(data)
    assert (again.target, again.top_n, again.instruction) == ("rerank:50051", 5, "find it")
    from pydantic import ValidationError

    for bad in ({"top_n": 0}, {"timeout": 0}):
        with pytest.raises(ValidationError):
            LycheeRerank(**bad)  # type: ignore[arg-type]


def test_import_keeps_server_and_torch_out() -> None:
    code = (
        "import sys, llamaindex_lychee\n"
        "bad = [m for m in ('torch', 'lychee_server') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
