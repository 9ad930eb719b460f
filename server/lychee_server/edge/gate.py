"""The one gate every call passes, whichever door (gRPC or HTTP) it came through.

Why one gate: both doors must give the same answers about the server's state and must be counted
and drained together. The gate owns

* the serving state (LOADING -> SERVING -> DRAINING), so "not ready" and "shutting down" are the
  same UNAVAILABLE / NOT_READY / SHUTTING_DOWN errors on both doors, and ``/readyz`` and gRPC health
  read the same truth;
* request ids (the caller's ``x-request-id`` when it is short and printable, else a fresh uuid4);
* the active-call counter a drain waits on (:meth:`Gate.wait_calls_done`), across both doors;
* the per-call metrics (``lychee_requests_total{method,code,transport}``) and the one log line;
* server-wide admission before any work: ``max_concurrent_calls`` (:meth:`Gate.admit`) and the
  ``max_buffered_bytes`` budget of request payload held in memory (:meth:`Gate.hold`);
* the per-caller budget of refused bytes (:class:`RefusalLedger`): a caller whose invalid or
  oversized requests made the server receive more than ``refused_bytes_burst`` (leaking at
  ``refused_bytes_per_s``) is refused before its next request body is read (:meth:`Gate.admit`);
* the last checks before work reaches the scheduler (:meth:`Gate.score`): the loaded model must
  accept the job's modalities (FAILED_PRECONDITION otherwise);
* the call's trace when tracing is on (:mod:`lychee_server.tracing`): the ``rerank`` span, child
  of the caller's W3C ``traceparent`` (the door hands its metadata or headers to :meth:`Gate.call`),
  reachable by the door as ``call.span(...)`` and by the scheduler as the job's trace.

No grpc, HTTP, protobuf or JSON types here: a door turns its own request into a ``RerankJob`` and
its own deadline into an absolute ``time.monotonic()`` value, then calls :meth:`Gate.score`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

from lychee_server import errors
from lychee_server.domain import EngineInfo, Modality, Progress, RerankJob, RerankResult
from lychee_server.logs import log_fields, rpc_logger
from lychee_server.metrics import Metrics
from lychee_server.scheduler import Scheduler
from lychee_server.settings import Settings
from lychee_server.tracing import CallTrace, Tracing

__all__ = [
    "OVERSIZE_REASONS",
    "REQUEST_ID_KEY",
    "BufferBudget",
    "BufferHold",
    "Call",
    "Gate",
    "RefusalLedger",
    "ServingState",
    "caller_key",
    "check_modalities",
    "request_id_from",
]

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128
_NO_SPAN: AbstractContextManager[Any] = contextlib.nullcontext()


OVERSIZE_REASONS = frozenset({"TOO_MANY_DOCUMENTS", "REQUEST_TOO_LARGE", "RESPONSE_TOO_LARGE"})
"""Refusals answered after ``oversize_refusal_delay_s`` (see :meth:`Gate.pause_refusal`)."""
_PAUSED_REASONS = OVERSIZE_REASONS | {"RATE_LIMITED"}


class ServingState(enum.Enum):
    LOADING = "loading"  # model loading / warming up: NOT_READY
    SERVING = "serving"
    DRAINING = "draining"  # shutting down: SHUTTING_DOWN


def request_id_from(value: str | None) -> str:
    """The caller's request id if it is usable (1..128 printable characters), else a new one."""
    if isinstance(value, str):
        value = value.strip()
        if 0 < len(value) <= _MAX_REQUEST_ID and value.isprintable():
            return value
    return uuid.uuid4().hex


@dataclass(slots=True)
class Call:
    """What the gate learns about one call while it runs (for metrics and the log line)."""

    request_id: str
    method: str
    transport: str
    peer: str = ""
    tenant: str = ""  # whose per-tenant state the call may use (a hash of its API key; "" = shared)
    received_bytes: int = 0  # request payload the door has received so far (charged if refused)
    pairs: int = 0
    code: str = "OK"  # the gRPC status code name, on both doors (one vocabulary for dashboards)
    trace: CallTrace | None = None  # None when tracing is off

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """A child span of the call around a block (``with call.span("validate"):``); a no-op
        when tracing is off."""
        return _NO_SPAN if self.trace is None else self.trace.span(name, **attributes)

    def note(self, **attributes: Any) -> None:
        """Attributes of the call's span (``request_bytes=...`` -> ``lychee.request_bytes``); a
        no-op when tracing is off."""
        if self.trace is not None:
            self.trace.set(**attributes)


