"""The LangChain adapter propagates the caller's OpenTelemetry span through our client: a
compressor call inside a span is part of the caller's trace on the server (sync and async)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from langchain_core.documents import Document
from tracing_support import caller_tracer, traced_server

from harness import FakeEngine
from langchain_lychee import LycheeRerank

pytestmark = pytest.mark.timeout(120)
DOCS = [Document(page_content=text) for text in ("1", "3", "2")]


async def test_compressor_calls_join_the_callers_trace() -> None:
    tracer, _ = caller_tracer()
    async with traced_server(FakeEngine()) as srv:
        reranker = LycheeRerank(target=srv.address, top_n=2)

        def sync_call() -> Any:
            with tracer.start_as_current_span("retrieve-sync") as span:
                ranked = reranker.compress_documents(DOCS, "q")
            assert [d.page_content for d in ranked] == ["3", "2"]
            return span.get_span_context()

        sync_ctx = await asyncio.to_thread(sync_call)
        with tracer.start_as_current_span("retrieve-async") as span:
            ranked = await reranker.acompress_documents(DOCS, "q")
        assert [d.page_content for d in ranked] == ["3", "2"]
        async_ctx = span.get_span_context()
        roots = await srv.roots(2)
    parents = {(r.context.trace_id, r.parent.span_id) for r in roots if r.parent is not None}
    assert parents == {(sync_ctx.trace_id, sync_ctx.span_id), (async_ctx.trace_id, async_ctx.span_id)}
    for ctx in (sync_ctx, async_ctx):
        assert {s.name for s in srv.trace(ctx.trace_id)} >= {
            "rerank",
            "validate",
            "queue",
            "prepare",
            "batch",
        }
