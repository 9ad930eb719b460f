"""JSON <-> domain conversion for the HTTP door ("parse, don't validate"), the twin of ``codec``.

A body goes through three steps, each reporting every problem it finds as one ``InvalidInput``:

1. :func:`parse` -- bytes to a shape-checked model (:mod:`.schema`; pydantic-core's JSON parser,
   so the JSON is read once, in Rust). Malformed JSON and wrong JSON types become INVALID_JSON /
   FIELD_REQUIRED violations with JSON paths (``documents[3].text``), not FastAPI's 422.
2. :func:`image_urls` -- the images named by URL, so the door can fetch them (or refuse them when
   fetching is off) before the job is built.
3. :func:`job_from_rerank` / :func:`job_from_tei` -- the shared rule table
   (:mod:`lychee_server.edge.parts`) applied to the values, base64 decoded once, defaults resolved
   exactly as on the gRPC door.

Results are rendered by :func:`rerank_body` / :func:`tei_body`. JSON and pydantic types stop here:
the scheduler only ever sees a :class:`~lychee_server.domain.RerankJob`.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lychee_server import domain, errors
from lychee_server.edge import parts
from lychee_server.edge.http.schema import TAGS, ContentIn, DocumentIn, ImageUrl, RerankIn, TeiRerankIn
from lychee_server.edge.validation import MAX_REPORTED_VIOLATIONS, Collector, Slot
from lychee_server.settings import Settings

__all__ = [
    "MEDIA_TYPE_NAMES",
    "SCORE_KIND_NAMES",
    "ImageRef",
    "image_urls",
    "job_from_rerank",
    "job_from_tei",
    "parse",
    "rerank_body",
    "tei_body",
]

M = TypeVar("M", bound=BaseModel)

MEDIA_TYPE_NAMES: dict[str, int] = {"image/jpeg": 1, "image/jpg": 1, "image/png": 2, "image/webp": 3}
"""``data:`` URI media types onto the contract's MediaType numbers (anything else: 0 = refused)."""
SCORE_KIND_NAMES: dict[str, int] = {"probability": 1, "logit": 2}
"""``score_kind`` strings onto the contract's ScoreKind numbers (anything else: 0 = refused)."""


# --------------------------------------------------------------------------------------------
# 1. bytes -> shape


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in TAGS:
            out += f".{part}" if out else part
    return out or "body"


def parse(body: bytes, model: type[M], *, request_id: str = "") -> M:
    """``body`` as ``model`` or ``InvalidInput`` naming every misshapen field (at most 64)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        violations: list[errors.FieldViolation] = []
        for e in exc.errors(include_url=False, include_input=False)[:MAX_REPORTED_VIOLATIONS]:
            kind = e["type"]
            if kind == "json_invalid":
                violations.append(errors.FieldViolation("body", "is not valid JSON", "INVALID_JSON"))
            elif kind == "missing":
                violations.append(errors.FieldViolation(_path(e["loc"]), "is required", "FIELD_REQUIRED"))
            else:
                # pydantic's text names the expected JSON type ("Input should be a valid string");
                # it never contains the value itself (include_input=False).
                violations.append(errors.FieldViolation(_path(e["loc"]), e["msg"], "INVALID_JSON"))
        first = violations[0]
        more = exc.error_count() - 1
        message = f"{first.field}: {first.description}" + (f" (and {more} more)" if more > 0 else "")
        metadata = {"request_id": request_id} if request_id else {}
        raise errors.InvalidInput(
            message, reason=first.reason, violations=violations, metadata=metadata
        ) from None


# --------------------------------------------------------------------------------------------
# 2. images named by URL


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image named by URL at a JSON path."""

    path: str
    url: str


def _is_url(value: str) -> bool:
    head = value[:8].lower()
    return head.startswith(("http://", "https://"))


def _image_value(content: ContentIn, base: str) -> tuple[str, str | ImageUrl | None]:
    """Which of ``image`` / ``image_url`` holds the image, and its path."""
    if content.image is not None:
        return f"{base}.image", content.image
    return f"{base}.image_url", content.image_url


def _contents(req: RerankIn) -> Iterator[tuple[str, ContentIn]]:
    if isinstance(req.query, ContentIn):
        yield "query", req.query
    for i, doc in enumerate(req.documents):
        if isinstance(doc, DocumentIn):
            yield f"documents[{i}]", doc


