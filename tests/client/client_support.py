"""Helpers shared by the client tests (a uniquely named module: ``conftest`` is ambiguous
when several test directories are collected together)."""

from __future__ import annotations

import io
import random
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


def noise_image(width: int, height: int, *, seed: int = 0, fmt: str = "PNG") -> bytes:
    """An incompressible image (random pixels), so its encoded size is predictable."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()
