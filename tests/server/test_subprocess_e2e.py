"""End-to-end against the REAL server process: ``python -m lychee_server.cli serve`` on the tiny
checkpoint, configured by ``LYCHEE_*`` variables only, talked to over loopback gRPC and HTTP.

The in-process tests hold the device with a gate; a separate process has none. Determinism comes
from the scheduler's own rules instead:

* a "big" request of long documents (``max_length`` 2048 with a ``batch_token_budget`` of 1024,
  so every one of its pairs is a batch of its own) keeps the single device thread busy for
  seconds, and its pairs fill the FIFO device queue before anything else arrives;
* the tests wait (bounded polls of ``/metrics``, never fixed sleeps) until that queue is full and
  nothing is being prepared any more; work sent afterwards is necessarily queued *behind* the
  big request: it can be refused (capacity), expire or be cancelled while queued, or be batched
  together with other callers once the device reaches it.

Three server processes in all: one for the load scenarios (module fixture), one for the
startup / drain lifecycle, one with TLS and bearer tokens (also metrics and reflection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness import (
    aiter_list,
    error_details,
    fetch_metrics,
    make_tls_files,
    metric_value,
    spawn_cli_server,
    subprocess_server,
    text_stream_messages,
)
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(240)

SERVICE = "lychee.rerank.v1.RerankService"
WAIT = 20.0  # generous upper bound of any single wait; a healthy run needs a fraction of it
STARTUP = 180.0

N_BIG = 80  # pairs of the request that keeps the device busy
BIG_MAX_LENGTH = 2048  # tokens per big pair (the long documents are truncated to this)
BATCH_BUDGET = 1024  # < 2 big pairs: every big pair is a batch alone; many small pairs fit one
HEADROOM = 8  # capacity beyond the big request
CAPACITY = N_BIG + HEADROOM
RETRY_AFTER_S = 0.75
LONG_TEXT = " ".join(f"paragraph {i} about red bicycles and quarterly revenue" for i in range(400))

LOAD_ENV = {
    "LYCHEE_MAX_INFLIGHT_PAIRS": str(CAPACITY),
    "LYCHEE_BATCH_TOKEN_BUDGET": str(BATCH_BUDGET),
    "LYCHEE_MAX_BATCH_WAIT_MS": "20",
    "LYCHEE_RETRY_AFTER_S": str(RETRY_AFTER_S),
    "LYCHEE_WARMUP": "false",
    "LYCHEE_GRACE_PERIOD_S": "5",
    # One FIFO lane: these scenarios queue small requests *behind* a big one on purpose (the
    # two-lane ordering that would let them overtake is tested in tests/scheduler).
    "LYCHEE_HEAVY_PAIR_TOKENS": "1000000",
}


# --------------------------------------------------------------------------- requests
def small_request(n: int, tag: str = "doc") -> pb.RerankRequest:
    return pb.RerankRequest(
        query=pb.Content(text="red bicycle"),
        documents=[
            pb.Document(id=f"{tag}{i}", content=pb.Content(text=f"document number {i}")) for i in range(n)
        ],
    )


def big_request(n: int = N_BIG) -> pb.RerankRequest:
    return pb.RerankRequest(
        query=pb.Content(text="red bicycle"),
        documents=[pb.Document(content=pb.Content(text=f"{i} {LONG_TEXT}")) for i in range(n)],
        options=pb.RerankOptions(max_length=BIG_MAX_LENGTH),
    )


def stream_messages(texts: list[str], chunk: int = 5) -> list[pb.RerankStreamRequest]:
    return text_stream_messages(texts, chunk=chunk, id_prefix="s")


# --------------------------------------------------------------------------- metrics helpers
class Scrape:
    """One /metrics scrape; absent samples read as 0 (a labelled counter appears on first use)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self, name: str, **labels: str) -> float:
        value = metric_value(self.text, name, labels or None)
        return 0.0 if value is None else value

    def total(self, name: str) -> float:
        """The sum of every sample of ``name`` (all label sets)."""
        from prometheus_client.parser import text_string_to_metric_families

        return sum(
            sample.value
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
            if sample.name == name
        )

    def requests(self, method: str, code: str) -> float:
        return self("lychee_requests_total", method=method, code=code)

    @property
    def gauges(self) -> dict[str, float]:
        return {
            k: self(f"lychee_{k}")
            for k in ("inflight_pairs", "inflight_requests", "preparing_pairs", "queue_depth")
        }


