"""Fault tests: the server keeps its promises when callers leave, the device fails, or it is stopped.

Why these faults: they are the ones a shared reranker meets in production — callers that give up
(cancel, deadline), a GPU that runs out of memory on an unlucky batch, an engine bug that raises,
and an orchestrator that sends SIGTERM in the middle of traffic. In each case the promise is the
same: every waiter gets an answer (a result or a precise error) within its deadline, the work of
callers that left is freed, and nothing that was accepted is lost.

The in-process tests drive the real grpc.aio server over real loopback channels, with the real
engine on the tiny checkpoint wrapped by :class:`FaultyEngine`, which injects faults into
``prepare_*`` / ``score`` by marker strings in the request texts, and holds the device with the
harness's gate so batches can be composed deterministically (no sleeps). The drain test runs the
server as a subprocess and sends it a real SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from harness import GatedEngine, running_server, subprocess_server, wait_thread_event
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee_server import errors

pytestmark = pytest.mark.timeout(180)

# Scenario figures, written to build/reliability/faults.json when the module finishes. A scenario
# is recorded as not survived first and flipped only after all of its assertions passed.
SCENARIOS: dict[str, dict[str, Any]] = {}
CALL_TIMEOUT_S = 20.0  # every call's gRPC deadline: a hang shows up as DEADLINE_EXCEEDED, never a stuck test
REPRODUCE = "pytest tests/reliability/test_faults.py"


def scenario(name: str, **figures: Any) -> dict[str, Any]:
    entry = {"survived": False, "command": f"{REPRODUCE}::{name}", **figures}
    SCENARIOS[name] = entry
    return entry


@pytest.fixture(scope="module", autouse=True)
def _faults_report(kit: Any) -> Any:
    yield
    merged = {**kit.read_figures("faults").get("scenarios", {}), **SCENARIOS}
    kit.write_figures(
        "faults",
        {
            "scenarios": merged,
            "survived": sum(1 for s in merged.values() if s["survived"]),
            "total": len(merged),
        },
    )


# --------------------------------------------------------------------------------------------
# Fault injection


class FaultyEngine(GatedEngine):
    """The real engine behind the harness's device gate, plus faults triggered by marker texts.

    * ``oom_above``: ``score`` raises ``DeviceOutOfMemory`` for batches of more pairs than that;
    * ``score_faults``: marker -> exception factory; ``score`` raises it for a batch holding a pair
      whose document text contains the marker (``score_fault_budget`` bounds how many times);
    * ``prepare_faults``: the same for ``prepare_query`` / ``prepare_pair`` on the query / document.

    Each pair remembers which request it belongs to (the query text's first word), so a test can
    check that a failed batch failed exactly the requests it carried.
    """

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self.oom_above: int | None = None
        self.score_faults: dict[str, Callable[[], BaseException]] = {}
        self.score_fault_budget: int | None = None
        self.prepare_faults: dict[str, Callable[[], BaseException]] = {}
        self.ooms_raised = 0
        self.failed_batches: list[set[str]] = []  # request labels of every batch that raised
        self._marks: dict[int, tuple[Any, str, str]] = {}  # id(pair) -> (pair, request label, text)
        self._labels: dict[int, tuple[Any, str]] = {}  # id(prepared query) -> (query, label)

    def reset(self) -> None:
        with self._lock:
            self.oom_above = None
            self.score_faults = {}
            self.score_fault_budget = None
            self.prepare_faults = {}
            self.ooms_raised = 0
            self.failed_batches = []
            self._marks.clear()
            self._labels.clear()
            self.batch_sizes.clear()
        self.gate.open()

    def _prepare_fault(self, text: str | None) -> None:
        for marker, make in self.prepare_faults.items():
            if text and marker in text:
                raise make()

    def prepare_query(self, instruction: str, query: Any, max_length: int, tenant: str = "") -> Any:
        self._prepare_fault(query.text)
        pq = self.inner.prepare_query(instruction, query, max_length, tenant)
        with self._lock:
            self._labels[id(pq)] = (pq, (query.text or "?").split()[0])
        return pq

    def prepare_pair(self, query: Any, document: Any) -> Any:
        self._prepare_fault(document.text)
        pair = self.inner.prepare_pair(query, document)
        with self._lock:
            label = self._labels.get(id(query), (None, "?"))[1]
            self._marks[id(pair)] = (pair, label, document.text or "")
        return pair

    def score(self, pairs: Sequence[Any]) -> list[float]:
        self.batch_sizes.append(len(pairs))  # before the gate: visible once ``gate.entered`` is set
        self.gate.pass_through()
        with self._lock:
            marks = [self._marks.get(id(p), (None, "?", ""))[1:] for p in pairs]
            fault: BaseException | None = None
            if self.oom_above is not None and len(pairs) > self.oom_above:
                fault = errors.DeviceOutOfMemory(f"injected OOM on {len(pairs)} pairs")
            budget_left = self.score_fault_budget is None or self.score_fault_budget > 0
            for marker, make in self.score_faults.items():
                if fault is None and budget_left and any(marker in text for _, text in marks):
                    fault = make()
                    if self.score_fault_budget is not None:
                        self.score_fault_budget -= 1
            if fault is not None:
                if isinstance(fault, errors.DeviceOutOfMemory):
                    self.ooms_raised += 1
                self.failed_batches.append({label for label, _ in marks})
        if fault is not None:
            raise fault
        return list(self.inner.score(pairs))


@dataclass
class Faulty:
    server: Any  # harness.RunningServer
    engine: FaultyEngine


@pytest.fixture(scope="module")
async def faulty(tiny_checkpoint: Path, tiny_engine: Any) -> AsyncIterator[Faulty]:
    """One in-process server for the module; small batches so a request set spans several."""
    engine = FaultyEngine(tiny_engine)
    async with running_server(
        tiny_checkpoint, engine=engine, warmup=False, max_batch_pairs=8, decode_threads=2
    ) as srv:
        yield Faulty(srv, engine)


@pytest.fixture
async def fx(faulty: Faulty, kit: Any) -> AsyncIterator[Faulty]:
    """The module server with no faults armed and an idle scheduler, before and after each test."""
    faulty.engine.reset()
    yield faulty
    faulty.engine.reset()
    await idle(kit, faulty.server.metrics_url)


async def idle(kit: Any, url: str) -> dict[str, float]:
    """Wait until no pair is admitted, queued or being prepared (the work of every caller is freed)."""

    gauges = (
        "lychee_inflight_pairs",
        "lychee_inflight_requests",
        "lychee_queue_depth",
        "lychee_preparing_pairs",
    )

    def check(m: dict[str, float]) -> bool:
        return all(kit.metric_sum(m, name) == 0 for name in gauges)

    return dict(await kit.wait_for(lambda: kit.scrape(url), check, within=15, what="an idle scheduler"))


def text_request(label: str, docs: Sequence[str]) -> pb.RerankRequest:
    """A text request whose query starts with ``label`` (how FaultyEngine names requests)."""
    return pb.RerankRequest(
        query=pb.Content(text=f"{label} wooden desk lamp"),
        documents=[pb.Document(id=f"{label}-{i}", content=pb.Content(text=t)) for i, t in enumerate(docs)],
    )


async def settle(kit: Any, call: Any, limit: float = CALL_TIMEOUT_S + 5) -> tuple[str, Any]:
    """Await a call with a hard bound; a waiter that never gets an answer fails the test here."""
    try:
        response = await asyncio.wait_for(call, limit)
    except grpc.aio.AioRpcError as err:
        failure = kit.decode_failure(err)
        return failure.label, failure
    except TimeoutError:
        return "HUNG", None
    except asyncio.CancelledError:
        # A call the test cancelled itself raises CancelledError; anything else is our own task
        # being cancelled and must propagate.
        task = asyncio.current_task()
        if call.cancelled() and (task is None or not task.cancelling()):
            return "CANCELLED/-", None
        raise
    return "OK", response


async def admit_in_order(
    kit: Any, stub: Any, url: str, requests: Sequence[pb.RerankRequest], base_queue: int
) -> list[Any]:
    """Send requests one by one, each only after the previous one's pairs are all queued.

    With the device held by the gate this fixes the queue order, hence the batches that form when
    the gate opens — the precondition for checking *which* requests a failing batch may fail.
    """
    calls = []
    queued = base_queue
    for req in requests:
        calls.append(stub.Rerank(req, timeout=CALL_TIMEOUT_S))
        queued += len(req.documents)
        target = queued
        await kit.wait_for(
            lambda: kit.scrape(url),
            lambda m, t=target: kit.metric_sum(m, "lychee_queue_depth") >= t,
            within=15,
            what=f"{target} queued pairs",
        )
    return calls


async def hold_device(kit: Any, fx: Faulty, stub: Any) -> Any:
    """Close the gate and park one 1-document request on the device; returns its call."""
    fx.engine.gate.close()
    blocker = stub.Rerank(text_request("blocker", ["red shoe"]), timeout=CALL_TIMEOUT_S)
    await wait_thread_event(fx.engine.gate.entered, 15)
    return blocker


# --------------------------------------------------------------------------------------------
# Callers that leave


async def test_cancelled_and_expired_callers_free_their_work(fx: Faulty, kit: Any, workload: Any) -> None:
    """Cancel a unary call on the device, a finished-upload stream in the queue and a half-sent
    stream, and let a queued call's deadline expire: their pairs leave the gauges and never reach
    the device, and the server then answers a fresh call."""
    fig = scenario("test_cancelled_and_expired_callers_free_their_work")
    url = fx.server.metrics_url
    before = kit.scrape(url)
    async with kit.open_stub(fx.server.address) as stub:
        fx.engine.gate.close()
        call_a = stub.Rerank(text_request("alpha", ["red shoe", "blue lamp", "steel desk"]), timeout=30)
        await wait_thread_event(fx.engine.gate.entered, 15)
        on_device = fx.engine.batch_sizes[0]

        req_b = text_request("bravo", ["cotton chair", "red bottle", "blue shoe", "wooden lamp"])
        call_b = stub.RerankStream(iter(workload.stream(req_b)), timeout=30)
        call_d = stub.Rerank(text_request("delta", ["steel lamp", "red desk"]), timeout=3.0)
        queued_target = (3 - on_device) + 4 + 2
        m = await kit.wait_for(
            lambda: kit.scrape(url),
            lambda m: kit.metric_sum(m, "lychee_queue_depth") >= queued_target,
            within=15,
            what="the cancelled callers' pairs to be queued",
        )
        fig["peak_inflight_pairs"] = int(kit.metric_sum(m, "lychee_inflight_pairs"))
        fig["peak_inflight_requests"] = int(kit.metric_sum(m, "lychee_inflight_requests"))

        # D's deadline expires while it waits behind the held device.
        code_d, _ = await settle(kit, call_d)
        assert code_d.startswith("DEADLINE_EXCEEDED"), code_d

        # C: a stream cut off in the middle of an item's bytes.
        hold = asyncio.Event()
        sent = asyncio.Event()

        async def half_stream() -> AsyncIterator[pb.RerankStreamRequest]:
            yield pb.RerankStreamRequest(header=pb.StreamHeader(query=req_b.query, document_count=2))
            yield pb.RerankStreamRequest(item=pb.ItemStart(text_bytes=1000))
            yield pb.RerankStreamRequest(chunk=pb.ItemChunk(text=b"x" * 10))
            sent.set()
            await hold.wait()

        call_c = stub.RerankStream(half_stream(), timeout=30)
        await asyncio.wait_for(sent.wait(), 10)
        for call in (call_a, call_b, call_c):
            call.cancel()
        outcomes = [await settle(kit, c) for c in (call_a, call_b, call_c)]
        assert [code for code, _ in outcomes] == ["CANCELLED/-"] * 3, outcomes

        # With the device still held, only A's pairs (pinned by its batch) may remain in flight.
        await kit.wait_for(
            lambda: kit.scrape(url),
            lambda m: (
                kit.metric_sum(m, "lychee_inflight_requests") == 1
                and kit.metric_sum(m, "lychee_queue_depth") == 0
            ),
            within=15,
            what="cancelled work to leave the queue while the device is held",
        )
        t_open = time.monotonic()
        fx.engine.gate.open()
        after = await idle(kit, url)
        fig["seconds_to_zero_after_device_freed"] = round(time.monotonic() - t_open, 3)

        # Only the batch that was already on the device ran; nobody else's pairs were scored.
        assert fx.engine.batch_sizes == [on_device]
        scored = kit.metric_sum(after, "lychee_pairs_scored_total") - kit.metric_sum(
            before, "lychee_pairs_scored_total"
        )
        dropped = kit.metric_sum(after, "lychee_pairs_dropped_total") - kit.metric_sum(
            before, "lychee_pairs_dropped_total"
        )
        assert scored == on_device
        assert dropped == queued_target
        fig.update(pairs_scored=int(scored), pairs_dropped=int(dropped), callers_left=4)

        fresh = await stub.Rerank(text_request("echo", ["blue desk", "red lamp"]), timeout=CALL_TIMEOUT_S)
        assert kit.check_ranking(fresh.results, 2) is None
    hold.set()
    fig["survived"] = True


# --------------------------------------------------------------------------------------------
# Device and engine failures


async def test_device_oom_is_split_and_every_request_answered(fx: Faulty, kit: Any, workload: Any) -> None:
    """OOM on every batch of more than 2 pairs: the scheduler halves batches until they fit, so
    every request (text and image, unary and stream) is answered with the same scores as before."""
    fig = scenario("test_device_oom_is_split_and_every_request_answered")
    url = fx.server.metrics_url
    rng = random.Random(7)
    reqs = [workload.request(rng, 8, with_images=i % 2 == 1) for i in range(6)]
    async with kit.open_stub(fx.server.address) as stub:
        baseline = [await stub.Rerank(r, timeout=CALL_TIMEOUT_S) for r in reqs]
        splits_before = kit.metric_sum(kit.scrape(url), "lychee_oom_splits_total")

        fx.engine.oom_above = 2
        calls = [
            stub.Rerank(r, timeout=CALL_TIMEOUT_S)
            if i % 2 == 0
            else stub.RerankStream(iter(workload.stream(r)), timeout=CALL_TIMEOUT_S)
            for i, r in enumerate(reqs)
        ]
        settled = await asyncio.gather(*(settle(kit, c) for c in calls))
    codes = Counter(code for code, _ in settled)
    fig.update(
        requests=len(reqs), pairs=8 * len(reqs), outcomes=dict(codes), ooms_injected=fx.engine.ooms_raised
    )
    assert codes == {"OK": len(reqs)}, codes
    assert fx.engine.ooms_raised > 0
    assert max(fx.engine.batch_sizes) > 2  # the injection really hit batches
    splits = kit.metric_sum(kit.scrape(url), "lychee_oom_splits_total") - splits_before
    assert splits >= fx.engine.ooms_raised
    for (_, got), want in zip(settled, baseline, strict=True):
        assert kit.check_ranking(got.results, 8) is None
        want_scores = {r.index: r.score for r in want.results}
        for r in got.results:
            assert r.score == pytest.approx(want_scores[r.index], abs=1e-4)
    fig.update(oom_splits=int(splits), survived=True)


async def test_oom_on_a_single_pair_fails_only_its_request(fx: Faulty, kit: Any) -> None:
    """A pair that does not fit even alone fails its own request (DEVICE_OUT_OF_MEMORY, cleanly)
    while the requests that shared its batch are split away from it and answered."""
    fig = scenario("test_oom_on_a_single_pair_fails_only_its_request")
    url = fx.server.metrics_url
    fx.engine.score_faults = {"HUGE": lambda: errors.DeviceOutOfMemory("injected OOM on a huge pair")}
    labels = ["r1", "r2", "r3", "r4"]
    docs = {label: ["red shoe", "blue lamp", "steel desk"] for label in labels}
    docs["r2"] = ["red shoe", "HUGE wooden chair", "steel desk"]
    async with kit.open_stub(fx.server.address) as stub:
        blocker = await hold_device(kit, fx, stub)
        calls = await admit_in_order(kit, stub, url, [text_request(x, docs[x]) for x in labels], 0)
        fx.engine.gate.open()
        settled = dict(zip(labels, await asyncio.gather(*(settle(kit, c) for c in calls)), strict=True))
        assert (await settle(kit, blocker))[0] == "OK"
    codes = {label: code for label, (code, _) in settled.items()}
    fig.update(requests=len(labels), outcomes=codes, ooms_injected=fx.engine.ooms_raised)
    assert codes == {"r1": "OK", "r2": "INTERNAL/DEVICE_OUT_OF_MEMORY", "r3": "OK", "r4": "OK"}
    assert fx.engine.failed_batches[0] >= {"r1", "r2"}  # r2 really shared its first batch
    for label in ("r1", "r3", "r4"):
        assert kit.check_ranking(settled[label][1].results, 3) is None
    fig["survived"] = True


async def test_engine_exception_fails_exactly_its_batch_and_nobody_hangs(fx: Faulty, kit: Any) -> None:
    """A RuntimeError from ``score`` (once) fails exactly the requests with pairs in that batch,
    promptly, with INTERNAL/INTERNAL_ERROR; the other requests and the next ones succeed."""
    fig = scenario("test_engine_exception_fails_exactly_its_batch_and_nobody_hangs")
    url = fx.server.metrics_url
    fx.engine.score_faults = {"CRASH": lambda: RuntimeError("injected engine failure")}
    fx.engine.score_fault_budget = 1
    labels = ["s1", "s2", "s3", "s4"]
    docs = {label: ["red shoe", "blue lamp", "steel desk"] for label in labels}
    docs["s4"] = ["CRASH red shoe", "blue lamp", "steel desk"]
    async with kit.open_stub(fx.server.address) as stub:
        blocker = await hold_device(kit, fx, stub)
        calls = await admit_in_order(kit, stub, url, [text_request(x, docs[x]) for x in labels], 0)
        t0 = time.monotonic()
        fx.engine.gate.open()
        settled = dict(zip(labels, await asyncio.gather(*(settle(kit, c) for c in calls)), strict=True))
        elapsed = time.monotonic() - t0
        assert (await settle(kit, blocker))[0] == "OK"
        # The same texts succeed once the fault is spent: the server recovered.
        again = await settle(kit, stub.Rerank(text_request("s5", docs["s4"]), timeout=CALL_TIMEOUT_S))
    # 12 pairs in batches of 8 in queue order: [s1 s2 s3(2)] [s3(1) s4] -> s3 and s4 share the failure.
    failed_batch = fx.engine.failed_batches[0]
    codes = {label: code for label, (code, _) in settled.items()}
    fig.update(
        requests=len(labels), outcomes=codes, failed_batch=sorted(failed_batch), seconds=round(elapsed, 3)
    )
    assert failed_batch == {"s3", "s4"}
    assert codes == {x: ("INTERNAL/INTERNAL_ERROR" if x in failed_batch else "OK") for x in labels}
    assert again[0] == "OK"
    assert elapsed < CALL_TIMEOUT_S / 2  # answered promptly, not by a deadline
    fig["survived"] = True


async def test_preparation_failures_fail_only_their_request(fx: Faulty, kit: Any) -> None:
    """An engine exception while preparing a query or a document (tokenizing, decoding) fails that
    request with INTERNAL and never strands its other pairs or the concurrent requests."""
    fig = scenario("test_preparation_failures_fail_only_their_request")
    fx.engine.prepare_faults = {
        "BADQUERY": lambda: RuntimeError("injected query preparation failure"),
        "BADDOC": lambda: RuntimeError("injected document preparation failure"),
    }
    reqs = {
        "p1": text_request("p1", ["red shoe", "blue lamp"]),
        "p2": text_request("p2", ["red shoe", "BADDOC lamp", "steel desk", "wooden chair"]),
        "p3": pb.RerankRequest(
            query=pb.Content(text="p3 BADQUERY"), documents=[pb.Document(content=pb.Content(text="red shoe"))]
        ),
        "p4": text_request("p4", ["steel desk"]),
    }
    async with kit.open_stub(fx.server.address) as stub:
        calls = {k: stub.Rerank(r, timeout=CALL_TIMEOUT_S) for k, r in reqs.items()}
        settled = {k: await settle(kit, c) for k, c in calls.items()}
    codes = {k: code for k, (code, _) in settled.items()}
    fig.update(requests=len(reqs), outcomes=codes)
    assert codes == {"p1": "OK", "p2": "INTERNAL/INTERNAL_ERROR", "p3": "INTERNAL/INTERNAL_ERROR", "p4": "OK"}
    fig["survived"] = True


async def test_engine_exception_text_does_not_reach_the_caller(fx: Faulty, kit: Any) -> None:
    """Exception text can hold paths or user data (edge/status.py's rule): the INTERNAL status a
    caller sees must not repeat it."""
    fig = scenario("test_engine_exception_text_does_not_reach_the_caller")
    secret = "/srv/lychee/secret-weights.bin"
    fx.engine.score_faults = {"LEAK": lambda: RuntimeError(f"cannot read {secret}")}
    fx.engine.prepare_faults = {"PLEAK": lambda: RuntimeError(f"cannot read {secret}")}
    async with kit.open_stub(fx.server.address) as stub:
        score_fail = await settle(kit, stub.Rerank(text_request("l1", ["LEAK shoe"]), timeout=CALL_TIMEOUT_S))
        prep_fail = await settle(kit, stub.Rerank(text_request("l2", ["PLEAK shoe"]), timeout=CALL_TIMEOUT_S))
    leaks = {}
    for where, (code, failure) in {"score": score_fail, "prepare": prep_fail}.items():
        assert code == "INTERNAL/INTERNAL_ERROR", code
        leaks[where] = secret in failure.details
    fig["leaked"] = leaks
    assert not any(leaks.values()), f"exception text reached the caller: {leaks}"
    fig["survived"] = True


# --------------------------------------------------------------------------------------------
# SIGTERM drain (subprocess)

# grpc artifacts for calls the server's handler never ran (so the server never accepted them):
# * grpc/grpc#41785: calls still pending in grpc core (not yet matched to a handler) when the
#   server shuts down end with CANCELLED instead of UNAVAILABLE;
# * grpc/grpc#36066: when a server ends a client stream before the client half-closed (here:
#   SHUTTING_DOWN for a stream opened during the drain), the aio client may report INTERNAL
#   "Internal error from Core" instead of the server's status.
_PENDING_CANCELLED = ("CANCELLED/-", "CANCELLED")
_CLIENT_MASKED = ("INTERNAL/-", "Internal error from Core")


@dataclass
class CallRecord:
    request_id: str
    kind: str  # unary | stream
    start: float
    end: float
    label: str  # "OK" or CODE/REASON as the caller saw it
    details: str = ""
    problem: str | None = None  # a wrong answer on an OK status


def server_verdicts(lines: Sequence[str]) -> dict[str, str]:
    """request_id -> gRPC code, from the server's own JSON request log (one line per RPC)."""
    out: dict[str, str] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message") == "rpc" and "request_id" in record:
            out[str(record["request_id"])] = str(record.get("code"))
    return out


def judge(rec: CallRecord, server_code: str | None) -> str:
    """Classify one call of the drain test (see the test's docstring)."""
    if server_code is None:  # the handler never ran: the server did not take this call on
        if rec.label.startswith("UNAVAILABLE") or (rec.label, rec.details) == _PENDING_CANCELLED:
            return "not_accepted"
        return "lost"
    if server_code == "UNAVAILABLE":  # the handler refused it: SHUTTING_DOWN at the door
        if rec.label.startswith("UNAVAILABLE"):  # the reason may not survive the socket closing
            return "refused"
        if rec.kind == "stream" and (rec.label, rec.details) == _CLIENT_MASKED:
            return "refused_masked_by_client"
        return "lost"
    if server_code == "OK" and rec.label == "OK" and rec.problem is None:
        return "answered"
    return "lost"


async def test_sigterm_drains_without_losing_accepted_requests(
    tiny_checkpoint: Path, kit: Any, workload: Any
) -> None:
    """SIGTERM under load: no accepted request is lost, new ones are refused, exit 0 within the grace.

    Each call carries its own ``x-request-id``; the server logs one JSON line per RPC with that id
    and the code it sent, so every call is judged against the server's own verdict:

    * accepted (the server's handler ran and did not refuse it) -> must be OK on both sides with a
      real ranking;
    * refused by the handler (UNAVAILABLE / SHUTTING_DOWN) -> the caller must see UNAVAILABLE (the
      reason may be lost when the socket closes first), or grpc/grpc#36066's INTERNAL for a stream;
    * never reached a handler -> the caller must see UNAVAILABLE (or grpc/grpc#41785's CANCELLED).

    Anything else is a lost request.
    """
    fig = scenario("test_sigterm_drains_without_losing_accepted_requests")
    grace = 20.0
    clients = 12
    env = {"LYCHEE_GRACE_PERIOD_S": str(grace), "LYCHEE_LOG_LEVEL": "INFO", "LYCHEE_DECODE_THREADS": "2"}
    records: list[CallRecord] = []
    signalled = asyncio.Event()

    async def client(address: str, idx: int, stop_at: float) -> None:
        rng = random.Random(1000 + idx)
        async with kit.open_stub(address) as stub:
            for n in range(10_000):
                if time.monotonic() > stop_at:
                    return
                req = workload.request(rng, rng.randint(6, 10), with_images=n % 3 == 0)
                rid = f"drain-{idx}-{n}"
                md = (("x-request-id", rid),)
                kind = "unary" if n % 2 else "stream"
                call = (
                    stub.Rerank(req, timeout=CALL_TIMEOUT_S, metadata=md)
                    if kind == "unary"
                    else stub.RerankStream(iter(workload.stream(req)), timeout=CALL_TIMEOUT_S, metadata=md)
                )
                start = time.monotonic()
                label, payload = await settle(kit, call)
                rec = CallRecord(rid, kind, start, time.monotonic(), label)
                if label == "OK":
                    rec.problem = kit.check_ranking(payload.results, len(req.documents))
                elif payload is not None:
                    rec.details = payload.details
                records.append(rec)
                if label != "OK" and signalled.is_set():
                    return  # this caller saw the drain; a real one would go to another replica

    with subprocess_server(tiny_checkpoint, env=env) as srv:
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        stop_at = time.monotonic() + grace + 40
        tasks = [asyncio.create_task(client(srv.address, i, stop_at)) for i in range(clients)]
        await kit.wait_for(
            lambda: (sum(r.label == "OK" for r in records), kit.scrape(url)),
            lambda v: v[0] >= 3 * clients and kit.metric_sum(v[1], "lychee_inflight_requests") >= 2,
            within=60,
            what="steady load with requests in flight",
        )
        t_signal = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        signalled.set()
        rc = await asyncio.to_thread(srv.proc.wait, grace + 30)
        exit_s = time.monotonic() - t_signal
        await asyncio.wait_for(asyncio.gather(*tasks), CALL_TIMEOUT_S + 30)
        lines = list(srv.lines)
    # The reader thread has seen EOF once the process exited (subprocess_server joins it on exit).
    verdicts = server_verdicts(lines)
    judged = [(rec, judge(rec, verdicts.get(rec.request_id))) for rec in records]
    tally = Counter(v for _, v in judged)
    in_flight = [(r, v) for r, v in judged if r.start < t_signal < r.end]
    lost = [r for r, v in judged if v == "lost"]
    fig.update(
        clients=clients,
        grace_period_s=grace,
        requests=len(records),
        server_logged=sum(1 for r in records if r.request_id in verdicts),
        accepted=tally["answered"] + tally["lost"],
        answered=tally["answered"],
        in_flight_at_sigterm=len(in_flight),
        in_flight_answered=sum(v == "answered" for _, v in in_flight),
        refused_unavailable=tally["refused"],
        refused_labels=dict(Counter(r.label for r, v in judged if v == "refused")),
        refused_masked_by_client_grpc_36066=tally["refused_masked_by_client"],
        not_accepted=tally["not_accepted"],
        not_accepted_labels=dict(Counter(r.label for r, v in judged if v == "not_accepted")),
        sent_after_sigterm=sum(r.start >= t_signal for r in records),
        lost=len(lost),
        lost_examples=[
            f"{r.kind} {r.request_id} +{r.start - t_signal:.3f}s..+{r.end - t_signal:.3f}s "
            f"client={r.label} server={verdicts.get(r.request_id)} {r.details} {r.problem or ''}"
            for r in lost[:5]
        ],
        exit_code=rc,
        exit_seconds_after_sigterm=round(exit_s, 2),
    )
    assert fig["server_logged"] > 0, "no request log from the server: cannot judge the calls"
    assert sum(v == "answered" for _, v in in_flight) >= 1, "nothing was in flight at SIGTERM"
    assert not lost, fig["lost_examples"]
    refusals = tally["refused"] + tally["refused_masked_by_client"] + tally["not_accepted"]
    assert refusals >= 1, "no call was refused: the drain was not exercised"
    assert rc == 0, f"server exit code {rc}"
    assert exit_s < grace, "the server waited out the whole grace period instead of draining"
    fig["survived"] = True
