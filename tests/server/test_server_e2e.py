"""End-to-end: a real in-process server, the real engine on the tiny checkpoint, a real channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness import (
    GatedEngine,
    aiter_list,
    error_details,
    eventually,
    fetch_metrics,
    metric_value,
    running_server,
    text_stream_messages,
)
from helpers import image_input
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
WAIT = 30.0
TEXTS = ["a red bicycle leaning on a wall", "quarterly revenue grew by 4%", "a bike with a red frame"]


def text_request(texts: list[str], **options: Any) -> pb.RerankRequest:
    return pb.RerankRequest(
        instruction="find matching descriptions",
        query=pb.Content(text="red bicycle"),
        documents=[pb.Document(id=f"d{i}", content=pb.Content(text=t)) for i, t in enumerate(texts)],
        options=pb.RerankOptions(**options),
    )


def stream_messages(texts: list[str], chunk: int = 7) -> list[pb.RerankStreamRequest]:
    return text_stream_messages(texts, chunk=chunk, instruction="find matching descriptions")


async def test_unary_stream_info_metrics_and_request_id(gated: GatedEngine) -> None:
    async with running_server(engine=gated) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.RerankServiceStub(channel)
        req = text_request(TEXTS, return_text=True, score_kind=pb.SCORE_KIND_LOGIT)
        req.documents.append(pb.Document(content=pb.Content(image=pb.Image(
            data=image_input(56, 56).data, media_type=pb.MEDIA_TYPE_PNG))))  # fmt: skip
        call = stub.Rerank(req, metadata=(("x-request-id", "req-123"),), timeout=WAIT)
        unary = await call
        assert ("x-request-id", "req-123") in tuple(await call.initial_metadata())
        assert ("x-request-id", "req-123") in tuple(await call.trailing_metadata())
        scores = [r.score for r in unary.results]
        assert scores == sorted(scores, reverse=True)
        assert sorted(r.index for r in unary.results) == [0, 1, 2, 3]
        by_index = {r.index: r for r in unary.results}
        assert by_index[0].id == "d0" and by_index[0].text == TEXTS[0] and not by_index[3].HasField("text")
        assert unary.usage.pairs == 4 and unary.usage.images == 1 and unary.usage.tokens > 0
        assert unary.model == gated.info.model_id
        assert unary.timings.total.ToNanoseconds() >= unary.timings.inference.ToNanoseconds() > 0

        streamed = await stub.RerankStream(aiter_list(stream_messages(TEXTS)), timeout=WAIT)
        again = await stub.Rerank(text_request(TEXTS), timeout=WAIT)
        assert [r.index for r in streamed.results] == [r.index for r in again.results]
        for a, b in zip(streamed.results, again.results, strict=True):
            assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-5)
            assert 0.0 <= a.score <= 1.0  # default score kind is the probability

        top = await stub.Rerank(text_request(TEXTS, top_n=1), timeout=WAIT)
        assert [r.index for r in top.results] == [again.results[0].index]

        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=WAIT)
        assert info.model_id == gated.info.model_id and info.device == "cpu"
        assert info.limits.max_documents == srv.settings.max_documents

        assert srv.metrics_url is not None
        text = await asyncio.to_thread(fetch_metrics, srv.metrics_url)
    assert metric_value(text, "lychee_requests_total", {"method": "Rerank", "code": "OK"}) == 3
    assert metric_value(text, "lychee_requests_total", {"method": "RerankStream", "code": "OK"}) == 1
    assert metric_value(text, "lychee_pairs_scored_total") == 4 + 3 + 3 + 3
    assert metric_value(text, "lychee_inflight_pairs") == 0
    assert metric_value(text, "lychee_device_memory_bytes") == 0  # CPU
    assert (metric_value(text, "lychee_inference_seconds_count") or 0) >= 4


async def test_invalid_input_is_invalid_argument_not_internal(gated: GatedEngine) -> None:
    async with running_server(engine=gated) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.RerankServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Rerank(pb.RerankRequest(query=pb.Content(text="q")), timeout=WAIT)
        d = error_details(info.value)
        assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "NO_DOCUMENTS"

        # Bytes that are not valid UTF-8 in a string field: the pass-through deserializer lets the
        # codec name the field instead of gRPC failing the call generically.
        good = text_request(["x"]).SerializeToString()
        bad = good.replace(b"find matching", b"find \xff\xfetching")
        raw = channel.unary_unary("/lychee.rerank.v1.RerankService/Rerank", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(bad, timeout=WAIT)
        d = error_details(info.value)
        assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "INVALID_UTF8"
        assert d.fields == ["instruction"]

        # A stream that breaks the protocol fails early with the assembler's reason.
        msgs = [pb.RerankStreamRequest(chunk=pb.ItemChunk(text=b"x"))]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RerankStream(aiter_list(msgs), timeout=WAIT)
        d = error_details(info.value)
        assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "STREAM_PROTOCOL_VIOLATION"
        assert d.metadata.get("request_id")


async def test_concurrent_callers_share_device_batches(gated: GatedEngine) -> None:
    async with (
        running_server(engine=gated, max_batch_pairs=16) as srv,
        grpc.aio.insecure_channel(srv.address) as ch,
    ):
        stub = pb_grpc.RerankServiceStub(ch)
        sched = srv.server.scheduler
        gated.gate.close()
        first = asyncio.ensure_future(stub.Rerank(text_request(TEXTS[:1]), timeout=WAIT))
        await asyncio.to_thread(gated.gate.entered.wait, WAIT)
        others = [asyncio.ensure_future(stub.Rerank(text_request(TEXTS), timeout=WAIT)) for _ in range(2)]
        await eventually(lambda: sched.queue_depth == 6, WAIT, "both callers queued")
        gated.gate.open()
        results = await asyncio.gather(first, *others)
        assert [len(r.results) for r in results] == [1, 3, 3]
        assert gated.batch_sizes == [1, 6]  # the two callers rode in one batch
        assert results[1].results[0].score == pytest.approx(results[2].results[0].score, rel=1e-4)
        text = await asyncio.to_thread(fetch_metrics, srv.metrics_url)
    assert metric_value(text, "lychee_batch_pairs_count") == 2
    assert metric_value(text, "lychee_batch_pairs_sum") == 7
    assert metric_value(text, "lychee_batch_pairs_bucket", {"le": "4.0"}) == 1  # the 6-pair batch is above


async def test_overload_is_resource_exhausted_with_retry_info(gated: GatedEngine) -> None:
    async with running_server(engine=gated, max_inflight_pairs=3, retry_after_s=0.75) as srv, \
            grpc.aio.insecure_channel(srv.address) as ch:  # fmt: skip
        stub = pb_grpc.RerankServiceStub(ch)
        gated.gate.close()
        held = asyncio.ensure_future(stub.Rerank(text_request(TEXTS[:2]), timeout=WAIT))
        await asyncio.to_thread(gated.gate.entered.wait, WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Rerank(text_request(TEXTS[:2]), timeout=WAIT)
        d = error_details(info.value)
        assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED and d.reason == "OVERLOADED"
        assert d.retry_delay == pytest.approx(0.75)
        gated.gate.open()
        assert len((await held).results) == 2
        assert len((await stub.Rerank(text_request(TEXTS[:2]), timeout=WAIT)).results) == 2
        text = await asyncio.to_thread(fetch_metrics, srv.metrics_url)
    assert (
        metric_value(text, "lychee_requests_total", {"method": "Rerank", "code": "RESOURCE_EXHAUSTED"}) == 1
    )


async def test_deadline_expiring_in_queue(gated: GatedEngine) -> None:
    async with running_server(engine=gated) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.RerankServiceStub(ch)
        sched = srv.server.scheduler
        gated.gate.close()
        held = asyncio.ensure_future(stub.Rerank(text_request(TEXTS[:1]), timeout=WAIT))
        await asyncio.to_thread(gated.gate.entered.wait, WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Rerank(text_request(TEXTS), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not held.done()
        gated.gate.open()
        await held
        await eventually(lambda: sched.inflight_pairs == 0, WAIT, "in-flight pairs back to 0")
    assert gated.batch_sizes == [1]  # the expired request never reached the device


async def test_caller_cancelling_frees_capacity(gated: GatedEngine) -> None:
    async with running_server(engine=gated) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.RerankServiceStub(ch)
        sched = srv.server.scheduler
        service = srv.server.gate

        # 1) cancelled mid-upload: the call ends, nothing reached the scheduler.
        more = asyncio.Event()

        async def stalled() -> AsyncIterator[pb.RerankStreamRequest]:
            for m in stream_messages(TEXTS)[:3]:
                yield m
            await more.wait()

        call = stub.RerankStream(stalled(), timeout=WAIT)
        await eventually(lambda: service.active_calls == 1, WAIT, "stream call active")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: service.active_calls == 0, WAIT, "stream handler finished")

        # 2) cancelled while its pairs wait behind a busy device: they are dropped.
        gated.gate.close()
        held = asyncio.ensure_future(stub.Rerank(text_request(TEXTS[:1]), timeout=WAIT))
        await asyncio.to_thread(gated.gate.entered.wait, WAIT)
        call = stub.RerankStream(aiter_list(stream_messages(TEXTS)), timeout=WAIT)
        await eventually(lambda: sched.queue_depth == 3, WAIT, "streamed pairs queued")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: sched.queue_depth == 0, WAIT, "queued pairs dropped")
        gated.gate.open()
        await held
        await eventually(lambda: sched.inflight_pairs == 0, WAIT, "in-flight pairs back to 0")
        text = await asyncio.to_thread(fetch_metrics, srv.metrics_url)
    assert metric_value(text, "lychee_inflight_pairs") == 0
    assert metric_value(text, "lychee_pairs_dropped_total") == 3
    assert gated.batch_sizes == [1]


async def test_reflection_lists_the_service(gated: GatedEngine) -> None:
    async with (
        running_server(engine=gated, api_keys=["k"]) as srv,
        grpc.aio.insecure_channel(srv.address) as ch,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names: list[str] = []
        async for resp in stub.ServerReflectionInfo(ask(), timeout=WAIT):  # open without a token
            names.extend(s.name for s in resp.list_services_response.service)
    assert "lychee.rerank.v1.RerankService" in names
    assert "grpc.health.v1.Health" in names
