"""Transport-neutral request parts: plain values in, typed domain values out.

Why a module of its own: the gRPC door (``codec``, ``stream``) and the HTTP door
(``edge/http/jsoncodec``) carry the same request in different shapes. Each door only *measures*
its values and *names* their paths (``documents[3].content.text`` over gRPC, ``documents[3].text``
over HTTP); the functions here apply the one rule table (:mod:`lychee_server.edge.validation`)
and resolve every default in one place (the default instruction, PROBABILITY, ``None`` = all
documents, ``settings.default_max_length``). So the same bad value gets the same reason and
description through either door, and a default cannot drift between them.

Enumerations are taken as the contract's numbers (``MediaType`` 1..3, ``ScoreKind`` 1..2, 0 =
unspecified): the proto defines them, and the HTTP door maps its strings onto the same numbers so
an unknown one is reported by the same rule.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from lychee_server import domain
from lychee_server.edge.validation import Collector, Slot, utf8_len
from lychee_server.errors import FieldViolation, InvalidInput
from lychee_server.settings import Settings

__all__ = [
    "MEDIA_TYPE_NUMBERS",
    "SCORE_KIND_NUMBERS",
    "ResponsePaths",
    "check_response_size",
    "content",
    "document_id",
    "image",
    "instruction",
    "limits",
    "options",
    "require_response_fits",
    "response_size_bound",
    "text",
]

MEDIA_TYPE_NUMBERS: dict[int, domain.MediaType] = {
    1: domain.MediaType.JPEG,
    2: domain.MediaType.PNG,
    3: domain.MediaType.WEBP,
}
"""The contract's ``MediaType`` numbers (0 = unspecified)."""

SCORE_KIND_NUMBERS: dict[int, domain.ScoreKind] = {
    1: domain.ScoreKind.PROBABILITY,
    2: domain.ScoreKind.LOGIT,
}
"""The contract's ``ScoreKind`` numbers (0 = unspecified)."""


def instruction(value: str | None, path: str, c: Collector) -> str:
    """``None`` (unset) = the default instruction; set = non-blank and within the byte limit."""
    if value is None:
        return domain.DEFAULT_INSTRUCTION
    if c.check(Slot.INSTRUCTION, path, value):
        c.check(Slot.INSTRUCTION_SIZE, path, utf8_len(value))
    return value


def text(value: str, path: str, c: Collector) -> str | None:
    if not c.check(Slot.TEXT_SIZE, path, utf8_len(value)):
        return None  # measured first: stripping megabytes of text only to reject it is waste
    return value if c.check(Slot.TEXT, path, value) else None


def image(data: bytes | None, media_type: int, path: str, c: Collector) -> domain.ImageInput | None:
    """``data=None``: the image is required but absent; ``media_type``: a contract number."""
    if not c.check(Slot.REQUIRED, path, data):
        return None
    assert data is not None
    size_ok = c.check(Slot.IMAGE_SIZE, f"{path}.data", len(data))
    type_ok = c.check(Slot.MEDIA_TYPE, f"{path}.media_type", media_type)
    if not (size_ok and type_ok):
        return None
    return domain.ImageInput(data=data, media_type=MEDIA_TYPE_NUMBERS[media_type])


def content(
    text_value: str | None,
    image_value: domain.ImageInput | None,
    *,
    text_given: bool,
    image_given: bool,
    path: str,
    c: Collector,
) -> domain.Content | None:
    """Combine parts the door already parsed with :func:`text` / :func:`image`.

    ``*_given``: the door saw that part; neither = FIELD_REQUIRED on ``path``. A given part that
    failed its own checks (``None``) makes the whole content ``None`` (its violation is recorded).
    """
    if not c.check(Slot.REQUIRED, path, True if (text_given or image_given) else None):
        return None
    if (text_given and text_value is None) or (image_given and image_value is None):
        return None
    return domain.Content(text=text_value, image=image_value)


def document_id(doc_id: str | None, path: str, c: Collector) -> bool:
    """``None`` = no id; checked before the content, so violations come in field order."""
    return doc_id is None or c.check(Slot.ID_SIZE, f"{path}.id", utf8_len(doc_id))


