#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the server, the LangChain
# adapter and the dev tooling installed (editable), plus the Node test client's packages.
# Idempotent. TORCH_SPEC overrides the torch pin (e.g. TORCH_SPEC="torch torchvision" on a
# GPU host with its own CUDA wheels); the default pin is the release this workplace carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
# Pinned to the versions the suite was last green with, so CI does not change under our feet
# (not with a TORCH_SPEC of your own: the pins include this torch's CUDA wheels).
pins=(-c scripts/constraints.txt)
[ -z "${TORCH_SPEC:-}" ] || pins=()
.venv/bin/python -m pip install -q "${pins[@]}" -e ".[server,langchain,llamaindex,haystack,eval,dev]"
# Qwen's real BPE ranks for the real-vocabulary test checkpoint (tests/engine/test_real_vocab.py):
# the tests read dashscope/resources/qwen.tiktoken out of this wheel as a zip (sha256 checked there);
# dashscope itself is not installed (its dependencies are heavy and nothing imports it).
[ -f build/wheels/dashscope-2.0.2-py3-none-any.whl ] \
  || .venv/bin/python -m pip download -q --no-deps dashscope==2.0.2 -d build/wheels
if command -v npm >/dev/null 2>&1; then
  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
  (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)  # the Node example
else
  echo "install.sh: npm not found; the Node client tests will be skipped" >&2
fi
echo "installed: $(.venv/bin/lychee-rerank --help | head -1)"
