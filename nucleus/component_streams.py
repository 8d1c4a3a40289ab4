"""Events for components, one bounded queue per open stream: the shape shared by the streams through
which the nucleus asks running components something during a deployment (component updates,
configuration validation). A full queue drops the event for that stream and says so; the asker then
treats the component as not having been asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import structlog

log = structlog.get_logger("nucleus.component_streams")


class ComponentStreams:
    def __init__(self, what: str, maxsize: int) -> None:
        self._what = what  # for the log line of a dropped event
        self._maxsize = maxsize
        self._queues: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}

    def names(self) -> set[str]:
        """The components with at least one open stream."""
        return {name for name, queues in self._queues.items() if queues}

    async def stream(self, component: str) -> AsyncIterator[dict[str, Any]]:
        """One open stream of ``component``'s events, until the caller stops iterating."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self._maxsize)
        self._queues.setdefault(component, set()).add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.get(component, set()).discard(queue)

    def send(self, components: Iterable[str], event_of: Callable[[str], dict[str, Any]]) -> set[str]:
        """``event_of(name)`` to every open stream of each component; the names it reached."""
        sent: set[str] = set()
        for name in components:
            event = event_of(name)
            for queue in self._queues.get(name, ()):
                try:
                    queue.put_nowait(event)
                    sent.add(name)
                except asyncio.QueueFull:
                    log.warning("component_streams.event_dropped", stream=self._what, component=name)
        return sent
