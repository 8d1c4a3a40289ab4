"""Time as an injected dependency.

Backoff and error-budget logic must be testable without sleeping, so nothing in the
lifecycle path calls ``time.monotonic``/``asyncio.sleep`` directly: it asks a :class:`Clock`.
:class:`FakeClock` only moves when a test calls :meth:`FakeClock.advance`, which wakes the
due sleepers in deadline order, so a test decides exactly when a backoff elapses.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that stands still until told to move."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    @property
    def sleepers(self) -> int:
        """Sleeps still pending; lets a test wait until a task has reached its sleep."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    def advance(self, seconds: float) -> int:
        """Move time forward and wake every sleeper now due; returns how many woke."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self._now += seconds
        woken = 0
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
                woken += 1
        return woken
