"""Connection-level failures a first-time user meets: nothing listening, a bad token value, a
wrong token (against a real server); each must be a clear, single-status error."""

from __future__ import annotations

import socket

import pytest
from server_support import tiny_server

from lychee.rerank.client import (
    NO_RETRY,
    AsyncLycheeClient,
    AuthenticationError,
    LycheeClient,
    RetryPolicy,
    UnavailableError,
)


def _closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_nothing_listening_is_unavailable_naming_the_target() -> None:
    target = f"127.0.0.1:{_closed_port()}"
    quick = RetryPolicy(max_attempts=2, initial_backoff=0.01)
    with LycheeClient(target, retry=quick, timeout=10) as client:
        with pytest.raises(UnavailableError) as info:
            client.rerank("q", ["d"])
        with pytest.raises(UnavailableError, match="unreachable"):
            client.server_info()
    message = str(info.value)
    assert f"server at {target!r} is unreachable" in message
    assert message.startswith("[UNAVAILABLE] ") and message.count("UNAVAILABLE") == 1
    assert "\n" not in message


async def test_async_nothing_listening() -> None:
    target = f"127.0.0.1:{_closed_port()}"
    async with AsyncLycheeClient(target, retry=NO_RETRY, timeout=10) as client:
        with pytest.raises(UnavailableError, match=rf"server at '{target}' is unreachable"):
            await client.rerank("q", ["d"])


@pytest.mark.parametrize("key", ["tök3n", "token\u00a0", "“token”", "tok\nen", "tab\there"])
def test_non_ascii_api_key_is_a_value_error_at_construction(key: str) -> None:
    with pytest.raises(ValueError, match="api_key must be ASCII") as info:
        LycheeClient("localhost:50051", api_key=key)
    assert key not in str(info.value)  # the secret is not echoed
    with pytest.raises(ValueError, match="api_key must be ASCII"):
        AsyncLycheeClient("localhost:50051", api_key=key)


def test_non_ascii_metadata_value_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="metadata value of 'x-team' must be printable ASCII"):
        LycheeClient("localhost:50051", metadata=[("X-Team", "équipe")])
    LycheeClient("localhost:50051", api_key="plain-ascii-token_01", metadata=[("x-team", "a b")]).close()


async def test_wrong_token_message_has_one_status(request: pytest.FixtureRequest) -> None:
    async with tiny_server(request, api_keys=("right-token",)) as srv:
        async with AsyncLycheeClient(srv.address, api_key="wrong-token", retry=NO_RETRY) as client:
            with pytest.raises(AuthenticationError) as info:
                await client.rerank("q", ["d"])
        async with AsyncLycheeClient(srv.address, api_key="right-token") as client:
            assert len((await client.rerank("q", ["d"])).results) == 1
    text = str(info.value)
    assert text.count("UNAUTHENTICATED") == 1, text
    assert text.startswith("[UNAUTHENTICATED] ")
