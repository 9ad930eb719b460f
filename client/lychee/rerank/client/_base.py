"""Configuration and request planning shared by the sync and async clients.

The two clients differ only in how they wait (threads vs the event loop); everything that
decides *what* goes on the wire lives here once, so both behave identically.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata as _pkg_metadata
from typing import Literal, TypeAlias

import grpc

from lychee.rerank.v1 import rerank_pb2 as pb

from ._errors import LycheeError
from ._inputs import Item, coerce_document, coerce_query, warn_image_like_text
from ._retry import RetryPolicy
from ._types import Limits, ScoreKind, ServerInfo
from ._wire import (
    ALWAYS_UNARY_BYTES,
    PROTOCOL_MAX_CHUNK_BYTES,
    build_options,
    build_request,
    effective_chunk_bytes,
    payload_size,
    stream_messages,
    stream_threshold,
)

LoadBalancing: TypeAlias = Literal["pick_first", "round_robin"]
PemSource: TypeAlias = "bytes | str | os.PathLike[str]"
"""PEM data as ``bytes``, or a path (``str`` / ``Path``) to a PEM file."""

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
INFO_TIMEOUT = 5.0
"""Cap on the best-effort GetServerInfo lookup made while planning a large request."""


def _user_agent() -> str:
    try:
        version = _pkg_metadata.version("lychee-rerank")
    except _pkg_metadata.PackageNotFoundError:
        version = "0"
    return f"lychee-rerank-python/{version}"


def _read_pem(source: PemSource | None, what: str) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise ValueError(f"cannot read {what} from {os.fspath(source)!r}: {err}") from err


def _non_ascii_at(value: str) -> int | None:
    """Index of the first character gRPC refuses in an ASCII metadata value, or ``None``."""
    return next((i for i, c in enumerate(value) if not " " <= c <= "~"), None)


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's current OpenTelemetry span as W3C ``traceparent`` / ``tracestate`` metadata
    (through the global propagator, so ``OTEL_PROPAGATORS`` / ``set_global_textmap`` apply).

    Empty unless OpenTelemetry is in use: a span can only be current once ``opentelemetry.context``
    has been imported, so a process that never imported it pays one dict lookup and imports
    nothing (the base install stays grpcio + protobuf).
    """
    if "opentelemetry.context" not in sys.modules:
        return ()
    try:
        from opentelemetry import propagate

        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    except Exception:  # an optional nicety: never fail a call over it
        return ()
    return tuple(
        (key.lower(), value)
        for key, value in carrier.items()
        if isinstance(value, str) and _non_ascii_at(value) is None
    )


