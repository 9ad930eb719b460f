"""Unit tests of the RerankStream assembler: happy paths and every protocol / limit violation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from edge.builders import (
    Item,
    chunk,
    header,
    image,
    item_messages,
    jpeg,
    png,
    small_settings,
    stream,
    text,
    webp,
)

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server import domain
from lychee_server.edge.stream import StreamAssembler, assemble
from lychee_server.errors import InvalidInput

S = small_settings()
PNG = png(8, 8)  # ~ 100-300 bytes: several 100-byte chunks
JPG = jpeg(8, 8)
J, P, W = pb.MEDIA_TYPE_JPEG, pb.MEDIA_TYPE_PNG, pb.MEDIA_TYPE_WEBP


def test_inline_query_and_text_documents() -> None:
    job = assemble(stream([Item(b"first", id="a"), Item("zwei é".encode())]), S, "rid")
    assert job.query == domain.Content(text="query")
    assert job.documents == (
        domain.Document(domain.Content(text="first"), "a"),
        domain.Document(domain.Content(text="zwei é")),
    )
    assert job.request_id == "rid"
    assert job.instruction == domain.DEFAULT_INSTRUCTION
    assert job.options.max_length == S.default_max_length


def test_streamed_query_image_and_interleaved_text_image_chunks() -> None:
    text_bytes = ("ü" * 30).encode()  # 60 bytes in 7-byte chunks: characters split across chunks
    msgs = stream(
        [Item(text_bytes, JPG, J, id="ti", chunk=7, interleave=True), Item(image=PNG, media=P, chunk=33)],
        query=Item(image=PNG, media=P, chunk=50),
        instruction="find it",
        options=pb.RerankOptions(top_n=1, score_kind=pb.SCORE_KIND_LOGIT, max_length=128, return_text=True),
    )
    kinds = [m.chunk.WhichOneof("data") for m in msgs if m.HasField("chunk")]
    assert "text" in kinds and "image" in kinds and kinds.index("image") < kinds.index("text")  # interleaved
    job = assemble(msgs, S)
    assert job.query == domain.Content(image=domain.ImageInput(PNG, domain.MediaType.PNG))
    assert job.documents[0] == domain.Document(
        domain.Content(text="ü" * 30, image=domain.ImageInput(JPG, domain.MediaType.JPEG)), "ti"
    )
    assert job.documents[1].content.image == domain.ImageInput(PNG, domain.MediaType.PNG)
    assert job.instruction == "find it"
    assert job.options == domain.RerankOptions(1, domain.ScoreKind.LOGIT, 128, True)


def test_inline_image_query_in_header() -> None:
    data = webp(8, 8)
    job = assemble(stream([Item(b"d")], query=image(data, W)), S)
    assert job.query.image == domain.ImageInput(data, domain.MediaType.WEBP)


def test_stream_and_unary_agree() -> None:
    from edge.builders import request

    from lychee_server.edge.codec import job_from_pb

    unary = job_from_pb(request(text("query"), [pb.Document(id="x", content=pb.Content(text="doc"))]), S)
    streamed = assemble(stream([Item(b"doc", id="x")]), S)
    assert unary == streamed


def test_bytes_received_counts_payload() -> None:
    asm = StreamAssembler(S)
    for m in stream([Item(b"x" * 50)]):
        asm.feed(m)
    assert asm.bytes_received >= 50
    asm.finish()


def _header_only() -> list[pb.RerankStreamRequest]:
    return [header(1, text("q"))]


def _item(**kw: object) -> pb.RerankStreamRequest:
    return pb.RerankStreamRequest(item=pb.ItemStart(**kw))  # type: ignore[arg-type]


Case = tuple[str, Callable[[], list[pb.RerankStreamRequest]], str, str]

# Violations raised by feed(): (case, messages, reason, field path). The last message is the bad one.
FEED_ERRORS: list[Case] = [
    ("chunk before header", lambda: [chunk(b"x")], "STREAM_PROTOCOL_VIOLATION", "chunk"),
    ("item before header", lambda: [_item(text_bytes=1)], "STREAM_PROTOCOL_VIOLATION", "item"),
    ("second header", lambda: [*_header_only(), header(1, text("q"))], "STREAM_PROTOCOL_VIOLATION", "header"),
    ("message kind unset", lambda: [pb.RerankStreamRequest()], "STREAM_PROTOCOL_VIOLATION", "kind"),
    ("header document_count 0", lambda: [header(0, text("q"))], "NO_DOCUMENTS", "header.document_count"),
    (
        "header document_count too large",
        lambda: [header(5, text("q"))],
        "TOO_MANY_DOCUMENTS",
        "header.document_count",
    ),
    (
        "header instruction empty",
        lambda: [header(1, text("q"), instruction="")],
        "EMPTY_TEXT",
        "header.instruction",
    ),
    (
        "header instruction too large",
        lambda: [header(1, text("q"), instruction="x" * 33)],
        "INSTRUCTION_TOO_LARGE",
        "header.instruction",
    ),
    ("header query oneof unset", lambda: [header(1, pb.Content())], "FIELD_REQUIRED", "header.query"),
    ("header query empty text", lambda: [header(1, text(" "))], "EMPTY_TEXT", "header.query.text"),
    (
        "header query media unspecified",
        lambda: [header(1, image(PNG, 0))],
        "INVALID_ENUM",
        "header.query.image.media_type",
    ),
    (
        "header top_n 0",
        lambda: [header(1, text("q"), options=pb.RerankOptions(top_n=0))],
        "OUT_OF_RANGE",
        "header.options.top_n",
    ),
    (
        "header score_kind unspecified",
        lambda: [header(1, text("q"), options=pb.RerankOptions(score_kind=0))],
        "INVALID_ENUM",
        "header.options.score_kind",
    ),
    (
        "header max_length too large",
        lambda: [header(1, text("q"), options=pb.RerankOptions(max_length=2000))],
        "OUT_OF_RANGE",
        "header.options.max_length",
    ),
    ("item without content", lambda: [*_header_only(), _item()], "FIELD_REQUIRED", "documents[0]"),
    (
        "item text too large",
        lambda: [*_header_only(), _item(text_bytes=65)],
        "TEXT_TOO_LARGE",
        "documents[0].text",
    ),
    (
        "item image too large",
        lambda: [*_header_only(), _item(image_bytes=4097, image_media_type=P)],
        "IMAGE_TOO_LARGE",
        "documents[0].image",
    ),
    (
        "item media unspecified",
        lambda: [*_header_only(), _item(image_bytes=10)],
        "INVALID_ENUM",
        "documents[0].image_media_type",
    ),
    (
        "item media unknown",
        lambda: [*_header_only(), _item(image_bytes=10, image_media_type=7)],
        "INVALID_ENUM",
        "documents[0].image_media_type",
    ),
    (
        "item media without image",
        lambda: [*_header_only(), _item(text_bytes=1, image_media_type=P)],
        "STREAM_PROTOCOL_VIOLATION",
        "documents[0].image_media_type",
    ),
    (
        "item id too large",
        lambda: [*_header_only(), _item(id="x" * 9, text_bytes=1)],
        "ID_TOO_LARGE",
        "documents[0].id",
    ),
    (
        "id on streamed query",
        lambda: [header(1), _item(id="q", text_bytes=1)],
        "STREAM_PROTOCOL_VIOLATION",
        "query.id",
    ),
    ("chunk without item", lambda: [*_header_only(), chunk(b"x")], "STREAM_PROTOCOL_VIOLATION", "chunk"),
    (
        "chunk after complete item",
        lambda: [*_header_only(), *item_messages(Item(b"ab")), chunk(b"c")],
        "STREAM_PROTOCOL_VIOLATION",
        "chunk",
    ),
    (
        "empty chunk",
        lambda: [*_header_only(), _item(text_bytes=1), chunk(b"")],
        "STREAM_PROTOCOL_VIOLATION",
        "chunk",
    ),
    (
        "chunk data unset",
        lambda: [*_header_only(), _item(text_bytes=1), chunk()],
        "STREAM_PROTOCOL_VIOLATION",
        "chunk",
    ),
    (
        "chunk too large",
        lambda: [*_header_only(), _item(text_bytes=60), chunk(image_part=b"x" * 101)],
        "CHUNK_TOO_LARGE",
        "chunk",
    ),
    (
        "more text than declared",
        lambda: [*_header_only(), _item(text_bytes=3), chunk(b"ab"), chunk(b"cd")],
        "STREAM_PROTOCOL_VIOLATION",
        "documents[0].text",
    ),
    (
        "image bytes for a text item",
        lambda: [*_header_only(), _item(text_bytes=3), chunk(image_part=b"i")],
        "STREAM_PROTOCOL_VIOLATION",
        "documents[0].image",
    ),
    (
        "new item before complete",
        lambda: [*_header_only(), _item(text_bytes=3), chunk(b"a"), _item(text_bytes=1)],
        "STREAM_PROTOCOL_VIOLATION",
        "documents[0]",
    ),
    (
        "more items than declared",
        lambda: [*_header_only(), *item_messages(Item(b"a")), _item(text_bytes=1)],
        "STREAM_PROTOCOL_VIOLATION",
        "item",
    ),
    (
        "invalid utf-8 text",
        lambda: [*_header_only(), *item_messages(Item(b"ok \xff\xfe"))],
        "INVALID_UTF8",
        "documents[0].text",
    ),
    (
        "truncated utf-8 sequence",
        lambda: [*_header_only(), *item_messages(Item("é".encode()[:1]))],
        "INVALID_UTF8",
        "documents[0].text",
    ),
    (
        "blank streamed text",
        lambda: [*_header_only(), *item_messages(Item(b" \n "))],
        "EMPTY_TEXT",
        "documents[0].text",
    ),
    (
        "invalid utf-8 streamed query",
        lambda: [header(1), *item_messages(Item(b"\xc3("))],
        "INVALID_UTF8",
        "query.text",
    ),
]

# Streams whose every message is fine but which end too early: finish() raises.
FINISH_ERRORS: list[Case] = [
    ("empty stream", lambda: [], "STREAM_PROTOCOL_VIOLATION", "header"),
    ("no items", lambda: _header_only(), "STREAM_PROTOCOL_VIOLATION", "header.document_count"),
    (
        "fewer items than declared",
        lambda: [header(3, text("q")), *item_messages(Item(b"a"))],
        "STREAM_PROTOCOL_VIOLATION",
        "header.document_count",
    ),
    (
        "ends mid-image",
        lambda: [
            *_header_only(),
            _item(image_bytes=len(PNG), image_media_type=P),
            chunk(image_part=PNG[:50]),
        ],
        "STREAM_PROTOCOL_VIOLATION",
        "documents[0].image",
    ),
    (
        "ends mid-text",
        lambda: [
            *_header_only(),
            _item(text_bytes=5, image_bytes=1, image_media_type=P),
            chunk(image_part=b"i"),
            chunk(b"ab"),
        ],
        "STREAM_PROTOCOL_VIOLATION",
        "documents[0].text",
    ),
    ("streamed query never sent", lambda: [header(1)], "STREAM_PROTOCOL_VIOLATION", "query"),
]


def _assert_error(err: InvalidInput, reason: str, path: str) -> None:
    assert (err.reason, [(v.field, v.reason) for v in err.violations]) == (reason, [(path, reason)])


@pytest.mark.parametrize(
    ("build", "reason", "path"), [c[1:] for c in FEED_ERRORS], ids=[c[0] for c in FEED_ERRORS]
)
def test_feed_rejects_at_the_offending_message(
    build: Callable[[], list[pb.RerankStreamRequest]], reason: str, path: str
) -> None:
    msgs = build()
    asm = StreamAssembler(S, "rid")
    for m in msgs[:-1]:
        asm.feed(m)  # everything before the last message is accepted
    with pytest.raises(InvalidInput) as info:
        asm.feed(msgs[-1])
    _assert_error(info.value, reason, path)
    assert info.value.metadata == {"request_id": "rid"}


@pytest.mark.parametrize(
    ("build", "reason", "path"), [c[1:] for c in FINISH_ERRORS], ids=[c[0] for c in FINISH_ERRORS]
)
def test_finish_rejects_incomplete_streams(
    build: Callable[[], list[pb.RerankStreamRequest]], reason: str, path: str
) -> None:
    asm = StreamAssembler(S)
    for m in build():
        asm.feed(m)
    with pytest.raises(InvalidInput) as info:
        asm.finish()
    _assert_error(info.value, reason, path)


def test_request_size_is_refused_at_item_start_before_any_byte() -> None:
    mib = 1024 * 1024
    settings = small_settings(max_image_bytes=2 * mib, max_request_bytes=mib, max_chunk_bytes=64 * 1024)
    asm = StreamAssembler(settings)
    asm.feed(header(2, text("q")))
    asm.feed(_item(image_bytes=mib // 2, image_media_type=P))
    for i in range(0, mib // 2, 64 * 1024):
        asm.feed(chunk(image_part=b"\0" * min(64 * 1024, mib // 2 - i)))
    with pytest.raises(InvalidInput) as info:
        asm.feed(_item(image_bytes=mib // 2, image_media_type=P))  # header + 2 x 512 KiB > 1 MiB
    _assert_error(info.value, "REQUEST_TOO_LARGE", "documents[1]")
    assert asm.bytes_received < mib


def test_max_chunk_is_inclusive() -> None:
    asm = StreamAssembler(S)
    asm.feed(header(1, text("q")))
    asm.feed(_item(image_bytes=100, image_media_type=P))
    asm.feed(chunk(image_part=b"y" * 100))
    assert asm.finish().documents[0].content.image == domain.ImageInput(b"y" * 100, domain.MediaType.PNG)
