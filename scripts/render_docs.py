#!/usr/bin/env python3
"""Generated evidence (issue #16): docs/benchmarks.md and docs/reliability.md from committed JSON.

Design: data, then render. Every producing step (``scripts/benchmarks.sh``, ``scripts/reliability.sh``)
writes a JSON file into ``docs/data/benchmarks/`` or ``docs/data/reliability/`` carrying its
provenance -- ``commit`` (git short sha, ``-dirty`` when server/ client/ tests/ scripts/ had
uncommitted changes), ``date`` (UTC, ISO 8601), ``machine`` (CPU model, cores, GPU or "no GPU"),
``command`` (what was run) -- next to its figures. ``render`` turns those files, and nothing else,
into the two Markdown documents; the prose around them is written here and contains no typed
numbers: every number in a rendered doc passes through :class:`Fmt` (see ``untyped_digits``, which
tests/test_generated_docs.py runs on a rendering whose interpolations are all replaced by a sentinel).

Sub-commands:

  render [benchmarks|reliability|all]   write the docs from docs/data/ (default: all)
  check  [benchmarks|reliability|all]   exit 1 if a committed doc differs from its rendering
  provenance --command CMD              print the provenance of a run starting now (JSON)
  stamp RAW --out FILE --provenance P   wrap a tool's JSON report (bench, bench-doors, gpu_check's
                                        bench.json) with provenance P: {provenance..., report: RAW}
  import-reliability SRC DST            build/reliability/ (JUnit XML, logs, exit codes, the tests'
                                        JSON) -> one JSON per group in DST, with provenance
  floors --out FILE                     FLOP floors at the built-in shapes (counted from the model
                                        built on the meta device) -> FILE, with provenance
  memory --shape S --workloads W --out FILE
                                        the fake-CUDA memory model (engine.dryrun.run) -> FILE
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "docs" / "data"
DOCS = {"benchmarks": REPO / "docs" / "benchmarks.md", "reliability": REPO / "docs" / "reliability.md"}
PROVENANCE_KEYS = ("commit", "date", "machine", "command")
UNKNOWN_COMMIT = "unknown (generated before provenance was recorded)"
DIRTY_PATHS = ("server", "client", "tests", "scripts")
SENTINEL = "\u27e8v\u27e9"  # what every interpolation renders as in sentinel mode
# The reliability groups, in the order scripts/reliability.sh runs them, with their pytest
# arguments (tests/test_generated_docs.py checks that the script's run_group lines match).
RELIABILITY_GROUPS: dict[str, tuple[str, ...]] = {
    "bad_inputs": ("tests/reliability/test_bad_inputs.py",),
    "fuzz": ("tests/reliability/test_fuzz_edge.py",),
    "load": ("tests/reliability/test_load.py", "-s"),
    "faults": ("tests/reliability/test_faults.py",),
    "security": ("tests/reliability/test_security.py",),
    "liveness": ("-m", "slow", "tests/reliability/test_liveness.py", "-s"),
}


# ============================================================================ provenance
def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def git_commit() -> str:
    """Short sha of HEAD, ``-dirty`` when the code paths have uncommitted (or untracked) changes."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (no git checkout)"
    dirty = _git("status", "--porcelain", "--", *DIRTY_PATHS)
    return head + ("-dirty" if dirty else "")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _gpus() -> list[str]:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def machine_string(cpu: str | None = None, cores: int | None = None, gpus: list[str] | None = None) -> str:
    from lychee_server.machine import cpu_model

    cpu = cpu or cpu_model()
    cores = cores or os.cpu_count()
    gpus = _gpus() if gpus is None else gpus
    return f"{cpu}, {cores} cores, " + (", ".join(gpus) if gpus else "no GPU")


def provenance(command: str, note: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "commit": git_commit(),
        "date": utc_now(),
        "machine": machine_string(),
        "command": command,
    }
    if note:
        out["note"] = note
    return out


def missing_provenance(doc: Any) -> list[str]:
    """The provenance fields ``doc`` lacks (or has empty)."""
    if not isinstance(doc, dict):
        return list(PROVENANCE_KEYS)
    return [k for k in PROVENANCE_KEYS if not isinstance(doc.get(k), str) or not doc[k].strip()]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    loaded = json.loads(path.read_text())
    return loaded if isinstance(loaded, dict) else None


# ============================================================================ interpolation
class Fmt:
    """Every value that reaches a rendered doc goes through here.

    ``Fmt()(x, ".1f")`` formats; in sentinel mode every call returns :data:`SENTINEL` instead, so
    what is left of a rendering in that mode is the template's own text, which must hold no typed
    number (``untyped_digits``)."""

    def __init__(self, sentinel: bool = False) -> None:
        self.sentinel = sentinel

    def __call__(self, value: Any, spec: str = "") -> str:
        if self.sentinel:
            return SENTINEL
        if value is None:
            return "n/a"
        return format(value, spec)


# Tokens with digits that the template may contain: names, not figures.
ALLOWED_DIGIT_TOKENS: tuple[str, ...] = (
    r"p(50|90|95|99)",  # percentile names in column headers
    r"(H100|H200|A100)",  # GPU names
    r"(BF16|FP32|FP8|bfloat16|float32)",  # dtype names
    r"(Qwen2\.5-VL|qwen2\.5-vl-(7b|3b)|7B|3B)",  # model names
    r"UTF-8",
    r"AIP-193",
    r"base64",
    r"(v1/rerank|v1)",  # route and API version
    r"(Conv3d|uint8)",  # PyTorch names
    r"grpc/grpc#\d+",  # upstream issue references
    r"#\d+",  # this project's issue references
    r"127\.0\.0\.1",  # loopback address
)
_ALLOWED = re.compile("|".join(f"(?:{p})" for p in ALLOWED_DIGIT_TOKENS))
_TOKEN = re.compile(r"[A-Za-z0-9_#./+-]*\d[A-Za-z0-9_#./+-]*")


def untyped_digits(text: str) -> list[str]:
    """Tokens of ``text`` (a sentinel-mode rendering) that carry a digit and are not an allowed name.

    The rule: after every interpolation is replaced by the sentinel, no digit may remain except
    inside a token that fully matches one of :data:`ALLOWED_DIGIT_TOKENS` (trailing punctuation
    stripped). A number typed into the prose, a figure formatted without ``Fmt``, or a flag value
    written into a command by hand (``--repeats 3``) is reported."""
    bad = []
    for m in _TOKEN.finditer(text.replace(SENTINEL, " ")):
        token = m.group(0).strip(".-/+")
        if token and any(c.isdigit() for c in token) and not _ALLOWED.fullmatch(token):
            bad.append(token)
    return bad


