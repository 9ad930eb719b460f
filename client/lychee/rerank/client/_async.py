"""The asyncio client (grpc.aio)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc

from ._base import INFO_TIMEOUT, ClientBase, remaining
from ._errors import LycheeError, error_from_rpc
from ._types import DocumentInput, Limits, Progress, QueryInput, RerankResult, ScoreKind, ServerInfo
from ._wire import decode_result, decode_server_info, with_progress_result_async

_T = TypeVar("_T")


class AsyncLycheeClient(ClientBase):
    """asyncio client for the Lychee rerank service, on ``grpc.aio``.

    Takes the same arguments as :class:`LycheeClient`. A grpc.aio channel belongs to the
    event loop it was created on, so the channel is opened lazily on first use and reopened
    if the client is later used from a different loop (e.g. successive ``asyncio.run``
    calls); constructing the client needs no running loop. Use ``async with`` or
    ``await client.close()`` to release it.
    """

    _channel: grpc.aio.Channel | None = None
    _stub: rerank_pb2_grpc.RerankServiceAsyncStub | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def _connect(self) -> rerank_pb2_grpc.RerankServiceAsyncStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            # A channel of another (possibly closed) loop cannot be closed from here; it is
            # dropped and its loop's shutdown reclaims it.
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(self.target, self._credentials, self._channel_options)
            else:
                channel = grpc.aio.insecure_channel(self.target, self._channel_options)
            self._channel, self._loop = channel, loop
            self._stub = rerank_pb2_grpc.RerankServiceStub(channel)
        return self._stub

    async def rerank(
        self,
        query: QueryInput,
        documents: Sequence[DocumentInput],
        *,
        instruction: str | None = None,
        top_n: int | None = None,
        score_kind: ScoreKind = "probability",
        max_length: int | None = None,
        return_text: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, not a cancel scope
        on_progress: Callable[[Progress], None] | None = None,
    ) -> RerankResult:
        """Rank ``documents`` by relevance to ``query``; see :meth:`LycheeClient.rerank`."""
        call = self._prepare(
            query,
            documents,
            instruction=instruction,
            top_n=top_n,
            score_kind=score_kind,
            max_length=max_length,
            return_text=return_text,
        )
        stub = self._connect()
        deadline = self._deadline(timeout)
        md = self._call_metadata()
        limits = await self._best_effort_limits(stub, deadline, md) if self._wants_limits(call) else None
        n = len(call.documents)
        if self._should_stream(call, limits):
            chunk = self._chunk_bytes(limits)
            response: pb.RerankResponse | pb.RerankStreamResponse = await self._with_retries(
                lambda t: stub.RerankStream(call.stream(chunk), timeout=t, metadata=md),
                deadline,
            )
            return decode_result(response, n, streamed=True)
        request = call.unary_request()
        if on_progress is not None:
            report = on_progress
            wrapped = pb.RerankWithProgressRequest(request=request)
            response = await self._with_retries(
                lambda t: with_progress_result_async(
                    stub.RerankWithProgress(wrapped, timeout=t, metadata=md), report
                ),
                deadline,
            )
            return decode_result(response, n, streamed=False)
        response = await self._with_retries(lambda t: stub.Rerank(request, timeout=t, metadata=md), deadline)
        return decode_result(response, n, streamed=False)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:  # noqa: ASYNC109
        """Fetch the model description and limits (and refresh the client's cached copy)."""
        stub = self._connect()
        deadline = self._deadline(timeout)
        md = self._call_metadata()
        response = await self._with_retries(
            lambda t: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=t, metadata=md),
            deadline,
        )
        self._info = decode_server_info(response)
        return self._info

    async def close(self) -> None:
        """Close the channel (if one was opened); in-flight calls are cancelled."""
        channel, self._channel, self._stub, self._loop = self._channel, None, None, None
        if channel is not None:
            await channel.close(None)

    async def __aenter__(self) -> AsyncLycheeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals --------------------------------------------------------------------------

    async def _best_effort_limits(
        self,
        stub: rerank_pb2_grpc.RerankServiceAsyncStub,
        deadline: float | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> Limits | None:
        """As :meth:`LycheeClient._best_effort_limits`."""
        if self._info is not None:
            return self._info.limits
        left = remaining(deadline)
        try:
            response = await stub.GetServerInfo(
                pb.GetServerInfoRequest(),
                timeout=INFO_TIMEOUT if left is None else min(left, INFO_TIMEOUT),
                metadata=metadata,
            )
        except grpc.RpcError as err:
            self._note_info_failure(error_from_rpc(err, self.target))
            return None
        self._info = decode_server_info(response)
        return self._info.limits

    async def _with_retries(
        self, attempt: Callable[[float | None], Awaitable[_T]], deadline: float | None
    ) -> _T:
        n = 0
        while True:
            n += 1
            try:
                return await attempt(remaining(deadline))
            except grpc.RpcError as rpc_err:
                err: LycheeError = error_from_rpc(rpc_err, self.target)
                delay = self.retry.delay_before_retry(n, err, remaining(deadline), self._rng)
                if delay is None:
                    raise err from rpc_err
            await asyncio.sleep(delay)
