"""The NOTIFY_COMPONENTS update policy: ask running components before touching them.

A component that subscribed to component updates gets a ``pre_update`` event naming the
deployment; it may answer ``defer_update`` with a recheck delay (a model half-way through a
batch, a robot arm mid-move). The deployment waits until every notified component has
answered or the policy timeout passes, then honours the longest deferral by waiting and
asking again — bounded by the deployment's own deadline so that nothing stays pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from nucleus.component_streams import ComponentStreams

log = structlog.get_logger("nucleus.update_policy")

_QUEUE = 16


@dataclass(slots=True)
class _Round:
    deployment_id: str
    waiting: set[str]
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    recheck_s: float = 0.0
    messages: list[str] = field(default_factory=list)


class UpdateNotifier:
    def __init__(self) -> None:
        self._streams = ComponentStreams("component updates", _QUEUE)
        self._round: _Round | None = None

    def subscribers(self) -> set[str]:
        return self._streams.names()

    def subscribe(self, component: str) -> AsyncIterator[dict[str, Any]]:
        """The stream behind ``lifecycle.subscribe_updates`` for one component."""
        return self._streams.stream(component)

    def _send(self, components: Iterable[str], event: dict[str, Any]) -> set[str]:
        return self._streams.send(components, lambda _: event)

    def defer(self, component: str, deployment_id: str, recheck_after_s: float, message: str) -> bool:
        """A component's answer to pre_update; False if no update of that deployment is being asked
        about (it timed out, or the id is wrong): the caller tells the component so."""
        current = self._round
        if current is None or current.deployment_id != deployment_id:
            log.info("update.defer_ignored", component=component, deployment_id=deployment_id)
            return False
        current.waiting.discard(component)
        if recheck_after_s > 0:
            current.recheck_s = max(current.recheck_s, recheck_after_s)
            current.messages.append(f"{component}: {message}" if message else component)
        if not current.waiting:
            current.answered.set()
        return True

    async def ask(
        self,
        deployment_id: str,
        components: Iterable[str],
        *,
        timeout_s: float,
        deadline: float,
        progress: Any = None,
    ) -> None:
        """Notify, wait for answers, and wait out deferrals until nobody defers (or deadline)."""
        names = list(components)
        while True:
            current = _Round(deployment_id, set())
            self._round = current
            current.waiting = self._send(names, {"deployment_id": deployment_id, "kind": "pre_update"})
            if not current.waiting:
                self._round = None
                return
            remaining = max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(current.answered.wait(), timeout=min(timeout_s, remaining))
            self._round = None
            if current.recheck_s <= 0:
                return
            remaining = deadline - time.monotonic()
            if remaining <= current.recheck_s:
                log.warning("update.deferral_exceeds_deadline", deployment_id=deployment_id)
                return
            if progress is not None:
                progress(f"deferred by {', '.join(current.messages)}; asking again in {current.recheck_s:g}s")
            await asyncio.sleep(current.recheck_s)

    def post_update(self, deployment_id: str, components: Iterable[str]) -> None:
        self._send(components, {"deployment_id": deployment_id, "kind": "post_update"})
