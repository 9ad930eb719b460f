"""Server assembly and lifecycle: gRPC server, health, reflection, TLS, auth, metrics, drain.

Lifecycle of :class:`LycheeServer`:

1. ``start()`` binds the port first (``.port`` is the real one, so ``port=0`` works), starts the
   ``/metrics`` endpoint, and reports health NOT_SERVING while the engine loads (in a thread, so
   probes are answered meanwhile) and warms up; RerankService answers UNAVAILABLE / NOT_READY
   during that time. Then the scheduler starts and health turns SERVING.
2. ``stop(grace)`` drains: health NOT_SERVING at once (load balancers stop routing), new calls
   get UNAVAILABLE / SHUTTING_DOWN, calls in flight get up to ``grace`` seconds to finish; then
   the gRPC server stops (cancelling stragglers), the scheduler fails whatever is left, and the
   metrics endpoint closes.

``run_server(settings)`` is the blocking entry point (``lychee-rerank serve`` and
``python -m lychee_server.app``, the latter configured by ``LYCHEE_*`` variables only): SIGTERM or
SIGINT drains with ``settings.grace_period_s`` and the process exits 0. Once SERVING it prints one
JSON line ``{"event": "serving", "port": N, "metrics_port": M}`` on stdout, so a supervisor (or a
test) that asked for port 0 learns the real ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from lychee_server.edge.auth import BearerAuthInterceptor, KeySet
from lychee_server.edge.gate import Gate
from lychee_server.edge.http import HttpDoor, HttpServer
from lychee_server.edge.reflection import enable_reflection
from lychee_server.edge.service import SERVICE_NAME, RerankService, add_to_server
from lychee_server.engine.interface import Engine
from lychee_server.errors import LycheeError
from lychee_server.logs import configure_logging, log_fields
from lychee_server.metrics import Metrics, MetricsHttpServer
from lychee_server.scheduler import Scheduler
from lychee_server.sdnotify import notify
from lychee_server.settings import Settings
from lychee_server.tracing import Tracing, TracingError
from lychee_server.tracing import from_settings as tracing_from_settings

__all__ = ["HEALTH_SERVICES", "LycheeServer", "StartupError", "build_server", "run_server", "server_version"]

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)
"""Health is reported for the whole server ("") and for the rerank service by name."""


def _host_port(host: str, port: int | None) -> str:
    """``host:port``, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StartupError(Exception):
    """A start-up failure the operator can act on (a port taken, a TLS file unreadable): one line
    on stderr and exit status 1, no traceback (see ``_serve``)."""


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another process listens there)"
    return exc.strerror or str(exc)


