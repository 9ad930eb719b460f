"""Unit tests of the unary codec: round-trips into domain values and every rejection rule."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from edge.builders import image, jpeg, png, request, small_settings, text, text_image, webp

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server import domain
from lychee_server.edge import codec
from lychee_server.errors import InvalidInput

S = small_settings()
PNG = png()
JPG = jpeg()


def _content_variants() -> dict[str, tuple[pb.Content, domain.Content]]:
    return {
        "text": (text("red shoes"), domain.Content(text="red shoes")),
        "image": (image(PNG), domain.Content(image=domain.ImageInput(PNG, domain.MediaType.PNG))),
        "text_image": (
            text_image("a photo", JPG, pb.MEDIA_TYPE_JPEG),
            domain.Content(text="a photo", image=domain.ImageInput(JPG, domain.MediaType.JPEG)),
        ),
    }


@pytest.mark.parametrize(("qkind", "dkind"), list(itertools.product(_content_variants(), repeat=2)))
def test_all_nine_content_combinations_round_trip(qkind: str, dkind: str) -> None:
    variants = _content_variants()
    q_pb, q_dom = variants[qkind]
    d_pb, d_dom = variants[dkind]
    req = request(q_pb, [pb.Document(id="a", content=d_pb), pb.Document(content=d_pb)])
    job = codec.job_from_pb(req, S, request_id="r1")
    assert job.query == q_dom
    assert job.documents == (domain.Document(d_dom, "a"), domain.Document(d_dom, None))
    assert job.request_id == "r1"


def test_defaults_when_unset() -> None:
    job = codec.job_from_pb(request(), S)
    assert job.instruction == domain.DEFAULT_INSTRUCTION
    assert job.options == domain.RerankOptions(
        top_n=None,
        score_kind=domain.ScoreKind.PROBABILITY,
        max_length=S.default_max_length,
        return_text=False,
    )


def test_options_and_instruction_are_carried() -> None:
    req = request(
        instruction="Find the shoe",
        options=pb.RerankOptions(top_n=2, score_kind=pb.SCORE_KIND_LOGIT, max_length=64, return_text=True),
    )
    job = codec.job_from_pb(req, S)
    assert job.instruction == "Find the shoe"
    assert job.options == domain.RerankOptions(2, domain.ScoreKind.LOGIT, 64, True)


def test_limits_are_inclusive() -> None:
    req = request(
        text("q" * S.max_text_bytes),
        [pb.Document(id="i" * S.max_id_bytes, content=text("é" * (S.max_text_bytes // 2)))] * S.max_documents,
        instruction="x" * S.max_instruction_bytes,
        options=pb.RerankOptions(top_n=S.max_documents, max_length=S.max_length),
    )
    job = codec.job_from_pb(req, S)
    assert len(job.documents) == S.max_documents


def test_nul_in_text_is_accepted() -> None:
    job = codec.job_from_pb(request(text("a\x00b")), S)
    assert job.query.text == "a\x00b"


def _doc(content: pb.Content, **kw: object) -> pb.Document:
    return pb.Document(content=content, **kw)  # type: ignore[arg-type]


Mutation = Callable[[], pb.RerankRequest]

# (case, request, reason, field path)
REJECTIONS: list[tuple[str, Mutation, str, str]] = [
    ("instruction empty", lambda: request(instruction=""), "EMPTY_TEXT", "instruction"),
    ("instruction blank", lambda: request(instruction=" \t\n"), "EMPTY_TEXT", "instruction"),
    ("instruction too large", lambda: request(instruction="é" * 17), "INSTRUCTION_TOO_LARGE", "instruction"),
    ("query unset", lambda: _without_query(), "FIELD_REQUIRED", "query"),
    ("query oneof unset", lambda: request(pb.Content()), "FIELD_REQUIRED", "query"),
    ("query empty text", lambda: request(text("")), "EMPTY_TEXT", "query.text"),
    ("query whitespace text", lambda: request(text("  \u3000")), "EMPTY_TEXT", "query.text"),
    ("query text too large", lambda: request(text("x" * 65)), "TEXT_TOO_LARGE", "query.text"),
    ("query image empty", lambda: request(image(b"")), "FIELD_REQUIRED", "query.image.data"),
    ("query image too large", lambda: request(image(b"x" * 4097)), "IMAGE_TOO_LARGE", "query.image.data"),
    ("query media unspecified", lambda: request(image(PNG, 0)), "INVALID_ENUM", "query.image.media_type"),
    ("query media unknown", lambda: request(image(PNG, 42)), "INVALID_ENUM", "query.image.media_type"),
    (
        "query text_image no image",
        lambda: request(pb.Content(text_image=pb.TextImage(text="t"))),
        "FIELD_REQUIRED",
        "query.text_image.image",
    ),
    (
        "query text_image empty text",
        lambda: request(text_image("", PNG)),
        "EMPTY_TEXT",
        "query.text_image.text",
    ),
    ("no documents", lambda: _no_documents(), "NO_DOCUMENTS", "documents"),
    ("too many documents", lambda: request(documents=[text("d")] * 5), "TOO_MANY_DOCUMENTS", "documents"),
    (
        "document content unset",
        lambda: request(documents=[text("ok"), pb.Document()]),
        "FIELD_REQUIRED",
        "documents[1].content",
    ),
    (
        "document oneof unset",
        lambda: request(documents=[pb.Content()]),
        "FIELD_REQUIRED",
        "documents[0].content",
    ),
    (
        "document empty text",
        lambda: request(documents=[text("a"), text("b"), text("")]),
        "EMPTY_TEXT",
        "documents[2].content.text",
    ),
    (
        "document text too large",
        lambda: request(documents=[text("é" * 33)]),
        "TEXT_TOO_LARGE",
        "documents[0].content.text",
    ),
    (
        "document text_image image data empty",
        lambda: request(documents=[text("a"), text("b"), text("c"), text_image("t", b"")]),
        "FIELD_REQUIRED",
        "documents[3].content.text_image.image.data",
    ),
    (
        "document text_image media unspecified",
        lambda: request(documents=[text_image("t", PNG, 0)]),
        "INVALID_ENUM",
        "documents[0].content.text_image.image.media_type",
    ),
    (
        "document image too large",
        lambda: request(documents=[image(b"x" * 4097, pb.MEDIA_TYPE_WEBP)]),
        "IMAGE_TOO_LARGE",
        "documents[0].content.image.data",
    ),
    (
        "document id too large",
        lambda: request(documents=[_doc(text("d"), id="123456789")]),
        "ID_TOO_LARGE",
        "documents[0].id",
    ),
    ("top_n zero", lambda: request(options=pb.RerankOptions(top_n=0)), "OUT_OF_RANGE", "options.top_n"),
    ("top_n too large", lambda: request(options=pb.RerankOptions(top_n=5)), "OUT_OF_RANGE", "options.top_n"),
    (
        "score_kind unspecified",
        lambda: request(options=pb.RerankOptions(score_kind=0)),
        "INVALID_ENUM",
        "options.score_kind",
    ),
    (
        "score_kind unknown",
        lambda: request(options=pb.RerankOptions(score_kind=9)),
        "INVALID_ENUM",  # type: ignore[arg-type]
        "options.score_kind",
    ),
    (
        "max_length too small",
        lambda: request(options=pb.RerankOptions(max_length=63)),
        "OUT_OF_RANGE",
        "options.max_length",
    ),
    (
        "max_length zero",
        lambda: request(options=pb.RerankOptions(max_length=0)),
        "OUT_OF_RANGE",
        "options.max_length",
    ),
    (
        "max_length too large",
        lambda: request(options=pb.RerankOptions(max_length=1025)),
        "OUT_OF_RANGE",
        "options.max_length",
    ),
]


def _without_query() -> pb.RerankRequest:
    req = request()
    req.ClearField("query")
    return req


def _no_documents() -> pb.RerankRequest:
    req = request()
    del req.documents[:]
    return req


@pytest.mark.parametrize(
    ("build", "reason", "path"), [c[1:] for c in REJECTIONS], ids=[c[0] for c in REJECTIONS]
)
def test_each_rule_rejects_with_reason_and_path(build: Mutation, reason: str, path: str) -> None:
    with pytest.raises(InvalidInput) as info:
        codec.job_from_pb(build(), S, request_id="rid")
    err = info.value
    assert (err.reason, [(v.field, v.reason) for v in err.violations]) == (reason, [(path, reason)])
    assert err.metadata == {"request_id": "rid"}
    assert path in err.message


def test_all_violations_are_collected_in_request_order() -> None:
    req = request(
        text(""),
        [text("ok"), image(b"", 0), pb.Document(id="x" * 9, content=text(" "))],
        instruction="",
        options=pb.RerankOptions(top_n=0, score_kind=0, max_length=1),
    )
    with pytest.raises(InvalidInput) as info:
        codec.job_from_pb(req, S)
    got = [(v.field, v.reason) for v in info.value.violations]
    assert got == [
        ("instruction", "EMPTY_TEXT"),
        ("query.text", "EMPTY_TEXT"),
        ("documents[1].content.image.data", "FIELD_REQUIRED"),
        ("documents[1].content.image.media_type", "INVALID_ENUM"),
        ("documents[2].id", "ID_TOO_LARGE"),
        ("documents[2].content.text", "EMPTY_TEXT"),
        ("options.top_n", "OUT_OF_RANGE"),
        ("options.score_kind", "INVALID_ENUM"),
        ("options.max_length", "OUT_OF_RANGE"),
    ]
    assert info.value.reason == "EMPTY_TEXT"
    assert "and 8 more" in info.value.message


def test_descriptions_state_the_limit_and_never_echo_content() -> None:
    secret = "s3cr3t" * 20
    with pytest.raises(InvalidInput) as info:
        codec.job_from_pb(request(text(secret)), S)
    (v,) = info.value.violations
    assert v.description == "is 120 bytes; the limit is 64"
    assert secret not in repr(info.value)


def test_violation_count_is_bounded() -> None:
    settings = small_settings(max_documents=500)
    with pytest.raises(InvalidInput) as info:
        codec.job_from_pb(request(documents=[text("")] * 500), settings)
    assert len(info.value.violations) == 64
    assert "and 499 more" in info.value.message


def test_decode_request_names_the_field_with_invalid_utf8() -> None:
    raw = request(documents=[text("fine"), pb.Document(id="ok", content=text("MARK"))]).SerializeToString()
    raw = raw.replace(b"MARK", b"M\xffRK")
    with pytest.raises(InvalidInput) as info:
        codec.decode_request(raw, request_id="r")
    assert info.value.reason == "INVALID_UTF8"
    assert [v.field for v in info.value.violations] == ["documents[1].content.text"]
    assert info.value.metadata == {"request_id": "r"}


def test_decode_request_rejects_garbage_and_accepts_valid_bytes() -> None:
    with pytest.raises(InvalidInput) as info:
        codec.decode_request(b"\x0a\xff\xff\xff\xff")
    assert info.value.reason == "INVALID_ARGUMENT"
    assert [v.field for v in info.value.violations] == ["request"]
    good = request(text("q"), [image(webp(), pb.MEDIA_TYPE_WEBP)])
    assert codec.decode_request(good.SerializeToString()) == good


# -- responses ------------------------------------------------------------------------------------

RESULT = domain.RerankResult(
    results=(
        domain.RankedDocument(index=1, score=0.9, id="b", text="hello", truncated=True),
        domain.RankedDocument(index=0, score=0.1),
    ),
    usage=domain.Usage(pairs=2, tokens=300, images=1, truncated_documents=1),
    timings=domain.Timings(queue=0.001, preprocessing=0.25, inference=1.5, total=2.000000001),
    model="tiny",
)


@pytest.mark.parametrize("render", [codec.result_to_pb, codec.result_to_stream_pb])
def test_result_rendering(render: Callable[[domain.RerankResult], pb.RerankResponse]) -> None:
    out = render(RESULT)
    assert [(r.index, r.score, r.truncated) for r in out.results] == [(1, 0.9, True), (0, 0.1, False)]
    first, second = out.results
    assert first.HasField("id") and first.id == "b" and first.text == "hello"
    assert not second.HasField("id") and not second.HasField("text")
    assert (out.usage.pairs, out.usage.tokens, out.usage.images, out.usage.truncated_documents) == (
        2,
        300,
        1,
        1,
    )
    assert out.timings.queue.ToNanoseconds() == 1_000_000
    assert out.timings.preprocessing.ToMilliseconds() == 250
    assert (out.timings.inference.seconds, out.timings.inference.nanos) == (1, 500_000_000)
    assert out.timings.total.ToNanoseconds() == 2_000_000_001
    assert out.model == "tiny"


def test_unary_and_stream_responses_are_byte_identical() -> None:
    assert (
        codec.result_to_pb(RESULT).SerializeToString()
        == codec.result_to_stream_pb(RESULT).SerializeToString()
    )


def test_server_info() -> None:
    info = domain.EngineInfo(
        model_id="m",
        model_revision="rev",
        dtype="float32",
        device="cpu",
        query_modalities=frozenset({domain.Modality.TEXT, domain.Modality.IMAGE}),
        document_modalities=frozenset({domain.Modality.IMAGE}),
        min_pixels=3136,
        max_pixels=100352,
        random_weights=True,
    )
    out = codec.server_info_to_pb(info, S, "1.2.3")
    assert (out.model_id, out.model_revision, out.dtype, out.device) == ("m", "rev", "float32", "cpu")
    assert list(out.query_modalities) == [pb.MODALITY_TEXT, pb.MODALITY_IMAGE]
    assert list(out.document_modalities) == [pb.MODALITY_IMAGE]
    assert out.server_version == "1.2.3" and out.random_weights
    lim = out.limits
    for name in (
        "max_documents",
        "max_instruction_bytes",
        "max_text_bytes",
        "max_image_bytes",
        "max_image_pixels",
        "max_id_bytes",
        "max_message_bytes",
        "max_request_bytes",
        "max_chunk_bytes",
        "max_length",
        "default_max_length",
    ):
        assert getattr(lim, name) == getattr(S, name), name
    assert (lim.min_pixels, lim.max_pixels) == (3136, 100352)
    assert list(lim.media_types) == [pb.MEDIA_TYPE_JPEG, pb.MEDIA_TYPE_PNG, pb.MEDIA_TYPE_WEBP]


def test_document_count_reads_tags_only_and_stops_early() -> None:
    head = pb.RerankRequest(query=pb.Content(text="q"), instruction="i").SerializeToString()
    doc = pb.RerankRequest(
        documents=[pb.Document(id="x", content=pb.Content(text="a b"))]
    ).SerializeToString()
    opts = pb.RerankRequest(options=pb.RerankOptions(top_n=3, return_text=True)).SerializeToString()
    for n in (0, 1, 7, 1500):
        wire = head + doc * n + opts
        assert codec.document_count(wire) == n == len(pb.RerankRequest.FromString(wire).documents)
    assert codec.document_count(head + doc * 5000, stop_after=1000) == 1001
    assert codec.document_count(head + doc * 10, stop_after=1000) == 10
    for bad in (b"\xff", b"\x12\x05ab", b"\x0b", head[:-1]):
        assert codec.document_count(bad) is None
