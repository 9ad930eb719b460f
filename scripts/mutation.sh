#!/usr/bin/env bash
# Mutation testing (cosmic-ray) of the modules issue 16 names, each against its own fast tests:
#   recipe         engine/recipe.py (whole module)          tests/engine/test_recipe_unit.py + Prompt test
#   score-head     engine/interface.py probability()         tests/engine/test_probability.py
#   score-rows     engine/qwen.py: yes/no ids, the 2 lm_head rows, final norm (FP32 head), yes - no
#                                                            golden subset + score-row test (slow: model)
#   ordering       scheduler/core.py _sort_key + _finish     tests/scheduler
#   status         edge/status.py (whole module)             tests/edge/test_edge_status.py, http status table
#   validation     edge/validation.py (whole module)         tests/edge codec, rules, contract doc
#
# Runs in a temporary copy of the repository (the working tree is never mutated), with cosmic-ray in
# its own virtual environment (MUTATION_VENV, created on first use; the tests run on .venv).
#   bash scripts/mutation.sh [target ...]        (default: all)
#   MUTATION_LINES=44,88 bash scripts/mutation.sh recipe   (only the mutants on those lines)
# Writes the sessions and a summary to MUTATION_OUT (default build/mutation/): per target the
# score (killed / (killed + survived); a test run past the timeout counts as killed, as cosmic-ray
# reports it; incompetent mutants, which do not even import, are left out) and every
# surviving mutant as a diff (cr-report).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
VENV="${MUTATION_VENV:-$ROOT/build/mutation-venv}"
OUT="${MUTATION_OUT:-$ROOT/build/mutation}"
COSMIC_RAY_VERSION="8.7.0"
ALL=(recipe score-head score-rows ordering status validation)
TARGETS=("${@:-${ALL[@]}}")

if [[ ! -x "$VENV/bin/cosmic-ray" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "cosmic-ray==$COSMIC_RAY_VERSION"
fi
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lychee-mutation.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
(cd "$ROOT" && git ls-files -co --exclude-standard | grep -v node_modules | while read -r f; do
  [[ -f "$f" ]] && mkdir -p "$WORK/$(dirname "$f")" && cp -p "$f" "$WORK/$f"; done)
# The copy's own packages first (the editable install in .venv points at the working tree).
export PYTHONPATH="$WORK/server:$WORK/client:$WORK/tests"
"$PY" -c "import lychee_server, sys; p = lychee_server.__file__; sys.exit(0 if p.startswith('$WORK') else f'imports {p}')"

# Line ranges of named functions ("file:func,Class.method") as cosmic-ray line-filter specs.
ranges() {
  "$PY" - "$WORK/$1" "$2" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
want = sys.argv[2].split(",")
found = {}
def walk(body, prefix=""):
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + node.name
            found[name] = (node.lineno, node.end_lineno)
            if isinstance(node, ast.ClassDef):
                walk(node.body, name + ".")
walk(tree.body)
missing = [w for w in want if w not in found]
assert not missing, f"no such functions: {missing}"
print(", ".join(f'"{found[w][0]}-{found[w][1]}"' for w in want))
PY
}

# Lines holding one of the given literal snippets ("|"-separated), as line-filter specs.
lines_with() {
  "$PY" - "$WORK/$1" "$2" <<'PY'
import sys
text = open(sys.argv[1]).read().splitlines()
snips = sys.argv[2].split("|")
hits = [i + 1 for i, line in enumerate(text) if any(s in line for s in snips)]
assert len(hits) >= len(snips), f"snippets not all found: {hits}"
print(", ".join(f'"{n}"' for n in hits))
PY
}

run_target() {
  local name="$1" module tests lines="" timeout=60
  case "$name" in
    recipe)
      module=server/lychee_server/engine/recipe.py
      tests="tests/engine/test_recipe_unit.py tests/engine/test_special_tokens.py::test_prompt_compile_cuts_at_control_tokens_and_keeps_slots" ;;
    score-head)
      module=server/lychee_server/engine/interface.py
      tests="tests/engine/test_probability.py"
      lines="$(ranges "$module" probability)" ;;
    score-rows)
      module=server/lychee_server/engine/qwen.py
      tests="tests/engine/test_reference_independence.py::test_engine_score_rows_are_the_tokenizers_no_and_yes tests/engine/test_score_head.py::test_score_head_is_float32_in_a_bf16_model tests/engine/test_golden.py::test_one_pair_at_a_time_and_any_order"
      lines="$(lines_with "$module" 'self.yes_id = |self.no_id = |self.w_no_yes: torch.Tensor = |self.norm_w: torch.Tensor = |self.norm_eps = |hn = F.rms_norm(hl.float()|logits = hn @ |return logits[:, 1] - logits[:, 0]')"
      timeout=240 ;;
    ordering)
      module=server/lychee_server/scheduler/core.py
      tests="tests/scheduler"
      lines="$(ranges "$module" _sort_key,Scheduler._finish)" ;;
    status)
      module=server/lychee_server/edge/status.py
      tests="tests/edge/test_edge_status.py tests/edge/test_status_limits.py tests/http_door/test_status_table.py" ;;
    validation)
      module=server/lychee_server/edge/validation.py
      tests="tests/edge/test_edge_rules.py tests/edge/test_validation_edges.py tests/edge/test_edge_codec.py tests/edge/test_contract_doc.py" ;;
    *) echo "unknown target $name (known: ${ALL[*]})" >&2; return 2 ;;
  esac
  # MUTATION_LINES="44,88,..." re-runs only the mutants on those lines (e.g. the survivors of a
  # previous full run, after tests were added for them).
  if [[ -n "${MUTATION_LINES:-}" ]]; then
    lines="$(echo "$MUTATION_LINES" | tr ',' '\n' | sed 's/.*/"&"/' | paste -sd, - | sed 's/,/, /g')"
  fi
  local cfg="$OUT/$name.toml" session="$OUT/$name.sqlite"
  {
    echo "[cosmic-ray]"
    echo "module-path = \"$module\""
    echo "timeout = $timeout.0"
    echo "excluded-modules = []"
    echo "test-command = \"$PY -m pytest -x -q -p no:cacheprovider -p no:randomly $tests\""
    echo "[cosmic-ray.distributor]"
    echo "name = \"local\""
    if [[ -n "$lines" ]]; then
      echo "[cosmic-ray.filters.line-filter]"
      echo "lines = { \"$module\" = [$lines] }"
    fi
  } > "$cfg"
  rm -f "$session"
  (
    cd "$WORK"
    "$VENV/bin/cosmic-ray" init "$cfg" "$session"
    [[ -z "$lines" ]] || "$VENV/bin/cr-filter-lines" --config "$cfg" "$session"
    "$VENV/bin/cosmic-ray" baseline "$cfg"
    "$VENV/bin/cosmic-ray" exec "$cfg" "$session"
  )
  "$VENV/bin/cr-report" --show-pending "$session" > "$OUT/$name.report.txt" || true
  "$PY" - "$session" > "$OUT/$name.survivors.txt" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
