"""Helpers for the tracing tests (a uniquely named module): a real in-process server whose tracer
writes to the OpenTelemetry SDK's in-memory exporter, a caller-side tracer, and span look-ups."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from harness import eventually, make_settings


@dataclass
class TracedServer:
    server: Any  # lychee_server.app.LycheeServer
    exporter: InMemorySpanExporter

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def trace(self, trace_id: int) -> list[ReadableSpan]:
        """The server's finished spans of one trace."""
        return [s for s in self.spans() if s.context is not None and s.context.trace_id == trace_id]

    async def roots(self, count: int = 1) -> list[ReadableSpan]:
        """The ``rerank`` spans once ``count`` have ended (a call's span ends as its answer leaves)."""
        await eventually(lambda: len(named(self.spans(), "rerank")) >= count, what="the rerank spans")
        return named(self.spans(), "rerank")


@contextlib.asynccontextmanager
async def traced_server(engine: Any, **overrides: Any) -> AsyncIterator[TracedServer]:
    """A real server (gRPC + HTTP doors) on ``engine`` with tracing on, spans kept in memory."""
    from lychee_server.app import build_server
    from lychee_server.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = build_server(make_settings("fake", **overrides), engine=engine, tracing=Tracing(provider))
    try:
        await server.start()
        yield TracedServer(server, exporter)
    finally:
        await server.stop(grace=0)
        provider.shutdown()


def caller_tracer() -> tuple[Tracer, InMemorySpanExporter]:
    """The calling application's tracer (a provider of its own, like a real caller process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("caller"), exporter


def named(spans: Iterable[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Iterable[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, f"expected one {name!r} span, got {[s.name for s in spans]}"
    return found[0]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id
