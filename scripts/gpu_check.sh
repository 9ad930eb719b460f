#!/usr/bin/env bash
# The one prepared GPU check (issue 12): on a bare GPU machine with torch + transformers and nothing
# installed from this repo (no `pip install -e .`, no network), run every check that needs the GPU,
# each step in its own process under its own time limit, and write every report to OUTDIR.
#
#   bash scripts/gpu_check.sh OUTDIR [--device cpu|cuda] [--model DIR] [--shape NAME]
#                                    [--budget SECONDS] [--steps a,b,...] [--wheels DIR]
#
# Steps (in this order; each runs whether or not an earlier one failed):
#   wheels      install carried wheels for missing runtime modules (pydantic, pydantic-settings,
#               simplejpeg, ...) offline into a temporary directory (--wheels, default ./.whl;
#               make them with `python -m lychee_server.gpu_check fetch-wheels .whl` where pip works)
#   preflight   versions, GPU, varlen attention / flash-attn / torch.compile / float8 probes,
#               whether the engine imports                                   -> preflight.json
#   checkpoint  the tiny test checkpoint (processor + tokenizer; the weights too on --device cpu)
#   check-bf16  `check` in bfloat16                                           -> check-bf16.json
#   check-fp32  `check` in float32 (1e-5) plus the BF16-vs-FP32 ranking tau   -> check-fp32.json
#   bench       workloads a,b,c,d, MFU against the detected GPU's peak        -> bench.json,
#               benchmarks-gpu.md (never the repo's docs/benchmarks.md)
#   profile     one request of (a) and (b) under CUDA sync-debug mode and the torch profiler
#                                               -> syncdebug.txt, profile.txt, profile.json
#   variants    `check` per engine settings variant (attention backend, fused kernels, fp8)
#                                                                             -> variants.json
# Then the summary table (also summary.txt / summary.json) is printed LAST, after a tarball of
# everything (gpu_check-bundle.tgz): copy that and summary.txt back, not the whole folder.
#
# Without --model: random weights at the qwen2.5-vl-7b shape on CUDA, the tiny checkpoint on CPU.
# --device cpu with the tiny checkpoint is the CI run (tests/engine/test_gpu_check.py).
# Environment: PYTHON (default python3); GPU_CHECK_BUDGET_S (default 480: the whole run, each step's
# limit is cut to what is left); GPU_CHECK_LIMIT_<STEP> (seconds, e.g. GPU_CHECK_LIMIT_CHECK_FP32);
# GPU_CHECK_FAIL_STEP=name[,name] (simulate a failing step: "check" fails check-bf16 and check-fp32).
# Exit status: 0 when every step that ran passed, else 1.
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=""
DEVICE=cuda
MODEL=""
SHAPE=""
STEPS=""
WHEELS="${GPU_CHECK_WHEELS:-$REPO/.whl}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --shape) SHAPE="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) if [ -z "$OUTDIR" ]; then OUTDIR="$1"; shift; else echo "gpu_check: extra argument $1" >&2; exit 2; fi ;;
  esac
done
[ -n "$OUTDIR" ] || { usage >&2; exit 2; }
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
case "$DEVICE" in cpu|cuda|cuda:*) ;; *) echo "gpu_check: --device cpu or cuda" >&2; exit 2 ;; esac

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# The repo's packages straight from the tree (nothing installed), then the carried wheels, then
# whatever the caller had.
export PYTHONPATH="$REPO/server:$REPO/client:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export LC_NUMERIC=C  # EPOCHREALTIME and awk: a decimal point, whatever the machine's locale
cd "$REPO" || exit 2

# Stale reports from an earlier run in the same OUTDIR must not pass for this run's.
for f in steps.tsv summary.txt summary.json preflight.json wheels.json check-bf16.json check-fp32.json \
  bench.json benchmarks-gpu.md syncdebug.txt profile.txt profile.json variants.json gpu_check-bundle.tgz; do
  rm -f "$OUTDIR/$f"