def _table(head: list[str], align: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _prov(v: Fmt, doc: dict[str, Any], path: str) -> list[str]:
    """The provenance line every table/section shows."""
    out = [
        f"*Data:* `{v(path)}` — commit `{v(doc.get('commit'))}`, {v(doc.get('date'))}, "
        f"{v(doc.get('machine'))}.",
        f"*Command:* `{v(doc.get('command'))}`",
    ]
    if doc.get("note"):
        out[-1] += f" — *note:* {v(doc['note'])}"
    return out


# ============================================================================ benchmarks
BENCH = DATA / "benchmarks"

_WORKLOAD_PROSE = {
    "a": "a text query against image documents (JPEGs generated locally with PIL)",
    "b": "a text query against text passages",
    "c": "an image query against the image documents of (a)",
    "d": "workload (a) with every document image already in the vision cache",
}


def _bench_rows(v: Fmt, report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report.get("rows", []):
        mfu = "n/a (CPU)" if r.get("mfu") is None else v(100 * r["mfu"], ".1f") + "%"
        rows.append(
            [
                f"({v(r['workload'])}) {v(r['description'])}",
                v(r["pairs"]),
                v(r["pairs_per_s"], ".1f"),
                v(r["latency_p50_s"], ".3f"),
                v(r["latency_p95_s"], ".3f"),
                f"{v(r['peak_memory_mib'], '.0f')} ({v(r['memory_kind'])})",
                mfu,
                f"{v(r['naive_s_per_pair'], '.4f')} ({v(r['naive_pairs_timed'])})",
                v(r["speedup"], ".1f") + "x",
            ]
        )
    return rows


def _bench_table(v: Fmt, doc: dict[str, Any], path: str) -> list[str]:
    rep = doc["report"]
    lines = _prov(v, doc, path)
    lines += [
        "",
        f"Model {v(rep.get('model'))} ({v(rep.get('dtype'))} on {v(rep.get('device'))}), torch "
        f"{v(rep.get('torch'))}, timed repeats per workload: {v(rep.get('repeats'))}; "
        f"{v(rep.get('naive_note'))}.",
    ]
    if rep.get("peak_flops"):
        lines[-1] += (
            f" MFU against {v(rep['peak_flops'] / 1e12, '.0f')} TFLOP/s ({v(rep.get('peak_flops_source'))})."
        )
    lines += [""]
    lines += _table(
        [
            "workload",
            "pairs",
            "pairs/s",
            "p50 latency (s)",
            "p95 latency (s)",
            "peak memory (MiB)",
            "MFU",
            "naive s/pair (pairs timed)",
            "speedup vs naive",
        ],
        ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"],
        _bench_rows(v, rep),
    )
    return lines


def _doors_section(v: Fmt, doc: dict[str, Any], path: str) -> list[str]:
    rep = doc["report"]
    m = rep.get("machine", {})
    server = rep.get("server", {})
    lines = _prov(v, doc, path)
    lines += [
        "",
        f"Server: {v(server.get('model'))}, spawned {v(server.get('spawned'))}, batch wait "
        f"{v(server.get('max_batch_wait_ms'))} ms, vision cache {v(server.get('vision_cache'))}, decode "
        f"threads {v(server.get('decode_threads'))}, torch threads {v(m.get('server_torch_threads'))}; "
        f"python {v(m.get('python'))}, grpcio {v(m.get('grpcio'))}, httpx {v(m.get('httpx'))}; "
        f"{v(rep.get('warmup'))} untimed then {v(rep.get('repeats'))} timed calls per door and workload; "
        f"load average {v(rep.get('load_average_before', [None])[0])} before, "
        f"{v(rep.get('load_average_after', [None])[0])} after; {v(rep.get('wall_s'), '.0f')} s in all.",
        "",
    ]
    rows = []
    for row in rep.get("rows", []):
        g, h = row["grpc"], row["http"]
        call = "stream" if g.get("streamed") else "unary"
        ratio = row["http_over_grpc_p50"]
        same = f"{v(row['identical_rankings'])}/{v(row['repeats'])}"
        rows.append(
            [
                _cell(v(row["description"])),
                f"gRPC (LycheeClient, {call})",
                v(g["body_bytes"], ",") + " B",
                v(1000 * g["p50_s"], ".1f"),
                v(1000 * g["p90_s"], ".1f"),
                v(1000 * g["mean_s"], ".1f"),
                v(1000 * g["encode_s"], ".1f"),
                "",
                same,
            ]
        )
        rows.append(
            [
                "",
                "HTTP (httpx, /v1/rerank)",
                v(h["body_bytes"], ",") + " B",
                v(1000 * h["p50_s"], ".1f"),
                v(1000 * h["p90_s"], ".1f"),
                v(1000 * h["mean_s"], ".1f"),
                v(1000 * h["encode_s"], ".1f"),
                f"**{v(ratio, '.3f')}** ({v(100 * (ratio - 1), '+.1f')}%); paired median "
                f"{v(row.get('http_over_grpc_paired_median'), '.3f')}",
                same,
            ]
        )
    lines += _table(
        [
            "workload",
            "door",
            "request body",
            "p50 (ms)",
            "p90 (ms)",
            "mean (ms)",
            "client encode (ms)",
            "HTTP/gRPC p50",
            "rankings identical",
        ],
        ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"],
        rows,
    )
    for problem in rep.get("problems", []):
        lines += ["", f"**Rankings differed:** {v(problem)}"]
    return lines


def _memory_section(v: Fmt, doc: dict[str, Any], path: str) -> list[str]:
    rep = doc["report"]
    lines = _prov(v, doc, path)
    lines += [
        "",
        f"Shape {v(rep.get('shape'))}: {v(rep.get('parameters'), ',')} parameters, "
        f"{v(rep.get('weights_gib'), '.2f')} GiB of weights; attention backend "
        f"{v(rep.get('attention_backend'))}; torch {v(rep.get('torch'))}; model built in "
        f"{v(rep.get('build_s'), '.1f')} s. Parameter problems: "
        + (", ".join(v(p) for p in rep.get("param_issues", [])) or "none")
        + ".",
        "",
    ]
    rows = []
    for w in rep.get("workloads", []):
        mem = w.get("memory_gib", {})
        rows.append(
            [
                v(w["name"]),
                v(w["requests"]),
                v(w["pairs"]),
                v(w["score_calls"]),
                v(mem.get("weights_bytes"), ".2f"),
                v(mem.get("resident_bytes"), ".2f"),
                v(mem.get("peak_activation_bytes"), ".2f"),
                f"**{v(mem.get('peak_bytes'), '.2f')}**",
                v(len(w.get("issues", []))),
                v(len(w.get("violations", []))),
                v(w.get("device_to_host")),
                _cell(v(w.get("failure") or "none")),
            ]
        )
    lines += _table(
        [
            "workload",
            "requests",
            "pairs",
            "score() calls",
            "weights (GiB)",
            "resident before (GiB)",
            "peak activations (GiB)",
            "peak device (GiB)",
            "device/dtype issues",
            "sync violations",
            "device-to-host copies",
            "failure",
        ],
        ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"],
        rows,
    )
    if rep.get("patches"):
        lines += [
            "",
            "What the fake device emulates: " + "; ".join(_cell(v(p)) for p in rep["patches"]) + ".",
        ]
    return lines


def _floors_section(v: Fmt, doc: dict[str, Any], path: str, cpu: dict[str, Any] | None) -> list[str]:
    fl = doc["figures"]
    img = fl["image"]
    lines = _prov(v, doc, path)
    lines += [
        "",
        f"A {v(img['width'])}x{v(img['height'])} document image (the bench's generated size) is resized by "
        f"the processor (min_pixels {v(img['min_pixels'], ',')}, max_pixels {v(img['max_pixels'], ',')}, "
        f"the settings' defaults) to {v(img['resized_width'])}x{v(img['resized_height'])}: "
        f"{v(img['patches'], ',')} ViT patches and {v(img['llm_tokens'], ',')} LLM tokens. The dense-matmul "
        "count is the bench's MFU numerator: two FLOPs per decoder-layer parameter per LLM token plus two "
        "per ViT parameter per patch (attention scores, embeddings and the two LM-head rows not counted), "
        "so the time at the peak below is what an MFU of one would take. Parameters are counted on the "
        "model built from each shape's config on the meta device.",
        "",
    ]
    peaks: list[dict[str, Any]] = []  # equal peaks share a column ("H200 / H100")
    for peak in fl["peaks"]:
        same = next((q for q in peaks if q["flops"] == peak["flops"]), None)
        if same is None:
            peaks.append({"names": [peak["name"]], "flops": peak["flops"]})
        else:
            same["names"].append(peak["name"])
    for peak in peaks:
        peak["name"] = " / ".join(peak["names"])
    head = ["shape", "decoder-layer params", "ViT params", "FLOPs per LLM token", "FLOPs per image document"]
    head += [f"s per image document at {v(p['name'])} ({v(p['flops'] / 1e12, '.0f')} TFLOP/s)" for p in peaks]
    rows = []
    for s in fl["shapes"]:
        rows.append(
            [
                v(s["shape"]),
                v(s["decoder_layer_params"], ".3e"),
                v(s["vit_params"], ".3e"),
                v(s["flops_per_llm_token"], ".3e"),
                v(s["flops_per_image_document"], ".3e"),
                *(v(s["flops_per_image_document"] / p["flops"], ".4f") for p in peaks),
            ]
        )
    lines += _table(head, ["---"] + ["---:"] * (len(head) - 1), rows)
    rows_cpu = {r["workload"]: r for r in (cpu or {}).get("report", {}).get("rows", [])}
    per_request = []
    for s in fl["shapes"]:
        for w in ("a", "c"):
            if w not in rows_cpu:
                continue
            n = rows_cpu[w]["pairs"] + (1 if w == "c" else 0)  # (c): the query image runs the ViT too
            flops = n * s["flops_per_image_document"]
            per_request.append(
                [
                    v(s["shape"]),
                    f"({v(w)})",
                    v(n),
                    v(flops, ".3e"),
                    *(v(flops / p["flops"], ".2f") for p in peaks),
                ]
            )
    if per_request:
        lines += [
            "",
            "Per request, for the image workloads of the CPU table above (their image count; the image "
            "tokens alone, the template and query text add a little; workload (d) skips the ViT):",
            "",
        ]
        h2 = ["shape", "workload", "images through the ViT", "FLOPs (at least)"]
        h2 += [f"s at {v(p['name'])} (at least)" for p in peaks]
        lines += _table(h2, ["---", "---", "---:", "---:"] + ["---:"] * len(peaks), per_request)
    return lines


def _no_data(what: str, command: str) -> list[str]:
    return [f"**{what}** Produce it with:", "", "```bash", command, "```"]


def render_benchmarks(v: Fmt, data: Path = BENCH) -> str:
    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(REPO))
        except ValueError:
            return p.name

    cpu = read_json(data / "cpu-tiny.json")
    doors = read_json(data / "doors.json")
    floors = read_json(data / "floors.json")
    memory = sorted(data.glob("memory-*.json"))
    gpu = sorted((data / "gpu").glob("*.json")) if (data / "gpu").is_dir() else []
    gpu_bench = [(p, d) for p in gpu if (d := read_json(p)) and "rows" in d.get("report", {})]

    L: list[str] = [
        "# Benchmarks",
        "",
        "<!-- Generated by scripts/render_docs.py from docs/data/benchmarks/*.json (written by "
        "scripts/benchmarks.sh); edit those, not this file. -->",
        "",
        "Every number on this page is read from a JSON file under `docs/data/benchmarks/`, written by "
        "`scripts/benchmarks.sh`; each section names its file, the commit and date it was produced on, "
        "the machine and the exact command. A commit ending in `-dirty` means the working tree had "
        "uncommitted changes under server/, client/, tests/ or scripts/ when the run started. "
        "Regenerate everything (or a subset) and re-render with:",
        "",
        "```bash",
        "bash scripts/benchmarks.sh                 # cpu doors memory floors, then render",
        "bash scripts/benchmarks.sh cpu doors       # a subset, then render",
        "bash scripts/benchmarks.sh gpu OUTDIR      # import scripts/gpu_check.sh's OUTDIR/bench.json",
        ".venv/bin/python scripts/render_docs.py render benchmarks   # re-render only",
        "```",
        "",
        "## Workloads and columns",
        "",
        "`lychee-rerank bench` (`server/lychee_server/bench.py`) runs the same inputs through the engine "
        "and through a naive loop in the same process:",
        "",
    ]
    for w, prose in _WORKLOAD_PROSE.items():
        L.append(f"- **({w})** {prose}")
    L += [
        "",
        "The workload column of each table gives the document count and sizes of that run. Columns: "
        "*pairs/s* = pairs / p50 request latency (prepare on worker threads + score + release, end to "
        "end); *peak memory* = process peak RSS on CPU, `torch.cuda.max_memory_allocated` on GPU (read "
        "before the naive loop runs, so it is the engine's); *MFU* = dense-matmul FLOPs (two per "
        "decoder-layer parameter per LLM token, plus two per ViT parameter per patch) / p50 / the "
        "device's dense BF16 peak (GPU only; the peak and where it came from are stated with the table); "
        "*speedup* = naive seconds per pair / engine seconds per pair. The naive loop (one pair at a "
        "time: chat template + processor + full forward + full-vocabulary logits + softmax) runs one "
        "untimed pair first, is then timed on the first `--naive-limit` pairs, interleaved with the "
        "engine's repeats, and extrapolated per pair.",
        "",
        "## GPU, real shape",
        "",
    ]
    if gpu_bench:
        for p, d in gpu_bench:
            L += [f"### {v(d['report'].get('machine'))}", ""]
            L += _bench_table(v, d, rel(p))
            L += [""]
        L.pop()
    else:
        L += [
            "No GPU run yet. On a GPU machine run the prepared check, then import its bench report here "
            "(the machine, commit and date are recorded on import):",
            "",
            "```bash",
            "bash scripts/gpu_check.sh OUTDIR",
            "bash scripts/benchmarks.sh gpu OUTDIR",
            "```",
        ]
    L += ["", "## Arithmetic floors at the real shapes", ""]
    if floors:
        L += _floors_section(v, floors, rel(data / "floors.json"), cpu)
    else:
        L += _no_data("Not computed yet.", "bash scripts/benchmarks.sh floors")
    L += ["", "## Device memory at the real shape (fake CUDA)", ""]
    L += [
        "`engine.dryrun` builds the real shape under a fake CUDA device (tensors with shapes, dtypes "
        "and devices but no data) and runs the engine's own prepare and score on the workloads: the host "
        "side (tokenizer, image decoding, preprocessing) runs for real, the device side is counted. "
        "*Peak device* = weights + what was resident before the call + the most bytes the call held at "
        "once, exact storage sizes; not included are the CUDA context, the caching allocator's rounding "
        "and fragmentation, library workspaces and transients inside one composite op. *Sync violations* "
        "are host synchronisations inside score() that the audit does not allow.",
        "",
    ]
    if memory:
        for p in memory:
            d = read_json(p)
            if d is None:
                continue
            L += [f"### {v(d['report'].get('shape'))}", ""]
            L += _memory_section(v, d, rel(p))
            L += [""]
        L.pop()
    else:
        L += _no_data("Not run yet.", "bash scripts/benchmarks.sh memory")
    L += ["", "## CPU, tiny checkpoint", ""]
    if cpu:
        L += _bench_table(v, cpu, rel(data / "cpu-tiny.json"))
    else:
        L += _no_data("Not run yet.", "bash scripts/benchmarks.sh cpu")
    L += [
        "",
        "### What the CPU tiny numbers can and cannot show",
        "",
        "The tiny test checkpoint has the real architecture at toy sizes: a ViT only a few layers deep "
        "with a tiny hidden size, one of whose layers is full attention over every patch of an image, "
        "and a decoder a few layers deep with a small head dimension. That full-attention layer is the "
        "same exact computation in the engine and in the naive loop, and it is most of both, so the "
        "image workloads (a) and (c) cannot get far above parity on a CPU without changing the math. "
        "In (b) the small head dimension leaves attention a large share of the engine's time and the "
        "matmuls small; the engine is near the kernel floor there, while the naive loop's cost is mostly "
        "per-pair Python overhead. Workload (d) shows what the vision cache saves. On a small machine "
        "shared with other jobs absolute CPU rates are noisy; the speedups are measured within one run, "
        "engine and naive interleaved, so they are steadier than the rates. The GPU rows, where the "
        "engine's savings (prefix reuse, batching, last-position-only head, windowed-ViT batching) "
        "dominate, are the ones that answer the performance question.",
        "",
        "### What the engine does",
        "",
        "- **Vision tower** (`engine/vision.py`): runs the ViT over its own weight modules. Merge units "
        "are reordered so that windows of equal size are contiguous, so each windowed layer is a few "
        "batched SDPA calls for any number of images (transformers' SDPA path loops over every window "
        "of every image), and each full-attention layer is one call per distinct image size. The patch "
        "embedding is one matmul with the Conv3d kernel summed over its temporal axis (still images "
        "repeat their frame). Several images share one call.",
        "- **Image preprocessing** (`engine/preprocess.py`, in `prepare_pair`'s worker threads): decode, "
        "the same torchvision resize as the HF processor, patchify in uint8 and rescale+normalize with "
        "the processor's own float32 operations; no temporal duplicate. Bit-identical to the HF "
        "processor (self-checked at start-up, HF processor as the fallback; `tests/engine/test_vision.py`).",
        "- **Text path**: the chat template is rendered once per request and document kind; each "
        "document is tokenized on its own (`<Document>:` + text + template tail) and appended to the "
        "prefix ids, which is exact because Qwen's pre-tokenizer always cuts before `<Document>` "
        "(verified per request against full renderings, full rendering otherwise; "
        "`tests/engine/test_text_path.py`).",
        "- **No padding outside attention**: a batch's rows are packed end to end, so norms, projections "
        "and MLPs run on real tokens only; attention alone sees the right-padded layout (`_Rows` in "
        "`engine/qwen.py`). The final layer runs its query, MLP, norm and the `yes`/`no` rows of the LM "
        "head on each row's last token only.",
        "- **LLM attention after a cached prefix** runs in query chunks that only see keys up to their "
        "own end, skipping most of the masked causal triangle.",
        "- **Requests that fit in one batch are packed together** (per-row prefix K/V, right-padded and "
        "masked), so many small concurrent requests run as full batches (`tests/engine/test_packing.py`).",
        "",
        "## HTTP/JSON door vs gRPC door (`lychee-rerank bench-doors`)",
        "",
        "`server/lychee_server/bench_doors.py` spawns one `lychee-rerank serve` on the tiny checkpoint "
        "(CPU, FP32) with a long batch wait and a single decode thread (a request's pairs then always form "
        "the same batch in document order, so the doors can be compared bit for bit) and the vision "
        "cache off (every call decodes, preprocesses and runs the ViT, as fresh documents would). The "
        "same requests go through both doors alternately, call by call (which door goes first "
        "alternates too); on every call the two rankings are compared (same order, bit-equal scores). "
        "gRPC: the project's `LycheeClient` (no retries). HTTP: one keep-alive `httpx.Client`, "
        "`POST /v1/rerank`, the body built on every call with `json.dumps` and base64 images. Latency = "
        "client wall time per call, request encoding included; *client encode* = median of repeated "
        "builds of the request alone (HTTP: base64 + JSON; gRPC: the `RerankRequest` built and serialized). "
        "*Paired median* = median over calls of HTTP time / gRPC time of the same round.",
        "",
    ]
    if doors:
        L += _doors_section(v, doors, rel(data / "doors.json"))
    else:
        L += _no_data("Not run yet.", "bash scripts/benchmarks.sh doors")
    return "\n".join(L) + "\n"


# ============================================================================ reliability
REL = DATA / "reliability"


def _counts(doc: dict[str, Any] | None, prefix: str = "") -> tuple[int, int, int, int] | None:
    """(tried, passed, failed, skipped) of the group's test cases whose name starts with ``prefix``."""
    if not doc or doc.get("cases") is None:
        return None
    tried = passed = failed = skipped = 0
    for case in doc["cases"]:
        if not case["name"].startswith(prefix):
            continue
        tried += 1
        if case["outcome"] in ("failed", "error"):
            failed += 1
        elif case["outcome"] in ("skipped", "xfailed"):
            skipped += 1
        else:
            passed += 1
    return tried, passed, failed, skipped


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def render_reliability(v: Fmt, data: Path = REL) -> str:
    docs = {name: read_json(data / f"{name}.json") for name in RELIABILITY_GROUPS}
    rows: list[list[str]] = []  # area, figure, result, group
    missing: list[str] = []

    def figs(name: str) -> dict[str, Any] | None:
        d = docs[name]
        return d.get("figures") if d else None

    bad = docs["bad_inputs"]
    edge, server = (
        _counts(bad, "test_catalogue_at_the_edge"),
        _counts(bad, "test_catalogue_against_the_server"),
    )
    if edge and server:
        rows.append(
            [
                "Bad inputs",
                f"catalogue cases at the edge (codec / stream / image decoder): {v(edge[0])} tried, "
                f"{v(edge[1])} passed",
                _verdict(edge[2] == 0 and edge[0] > 0),
                "bad_inputs",
            ]
        )
        rows.append(
            [
                "Bad inputs",
                "catalogue cases against the running server (exact code, reason, field path; health and a "
                f"good request checked after each): {v(server[0])} tried, {v(server[1])} passed",
                _verdict(server[2] == 0 and server[0] > 0),
                "bad_inputs",
            ]
        )
    else:
        missing.append("bad-input catalogue")

    fuzz = docs["fuzz"]
    fz, fc = _counts(fuzz), (figs("fuzz") or {}).get("counts")
    if fz and fc:
        rows.append(
            [
                "Fuzzing",
                f"{v(fc['requests'], ',')} fuzzed requests / streams through the edge "
                f"({v(fc['accepted'], ',')} "
                f"accepted, {v(fc['rejected'], ',')} rejected with INVALID_ARGUMENT); {v(fz[0])} properties, "
                f"{v(fz[2])} crashing (unexpected exception or broken invariant)",
                _verdict(fz[2] == 0),
                "fuzz",
            ]
        )
    else:
        missing.append("fuzzing")

    load = figs("load")
    if load:
        mem, lat = load["memory"], load["latency_ms"]
        rows.append(
            [
                "Load",
                f"{v(load['clients'])} clients x {v(load['seconds'])} s, mixed text/image, unary/stream: "
                f"{v(load['requests'], ',')} requests, {v(load['ok'], ',')} answered, "
                f"{v(load['rejected_resource_exhausted'], ',')} RESOURCE_EXHAUSTED (admission limit "
                f"{v(load['max_inflight_pairs'])} pairs), {v(sum(load['errors'].values()))} other errors, "
                f"{v(load['wrong_answers'])} wrong answers; server counted "
                f"{v(load['server_counted_ok'], ',')} OK",
                _verdict(
                    not load["errors"]
                    and load["wrong_answers"] == 0
                    and load["server_counted_ok"] == load["ok"]
                ),
                "load",
            ]
        )
        rows.append(
            [
                "Load",
                f"latency p50 {v(lat['p50'])} ms, p99 {v(lat['p99'])} ms (max {v(lat['max'])} ms); "
                "throughput "
                f"{v(load['throughput_rps'])} req/s = {v(load['throughput_pairs_per_s'])} pairs/s",
                "measured",
                "load",
            ]
        )
        rows.append(
            [
                "Load",
                f"server RSS {v(mem['start_mib'])} MiB at start -> {v(mem['end_mib'])} MiB at end (peak "
                f"{v(mem['peak_mib'])}); middle-third median {v(mem['middle_third_median_mib'])} -> "
                "last-third "
                f"median {v(mem['last_third_median_mib'])} MiB (growth {v(mem['growth_mib'])} MiB, allowed "
                f"{v(mem['allowed_growth_mib'])}); warm slope {v(mem['warm_slope_mib_per_min'])} MiB/min",
                _verdict(mem["flat"]),
                "load",
            ]
        )
    else:
        missing.append("load")

    faults = figs("faults")
    if faults:
        xf = set((docs["faults"] or {}).get("xfailed", []))
        known = [n for n in xf if not faults["scenarios"].get(n, {}).get("survived", True)]
        failed = faults["total"] - faults["survived"] - len(known)
        rows.append(
            [
                "Faults",
                f"{v(faults['survived'])} of {v(faults['total'])} fault scenarios survived (details below)"
                + (
                    f"; known defect (xfail, reported): {', '.join(v(k) for k in sorted(known))}"
                    if known
                    else ""
                ),
                _verdict(failed == 0) + (f" ({v(len(known))} known defect(s))" if known else ""),
                "faults",
            ]
        )
        drain = faults["scenarios"].get("test_sigterm_drains_without_losing_accepted_requests")
        if drain and "requests" in drain:
            rows.append(
                [
                    "Faults",
                    f"SIGTERM under load ({v(drain['clients'])} clients): {v(drain['accepted'])} accepted, "
                    f"{v(drain['answered'])} answered ({v(drain['in_flight_answered'])} of them in flight at "
                    f"the signal), {v(drain['lost'])} lost; {v(drain['refused_unavailable'])} refused with "
                    f"UNAVAILABLE, {v(drain['not_accepted'])} never reached a handler; exit code "
                    f"{v(drain['exit_code'])} {v(drain['exit_seconds_after_sigterm'])} s after the signal",
                    _verdict(drain["survived"]),
                    "faults",
                ]
            )
    else:
        missing.append("faults")

    sec = figs("security")
    if sec:
        rows.append(
            [
                "Security",
                f"{v(sec['tried'])} cases (bearer tokens, health without token, TLS, mTLS, no path input): "
                f"{v(sec['passed'])} as expected",
                _verdict(sec["passed"] == sec["tried"]),
                "security",
            ]
        )
    else:
        missing.append("security")

    live = figs("liveness")
    if live:
        lc = _counts(docs["liveness"])
        rows.append(
            [
                "Liveness",
                f"normal text requests, idle p50 {v(live['idle_ms']['p50'])} / p99 "
                f"{v(live['idle_ms']['p99'])} ms "
                f"-> under attack ({v(live['mix'])}: {_cell(v(live['hostile']))}) p50 "
                f"{v(live['attack_ms']['p50'])} "
                f"/ p99 {v(live['attack_ms']['p99'])} ms (x{v(live['p99_ratio'])} the idle p99); health max "
                f"{v(live['health_max_ms'])} ms; SIGTERM during the attack: exit {v(live['exit_code'])} "
                "after "
                f"{v(live['exit_seconds_after_sigterm'])} s (grace {v(live['grace_period_s'])} s)",
                _verdict(lc is not None and lc[2] == 0 and lc[1] > 0) + " (the test's own bounds)",
                "liveness",
            ]
        )
    else:
        missing.append("liveness")

    L: list[str] = [
        "# Reliability report",
        "",
        "<!-- Generated by scripts/render_docs.py from docs/data/reliability/*.json (written by "
        "scripts/reliability.sh); edit those, not this file. -->",
        "",
        "What the issue asked to show with numbers: the shared reranking service keeps serving whatever "
        "its callers send, answers each bad request with a precise error, loses nothing, and lets no one "
        "in without credentials. Every figure below is read from `docs/data/reliability/<group>.json`, "
        "written by",
        "",
        "```bash",
        "bash scripts/reliability.sh            # run every group, import the figures, render",
        "bash scripts/reliability.sh --render   # re-render from docs/data/reliability/ only",
        "```",
        "",
        "Model: the tiny random-weight Qwen2.5-VL test checkpoint on CPU, so latencies measure the serving "
        "stack, not a real model. Where each group's figures come from:",
        "",
    ]
    prov_rows = []
    for name, d in docs.items():
        if d is None:
            prov_rows.append([name, "not run", "", "", "", ""])
            continue
        rc = d.get("rc")
        prov_rows.append(
            [
                name,
                f"`{v(d.get('commit'))}`",
                v(d.get("date")),
                _cell(v(d.get("machine"))),
                "not recorded"
                if rc is None
                else (f"{v(rc)} (passed)" if rc == 0 else f"**{v(rc)} (failed)**"),
                f"`{_cell(v(d.get('command')))}`",
            ]
        )
    L += _table(["Group", "Commit", "Date", "Machine", "pytest exit", "Command"], ["---"] * 6, prov_rows)
    notes = sorted({d["note"] for d in docs.values() if d and d.get("note")})
    for note in notes:
        L += ["", f"*Note:* {v(note)}"]
    L += ["", "| Area | Figure | Result | Group |", "|---|---|---|---|"]
    for area, figure, result, group in rows:
        L.append(f"| {area} | {figure} | {result} | {group} |")
    if missing:
        L += ["", "**Not measured in this data:** " + "; ".join(missing) + "."]

    if live:
        L += [
            "",
            "## Liveness under attack",
            "",
            f"The server runs as a subprocess (grace period {v(live['grace_period_s'])} s, a short "
            "`LYCHEE_STREAM_IDLE_TIMEOUT_S`). A stream of normal text-only requests is timed in "
            f"alternating windows of {v(live.get('window_s'))} s, idle and under attack "
            f"({v(len(live.get('rounds') or []))} rounds, {v(live['seconds_per_phase'])} s of each in all, "
            "so that the shared machine's drift in speed weighs on both figures alike; each round's "
            "attacker is a new process with the same API key (so it finds the budget of refused bytes as "
            "the last one left it, less what was forgiven), and before the next idle window the "
            "server's metrics must show "
            "no request left in it: at most "
            f"{v(live.get('settle_s_max'))} s of waiting). Idle requests timed: "
            f"{v(live['idle_ms']['n'])}. The hostile callers run in a process of their own: requests "
            "declaring millions of documents, large "
            "progressive JPEGs (each one different bytes, so no cache helps: every one is decoded and "
            "runs the vision tower), streams that stall half-way through an item; health is checked "
            f"throughout ({v(live['health_checks'])} checks). The p99 per round, idle -> under attack "
            "(ms): "
            + "; ".join(
                f"{v(r.get('idle_p99_ms'))} -> {v(r.get('attack_p99_ms'))}" for r in live.get("rounds") or []
            )
            + ". Hostile requests sent: "
            f"{_cell(v(live['hostile']))}; "
            f"normal requests timed under attack: {v(live['attack_ms']['n'])}. The test bounds the "
            "attack p99 by three times the idle p99 (the issue's bound), the health "
            "latency, and the exit time after SIGTERM; see `tests/reliability/test_liveness.py`. What holds "
            "the line: documents counted from the field tags (refused past max_documents before the full "
            "parse), size refusals answered after `oversize_refusal_delay_s`, a budget of refused bytes "
            "per caller (API key, else address; here each side has its own key): past "
            f"{v(live.get('refused_bytes_burst_mib', 'refused_bytes_burst'))} MiB of refused requests, "
            "less what is forgiven at "
            f"{v(live.get('refused_bytes_per_s_mib', 'refused_bytes_per_s'))} MiB/s, a caller's next "
            "calls are answered RESOURCE_EXHAUSTED / RATE_LIMITED before their body is read "
            f"({v((live['hostile'] or {}).get('huge_count_refused_unread', 'not counted'))} of the "
            "huge-count requests above), image decodes in killable "
            "worker processes at the lowest CPU priority on their own threads, stalled streams ended by "
            "`stream_idle_timeout_s` within "
            "the server-wide `max_buffered_bytes`, text pairs in a device lane of their own, and image "
            "batches that pause on the device at every step (a vision block, an attention chunk, half a "
            "decoder layer: a few milliseconds each on this CPU) so a text batch runs at the next pause, "
            "and a frozen start-up heap (`gc.freeze`: full collections no longer walk the model's "
            "objects with the GIL held). On a "
            "small machine the attackers, the server and the measuring client share the cores, so the "
            "attack's CPU use shows in the normal requests' latency; the attackers' process runs at nice "
            f"{v(live.get('attacker_nice', 0))} (an attacker elsewhere on the network takes no CPU from "
            "the server; the server's side of each hostile call runs at its normal priority). What "
            "remains: the messages a caller sends before its budget runs out (and those the forgiving rate "
            "lets through) are many MiB each that grpc's receive path hands over on the event loop "
            "with the GIL held (milliseconds per message, seen with `py-spy record --gil` and "
            "`scripts/grpc_receive_stall.py`), before any of our code runs.",
        ]
    if load:
        L += [
            "",
            "## Load",
            "",
            "The real server runs as a subprocess (`python -m lychee_server.app`) on 127.0.0.1 with "
            f"`LYCHEE_MAX_INFLIGHT_PAIRS={v(load['max_inflight_pairs'])}`, low enough that "
            f"{v(load['clients'])} callers reach admission control. Each caller has its own channel and "
            "sends "
            "a deterministic mix "
            + ", ".join(f"{v(k)} {v(100 * x, '.0f')}%" for k, x in load["mix"].items())
            + " of requests with a few documents each; after RESOURCE_EXHAUSTED it waits the RetryInfo "
            "delay, as the contract asks. Latencies are those of answered requests. p50 by kind: "
            + ", ".join(f"{v(k)} {v(x)} ms" for k, x in load["latency_ms"]["by_kind_p50"].items())
            + f". Pairs scored: {v(load.get('pairs_scored'), ',')}.",
            "",
            f"Memory criterion: {v(load['memory']['criterion'])} ({v(load['memory']['samples'])} samples). "
            "The "
            f"server's VmRSS is read from /proc; idle RSS before the load was {v(load['rss_idle_mib'])} MiB.",
        ]
    if faults:
        L += ["", "## Faults", "", "| Scenario | Survived | Figures |", "|---|---|---|"]
        for name, sc in sorted(faults["scenarios"].items()):
            shown = {k: x for k, x in sc.items() if k not in ("survived", "command", "lost_examples")}
            text = "; ".join(f"{v(k)}={v(x)}" for k, x in shown.items())
            L.append(f"| `{name}` | {'yes' if sc['survived'] else '**no**'} | {_cell(text)} |")
        L += [
            "",
            "A scenario that is not survived while its test is marked `xfail` is a known defect reported to "
            "its owner (see the test's reason). The drain test judges each call against the server's own "
            "request log (`x-request-id` -> code): accepted calls must be answered; calls refused at the "
            "door must see UNAVAILABLE; calls that never reached a handler may see grpc's CANCELLED "
            "(grpc/grpc#41785) and refused streams grpc.aio's INTERNAL 'Internal error from Core' "
            "(grpc/grpc#36066), both counted separately.",
        ]
    if sec:
        L += ["", "## Security cases", "", "| Group | Case | Expected | Observed |", "|---|---|---|---|"]
        for r in sec["cases"]:
            expected, observed = v(r["expected"]), v(r["observed"])
            same = r["observed"] == r["expected"]
            if not same:
                observed = f"**{observed}**"
            if len(r["expected"]) > len("UNAUTHENTICATED/UNAUTHENTICATED") * 2:  # the path-echo row
                expected = observed = "(all verbatim)" if same else "(differs)"
            L.append(
                f"| {_cell(v(r['group']))} | {_cell(v(r['case']))} | {_cell(expected)} | {_cell(observed)} |"
            )
    return "\n".join(L) + "\n"


RENDERERS: dict[str, Callable[[Fmt], str]] = {
    "benchmarks": render_benchmarks,
    "reliability": render_reliability,
}


# ============================================================================ producers
def stamp(raw: dict[str, Any], prov: dict[str, Any]) -> dict[str, Any]:
    out = dict(prov)
    out["report"] = raw
    return out


def _junit_cases(path: Path) -> tuple[list[dict[str, str]], str | None]:
    """Each test case's name and outcome, and the suite's timestamp (UTC, ISO)."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        skip = case.find("skipped")
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "error"
        elif skip is not None:
            outcome = "xfailed" if skip.get("type") == "pytest.xfail" else "skipped"
        else:
            outcome = "passed"
        cases.append({"name": case.get("name", ""), "outcome": outcome})
    stamp_ = next((s.get("timestamp") for s in root.iter("testsuite") if s.get("timestamp")), None)
    if stamp_:
        stamp_ = dt.datetime.fromisoformat(stamp_).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return cases, stamp_


def _machine_from_facts(facts: dict[str, Any]) -> str:
    return machine_string(facts.get("cpu_model"), facts.get("cpus"), ["a GPU"] if facts.get("gpu") else [])


def import_reliability(
    src: Path, dst: Path, prov: dict[str, Any] | None, note: str | None = None
) -> list[Path]:
    """One JSON per group of ``src`` (build/reliability) into ``dst``.

    ``prov`` is the provenance of the run (captured when scripts/reliability.sh started); without it
    (figures from before provenance was recorded) the commit is :data:`UNKNOWN_COMMIT`, the date the
    group's own (the tests' ``machine.date``, else the JUnit timestamp, else the file's mtime) and
    the machine the one the tests recorded."""
    written = []
    facts_any = None
    for name in RELIABILITY_GROUPS:
        fig = read_json(src / f"{name}.json")
        if fig and isinstance(fig.get("machine"), dict):
            facts_any = fig["machine"]
            break
    for name, args in RELIABILITY_GROUPS.items():
        xml, js, rc_file, log = (src / f"{name}{ext}" for ext in (".xml", ".json", ".rc", ".log"))
        if not any(p.exists() for p in (xml, js, rc_file)):
            continue
        cases, suite_date = _junit_cases(xml) if xml.is_file() else (None, None)
        fig = read_json(js)
        facts = fig.pop("machine", None) if fig else None
        if name == "fuzz" and log.is_file():
            m = re.search(r"fuzzed edge requests: (\{.*?\})", log.read_text())
            if m:
                import ast

                fig = {"counts": ast.literal_eval(m.group(1))}
        cmd_file = src / f"{name}.cmd"
        if cmd_file.is_file():
            command = cmd_file.read_text().strip()
        else:
            env = "LIVENESS_SECONDS=20 " if name == "liveness" else ""
            command = f"{env}python -m pytest {' '.join(args)} -q --junitxml=build/reliability/{name}.xml"
        if prov is not None:
            entry = dict(prov)
        else:
            date = (facts or {}).get("date") or suite_date
            if date is None:
                mtime = max(p.stat().st_mtime for p in (xml, js, rc_file) if p.exists())
                date = dt.datetime.fromtimestamp(mtime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            entry = {
                "commit": UNKNOWN_COMMIT,
                "date": date,
                "machine": _machine_from_facts(facts or facts_any or {}),
            }
        entry["command"] = command
        if note:
            entry["note"] = note
        rc_text = rc_file.read_text().strip() if rc_file.is_file() else ""
        entry.update(
            {
                "group": name,
                "rc": int(rc_text) if rc_text.lstrip("-").isdigit() else None,
                "cases": cases,
                "xfailed": [c["name"] for c in cases or [] if c["outcome"] == "xfailed"],
                "figures": fig,
                "machine_facts": facts,
            }
        )
        out = dst / f"{name}.json"
        write_json(out, entry)
        written.append(out)
    return written


def _param_counts(shape: str) -> tuple[int, int]:
    """(decoder-layer parameters, ViT parameters) of the built-in ``shape``, built on the meta device."""
    import logging

    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from lychee_server.engine.loading import BUILTIN_SHAPES

    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = Qwen2_5_VLConfig(**BUILTIN_SHAPES[shape])
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    inner = model.model
    lm = inner.language_model if hasattr(inner, "language_model") else inner
    return sum(p.numel() for p in lm.layers.parameters()), sum(p.numel() for p in inner.visual.parameters())


def compute_floors() -> dict[str, Any]:
    """The figures of ``floors.json`` (no provenance): image geometry, parameter counts, FLOPs."""
    import inspect

    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from lychee_server import bench
    from lychee_server.engine.loading import BUILTIN_SHAPES
    from lychee_server.settings import Settings

    jpeg = inspect.signature(bench._jpeg).parameters
    width, height = jpeg["w"].default, jpeg["h"].default
    settings = Settings()
    shapes = []
    image = None
    for shape, cfg in BUILTIN_SHAPES.items():
        vc = cfg["vision_config"]
        factor = vc["patch_size"] * vc["spatial_merge_size"]
        rh, rw = smart_resize(height, width, factor, settings.min_pixels, settings.max_pixels)
        patches = (rh // vc["patch_size"]) * (rw // vc["patch_size"])
        tokens = patches // vc["spatial_merge_size"] ** 2
        geometry = {
            "width": width,
            "height": height,
            "min_pixels": settings.min_pixels,
            "max_pixels": settings.max_pixels,
            "resized_width": rw,
            "resized_height": rh,
            "patches": patches,
            "llm_tokens": tokens,
        }
        if image is not None and image != geometry:
            raise ValueError(f"shapes disagree on the image geometry: {image} vs {geometry}")
        image = geometry
        dec, vit = _param_counts(shape)
        shapes.append(
            {
                "shape": shape,
                "decoder_layer_params": dec,
                "vit_params": vit,
                "flops_per_llm_token": 2 * dec,
                "flops_per_vit_patch": 2 * vit,
                "flops_per_image_document": 2 * dec * tokens + 2 * vit * patches,
            }
        )
    peaks = [
        {"name": name, "flops": flops} for name, flops in bench.PEAK_BF16_FLOPS if name in ("H100", "H200")
    ]
    return {"image": image, "shapes": shapes, "peaks": peaks}


def run_memory(shape: str, workloads: list[str], images: int) -> dict[str, Any]:
    from lychee_server.engine import dryrun

    return dryrun.run(shape, workloads, images=images).as_dict()


# ============================================================================ CLI
def _targets(which: str) -> list[str]:
    return list(RENDERERS) if which == "all" else [which]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/render_docs.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("render", "check"):
        p = sub.add_parser(name)
        p.add_argument("which", nargs="?", default="all", choices=["all", *RENDERERS])
    p = sub.add_parser("provenance")
    p.add_argument("--command", required=True)
    p.add_argument("--note", default=None)
    p = sub.add_parser("stamp")
    p.add_argument("raw", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--provenance", type=Path, default=None, help="from `provenance` (default: now)")
    p.add_argument("--command", default=None, help="overrides the provenance's command")
    p.add_argument("--commit", default=None, help="overrides the provenance's commit")
    p.add_argument("--machine", default=None, help="overrides the provenance's machine")
    p.add_argument("--note", default=None)
    p = sub.add_parser("import-reliability")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--provenance", type=Path, default=None, help="omit for figures older than provenance")
    p.add_argument("--note", default=None)
    for name in ("floors", "memory"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--provenance", type=Path, default=None)
        if name == "memory":
            p.add_argument("--shape", default="qwen2.5-vl-7b")
            p.add_argument("--workloads", default="a,b,c,packed")
            p.add_argument("--images", type=int, default=50)
    ns = parser.parse_args(argv)
    this = "python scripts/render_docs.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    def prov_from(path: Path | None, command: str) -> dict[str, Any]:
        return json.loads(path.read_text()) if path else provenance(command)

    if ns.cmd == "render":
        for name in _targets(ns.which):
            DOCS[name].write_text(RENDERERS[name](Fmt()))
            print(f"wrote {DOCS[name]}")
        return 0
    if ns.cmd == "check":
        stale = [name for name in _targets(ns.which) if DOCS[name].read_text() != RENDERERS[name](Fmt())]
        for name in stale:
            print(f"{DOCS[name]} differs from its data: run scripts/render_docs.py render {name}")
        return 1 if stale else 0
    if ns.cmd == "provenance":
        print(json.dumps(provenance(ns.command, ns.note), indent=2, sort_keys=True))
        return 0
    if ns.cmd == "stamp":
        prov = prov_from(ns.provenance, ns.command or "unknown")
        for key in ("command", "commit", "machine", "note"):
            if getattr(ns, key):
                prov[key] = getattr(ns, key)
        raw = json.loads(ns.raw.read_text())
        write_json(ns.out, stamp(raw, prov))
        print(f"wrote {ns.out}")
        return 0
    if ns.cmd == "import-reliability":
        run_prov = json.loads(ns.provenance.read_text()) if ns.provenance else None
        for path in import_reliability(ns.src, ns.dst, run_prov, ns.note):
            print(f"wrote {path}")
        return 0
    if ns.cmd == "floors":
        write_json(ns.out, {**prov_from(ns.provenance, this), "figures": compute_floors()})
        print(f"wrote {ns.out}")
        return 0
    if ns.cmd == "memory":
        prov = prov_from(ns.provenance, this)
        report = run_memory(ns.shape, [w for w in ns.workloads.split(",") if w], ns.images)
        write_json(ns.out, stamp(report, prov))
        print(f"wrote {ns.out}")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "server"))
    sys.exit(main())
