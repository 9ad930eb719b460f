"""The HTTP door's OpenAPI document, as committed in ``openapi/lychee-rerank.json``.

``python -m lychee_server.edge.http.openapi`` prints it (``scripts/gen_openapi.sh`` writes the
file); a test regenerates it and fails on drift, as for the generated gRPC stubs. The document
depends only on the code (routes, JSON shapes, the rule table), not on a running server.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from lychee_server.edge.gate import Gate
from lychee_server.edge.http.door import HttpDoor
from lychee_server.metrics import Metrics
from lychee_server.settings import Settings

__all__ = ["openapi_document", "render"]

CONTRACT_VERSION = "v1"
"""The version stated in the committed document: the contract's, not the package's."""


def openapi_document() -> dict[str, Any]:
    metrics = Metrics()
    door = HttpDoor(Settings(), Gate(metrics), metrics, version=CONTRACT_VERSION)
    return door.app.openapi()


def render() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
