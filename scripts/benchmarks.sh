#!/usr/bin/env bash
# The benchmark evidence of docs/benchmarks.md in one command (issue #16): each step writes a JSON
# file with its provenance (commit, date, machine, command) into docs/data/benchmarks/, then
# scripts/render_docs.py renders docs/benchmarks.md from those files alone.
#
#   bash scripts/benchmarks.sh                   cpu doors memory floors, then render
#   bash scripts/benchmarks.sh cpu doors         a subset of the steps, then render
#   bash scripts/benchmarks.sh gpu OUTDIR        import OUTDIR/bench.json of scripts/gpu_check.sh
#   bash scripts/benchmarks.sh render            render only
#
# Steps:
#   cpu     lychee-rerank bench on the tiny checkpoint, CPU        -> docs/data/benchmarks/cpu-tiny.json
#   doors   lychee-rerank bench-doors (HTTP vs gRPC, tiny, CPU)    -> docs/data/benchmarks/doors.json
#   memory  engine.dryrun at the real shape on a fake CUDA device  -> docs/data/benchmarks/memory-SHAPE.json
#           (skipped, with a message, when server/lychee_server/engine/dryrun.py has no run())
#   floors  FLOP floors from engine/loading.py BUILTIN_SHAPES      -> docs/data/benchmarks/floors.json
#   gpu DIR the bench.json a GPU run of scripts/gpu_check.sh wrote -> docs/data/benchmarks/gpu/bench.json
#           (commit: GPU_COMMIT, default the current one: say which tree the GPU ran)
#
# Settings (environment): BENCH_WORKLOADS (a,b,c,d), BENCH_REPEATS (3), BENCH_NAIVE_LIMIT (8),
# BENCH_THREADS (1: on a small shared machine more torch threads were slower and noisier),
# DOORS_REPEATS (30), MEMORY_SHAPE (qwen2.5-vl-7b), MEMORY_WORKLOADS (a,b,c,packed), MEMORY_IMAGES (50),
# NOTE (a note stored with every file this run writes, e.g. "pipeline check, noisy").
# Rough times on an idle 2-core CPU: cpu 3-6 min, doors 1-2 min, memory 2-5 min, floors < 1 min.
# Exit status: non-zero if any step failed (the other steps still run; a failed step keeps its old file).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
LR=.venv/bin/lychee-rerank
DATA=docs/data/benchmarks
RENDER="$PY scripts/render_docs.py"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/benchmarks.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
status=0
mkdir -p "$DATA"

note_args=()
[ -n "${NOTE:-}" ] && note_args=(--note "$NOTE")

# prov CMD...: the provenance of a run starting now, in $TMP/prov.json (command = CMD as typed).
prov() {
  $RENDER provenance --command "$*" "${note_args[@]}" >"$TMP/prov.json"
}

step_cpu() {
  local cmd=("$LR" bench --device cpu --workloads "${BENCH_WORKLOADS:-a,b,c,d}" --repeats "${BENCH_REPEATS:-3}"
    --naive-limit "${BENCH_NAIVE_LIMIT:-8}" --threads "${BENCH_THREADS:-1}" --json "$TMP/cpu.json" --no-markdown)
  prov "${cmd[@]//$TMP/\$TMP}"
  echo "== cpu: ${cmd[*]}"
  "${cmd[@]}" && $RENDER stamp "$TMP/cpu.json" --out "$DATA/cpu-tiny.json" --provenance "$TMP/prov.json"
}

step_doors() {
  local cmd=("$LR" bench-doors --repeats "${DOORS_REPEATS:-30}" --json "$TMP/doors.json")
  prov "${cmd[@]//$TMP/\$TMP}"
  echo "== doors: ${cmd[*]}"
  "${cmd[@]}"
  local rc=$?  # 1 = the doors disagreed on a ranking: keep the report, it shows how often
  [ -f "$TMP/doors.json" ] && $RENDER stamp "$TMP/doors.json" --out "$DATA/doors.json" --provenance "$TMP/prov.json"
  return "$rc"
}

step_memory() {
  if ! grep -q '^def run(' server/lychee_server/engine/dryrun.py 2>/dev/null; then
    echo "== memory: skipped (server/lychee_server/engine/dryrun.py has no run())"
    return 0
  fi
  local shape=${MEMORY_SHAPE:-qwen2.5-vl-7b}
  local cmd=("$PY" scripts/render_docs.py memory --shape "$shape" --workloads "${MEMORY_WORKLOADS:-a,b,c,packed}"
    --images "${MEMORY_IMAGES:-50}" --out "$DATA/memory-$shape.json")
  prov "${cmd[@]}"
  echo "== memory: ${cmd[*]}"
  "${cmd[@]}" --provenance "$TMP/prov.json"
}

step_floors() {
  local cmd=("$PY" scripts/render_docs.py floors --out "$DATA/floors.json")
  prov "${cmd[@]}"
  echo "== floors: ${cmd[*]}"
  "${cmd[@]}" --provenance "$TMP/prov.json"
}

step_gpu() {
  local dir=$1
  [ -f "$dir/bench.json" ] || { echo "gpu: no bench.json in $dir (run scripts/gpu_check.sh first)" >&2; return 1; }
  prov "bash scripts/gpu_check.sh OUTDIR (step bench: $(sed -n 's/^\s*"command": "\(.*\)",$/\1/p' "$dir/bench.json" | head -n 1))"
  local machine=()
  [ -n "${GPU_MACHINE:-}" ] && machine=(--machine "$GPU_MACHINE")
  local commit=()
  [ -n "${GPU_COMMIT:-}" ] && commit=(--commit "$GPU_COMMIT")
  # The machine: the GPU's name from the bench report, the host CPU and cores from gpu_check's
  # preflight.json (GPU_MACHINE="<cpu model>, <n> cores, <gpu>" overrides).
  [ ${#machine[@]} -eq 0 ] && machine=(--machine "$($PY - "$dir/bench.json" "$dir/preflight.json" <<'PY'
import json, os, sys
gpu = json.load(open(sys.argv[1]))["machine"]
pre = json.load(open(sys.argv[2])) if os.path.isfile(sys.argv[2]) else {}
print(f"{pre.get('cpu') or 'unknown CPU'}, {pre.get('cpu_cores') or 'unknown'} cores, {gpu}")
PY
)")
  echo "== gpu: import $dir/bench.json"
  $RENDER stamp "$dir/bench.json" --out "$DATA/gpu/bench.json" --provenance "$TMP/prov.json" "${machine[@]}" "${commit[@]}"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(cpu doors memory floors)
i=0
while [ $i -lt ${#steps[@]} ]; do
  s=${steps[$i]}
  case "$s" in
    cpu|doors|memory|floors) "step_$s" || { echo "!! $s failed" >&2; status=1; } ;;
    gpu) i=$((i + 1)); step_gpu "${steps[$i]:?gpu needs the gpu_check OUTDIR}" || status=1 ;;
    render) ;;
    *) echo "benchmarks.sh: unknown step $s (cpu doors memory floors gpu DIR render)" >&2; exit 2 ;;
  esac
  i=$((i + 1))
done

echo "== render docs/benchmarks.md"
$RENDER render benchmarks || status=1
exit "$status"
