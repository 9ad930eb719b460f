"""Scheduler behaviour against the in-memory engine double (no model, no gRPC).

The device "gate" of :class:`harness.FakeEngine` holds a batch on the device thread, so the tests
build exact situations (work queued behind a running batch) and never sleep to win a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest

from harness import FakeEngine, eventually, wait_thread_event
from lychee_server import errors
from lychee_server.domain import Content, Document, ImageInput, MediaType, RerankJob, RerankOptions, ScoreKind
from lychee_server.scheduler import Scheduler
from lychee_server.settings import Settings

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0


def make_job(
    *texts: str,
    top_n: int | None = None,
    kind: ScoreKind = ScoreKind.LOGIT,
    return_text: bool = False,
    max_length: int = 3200,
    ids: list[str | None] | None = None,
    query: Content | None = None,
    images: set[int] | frozenset[int] = frozenset(),
) -> RerankJob:
    docs = []
    for i, text in enumerate(texts):
        image = ImageInput(b"\x89PNG", MediaType.PNG) if i in images else None
        docs.append(Document(Content(text=text, image=image), id=ids[i] if ids else None))
    return RerankJob(
        instruction="inst",
        query=query or Content(text="q"),
        documents=tuple(docs),
        options=RerankOptions(top_n=top_n, score_kind=kind, max_length=max_length, return_text=return_text),
    )


@contextlib.asynccontextmanager
async def running(engine: FakeEngine, **overrides: Any) -> AsyncIterator[Scheduler]:
    values: dict[str, Any] = {"decode_threads": 2, "max_batch_wait_ms": 0.0}
    values.update(overrides)
    sched = Scheduler(engine, Settings(**values))
    await sched.start()
    try:
        yield sched
    finally:
        engine.gate.open()
        await sched.stop()


def sample(sched: Scheduler, name: str, labels: dict[str, str] | None = None) -> float:
    value = sched.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def hold_device(engine: FakeEngine, sched: Scheduler, text: str = "0") -> asyncio.Task[Any]:
    """Start a 1-document request and wait until its batch is held on the device thread."""
    engine.gate.close()
    task = asyncio.create_task(sched.rerank(make_job(text)))
    await wait_thread_event(engine.gate.entered)
    return task


async def test_ranking_ties_top_n_text_ids_usage() -> None:
    engine = FakeEngine(prefix_tokens=5)
    async with running(engine) as sched:
        job = make_job(
            "1.0", "3.0", "1.0", "2.0",
            top_n=3, return_text=True, ids=["a", None, "c", "d"], max_length=2,
            query=Content(text="q", image=ImageInput(b"x", MediaType.JPEG)), images={3},
        )  # fmt: skip
        result = await asyncio.wait_for(sched.rerank(job), WAIT)
    assert [r.index for r in result.results] == [1, 3, 0]  # tie 0/2 keeps input order
    assert [r.score for r in result.results] == [3.0, 2.0, 1.0]
    assert [r.id for r in result.results] == [None, "d", "a"]
    assert [r.text for r in result.results] == ["3.0", "2.0", "1.0"]
    assert all(r.truncated for r in result.results)  # 3 chars > max_length 2
    assert result.usage.pairs == 4
    assert result.usage.tokens == 4 * (2 + 5)  # truncated to max_length, plus the prefix
    assert result.usage.images == 2  # query image once + one document image
    assert result.usage.truncated_documents == 4
    assert result.model == "fake-lychee"
    t = result.timings
    assert t.queue >= 0 and t.preprocessing > 0 and t.inference > 0 and t.total >= t.inference


async def test_probability_scores_and_no_text_by_default() -> None:
    engine = FakeEngine()
    async with running(engine) as sched:
        result = await asyncio.wait_for(
            sched.rerank(make_job("-1.5", "0.25", kind=ScoreKind.PROBABILITY)), WAIT
        )
    assert [r.index for r in result.results] == [1, 0]
    assert math.isclose(result.results[0].score, 0.5621765008857981)  # 1 / (1 + e^-0.25), by hand
    assert math.isclose(result.results[1].score, 0.18242552380635635)  # 1 / (1 + e^1.5)
    assert all(r.text is None for r in result.results)


async def test_concurrent_requests_share_a_batch() -> None:
    engine = FakeEngine()
    async with running(engine, max_batch_pairs=8) as sched:
        held = await hold_device(engine, sched)
        b = asyncio.create_task(sched.rerank(make_job("b1", "b2", "b3")))
        c = asyncio.create_task(sched.rerank(make_job("c1", "c2", "c3")))
        await eventually(lambda: sched.queue_depth == 6, WAIT, "6 queued pairs")
        assert sample(sched, "lychee_queue_depth") == 6
        engine.gate.open()
        rb, rc = await asyncio.wait_for(asyncio.gather(b, c), WAIT)
        await asyncio.wait_for(held, WAIT)
    assert sorted(engine.batches[1]) == ["b1", "b2", "b3", "c1", "c2", "c3"]
    assert len(engine.batches) == 2
    assert {r.index for r in rb.results} == {0, 1, 2} and {r.index for r in rc.results} == {0, 1, 2}
    assert sample(sched, "lychee_batch_pairs_count") == 2
    assert sample(sched, "lychee_batch_pairs_sum") == 7
    assert sample(sched, "lychee_pairs_scored_total") == 7


async def test_batch_waits_to_fill_only_while_pairs_are_coming() -> None:
    engine = FakeEngine()
    async with running(engine, max_batch_pairs=4, max_batch_wait_ms=5000) as sched:
        # Both requests are admitted before any pair is ready, so the batch waits for the second
        # one (full at 4 pairs) instead of leaving with the first two.
        await asyncio.wait_for(
            asyncio.gather(sched.rerank(make_job("a1", "a2")), sched.rerank(make_job("b1", "b2"))), WAIT
        )
        assert sorted(engine.batches[0]) == ["a1", "a2", "b1", "b2"]
        # A lone request: nothing else is being prepared, so it must not sit out the 5 s wait.
        t0 = time.monotonic()
        await asyncio.wait_for(sched.rerank(make_job("c1", "c2")), WAIT)
        assert time.monotonic() - t0 < 2.5


async def test_token_budget_with_padding_and_prefix() -> None:
    engine = FakeEngine()
    async with running(engine, batch_token_budget=64, max_batch_pairs=64) as sched:
        held = await hold_device(engine, sched)
        # Padded cost = pairs * longest: 10 + 30 fit (60); adding another 10 would cost 90.
        texts = ["a" * 10, "b" * 30, "c" * 10, "d" * 10, "e" * 10, "f" * 100]
        task = asyncio.create_task(sched.rerank(make_job(*texts)))
        await eventually(lambda: sched.queue_depth == len(texts), WAIT, "all pairs queued")
        engine.gate.open()
        await asyncio.wait_for(task, WAIT)
        await held
    sizes = [[len(t) for t in batch] for batch in engine.batches[1:]]
    assert sizes == [[10, 30], [10, 10, 10], [100]]  # an over-budget pair still runs, alone
    for batch in sizes[:-1]:
        assert len(batch) * max(batch) <= 64
    assert sample(sched, "lychee_batch_tokens_sum") == 1 + 60 + 30 + 100


async def test_prefix_tokens_count_once_per_request() -> None:
    engine = FakeEngine(prefix_tokens=24)
    async with running(engine, batch_token_budget=64, max_batch_pairs=64) as sched:
        held = await hold_device(engine, sched)
        task = asyncio.create_task(sched.rerank(make_job(*(["x" * 10] * 6))))
        await eventually(lambda: sched.queue_depth == 6, WAIT, "all pairs queued")
        engine.gate.open()
        await asyncio.wait_for(task, WAIT)
        await held
    assert [len(b) for b in engine.batches[1:]] == [4, 2]  # 24 + 4 * 10 = 64


async def test_overload_is_rejected_at_once_and_capacity_returns() -> None:
    engine = FakeEngine()
    async with running(engine, max_inflight_pairs=4, retry_after_s=0.25) as sched:
        held = await hold_device(engine, sched)
        admitted = asyncio.create_task(sched.rerank(make_job("1", "2")))
        await eventually(lambda: sched.inflight_pairs == 3, WAIT, "3 pairs in flight")
        with pytest.raises(errors.ResourceExhausted) as info:
            await asyncio.wait_for(sched.rerank(make_job("3", "4")), 1.0)
        assert info.value.reason == "OVERLOADED"
        assert info.value.retry_after == 0.25
        assert sample(sched, "lychee_rejected_requests_total", {"reason": "OVERLOADED"}) == 1
        last = asyncio.create_task(sched.rerank(make_job("5")))  # exactly fills the capacity
        engine.gate.open()
        await asyncio.wait_for(asyncio.gather(held, admitted, last), WAIT)
        assert await sched.wait_idle(WAIT)
        assert sample(sched, "lychee_inflight_pairs") == 0
        # A job larger than the whole capacity is admitted when nothing else is in flight.
        big = await asyncio.wait_for(sched.rerank(make_job(*[str(i) for i in range(10)])), WAIT)
        assert len(big.results) == 10


async def test_deadline_expires_in_queue_and_work_never_reaches_device() -> None:
    engine = FakeEngine()
    async with running(engine) as sched:
        held = await hold_device(engine, sched)
        t0 = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded) as info:
            await asyncio.wait_for(sched.rerank(make_job("late1", "late2"), deadline=t0 + 0.1), WAIT)
        assert info.value.reason == "DEADLINE_EXCEEDED"
        assert not held.done()  # it expired while the device was still busy
        assert sched.queue_depth == 0
        engine.gate.open()
        await asyncio.wait_for(held, WAIT)
        assert await sched.wait_idle(WAIT)
        with pytest.raises(errors.DeadlineExceeded):
            await sched.rerank(make_job("x"), deadline=time.monotonic() - 1)
    assert "late1" not in engine.scored_texts and "late2" not in engine.scored_texts
    assert len(engine.released) == 2  # the expired request's prefix was released too


async def test_cancelled_caller_drops_queued_work() -> None:
    engine = FakeEngine()
    async with running(engine) as sched:
        held = await hold_device(engine, sched)
        task = asyncio.create_task(sched.rerank(make_job("gone1", "gone2", "gone3")))
        await eventually(lambda: sched.queue_depth == 3, WAIT, "3 queued pairs")
        assert sample(sched, "lychee_inflight_pairs") == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sched.queue_depth == 0
        engine.gate.open()
        await asyncio.wait_for(held, WAIT)
        assert await sched.wait_idle(WAIT)
        assert sample(sched, "lychee_inflight_pairs") == 0
        assert sample(sched, "lychee_inflight_requests") == 0
        assert sample(sched, "lychee_pairs_dropped_total") == 3
    assert not any(t.startswith("gone") for t in engine.scored_texts)
    assert len(engine.released) == 2


async def test_cancel_mid_request_skips_its_remaining_batches() -> None:
    engine = FakeEngine()
    async with running(engine, max_batch_pairs=2) as sched:
        engine.gate.close()
        task = asyncio.create_task(sched.rerank(make_job(*[f"d{i}" for i in range(8)])))
        await wait_thread_event(engine.gate.entered)  # the first batch is on the device
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        engine.gate.open()
        assert await sched.wait_idle(WAIT)
        assert sample(sched, "lychee_inflight_pairs") == 0
    assert len(engine.batches) == 1 and 1 <= len(engine.batches[0]) <= 2
    assert len(engine.released) == 1


async def test_failed_batch_fails_exactly_its_requests() -> None:
    engine = FakeEngine(fail_when=["boom"])
    async with running(engine, max_batch_pairs=3) as sched:
        held = await hold_device(engine, sched)
        b = asyncio.create_task(sched.rerank(make_job("boom", "1")))
        await eventually(lambda: sched.queue_depth == 2, WAIT, "b queued")
        c = asyncio.create_task(sched.rerank(make_job("2")))
        await eventually(lambda: sched.queue_depth == 3, WAIT, "c queued")
        d = asyncio.create_task(sched.rerank(make_job("3", "4")))
        await eventually(lambda: sched.queue_depth == 5, WAIT, "d queued")
        engine.gate.open()
        done = await asyncio.wait_for(asyncio.gather(held, b, c, d, return_exceptions=True), WAIT)
        assert await sched.wait_idle(WAIT)
    _, rb, rc, rd = done
    for err in (rb, rc):  # both had pairs in the failed batch [boom, 1, 2]
        assert isinstance(err, errors.InternalError) and not isinstance(err, errors.DeviceOutOfMemory)
        assert err.reason == "INTERNAL_ERROR"
        assert isinstance(err.__cause__, RuntimeError)
    assert not isinstance(rd, BaseException)
    assert [r.index for r in rd.results] == [1, 0]


async def test_prepare_error_is_rerooted_at_the_document() -> None:
    engine = FakeEngine()
    async with running(engine) as sched:
        with pytest.raises(errors.InvalidInput) as info:
            await asyncio.wait_for(sched.rerank(make_job("1", "2", "3", "bad image")), WAIT)
        assert info.value.reason == "IMAGE_DECODE_FAILED"
        assert [v.field for v in info.value.violations] == ["documents[3].image"]
        assert await sched.wait_idle(WAIT)
        ok = await asyncio.wait_for(sched.rerank(make_job("1")), WAIT)  # the scheduler carries on
    assert ok.results[0].score == 1.0
    assert len(engine.released) == 2


async def test_oom_splits_batch_and_retries() -> None:
    engine = FakeEngine(oom_above=2)
    async with running(engine, max_batch_pairs=8) as sched:
        held = await hold_device(engine, sched)
        task = asyncio.create_task(sched.rerank(make_job(*[str(i) for i in range(8)])))
        await eventually(lambda: sched.queue_depth == 8, WAIT, "8 queued pairs")
        engine.gate.open()
        result = await asyncio.wait_for(task, WAIT)
        await held
        assert [r.index for r in result.results] == list(range(7, -1, -1))
        assert sample(sched, "lychee_oom_splits_total") == 3  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
        assert sample(sched, "lychee_pairs_scored_total") == 9


async def test_oom_on_single_pairs_fails_with_device_out_of_memory() -> None:
    engine = FakeEngine(oom_above=0)
    async with running(engine) as sched:
        with pytest.raises(errors.DeviceOutOfMemory) as info:
            await asyncio.wait_for(sched.rerank(make_job("1", "2", "3")), WAIT)
        assert info.value.reason == "DEVICE_OUT_OF_MEMORY"
        assert isinstance(info.value.__cause__, errors.DeviceOutOfMemory)
        assert await sched.wait_idle(WAIT)


async def test_stop_resolves_every_waiter() -> None:
    engine = FakeEngine()
    sched = Scheduler(engine, Settings(decode_threads=2, max_batch_wait_ms=0))
    with pytest.raises(errors.Unavailable) as info:
        await sched.rerank(make_job("1"))
    assert info.value.reason == "NOT_READY"
    await sched.start()
    held = await hold_device(engine, sched)
    queued = asyncio.create_task(sched.rerank(make_job("2", "3")))
    await eventually(lambda: sched.queue_depth == 2, WAIT, "queued")
    await asyncio.wait_for(sched.stop(), WAIT)
    for task in (held, queued):
        with pytest.raises(errors.Unavailable) as info:
            await asyncio.wait_for(task, WAIT)
        assert info.value.reason == "SHUTTING_DOWN"
    engine.gate.open()
    with pytest.raises(errors.Unavailable):
        await sched.rerank(make_job("4"))


async def test_drain_lets_admitted_work_finish() -> None:
    engine = FakeEngine()
    sched = Scheduler(engine, Settings(decode_threads=2, max_batch_wait_ms=0))
    await sched.start()
    held = await hold_device(engine, sched, "7")
    drain = asyncio.create_task(sched.drain(WAIT))
    await eventually(lambda: not sched.running, WAIT, "draining")
    with pytest.raises(errors.Unavailable) as info:
        await sched.rerank(make_job("1"))
    assert info.value.reason == "SHUTTING_DOWN"
    engine.gate.open()
    result = await asyncio.wait_for(held, WAIT)
    assert result.results[0].score == 7.0
    await asyncio.wait_for(drain, WAIT)


class _ImageErrorEngine(FakeEngine):  # type: ignore[misc]  # harness is not on mypy_path
    """An engine whose image error names no field (as a decoder error might)."""

    def prepare_pair(self, query: Any, document: Content) -> Any:
        if document.image is not None:
            raise errors.InvalidInput("image could not be decoded", reason="IMAGE_DECODE_FAILED")
        return super().prepare_pair(query, document)


async def test_fieldless_image_error_points_at_the_image() -> None:
    async with running(_ImageErrorEngine()) as sched:
        with pytest.raises(errors.InvalidInput) as info:
            await asyncio.wait_for(sched.rerank(make_job("1", "2", images={1})), WAIT)
        assert [v.field for v in info.value.violations] == ["documents[1].image"]
        assert info.value.reason == "IMAGE_DECODE_FAILED"


class _HeldPrepEngine(FakeEngine):  # type: ignore[misc]  # harness is not on mypy_path
    """Preparing the document "held" waits for ``release_prep``; every pair is tracked weakly."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release_prep = threading.Event()
        self.pair_refs: dict[str, weakref.ref[Any]] = {}

    def prepare_pair(self, query: Any, document: Content) -> Any:
        if document.text == "held" and not self.release_prep.wait(WAIT):
            raise RuntimeError("test never released the preparation")
        pair = super().prepare_pair(query, document)
        self.pair_refs[document.text or ""] = weakref.ref(pair)
        return pair


