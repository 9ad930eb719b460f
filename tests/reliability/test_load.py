"""Load test: many concurrent callers against the real server process, with figures.

Why a subprocess: the server's memory and its behaviour under overload are only meaningful for
the process that an operator runs (``python -m lychee_server.app``), not for objects living
inside the test runner. The callers are ``LOAD_CLIENTS`` grpc.aio clients, each on its own
channel (its own HTTP/2 connection), sending a deterministic mix of text and image requests
(a few documents each) over ``Rerank`` and ``RerankStream`` for ``LOAD_SECONDS``.

What must hold:

* no error other than RESOURCE_EXHAUSTED (admission control; counted, and the caller waits the
  RetryInfo delay before its next request, as the contract asks);
* every OK answer is a real ranking (one result per document, probabilities, sorted);
* the server counts exactly the answers the callers received (nothing lost in between);
* the server's resident memory is flat once warm: the median VmRSS of the last third of the run
  exceeds the median of the middle third by at most ``max(RSS_TOLERANCE_PCT %, RSS_TOLERANCE_MIB)``.
  The first third is warm-up (allocator arenas, the vision cache filling with the workload's
  images); a leak of even a few hundred bytes per request shows up between the later thirds.

Parameters (environment): LOAD_CLIENTS (64), LOAD_SECONDS (60), LOAD_MAX_INFLIGHT_PAIRS (128:
low enough that 64 callers hit admission control), LOAD_SAMPLE_S (2). Figures go to
``build/reliability/load.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from harness import subprocess_server

CLIENTS = int(os.environ.get("LOAD_CLIENTS", "64"))
SECONDS = float(os.environ.get("LOAD_SECONDS", "60"))
MAX_INFLIGHT_PAIRS = int(os.environ.get("LOAD_MAX_INFLIGHT_PAIRS", "128"))
SAMPLE_S = float(os.environ.get("LOAD_SAMPLE_S", "2"))
RSS_TOLERANCE_PCT = 1.0
RSS_TOLERANCE_MIB = 8.0
CALL_TIMEOUT_S = 30.0
THIS = Path(__file__).resolve().relative_to(Path(__file__).resolve().parents[2])
MAX_REQUESTS_PER_CLIENT = 100_000  # a bound on every loop, whatever the clock does

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS) + 240)]

# Request mix: (kind, share). Images go in every other document of an image request.
MIX = (("unary_text", 0.40), ("unary_image", 0.20), ("stream_text", 0.25), ("stream_image", 0.15))


@dataclass
class Tally:
    """What the callers saw, merged over all clients (single event loop: no locking needed)."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k, _ in MIX})
    ok: int = 0
    pairs: int = 0
    rejected: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every reported value was really observed)."""
    ordered = sorted(values)
    rank = max(1, round(q / 100.0 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def memory_verdict(samples: list[tuple[float, int]]) -> dict[str, Any]:
    """Flatness of the RSS series: medians of the middle and last thirds, and the growth allowed."""
    rss = [v for _, v in samples]
    third = len(rss) // 3
    mid, last = rss[third : 2 * third], rss[2 * third :]
    mid_med, last_med = statistics.median(mid), statistics.median(last)
    allowed = max(RSS_TOLERANCE_PCT / 100.0 * mid_med, RSS_TOLERANCE_MIB * 2**20)
    # Least-squares slope over the warm part, for the report only (the verdict uses the medians).
    warm = samples[third:]
    t0 = warm[0][0]
    xs = [t - t0 for t, _ in warm]
    ys = [v for _, v in warm]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    denom = sum((x - x_mean) ** 2 for x in xs) or 1.0
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / denom
    mib = 2**20
    return {
        "samples": len(rss),
        "start_mib": round(rss[0] / mib, 1),
        "end_mib": round(rss[-1] / mib, 1),
        "peak_mib": round(max(rss) / mib, 1),
        "middle_third_median_mib": round(mid_med / mib, 1),
        "last_third_median_mib": round(last_med / mib, 1),
        "growth_mib": round((last_med - mid_med) / mib, 1),
        "allowed_growth_mib": round(allowed / mib, 1),
        "warm_slope_mib_per_min": round(slope * 60 / mib, 2),
        "flat": last_med - mid_med <= allowed,
        "criterion": (
            f"median(last third) - median(middle third) <= max({RSS_TOLERANCE_PCT:g}% of the middle, "
            f"{RSS_TOLERANCE_MIB:g} MiB); first third = warm-up; sampled every {SAMPLE_S:g} s"
        ),
    }


async def test_load_mixed_clients(tiny_checkpoint: Path, kit: Any, workload: Any) -> None:
    """LOAD_CLIENTS callers for LOAD_SECONDS: only admission-control rejections, every answer real,
    server and callers agree on the count, memory flat."""
    assert CLIENTS >= 1 and SECONDS >= 3 * SAMPLE_S, "LOAD_SECONDS must allow a few memory samples"
    tally = Tally()
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    env = {
        "LYCHEE_MAX_INFLIGHT_PAIRS": str(MAX_INFLIGHT_PAIRS),
        "LYCHEE_DECODE_THREADS": "2",
        "LYCHEE_LOG_LEVEL": "WARNING",
    }

    async def client(address: str, idx: int, end: float) -> None:
        rng = random.Random(idx)
        async with kit.open_stub(address) as stub:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() >= end:
                    return
                kind = rng.choices(kinds, weights)[0]
                req = workload.request(rng, rng.randint(1, 4), with_images=kind.endswith("image"))
                if kind.startswith("unary"):
                    call = stub.Rerank(req, timeout=CALL_TIMEOUT_S)
                else:
                    call = stub.RerankStream(iter(workload.stream(req)), timeout=CALL_TIMEOUT_S)
                t0 = time.perf_counter()
                try:
                    resp = await call
                except grpc.aio.AioRpcError as err:
                    failure = kit.decode_failure(err)
                    if failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        tally.rejected += 1
                        await asyncio.sleep(min(failure.retry_delay_s or 0.1, 2.0))  # the contract's backoff
                    else:
                        tally.errors[failure.label] += 1
                    continue
                tally.latencies[kind].append(time.perf_counter() - t0)
                tally.ok += 1
                tally.pairs += len(req.documents)
                problem = kit.check_ranking(resp.results, len(req.documents))
                if problem is not None:
                    tally.wrong.append(problem)

    async def sampler(pid: int, stop: asyncio.Event, into: list[tuple[float, int]]) -> None:
        while not stop.is_set():
            into.append((time.monotonic(), kit.vm_rss_bytes(pid)))
            with contextlib.suppress(TimeoutError):  # the sampling cadence, not a race fix
                await asyncio.wait_for(stop.wait(), SAMPLE_S)

    samples: list[tuple[float, int]] = []
    with subprocess_server(tiny_checkpoint, env=env) as srv:
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        before = kit.scrape(url)
        rss_idle = kit.vm_rss_bytes(srv.proc.pid)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler(srv.proc.pid, stop, samples))
        t_start = time.monotonic()
        end = t_start + SECONDS
        await asyncio.wait_for(
            asyncio.gather(*(client(srv.address, i, end) for i in range(CLIENTS))),
            SECONDS + CALL_TIMEOUT_S + 60,
        )
        duration = time.monotonic() - t_start
        stop.set()
        await sampling
        after = kit.scrape(url)
        assert srv.proc.poll() is None, "the server died under load"

    def served(code: str) -> int:
        return int(
            kit.metric_sum(after, "lychee_requests_total", code=code)
            - kit.metric_sum(before, "lychee_requests_total", code=code)
        )

    all_lat = [x for v in tally.latencies.values() for x in v]
    memory = memory_verdict(samples)
    figures = {
        "clients": CLIENTS,
        "seconds": round(duration, 1),
        "max_inflight_pairs": MAX_INFLIGHT_PAIRS,
        "requests": tally.ok + tally.rejected + sum(tally.errors.values()),
        "ok": tally.ok,
        "pairs_scored": tally.pairs,
        "rejected_resource_exhausted": tally.rejected,
        "errors": dict(tally.errors),
        "wrong_answers": len(tally.wrong),
        "server_counted_ok": served("OK"),
        "server_counted_resource_exhausted": served("RESOURCE_EXHAUSTED"),
        "throughput_rps": round(tally.ok / duration, 1),
        "throughput_pairs_per_s": round(tally.pairs / duration, 1),
        "latency_ms": {
            "p50": round(1000 * percentile(all_lat, 50), 1) if all_lat else None,
            "p99": round(1000 * percentile(all_lat, 99), 1) if all_lat else None,
            "max": round(1000 * max(all_lat), 1) if all_lat else None,
            "by_kind_p50": {k: round(1000 * percentile(v, 50), 1) for k, v in tally.latencies.items() if v},
        },
        "rss_idle_mib": round(rss_idle / 2**20, 1),
        "memory": memory,
        "mix": dict(MIX),
        "command": f"LOAD_CLIENTS={CLIENTS} LOAD_SECONDS={SECONDS:g} pytest {THIS} -s",
    }
    kit.write_figures("load", figures)

    assert tally.ok > 0
    assert not tally.errors, f"errors other than RESOURCE_EXHAUSTED: {dict(tally.errors)}"
    assert not tally.wrong, tally.wrong[:5]
    assert all(tally.latencies[k] for k in kinds), "a request kind never succeeded"
    assert figures["server_counted_ok"] == tally.ok, "server and callers disagree on answered requests"
    assert figures["server_counted_resource_exhausted"] == tally.rejected
    assert memory["flat"], f"server memory grows under steady load: {memory}"