def _why_unbindable(host: str, port: int) -> str:
    """Why grpc could not bind (it reports no errno): a plain bind of the same address tells."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        return _os_reason(exc)
    return "the address could not be bound"


def _tls_credentials(s: Settings) -> grpc.ServerCredentials:
    """gRPC server credentials from the ``tls_*`` files, checked first with :mod:`ssl` so an
    unreadable file or a cert/key pair that does not match is one clear start-up error."""
    assert s.tls_cert is not None and s.tls_key is not None
    data: dict[str, bytes] = {}
    for flag, path in (
        ("--tls-cert", s.tls_cert),
        ("--tls-key", s.tls_key),
        ("--tls-client-ca", s.tls_client_ca),
    ):
        if path is None:
            continue
        try:
            data[flag] = path.read_bytes()
        except OSError as exc:
            raise StartupError(f"cannot read the TLS file {flag} {path}: {_os_reason(exc)}") from exc
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(s.tls_cert, s.tls_key)
    except (ssl.SSLError, ValueError) as exc:
        raise StartupError(
            f"--tls-cert {s.tls_cert} / --tls-key {s.tls_key}: not a PEM certificate and its matching "
            f"private key ({getattr(exc, 'reason', None) or exc})"
        ) from exc
    client_ca = data.get("--tls-client-ca")
    if client_ca is not None:
        try:
            ssl.create_default_context(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise StartupError(
                f"--tls-client-ca {s.tls_client_ca}: no PEM CA certificate in it ({exc})"
            ) from exc
    return grpc.ssl_server_credentials(
        [(data["--tls-key"], data["--tls-cert"])],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


_STREAM_WINDOW_BYTES = 1 << 20  # per-stream HTTP/2 receive window (see the server options)


def _connection_age_options(s: Settings) -> list[tuple[str, int]]:
    """``max_connection_age``: the server ends each connection (GOAWAY) after this long, so clients
    that balance with round_robin over DNS re-resolve and reach replicas added since they
    connected; calls in flight get the grace period to finish (unset grace = no limit)."""
    if s.max_connection_age_s is None:
        return []
    options = [("grpc.max_connection_age_ms", max(1, round(s.max_connection_age_s * 1000)))]
    if s.max_connection_age_grace_s is not None:
        options.append(("grpc.max_connection_age_grace_ms", round(s.max_connection_age_grace_s * 1000)))
    return options


def server_version() -> str:
    try:
        return importlib_metadata.version("lychee-rerank")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def _device_memory_source(engine: Engine) -> Callable[[], float] | None:
    """How to read device memory for the gauge, decided outside the scheduler.

    An engine may expose ``device_memory_bytes()``; otherwise, on a CUDA device, torch's
    allocator counter is read (torch is imported lazily, only then). CPU: no gauge source.
    """
    reader = getattr(engine, "device_memory_bytes", None)
    if callable(reader):
        return reader  # type: ignore[no-any-return]
    device = engine.info.device
    if not device.startswith("cuda"):
        return None

    def cuda_allocated() -> float:
        import torch

        return float(torch.cuda.memory_allocated(device))

    return cuda_allocated


class LycheeServer:
    """One gRPC server with its scheduler, health, reflection and metrics (see the module doc)."""

    def __init__(
        self, settings: Settings, engine: Engine | None = None, *, tracing: Tracing | None = None
    ) -> None:
        self.settings = settings
        self.engine: Engine | None = engine
        self._owns_engine = engine is None  # loaded by start(), so closed by stop()
        try:
            keys = settings.all_api_keys()
        except OSError as exc:
            raise StartupError(
                f"cannot read --api-keys-file {settings.api_keys_file}: {_os_reason(exc)}"
            ) from exc
        self.metrics = Metrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.scheduler: Scheduler | None = None
        try:  # None when tracing is off (--otlp-endpoint / OTEL_*); then opentelemetry is not imported
            self.tracing = (
                tracing if tracing is not None else tracing_from_settings(settings, server_version())
            )
        except TracingError as exc:
            raise StartupError(str(exc)) from exc
        self.gate = Gate(self.metrics, settings, self.tracing)
        self.service = RerankService(settings, self.gate, server_version())
        self.health = HealthServicer()
        self._metrics_http: MetricsHttpServer | None = None
        self._stopped = False
        key_set = KeySet(keys) if keys else None
        interceptors = [BearerAuthInterceptor(key_set, self.metrics)] if key_set is not None else []
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # What one stream may have in flight before the application reads it: a fixed
                # window. With grpc's default bandwidth-delay probe the window grows on fast
                # links, and token-less callers could make the server hold several MiB each
                # before auth rejects them (+190 MiB for 32 x 15 MiB calls on a CI machine);
                # fixed at 1 MiB: +7-8 MiB, with no loss on loopback for a 15 MiB call.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", _STREAM_WINDOW_BYTES),
                ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not be shared
                # Calls grpc core holds before the application takes them: past the soft limit it
                # drops calls at random with a bare CANCELLED (from 1,000 by default), before
                # our admission (max_concurrent_calls -> RESOURCE_EXHAUSTED + RetryInfo) sees them.
                ("grpc.server.max_pending_requests", 16384),
                ("grpc.server.max_pending_requests_hard_limit", 32768),
                *_connection_age_options(settings),
            ],
        )
        add_to_server(self.service, self.server)
        self.http: HttpServer | None = None
        self._fetcher: Any = None
        if settings.http_port is not None:
            if settings.image_url_fetch:
                from lychee_server.edge.http.fetch import ImageFetcher

                self._fetcher = ImageFetcher(settings)
            door = HttpDoor(
                settings,
                self.gate,
                self.metrics,
                version=server_version(),
                keys=key_set,
                fetcher=self._fetcher,
            )
            self.http = HttpServer(door.asgi, settings)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(  # grpc.reflection.v1 and v1alpha
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self.server
        )

    @property
    def address(self) -> str:
        return _host_port(self.settings.host, self.port)

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http is not None and self.http.port is not None else None

    @property
    def metrics_url(self) -> str | None:
        return self._metrics_http.url if self._metrics_http is not None else None

    def _bind(self) -> int:
        s = self.settings
        address = _host_port(s.host, s.port)
        credentials = _tls_credentials(s) if s.tls_cert is not None and s.tls_key is not None else None
        try:
            if credentials is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc: "Failed to bind to address ..."
            port = 0
        if port == 0:
            raise StartupError(
                f"cannot listen for gRPC on {address}: {_why_unbindable(s.host, s.port)} (--port)"
            )
        return port

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)

    async def start(self) -> None:
        """Bind, report NOT_SERVING, load and warm the engine, then SERVING (returns when serving)."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._bind()
        if self.http is not None:
            try:  # before the model loads: /healthz answers meanwhile, a taken port fails now
                self.http.bind()
            except OSError as exc:
                where = _host_port(self.http.host, self.settings.http_port)
                raise StartupError(
                    f"cannot listen for HTTP on {where}: {_os_reason(exc)} (--http-port)"
                ) from exc
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        if self.settings.metrics_port is not None:
            try:
                self._metrics_http = MetricsHttpServer(
                    self.metrics, self.settings.metrics_host, self.settings.metrics_port
                )
            except OSError as exc:
                where = _host_port(self.settings.metrics_host, self.settings.metrics_port)
                raise StartupError(
                    f"cannot listen for metrics on {where}: {_os_reason(exc)} (--metrics-port)"
                ) from exc
            self.metrics_port = self._metrics_http.port
        log.info(
            "listening; loading the model",
            extra=log_fields(
                event="listening", port=self.port, http_port=self.http_port, metrics_port=self.metrics_port
            ),
        )
        t0 = time.monotonic()
        engine = self.engine
        if engine is None:
            from lychee_server.engine import load_engine

            loaded: Any = await _in_daemon_thread(load_engine, self.settings)
            engine = self.engine = cast(Engine, loaded)
        if self.settings.warmup:
            await _in_daemon_thread(engine.warmup)
        source = _device_memory_source(engine)
        if source is not None:
            self.metrics.set_device_memory_source(source)
        self.scheduler = Scheduler(engine, self.settings, self.metrics)
        await self.scheduler.start()
        if self._stopped:  # stop() won the race against a slow load
            await self.scheduler.stop()
            return
        self.gate.attach(self.scheduler, engine.info)
        if self._owns_engine:
            # The model, tokenizer and libraries are ~0.5 million long-lived objects that every full
            # collection would walk (~0.2 s with the GIL held, stalling the event loop); move them
            # to the permanent generation so the collector only looks at per-request garbage.
            gc.collect()
            gc.freeze()
            self.metrics.gc_frozen_objects.set(gc.get_freeze_count())
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra=log_fields(
                event="serving",
                port=self.port,
                http_port=self.http_port,
                metrics_port=self.metrics_port,
                model=engine.info.model_id,
                device=engine.info.device,
                startup_s=round(time.monotonic() - t0, 3),
            ),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain for up to ``grace`` seconds (default ``settings.grace_period_s``), then stop."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_period_s if grace is None else max(grace, 0.0)
        deadline = time.monotonic() + grace
        self.gate.begin_drain()
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra=log_fields(event="draining", active_calls=self.gate.active_calls))
        finished = await self.gate.wait_calls_done(grace)
        # A short grace lets the last responses flush; calls still running past the grace period
        # (and health Watch streams) are cancelled here. Both doors close together.
        flush = min(max(deadline - time.monotonic(), 0.0), 1.0) if finished else 0
        closing = [self.server.stop(flush)]
        if self.http is not None:
            closing.append(self.http.stop(flush))
        await asyncio.gather(*closing)
        if self._fetcher is not None:
            await self._fetcher.aclose()
        if self.scheduler is not None:
            await self.scheduler.stop()
        close = getattr(self.engine, "close", None) if self._owns_engine else None
        if callable(close):  # the engine's image-decode thread pool
            await asyncio.to_thread(close)
        http, self._metrics_http = self._metrics_http, None
        if http is not None:
            # close() waits for the HTTP thread's poll loop (up to 0.5 s): not on the event loop.
            await asyncio.to_thread(http.close)
        if self.tracing is not None:  # send the last spans; a collector that is down cannot hold the exit
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_in_daemon_thread(self.tracing.shutdown), 5.0)
        log.info("stopped", extra=log_fields(event="stopped", clean=finished))

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