def check_modalities(job: RerankJob, info: EngineInfo) -> None:
    """FAILED_PRECONDITION for content the loaded model cannot take (before any work starts)."""
    violations: list[errors.FieldViolation] = []

    def check(path: str, have: frozenset[Modality], allowed: frozenset[Modality]) -> None:
        for modality in sorted(have - allowed, key=lambda m: m.value):
            field = f"{path}.{'text' if modality is Modality.TEXT else 'image'}"
            violations.append(
                errors.FieldViolation(field, f"the loaded model does not accept {modality.value}")
            )

    check("query", job.query.modalities, info.query_modalities)
    in_documents = frozenset[Modality]().union(*(d.content.modalities for d in job.documents))
    if in_documents - info.document_modalities:  # only then build per-document paths
        for i, doc in enumerate(job.documents):
            check(f"documents[{i}]", doc.content.modalities, info.document_modalities)
    if violations:
        raise errors.Unsupported(
            f"{violations[0].field}: {violations[0].description}",
            reason="MODALITY_NOT_SUPPORTED",
            violations=violations,
        )


class BufferBudget:
    """The server-wide budget of request payload held in memory (``max_buffered_bytes``), shared
    by both doors: gRPC streams and HTTP bodies.

    Each call takes a :class:`BufferHold` and resizes it as its payload grows (a stream: to its
    ``committed_bytes`` after every message, so the bytes an ItemStart declares are refused before
    any of them arrives; an HTTP body: chunk by chunk); growing past the budget raises
    RESOURCE_EXHAUSTED / OVERLOADED with a retry delay. The hold is released when the call ends
    (its job, which owns the bytes, is gone then). Event-loop thread only.
    """

    def __init__(self, limit: int, retry_after_s: float) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.used = 0


class BufferHold:
    """One stream's share of a :class:`BufferBudget`."""

    __slots__ = ("_budget", "_metrics", "held")

    def __init__(self, budget: BufferBudget, metrics: Metrics | None = None) -> None:
        self._budget = budget
        self._metrics = metrics
        self.held = 0

    def resize(self, n: int) -> None:
        budget = self._budget
        grow = n - self.held
        if grow > 0 and budget.used + grow > budget.limit:
            if self._metrics is not None:
                self._metrics.rejected.labels("max_buffered_bytes").inc()
            raise errors.ResourceExhausted(
                f"server at capacity: requests hold {budget.used} bytes, {grow} more declared, "
                f"limit {budget.limit} (max_buffered_bytes)",
                reason="OVERLOADED",
                retry_after=budget.retry_after_s,
            )
        budget.used += grow
        self.held = n

    def release(self) -> None:
        self._budget.used -= self.held
        self.held = 0


def caller_key(call: Call) -> str:
    """Who a call's refused bytes are charged to: its tenant (API key) when the server checks
    keys, else its peer's address without the port (``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``)."""
    if call.tenant:
        return "tenant:" + call.tenant
    peer = call.peer
    head, sep, port = peer.rpartition(":")
    return head if sep and port.isdigit() and head not in ("", "ipv4", "ipv6") else peer


