"""HTTP door fixtures: the real ``lychee-rerank serve`` process on the tiny checkpoint, both doors
open on loopback port 0 (the ports come from its ``serving`` line), one for the whole module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_door.http_support import TINY_ENV, http_url

from harness import SubprocessServer, subprocess_server


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


@pytest.fixture
def gated(tiny_engine: Any) -> Iterator[Any]:
    """The session's real tiny engine behind a device gate (opened again at teardown)."""
    from harness import GatedEngine

    wrapper = GatedEngine(tiny_engine)
    yield wrapper
    wrapper.gate.open()
    wrapper.warmup_gate.open()
