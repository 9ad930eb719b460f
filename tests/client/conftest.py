"""Real servers for the client tests: the in-process harness on the tiny random checkpoint.

Fixtures skip (rather than error) while the harness, the server app or the checkpoint fixture
are missing, so these files always collect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from server_support import tiny_server


@pytest.fixture(scope="session")
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """One plain server for the session (read-only use: no test changes its state)."""
    async with tiny_server(request) as srv:
        yield srv


@pytest.fixture
def counting_policy() -> type:
    """A RetryPolicy subclass recording each retry decision as ``(attempt, delay)``.

    It observes the client's real retry loop; nothing about the server is simulated.
    """
    from lychee.rerank.client import RetryPolicy

    class CountingPolicy(RetryPolicy):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            object.__setattr__(self, "calls", [])

        def delay_before_retry(
            self, attempt: int, error: Any, remaining: float | None, rng: Any
        ) -> float | None:
            delay = super().delay_before_retry(attempt, error, remaining, rng)
            self.calls.append((attempt, delay))  # type: ignore[attr-defined]
            return delay

    return CountingPolicy
