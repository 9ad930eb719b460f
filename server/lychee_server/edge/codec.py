"""Protobuf <-> domain conversion for the unary RPCs ("parse, don't validate").

Why: the scheduler and the engine must only ever see typed, already-valid values
(:mod:`lychee_server.domain`). This module is the single place where a ``RerankRequest`` is
parsed into a :class:`~lychee_server.domain.RerankJob` -- applying the rule table of
:mod:`lychee_server.edge.validation` and reporting *every* violation at once -- and where
results are rendered back into response messages. Protobuf types stop here.

The per-part parsers (:func:`instruction_from_pb`, :func:`content_from_pb`,
:func:`options_from_pb`) are shared with :mod:`lychee_server.edge.stream`, which parses the
``StreamHeader`` with them, so both RPCs enforce literally the same rules. They only take the
values out of the messages and name their paths: the rules and defaults live in
:mod:`lychee_server.edge.parts`, which the HTTP door uses too.
"""

from __future__ import annotations

import functools
import itertools
from typing import TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server import domain
from lychee_server.edge import parts
from lychee_server.edge.validation import Collector, Slot
from lychee_server.errors import FieldViolation, InvalidInput
from lychee_server.settings import Settings

__all__ = [
    "MEDIA_TYPES",
    "SCORE_KINDS",
    "check_response_size",
    "content_from_pb",
    "decode_message",
    "decode_request",
    "decode_stream_request",
    "document_count",
    "inner_request",
    "instruction_from_pb",
    "job_from_pb",
    "options_from_pb",
    "progress_to_pb",
    "require_response_fits",
    "result_to_pb",
    "result_to_stream_pb",
    "server_info_to_pb",
]

MEDIA_TYPES: dict[pb.MediaType.ValueType, domain.MediaType] = {
    pb.MediaType.ValueType(n): t for n, t in parts.MEDIA_TYPE_NUMBERS.items()
}
SCORE_KINDS: dict[pb.ScoreKind.ValueType, domain.ScoreKind] = {
    pb.ScoreKind.ValueType(n): k for n, k in parts.SCORE_KIND_NUMBERS.items()
}
_MODALITIES: dict[domain.Modality, pb.Modality.ValueType] = {
    domain.Modality.TEXT: pb.MODALITY_TEXT,
    domain.Modality.IMAGE: pb.MODALITY_IMAGE,
}


# --------------------------------------------------------------------------------------------
# Request parsing


def job_from_pb(req: pb.RerankRequest, settings: Settings, *, request_id: str = "") -> domain.RerankJob:
    """Parse a ``RerankRequest`` into a ``RerankJob`` or raise one ``InvalidInput`` listing every
    violation (reason = the first violation's reason)."""
    c = Collector(settings, request_id)
    instruction = instruction_from_pb(req, "instruction", c)
    query = content_from_pb(req.query if req.HasField("query") else None, "query", c)

    documents: list[domain.Document] = []
    count_ok = c.check(Slot.DOCUMENT_COUNT, "documents", len(req.documents))
    if count_ok:  # past max_documents the per-document report would be noise (and unbounded work)
        for i, doc in enumerate(req.documents):
            parsed = document_from_pb(doc, f"documents[{i}]", c)
            if parsed is not None:
                documents.append(parsed)

    options = options_from_pb(req.options, "options", c)
    c.raise_if_any()
    assert query is not None  # the collector is empty, so every part parsed
    return domain.RerankJob(
        instruction=instruction,
        query=query,
        documents=tuple(documents),
        options=options,
        request_id=request_id,
    )


def instruction_from_pb(msg: pb.RerankRequest | pb.StreamHeader, path: str, c: Collector) -> str:
    """Unset = the default instruction; set = must be non-blank and within the byte limit."""
    return parts.instruction(msg.instruction if msg.HasField("instruction") else None, path, c)


def image_from_pb(image: pb.Image | None, path: str, c: Collector) -> domain.ImageInput | None:
    if image is None:
        return parts.image(None, 0, path, c)
    return parts.image(image.data, int(image.media_type), path, c)


