"""Issue 14 (hardening round 2), edge classes, against a real in-process server on the tiny checkpoint.

* class 2: a request with millions of tiny documents and one bad field must not freeze the event
  loop (health and a small request keep answering within 1 s while it is parsed);
* class 3: a stalled stream ends with DEADLINE_EXCEEDED after ``stream_idle_timeout_s``; streams
  together hold at most ``max_buffered_bytes`` (RESOURCE_EXHAUSTED + RetryInfo past it);
* class 5: thousands of concurrent calls: overload is RESOURCE_EXHAUSTED + RetryInfo decided by
  our admission (``max_concurrent_calls``), never grpc's bare CANCELLED, and it is counted;
* class 7: a response that could not be sent is refused before any scoring (RESPONSE_TOO_LARGE);
* class 8 / 11: unparsable bytes on every RPC, bad UTF-8 in a stream header;
* reflection: a ``grpc.reflection.v1`` client lists the service.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from harness import aiter_list, error_details, fetch_metrics, metric_value, running_server
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)
MiB = 1024 * 1024
BIG = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
QUICK = pb.RerankRequest(
    query=pb.Content(text="red bicycle"), documents=[pb.Document(content=pb.Content(text="a bike"))]
)


@pytest.fixture
async def server(tiny_engine: Any) -> AsyncIterator[Any]:
    async with running_server(engine=tiny_engine, warmup=False) as srv:
        yield srv


def many_documents(n: int, *, bad_at: int | None) -> bytes:
    """A RerankRequest on the wire with ``n`` one-letter documents, document ``bad_at`` holding a
    byte that is not UTF-8 (built as bytes: protobuf would refuse to serialise it)."""
    head = pb.RerankRequest(query=pb.Content(text="q")).SerializeToString()
    doc = pb.RerankRequest(documents=[pb.Document(content=pb.Content(text="a"))]).SerializeToString()
    bad = doc.replace(b"a", b"\xff")
    if bad_at is None:
        return head + doc * n
    return head + doc * bad_at + bad + doc * (n - bad_at - 1)


async def raw_rerank(channel: grpc.aio.Channel, data: bytes, limit_s: float = 60) -> Any:
    call = channel.unary_unary(
        "/lychee.rerank.v1.RerankService/Rerank",
        request_serializer=None,
        response_deserializer=pb.RerankResponse.FromString,
    )
    return await call(data, timeout=limit_s)


# ---------------------------------------------------------------------------------- class 2
async def test_millions_of_documents_with_a_bad_field_do_not_freeze_the_server(server: Any) -> None:
    payloads = [many_documents(2_000_000, bad_at=1_999_999), many_documents(2_000_000, bad_at=5)]
    payloads.append(payloads[0])  # several at once: they must not stack up on the loop
    assert all(len(p) > 10 * MiB for p in payloads)
    hostile_channels = [grpc.aio.insecure_channel(server.address, options=BIG) for _ in payloads]
    async with grpc.aio.insecure_channel(server.address) as channel:  # another caller's connection
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.RerankServiceStub(channel)
        await stub.Rerank(QUICK, timeout=30)  # warm the path
        hostile = [
            asyncio.create_task(raw_rerank(c, p)) for c, p in zip(hostile_channels, payloads, strict=True)
        ]
        probes: list[float] = []
        while not all(t.done() for t in hostile) or len(probes) < 10:
            t0 = time.monotonic()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            await stub.Rerank(QUICK, timeout=10)
            probes.append(time.monotonic() - t0)
        outcomes = await asyncio.gather(*hostile, return_exceptions=True)
    for c in hostile_channels:
        await c.close()
    assert max(probes) < 1.0, f"health + a small request took up to {max(probes):.2f} s during the attack"
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        details = error_details(outcome)
        assert outcome.code() is grpc.StatusCode.INVALID_ARGUMENT
        # Refused by count from a shallow parse, before the full parse or the bad-field search.
        assert (details.reason, details.fields) == ("TOO_MANY_DOCUMENTS", ["documents"])


async def test_the_bad_field_search_is_bounded_by_max_documents(server: Any) -> None:
    async with grpc.aio.insecure_channel(server.address, options=BIG) as channel:
        for payload, expected in (
            (many_documents(900, bad_at=899), ("INVALID_UTF8", ["documents[899].content.text"])),
            (many_documents(5000, bad_at=4999), ("TOO_MANY_DOCUMENTS", ["documents"])),  # small, inline
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw_rerank(channel, payload)
            details = error_details(info.value)
            assert (details.reason, details.fields) == expected


# ---------------------------------------------------------------------------------- class 3
async def test_a_stalled_stream_ends_with_deadline_exceeded(tiny_engine: Any) -> None:
    async with (
        running_server(engine=tiny_engine, warmup=False, stream_idle_timeout_s=0.5) as srv,
        grpc.aio.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.RerankServiceStub(channel)
        call = stub.RerankStream(timeout=30)
        await call.write(
            pb.RerankStreamRequest(header=pb.StreamHeader(query=pb.Content(text="q"), document_count=1))
        )
        await call.write(pb.RerankStreamRequest(item=pb.ItemStart(text_bytes=10)))
        await call.write(pb.RerankStreamRequest(chunk=pb.ItemChunk(text=b"abc")))
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call  # the caller stalls: it never sends the remaining 7 bytes
        waited = time.monotonic() - t0
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        details = error_details(info.value)
        assert details.reason == "DEADLINE_EXCEEDED" and "stream_idle_timeout_s" in (
            info.value.details() or ""
        )
        assert 0.3 < waited < 10.0
        # A stream that keeps sending, slower than nothing but faster than the timeout, is fine.
        msgs = [
            pb.RerankStreamRequest(header=pb.StreamHeader(query=pb.Content(text="q"), document_count=1)),
            pb.RerankStreamRequest(item=pb.ItemStart(text_bytes=3)),
            pb.RerankStreamRequest(chunk=pb.ItemChunk(text=b"abc")),
        ]
        ok = await stub.RerankStream(aiter_list(msgs), timeout=30)
        assert len(ok.results) == 1
        text = fetch_metrics(srv.metrics_url or "")
        counted = {"method": "RerankStream", "code": "DEADLINE_EXCEEDED"}
        assert metric_value(text, "lychee_requests_total", counted) == 1.0


async def test_streams_together_stay_within_max_buffered_bytes(tiny_engine: Any) -> None:
    async with (
        running_server(
            engine=tiny_engine, warmup=False, max_buffered_bytes=1 * MiB, max_text_bytes=1 * MiB
        ) as srv,
        grpc.aio.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.RerankServiceStub(channel)
        header = pb.RerankStreamRequest(header=pb.StreamHeader(query=pb.Content(text="q"), document_count=1))
        first = stub.RerankStream(timeout=60)
        await first.write(header)
        await first.write(pb.RerankStreamRequest(item=pb.ItemStart(text_bytes=700 * 1024)))
        await first.write(pb.RerankStreamRequest(chunk=pb.ItemChunk(text=b"x" * 1024)))
        # The first stream has declared 700 KiB; a second one declaring 400 KiB would pass 1 MiB.
        second = [header, pb.RerankStreamRequest(item=pb.ItemStart(text_bytes=400 * 1024))]
        second += [pb.RerankStreamRequest(chunk=pb.ItemChunk(text=b"y" * 100 * 1024))] * 4
        deadline = time.monotonic() + 20
        while True:  # the first stream's ItemStart may still be in flight: wait for its reservation
            try:
                await stub.RerankStream(aiter_list(second), timeout=30)
            except grpc.aio.AioRpcError as err:
                refused = err
                break
            assert time.monotonic() < deadline, "the second stream was never refused"
        assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        details = error_details(refused)
        assert details.reason == "OVERLOADED" and details.retry_delay is not None
        assert "max_buffered_bytes" in (refused.details() or "")
        for _ in range(699):
            await first.write(pb.RerankStreamRequest(chunk=pb.ItemChunk(text=b"x" * 1024)))
        await first.done_writing()
        assert len((await first).results) == 1
        # The first stream's bytes were released with its call: the second now fits.
        again = await stub.RerankStream(aiter_list(second), timeout=30)
        assert len(again.results) == 1
        assert srv.server.gate.buffered.used == 0


# ---------------------------------------------------------------------------------- class 5
async def test_thousands_of_concurrent_calls_are_admitted_or_refused_with_retry_info(
    tiny_engine: Any,
) -> None:
    calls = 2000
    async with (
        running_server(engine=tiny_engine, warmup=False, max_concurrent_calls=64) as srv,
        grpc.aio.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.RerankServiceStub(channel)
        await stub.Rerank(QUICK, timeout=30)

        async def one() -> str:
            try:
                await stub.Rerank(QUICK, timeout=60)
            except grpc.aio.AioRpcError as err:
                d = error_details(err)
                return f"{err.code().name}/{d.reason}/{'retry' if d.retry_delay is not None else '-'}"
            return "OK"

        outcomes = collections.Counter(await asyncio.gather(*(one() for _ in range(calls))))
        text = fetch_metrics(srv.metrics_url or "")
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED/OVERLOADED/retry"}, outcomes
    assert outcomes["RESOURCE_EXHAUSTED/OVERLOADED/retry"] > 0, outcomes  # admission did decide
    assert outcomes["OK"] >= 64, outcomes
    counted = metric_value(text, "lychee_requests_total", {"method": "Rerank", "code": "RESOURCE_EXHAUSTED"})
    assert counted == outcomes["RESOURCE_EXHAUSTED/OVERLOADED/retry"]


# ---------------------------------------------------------------------------------- class 7
async def test_a_response_over_the_message_limit_is_refused_before_scoring(tiny_engine: Any) -> None:
    text = "word " * (40 * 1024)  # 200 KiB per document: 6 of them are 1.2 MiB to send back
    data = text.encode()
    header = pb.StreamHeader(
        query=pb.Content(text="q"), document_count=6, options=pb.RerankOptions(return_text=True)
    )
    msgs = [pb.RerankStreamRequest(header=header)]
    for _ in range(6):
        msgs.append(pb.RerankStreamRequest(item=pb.ItemStart(text_bytes=len(data))))
        msgs += [
            pb.RerankStreamRequest(chunk=pb.ItemChunk(text=data[i : i + 128 * 1024]))
            for i in range(0, len(data), 128 * 1024)
        ]
    async with (
        running_server(engine=tiny_engine, warmup=False, max_message_bytes=1 * MiB) as srv,
        grpc.aio.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.RerankServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RerankStream(aiter_list(msgs), timeout=120)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        details = error_details(info.value)
        assert details.reason == "RESPONSE_TOO_LARGE" and details.fields == ["options.return_text"]
        metrics = fetch_metrics(srv.metrics_url or "")
        assert (metric_value(metrics, "lychee_pairs_scored_total") or 0.0) == 0.0  # nothing was scored
        ok = {"method": "RerankStream", "code": "OK"}
        assert metric_value(metrics, "lychee_requests_total", ok) in (None, 0.0)
        # Asking for the two best with their texts fits: it is scored and answered.
        msgs[0].header.options.top_n = 2
        answer = await stub.RerankStream(aiter_list(msgs), timeout=120)
        assert len(answer.results) == 2 and answer.results[0].text == text


# ---------------------------------------------------------------------------------- class 8 / 11
async def test_unparsable_bytes_are_invalid_argument_on_every_rpc(server: Any) -> None:
    garbage = b"\xff\xff\xff\xff"
    async with grpc.aio.insecure_channel(server.address) as channel:
        for method, response in (
            ("GetServerInfo", pb.GetServerInfoResponse),
            ("Rerank", pb.RerankResponse),
        ):
            call = channel.unary_unary(
                f"/lychee.rerank.v1.RerankService/{method}",
                request_serializer=None,
                response_deserializer=response.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(garbage, timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
            details = error_details(info.value)
            assert details.reason == "INVALID_ARGUMENT" and details.fields == ["request"], method
            assert "Error parsing" not in (info.value.details() or "")
        # A stream header whose instruction is not UTF-8 is INVALID_UTF8, like the unary RPC.
        header = pb.RerankStreamRequest(
            header=pb.StreamHeader(instruction="MARKER", query=pb.Content(text="q"), document_count=1)
        ).SerializeToString()
        stream = channel.stream_unary(
            "/lychee.rerank.v1.RerankService/RerankStream",
            request_serializer=None,
            response_deserializer=pb.RerankStreamResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream(iter([header.replace(b"MARKER", b"MA\xffKER")]), timeout=10)
        details = error_details(info.value)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "INVALID_UTF8" and details.fields == ["header.instruction"]


# ---------------------------------------------------------------------------------- reflection
def _reflection_v1() -> tuple[Any, Any]:
    """``grpc.reflection.v1`` request/response classes: the v1alpha file under the v1 package name
    (the two protos differ in nothing else), as a v1-only client would have them."""
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "grpc/reflection/v1/reflection.proto"
    fdp.package = "grpc.reflection.v1"
    del fdp.service[:]  # only the messages are needed; the call is made by its method path
    for message in fdp.message_type:
        for fld in message.field:
            if fld.HasField("type_name"):
                fld.type_name = fld.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    request = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    return request, response


async def test_reflection_v1_and_v1alpha_list_the_service(server: Any) -> None:
    request_cls, response_cls = _reflection_v1()
    async with grpc.aio.insecure_channel(server.address) as channel:
        listed = {}
        for version, req_cls, resp_cls in (
            ("v1", request_cls, response_cls),
            ("v1alpha", reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse),
        ):
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString,
            )
            responses = [r async for r in call(iter([req_cls(list_services="")]), timeout=10)]
            listed[version] = {s.name for s in responses[0].list_services_response.service}
            symbol = [
                r
                async for r in call(
                    iter([req_cls(file_containing_symbol="lychee.rerank.v1.RerankService")]), timeout=10
                )
            ]
            assert symbol[0].file_descriptor_response.file_descriptor_proto, version
    for version in ("v1", "v1alpha"):
        assert {"lychee.rerank.v1.RerankService", "grpc.health.v1.Health"} <= listed[version]
        assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= listed[
            version
        ]
