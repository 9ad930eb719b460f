"""The scheduler: admission control, CPU preparation, dynamic batching, one device thread.

Design (TEI-like; one asyncio task owns the device queue):

* **Admission.** A request is admitted only if its pairs fit under ``max_inflight_pairs``
  (counted from admission until the request is *retired*: answered and no longer touched by a
  worker or the device). Otherwise it fails at once with RESOURCE_EXHAUSTED / OVERLOADED and a
  retry delay — never an unbounded wait, which would only move the queue into the clients'
  deadlines. A single request larger than the whole capacity is admitted when the scheduler is
  idle (nothing else in flight): the edge already bounds it by ``max_documents``, and refusing
  it would make it unservable forever on this configuration.
* **Preparation** (``engine.prepare_query`` / ``prepare_pair``: tokenize, decode images) runs on
  a ``ThreadPoolExecutor(decode_threads)`` while the device works on earlier batches. Each
  request keeps at most ``2 * decode_threads`` pair preparations submitted at a time, so a
  1000-document request does not starve a later 3-document one of CPU (the executor is FIFO).
* **Batching.** Prepared pairs wait in one FIFO queue. The batching task takes pairs from the
  head (mixing requests) up to ``max_batch_pairs`` and ``batch_token_budget``, where the token
  cost of a batch is the padded estimate ``pairs * max(pair.cost_tokens)`` plus each distinct
  request's shared prefix (``PreparedQuery.cost_tokens``) once. A batch that is not full waits
  at most ``max_batch_wait_ms`` (from its oldest pair's readiness) for more pairs — and only
  while admitted pairs are still being prepared; otherwise nothing can arrive soon and waiting
  would be pure latency. A single pair over the budget still runs, alone.
* **Device.** ``engine.score`` runs on one dedicated thread: the device is used by one batch at
  a time, and the event loop never blocks on it.
* **Preemption.** A heavy-lane batch (see :class:`_Lanes`) runs through ``engine.score_steps``
  where the engine has it: the device thread advances it step by step (a vision block, an
  attention query chunk, half a decoder layer) and, at the first pause after light pairs were
  queued, hands it back to the batching task, which runs one light batch and then resumes the
  heavy one. A 3-passage request thus waits for one step, not for a whole image batch; the heavy
  batch advances at least one step per light batch, so it is slowed, never stopped. Without light
  work waiting the heavy batch runs to the end in one device call (no per-step round trip).
* **Dropping work.** A request that is done (answered, failed, cancelled by its caller, past its
  deadline) has its queued pairs purged and its pending preparations cancelled, so none of its
  remaining batches reach the device. Its ``PreparedQuery`` is released once nothing uses it
  any more (no preparation running, no batch on the device carrying its pairs).
* **Failures.** Every request future is resolved exactly once on every path. A batch that fails
  fails exactly the requests that had pairs in it (``InternalError``, original exception
  chained); ``DeviceOutOfMemory`` first splits the batch in halves recursively, down to single
  pairs, and only the pairs that still do not fit fail their requests (DEVICE_OUT_OF_MEMORY).
  Input errors from preparation are re-rooted at ``query`` / ``documents[i]``.

All mutable state is touched on the event loop thread only; worker threads hand results back
with ``call_soon_threadsafe``. Deadlines are absolute ``time.monotonic()`` values.

Tracing: a job may come with its call's trace (:class:`lychee_server.tracing.CallTrace`, None
when tracing is off); the scheduler reports admission, preparation, dispatch and each device
batch to it (the ``queue``, ``prepare``, ``batch`` and ``inference`` spans), one ``None`` check
per event when it is off.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import enum
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lychee_server import errors
from lychee_server.domain import (
    Content,
    Phase,
    Progress,
    RankedDocument,
    RerankJob,
    RerankResult,
    ScoreKind,
    Timings,
    Usage,
)
from lychee_server.engine.interface import Engine, PreparedPair, PreparedQuery, SteppedEngine, probability
from lychee_server.metrics import Metrics
from lychee_server.settings import Settings
from lychee_server.tracing import BatchTrace, CallTrace, start_batch

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# What the device thread returns per pair: a logit difference, or why that pair failed.
_Outcome = float | BaseException


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(eq=False)
class _Request:
    """Book-keeping of one admitted request (event-loop thread only)."""

    job: RerankJob
    deadline: float | None
    fut: asyncio.Future[RerankResult]
    admitted: float
    n: int
    pq: PreparedQuery | None = None
    query_future: cf.Future[Any] | None = None
    prep_futures: set[cf.Future[Any]] = field(default_factory=set)
    next_doc: int = 0  # next document to submit for preparation
    undelivered: int = 0  # admitted pairs not yet prepared (or dropped)
    remaining: int = 0  # pairs not yet scored
    on_device: int = 0  # batches on the device carrying this request's pairs
    queued: int = 0  # prepared pairs waiting in the device queue
    scores: list[float] = field(default_factory=list)
    # What the answer needs from each prepared pair, kept instead of the pair itself: a pair can
    # hold megabytes (decoded image patches) and must be freed once it has been scored.
    truncated: list[bool] = field(default_factory=list)
    tokens: int = 0
    images: int = 0
    first_dispatch: float | None = None
    prep_seconds: float = 0.0
    infer_seconds: float = 0.0
    retired: bool = False
    on_progress: Callable[[Progress], None] | None = None
    trace: CallTrace | None = None

    @property
    def done(self) -> bool:
        return self.fut.done()


@dataclass(frozen=True, slots=True)
class _Item:
    """One prepared pair waiting for the device."""

    req: _Request
    index: int
    pair: PreparedPair
    ready: float


class _Lanes:
    """The device queue: two FIFO lanes by pair cost, so cheap pairs never wait behind expensive ones.

    A pair whose ``cost_tokens`` exceeds ``heavy_tokens`` (an image document, a long passage)
    queues in the heavy lane. Batches are planned from one lane at a time, so a 3-passage text
    request is never batched with (and never waits for) a decode-heavy image pair queued before it:
    it waits at most for the batch already on the device. Heavy work cannot starve: once the heavy
    lane's oldest pair has waited ``heavy_wait_s``, every other batch comes from it.

    ``light_waiting`` is set while the light lane holds pairs: the device thread reads it at the
    pauses of a heavy batch (the one piece of lane state shared with that thread).
    """

    __slots__ = ("_last_heavy", "heavy", "heavy_tokens", "heavy_wait_s", "light", "light_waiting")

    def __init__(self, heavy_tokens: int, heavy_wait_s: float) -> None:
        self.light: collections.deque[_Item] = collections.deque()
        self.heavy: collections.deque[_Item] = collections.deque()
        self.heavy_tokens = heavy_tokens
        self.heavy_wait_s = heavy_wait_s
        self._last_heavy = False
        self.light_waiting = threading.Event()

    def __len__(self) -> int:
        return len(self.light) + len(self.heavy)

    def append(self, item: _Item) -> None:
        if item.pair.cost_tokens > self.heavy_tokens:
            self.heavy.append(item)
        else:
            self.light.append(item)
            self.light_waiting.set()

    def drop(self, req: _Request) -> None:
        """Remove ``req``'s pairs (O(queue): only when the request has pairs queued)."""
        self.light = collections.deque(i for i in self.light if i.req is not req)
        self.heavy = collections.deque(i for i in self.heavy if i.req is not req)
        self._sync_flag()

    def take(self, lane: collections.deque[_Item], count: int) -> list[_Item]:
        """Pop the next ``count`` pairs of ``lane`` for a batch."""
        batch = [lane.popleft() for _ in range(count)]
        self._last_heavy = lane is self.heavy
        self._sync_flag()
        return batch

    def _sync_flag(self) -> None:
        if not self.light:
            self.light_waiting.clear()

    def pick(self, now: float) -> collections.deque[_Item]:
        """The lane the next batch comes from (non-empty when the queue is)."""
        if not self.heavy:
            lane = self.light
        elif not self.light or (now - self.heavy[0].ready >= self.heavy_wait_s and not self._last_heavy):
            lane = self.heavy
        else:
            lane = self.light
        return lane

    def is_heavy(self, lane: collections.deque[_Item]) -> bool:
        return lane is self.heavy


