"""Request building, the streaming chunk plan and response decoding (no server)."""

from __future__ import annotations

import pytest

from lychee.rerank.client import Doc, LycheeClient, Query, ServerError
from lychee.rerank.client._inputs import coerce_document, coerce_query
from lychee.rerank.client._types import EncodedImage, Limits
from lychee.rerank.client._wire import (
    DEFAULT_STREAM_THRESHOLD_BYTES,
    build_options,
    build_request,
    decode_result,
    decode_server_info,
    effective_chunk_bytes,
    stream_messages,
    stream_threshold,
)
from lychee.rerank.v1 import rerank_pb2 as pb

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # 10 248 bytes; only the signature matters here


def _limits(**kw: int) -> Limits:
    base = dict(
        max_documents=100,
        max_instruction_bytes=4096,
        max_text_bytes=1 << 18,
        max_image_bytes=1 << 24,
        max_image_pixels=1 << 26,
        max_id_bytes=256,
        max_message_bytes=16 << 20,
        max_request_bytes=512 << 20,
        max_chunk_bytes=256 << 10,
        max_length=8192,
        default_max_length=3200,
        min_pixels=3136,
        max_pixels=1 << 20,
    )
    base.update(kw)
    return Limits(media_types=("image/png",), **base)  # type: ignore[arg-type]


def test_content_kinds_and_request_fields() -> None:
    q = coerce_query(Query(text="q", image=PNG))
    docs = [coerce_document("t", 0), coerce_document(PNG, 1), coerce_document(Doc("ti", PNG, id="x"), 2)]
    opts = build_options(top_n=2, score_kind="logit", max_length=128, return_text=True)
    req = build_request(q, docs, "inst", opts)
    assert req.query.WhichOneof("kind") == "text_image"
    assert [d.content.WhichOneof("kind") for d in req.documents] == ["text", "image", "text_image"]
    assert req.documents[1].content.image.media_type == pb.MEDIA_TYPE_PNG
    assert [d.HasField("id") for d in req.documents] == [False, False, True]
    assert req.instruction == "inst"
    assert (req.options.top_n, req.options.score_kind, req.options.max_length, req.options.return_text) == (
        2,
        pb.SCORE_KIND_LOGIT,
        128,
        True,
    )


def test_unset_options_stay_unset() -> None:
    opts = build_options(top_n=None, score_kind="probability", max_length=None, return_text=False)
    assert not opts.HasField("top_n") and not opts.HasField("max_length")
    req = build_request(coerce_query("q"), [coerce_document("d", 0)], None, opts)
    assert not req.HasField("instruction")


def test_empty_text_is_sent_as_set_text_for_the_server_to_judge() -> None:
    req = build_request(coerce_query("q"), [coerce_document("", 0)], None, pb.RerankOptions())
    assert req.documents[0].content.WhichOneof("kind") == "text"