_T = TypeVar("_T")


async def _in_daemon_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run a long start-up step (model load, warm-up) on a daemon thread.

    ``asyncio.to_thread`` threads are joined at interpreter exit, so a SIGTERM during a
    minutes-long load would wait for the load to finish (and an orchestrator would SIGKILL).
    A daemon thread lets the process exit at once; the abandoned step's result is dropped.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():  # the awaiting task was cancelled (stop during start-up)
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn(*args))
        except BaseException as exc:
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=f"lychee-{getattr(fn, '__name__', 'start')}", daemon=True).start()
    return await fut


def build_server(
    settings: Settings, engine: Engine | None = None, *, tracing: Tracing | None = None
) -> LycheeServer:
    """A configured, not yet started server (``engine=None``: ``load_engine(settings)`` on start;
    ``tracing=None``: from the settings and ``OTEL_*``, usually off)."""
    return LycheeServer(settings, engine, tracing=tracing)


async def _serve(settings: Settings) -> int:
    try:
        server = build_server(settings)
    except StartupError as err:
        print(f"lychee-rerank: {err}", file=sys.stderr, flush=True)
        return 1
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop_requested.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # signalled while loading: stop without serving
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await server.stop(0)
        return 0
    stopping.cancel()
    if (exc := starting.exception()) is not None:
        if isinstance(exc, LycheeError | StartupError):  # expected, actionable (weights missing, port taken)
            message = exc.message if isinstance(exc, LycheeError) else str(exc)
            log.error("startup failed: %s", message, extra=log_fields(event="startup_failed"))
            log.debug("startup failure details", exc_info=exc)
            print(f"lychee-rerank: {message}", file=sys.stderr, flush=True)
        else:
            log.error("startup failed", exc_info=exc, extra=log_fields(event="startup_failed"))
        await server.stop(0)
        return 1
    print(
        json.dumps(
            {
                "event": "serving",
                "port": server.port,
                "http_port": server.http_port,
                "metrics_port": server.metrics_port,
            }
        ),
        flush=True,
    )
    notify("READY=1")  # systemd Type=notify (no-op without NOTIFY_SOCKET)
    await stop_requested.wait()
    notify("STOPPING=1")
    await server.stop(settings.grace_period_s)
    return 0


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, drain within ``settings.grace_period_s``, return the exit code."""
    configure_logging(json_logs=settings.log_json, level=settings.log_level)
    return asyncio.run(_serve(settings))


def main() -> int:
    """``python -m lychee_server.app``: Settings from ``LYCHEE_*`` environment variables only."""
    return run_server(Settings())


if __name__ == "__main__":
    sys.exit(main())
