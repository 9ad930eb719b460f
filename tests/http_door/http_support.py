"""Helpers shared by the HTTP door tests (a uniquely named module: ``conftest`` is not imported)."""

from __future__ import annotations

from harness import SubprocessServer

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
