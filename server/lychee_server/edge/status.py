"""The single error -> status table, with a gRPC and an HTTP column (Google AIP-193 error model).

Why one table: clients dispatch on ``ErrorInfo.reason`` and on field paths, so every RPC -- and
both doors, gRPC and HTTP -- must render errors identically. Each :class:`~lychee_server.errors.Code`
has one row (:data:`TABLE`): its gRPC code and its HTTP status, following google.rpc's published
mapping (INVALID_ARGUMENT/FAILED_PRECONDITION 400, UNAUTHENTICATED 401, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429, CANCELLED 499, INTERNAL 500, UNAVAILABLE 503, DEADLINE_EXCEEDED 504); the
few reasons that HTTP spells more precisely are overridden in :data:`HTTP_BY_REASON`
(REQUEST_TOO_LARGE 413, MODALITY_NOT_SUPPORTED 422). :func:`to_http` renders the same error as
a JSON body for the HTTP door. Over gRPC, every non-OK status carries a ``google.rpc.Status`` in
the ``grpc-status-details-bin`` trailer with

* always an ``ErrorInfo`` (reason, domain ``lychee.rerank.v1``, metadata incl. ``request_id``);
* a ``BadRequest`` with one ``FieldViolation`` per bad field, when the error names fields;
* a ``RetryInfo`` when the error says when to retry (overload).

Unknown exceptions become INTERNAL / ``INTERNAL_ERROR`` with a fixed message: exception text
can hold paths, tensors or user data and must not reach the client (it is logged instead).
The details travel in a trailer, which gRPC caps (8-16 KiB by default), so the number of
violations and the length of every string are bounded here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lychee_server.errors import Code, LycheeError

__all__ = [
    "DOMAIN",
    "HTTP_BY_REASON",
    "MAX_DETAIL_CHARS",
    "MAX_STATUS_VIOLATIONS",
    "REASON_CODES",
    "STATUS_CODES",
    "TABLE",
    "HttpError",
    "Row",
    "abort_with",
    "as_lychee_error",
    "http_error_for_exception",
    "render_status_markdown",
    "status_for_exception",
    "to_http",
    "to_status",
    "to_status_pb",
]

log = logging.getLogger(__name__)

DOMAIN = "lychee.rerank.v1"
MAX_STATUS_VIOLATIONS = 20
"""FieldViolations sent per status (the rest are counted in ErrorInfo metadata)."""
MAX_DETAIL_CHARS = 512
"""Longest message / description / metadata value sent (longer ones are cut with '...')."""


@dataclass(frozen=True, slots=True)
class Row:
    """How one error code is spelled on each door."""

    grpc: grpc.StatusCode
    http: int


TABLE: dict[Code, Row] = {
    Code.INVALID_ARGUMENT: Row(grpc.StatusCode.INVALID_ARGUMENT, 400),
    Code.FAILED_PRECONDITION: Row(grpc.StatusCode.FAILED_PRECONDITION, 400),
    Code.RESOURCE_EXHAUSTED: Row(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    Code.UNAVAILABLE: Row(grpc.StatusCode.UNAVAILABLE, 503),
    Code.UNAUTHENTICATED: Row(grpc.StatusCode.UNAUTHENTICATED, 401),
    Code.DEADLINE_EXCEEDED: Row(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Code.CANCELLED: Row(grpc.StatusCode.CANCELLED, 499),
    Code.NOT_FOUND: Row(grpc.StatusCode.NOT_FOUND, 404),
    Code.INTERNAL: Row(grpc.StatusCode.INTERNAL, 500),
}

HTTP_BY_REASON: dict[str, int] = {
    "REQUEST_TOO_LARGE": 413,  # the body (or the streamed request) is over its limit
    "MODALITY_NOT_SUPPORTED": 422,  # well-formed, but this model cannot take it
}
"""Per-reason HTTP statuses where HTTP has a more precise word than the code's row."""