async def scrape(url: str) -> Scrape:
    return Scrape(await asyncio.to_thread(fetch_metrics, url))


async def wait_scrape(
    url: str, predicate: Callable[[Scrape], bool], what: str, limit: float = WAIT
) -> Scrape:
    """Scrape until ``predicate`` holds (bounded, like ``harness.eventually``); return that scrape."""
    deadline = time.monotonic() + limit
    while True:
        s = await scrape(url)
        if predicate(s):
            return s
        if time.monotonic() > deadline:
            calls = [ln for ln in s.text.splitlines() if ln.startswith("lychee_requests_total")]
            raise AssertionError(f"timed out after {limit}s waiting for {what}; gauges: {s.gauges}; {calls}")
        await asyncio.sleep(0.01)


def metrics_url(port: int | None) -> str:
    assert port is not None, "the server reported no metrics port"
    return f"http://127.0.0.1:{port}/metrics"


async def start_big(
    stub: pb_grpc.RerankServiceAsyncStub, url: str, base_inflight: float = 0
) -> tuple[Any, Scrape]:
    """Send the big request and wait until all its pairs are prepared and queued for the device."""
    big = asyncio.ensure_future(stub.Rerank(big_request(), timeout=WAIT))
    s = await wait_scrape(
        url,
        lambda s: (
            (s("lychee_inflight_pairs") == base_inflight + N_BIG and s("lychee_preparing_pairs") == 0)
            or big.done()
        ),
        "the big request to be admitted and fully prepared",
    )
    assert not big.done(), f"the big request finished too early: {big}"
    assert s("lychee_queue_depth") > N_BIG // 2, f"the device drained the big request too fast: {s.gauges}"
    return big, s