async def test_scored_pairs_are_freed_before_the_request_finishes() -> None:
    # A prepared pair can hold megabytes (decoded image patches): once scored, the scheduler must
    # not keep it alive until the request's last pair is done.
    engine = _HeldPrepEngine(prefix_tokens=2)
    async with running(engine, max_batch_pairs=1) as sched:
        task = asyncio.create_task(sched.rerank(make_job("1.5", "held", max_length=3, images={0})))
        await eventually(lambda: sample(sched, "lychee_pairs_scored_total") == 1, WAIT, "first pair scored")
        gc.collect()
        assert engine.pair_refs["1.5"]() is None, "a scored pair is still referenced"
        assert not task.done()
        engine.release_prep.set()
        result = await asyncio.wait_for(task, WAIT)
    # What the answer needed from the freed pair survived it.
    assert [(r.index, r.truncated) for r in result.results] == [(0, False), (1, True)]
    assert result.usage.tokens == (3 + 2) + (3 + 2)
    assert result.usage.images == 1
    assert result.usage.truncated_documents == 1


async def test_a_failed_batch_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine(fail_when=["boom"])
    async with running(engine, max_batch_pairs=8) as sched:
        held = await hold_device(engine, sched)
        a = asyncio.create_task(sched.rerank(make_job("boom", "1", "2")))
        b = asyncio.create_task(sched.rerank(make_job("3", "4")))
        await eventually(lambda: sched.queue_depth == 5, WAIT, "both queued")
        with caplog.at_level(logging.ERROR, logger="lychee_server.scheduler.core"):
            engine.gate.open()
            done = await asyncio.wait_for(asyncio.gather(held, a, b, return_exceptions=True), WAIT)
        assert await sched.wait_idle(WAIT)
    assert all(isinstance(r, errors.InternalError) for r in done[1:])
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]  # not one per pair or request


