"""Protobuf encoding and decoding, kept free of channels so it is unit-testable.

Two transports carry the same request. ``Rerank`` sends one message and is cheapest for
ordinary payloads; ``RerankStream`` exists because a single gRPC message is capped
(``Limits.max_message_bytes``), so multi-megabyte images go as a header, then per item an
``ItemStart`` declaring exact sizes and ``ItemChunk`` pieces of at most ``max_chunk_bytes``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from typing import Literal

from google.protobuf.duration_pb2 import Duration

from lychee.rerank.v1 import rerank_pb2 as pb

from ._errors import ServerError
from ._inputs import Item
from ._types import (
    MEDIA_TYPES,
    EncodedImage,
    Limits,
    MediaType,
    Progress,
    RankedDocument,
    RerankResult,
    ScoreKind,
    ServerInfo,
    Timings,
    Usage,
)

KiB = 1024
MiB = 1024 * KiB
PROTOCOL_MAX_CHUNK_BYTES = 256 * KiB
"""The protocol's hard ceiling on one ``ItemChunk`` payload."""
DEFAULT_STREAM_THRESHOLD_BYTES = 3 * MiB
"""Used when the server's limits are unknown: comfortably below gRPC's common 4 MiB cap."""
STREAM_THRESHOLD_FRACTION = 0.75
"""Share of ``max_message_bytes`` a unary payload may use; the rest covers protobuf framing."""
ALWAYS_UNARY_BYTES = 512 * KiB
"""Below this the unary call is always safe (servers accept at least 1 MiB), so the client
does not spend a GetServerInfo round trip deciding."""
_PER_ITEM_OVERHEAD = 32
"""Generous protobuf framing per item (tags, lengths, media type) for size estimates."""

_MEDIA_TO_PB: dict[MediaType, pb.MediaType.ValueType] = {
    "image/jpeg": pb.MEDIA_TYPE_JPEG,
    "image/png": pb.MEDIA_TYPE_PNG,
    "image/webp": pb.MEDIA_TYPE_WEBP,
}
_PB_TO_MEDIA: dict[int, MediaType] = {int(v): k for k, v in _MEDIA_TO_PB.items()}
_SCORE_KIND_TO_PB: dict[ScoreKind, pb.ScoreKind.ValueType] = {
    "probability": pb.SCORE_KIND_PROBABILITY,
    "logit": pb.SCORE_KIND_LOGIT,
}
_MODALITIES: dict[int, Literal["text", "image"]] = {
    int(pb.MODALITY_TEXT): "text",
    int(pb.MODALITY_IMAGE): "image",
}


def build_options(
    *,
    top_n: int | None,
    score_kind: ScoreKind,
    max_length: int | None,
    return_text: bool,
) -> pb.RerankOptions:
    """Options message; range checks beyond "fits the wire type" are the server's job so that
    its limits (which differ per deployment) stay the single source of truth."""
    if score_kind not in _SCORE_KIND_TO_PB:
        raise ValueError(f"score_kind must be 'probability' or 'logit', got {score_kind!r}")
    options = pb.RerankOptions(score_kind=_SCORE_KIND_TO_PB[score_kind], return_text=return_text)
    if top_n is not None:
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
            raise ValueError(f"top_n must be a positive int or None, got {top_n!r}")
        options.top_n = top_n
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        options.max_length = max_length
    return options


def _image(image: EncodedImage) -> pb.Image:
    return pb.Image(data=image.data, media_type=_MEDIA_TO_PB[image.media_type])


def to_content(item: Item) -> pb.Content:
    """The ``Content`` oneof for an item (text, image, or text_image)."""
    if item.image is None:
        return pb.Content(text=item.text if item.text is not None else "")
    if item.text is None:
        return pb.Content(image=_image(item.image))
    return pb.Content(text_image=pb.TextImage(text=item.text, image=_image(item.image)))


