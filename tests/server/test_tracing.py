"""OpenTelemetry tracing (issue 13): one Rerank call through the real server and our client, inside
a caller's span, is one trace -- the caller's -- with the rerank span and its children (validate,
queue, prepare > prepare.query, batch > inference), parent/child linked; the same over HTTP from a
``traceparent`` header; a device batch shared by two requests is linked to both (fan-in); the
OTLP exporter really sends to a collector; with tracing off, no span and no opentelemetry import.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent import futures
from typing import Any

import grpc
import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

from tracing_support import (
    caller_tracer,
    named,
    one,
    parent_id,
    span_id,
    traced_server,
)

from harness import FakeEngine, eventually
from lychee.rerank.client import AsyncLycheeClient
from lychee_server import tracing
from lychee_server.settings import Settings

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check_tree(spans: list[Any], root: Any, documents: int) -> None:
    """The children of one call's span: names, parents, time order and the per-batch counts."""
    root_id = span_id(root)
    for name in ("validate", "queue", "prepare"):
        assert parent_id(one(spans, name)) == root_id, name
    prepare, queue = one(spans, "prepare"), one(spans, "queue")
    query = one(spans, "prepare.query")
    assert parent_id(query) == span_id(prepare)
    assert prepare.attributes["lychee.pairs"] == documents
    assert prepare.attributes["lychee.cpu_seconds"] >= 0
    batches = named(spans, "batch")
    assert batches, "no batch span"
    assert all(parent_id(b) == root_id for b in batches)
    assert sum(b.attributes["lychee.batch.request_pairs"] for b in batches) == documents
    inferences = named(spans, "inference")
    assert sorted(parent_id(i) for i in inferences) == sorted(span_id(b) for b in batches)
    for inference in inferences:
        batch = next(b for b in batches if span_id(b) == parent_id(inference))
        assert batch.start_time <= inference.start_time <= inference.end_time <= batch.end_time
        assert inference.attributes["lychee.pairs"] == batch.attributes["lychee.batch.pairs"]
    assert queue.end_time <= min(b.start_time for b in batches)
    assert root.start_time <= min(s.start_time for s in spans)
    assert root.end_time >= max(s.end_time for s in spans)


async def test_grpc_rerank_is_one_trace_under_the_callers_span(tiny_engine: Any) -> None:
    """The real tiny model behind the real server, called by AsyncLycheeClient inside a span."""
    tracer, caller_spans = caller_tracer()
    async with traced_server(tiny_engine, max_pixels=16 * 28 * 28, dtype="float32") as srv:
        client = AsyncLycheeClient(srv.address, metadata=[("x-request-id", "trace-me-1")])
        async with client:
            with tracer.start_as_current_span("caller-work") as caller:
                result = await client.rerank("red bicycle", ["a red bike", "a blue car", "bread"])
        assert len(result.results) == 3
        (root,) = await srv.roots()
    caller_ctx = caller.get_span_context()
    spans = srv.trace(caller_ctx.trace_id)
    assert len(spans) == len(srv.spans()), "every server span is in the caller's trace"
    assert root.parent is not None and root.parent.is_remote
    assert root.parent.span_id == caller_ctx.span_id
    assert root.kind.name == "SERVER"
    expected = {
        "lychee.request_id": "trace-me-1",
        "lychee.method": "Rerank",
        "lychee.transport": "grpc",
        "lychee.documents": 3,
        "lychee.code": "OK",
    }
    assert {k: root.attributes.get(k) for k in expected} == expected
    assert root.attributes["lychee.tokens"] == result.usage.tokens > 0
    assert root.status.is_ok
    _check_tree(spans, root, documents=3)
    assert {s.name for s in spans} == {
        "rerank",
        "validate",
        "queue",
        "prepare",
        "prepare.query",
        "batch",
        "inference",
    }
    assert [s.name for s in caller_spans.get_finished_spans()] == ["caller-work"]


async def test_http_rerank_joins_the_traceparent_header() -> None:
    trace_id, parent = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    headers = {
        "traceparent": f"00-{trace_id:032x}-{parent:016x}-01",
        "tracestate": "vendor=opaque",
        "x-request-id": "http-trace-1",
    }
    async with traced_server(FakeEngine()) as srv:
        async with httpx.AsyncClient(base_url=srv.http_url) as http:
            answer = await http.post(
                "/v1/rerank", json={"query": "q", "documents": ["3", "1", "2"]}, headers=headers
            )
        assert answer.status_code == 200, answer.text
        (root,) = await srv.roots()
    spans = srv.trace(trace_id)
    assert len(spans) == len(srv.spans())
    assert root.parent is not None and root.parent.span_id == parent and root.parent.is_remote
    assert root.parent.trace_state.get("vendor") == "opaque"
    assert root.attributes["lychee.transport"] == "http"
    assert root.attributes["lychee.method"] == "/v1/rerank"
    assert root.attributes["lychee.request_id"] == "http-trace-1"
    assert root.attributes["lychee.documents"] == 3
    assert root.attributes["lychee.code"] == "OK"
    assert root.attributes["lychee.request_bytes"] > 0
    _check_tree(spans, root, documents=3)


