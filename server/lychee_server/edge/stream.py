"""Incremental assembly of a ``RerankStream`` client stream into one ``RerankJob``.

Why incremental: the stream exists for payloads too large for one message (hundreds of MiB of
images), so nothing may be buffered before it is known to be allowed. Every ``ItemStart``
declares its exact sizes, which lets the assembler reject an oversize item, or a request that
would exceed ``max_request_bytes``, *before* its first byte arrives; every chunk is checked
against ``max_chunk_bytes`` and the bytes still owed to the current item before it is appended.
The first violation raises at once, so the servicer can abort the call without reading on.

Protocol (see the proto comments), all breaches ``STREAM_PROTOCOL_VIOLATION``:

* the first message is a ``StreamHeader``, exactly once (``header`` on a second one; ``item`` /
  ``chunk`` on anything before it);
* then the query as an item when the header has no inline query (no ``id`` on it), then exactly
  ``header.document_count`` document items, in order;
* an ``ItemStart`` opens an item only after the previous one received all its declared bytes
  (``documents[i]``); ``image_media_type`` is set iff ``image_bytes > 0``;
* a chunk belongs to the open item, is non-empty, and never exceeds what the item still expects
  (``chunk`` / ``documents[i].text`` / ``documents[i].image``);
* at the end of the stream the header was seen, no item is half-received and every declared
  item arrived.

Field limits (sizes, enums, options, the header's inline query) come from the same rule table
as the unary codec (:mod:`lychee_server.edge.validation`), partly through the codec's own
parsers, so the two RPCs cannot disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc.aio

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server import domain
from lychee_server.edge.codec import (
    MEDIA_TYPES,
    content_from_pb,
    instruction_from_pb,
    options_from_pb,
)
from lychee_server.edge.validation import Collector, Slot, utf8_len
from lychee_server.settings import Settings

__all__ = ["StreamAssembler", "assemble"]

_PROTOCOL = "STREAM_PROTOCOL_VIOLATION"


@dataclass(slots=True)
class _Item:
    """The item being received: its declaration and the bytes so far."""

    path: str
    id: str | None
    text_bytes: int
    image_bytes: int
    media_type: domain.MediaType | None
    text: bytearray = field(default_factory=bytearray)
    image: bytearray = field(default_factory=bytearray)

    @property
    def complete(self) -> bool:
        return len(self.text) == self.text_bytes and len(self.image) == self.image_bytes


class StreamAssembler:
    """Feed it every ``RerankStreamRequest`` in order, then call :meth:`finish`.

    ``feed`` raises ``InvalidInput`` on the first violation; after an error the assembler is
    unusable (the call is over). ``finish`` returns the validated ``RerankJob``.
    """

    def __init__(self, settings: Settings, request_id: str = "") -> None:
        self._settings = settings
        self._request_id = request_id
        self._header_seen = False
        self._instruction = domain.DEFAULT_INSTRUCTION
        self._query: domain.Content | None = None
        self._options = domain.RerankOptions(max_length=settings.default_max_length)
        self._document_count = 0
        self._documents: list[domain.Document] = []
        self._item: _Item | None = None
        self._received = 0  # payload bytes of every message so far
        self._owed = 0  # bytes the open item still declares but has not sent
        self._messages = 0

    # -- public -------------------------------------------------------------------------------

    @property
    def bytes_received(self) -> int:
        return self._received

    @property
    def committed_bytes(self) -> int:
        """Payload bytes received plus those the open item declared but has not sent yet: what
        this stream will hold once the open item is complete (for :class:`BufferBudget`)."""
        return self._received + self._owed

    def feed(self, msg: pb.RerankStreamRequest) -> None:
        """Consume one message; raise ``InvalidInput`` as soon as it breaks a rule."""
        self._messages += 1
        kind = msg.WhichOneof("kind")
        if kind == "header":
            self._on_header(msg.header)
        elif kind == "item":
            self._on_item(msg.item)
        elif kind == "chunk":
            self._on_chunk(msg.chunk)
        else:
            self._fail("kind", _PROTOCOL, f"message {self._messages} has no header, item or chunk")

    def finish(self) -> domain.RerankJob:
        """End of stream: return the job, or raise if the stream stopped short."""
        if not self._header_seen:
            self._fail("header", _PROTOCOL, "the stream ended before a header")
        if self._item is not None:
            item = self._item
            part, got, want = (
                ("text", len(item.text), item.text_bytes)
                if len(item.text) < item.text_bytes
                else ("image", len(item.image), item.image_bytes)
            )
            self._fail(
                f"{item.path}.{part}", _PROTOCOL, f"the stream ended after {got} of {want} {part} bytes"
            )
        if self._query is None:
            self._fail("query", _PROTOCOL, "the stream ended before the query item")
        if len(self._documents) < self._document_count:
            self._fail(
                "header.document_count",
                _PROTOCOL,
                f"declared {self._document_count} documents, the stream ended after {len(self._documents)}",
            )
        assert self._query is not None
        return domain.RerankJob(
            instruction=self._instruction,
            query=self._query,
            documents=tuple(self._documents),
            options=self._options,
            request_id=self._request_id,
        )

    # -- messages -----------------------------------------------------------------------------

    def _on_header(self, header: pb.StreamHeader) -> None:
        if self._header_seen:
            self._fail("header", _PROTOCOL, "a second header")
        self._account(header.ByteSize(), "header")
        c = self._collector()
        instruction = instruction_from_pb(header, "header.instruction", c)
        query = None
        if header.HasField("query"):
            query = content_from_pb(header.query, "header.query", c)
        c.check(Slot.DOCUMENT_COUNT, "header.document_count", header.document_count)
        options = options_from_pb(header.options, "header.options", c)
        c.raise_if_any()
        self._header_seen = True
        self._instruction = instruction
        self._query = query
        self._document_count = header.document_count
        self._options = options

    def _on_item(self, start: pb.ItemStart) -> None:
        if not self._header_seen:
            self._fail("item", _PROTOCOL, "an item before the header")
        if self._item is not None:
            self._fail(self._item.path, _PROTOCOL, "a new item before this one received all its bytes")
        is_query = self._query is None
        if not is_query and len(self._documents) >= self._document_count:
            self._fail("item", _PROTOCOL, f"more items than the {self._document_count} declared documents")
        path = "query" if is_query else f"documents[{len(self._documents)}]"

        c = self._collector()
        item_id: str | None = start.id if start.HasField("id") else None
        if is_query:
            c.check(Slot.QUERY_ITEM_ID, f"{path}.id", item_id is not None)
        elif item_id is not None:
            c.check(Slot.ID_SIZE, f"{path}.id", utf8_len(item_id))
        has_content = start.text_bytes > 0 or start.image_bytes > 0
        c.check(Slot.REQUIRED, path, True if has_content else None)
        if start.text_bytes > 0:
            c.check(Slot.TEXT_SIZE, f"{path}.text", start.text_bytes)
        media_type: domain.MediaType | None = None
        if start.image_bytes > 0:
            c.check(Slot.IMAGE_SIZE, f"{path}.image", start.image_bytes)
            if c.check(Slot.MEDIA_TYPE, f"{path}.image_media_type", int(start.image_media_type)):
                media_type = MEDIA_TYPES[start.image_media_type]
        else:
            c.check(Slot.UNUSED_MEDIA_TYPE, f"{path}.image_media_type", int(start.image_media_type))
        c.raise_if_any()

        self._owed = start.text_bytes + start.image_bytes
        self._account(start.ByteSize(), path)
        self._item = _Item(path, item_id, start.text_bytes, start.image_bytes, media_type)

    def _on_chunk(self, chunk: pb.ItemChunk) -> None:
        if not self._header_seen:
            self._fail("chunk", _PROTOCOL, "a chunk before the header")
        part = chunk.WhichOneof("data")
        data = b"" if part is None else (chunk.text if part == "text" else chunk.image)
        c = self._collector()
        c.check(Slot.CHUNK_SIZE, "chunk", len(data))
        c.raise_if_any()
        item = self._item
        if item is None:
            self._fail("chunk", _PROTOCOL, "a chunk with no open item (send an ItemStart first)")
        assert item is not None and part is not None
        buf, declared = (item.text, item.text_bytes) if part == "text" else (item.image, item.image_bytes)
        if len(buf) + len(data) > declared:
            self._fail(
                f"{item.path}.{part}",
                _PROTOCOL,
                f"{len(buf) + len(data)} {part} bytes received, more than the {declared} declared",
            )
        self._owed -= len(data)
        self._account(len(data), f"{item.path}.{part}")
        buf += data
        if item.complete:
            self._complete(item)

    # -- helpers ------------------------------------------------------------------------------

    def _complete(self, item: _Item) -> None:
        c = self._collector()
        text: str | None = None
        if item.text_bytes:
            raw = bytes(item.text)
            if c.check(Slot.STREAMED_TEXT, f"{item.path}.text", raw):
                text = raw.decode("utf-8")
                c.check(Slot.TEXT, f"{item.path}.text", text)
        c.raise_if_any()
        image = None
        if item.image_bytes:
            assert item.media_type is not None
            image = domain.ImageInput(data=bytes(item.image), media_type=item.media_type)
        content = domain.Content(text=text, image=image)
        self._item = None
        if self._query is None:
            self._query = content
        else:
            self._documents.append(domain.Document(content=content, id=item.id))

    def _account(self, n: int, path: str) -> None:
        """Count ``n`` more payload bytes. The open item's declared-but-unsent bytes count too, so an
        item that would overflow ``max_request_bytes`` is refused at its ItemStart, not mid-way."""
        self._received += n
        c = self._collector()
        c.check(Slot.REQUEST_SIZE, path, self._received + self._owed)
        c.raise_if_any()

    def _collector(self) -> Collector:
        return Collector(self._settings, self._request_id)

    def _fail(self, path: str, reason: str, description: str) -> NoReturn:
        c = self._collector()
        c.add(path, reason, description)
        raise c.error()


def assemble(
    messages: Iterable[pb.RerankStreamRequest], settings: Settings, request_id: str = ""
) -> domain.RerankJob:
    """Feed a whole message list and finish (tests, tools); raises ``InvalidInput`` like ``feed``."""
    asm = StreamAssembler(settings, request_id)
    for msg in messages:
        asm.feed(msg)
    return asm.finish()


async def discard_rest(request_iterator: AsyncIterator[Any], *, max_bytes: int, max_seconds: float) -> None:
    """Read what the client is still sending (bounded) before answering a stream with an error.

    Ending a client stream while the caller is mid-write makes some clients (grpcio's aio
    client: grpc/grpc#36066) report a local INTERNAL "Internal error from Core" instead of our
    status, so the precise error would be lost. Reading on until the caller half-closes, within
    ``max_bytes`` and ``max_seconds``, lets it see the real status; a caller that keeps sending
    past that is cut off anyway. Nothing read here is buffered or processed.
    """

    async def drain() -> None:
        seen = 0
        async for raw in request_iterator:
            seen += len(raw) if isinstance(raw, bytes) else raw.ByteSize()
            if seen > max_bytes:
                return

    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await asyncio.wait_for(drain(), timeout=max_seconds)
