"""Playground fixtures: one headless Chromium and one real ``lychee-rerank serve`` process on the
tiny checkpoint (no auth), shared by the tests of this folder.

``LYCHEE_MAX_BATCH_PAIRS=2`` makes the progress stream move in visible steps; the one-second batch
wait (``TINY_ENV``) keeps a request's batches the same from call to call, so the page's ranking
can be compared with ``/v1/rerank`` for the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_door.http_support import TINY_ENV, http_url
from playground.browser_support import start_chromium

from harness import SubprocessServer, subprocess_server

PLAYGROUND_ENV = {**TINY_ENV, "LYCHEE_MAX_BATCH_PAIRS": "2"}


@pytest.fixture(scope="package")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="package")
def browser(downloads: Path) -> Iterator[Any]:
    driver = start_chromium(downloads)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="package")
def served(tiny_checkpoint: Path, browser: Any) -> Iterator[SubprocessServer]:
    """Started after the browser, so a missing browser skips before a server is spawned."""
    with subprocess_server(tiny_checkpoint, env=PLAYGROUND_ENV) as srv:
        yield srv


@pytest.fixture(scope="package")
def base_url(served: SubprocessServer) -> str:
    return http_url(served)
