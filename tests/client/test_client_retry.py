"""Retry policy decisions (pure) and retries against a port with nothing listening (real sockets)."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import grpc
import pytest

from lychee.rerank.client import (
    NO_RETRY,
    AsyncLycheeClient,
    LycheeClient,
    LycheeError,
    RetryPolicy,
    UnavailableError,
)
from lychee.rerank.client._errors import error_from_status


def _err(code: grpc.StatusCode, reason: str | None = None, retry_delay: float | None = None) -> LycheeError:
    e = error_from_status(code, "x")
    e.reason, e.retry_delay = reason, retry_delay
    return e


@pytest.mark.parametrize(
    ("code", "reason", "delay", "retry"),
    [
        (grpc.StatusCode.UNAVAILABLE, "NOT_READY", None, True),
        (grpc.StatusCode.UNAVAILABLE, None, None, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", None, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, None, 0.1, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE", None, False),
        (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_TEXT", None, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, None, False),
        (grpc.StatusCode.INTERNAL, None, None, False),
        (grpc.StatusCode.UNAUTHENTICATED, None, None, False),
    ],
)
def test_what_is_retried(code: grpc.StatusCode, reason: str | None, delay: float | None, retry: bool) -> None:
    assert RetryPolicy().is_retryable(_err(code, reason, delay)) is retry
    assert not NO_RETRY.is_retryable(_err(grpc.StatusCode.INVALID_ARGUMENT))
    assert NO_RETRY.delay_before_retry(1, _err(grpc.StatusCode.UNAVAILABLE), None, random.Random()) is None


def test_overload_retry_can_be_disabled() -> None:
    policy = RetryPolicy(retry_overloaded=False)
    assert not policy.is_retryable(_err(grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"))


def test_backoff_is_exponential_jittered_and_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2.0, jitter=0.5, max_attempts=10)
    rng = random.Random(7)
    for attempt, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (8, 0.5)]:
        samples = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(base * 0.5 - 1e-9 <= s <= base + 1e-9 for s in samples)
        assert max(samples) - min(samples) > base * 0.3  # actually jittered


def test_attempts_bounded_and_deadline_respected() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.2, jitter=0.0)
    rng = random.Random(0)
    unavailable = _err(grpc.StatusCode.UNAVAILABLE)
    assert policy.delay_before_retry(1, unavailable, None, rng) == pytest.approx(0.2)
    assert policy.delay_before_retry(2, unavailable, None, rng) == pytest.approx(0.4)
    assert policy.delay_before_retry(3, unavailable, None, rng) is None  # attempts exhausted
    assert policy.delay_before_retry(1, unavailable, 0.1, rng) is None  # would overrun the deadline


def test_retry_info_overrides_backoff_but_not_the_deadline() -> None:
    policy = RetryPolicy(jitter=0.5)
    overloaded = _err(grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", retry_delay=1.0)
    delay = policy.delay_before_retry(1, overloaded, 10.0, random.Random(1))
    assert delay is not None and 1.0 <= delay <= 1.05
    assert policy.delay_before_retry(1, overloaded, 0.5, random.Random(1)) is None


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"jitter": 1.5}, {"multiplier": 0.5}, {"initial_backoff": -1}]
)
def test_policy_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def _dead_port() -> int:
    """A loopback port that was just free: nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sync_unavailable_after_bounded_retries(counting_policy: Any) -> None:
    policy = counting_policy(max_attempts=3, initial_backoff=0.05, jitter=0.0)
    with LycheeClient(f"127.0.0.1:{_dead_port()}", retry=policy, timeout=10.0) as client:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            client.rerank("q", ["d"])
        elapsed = time.monotonic() - t0
    assert [a for a, _ in policy.calls] == [1, 2, 3]
    assert policy.calls[-1][1] is None
    assert elapsed < 5.0
    assert isinstance(info.value.__cause__, grpc.RpcError)


async def test_async_unavailable_stays_within_deadline(counting_policy: Any) -> None:
    policy = counting_policy(max_attempts=50, initial_backoff=0.1, max_backoff=0.1, jitter=0.0)
    client = AsyncLycheeClient(f"127.0.0.1:{_dead_port()}", retry=policy)
    try:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            await client.rerank("q", ["d"], timeout=0.8)
        elapsed = time.monotonic() - t0
    finally:
        await client.close()
    assert 1 < len(policy.calls) < 50  # retried, but stopped by the deadline, not the attempt cap
    assert elapsed < 0.8 + 0.5


def test_async_client_survives_event_loop_changes() -> None:
    client = AsyncLycheeClient(f"127.0.0.1:{_dead_port()}", retry=NO_RETRY, timeout=2.0)

    async def once() -> None:
        with pytest.raises(UnavailableError):
            await client.rerank("q", ["d"])

    asyncio.run(once())
    asyncio.run(once())  # a channel bound to the first (closed) loop must not be reused
    asyncio.run(client.close())
