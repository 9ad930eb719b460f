"""Builders for edge tests: protobuf requests, stream message lists, images made with Pillow in
memory (no binary fixtures), and a decoder for the AIP-193 status details.

Imported as ``edge.builders`` (``tests`` is on the pytest pythonpath).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server.settings import Settings

FMT_MEDIA = {"JPEG": pb.MEDIA_TYPE_JPEG, "PNG": pb.MEDIA_TYPE_PNG, "WEBP": pb.MEDIA_TYPE_WEBP}


def small_settings(**overrides: object) -> Settings:
    """Settings with tiny limits so every limit is cheap to cross in a unit test."""
    values: dict[str, object] = {
        "max_documents": 4,
        "max_instruction_bytes": 32,
        "max_text_bytes": 64,
        "max_image_bytes": 4096,
        "max_id_bytes": 8,
        "max_chunk_bytes": 100,
        "max_length": 1024,
        "default_max_length": 512,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# -- images ---------------------------------------------------------------------------------------


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A small deterministic, non-flat image."""
    img = Image.new("RGB", (width, height))
    img.putdata(
        [
            ((x * 7 + seed) % 256, (y * 5 + seed) % 256, (x + y) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png(width: int = 32, height: int = 24, mode: str = "RGB") -> bytes:
    return encode(picture(width, height, mode), "PNG")


def jpeg(width: int = 32, height: int = 24, mode: str = "RGB") -> bytes:
    return encode(picture(width, height, mode), "JPEG", quality=90)


def webp(width: int = 32, height: int = 24) -> bytes:
    return encode(picture(width, height), "WEBP", quality=80)


def png16(width: int = 32, height: int = 24) -> bytes:
    """A 16-bit greyscale PNG."""
    img = Image.new("I;16", (width, height))
    img.putdata([(x * 2000 + y * 300) % 65536 for y in range(height) for x in range(width)])
    return encode(img, "PNG")


def animated(fmt: str = "PNG", frames: int = 3) -> bytes:
    """A multi-frame APNG or animated WebP."""
    imgs = [picture(32, 32, seed=17 * i) for i in range(frames)]
    return encode(imgs[0], fmt, save_all=True, append_images=imgs[1:], duration=100, loop=0)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims ``width x height`` (decompression bomb)."""
    data = bytearray(png(4, 4))
    # Signature (8) + IHDR length (4) + "IHDR" (4): width and height follow, then the CRC.
    struct.pack_into(">II", data, 16, width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    struct.pack_into(">I", data, 29, crc)
    return bytes(data)


def corrupt_png() -> bytes:
    """A PNG with its pixel data scrambled (IDAT CRC mismatch / zlib error)."""
    data = bytearray(png(32, 32))
    start = data.index(b"IDAT") + 8
    for i in range(start, min(start + 40, len(data) - 12)):
        data[i] ^= 0x5A
    return bytes(data)


# -- requests -------------------------------------------------------------------------------------


def text(t: str) -> pb.Content:
    return pb.Content(text=t)


def image(data: bytes, media: int = pb.MEDIA_TYPE_PNG) -> pb.Content:
    return pb.Content(image=pb.Image(data=data, media_type=media))  # type: ignore[arg-type]


def text_image(t: str, data: bytes, media: int = pb.MEDIA_TYPE_PNG) -> pb.Content:
    return pb.Content(text_image=pb.TextImage(text=t, image=pb.Image(data=data, media_type=media)))  # type: ignore[arg-type]


def request(
    query: pb.Content | None = None,
    documents: Sequence[pb.Content | pb.Document] | None = None,
    **kwargs: object,
) -> pb.RerankRequest:
    """A valid request by default; pass pieces to override."""
    docs = [d if isinstance(d, pb.Document) else pb.Document(content=d) for d in (documents or [text("doc")])]
    req = pb.RerankRequest(documents=docs, **kwargs)  # type: ignore[arg-type]
    req.query.CopyFrom(query if query is not None else text("query"))
    return req


# -- streams --------------------------------------------------------------------------------------


@dataclass
class Item:
    """One streamed item: its parts and how to chunk them."""

    text: bytes = b""
    image: bytes = b""
    media: int = pb.MEDIA_TYPE_UNSPECIFIED
    id: str | None = None
    chunk: int = 100
    interleave: bool = False


def item_messages(it: Item) -> list[pb.RerankStreamRequest]:
    start = pb.ItemStart(text_bytes=len(it.text), image_bytes=len(it.image), image_media_type=it.media)  # type: ignore[arg-type]
    if it.id is not None:
        start.id = it.id
    out = [pb.RerankStreamRequest(item=start)]
    texts = [it.text[i : i + it.chunk] for i in range(0, len(it.text), it.chunk)]
    images = [it.image[i : i + it.chunk] for i in range(0, len(it.image), it.chunk)]
    chunks: list[pb.ItemChunk] = []
    if it.interleave:
        for i in range(max(len(texts), len(images))):
            if i < len(images):
                chunks.append(pb.ItemChunk(image=images[i]))
            if i < len(texts):
                chunks.append(pb.ItemChunk(text=texts[i]))
    else:
        chunks = [pb.ItemChunk(text=t) for t in texts] + [pb.ItemChunk(image=b) for b in images]
    out.extend(pb.RerankStreamRequest(chunk=c) for c in chunks)
    return out


def header(document_count: int, query: pb.Content | None = None, **kwargs: object) -> pb.RerankStreamRequest:
    h = pb.StreamHeader(document_count=document_count, **kwargs)  # type: ignore[arg-type]
    if query is not None:
        h.query.CopyFrom(query)
    return pb.RerankStreamRequest(header=h)


def stream(
    documents: Iterable[Item], query: pb.Content | Item | None = None, **header_kwargs: object
) -> list[pb.RerankStreamRequest]:
    """Header + (streamed query) + documents. ``query`` None = inline text query."""
    docs = list(documents)
    inline = query if isinstance(query, pb.Content) else (text("query") if query is None else None)
    msgs = [header(len(docs), inline, **header_kwargs)]
    if isinstance(query, Item):
        msgs += item_messages(query)
    for d in docs:
        msgs += item_messages(d)
    return msgs


def chunk(text_part: bytes | None = None, image_part: bytes | None = None) -> pb.RerankStreamRequest:
    c = pb.ItemChunk()
    if text_part is not None:
        c.text = text_part
    if image_part is not None:
        c.image = image_part
    return pb.RerankStreamRequest(chunk=c)


# -- status details -------------------------------------------------------------------------------


@dataclass
class Details:
    """The decoded google.rpc.Status of a failed call."""

    code: int
    message: str
    info: error_details_pb2.ErrorInfo | None = None
    bad_request: error_details_pb2.BadRequest | None = None
    retry: error_details_pb2.RetryInfo | None = None

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []


def decode_details(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> Details:
    """Parse ``grpc-status-details-bin`` from trailing metadata (fails loudly if it is absent)."""
    raw = next((v for k, v in trailing_metadata or () if k == "grpc-status-details-bin"), None)
    assert isinstance(raw, bytes), "no grpc-status-details-bin trailer"
    status = status_pb2.Status.FromString(raw)
    out = Details(status.code, status.message)
    for any_msg in status.details:
        if any_msg.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            out.info = error_details_pb2.ErrorInfo()
            any_msg.Unpack(out.info)
        elif any_msg.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            out.bad_request = error_details_pb2.BadRequest()
            any_msg.Unpack(out.bad_request)
        elif any_msg.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            out.retry = error_details_pb2.RetryInfo()
            any_msg.Unpack(out.retry)
    return out


def parse_status(err: grpc.RpcError | grpc.Status) -> Details:
    """Details of a client-side ``AioRpcError`` / ``RpcError`` or a server-side ``grpc.Status``."""
    md = (
        err.trailing_metadata()
        if callable(getattr(err, "trailing_metadata", None))
        else err.trailing_metadata
    )  # type: ignore[union-attr]
    return decode_details(md)
