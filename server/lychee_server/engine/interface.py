"""The contract between the scheduler and a scoring engine (no torch, no grpc here).

The scheduler drives an engine in three steps (infinity's ``pre -> core -> post``):

1. ``prepare_query`` once per request, on a CPU worker thread: renders and tokenizes the
   shared prefix (system + instruction + query, with the query image decoded).
2. ``prepare_pair`` once per document, on CPU worker threads (many in parallel, while a
   batch runs on the device): decodes and resizes the document image, tokenizes the
   document, applies truncation. Its ``cost_tokens`` is what token-budget batching counts.
3. ``score`` on the single device thread, with pairs of possibly many requests mixed in
   one batch. It returns the raw ``logit(yes) - logit(no)`` per pair, in order;
   p(yes) is ``sigmoid`` of it (the two-way softmax), computed by ``probability``.

Engines that can pause between bounded pieces of device work also offer ``score_steps``: a
generator doing exactly what ``score`` does, yielding at each preemption point (between vision
blocks, attention query chunks, decoder half-layers) and returning the scores. The scheduler runs
decode-heavy batches through it so that a small text batch can run at a pause instead of waiting for
the whole heavy batch. ``score`` runs the same steps without pausing (``run_steps``): one code
path for both, so the golden tests cover the stepped scores too.

``release`` is called once when a request is finished (or abandoned) so the engine can drop
per-request state (a cached prefix KV, say). Engines raise ``lychee_server.errors`` types:
``InvalidInput`` for bad content (a corrupt image, ...), ``DeviceOutOfMemory`` for an OOM
so the scheduler can split the batch and retry, anything else becomes INTERNAL.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from lychee_server.domain import Content, EngineInfo


@runtime_checkable
class PreparedQuery(Protocol):
    """Opaque per-request prefix state produced by ``Engine.prepare_query``."""

    @property
    def cost_tokens(self) -> int:
        """Tokens in the shared prefix (counted once per request by the scheduler)."""
        ...

    @property
    def num_images(self) -> int: ...


@runtime_checkable
class PreparedPair(Protocol):
    """Opaque per-document state produced by ``Engine.prepare_pair``."""

    @property
    def query(self) -> PreparedQuery: ...

    @property
    def cost_tokens(self) -> int:
        """Tokens this pair adds to a batch (document part; the full length if no prefix reuse)."""
        ...

    @property
    def total_tokens(self) -> int:
        """Prefix + document tokens of the whole rendered pair (for usage reporting)."""
        ...

    @property
    def truncated(self) -> bool: ...

    @property
    def num_images(self) -> int:
        """Images in the document part of the pair."""
        ...


class Engine(Protocol):
    @property
    def info(self) -> EngineInfo: ...

    def prepare_query(
        self, instruction: str, query: Content, max_length: int, tenant: str = ""
    ) -> PreparedQuery:
        """``tenant`` (``RerankJob.tenant``) scopes what the engine caches across requests."""
        ...

    def prepare_pair(self, query: PreparedQuery, document: Content) -> PreparedPair: ...

    def score(self, pairs: Sequence[PreparedPair]) -> list[float]:
        """Return ``logit(yes) - logit(no)`` for each pair, in order."""
        ...

    def release(self, query: PreparedQuery) -> None: ...

    def warmup(self) -> None:
        """Run one small forward so the first caller does not pay for lazy initialisation."""
        ...


@runtime_checkable
class SteppedEngine(Protocol):
    """An engine whose scoring can pause at preemption points (see the module docstring)."""

    def score_steps(self, pairs: Sequence[PreparedPair]) -> Generator[None, None, list[float]]: ...


_R = TypeVar("_R")


def run_steps(steps: Generator[None, None, _R]) -> _R:
    """Run ``steps`` to the end without pausing; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: _R = stop.value
            return result


def probability(logit_diff: float) -> float:
    """p(yes) from ``logit(yes) - logit(no)``: the two-way softmax, numerically stable."""
    if logit_diff >= 0:
        return 1.0 / (1.0 + math.exp(-logit_diff))
    e = math.exp(logit_diff)
    return e / (1.0 + e)