# --------------------------------------------------------------------------- a server with visible startup
@dataclass
class Spawned:
    """A server subprocess whose ports are known from its "listening" log line (before SERVING)."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    listening: threading.Event = field(default_factory=threading.Event)
    serving_line: threading.Event = field(default_factory=threading.Event)
    port: int | None = None
    metrics_port: int | None = None
    serving_record: dict[str, Any] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def wait_listening(self, limit: float = STARTUP) -> None:
        if not await asyncio.to_thread(self.listening.wait, limit) or self.port is None:
            raise AssertionError(f"no listening line (exit code {self.proc.poll()}):\n{self.tail()}")

    async def wait_serving_line(self, limit: float = STARTUP) -> dict[str, Any]:
        if not await asyncio.to_thread(self.serving_line.wait, limit) or self.serving_record is None:
            raise AssertionError(f"no serving line (exit code {self.proc.poll()}):\n{self.tail()}")
        return self.serving_record


@contextlib.contextmanager
def spawn_server(model: Path, env: dict[str, str]) -> Iterator[Spawned]:
    """Like ``harness.subprocess_server`` but returns at once: the test watches the startup itself."""
    proc = spawn_cli_server(model, {"LYCHEE_LOG_JSON": "true", **env})
    spawned = Spawned(proc=proc)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            spawned.lines.append(line.rstrip("\n"))
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            spawned.records.append(record)
            if record.get("event") == "listening" and not spawned.listening.is_set():
                spawned.port, spawned.metrics_port = int(record["port"]), record.get("metrics_port")
                spawned.listening.set()
            elif record.get("event") == "serving" and "ts" not in record:  # the stdout line, not the log
                spawned.serving_record = record
                spawned.serving_line.set()
        spawned.listening.set()  # EOF: wake up waiters, who check the process
        spawned.serving_line.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        yield spawned
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        thread.join(timeout=5)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def load_server(tiny_checkpoint: Path) -> Iterator[Any]:
    with subprocess_server(tiny_checkpoint, env=LOAD_ENV, startup_timeout=STARTUP) as srv:
        yield srv
        alive = srv.proc.poll() is None
    assert alive, "the load server died during the tests:\n" + "\n".join(srv.lines[-40:])


@pytest.fixture
async def idle_load_server(load_server: Any) -> AsyncIterator[Any]:
    """The shared load server, checked idle before and after each test (no leaked capacity)."""
    url = metrics_url(load_server.metrics_port)
    await wait_scrape(url, lambda s: s("lychee_inflight_pairs") == 0, "an idle server before the test")
    yield load_server
    await wait_scrape(
        url,
        lambda s: s("lychee_inflight_pairs") == 0 and s("lychee_queue_depth") == 0,
        "in-flight pairs back to 0 after the test",
    )


# --------------------------------------------------------------------------- load scenarios
async def test_overload_and_concurrent_callers_batched_together(idle_load_server: Any) -> None:
    srv = idle_load_server
    url = metrics_url(srv.metrics_port)
    base = await scrape(url)
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.RerankServiceStub(ch)
        big, _ = await start_big(stub, url)

        # (a) More than the headroom while the big request holds capacity: refused at once.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Rerank(small_request(HEADROOM + 1), timeout=WAIT)
        d = error_details(info.value)
        assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"), info.value.details()
        assert d.retry_delay == pytest.approx(RETRY_AFTER_S)
        assert d.metadata.get("request_id")

        # (c) Four concurrent callers of 2 pairs each fill the headroom exactly; they queue behind
        # the big request, and the device takes all 8 pairs in one batch once it reaches them.
        callers = [
            asyncio.ensure_future(stub.Rerank(small_request(2, f"c{k}-"), timeout=WAIT)) for k in range(4)
        ]
        s = await wait_scrape(
            url,
            lambda s: (
                (s("lychee_inflight_pairs") == CAPACITY and s("lychee_preparing_pairs") == 0) or big.done()
            ),
            "all callers admitted and prepared",
        )
        assert not big.done() and s("lychee_queue_depth") > HEADROOM, s.gauges  # big pairs still ahead
        assert s("lychee_inflight_requests") == 5

        # At capacity now: even one pair is refused.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Rerank(small_request(1), timeout=WAIT)
        assert (error_details(info.value).code, error_details(info.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "OVERLOADED",
        )

        results = await asyncio.gather(big, *callers)
        assert len(results[0].results) == N_BIG
        assert [len(r.results) for r in results[1:]] == [2, 2, 2, 2]
        # Same query and documents in a shared batch: same scores for every caller.
        for r in results[2:]:
            for a, b in zip(results[1].results, r.results, strict=True):
                assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-5)

        after = await wait_scrape(url, lambda s: s("lychee_inflight_pairs") == 0, "everything retired")

    def delta(name: str, **labels: str) -> float:
        return after(name, **labels) - base(name, **labels)

    assert delta("lychee_requests_total", method="Rerank", code="OK") == 5
    assert delta("lychee_requests_total", method="Rerank", code="RESOURCE_EXHAUSTED") == 2
    assert delta("lychee_rejected_requests_total", reason="OVERLOADED") == 2
    assert delta("lychee_pairs_scored_total") == N_BIG + 8
    assert delta("lychee_batch_pairs_sum") == N_BIG + 8
    # N_BIG one-pair batches (the budget fits one long pair) plus ONE batch of the 4 callers' 8
    # pairs: larger than any single request, so it mixed requests.
    assert delta("lychee_batch_pairs_count") == N_BIG + 1
    assert delta("lychee_batch_pairs_bucket", le="1.0") == N_BIG
    assert delta("lychee_batch_pairs_bucket", le="4.0") == N_BIG
    assert delta("lychee_batch_pairs_bucket", le="8.0") == N_BIG + 1


async def test_deadline_and_cancellation_while_queued_are_never_scored(idle_load_server: Any) -> None:
    srv = idle_load_server
    url = metrics_url(srv.metrics_port)
    base = await scrape(url)
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.RerankServiceStub(ch)
        big, _ = await start_big(stub, url)

        # (d') A whole RerankStream (3 pairs) queued behind the big request, then cancelled.
        call = stub.RerankStream(aiter_list(stream_messages(["one", "two", "three"])), timeout=WAIT)
        s = await wait_scrape(
            url,
            lambda s: (
                (s("lychee_inflight_pairs") == N_BIG + 3 and s("lychee_preparing_pairs") == 0)
                or big.done()
                or call.done()
            ),
            "the stream's pairs to be queued",
        )
        assert not big.done() and not call.done(), s.gauges
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        s = await wait_scrape(
            url,
            lambda s: (
                s.requests("RerankStream", "CANCELLED") == base.requests("RerankStream", "CANCELLED") + 1
            ),
            "the server to see the stream cancelled",
        )
        assert s("lychee_pairs_dropped_total") - base("lychee_pairs_dropped_total") == 3
        assert not big.done(), "the big request finished before the deadline scenario could start"

        # (b) A small request whose deadline expires while it waits behind the big one. The deadline
        # is a third of the device time still queued ahead (estimated from the big request's own
        # batches so far), so it expires in the queue on a slow or a fast machine alike.
        # The per-batch time is taken from two batches finished after a first scrape, so the first
        # (cold) batch, often several times slower, does not inflate the estimate.
        first = await wait_scrape(
            url,
            lambda s: (
                s("lychee_inference_seconds_count") - base("lychee_inference_seconds_count") >= 1
                or big.done()
            ),
            "a first big batch to finish",
        )
        s = await wait_scrape(
            url,
            lambda s: (
                s("lychee_inference_seconds_count") - first("lychee_inference_seconds_count") >= 2
                or big.done()
            ),
            "two more big batches to finish",
        )
        assert not big.done(), s.gauges
        batches = s("lychee_inference_seconds_count") - first("lychee_inference_seconds_count")
        seconds = s("lychee_inference_seconds_sum") - first("lychee_inference_seconds_sum")
        ahead = s("lychee_queue_depth") * seconds / batches
        timeout = min(max(ahead / 3, 0.3), 2.0)
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Rerank(small_request(2, "late"), timeout=timeout)
        waited = time.monotonic() - t0
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert waited >= timeout * 0.9
        assert not big.done(), (
            f"expired after the device got free (ahead {ahead:.2f}s, deadline {timeout:.2f}s)"
        )

        resp = await big
        assert len(resp.results) == N_BIG
        after = await wait_scrape(
            url,
            lambda s: (
                s("lychee_inflight_pairs") == 0
                and s("lychee_pairs_dropped_total") - base("lychee_pairs_dropped_total") >= 5
            ),
            "everything retired",
        )

    def delta(name: str, **labels: str) -> float:
        return after(name, **labels) - base(name, **labels)

    # The 2 expired and 3 cancelled pairs were dropped from the queue; only the big request's
    # pairs ever reached the device.
    assert delta("lychee_pairs_dropped_total") == 5
    assert delta("lychee_pairs_scored_total") == N_BIG
    assert delta("lychee_batch_pairs_sum") == N_BIG
    assert delta("lychee_requests_total", method="Rerank", code="OK") == 1
    assert delta("lychee_requests_total", method="RerankStream", code="CANCELLED") == 1
    # The server ends the expired call either through its own deadline check or through gRPC
    # cancelling the handler at the deadline: exactly one of the two, never OK.
    assert (
        delta("lychee_requests_total", method="Rerank", code="DEADLINE_EXCEEDED")
        + delta("lychee_requests_total", method="Rerank", code="CANCELLED")
        == 1
    )
    assert after("lychee_queue_depth") == 0 and after("lychee_inflight_requests") == 0


MID_UPLOAD_TEXTS = ["a red bicycle leaning on a wall", "quarterly revenue grew by 4%"]


async def cancel_mid_upload(stub: pb_grpc.RerankServiceAsyncStub, url: str) -> tuple[Scrape, Scrape]:
    """Open a RerankStream, send the header, an ItemStart and part of its text, then cancel.

    Returns the scrapes before the call and after the server has finished the call (the RPC
    counter of RerankStream, any code, went up by one).
    """
    base = await scrape(url)
    # Header, the first item's start and one chunk of its text: an item left half-received.
    partial = stream_messages(MID_UPLOAD_TEXTS)[:3]
    assert [m.WhichOneof("kind") for m in partial] == ["header", "item", "chunk"]
    more = asyncio.Event()  # never set: the upload stalls mid-item

    async def stalled() -> AsyncIterator[pb.RerankStreamRequest]:
        for m in partial:
            yield m
        await more.wait()

    def stream_calls(s: Scrape) -> float:
        return sum(
            s.requests("RerankStream", code.name)
            for code in grpc.StatusCode
            if code is not grpc.StatusCode.OK
        )

    call = stub.RerankStream(stalled(), timeout=WAIT)
    # The handler sends the request id as initial metadata when it starts: it is running.
    md = await asyncio.wait_for(call.initial_metadata(), WAIT)
    assert any(k == "x-request-id" and v for k, v in md)
    assert not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    after = await wait_scrape(
        url, lambda s: stream_calls(s) == stream_calls(base) + 1, "the server to finish the cancelled stream"
    )
    return base, after


async def test_stream_cancelled_mid_upload_frees_everything(idle_load_server: Any) -> None:
    srv = idle_load_server
    url = metrics_url(srv.metrics_port)
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.RerankServiceStub(ch)
        base, s = await cancel_mid_upload(stub, url)
        # Nothing of the half-uploaded request was admitted, so nothing is held or scored.
        assert s("lychee_inflight_pairs") == 0 and s("lychee_inflight_requests") == 0, s.gauges
        assert s("lychee_pairs_scored_total") == base("lychee_pairs_scored_total")
        assert s.requests("RerankStream", "OK") == base.requests("RerankStream", "OK")

        # The server carries on: the same documents through a complete stream are scored.
        resp = await stub.RerankStream(aiter_list(stream_messages(MID_UPLOAD_TEXTS)), timeout=WAIT)
        assert sorted(r.id for r in resp.results) == ["s0", "s1"] and resp.usage.pairs == 2
        after = await wait_scrape(url, lambda s: s("lychee_inflight_pairs") == 0, "everything retired")
    assert after.requests("RerankStream", "OK") - base.requests("RerankStream", "OK") == 1
    assert after("lychee_pairs_scored_total") - base("lychee_pairs_scored_total") == 2


async def test_stream_cancelled_mid_upload_is_counted_as_cancelled(idle_load_server: Any) -> None:
    srv = idle_load_server
    url = metrics_url(srv.metrics_port)
    async with grpc.aio.insecure_channel(srv.address) as ch:
        base, after = await cancel_mid_upload(pb_grpc.RerankServiceStub(ch), url)

    def delta(code: str) -> float:
        return after.requests("RerankStream", code) - base.requests("RerankStream", code)

    assert (delta("CANCELLED"), delta("INVALID_ARGUMENT")) == (1, 0)


# --------------------------------------------------------------------------- lifecycle
async def test_health_through_startup_and_sigterm_drain(tiny_checkpoint: Path) -> None:
    env = {
        "LYCHEE_WARMUP": "true",
        "LYCHEE_GRACE_PERIOD_S": "30",
        "LYCHEE_BATCH_TOKEN_BUDGET": str(BATCH_BUDGET),
    }
    with spawn_server(tiny_checkpoint, env) as srv:
        # The port is bound (and announced in the log) before the model loads.
        await srv.wait_listening()
        assert not srv.serving_line.is_set()
        seen: list[tuple[str, str]] = []  # distinct consecutive (overall, service) health statuses
        during_load: list[tuple[str, Any, str]] = []
        async with grpc.aio.insecure_channel(srv.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = pb_grpc.RerankServiceStub(ch)

            async def check(service: str) -> str:
                try:
                    resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                except grpc.aio.AioRpcError as err:
                    return f"rpc:{err.code().name}"
                return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

            deadline = time.monotonic() + STARTUP
            while True:
                status = (await check(""), await check(SERVICE))
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == ("NOT_SERVING", "NOT_SERVING") and not during_load:
                    # While loading, work is refused as NOT_READY (not queued, not INTERNAL).
                    for name, rpc in (
                        ("Rerank", lambda: stub.Rerank(small_request(1), timeout=10)),
                        ("GetServerInfo", lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)),
                    ):
                        try:
                            await rpc()
                            during_load.append((name, grpc.StatusCode.OK, ""))
                        except grpc.aio.AioRpcError as err:
                            d = error_details(err)
                            during_load.append((name, d.code, d.reason))
                if status == ("SERVING", "SERVING"):
                    break
                if srv.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"never SERVING; health seen {seen}:\n{srv.tail()}")
                await asyncio.sleep(0.02)
            assert seen[0] == ("NOT_SERVING", "NOT_SERVING"), seen  # loading + warm-up take seconds
            assert seen[-1] == ("SERVING", "SERVING"), seen
            assert all(s != ("SERVING", "SERVING") for s in seen[:-1]), seen  # never back once SERVING
            assert during_load == [
                ("Rerank", grpc.StatusCode.UNAVAILABLE, "NOT_READY"),
                ("GetServerInfo", grpc.StatusCode.UNAVAILABLE, "NOT_READY"),
            ]
            serving = await srv.wait_serving_line()
            assert (serving["port"], serving["metrics_port"]) == (
                srv.port,
                srv.metrics_port,
            )
            info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=WAIT)
            assert info.device == "cpu" and info.random_weights

            # Drain: SIGTERM while a long request is in flight.
            url = metrics_url(srv.metrics_port)
            # The start-up heap is frozen: full collections never walk the model's objects (each
            # such walk held the GIL ~0.2 s, stalling the event loop and health checks).
            assert (await scrape(url))("lychee_gc_frozen_objects") > 100_000
            big, _ = await start_big(stub, url)
            srv.proc.send_signal(signal.SIGTERM)
            drain_deadline = time.monotonic() + WAIT
            while (status := (await check(""), await check(SERVICE))) != ("NOT_SERVING", "NOT_SERVING"):
                assert status == ("SERVING", "SERVING"), status  # still serving until the signal lands
                assert time.monotonic() < drain_deadline, "health never turned NOT_SERVING"
                await asyncio.sleep(0.01)
            assert not big.done(), "the in-flight request ended before the drain could be observed"
            assert srv.proc.poll() is None  # still running: the grace period covers the call
            with pytest.raises(grpc.aio.AioRpcError) as err_info:
                await stub.Rerank(small_request(1), timeout=WAIT)
            d = error_details(err_info.value)
            assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")

            resp = await big  # the in-flight request still completes, in full
            assert len(resp.results) == N_BIG and resp.usage.pairs == N_BIG
        code = await asyncio.to_thread(srv.proc.wait, WAIT)
        assert code == 0, srv.tail()
        events = [r.get("event") for r in srv.records]
        assert "draining" in events and "stopped" in events, srv.tail()
        stopped = next(r for r in srv.records if r.get("event") == "stopped")
        assert stopped.get("clean") is True, stopped
        rpc_codes = {(r["method"], r["code"]) for r in srv.records if r.get("message") == "rpc"}
        assert ("Rerank", "OK") in rpc_codes and ("Rerank", "UNAVAILABLE") in rpc_codes, rpc_codes


# --------------------------------------------------------------------------- TLS, tokens, metrics, reflection
async def test_tls_tokens_metrics_and_reflection(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="TLS tests need the 'cryptography' package ([dev] extra)")
    tls = make_tls_files(tmp_path)
    env = {
        "LYCHEE_TLS_CERT": str(tls.server_cert),
        "LYCHEE_TLS_KEY": str(tls.server_key),
        "LYCHEE_API_KEYS": '["tok"]',
        "LYCHEE_WARMUP": "false",
    }
    token = (("authorization", "Bearer tok"),)
    with subprocess_server(tiny_checkpoint, env=env, startup_timeout=STARTUP) as srv:
        url = metrics_url(srv.metrics_port)
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(srv.address, creds) as ch:
            stub = pb_grpc.RerankServiceStub(ch)
            resp = await stub.Rerank(small_request(2), metadata=token, timeout=WAIT)
            assert sorted(r.id for r in resp.results) == ["doc0", "doc1"]
            streamed = await stub.RerankStream(
                aiter_list(stream_messages(["x", "yz"])), metadata=token, timeout=WAIT
            )
            assert streamed.usage.pairs == 2

            for metadata, why in (((), "missing"), ((("authorization", "Bearer nope"),), "wrong token")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Rerank(small_request(1), metadata=metadata, timeout=WAIT)
                d = error_details(info.value)
                assert (d.code, d.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"), why

            # Health and reflection stay open without a token.
            status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")
                yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)

            answers = [a async for a in refl.ServerReflectionInfo(ask(), timeout=WAIT)]
            assert len(answers) == 2
            names = {s.name for s in answers[0].list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names, names
            files = [
                descriptor_pb2.FileDescriptorProto.FromString(raw)
                for raw in answers[1].file_descriptor_response.file_descriptor_proto
            ]
            methods = {
                m.name
                for f in files
                if f.package == "lychee.rerank.v1"
                for svc in f.service
                if svc.name == "RerankService"
                for m in svc.method
            }
            assert methods == {"Rerank", "RerankStream", "RerankWithProgress", "GetServerInfo"}, files

        # A plaintext client cannot talk to the TLS port, and nothing reaches the service.
        before_plain = await scrape(url)
        async with grpc.aio.insecure_channel(srv.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.RerankServiceStub(ch).Rerank(small_request(1), metadata=token, timeout=5)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

        # The metrics endpoint (plain HTTP, separate port) counts calls by method and code.
        text = await asyncio.to_thread(fetch_metrics, url)
        after = Scrape(text)
        assert "# TYPE lychee_requests_total counter" in text
        assert after.requests("Rerank", "OK") == 1
        assert after.requests("RerankStream", "OK") == 1
        assert after.requests("Rerank", "UNAUTHENTICATED") == 2
        assert after("lychee_pairs_scored_total") == 4
        assert after("lychee_inflight_pairs") == 0
        assert after.total("lychee_requests_total") == before_plain.total("lychee_requests_total") == 4
