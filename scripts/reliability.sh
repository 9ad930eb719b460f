#!/usr/bin/env bash
# The reliability suite in one command: bad-input catalogue, edge fuzzing, load, faults, security,
# liveness; then its figures as committed evidence (issue #16).
#
#   bash scripts/reliability.sh            run every group, import the figures, render docs/reliability.md
#   bash scripts/reliability.sh --render   only re-render docs/reliability.md from docs/data/reliability/
#
# Every group runs even if an earlier one fails (the report shows what failed); the exit status is
# non-zero if any group failed. The raw outputs land in build/reliability/: <group>.json written by
# the tests themselves (load, faults, security, liveness), <group>.xml (JUnit), <group>.log,
# <group>.rc and <group>.cmd (the exact command) for every group. Then
# `scripts/render_docs.py import-reliability` writes one docs/data/reliability/<group>.json per group
# with the provenance of this run (commit, date, machine, command, captured when the script started)
# and `scripts/render_docs.py render reliability` renders docs/reliability.md from those files alone.
# Load parameters pass through: LOAD_CLIENTS, LOAD_SECONDS, LOAD_MAX_INFLIGHT_PAIRS, LOAD_SAMPLE_S;
# the liveness benchmark takes LIVENESS_SECONDS per phase (default 20) and LIVENESS_MIX.
# Takes about 4-6 minutes on an idle 2-core machine.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate

OUT=build/reliability
export LYCHEE_RELIABILITY_OUT="$PWD/$OUT"
status=0

run_group() {
  local name=$1
  shift
  echo "== $name: pytest $*"
  local envs=""
  for var in LOAD_CLIENTS LOAD_SECONDS LOAD_MAX_INFLIGHT_PAIRS LOAD_SAMPLE_S LIVENESS_SECONDS LIVENESS_MIX; do
    [ -n "${!var:-}" ] && envs+="$var=${!var} "
  done
  echo "${envs}python -m pytest $* -q --junitxml=$OUT/$name.xml" >"$OUT/$name.cmd"
  python -m pytest "$@" -q --junitxml="$OUT/$name.xml" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$rc" >"$OUT/$name.rc"
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (pytest exit $rc)" >&2
    status=1
  fi
}

if [ "${1:-}" != "--render" ]; then
  rm -rf "$OUT"
  mkdir -p "$OUT"
  # Provenance of this run, taken before anything runs (the commit and tree the figures belong to).
  python scripts/render_docs.py provenance --command "bash scripts/reliability.sh" >"$OUT/provenance.json" || status=1
  run_group bad_inputs tests/reliability/test_bad_inputs.py
  run_group fuzz tests/reliability/test_fuzz_edge.py
  run_group load tests/reliability/test_load.py -s
  run_group faults tests/reliability/test_faults.py
  run_group security tests/reliability/test_security.py
  LIVENESS_SECONDS="${LIVENESS_SECONDS:-20}" run_group liveness -m slow tests/reliability/test_liveness.py -s
  echo "== import build/reliability -> docs/data/reliability"
  python scripts/render_docs.py import-reliability "$OUT" docs/data/reliability \
    --provenance "$OUT/provenance.json" || status=1
fi

echo "== render docs/reliability.md"
python scripts/render_docs.py render reliability || status=1

exit "$status"
