"""The HTTP door through a server's life, in process on real sockets with the real tiny engine
behind a device gate: probes while the model warms up, a client that goes away mid-request
(its work is dropped), a drain with calls in flight on both doors, and SIGTERM in a subprocess."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc.aio
import httpx
import pytest
from http_door.http_support import TINY_ENV, http_url

from harness import GatedEngine, eventually, fetch_metrics, make_settings, metric_value, subprocess_server
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc
from lychee_server.app import build_server

pytestmark = pytest.mark.timeout(180)
WAIT = 30.0


def body(n: int = 2) -> dict[str, Any]:
    return {"query": "query", "documents": [f"document number {i}" for i in range(n)]}


async def test_probes_while_warming_up_then_serving(gated: GatedEngine) -> None:
    gated.warmup_gate.close()
    server = build_server(make_settings(warmup=True), engine=gated)
    starting = asyncio.create_task(server.start())
    try:
        await eventually(lambda: server.http_url is not None, WAIT, "the HTTP port to be bound")
        await asyncio.to_thread(gated.warmup_gate.entered.wait, WAIT)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as client:
            assert (await client.get("/healthz")).status_code == 200  # the process is up
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
            work = await client.post("/v1/rerank", json=body())
            assert work.status_code == 503 and work.json()["reason"] == "NOT_READY"
            assert int(work.headers["retry-after"]) >= 1
            info = await client.get("/v1/info")
            assert info.status_code == 503 and info.json()["reason"] == "NOT_READY"
            gated.warmup_gate.open()
            await asyncio.wait_for(starting, WAIT)
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.post("/v1/rerank", json=body())).status_code == 200
    finally:
        gated.warmup_gate.open()
        await asyncio.wait_for(starting, WAIT)
        await server.stop(0)


async def test_a_client_that_goes_away_frees_its_work(gated: GatedEngine) -> None:
    server = build_server(make_settings(warmup=False, max_batch_pairs=2), engine=gated)
    await server.start()
    try:
        gated.gate.close()
        async with httpx.AsyncClient(base_url=server.http_url) as client:
            call = asyncio.create_task(client.post("/v1/rerank", json=body(12), timeout=WAIT))
            await asyncio.to_thread(gated.gate.entered.wait, WAIT)  # its first batch is on the device
            call.cancel()  # the caller gives up: the connection closes
            with pytest.raises(asyncio.CancelledError):
                await call
        assert server.metrics_url is not None
        url = server.metrics_url

        def cancelled() -> float:
            text = fetch_metrics(url)
            labels = {"method": "/v1/rerank", "code": "CANCELLED", "transport": "http"}
            return metric_value(text, "lychee_requests_total", labels) or 0.0

        await eventually(lambda: server.gate.active_calls == 0, WAIT, "the HTTP call to end")
        assert await asyncio.to_thread(cancelled) == 1.0
        calls_before = gated.gate.calls
        gated.gate.open()
        assert server.scheduler is not None
        await eventually(lambda: server.metrics.inflight_pairs._value.get() == 0, WAIT, "pairs retired")
        # Only the batch already on the device ran: the other 10 pairs were dropped.
        assert gated.gate.calls == calls_before
        assert sum(gated.batch_sizes) == 2
    finally:
        gated.gate.open()
        await server.stop(0)


async def test_drain_finishes_calls_on_both_doors_and_refuses_new_ones(gated: GatedEngine) -> None:
    server = build_server(make_settings(warmup=False), engine=gated)
    await server.start()
    stopping: asyncio.Task[None] | None = None
    try:
        gated.gate.close()
        async with (
            httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as client,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.RerankServiceStub(channel)
            http_call = asyncio.create_task(client.post("/v1/rerank", json=body(3)))
            grpc_call = asyncio.ensure_future(
                stub.Rerank(
                    pb.RerankRequest(
                        query=pb.Content(text="query"),
                        documents=[pb.Document(content=pb.Content(text="document"))],
                    ),
                    timeout=WAIT,
                )
            )
            await eventually(  # admitted by the scheduler: past every check at the doors
                lambda: server.metrics.inflight_requests._value.get() == 2, WAIT, "both calls in flight"
            )
            stopping = asyncio.create_task(server.stop(grace=WAIT))
            await eventually(lambda: not server.gate.ready, WAIT, "the drain to begin")
            refused = await client.post("/v1/rerank", json=body())
            assert refused.status_code == 503 and refused.json()["reason"] == "SHUTTING_DOWN"
            assert (await client.get("/readyz")).status_code == 503
            gated.gate.open()
            done = await http_call
            assert done.status_code == 200 and len(done.json()["results"]) == 3
            assert len((await grpc_call).results) == 1
            await asyncio.wait_for(stopping, WAIT)
    finally:
        gated.gate.open()
        if stopping is None:
            await server.stop(0)


def test_sigterm_with_a_call_in_flight_on_each_door(tiny_checkpoint: Path) -> None:
    """Both calls finish with their answers and the process exits 0 within the grace period."""
    from lychee.rerank.client import LycheeClient

    grace = 60.0
    env = {**TINY_ENV, "LYCHEE_GRACE_PERIOD_S": str(grace), "LYCHEE_MAX_BATCH_PAIRS": "2"}
    docs = [f"document number {i} " * 5 for i in range(40)]
    with subprocess_server(tiny_checkpoint, env=env) as srv:
        assert srv.metrics_port is not None
        metrics = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        outcome: dict[str, Any] = {}

        def via_http() -> None:
            r = httpx.post(f"{http_url(srv)}/v1/rerank", json={"query": "q", "documents": docs}, timeout=120)
            outcome["http"] = (r.status_code, len(r.json().get("results", [])))

        def via_grpc() -> None:
            with LycheeClient(srv.address) as client:
                outcome["grpc"] = len(client.rerank("q", docs, timeout=120).results)

        threads = [threading.Thread(target=via_http), threading.Thread(target=via_grpc)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while (metric_value(fetch_metrics(metrics), "lychee_inflight_requests") or 0) < 2:
            assert time.monotonic() < deadline, "both calls never were in flight together"
            time.sleep(0.02)
        t_signal = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        code = srv.proc.wait(60)
        assert outcome == {"http": (200, 40), "grpc": 40}, "\n".join(srv.lines[-40:])
        assert outcome == {"http": (200, 40), "grpc": 40}
        assert code == 0 and time.monotonic() - t_signal < grace + 5
