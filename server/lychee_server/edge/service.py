"""The ``lychee.rerank.v1.RerankService`` servicer (grpc.aio).

Every method runs inside :meth:`RerankService._serve`, the one wrapper that

* assigns the request id (the caller's ``x-request-id`` metadata, else a fresh uuid4) and sends
  it back as initial and trailing metadata ``x-request-id``;
* refuses work while the model loads (UNAVAILABLE / NOT_READY) or the server drains
  (UNAVAILABLE / SHUTTING_DOWN);
* turns *every* exception into a status through :func:`lychee_server.edge.status.status_for_exception`
  — the single error table, so no method can map errors its own way (and unknown exceptions are
  INTERNAL without leaking their text);
* records the per-method request counter / latency histogram and writes one structured log line
  per call (request id, method, code, duration, pairs);
* counts active calls so a drain can wait for them.

Every method is registered (:func:`add_to_server`) with a pass-through deserializer: a request
whose bytes do not parse (invalid UTF-8 in a string field, say) becomes INVALID_ARGUMENT naming
the field (INVALID_UTF8) or ``request``, instead of gRPC's UNKNOWN with the parser's text.
The stream is consumed one message at a time and fed to the assembler, which raises on the first
violation: nothing is buffered before it is known to be allowed, and HTTP/2 flow control pushes
back on a sender faster than the validation.

Liveness (nothing a caller sends may freeze the event loop or starve other callers):

* a unary request larger than ``_INLINE_PARSE_BYTES`` is decoded, validated and size-checked on a
  worker thread (one parse thread), so a message with millions of tiny documents costs the
  loop nothing but the hand-off; the bad-field locator stops after ``max_documents`` items;
* a stream that sends no message for ``stream_idle_timeout_s`` is ended with DEADLINE_EXCEEDED,
  and all streams together may hold at most ``max_buffered_bytes`` of payload (a stream whose next
  item would pass it gets RESOURCE_EXHAUSTED / OVERLOADED + RetryInfo before its bytes arrive);
* at most ``max_concurrent_calls`` calls run at once (both doors, counted by the gate); one more
  gets RESOURCE_EXHAUSTED / OVERLOADED + RetryInfo at once, logged and counted like any call;
* a response that would exceed ``max_message_bytes`` (``return_text`` with large texts) is
  refused before any scoring: INVALID_ARGUMENT / RESPONSE_TOO_LARGE on ``options.return_text``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
import grpc.aio

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc
from lychee_server import errors
from lychee_server.domain import Progress, RerankJob, RerankResult
from lychee_server.edge import codec
from lychee_server.edge.auth import bearer_token, tenant_of
from lychee_server.edge.gate import REQUEST_ID_KEY, BufferHold, Call, Gate, ServingState, request_id_from
from lychee_server.edge.progress import ProgressMailbox, follow
from lychee_server.edge.status import status_for_exception
from lychee_server.edge.stream import StreamAssembler, discard_rest
from lychee_server.edge.validation import Collector
from lychee_server.settings import Settings

__all__ = ["REQUEST_ID_KEY", "SERVICE_NAME", "RerankService", "ServingState", "add_to_server"]

SERVICE_NAME = "lychee.rerank.v1.RerankService"
TRANSPORT = "grpc"

_R = TypeVar("_R")
_Response = TypeVar("_Response", pb.RerankResponse, pb.RerankStreamResponse)
Context = grpc.aio.ServicerContext[Any, Any]


def _request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return request_id_from(value)
    return request_id_from(None)


# How much of a rejected stream is still read (and thrown away) before the error is sent.
_DISCARD_MAX_BYTES = 8 * 1024 * 1024
_DISCARD_MAX_SECONDS = 2.0
# How long a stream that ended incomplete waits to learn whether its caller cancelled.
_CANCEL_SETTLE_SECONDS = 0.2
# Messages up to this size are parsed on the event loop (a few hundred microseconds at most);
# larger ones on a worker thread. Measured: a 13 MiB message of 2 million one-letter documents
# takes ~0.12 s to parse and, with one bad UTF-8 string, took 4.4 s to locate it before the
# locator was bounded - neither may run on the loop. The parser (upb) holds the GIL for a whole
# message, so large messages are parsed by ONE thread: with several, the loop could wait for one
# GIL-holding parse after another; with one it waits for at most one (~0.2 s for 16 MiB).
_INLINE_PARSE_BYTES = 64 * 1024
_PARSER = cf.ThreadPoolExecutor(1, thread_name_prefix="lychee-parse")


async def _off_loop(fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    """Run ``fn`` on the parse thread (see ``_INLINE_PARSE_BYTES``)."""
    return await asyncio.get_running_loop().run_in_executor(_PARSER, functools.partial(fn, *args, **kwargs))


def _size(message: bytes | Any) -> int:
    return len(message) if isinstance(message, bytes) else int(message.ByteSize())


class RerankService(pb_grpc.RerankServiceServicer):
    """Servicer for Rerank / RerankStream / GetServerInfo; see the module docstring."""

    def __init__(self, settings: Settings, gate: Gate, version: str = "") -> None:
        self._settings = settings
        self._gate = gate
        self._version = version

    # ------------------------------------------------------------------ RPCs
    async def Rerank(  # type: ignore[override]  # registered request-streaming (see add_to_server)
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> pb.RerankResponse:
        return await self._serve(
            "Rerank", context, lambda call: self._rerank(request_iterator, context, call)
        )

    async def RerankStream(
        self, request_iterator: AsyncIterator[pb.RerankStreamRequest | bytes], context: Context
    ) -> pb.RerankStreamResponse:
        return await self._serve(
            "RerankStream", context, lambda call: self._rerank_stream(request_iterator, context, call)
        )

    async def RerankWithProgress(  # type: ignore[override]  # request-streaming; writes via context.write
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> None:
        await self._serve(
            "RerankWithProgress",
            context,
            lambda call: self._rerank_with_progress(request_iterator, context, call),
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest | bytes, context: Context
    ) -> pb.GetServerInfoResponse:
        return await self._serve("GetServerInfo", context, lambda call: self._server_info(request, call))

    # ------------------------------------------------------------------ bodies
    async def _rerank(
        self, request_iterator: AsyncIterator[bytes], context: Context, call: Call
    ) -> pb.RerankResponse:
        t0 = time.monotonic()
        self._gate.require_serving()
        request = await _only_message(request_iterator, call)
        call.note(request_bytes=len(request))
        with call.span("validate"):
            if len(request) > _INLINE_PARSE_BYTES:
                job = await _off_loop(self._parse, request, call.request_id)
            else:
                job = self._parse(request, call.request_id)
        result = await self._score(job, context, call)
        return self._checked(
            codec.result_to_pb(replace(result, timings=replace(result.timings, total=time.monotonic() - t0)))
        )

    async def _rerank_with_progress(
        self, request_iterator: AsyncIterator[bytes], context: Context, call: Call
    ) -> None:
        t0 = time.monotonic()
        self._gate.require_serving()
        request = await _only_message(request_iterator, call)
        call.note(request_bytes=len(request))
        with call.span("validate"):
            inner = codec.inner_request(request, request_id=call.request_id)
            if _size(inner) > _INLINE_PARSE_BYTES:
                job = await _off_loop(self._parse, inner, call.request_id)
            else:
                job = self._parse(inner, call.request_id)
        mailbox = ProgressMailbox()
        scoring = asyncio.ensure_future(self._score(job, context, call, on_progress=mailbox.put))
        try:
            async for progress in follow(mailbox, scoring):
                await context.write(codec.progress_to_pb(progress))
            result = await scoring
        finally:
            scoring.cancel()  # a no-op once done; else the caller went away: drop the work
        response = self._checked(
            codec.result_to_pb(replace(result, timings=replace(result.timings, total=time.monotonic() - t0)))
        )
        await context.write(pb.RerankWithProgressResponse(result=response))

    def _parse(self, request: pb.RerankRequest | bytes, request_id: str) -> RerankJob:
        """Wire bytes -> a valid job whose response fits the message limit (any thread)."""
        if not isinstance(request, pb.RerankRequest):
            # Too many documents (millions of tiny ones, say) are refused from the field tags,
            # before any parse or bad-field search (each would hold the GIL for tens of ms).
            limit = self._settings.max_documents
            count = codec.document_count(request, stop_after=limit)  # O(min(documents, limit))
            if count is not None and count > limit:
                c = Collector(self._settings, request_id)
                c.add("documents", "TOO_MANY_DOCUMENTS", f"more than {limit} documents; the limit is {limit}")
                c.raise_if_any()
            request = codec.decode_request(
                request, request_id=request_id, max_items=self._settings.max_documents
            )
        job = codec.job_from_pb(request, self._settings, request_id=request_id)
        codec.check_response_size(job, self._settings.max_message_bytes, request_id=request_id)
        return job

    async def _rerank_stream(
        self, request_iterator: AsyncIterator[pb.RerankStreamRequest | bytes], context: Context, call: Call
    ) -> pb.RerankStreamResponse:
        t0 = time.monotonic()
        finished = asyncio.Event()
        context.add_done_callback(lambda _ctx: finished.set())  # type: ignore[arg-type]
        ended = False
        hold = self._gate.hold()
        validating = call.span("validate", streamed=True)
        validating.__enter__()  # ended once the upload is checked (or by its error), not around scoring
        validated = False
        try:
            try:
                self._gate.require_serving()
                assembler = StreamAssembler(self._settings, call.request_id)
                await self._receive(request_iterator, assembler, hold, call)
                ended = True
                job = assembler.finish()
            except errors.DeadlineExceeded:
                raise  # the stream went idle: there is nothing left to read
            except errors.LycheeError as err:
                if ended and not context.cancelled():
                    # A caller that cancels mid-upload also ends the request stream; the RPC's end
                    # (the cancellation) may be seen a moment later. Only a stream that ended
                    # incomplete pays this bounded wait; a cancel is then reported as one.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(finished.wait(), _CANCEL_SETTLE_SECONDS)
                if context.cancelled():
                    # The caller went away mid-upload: the stream "ended early" because of that,
                    # not because of bad input - report (and count) it as a cancellation.
                    raise errors.Cancelled("the caller cancelled the call during the upload") from err
                await discard_rest(
                    request_iterator, max_bytes=_DISCARD_MAX_BYTES, max_seconds=_DISCARD_MAX_SECONDS
                )
                raise
            limit = self._settings.max_message_bytes
            if job.options.return_text:  # texts may total hundreds of MiB: measured off the loop
                await _off_loop(codec.check_response_size, job, limit, request_id=call.request_id)
            else:
                codec.check_response_size(job, limit, request_id=call.request_id)
            validated = True
            validating.__exit__(None, None, None)
            result = await self._score(job, context, call)
            return self._checked(
                codec.result_to_stream_pb(
                    replace(result, timings=replace(result.timings, total=time.monotonic() - t0))
                )
            )
        except BaseException as exc:
            if not validated:
                validated = True
                validating.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            hold.release()  # the job (and its buffered bytes) is no longer needed

    async def _receive(
        self,
        request_iterator: AsyncIterator[pb.RerankStreamRequest | bytes],
        assembler: StreamAssembler,
        hold: BufferHold,
        call: Call,
    ) -> None:
        """Feed every message to ``assembler``; bounded in idle time and in server-wide bytes."""
        request_id = call.request_id
        idle = self._settings.stream_idle_timeout_s
        loop = asyncio.get_running_loop()
        index = 0
        try:
            async with asyncio.timeout(idle) as timer:
                async for raw in request_iterator:
                    call.received_bytes += _size(raw)
                    if _size(raw) > _INLINE_PARSE_BYTES:
                        msg = await _off_loop(codec.decode_stream_request, raw, index, request_id)
                    else:
                        msg = codec.decode_stream_request(raw, index, request_id)
                    assembler.feed(msg)
                    # Declared item sizes count at their ItemStart: refused before the bytes arrive.
                    hold.resize(assembler.committed_bytes)
                    index += 1
                    timer.reschedule(loop.time() + idle)
        except TimeoutError as exc:
            raise errors.DeadlineExceeded(
                f"no stream message arrived for {idle:g} s (stream_idle_timeout_s) after message "
                f"{index}; the upload was ended",
                metadata={"stream_idle_timeout_s": f"{idle:g}"},
            ) from exc

    async def _score(
        self,
        job: RerankJob,
        context: Context,
        call: Call,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> RerankResult:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        return await self._gate.score(job, call, deadline, on_progress)

    def _checked(self, response: _Response) -> _Response:
        """Backstop of the size check before scoring: a response over the limit is never sent
        (gRPC would fail it with a bare RESOURCE_EXHAUSTED after the call was counted OK)."""
        codec.require_response_fits(response.ByteSize(), self._settings.max_message_bytes)
        return response

    async def _server_info(
        self, request: pb.GetServerInfoRequest | bytes, call: Call
    ) -> pb.GetServerInfoResponse:
        if not isinstance(request, pb.GetServerInfoRequest):
            codec.decode_message(request, pb.GetServerInfoRequest, request_id=call.request_id)
        return codec.server_info_to_pb(self._gate.info, self._settings, self._version)

    # ------------------------------------------------------------------ the one wrapper
    async def _serve(self, method: str, context: Context, body: Callable[[Call], Awaitable[_R]]) -> _R:
        metadata = context.invocation_metadata()
        tenant = tenant_of(bearer_token(metadata)) if self._gate.authenticated else ""
        with self._gate.call(
            method, TRANSPORT, _request_id(context), context.peer(), tenant, metadata or ()
        ) as call:
            id_metadata = ((REQUEST_ID_KEY, call.request_id),)
            try:
                await context.send_initial_metadata(id_metadata)
                self._gate.admit(call)  # before the body is read (see add_to_server)
                result = await body(call)
                context.set_trailing_metadata(id_metadata)
                return result
            except asyncio.CancelledError:
                call.code = grpc.StatusCode.CANCELLED.name  # the caller went away (or its deadline passed)
                raise
            except Exception as exc:
                status = status_for_exception(exc, request_id=call.request_id)
                call.code = status.code.name
                await self._gate.pause_refusal(exc, call)
                await context.abort(
                    status.code, status.details, tuple(status.trailing_metadata) + id_metadata
                )
                raise AssertionError("context.abort returned") from exc  # pragma: no cover


def _passthrough(data: bytes) -> bytes:
    return data


async def _only_message(request_iterator: AsyncIterator[bytes], call: Call) -> bytes:
    """The one request message of a method that is unary in the contract (registered
    request-streaming, see :func:`add_to_server`); what comes after it is not read."""
    async for message in request_iterator:
        call.received_bytes = len(message)
        return message
    raise errors.InvalidInput("the call ended without a request message", reason="FIELD_REQUIRED")


def add_to_server(service: RerankService, server: grpc.aio.Server) -> None:
    """Register ``service``; every method gets raw bytes and decodes them itself (so bytes that do
    not parse are INVALID_ARGUMENT with ErrorInfo, never grpc's UNKNOWN with the parser's text).

    ``Rerank`` and ``RerankWithProgress`` are unary in the contract but registered
    request-streaming here: for a unary handler grpc receives and copies the whole message (up to
    ``max_message_bytes``, with the GIL held on the event loop) before any of our code runs; a
    streaming handler runs when the headers arrive, so :meth:`Gate.admit` can refuse a caller
    over its budget of refused bytes (RATE_LIMITED) with the body still unread in HTTP/2 flow
    control. On the wire the two are the same: a unary client sends one message and half-closes.
    """
    handlers = {
        "Rerank": grpc.stream_unary_rpc_method_handler(
            service.Rerank,
            request_deserializer=_passthrough,
            response_serializer=pb.RerankResponse.SerializeToString,
        ),
        "RerankStream": grpc.stream_unary_rpc_method_handler(
            service.RerankStream,
            request_deserializer=_passthrough,
            response_serializer=pb.RerankStreamResponse.SerializeToString,
        ),
        "RerankWithProgress": grpc.stream_stream_rpc_method_handler(
            service.RerankWithProgress,
            request_deserializer=_passthrough,
            response_serializer=pb.RerankWithProgressResponse.SerializeToString,
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            service.GetServerInfo,
            request_deserializer=_passthrough,
            response_serializer=pb.GetServerInfoResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