def content_from_pb(content: pb.Content | None, path: str, c: Collector) -> domain.Content | None:
    """Parse a ``Content`` (``None`` = the message field is unset); violations go to ``c``."""
    kind = content.WhichOneof("kind") if content is not None else None
    if kind is None or content is None:
        return parts.content(None, None, text_given=False, image_given=False, path=path, c=c)
    if kind == "text":
        text = parts.text(content.text, f"{path}.text", c)
        return parts.content(text, None, text_given=True, image_given=False, path=path, c=c)
    if kind == "image":
        image = image_from_pb(content.image, f"{path}.image", c)
        return parts.content(None, image, text_given=False, image_given=True, path=path, c=c)
    ti = content.text_image
    text = parts.text(ti.text, f"{path}.text_image.text", c)
    image = image_from_pb(ti.image if ti.HasField("image") else None, f"{path}.text_image.image", c)
    return parts.content(text, image, text_given=True, image_given=True, path=path, c=c)


def document_from_pb(doc: pb.Document, path: str, c: Collector) -> domain.Document | None:
    doc_id = doc.id if doc.HasField("id") else None
    id_ok = parts.document_id(doc_id, path, c)
    content = content_from_pb(doc.content if doc.HasField("content") else None, f"{path}.content", c)
    return None if content is None or not id_ok else domain.Document(content=content, id=doc_id)


def options_from_pb(opts: pb.RerankOptions, path: str, c: Collector) -> domain.RerankOptions:
    """Unset fields take the defaults (all documents, probability, ``settings.default_max_length``)."""
    return parts.options(
        top_n=opts.top_n if opts.HasField("top_n") else None,
        score_kind=int(opts.score_kind) if opts.HasField("score_kind") else None,
        max_length=opts.max_length if opts.HasField("max_length") else None,
        return_text=opts.return_text,
        path=lambda name: f"{path}.{name}",
        c=c,
    )


# --------------------------------------------------------------------------------------------
# Raw bytes: for a servicer that registers Rerank with a pass-through deserializer, so that an
# undecodable message becomes INVALID_ARGUMENT (with the bad field when it is bad UTF-8)
# instead of gRPC's generic "Exception deserializing request!".


def decode_request(data: bytes, *, request_id: str = "", max_items: int | None = None) -> pb.RerankRequest:
    """Parse wire bytes into a ``RerankRequest`` or raise ``InvalidInput``.

    Protobuf rejects a string field holding invalid UTF-8 without saying which; we then re-parse
    with a variant schema whose strings are bytes to name the field (reason INVALID_UTF8). The
    search looks at no more than ``max_items`` entries of any repeated field (pass
    ``max_documents``): a bad string beyond them is reported on ``request``. Bytes that are not a
    message at all are INVALID_ARGUMENT on the path ``request``.
    """
    return decode_message(data, pb.RerankRequest, request_id=request_id, max_items=max_items)


def decode_stream_request(
    data: bytes | pb.RerankStreamRequest, index: int, request_id: str = ""
) -> pb.RerankStreamRequest:
    """One ``RerankStream`` message from wire bytes (``index``: its position, for the message)."""
    if isinstance(data, pb.RerankStreamRequest):
        return data
    return decode_message(data, pb.RerankStreamRequest, request_id=request_id, what=f"stream message {index}")


_M = TypeVar("_M", bound=Message)


def decode_message(
    data: bytes,
    cls: type[_M],
    *,
    request_id: str = "",
    what: str = "the request bytes",
    max_items: int | None = None,
) -> _M:
    """Parse ``data`` as ``cls`` (a message of rerank.proto) or raise ``InvalidInput``:
    INVALID_UTF8 on the bad string's path, else INVALID_ARGUMENT on ``request``."""
    try:
        return cls.FromString(data)
    except DecodeError:
        pass
    metadata = {"request_id": request_id} if request_id else {}
    name = cls.DESCRIPTOR.name
    descriptor = pb.DESCRIPTOR.message_types_by_name[name]
    bad = _find_bad_utf8(data, descriptor, max_items)
    if bad is not None:
        where = bad or "request"
        description = "is not valid UTF-8"
        if not bad:
            description = f"a string field is not valid UTF-8 (not within the first {max_items} items)"
        raise InvalidInput(
            f"{where}: {description}",
            reason="INVALID_UTF8",
            violations=[FieldViolation(where, description, "INVALID_UTF8")],
            metadata=metadata,
        )
    raise InvalidInput(
        f"{what} are not a valid {name}" if what == "the request bytes" else f"{what} is not a valid {name}",
        reason="INVALID_ARGUMENT",
        violations=[FieldViolation("request", f"is not a valid {name} encoding", "INVALID_ARGUMENT")],
        metadata=metadata,
    )


