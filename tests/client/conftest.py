"""Real servers for the client tests: the in-process harness on the tiny random checkpoint.

Fixtures skip (rather than error) while the harness, the server app or the checkpoint fixture
are missing, so these files always collect.
"""

from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

# Small images keep the tiny model fast on CPU: the server resizes to at most max_pixels anyway.
SERVER_OVERRIDES: dict[str, Any] = {"warmup": False, "dtype": "float32", "max_pixels": 16 * 28 * 28}


def require_server_stack(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """(harness module, tiny checkpoint path), or skip the test."""
    harness = pytest.importorskip("harness")
    pytest.importorskip("lychee_server.app")
    try:
        checkpoint = request.getfixturevalue("tiny_checkpoint")
    except pytest.FixtureLookupError:
        pytest.skip("tiny_checkpoint fixture not available")
    return harness, checkpoint


@pytest.fixture(scope="session")
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """One plain server for the session (read-only use: no test changes its state)."""
    harness, checkpoint = require_server_stack(request)
    async with harness.running_server(checkpoint, **SERVER_OVERRIDES) as srv:
        yield srv


def noise_image(width: int, height: int, *, seed: int = 0, fmt: str = "PNG") -> bytes:
    """An incompressible image (random pixels), so its encoded size is predictable."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


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
