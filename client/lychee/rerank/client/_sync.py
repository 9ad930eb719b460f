"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc

from ._base import INFO_TIMEOUT, ClientBase, remaining
from ._errors import LycheeError, error_from_rpc
from ._types import DocumentInput, Limits, Progress, QueryInput, RerankResult, ScoreKind, ServerInfo
from ._wire import decode_result, decode_server_info, with_progress_result

_T = TypeVar("_T")


class LycheeClient(ClientBase):
    """Blocking client for the Lychee rerank service.

    Thread-safe: one instance (one HTTP/2 channel) is meant to be shared by all threads.

    Args:
        target: ``host:port``, or any gRPC target such as ``dns:///rerank.internal:50051`` or
            ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (several replicas; pair with
            ``load_balancing="round_robin"`` to spread calls over them).
        api_key: sent as ``authorization: Bearer <key>`` on every call.
        tls: force TLS on/off; by default TLS is on exactly when a certificate is given.
        root_certificates: PEM bytes or file path of the CA to trust (default: system roots).
        client_certificate, client_key: PEM bytes or paths for mutual TLS.
        server_name_override: TLS server name to verify instead of the target's host (tests).
        timeout: default deadline of a call in seconds, retries included (``None``: none).
        retry: the :class:`RetryPolicy` (default: 4 attempts, exponential backoff).
        load_balancing: gRPC load-balancing policy for multi-address targets.
        stream_threshold_bytes: payloads above this go over ``RerankStream``; default
            (``None``) is 75% of the server's ``max_message_bytes``, or 3 MiB if unknown.
            ``0`` streams every request.
        max_chunk_bytes: stream chunk size (capped at 256 KiB and the server's limit).
        max_receive_message_bytes: largest response accepted.
        metadata: extra ``(key, value)`` pairs sent on every call.
        channel_options: raw gRPC channel arguments, applied last.
    """

    def _post_init(self) -> None:
        if self._credentials is not None:
            self._channel = grpc.secure_channel(self.target, self._credentials, self._channel_options)
        else:
            self._channel = grpc.insecure_channel(self.target, self._channel_options)
        self._stub = rerank_pb2_grpc.RerankServiceStub(self._channel)

    def rerank(
        self,
        query: QueryInput,
        documents: Sequence[DocumentInput],
        *,
        instruction: str | None = None,
        top_n: int | None = None,
        score_kind: ScoreKind = "probability",
        max_length: int | None = None,
        return_text: bool = False,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> RerankResult:
        """Rank ``documents`` by relevance to ``query``.

        Args:
            query: text (``str``), an image (``bytes``, ``Path``, PIL image, ``EncodedImage``)
                or a :class:`Query` with both.
            documents: each a ``str``, an image, or a :class:`Doc` (text and/or image, id).
            instruction: the task instruction (server default: web-search passage retrieval).
            top_n: return only the best ``top_n`` (default: all).
            score_kind: ``"probability"`` (p("yes") in [0, 1]) or ``"logit"``.
            max_length: token limit of one (query, document) prompt; text is truncated.
            return_text: echo each document's text in the results.
            timeout: deadline in seconds for this call, retries included (default: the client's).
            on_progress: called with a :class:`Progress` as the server prepares and scores the
                pairs (the ``RerankWithProgress`` RPC; payloads too large for one message go
                over the stream RPC instead, which reports no progress). Called on the calling
                thread; keep it quick.

        Raises:
            InvalidRequestError: the server rejected the input (see ``field_violations``).
            LycheeError: any other failure, by class (see the exception tree).
            ValueError, TypeError: an input could not be encoded (nothing was sent).
        """
        call = self._prepare(
            query,
            documents,
            instruction=instruction,
            top_n=top_n,
            score_kind=score_kind,
            max_length=max_length,
            return_text=return_text,
        )
        deadline = self._deadline(timeout)
        md = self._call_metadata()
        limits = self._best_effort_limits(deadline, md) if self._wants_limits(call) else None
        n = len(call.documents)
        if self._should_stream(call, limits):
            chunk = self._chunk_bytes(limits)
            response: pb.RerankResponse | pb.RerankStreamResponse = self._with_retries(
                lambda t: self._stub.RerankStream(call.stream(chunk), timeout=t, metadata=md),
                deadline,
            )
            return decode_result(response, n, streamed=True)
        request = call.unary_request()
        if on_progress is not None:
            report = on_progress
            wrapped = pb.RerankWithProgressRequest(request=request)
            response = self._with_retries(
                lambda t: with_progress_result(
                    self._stub.RerankWithProgress(wrapped, timeout=t, metadata=md), report
                ),
                deadline,
            )
            return decode_result(response, n, streamed=False)
        response = self._with_retries(lambda t: self._stub.Rerank(request, timeout=t, metadata=md), deadline)
        return decode_result(response, n, streamed=False)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """Fetch the model description and limits (and refresh the client's cached copy)."""
        deadline = self._deadline(timeout)
        md = self._call_metadata()
        response = self._with_retries(
            lambda t: self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=t, metadata=md),
            deadline,
        )
        self._info = decode_server_info(response)
        return self._info

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._channel.close()

    def __enter__(self) -> LycheeClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _best_effort_limits(
        self, deadline: float | None, metadata: tuple[tuple[str, str], ...]
    ) -> Limits | None:
        """Cached limits, fetched once; failures fall back to defaults instead of failing the
        call (the rerank attempt that follows reports the real problem, with retries)."""
        if self._info is not None:
            return self._info.limits
        left = remaining(deadline)
        try:
            response = self._stub.GetServerInfo(
                pb.GetServerInfoRequest(),
                timeout=INFO_TIMEOUT if left is None else min(left, INFO_TIMEOUT),
                metadata=metadata,
            )
        except grpc.RpcError as err:
            self._note_info_failure(error_from_rpc(err, self.target))
            return None
        self._info = decode_server_info(response)
        return self._info.limits

    def _with_retries(self, attempt: Callable[[float | None], _T], deadline: float | None) -> _T:
        n = 0
        while True:
            n += 1
            try:
                return attempt(remaining(deadline))
            except grpc.RpcError as rpc_err:
                err: LycheeError = error_from_rpc(rpc_err, self.target)
                delay = self.retry.delay_before_retry(n, err, remaining(deadline), self._rng)
                if delay is None:
                    raise err from rpc_err
            time.sleep(delay)