def remaining(deadline: float | None) -> float | None:
    """Seconds left until a ``time.monotonic()`` deadline (never negative)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@dataclass(frozen=True, slots=True)
class PreparedCall:
    """A request resolved to bytes, with the transport already chosen."""

    query: Item
    documents: tuple[Item, ...]
    instruction: str | None
    options: pb.RerankOptions
    payload: int

    def unary_request(self) -> pb.RerankRequest:
        return build_request(self.query, self.documents, self.instruction, self.options)

    def stream(self, chunk_bytes: int) -> Iterator[pb.RerankStreamRequest]:
        # A fresh generator per attempt: a retried stream restarts from the header, and
        # chunks are sliced only as gRPC pulls them (no second copy of the payload).
        return stream_messages(self.query, self.documents, self.instruction, self.options, chunk_bytes)


class ClientBase:
    """Holds the connection settings and the cached server limits."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        root_certificates: PemSource | None = None,
        client_certificate: PemSource | None = None,
        client_key: PemSource | None = None,
        server_name_override: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        load_balancing: LoadBalancing | None = None,
        stream_threshold_bytes: int | None = None,
        max_chunk_bytes: int = PROTOCOL_MAX_CHUNK_BYTES,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        if not target:
            raise ValueError("target must be 'host:port' or a gRPC target URI")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 seconds or None (no deadline)")
        if stream_threshold_bytes is not None and stream_threshold_bytes < 0:
            raise ValueError("stream_threshold_bytes must be >= 0 or None (automatic)")
        if not 1 <= max_chunk_bytes <= PROTOCOL_MAX_CHUNK_BYTES:
            raise ValueError(f"max_chunk_bytes must be in 1..{PROTOCOL_MAX_CHUNK_BYTES}")
        if load_balancing not in (None, "pick_first", "round_robin"):
            raise ValueError("load_balancing must be 'pick_first', 'round_robin' or None")
        if (client_certificate is None) != (client_key is None):
            raise ValueError("client_certificate and client_key go together (mTLS)")
        self.target = target
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self.stream_threshold_bytes = stream_threshold_bytes
        self.max_chunk_bytes = max_chunk_bytes

        use_tls = (
            tls
            if tls is not None
            else any(s is not None for s in (root_certificates, client_certificate, client_key))
        )
        if not use_tls and any(s is not None for s in (root_certificates, client_certificate, client_key)):
            raise ValueError("certificates were given but tls=False")
        self._credentials: grpc.ChannelCredentials | None = None
        if use_tls:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_certificates, "root_certificates"),
                private_key=_read_pem(client_key, "client_key"),
                certificate_chain=_read_pem(client_certificate, "client_certificate"),
            )

        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", max_receive_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.primary_user_agent", _user_agent()),
        ]
        if load_balancing is not None:
            options.append(
                ("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]}))
            )
        if server_name_override is not None:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        options.extend(channel_options)
        self._channel_options = tuple(options)

        call_metadata = [(k.lower(), v) for k, v in metadata]
        for key, value in call_metadata:
            if (
                not key.endswith("-bin")
                and isinstance(value, str)
                and (at := _non_ascii_at(value)) is not None
            ):
                raise ValueError(
                    f"metadata value of {key!r} must be printable ASCII (character {at} is not); "
                    "send binary or non-ASCII values under a key ending in '-bin'"
                )
        if api_key is not None:
            if not isinstance(api_key, str) or not api_key:
                raise ValueError("api_key must be a non-empty string")
            if (at := _non_ascii_at(api_key)) is not None:
                # gRPC only says "Invalid metadata" at call time; the character itself is not
                # echoed (it is part of a secret).
                raise ValueError(
                    f"api_key must be ASCII: printable characters only, no line breaks (character {at} "
                    "is not; a copy-pasted key may hold a typographic quote or a non-breaking space)"
                )
            call_metadata.append(("authorization", f"Bearer {api_key}"))
        self._metadata: tuple[tuple[str, str], ...] = tuple(call_metadata)

        self._info: ServerInfo | None = None
        self._info_unsupported = False
        self._rng = random.Random()
        self._post_init()

    def _post_init(self) -> None:
        """Hook for the transport-specific setup (the sync client opens its channel here)."""

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of one call: the client's, plus the caller's trace context (computed on the
        caller's thread / task, where its current span is; keys the caller set win)."""
        traced = trace_metadata()
        if not traced:
            return self._metadata
        own = {key for key, _ in self._metadata}
        return self._metadata + tuple((k, v) for k, v in traced if k not in own)

    @property
    def cached_server_info(self) -> ServerInfo | None:
        """The server info fetched earlier (by :meth:`server_info` or a large request), if any."""
        return self._info

    def __repr__(self) -> str:
        tls = "tls" if self._credentials is not None else "plaintext"
        return f"{type(self).__name__}({self.target!r}, {tls})"

    # -- planning ---------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        effective = timeout if timeout is not None else self.timeout
        if effective is not None and effective < 0:
            raise ValueError("timeout must be >= 0 seconds")
        return None if effective is None else time.monotonic() + effective

    def _prepare(
        self,
        query: object,
        documents: Sequence[object],
        *,
        instruction: str | None,
        top_n: int | None,
        score_kind: ScoreKind,
        max_length: int | None,
        return_text: bool,
    ) -> PreparedCall:
        if isinstance(documents, str | bytes) or not isinstance(documents, Sequence):
            raise TypeError("documents must be a sequence (list or tuple) of documents")
        warn_image_like_text(query, documents)
        q = coerce_query(query)
        docs = tuple(coerce_document(d, i) for i, d in enumerate(documents))
        options = build_options(
            top_n=top_n, score_kind=score_kind, max_length=max_length, return_text=return_text
        )
        return PreparedCall(q, docs, instruction, options, payload_size(q, docs, instruction))

    def _wants_limits(self, call: PreparedCall) -> bool:
        """Whether the transport decision (or the chunk size) depends on the server's limits."""
        floor = self.stream_threshold_bytes if self.stream_threshold_bytes is not None else ALWAYS_UNARY_BYTES
        return call.payload > floor and not self._info_unsupported

    def _should_stream(self, call: PreparedCall, limits: Limits | None) -> bool:
        if self.stream_threshold_bytes is not None:
            return call.payload > self.stream_threshold_bytes
        if call.payload <= ALWAYS_UNARY_BYTES:
            return False
        return call.payload > stream_threshold(limits)

    def _chunk_bytes(self, limits: Limits | None) -> int:
        return effective_chunk_bytes(self.max_chunk_bytes, limits)

    def _note_info_failure(self, err: LycheeError) -> None:
        # An old or stripped-down server may not implement GetServerInfo: stop asking.
        if err.code is grpc.StatusCode.UNIMPLEMENTED:
            self._info_unsupported = True
