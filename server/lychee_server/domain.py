"""Typed, already-validated values that flow from the gRPC edge into the core.

The edge (``lychee_server.edge.codec``) is the only place that turns protobuf
messages into these values; the scheduler and the engine see nothing else.
Everything here is immutable and free of grpc / torch imports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
DEFAULT_MAX_LENGTH = 3200


class MediaType(enum.Enum):
    """Declared encoding of image bytes."""

    JPEG = "image/jpeg"
    PNG = "image/png"
    WEBP = "image/webp"


class ScoreKind(enum.Enum):
    """What the score of a ranked document is."""

    PROBABILITY = "probability"  # p(yes) = softmax over (no, yes) logits, in [0, 1]
    LOGIT = "logit"  # raw logit(yes) - logit(no)


class Modality(enum.Enum):
    TEXT = "text"
    IMAGE = "image"


@dataclass(frozen=True, slots=True)
class ImageInput:
    """Encoded image bytes plus the media type the caller declared."""

    data: bytes
    media_type: MediaType

    def __repr__(self) -> str:  # never dump megabytes into logs
        return f"ImageInput({self.media_type.name}, {len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class Content:
    """A query or a document: text, an image, or both (at least one is set)."""

    text: str | None = None
    image: ImageInput | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise ValueError("Content needs text, an image, or both")

    @property
    def modalities(self) -> frozenset[Modality]:
        out = set()
        if self.text is not None:
            out.add(Modality.TEXT)
        if self.image is not None:
            out.add(Modality.IMAGE)
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class Document:
    content: Content
    id: str | None = None


@dataclass(frozen=True, slots=True)
class RerankOptions:
    top_n: int | None = None  # None = all documents
    score_kind: ScoreKind = ScoreKind.PROBABILITY
    max_length: int = DEFAULT_MAX_LENGTH
    return_text: bool = False


@dataclass(frozen=True, slots=True)
class RerankJob:
    """One validated rerank request."""

    instruction: str
    query: Content
    documents: tuple[Document, ...]
    options: RerankOptions = field(default_factory=RerankOptions)
    request_id: str = ""
    # Who is asking (set by the edge from the api key); scopes the engine's vision cache so one
    # tenant cannot time whether another scored an image (settings.vision_cache_scope).
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class RankedDocument:
    index: int
    score: float
    id: str | None = None
    text: str | None = None
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    pairs: int = 0
    tokens: int = 0
    images: int = 0
    truncated_documents: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent per phase of one request (wall clock, overlapping phases allowed)."""

    queue: float = 0.0
    preprocessing: float = 0.0
    inference: float = 0.0
    total: float = 0.0


@dataclass(frozen=True, slots=True)
class RerankResult:
    results: tuple[RankedDocument, ...]
    usage: Usage
    timings: Timings
    model: str = ""


class Phase(enum.Enum):
    """Where a request is (see :class:`Progress`)."""

    QUEUED = "queued"  # admitted; the query is being prepared
    PREPARING = "preparing"  # documents are being tokenized / decoded
    SCORING = "scoring"  # at least one pair has been scored
    DONE = "done"  # every pair is scored; the ranking follows


@dataclass(frozen=True, slots=True)
class Progress:
    """How far one request has come; counts never decrease, ``pairs_scored <= pairs_prepared``."""

    phase: Phase
    pairs_total: int
    pairs_prepared: int = 0
    pairs_scored: int = 0


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the loaded engine is and can do (reported by GetServerInfo)."""

    model_id: str
    model_revision: str
    dtype: str
    device: str
    query_modalities: frozenset[Modality]
    document_modalities: frozenset[Modality]
    min_pixels: int
    max_pixels: int
    random_weights: bool = False
    quantization: str = "none"  # "none" | "fp8"
    attention: str = ""  # the decoder's attention path, e.g. "sdpa (padded batches)"
