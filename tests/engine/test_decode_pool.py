"""The image decoder processes (engine.decode_pool): same pixels, hard time budget, cancellation.

Real worker processes on real pipes. The "slow" image is a legitimate one at the pixel limit (a
flat 8000x8000 RGBA PNG: ~200 KB that inflate to 256 MB, decoded and flattened onto white), so
every wait here is on an observable state (a worker busy, a call returned), never a fixed sleep.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest

from helpers import encode, pattern
from lychee_server.domain import ImageInput, MediaType
from lychee_server.engine.decode_pool import DecodePool
from lychee_server.engine.images import ImageLimits, decode_image
from lychee_server.errors import Cancelled, InvalidInput, Unavailable

LIMITS = ImageLimits()


def flat_png(width: int, height: int, rgba: bool = True) -> bytes:
    """A valid flat PNG of any declared size, built row by row (cheap to make, costly to decode)."""
    bands = 4 if rgba else 3
    row = b"\0" + b"\x7f" * (width * bands)
    comp = zlib.compressobj(6)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6 if rgba else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def slow_image() -> ImageInput:
    return ImageInput(flat_png(8000, 8000), MediaType.PNG)


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    p = DecodePool(2, LIMITS, timeout_s=60.0)
    yield p
    p.close()


def wait_until(predicate, limit_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the pool"
        time.sleep(0.005)


def in_thread(fn, *args):  # type: ignore[no-untyped-def]
    """Run ``fn(*args)`` on a thread; returns (thread, outcome dict with 'value' or 'error')."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:
            out["error"] = exc
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_same_pixels_as_in_process(pool: DecodePool) -> None:
    cases = [
        ImageInput(encode(pattern(57, 91)), MediaType.PNG),
        ImageInput(encode(pattern(640, 480), "JPEG", quality=85), MediaType.JPEG),
        ImageInput(encode(pattern(3000, 2000), "JPEG", quality=80), MediaType.JPEG),  # draft path
        ImageInput(encode(pattern(200, 150).convert("RGBA"), "WEBP", lossless=True), MediaType.WEBP),
        ImageInput(encode(pattern(5, 3)), MediaType.PNG),  # upscaled to 28 px
    ]
    for image in cases:
        got = pool.decode(image)
        want = decode_image(image, LIMITS)
        assert got.mode == "RGB" and got.size == want.size
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert pool.started <= 2  # workers are reused, not started per image


def test_bad_images_keep_their_reason(pool: DecodePool) -> None:
    jpeg = encode(pattern(200, 200), "JPEG")
    cases = {
        "IMAGE_DECODE_FAILED": ImageInput(jpeg[: len(jpeg) // 2] + b"\xff\xd9", MediaType.JPEG),
        "IMAGE_MEDIA_TYPE_MISMATCH": ImageInput(jpeg, MediaType.PNG),
        "IMAGE_ASPECT_RATIO": ImageInput(encode(pattern(402, 2)), MediaType.PNG),
    }
    for reason, image in cases.items():
        with pytest.raises(InvalidInput) as err:
            pool.decode(image)
        assert err.value.reason == reason
    assert pool.killed == 0  # refusals are answers, not crashes


def test_time_budget_kills_the_decode_and_replaces_the_worker(slow_image: ImageInput) -> None:
    pool = DecodePool(1, LIMITS, timeout_s=0.05)
    try:
        with pytest.raises(InvalidInput) as err:
            pool.decode(slow_image)
        assert err.value.reason == "IMAGE_DECODE_FAILED"
        assert "0.05 s" in err.value.message and "image_decode_timeout_s" in err.value.message
        assert pool.killed == 1 and pool.live == 0
        # The next image gets a fresh worker.
        assert pool.decode(ImageInput(encode(pattern(40, 40)), MediaType.PNG)).size == (40, 40)
        assert pool.started == 2
    finally:
        pool.close()


def test_cancel_kills_running_and_queued_decodes_of_that_request_only(
    pool: DecodePool, slow_image: ImageInput
) -> None:
    request, other = object(), object()
    running = [in_thread(pool.decode, slow_image, request) for _ in range(2)]  # both workers busy
    wait_until(lambda: pool.busy == 2)
    queued = in_thread(pool.decode, slow_image, request)  # waits for a worker
    bystander = in_thread(pool.decode, ImageInput(encode(pattern(40, 40)), MediaType.PNG), other)
    wait_until(lambda: pool.waiting == 2)
    t0 = time.monotonic()
    pool.cancel(request)
    for thread, out in [*running, queued]:
        thread.join(30)
        assert isinstance(out.get("error"), Cancelled), out
    bystander[0].join(30)
    assert bystander[1]["value"].size == (40, 40)  # type: ignore[attr-defined]
    # Cancellation does not wait for the decodes (a full decode of this image takes far longer).
    assert max(float(out["at"]) for _, out in [*running, queued]) - t0 < 2.0
    assert pool.killed == 2


def test_close_stops_decodes_in_flight(slow_image: ImageInput) -> None:
    pool = DecodePool(1, LIMITS, timeout_s=60.0)
    thread, out = in_thread(pool.decode, slow_image)
    wait_until(lambda: pool.busy == 1)
    pool.close()
    thread.join(30)
    assert isinstance(out.get("error"), Unavailable)
    assert pool.live == 0
    with pytest.raises(Unavailable):
        pool.decode(ImageInput(encode(pattern(40, 40)), MediaType.PNG))


def test_worker_recycled_after_a_large_decode() -> None:
    # The memory a big decode leaves with the allocator goes back to the OS with the process.
    pool = DecodePool(1, LIMITS, timeout_s=60.0, recycle_bytes=32 << 20)
    try:
        big = pool.decode(ImageInput(flat_png(3000, 3000, rgba=False), MediaType.PNG))
        assert big.size == (3000, 3000)
        wait_until(lambda: pool.live == 0)
        pool.decode(ImageInput(encode(pattern(40, 40)), MediaType.PNG))
        assert pool.started == 2
    finally:
        pool.close()


def test_decoders_run_at_the_lowest_cpu_priority(pool: DecodePool) -> None:
    """Decoding is batch work: at nice 19 a flood of large images cannot take the CPU from the
    server's own threads (text requests, the device loop, health) - issue 14's liveness."""
    import os

    pool.decode(ImageInput(encode(pattern(64, 48)), MediaType.PNG))
    with pool._cond:
        workers = list(pool._idle)
    assert workers
    for worker in workers:
        assert os.getpriority(os.PRIO_PROCESS, worker.proc.pid) == 19
