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
import errno
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cloud_sync import envelope
from cloud_sync.envelope import Record
from cloud_sync.errors import LinkError, SpoolError
from cloud_sync.settings import SETTINGS_NAMES, BrokerAddress, SyncSettings, parse_url
from cloud_sync.spool import Spool
from ipc.topics import matches, validate_filter

if TYPE_CHECKING:
    import aiomqtt
    from paho.mqtt.properties import Properties

# The MQTT client (aiomqtt, paho; cloud_sync.mqtt_session) is imported when a broker is configured:
# a device that keeps everything in its spool does not carry it (about 1 MB of the daemon's idle RSS).

log = structlog.get_logger("cloud_sync.uplink")

ERRORS_KEPT = 10


TLS_SETTINGS = SETTINGS_NAMES.tls


def tls_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
                names: tuple[str, str, str] = TLS_SETTINGS) -> ssl.SSLContext:
    """The TLS context for the broker link; a file that cannot serve is a LinkError naming its setting.

    Why each check: OpenSSL's own errors name neither the file nor the setting ("No such file or
    directory", "PEM lib"), and an encrypted key would make OpenSSL prompt for a passphrase on the
    daemon's terminal. ``names`` lets another caller (a command line's ``--ca/--cert/--key``) name
    its own options.
    """
    ca_name, cert_name, key_name = names
    contents: dict[str, bytes] = {}
    for name, path in zip(names, (ca_file, cert_file, key_file), strict=True):
        if path is not None:
            try:
                contents[name] = Path(path).read_bytes()
            except OSError as exc:
                raise _tls_file_error(name, path, exc.strerror or str(exc)) from exc
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except ssl.SSLError as exc:
        raise _tls_file_error(ca_name, ca_file, f"no PEM CA certificate in it ({exc.reason or exc})") from exc
    if cert_file is None:
        return ctx
    cert, key = contents[cert_name], contents.get(key_name, contents[cert_name])
    key_at = (key_name, key_file) if key_file is not None else (cert_name, cert_file)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise _tls_file_error(cert_name, cert_file, "no PEM certificate in it")
    if b"ENCRYPTED" in key:
        raise _tls_file_error(*key_at, "the private key is encrypted: the daemon cannot ask for a passphrase "
                              "(decrypt it: openssl pkey -in KEY -out KEY.plain)")
    if b"PRIVATE KEY-----" not in key:
        raise _tls_file_error(*key_at, "no PEM private key in it" if key_file is not None
                              else f"no private key in it, and {key_name} is not set")
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file is not None else None)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _tls_file_error(*key_at, f"is not the key of the certificate in {cert_name} {cert_file}") from exc
        raise _tls_file_error(*key_at, f"cannot be loaded with the certificate ({exc})") from exc
    return ctx


def _tls_file_error(setting: str, path: Path | None, reason: str) -> LinkError:
    return LinkError(f"{setting} {path}: {reason}", reason="tls_files", setting=setting, path=str(path))


