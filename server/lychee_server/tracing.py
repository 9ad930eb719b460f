"""OpenTelemetry tracing, opt-in: ``--otlp-endpoint URL`` or the standard ``OTEL_*`` variables.

All tracing code of the server lives here; the doors, the gate and the scheduler make thin calls
(``call.span("validate")``, ``trace.admitted(...)``, :func:`start_batch`) that are ``None`` checks
when tracing is off. Off (the default), nothing in this module imports ``opentelemetry``: the
imports happen in :func:`from_settings` / :class:`Tracing`, i.e. only once tracing is on.

The spans of one rerank call (one trace, joined to the caller's W3C ``traceparent`` from gRPC
metadata or HTTP headers, whichever door it came through)::

    rerank                  SERVER. lychee.request_id, lychee.method, lychee.transport (grpc/http),
    │                       lychee.documents, lychee.code (gRPC code name on both doors);
    │                       on success lychee.tokens, lychee.images, lychee.truncated_documents
    ├── validate            decode / parse + the rule table + the response-size check (for HTTP
    │                       also reading the body and fetching image URLs); lychee.request_bytes
    ├── queue               admission -> the first device batch that carried one of its pairs
    │                       (= the answer's timings.queue); lychee.queue.pairs_waiting and
    │                       lychee.inflight_pairs at admission
    ├── prepare             admission -> its last pair prepared (CPU threads); lychee.pairs,
    │   │                   lychee.tokens, lychee.images, lychee.cpu_seconds (summed over threads)
    │   └── prepare.query   the shared prefix (instruction + query): every pair waits for it
    └── batch               one per device batch that carried its pairs; lychee.batch.id,
        │                   .pairs, .tokens, .requests, .request_pairs (its own pairs in it)
        └── inference       the forward pass(es) on the device thread; lychee.pairs, .failed_pairs

Why one ``prepare`` span per request and not one per pair: a request may carry 1000 documents, and
1000 spans per call would swamp the exporter's queue (the SDK's batch processor drops spans past
2048 queued) and any trace view; the per-pair distribution is what ``lychee_preprocess_seconds``
already measures. The span carries the counts and the CPU seconds instead; only the query, which
every pair waits for, gets a child of its own.

Fan-in: a device batch mixes the pairs of several requests. Each request's trace gets its own
``batch`` span (so every trace shows all the batches it took part in); the one in the trace of
the batch's first request is the batch's *leader* and carries a span link to the ``rerank`` span
of every other request in it, and every other ``batch`` span links to the leader — OpenTelemetry's
answer for fan-in (a span has one parent, but any number of links).

The server uses a TracerProvider of its own rather than the process-global one: the spans are
exactly the ones above on both doors (FastAPI >= 0.163 adds HTTP and operation spans of its own
whenever a global provider is configured), and several servers (tests) can live in one process.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # never at run time: opentelemetry is imported only once tracing is on
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext

    from lychee_server.settings import Settings

__all__ = ["BatchTrace", "CallTrace", "Tracing", "TracingError", "from_settings", "start_batch", "wanted"]

log = logging.getLogger(__name__)

INSTRUMENTATION = "lychee_server"
DEFAULT_SERVICE_NAME = "lychee-rerank"
RERANK_METHODS = frozenset(
    {
        "Rerank",
        "RerankStream",
        "RerankWithProgress",
        "/v1/rerank",
        "/v2/rerank",
        "/v1/rerank/progress",
        "/rerank",
    }
)
"""Calls whose span is named ``rerank``; any other call (GetServerInfo, /v1/info) is named after
its method."""
# gRPC codes that are the server's fault: span status ERROR (OpenTelemetry's gRPC server rule).
_SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_NULL = nullcontext()


class TracingError(Exception):
    """Tracing was asked for but cannot start (a missing package, an unknown exporter)."""


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def wanted(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is on: ``--otlp-endpoint``, an ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT``, or
    an ``OTEL_TRACES_EXPORTER`` other than ``none``; ``OTEL_SDK_DISABLED=true`` turns it off."""
    env = os.environ if environ is None else environ
    if _flag(env.get("OTEL_SDK_DISABLED")):
        return False
    if settings.otlp_endpoint:
        return True
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(
        exporters or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def from_settings(settings: Settings, version: str = "") -> Tracing | None:
    """The server's tracing, or None when it is off (then no opentelemetry module is imported).

    The exporters come from ``OTEL_TRACES_EXPORTER`` (``otlp``, the default, and/or ``console``);
    OTLP speaks gRPC unless ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` says ``http/protobuf``. Every
    other standard variable is the SDK's own: ``OTEL_SERVICE_NAME`` (default ``lychee-rerank``),
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER(_ARG)``, ``OTEL_BSP_*``,
    ``OTEL_EXPORTER_OTLP_HEADERS`` / ``_CERTIFICATE`` / ``_INSECURE`` / ``_TIMEOUT``,
    ``OTEL_PROPAGATORS`` (default W3C ``tracecontext,baggage``). Raises :class:`TracingError`.
    """
    if not wanted(settings):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingError(
            f"tracing is on (--otlp-endpoint / OTEL_*) but OpenTelemetry is not installed ({exc.name}): "
            "pip install 'lychee-rerank[server,tracing]'"
        ) from exc
    resource = Resource.create({"service.version": version} if version else {})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    for name in dict.fromkeys(n.strip() for n in names.split(",") if n.strip()):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, settings.otlp_endpoint)))
    return Tracing(provider, version=version, owned=True)


