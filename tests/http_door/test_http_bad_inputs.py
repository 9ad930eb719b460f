"""The bad-input catalogue over HTTP, against a real server process with small limits.

Two kinds of case:

* **Conformance**: the same bad request sent through both doors must get the same reason, the same
  status (HTTP via the one status table, gRPC code likewise) and the same field, named in each
  door's own path syntax.
* **HTTP only**: what only JSON can get wrong (malformed JSON, wrong types, bad base64, bodies over
  the limit, URLs while fetching is off, unknown routes and headers).

After every case the server must still be ready and answer a good request.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from http_door.http_support import TINY_ENV, http_url
from PIL import Image

from harness import SubprocessServer, error_details, subprocess_server
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc

LIMITS_ENV = {
    **TINY_ENV,
    "LYCHEE_MAX_DOCUMENTS": "8",
    "LYCHEE_MAX_TEXT_BYTES": "1000",
    "LYCHEE_MAX_MESSAGE_BYTES": str(1024 * 1024),  # => HTTP body limit ~1.4 MB
}


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


CORRUPT_PNG = png_bytes()[:40] + b"\x00" * 60


@pytest.fixture(scope="module")
def limited(tiny_checkpoint: Path) -> Iterator[SubprocessServer]:
    with subprocess_server(tiny_checkpoint, env=LIMITS_ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def url(limited: SubprocessServer) -> str:
    return http_url(limited)


@pytest.fixture(scope="module")
def stub(limited: SubprocessServer) -> Iterator[pb_grpc.RerankServiceStub]:
    with grpc.insecure_channel(limited.address) as channel:
        yield pb_grpc.RerankServiceStub(channel)


def text(t: str) -> pb.Content:
    return pb.Content(text=t)


def docs(*items: pb.Content) -> list[pb.Document]:
    return [pb.Document(content=c) for c in items]


@dataclass(frozen=True)
class Case:
    name: str
    json: dict[str, Any]
    grpc: pb.RerankRequest
    reason: str
    http_status: int
    http_field: str
    grpc_field: str


CASES = [
    Case(
        "empty_query",
        {"query": "  ", "documents": ["a"]},
        pb.RerankRequest(query=text("  "), documents=docs(text("a"))),
        "EMPTY_TEXT",
        400,
        "query",
        "query.text",
    ),
    Case(
        "no_documents",
        {"query": "q", "documents": []},
        pb.RerankRequest(query=text("q")),
        "NO_DOCUMENTS",
        400,
        "documents",
        "documents",
    ),
    Case(
        "too_many_documents",
        {"query": "q", "documents": ["d"] * 9},
        pb.RerankRequest(query=text("q"), documents=docs(*[text("d")] * 9)),
        "TOO_MANY_DOCUMENTS",
        400,
        "documents",
        "documents",
    ),
    Case(
        "top_n_zero",
        {"query": "q", "documents": ["d"], "top_n": 0},
        pb.RerankRequest(query=text("q"), documents=docs(text("d")), options=pb.RerankOptions(top_n=0)),
        "OUT_OF_RANGE",
        400,
        "top_n",
        "options.top_n",
    ),
    Case(
        "top_n_huge",
        {"query": "q", "documents": ["d"], "top_n": 10**9},
        pb.RerankRequest(query=text("q"), documents=docs(text("d")), options=pb.RerankOptions(top_n=10**9)),
        "OUT_OF_RANGE",
        400,
        "top_n",
        "options.top_n",
    ),
    Case(
        "max_length_small",
        {"query": "q", "documents": ["d"], "max_length": 10},
        pb.RerankRequest(query=text("q"), documents=docs(text("d")), options=pb.RerankOptions(max_length=10)),
        "OUT_OF_RANGE",
        400,
        "max_length",
        "options.max_length",
    ),
    Case(
        "blank_instruction",
        {"query": "q", "documents": ["d"], "instruction": " "},
        pb.RerankRequest(instruction=" ", query=text("q"), documents=docs(text("d"))),
        "EMPTY_TEXT",
        400,
        "instruction",
        "instruction",
    ),
    Case(
        "text_too_large",
        {"query": "q", "documents": ["x" * 1001]},
        pb.RerankRequest(query=text("q"), documents=docs(text("x" * 1001))),
        "TEXT_TOO_LARGE",
        400,
        "documents[0]",
        "documents[0].content.text",
    ),
    Case(
        "id_too_large",
        {"query": "q", "documents": [{"text": "d", "id": "i" * 300}]},
        pb.RerankRequest(query=text("q"), documents=[pb.Document(id="i" * 300, content=text("d"))]),
        "ID_TOO_LARGE",
        400,
        "documents[0].id",
        "documents[0].id",
    ),
    Case(
        "score_kind_unknown",
        {"query": "q", "documents": ["d"], "score_kind": "bogus"},
        pb.RerankRequest(
            query=text("q"),
            documents=docs(text("d")),
            options=pb.RerankOptions(score_kind=99),  # type: ignore[arg-type]
        ),
        "INVALID_ENUM",
        400,
        "score_kind",
        "options.score_kind",
    ),
    Case(
        "corrupt_image",
        {"query": "q", "documents": [{"image": base64.b64encode(CORRUPT_PNG).decode()}]},
        pb.RerankRequest(
            query=text("q"),
            documents=docs(pb.Content(image=pb.Image(data=CORRUPT_PNG, media_type=pb.MEDIA_TYPE_PNG))),
        ),
        "IMAGE_DECODE_FAILED",
        400,
        "documents[0]",
        "documents[0]",
    ),
]


def _healthy(url: str) -> None:
    assert httpx.get(f"{url}/readyz").status_code == 200
    ok = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_reason_and_field_through_both_doors(
    case: Case, url: str, stub: pb_grpc.RerankServiceStub
) -> None:
    r = httpx.post(f"{url}/v1/rerank", json=case.json, timeout=60)
    body = r.json()
    assert (r.status_code, body["reason"]) == (case.http_status, case.reason), body
    fields = [v["field"] for v in body["field_violations"]]
    assert any(f == case.http_field or f.startswith(case.http_field + ".") for f in fields), fields

    with pytest.raises(grpc.RpcError) as info:
        stub.Rerank(case.grpc, timeout=60)
    d = error_details(info.value)
    assert d.reason == case.reason
    assert d.code.name == body["code"]  # one status table: the same code name on both doors
    assert any(f == case.grpc_field or f.startswith(case.grpc_field + ".") for f in d.fields), d.fields
    _healthy(url)


def _post(url: str, content: bytes | str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/rerank", content=content, headers={"content-type": "application/json"}, **kw)


@pytest.mark.parametrize(
    ("name", "body", "status", "reason", "field"),
    [
        ("malformed_json", b'{"query": "q", "documents": [', 400, "INVALID_JSON", "body"),
        ("not_an_object", b"[1, 2]", 400, "INVALID_JSON", "body"),
        ("documents_not_a_list", b'{"query": "q", "documents": "x"}', 400, "INVALID_JSON", "documents"),
        (
            "document_wrong_type",
            b'{"query": "q", "documents": ["a", 5]}',
            400,
            "INVALID_JSON",
            "documents[1]",
        ),
        (
            "text_wrong_type",
            b'{"query": "q", "documents": [{"text": 5}]}',
            400,
            "INVALID_JSON",
            "documents[0].text",
        ),
        (
            "top_n_wrong_type",
            b'{"query": "q", "documents": ["a"], "top_n": "3"}',
            400,
            "INVALID_JSON",
            "top_n",
        ),
        ("missing_query", b'{"documents": ["a"]}', 400, "FIELD_REQUIRED", "query"),
        (
            "bad_base64",
            b'{"query": "q", "documents": [{"image": "not base64!"}]}',
            400,
            "INVALID_BASE64",
            "documents[0].image",
        ),
        (
            "data_uri_not_base64",
            b'{"query": "q", "documents": [{"image": "data:image/png,abc"}]}',
            400,
            "INVALID_BASE64",
            "documents[0].image",
        ),
        (
            "data_uri_gif",
            b'{"query": "q", "documents": [{"image": "data:image/gif;base64,R0lGODlh"}]}',
            400,
            "INVALID_ENUM",
            "documents[0].image.media_type",
        ),
        (
            "not_an_image",
            b'{"query": "q", "documents": [{"image": "aGVsbG8gd29ybGQ="}]}',
            400,
            "IMAGE_DECODE_FAILED",
            "documents[0].image",
        ),
        (
            "empty_object_document",
            b'{"query": "q", "documents": [{}]}',
            400,
            "FIELD_REQUIRED",
            "documents[0]",
        ),
        (
            "image_and_image_url",
            b'{"query": "q", "documents": [{"image": "aGk=", "image_url": "aGk="}]}',
            400,
            "INVALID_ARGUMENT",
            "documents[0].image_url",
        ),
        (
            "url_while_off",
            b'{"query": "q", "documents": [{"image": "https://example.com/a.png"}]}',
            400,
            "IMAGE_URL_DISABLED",
            "documents[0].image",
        ),
        (
            "url_object_while_off",
            b'{"query": {"image_url": {"url": "http://169.254.169.254/"}}, "documents": ["a"]}',
            400,
            "IMAGE_URL_DISABLED",
            "query.image_url",
        ),
        ("bad_utf8", b'{"query": "\xff\xfe", "documents": ["a"]}', 400, "INVALID_JSON", "body"),
    ],
)
def test_http_only_bad_inputs(url: str, name: str, body: bytes, status: int, reason: str, field: str) -> None:
    r = _post(url, body)
    got = r.json()
    assert (r.status_code, got["reason"]) == (status, reason), got
    assert field in [v["field"] for v in got["field_violations"]], got
    assert got["request_id"] and r.headers["x-request-id"] == got["request_id"]
    if reason == "IMAGE_URL_DISABLED":
        assert "--image-url-fetch" in got["field_violations"][0]["description"]
    _healthy(url)


def test_unknown_fields_are_ignored_and_named(url: str) -> None:
    r = _post(url, b'{"query": "q", "documents": ["a"], "rank_fields": ["x"], "max_chunks_per_doc": 3}')
    assert r.status_code == 200
    assert r.json()["meta"]["warnings"] == [
        "unknown field 'max_chunks_per_doc' was ignored",
        "unknown field 'rank_fields' was ignored",
    ]


def test_oversized_bodies_get_413_before_parsing(url: str) -> None:
    limit = httpx.get(f"{url}/v1/info").json()["limits"]["max_body_bytes"]
    big = b'{"query": "q", "documents": ["' + b"a" * (limit + 10) + b'"]}'
    declared = _post(url, big)  # Content-Length over the limit: refused before reading
    assert declared.status_code == 413 and declared.json()["reason"] == "REQUEST_TOO_LARGE"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 256 * 1024):
            yield big[i : i + 256 * 1024]

    streamed = httpx.post(f"{url}/v1/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["reason"] == "REQUEST_TOO_LARGE"
    _healthy(url)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("GET", "/v1/rerank", 405), ("DELETE", "/rerank", 405)],
)
def test_unknown_routes_and_methods(url: str, method: str, path: str, status: int) -> None:
    r = httpx.request(method, f"{url}{path}")
    assert r.status_code == status and r.json()["reason"] == "NOT_FOUND"


def test_timeout_header(url: str) -> None:
    bad = httpx.post(
        f"{url}/v1/rerank", json={"query": "q", "documents": ["a"]}, headers={"x-request-timeout": "soon"}
    )
    assert bad.status_code == 400 and bad.json()["field_violations"][0]["field"] == "X-Request-Timeout"
    expired = httpx.post(
        f"{url}/v1/rerank",
        json={"query": "q", "documents": ["a"] * 8},
        headers={"x-request-timeout": "0.000001"},
        timeout=60,
    )
    assert expired.status_code == 504 and expired.json()["reason"] == "DEADLINE_EXCEEDED"
    _healthy(url)


def test_tei_bad_inputs_use_the_same_table(url: str) -> None:
    r = httpx.post(f"{url}/rerank", json={"query": "q", "texts": []})
    assert r.status_code == 400 and r.json()["reason"] == "NO_DOCUMENTS"
    assert r.json()["field_violations"][0]["field"] == "texts"
    r = httpx.post(f"{url}/rerank", json={"query": "q", "texts": ["ok", " "]})
    assert r.json()["reason"] == "EMPTY_TEXT" and r.json()["field_violations"][0]["field"] == "texts[1]"
