"""Configuration validation: a running component checks its new configuration before a deployment
applies it (Greengrass's SubscribeToValidateConfigurationUpdates / SendConfigurationValidityReport).

Why. A configuration-only deployment used to be SUCCEEDED whatever it held; a component that could
not use it logged the refusal and went on with its old settings, while the refused values stayed in
the stored configuration, refused again with every later change and fatal at the next restart. Now
a component that subscribes gets each proposed configuration first and answers ACCEPTED or
REJECTED with a reason; one rejection fails the deployment before anything is written
(FAILED_NO_STATE_CHANGE, naming the component and its reason). A component that does not answer
within the timeout is taken to accept, as in Greengrass, so a hung component cannot block
deployments; one that did not subscribe is not asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from nucleus.component_streams import ComponentStreams

log = structlog.get_logger("nucleus.config_validation")

Verdict = Literal["ACCEPTED", "REJECTED"]
_QUEUE = 4


@dataclass(slots=True)
class _Ask:
    deployment_id: str
    waiting: set[str]
    answers: dict[str, tuple[Verdict, str]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ConfigValidators:
    def __init__(self) -> None:
        self._streams = ComponentStreams("configuration validation", _QUEUE)
        self._ask: _Ask | None = None

    def subscribed(self) -> set[str]:
        return self._streams.names()

    def subscribe(self, component: str) -> AsyncIterator[dict[str, Any]]:
        """The stream behind ``config.validation.subscribe`` for one component."""
        return self._streams.stream(component)

    def report(self, component: str, deployment_id: str, verdict: Verdict, message: str) -> bool:
        """A component's answer; False if no validation of that deployment is waiting for it."""
        ask = self._ask
        if ask is None or ask.deployment_id != deployment_id or component not in ask.waiting:
            log.info("config.validation_report_ignored", component=component, deployment_id=deployment_id)
            return False
        ask.waiting.discard(component)
        ask.answers[component] = (verdict, message)
        if not ask.waiting:
            ask.done.set()
        return True

    async def ask(self, deployment_id: str, proposals: Mapping[str, Mapping[str, Any]], *,
                  timeout_s: float) -> dict[str, tuple[Verdict, str]]:
        """Send each subscribed component its proposed configuration; wait for every answer or the
        timeout. Returns the answers given (a component that did not answer is absent: accepted)."""
        waiting = self._streams.send(proposals, lambda name: {"deployment_id": deployment_id,
                                                               "configuration": dict(proposals[name])})
        if not waiting:
            return {}
        ask = self._ask = _Ask(deployment_id, waiting)
        started = time.monotonic()
        try:
            await asyncio.wait_for(ask.done.wait(), timeout_s)
        except TimeoutError:
            log.warning("config.validation_timeout", deployment_id=deployment_id, silent=sorted(ask.waiting),
                        waited_s=round(time.monotonic() - started, 1))
        finally:
            self._ask = None
        return dict(ask.answers)