def _exporter(name: str, endpoint: str | None) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingError(f"OTEL_TRACES_EXPORTER={name!r} is not supported here: use otlp, console or none")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=endpoint)
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
                endpoint = endpoint.rstrip("/") + "/v1/traces"  # a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT
            return HttpExporter(endpoint=endpoint)
    except ImportError as exc:
        package = "grpc" if protocol == "grpc" else "http"
        raise TracingError(
            f"the OTLP {protocol} exporter is not installed ({exc.name}): "
            f"pip install opentelemetry-exporter-otlp-proto-{package}"
        ) from exc
    raise TracingError(f"OTLP protocol {protocol!r} is not supported here: use grpc or http/protobuf")


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, str) and reason else type(error).__name__


class Tracing:
    """The server's tracer (one per server). ``provider``: an SDK ``TracerProvider``; the server
    shuts it down on stop when it built it (``owned``), a test's provider is left alone."""

    def __init__(self, provider: TracerProvider, *, version: str = "", owned: bool = False) -> None:
        from opentelemetry import context, propagate, trace

        self._provider = provider
        self._owned = owned
        self.tracer = provider.get_tracer(INSTRUMENTATION, version or None)
        self._trace = trace
        self._context = context
        self._propagator = propagate.get_global_textmap()  # OTEL_PROPAGATORS; default W3C + baggage
        self._fields = frozenset(f.lower() for f in self._propagator.fields)
        self._batch_ids = itertools.count(1)

    def start_call(
        self, method: str, transport: str, request_id: str, carrier: Iterable[tuple[Any, Any]] = ()
    ) -> CallTrace | None:
        """The ``rerank`` span of one call, child of the caller's ``traceparent`` (if any) in
        ``carrier``: gRPC metadata pairs or ASGI header pairs (bytes). Never raises."""
        try:
            headers: dict[str, str] = {}
            for key, value in carrier:
                name = key.decode("latin-1") if isinstance(key, bytes) else str(key)
                name = name.lower()
                if name in self._fields:
                    headers[name] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            # Never the ambient context: a call's parent is what the caller sent, or nothing.
            parent = self._propagator.extract(headers, context=self._context.Context())
            span = self.tracer.start_span(
                "rerank" if method in RERANK_METHODS else method,
                context=parent,
                kind=self._trace.SpanKind.SERVER,
                attributes={
                    "lychee.request_id": request_id,
                    "lychee.method": method,
                    "lychee.transport": transport,
                },
            )
            return CallTrace(self, span)
        except Exception:  # tracing must never fail a call
            log.debug("starting a call span failed", exc_info=True)
            return None

    def shutdown(self) -> None:
        """Flush the spans still queued and stop the exporters (only a provider built here)."""
        if self._owned:
            self._provider.shutdown()