@pytest.mark.parametrize(
    "kwargs", [{"top_n": -1}, {"top_n": True}, {"max_length": -5}, {"score_kind": "cosine"}]
)
def test_bad_options_fail_locally(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "top_n": None,
        "score_kind": "probability",
        "max_length": None,
        "return_text": False,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        build_options(**args)  # type: ignore[arg-type]


def _reassemble(messages: list[pb.RerankStreamRequest]) -> tuple[pb.StreamHeader, list[dict[str, object]]]:
    """Replay the protocol like a strict server would, asserting the framing on the way."""
    assert messages[0].WhichOneof("kind") == "header"
    header = messages[0].header
    items: list[dict[str, object]] = []
    for m in messages[1:]:
        kind = m.WhichOneof("kind")
        assert kind in ("item", "chunk")
        if kind == "item":
            items.append({"start": m.item, "text": b"", "image": b"", "chunks": 0})
        else:
            cur = items[-1]
            which = m.chunk.WhichOneof("data")
            piece = getattr(m.chunk, which)
            assert piece, "empty chunk"
            cur[which] = cur[which] + piece  # type: ignore[operator]
            cur["chunks"] = int(cur["chunks"]) + 1  # type: ignore[call-overload]
    for it in items:
        start = it["start"]
        assert isinstance(start, pb.ItemStart)
        assert len(it["text"]) == start.text_bytes  # type: ignore[arg-type]
        assert len(it["image"]) == start.image_bytes  # type: ignore[arg-type]
    return header, items


def test_stream_plan_chunks_images_and_inlines_small_query() -> None:
    q = coerce_query("small query")
    docs = [
        coerce_document(Doc(text="é" * 3000, image=PNG, id="a"), 0),  # 6000 text bytes split mid-char
        coerce_document("plain", 1),
    ]
    opts = build_options(top_n=None, score_kind="probability", max_length=None, return_text=False)
    msgs = list(stream_messages(q, docs, "inst", opts, chunk_bytes=4096))
    header, items = _reassemble(msgs)
    assert header.query.text == "small query" and header.document_count == 2 and header.instruction == "inst"
    assert len(items) == 2
    first = items[0]
    assert first["text"] == ("é" * 3000).encode() and first["image"] == PNG
    assert first["chunks"] == 2 + 3  # ceil(6000/4096) text + ceil(10248/4096) image
    start = first["start"]
    assert isinstance(start, pb.ItemStart)
    assert start.id == "a" and start.image_media_type == pb.MEDIA_TYPE_PNG
    second = items[1]["start"]
    assert isinstance(second, pb.ItemStart)
    assert second.image_media_type == pb.MEDIA_TYPE_UNSPECIFIED and not second.HasField("id")
    assert all(m.ByteSize() <= 4096 + 16 for m in msgs[1:])


def test_stream_plan_streams_large_query_as_first_item() -> None:
    q = coerce_query(Query(text="look", image=PNG))
    msgs = list(stream_messages(q, [coerce_document("d", 0)], None, pb.RerankOptions(), chunk_bytes=1024))
    header, items = _reassemble(msgs)
    assert not header.HasField("query") and not header.HasField("instruction")
    assert len(items) == 2  # query item + one document
    query_start = items[0]["start"]
    assert isinstance(query_start, pb.ItemStart) and not query_start.HasField("id")
    assert items[0]["image"] == PNG and items[0]["text"] == b"look"


def test_stream_plan_rejects_bad_chunk_size() -> None:
    with pytest.raises(ValueError):
        list(stream_messages(coerce_query("q"), [], None, pb.RerankOptions(), chunk_bytes=256 * 1024 + 1))


def test_threshold_and_chunk_size_follow_server_limits() -> None:
    assert stream_threshold(None) == DEFAULT_STREAM_THRESHOLD_BYTES == 3 * 1024 * 1024
    assert stream_threshold(_limits(max_message_bytes=4 << 20)) == 3 << 20
    assert effective_chunk_bytes(256 << 10, None) == 256 << 10
    assert effective_chunk_bytes(1 << 20, None) == 256 << 10
    assert effective_chunk_bytes(256 << 10, _limits(max_chunk_bytes=64 << 10)) == 64 << 10


def test_transport_choice() -> None:
    client = LycheeClient("127.0.0.1:1", stream_threshold_bytes=0)
    small = client._prepare(
        "q", ["d"], instruction=None, top_n=None, score_kind="probability", max_length=None, return_text=False
    )
    assert client._should_stream(small, None)
    auto = LycheeClient("127.0.0.1:1")
    assert not auto._should_stream(small, None) and not auto._wants_limits(small)
    big_img = EncodedImage(b"\x89PNG\r\n\x1a\n" + bytes(2 << 20), "image/png")
    big = auto._prepare(
        "q",
        [big_img],
        instruction=None,
        top_n=None,
        score_kind="probability",
        max_length=None,
        return_text=False,
    )
    assert auto._wants_limits(big)
    assert not auto._should_stream(big, None)  # 2 MiB < 3 MiB default
    assert auto._should_stream(big, _limits(max_message_bytes=2 << 20))  # 2 MiB > 1.5 MiB
    client.close()
    auto.close()


def test_documents_must_be_a_sequence() -> None:
    client = LycheeClient("127.0.0.1:1")
    with pytest.raises(TypeError):
        client.rerank("q", "not a list")
    client.close()


def _response(*entries: tuple[int, float]) -> pb.RerankResponse:
    resp = pb.RerankResponse(model="m")
    for i, s in entries:
        resp.results.add(index=i, score=s)
    resp.timings.total.FromMilliseconds(1500)
    resp.usage.pairs = len(entries)
    return resp


def test_decode_result() -> None:
    resp = _response((2, 0.9), (0, 0.5))
    resp.results[0].id = "two"
    resp.results[1].truncated = True
    res = decode_result(resp, 3, streamed=True)
    assert [(r.index, r.score, r.id, r.truncated) for r in res.results] == [
        (2, 0.9, "two", False),
        (0, 0.5, None, True),
    ]
    assert (
        res.timings.total == pytest.approx(1.5) and res.usage.pairs == 2 and res.model == "m" and res.streamed
    )


@pytest.mark.parametrize("entries", [((3, 0.1),), ((0, 0.2), (0, 0.1))])
def test_decode_result_rejects_unattributable_indices(entries: tuple[tuple[int, float], ...]) -> None:
    with pytest.raises(ServerError) as info:
        decode_result(_response(*entries), 3, streamed=False)
    assert info.value.reason == "INVALID_RESPONSE"


def test_decode_server_info() -> None:
    resp = pb.GetServerInfoResponse(model_id="tiny", random_weights=True, device="cpu")
    resp.query_modalities.extend([pb.MODALITY_TEXT, pb.MODALITY_IMAGE])
    resp.document_modalities.append(pb.MODALITY_TEXT)
    resp.limits.max_message_bytes = 1 << 20
    resp.limits.media_types.extend([pb.MEDIA_TYPE_PNG, pb.MEDIA_TYPE_JPEG])
    info = decode_server_info(resp)
    assert info.random_weights and info.model_id == "tiny"
    assert info.query_modalities == {"text", "image"} and info.document_modalities == {"text"}
    assert info.limits.max_message_bytes == 1 << 20
    assert info.limits.media_types == ("image/png", "image/jpeg")
