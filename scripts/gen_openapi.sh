#!/usr/bin/env bash
# Regenerates the committed OpenAPI document of the HTTP door (openapi/lychee-rerank.json).
# tests/http_door/test_openapi.py fails when the committed file and the code disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p openapi
python -m lychee_server.edge.http.openapi > openapi/lychee-rerank.json
echo "written openapi/lychee-rerank.json"
