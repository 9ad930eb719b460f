"""Deployment-shaped scenarios against real servers: a server still loading, auth, server
limits driving the transport, round robin over replicas, mutual TLS."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from server_support import SERVER_OVERRIDES, noise_image, require_server_stack, tiny_server

from lychee.rerank.client import (
    AsyncLycheeClient,
    AuthenticationError,
    Doc,
    LycheeClient,
    RetryPolicy,
    UnavailableError,
)

pytest.importorskip("PIL")
KiB, MiB = 1024, 1024 * 1024


async def test_retries_while_the_model_loads(request: pytest.FixtureRequest, counting_policy: Any) -> None:
    """UNAVAILABLE/NOT_READY during loading is retried until the server turns SERVING."""
    harness, _ = require_server_stack(request)
    from lychee_server.app import build_server

    engine = request.getfixturevalue("tiny_engine")
    loaded = threading.Event()

    class SlowWarmup(harness.GatedEngine):  # type: ignore[misc, name-defined]
        def warmup(self) -> None:  # holds start() in "loading" until the test says so
            loaded.wait(30)

    server = build_server(harness.make_settings("tiny", warmup=True), engine=SlowWarmup(engine))
    starting = asyncio.create_task(server.start())
    try:
        await harness.eventually(lambda: server.port is not None, what="port bound")
        policy = counting_policy(max_attempts=100, initial_backoff=0.02, max_backoff=0.05)
        async with AsyncLycheeClient(f"127.0.0.1:{server.port}", retry=policy, timeout=30) as client:
            call = asyncio.create_task(client.rerank("q", ["a", "b"]))
            await harness.eventually(lambda: len(policy.calls) >= 2, what="retries while loading")
            assert not call.done()
            loaded.set()
            result = await call
        assert len(result.results) == 2
        assert all(delay is not None for _, delay in policy.calls)
    finally:
        loaded.set()
        await starting
        await server.stop(grace=0)


@pytest.fixture(scope="module")
async def strict_server(request: pytest.FixtureRequest) -> Any:
    async with tiny_server(
        request, api_keys=("s3cret",), max_message_bytes=1 * MiB, max_chunk_bytes=16 * KiB
    ) as srv:
        yield srv


async def test_api_key(strict_server: Any) -> None:
    async with AsyncLycheeClient(strict_server.address, retry=RetryPolicy(max_attempts=3)) as anonymous:
        with pytest.raises(AuthenticationError) as info:
            await anonymous.rerank("q", ["d"])
    assert info.value.reason == "UNAUTHENTICATED"
    async with AsyncLycheeClient(strict_server.address, api_key="wrong") as wrong:
        with pytest.raises(AuthenticationError):
            await wrong.rerank("q", ["d"])
    async with AsyncLycheeClient(strict_server.address, api_key="s3cret") as good:
        assert len((await good.rerank("q", ["d"])).results) == 1
    result = await asyncio.to_thread(
        lambda: LycheeClient(strict_server.address, api_key="s3cret").rerank("q", ["d"])
    )
    assert len(result.results) == 1


async def test_transport_follows_server_limits(strict_server: Any) -> None:
    """1 MiB max message: a ~0.9 MiB image goes streaming on its own, in <= 16 KiB chunks
    (the server rejects bigger ones, so success proves the client adapted)."""
    big = noise_image(560, 560, seed=5)
    assert 0.75 * MiB < len(big) < 1 * MiB
    async with AsyncLycheeClient(strict_server.address, api_key="s3cret") as client:
        small = await client.rerank("q", ["d", Doc(text="t", image=noise_image(20, 20))])
        assert not small.streamed
        assert client.cached_server_info is None  # small payloads never pay for GetServerInfo
        large = await client.rerank("q", ["d", Doc(text="chart", image=big)])
        assert large.streamed and len(large.results) == 2
        assert client.cached_server_info is not None
        assert client.cached_server_info.limits.max_chunk_bytes == 16 * KiB


# -- mutual TLS --------------------------------------------------------------------------------


async def test_mutual_tls(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    harness, checkpoint = require_server_stack(request)
    pytest.importorskip("cryptography.x509")
    pki = harness.make_tls_files(tmp_path)
    overrides = dict(
        SERVER_OVERRIDES, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert
    )
    async with harness.running_server(checkpoint, **overrides) as srv:
        async with AsyncLycheeClient(
            srv.address,
            root_certificates=pki.ca_cert,
            client_certificate=pki.client_cert,
            client_key=pki.client_key,
        ) as client:
            assert len((await client.rerank("q", ["d"])).results) == 1
        pem = pki.ca_cert.read_bytes()
        result = await asyncio.to_thread(
            lambda: LycheeClient(
                srv.address,
                root_certificates=pem,
                client_certificate=pki.client_cert.read_bytes(),
                client_key=pki.client_key.read_bytes(),
            ).rerank("q", ["d"])
        )
        assert len(result.results) == 1
        # No client certificate: the handshake fails, which gRPC reports as UNAVAILABLE.
        async with AsyncLycheeClient(
            srv.address, root_certificates=pki.ca_cert, retry=RetryPolicy(max_attempts=2), timeout=5
        ) as no_cert:
            with pytest.raises(UnavailableError):
                await no_cert.rerank("q", ["d"])
        async with AsyncLycheeClient(srv.address, retry=RetryPolicy(max_attempts=1), timeout=5) as plaintext:
            with pytest.raises(UnavailableError):
                await plaintext.rerank("q", ["d"])


def test_constructor_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LycheeClient("127.0.0.1:1", client_certificate=b"x")  # key missing
    with pytest.raises(ValueError):
        LycheeClient("127.0.0.1:1", root_certificates=tmp_path / "missing.pem")
    with pytest.raises(ValueError):
        LycheeClient("127.0.0.1:1", root_certificates=b"x", tls=False)
    with pytest.raises(ValueError):
        LycheeClient("127.0.0.1:1", api_key="")
    with pytest.raises(ValueError):
        LycheeClient("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError):
        LycheeClient("127.0.0.1:1", max_chunk_bytes=300 * KiB)
    with pytest.raises(ValueError):
        LycheeClient("127.0.0.1:1", load_balancing="random")  # type: ignore[arg-type]
    c = LycheeClient("ipv4:127.0.0.1:1,127.0.0.1:2", load_balancing="round_robin", api_key="k")
    assert ("authorization", "Bearer k") in c._metadata
    assert any(k == "grpc.service_config" and '"round_robin"' in str(v) for k, v in c._channel_options)
    assert "plaintext" in repr(c) and "k" not in repr(c).replace("LycheeClient", "")
    c.close()