def ignore_closed_socket_watch(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` drop its failure to watch a socket that is already closed; pass anything else on.

    aiomqtt asks the loop, from paho's connect thread, to watch the new socket; when the connect
    fails at once (a broker refusing the client certificate), the socket can be closed before the
    loop gets to it, and asyncio printed "Exception in callback ... Bad file descriptor" with a
    traceback (under a fleet command's one error line; in the daemon's log as an error). The
    connection is gone already and its failure is reported on its own: nothing is lost. Both the
    daemon and the fleet commands install this on their loop.
    """
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc, handle = context.get("exception"), context.get("handle")
        callback = getattr(handle, "_callback", None)
        if isinstance(exc, OSError) and exc.errno == errno.EBADF and callback in (loop.add_writer, loop.add_reader):
            log.debug("uplink.closed_socket_watch", error=str(exc))
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


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
class InboundMessage:
    topic: str
    payload: bytes
    retain: bool
    properties: dict[str, Any] = field(default_factory=dict)


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
        self._unexplained_close: dict[str, Any] | None = None  # a TLS close without a reason (see _lost)
        self.connected_since: float | None = None
        self.next_attempt_at: float | None = None
        self.counters = {"connects": 0, "disconnects": 0, "published_messages": 0, "published_records": 0,
                         "inbound_received": 0, "inbound_oversized": 0, "inbound_unmatched": 0}
        self._inflight = 0
        self._latest: dict[str, bytes] = {}
        self._latest_sent: dict[str, bytes] = {}
        self._latest_changed = asyncio.Event()
        self._log = log.bind(broker=settings.url)

    # --- status --------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "broker": self._settings.url,
            "connected_since": self.connected_since,
            "next_attempt_in_s": (max(0.0, self.next_attempt_at - time.monotonic())
                                  if self.next_attempt_at is not None and self.state == "backoff" else None),
            "in_flight": self._inflight,
            "subscriptions": sorted(self._filters),
            "errors": list(self.errors),
            **self.counters,
        }

    def _error(self, code: str, message: str, **fields: Any) -> None:
        """Record an error; the same error again (every reconnect attempt) counts on its last entry.

        Otherwise a broker refusing the device for a minute fills the list (and the device status)
        with copies of one line and pushes out what came before it, such as the first LINK_LOST.
        """
        now = time.time()
        last = self.errors[-1] if self.errors else None
        if last is not None and last["code"] == code and last["message"] == message:
            last.setdefault("since", last["ts"])
            last["ts"] = now
            last["count"] = last.get("count", 1) + 1
            entry = last
        else:
            entry = {"ts": now, "code": code, "message": message, **fields}
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
                    import aiomqtt

                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.unsubscribe(topic_filter, timeout=self._settings.publish_timeout_s)

    async def _broker_subscribe(self, client: aiomqtt.Client, topic_filter: str) -> None:
        import aiomqtt

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
        import aiomqtt

        address = parse_url(self._settings.url)  # the settings refused a url that does not parse
        while not self._stopping.is_set():
            self.state = "connecting"
            try:
                await self._connect_and_serve(address)
            except aiomqtt.MqttError as exc:
                self._lost(exc, address)
            except _LinkLost as exc:
                if not isinstance(exc.__cause__, SpoolError):
                    self._lost(exc.__cause__ or exc)
            except LinkError as exc:
                self._error(exc.code, exc.message, **{k: v for k, v in exc.to_dict().items() if k != "code"})
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

    def _lost(self, exc: BaseException, address: BrokerAddress | None = None) -> None:
        from cloud_sync.mqtt_session import CONNECT_FAILURE_LOG, closed_after_handshake, connect_failure

        if self.connected_since is not None or address is None:
            self._error("LINK_LOST", f"the broker link was lost: {exc}")
            self._log.warning("uplink.link_lost", error=str(exc))
            return
        s = self._settings
        code, message, fields = connect_failure(exc, address, ca_file=s.ca_file, cert_file=s.cert_file,
                                                username=s.username)
        last = self.errors[-1] if self.errors else None
        unexplained = closed_after_handshake(exc, address)
        if code == "CONNECT_FAILED" and last is not None and last["code"] == "TLS_FAILED" and unexplained:
            # TLS 1.3: a broker refuses the client certificate after the handshake, with an alert and a
            # close that race; when the close wins, the client reads only an EOF. It is the refusal the
            # previous attempt named, counted on its entry, not a new "cannot reach the broker".
            code, message, fields = "TLS_FAILED", last["message"], {"setting": last.get("setting")}
        elif code == "TLS_FAILED" and last is not None and last is self._unexplained_close \
                and last.get("count", 1) == 1:
            # The same race, lost on the first attempt: that closed connection was this refusal.
            self.errors.pop()
            fields = {**fields, "count": 2, "since": last["ts"]}
        self._error(code, message, **fields)
        self._unexplained_close = self.errors[-1] if code == "CONNECT_FAILED" and unexplained else None
        level, event = CONNECT_FAILURE_LOG[code]
        getattr(self._log, level)(event, error=message, **fields)

    def _client_for(self, address: BrokerAddress) -> aiomqtt.Client:
        import aiomqtt
        import paho.mqtt.client as paho
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from cloud_sync.mqtt_session import fail_connect_on_close

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
            tls_context=tls_context(s.ca_file, s.cert_file, s.key_file) if address.tls else None,
            max_inflight_messages=s.max_inflight + 1,
            max_queued_incoming_messages=10_000,
        )
        client.pending_calls_threshold = s.max_inflight + 8  # our own window; not worth a warning
        fail_connect_on_close(client, self._log)
        return client

    async def _connect_and_serve(self, address: BrokerAddress) -> None:
        import aiomqtt

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
        # The one open batch per topic. A record that cannot join it (sent alone, another QoS, no room)
        # closes it: a later record of that topic joining an earlier batch would overtake this one.
        open_: dict[str, tuple[list[Record], int]] = {}
        for r in records:
            if r.retain or r.kind in envelope.VERBATIM_KINDS:  # one status document, or bytes sent as they are
                open_.pop(r.topic, None)
                out.append([r])
                continue
            size = envelope.item_size(r)
            cur = open_.get(r.topic)
            if cur is not None and (cur[0][0].qos != r.qos or len(cur[0]) >= s.batch_max_messages
                                    or cur[1] + size > s.batch_max_bytes):
                cur = None
            if cur is None:
                batch: list[Record] = []
                out.append(batch)
                open_[r.topic] = (batch, size)
                batch.append(r)
            else:
                cur[0].append(r)
                open_[r.topic] = (cur[0], cur[1] + size)
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
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from cloud_sync.mqtt_session import publish_properties

        s = self._settings
        first = batch[0]
        props: Properties | None = None
        v5 = s.mqtt_version == "5"
        if s.envelope == "batch" and first.kind not in envelope.VERBATIM_KINDS:
            payload = envelope.batch(self._thing, batch)
            if v5:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ContentType = envelope.CONTENT_TYPE_BATCH
        else:
            extra, payload = envelope.verbatim_parts(first)
            if v5:
                props = publish_properties(first, extra, time.time())
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
        from cloud_sync.mqtt_session import received_properties

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
            message = InboundMessage(topic, payload, bool(m.retain), received_properties(m.properties))
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
