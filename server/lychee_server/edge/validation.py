"""The one table of field rules enforced at the gRPC edge.

Why a table: the limits are part of the public contract (the proto comments say "Limit:" and
"Range:"), yet the project does not use protovalidate annotations, so the rules must live in
exactly one place that (a) both transports share -- ``codec`` for the unary ``Rerank`` and
``stream`` for ``RerankStream`` -- and (b) can be printed as documentation
(:func:`render_rules_markdown`) so docs and behaviour cannot drift apart.

The table is keyed by :class:`Slot`, a *semantic* field ("a text", "the size of an image"),
not by a concrete proto path: the unary request and the stream carry the same values under
different paths (``documents[3].content.text`` vs ``documents[3].text``) and, for sizes, in
different shapes (a ``str`` vs a declared ``ItemStart.text_bytes``). The callers measure the
value and name the path; the table decides.

Each slot's rules run in table order and only the first failing rule of a slot is reported
for a given path (an empty text is reported as EMPTY_TEXT, not also as something else).
:class:`Collector` gathers the violations of a whole request so the client sees all of them
at once, and raises a single :class:`~lychee_server.errors.InvalidInput`.

Deliberately *not* a rule: NUL characters in text. The contract does not forbid them, the
tokenizer's byte-level BPE encodes them like any other code point, and rejecting them would
be an undocumented contract change. They are accepted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lychee_server.errors import FieldViolation, InvalidInput
from lychee_server.settings import Settings

__all__ = [
    "KNOWN_MEDIA_TYPES",
    "KNOWN_SCORE_KINDS",
    "MAX_REPORTED_VIOLATIONS",
    "MIN_MAX_LENGTH",
    "RULES",
    "Collector",
    "Rule",
    "Slot",
    "render_rules_markdown",
    "utf8_len",
]

MIN_MAX_LENGTH = 64
"""Smallest ``RerankOptions.max_length`` a request may ask for (the proto's documented range)."""

KNOWN_MEDIA_TYPES = frozenset({1, 2, 3})
"""``MediaType`` numbers the server accepts (JPEG, PNG, WEBP); 0 is UNSPECIFIED."""

KNOWN_SCORE_KINDS = frozenset({1, 2})
"""``ScoreKind`` numbers the server accepts (PROBABILITY, LOGIT); 0 is UNSPECIFIED."""

MAX_REPORTED_VIOLATIONS = 64
"""Violations kept per request: a million bad documents must not become a million-entry error
(the details travel in a trailer, which gRPC caps at a few KiB anyway)."""


class Slot(enum.Enum):
    """A semantic field that rules apply to. The value documents where it occurs."""

    REQUIRED = "`query`, `documents[i].content`, `*.text_image.image`; stream item `documents[i]`"
    INSTRUCTION = "`instruction`, `header.instruction` (set)"
    INSTRUCTION_SIZE = "`instruction`, `header.instruction`: UTF-8 bytes"
    TEXT = "`*.text`, `*.text_image.text`; stream `documents[i].text`, `query.text`"
    TEXT_SIZE = "as TEXT: UTF-8 bytes (stream: the declared `ItemStart.text_bytes`)"
    STREAMED_TEXT = "stream `documents[i].text`, `query.text`: the received bytes"
    IMAGE_SIZE = "`*.image.data`; stream `documents[i].image` (declared `ItemStart.image_bytes`)"
    MEDIA_TYPE = "`*.image.media_type`; stream `documents[i].image_media_type` (with image bytes)"
    UNUSED_MEDIA_TYPE = "stream `documents[i].image_media_type` when `image_bytes` is 0"
    QUERY_ITEM_ID = "stream `query.id` (the query streamed as an item)"
    DOCUMENT_COUNT = "`documents` (count); stream `header.document_count`"
    ID_SIZE = "`documents[i].id`; stream `documents[i].id`: UTF-8 bytes"
    TOP_N = "`options.top_n` (set)"
    SCORE_KIND = "`options.score_kind` (set)"
    MAX_LENGTH = "`options.max_length` (set)"
    CHUNK_SIZE = "stream `chunk`: payload bytes of one ItemChunk"
    REQUEST_SIZE = "stream: payload bytes received plus bytes still declared"


@dataclass(frozen=True, slots=True)
class Rule:
    """One declarative check.

    ``violated(value, settings)`` is true when the value breaks the rule; ``condition`` is the
    same rule in words (for docs); ``message`` is the description sent to the client, a
    ``str.format`` template that may use ``{value}`` (only for numeric slots: texts and bytes are
    never echoed back) and ``{limit}`` (the value of the Settings field named by ``limit``).
    """

    slot: Slot
    reason: str
    condition: str
    violated: Callable[[Any, Settings], bool]
    message: str
    limit: str | None = None

    def describe(self, value: object, settings: Settings) -> str:
        limit = getattr(settings, self.limit) if self.limit else None
        shown = value if isinstance(value, int) else "?"
        return self.message.format(value=shown, limit=limit)


def utf8_len(text: str) -> int:
    """UTF-8 byte length; ``surrogatepass`` so a hand-built message with a lone surrogate
    (possible from Python, never from the wire) is measured instead of raising."""
    return len(text.encode("utf-8", "surrogatepass"))


def _blank(text: str, _: Settings) -> bool:
    return not text.strip()


def _over(limit: str) -> Callable[[int, Settings], bool]:
    def check(n: int, settings: Settings) -> bool:
        return n > int(getattr(settings, limit))

    return check


def _not_utf8(data: bytes, _: Settings) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


RULES: tuple[Rule, ...] = (
    Rule(Slot.REQUIRED, "FIELD_REQUIRED", "unset", lambda v, _: v is None, "is required"),
    Rule(
        Slot.INSTRUCTION,
        "EMPTY_TEXT",
        "set but empty or only whitespace",
        _blank,
        "must not be empty or only whitespace (leave it unset for the default instruction)",
    ),
    Rule(
        Slot.INSTRUCTION_SIZE,
        "INSTRUCTION_TOO_LARGE",
        "> max_instruction_bytes",
        _over("max_instruction_bytes"),
        "is {value} bytes; the limit is {limit}",
        "max_instruction_bytes",
    ),
    Rule(Slot.TEXT, "EMPTY_TEXT", "empty or only whitespace", _blank, "must not be empty or only whitespace"),
    Rule(
        Slot.TEXT_SIZE,
        "TEXT_TOO_LARGE",
        "> max_text_bytes",
        _over("max_text_bytes"),
        "is {value} bytes; the limit is {limit}",
        "max_text_bytes",
    ),
    Rule(Slot.STREAMED_TEXT, "INVALID_UTF8", "not valid UTF-8", _not_utf8, "is not valid UTF-8"),
    Rule(Slot.IMAGE_SIZE, "FIELD_REQUIRED", "0 bytes", lambda n, _: n == 0, "image data is required"),
    Rule(
        Slot.IMAGE_SIZE,
        "IMAGE_TOO_LARGE",
        "> max_image_bytes",
        _over("max_image_bytes"),
        "is {value} bytes; the limit is {limit}",
        "max_image_bytes",
    ),
    Rule(
        Slot.MEDIA_TYPE,
        "INVALID_ENUM",
        "MEDIA_TYPE_UNSPECIFIED or unknown",
        lambda v, _: v not in KNOWN_MEDIA_TYPES,
        "MediaType {value} is not accepted (use JPEG, PNG, WEBP)",
    ),
    Rule(
        Slot.UNUSED_MEDIA_TYPE,
        "STREAM_PROTOCOL_VIOLATION",
        "set although image_bytes is 0",
        lambda v, _: v != 0,
        "must be unspecified when image_bytes is 0",
    ),
    Rule(
        Slot.QUERY_ITEM_ID,
        "STREAM_PROTOCOL_VIOLATION",
        "set",
        lambda has_id, _: bool(has_id),
        "the query item must not carry an id",
    ),
    Rule(Slot.DOCUMENT_COUNT, "NO_DOCUMENTS", "0", lambda n, _: n == 0, "at least one document is required"),
    Rule(
        Slot.DOCUMENT_COUNT,
        "TOO_MANY_DOCUMENTS",
        "> max_documents",
        _over("max_documents"),
        "{value} documents; the limit is {limit}",
        "max_documents",
    ),
    Rule(
        Slot.ID_SIZE,
        "ID_TOO_LARGE",
        "> max_id_bytes",
        _over("max_id_bytes"),
        "is {value} bytes; the limit is {limit}",
        "max_id_bytes",
    ),
    Rule(
        Slot.TOP_N,
        "OUT_OF_RANGE",
        "0 or > max_documents",
        lambda n, s: n < 1 or n > s.max_documents,
        "{value} is outside 1..{limit}",
        "max_documents",
    ),
    Rule(
        Slot.SCORE_KIND,
        "INVALID_ENUM",
        "SCORE_KIND_UNSPECIFIED or unknown",
        lambda v, _: v not in KNOWN_SCORE_KINDS,
        "ScoreKind {value} is not accepted (use PROBABILITY or LOGIT, or leave it unset)",
    ),
    Rule(
        Slot.MAX_LENGTH,
        "OUT_OF_RANGE",
        f"< {MIN_MAX_LENGTH} or > max_length",
        lambda n, s: n < MIN_MAX_LENGTH or n > s.max_length,
        f"{{value}} is outside {MIN_MAX_LENGTH}..{{limit}}",
        "max_length",
    ),
    Rule(
        Slot.CHUNK_SIZE,
        "STREAM_PROTOCOL_VIOLATION",
        "0 bytes",
        lambda n, _: n == 0,
        "a chunk must carry at least one byte",
    ),
    Rule(
        Slot.CHUNK_SIZE,
        "CHUNK_TOO_LARGE",
        "> max_chunk_bytes",
        _over("max_chunk_bytes"),
        "is {value} bytes; the limit is {limit}",
        "max_chunk_bytes",
    ),
    Rule(
        Slot.REQUEST_SIZE,
        "REQUEST_TOO_LARGE",
        "> max_request_bytes",
        _over("max_request_bytes"),
        "the request would be {value} bytes; the limit is {limit}",
        "max_request_bytes",
    ),
)

_BY_SLOT: dict[Slot, tuple[Rule, ...]] = {slot: tuple(r for r in RULES if r.slot is slot) for slot in Slot}


class Collector:
    """Accumulates the violations of one request and raises them as one ``InvalidInput``.

    ``check`` applies the table; ``add`` records a violation the table cannot express (the
    stream's message-order rules). The error's reason is the first violation's reason, so a
    client that only reads ErrorInfo still sees the most relevant (earliest) problem.
    """

    __slots__ = ("_dropped", "_violations", "request_id", "settings")

    def __init__(self, settings: Settings, request_id: str = "") -> None:
        self.settings = settings
        self.request_id = request_id
        self._violations: list[FieldViolation] = []
        self._dropped = 0

    def check(self, slot: Slot, path: str, value: object) -> bool:
        """Apply the slot's rules to ``value``; record the first failure; return True when valid."""
        for rule in _BY_SLOT[slot]:
            if rule.violated(value, self.settings):
                self.add(path, rule.reason, rule.describe(value, self.settings))
                return False
        return True

    def add(self, path: str, reason: str, description: str) -> None:
        if len(self._violations) >= MAX_REPORTED_VIOLATIONS:
            self._dropped += 1
            return
        self._violations.append(FieldViolation(path, description, reason))

    @property
    def violations(self) -> tuple[FieldViolation, ...]:
        return tuple(self._violations)

    def __bool__(self) -> bool:
        return bool(self._violations)

    def error(self) -> InvalidInput:
        """The single error for everything collected so far (call only when non-empty)."""
        first = self._violations[0]
        total = len(self._violations) + self._dropped
        message = f"{first.field}: {first.description}"
        if total > 1:
            message += f" (and {total - 1} more invalid field{'s' if total > 2 else ''})"
        metadata = {"request_id": self.request_id} if self.request_id else {}
        return InvalidInput(message, reason=first.reason, violations=self._violations, metadata=metadata)

    def raise_if_any(self) -> None:
        if self._violations:
            raise self.error()


def render_rules_markdown(rules: Iterable[Rule] = RULES) -> str:
    """The rule table as a Markdown table for the docs (limits by Settings name, not value)."""
    lines = [
        "| Field | Rejected when | ErrorInfo reason |",
        "|---|---|---|",
    ]
    for rule in rules:
        condition = rule.condition.replace("|", "\\|")
        lines.append(f"| {rule.slot.value} | {condition} | `{rule.reason}` |")
    return "\n".join(lines) + "\n"
