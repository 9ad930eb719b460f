"""Property tests of the edge: whatever arrives, the codec and the stream assembler either return
a valid job or raise ``InvalidInput`` with a contract reason and a field path -- never anything else.

Deterministic (``derandomize=True``, no example database) and sized so that the module drives
more than 10,000 generated requests through the edge in well under a minute on 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from edge.builders import Item, item_messages, small_settings, stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server import domain
from lychee_server.edge import codec
from lychee_server.edge.stream import StreamAssembler
from lychee_server.errors import InvalidInput

S = small_settings()
REASONS = {n.removeprefix("ERROR_REASON_") for n in pb.ErrorReason.DESCRIPTOR.values_by_name} - {
    "UNSPECIFIED"
}
COUNTS: dict[str, int] = {"requests": 0, "accepted": 0, "rejected": 0}


def fuzz(max_examples: int) -> settings:
    """Deterministic settings: the same examples on every run and machine, nothing stored."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _check_job(job: domain.RerankJob) -> None:
    """What the core may rely on for every job the edge lets through."""
    assert 1 <= len(job.documents) <= S.max_documents
    contents = [job.query, *(d.content for d in job.documents)]
    for c in contents:
        assert c.text is not None or c.image is not None
        if c.text is not None:
            assert c.text.strip() and len(c.text.encode("utf-8", "surrogatepass")) <= S.max_text_bytes
        if c.image is not None:
            assert 0 < len(c.image.data) <= S.max_image_bytes
    assert job.instruction.strip()
    assert 64 <= job.options.max_length <= S.max_length
    assert job.options.top_n is None or 1 <= job.options.top_n <= S.max_documents


def _through_edge(parse: Callable[[], domain.RerankJob]) -> None:
    COUNTS["requests"] += 1
    try:
        job = parse()
    except InvalidInput as err:
        COUNTS["rejected"] += 1
        assert err.reason in REASONS
        assert err.violations and all(v.field for v in err.violations)
        assert all(v.reason in REASONS for v in err.violations)
        assert err.violations[0].reason == err.reason
        return
    COUNTS["accepted"] += 1
    _check_job(job)


# -- unary: random bytes -------------------------------------------------------------------------


@fuzz(3000)
@given(st.binary(max_size=300))
def test_random_bytes_as_rerank_request(data: bytes) -> None:
    _through_edge(lambda: codec.job_from_pb(codec.decode_request(data), S))


# -- unary: structured random messages -----------------------------------------------------------

texts = st.one_of(
    st.sampled_from(["", " ", "\t\n", "\x00", "é" * 33, "q" * 64, "q" * 65, "ok"]),
    st.text(max_size=70),
)
images = st.builds(
    pb.Image,
    data=st.one_of(st.just(b""), st.binary(max_size=40), st.just(b"x" * 4097)),
    media_type=st.integers(-2, 5),
)
contents = st.one_of(
    st.just(pb.Content()),
    st.builds(pb.Content, text=texts),
    st.builds(pb.Content, image=images),
    st.builds(lambda t, i: pb.Content(text_image=pb.TextImage(text=t, image=i)), texts, images),
    st.builds(lambda t: pb.Content(text_image=pb.TextImage(text=t)), texts),
)


@st.composite
def documents(draw: st.DrawFn) -> pb.Document:
    doc = pb.Document()
    if draw(st.booleans()):
        doc.id = draw(st.text(max_size=10))
    if draw(st.integers(0, 9)):
        doc.content.CopyFrom(draw(contents))
    return doc


uint32 = st.one_of(st.integers(0, 1100), st.integers(0, 2**32 - 1))


@st.composite
def options(draw: st.DrawFn) -> pb.RerankOptions:
    opts = pb.RerankOptions(return_text=draw(st.booleans()))
    if draw(st.booleans()):
        opts.top_n = draw(uint32)
    if draw(st.booleans()):
        opts.score_kind = draw(st.integers(-1, 4))  # type: ignore[assignment]
    if draw(st.booleans()):
        opts.max_length = draw(uint32)
    return opts


@st.composite
def requests(draw: st.DrawFn) -> pb.RerankRequest:
    req = pb.RerankRequest(documents=draw(st.lists(documents(), max_size=6)))
    if draw(st.booleans()):
        req.instruction = draw(texts)
    if draw(st.integers(0, 9)):
        req.query.CopyFrom(draw(contents))
    if draw(st.booleans()):
        req.options.CopyFrom(draw(options()))
    return req


@fuzz(3000)
@given(requests())
def test_structured_random_requests(req: pb.RerankRequest) -> None:
    _through_edge(lambda: codec.job_from_pb(req, S))
    # The same request over the wire must parse to the same outcome.
    wire = req.SerializeToString()
    _through_edge(lambda: codec.job_from_pb(codec.decode_request(wire), S))


