"""Adapter logic that needs no server: configuration, input conversion, ranking selection."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import pytest
from adapter_support import png
from langchain_core.documents import Document
from pydantic import ValidationError

from langchain_lychee import LycheeRerank
from langchain_lychee.rerank import select_ranked
from lychee.rerank.client import EncodedImage, LycheeClient, RankedDocument, ServerError


def _r(*pairs: tuple[int, float]) -> list[RankedDocument]:
    return [RankedDocument(index=i, score=s) for i, s in pairs]


# -- configuration -------------------------------------------------------------------------------


def test_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LYCHEE_API_KEY", raising=False)
    r = LycheeRerank()
    assert (r.target, r.top_n, r.api_key, r.image_metadata_key, r.allow_local_paths) == (
        "localhost:50051",
        3,
        None,
        "image",
        False,
    )
    assert LycheeRerank(top_n=None).top_n is None
    for bad in ({"top_n": 0}, {"top_n": -2}, {"timeout": 0}, {"no_such_field": 1}):
        with pytest.raises(ValidationError):
            LycheeRerank(**bad)  # type: ignore[arg-type]


def test_api_key_from_env_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LYCHEE_API_KEY", "from-env")
    r = LycheeRerank()
    assert r.api_key is not None and r.api_key.get_secret_value() == "from-env"
    assert "from-env" not in repr(r)
    explicit = LycheeRerank(api_key="explicit")  # type: ignore[arg-type]
    assert explicit.api_key is not None and explicit.api_key.get_secret_value() == "explicit"


def test_injected_client_must_be_a_client() -> None:
    with pytest.raises(ValidationError):
        LycheeRerank(client="localhost:1")  # type: ignore[arg-type]
    c = LycheeClient("127.0.0.1:1")
    assert LycheeRerank(client=c)._sync_client() is c
    c.close()


# -- selection -------------------------------------------------------------------------------


def test_sorted_ties_keep_input_order() -> None:
    out = select_ranked(_r((3, 0.5), (1, 0.9), (0, 0.5), (2, 0.5)), 4, top_n=None, score_threshold=None)
    assert out == [
        {"index": 1, "relevance_score": 0.9},
        {"index": 0, "relevance_score": 0.5},
        {"index": 2, "relevance_score": 0.5},
        {"index": 3, "relevance_score": 0.5},
    ]


def test_top_n_then_threshold() -> None:
    results = _r((0, 0.1), (1, 0.8), (2, 0.6), (3, 0.7))
    assert [d["index"] for d in select_ranked(results, 4, top_n=2, score_threshold=None)] == [1, 3]
    assert [d["index"] for d in select_ranked(results, 4, top_n=3, score_threshold=0.65)] == [1, 3]
    assert [d["index"] for d in select_ranked(results, 4, top_n=None, score_threshold=0.6)] == [1, 3, 2]
    assert select_ranked(results, 4, top_n=2, score_threshold=0.99) == []
    # A server honouring top_n sends only the best ones: that is complete, not missing.
    assert [d["index"] for d in select_ranked(_r((1, 0.8), (3, 0.7)), 4, top_n=2, score_threshold=None)] == [
        1,
        3,
    ]


@pytest.mark.parametrize(
    ("results", "n", "top_n"),
    [
        (_r((0, 0.1), (5, 0.2)), 2, None),  # out of range
        (_r((0, 0.1), (0, 0.2)), 2, None),  # duplicate
        (_r((0, 0.1)), 2, None),  # missing
        (_r((0, 0.1)), 3, 2),  # fewer than top_n
        (_r((0, math.nan), (1, 0.1)), 2, None),
    ],
)
def test_unattributable_results_are_errors(results: list[RankedDocument], n: int, top_n: int | None) -> None:
    with pytest.raises(ServerError):
        select_ranked(results, n, top_n=top_n, score_threshold=None)


# -- input conversion ------------------------------------------------------------------------------

B64 = base64.b64encode(png(9)).decode()


@pytest.mark.parametrize(
    "value",
    [
        png(9),
        f"data:image/png;base64,{B64}",
        {"type": "image", "base64": B64, "mime_type": "image/png"},
        {"type": "image", "source_type": "base64", "data": B64, "mime_type": "image/png"},
        {"type": "image", "url": f"data:image/png;base64,{B64}"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}},
    ],
)
def test_image_metadata_forms(value: object) -> None:
    doc = LycheeRerank()._to_doc(Document(page_content="", metadata={"image": value}), 0)
    assert doc.text is None and doc.image == png(9)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("data:image/png;base64,@@@", "invalid base64"),
        ("data:image/png,rawbytes", "only base64 data URIs"),
        ("https://example.com/cat.png", "not fetched"),
        ({"type": "image", "url": "https://example.com/cat.png"}, "not fetched"),
        ({"type": "text", "text": "hi"}, "not an image"),
        ({"type": "image", "file_id": "abc"}, "no inline base64"),
        ("/etc/passwd", "allow_local_paths"),
        (Path("/etc/passwd"), "allow_local_paths"),
        (b"", "empty"),
    ],
)
def test_bad_image_values_are_value_errors(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LycheeRerank()._to_doc(Document(page_content="caption", metadata={"image": value}), 4)


def test_unsupported_type_is_type_error() -> None:
    with pytest.raises(TypeError, match=r"documents\[0\]"):
        LycheeRerank()._to_doc(Document(page_content="x", metadata={"image": 42}), 0)


def test_local_paths_only_when_allowed(tmp_path: Path) -> None:
    p = tmp_path / "pic.png"
    p.write_bytes(png(1))
    doc = LycheeRerank(allow_local_paths=True)._to_doc(
        Document(page_content="x", metadata={"image": str(p)}), 0
    )
    assert doc.image == p
    with pytest.raises(ValueError, match="does not exist"):
        LycheeRerank(allow_local_paths=True)._to_doc(
            Document(page_content="x", metadata={"image": str(tmp_path / "nope.png")}), 0
        )


def test_custom_metadata_key_and_empty_documents() -> None:
    r = LycheeRerank(image_metadata_key="figure")
    assert r._to_doc(Document(page_content="", metadata={"figure": png(2)}), 0).image == png(2)
    with pytest.raises(ValueError, match="neither page_content nor an image"):
        r._to_doc(Document(page_content="", metadata={"image": png(2)}), 1)
    with pytest.raises(ValueError):
        r._to_doc("", 0)
    assert r._to_doc("plain", 0).text == "plain"


def test_query_forms() -> None:
    r = LycheeRerank()
    assert r._to_query("hello", None).text == "hello"
    uri = f"data:image/png;base64,{B64}"
    q = r._to_query(uri, None)
    assert q.text is None and q.image == png(9)
    both = r._to_query("what is this?", png(9))
    assert both.text == "what is this?" and both.image == png(9)
    only_image = r._to_query("", EncodedImage(png(9), "image/png"))
    assert only_image.text is None
    with pytest.raises(ValueError):
        r._to_query("", None)
    with pytest.raises(ValueError):
        r._to_query(uri, png(9))


def test_empty_input_makes_no_call() -> None:
    # Nothing listens on port 1: any call would fail, so [] proves none was made.
    r = LycheeRerank(target="127.0.0.1:1")
    assert r.rerank([], "q") == []
    assert r.compress_documents([], "q") == []


async def test_empty_input_makes_no_call_async() -> None:
    r = LycheeRerank(target="127.0.0.1:1")
    assert await r.arerank([], "q") == []
    assert await r.acompress_documents([], "q") == []
