"""Plain, immutable values the client takes and returns.

Nothing here touches grpc or protobuf: callers build requests from ordinary Python values
(``str`` for text; ``bytes``, a :class:`pathlib.Path` or a PIL image for pictures) and get
frozen dataclasses back, so results can be cached, compared and passed across threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Literal, TypeAlias

__all__ = [
    "Doc",
    "DocumentInput",
    "EncodedImage",
    "ImageInput",
    "Limits",
    "MediaType",
    "Query",
    "QueryInput",
    "RankedDocument",
    "RerankResult",
    "ScoreKind",
    "ServerInfo",
    "Timings",
    "Usage",
]

MediaType: TypeAlias = Literal["image/jpeg", "image/png", "image/webp"]
"""The image encodings the service accepts."""

ScoreKind: TypeAlias = Literal["probability", "logit"]
"""``"probability"``: p("yes") in [0, 1]; ``"logit"``: logit("yes") - logit("no"), same order."""

MEDIA_TYPES: tuple[MediaType, ...] = ("image/jpeg", "image/png", "image/webp")


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """Encoded image bytes with their media type, exactly as they go on the wire.

    Use it to declare the media type yourself; otherwise pass ``bytes``/``Path`` and the
    client sniffs the type from the magic bytes.
    """

    data: bytes = field(repr=False)
    media_type: MediaType

    def __post_init__(self) -> None:
        if self.media_type not in MEDIA_TYPES:
            raise ValueError(f"unsupported media type {self.media_type!r}; use one of {MEDIA_TYPES}")
        if not self.data:
            raise ValueError("image data is empty")

    def __repr__(self) -> str:  # never dump megabytes into logs or tracebacks
        return f"EncodedImage({self.media_type}, {len(self.data)} bytes)"

    @classmethod
    def from_bytes(cls, data: bytes) -> EncodedImage:
        """Sniff encoded bytes (JPEG, PNG, WebP); GIF (first frame), BMP and TIFF are converted
        to PNG, which needs Pillow (``pip install pillow``). Raises ``ValueError`` otherwise."""
        from ._inputs import encode_image_bytes

        return encode_image_bytes(bytes(data), "image")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> EncodedImage:
        """Read an image file now, as :meth:`from_bytes`; error messages start with the path."""
        from ._inputs import image_from_file

        return image_from_file(path)

    @classmethod
    def from_data_uri(cls, uri: str) -> EncodedImage:
        """Decode a ``data:image/<type>;base64,<data>`` URI (or a percent-encoded one), as
        :meth:`from_bytes`. A data: URI passed as a plain ``str`` is scored as text."""
        from ._inputs import image_from_data_uri

        return image_from_data_uri(uri)


if TYPE_CHECKING:
    from PIL.Image import Image as _PILImage

    ImageInput: TypeAlias = bytes | PurePath | EncodedImage | _PILImage
else:  # PIL is optional: PIL images are recognised at runtime without importing PIL here.
    ImageInput: TypeAlias = bytes | PurePath | EncodedImage
"""An image: encoded bytes (JPEG/PNG/WebP, sniffed; GIF/BMP/TIFF converted to PNG when Pillow is
installed), a file path (read when the call is made),
an :class:`EncodedImage`, or a PIL image (encoded to PNG)."""


@dataclass(frozen=True, slots=True)
class Query:
    """A query made of text, an image, or both (at least one)."""

    text: str | None = None
    image: ImageInput | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise ValueError("Query needs text, an image, or both")


@dataclass(frozen=True, slots=True)
class Doc:
    """A candidate document: text, an image, or both, plus an optional id echoed in results."""

    text: str | None = None
    image: ImageInput | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise ValueError("Doc needs text, an image, or both")


QueryInput: TypeAlias = "str | ImageInput | Query"
"""A query: ``str`` is always text (never a path or URL; one that looks like an image warns with
``ImageLikeTextWarning``, ``Query(text=...)`` never does); images as in :data:`ImageInput`."""

DocumentInput: TypeAlias = "str | ImageInput | Doc"
"""A document: ``str`` is always text (never a path or URL; one that looks like an image warns
with ``ImageLikeTextWarning``, ``Doc(text=...)`` never does); images as in :data:`ImageInput`."""


@dataclass(frozen=True, slots=True)
class RankedDocument:
    """One scored document.

    ``index`` is the document's position in the ``documents`` argument; ``text`` is set only
    with ``return_text=True`` and a document that has text.
    """

    index: int
    score: float
    id: str | None = None
    text: str | None = None
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a request has come (``on_progress`` of ``rerank``); the counts never decrease.

    ``phase`` is ``"queued"``, ``"preparing"`` (documents tokenized, images decoded),
    ``"scoring"`` or ``"done"``.
    """

    phase: str
    pairs_total: int
    pairs_prepared: int = 0
    pairs_scored: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    """What a request consumed."""

    pairs: int = 0
    tokens: int = 0
    images: int = 0
    truncated_documents: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    """Where the server spent a request's time, in seconds (phases of documents overlap)."""

    queue: float = 0.0
    preprocessing: float = 0.0
    inference: float = 0.0
    total: float = 0.0


@dataclass(frozen=True, slots=True)
class RerankResult:
    """A ranking: documents by descending score (ties keep input order), at most ``top_n``.

    ``streamed`` tells whether the request went over ``RerankStream`` (large payloads) rather
    than the unary ``Rerank`` call; it is informational only.
    """

    results: tuple[RankedDocument, ...]
    usage: Usage
    timings: Timings
    model: str
    streamed: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's operating limits (``GetServerInfo``); sizes are bytes unless noted."""

    max_documents: int
    max_instruction_bytes: int
    max_text_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_id_bytes: int
    max_message_bytes: int
    max_request_bytes: int
    max_chunk_bytes: int
    max_length: int
    default_max_length: int
    min_pixels: int
    max_pixels: int
    media_types: tuple[MediaType, ...]


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the server runs. ``random_weights`` means scores carry no meaning (test models)."""

    model_id: str
    model_revision: str
    dtype: str
    device: str
    query_modalities: frozenset[Literal["text", "image"]]
    document_modalities: frozenset[Literal["text", "image"]]
    limits: Limits
    server_version: str
    random_weights: bool
    quantization: str = "none"  # "none" | "fp8": the language model's weights quantised to FP8
    attention: str = ""  # the server's decoder attention path (informational)
