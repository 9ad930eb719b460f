"""The server's exception tree (no grpc imports).

Every failure the core can report is a :class:`LycheeError` carrying a stable
UPPER_SNAKE ``reason`` (the ``ErrorReason`` names in the proto, without the
``ERROR_REASON_`` prefix), a :class:`Code`, optional field violations and
metadata. ``lychee_server.edge.status`` is the single table that turns these
into gRPC statuses (google.rpc.Status with ErrorInfo / BadRequest / RetryInfo) and HTTP responses.

    LycheeError
    ├── InvalidInput          -> INVALID_ARGUMENT
    ├── Unsupported           -> FAILED_PRECONDITION
    ├── ResourceExhausted     -> RESOURCE_EXHAUSTED (+ RetryInfo)
    ├── Unavailable           -> UNAVAILABLE
    ├── Unauthenticated       -> UNAUTHENTICATED
    ├── DeadlineExceeded      -> DEADLINE_EXCEEDED
    ├── Cancelled             -> CANCELLED
    ├── NotFound              -> NOT_FOUND (the HTTP door: no such route)
    └── InternalError         -> INTERNAL
        └── DeviceOutOfMemory -> INTERNAL (the scheduler splits the batch and retries first)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class Code(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    NOT_FOUND = "NOT_FOUND"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: ``field`` is a path such as ``documents[3].image``."""

    field: str
    description: str
    reason: str = ""


class LycheeError(Exception):
    code: Code = Code.INTERNAL
    default_reason: str = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after

    def at(self, field: str) -> LycheeError:
        """Return a copy whose violations are re-rooted under ``field``.

        The engine raises errors about "the image"; the scheduler knows it was
        ``documents[3]`` and calls ``err.at("documents[3]")``.
        """
        if self.violations:
            vs = [FieldViolation(_join(field, v.field), v.description, v.reason) for v in self.violations]
        else:
            vs = [FieldViolation(field, self.message, self.reason)]
        clone = type(self)(
            self.message,
            reason=self.reason,
            violations=vs,
            metadata=self.metadata,
            retry_after=self.retry_after,
        )
        clone.__cause__ = self.__cause__
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason}: {self.message!r}, violations={list(self.violations)!r})"


def _join(prefix: str, path: str) -> str:
    if not path:
        return prefix
    if path.startswith("["):
        return prefix + path
    return f"{prefix}.{path}"


class InvalidInput(LycheeError):
    code = Code.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class Unsupported(LycheeError):
    code = Code.FAILED_PRECONDITION
    default_reason = "MODALITY_NOT_SUPPORTED"


class ResourceExhausted(LycheeError):
    code = Code.RESOURCE_EXHAUSTED
    default_reason = "OVERLOADED"


class Unavailable(LycheeError):
    code = Code.UNAVAILABLE
    default_reason = "NOT_READY"


class Unauthenticated(LycheeError):
    code = Code.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class DeadlineExceeded(LycheeError):
    code = Code.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(LycheeError):
    code = Code.CANCELLED
    default_reason = "CANCELLED"


class NotFound(LycheeError):
    code = Code.NOT_FOUND
    default_reason = "NOT_FOUND"


class InternalError(LycheeError):
    code = Code.INTERNAL
    default_reason = "INTERNAL_ERROR"


class DeviceOutOfMemory(InternalError):
    """The device ran out of memory on a batch; the scheduler splits and retries."""

    default_reason = "DEVICE_OUT_OF_MEMORY"