@functools.cache
def _shallow_variant(full_name: str) -> type[Message]:
    """The message class ``full_name`` from a private copy of rerank.proto where every string is
    bytes (so invalid UTF-8 parses) and every *repeated message* field is repeated bytes.

    The second change keeps the parse shallow: a request with two million documents parses in
    ~20 ms instead of ~160 ms (upb holds the GIL throughout, so this is event-loop time too), and
    only the entries that are looked at are parsed, one by one.
    """
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    t = descriptor_pb2.FieldDescriptorProto
    for message in fdp.message_type:
        for fld in message.field:
            if fld.type == t.TYPE_STRING:
                fld.type = t.TYPE_BYTES
            elif fld.type == t.TYPE_MESSAGE and fld.label == t.LABEL_REPEATED:
                fld.type = t.TYPE_BYTES
                fld.ClearField("type_name")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(duration_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


@functools.cache
def _wrapper_variant() -> type[Message]:
    """``RerankWithProgressRequest`` with its ``request`` field as bytes (a private copy)."""
    fdp = descriptor_pb2.FileDescriptorProto(name="lychee_private_wrapper.proto", package="lychee.private")
    msg = fdp.message_type.add(name="Wrapper")
    t = descriptor_pb2.FieldDescriptorProto
    msg.field.add(name="request", number=1, type=t.TYPE_BYTES, label=t.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("lychee.private.Wrapper"))


def inner_request(
    data: bytes | pb.RerankWithProgressRequest, *, request_id: str = ""
) -> bytes | pb.RerankRequest:
    """The ``RerankRequest`` inside a ``RerankWithProgressRequest``: still as wire bytes when
    ``data`` is bytes, so it is parsed (and its errors are named) exactly as a ``Rerank`` request."""
    if isinstance(data, pb.RerankWithProgressRequest):
        return data.request
    try:
        wrapper = _wrapper_variant().FromString(data)
    except DecodeError:
        raise InvalidInput(
            "the request bytes are not a valid RerankWithProgressRequest",
            reason="INVALID_ARGUMENT",
            violations=[FieldViolation("request", "is not a valid RerankWithProgressRequest encoding")],
            metadata={"request_id": request_id} if request_id else {},
        ) from None
    return bytes(wrapper.request)  # type: ignore[attr-defined]


_PHASES: dict[domain.Phase, pb.ProgressPhase.ValueType] = {
    domain.Phase.QUEUED: pb.PROGRESS_PHASE_QUEUED,
    domain.Phase.PREPARING: pb.PROGRESS_PHASE_PREPARING,
    domain.Phase.SCORING: pb.PROGRESS_PHASE_SCORING,
    domain.Phase.DONE: pb.PROGRESS_PHASE_DONE,
}


def progress_to_pb(progress: domain.Progress) -> pb.RerankWithProgressResponse:
    return pb.RerankWithProgressResponse(
        progress=pb.Progress(
            phase=_PHASES[progress.phase],
            pairs_total=progress.pairs_total,
            pairs_prepared=progress.pairs_prepared,
            pairs_scored=progress.pairs_scored,
        )
    )


def document_count(data: bytes, stop_after: int | None = None) -> int | None:
    """How many documents a RerankRequest's wire bytes carry, counted from the top-level field tags
    without parsing any message (``None`` when the bytes are not a well-formed message at the top
    level). With ``stop_after``, counting stops once it is exceeded (the result is then
    ``stop_after + 1``): a request with millions of documents is refused after reading about
    ``stop_after`` tags, in plain Python that gives the GIL up as it goes, instead of a 50 ms
    parse that holds it (and the event loop with it) for every such upload."""
    field = pb.RerankRequest.DESCRIPTOR.fields_by_name["documents"].number
    n = len(data)
    pos = 0
    count = 0
    while pos < n:
        tag, pos = _varint(data, pos)
        if tag is None:
            return None
        number, wire = tag >> 3, tag & 7
        if wire == 2:
            length, pos = _varint(data, pos)
            if length is None or pos + length > n:
                return None
            pos += length
            if number == field:
                count += 1
                if stop_after is not None and count > stop_after:
                    return count
        elif wire == 0:
            value, pos = _varint(data, pos)
            if value is None:
                return None
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            return None
    return count if pos == n else None


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    """A base-128 varint at ``pos``: (value, next position), or (None, pos) when malformed."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            return None, pos
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    return None, pos


def _find_bad_utf8(data: bytes, descriptor: Descriptor, max_items: int | None) -> str | None:
    """The path of the first string that is not UTF-8; ``""`` when the bytes are a valid message
    apart from UTF-8 but the bad string is past ``max_items`` entries of a repeated field; ``None``
    when they are no message at all."""
    try:
        found = _walk_bad_utf8(data, descriptor, "", max_items)
    except DecodeError:
        return None
    return "" if found is None else found


def _walk_bad_utf8(data: bytes, original: Descriptor, prefix: str, max_items: int | None) -> str | None:
    msg = _shallow_variant(original.full_name).FromString(data)
    for fld, value in msg.ListFields():
        orig = original.fields_by_name[fld.name]
        path = f"{prefix}.{fld.name}" if prefix else fld.name
        repeated = _is_repeated(fld)
        values = itertools.islice(value, max_items) if repeated else [value]
        if orig.type == FieldDescriptor.TYPE_STRING:
            for i, raw in enumerate(values):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{path}[{i}]" if repeated else path
        elif orig.message_type is not None and orig.message_type.file is pb.DESCRIPTOR:
            for i, child in enumerate(values):
                raw_child = child if isinstance(child, bytes) else child.SerializeToString()
                found = _walk_bad_utf8(
                    raw_child, orig.message_type, f"{path}[{i}]" if repeated else path, max_items
                )
                if found is not None:
                    return found
    return None


def _is_repeated(fld: FieldDescriptor) -> bool:
    return bool(fld.is_repeated)


# --------------------------------------------------------------------------------------------
# Responses


# Bytes a RankedDocument costs besides its id and text: the entry's tag and length, index, score,
# truncated, and the id/text tags and lengths (varints at their widest for these sizes).
_RESULT_OVERHEAD = 32
_PATHS = parts.ResponsePaths(top_n="options.top_n", return_text="options.return_text")


def check_response_size(job: domain.RerankJob, limit: int, *, request_id: str = "") -> None:
    """INVALID_ARGUMENT / RESPONSE_TOO_LARGE before any scoring when the answer could not be sent."""
    parts.check_response_size(job, limit, _RESULT_OVERHEAD, _PATHS, request_id=request_id)


def require_response_fits(size: int, limit: int, *, request_id: str = "") -> None:
    """The same error for a rendered response (the backstop after scoring)."""
    parts.require_response_fits(size, limit, _PATHS, request_id=request_id)


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(max(seconds, 0.0) * 1e9))
    return d


def _fill(out: pb.RerankResponse | pb.RerankStreamResponse, result: domain.RerankResult) -> None:
    """The one renderer behind both response types (they have identical fields by contract)."""
    for r in result.results:
        ranked = out.results.add(index=r.index, score=r.score, truncated=r.truncated)
        if r.id is not None:
            ranked.id = r.id
        if r.text is not None:
            ranked.text = r.text
    u = result.usage
    out.usage.pairs = u.pairs
    out.usage.tokens = u.tokens
    out.usage.images = u.images
    out.usage.truncated_documents = u.truncated_documents
    t = result.timings
    out.timings.queue.CopyFrom(_duration(t.queue))
    out.timings.preprocessing.CopyFrom(_duration(t.preprocessing))
    out.timings.inference.CopyFrom(_duration(t.inference))
    out.timings.total.CopyFrom(_duration(t.total))
    out.model = result.model


def result_to_pb(result: domain.RerankResult) -> pb.RerankResponse:
    out = pb.RerankResponse()
    _fill(out, result)
    return out


def result_to_stream_pb(result: domain.RerankResult) -> pb.RerankStreamResponse:
    out = pb.RerankStreamResponse()
    _fill(out, result)
    return out


def server_info_to_pb(info: domain.EngineInfo, settings: Settings, version: str) -> pb.GetServerInfoResponse:
    """Describe the engine and the limits in force (the same Settings the validator enforces)."""
    limits = pb.Limits(**parts.limits(settings, info), media_types=sorted(MEDIA_TYPES))
    return pb.GetServerInfoResponse(
        model_id=info.model_id,
        model_revision=info.model_revision,
        dtype=info.dtype,
        device=info.device,
        query_modalities=sorted(_MODALITIES[m] for m in info.query_modalities),
        document_modalities=sorted(_MODALITIES[m] for m in info.document_modalities),
        limits=limits,
        server_version=version,
        random_weights=info.random_weights,
        quantization=info.quantization,
        attention=info.attention,
    )
