"""``lychee-rerank bench``: throughput / latency / memory / MFU of the engine versus a naive loop.

Why in-process and same-run: the speedup claim only means something if the naive reference (one pair
at a time, processor + full forward + full-vocabulary logits) runs on the same machine, model and
inputs in the same process. Workloads:

  a: 1 text query + 50 image documents (1080p JPEGs generated locally)
  b: 1 text query + 100 text passages of ~256 tokens
  c: 1 image query + 50 image documents
  d: workload a with every document image already in the vision cache
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PEAK_BF16_FLOPS",
    "UNKNOWN_GPU_PEAK_FLOPS",
    "add_bench_arguments",
    "add_model_arguments",
    "detect_peak_flops",
    "naive_logit_diff",
    "open_engine",
    "resolve_peak_flops",
    "run_bench",
]

WORKLOADS = ("a", "b", "c", "d")
_DESCRIPTIONS = {
    "a": "text query + 50 image docs (1080p JPEG)",
    "b": "text query + 100 text docs (~256 tok)",
    "c": "image query + 50 image docs (1080p JPEG)",
    "d": "(a) with all doc images in the vision cache",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``open_engine`` reads (shared by ``bench`` and ``check``)."""
    parser.add_argument(
        "--model", default=None, help="Checkpoint dir or hub id (default: build the tiny test checkpoint)."
    )
    parser.add_argument(
        "--random-weights", action="store_true", help="Random weights (with --shape: real shapes)."
    )
    parser.add_argument("--shape", choices=["qwen2.5-vl-7b", "qwen2.5-vl-3b"], default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "varlen"])
    parser.add_argument("--fused-kernels", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"])


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``bench`` flags on ``parser`` (the CLI owns the sub-command)."""
    add_model_arguments(parser)
    parser.add_argument("--workloads", default="a,b,c,d", help="Comma-separated subset of a,b,c,d.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions per workload.")
    parser.add_argument(
        "--naive-limit", type=int, default=8, help="Pairs timed with the naive loop (extrapolated)."
    )
    parser.add_argument("--batch-token-budget", type=int, default=16384)
    parser.add_argument("--max-batch-pairs", type=int, default=64)
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="Device peak FLOP/s for MFU (dense bf16; default: detected from the GPU's name, see "
        "PEAK_BF16_FLOPS; an unknown GPU uses UNKNOWN_GPU_PEAK_FLOPS and says so; no MFU on CPU).",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="Write the JSON report here (default: stdout)."
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="Also append a table to this file (docs/benchmarks.md is rendered from docs/data by "
        "scripts/benchmarks.sh, never appended to).",
    )
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default).")


# Dense (no sparsity) BF16 tensor-core peaks from the vendors' datasheets, by a fragment of
# ``torch.cuda.get_device_name``: the first fragment found (case-insensitive) wins, so the more
# specific names come first ("GH200" before "H200", "H100 PCIe" before "H100").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
)
# What MFU is computed against on a GPU the table does not know (the H100/H200 SXM figure).
UNKNOWN_GPU_PEAK_FLOPS = 989e12


def detect_peak_flops(device_name: str) -> tuple[float | None, str]:
    """(peak dense-BF16 FLOP/s, the table entry that matched) for a CUDA device name; (None, "")
    when the name is not in :data:`PEAK_BF16_FLOPS`."""
    low = device_name.lower()
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment.lower() in low:
            return flops, fragment
    return None, ""


def resolve_peak_flops(explicit: float | None, device: Any) -> tuple[float | None, str]:
    """The peak FLOP/s MFU is reported against and where it came from: ``--peak-flops`` when given,
    else detected from the GPU's name, else :data:`UNKNOWN_GPU_PEAK_FLOPS` (said so); None on a CPU
    (no MFU)."""
    if getattr(device, "type", str(device)) != "cuda":
        return None, "not reported on CPU"
    if explicit is not None:
        return float(explicit), "--peak-flops"
    import torch

    name = torch.cuda.get_device_name(device)
    flops, fragment = detect_peak_flops(name)
    if flops is not None:
        return flops, f"detected: {name!r} = {fragment} (dense bf16 datasheet)"
    return UNKNOWN_GPU_PEAK_FLOPS, (
        f"assumed: {name!r} is not in the table, MFU uses the stated default "
        f"{UNKNOWN_GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s (pass --peak-flops)"
    )


@dataclass
class Row:
    workload: str
    description: str
    pairs: int
    pairs_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    peak_memory_mib: float
    memory_kind: str
    mfu: float | None
    naive_pairs_timed: int
    naive_s_per_pair: float
    speedup: float
    llm_tokens: int = 0  # decoder tokens run by one request (prefix + documents)
    vit_patches: int = 0  # vision-tower patches run by one request (images not in the cache)


def _jpeg(seed: int, w: int = 1920, h: int = 1080) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx // 3 + seed * 37) % 256, (yy // 2 + seed * 11) % 256, ((xx + yy) // 4) % 256], -1)
    arr = (
        arr + rng.integers(0, 24, size=(h // 8 + 1, w // 8 + 1, 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    ) % 256
    buf = io.BytesIO()
    Image.fromarray(arr.astype("uint8"), "RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


_WORDS = (  # noqa: SIM905 - one readable string
    "retrieval ranking passage model query answer capital France river mountain data system "
    "learning network image photo city history science music art"
).split()


def _passages(engine: Any, n: int, tokens: int) -> list[str]:
    """``n`` distinct passages of about ``tokens`` tokens with the loaded tokenizer."""
    words = _WORDS
    out = []
    for i in range(n):
        text, k = "", i
        while len(engine._encode(text)) < tokens:
            text += words[k % len(words)] + " "
            k = k * 7 + 3
        out.append(text.strip())
    return out


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def naive_logit_diff(naive: Any, instruction: str, query: Any, doc: Any) -> float:
    """The reference loop body, ``check.NaiveRecipe``: its own recipe text and message layout, the
    processor with the recipe's pixel bounds, whole-string tokenization, a full forward, the full
    vocabulary's last logits, softmax over its own (no, yes) ids. Nothing comes from the engine but
    the weights, so the speedup is measured against code that cannot share the engine's mistakes."""
    return float(naive.logit_diff(instruction, query, doc))


def open_engine(
    args: argparse.Namespace, batch_token_budget: int, max_batch_pairs: int
) -> tuple[Any, tempfile.TemporaryDirectory[str] | None]:
    """The engine ``--model`` / ``--random-weights`` / ``--shape`` / ``--device`` / ``--dtype`` name,
    warmed up; without ``--model`` the tiny test checkpoint is built in a temporary directory
    (returned so the caller removes it when done)."""
    from lychee_server.engine.checkpoint import build_tiny_checkpoint
    from lychee_server.engine.qwen import QwenRerankEngine
    from lychee_server.settings import Settings

    tmp: tempfile.TemporaryDirectory[str] | None = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="lychee-bench-")
        model = str(build_tiny_checkpoint(Path(tmp.name) / "tiny"))
    settings = Settings(
        model=model,
        device=args.device,
        dtype=args.dtype,
        random_weights=bool(args.random_weights),
        attention_backend=getattr(args, "attention_backend", "auto"),
        fused_kernels=getattr(args, "fused_kernels", "auto"),
        quantization=getattr(args, "quantization", "none"),
        batch_token_budget=batch_token_budget,
        max_batch_pairs=max_batch_pairs,
        warmup=False,
    )
    engine = QwenRerankEngine.from_settings(settings, shape=args.shape if args.random_weights else None)
    engine.warmup()
    return engine, tmp


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _run_engine_once(
    engine: Any, pool: ThreadPoolExecutor, instruction: str, query: Any, docs: list[Any]
) -> tuple[float, int, int]:
    """One request end to end: prepare (worker threads) + score + release.

    Returns (seconds, LLM tokens run, ViT patches run) - the latter two feed the MFU estimate.
    """
    t0 = time.perf_counter()
    pq = engine.prepare_query(instruction, query, 3200)
    pairs = list(pool.map(lambda d: engine.prepare_pair(pq, d), docs))
    engine.score(pairs)
    _sync(engine.device)
    dt = time.perf_counter() - t0
    # A fresh query: its prefix (and any query image not cached) ran once in this call.
    tokens = sum(p.cost_tokens for p in pairs) + pq.cost_tokens
    seen = {
        it.key: it
        for it in (*pq.images, *(i for p in pairs for i in p.images))
        if it.pixel_values is not None
    }
    patches = sum(it.grid[0] * it.grid[1] * it.grid[2] for it in seen.values())
    engine.release(pq)
    return dt, tokens, patches


