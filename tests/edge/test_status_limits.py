"""The status table's limits and edge rules, on both doors (issue 16: mutants of edge/status.py that
the table tests let through): detail text cut at exactly MAX_DETAIL_CHARS, the violation cap and its
count, RetryInfo / Retry-After rounding and clamping, the 503 default retry, keyword-only request ids,
the unknown-exception log line, and immutable rows."""

from __future__ import annotations

import dataclasses
import logging

import grpc
import pytest
from google.rpc import error_details_pb2

from lychee_server.edge import status
from lychee_server.errors import (
    FieldViolation,
    InvalidInput,
    LycheeError,
    ResourceExhausted,
    Unavailable,
)


def _details(st: object) -> tuple[error_details_pb2.ErrorInfo, list[object]]:
    info = error_details_pb2.ErrorInfo()
    others: list[object] = []
    for any_ in st.details:  # type: ignore[attr-defined]
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            any_.Unpack(info)
        elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_.Unpack(bad)
            others.append(bad)
        elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            any_.Unpack(retry)
            others.append(retry)
    return info, others


def test_detail_text_is_cut_at_exactly_the_limit() -> None:
    limit = status.MAX_DETAIL_CHARS
    assert limit == 512  # documented in docs/contract.md
    exact = "x" * limit
    assert status.to_status_pb(InvalidInput(exact)).message == exact
    assert status.to_http(InvalidInput(exact)).body["message"] == exact
    longer = "abcdefghij" * 60
    cut = status.to_status_pb(InvalidInput(longer)).message
    assert len(cut) == limit and cut == longer[: limit - 3] + "..."
    assert status.to_http(InvalidInput(longer)).body["message"] == cut


@pytest.mark.parametrize("n", [5, status.MAX_STATUS_VIOLATIONS, status.MAX_STATUS_VIOLATIONS + 25])
def test_violation_cap_and_count_on_both_doors(n: int) -> None:
    cap = status.MAX_STATUS_VIOLATIONS
    err = InvalidInput("bad", violations=[FieldViolation(f"documents[{i}]", "bad") for i in range(n)])
    info, others = _details(status.to_status_pb(err))
    (bad,) = (o for o in others if isinstance(o, error_details_pb2.BadRequest))
    assert len(bad.field_violations) == min(n, cap)
    body = status.to_http(err).body
    assert len(body["field_violations"]) == min(n, cap)
    if n > cap:
        assert info.metadata["violations_omitted"] == str(n - cap)
        assert body["violations_omitted"] == n - cap
    else:
        assert "violations_omitted" not in info.metadata
        assert "violations_omitted" not in body


@pytest.mark.parametrize(("after", "nanos", "header"), [(0.25, 250_000_000, "1"), (2.5, 2_500_000_000, "3")])
def test_retry_delay_is_sent_as_given_and_rounded_up_for_http(after: float, nanos: int, header: str) -> None:
    err = ResourceExhausted("busy", reason="OVERLOADED", retry_after=after)
    _, others = _details(status.to_status_pb(err))
    (retry,) = (o for o in others if isinstance(o, error_details_pb2.RetryInfo))
    assert retry.retry_delay.ToNanoseconds() == nanos
    http = status.to_http(err)
    assert http.headers["retry-after"] == header
    assert http.body["retry_after_s"] == after


def test_negative_retry_delay_is_clamped_to_zero() -> None:
    err = ResourceExhausted("busy", reason="OVERLOADED", retry_after=-3.0)
    _, others = _details(status.to_status_pb(err))
    (retry,) = (o for o in others if isinstance(o, error_details_pb2.RetryInfo))
    assert retry.retry_delay.ToNanoseconds() == 0
    http = status.to_http(err)
    assert http.headers["retry-after"] == "0" and http.body["retry_after_s"] == 0.0


def test_only_unavailable_gets_a_default_retry() -> None:
    http = status.to_http(Unavailable("loading", reason="NOT_READY"))
    assert http.status == 503 and http.headers["retry-after"] == "1" and http.body["retry_after_s"] == 1.0
    plain = status.to_http(InvalidInput("bad"))
    assert "retry-after" not in plain.headers and "retry_after_s" not in plain.body


def test_request_id_is_keyword_only() -> None:
    err = InvalidInput("bad")
    with pytest.raises(TypeError):
        status.to_http(err, "rid")  # type: ignore[misc]
    for fn in (status.status_for_exception, status.to_status_pb, status.to_status, status.as_lychee_error):
        with pytest.raises(TypeError):
            fn(err, "rid")  # type: ignore[operator]
    with pytest.raises(TypeError):
        status.http_error_for_exception(err, "rid")  # type: ignore[misc]
    assert status.to_http(err, request_id="rid").headers["x-request-id"] == "rid"


@pytest.mark.parametrize(("rid", "logged"), [("req-7", "request_id=req-7"), ("", "request_id=-")])
def test_unknown_exception_is_logged_with_its_request_id(
    caplog: pytest.LogCaptureFixture, rid: str, logged: str
) -> None:
    with caplog.at_level(logging.ERROR, logger=status.log.name):
        err = status.as_lychee_error(RuntimeError("secret detail"), request_id=rid)
    assert err.reason == "INTERNAL_ERROR" and "secret" not in err.message
    assert any(logged in r.getMessage() for r in caplog.records)
    st = status.status_for_exception(RuntimeError("boom"), request_id=rid)
    assert st.code is grpc.StatusCode.INTERNAL


def test_rows_and_http_errors_are_immutable() -> None:
    row = next(iter(status.TABLE.values()))
    http = status.to_http(LycheeError("x"))
    for obj in (row, http):
        assert not hasattr(obj, "__dict__")  # slots
        field = dataclasses.fields(obj)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)
