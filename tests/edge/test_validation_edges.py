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


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1, False), (2, False), (3, False)])
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
    for i in range(cap + 10):
        c.add(f"documents[{i}]", "EMPTY_TEXT", "must not be empty")
    assert isinstance(c.violations, tuple) and len(c.violations) == cap
    err = c.error()
    assert len(err.violations) == cap
    assert err.message.endswith(f"(and {cap + 9} more invalid fields)")  # dropped ones are counted


def test_rules_are_immutable() -> None:
    rule = v.RULES[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.reason = "OTHER"  # type: ignore[misc]