@dataclass
class _Paused:
    """A heavy batch handed back at a pause: its steps, device seconds so far, start wall time."""

    steps: Generator[None, None, list[float]]
    seconds: float
    wall0: int


def _timed(fn: Callable[..., _T], *args: Any) -> tuple[_T, float]:
    """Run ``fn`` on a worker thread and report its duration alongside the result."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _sort_key(score: float) -> tuple[float, ...]:
    """Descending score; a NaN (a broken forward) sorts last, after -inf too, instead of scrambling
    the order (a bare ``inf`` key for NaN tied it with -inf, which then came after it by index).
    NaNs tie among themselves (key ``(True,)``), so they keep their input order."""
    return (True,) if math.isnan(score) else (False, -score)


class Scheduler:
    """Admits rerank jobs, prepares them on CPU threads and scores them in shared device batches."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self._max_pairs = settings.max_batch_pairs
        self._budget = settings.batch_token_budget
        self._max_wait = settings.max_batch_wait_ms / 1000.0
        self._capacity = settings.max_inflight_pairs
        self._prefix_budget = settings.max_prefix_kv_mib * 2**20
        self._window = max(2, 2 * settings.decode_threads)
        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._prep_pool: cf.ThreadPoolExecutor | None = None
        # Preparations that decode an image wait on the engine's decoder processes (up to their
        # time budget): on threads of their own, so text-only work never queues behind them.
        self._image_pool: cf.ThreadPoolExecutor | None = None
        self._device_pool: cf.ThreadPoolExecutor | None = None
        self._queue = _Lanes(settings.heavy_pair_tokens, settings.heavy_pair_max_wait_s)
        self._stepped = isinstance(engine, SteppedEngine)  # heavy batches can pause for light ones
        self._requests: set[_Request] = set()  # admitted, not yet retired
        self._inflight_pairs = 0
        self._preparing = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._model_id = ""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Create the worker threads and the batching task (call from the serving event loop)."""
        if self._state is not _State.NEW:
            raise RuntimeError("Scheduler.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._model_id = self._engine.info.model_id
        self._prep_pool = cf.ThreadPoolExecutor(
            self._settings.decode_threads, thread_name_prefix="lychee-prep"
        )
        self._image_pool = cf.ThreadPoolExecutor(
            self._settings.decode_threads, thread_name_prefix="lychee-image"
        )
        self._device_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="lychee-device")
        self._task = asyncio.create_task(self._batch_loop(), name="lychee-batcher")
        self._state = _State.RUNNING

    async def drain(self, grace_s: float) -> None:
        """Refuse new jobs, let admitted ones finish for up to ``grace_s``, then :meth:`stop`."""
        if self._state is _State.RUNNING:
            self._state = _State.DRAINING
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await self.stop()

    async def stop(self) -> None:
        """Fail every unfinished job with UNAVAILABLE / SHUTTING_DOWN and stop the threads."""
        if self._state is _State.STOPPED:
            return
        self._state = _State.STOPPED
        for req in list(self._requests):
            self._fail(req, errors.Unavailable("the server is shutting down", reason="SHUTTING_DOWN"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # The device thread may be inside a forward pass: do not block the loop joining it.
        for pool in (self._prep_pool, self._image_pool, self._device_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    async def wait_idle(self, limit_s: float) -> bool:
        """Wait until no admitted pair is in flight; False if ``limit_s`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), limit_s)
        except TimeoutError:
            return False
        return True

    @property
    def inflight_pairs(self) -> int:
        return self._inflight_pairs

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    # ------------------------------------------------------------------ public entry
    async def rerank(
        self,
        job: RerankJob,
        deadline: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        trace: CallTrace | None = None,
    ) -> RerankResult:
        """Score ``job``; ``deadline`` is an absolute ``time.monotonic()`` value (None = none).
        ``trace``: the call's spans (the scheduler adds queue, prepare, batch and inference).

        ``on_progress`` is called on the event-loop thread with a :class:`Progress` once the job is
        admitted (QUEUED), as its pairs are prepared and scored, and with DONE just before the
        result is set; it must return at once (the doors hand it a latest-value mailbox) and what it
        raises is logged, never propagated.

        Raises the ``errors`` types: ResourceExhausted (not admitted), DeadlineExceeded,
        Unavailable (not started / shutting down), InvalidInput (re-rooted at the bad field),
        InternalError. Cancelling the awaiting task abandons the job: its pending work is dropped.
        """
        if self._state is not _State.RUNNING:
            if self._state is _State.NEW:
                raise errors.Unavailable("the scheduler is not started yet", reason="NOT_READY")
            raise errors.Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        n = len(job.documents)
        if n == 0:
            raise errors.InvalidInput("a request needs at least one document", reason="NO_DOCUMENTS")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise errors.DeadlineExceeded("the deadline expired before the request was admitted")
        if self._inflight_pairs > 0 and self._inflight_pairs + n > self._capacity:
            raise self._overloaded(
                f"{self._inflight_pairs} pairs in flight, {n} more requested, limit {self._capacity}"
            )
        live = int(getattr(self._engine, "live_prefix_bytes", 0))
        if self._inflight_pairs > 0 and live > self._prefix_budget:
            raise self._overloaded(
                f"the shared prefixes of admitted requests hold {live >> 20} MiB of device memory, "
                f"limit {self._prefix_budget >> 20} MiB"
            )
        assert self._loop is not None and self._prep_pool is not None
        req = _Request(
            job=job,
            deadline=deadline,
            fut=self._loop.create_future(),
            admitted=now,
            n=n,
            undelivered=n,
            remaining=n,
            scores=[math.nan] * n,
            truncated=[False] * n,
            on_progress=on_progress,
            trace=trace,
        )
        if trace is not None:
            trace.admitted(len(self._queue), self._inflight_pairs)
        self._requests.add(req)
        self._inflight_pairs += n
        self._preparing += n
        self._idle.clear()
        self._update_gauges()
        self._progress(req, Phase.QUEUED)
        req.query_future = self._pool_for(job.query).submit(
            _timed, self._engine.prepare_query, job.instruction, job.query, job.options.max_length, job.tenant
        )
        req.query_future.add_done_callback(self._from_thread(self._on_query_ready, req))
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait((req.fut,), timeout=timeout)
            if not done:
                self._fail(req, errors.DeadlineExceeded("the deadline expired before the request was scored"))
        except asyncio.CancelledError:
            # The caller went away: drop what is left of its work, then let the cancellation go on.
            self._abandon(req)
            raise
        return req.fut.result()

    # ------------------------------------------------------------------ preparation
    def _overloaded(self, why: str) -> errors.ResourceExhausted:
        """Admission's refusal (counted): RESOURCE_EXHAUSTED / OVERLOADED with the retry delay."""
        self.metrics.rejected.labels("OVERLOADED").inc()
        return errors.ResourceExhausted(
            f"server at capacity: {why}", reason="OVERLOADED", retry_after=self._settings.retry_after_s
        )

    def _from_thread(self, fn: Callable[..., None], *args: Any) -> Callable[[cf.Future[Any]], None]:
        """A done-callback for a worker future that runs ``fn(*args, future)`` on the loop."""
        loop = self._loop
        assert loop is not None

        def callback(fut: cf.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(functools.partial(fn, *args, fut))

        return callback

    def _on_query_ready(self, req: _Request, fut: cf.Future[Any]) -> None:
        req.query_future = None
        if not fut.cancelled():
            exc = fut.exception()
            if exc is not None:
                err = self._prep_error(exc, "query")
                if req.trace is not None:
                    req.trace.query_prepared(0.0, err)
                self._fail(req, err)
            else:
                pq, seconds = fut.result()
                if req.trace is not None:
                    req.trace.query_prepared(seconds)
                req.pq = pq
                req.prep_seconds += seconds
                self.metrics.preprocess_seconds.labels("query").observe(seconds)
                if not req.done:
                    self._progress(req, Phase.PREPARING)
                    self._fill_prep_window(req)
        self._maybe_retire(req)

    @staticmethod
    def _progress(req: _Request, phase: Phase) -> None:
        """Tell the caller how far ``req`` has come (event-loop thread; never raises)."""
        report = req.on_progress
        if report is None or req.done:
            return
        prepared = req.n - req.undelivered
        try:
            report(Progress(phase, req.n, prepared, req.n - req.remaining))
        except Exception:
            log.exception("an on_progress callback failed (request_id=%s)", req.job.request_id or "-")

    def _pool_for(self, content: Content) -> cf.ThreadPoolExecutor:
        """The image threads for content with an image, the text threads otherwise."""
        pool = self._image_pool if content.image is not None else self._prep_pool
        assert pool is not None
        return pool

    def _fill_prep_window(self, req: _Request) -> None:
        if self._prep_pool is None or self._state is _State.STOPPED:
            return
        while req.next_doc < req.n and len(req.prep_futures) < self._window:
            i = req.next_doc
            req.next_doc += 1
            content = req.job.documents[i].content
            fut = self._pool_for(content).submit(_timed, self._engine.prepare_pair, req.pq, content)
            req.prep_futures.add(fut)
            fut.add_done_callback(self._from_thread(self._on_pair_ready, req, i))

    def _on_pair_ready(self, req: _Request, index: int, fut: cf.Future[Any]) -> None:
        req.prep_futures.discard(fut)
        if not req.done and not fut.cancelled():
            exc = fut.exception()
            if exc is not None:
                self._fail(req, self._prep_error(exc, f"documents[{index}]"))
            else:
                pair, seconds = fut.result()
                req.prep_seconds += seconds
                self.metrics.preprocess_seconds.labels("pair").observe(seconds)
                req.truncated[index] = bool(pair.truncated)
                req.tokens += pair.total_tokens
                req.images += pair.num_images
                req.undelivered -= 1
                self._preparing -= 1
                if req.trace is not None and req.undelivered == 0:
                    req.trace.prepared(req.n, req.tokens, req.images, req.prep_seconds)
                self._queue.append(_Item(req, index, pair, time.monotonic()))
                req.queued += 1
                self._update_gauges()
                self._wakeup.set()
                self._progress(req, Phase.SCORING if req.remaining < req.n else Phase.PREPARING)
                self._fill_prep_window(req)
        self._maybe_retire(req)

    @staticmethod
    def _prep_error(exc: BaseException, where: str) -> errors.LycheeError:
        """Input problems point at the offending field; anything unexpected is a server fault.

        A query-preparation error that already names the ``instruction`` (the engine knows which
        part of the prefix was at fault) keeps that top-level path instead of moving under
        ``query``.
        """
        if (
            where == "query"
            and isinstance(exc, errors.InvalidInput)
            and exc.violations
            and all(v.field == "instruction" or v.field.startswith("instruction.") for v in exc.violations)
        ):
            return exc
        if isinstance(exc, errors.InvalidInput | errors.Unsupported):
            if not exc.violations and exc.reason.startswith("IMAGE_"):
                # An engine error about "the image" that names no field: every IMAGE_* reason is
                # about the content's image, so point at it rather than at the whole document.
                return exc.at(f"{where}.image")
            return exc.at(where)
        if isinstance(exc, errors.LycheeError):
            return exc
        # The exception's own text may hold paths or user data: it is logged (chained as the
        # cause), never sent to the caller.
        log.error("preparing %s failed", where, exc_info=exc)
        err = errors.InternalError(f"preparing {where} failed (server fault; see the server log)")
        err.__cause__ = exc
        return err

    # ------------------------------------------------------------------ completion paths
    def _fail(self, req: _Request, err: BaseException) -> None:
        if req.done:
            return
        req.fut.set_exception(err)
        self._on_done(req, err)

    def _abandon(self, req: _Request) -> None:
        if not req.done:
            req.fut.cancel()
        self._on_done(req, errors.Cancelled("the caller went away"))

    def _on_done(self, req: _Request, error: BaseException | None = None) -> None:
        """The request has its answer: stop all of its remaining work."""
        if req.trace is not None:
            req.trace.finished(error, req.n - req.undelivered, req.tokens, req.images, req.prep_seconds)
        self._preparing -= req.undelivered
        req.undelivered = 0
        if req.prep_futures or req.query_future is not None:
            # A preparation may be decoding one of its images right now: the engine can stop it
            # (a decode worker is killed, queued decodes never start) instead of letting it run on.
            cancel = getattr(self._engine, "cancel", None)
            if callable(cancel):
                try:
                    cancel(req.job.query)
                except Exception:
                    log.exception("engine.cancel failed")
        for fut in list(req.prep_futures):
            fut.cancel()  # a running preparation finishes; a queued one never starts
        if req.query_future is not None:
            req.query_future.cancel()
        if req.queued:  # O(queue), so only when there is something of this request to drop
            self._queue.drop(req)
            self.metrics.pairs_dropped.inc(req.queued)
            req.queued = 0
        self._update_gauges()
        self._maybe_retire(req)

    def _maybe_retire(self, req: _Request) -> None:
        """Free the request's capacity and prefix once nothing can touch it any more."""
        if req.retired or not req.done or req.query_future is not None or req.prep_futures or req.on_device:
            return
        req.retired = True
        self._requests.discard(req)
        self._inflight_pairs -= req.n
        if req.pq is not None:
            self._release(req.pq)
            req.pq = None
        if self._inflight_pairs == 0:
            self._idle.set()
        self._update_gauges()

    def _release(self, pq: PreparedQuery) -> None:
        """Release inline: it only drops per-request state, and doing it here (not on a worker)
        means it can neither be lost in a shutdown nor race the next request's bookkeeping."""
        try:
            self._engine.release(pq)
        except Exception:
            log.exception("engine.release failed")

    def _finish(self, req: _Request) -> None:
        """All pairs scored: rank them and answer the caller."""
        job = req.job
        kind = job.options.score_kind
        values = [probability(s) if kind is ScoreKind.PROBABILITY else s for s in req.scores]
        order = sorted(range(req.n), key=lambda i: (_sort_key(values[i]), i))
        if job.options.top_n is not None:
            order = order[: job.options.top_n]
        results = []
        for i in order:
            doc = job.documents[i]
            results.append(
                RankedDocument(
                    index=i,
                    score=values[i],
                    id=doc.id,
                    text=doc.content.text if job.options.return_text else None,
                    truncated=req.truncated[i],
                )
            )
        assert req.pq is not None  # answered only after the query was prepared
        query_images = req.pq.num_images
        usage = Usage(
            pairs=req.n,
            tokens=req.tokens,
            images=query_images + req.images,
            truncated_documents=sum(req.truncated),
        )
        now = time.monotonic()
        first = req.first_dispatch if req.first_dispatch is not None else now
        timings = Timings(
            queue=first - req.admitted,
            preprocessing=req.prep_seconds,
            inference=req.infer_seconds,
            total=now - req.admitted,
        )
        self._progress(req, Phase.DONE)
        req.fut.set_result(RerankResult(tuple(results), usage, timings, model=self._model_id))
        self._on_done(req)

    # ------------------------------------------------------------------ batching
    async def _batch_loop(self) -> None:
        while True:
            batch: list[_Item] = []
            try:
                batch, tokens, heavy = await self._next_batch()
                await self._run_batch(batch, tokens, preemptible=heavy and self._stepped)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not leave waiters hanging
                log.exception("batch bookkeeping failed")
                victims = {item.req for item in batch} or set(self._requests)
                for req in victims:
                    self._fail(req, self._device_error(exc))

    async def _next_batch(self) -> tuple[list[_Item], int, bool]:
        """The next batch, its token estimate, and whether it is from the heavy lane."""
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            lane = self._queue.pick(time.monotonic())
            count, tokens, full = self._plan_batch(lane)
            remaining = lane[0].ready + self._max_wait - time.monotonic()
            if full or self._preparing == 0 or remaining <= 0:
                if self._expire_deadlines(lane, count):
                    continue  # their pairs left the queue: plan again
                return self._take(lane, count), tokens, self._queue.is_heavy(lane)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    def _take(self, lane: collections.deque[_Item], count: int) -> list[_Item]:
        batch = self._queue.take(lane, count)
        for item in batch:
            item.req.queued -= 1
        self._update_gauges()
        return batch

    def _plan_batch(self, lane: collections.deque[_Item]) -> tuple[int, int, bool]:
        """How many head-of-lane pairs fit one batch, their token estimate, and whether it is full."""
        count = 0
        max_cost = 0
        prefix = 0
        seen: set[_Request] = set()
        for item in lane:
            if count == self._max_pairs:
                return count, count * max_cost + prefix, True
            cost = max(max_cost, item.pair.cost_tokens)
            extra = 0 if item.req in seen else item.pair.query.cost_tokens
            estimate = (count + 1) * cost + prefix + extra
            if count > 0 and estimate > self._budget:
                return count, count * max_cost + prefix, True
            seen.add(item.req)
            count += 1
            max_cost = cost
            prefix += extra
        return count, count * max_cost + prefix, count >= self._max_pairs

    def _expire_deadlines(self, lane: collections.deque[_Item], count: int) -> bool:
        """Fail the requests among the next ``count`` queued pairs whose deadline has passed.

        Each waiter in :meth:`rerank` already times out on its own; this only closes the gap
        where the batch would leave before that timer ran. It looks at the batch about to be
        dispatched, not at every admitted request, so it costs O(batch), not O(requests).
        """
        now = time.monotonic()
        expired = {
            item.req
            for item in itertools.islice(lane, count)
            if item.req.deadline is not None and item.req.deadline <= now
        }
        for req in expired:
            self._fail(req, errors.DeadlineExceeded("the deadline expired while the request was queued"))
        return bool(expired)

    async def _run_light_batch(self) -> None:
        """At a heavy batch's pause: one batch from the light lane, at once (no fill wait)."""
        lane = self._queue.light
        while lane:
            count, tokens, _ = self._plan_batch(lane)
            if self._expire_deadlines(lane, count):
                continue
            self.metrics.preemptions.inc()
            await self._run_batch(self._take(lane, count), tokens)
            return

    async def _run_batch(self, batch: list[_Item], tokens: int, preemptible: bool = False) -> None:
        assert self._loop is not None and self._device_pool is not None
        reqs = {item.req for item in batch}
        start = time.monotonic()
        traced = False
        for req in reqs:
            req.on_device += 1
            if req.trace is not None:
                traced = True
                if req.first_dispatch is None:
                    req.trace.dispatched()
            if req.first_dispatch is None:
                req.first_dispatch = start
        batch_trace = self._batch_trace(batch, tokens) if traced else None
        self.metrics.batch_pairs.observe(len(batch))
        self.metrics.batch_tokens.observe(tokens)
        pairs = [item.pair for item in batch]
        seconds = 0.0
        window: tuple[int, int] | None = None  # the device thread's time.time_ns() (for the trace)
        scored = 0
        try:
            try:
                run = await self._loop.run_in_executor(
                    self._device_pool, self._score_on_device, pairs, preemptible
                )
                while isinstance(run, _Paused):
                    await self._run_light_batch()
                    run = await self._loop.run_in_executor(
                        self._device_pool, self._resume_on_device, pairs, run
                    )
                outcomes, seconds, window = run
            except asyncio.CancelledError:
                # Shutting down while the device may still read these prefixes: never retire them.
                reqs = set()
                raise
            except Exception as exc:  # the executor itself failed (shut down)
                log.error("the device executor failed", exc_info=exc)
                outcomes, seconds = [exc] * len(pairs), time.monotonic() - start
            self.metrics.inference_seconds.observe(seconds)
            for item, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not item.req.done:  # one error per request, not one per failed pair
                        self._fail(item.req, self._device_error(outcome))
                    continue
                scored += 1
                if not item.req.done:
                    item.req.scores[item.index] = outcome
                    item.req.remaining -= 1
            self.metrics.pairs_scored.inc(scored)
        finally:
            if batch_trace is not None:
                batch_trace.end(window, len(batch), len(batch) - scored)
            # Every request leaves the device first, so that should answering one of them fail,
            # the batch loop's fallback can still fail and retire all of them.
            for req in reqs:
                req.infer_seconds += seconds
                req.on_device -= 1
            for req in reqs:
                if not req.done and req.remaining == 0:
                    self._finish(req)
                elif not req.done:
                    self._progress(req, Phase.SCORING)
                self._maybe_retire(req)

    @staticmethod
    def _batch_trace(batch: Sequence[_Item], tokens: int) -> BatchTrace | None:
        """The batch's spans: each request's trace with its pairs in the batch, in batch order."""
        counts: dict[_Request, int] = {}
        for item in batch:
            counts[item.req] = counts.get(item.req, 0) + 1
        return start_batch([(r.trace, n) for r, n in counts.items()], pairs=len(batch), tokens=tokens)

    def _score_on_device(
        self, pairs: Sequence[PreparedPair], preemptible: bool = False
    ) -> tuple[list[_Outcome], float, tuple[int, int]] | _Paused:
        """Device thread: score a batch, splitting it on out-of-memory errors. Returns the
        outcomes, the seconds it took, and its wall-clock window (``time.time_ns()``); or, for a
        ``preemptible`` batch paused because light pairs wait, where to resume it."""
        if preemptible:
            assert isinstance(self._engine, SteppedEngine)
            steps = self._engine.score_steps(pairs)
            return self._resume_on_device(pairs, _Paused(steps, 0.0, time.time_ns()))
        wall0 = time.time_ns()
        t0 = time.perf_counter()
        outcomes = self._score_split(pairs)
        return outcomes, time.perf_counter() - t0, (wall0, time.time_ns())

    def _resume_on_device(
        self, pairs: Sequence[PreparedPair], paused: _Paused
    ) -> tuple[list[_Outcome], float, tuple[int, int]] | _Paused:
        """Device thread: advance a paused batch by at least one step, until it ends or light
        pairs wait (checked at each pause after the first step)."""
        t0 = time.perf_counter()
        waiting = self._queue.light_waiting
        try:
            while True:
                next(paused.steps)
                if waiting.is_set():
                    paused.seconds += time.perf_counter() - t0
                    return paused
        except StopIteration as stop:
            try:
                outcomes = self._checked(pairs, stop.value)
            except errors.InternalError as exc:
                outcomes = self._failed(pairs, exc)
        except errors.DeviceOutOfMemory as exc:
            outcomes = self._after_oom(pairs, exc)
        except Exception as exc:
            outcomes = self._failed(pairs, exc)
        return outcomes, paused.seconds + time.perf_counter() - t0, (paused.wall0, time.time_ns())

    def _score_split(self, pairs: Sequence[PreparedPair]) -> list[_Outcome]:
        try:
            return self._checked(pairs, self._engine.score(pairs))
        except errors.DeviceOutOfMemory as exc:
            return self._after_oom(pairs, exc)
        except Exception as exc:
            return self._failed(pairs, exc)

    @staticmethod
    def _checked(pairs: Sequence[PreparedPair], scores: Sequence[float]) -> list[_Outcome]:
        if len(scores) != len(pairs):
            raise errors.InternalError(f"engine returned {len(scores)} scores for {len(pairs)} pairs")
        return [float(s) for s in scores]

    def _after_oom(self, pairs: Sequence[PreparedPair], exc: errors.DeviceOutOfMemory) -> list[_Outcome]:
        """Score the halves of a batch that ran out of device memory (single pairs fail)."""
        if len(pairs) == 1:
            return [exc]
        self.metrics.oom_splits.inc()
        half = len(pairs) // 2
        return self._score_split(pairs[:half]) + self._score_split(pairs[half:])

    @staticmethod
    def _failed(pairs: Sequence[PreparedPair], exc: Exception) -> list[_Outcome]:
        # Logged here, once per failed engine call (not once per pair or per request).
        log.error("scoring a batch of %d pairs failed", len(pairs), exc_info=exc)
        return [exc] * len(pairs)

    @staticmethod
    def _device_error(exc: BaseException) -> errors.LycheeError:
        """The caller's error for a device failure (the failure itself is logged where it happens)."""
        if isinstance(exc, errors.DeviceOutOfMemory):
            err: errors.LycheeError = errors.DeviceOutOfMemory(
                "the device ran out of memory even on a single pair; lower max_length or image sizes"
            )
        elif isinstance(exc, errors.LycheeError):
            return exc
        else:
            err = errors.InternalError("scoring failed (server fault; see the server log)")
        err.__cause__ = exc
        return err

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(len(self._queue))
        m.preparing_pairs.set(self._preparing)
        m.inflight_pairs.set(self._inflight_pairs)
        m.inflight_requests.set(len(self._requests))
