"""The client's exception tree and its decoding from gRPC statuses.

The service reports errors the AIP-193 way: a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer carrying an ``ErrorInfo`` (stable reason string,
domain ``lychee.rerank.v1``), a ``BadRequest`` (field paths such as ``documents[3].image``)
and, for overload, a ``RetryInfo``. Callers should branch on the exception *class* for
control flow (retry, fix the input, re-authenticate) and on ``reason`` for detail, never on
the human-readable message. ::

    LycheeError
    ├── InvalidRequestError    INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE  (also ValueError)
    ├── AuthenticationError    UNAUTHENTICATED, PERMISSION_DENIED
    ├── OverloadedError        RESOURCE_EXHAUSTED (see ``reason``: OVERLOADED vs a size limit)
    ├── UnavailableError       UNAVAILABLE (model loading, draining; "unreachable": nothing listening)
    ├── DeadlineExceededError  DEADLINE_EXCEEDED                                    (also TimeoutError)
    └── ServerError            INTERNAL, UNKNOWN and every other code; malformed responses

``InvalidRequestError`` subclasses :class:`ValueError` and ``DeadlineExceededError``
subclasses :class:`TimeoutError` so that code written against the standard library's
vocabulary (including the LangChain adapter) handles them without knowing this package.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AuthenticationError",
    "DeadlineExceededError",
    "FieldViolation",
    "InvalidRequestError",
    "LycheeError",
    "OverloadedError",
    "ServerError",
    "UnavailableError",
    "error_from_rpc",
    "error_from_status",
]

ERROR_DOMAIN = "lychee.rerank.v1"
_DETAILS_KEY = "grpc-status-details-bin"
_REQUEST_ID_KEYS = ("x-request-id", "request-id")


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One rejected request field.

    ``field`` is a path into the request as the server saw it, e.g. ``documents[3].image``
    or ``options.top_n``; document indices match the order of the ``documents`` argument.
    """

    field: str
    description: str
    reason: str = ""


class LycheeError(Exception):
    """Base class of every error the client raises for a failed call.

    Attributes:
        code: the gRPC status code, or ``None`` when the error did not come from a status
            (for example a response that breaks the contract).
        message: the server's human-readable message.
        reason: the stable ``ErrorInfo.reason`` (``ErrorReason`` without its prefix), when sent.
        domain: the ``ErrorInfo.domain`` (``"lychee.rerank.v1"`` for this service).
        metadata: ``ErrorInfo.metadata`` (limits, offending values ...), read-only.
        field_violations: the ``BadRequest`` violations, in the server's order.
        retry_delay: seconds the server asked the client to wait (``RetryInfo``), if any.
        request_id: the server's request id for log correlation, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        retry_delay: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.retry_delay = retry_delay
        self.request_id = request_id

    def __str__(self) -> str:
        """``[CODE REASON] message field: description (request_id=...)``, each part once: the
        reason only when it differs from the code's name, a violation only when the message
        does not already say it."""
        message = self.message or "(no message)"
        parts = [message]
        code = self.code.name if self.code else None
        tags = [t for t in dict.fromkeys((code, self.reason)) if t]
        if tags:
            parts.insert(0, f"[{' '.join(tags)}]")
        extra = [
            text
            for text in dict.fromkeys(f"{v.field}: {v.description}" for v in self.field_violations)
            if text not in message
        ]
        if extra:
            parts.append("; ".join(extra))
        if self.request_id and self.request_id not in message:
            parts.append(f"(request_id={self.request_id})")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name if self.code else None}, "
            f"reason={self.reason!r}, message={self.message!r})"
        )


class InvalidRequestError(LycheeError, ValueError):
    """The request is wrong and retrying it unchanged cannot succeed (fix the input)."""


class AuthenticationError(LycheeError):
    """No valid API key / client certificate was presented, or it lacks permission."""


class OverloadedError(LycheeError):
    """RESOURCE_EXHAUSTED: the server is at capacity (``reason == "OVERLOADED"``) or this
    caller's refused requests are over its budget (``"RATE_LIMITED"``), both retryable after
    ``retry_delay``; or the request exceeds a size limit (any other reason)."""


class UnavailableError(LycheeError):
    """The server cannot take calls right now (loading, draining, unreachable)."""


class DeadlineExceededError(LycheeError, TimeoutError):
    """The call's deadline expired before a response arrived."""


