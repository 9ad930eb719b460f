"""Helpers shared by the client and adapter tests, which talk to a real in-process server on the
tiny random checkpoint (a uniquely named module: ``conftest`` is ambiguous when several test
directories are collected together).

``harness`` and the server app are imported lazily, inside :func:`require_server_stack`, so test
files that import this module always collect: the tests skip (rather than error) while the
harness, the server app or the checkpoint fixture are missing.
"""

from __future__ import annotations

import contextlib
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


@contextlib.asynccontextmanager
async def tiny_server(request: pytest.FixtureRequest, **overrides: Any) -> AsyncIterator[Any]:
    """A real in-process server on the tiny checkpoint with :data:`SERVER_OVERRIDES` (plus
    ``overrides``), or skip the test."""
    harness, checkpoint = require_server_stack(request)
    async with harness.running_server(checkpoint, **{**SERVER_OVERRIDES, **overrides}) as srv:
        yield srv


def noise_image(width: int, height: int, *, seed: int = 0, fmt: str = "PNG") -> bytes:
    """An incompressible image (random pixels), so its encoded size is predictable."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()
