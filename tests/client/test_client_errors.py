"""Decoding google.rpc.Status details into the exception tree (hand-built statuses)."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from lychee.rerank import client as c
from lychee.rerank.client._errors import error_from_rpc, error_from_status, rich_status_from_trailers


def _status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str = "",
    metadata: dict[str, str] | None = None,
    violations: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
    retry_ms: int | None = None,
) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=reason, domain="lychee.rerank.v1", metadata=metadata or {})
    )
    if violations:
        bad = error_details_pb2.BadRequest()
        for field, desc, why in violations:
            bad.field_violations.add(field=field, description=desc, reason=why)
        status.details.add().Pack(bad)
    if retry_ms is not None:
        d = duration_pb2.Duration()
        d.FromMilliseconds(retry_ms)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=d))
    return status


def _aio_error(
    code: grpc.StatusCode, status: status_pb2.Status | None, *extra: tuple[str, str]
) -> grpc.aio.AioRpcError:
    trailers: list[tuple[str, str | bytes]] = list(extra)
    if status is not None:
        trailers.append(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), status.message if status else "plain", None
    )


def test_invalid_argument_with_field_violations() -> None:
    st = _status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "documents[1].content.text: must not be empty",
        reason="EMPTY_TEXT",
        metadata={"request_id": "req-42"},
        violations=[("documents[1].content.text", "must not be empty", "EMPTY_TEXT")],
    )
    err = error_from_rpc(_aio_error(grpc.StatusCode.INVALID_ARGUMENT, st))
    assert type(err) is c.InvalidRequestError
    assert isinstance(err, ValueError)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (err.reason, err.domain, err.request_id) == ("EMPTY_TEXT", "lychee.rerank.v1", "req-42")
    assert err.field_violations == (
        c.FieldViolation("documents[1].content.text", "must not be empty", "EMPTY_TEXT"),
    )
    assert err.metadata["request_id"] == "req-42"
    assert "EMPTY_TEXT" in str(err) and "documents[1].content.text" in str(err) and "req-42" in str(err)
    with pytest.raises(TypeError):
        err.metadata["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, c.InvalidRequestError),
        (grpc.StatusCode.FAILED_PRECONDITION, c.InvalidRequestError),
        (grpc.StatusCode.UNAUTHENTICATED, c.AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, c.AuthenticationError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, c.OverloadedError),
        (grpc.StatusCode.UNAVAILABLE, c.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, c.DeadlineExceededError),
        (grpc.StatusCode.INTERNAL, c.ServerError),
        (grpc.StatusCode.UNKNOWN, c.ServerError),
        (grpc.StatusCode.CANCELLED, c.ServerError),
        (grpc.StatusCode.UNIMPLEMENTED, c.ServerError),
    ],
)
def test_code_to_class(code: grpc.StatusCode, cls: type[c.LycheeError]) -> None:
    err = error_from_rpc(_aio_error(code, _status(code, "x", reason="R")))
    assert type(err) is cls and err.code is code and err.reason == "R"


def test_deadline_is_a_timeout_error() -> None:
    err = error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert isinstance(err, TimeoutError) and isinstance(err, c.LycheeError)


def test_retry_info_is_seconds() -> None:
    st = _status(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", reason="OVERLOADED", retry_ms=250)
    err = error_from_rpc(_aio_error(grpc.StatusCode.RESOURCE_EXHAUSTED, st))
    assert isinstance(err, c.OverloadedError) and err.retry_delay == pytest.approx(0.25)


def test_plain_status_without_details() -> None:
    err = error_from_rpc(_aio_error(grpc.StatusCode.UNAVAILABLE, None, ("x-request-id", "abc")))
    assert isinstance(err, c.UnavailableError)
    assert (err.reason, err.domain, err.field_violations, err.retry_delay) == (None, None, (), None)
    assert err.message == "plain" and err.request_id == "abc"


def test_mismatched_or_corrupt_details_are_ignored() -> None:
    st = _status(grpc.StatusCode.INTERNAL, "x", reason="INTERNAL_ERROR")
    # A status claiming another code than the transport's must not relabel the error.
    err = error_from_rpc(_aio_error(grpc.StatusCode.UNAVAILABLE, st))
    assert isinstance(err, c.UnavailableError) and err.reason is None
    assert (
        rich_status_from_trailers(grpc.StatusCode.INTERNAL, [("grpc-status-details-bin", b"\xff\xff")])
        is None
    )


def test_unknown_detail_types_are_skipped() -> None:
    st = _status(grpc.StatusCode.INVALID_ARGUMENT, "x", reason="OUT_OF_RANGE")
    st.details.add().Pack(error_details_pb2.Help())
    err = error_from_rpc(_aio_error(grpc.StatusCode.INVALID_ARGUMENT, st))
    assert err.reason == "OUT_OF_RANGE"


# -- what a message says, once ------------------------------------------------------------------


def test_str_shows_the_status_once() -> None:
    same = error_from_status(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing bearer token",
        _status(grpc.StatusCode.UNAUTHENTICATED, "", reason="UNAUTHENTICATED"),
    )
    assert str(same) == "[UNAUTHENTICATED] missing bearer token"
    other = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "documents[1].content.text: must not be empty",
        _status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "",
            reason="EMPTY_TEXT",
            metadata={"request_id": "r-1"},
            violations=[
                ("documents[1].content.text", "must not be empty", "EMPTY_TEXT"),
                ("documents[4].content.image", "cannot decode", "IMAGE_DECODE_FAILED"),
            ],
        ),
    )
    text = str(other)
    assert text == (
        "[INVALID_ARGUMENT EMPTY_TEXT] documents[1].content.text: must not be empty "
        "documents[4].content.image: cannot decode (request_id=r-1)"
    )
    assert text.count("must not be empty") == 1
    assert str(error_from_status(grpc.StatusCode.INTERNAL, "")) == "[INTERNAL] (no message)"


def test_unavailable_without_details_names_the_target() -> None:
    err = error_from_rpc(_aio_error(grpc.StatusCode.UNAVAILABLE, None), "10.1.2.3:50051")
    assert isinstance(err, c.UnavailableError)
    assert err.message == "server at '10.1.2.3:50051' is unreachable: plain"
    # The service's own UNAVAILABLE (model loading, draining) keeps its message.
    st = _status(grpc.StatusCode.UNAVAILABLE, "model is loading", reason="NOT_READY")
    served = error_from_rpc(_aio_error(grpc.StatusCode.UNAVAILABLE, st), "10.1.2.3:50051")
    assert served.message == "model is loading" and served.reason == "NOT_READY"
