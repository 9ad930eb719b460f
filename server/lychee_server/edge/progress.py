"""A latest-value mailbox between the scheduler's progress reports and a door that streams them.

The scheduler calls :meth:`ProgressMailbox.put` on the event-loop thread as pairs are prepared and
scored; the door awaits :meth:`ProgressMailbox.next` and sends what it gets. Only the newest value is
kept: a slow reader sees fewer, later values instead of pushing back on batching or growing memory,
and progress stays monotonic because each value supersedes the last.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

from lychee_server.domain import Progress

__all__ = ["ProgressMailbox", "follow"]


class ProgressMailbox:
    __slots__ = ("_changed", "_latest")

    def __init__(self) -> None:
        self._latest: Progress | None = None
        self._changed = asyncio.Event()

    def put(self, progress: Progress) -> None:
        self._latest = progress
        self._changed.set()

    def take(self) -> Progress | None:
        """The value put since the last take (None if nothing new)."""
        if not self._changed.is_set():
            return None
        self._changed.clear()
        return self._latest

    async def wait(self) -> None:
        await self._changed.wait()


async def follow(mailbox: ProgressMailbox, work: Awaitable[object]) -> AsyncIterator[Progress]:
    """Yield each new progress value until ``work`` (a task fed by ``mailbox``) is done; the last
    values reported before it finished are yielded too. ``work`` itself is not awaited here."""
    task = asyncio.ensure_future(work)
    while not task.done():
        waiter = asyncio.ensure_future(mailbox.wait())
        try:
            await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        value = mailbox.take()
        if value is not None:
            yield value
