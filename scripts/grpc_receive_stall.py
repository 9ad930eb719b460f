"""How long grpcio's receive path holds a grpc.aio server's event loop per incoming message.

A diagnostic for issue 14 (liveness under attack), independent of lychee: a bare grpc.aio server
whose one method refuses every call at once, two sender processes (nice 10) that send messages of
``SIZE_MIB`` in a closed loop, and a coroutine on the server's loop that sleeps 1 ms and records how
late it wakes. The lag it sees is time the loop could not run: grpcio copies each received message
into a Python ``bytes`` object on the loop thread with the GIL held, before any application code
(a pass-through deserializer included) sees it.

    .venv/bin/python scripts/grpc_receive_stall.py [SIZE_MIB] [MESSAGES_PER_SENDER]

Measured on the 2-core CI-sized machine (grpcio 1.85.1), max lag per run: 1 MiB 3.8-5.9 ms,
4 MiB 11.5-12.0 ms, 13 MiB 25-134 ms; the lags over 5 ms summed to 1.0-2.4 ms per MiB received.
The tcp read-chunk channel arguments and glibc's mmap/trim thresholds did not change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import sys
import time

import grpc
import grpc.aio

MiB = 1 << 20
METHOD = "/diag.Sink/Refuse"


def _sender(port: int, size: int, count: int) -> None:
    os.nice(10)

    async def run() -> None:
        options = [("grpc.max_send_message_length", 64 * MiB)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_unary(METHOD)
            payload = b"\x0a\x01a" * (size // 3)  # a repeated one-byte string field
            for _ in range(count):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call(payload, timeout=30)

    asyncio.run(run())


async def _main(size: int, count: int) -> None:
    async def refuse(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")
        raise AssertionError("abort returned")

    handler = grpc.method_handlers_generic_handler(
        "diag.Sink", {"Refuse": grpc.unary_unary_rpc_method_handler(refuse)}
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * MiB)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    lags: list[float] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(0.001)
            lags.append(time.monotonic() - t0 - 0.001)

    watcher = asyncio.create_task(watch())
    ctx = multiprocessing.get_context("spawn")
    senders = [ctx.Process(target=_sender, args=(port, size, count)) for _ in range(2)]
    t0 = time.monotonic()
    for proc in senders:
        proc.start()
    await asyncio.to_thread(lambda: [proc.join() for proc in senders])
    elapsed = time.monotonic() - t0
    done.set()
    await watcher
    await server.stop(None)
    lags.sort()

    def q(p: float) -> float:
        return lags[round(p * (len(lags) - 1))] * 1000

    stalled = sum(lag for lag in lags if lag > 0.005)
    print(
        f"{size / MiB:g} MiB x {2 * count} messages in {elapsed:.2f} s: loop lag p50 {q(0.5):.2f} ms, "
        f"p99 {q(0.99):.2f} ms, max {q(1.0):.2f} ms; lags over 5 ms total {stalled:.3f} s"
    )


if __name__ == "__main__":
    size_mib = float(sys.argv[1]) if len(sys.argv) > 1 else 13.0
    per_sender = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    asyncio.run(_main(int(size_mib * MiB), per_sender))