class CallTrace:
    """The spans of one call. Event-loop thread only; every method is safe to call in any order
    (a span that was never started is not ended, one that has ended is not ended again)."""

    __slots__ = ("_prepare", "_query", "_queue", "_tracing", "ctx", "root")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.root = span
        self.ctx: Context = tracing._trace.set_span_in_context(span)
        self._queue: Span | None = None
        self._prepare: Span | None = None
        self._query: Span | None = None

    @property
    def trace_id(self) -> str:
        return format(self.root.get_span_context().trace_id, "032x")

    def _child(
        self,
        name: str,
        parent: Context | None = None,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Any] = (),
        start_time: int | None = None,
    ) -> Span:
        return self._tracing.tracer.start_span(
            name,
            context=self.ctx if parent is None else parent,
            attributes=attributes,
            links=links,
            start_time=start_time,
        )

    def _fail(self, span: Span, error: BaseException) -> None:
        reason = _reason(error)
        span.set_attribute("lychee.reason", reason)
        span.set_status(self._tracing._trace.Status(self._tracing._trace.StatusCode.ERROR, reason))

    # ------------------------------------------------------------------ the doors and the gate
    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A child of the call's span around a block (``validate``); an exception marks it."""
        span = self._child(name, attributes={f"lychee.{k}": v for k, v in attributes.items()})
        try:
            yield span
        except BaseException as exc:
            self._fail(span, exc)
            raise
        finally:
            span.end()

    def set(self, **attributes: Any) -> None:
        """Attributes on the call's span (``documents=8`` -> ``lychee.documents``)."""
        for key, value in attributes.items():
            self.root.set_attribute(f"lychee.{key}", value)

    def end(self, code: str) -> None:
        """End the call's span with its gRPC code name (both doors speak that vocabulary)."""
        self.root.set_attribute("lychee.code", code)
        if code in _SERVER_FAULTS:
            self.root.set_status(self._tracing._trace.Status(self._tracing._trace.StatusCode.ERROR, code))
        self.root.end()

    # ------------------------------------------------------------------ the scheduler
    def admitted(self, pairs_waiting: int, inflight_pairs: int) -> None:
        """The job was admitted: its queue wait and its preparation (query first) begin."""
        self._queue = self._child(
            "queue",
            attributes={"lychee.queue.pairs_waiting": pairs_waiting, "lychee.inflight_pairs": inflight_pairs},
        )
        self._prepare = self._child("prepare")
        self._query = self._child(
            "prepare.query", parent=self._tracing._trace.set_span_in_context(self._prepare)
        )

    def query_prepared(self, cpu_seconds: float, error: BaseException | None = None) -> None:
        span, self._query = self._query, None
        if span is None:
            return
        span.set_attribute("lychee.cpu_seconds", cpu_seconds)
        if error is not None:
            self._fail(span, error)
        span.end()

    def prepared(self, pairs: int, tokens: int, images: int, cpu_seconds: float) -> None:
        """Every pair is prepared (or the request ended first: then the counts so far)."""
        span, self._prepare = self._prepare, None
        if span is None:
            return
        span.set_attribute("lychee.pairs", pairs)
        span.set_attribute("lychee.tokens", tokens)
        span.set_attribute("lychee.images", images)
        span.set_attribute("lychee.cpu_seconds", cpu_seconds)
        span.end()

    def dispatched(self) -> None:
        """The first device batch carrying one of its pairs left: the queue wait is over."""
        span, self._queue = self._queue, None
        if span is not None:
            span.end()

    def finished(self, error: BaseException | None, pairs: int, tokens: int, images: int, cpu: float) -> None:
        """The scheduler is done with the job: close what is still open (marked with ``error``)."""
        for span in (self._query, self._prepare, self._queue):
            if span is not None and error is not None:
                self._fail(span, error)
        query, self._query = self._query, None
        if query is not None:
            query.end()
        self.prepared(pairs, tokens, images, cpu)
        self.dispatched()


class BatchTrace:
    """The ``batch`` spans of one device batch (one per traced request in it)."""

    __slots__ = ("_spans", "_tracing")

    def __init__(self, tracing: Tracing, spans: list[tuple[CallTrace, Span]]) -> None:
        self._tracing = tracing
        self._spans = spans

    def end(self, inference: tuple[int, int] | None, pairs: int, failed_pairs: int) -> None:
        """``inference``: the device thread's (start, end) in ``time.time_ns()``, or None when the
        batch never ran (the device executor failed, or the server stopped)."""
        trace = self._tracing._trace
        for call, span in self._spans:
            if inference is not None:
                child = call._child(
                    "inference",
                    parent=trace.set_span_in_context(span),
                    attributes={"lychee.pairs": pairs, "lychee.failed_pairs": failed_pairs},
                    start_time=inference[0],
                )
                if failed_pairs:
                    child.set_status(trace.Status(trace.StatusCode.ERROR, f"{failed_pairs} pairs failed"))
                child.end(end_time=inference[1])
            else:
                span.set_status(trace.Status(trace.StatusCode.ERROR, "the batch did not run"))
            span.end()


def start_batch(
    calls: Sequence[tuple[CallTrace | None, int]], *, pairs: int, tokens: int
) -> BatchTrace | None:
    """The spans of a device batch about to run: ``calls`` = each request's trace (None when not
    traced) and its pairs in the batch, in batch order. None when no request in it is traced."""
    traced = [(c, n) for c, n in calls if c is not None]
    if not traced:
        return None
    tracing = traced[0][0]._tracing
    trace = tracing._trace
    batch_id = next(tracing._batch_ids)
    now = time.time_ns()
    common = {
        "lychee.batch.id": batch_id,
        "lychee.batch.pairs": pairs,
        "lychee.batch.tokens": tokens,
        "lychee.batch.requests": len(calls),
    }
    leader_call, leader_pairs = traced[0]
    leader = leader_call._child(
        "batch",
        attributes={**common, "lychee.batch.request_pairs": leader_pairs, "lychee.batch.leader": True},
        links=[
            trace.Link(c.root.get_span_context(), {"lychee.link": "batch.request"}) for c, _ in traced[1:]
        ],
        start_time=now,
    )
    spans = [(leader_call, leader)]
    leader_context: SpanContext = leader.get_span_context()
    for call, n in traced[1:]:
        span = call._child(
            "batch",
            attributes={**common, "lychee.batch.request_pairs": n, "lychee.batch.leader": False},
            links=[trace.Link(leader_context, {"lychee.link": "batch.leader"})],
            start_time=now,
        )
        spans.append((call, span))
    return BatchTrace(tracing, spans)
