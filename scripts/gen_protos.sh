#!/usr/bin/env bash
# Regenerates the committed Python stubs (lychee.rerank.v1) from proto/ with grpcio-tools and
# mypy-protobuf (versions pinned in pyproject's [dev] extra so the output is reproducible).
# CI runs this and then `git diff --exit-code client/` to catch drift.
set -euo pipefail
cd "$(dirname "$0")/.."
out=client
rm -f "$out"/lychee/rerank/v1/*_pb2*.py "$out"/lychee/rerank/v1/*_pb2*.pyi
python -m grpc_tools.protoc \
  -I proto \
  --python_out="$out" \
  --grpc_python_out="$out" \
  --mypy_out="$out" \
  --mypy_grpc_out="$out" \
  proto/lychee/rerank/v1/*.proto
echo "stubs written to $out/lychee/rerank/v1/"