class ServerError(LycheeError):
    """The server failed (INTERNAL, UNKNOWN, ...) or sent a response that breaks the contract."""


_CLASS_BY_CODE: dict[grpc.StatusCode, type[LycheeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}

_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def error_class_for(code: grpc.StatusCode) -> type[LycheeError]:
    """The exception class the client raises for a status code."""
    return _CLASS_BY_CODE.get(code, ServerError)


def error_from_status(
    code: grpc.StatusCode,
    message: str,
    status: status_pb2.Status | None = None,
    trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
) -> LycheeError:
    """Build the exception for a status code plus its optional rich ``google.rpc.Status``.

    The gRPC status code is authoritative for the class; the rich status only adds detail
    (its message wins when the transport message is empty). Unknown detail types are
    ignored so that a newer server can add details without breaking older clients.
    """
    reason: str | None = None
    domain: str | None = None
    info_metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    request_id: str | None = None
    if status is not None:
        message = message or status.message
        for any_detail in status.details:
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                reason, domain = info.reason or None, info.domain or None
                info_metadata.update(info.metadata)
            elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                any_detail.Unpack(bad)
                violations.extend(
                    FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
                )
            elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_detail.Unpack(retry)
                retry_delay = max(0.0, retry.retry_delay.ToTimedelta().total_seconds())
            elif any_detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
                req = error_details_pb2.RequestInfo()
                any_detail.Unpack(req)
                request_id = req.request_id or None
    request_id = request_id or info_metadata.get("request_id")
    if request_id is None:
        for key, value in trailing_metadata:
            if key.lower() in _REQUEST_ID_KEYS and isinstance(value, str):
                request_id = value
                break
    return error_class_for(code)(
        message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=info_metadata,
        field_violations=violations,
        retry_delay=retry_delay,
        request_id=request_id,
    )


def rich_status_from_trailers(
    code: grpc.StatusCode, trailing_metadata: Iterable[tuple[str, str | bytes]] | None
) -> status_pb2.Status | None:
    """Parse ``grpc-status-details-bin`` from trailing metadata.

    This is what ``grpc_status.rpc_status.from_call`` (sync) and its ``aio`` twin do, done
    once for both transports: the aio variant needs a live call object, while a raised
    ``AioRpcError`` only holds the trailers. A status whose code disagrees with the
    transport's, or that fails to parse, is ignored rather than masking the real error.
    """
    for key, value in trailing_metadata or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        if _CODE_BY_NUMBER.get(status.code) is not code:
            return None
        return status
    return None


def error_from_rpc(err: grpc.RpcError, target: str | None = None) -> LycheeError:
    """Turn a raised ``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError`` into a LycheeError.

    ``target`` (the channel's) names the server in the message of an UNAVAILABLE that did not
    come from the service (no ``ErrorInfo``: nothing listening, DNS, TLS handshake ...), which
    then reads ``server at 'host:port' is unreachable: <gRPC's reason>``.
    """
    # Both the sync errors (which are also grpc.Call objects) and AioRpcError expose
    # code() / details() / trailing_metadata() synchronously.
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = details_fn() if callable(details_fn) else None
    trailers_fn = getattr(err, "trailing_metadata", None)
    raw_trailers = trailers_fn() if callable(trailers_fn) else None
    trailers: list[tuple[str, str | bytes]] = [(str(k), v) for k, v in (raw_trailers or ())]
    status = rich_status_from_trailers(code, trailers)
    message = details if isinstance(details, str) else ""
    if target is not None and code is grpc.StatusCode.UNAVAILABLE and status is None:
        message = f"server at {target!r} is unreachable: {message or 'no connection'}"
    return error_from_status(code, message, status, trailers)
