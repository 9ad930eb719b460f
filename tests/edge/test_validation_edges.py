"""The validation table at its boundaries (issue 16: mutants of edge/validation.py the rule and codec
tests let through): the unused-media-type rule, empty chunks, the collector's message for one, two
and many violations, its violations property, the cap on what it keeps, and immutable rules."""

from __future__ import annotations

import dataclasses

import pytest

from lychee_server.edge import validation as v
from lychee_server.settings import Settings

SETTINGS = Settings()


def _check(slot: v.Slot, value: object) -> tuple[bool, tuple[str, ...]]:
    c = v.Collector(SETTINGS)
    ok = c.check(slot, "f", value)
    return ok, tuple(x.reason for x in c.violations)


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1, False), (2, False), (3, False), (-1, False)])
def test_media_type_must_be_unset_when_no_image_bytes(value: int, ok: bool) -> None:
    got, reasons = _check(v.Slot.UNUSED_MEDIA_TYPE, value)
    assert got is ok
    assert reasons == (() if ok else ("STREAM_PROTOCOL_VIOLATION",))


@pytest.mark.parametrize(("size", "ok"), [(0, False), (1, True), (2, True)])
def test_a_chunk_carries_at_least_one_byte(size: int, ok: bool) -> None:
    got, reasons = _check(v.Slot.CHUNK_SIZE, size)
    assert got is ok
    assert reasons == (() if ok else ("STREAM_PROTOCOL_VIOLATION",))


@pytest.mark.parametrize(
    ("n", "suffix"),
    [(1, ""), (2, " (and 1 more invalid field)"), (3, " (and 2 more invalid fields)")],
)
def test_error_message_counts_the_other_violations(n: int, suffix: str) -> None:
    c = v.Collector(SETTINGS)
    for i in range(n):
        c.add(f"documents[{i}]", "EMPTY_TEXT", "must not be empty")
    assert c.error().message == "documents[0]: must not be empty" + suffix


def test_violations_is_a_read_only_tuple_and_the_collector_keeps_a_bounded_number() -> None:
    c = v.Collector(SETTINGS)
    assert not c and c.violations == ()
    cap = v.MAX_REPORTED_VIOLATIONS
    extra = cap + 6  # a count whose bits overlap the cap's, so the total is a real sum
    for i in range(cap + extra):
        c.add(f"documents[{i}]", "EMPTY_TEXT", "must not be empty")
    assert isinstance(c.violations, tuple) and len(c.violations) == cap
    err = c.error()
    assert len(err.violations) == cap
    assert err.message.endswith(f"(and {cap + extra - 1} more invalid fields)")  # dropped ones count


def test_rules_are_immutable() -> None:
    rule = v.RULES[0]
    assert not hasattr(rule, "__dict__")  # slots
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.reason = "OTHER"  # type: ignore[misc]


@pytest.mark.parametrize(("kind", "ok"), [(0, False), (1, True), (2, True), (3, False), (-1, False)])
def test_both_score_kinds_are_accepted(kind: int, ok: bool) -> None:
    got, reasons = _check(v.Slot.SCORE_KIND, kind)
    assert got is ok and reasons == (() if ok else ("INVALID_ENUM",))


@pytest.mark.parametrize(("n", "ok"), [(0, False), (1, True), (2, True), (1000, True), (1001, False)])
def test_top_n_range_includes_one_and_max_documents(n: int, ok: bool) -> None:
    assert SETTINGS.max_documents == 1000
    got, reasons = _check(v.Slot.TOP_N, n)
    assert got is ok and reasons == (() if ok else ("OUT_OF_RANGE",))


@pytest.mark.parametrize(("data", "ok"), [(b"plain", True), ("naïve".encode(), True), (b"na\xffve", False)])
def test_streamed_text_must_be_utf8(data: bytes, ok: bool) -> None:
    got, reasons = _check(v.Slot.STREAMED_TEXT, data)
    assert got is ok and reasons == (() if ok else ("INVALID_UTF8",))
