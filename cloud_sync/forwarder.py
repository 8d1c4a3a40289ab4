"""Local bus → spool: configured topic filters are forwarded to the cloud without component code.

Like the Greengrass MQTT bridge, but durable: each matching bus message is appended to the spool
(with the rule's priority and TTL) and leaves when the link allows. Appends are issued without
waiting for each commit (bounded by ``MAX_PENDING``), so a busy topic costs one fsync per group of
messages, and bus order is spool order. A rule's local subscription is drop-oldest: if the spool
cannot keep up (disk stalls) the loss is counted in ``local_dropped``, never silent.

A rule with a ``when`` condition (``{"is_anomaly": true}``) forwards only messages whose payload is a
map holding those top-level values (same type and value: ``1`` is not ``true``). Only such rules
decode the msgpack payload to decide, and numpy arrays stay undecoded ``ExtType``s there (no numpy
import in the daemon for a filter); the rest are counted in ``filtered``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import msgpack
import structlog

from cloud_sync.deployment_document import is_deployment_topic
from cloud_sync.envelope import KIND_BYTES, encode_payload
from cloud_sync.errors import MessageRejected, SpoolError, SpoolFullError
from cloud_sync.settings import ForwardRule
from cloud_sync.spool import NewMessage, Spool
from ipc.core import IpcCore

log = structlog.get_logger("cloud_sync.forwarder")

MAX_PENDING = 1024


def matches_condition(data: bytes, when: dict[str, Any]) -> bool:
    """Whether the bus payload (msgpack) is a map with every ``when`` key at exactly that value."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)  # no ext_hook: arrays stay ExtType
    except (ValueError, TypeError, msgpack.UnpackException):
        return False
    if not isinstance(value, dict):
        return False
    missing = object()
    for key, expected in when.items():
        got = value.get(key, missing)
        if got is missing or type(got) is not type(expected) or got != expected:
            return False
    return True


def to_cloud_payload(data: bytes) -> tuple[bytes, Any]:
    """Bus data (msgpack) → (bytes, kind); values JSON cannot carry (numpy arrays) go as the raw data."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
        return encode_payload(value)
    except (ValueError, TypeError, msgpack.UnpackException, MessageRejected):
        return bytes(data), KIND_BYTES


class Forwarder:
    def __init__(self, core: IpcCore, spool: Spool, rules: Sequence[ForwardRule], *, thing_name: str) -> None:
        self._core = core
        self._spool = spool
        self._rules = list(rules)
        self._thing = thing_name
        self._slots = asyncio.Semaphore(MAX_PENDING)
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = {"forwarded": 0, "local_dropped": 0, "refused": 0, "filtered": 0}

    async def run(self) -> None:
        if not self._rules:
            return
        try:
            async with asyncio.TaskGroup() as tg:
                for rule in self._rules:
                    tg.create_task(self._forward(rule), name=f"forward {rule.filter}")
        finally:
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _forward(self, rule: ForwardRule) -> None:
        log.info("forwarder.rule_started", filter=rule.filter, cloud_topic=rule.cloud_topic, when=rule.when)
        async with self._core.messages(rule.filter, queue_size=rule.queue_size) as messages:
            async for msg, dropped in messages:
                if dropped:
                    self.counters["local_dropped"] += dropped
                    log.warning("forwarder.dropped", filter=rule.filter, count=dropped)
                if rule.when is not None and not matches_condition(msg.data, rule.when):
                    self.counters["filtered"] += 1
                    continue
                topic = rule.cloud_topic.format(topic=msg.topic, thing=self._thing)
                if is_deployment_topic(topic):
                    # A rule whose template turns a local topic into a fleet deployment topic (a "#"
                    # rule to "{topic}") would let any component that may publish locally deploy to
                    # this device or its group: cloud.publish refuses these topics, and so does this.
                    self.counters["refused"] += 1
                    log.error("forwarder.deployment_topic_refused", filter=rule.filter, local_topic=msg.topic,
                              cloud_topic=topic)
                    continue
                payload, kind = to_cloud_payload(msg.data)
                await self._slots.acquire()
                task = asyncio.create_task(self._append(NewMessage(topic, payload, kind, priority=rule.priority,
                                                                   ttl_s=rule.ttl_s)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _append(self, message: NewMessage) -> None:
        try:
            await self._spool.append(message)
            self.counters["forwarded"] += 1
        except SpoolFullError:
            self.counters["refused"] += 1  # counted (and logged) by the spool as well
        except SpoolError as exc:
            self.counters["refused"] += 1
            log.error("forwarder.spool_failed", topic=message.topic, error=str(exc))  # noqa: TRY400
        finally:
            self._slots.release()
