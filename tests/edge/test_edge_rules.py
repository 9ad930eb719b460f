"""The rule table itself: every reason is a contract reason, every slot has a rule, docs render."""

from __future__ import annotations

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server.edge.validation import RULES, Slot, render_rules_markdown
from lychee_server.settings import Settings

REASONS = {name.removeprefix("ERROR_REASON_") for name in pb.ErrorReason.DESCRIPTOR.values_by_name} - {
    "UNSPECIFIED"
}


def test_reasons_are_contract_reasons() -> None:
    assert {r.reason for r in RULES} <= REASONS


def test_every_slot_has_a_rule_and_limits_name_settings() -> None:
    assert {r.slot for r in RULES} == set(Slot)
    fields = set(Settings.model_fields)
    assert {r.limit for r in RULES if r.limit} <= fields


def test_messages_format_without_leaking_values() -> None:
    settings = Settings()
    for rule in RULES:
        assert "{" not in rule.describe(12345, settings)
        assert "topsecret" not in rule.describe("topsecret", settings)


def test_markdown_lists_every_rule() -> None:
    md = render_rules_markdown()
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Field |") and len(lines) == 2 + len(RULES)
    for rule in RULES:
        assert f"`{rule.reason}`" in md
    assert "max_text_bytes" in md
