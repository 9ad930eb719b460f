"""One status table, two columns: every code and every contract reason has a gRPC code and an HTTP
status, and both doors render an error from that one table."""

from __future__ import annotations

import grpc
import pytest

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server import errors
from lychee_server.edge import status

PROTO_REASONS = {n.removeprefix("ERROR_REASON_") for n in pb.ErrorReason.DESCRIPTOR.values_by_name} - {
    "UNSPECIFIED"
}
CLASSES = {
    cls.code: cls
    for cls in (
        errors.InvalidInput,
        errors.Unsupported,
        errors.ResourceExhausted,
        errors.Unavailable,
        errors.Unauthenticated,
        errors.DeadlineExceeded,
        errors.Cancelled,
        errors.NotFound,
        errors.InternalError,
    )
}


def test_every_code_has_both_columns() -> None:
    assert set(status.TABLE) == set(errors.Code) == set(CLASSES)
    for row in status.TABLE.values():
        assert isinstance(row.grpc, grpc.StatusCode) and 400 <= row.http <= 599


def test_every_contract_reason_has_a_code_and_the_overrides_are_contract_reasons() -> None:
    assert set(status.REASON_CODES) == PROTO_REASONS
    assert set(status.HTTP_BY_REASON) <= PROTO_REASONS


@pytest.mark.parametrize("reason", sorted(PROTO_REASONS))
def test_both_doors_render_a_reason_from_the_same_row(reason: str) -> None:
    code = status.REASON_CODES[reason]
    err = CLASSES[code]("m", reason=reason, violations=[errors.FieldViolation("documents[1].text", "d")])
    g = status.to_status(err, request_id="r")
    h = status.to_http(err, request_id="r")
    assert g.code is status.TABLE[code].grpc
    assert h.status == status.HTTP_BY_REASON.get(reason, status.TABLE[code].http)
    assert (h.body["reason"], h.body["code"], h.body["request_id"]) == (reason, g.code.name, "r")
    assert h.body["field_violations"] == [
        {"field": "documents[1].text", "description": "d", "reason": reason}
    ]


def test_google_rpc_mapping_and_headers() -> None:
    expect = {
        errors.Code.INVALID_ARGUMENT: 400,
        errors.Code.FAILED_PRECONDITION: 400,
        errors.Code.UNAUTHENTICATED: 401,
        errors.Code.NOT_FOUND: 404,
        errors.Code.RESOURCE_EXHAUSTED: 429,
        errors.Code.CANCELLED: 499,
        errors.Code.INTERNAL: 500,
        errors.Code.UNAVAILABLE: 503,
        errors.Code.DEADLINE_EXCEEDED: 504,
    }
    assert {c: r.http for c, r in status.TABLE.items()} == expect
    busy = status.to_http(errors.ResourceExhausted("busy", retry_after=0.2))
    assert busy.headers["retry-after"] == "1" and busy.body["retry_after_s"] == 0.2
    assert status.to_http(errors.Unavailable("loading")).headers["retry-after"] == "1"
    assert status.to_http(errors.Unauthenticated("no")).headers["www-authenticate"] == "Bearer"
    too_big = errors.InvalidInput("big", reason="REQUEST_TOO_LARGE")
    assert (
        status.to_http(too_big).status == 413
        and status.to_status(too_big).code is grpc.StatusCode.INVALID_ARGUMENT
    )


def test_unknown_exceptions_are_500_without_their_text() -> None:
    h = status.http_error_for_exception(RuntimeError("/secret/path"), request_id="r9")
    assert h.status == 500 and "secret" not in str(h.body)
    assert h.body["reason"] == "INTERNAL_ERROR"


def test_contract_doc_shows_the_status_table() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
    begin, end = text.index("<!-- status:begin -->\n"), text.index("<!-- status:end -->")
    assert text[begin + len("<!-- status:begin -->\n") : end] == status.render_status_markdown()