def _machine(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from lychee_server.machine import cpu_model

    return f"CPU {cpu_model()} x{os.cpu_count()}"


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected workloads; print/write JSON and append a markdown table. Returns an exit code."""
    import torch

    from lychee_server.domain import DEFAULT_INSTRUCTION, Content, ImageInput, MediaType

    if args.threads:
        torch.set_num_threads(args.threads)
    engine, tmp = open_engine(args, args.batch_token_budget, args.max_batch_pairs)
    from lychee_server.check import NaiveRecipe

    naive = NaiveRecipe(engine.settings.model, engine.settings.revision, engine.model, engine.device)
    dev = engine.device
    peak_flops, peak_source = resolve_peak_flops(args.peak_flops, dev)
    if peak_flops is not None:
        print(f"[bench] MFU against {peak_flops / 1e12:.0f} TFLOP/s ({peak_source})", file=sys.stderr)
    # Decoder layers only: the embedding table is a lookup and the engine uses 2 rows of lm_head.
    llm_params = _count_params(engine.lm.layers)
    vit_params = _count_params(engine.visual)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        print(f"unknown workloads {bad}; choose from {WORKLOADS}", file=sys.stderr)
        return 2

    images = [Content(image=ImageInput(_jpeg(i), MediaType.JPEG)) for i in range(50)]
    text_query = Content(text="Find a picture of a city skyline at sunset near a river")
    image_query = Content(image=ImageInput(_jpeg(999), MediaType.JPEG))
    inputs: dict[str, tuple[Content, list[Content]]] = {
        "a": (text_query, images),
        "b": (
            Content(text="what is the capital of France"),
            [Content(text=t) for t in _passages(engine, 100, 256)],
        ),
        "c": (image_query, images),
        "d": (text_query, images),
    }
    rows: list[Row] = []
    pool = ThreadPoolExecutor(max(1, engine.settings.decode_threads))
    for w in workloads:
        query, docs = inputs[w]
        engine.vision_cache.clear()
        if w == "d":
            _run_engine_once(engine, pool, DEFAULT_INSTRUCTION, query, docs)  # fill the vision cache
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        lat: list[float] = []
        toks = patches = 0
        repeats = max(1, args.repeats)
        n_naive = max(1, min(args.naive_limit, len(docs)))
        # The naive pairs are spread over the repeats, each slice timed right after an engine run:
        # on a shared machine whose speed drifts over seconds both sides then see the same conditions
        # (timing all engine runs first and the naive loop after made the ratio swing by +-25%).
        slices = [docs[i * n_naive // repeats : (i + 1) * n_naive // repeats] for i in range(repeats)]
        naive_s = 0.0
        mem = 0.0
        # One untimed naive pair first, so the naive loop does not pay lazy initialisation (kernel
        # selection, allocator growth) that the engine's warm-up already paid.
        warm_naive = True
        for r in range(repeats):
            if w != "d":
                engine.vision_cache.clear()
            dt, toks, patches = _run_engine_once(engine, pool, DEFAULT_INSTRUCTION, query, docs)
            lat.append(dt)
            # Engine memory first: the naive loop's full-vocabulary logits must not count against it.
            if dev.type == "cuda":
                _sync(dev)
                mem = max(mem, torch.cuda.max_memory_allocated(dev) / 2**20)
            if warm_naive:
                naive_logit_diff(naive, DEFAULT_INSTRUCTION, query, docs[-1])
                _sync(dev)
                warm_naive = False
            t0 = time.perf_counter()
            for d in slices[r]:
                naive_logit_diff(naive, DEFAULT_INSTRUCTION, query, d)
            _sync(dev)
            naive_s += time.perf_counter() - t0
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
        if dev.type == "cuda":
            kind = "cuda max_memory_allocated"
        else:
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            kind = "process peak RSS"
        naive_per_pair = naive_s / n_naive
        p50 = statistics.median(lat)
        mfu: float | None = None
        if dev.type == "cuda" and peak_flops:
            # Dense-matmul estimate (2 FLOPs per parameter per token / patch; attention not counted).
            flops = 2 * llm_params * toks + 2 * vit_params * patches
            mfu = flops / p50 / peak_flops
        rows.append(
            Row(
                w,
                _DESCRIPTIONS[w],
                len(docs),
                len(docs) / p50,
                p50,
                _percentile(lat, 0.95),
                mem,
                kind,
                mfu,
                n_naive,
                naive_per_pair,
                naive_per_pair / (p50 / len(docs)),
                toks,
                patches,
            )
        )
        print(
            f"[bench] {w}: {rows[-1].pairs_per_s:.1f} pairs/s, speedup {rows[-1].speedup:.1f}x",
            file=sys.stderr,
        )
    pool.shutdown()
    engine.close()

    report: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(dev),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": engine.info.model_id
        if not args.random_weights
        else f"random weights ({args.shape or engine.info.model_id})",
        "device": str(dev),
        "dtype": engine.info.dtype,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "peak_flops": peak_flops,
        "peak_flops_source": peak_source,
        "naive_note": "naive loop timed on --naive-limit pairs, interleaved with the engine runs, "
        "and extrapolated per pair",
        "rows": [asdict(r) for r in rows],
    }
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    else:
        print(text)
    if args.markdown is not None and not args.no_markdown:
        _append_markdown(args.markdown, report, rows)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _append_markdown(path: Path, report: dict[str, Any], rows: list[Row]) -> None:
    lines = [
        "",
        f"### {report['date']} — {report['machine']} — {report['model']} "
        f"({report['dtype']}, {report['device']})",
        "",
        f"Command: `{report['command'].strip()}` (torch {report['torch']}, {report['repeats']} repeats; "
        f"{report['naive_note']})",
        "",
        *(
            [f"MFU against {report['peak_flops'] / 1e12:.0f} TFLOP/s ({report['peak_flops_source']}).", ""]
            if report.get("peak_flops")
            else []
        ),
        "| workload | pairs | pairs/s | p50 latency (s) | p95 latency (s) | peak memory (MiB) | MFU "
        "| naive s/pair (pairs timed) | speedup vs naive |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = "n/a (CPU)" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        lines.append(
            f"| ({r.workload}) {r.description} | {r.pairs} | {r.pairs_per_s:.1f} | {r.latency_p50_s:.3f} | "
            f"{r.latency_p95_s:.3f} | {r.peak_memory_mib:.0f} ({r.memory_kind}) | {mfu} | "
            f"{r.naive_s_per_pair:.4f} ({r.naive_pairs_timed}) | {r.speedup:.1f}x |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lychee-rerank bench", description=__doc__)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
