"""The HTTP listener: uvicorn on the process's one asyncio loop, beside grpc.aio.

Why not ``uvicorn.run()``: it would own the loop and the signals. Here

* the socket is bound by :meth:`HttpServer.bind` before the model loads (so ``http_port=0`` works,
  the real port is known at once, and ``/healthz`` answers while loading; a taken port fails loudly);
* :class:`_Server` leaves signal handling to the app (``capture_signals`` is a no-op), so SIGTERM
  drains both doors together instead of uvicorn draining HTTP on its own schedule;
* lifespan and uvicorn's logging config are off (the app logs JSON lines itself);
* TLS/mTLS come from the same ``tls_*`` settings as gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator

import uvicorn
from starlette.types import ASGIApp

from lychee_server.settings import Settings

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the application owns SIGTERM/SIGINT (lychee_server.app)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns TCP_NODELAY on only for sockets whose protocol says
    # TCP, and uvicorn writes a response's headers and body separately, so with Nagle's algorithm
    # on the body waits for the client's delayed ACK (~40 ms per keep-alive response, measured by
    # `lychee-rerank bench-doors`).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """Bind, serve, drain: the HTTP door's listener (``start`` / ``stop`` on the running loop)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self._app = app
        self._settings = settings
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def host(self) -> str:
        return self._settings.http_host or self._settings.host

    @property
    def scheme(self) -> str:
        return "https" if self._settings.tls_cert is not None else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def bind(self) -> int:
        port = self._settings.http_port
        assert port is not None
        self._sock = _bind(self.host, port)
        self.port = int(self._sock.getsockname()[1])
        return self.port

    async def start(self) -> None:
        """Serve on the bound socket (returns once uvicorn is accepting connections)."""
        if self._sock is None:
            self.bind()
        s = self._settings
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=15,
            h11_max_incomplete_event_size=64 * 1024,  # bounds a request line + headers
            ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
            ssl_keyfile=str(s.tls_key) if s.tls_key else None,
            ssl_ca_certs=str(s.tls_client_ca) if s.tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if s.tls_client_ca else ssl.CERT_NONE,
        )
        self._server = _Server(config)
        assert self._sock is not None
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="lychee-http")
        while not self._server.started:
            if self._task.done():  # a start-up failure: surface it
                await self._task
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    def begin_stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish within ``grace`` seconds."""
        if self._server is not None:
            self._server.config.timeout_graceful_shutdown = max(int(grace + 0.999), 1)
            self._server.should_exit = True

    async def stop(self, grace: float) -> None:
        self.begin_stop(grace)
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, grace + 2.0)
            except TimeoutError:
                if self._server is not None:
                    self._server.force_exit = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
