"""Decode bombs against the real server process: text-only callers stay served, SIGTERM still ends it.

The bombs are built here, with PIL and byte surgery:

* a progressive-JPEG scan bomb: a flat 8000x8000 greyscale JPEG whose last refinement scan is
  repeated 300 times (~0.3 MB; before issue 14 it took ~15 s of decoding at full CPU on a 2-core
  machine, in a thread nobody could stop). Now refused from its scan headers;
* pixel-limit PNGs: valid, flat 8000x8000 RGBA files (~1 MB each) that inflate to 256 MB and take
  over a second each to decode and flatten. With ``image_decode_timeout_s`` at 0.5 s their decoder
  processes are killed at the budget.

What must hold while several callers keep sending such requests: every bomb is refused with
INVALID_ARGUMENT / IMAGE_DECODE_FAILED (never scored, never a hang), a concurrent caller of
text-only requests is answered promptly every time (image preparation has threads of its own and
decoding happens in killable worker processes), health answers within 1 s, and SIGTERM ends the
process within the grace period plus 5 s while bombs are being decoded. Figures go to
``build/reliability/decode_bombs.json``.
"""

from __future__ import annotations

import asyncio
import io
import signal
import statistics
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from harness import subprocess_server
from lychee.rerank.v1 import rerank_pb2 as pb

pytestmark = pytest.mark.timeout(240)

GRACE_S = 1.0
DECODE_TIMEOUT_S = 0.5
BOMB_CLIENTS = 3
TEXT_CALLS = 15
TEXT_BOUND_S = 3.0  # a liveness bound, generous on a loaded 2-core CI machine (idle is ~0.05 s)
CALL_TIMEOUT_S = 60.0


def scan_bomb(side: int = 8000, repeats: int = 300) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    body = buf.getvalue()[:-2]  # without EOI
    last = body[body.rindex(b"\xff\xda") :]  # 0xFFDA cannot occur inside entropy-coded data
    return body + last * repeats + b"\xff\xd9"


def pixel_limit_png(side: int = 8000) -> bytes:
    row = b"\0" + b"\x40\x80\xc0\x80" * side
    comp = zlib.compressobj(6)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_request(jpeg: bytes, png: bytes) -> pb.RerankRequest:
    docs = [
        pb.Document(content=pb.Content(image=pb.Image(data=png, media_type=pb.MEDIA_TYPE_PNG)))
        for _ in range(3)
    ]
    docs.append(pb.Document(content=pb.Content(image=pb.Image(data=jpeg, media_type=pb.MEDIA_TYPE_JPEG))))
    return pb.RerankRequest(query=pb.Content(text="a photo"), documents=docs)


TEXT_REQUEST = pb.RerankRequest(
    query=pb.Content(text="reset a VPN password"),
    documents=[
        pb.Document(content=pb.Content(text=t)) for t in ("Open VPN settings.", "Bake bread.", "Reset it.")
    ],
)