REASON_CODES: dict[str, Code] = {
    **dict.fromkeys(
        (
            "FIELD_REQUIRED",
            "EMPTY_TEXT",
            "INVALID_ENUM",
            "OUT_OF_RANGE",
            "NO_DOCUMENTS",
            "TOO_MANY_DOCUMENTS",
            "INSTRUCTION_TOO_LARGE",
            "TEXT_TOO_LARGE",
            "IMAGE_TOO_LARGE",
            "ID_TOO_LARGE",
            "INVALID_UTF8",
            "IMAGE_DECODE_FAILED",
            "IMAGE_MEDIA_TYPE_MISMATCH",
            "IMAGE_TOO_MANY_PIXELS",
            "IMAGE_ANIMATED",
            "IMAGE_ASPECT_RATIO",
            "INPUT_TOO_LONG",
            "STREAM_PROTOCOL_VIOLATION",
            "CHUNK_TOO_LARGE",
            "REQUEST_TOO_LARGE",
            "INVALID_ARGUMENT",
            "INVALID_TEXT",
            "RESPONSE_TOO_LARGE",
            "INVALID_JSON",
            "INVALID_BASE64",
            "IMAGE_URL_DISABLED",
            "IMAGE_URL_FORBIDDEN",
            "IMAGE_FETCH_FAILED",
        ),
        Code.INVALID_ARGUMENT,
    ),
    "MODALITY_NOT_SUPPORTED": Code.FAILED_PRECONDITION,
    "OVERLOADED": Code.RESOURCE_EXHAUSTED,
    "RATE_LIMITED": Code.RESOURCE_EXHAUSTED,
    "NOT_READY": Code.UNAVAILABLE,
    "SHUTTING_DOWN": Code.UNAVAILABLE,
    "MODEL_LOAD_FAILED": Code.UNAVAILABLE,
    "UNAUTHENTICATED": Code.UNAUTHENTICATED,
    "DEADLINE_EXCEEDED": Code.DEADLINE_EXCEEDED,
    "CANCELLED": Code.CANCELLED,
    "NOT_FOUND": Code.NOT_FOUND,
    "DEVICE_OUT_OF_MEMORY": Code.INTERNAL,
    "INTERNAL_ERROR": Code.INTERNAL,
}
"""The code every contract ``ErrorReason`` is sent with (a test holds it to the proto's list)."""

STATUS_CODES: dict[Code, grpc.StatusCode] = {code: row.grpc for code, row in TABLE.items()}
"""The gRPC column of :data:`TABLE`."""

_INTERNAL_MESSAGE = "internal server error"


