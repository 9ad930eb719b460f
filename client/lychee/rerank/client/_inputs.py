"""Turning caller values into wire-ready items.

Everything is resolved to bytes *before* any RPC starts: a file that cannot be read or an
image in an unsupported format fails locally with a precise message instead of half-way
through a stream, and the payload size (which picks unary vs streaming) is exact.

The service takes JPEG, PNG and WebP. GIF (first frame), BMP and TIFF images are converted
to PNG here when Pillow is installed; Pillow stays optional and is imported only for them
(and for PIL images, which only exist when the caller imported Pillow).

A bare ``str`` is always text. When one looks like an image reference instead (a URL, a
``data:`` URI, the path of an existing image file) the call still scores it as text but warns
with :class:`ImageLikeTextWarning`, once per call, naming how to send the image.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import sys
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from ._types import Doc, EncodedImage, MediaType, Query

__all__ = [
    "ImageLikeTextWarning",
    "Item",
    "coerce_document",
    "coerce_image",
    "coerce_query",
    "encode_image_bytes",
    "image_from_data_uri",
    "image_from_file",
    "image_like_text",
    "sniff_media_type",
    "warn_image_like_text",
]


class ImageLikeTextWarning(UserWarning):
    """A plain ``str`` query or document looks like an image reference but is scored as text.

    Raised (as a warning) for a URL (``http://``, ``https://``, ``file://``), a ``data:`` URI
    or the path of an existing image file given as a bare ``str``. The client never fetches
    URLs or opens paths given as text: pass the image as ``bytes``, a :class:`pathlib.Path`,
    a PIL image or an :class:`EncodedImage` (``EncodedImage.from_data_uri(uri)``,
    ``EncodedImage.from_file(path)``). If the text is what you mean, pass ``Doc(text=...)`` or
    ``Query(text=...)``: explicit text never warns. ``warnings.filterwarnings("ignore",
    category=ImageLikeTextWarning)`` silences it for a whole program.
    """


def sniff_media_type(data: bytes) -> MediaType | None:
    """The media type from the file signature, or ``None`` when not JPEG, PNG or WebP."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _convertible_format(data: bytes) -> str | None:
    """``"GIF"``, ``"BMP"`` or ``"TIFF"`` from the file signature (formats converted to PNG)."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM" and len(data) >= 26:  # file header (14) + the start of the DIB header
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _is_pil_image(value: object) -> bool:
    # A PIL image can only exist if PIL was imported by someone, so checking sys.modules
    # keeps Pillow optional without an import here.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def _encode_pil(image: Any) -> EncodedImage:
    """PNG-encode a PIL image (its current frame): lossless, and every server accepts it."""
    buf = io.BytesIO()
    try:
        image.save(buf, format="PNG")
    except (OSError, ValueError):  # a mode PNG cannot hold (CMYK, YCbCr, 32-bit int, float ...)
        buf = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buf, format="PNG")
    return EncodedImage(buf.getvalue(), "image/png")


_HEAP_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _convert_to_png(data: bytes, fmt: str, where: str) -> EncodedImage:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:
        raise ValueError(
            f"{where}: {fmt} images are converted to PNG on the client, which needs Pillow: "
            "pip install pillow (or convert the image to JPEG, PNG or WebP yourself)"
        ) from err
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            image.seek(0)  # the first frame of an animation or a multi-page TIFF
            image.load()
            return _encode_pil(image)
    except UnidentifiedImageError as err:
        raise ValueError(f"{where}: not a valid {fmt} image") from err
    except Exception as err:  # decoders raise anything on corrupt data (IndexError, struct.error ...)
        detail = _HEAP_ADDRESS.sub("the image", str(err)) or type(err).__name__
        raise ValueError(f"{where}: cannot convert the {fmt} image to PNG: {detail}") from err


def encode_image_bytes(data: bytes, where: str) -> EncodedImage:
    """Sniff encoded image bytes; GIF/BMP/TIFF become PNG. ``where`` prefixes error messages."""
    if not data:
        raise ValueError(f"{where}: image data is empty")
    media_type = sniff_media_type(data)
    if media_type is not None:
        return EncodedImage(data, media_type)
    fmt = _convertible_format(data)
    if fmt is not None:
        return _convert_to_png(data, fmt, where)
    raise ValueError(
        f"{where}: not a JPEG, PNG or WebP image (nor a GIF, BMP or TIFF to convert): "
        "unrecognised file signature"
    )


def image_from_file(path: str | os.PathLike[str]) -> EncodedImage:
    """Read and sniff an image file (GIF/BMP/TIFF converted to PNG); errors start with the path."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ValueError(f"{name}: cannot read image file: {err.strerror or err}") from err
    return encode_image_bytes(data, name)


_DATA_URI = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*?)(?P<b64>;base64)?,", re.IGNORECASE)