async def test_text_callers_and_sigterm_unaffected_by_decode_bombs(tiny_checkpoint: Path, kit: Any) -> None:
    jpeg, png = scan_bomb(), pixel_limit_png()
    env = {
        "LYCHEE_DECODE_THREADS": "2",
        "LYCHEE_IMAGE_DECODE_TIMEOUT_S": str(DECODE_TIMEOUT_S),
        "LYCHEE_GRACE_PERIOD_S": str(GRACE_S),
        "LYCHEE_MAX_BATCH_WAIT_MS": "0",
    }
    bomb_outcomes: list[str] = []  # labels of the answers received before SIGTERM
    after_signal: list[str] = []
    signalled = False
    bomb_messages: set[str] = set()
    with subprocess_server(tiny_checkpoint, env=env) as srv:
        rss_idle = kit.vm_rss_bytes(srv.proc.pid)
        async with kit.open_stub(srv.address) as stub:
            idle = []
            for _ in range(5):
                t0 = time.perf_counter()
                await stub.Rerank(TEXT_REQUEST, timeout=CALL_TIMEOUT_S)
                idle.append(time.perf_counter() - t0)

        stop = asyncio.Event()

        async def bomber() -> None:
            async with kit.open_stub(srv.address) as bomb_stub:
                while not stop.is_set():
                    try:
                        await bomb_stub.Rerank(bomb_request(jpeg, png), timeout=CALL_TIMEOUT_S)
                        (after_signal if signalled else bomb_outcomes).append("OK")
                    except grpc.aio.AioRpcError as err:
                        failure = kit.decode_failure(err)
                        (after_signal if signalled else bomb_outcomes).append(failure.label)
                        bomb_messages.add(failure.details)
                        if failure.code is grpc.StatusCode.UNAVAILABLE:
                            return  # the server is going away (the SIGTERM at the end)

        bombers = [asyncio.create_task(bomber()) for _ in range(BOMB_CLIENTS)]
        await kit.wait_for(
            lambda: len(bomb_outcomes), lambda n: n >= BOMB_CLIENTS, within=120, what="bombs answered"
        )

        under_attack, health_s = [], []
        async with kit.open_stub(srv.address) as stub:
            channel = grpc.aio.insecure_channel(srv.address)
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(TEXT_CALLS):
                t0 = time.perf_counter()
                resp = await stub.Rerank(TEXT_REQUEST, timeout=CALL_TIMEOUT_S)
                under_attack.append(time.perf_counter() - t0)
                assert kit.check_ranking(resp.results, len(TEXT_REQUEST.documents)) is None
                t0 = time.perf_counter()
                status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                health_s.append(time.perf_counter() - t0)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
            await channel.close()
        rss_attack = kit.vm_rss_bytes(srv.proc.pid)

        # SIGTERM while the bombers are still sending (a decode is in flight most of the time).
        await kit.wait_for(
            lambda: len(bomb_outcomes), lambda n: n >= 2 * BOMB_CLIENTS, within=120, what="more bombs"
        )
        t_signal = time.monotonic()
        signalled = True
        srv.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(srv.proc.wait, GRACE_S + 30)
        exit_s = time.monotonic() - t_signal
        stop.set()
        await asyncio.wait_for(asyncio.gather(*bombers), CALL_TIMEOUT_S)

    refused = [o for o in bomb_outcomes if o == "INVALID_ARGUMENT/IMAGE_DECODE_FAILED"]
    figures = {
        "bomb_clients": BOMB_CLIENTS,
        "bomb_requests": len(bomb_outcomes),
        "bomb_outcomes": {o: bomb_outcomes.count(o) for o in set(bomb_outcomes)},
        "bomb_outcomes_after_sigterm": {o: after_signal.count(o) for o in set(after_signal)},
        "image_decode_timeout_s": DECODE_TIMEOUT_S,
        "text_idle_median_s": round(statistics.median(idle), 4),
        "text_under_attack_median_s": round(statistics.median(under_attack), 4),
        "text_under_attack_max_s": round(max(under_attack), 4),
        "health_max_s": round(max(health_s), 4),
        "rss_idle_mib": round(rss_idle / 2**20, 1),
        "rss_under_attack_mib": round(rss_attack / 2**20, 1),
        "sigterm_exit_s": round(exit_s, 2),
        "grace_period_s": GRACE_S,
    }
    kit.write_figures("decode_bombs", figures)
    assert rc == 0
    assert exit_s < GRACE_S + 5, figures
    assert "OK" not in bomb_outcomes + after_signal  # never scored
    assert len(refused) == len(bomb_outcomes), figures  # every bomb refused with the right reason
    assert any("image_decode_timeout_s" in m for m in bomb_messages) or any(
        "scan" in m for m in bomb_messages
    )
    assert max(under_attack) < TEXT_BOUND_S, figures
    assert max(health_s) < 1.0, figures
