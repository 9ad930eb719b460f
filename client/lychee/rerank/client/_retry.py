"""Retry policy: which failures are worth another attempt, and how long to wait.

Reranking is a pure function of the request, so repeating it is safe. Only transient
conditions are retried: UNAVAILABLE (model loading, a replica draining, a connection that
failed) and RESOURCE_EXHAUSTED *overload* (the server says so with reason OVERLOADED or a
RetryInfo). Bad input, auth failures and size limits fail the same way every time, so
retrying them would only add latency and load. Every wait fits inside the call's overall
deadline: when the next attempt could not start in time the last error is raised as is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from ._errors import LycheeError

__all__ = ["NO_RETRY", "RetryPolicy"]

_MIN_ATTEMPT_SECONDS = 0.005
"""An attempt with less time left than this cannot complete; give up instead."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded, jittered exponential backoff.

    Attempt ``n`` (1-based) that fails retryably waits
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))`` scaled by a random factor in
    ``[1 - jitter, 1]`` (jitter spreads the retries of many clients after a shared outage),
    or the server's ``RetryInfo`` delay when one came with the error.

    Attributes:
        max_attempts: total attempts including the first; 1 disables retries.
        initial_backoff: seconds before the first retry.
        max_backoff: cap on one wait, in seconds.
        multiplier: growth factor between consecutive waits.
        jitter: fraction of each wait that is randomised, in [0, 1].
        retry_overloaded: also retry RESOURCE_EXHAUSTED overload (reason OVERLOADED or RetryInfo).
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retry_overloaded: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff durations must be >= 0")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")

    def is_retryable(self, error: LycheeError) -> bool:
        """Whether the failure is transient by the rules above."""
        if error.code is grpc.StatusCode.UNAVAILABLE:
            return True
        if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_overloaded:
            return error.reason == "OVERLOADED" or error.retry_delay is not None
        return False

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The jittered wait after failed attempt ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * (1 - self.jitter * rng.random())

    def delay_before_retry(
        self, attempt: int, error: LycheeError, remaining: float | None, rng: random.Random
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to give up now.

        ``remaining`` is the time left until the overall deadline (``None``: no deadline).
        """
        if attempt >= self.max_attempts or not self.is_retryable(error):
            return None
        if error.retry_delay is not None:
            # The server knows its queue better than our backoff does; add a little jitter
            # upward so that clients told the same delay do not return in lockstep.
            delay = error.retry_delay * (1 + 0.1 * self.jitter * rng.random())
        else:
            delay = self.backoff(attempt, rng)
        if remaining is not None and remaining - delay < _MIN_ATTEMPT_SECONDS:
            return None
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)
"""A policy that never retries."""