async def test_a_call_without_traceparent_starts_its_own_trace_and_errors_mark_their_span() -> None:
    async with traced_server(FakeEngine()) as srv:
        async with httpx.AsyncClient(base_url=srv.http_url) as http:
            bad = await http.post("/v1/rerank", content=b'{"query": "q", "documents": [', headers={})
        assert bad.status_code == 400
        (root,) = await srv.roots()
        validate = one(srv.spans(), "validate")
    assert root.parent is None  # no traceparent: a new trace, not the test's ambient context
    assert root.attributes["lychee.code"] == "INVALID_ARGUMENT"
    assert root.status.is_unset  # a caller's mistake is no server error (OpenTelemetry's gRPC rule)
    assert parent_id(validate) == span_id(root)
    assert not validate.status.is_ok and validate.attributes["lychee.reason"]
    assert not named(srv.spans(), "queue")  # it never reached the scheduler


async def test_a_batch_shared_by_two_requests_is_linked_to_both() -> None:
    """Fan-in: hold the device with one request, queue two more, let them share the next batch."""
    engine = FakeEngine()
    tracer, _ = caller_tracer()
    async with traced_server(engine, max_batch_wait_ms=0) as srv:
        async with AsyncLycheeClient(srv.address) as client:
            engine.gate.close()
            first = asyncio.ensure_future(client.rerank("q", ["9"]))
            await eventually(lambda: engine.gate.calls >= 1, what="the first batch on the device")
            calls = []
            for texts in (["1", "2"], ["3"]):
                with tracer.start_as_current_span("caller"):
                    calls.append(asyncio.ensure_future(client.rerank("q", texts)))
            await eventually(lambda: srv.server.scheduler.queue_depth == 3, what="both requests queued")
            engine.gate.open()
            await asyncio.gather(first, *calls)
        roots = await srv.roots(3)
    shared = [s for s in named(srv.spans(), "batch") if s.attributes["lychee.batch.requests"] == 2]
    assert len(shared) == 2, "each request of the shared batch has its batch span"
    assert len({s.attributes["lychee.batch.id"] for s in shared}) == 1
    assert {s.attributes["lychee.batch.request_pairs"] for s in shared} == {2, 1}
    assert all(s.attributes["lychee.batch.pairs"] == 3 for s in shared)
    (leader,) = [s for s in shared if s.attributes["lychee.batch.leader"]]
    (other,) = [s for s in shared if not s.attributes["lychee.batch.leader"]]
    assert leader.context.trace_id != other.context.trace_id  # two callers, two traces
    other_root = next(r for r in roots if r.context.trace_id == other.context.trace_id)
    assert parent_id(other) == span_id(other_root)
    assert [link.context.span_id for link in leader.links] == [span_id(other_root)]
    assert [link.context.span_id for link in other.links] == [span_id(leader)]
    for batch in shared:
        assert one(srv.trace(batch.context.trace_id), "inference").attributes["lychee.pairs"] == 3


async def test_a_cancelled_call_still_ends_its_spans() -> None:
    engine = FakeEngine()
    async with traced_server(engine) as srv:
        async with AsyncLycheeClient(srv.address) as client:
            engine.gate.close()
            call = asyncio.ensure_future(client.rerank("q", ["1"], timeout=0.3))
            with pytest.raises(TimeoutError):
                await call
            engine.gate.open()
        (root,) = await srv.roots()
        await eventually(lambda: len(named(srv.spans(), "inference")) == 1, what="the held batch")
    assert root.attributes["lychee.code"] in ("DEADLINE_EXCEEDED", "CANCELLED")
    spans = srv.spans()
    assert {s.name for s in spans} >= {"rerank", "validate", "queue", "prepare", "batch", "inference"}