def _cut(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_status_pb(err: LycheeError, *, request_id: str = "") -> status_pb2.Status:
    """``err`` as a ``google.rpc.Status`` (exposed for tests and for non-gRPC gateways)."""
    grpc_code = TABLE.get(err.code, TABLE[Code.INTERNAL]).grpc
    metadata = {str(k): _cut(str(v)) for k, v in err.metadata.items()}
    if request_id:
        metadata["request_id"] = _cut(request_id)
    if len(err.violations) > MAX_STATUS_VIOLATIONS:
        metadata["violations_omitted"] = str(len(err.violations) - MAX_STATUS_VIOLATIONS)

    status = status_pb2.Status(code=grpc_code.value[0], message=_cut(err.message))
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata)
    status.details.add().Pack(info)
    if err.violations:
        bad = error_details_pb2.BadRequest()
        for v in err.violations[:MAX_STATUS_VIOLATIONS]:
            bad.field_violations.add(
                field=_cut(v.field), description=_cut(v.description), reason=v.reason or err.reason
            )
        status.details.add().Pack(bad)
    if err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(max(err.retry_after, 0.0) * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def to_status(err: LycheeError, *, request_id: str = "") -> grpc.Status:
    """``err`` as a ``grpc.Status`` for ``context.abort_with_status``."""
    return rpc_status.to_status(to_status_pb(err, request_id=request_id))


def as_lychee_error(exc: BaseException, *, request_id: str = "") -> LycheeError:
    """``exc`` itself when it is a ``LycheeError``; anything else becomes INTERNAL_ERROR.

    The unknown exception is logged (with its traceback) but its text is not sent.
    """
    if isinstance(exc, LycheeError):
        return exc
    log.error("unhandled exception (request_id=%s)", request_id or "-", exc_info=exc)
    return LycheeError(_INTERNAL_MESSAGE, reason="INTERNAL_ERROR")


def status_for_exception(exc: BaseException, *, request_id: str = "") -> grpc.Status:
    """Any exception as a gRPC status: ``LycheeError`` by the table, anything else INTERNAL."""
    return to_status(as_lychee_error(exc, request_id=request_id), request_id=request_id)


@dataclass(frozen=True, slots=True)
class HttpError:
    """An error as the HTTP door sends it: status, headers and a JSON-ready body."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def http_status(err: LycheeError) -> int:
    return HTTP_BY_REASON.get(err.reason, TABLE.get(err.code, TABLE[Code.INTERNAL]).http)


def to_http(err: LycheeError, *, request_id: str = "") -> HttpError:
    """``err`` for the HTTP door: the same reason, message and field paths as the gRPC status.

    Body: ``{"message", "reason", "code", "request_id", "field_violations": [{field, description,
    reason}], "retry_after_s"?}`` (``message`` is what Cohere-style clients print). Headers:
    ``Retry-After`` (whole seconds, rounded up) when the error says when to retry, and on 503;
    ``WWW-Authenticate: Bearer`` on 401; ``x-request-id``.
    """
    row = TABLE.get(err.code, TABLE[Code.INTERNAL])
    status = http_status(err)
    body: dict[str, Any] = {
        "message": _cut(err.message),
        "reason": err.reason,
        "code": row.grpc.name,
        "request_id": request_id,
        "field_violations": [
            {"field": _cut(v.field), "description": _cut(v.description), "reason": v.reason or err.reason}
            for v in err.violations[:MAX_STATUS_VIOLATIONS]
        ],
    }
    if len(err.violations) > MAX_STATUS_VIOLATIONS:
        body["violations_omitted"] = len(err.violations) - MAX_STATUS_VIOLATIONS
    headers = {"x-request-id": request_id} if request_id else {}
    retry_after = err.retry_after
    if retry_after is None and row.grpc is grpc.StatusCode.UNAVAILABLE:
        retry_after = 1.0  # loading or draining: come back soon (or go to another replica)
    if retry_after is not None:
        body["retry_after_s"] = max(retry_after, 0.0)
        headers["retry-after"] = str(max(math.ceil(retry_after), 0))
    if row.grpc is grpc.StatusCode.UNAUTHENTICATED:
        headers["www-authenticate"] = "Bearer"
    return HttpError(status=status, headers=headers, body=body)


def http_error_for_exception(exc: BaseException, *, request_id: str = "") -> HttpError:
    """Any exception for the HTTP door (unknown ones: 500 with the fixed message, logged)."""
    return to_http(as_lychee_error(exc, request_id=request_id), request_id=request_id)


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any], err: BaseException, *, request_id: str = ""
) -> NoReturn:
    """Abort the RPC with ``err``'s status. Never returns: grpc raises ``AbortError`` to unwind the
    handler, which the servicer must let propagate (do not catch BaseException around this)."""
    status = status_for_exception(err, request_id=request_id)
    await context.abort_with_status(status)  # type: ignore[attr-defined]  # grpc-stubs 1.53 lacks it
    raise AssertionError("abort_with_status returned")  # pragma: no cover - grpc always raises


def render_status_markdown() -> str:
    """Every reason with its gRPC code and HTTP status, as a Markdown table for docs/contract.md."""
    lines = ["| ErrorInfo reason | gRPC code | HTTP status |", "|---|---|---|"]
    for reason, code in REASON_CODES.items():
        row = TABLE[code]
        lines.append(f"| `{reason}` | {row.grpc.name} | {HTTP_BY_REASON.get(reason, row.http)} |")
    return "\n".join(lines) + "\n"
