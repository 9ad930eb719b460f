"""The error -> grpc.Status table: codes, and details that decode back to what was raised."""

from __future__ import annotations

import logging

import grpc
import pytest
from edge.builders import parse_status

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server import errors
from lychee_server.edge import status

REASONS = {name.removeprefix("ERROR_REASON_") for name in pb.ErrorReason.DESCRIPTOR.values_by_name} - {
    "UNSPECIFIED"
}


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unsupported("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhausted("x", retry_after=0.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unavailable("x", reason="SHUTTING_DOWN"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled("x"), grpc.StatusCode.CANCELLED),
        (errors.InternalError("x"), grpc.StatusCode.INTERNAL),
        (errors.DeviceOutOfMemory("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_codes_and_error_info(exc: errors.LycheeError, code: grpc.StatusCode) -> None:
    st = status.to_status(exc, request_id="req-7")
    assert st.code is code and st.details == "x"
    d = parse_status(st)
    assert d.code == code.value[0] and d.message == "x"
    assert d.info is not None
    assert (d.info.reason, d.info.domain) == (exc.reason, "lychee.rerank.v1")
    assert d.info.metadata["request_id"] == "req-7"
    assert d.bad_request is None
    assert (d.retry is not None) == (exc.retry_after is not None)


def test_every_default_reason_but_cancelled_is_a_contract_reason() -> None:
    defaults = {
        cls.default_reason
        for cls in (errors.LycheeError, *_subclasses(errors.LycheeError))
        if cls is not errors.Cancelled
    }
    assert defaults <= REASONS


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_bad_request_and_metadata() -> None:
    err = errors.InvalidInput(
        "documents[3].image: bad",
        reason="IMAGE_DECODE_FAILED",
        violations=[
            errors.FieldViolation("documents[3].image", "bad", "IMAGE_DECODE_FAILED"),
            errors.FieldViolation("query.text", "empty"),  # no reason: inherits the error's
        ],
        metadata={"request_id": "r1", "hint": "x"},
    )
    d = parse_status(status.to_status(err))
    assert d.info is not None and dict(d.info.metadata) == {"request_id": "r1", "hint": "x"}
    assert d.bad_request is not None
    got = [(v.field, v.description, v.reason) for v in d.bad_request.field_violations]
    assert got == [
        ("documents[3].image", "bad", "IMAGE_DECODE_FAILED"),
        ("query.text", "empty", "IMAGE_DECODE_FAILED"),
    ]


def test_at_reroots_engine_errors() -> None:
    err = errors.InvalidInput("corrupt", reason="IMAGE_DECODE_FAILED").at("documents[0].image")
    d = parse_status(status.to_status(err))
    assert d.fields == ["documents[0].image"]


def test_retry_info_delay() -> None:
    d = parse_status(status.to_status(errors.ResourceExhausted("busy", retry_after=1.25)))
    assert d.retry is not None and d.retry.retry_delay.ToMilliseconds() == 1250
    assert d.info is not None and d.info.reason == "OVERLOADED"


def test_size_of_details_is_bounded() -> None:
    many = [
        errors.FieldViolation(f"documents[{i}].content.text", "d" * 5000, "EMPTY_TEXT") for i in range(500)
    ]
    st = status.to_status(errors.InvalidInput("m" * 10_000, reason="EMPTY_TEXT", violations=many))
    d = parse_status(st)
    assert d.bad_request is not None and len(d.bad_request.field_violations) == status.MAX_STATUS_VIOLATIONS
    assert all(len(v.description) <= status.MAX_DETAIL_CHARS for v in d.bad_request.field_violations)
    assert len(d.message) <= status.MAX_DETAIL_CHARS
    assert d.info is not None and d.info.metadata["violations_omitted"] == "480"
    ((_, raw),) = st.trailing_metadata
    assert len(raw) < 16 * 1024  # fits gRPC's default metadata limit


def test_unknown_exception_is_internal_and_does_not_leak(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        st = status.status_for_exception(KeyError("/secret/path/weights.bin"), request_id="r9")
    assert st.code is grpc.StatusCode.INTERNAL
    d = parse_status(st)
    assert "secret" not in d.message and "secret" not in str(d.info)
    assert d.info is not None and (d.info.reason, d.info.metadata["request_id"]) == ("INTERNAL_ERROR", "r9")
    assert "secret" in caplog.text  # but it is logged for operators


def test_status_for_exception_passes_lychee_errors_through() -> None:
    st = status.status_for_exception(errors.Unavailable("loading"))
    assert st.code is grpc.StatusCode.UNAVAILABLE
    d = parse_status(st)
    assert d.info is not None and d.info.reason == "NOT_READY"


class _Context:
    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, st: grpc.Status) -> None:
        self.status = st
        raise grpc.aio.AbortError()


async def test_abort_with() -> None:
    ctx = _Context()
    with pytest.raises(grpc.aio.AbortError):
        await status.abort_with(ctx, errors.InvalidInput("bad", reason="EMPTY_TEXT"), request_id="r")  # type: ignore[arg-type]
    assert ctx.status is not None and ctx.status.code is grpc.StatusCode.INVALID_ARGUMENT
    d = parse_status(ctx.status)
    assert d.info is not None and d.info.metadata["request_id"] == "r"