def payload_size(query: Item, documents: Sequence[Item], instruction: str | None) -> int:
    """An upper estimate of the unary request's serialized size."""
    size = query.payload_bytes + _PER_ITEM_OVERHEAD
    size += sum(d.payload_bytes + _PER_ITEM_OVERHEAD for d in documents)
    return size + (len(instruction.encode("utf-8")) if instruction is not None else 0) + 64


def stream_threshold(limits: Limits | None) -> int:
    """Largest payload sent unary: a fraction of the server's message cap, or a safe default."""
    if limits is None or limits.max_message_bytes <= 0:
        return DEFAULT_STREAM_THRESHOLD_BYTES
    return int(limits.max_message_bytes * STREAM_THRESHOLD_FRACTION)


def effective_chunk_bytes(requested: int, limits: Limits | None) -> int:
    """The chunk size to use: the caller's choice, capped by the protocol and the server."""
    size = min(requested, PROTOCOL_MAX_CHUNK_BYTES)
    if limits is not None and limits.max_chunk_bytes > 0:
        size = min(size, limits.max_chunk_bytes)
    return max(1, size)


def build_request(
    query: Item, documents: Sequence[Item], instruction: str | None, options: pb.RerankOptions
) -> pb.RerankRequest:
    request = pb.RerankRequest(query=to_content(query), options=options)
    if instruction is not None:
        request.instruction = instruction
    for doc in documents:
        document = request.documents.add()
        document.content.CopyFrom(to_content(doc))
        if doc.id is not None:
            document.id = doc.id
    return request


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


def _item_messages(item: Item, chunk_bytes: int) -> Iterator[pb.RerankStreamRequest]:
    start = pb.ItemStart(text_bytes=len(item.text_bytes))
    if item.id is not None:
        start.id = item.id
    if item.image is not None:
        start.image_bytes = len(item.image.data)
        start.image_media_type = _MEDIA_TO_PB[item.image.media_type]
    yield pb.RerankStreamRequest(item=start)
    for piece in _chunks(item.text_bytes, chunk_bytes):
        yield pb.RerankStreamRequest(chunk=pb.ItemChunk(text=piece))
    if item.image is not None:
        for piece in _chunks(item.image.data, chunk_bytes):
            yield pb.RerankStreamRequest(chunk=pb.ItemChunk(image=piece))


def stream_messages(
    query: Item,
    documents: Sequence[Item],
    instruction: str | None,
    options: pb.RerankOptions,
    chunk_bytes: int,
) -> Iterator[pb.RerankStreamRequest]:
    """The ``RerankStream`` message sequence for one request.

    The query rides inline in the header when it fits one chunk (one message fewer);
    otherwise it is streamed as the first item exactly like a document. A generator, so a
    large request is sliced lazily as gRPC pulls messages instead of being copied up front.
    """
    if chunk_bytes < 1 or chunk_bytes > PROTOCOL_MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{PROTOCOL_MAX_CHUNK_BYTES}, got {chunk_bytes}")
    header = pb.StreamHeader(document_count=len(documents), options=options)
    if instruction is not None:
        header.instruction = instruction
    inline = query.payload_bytes <= chunk_bytes
    if inline:
        header.query.CopyFrom(to_content(query))
    yield pb.RerankStreamRequest(header=header)
    if not inline:
        yield from _item_messages(query, chunk_bytes)
    for doc in documents:
        yield from _item_messages(doc, chunk_bytes)


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


_PHASES = {
    pb.PROGRESS_PHASE_QUEUED: "queued",
    pb.PROGRESS_PHASE_PREPARING: "preparing",
    pb.PROGRESS_PHASE_SCORING: "scoring",
    pb.PROGRESS_PHASE_DONE: "done",
}


def decode_progress(msg: pb.Progress) -> Progress:
    return Progress(
        phase=_PHASES.get(msg.phase, "unknown"),
        pairs_total=msg.pairs_total,
        pairs_prepared=msg.pairs_prepared,
        pairs_scored=msg.pairs_scored,
    )


