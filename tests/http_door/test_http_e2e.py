"""The HTTP door of a real server process, reached by real third-party clients: the official
``cohere`` SDK (v1 and v2 clients), ``langchain-cohere``'s ``CohereRerank`` inside a LangChain
``ContextualCompressionRetriever``, TEI-shaped calls and Jina-style image documents with httpx —
and parity: the same inputs through HTTP and gRPC give bit-equal scores in the same order."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from server_support import noise_image

from harness import SubprocessServer
from lychee.rerank.client import Doc, EncodedImage, LycheeClient, Query

QUERY = "how are travel expenses refunded?"
PASSAGES = [
    "Travel expenses are refunded within 30 days of the report.",
    "Passwords must be rotated every 90 days.",
    "The cafeteria opens at 8 am.",
    "Expense reports need a manager's approval before refunds.",
    "Parking permits are issued by facilities.",
]


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    return noise_image(size[0], size[1], seed=seed)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def grpc_ranking(client: LycheeClient, query: Any, docs: list[Any], **kw: Any) -> list[tuple[int, float]]:
    result = client.rerank(query, docs, **kw)
    return [(r.index, r.score) for r in result.results]


def test_cohere_v2_sdk_gets_the_grpc_ranking(base_url: str, grpc_client: LycheeClient) -> None:
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=base_url)
    got = co.rerank(model="lychee-rerank-mm", query=QUERY, documents=PASSAGES, top_n=3)
    expected = grpc_ranking(grpc_client, QUERY, PASSAGES, top_n=3)
    assert [(r.index, r.relevance_score) for r in got.results] == expected  # bit-equal floats
    assert got.id  # the request id


def test_cohere_v1_sdk_with_return_documents(base_url: str, grpc_client: LycheeClient) -> None:
    import cohere

    co = cohere.Client(api_key="unused", base_url=base_url)
    got = co.rerank(model="any", query=QUERY, documents=PASSAGES, return_documents=True)
    expected = grpc_ranking(grpc_client, QUERY, PASSAGES)
    assert [(r.index, r.relevance_score) for r in got.results] == expected
    assert [r.document.text for r in got.results if r.document] == [PASSAGES[i] for i, _ in expected]


def test_langchain_cohere_rerank_in_a_compression_retriever(base_url: str, grpc_client: LycheeClient) -> None:
    import cohere
    from adapter.adapter_support import HashedBagOfWords
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(HashedBagOfWords())
    store.add_documents([Document(page_content=p, metadata={"i": i}) for i, p in enumerate(PASSAGES)])
    base = store.as_retriever(search_kwargs={"k": len(PASSAGES)})
    reranker = CohereRerank(client=cohere.ClientV2(api_key="unused", base_url=base_url), model="x", top_n=2)
    retriever = ContextualCompressionRetriever(base_compressor=reranker, base_retriever=base)

    got = retriever.invoke(QUERY)

    candidates = [d.page_content for d in base.invoke(QUERY)]  # the order the compressor saw
    expected = grpc_ranking(grpc_client, QUERY, candidates, top_n=2)
    assert [d.page_content for d in got] == [candidates[i] for i, _ in expected]
    assert [d.metadata["relevance_score"] for d in got] == [s for _, s in expected]


def test_tei_shape(base_url: str, grpc_client: LycheeClient) -> None:
    r = httpx.post(f"{base_url}/rerank", json={"query": QUERY, "texts": PASSAGES, "return_text": True})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = grpc_ranking(grpc_client, QUERY, PASSAGES)
    assert [(x["index"], x["score"]) for x in body] == expected
    assert [x["text"] for x in body] == [PASSAGES[i] for i, _ in expected]

    raw = httpx.post(f"{base_url}/rerank", json={"query": QUERY, "texts": PASSAGES, "raw_scores": True})
    assert [(x["index"], x["score"]) for x in raw.json()] == grpc_ranking(
        grpc_client, QUERY, PASSAGES, score_kind="logit"
    )
    assert "text" not in raw.json()[0]


@pytest.mark.parametrize("image_form", ["base64", "data_uri", "image_url_object"])
def test_jina_style_image_documents_match_grpc(
    base_url: str, grpc_client: LycheeClient, image_form: str
) -> None:
    images = [png(1), png(2), png(3, (28, 56))]

    def image_field(data: bytes) -> dict[str, Any]:
        if image_form == "base64":
            return {"image": b64(data)}
        if image_form == "data_uri":
            return {"image": f"data:image/png;base64,{b64(data)}"}
        return {"image_url": f"data:image/png;base64,{b64(data)}"}

    body = {
        "model": "jina-reranker-m0",
        "query": {"text": "a bar chart", "image": b64(png(9))},
        "documents": [
            {"text": PASSAGES[0]},
            image_field(images[0]),
            {"text": "chart of expenses", **image_field(images[1])},
            PASSAGES[1],
            {"id": "doc-x", **image_field(images[2])},
        ],
        "return_documents": True,
    }
    r = httpx.post(f"{base_url}/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    expected = grpc_ranking(
        grpc_client,
        Query(text="a bar chart", image=EncodedImage.from_bytes(png(9))),
        [
            PASSAGES[0],
            EncodedImage.from_bytes(images[0]),
            Doc(text="chart of expenses", image=EncodedImage.from_bytes(images[1])),
            PASSAGES[1],
            Doc(image=EncodedImage.from_bytes(images[2]), id="doc-x"),
        ],
    )
    assert [(x["index"], x["relevance_score"]) for x in got["results"]] == expected
    assert got["usage"]["images"] == 4 and got["usage"]["pairs"] == 5
    by_index = {x["index"]: x for x in got["results"]}
    assert by_index[4]["id"] == "doc-x" and by_index[4]["document"] == {"id": "doc-x"}
    assert by_index[2]["document"] == {"text": "chart of expenses"}


@pytest.mark.parametrize(
    ("query", "documents"),
    [
        ("text query", ["one", "two", "three three three"]),
        ({"image": "IMG0"}, ["one", {"image": "IMG1"}]),
        ({"text": "both", "image": "IMG0"}, [{"text": "t", "image": "IMG1"}, "plain", {"image": "IMG2"}]),
    ],
    ids=["text", "image", "mixed"],
)
def test_parity_scores_and_order_are_bit_equal(
    base_url: str, grpc_client: LycheeClient, query: Any, documents: list[Any]
) -> None:
    imgs = {f"IMG{i}": png(20 + i) for i in range(3)}

    def to_json(item: Any) -> Any:
        if isinstance(item, str):
            return item
        return {k: (b64(imgs[v]) if k == "image" else v) for k, v in item.items()}

    def to_client(item: Any, *, is_query: bool = False) -> Any:
        if isinstance(item, str):
            return item
        image = EncodedImage.from_bytes(imgs[item["image"]]) if "image" in item else None
        return (Query if is_query else Doc)(text=item.get("text"), image=image)

    for kind in ("probability", "logit"):
        r = httpx.post(
            f"{base_url}/v1/rerank",
            json={"query": to_json(query), "documents": [to_json(d) for d in documents], "score_kind": kind},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        http_ranking = [(x["index"], x["relevance_score"]) for x in r.json()["results"]]
        grpc = grpc_ranking(
            grpc_client, to_client(query, is_query=True), [to_client(d) for d in documents], score_kind=kind
        )
        assert http_ranking == grpc


def test_operations_routes(base_url: str, served: SubprocessServer) -> None:
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base_url}/readyz").status_code == 200
    models = httpx.get(f"{base_url}/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    info = httpx.get(f"{base_url}/v1/info").json()
    assert info["limits"]["max_documents"] == 1000 and info["random_weights"] is True
    assert models["data"][0]["id"] == info["model_id"]
    metrics = httpx.get(f"{base_url}/metrics").text
    assert 'transport="http"' in metrics and 'method="/v1/rerank"' in metrics
    spec = httpx.get(f"{base_url}/openapi.json").json()
    assert {"/v1/rerank", "/v2/rerank", "/rerank", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "RerankIn" in spec["components"]["schemas"]
    assert httpx.get(f"{base_url}/docs").status_code == 200


def test_request_id_round_trip(base_url: str) -> None:
    r = httpx.post(
        f"{base_url}/v1/rerank", json={"query": "q", "documents": ["d"]}, headers={"x-request-id": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "abc-123"
    bad = httpx.post(f"{base_url}/v1/rerank", json={"query": "q"}, headers={"x-request-id": "abc-124"})
    assert bad.status_code == 400 and bad.json()["request_id"] == "abc-124"
    assert bad.headers["x-request-id"] == "abc-124"
