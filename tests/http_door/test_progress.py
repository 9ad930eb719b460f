"""The progress stream on both doors (gRPC ``RerankWithProgress``, HTTP ``/v1/rerank/progress``),
in process on real sockets with the real tiny engine: events are monotonic, end with the same
ranking as the plain call, errors keep the one status table, and a caller that goes away mid-stream
frees its work."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import grpc.aio
import httpx
import pytest

from harness import GatedEngine, error_details, eventually, running_server
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
WAIT = 30.0
DOCS = [f"document number {i} about topic {i % 3}" for i in range(9)]


def grpc_request(docs: list[str]) -> pb.RerankRequest:
    return pb.RerankRequest(
        query=pb.Content(text="topic 1"), documents=[pb.Document(content=pb.Content(text=d)) for d in docs]
    )


def assert_monotonic(events: list[tuple[int, int, int, str]], total: int) -> None:
    assert events, "no progress event"
    for (a_prep, a_scored, _, _), (b_prep, b_scored, _, _) in itertools.pairwise(events):
        assert b_prep >= a_prep and b_scored >= a_scored
    assert all(t == total and scored <= prep for prep, scored, t, _ in events)
    assert events[-1][3] in ("done", "PROGRESS_PHASE_DONE") and events[-1][1] == total


async def sse(client: httpx.AsyncClient, body: dict[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    async with client.stream("POST", "/v1/rerank/progress", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                out.append((name, json.loads(line.removeprefix("data: "))))
    return out


async def test_both_doors_stream_monotonic_progress_then_the_plain_ranking(gated: GatedEngine) -> None:
    # One preparation thread and a long batch wait: the same request always forms the same batches,
    # so the streamed ranking can be compared with the plain one bit for bit.
    async with running_server(
        engine=gated, max_batch_pairs=2, max_batch_wait_ms=1000, decode_threads=1
    ) as srv:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RerankServiceStub(ch)
            plain = await stub.Rerank(grpc_request(DOCS), timeout=WAIT)
            messages = [
                m
                async for m in stub.RerankWithProgress(
                    pb.RerankWithProgressRequest(request=grpc_request(DOCS)), timeout=WAIT
                )
            ]
        assert messages[-1].WhichOneof("event") == "result"
        assert all(m.WhichOneof("event") == "progress" for m in messages[:-1])
        grpc_events = [
            (m.progress.pairs_prepared, m.progress.pairs_scored, m.progress.pairs_total,
             pb.ProgressPhase.Name(m.progress.phase))
            for m in messages[:-1]
        ]  # fmt: skip
        assert_monotonic(grpc_events, len(DOCS))
        assert len({scored for _, scored, _, _ in grpc_events}) >= 3  # intermediate values, not just 0 and 9
        ranking = [(r.index, r.score) for r in plain.results]
        assert [(r.index, r.score) for r in messages[-1].result.results] == ranking

        async with httpx.AsyncClient(base_url=srv.server.http_url, timeout=WAIT) as client:
            events = await sse(client, {"query": "topic 1", "documents": DOCS})
        assert [n for n, _ in events[:-1]] == ["progress"] * (len(events) - 1) and events[-1][0] == "result"
        http_events = [
            (d["pairs_prepared"], d["pairs_scored"], d["pairs_total"], d["phase"]) for _, d in events[:-1]
        ]
        assert_monotonic(http_events, len(DOCS))
        assert [(r["index"], r["relevance_score"]) for r in events[-1][1]["results"]] == ranking


async def test_errors_keep_the_status_table(gated: GatedEngine) -> None:
    async with running_server(engine=gated) as srv:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RerankServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.RerankWithProgress(
                    pb.RerankWithProgressRequest(request=grpc_request([])), timeout=WAIT
                ):
                    pass
            d = error_details(info.value)
            assert (d.code.name, d.reason, d.fields) == ("INVALID_ARGUMENT", "NO_DOCUMENTS", ["documents"])
        async with httpx.AsyncClient(base_url=srv.server.http_url, timeout=WAIT) as client:
            r = await client.post("/v1/rerank/progress", json={"query": "q", "documents": [""]})
            assert (
                r.status_code == 400 and r.json()["reason"] == "EMPTY_TEXT"
            )  # before the stream: plain JSON
            assert r.json()["field_violations"][0]["field"] == "documents[0]"


@pytest.mark.parametrize("door", ["grpc", "http"])
async def test_a_caller_that_goes_away_mid_stream_frees_its_work(gated: GatedEngine, door: str) -> None:
    async with running_server(engine=gated, max_batch_pairs=2) as srv:
        gated.gate.close()
        try:
            calls_before = gated.gate.calls
            if door == "grpc":
                ch = grpc.aio.insecure_channel(srv.address)
                call = pb_grpc.RerankServiceStub(ch).RerankWithProgress(
                    pb.RerankWithProgressRequest(request=grpc_request(DOCS)), timeout=WAIT
                )
                first = await call.read()  # the stream has begun
                assert first.WhichOneof("event") == "progress"
                await asyncio.to_thread(gated.gate.entered.wait, WAIT)  # one batch on the device
                call.cancel()
                await ch.close()
            else:
                client = httpx.AsyncClient(base_url=srv.server.http_url, timeout=WAIT)
                async with client.stream(
                    "POST", "/v1/rerank/progress", json={"query": "q", "documents": DOCS}
                ) as r:
                    assert r.status_code == 200
                    await asyncio.to_thread(gated.gate.entered.wait, WAIT)
                await client.aclose()  # leaving the block mid-stream closes the connection
            await eventually(lambda: srv.server.gate.active_calls == 0, WAIT, "the call to end")
            gated.gate.open()
            await eventually(lambda: srv.server.metrics.inflight_pairs._value.get() == 0, WAIT, "work freed")
            assert gated.gate.calls == calls_before + 1  # only the batch already on the device ran
        finally:
            gated.gate.open()