def with_progress_result(
    messages: Iterable[pb.RerankWithProgressResponse], on_progress: Callable[[Progress], None]
) -> pb.RerankResponse:
    """Hand each progress message to ``on_progress``; return the final result message."""
    for msg in messages:
        if msg.HasField("progress"):
            on_progress(decode_progress(msg.progress))
        elif msg.HasField("result"):
            return msg.result
    raise ServerError("the progress stream ended without a result")


async def with_progress_result_async(
    messages: AsyncIterable[pb.RerankWithProgressResponse], on_progress: Callable[[Progress], None]
) -> pb.RerankResponse:
    """The async twin of :func:`with_progress_result`."""
    async for msg in messages:
        if msg.HasField("progress"):
            on_progress(decode_progress(msg.progress))
        elif msg.HasField("result"):
            return msg.result
    raise ServerError("the progress stream ended without a result")


def decode_result(
    response: pb.RerankResponse | pb.RerankStreamResponse, n_documents: int, *, streamed: bool
) -> RerankResult:
    """Decode a response, checking the contract the caller relies on to index its inputs.

    An index outside the request or repeated would silently attach a score to the wrong
    document downstream, so it is a :class:`ServerError` rather than something to trust.
    """
    seen: set[int] = set()
    results: list[RankedDocument] = []
    for r in response.results:
        if r.index >= n_documents:
            raise ServerError(
                f"server returned index {r.index} for a request of {n_documents} documents",
                reason="INVALID_RESPONSE",
            )
        if r.index in seen:
            raise ServerError(f"server returned index {r.index} twice", reason="INVALID_RESPONSE")
        seen.add(r.index)
        results.append(
            RankedDocument(
                index=r.index,
                score=r.score,
                id=r.id if r.HasField("id") else None,
                text=r.text if r.HasField("text") else None,
                truncated=r.truncated,
            )
        )
    usage = Usage(
        pairs=response.usage.pairs,
        tokens=response.usage.tokens,
        images=response.usage.images,
        truncated_documents=response.usage.truncated_documents,
    )
    timings = Timings(
        queue=_seconds(response.timings.queue),
        preprocessing=_seconds(response.timings.preprocessing),
        inference=_seconds(response.timings.inference),
        total=_seconds(response.timings.total),
    )
    return RerankResult(tuple(results), usage, timings, response.model, streamed)


def decode_server_info(response: pb.GetServerInfoResponse) -> ServerInfo:
    lim = response.limits
    media_types = tuple(_PB_TO_MEDIA[int(m)] for m in lim.media_types if int(m) in _PB_TO_MEDIA)
    limits = Limits(
        max_documents=lim.max_documents,
        max_instruction_bytes=lim.max_instruction_bytes,
        max_text_bytes=lim.max_text_bytes,
        max_image_bytes=lim.max_image_bytes,
        max_image_pixels=lim.max_image_pixels,
        max_id_bytes=lim.max_id_bytes,
        max_message_bytes=lim.max_message_bytes,
        max_request_bytes=lim.max_request_bytes,
        max_chunk_bytes=lim.max_chunk_bytes,
        max_length=lim.max_length,
        default_max_length=lim.default_max_length,
        min_pixels=lim.min_pixels,
        max_pixels=lim.max_pixels,
        media_types=media_types or MEDIA_TYPES,
    )
    return ServerInfo(
        model_id=response.model_id,
        model_revision=response.model_revision,
        dtype=response.dtype,
        device=response.device,
        query_modalities=frozenset(
            _MODALITIES[int(m)] for m in response.query_modalities if int(m) in _MODALITIES
        ),
        document_modalities=frozenset(
            _MODALITIES[int(m)] for m in response.document_modalities if int(m) in _MODALITIES
        ),
        limits=limits,
        server_version=response.server_version,
        random_weights=response.random_weights,
        quantization=response.quantization or "none",
        attention=response.attention,
    )