# --------------------------------------------------------------------------- the real exporter
class _Collector:
    """A minimal OTLP/gRPC trace collector (the proto's own service) on a free loopback port."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.requests: list[Any] = []
        self.received = threading.Event()
        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                collector.requests.append(request)
                collector.received.set()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        out = []
        for request in self.requests:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                out.extend((resource, span) for ss in rs.scope_spans for span in ss.spans)
        return out


async def test_otlp_endpoint_sends_the_spans_to_a_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
    from harness import running_server

    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "rerank-under-test")
    collector = _Collector()
    tracer, _ = caller_tracer()
    try:
        endpoint = f"http://127.0.0.1:{collector.port}"
        async with running_server(engine=FakeEngine(), otlp_endpoint=endpoint) as srv:
            assert srv.server.tracing is not None
            async with AsyncLycheeClient(srv.address) as client:
                with tracer.start_as_current_span("caller") as caller:
                    await client.rerank("q", ["1", "2"])
        # stop() flushed the batch processor: the spans have arrived
        assert collector.received.wait(10)
    finally:
        collector.server.stop(0)
    spans = collector.spans()
    names = sorted(span.name for _, span in spans)
    assert names == sorted(["rerank", "validate", "queue", "prepare", "prepare.query", "batch", "inference"])
    resource, root = next((r, s) for r, s in spans if s.name == "rerank")
    assert resource["service.name"] == "rerank-under-test"
    assert root.trace_id == caller.get_span_context().trace_id.to_bytes(16, "big")


def test_tracing_is_off_by_default_and_on_by_flag_or_otel_variables() -> None:
    settings = Settings()
    assert not tracing.wanted(settings, {})
    assert not tracing.wanted(settings, {"OTEL_SERVICE_NAME": "x"})  # naming it is not asking for it
    assert tracing.wanted(Settings(otlp_endpoint="http://c:4317"), {})
    assert tracing.wanted(settings, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert tracing.wanted(settings, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317/x"})
    assert tracing.wanted(settings, {"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted(settings, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not tracing.wanted(Settings(otlp_endpoint="http://c:4317"), {"OTEL_SDK_DISABLED": "true"})


def test_tracing_asked_for_without_the_sdk_is_one_startup_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from lychee_server.app import StartupError, build_server

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(StartupError, match=r"pip install 'lychee-rerank\[server,tracing\]'"):
        build_server(Settings(model="fake", otlp_endpoint="http://127.0.0.1:4317"), engine=FakeEngine())


def test_off_no_span_and_no_opentelemetry_import() -> None:
    """A fresh interpreter serves a gRPC and an HTTP call with tracing off: it imports nothing of
    OpenTelemetry beyond what FastAPI's own import brings (FastAPI >= 0.163 imports the
    opentelemetry *API* -- context, trace, propagate -- for its native telemetry, which stays off
    without a global provider): no SDK and no exporter, even for a call with a traceparent."""
    code = textwrap.dedent(
        """
        import asyncio, json, sys, urllib.request
        sys.path[:0] = [sys.argv[1] + "/tests", sys.argv[1] + "/server"]
        import fastapi, starlette, uvicorn  # the HTTP door's stack, on its own
        baseline = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        from harness import FakeEngine, make_settings
        from lychee.rerank.client import AsyncLycheeClient
        from lychee_server.app import build_server

        async def main():
            server = build_server(make_settings("fake"), engine=FakeEngine())
            await server.start()
            try:
                async with AsyncLycheeClient(f"127.0.0.1:{server.port}") as client:
                    await client.rerank("q", ["1", "2"])
                body = json.dumps({"query": "q", "documents": ["1"]}).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{server.http_port}/v1/rerank", data=body,
                    headers={"content-type": "application/json",
                             "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
                answer = await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
                assert answer.status == 200
                return server.tracing is None and server.gate._tracing is None
            finally:
                await server.stop(grace=0)

        off = asyncio.run(main())
        extra = sorted(m for m in sys.modules if m.startswith("opentelemetry") and m not in baseline)
        print(json.dumps({"off": off, "baseline": baseline, "extra": extra}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FASTAPI_OTEL"))}
    out = subprocess.run(
        [sys.executable, "-c", code, REPO], capture_output=True, text=True, env=env, timeout=90, check=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["off"] is True
    assert report["extra"] == [], f"the server imported {report['extra']} with tracing off"
    assert not [
        m for m in report["baseline"] if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))
    ]


def test_gate_traces_nothing_when_off() -> None:
    from lychee_server.edge.gate import Gate
    from lychee_server.metrics import Metrics

    gate = Gate(Metrics(), Settings())
    with gate.call(
        "Rerank", "grpc", "id-1", carrier=[("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]
    ) as call:
        assert call.trace is None
        with call.span("validate") as span:
            assert span is None
        call.note(request_bytes=3)


def test_an_unusable_tracing_setup_is_one_line_and_exit_1() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        {"LYCHEE_MODEL": "/nonexistent", "OTEL_TRACES_EXPORTER": "zipkin", "PYTHONPATH": REPO + "/server"}
    )
    out = subprocess.run(
        [sys.executable, "-m", "lychee_server.app"], capture_output=True, text=True, env=env, timeout=90
    )
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("lychee-rerank:")]
    assert lines == [
        "lychee-rerank: OTEL_TRACES_EXPORTER='zipkin' is not supported here: use otlp, console or none"
    ]