class RefusalLedger:
    """Bytes of refused requests per caller, as a leaky bucket (event-loop thread only).

    Every request the server refuses as the caller's fault (INVALID_ARGUMENT: too many documents,
    too large, unparsable, bad UTF-8 ...) has already cost the server its bytes: a multi-MiB
    message is copied into the process with the GIL held before any application code sees it. So
    each refusal is charged its received bytes to the caller (:func:`caller_key`); the charge
    leaks away at ``rate`` bytes per second. While a caller's level is over ``burst``, its calls
    are refused *before their body is read* (RESOURCE_EXHAUSTED / RATE_LIMITED with RetryInfo
    saying when the level is back under ``burst``), so a flood of hostile multi-MiB messages
    costs the server a refusal each, not a copy each. Callers that send valid requests are never
    charged; ``rate`` 0 turns the ledger off. At most ``max_callers`` levels are kept (past it the
    emptiest are dropped, down to three quarters of it), so the table cannot grow without bound.
    """

    def __init__(
        self,
        burst: float,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 4096,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._max = max_callers
        self._levels: dict[str, tuple[float, float]] = {}  # key -> (level, when)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def level(self, key: str) -> float:
        entry = self._levels.get(key)
        if entry is None:
            return 0.0
        level, when = entry
        return max(0.0, level - (self._clock() - when) * self.rate)

    def charge(self, key: str, nbytes: int) -> None:
        if not self.enabled or nbytes <= 0:
            return
        level = self.level(key) + nbytes
        self._levels.pop(key, None)  # re-inserted last: the dict stays in charge order
        self._levels[key] = (level, self._clock())
        if len(self._levels) > self._max:
            self._prune()

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` is under its budget again; None when it is under it now."""
        if not self.enabled or key not in self._levels:
            return None
        level = self.level(key)
        if level <= self.burst:
            if level == 0.0:
                del self._levels[key]
            return None
        return (level - self.burst) / self.rate

    def _prune(self) -> None:
        # Down to three quarters of the bound in one sort, so that a flood of distinct callers
        # pays one O(n log n) pass per max_callers/4 charges, not one per charge.
        keep = self._max * 3 // 4
        by_level = sorted(self._levels, key=self.level)
        for key in by_level[: len(self._levels) - keep]:
            del self._levels[key]

    def __len__(self) -> int:
        return len(self._levels)


class Gate:
    """Serving state, call accounting and the hand-off to the scheduler, shared by both doors."""

    def __init__(
        self, metrics: Metrics, settings: Settings | None = None, tracing: Tracing | None = None
    ) -> None:
        self._metrics = metrics
        self._settings = settings if settings is not None else Settings()
        self._tracing = tracing
        self.buffered = BufferBudget(self._settings.max_buffered_bytes, self._settings.retry_after_s)
        self.refusals = RefusalLedger(self._settings.refused_bytes_burst, self._settings.refused_bytes_per_s)
        self.authenticated = bool(self._settings.all_api_keys())
        """Whether callers present API keys (then each key is its own tenant)."""
        self.state = ServingState.LOADING
        self._scheduler: Scheduler | None = None
        self._info: EngineInfo | None = None
        self._active = 0
        # Calls that began before the drain: the drain waits for these only. Calls arriving during
        # it are refused at once (SHUTTING_DOWN); a caller that keeps opening calls while the
        # server drains must not hold the drain for the whole grace period.
        self._before_drain = 0
        self._drained = asyncio.Event()
        self._drained.set()

    # ------------------------------------------------------------------ state
    def attach(self, scheduler: Scheduler, info: EngineInfo) -> None:
        """Start serving with a started scheduler (called by the app once the model is warm)."""
        self._scheduler = scheduler
        self._info = info
        self.state = ServingState.SERVING

    def begin_drain(self) -> None:
        self.state = ServingState.DRAINING

    @property
    def ready(self) -> bool:
        """True exactly when new work is accepted (``/readyz`` and gRPC health say SERVING)."""
        return self.state is ServingState.SERVING and self._scheduler is not None

    @property
    def info(self) -> EngineInfo:
        """The loaded engine's description; UNAVAILABLE / NOT_READY before the model is loaded."""
        if self._info is None:
            raise errors.Unavailable("the model is loading", reason="NOT_READY")
        return self._info

    def require_serving(self) -> tuple[Scheduler, EngineInfo]:
        if self.state is ServingState.DRAINING:
            raise errors.Unavailable(
                "the server is shutting down; retry on another replica", reason="SHUTTING_DOWN"
            )
        if self.state is not ServingState.SERVING or self._scheduler is None or self._info is None:
            raise errors.Unavailable("the model is loading; retry shortly", reason="NOT_READY")
        return self._scheduler, self._info

    # ------------------------------------------------------------------ calls
    @property
    def active_calls(self) -> int:
        return self._active

    async def wait_calls_done(self, limit_s: float) -> bool:
        """Wait until every call that began before :meth:`begin_drain` has ended, on either door;
        False if ``limit_s`` passed first."""
        try:
            await asyncio.wait_for(self._drained.wait(), max(limit_s, 0.0))
        except TimeoutError:
            return False
        return True

    def admit(self, call: Call | None = None) -> None:
        """Refuse a call past ``max_concurrent_calls`` (counted across both doors, this call
        included): RESOURCE_EXHAUSTED / OVERLOADED with a retry delay, before any work; and a
        ``call`` whose caller is over its budget of refused bytes (:class:`RefusalLedger`):
        RESOURCE_EXHAUSTED / RATE_LIMITED, before its body is read."""
        limit = self._settings.max_concurrent_calls
        if self._active > limit:
            self._metrics.rejected.labels("max_concurrent_calls").inc()
            raise errors.ResourceExhausted(
                f"server at capacity: more than {limit} calls in progress (max_concurrent_calls)",
                reason="OVERLOADED",
                retry_after=self._settings.retry_after_s,
            )
        if call is not None and self.refusals.enabled:
            wait = self.refusals.retry_after(caller_key(call))
            if wait is not None:
                self._metrics.rejected.labels("RATE_LIMITED").inc()
                raise errors.ResourceExhausted(
                    f"this caller's refused requests came to more than {self.refusals.burst:.0f} bytes "
                    f"(refused_bytes_burst, leaking at {self.refusals.rate:.0f} bytes/s): "
                    "send valid requests and retry after the delay",
                    reason="RATE_LIMITED",
                    retry_after=max(wait, self._settings.retry_after_s),
                )

    async def pause_refusal(self, exc: BaseException, call: Call | None = None) -> None:
        """Charge a refused ``call``'s received bytes to its caller when the refusal is the
        caller's fault (INVALID_ARGUMENT; see :class:`RefusalLedger`), then hold the answer to a
        request refused for its size (``OVERSIZE_REASONS``) or for its caller's refused bytes
        (RATE_LIMITED) for ``oversize_refusal_delay_s``: the server has already paid to receive
        it, and a caller that re-sends one in a loop (a flood of multi-MiB messages) is slowed
        down without using CPU."""
        if not isinstance(exc, errors.LycheeError):
            return
        if call is not None and isinstance(exc, errors.InvalidInput):
            self.refusals.charge(caller_key(call), call.received_bytes)
        delay = self._settings.oversize_refusal_delay_s
        if delay > 0 and exc.reason in _PAUSED_REASONS:
            if exc.reason in OVERSIZE_REASONS:
                self._metrics.rejected.labels(exc.reason).inc()
            await asyncio.sleep(delay)

    def hold(self) -> BufferHold:
        """A share of the server-wide payload budget for one call (release it when the call ends)."""
        return BufferHold(self.buffered, self._metrics)

    @contextlib.contextmanager
    def call(
        self,
        method: str,
        transport: str,
        request_id: str,
        peer: str = "",
        tenant: str = "",
        carrier: Iterable[tuple[Any, Any]] = (),
    ) -> Iterator[Call]:
        """Count one call for its whole life; record its metrics and log line when it ends.

        The door sets ``call.code`` (a gRPC status code name) before leaving the block.
        ``carrier``: the call's gRPC metadata or HTTP header pairs, read only when tracing is on
        (for ``traceparent`` / ``tracestate``).
        """
        started = time.monotonic()
        trace = (
            None
            if self._tracing is None
            else self._tracing.start_call(method, transport, request_id, carrier)
        )
        call = Call(
            request_id=request_id, method=method, transport=transport, peer=peer, tenant=tenant, trace=trace
        )
        self._active += 1
        counted = self.state is not ServingState.DRAINING
        if counted:
            self._before_drain += 1
            self._drained.clear()
        try:
            yield call
        finally:
            elapsed = time.monotonic() - started
            self._metrics.requests.labels(method, call.code, transport).inc()
            self._metrics.request_latency.labels(method, call.code, transport).observe(elapsed)
            rpc_logger.info(
                "rpc",
                extra=log_fields(
                    request_id=call.request_id,
                    method=method,
                    transport=transport,
                    code=call.code,
                    duration_ms=round(elapsed * 1000, 3),
                    pairs=call.pairs,
                    peer=call.peer,
                    **({} if trace is None else {"trace_id": trace.trace_id}),
                ),
            )
            if trace is not None:
                trace.end(call.code)
            self._active -= 1
            if counted:
                self._before_drain -= 1
                if self._before_drain == 0:
                    self._drained.set()

    async def score(
        self,
        job: RerankJob,
        call: Call,
        deadline: float | None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> RerankResult:
        """Hand a validated job to the scheduler (``deadline``: absolute ``time.monotonic()``;
        ``on_progress``: see :meth:`Scheduler.rerank`)."""
        call.pairs = len(job.documents)
        if call.trace is not None:
            call.trace.set(documents=call.pairs)
        scheduler, info = self.require_serving()
        if call.tenant != job.tenant:
            job = replace(job, tenant=call.tenant)
        check_modalities(job, info)
        result = await scheduler.rerank(job, deadline=deadline, on_progress=on_progress, trace=call.trace)
        if call.trace is not None:
            usage = result.usage
            call.trace.set(
                tokens=usage.tokens, images=usage.images, truncated_documents=usage.truncated_documents
            )
        return result