# -- streams -------------------------------------------------------------------------------------


@st.composite
def raw_messages(draw: st.DrawFn) -> pb.RerankStreamRequest:
    kind = draw(st.sampled_from(["header", "item", "chunk", "none"]))
    if kind == "header":
        h = pb.StreamHeader(document_count=draw(st.integers(0, 6)))
        if draw(st.booleans()):
            h.query.CopyFrom(draw(contents))
        if draw(st.booleans()):
            h.instruction = draw(texts)
        if draw(st.booleans()):
            h.options.CopyFrom(draw(options()))
        return pb.RerankStreamRequest(header=h)
    if kind == "item":
        start = pb.ItemStart(
            text_bytes=draw(st.integers(0, 80)),
            image_bytes=draw(st.integers(0, 130)),
            image_media_type=draw(st.integers(0, 4)),  # type: ignore[arg-type]
        )
        if draw(st.booleans()):
            start.id = draw(st.text(max_size=10))
        return pb.RerankStreamRequest(item=start)
    if kind == "chunk":
        part = draw(st.sampled_from(["text", "image", None]))
        data = draw(st.binary(max_size=110))
        c = pb.ItemChunk(**({part: data} if part else {}))  # type: ignore[arg-type]
        return pb.RerankStreamRequest(chunk=c)
    return pb.RerankStreamRequest()


def _assemble(msgs: list[pb.RerankStreamRequest]) -> domain.RerankJob:
    asm = StreamAssembler(S, "fuzz")
    for m in msgs:
        asm.feed(m)
    return asm.finish()


@fuzz(2000)
@given(st.lists(raw_messages(), max_size=12))
def test_random_stream_message_sequences(msgs: list[pb.RerankStreamRequest]) -> None:
    _through_edge(lambda: _assemble(msgs))


@st.composite
def items(draw: st.DrawFn) -> Item:
    """Items that are usually valid (so mutations, not the item itself, decide the outcome)."""
    text = draw(
        st.one_of(st.just(b""), st.text(min_size=1, max_size=30).map(str.encode), st.binary(max_size=70))
    )
    image = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=150)))
    if not text and not image:
        text = b"fallback"
    valid_media = pb.MEDIA_TYPE_PNG if image else pb.MEDIA_TYPE_UNSPECIFIED
    media = draw(st.sampled_from([valid_media] * 6 + [0, 1, 3, 9]))
    return Item(
        text=text,
        image=image,
        media=media,
        id=draw(st.one_of(st.none(), st.text(max_size=9))),
        chunk=draw(st.integers(1, 120)),
        interleave=draw(st.booleans()),
    )


def _without_id(item: Item) -> Item:
    item.id = None
    return item


@st.composite
def mutated_streams(draw: st.DrawFn) -> list[pb.RerankStreamRequest]:
    """Mostly well-formed streams, then one structural mutation (drop, duplicate, move, cut)."""
    docs = draw(st.lists(items(), min_size=1, max_size=4))
    query = draw(st.one_of(st.none(), items().map(_without_id)))
    msgs = stream(docs, query=query)
    mutation = draw(st.sampled_from(["none", "drop", "duplicate", "move", "cut"]))
    if mutation != "none" and msgs:
        i = draw(st.integers(0, len(msgs) - 1))
        if mutation == "drop":
            del msgs[i]
        elif mutation == "duplicate":
            msgs.insert(i, msgs[i])
        elif mutation == "move":
            msgs.insert(draw(st.integers(0, len(msgs) - 1)), msgs.pop(i))
        else:
            del msgs[i:]
    return msgs


@fuzz(2000)
@given(mutated_streams())
def test_mutated_streams(msgs: list[pb.RerankStreamRequest]) -> None:
    _through_edge(lambda: _assemble(msgs))


def test_well_formed_stream_is_accepted() -> None:
    """Guards the generators above: a clean stream built by the same helpers must pass."""
    msgs = stream([Item(b"doc", id="a")], query=Item(b"query"))
    assert _assemble(msgs).documents[0].id == "a"
    assert item_messages(Item(b"x"))[0].item.text_bytes == 1


def test_fuzzed_request_count(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last in this module: the properties above must have pushed >= 10,000 requests through."""
    if COUNTS["requests"] == 0:
        pytest.skip("run the whole module to count fuzzed requests")
    with capsys.disabled():
        print(f"\nfuzzed edge requests: {COUNTS}")
    assert COUNTS["requests"] >= 10_000
    assert COUNTS["accepted"] > 100 and COUNTS["rejected"] > 1000  # both outcomes are exercised
