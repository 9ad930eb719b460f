"""The single error -> gRPC status table (Google AIP-193 error model).

Why one table: clients dispatch on ``ErrorInfo.reason`` and on field paths, so every RPC must
render errors identically. Every non-OK status carries a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer with

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
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lychee_server.errors import Code, LycheeError

__all__ = [
    "DOMAIN",
    "MAX_DETAIL_CHARS",
    "MAX_STATUS_VIOLATIONS",
    "STATUS_CODES",
    "abort_with",
    "status_for_exception",
    "to_status",
    "to_status_pb",
]

log = logging.getLogger(__name__)

DOMAIN = "lychee.rerank.v1"
MAX_STATUS_VIOLATIONS = 20
"""FieldViolations sent per status (the rest are counted in ErrorInfo metadata)."""
MAX_DETAIL_CHARS = 512
"""Longest message / description / metadata value sent (longer ones are cut with '...')."""

STATUS_CODES: dict[Code, grpc.StatusCode] = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.CANCELLED: grpc.StatusCode.CANCELLED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}

_INTERNAL_MESSAGE = "internal server error"


def _cut(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_status_pb(err: LycheeError, *, request_id: str = "") -> status_pb2.Status:
    """``err`` as a ``google.rpc.Status`` (exposed for tests and for non-gRPC gateways)."""
    grpc_code = STATUS_CODES.get(err.code, grpc.StatusCode.INTERNAL)
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


def status_for_exception(exc: BaseException, *, request_id: str = "") -> grpc.Status:
    """Any exception as a status: ``LycheeError`` by the table, anything else INTERNAL.

    The unknown exception is logged (with its traceback) but its text is not sent.
    """
    if isinstance(exc, LycheeError):
        return to_status(exc, request_id=request_id)
    log.error("unhandled exception (request_id=%s)", request_id or "-", exc_info=exc)
    internal = LycheeError(_INTERNAL_MESSAGE, reason="INTERNAL_ERROR")
    return to_status(internal, request_id=request_id)


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any], err: BaseException, *, request_id: str = ""
) -> NoReturn:
    """Abort the RPC with ``err``'s status. Never returns: grpc raises ``AbortError`` to unwind the
    handler, which the servicer must let propagate (do not catch BaseException around this)."""
    status = status_for_exception(err, request_id=request_id)
    await context.abort_with_status(status)  # type: ignore[attr-defined]  # grpc-stubs 1.53 lacks it
    raise AssertionError("abort_with_status returned")  # pragma: no cover - grpc always raises
