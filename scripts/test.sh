#!/usr/bin/env bash
# The one test command: contract lint/format/drift/breaking checks, ruff, mypy, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k stream`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== buf lint / format"
buf lint
buf format --diff --exit-code

echo "== generated stubs are up to date"
bash scripts/gen_protos.sh >/dev/null
git diff --exit-code -- client/lychee/rerank/v1 || { echo "stubs drifted: run scripts/gen_protos.sh and commit" >&2; exit 1; }
if [ -n "$(git status --porcelain -- client/lychee/rerank/v1)" ]; then
  echo "untracked generated files in client/lychee/rerank/v1" >&2; exit 1
fi

echo "== buf breaking (FILE) against the landed contract"
if [ -s proto/BREAKING_BASELINE ] && git cat-file -e "$(cat proto/BREAKING_BASELINE)^{commit}" 2>/dev/null; then
  buf breaking --against ".git#ref=$(cat proto/BREAKING_BASELINE),subdir=proto" proto
elif [ "${CI:-}" = "true" ]; then
  echo "CI=true: the buf breaking baseline $(cat proto/BREAKING_BASELINE 2>/dev/null) is not in this clone's history; buf breaking may not be skipped" >&2
  exit 1
else
  echo "no landed baseline recorded yet (proto/BREAKING_BASELINE); skipping"
fi

echo "== ruff"
ruff check .
ruff format --check client/lychee/rerank/client adapters server tests examples

echo "== mypy (strict on the client and the adapters)"
mypy client/lychee/rerank/client adapters/langchain_lychee adapters/llamaindex_lychee adapters/haystack_lychee
mypy server/lychee_server

echo "== pytest"
python -m pytest "$@"
