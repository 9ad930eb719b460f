"""Issue 14, huge-count floods: a caller whose refused requests made the server receive more than
``refused_bytes_burst`` is refused (RESOURCE_EXHAUSTED / RATE_LIMITED + RetryInfo) before its next
body is read, on both doors; other callers are not affected; the ledger leaks and stays bounded."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import httpx
import pytest

from harness import aiter_list, error_details, fetch_metrics, metric_value, running_server
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc
from lychee_server.edge.gate import Call, RefusalLedger, caller_key

pytestmark = pytest.mark.timeout(120)
MiB = 1024 * 1024
BIG = [("grpc.max_send_message_length", 64 * MiB)]
QUICK = pb.RerankRequest(
    query=pb.Content(text="red bicycle"), documents=[pb.Document(content=pb.Content(text="a bike"))]
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_ledger_leaks_and_says_when_a_caller_is_under_budget_again() -> None:
    clock = Clock()
    ledger = RefusalLedger(burst=1000, rate=100, clock=clock)
    ledger.charge("a", 800)
    assert ledger.retry_after("a") is None  # under the burst
    ledger.charge("a", 700)  # 1500
    assert ledger.retry_after("a") == pytest.approx(5.0)  # (1500 - 1000) / 100
    clock.now += 2
    assert ledger.level("a") == pytest.approx(1300)
    assert ledger.retry_after("a") == pytest.approx(3.0)
    assert ledger.retry_after("b") is None  # another caller is not charged
    clock.now += 60
    assert ledger.retry_after("a") is None and len(ledger) == 0  # leaked empty: forgotten


def test_the_ledger_is_bounded_and_can_be_turned_off() -> None:
    clock = Clock()
    ledger = RefusalLedger(burst=10, rate=1, clock=clock, max_callers=4)
    for i, n in enumerate((50, 40, 30, 20, 60)):
        ledger.charge(f"c{i}", n)
    # Past the bound the emptiest go, down to three quarters of it: c3 (20) and c2 (30).
    assert len(ledger) == 3 and ledger.level("c3") == ledger.level("c2") == 0.0
    assert [ledger.level(k) for k in ("c0", "c1", "c4")] == [50, 40, 60]
    off = RefusalLedger(burst=10, rate=0, clock=clock)
    off.charge("x", 10**9)
    assert not off.enabled and off.retry_after("x") is None and len(off) == 0


def test_callers_are_their_api_key_else_their_address_without_the_port() -> None:
    def key(peer: str, tenant: str = "") -> str:
        return caller_key(Call(request_id="r", method="m", transport="t", peer=peer, tenant=tenant))

    assert key("ipv4:10.0.0.7:51234") == key("ipv4:10.0.0.7:40000") == "ipv4:10.0.0.7"
    assert key("ipv6:[::1]:5000") == "ipv6:[::1]"
    assert key("10.0.0.7:51234") == "10.0.0.7"  # the HTTP door's peer
    assert key("unix:/run/lychee.sock") == "unix:/run/lychee.sock"
    assert key("ipv4:10.0.0.7:51234", tenant="abc") == "tenant:abc"


def _too_many(n: int) -> bytes:
    head = pb.RerankRequest(query=pb.Content(text="q")).SerializeToString()
    doc = pb.RerankRequest(documents=[pb.Document(content=pb.Content(text="a" * 90))]).SerializeToString()
    return head + doc * n


async def _raw(channel: grpc.aio.Channel, data: bytes, key: str) -> Any:
    call = channel.unary_unary("/lychee.rerank.v1.RerankService/Rerank", request_serializer=None)
    return await call(data, timeout=30, metadata=(("authorization", f"Bearer {key}"),))


async def test_a_caller_over_its_refused_bytes_is_refused_unread_and_others_are_not(tiny_engine: Any) -> None:
    settings = {
        "api_keys": ("attacker-key", "user-key"),
        "max_documents": 10,
        "refused_bytes_burst": 1 * MiB,
        "refused_bytes_per_s": 1024.0,  # leaks slowly: the test is not timing-sensitive
        "oversize_refusal_delay_s": 0.0,
    }
    bad = _too_many(7_000)  # ~0.65 MiB, over max_documents
    async with (
        running_server(engine=tiny_engine, warmup=False, **settings) as srv,
        grpc.aio.insecure_channel(srv.address, options=BIG) as channel,
    ):
        for _ in range(2):  # 1.3 MiB refused: over the 1 MiB burst
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _raw(channel, bad, "attacker-key")
            assert error_details(refused.value).reason == "TOO_MANY_DOCUMENTS"
        ledger = srv.server.gate.refusals
        level = max(ledger.level(k) for k in list(ledger._levels))
        assert level > 1 * MiB

        # Now even a valid request of that caller is refused, and a 15 MiB invalid one is not read
        # (it would have been charged had it been parsed and refused as invalid).
        for data in (QUICK.SerializeToString(), _too_many(160_000)):
            with pytest.raises(grpc.aio.AioRpcError) as limited:
                await _raw(channel, data, "attacker-key")
            err = limited.value
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            details = error_details(err)
            assert details.reason == "RATE_LIMITED" and details.retry_delay is not None
            assert details.retry_delay > 60  # ~0.3 MiB over, leaking at 1 KiB/s
        assert max(ledger.level(k) for k in list(ledger._levels)) <= level

        # Another API key is another caller: served.
        ok = pb.RerankResponse.FromString(await _raw(channel, QUICK.SerializeToString(), "user-key"))
        assert len(ok.results) == 1
        stub = pb_grpc.RerankServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as stream_limited:  # streams are refused the same way
            await stub.RerankStream(
                aiter_list([pb.RerankStreamRequest(header=pb.StreamHeader(query=pb.Content(text="q")))]),
                timeout=30,
                metadata=(("authorization", "Bearer attacker-key"),),
            )
        assert error_details(stream_limited.value).reason == "RATE_LIMITED"

        # The HTTP door shares the ledger (the caller is its API key): 429 with Retry-After.
        async with httpx.AsyncClient(base_url=srv.server.http_url, timeout=30) as client:
            body = {"query": "q", "documents": ["d"]}
            r = await client.post("/v1/rerank", json=body, headers={"authorization": "Bearer attacker-key"})
            assert r.status_code == 429 and r.json()["reason"] == "RATE_LIMITED", r.text
            assert float(r.headers["retry-after"]) > 60
            r = await client.post("/v1/rerank", json=body, headers={"authorization": "Bearer user-key"})
            assert r.status_code == 200, r.text

        text = fetch_metrics(srv.metrics_url or "")
        assert metric_value(text, "lychee_rejected_requests_total", {"reason": "RATE_LIMITED"}) == 4.0


async def test_refused_http_bodies_are_charged_to_the_callers_address(tiny_engine: Any) -> None:
    settings = {
        "refused_bytes_burst": 1 * MiB,
        "refused_bytes_per_s": 1024.0,
        "oversize_refusal_delay_s": 0.0,
    }
    async with (
        running_server(engine=tiny_engine, warmup=False, **settings) as srv,
        httpx.AsyncClient(base_url=srv.server.http_url, timeout=30) as client,
    ):
        junk = b"{" + b" " * (700 * 1024)  # not JSON: INVALID_JSON after the whole body was read
        for _ in range(2):
            r = await client.post("/v1/rerank", content=junk, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["reason"] == "INVALID_JSON", r.text
        r = await client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        assert r.status_code == 429 and r.json()["reason"] == "RATE_LIMITED", r.text
        assert list(srv.server.gate.refusals._levels) == ["127.0.0.1"]


async def test_valid_traffic_is_never_charged(tiny_engine: Any) -> None:
    async with (
        running_server(engine=tiny_engine, warmup=False, refused_bytes_burst=1 * MiB) as srv,
        grpc.aio.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.RerankServiceStub(channel)
        for _ in range(3):
            assert len((await stub.Rerank(QUICK, timeout=30)).results) == 1
        assert len(srv.server.gate.refusals) == 0
