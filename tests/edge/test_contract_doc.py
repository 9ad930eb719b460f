"""docs/contract.md shows the validator's rule table exactly as the code enforces it."""

from __future__ import annotations

from pathlib import Path

from lychee_server.edge.validation import render_rules_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "contract.md"


def test_contract_doc_matches_the_rule_table() -> None:
    text = DOC.read_text()
    begin, end = text.index("<!-- rules:begin -->\n"), text.index("<!-- rules:end -->")
    documented = text[begin + len("<!-- rules:begin -->\n") : end].strip()
    assert documented == render_rules_markdown().strip(), "re-render docs/contract.md from the rule table"
