"""The knowledge-base example, run exactly as CI runs it: a subprocess against a real server."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

RUN = Path(__file__).resolve().parents[2] / "examples" / "knowledge_base" / "run.py"


async def _run(*args: str) -> tuple[int, str, str]:
    # asyncio subprocess: the server lives on this event loop and must keep serving meanwhile.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(RUN), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=240)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_example_end_to_end(adapter_server: Any) -> None:
    # top-n = fetch-k keeps every candidate, so the output does not depend on random scores.
    code, out, err = await _run("--target", adapter_server.address, "--top-n", "8", "--fetch-k", "8")
    assert code == 0, err
    assert "server " in out and "model " in out
    assert out.count("Question: ") == 4 and "(async path)" in out
    assert out.count("score=") == 4 * 8
    assert "id=fig-tickets" in out and "id=fig-vpn" in out  # figures flow through the chain
    # The tiny checkpoint declares its weights random; the example must say so plainly.
    assert "random-weight test checkpoint" in out


async def test_example_fails_loudly_without_a_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = await _run("--target", f"127.0.0.1:{port}", "--timeout", "3")
    assert code == 1
    assert "UnavailableError" in err
