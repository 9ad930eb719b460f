"""The client propagates the caller's OpenTelemetry span as W3C ``traceparent`` metadata (when
opentelemetry-api is in use), on every RPC it makes, from the sync and the async client; without
OpenTelemetry it imports nothing and sends nothing extra."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from tracing_support import caller_tracer, one, traced_server

from harness import FakeEngine
from lychee.rerank.client import AsyncLycheeClient, LycheeClient
from lychee.rerank.client._base import trace_metadata

pytestmark = pytest.mark.timeout(120)


def _traceparent(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def test_trace_metadata_is_the_current_span() -> None:
    tracer, _ = caller_tracer()
    assert trace_metadata() == ()  # no current span: nothing to send
    with tracer.start_as_current_span("outer") as span:
        assert dict(trace_metadata())["traceparent"] == _traceparent(span)
    assert trace_metadata() == ()


def test_metadata_the_caller_set_wins() -> None:
    tracer, _ = caller_tracer()
    mine = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    client = LycheeClient("127.0.0.1:1", metadata=[("traceparent", mine), ("x-team", "search")])
    try:
        with tracer.start_as_current_span("outer"):
            metadata = client._call_metadata()
        assert [v for k, v in metadata if k == "traceparent"] == [mine]
        assert ("x-team", "search") in metadata
    finally:
        client.close()


def test_without_opentelemetry_nothing_is_imported_or_sent() -> None:
    code = textwrap.dedent(
        """
        import sys
        from lychee.rerank.client import LycheeClient
        from lychee.rerank.client._base import trace_metadata
        client = LycheeClient("127.0.0.1:1", metadata=[("x-a", "1")])
        assert client._call_metadata() == (("x-a", "1"),) and trace_metadata() == ()
        print(",".join(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("method", "client_kwargs", "call_kwargs"),
    [
        ("Rerank", {}, {}),
        ("RerankStream", {"stream_threshold_bytes": 0}, {}),
        ("RerankWithProgress", {}, {"on_progress": lambda progress: None}),
    ],
)
async def test_async_client_every_rpc_carries_the_trace(
    method: str, client_kwargs: dict[str, Any], call_kwargs: dict[str, Any]
) -> None:
    tracer, _ = caller_tracer()
    async with traced_server(FakeEngine()) as srv:
        async with AsyncLycheeClient(srv.address, **client_kwargs) as client:
            with tracer.start_as_current_span("caller") as caller:
                await client.rerank("q", ["1", "2"], **call_kwargs)
        (root,) = await srv.roots()
    ctx = caller.get_span_context()
    assert root.attributes["lychee.method"] == method
    assert root.context.trace_id == ctx.trace_id and root.parent.span_id == ctx.span_id
    assert len(srv.trace(ctx.trace_id)) == len(srv.spans())
    one(srv.spans(), "validate")


async def test_sync_client_carries_the_trace_from_its_thread() -> None:
    tracer, _ = caller_tracer()
    async with traced_server(FakeEngine()) as srv:

        def work() -> Any:
            with LycheeClient(srv.address) as client, tracer.start_as_current_span("caller") as caller:
                client.rerank("q", ["1", "2", "3"])
                client.server_info()
            return caller.get_span_context()

        ctx = await asyncio.to_thread(work)
        await srv.roots()
    by_method = {s.attributes["lychee.method"]: s for s in srv.spans() if s.kind.name == "SERVER"}
    assert set(by_method) == {"Rerank", "GetServerInfo"}
    for root in by_method.values():
        assert root.context.trace_id == ctx.trace_id and root.parent.span_id == ctx.span_id
    assert by_method["GetServerInfo"].name == "GetServerInfo"