def options(
    *,
    top_n: int | None,
    score_kind: int | None,
    max_length: int | None,
    return_text: bool,
    path: Callable[[str], str],
    c: Collector,
) -> domain.RerankOptions:
    """``None`` = unset (the default); ``path(name)`` names an option's field for the door."""
    if top_n is not None:
        c.check(Slot.TOP_N, path("top_n"), top_n)
    kind = domain.ScoreKind.PROBABILITY
    if score_kind is not None and c.check(Slot.SCORE_KIND, path("score_kind"), score_kind):
        kind = SCORE_KIND_NUMBERS[score_kind]
    length = c.settings.default_max_length
    if max_length is not None:
        length = max_length
        c.check(Slot.MAX_LENGTH, path("max_length"), max_length)
    return domain.RerankOptions(top_n=top_n, score_kind=kind, max_length=length, return_text=return_text)


def limits(settings: Settings, info: domain.EngineInfo) -> dict[str, int]:
    """The request limits in force, as both doors report them (GetServerInfo, ``GET /v1/info``)."""
    return {
        "max_documents": settings.max_documents,
        "max_instruction_bytes": settings.max_instruction_bytes,
        "max_text_bytes": settings.max_text_bytes,
        "max_image_bytes": settings.max_image_bytes,
        "max_image_pixels": settings.max_image_pixels,
        "max_id_bytes": settings.max_id_bytes,
        "max_message_bytes": settings.max_message_bytes,
        "max_request_bytes": settings.max_request_bytes,
        "max_chunk_bytes": settings.max_chunk_bytes,
        "max_length": settings.max_length,
        "default_max_length": settings.default_max_length,
        "min_pixels": info.min_pixels,
        "max_pixels": info.max_pixels,
    }


# --------------------------------------------------------------------------------------------
# The size of the answer, known before scoring

RESPONSE_OVERHEAD = 1024
"""Bytes of an answer besides its results: usage, timings, the model id, the framing."""


@dataclass(frozen=True, slots=True)
class ResponsePaths:
    """How a door names the two options that size its answer (for the error's field and hint)."""

    top_n: str
    return_text: str


def response_size_bound(job: domain.RerankJob, result_overhead: int) -> int:
    """An upper bound on the size of the job's answer, known before scoring.

    Each result costs ``result_overhead`` (the door's encoding of index, score and framing) plus
    its id and, with ``return_text``, its text; with ``top_n`` only the ``top_n`` largest results
    count (which documents rank first is not known yet). ``isascii`` is O(1) in CPython, so ASCII
    texts are measured without encoding them.
    """
    return_text = job.options.return_text

    def cost(doc: domain.Document) -> int:
        size = result_overhead
        if doc.id is not None:
            size += utf8_len(doc.id)
        text = doc.content.text
        if return_text and text is not None:
            size += len(text) if text.isascii() else utf8_len(text)
        return size

    sizes = (cost(d) for d in job.documents)
    top_n = job.options.top_n
    total = sum(heapq.nlargest(top_n, sizes)) if top_n is not None else sum(sizes)
    return total + RESPONSE_OVERHEAD


def check_response_size(
    job: domain.RerankJob, limit: int, result_overhead: int, paths: ResponsePaths, *, request_id: str = ""
) -> None:
    """INVALID_ARGUMENT / RESPONSE_TOO_LARGE before any scoring when the answer would be too large."""
    bound = response_size_bound(job, result_overhead)
    if bound > limit:
        _too_large(bound, limit, paths, request_id, estimated=True)


def require_response_fits(size: int, limit: int, paths: ResponsePaths, *, request_id: str = "") -> None:
    """The same error for a rendered answer (the backstop after scoring)."""
    if size > limit:
        _too_large(size, limit, paths, request_id, estimated=False)


def _too_large(size: int, limit: int, paths: ResponsePaths, request_id: str, *, estimated: bool) -> None:
    would = "could be up to" if estimated else "would be"
    description = (
        f"the response {would} {size} bytes, over max_message_bytes {limit}; "
        f"ask for fewer results ({paths.top_n}) or no texts ({paths.return_text})"
    )
    raise InvalidInput(
        description,
        reason="RESPONSE_TOO_LARGE",
        violations=[FieldViolation(paths.return_text, description, "RESPONSE_TOO_LARGE")],
        metadata={"request_id": request_id} if request_id else {},
    )
