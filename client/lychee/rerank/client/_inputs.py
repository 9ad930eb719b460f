"""Turning caller values into wire-ready items.

Everything is resolved to bytes *before* any RPC starts: a file that cannot be read or an
image in an unsupported format fails locally with a precise message instead of half-way
through a stream, and the payload size (which picks unary vs streaming) is exact.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from ._types import Doc, EncodedImage, MediaType, Query

__all__ = ["Item", "coerce_document", "coerce_image", "coerce_query", "sniff_media_type"]


def sniff_media_type(data: bytes) -> MediaType | None:
    """The media type from the file signature, or ``None`` when not JPEG, PNG or WebP."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _is_pil_image(value: object) -> bool:
    # A PIL image can only exist if PIL was imported by someone, so checking sys.modules
    # keeps Pillow optional without an import here.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def _encode_pil(image: Any) -> EncodedImage:
    """PNG-encode a PIL image: lossless, and every server accepts it."""
    buf = io.BytesIO()
    frame = image
    if frame.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        frame = frame.convert("RGBA" if "A" in frame.getbands() else "RGB")
    frame.save(buf, format="PNG")
    return EncodedImage(buf.getvalue(), "image/png")


def coerce_image(value: object, where: str) -> EncodedImage:
    """Resolve an image value; ``where`` names it in errors (``documents[2].image``)."""
    if isinstance(value, EncodedImage):
        return value
    if isinstance(value, PurePath):
        try:
            with open(value, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise ValueError(f"{where}: cannot read image file {str(value)!r}: {err}") from err
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif _is_pil_image(value):
        return _encode_pil(value)
    else:
        raise TypeError(
            f"{where}: expected image bytes, a pathlib.Path, an EncodedImage or a PIL image, "
            f"got {type(value).__name__}"
        )
    if not data:
        raise ValueError(f"{where}: image data is empty")
    media_type = sniff_media_type(data)
    if media_type is None:
        raise ValueError(f"{where}: not a JPEG, PNG or WebP image (unrecognised file signature)")
    return EncodedImage(data, media_type)


@dataclass(frozen=True, slots=True)
class Item:
    """A resolved query or document: UTF-8 text bytes and/or an encoded image."""

    text: str | None
    image: EncodedImage | None
    id: str | None = None
    text_bytes: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Encoded once: it sizes the payload and feeds the stream chunks.
        object.__setattr__(self, "text_bytes", self.text.encode("utf-8") if self.text is not None else b"")

    @property
    def payload_bytes(self) -> int:
        """Bytes this item puts on the wire, protobuf framing aside."""
        size = len(self.text_bytes) + (len(self.image.data) if self.image is not None else 0)
        return size + (len(self.id.encode("utf-8")) if self.id is not None else 0)


def _coerce(value: object, where: str, *, allow_id: bool) -> Item:
    if isinstance(value, str):
        return Item(value, None)
    if isinstance(value, Doc):
        if not allow_id:
            raise TypeError(f"{where}: use Query, not Doc, for the query")
        image = coerce_image(value.image, f"{where}.image") if value.image is not None else None
        return Item(value.text, image, value.id)
    if isinstance(value, Query):
        if allow_id:
            raise TypeError(f"{where}: use Doc, not Query, for a document")
        image = coerce_image(value.image, f"{where}.image") if value.image is not None else None
        return Item(value.text, image)
    return Item(None, coerce_image(value, where))


def coerce_query(value: object) -> Item:
    """Resolve the ``query`` argument."""
    return _coerce(value, "query", allow_id=False)


def coerce_document(value: object, index: int) -> Item:
    """Resolve ``documents[index]``."""
    return _coerce(value, f"documents[{index}]", allow_id=True)