def image_from_data_uri(uri: str) -> EncodedImage:
    """Decode a ``data:image/...;base64,...`` (or percent-encoded) URI into an image."""
    if not isinstance(uri, str):
        raise TypeError(f"expected a data: URI string, got {type(uri).__name__}")
    text = uri.strip()
    match = _DATA_URI.match(text)
    if match is None:
        raise ValueError("not a data: URI (expected data:image/<type>;base64,<data>)")
    declared = match["type"].strip().lower()
    if not declared.startswith("image/"):
        raise ValueError(f"data: URI holds {declared or 'text/plain'!r}, not an image (data:image/...)")
    payload = text[match.end() :]
    if match["b64"]:
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"data: URI: invalid base64 data ({err})") from err
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    return encode_image_bytes(data, f"data: URI ({declared})")


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
    return encode_image_bytes(data, where)


# -- text that looks like an image -------------------------------------------------------------

_URL = re.compile(r"(?:https?|file|ftp)://\S+", re.IGNORECASE)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif")
_MAX_PATH_CHARS = 4096


def image_like_text(text: str) -> str | None:
    """What a ``str`` looks like when it looks like an image reference rather than text:
    ``"a URL"``, ``"a data: URI"`` (``data:image/...``) or ``"the path of an image file"`` (an
    existing file with an image suffix); else ``None``.

    Cheap on ordinary text: only a prefix is inspected unless the text starts like a URL or
    ends with an image file suffix.
    """
    head = text[:64].lstrip()[:8].lower()  # no copy of a long text unless it starts like a reference
    if head.startswith("data:"):
        start = text.lstrip()[:512]
        return "a data: URI" if start[:11].lower() == "data:image/" and _DATA_URI.match(start) else None
    if head.startswith(("http://", "https://", "file://", "ftp://")):
        return "a URL" if _URL.fullmatch(text.strip()) else None
    if len(text) > _MAX_PATH_CHARS:
        return None
    s = text.strip()
    if "\n" not in s and s.lower().endswith(_IMAGE_SUFFIXES) and os.path.isfile(os.path.expanduser(s)):
        return "the path of an image file"
    return None


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` for ``warnings.warn`` (called by our caller) that points at the first
    frame outside this package: the line in the caller's code that made the call."""
    frame = sys._getframe(1)  # the function that will call warnings.warn
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _shorten(text: str, limit: int = 60) -> str:
    s = text.strip()
    return repr(s if len(s) <= limit else s[: limit - 1] + "…")


def warn_image_like_text(query: object, documents: Sequence[object]) -> None:
    """One :class:`ImageLikeTextWarning` for every bare ``str`` in a call that looks like an
    image reference (none when there is none)."""
    found: list[str] = []
    for where, value in (("query", query), *((f"documents[{i}]", d) for i, d in enumerate(documents))):
        if isinstance(value, str) and (kind := image_like_text(value)) is not None:
            found.append(f"{where} {_shorten(value)} looks like {kind}")
    if not found:
        return
    shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
    warnings.warn(
        f"{shown}: a str is always scored as text. To send an image, pass bytes, a pathlib.Path, "
        "a PIL image or an EncodedImage (EncodedImage.from_data_uri(uri), EncodedImage.from_file(path)); "
        "the client never fetches URLs. If you mean the text, pass Doc(text=...) / Query(text=...) "
        "to say so and silence this warning.",
        ImageLikeTextWarning,
        stacklevel=_stacklevel_outside_package(),
    )


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


def decode_base64_image(data: str | bytes, where: str) -> bytes:
    """Strict base64 of an image's bytes (the adapters' image values); ``where`` names it in errors."""
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{where}: invalid base64 image data") from err
    if not decoded:
        raise ValueError(f"{where}: image data is empty")
    return decoded


def decode_base64_data_uri(uri: str, where: str) -> bytes:
    """The bytes of a ``data:<type>;base64,<data>`` URI (only base64 ones), for the adapters."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError(f"{where}: only base64 data URIs ('data:image/png;base64,...') are supported")
    return decode_base64_image(payload, where)