query = """select s.operator_name, s.occurrence, s.start_pos_row, r.diff from work_results r
    join mutation_specs s on s.job_id = r.job_id where lower(r.test_outcome) = 'survived'
    order by s.start_pos_row"""
for op, occ, row, diff in db.execute(query):
    print(f"--- line {row}: {op} #{occ}")
    for line in (diff or "").splitlines():
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---")):
            print(line)
PY
  "$PY" - "$session" "$name" "$module" >> "$OUT/summary.md" <<'PY'
import sqlite3, sys
session, name, module = sys.argv[1:]
db = sqlite3.connect(session)
rows = [
    ((w or "").lower(), (t or "").lower())
    for w, t in db.execute("select worker_outcome, test_outcome from work_results")
]
total = db.execute("select count(*) from work_items").fetchone()[0]
skipped = sum(1 for w, _ in rows if w == "skipped")
killed = sum(1 for w, t in rows if w != "skipped" and t == "killed")
survived = sum(1 for w, t in rows if w != "skipped" and t == "survived")
incompetent = sum(1 for w, t in rows if w != "skipped" and t == "incompetent")
tested = killed + survived
score = 100.0 * killed / tested if tested else float("nan")
print(f"| {name} | `{module}` | {tested} | {killed} | {survived} | {score:.1f}% | "
      f"{skipped} outside the target, {incompetent} incompetent, {total - len(rows)} pending |")
PY
  echo "== $name: $(tail -1 "$OUT/summary.md")"
}

: > "$OUT/summary.md"
echo "| target | module | mutants tested | killed | survived | score | other |" >> "$OUT/summary.md"
echo "|---|---|---|---|---|---|---|" >> "$OUT/summary.md"
for t in "${TARGETS[@]}"; do run_target "$t"; done
cat "$OUT/summary.md"
