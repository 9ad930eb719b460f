"""The HTTP door's OpenAPI document: committed, valid OpenAPI 3.1, and in step with the code."""

from __future__ import annotations

import json
from pathlib import Path

from openapi_spec_validator import validate

from lychee_server.edge.http.openapi import openapi_document, render

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "lychee-rerank.json"


def test_committed_document_matches_the_code() -> None:
    assert COMMITTED.read_text() == render(), "OpenAPI drifted: run scripts/gen_openapi.sh and commit"


def test_document_is_valid_openapi_and_describes_every_route() -> None:
    spec = openapi_document()
    validate(json.loads(json.dumps(spec)))  # raises on an invalid document (dangling $ref, bad types)
    paths = spec["paths"]
    for route in ("/v1/rerank", "/v2/rerank", "/rerank"):
        post = paths[route]["post"]
        body_ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert body_ref.rsplit("/", 1)[-1] in spec["components"]["schemas"]
        for status in ("400", "401", "413", "429", "503"):
            err = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert err.endswith("/ErrorBody")
    assert {"/healthz", "/readyz", "/v1/models", "/v1/info", "/metrics"} <= set(paths)
    # The limits are described from the one rule table, not copied into the schema.
    assert "TOO_MANY_DOCUMENTS" in spec["info"]["description"]
    rerank = spec["components"]["schemas"]["RerankIn"]
    assert "maxItems" not in rerank["properties"]["documents"]