done
rm -f "$OUTDIR"/*.log
: >"$OUTDIR/steps.tsv"

now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }
START=$(now)
HAVE_TIMEOUT=1
command -v timeout >/dev/null 2>&1 || HAVE_TIMEOUT=0

selected() { [ -z "$STEPS" ] || [[ ",$STEPS," == *",$1,"* ]]; }
simulated() {
  local item items
  IFS=',' read -r -a items <<<"${GPU_CHECK_FAIL_STEP:-}"
  for item in "${items[@]}"; do
    [ -n "$item" ] && { [ "$1" = "$item" ] || [[ "$1" == "$item"-* ]]; } && return 0
  done
  return 1
}

# run_step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left), log to OUTDIR/NAME.log,
# record "NAME<TAB>rc<TAB>seconds<TAB>note" in steps.tsv.
run_step() {
  local name="$1" limit="$2"; shift 2
  selected "$name" || return 0
  local var="GPU_CHECK_LIMIT_$(printf '%s' "$name" | tr 'a-z-' 'A-Z_')"
  limit="${!var:-$limit}"
  local left
  left=$(awk -v b="$BUDGET" -v s="$START" -v n="$(now)" 'BEGIN { printf "%d", b - (n - s) }')
  if [ "$left" -lt 20 ]; then
    printf '%s\tskip\t0\tskipped: %ss of the %ss budget left\n' "$name" "$left" "$BUDGET" >>"$OUTDIR/steps.tsv"
    echo "[gpu_check] $name: SKIPPED (budget spent)"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit="$left"
  if simulated "$name"; then
    set -- "$PY" -c "import sys; print('GPU_CHECK_FAIL_STEP: simulated failure of $name'); sys.exit(97)"
  fi
  echo "[gpu_check] $name (limit ${limit}s): $*" | cut -c1-300
  local t0 rc dt
  t0=$(now)
  if [ "$HAVE_TIMEOUT" = 1 ]; then
    timeout -k 15 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  else
    "$@" >"$OUTDIR/$name.log" 2>&1
  fi
  rc=$?
  dt=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$limit" >>"$OUTDIR/steps.tsv"
  echo "[gpu_check] $name: rc=$rc in ${dt}s"
  if [ "$rc" != 0 ]; then tail -n 6 "$OUTDIR/$name.log" | cut -c1-240 | sed 's/^/    | /'; fi
}

run_step wheels 150 "$PY" -m lychee_server.gpu_check wheels --dir "$WHEELS" --target "$WORK/site" \
  --json "$OUTDIR/wheels.json"
run_step preflight 150 "$PY" -m lychee_server.gpu_check preflight --device "$DEVICE" \
  --json "$OUTDIR/preflight.json"

# What every engine step loads: a real checkpoint (--model), else random weights at a real shape
# on CUDA (processor + tokenizer from the tiny checkpoint), else the tiny checkpoint itself.
if [ -n "$MODEL" ]; then
  MODEL_ARGS=(--device "$DEVICE" --model "$MODEL")
  [ -n "$SHAPE" ] && MODEL_ARGS+=(--random-weights --shape "$SHAPE")
else
  run_step checkpoint 120 "$PY" -m lychee_server.cli make-test-checkpoint "$WORK/tiny"
  [ "$DEVICE" != cpu ] && [ -z "$SHAPE" ] && SHAPE=qwen2.5-vl-7b
  MODEL_ARGS=(--device "$DEVICE" --model "$WORK/tiny")
  [ -n "$SHAPE" ] && MODEL_ARGS+=(--random-weights --shape "$SHAPE")
fi
if [ "$DEVICE" = cpu ]; then
  REPEATS=1 NAIVE=1 RANKING_DOCS=8 VARIANT_DTYPE=float32  # bf16 matmuls crawl on a CPU
else
  REPEATS=3 NAIVE=4 RANKING_DOCS=24 VARIANT_DTYPE=bfloat16
fi
# Random weights rank near-ties by coin toss: report their tau, gate only a real model on it.
TAU=()
[ -z "$MODEL" ] || [ -n "$SHAPE" ] && TAU=(--min-tau 0)

run_step check-bf16 180 "$PY" -m lychee_server.cli check "${MODEL_ARGS[@]}" --dtype bfloat16 \
  --json "$OUTDIR/check-bf16.json"
run_step check-fp32 210 "$PY" -m lychee_server.cli check "${MODEL_ARGS[@]}" --dtype float32 \
  --bf16-ranking --ranking-docs "$RANKING_DOCS" "${TAU[@]}" --json "$OUTDIR/check-fp32.json"
run_step bench 240 "$PY" -m lychee_server.cli bench "${MODEL_ARGS[@]}" --workloads a,b,c,d \
  --repeats "$REPEATS" --naive-limit "$NAIVE" --json "$OUTDIR/bench.json" \
  --markdown "$OUTDIR/benchmarks-gpu.md"
run_step profile 180 "$PY" -m lychee_server.gpu_check profile "${MODEL_ARGS[@]}" --out "$OUTDIR"
run_step variants 240 "$PY" -m lychee_server.gpu_check variants "${MODEL_ARGS[@]}" \
  --dtype "$VARIANT_DTYPE" --json "$OUTDIR/variants.json"

# The table: from the driver, or (no working python) from steps.tsv alone.
if ! { if [ "$HAVE_TIMEOUT" = 1 ]; then timeout -k 5 60 "$PY" -m lychee_server.gpu_check summary --out "$OUTDIR"; \
       else "$PY" -m lychee_server.gpu_check summary --out "$OUTDIR"; fi; } \
     >"$OUTDIR/summary.txt" 2>"$OUTDIR/summary.log"; then
  {
    printf '%-12s  %-10s %6s  %s\n' step status secs 'key figure (summary driver failed: see summary.log)'
    while IFS=$'\t' read -r name rc secs _; do
      printf '%-12s  %-10s %6s\n' "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" "$secs"
    done <"$OUTDIR/steps.tsv"
  } >"$OUTDIR/summary.txt"
fi
STATUS=0
while IFS=$'\t' read -r _ rc _ _; do [ "$rc" = 0 ] || STATUS=1; done <"$OUTDIR/steps.tsv"
tar -czf "$WORK/bundle.tgz" -C "$OUTDIR" --exclude=gpu_check-bundle.tgz . 2>/dev/null \
  && mv "$WORK/bundle.tgz" "$OUTDIR/gpu_check-bundle.tgz"
echo
cat "$OUTDIR/summary.txt"
exit "$STATUS"
