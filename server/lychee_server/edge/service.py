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

``Rerank`` and ``RerankStream`` are registered (:func:`add_to_server`) with pass-through
deserializers: a request whose bytes do not parse (invalid UTF-8 in a string field, say)
becomes INVALID_ARGUMENT naming the field, instead of gRPC's generic deserialization failure.
The stream is consumed one message at a time and fed to the assembler, which raises on the first
violation: nothing is buffered before it is known to be allowed, and HTTP/2 flow control pushes
back on a sender faster than the validation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc
from lychee_server import errors
from lychee_server.domain import RerankJob, RerankResult
from lychee_server.edge import codec
from lychee_server.edge.gate import REQUEST_ID_KEY, Call, Gate, ServingState, request_id_from
from lychee_server.edge.status import status_for_exception
from lychee_server.edge.stream import StreamAssembler, discard_rest
from lychee_server.settings import Settings

__all__ = ["REQUEST_ID_KEY", "SERVICE_NAME", "RerankService", "ServingState", "add_to_server"]

SERVICE_NAME = "lychee.rerank.v1.RerankService"
TRANSPORT = "grpc"

_R = TypeVar("_R")
Context = grpc.aio.ServicerContext[Any, Any]


def _request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return request_id_from(value)
    return request_id_from(None)


def _decode_stream_message(data: bytes | pb.RerankStreamRequest, index: int) -> pb.RerankStreamRequest:
    if isinstance(data, pb.RerankStreamRequest):
        return data
    try:
        return pb.RerankStreamRequest.FromString(data)
    except DecodeError as exc:
        raise errors.InvalidInput(
            f"stream message {index} is not a valid RerankStreamRequest (bad encoding or invalid UTF-8)",
            reason="INVALID_ARGUMENT",
            violations=[errors.FieldViolation("request", "is not a valid RerankStreamRequest encoding")],
        ) from exc


# How much of a rejected stream is still read (and thrown away) before the error is sent.
_DISCARD_MAX_BYTES = 8 * 1024 * 1024
_DISCARD_MAX_SECONDS = 2.0
# How long a stream that ended incomplete waits to learn whether its caller cancelled.
_CANCEL_SETTLE_SECONDS = 0.2


class RerankService(pb_grpc.RerankServiceServicer):
    """Servicer for Rerank / RerankStream / GetServerInfo; see the module docstring."""

    def __init__(self, settings: Settings, gate: Gate, version: str = "") -> None:
        self._settings = settings
        self._gate = gate
        self._version = version

    # ------------------------------------------------------------------ RPCs
    async def Rerank(self, request: pb.RerankRequest | bytes, context: Context) -> pb.RerankResponse:
        return await self._serve("Rerank", context, lambda call: self._rerank(request, context, call))

    async def RerankStream(
        self, request_iterator: AsyncIterator[pb.RerankStreamRequest | bytes], context: Context
    ) -> pb.RerankStreamResponse:
        return await self._serve(
            "RerankStream", context, lambda call: self._rerank_stream(request_iterator, context, call)
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Context
    ) -> pb.GetServerInfoResponse:
        return await self._serve("GetServerInfo", context, lambda call: self._server_info())

    # ------------------------------------------------------------------ bodies
    async def _rerank(
        self, request: pb.RerankRequest | bytes, context: Context, call: Call
    ) -> pb.RerankResponse:
        t0 = time.monotonic()
        self._gate.require_serving()
        if not isinstance(request, pb.RerankRequest):
            request = codec.decode_request(request, request_id=call.request_id)
        job = codec.job_from_pb(request, self._settings, request_id=call.request_id)
        result = await self._score(job, context, call)
        return codec.result_to_pb(
            replace(result, timings=replace(result.timings, total=time.monotonic() - t0))
        )

    async def _rerank_stream(
        self, request_iterator: AsyncIterator[pb.RerankStreamRequest | bytes], context: Context, call: Call
    ) -> pb.RerankStreamResponse:
        t0 = time.monotonic()
        finished = asyncio.Event()
        context.add_done_callback(lambda _ctx: finished.set())  # type: ignore[arg-type]
        ended = False
        try:
            self._gate.require_serving()
            assembler = StreamAssembler(self._settings, call.request_id)
            index = 0
            async for raw in request_iterator:
                assembler.feed(_decode_stream_message(raw, index))
                index += 1
            ended = True
            job = assembler.finish()
        except errors.LycheeError as err:
            if ended and not context.cancelled():
                # A caller that cancels mid-upload also ends the request stream; the RPC's end
                # (the cancellation) may be seen a moment later. Only a stream that ended
                # incomplete pays this bounded wait; a cancel is then reported as one.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), _CANCEL_SETTLE_SECONDS)
            if context.cancelled():
                # The caller went away mid-upload: the stream "ended early" because of that,
                # not because of bad input — report (and count) it as a cancellation.
                raise errors.Cancelled("the caller cancelled the call during the upload") from err
            await discard_rest(
                request_iterator, max_bytes=_DISCARD_MAX_BYTES, max_seconds=_DISCARD_MAX_SECONDS
            )
            raise
        result = await self._score(job, context, call)
        return codec.result_to_stream_pb(
            replace(result, timings=replace(result.timings, total=time.monotonic() - t0))
        )

    async def _score(self, job: RerankJob, context: Context, call: Call) -> RerankResult:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        return await self._gate.score(job, call, deadline)

    async def _server_info(self) -> pb.GetServerInfoResponse:
        return codec.server_info_to_pb(self._gate.info, self._settings, self._version)

    # ------------------------------------------------------------------ the one wrapper
    async def _serve(self, method: str, context: Context, body: Callable[[Call], Awaitable[_R]]) -> _R:
        with self._gate.call(method, TRANSPORT, _request_id(context), context.peer()) as call:
            id_metadata = ((REQUEST_ID_KEY, call.request_id),)
            try:
                await context.send_initial_metadata(id_metadata)
                result = await body(call)
                context.set_trailing_metadata(id_metadata)
                return result
            except asyncio.CancelledError:
                call.code = grpc.StatusCode.CANCELLED.name  # the caller went away (or its deadline passed)
                raise
            except Exception as exc:
                status = status_for_exception(exc, request_id=call.request_id)
                call.code = status.code.name
                await context.abort(
                    status.code, status.details, tuple(status.trailing_metadata) + id_metadata
                )
                raise AssertionError("context.abort returned") from exc  # pragma: no cover


def _passthrough(data: bytes) -> bytes:
    return data


def add_to_server(service: RerankService, server: grpc.aio.Server) -> None:
    """Register ``service``; Rerank and RerankStream get raw bytes and decode them themselves."""
    handlers = {
        "Rerank": grpc.unary_unary_rpc_method_handler(
            service.Rerank,
            request_deserializer=_passthrough,
            response_serializer=pb.RerankResponse.SerializeToString,
        ),
        "RerankStream": grpc.stream_unary_rpc_method_handler(
            service.RerankStream,
            request_deserializer=_passthrough,
            response_serializer=pb.RerankStreamResponse.SerializeToString,
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            service.GetServerInfo,
            request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.GetServerInfoResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
