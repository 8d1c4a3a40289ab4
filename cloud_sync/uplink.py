"""The broker link: drains the spool over MQTT (QoS 1) and delivers cloud messages to local subscribers.

Delivery is at-least-once with stable ids: a spooled message is deleted only after the PUBACK of
the MQTT message that carried it, so a link lost between PUBLISH and PUBACK (or a ``kill -9``)
means the message is sent again, with the same id, on the next connection.

Order per topic: the spool is read in sequence order, messages of one topic go into batches in
that order, and every PUBLISH is handed to the one connection in that order (the MQTT spec keeps
per-topic order on a connection). After a reconnect the unacknowledged tail is re-read from the
spool, still in order.

In flight: at most ``max_inflight`` MQTT messages await their PUBACK, each carrying up to
``batch_max_messages`` records (``envelope="batch"``). Batches fill by themselves under load:
while the window is full the backlog grows, and the next peek takes it in one go; a lone message
on an idle link leaves at once.

Inbound: :meth:`Uplink.subscribe` gives a bounded async iterator of cloud messages for a filter;
the broker subscription is reference-counted and renewed on every reconnect, and the session is
persistent (``session_expiry_s``) so QoS 1 messages published while the device was offline
arrive when it reconnects. Fleet deployments (cloud_sync.inbound) subscribe the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as paho
import structlog
from aiomqtt.exceptions import MqttCodeError, MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync import envelope
from cloud_sync.envelope import Record
from cloud_sync.errors import LinkError, SpoolError
from cloud_sync.settings import SyncSettings
from cloud_sync.spool import Spool
from ipc.topics import matches, validate_filter

log = structlog.get_logger("cloud_sync.uplink")

# CONNACK codes meaning "your credentials are refused" (MQTT 3.1.1: 4, 5; MQTT 5: 134, 135, 138)
_AUTH_REFUSED = {4, 5, 134, 135, 138}
ERRORS_KEPT = 10


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter: delay = min(max, initial * 2**n) * uniform(1 - jitter, 1)."""

    initial: float
    maximum: float
    jitter: float
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next(self) -> float:
        base = min(self.maximum, self.initial * (2.0 ** min(self.attempt, 60)))
        self.attempt += 1
        return base * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (1883) or ``mqtts://host[:port]`` (8883; also ``ssl://``, ``tls://``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in {"mqtt", "tcp", "mqtts", "ssl", "tls"} or not parts.hostname:
        raise LinkError(f"broker url {url!r} must be mqtt://host[:port] or mqtts://host[:port]", reason="bad_url")
    tls = scheme in {"mqtts", "ssl", "tls"}
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise LinkError(f"broker url {url!r}: bad port", reason="bad_url") from exc
    return BrokerAddress(parts.hostname, port, tls)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    retain: bool


class InboundSubscription:
    """A bounded queue of cloud messages for one filter; drop-oldest, the loss counted per message."""

    def __init__(self, topic_filter: str, queue_size: int) -> None:
        self.filter = topic_filter
        self._queue: deque[InboundMessage] = deque()
        self._size = queue_size
        self._dropped = 0
        self._event = asyncio.Event()
        self._closed = False

    def offer(self, message: InboundMessage) -> None:
        if len(self._queue) >= self._size:
            self._queue.popleft()
            self._dropped += 1
        self._queue.append(message)
        self._event.set()

    def close(self) -> None:
        self._closed = True
        self._event.set()

    def __aiter__(self) -> InboundSubscription:
        return self

    async def __anext__(self) -> tuple[InboundMessage, int]:
        """The next message and how many were dropped just before it."""
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        dropped, self._dropped = self._dropped, 0
        return self._queue.popleft(), dropped


