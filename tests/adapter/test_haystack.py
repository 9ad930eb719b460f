"""``haystack_lychee.LycheeRanker`` inside a real Haystack pipeline, against a real server.

The pipeline is Haystack's own: ``InMemoryDocumentStore`` -> ``InMemoryBM25Retriever`` -> our
ranker, run sync and async, serialised to YAML and loaded back. Expected scores come from the
project's client called directly with the same inputs. The server runs on the test loop, so
sync calls go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # no network: keep posthog quiet
pytest.importorskip("haystack")

from adapter_support import png
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.core.errors import DeserializationError, PipelineRuntimeError
from haystack.dataclasses import ByteStream, ImageContent
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import Secret

from haystack_lychee import LycheeRanker
from lychee.rerank.client import (
    AsyncLycheeClient,
    AuthenticationError,
    DeadlineExceededError,
    Doc,
    EncodedImage,
    InvalidRequestError,
    Query,
)

QUESTION = "How are travel expenses refunded?"


def uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def documents() -> list[Document]:
    """Every document shares a word with QUESTION, so BM25 returns them all to the ranker."""
    return [
        Document(id="t1", content="Travel expenses are refunded within 30 days.", meta={"src": "hr"}),
        Document(id="t2", content="Passwords must be rotated every 90 days, even while you travel."),
        Document(id="t3", content="The cafeteria is closed during the travel fair."),
        Document(
            id="t4", content="Expense reports for travel need a manager's approval.", meta={"src": "fin"}
        ),
        Document(
            id="i1",
            content="Chart of travel expenses by quarter",
            blob=ByteStream(png(1), mime_type="image/png"),
        ),
        Document(id="i2", content="Screenshot of the travel expense tool", meta={"image": uri(png(3))}),
        Document(id="i3", content="Photo of a travel receipt", meta={"file_path": "receipt.png"}),
        Document(id="i4", content="Scan of travel tickets", blob=ByteStream(png(4))),  # type sniffed
    ]


# What the client is sent for each document, written out by hand.
EXPECTED_INPUTS: dict[str, Doc] = {
    "t1": Doc(text="Travel expenses are refunded within 30 days."),
    "t2": Doc(text="Passwords must be rotated every 90 days, even while you travel."),
    "t3": Doc(text="The cafeteria is closed during the travel fair."),
    "t4": Doc(text="Expense reports for travel need a manager's approval."),
    "i1": Doc(text="Chart of travel expenses by quarter", image=png(1)),
    "i2": Doc(text="Screenshot of the travel expense tool", image=png(3)),
    "i3": Doc(text="Photo of a travel receipt", image=png(5)),
    "i4": Doc(text="Scan of travel tickets", image=png(4)),
}


@pytest.fixture
def image_root(tmp_path: Path) -> str:
    (tmp_path / "receipt.png").write_bytes(png(5))
    return str(tmp_path)


async def client_scores(address: str, query: Any = QUESTION, **kwargs: Any) -> dict[str, float]:
    ids = list(EXPECTED_INPUTS)
    async with AsyncLycheeClient(address) as client:
        result = await client.rerank(query, [EXPECTED_INPUTS[i] for i in ids], **kwargs)
    return {ids[r.index]: r.score for r in result.results}


def _check(out: list[Document], expected: dict[str, float], top_k: int) -> None:
    assert len(out) == top_k
    scores = [d.score for d in out]
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert {d.id for d in out} == set(sorted(expected, key=lambda i: -expected[i])[:top_k])
    for d in out:
        assert d.score == pytest.approx(expected[d.id], abs=1e-5)


def _pipeline(ranker: LycheeRanker) -> Pipeline:
    store = InMemoryDocumentStore()
    store.write_documents(documents())
    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(store, top_k=len(EXPECTED_INPUTS)))
    pipeline.add_component("ranker", ranker)
    pipeline.connect("retriever.documents", "ranker.documents")
    return pipeline


def _inputs(query: str = QUESTION) -> dict[str, Any]:
    return {"retriever": {"query": query}, "ranker": {"query": query}}


async def test_pipeline_sync_async_and_yaml_round_trip(adapter_server: Any, image_root: str) -> None:
    pipeline = _pipeline(LycheeRanker(target=adapter_server.address, top_k=3, root_path=image_root))
    expected = await client_scores(adapter_server.address)
    sync_out = (await asyncio.to_thread(pipeline.run, _inputs()))["ranker"]["documents"]
    async_out = (await pipeline.run_async(_inputs()))["ranker"]["documents"]
    _check(sync_out, expected, 3)
    _check(async_out, expected, 3)
    assert [d.id for d in sync_out] == [d.id for d in async_out]
    assert pipeline.get_component("ranker").server_info.random_weights  # warm_up ran

    yaml = pipeline.dumps()
    assert "haystack_lychee.ranker.LycheeRanker" in yaml and "LYCHEE_API_KEY" in yaml
    with pytest.raises(DeserializationError):  # Haystack only loads classes it was told to trust
        Pipeline.loads(yaml)
    loaded = Pipeline.loads(yaml, allowed_modules=["haystack_lychee"])
    ranker = loaded.get_component("ranker")
    assert isinstance(ranker, LycheeRanker) and ranker is not pipeline.get_component("ranker")
    assert ranker.to_dict() == pipeline.get_component("ranker").to_dict()
    again = (await asyncio.to_thread(loaded.run, _inputs()))["ranker"]["documents"]
    _check(again, expected, 3)
    await loaded.close_async()
    await pipeline.close_async()


async def test_run_keeps_inputs_and_metadata(adapter_server: Any, image_root: str) -> None:
    docs = documents()
    before = copy.deepcopy(docs)
    ranker = LycheeRanker(target=adapter_server.address, top_k=None, root_path=image_root)
    out = (await ranker.run_async(query=QUESTION, documents=docs))["documents"]
    out_sync = (await asyncio.to_thread(ranker.run, query=QUESTION, documents=docs))["documents"]
    assert docs == before and all(d.score is None for d in docs)
    _check(out, await client_scores(adapter_server.address), len(EXPECTED_INPUTS))
    assert [d.id for d in out] == [d.id for d in out_sync]
    originals = {d.id: d for d in docs}
    for d in out:
        src = originals[d.id]
        assert d is not src and d.meta == src.meta and d.meta is not src.meta
        assert (d.content, d.blob) == (src.content, src.blob)
    assert (await ranker.run_async(query=QUESTION, documents=[]))["documents"] == []
    ranker.close()
    await ranker.close_async()


async def test_top_k_threshold_and_instruction(adapter_server: Any, image_root: str) -> None:
    ranker = LycheeRanker(target=adapter_server.address, top_k=None, root_path=image_root)
    full = (await ranker.run_async(query=QUESTION, documents=documents()))["documents"]
    scores = [d.score or 0.0 for d in full]
    threshold = (scores[1] + scores[2]) / 2
    kept = (await ranker.run_async(query=QUESTION, documents=documents(), score_threshold=threshold))[
        "documents"
    ]
    assert [d.id for d in kept] == [d.id for d in full[:2]]
    one = (await ranker.run_async(query=QUESTION, documents=documents(), top_k=1, score_threshold=threshold))[
        "documents"
    ]
    assert [d.id for d in one] == [full[0].id]
    with pytest.raises(ValueError, match="top_k"):
        await ranker.run_async(query=QUESTION, documents=documents(), top_k=0)

    instruction = "Given an employee question, retrieve the policy that answers it"
    instructed = LycheeRanker(
        target=adapter_server.address, top_k=None, root_path=image_root, instruction=instruction
    )
    out = (await instructed.run_async(query=QUESTION, documents=documents()))["documents"]
    expected = await client_scores(adapter_server.address, instruction=instruction)
    _check(out, expected, len(EXPECTED_INPUTS))
    assert any(abs(expected[i] - (d.score or 0.0)) > 1e-6 for i, d in zip(expected, full, strict=True))


async def test_image_only_documents_and_image_queries(adapter_server: Any, image_root: str) -> None:
    docs = [
        Document(id="a", blob=ByteStream(png(1), mime_type="image/png")),
        Document(id="b", meta={"file_path": "receipt.png"}),  # what ImageFileToDocument produces
        Document(id="c", content="Travel expenses are refunded within 30 days."),
    ]
    ranker = LycheeRanker(target=adapter_server.address, top_k=None, root_path=image_root)
    image_query = ImageContent(base64_image=base64.b64encode(png(42)).decode(), mime_type="image/png")
    out = (await ranker.run_async(query="which receipt?", documents=docs, query_image=image_query))[
        "documents"
    ]
    async with AsyncLycheeClient(adapter_server.address) as client:
        direct = await client.rerank(
            Query(text="which receipt?", image=png(42)),
            [Doc(image=png(1)), Doc(image=png(5)), Doc(text="Travel expenses are refunded within 30 days.")],
        )
        image_only = await client.rerank(png(42), [Doc(image=png(1)), Doc(image=png(5))])
    by_id = {"abc"[r.index]: r.score for r in direct.results}
    assert {d.id: pytest.approx(by_id[d.id], abs=1e-5) for d in out} == {d.id: d.score for d in out}
    as_uri = (await ranker.run_async(query=uri(png(42)), documents=docs[:2]))["documents"]
    assert {d.id: d.score for d in as_uri} == {
        "ab"[r.index]: pytest.approx(r.score, abs=1e-5) for r in image_only.results
    }


# -- errors ---------------------------------------------------------------------------------------


async def test_server_rejection_through_the_pipeline(adapter_server: Any, image_root: str) -> None:
    pipeline = _pipeline(LycheeRanker(target=adapter_server.address, root_path=image_root, instruction="  "))
    with pytest.raises(PipelineRuntimeError) as info:
        await pipeline.run_async(_inputs())
    cause = info.value.__cause__
    assert isinstance(cause, InvalidRequestError) and isinstance(cause, ValueError)
    assert isinstance(cause.__cause__, grpc.RpcError)
    with pytest.raises(PipelineRuntimeError) as sync_info:
        await asyncio.to_thread(pipeline.run, _inputs())
    assert isinstance(sync_info.value.__cause__, InvalidRequestError)
    slow = LycheeRanker(target=adapter_server.address, root_path=image_root, timeout=1e-4)
    with pytest.raises(DeadlineExceededError) as deadline:
        await slow.run_async(query=QUESTION, documents=documents())
    assert isinstance(deadline.value, TimeoutError) and isinstance(deadline.value.__cause__, grpc.RpcError)


async def test_api_key_from_a_secret(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    from server_support import tiny_server

    docs = documents()[:2]
    async with tiny_server(request, api_keys=("k3y",)) as srv:
        monkeypatch.delenv("LYCHEE_API_KEY", raising=False)
        with pytest.raises(AuthenticationError):
            await asyncio.to_thread(LycheeRanker(target=srv.address).warm_up)
        monkeypatch.setenv("LYCHEE_API_KEY", "k3y")
        ranker = LycheeRanker(target=srv.address)  # the default Secret reads the variable
        await ranker.warm_up_async()
        assert len((await ranker.run_async(query=QUESTION, documents=docs))["documents"]) == 2
        token = LycheeRanker(target=srv.address, api_key=Secret.from_token("k3y"))
        assert len((await asyncio.to_thread(token.run, query=QUESTION, documents=docs))["documents"]) == 2
        with pytest.raises(ValueError):  # Haystack refuses to serialise a plain token
            token.to_dict()


# -- no server needed -----------------------------------------------------------------------------


def _bytes(image: object) -> object:
    """The bytes an image value stands for (the client reads a Path when it sends the call)."""
    if isinstance(image, Path):
        return image.read_bytes()
    return image.data if isinstance(image, EncodedImage) else image


def test_image_forms_and_refusals(image_root: str, tmp_path: Path) -> None:
    r = LycheeRanker(root_path=image_root)
    docs = [r._to_doc(d, i) for i, d in enumerate(documents())]
    assert [(d.text, _bytes(d.image)) for d in docs] == [(e.text, e.image) for e in EXPECTED_INPUTS.values()]
    assert docs[4].image == EncodedImage(png(1), "image/png")  # the blob's declared type is kept

    plain = LycheeRanker()
    with pytest.raises(ValueError, match="allow_local_paths"):
        plain._to_doc(Document(meta={"file_path": str(tmp_path / "receipt.png")}), 0)
    assert LycheeRanker(allow_local_paths=True)._to_doc(
        Document(meta={"file_path": str(tmp_path / "receipt.png")}), 0
    ).image == (tmp_path / "receipt.png")
    with pytest.raises(ValueError, match="outside root_path"):
        r._to_doc(Document(content="x", meta={"image": "../../etc/passwd"}), 0)
    text_file = Document(content="notes", meta={"file_path": "notes.txt"})  # not an image: plain text
    assert plain._to_doc(text_file, 0) == Doc(text="notes")
    pdf_blob = Document(content="minutes", blob=ByteStream(b"%PDF-1.7", mime_type="application/pdf"))
    assert plain._to_doc(pdf_blob, 0) == Doc(text="minutes")
    with_meta = LycheeRanker(meta_fields_to_embed=["title"], embedding_separator=" | ")
    assert with_meta._to_doc(Document(content="body", meta={"title": "Travel"}), 0).text == "Travel | body"
    bad = [
        (Document(content="x", meta={"image": "https://example.com/cat.png"}), ValueError, "not fetched"),
        (Document(content="x", meta={"image": "data:image/png;base64,@@"}), ValueError, "invalid base64"),
        (Document(content="x", meta={"image": 42}), TypeError, "unsupported image value"),
        (Document(content=""), ValueError, "neither content nor an image"),
    ]
    for doc, kind, match in bad:
        with pytest.raises(kind, match=match):
            plain._to_doc(doc, 0)
    for kwargs in ({"top_k": 0}, {"timeout": 0}):
        with pytest.raises(ValueError):
            LycheeRanker(**kwargs)  # type: ignore[arg-type]


def test_serialisation_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LYCHEE_API_KEY", "from-env")
    r = LycheeRanker(target="rerank:50051", top_k=5, instruction="find it", meta_fields_to_embed=["title"])
    data = r.to_dict()
    assert data["type"] == "haystack_lychee.ranker.LycheeRanker"
    assert "from-env" not in repr(data)
    again = LycheeRanker.from_dict(data)
    assert again.to_dict() == data
    assert again.api_key is not None and again.api_key.resolve_value() == "from-env"


def test_import_keeps_server_and_torch_out() -> None:
    # Haystack itself imports torch whenever it is installed (haystack.utils.device), so the
    # check runs with torch and the server made unimportable: any import of either by the
    # adapter fails the subprocess; Haystack copes without torch.
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['lychee_server'] = None\n"
        "import haystack_lychee\n"
        "haystack_lychee.LycheeRanker(target='127.0.0.1:1').to_dict()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "ok"