async def test_a_failure_while_answering_still_retires_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
    async with running(engine, max_batch_pairs=8) as sched:
        held = await hold_device(engine, sched)
        a = asyncio.create_task(sched.rerank(make_job("1")))
        b = asyncio.create_task(sched.rerank(make_job("2")))
        await eventually(lambda: sched.queue_depth == 2, WAIT, "both queued")
        finish = sched._finish
        calls = 0

        def flaky_finish(req: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:  # the first request of the shared batch
                raise RuntimeError("bug while answering")
            finish(req)

        monkeypatch.setattr(sched, "_finish", flaky_finish)
        engine.gate.open()
        await asyncio.wait_for(asyncio.gather(held, a, b, return_exceptions=True), WAIT)
        # Whatever each caller got, nothing may stay admitted (capacity) or unreleased.
        assert await sched.wait_idle(WAIT), f"{sched.inflight_pairs} pairs never retired"
    assert len(engine.released) == 3


async def test_prefix_memory_of_admitted_requests_bounds_admission() -> None:
    """Live shared-prefix K/V (issue 12): past ``max_prefix_kv_mib`` new calls get OVERLOADED +
    RetryInfo while others are in flight, and are admitted again once the engine has released it."""
    engine = FakeEngine()
    async with running(engine, max_prefix_kv_mib=1, retry_after_s=0.25) as sched:
        held = await hold_device(engine, sched)
        engine.live_prefix_bytes = 2 * 2**20  # type: ignore[attr-defined]
        with pytest.raises(errors.ResourceExhausted) as info:
            await asyncio.wait_for(sched.rerank(make_job("1")), 1.0)
        assert info.value.reason == "OVERLOADED" and info.value.retry_after == 0.25
        assert "shared prefixes" in info.value.message and "limit 1 MiB" in info.value.message
        engine.live_prefix_bytes = 2**20  # type: ignore[attr-defined]  # at the limit: admitted
        admitted = asyncio.create_task(sched.rerank(make_job("2")))
        engine.gate.open()
        await asyncio.wait_for(asyncio.gather(held, admitted), WAIT)


async def test_light_pairs_overtake_heavy_ones_and_never_share_their_batch() -> None:
    """The two-lane queue (issue 14): while an image-heavy request waits for the device, a later
    text request goes first and is not batched with it (it waits only for the batch on the device)."""
    engine = FakeEngine()
    heavy_texts = ["9" * 60 + str(i) for i in range(3)]  # cost 61 tokens each: heavy at 50
    async with running(engine, heavy_pair_tokens=50, heavy_pair_max_wait_s=60.0) as sched:
        held = await hold_device(engine, sched)
        heavy = asyncio.create_task(sched.rerank(make_job(*heavy_texts)))
        await eventually(lambda: sched.queue_depth == 3, WAIT, "heavy pairs queued")
        light = asyncio.create_task(sched.rerank(make_job("1", "2")))
        await eventually(lambda: sched.queue_depth == 5, WAIT, "light pairs queued")
        engine.gate.open()
        await asyncio.wait_for(asyncio.gather(held, heavy, light), WAIT)
    after = engine.batches[1:]
    assert sorted(after[0]) == ["1", "2"]  # queued last, scored first
    assert all(set(b) <= set(heavy_texts) for b in after[1:])
    assert sorted(t for b in after[1:] for t in b) == sorted(heavy_texts)


async def test_heavy_pairs_are_delayed_never_starved() -> None:
    """Once the oldest heavy pair has waited heavy_pair_max_wait_s, every other batch is heavy."""
    engine = FakeEngine()
    async with running(engine, heavy_pair_tokens=50, heavy_pair_max_wait_s=0.0, max_batch_pairs=1) as sched:
        held = await hold_device(engine, sched)
        heavy = asyncio.create_task(sched.rerank(make_job("8" * 60, "9" * 60)))
        await eventually(lambda: sched.queue_depth == 2, WAIT, "heavy pairs queued")
        light = asyncio.create_task(sched.rerank(make_job("1", "2", "3")))
        await eventually(lambda: sched.queue_depth == 5, WAIT, "light pairs queued")
        engine.gate.open()
        await asyncio.wait_for(asyncio.gather(held, heavy, light), WAIT)
    order = ["H" if len(b[0]) > 50 else "L" for b in engine.batches[1:]]
    assert order == ["H", "L", "H", "L", "L"]


class _SteppedEngine(FakeEngine):  # type: ignore[misc]  # harness is not on mypy_path
    """FakeEngine with ``score_steps``: a batch of long texts pauses ``steps`` times; the first
    step of such a batch can be held (``hold_heavy``) so that a test can queue work behind it."""

    def __init__(self, steps: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        self.log: list[str] = []  # "H<i>" for heavy steps, then "H=" when it ends; "L" per light batch
        self.hold_heavy = threading.Event()
        self.hold_heavy.set()
        self.in_heavy = threading.Event()

    def score(self, pairs: Any) -> list[float]:
        self.log.append("L" if all(len(p.text) <= 50 for p in pairs) else "S")
        return super().score(pairs)  # type: ignore[no-any-return]

    def score_steps(self, pairs: Any) -> Any:
        for i in range(self.steps):
            self.log.append(f"H{i}")
            if i == 0:
                self.in_heavy.set()
                assert self.hold_heavy.wait(WAIT)
            if "fail" in pairs[0].text and i == 1:
                raise RuntimeError("fake failure in a step")
            if "oom" in pairs[0].text and i == 1:
                raise errors.DeviceOutOfMemory("fake OOM in a step")
            yield
        self.log.append("H=")
        return [p.logit if "oom" not in p.text else -p.logit for p in pairs]


async def test_a_light_batch_runs_at_a_pause_of_a_heavy_batch() -> None:
    """Preemption (issue 14): a text request queued while an image-heavy batch is on the device
    runs at that batch's next pause, not after its end; the heavy batch then resumes where it was."""
    engine = _SteppedEngine(steps=4)
    heavy_texts = ["9" * 60]  # one pair: one heavy batch, whatever the preparation order
    async with running(engine, heavy_pair_tokens=50) as sched:
        engine.hold_heavy.clear()
        heavy = asyncio.create_task(sched.rerank(make_job(*heavy_texts)))
        await wait_thread_event(engine.in_heavy)
        light = asyncio.create_task(sched.rerank(make_job("1", "2")))
        await eventually(lambda: sched.queue_depth == 2, WAIT, "light pairs queued")
        engine.hold_heavy.set()
        light_result, heavy_result = await asyncio.wait_for(asyncio.gather(light, heavy), WAIT)
        assert sample(sched, "lychee_preemptions_total") == 1
    assert engine.log == ["H0", "L", "H1", "H2", "H3", "H="]
    assert [d.index for d in light_result.results] == [1, 0]
    assert [d.score for d in heavy_result.results] == sorted((float(t) for t in heavy_texts), reverse=True)


async def test_a_heavy_batch_with_nothing_waiting_runs_in_one_device_call() -> None:
    engine = _SteppedEngine(steps=5)
    async with running(engine, heavy_pair_tokens=50) as sched:
        await asyncio.wait_for(sched.rerank(make_job("9" * 60)), WAIT)
        assert sample(sched, "lychee_preemptions_total") == 0
    assert engine.log == ["H0", "H1", "H2", "H3", "H4", "H="]


async def test_a_heavy_batch_advances_at_least_one_step_per_light_batch() -> None:
    """Light pairs waiting at every pause slow the heavy batch down, they cannot stop it."""
    engine = _SteppedEngine(steps=3)
    async with running(engine, heavy_pair_tokens=50, max_batch_pairs=1) as sched:
        engine.hold_heavy.clear()
        heavy = asyncio.create_task(sched.rerank(make_job("9" * 60)))
        await wait_thread_event(engine.in_heavy)
        light = asyncio.create_task(sched.rerank(make_job("1", "2", "3", "4")))
        await eventually(lambda: sched.queue_depth == 4, WAIT, "light pairs queued")
        engine.hold_heavy.set()
        await asyncio.wait_for(asyncio.gather(light, heavy), WAIT)
    assert engine.log == ["H0", "L", "H1", "L", "H2", "L", "H=", "L"]


async def test_a_step_failure_fails_the_heavy_request_and_an_oom_splits_it() -> None:
    engine = _SteppedEngine(steps=3)
    async with running(engine, heavy_pair_tokens=50) as sched:
        with pytest.raises(errors.InternalError):
            await asyncio.wait_for(sched.rerank(make_job("fail" + "9" * 60)), WAIT)
        # An OOM inside the steps: the halves are scored by score() (not preemptible, rare path).
        result = await asyncio.wait_for(sched.rerank(make_job("oom" + "1" * 60, "oom" + "2" * 60)), WAIT)
        assert sample(sched, "lychee_oom_splits_total") == 1
        assert len(result.results) == 2
        ok = await asyncio.wait_for(sched.rerank(make_job("5")), WAIT)  # the scheduler still serves
        assert ok.results[0].score == 5.0