def _fail_connect_on_close(client: aiomqtt.Client) -> None:
    """Fail the connect at once when the connection closes before the CONNACK.

    aiomqtt 2.5 ignores a disconnect that comes before the CONNACK and waits for its timeout, so a
    link that accepts TCP and closes it (a proxy or load balancer whose broker is down, a broker at
    its connection limit) cost ``connect_timeout_s`` (10 s) per attempt instead of the backoff.
    """
    paho_client = client._client
    aiomqtt_on_disconnect = cast("Callable[..., None] | None", paho_client.on_disconnect)  # a VERSION2 callback

    def on_disconnect(c: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        pending = client._connected
        if not pending.done():
            pending.set_exception(MqttCodeError(reason_code, "the connection closed before the CONNACK"))
        if aiomqtt_on_disconnect is not None:
            aiomqtt_on_disconnect(c, userdata, flags, reason_code, properties)

    paho_client.on_disconnect = on_disconnect


class _LinkLost(Exception):
    """A publish failed: the session ends and the connection loop reconnects."""


class Uplink:
    def __init__(self, settings: SyncSettings, spool: Spool, *, thing_name: str,
                 rng: random.Random | None = None,
                 on_error: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._settings = settings
        self._spool = spool
        self._thing = thing_name
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s, settings.reconnect_jitter,
                                rng or random.Random())
        self._on_error = on_error
        self._stopping = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._subs: list[InboundSubscription] = []
        self._filters: dict[str, int] = {}
        self.state = "disabled" if settings.url is None else "connecting"
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)
        self.connected_since: float | None = None
        self.next_attempt_at: float | None = None
        self.counters = {"connects": 0, "disconnects": 0, "published_messages": 0, "published_records": 0,
                         "inbound_received": 0, "inbound_oversized": 0, "inbound_unmatched": 0}
        self._inflight = 0
        self._latest: dict[str, bytes] = {}
        self._latest_sent: dict[str, bytes] = {}
        self._latest_changed = asyncio.Event()
        self._log = log.bind(broker=self._safe_url())

    def _safe_url(self) -> str | None:
        """The broker URL without a password in it (for logs and status)."""
        url = self._settings.url
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username}@{host}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()

    # --- status --------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "broker": self._safe_url(),
            "connected_since": self.connected_since,
            "next_attempt_in_s": (max(0.0, self.next_attempt_at - time.monotonic())
                                  if self.next_attempt_at is not None and self.state == "backoff" else None),
            "in_flight": self._inflight,
            "subscriptions": sorted(self._filters),
            "errors": list(self.errors),
            **self.counters,
        }

    def _error(self, code: str, message: str, **fields: Any) -> None:
        entry = {"ts": time.time(), "code": code, "message": message, **fields}
        self.errors.append(entry)
        if self._on_error is not None:
            self._on_error(entry)

    def publish_latest(self, topic: str, payload: bytes) -> None:
        """A last-value document (device status), retained, QoS 1, never spooled.

        Sent at once when connected and again on every connect, so the cloud always holds the
        newest one; an outage does not pile up stale copies in the spool, and a full disk cannot
        silence it.
        """
        self._latest[topic] = payload
        self._latest_changed.set()

    async def _send_latest(self, client: aiomqtt.Client) -> None:
        self._latest_sent = {}
        while True:
            self._latest_changed.clear()
            for topic, payload in list(self._latest.items()):
                if self._latest_sent.get(topic) is payload:
                    continue
                await client.publish(topic, payload, qos=1, retain=True, timeout=self._settings.publish_timeout_s)
                self._latest_sent[topic] = payload
            await self._latest_changed.wait()

    # --- inbound subscriptions --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def subscribe(self, topic_filter: str, *, queue_size: int = 1024,
                        keep_on_broker: bool = False) -> AsyncIterator[InboundSubscription]:
        """Cloud messages matching ``topic_filter`` while the block lasts (across reconnects).

        ``keep_on_broker``: no UNSUBSCRIBE at the end, so the subscription stays in the persistent
        session and the broker queues QoS 1 messages for it while the device is off (fleet
        deployments); it also keeps a shutdown from waiting for an UNSUBACK.
        """
        validate_filter(topic_filter)
        sub = InboundSubscription(topic_filter, queue_size)
        self._subs.append(sub)
        self._filters[topic_filter] = self._filters.get(topic_filter, 0) + 1
        if self._filters[topic_filter] == 1 and self._client is not None:
            await self._broker_subscribe(self._client, topic_filter)
        try:
            yield sub
        finally:
            sub.close()
            self._subs.remove(sub)
            self._filters[topic_filter] -= 1
            if not self._filters[topic_filter]:
                del self._filters[topic_filter]
                client = self._client
                if client is not None and not keep_on_broker:
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.unsubscribe(topic_filter, timeout=self._settings.publish_timeout_s)

    async def _broker_subscribe(self, client: aiomqtt.Client, topic_filter: str) -> None:
        try:
            result = await client.subscribe(topic_filter, qos=1, timeout=self._settings.publish_timeout_s)
        except aiomqtt.MqttError as exc:
            self._log.warning("uplink.subscribe_failed", filter=topic_filter, error=str(exc))
            return
        codes = [getattr(c, "value", c) for c in (result or [])]
        if any(isinstance(c, int) and c >= 0x80 for c in codes):
            self._error("SUBSCRIBE_REFUSED", f"the broker refused the subscription to {topic_filter!r}",
                        filter=topic_filter)
            self._log.error("uplink.subscribe_refused", filter=topic_filter, codes=codes)

    # --- the connection loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, drain, reconnect with backoff — until :meth:`close`."""
        if self._settings.url is None:
            self._log.info("uplink.disabled", reason="no broker url configured; everything stays spooled")
            await self._stopping.wait()
            return
        try:
            address = parse_url(self._settings.url)
        except LinkError as exc:
            self.state = "misconfigured"
            self._error(exc.code, exc.message, reason=exc.reason)
            self._log.error("uplink.bad_url", error=exc.message)
            await self._stopping.wait()
            return
        while not self._stopping.is_set():
            self.state = "connecting"
            try:
                await self._connect_and_serve(address)
            except aiomqtt.MqttError as exc:
                self._lost(exc)
            except _LinkLost as exc:
                if not isinstance(exc.__cause__, SpoolError):
                    self._lost(exc.__cause__ or exc)
            except LinkError as exc:
                self._error(exc.code, exc.message, reason=exc.reason)
                self._log.error("uplink.link_error", error=exc.message, reason=exc.reason)
            finally:
                self._client = None
                if self.connected_since is not None:
                    self.counters["disconnects"] += 1
                self.connected_since = None
            if self._stopping.is_set():
                break
            delay = self._backoff.next()
            self.state = "backoff"
            self.next_attempt_at = time.monotonic() + delay
            self._log.info("uplink.reconnect_scheduled", delay_s=round(delay, 3), attempt=self._backoff.attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        self.state = "stopped"

    def _lost(self, exc: BaseException) -> None:
        rc = getattr(exc, "rc", None)
        code = getattr(rc, "value", rc)
        if isinstance(exc, MqttConnectError) and code in _AUTH_REFUSED:
            self._error("AUTH_REFUSED", f"the broker refused the credentials: {exc}", rc=code)
            self._log.error("uplink.connect_refused", rc=code, error=str(exc))
        elif isinstance(exc, MqttConnectError):
            self._error("CONNECT_REFUSED", f"the broker refused the connection: {exc}", rc=code)
            self._log.error("uplink.connect_refused", rc=code, error=str(exc))
        elif self.connected_since is None:
            self._error("CONNECT_FAILED", f"cannot reach the broker: {exc}")
            self._log.warning("uplink.connect_failed", error=str(exc))
        else:
            self._error("LINK_LOST", f"the broker link was lost: {exc}")
            self._log.warning("uplink.link_lost", error=str(exc))

    def _tls_context(self) -> ssl.SSLContext:
        s = self._settings
        try:
            ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if s.cert_file is not None:
                ctx.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"cannot load the TLS files: {exc}", reason="tls_files",
                            ca_file=str(s.ca_file), cert_file=str(s.cert_file)) from exc
        return ctx

    def _client_for(self, address: BrokerAddress) -> aiomqtt.Client:
        s = self._settings
        v5 = s.mqtt_version == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry_s
        client = aiomqtt.Client(
            address.host, address.port,
            identifier=s.client_id or self._thing,
            username=s.username, password=s.password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else s.session_expiry_s == 0,
            clean_start=(s.session_expiry_s == 0) if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
            keepalive=s.keepalive_s,
            timeout=s.connect_timeout_s,
            tls_context=self._tls_context() if address.tls else None,
            max_inflight_messages=s.max_inflight + 1,
            max_queued_incoming_messages=10_000,
        )
        client.pending_calls_threshold = s.max_inflight + 8  # our own window; not worth a warning
        _fail_connect_on_close(client)
        return client

    async def _connect_and_serve(self, address: BrokerAddress) -> None:
        client = self._client_for(address)
        async with client:
            self._client = client
            self.connected_since = time.time()
            self.counters["connects"] += 1
            self.state = "connected"
            self._backoff.reset()
            stats = self._spool.stats()
            self._log.info("uplink.connected", backlog=stats.messages)
            for topic_filter in list(self._filters):
                await self._broker_subscribe(client, topic_filter)
            receiver = asyncio.create_task(self._receive(client), name="uplink-receive")
            latest = asyncio.create_task(self._send_latest(client), name="uplink-latest")
            sender = asyncio.create_task(self._send(client), name="uplink-send")
            tasks = (receiver, latest, sender)
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raise what ended the session
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, _LinkLost, aiomqtt.MqttError):
                        await task

    # --- outbound ---------------------------------------------------------------------------------------------
    def batches(self, records: Sequence[Record]) -> list[list[Record]]:
        """Group records into MQTT messages, keeping per-topic order (see the module docstring)."""
        s = self._settings
        if s.envelope == "raw":
            return [[r] for r in records]
        out: list[list[Record]] = []
        open_: dict[tuple[str, int], tuple[list[Record], int]] = {}
        for r in records:
            if r.retain:  # a retained message is one status document, never a batch
                out.append([r])
                continue
            key = (r.topic, r.qos)
            size = envelope.item_size(r)
            cur = open_.get(key)
            if cur is not None and (len(cur[0]) >= s.batch_max_messages or cur[1] + size > s.batch_max_bytes):
                cur = None
            if cur is None:
                batch: list[Record] = []
                out.append(batch)
                open_[key] = (batch, size)
                batch.append(r)
            else:
                cur[0].append(r)
                open_[key] = (cur[0], cur[1] + size)
        return out

    async def _send(self, client: aiomqtt.Client) -> None:
        s = self._settings
        spool = self._spool
        window = s.batch_max_messages * s.max_inflight if s.envelope == "batch" else s.max_inflight * 4
        slots = asyncio.Semaphore(s.max_inflight)
        failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        tasks: set[asyncio.Task[None]] = set()
        cursor = 0
        try:
            while not self._stopping.is_set() and not failed.done():
                spool.appended.clear()
                records = await spool.peek(cursor, window)
                if not records:
                    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(spool.appended.wait()),
                                                          asyncio.ensure_future(self._stopping.wait())]
                    try:
                        await asyncio.wait([*waiters, failed], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waiters:
                            w.cancel()
                    continue
                cursor = records[-1].seq
                for batch in self.batches(records):
                    await slots.acquire()
                    if failed.done():
                        slots.release()
                        break
                    task = asyncio.create_task(self._publish(client, batch, slots, failed))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:  # stopping: let the PUBACKs in flight land so their deletions are recorded
                await asyncio.wait(list(tasks), timeout=s.flush_timeout_s)
            if failed.done():
                raise _LinkLost(str(failed.result())) from failed.result()
        finally:
            for task in list(tasks):
                task.cancel()
            if not failed.done():
                failed.cancel()

    async def _publish(self, client: aiomqtt.Client, batch: list[Record], slots: asyncio.Semaphore,
                       failed: asyncio.Future[BaseException]) -> None:
        s = self._settings
        first = batch[0]
        props: Properties | None = None
        v5 = s.mqtt_version == "5"
        if s.envelope == "batch":
            payload = envelope.batch(self._thing, batch)
            if v5:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ContentType = envelope.CONTENT_TYPE_BATCH
        else:
            payload = first.payload
            if v5:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.UserProperty = [(envelope.ID_PROPERTY, first.id)]
        self._inflight += 1
        try:
            await client.publish(first.topic, payload, qos=first.qos, retain=first.retain, properties=props,
                                 timeout=s.publish_timeout_s)
            self.counters["published_messages"] += 1
            self.counters["published_records"] += len(batch)
            await self._spool.ack([r.seq for r in batch])
        except aiomqtt.MqttError as exc:
            if not failed.done():
                failed.set_result(exc)
        except SpoolError as exc:  # published but not recorded: resent (same ids) after a reconnect
            self._error(exc.code, f"cannot record deliveries: {exc.message}", reason=exc.reason)
            self._log.error("uplink.ack_failed", error=exc.message)
            if not failed.done():
                failed.set_result(exc)
        finally:
            self._inflight -= 1
            slots.release()

    # --- inbound ------------------------------------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client) -> None:
        limit = self._settings.max_inbound_bytes
        async for m in client.messages:
            raw = m.payload
            payload = raw if isinstance(raw, bytes) else bytes(raw) if isinstance(raw, bytearray) \
                else str(raw).encode() if raw is not None else b""
            topic = m.topic.value
            self.counters["inbound_received"] += 1
            if len(payload) > limit:
                self.counters["inbound_oversized"] += 1
                self._error("INBOUND_OVERSIZED", f"dropped a {len(payload)} B cloud message on {topic!r} "
                            f"(limit {limit} B)", topic=topic, bytes=len(payload), limit=limit)
                self._log.error("uplink.inbound_oversized", topic=topic, bytes=len(payload), limit=limit)
                continue
            message = InboundMessage(topic, payload, bool(m.retain))
            matched = False
            for sub in self._subs:
                if matches(sub.filter, topic):
                    sub.offer(message)
                    matched = True
            if not matched:
                self.counters["inbound_unmatched"] += 1

    async def close(self) -> None:
        """Stop: PUBACKs in flight get ``flush_timeout_s`` to land; everything else stays spooled."""
        self._stopping.set()
