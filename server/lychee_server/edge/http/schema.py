"""The JSON shapes of the HTTP door (pydantic): what the bodies look like, not what they may hold.

These models check *shape* only -- which fields exist and their JSON types, strictly (``"3"`` is
not a number, ``1`` is not ``true``). Every limit and rule
(empty text, sizes, counts, ranges, enums) is applied afterwards by the same rule table the gRPC
door uses (:mod:`lychee_server.edge.parts`), so no limit is copied here; the OpenAPI descriptions
say so and point at ``GET /v1/info``.

Field names follow what real clients send and parse:

* ``POST /v1/rerank`` / ``/v2/rerank`` -- Cohere (v1 and v2) and Jina: ``model``, ``query``,
  ``documents`` (strings, or objects with ``text`` and/or ``image``), ``top_n``,
  ``return_documents``; answers ``results[{index, relevance_score, document?}]``, ``model``,
  ``usage`` (Jina) and ``meta`` (Cohere). Extensions: ``instruction``, ``max_length``,
  ``score_kind``.
* ``POST /rerank`` -- Hugging Face TEI: ``query``, ``texts``, ``raw_scores``, ``return_text``,
  ``truncate``; answers ``[{index, score, text?}]``.

Unknown top-level fields are accepted and ignored (the reranking APIs' clients send options of
their own, e.g. ``rank_fields``), and each one is named in ``meta.warnings`` of the answer.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

__all__ = [
    "ContentIn",
    "DocumentIn",
    "ErrorBody",
    "FieldViolationOut",
    "ImageUrl",
    "ModelCard",
    "ModelList",
    "RerankIn",
    "RerankOut",
    "RerankResultOut",
    "TeiRerankIn",
    "TeiResultOut",
]

IMAGE_HELP = (
    "An image: base64 of JPEG/PNG/WEBP bytes, a `data:image/...;base64,` URI, or (only when the "
    'server runs with --image-url-fetch) an http(s) URL, as a string or as {"url": ...}.'
)


class ImageUrl(BaseModel):
    """``{"url": "https://..."}``: the OpenAI / Jina way of naming an image by URL."""

    model_config = ConfigDict(extra="forbid", strict=True)
    url: str


def _kind(value: Any) -> str:
    return "str" if isinstance(value, str) else "object"


ImageValue = Annotated[
    Annotated[str, Tag("str")] | Annotated[ImageUrl, Tag("object")],
    Discriminator(_kind),
]
"""A string (base64, data: URI or URL) or ``{"url": ...}``; the tags never appear in error paths."""


class ContentIn(BaseModel):
    """A query or document as an object: text, an image, or both."""

    model_config = ConfigDict(extra="ignore", strict=True)
    text: str | None = Field(None, description="UTF-8 text (see GET /v1/info for the limits).")
    image: ImageValue | None = Field(None, description=IMAGE_HELP)
    image_url: ImageValue | None = Field(None, description="Same as `image`, named the OpenAI way.")


class DocumentIn(ContentIn):
    id: str | None = Field(None, description="Your id for the document, echoed in its result.")


Query = Annotated[
    Annotated[str, Tag("str")] | Annotated[ContentIn, Tag("object")],
    Discriminator(_kind),
]
Document = Annotated[
    Annotated[str, Tag("str")] | Annotated[DocumentIn, Tag("object")],
    Discriminator(_kind),
]

TAGS = frozenset({"str", "object"})
"""Union tags pydantic puts into error locations; dropped when a location becomes a field path."""


class RerankIn(BaseModel):
    """``POST /v1/rerank`` and ``/v2/rerank`` (Cohere v1/v2 and Jina compatible)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(None, description="Accepted and ignored; the answer names the served model.")
    query: Query = Field(description="A string, or an object with `text` and/or `image`.")
    documents: list[Document] = Field(
        description="Strings, or objects with `text` and/or `image` (and an optional `id`)."
    )
    top_n: int | None = Field(None, description="Return only the best N (default: all).")
    return_documents: bool = Field(False, description="Echo each document's text in its result.")
    instruction: str | None = Field(None, description="Task instruction (default: web search passages).")
    max_length: int | None = Field(None, description="Token budget of one pair (see GET /v1/info).")
    score_kind: str | None = Field(
        None, description="'probability' (p(yes), the default) or 'logit' (logit(yes) - logit(no))."
    )


class TeiRerankIn(BaseModel):
    """``POST /rerank`` (Hugging Face text-embeddings-inference compatible)."""

    model_config = ConfigDict(extra="allow", strict=True)
    query: str
    texts: list[str]
    raw_scores: bool = Field(False, description="Logits (logit(yes) - logit(no)) instead of p(yes).")
    return_text: bool = False
    truncate: bool = Field(
        False,
        description="Accepted for compatibility: documents are always cut to fit max_length, and "
        "each result says whether it was.",
    )
    truncation_direction: str | None = Field(None, description="Accepted; text is cut on the right.")
    instruction: str | None = None
    max_length: int | None = None


class ResultDocument(BaseModel):
    text: str | None = None
    id: str | None = None


class RerankResultOut(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float
    document: ResultDocument | None = None
    id: str | None = None
    truncated: bool = False


class Usage(BaseModel):
    total_tokens: int
    pairs: int
    images: int
    truncated_documents: int


class RerankOut(BaseModel):
    id: str = Field(description="The request id (also in the x-request-id header).")
    model: str
    results: list[RerankResultOut]
    usage: Usage
    meta: dict[str, Any]


class TeiResultOut(BaseModel):
    index: int
    score: float
    text: str | None = None


class FieldViolationOut(BaseModel):
    field: str = Field(description="JSON path, e.g. `documents[3].image`.")
    description: str
    reason: str


class ErrorBody(BaseModel):
    """Every error, on every route: the same reason and field paths as the gRPC door's status."""

    message: str
    reason: str = Field(description="An ErrorReason name from the contract, e.g. TOO_MANY_DOCUMENTS.")
    code: str = Field(description="The gRPC status code name of the same error.")
    request_id: str
    field_violations: list[FieldViolationOut]
    retry_after_s: float | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str = "lychee-rerank"
    created: int = 0


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
