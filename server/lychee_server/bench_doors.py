"""``lychee-rerank bench-doors``: what the HTTP/JSON door costs over the gRPC door, on one server.

A benchmark, not a test: it reports numbers and asserts nothing about them (its smoke test checks
the report's shape and that both doors agree). The claim it backs is a ratio measured in one run:
the same server process, the same inputs, the two doors called alternately, call by call (the door
that goes first alternates too), so whatever else the machine is doing hits both doors alike.

Workloads (the overhead benchmark of issue #10):

  images:   1 text query + 50 image documents (224x224 JPEG, gradient + per-pixel noise)
  passages: 1 text query + 100 text passages of ~256 tokens

By default a real ``lychee-rerank serve`` is spawned on the tiny test checkpoint (built in a temp
dir unless ``--model`` names one), ports 0, found through its ``serving`` line, and started with
``LYCHEE_MAX_BATCH_WAIT_MS`` 1000 (a request's pairs always form the same batches, so the two doors'
scores can be compared bit for bit) and the vision cache off (every call runs decode, preprocessing
and the ViT, as fresh documents would; ``--vision-cache`` keeps it on). ``--grpc-target`` /
``--http-url`` aim at a running server instead.

The gRPC side is the project's Python client (``LycheeClient``: it sends unary ``Rerank`` below its
streaming threshold, which these bodies are; the report records which call it used). The HTTP side
is an ``httpx.Client`` (one keep-alive connection) POSTing ``/v1/rerank`` with base64 images,
the body built per call with the standard ``json`` module as a typical client does. Client-side
encoding is timed on its own as well (HTTP: base64 + JSON; gRPC: the protobuf request built and
serialized), so the sources of any overhead are visible.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import io
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lychee_server.machine import cpu_model

__all__ = ["add_bench_doors_arguments", "run_bench_doors"]

WORKLOADS = ("images", "passages")
QUERY_IMAGES = "a city skyline at sunset near a river"
QUERY_PASSAGES = "what is the capital of France"
_WORD_TEXT = (
    "retrieval ranking passage model query answer capital France river mountain data system learning "
    "network image photo city history science music art travel expense report budget season harbour "
    "library museum bridge railway weather forest garden"
)
_WORDS = tuple(_WORD_TEXT.split())
_REPO_ROOT = Path(__file__).resolve().parents[2]


def add_bench_doors_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``bench-doors`` flags on ``parser`` (the CLI owns the sub-command)."""
    parser.add_argument(
        "--model", default=None, help="Checkpoint dir to serve (default: build the tiny test checkpoint)."
    )
    parser.add_argument("--device", default="cpu", help="LYCHEE_DEVICE of the spawned server.")
    parser.add_argument(
        "--grpc-target", default=None, help="host:port of a running server (with --http-url)."
    )
    parser.add_argument("--http-url", default=None, help="Base URL of the same server's HTTP door.")
    parser.add_argument("--api-key", default=None, help="Bearer token for a running server.")
    parser.add_argument("--workloads", default="images,passages", help="Comma-separated: images,passages.")
    parser.add_argument("--repeats", type=int, default=30, help="Timed calls per door and workload.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed calls per door and workload first.")
    parser.add_argument("--images", type=int, default=50, help="Image documents in the images workload.")
    parser.add_argument("--image-size", type=int, default=224, help="Side of the square test images (px).")
    parser.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--passages", type=int, default=100, help="Passages in the passages workload.")
    parser.add_argument("--passage-tokens", type=int, default=256, help="Tokens per passage (about).")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=1000.0, help="LYCHEE_MAX_BATCH_WAIT_MS of the spawned server."
    )
    parser.add_argument(
        "--vision-cache",
        action="store_true",
        help="Keep the spawned server's vision cache on (repeated images then skip the ViT).",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=1,
        help="LYCHEE_DECODE_THREADS of the spawned server. 1 (the tests' setting) keeps a request's "
        "pairs in document order within a batch; with more, the order follows preparation completion "
        "and scores can move in their last bits between calls, so bit-equal checks may fail.",
    )
    parser.add_argument(
        "--http-client-nodelay",
        action="store_true",
        help="Set TCP_NODELAY on the HTTP client's socket (httpx does not by default).",
    )
    parser.add_argument(
        "--server-threads",
        type=int,
        default=0,
        help="torch threads of the spawned server (0 = torch default).",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="Deadline of one call (s).")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="Wait for serving (s).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the JSON report here.")


