"""HTTP door fixtures: the real ``lychee-rerank serve`` process on the tiny checkpoint, both doors
open on loopback port 0 (the ports come from its ``serving`` line), one for the whole module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import SubprocessServer, subprocess_server

TINY_ENV = {
    "LYCHEE_DTYPE": "float32",
    "LYCHEE_WARMUP": "false",
    "LYCHEE_MAX_PIXELS": str(16 * 28 * 28),  # small images keep the tiny model fast on CPU
    # Parity is asserted bit for bit, so a request must always form the same batch: wait for all
    # of its pairs (the batcher waits only while pairs of admitted requests are being prepared).
    "LYCHEE_MAX_BATCH_WAIT_MS": "1000",
}


def http_url(srv: SubprocessServer) -> str:
    assert srv.http_port is not None, "the server did not report an http_port"
    return f"http://127.0.0.1:{srv.http_port}"


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path) -> Iterator[SubprocessServer]:
    """One open (no auth) server process for the module."""
    with subprocess_server(tiny_checkpoint, env=TINY_ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def base_url(served: SubprocessServer) -> str:
    return http_url(served)


@pytest.fixture(scope="module")
def grpc_client(served: SubprocessServer) -> Iterator[Any]:
    from lychee.rerank.client import LycheeClient

    with LycheeClient(served.address) as client:
        yield client