def image_urls(req: RerankIn) -> list[ImageRef]:
    """Every image of ``req`` that is named by URL (in request order)."""
    out: list[ImageRef] = []
    for base, content in _contents(req):
        path, value = _image_value(content, base)
        if isinstance(value, ImageUrl):
            out.append(ImageRef(path, value.url))
        elif isinstance(value, str) and _is_url(value):
            out.append(ImageRef(path, value))
    return out


# --------------------------------------------------------------------------------------------
# 3. shape -> job


def sniff_media_type(data: bytes) -> int:
    """The contract's MediaType number of ``data`` by its magic bytes (0: none we accept)."""
    if data[:3] == b"\xff\xd8\xff":
        return 1
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return 2
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return 3
    return 0


def _decode_image_string(value: str, path: str, c: Collector) -> tuple[bytes, int | None] | None:
    """Base64 or a ``data:`` URI -> (bytes, declared media type number or None); None after
    recording a violation."""
    declared: int | None = None
    payload = value
    if value[:5].lower() == "data:":
        header, sep, payload = value[5:].partition(",")
        mime, _, params = header.partition(";")
        if not sep or params.strip().lower() != "base64":
            c.add(path, "INVALID_BASE64", "a data: URI must be data:image/<type>;base64,<data>")
            return None
        declared = MEDIA_TYPE_NAMES.get(mime.strip().lower(), 0)
    # A too-large image is refused before it is decoded (base64 is 4/3 of the bytes).
    if not c.check(Slot.IMAGE_SIZE, f"{path}.data", len(payload) * 3 // 4):
        return None
    try:
        data = binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        c.add(path, "INVALID_BASE64", "is not valid base64 (nor a data: URI; URLs need --image-url-fetch)")
        return None
    return data, declared


def _image(
    value: str | ImageUrl | None, path: str, c: Collector, fetched: Mapping[str, bytes]
) -> tuple[bool, domain.ImageInput | None]:
    """(given, parsed image) for an ``image`` / ``image_url`` value."""
    if value is None:
        return False, None
    declared: int | None = None
    if path in fetched:  # named by URL and fetched by the door
        data = fetched[path]
    elif isinstance(value, ImageUrl) or _is_url(value):
        # Only reached when the door did not fetch it (the door refuses URLs before this).
        c.add(path, "IMAGE_URL_DISABLED", "image URLs are not fetched by this server")
        return True, None
    else:
        decoded = _decode_image_string(value, path, c)
        if decoded is None:
            return True, None
        data, declared = decoded
    if declared is not None:  # a data: URI said what it is: the rule table judges the type
        return True, parts.image(data, declared, path, c)
    media_type = sniff_media_type(data)
    if media_type == 0 and data:
        c.add(path, "IMAGE_DECODE_FAILED", "is not a JPEG, PNG or WEBP image")
        return True, None
    return True, parts.image(data, media_type, path, c)


def _content(
    value: str | ContentIn, path: str, c: Collector, fetched: Mapping[str, bytes]
) -> domain.Content | None:
    if isinstance(value, str):
        text = parts.text(value, path, c)
        return parts.content(text, None, text_given=True, image_given=False, path=path, c=c)
    if value.image is not None and value.image_url is not None:
        c.add(f"{path}.image_url", "INVALID_ARGUMENT", "set either image or image_url, not both")
        return None
    text = None if value.text is None else parts.text(value.text, f"{path}.text", c)
    image_path, image_value = _image_value(value, path)
    image_given, image = _image(image_value, image_path, c, fetched)
    return parts.content(
        text, image, text_given=value.text is not None, image_given=image_given, path=path, c=c
    )


def _documents(
    docs: list[str | DocumentIn], name: str, c: Collector, fetched: Mapping[str, bytes]
) -> tuple[domain.Document, ...]:
    out: list[domain.Document] = []
    if not c.check(Slot.DOCUMENT_COUNT, name, len(docs)):
        return ()  # past max_documents the per-document report would be noise (and unbounded work)
    for i, doc in enumerate(docs):
        path = f"{name}[{i}]"
        doc_id = doc.id if isinstance(doc, DocumentIn) else None
        id_ok = parts.document_id(doc_id, path, c)
        content = _content(doc, path, c, fetched)
        if content is not None and id_ok:
            out.append(domain.Document(content=content, id=doc_id))
    return tuple(out)


def _enum(value: str | None, names: Mapping[str, int]) -> int | None:
    return None if value is None else names.get(value.strip().lower(), 0)


def _job(
    c: Collector,
    *,
    instruction: str | None,
    query: str | ContentIn,
    documents: Callable[[], tuple[domain.Document, ...]],
    top_n: int | None,
    score_kind: int | None,
    max_length: int | None,
    return_text: bool,
    fetched: Mapping[str, bytes],
) -> domain.RerankJob:
    """The parts of a job through the shared rules, in the contract's field order (instruction,
    query, documents, options, as on the gRPC door), then one error listing every violation."""
    parsed_instruction = parts.instruction(instruction, "instruction", c)
    parsed_query = _content(query, "query", c, fetched)
    parsed_documents = documents()
    options = parts.options(
        top_n=top_n,
        score_kind=score_kind,
        max_length=max_length,
        return_text=return_text,
        path=lambda name: name,
        c=c,
    )
    c.raise_if_any()
    assert parsed_query is not None
    return domain.RerankJob(
        instruction=parsed_instruction,
        query=parsed_query,
        documents=parsed_documents,
        options=options,
        request_id=c.request_id,
    )


def job_from_rerank(
    req: RerankIn, settings: Settings, *, request_id: str = "", fetched: Mapping[str, bytes] | None = None
) -> domain.RerankJob:
    """A Cohere/Jina-shaped request as a job, or one ``InvalidInput`` listing every violation.

    ``fetched``: the bytes of the images named by URL, by JSON path (see :func:`image_urls`).
    """
    c = Collector(settings, request_id)
    got = fetched or {}
    return _job(
        c,
        instruction=req.instruction,
        query=req.query,
        documents=lambda: _documents(req.documents, "documents", c, got),
        top_n=req.top_n,
        score_kind=_enum(req.score_kind, SCORE_KIND_NAMES),
        max_length=req.max_length,
        return_text=req.return_documents,
        fetched=got,
    )


def job_from_tei(req: TeiRerankIn, settings: Settings, *, request_id: str = "") -> domain.RerankJob:
    """A TEI-shaped request (``query`` + ``texts``) as a job; ``raw_scores`` = logits."""
    c = Collector(settings, request_id)
    return _job(
        c,
        instruction=req.instruction,
        query=req.query,
        documents=lambda: _documents(list(req.texts), "texts", c, {}),
        top_n=None,
        score_kind=2 if req.raw_scores else 1,
        max_length=req.max_length,
        return_text=req.return_text,
        fetched={},
    )


def unknown_fields(req: BaseModel) -> list[str]:
    """Top-level fields the request carried that this server does not use (they are ignored)."""
    return sorted((req.model_extra or {}).keys())


# --------------------------------------------------------------------------------------------
# Responses


def rerank_body(
    result: domain.RerankResult, *, request_id: str, warnings: list[str], return_documents: bool
) -> dict[str, Any]:
    """The Cohere (v1/v2) / Jina answer; ``relevance_score`` is the score the job asked for."""
    results: list[dict[str, Any]] = []
    for r in result.results:
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        if r.id is not None:
            item["id"] = r.id
        if r.truncated:
            item["truncated"] = True
        if return_documents:
            doc: dict[str, Any] = {}
            if r.text is not None:
                doc["text"] = r.text
            if r.id is not None:
                doc["id"] = r.id
            item["document"] = doc
        results.append(item)
    u = result.usage
    meta: dict[str, Any] = {
        "api_version": {"version": "2"},
        "billed_units": {"search_units": 1},
        "tokens": {"input_tokens": u.tokens, "output_tokens": 0},
    }
    if warnings:
        meta["warnings"] = warnings
    return {
        "id": request_id,
        "model": result.model,
        "results": results,
        "usage": {
            "total_tokens": u.tokens,
            "pairs": u.pairs,
            "images": u.images,
            "truncated_documents": u.truncated_documents,
        },
        "meta": meta,
    }


def tei_body(result: domain.RerankResult, *, return_text: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in result.results:
        item: dict[str, Any] = {"index": r.index, "score": r.score}
        if return_text and r.text is not None:
            item["text"] = r.text
        out.append(item)
    return out