# ------------------------------------------------------------------------------------ inputs
def _test_image(seed: int, size: int, fmt: str) -> bytes:
    """A photo-sized test image: a colour gradient plus per-pixel noise (so it compresses like a
    photograph rather than like a flat colour), deterministic in ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack(
        [
            xx * 255 // size + seed * 29,
            yy * 255 // size + seed * 53,
            (xx + yy) * 127 // size + seed * 7,
        ],
        axis=-1,
    )
    pixels = np.clip(base % 256 + rng.integers(-24, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def _token_counter(model_dir: str | None) -> Callable[[str], int] | None:
    """Token count with the checkpoint's own tokenizer, when a local checkpoint is known."""
    if model_dir is None or not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _passages(n: int, tokens: int, count: Callable[[str], int] | None) -> list[str]:
    """``n`` distinct passages of about ``tokens`` tokens (``count``; else ~0.75 words a token)."""
    out: list[str] = []
    for i in range(n):
        words: list[str] = [f"Passage {i}:"]
        k = i
        target_words = max(1, tokens * 3 // 4)
        while True:
            for _ in range(4):
                k = (k * 7 + 3) % 1_000_003
                words.append(_WORDS[k % len(_WORDS)])
            text = " ".join(words)
            if (count(text) >= tokens) if count is not None else (len(words) >= target_words):
                break
        out.append(text)
    return out


@dataclass
class Workload:
    name: str
    description: str
    query: str
    images: list[bytes] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return len(self.images) or len(self.texts)

    def grpc_documents(self) -> list[Any]:
        return list(self.images) if self.images else list(self.texts)

    def http_body(self) -> bytes:
        """The ``/v1/rerank`` body, built the way a client builds it on every call."""
        docs: list[Any]
        if self.images:
            docs = [{"image": base64.b64encode(data).decode("ascii")} for data in self.images]
        else:
            docs = list(self.texts)
        return json.dumps({"model": "lychee-rerank", "query": self.query, "documents": docs}).encode()

    def grpc_message(self) -> bytes:
        """The unary ``RerankRequest`` the client sends, built with the public stubs and serialized."""
        from lychee.rerank.v1 import rerank_pb2 as pb

        req = pb.RerankRequest(query=pb.Content(text=self.query))
        media = pb.MEDIA_TYPE_JPEG if self.images and self.images[0][:2] == b"\xff\xd8" else pb.MEDIA_TYPE_PNG
        for data in self.images:
            req.documents.add().content.image.CopyFrom(pb.Image(data=data, media_type=media))
        for text in self.texts:
            req.documents.add().content.text = text
        return req.SerializeToString()


def _workloads(args: argparse.Namespace, names: list[str], model_dir: str | None) -> list[Workload]:
    out: list[Workload] = []
    for name in names:
        if name == "images":
            fmt = args.image_format
            images = [_test_image(i, args.image_size, fmt) for i in range(args.images)]
            out.append(
                Workload(
                    name,
                    f"1 text query + {len(images)} images ({args.image_size}x{args.image_size} "
                    f"{fmt.upper()}, ~{statistics.mean(len(b) for b in images) / 1024:.0f} KiB each)",
                    QUERY_IMAGES,
                    images=images,
                )
            )
        else:
            count = _token_counter(model_dir)
            texts = _passages(args.passages, args.passage_tokens, count)
            out.append(
                Workload(
                    name,
                    f"1 text query + {len(texts)} passages (~{args.passage_tokens} tokens, "
                    f"~{statistics.mean(len(t.encode()) for t in texts):.0f} B each)",
                    QUERY_PASSAGES,
                    texts=texts,
                )
            )
    return out


# ------------------------------------------------------------------------------------ server
@dataclass
class _Endpoints:
    grpc_target: str
    http_url: str
    spawned: bool
    log_path: str | None = None


def _server_env(args: argparse.Namespace, model: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "LYCHEE_MODEL": model,
            "LYCHEE_DEVICE": args.device,
            "LYCHEE_HOST": "127.0.0.1",
            "LYCHEE_PORT": "0",
            "LYCHEE_HTTP_PORT": "0",
            "LYCHEE_METRICS_PORT": "off",
            "LYCHEE_MAX_BATCH_WAIT_MS": f"{args.batch_wait_ms:g}",
            "LYCHEE_GRACE_PERIOD_S": "2",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
    )
    env["LYCHEE_DECODE_THREADS"] = str(args.decode_threads)
    if not args.vision_cache:
        env["LYCHEE_VISION_CACHE_ENTRIES"] = "0"
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    for name in ("LYCHEE_API_KEYS", "LYCHEE_API_KEYS_FILE", "LYCHEE_TLS_CERT", "LYCHEE_TLS_KEY"):
        env.pop(name, None)
    return env


@contextlib.contextmanager
def _spawned_server(args: argparse.Namespace, model: str) -> Iterator[_Endpoints]:
    """``lychee-rerank serve`` as a child process until the block ends (SIGTERM, then SIGKILL)."""
    log = tempfile.NamedTemporaryFile(prefix="lychee-bench-doors-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "lychee_server.cli", "serve"],
        env=_server_env(args, model),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    ready: dict[str, Any] = {}
    found = threading.Event()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # keep draining after the serving line, so the pipe never fills
            if not found.is_set():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("event") == "serving":
                        ready.update(record)
                        found.set()
        found.set()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        if not found.wait(args.startup_timeout) or not ready:
            tail = Path(log.name).read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError("the server did not report serving:\n" + "\n".join(tail))
        if ready.get("http_port") is None:
            raise RuntimeError("the server reported no http_port (is the HTTP door off?)")
        yield _Endpoints(
            f"127.0.0.1:{ready['port']}", f"http://127.0.0.1:{ready['http_port']}", True, log.name
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        reader.join(timeout=5)
        log.close()


# ------------------------------------------------------------------------------------ calls
Ranking = list[tuple[int, float]]


@dataclass
class _Samples:
    seconds: list[float] = field(default_factory=list)
    encode_s: list[float] = field(default_factory=list)  # inline (HTTP only)
    decode_s: list[float] = field(default_factory=list)  # inline (HTTP only)
    server_total_s: list[float] = field(default_factory=list)  # server-reported (gRPC only)
    streamed: set[bool] = field(default_factory=set)
    body_bytes: int = 0
    tokens: int = 0


def _grpc_call(client: Any, wl: Workload, timeout: float, out: _Samples | None) -> Ranking:
    t0 = time.perf_counter()
    result = client.rerank(wl.query, wl.grpc_documents(), timeout=timeout)
    dt = time.perf_counter() - t0
    if out is not None:
        out.seconds.append(dt)
        out.server_total_s.append(result.timings.total)
        out.streamed.add(bool(result.streamed))
        out.tokens = result.usage.tokens
    return [(r.index, r.score) for r in result.results]


def _http_call(http: Any, wl: Workload, timeout: float, out: _Samples | None) -> Ranking:
    t0 = time.perf_counter()
    body = wl.http_body()
    t1 = time.perf_counter()
    response = http.post(
        "/v1/rerank", content=body, headers={"content-type": "application/json"}, timeout=timeout
    )
    t2 = time.perf_counter()
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
    answer = json.loads(response.content)
    t3 = time.perf_counter()
    if out is not None:
        out.seconds.append(t3 - t0)
        out.encode_s.append(t1 - t0)
        out.decode_s.append(t3 - t2)
        out.body_bytes = len(body)
    return [(int(r["index"]), float(r["relevance_score"])) for r in answer["results"]]


def _encode_cost(fn: Callable[[], bytes], times: int = 5) -> float:
    """Median seconds of ``fn`` (client-side encoding alone, no network)."""
    costs = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        costs.append(time.perf_counter() - t0)
    return statistics.median(costs)


# ------------------------------------------------------------------------------------ report
def _percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in (0, 1])."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _stats(xs: Sequence[float]) -> dict[str, float]:
    return {
        "p50_s": statistics.median(xs),
        "p90_s": _percentile(xs, 0.9),
        "mean_s": statistics.fmean(xs),
        "min_s": min(xs),
    }


def _commit() -> str:
    def git(*cmd: str) -> str:
        done = subprocess.run(
            ["git", *cmd], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + (" (+ uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def _torch_threads(requested: int) -> int | None:
    if requested:
        return requested
    try:
        import torch
    except ImportError:  # pragma: no cover - the server extra brings torch
        return None
    return int(torch.get_num_threads())


def _machine(args: argparse.Namespace, spawned: bool) -> dict[str, Any]:
    import grpc
    import httpx

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "server_device": args.device if spawned else "unknown (running server)",
        "server_torch_threads": _torch_threads(args.server_threads) if spawned else None,
        "grpcio": grpc.__version__,
        "httpx": httpx.__version__,
    }


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The report's results as a Markdown table (one row per workload and door)."""
    lines = [
        "| workload | door | request body | p50 (ms) | p90 (ms) | mean (ms) | client encode (ms) "
        "| HTTP/gRPC p50 | rankings identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        g, h = row["grpc"], row["http"]
        call = "stream" if g["streamed"] else "unary"
        ratio = row["http_over_grpc_p50"]
        same = f"{row['identical_rankings']}/{row['repeats']}"
        grpc_cells = [_ms(g["p50_s"]), _ms(g["p90_s"]), _ms(g["mean_s"]), _ms(g["encode_s"]), "1.00"]
        http_cells = [_ms(h["p50_s"]), _ms(h["p90_s"]), _ms(h["mean_s"]), _ms(h["encode_s"])]
        http_cells.append(f"**{ratio:.3f}** ({100 * (ratio - 1):+.1f}%)")
        lines.append(
            f"| {row['description']} | gRPC (LycheeClient, {call}) | {g['body_bytes']:,} B | "
            + " | ".join(grpc_cells)
            + f" | {same} |"
        )
        lines.append(
            f"| | HTTP (httpx, /v1/rerank) | {h['body_bytes']:,} B | "
            + " | ".join(http_cells)
            + f" | {same} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ run
def _measure(
    wl: Workload, client: Any, http: Any, args: argparse.Namespace
) -> tuple[dict[str, Any], list[str]]:
    g, h = _Samples(), _Samples()
    g.body_bytes = len(wl.grpc_message())
    identical = 0
    problems: list[str] = []
    reference: Ranking | None = None
    stable = True
    repeats = max(1, args.repeats)
    for r in range(max(0, args.warmup) + repeats):
        timed = r >= args.warmup
        # Alternate which door goes first, so neither always follows the other's warm caches.
        grpc_first = r % 2 == 0
        if grpc_first:
            got_g = _grpc_call(client, wl, args.timeout, g if timed else None)
            got_h = _http_call(http, wl, args.timeout, h if timed else None)
        else:
            got_h = _http_call(http, wl, args.timeout, h if timed else None)
            got_g = _grpc_call(client, wl, args.timeout, g if timed else None)
        if not timed:
            continue
        if got_g == got_h:  # same order, bit-equal floats
            identical += 1
        elif len(problems) < 3:
            problems.append(f"{wl.name} call {r}: gRPC {got_g[:3]}... != HTTP {got_h[:3]}...")
        if reference is None:
            reference = got_g
        elif got_g != reference:
            stable = False
    paired = [hs / gs for hs, gs in zip(h.seconds, g.seconds, strict=True)]
    g_stats, h_stats = _stats(g.seconds), _stats(h.seconds)
    row: dict[str, Any] = {
        "workload": wl.name,
        "description": wl.description,
        "documents": wl.documents,
        "repeats": repeats,
        "identical_rankings": identical,
        "stable_across_calls": stable,
        "tokens_per_request": g.tokens,
        "grpc": {
            **g_stats,
            "body_bytes": g.body_bytes,
            "streamed": any(g.streamed),
            "encode_s": _encode_cost(wl.grpc_message),
            "server_total_p50_s": statistics.median(g.server_total_s),
            "samples_s": g.seconds,
        },
        "http": {
            **h_stats,
            "body_bytes": h.body_bytes,
            "encode_s": _encode_cost(wl.http_body),
            "encode_inline_p50_s": statistics.median(h.encode_s),
            "response_decode_p50_s": statistics.median(h.decode_s),
            "samples_s": h.seconds,
        },
        "http_over_grpc_p50": h_stats["p50_s"] / g_stats["p50_s"],
        "http_over_grpc_paired_median": statistics.median(paired),
        "http_minus_grpc_p50_s": h_stats["p50_s"] - g_stats["p50_s"],
    }
    return row, problems


def _run(args: argparse.Namespace, endpoints: _Endpoints, workloads: list[Workload]) -> dict[str, Any]:
    import httpx

    from lychee.rerank.client import NO_RETRY, LycheeClient

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)] if args.http_client_nodelay else []
    transport = httpx.HTTPTransport(socket_options=options)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    with (
        LycheeClient(
            endpoints.grpc_target, api_key=args.api_key, timeout=args.timeout, retry=NO_RETRY
        ) as client,
        httpx.Client(
            base_url=endpoints.http_url, headers=headers, timeout=args.timeout, transport=transport
        ) as http,
    ):
        for wl in workloads:
            print(f"[bench-doors] {wl.name}: {wl.description}", file=sys.stderr, flush=True)
            row, found = _measure(wl, client, http, args)
            rows.append(row)
            problems += found
            print(
                f"[bench-doors] {wl.name}: gRPC p50 {_ms(row['grpc']['p50_s'])} ms, HTTP p50 "
                f"{_ms(row['http']['p50_s'])} ms, ratio {row['http_over_grpc_p50']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    return {
        "rows": rows,
        "problems": problems,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": time.perf_counter() - started,
    }


def run_bench_doors(args: argparse.Namespace) -> int:
    """Run the workloads through both doors; print the table, write JSON. Returns an exit code:
    0, or 1 when the doors ever disagreed on a ranking, 2 on bad arguments."""
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        print(f"bench-doors: unknown workloads {bad}; choose from {WORKLOADS}", file=sys.stderr)
        return 2
    if (args.grpc_target is None) != (args.http_url is None):
        print("bench-doors: --grpc-target and --http-url go together (one server)", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("bench-doors: --repeats must be >= 1", file=sys.stderr)
        return 2

    with contextlib.ExitStack() as stack:
        model = args.model
        if model is None and args.grpc_target is None:
            from lychee_server.engine.checkpoint import build_tiny_checkpoint

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lychee-bench-doors-"))
            model = str(build_tiny_checkpoint(Path(tmp) / "tiny"))
        workloads = _workloads(args, names, model)
        if args.grpc_target is None:
            assert model is not None
            print("[bench-doors] starting lychee-rerank serve ...", file=sys.stderr, flush=True)
            endpoints = stack.enter_context(_spawned_server(args, model))
        else:
            endpoints = _Endpoints(args.grpc_target, args.http_url.rstrip("/"), False)
        measured = _run(args, endpoints, workloads)

    report: dict[str, Any] = {
        "benchmark": "bench-doors: HTTP/JSON door vs gRPC door, same server, interleaved calls",
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "server": {
            "spawned": endpoints.spawned,
            "model": model if model is not None else "unknown (running server)",
            "max_batch_wait_ms": args.batch_wait_ms if endpoints.spawned else None,
            "vision_cache": bool(args.vision_cache) if endpoints.spawned else None,
            "decode_threads": args.decode_threads if endpoints.spawned else None,
        },
        "machine": _machine(args, endpoints.spawned),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "grpc_client": "lychee.rerank.client.LycheeClient (its own unary/stream choice), no retries",
        "http_client": "httpx.Client keep-alive, POST /v1/rerank, json.dumps body, base64 images"
        + (", TCP_NODELAY on the client socket" if args.http_client_nodelay else ""),
        "encode_note": "client encode: median of 5 untimed builds (HTTP: base64 + json.dumps of the "
        "body; gRPC: the RerankRequest built and serialized with the public stubs)",
        **measured,
    }
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    m = report["machine"]
    print(
        f"bench-doors — {report['date']} — commit {report['commit']} — {m['cpu']} x{m['cpus_usable']} "
        f"(python {m['python']}, server torch threads {m['server_torch_threads']}) — "
        f"{args.repeats} interleaved calls per door, load average "
        f"{report['load_average_before'][0]:.1f} -> {report['load_average_after'][0]:.1f}\n"
    )
    print(markdown_table(report))
    for problem in report["problems"]:
        print(f"bench-doors: rankings differ: {problem}", file=sys.stderr)
    return 1 if any(r["identical_rankings"] != r["repeats"] for r in report["rows"]) else 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m lychee_server.bench_doors")
    add_bench_doors_arguments(parser)
    sys.exit(run_bench_doors(parser.parse_args()))
