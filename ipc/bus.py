"""Routing core: topics to subscriptions, bounded per-subscriber queues, drop/block policy.

Independent of any wire format: a front end hands the bus a :class:`Sink` per subscription and the
bus offers it messages. The contract keeps a slow reader from hurting anyone else:

* A message goes straight to the sink while the sink is writable and the subscription has nothing
  queued (the fast path; order is preserved because a non-empty queue always goes first).
* Otherwise it waits in the subscription's queue, bounded by ``queue_size`` messages and by
  ``max_queue_bytes`` of payload (so big payloads cannot multiply the bound). ``drop_oldest``
  (default) discards the oldest and counts it; the count rides on the next delivered message.
  ``block`` (lossless) accepts the message and reports the subscription as *full* so the caller
  can stop reading from its publisher until there is room (:meth:`Bus.route` / :meth:`publish_async`)
  — back-pressure flows to the publisher's socket, never into the event loop.
* The sink drains the queue with :meth:`Subscription.take` when it becomes writable again.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ipc.errors import InvalidArguments
from ipc.topics import TopicTrie, validate_filter, validate_topic

Policy = Literal["drop_oldest", "block"]
POLICIES: tuple[str, ...] = ("drop_oldest", "block")
MAX_QUEUE_SIZE = 1_000_000
_MATCH_CACHE_MAX = 4096


@dataclass(slots=True, eq=False)
class BusMessage:
    """One published message; ``data`` is codec-encoded and never decoded by the daemon.

    ``wire`` is a cache slot for the front end that delivers it: the native server keeps the
    packed subscriber-independent fields of its MESSAGE frame (everything before ``data``) here and
    reuses them for every subscriber; ``wire_extra`` is free for other front ends.
    """

    topic: str
    data: bytes
    sender: str | None = None
    reply_to: str | None = None
    wire: bytes | None = None
    wire_extra: dict[str, Any] | None = None


class Sink(Protocol):
    """What a front end gives the bus for each subscription."""

    def offer(self, sub: Subscription, msg: BusMessage, dropped: int) -> bool:
        """Deliver now if able (and return True); False means 'queue it, I will call take()'."""
        ...

    def pending(self, sub: Subscription) -> None:
        """The queue became non-empty (drain it when writable), or the subscription closed."""
        ...


@dataclass(slots=True, eq=False)
class Subscription:
    """One subscriber's filter, policy and bounded queue.

    ``front`` belongs to the front end whose sink this is (the native server keeps its credit,
    cached frame head and open batch there), so the per-delivery path needs no lookup by id.
    """

    id: int
    filter: str
    sink: Sink
    queue_size: int
    policy: Policy
    owner: Any = None
    max_bytes: int = 4 * 1024 * 1024
    front: Any = None
    queued_bytes: int = 0
    queue: deque[BusMessage] = field(default_factory=deque)
    dropped: int = 0
    dropped_total: int = 0
    delivered: int = 0
    closed: bool = False
    _room: list[asyncio.Future[None]] = field(default_factory=list)

    def take(self) -> tuple[BusMessage, int] | None:
        """Pop the next queued message with the count dropped before it (reset to 0)."""
        if not self.queue:
            return None
        msg = self.queue.popleft()
        self.queued_bytes -= len(msg.data)
        dropped, self.dropped = self.dropped, 0
        self.delivered += 1
        if self._room and len(self.queue) <= self.queue_size // 2 and self.queued_bytes <= self.max_bytes // 2:
            self._wake_room()  # hysteresis: a blocked publisher resumes for half a queue, not one message
        return msg, dropped

    def take_many(self, limit: int, max_bytes: int) -> tuple[list[BusMessage], int]:
        """Pop up to ``limit`` queued messages, stopping once ``max_bytes`` of data are taken (at
        least one is), with the count dropped before the first; a batch costs one call, not one each.
        """
        q = self.queue
        k = min(limit, len(q))
        if k <= 0:
            return [], 0
        popleft = q.popleft
        msgs: list[BusMessage] = []
        append = msgs.append
        nbytes = 0
        for _ in range(k):
            msg = popleft()
            append(msg)
            nbytes += len(msg.data)
            if nbytes >= max_bytes:
                break
        self.queued_bytes -= nbytes
        dropped, self.dropped = self.dropped, 0
        self.delivered += len(msgs)
        if self._room and len(q) <= self.queue_size // 2 and self.queued_bytes <= self.max_bytes // 2:
            self._wake_room()
        return msgs, dropped

    def has_room(self) -> bool:
        return self.closed or (len(self.queue) < self.queue_size and self.queued_bytes < self.max_bytes)

    async def wait_room(self) -> None:
        """For lossless publishers: resolve once the queue is below its bound (or closed)."""
        while not self.has_room():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room.append(fut)
            try:
                await fut
            finally:
                if fut in self._room:
                    self._room.remove(fut)

    def _wake_room(self) -> None:
        waiters, self._room = self._room, []
        for f in waiters:
            if not f.done():
                f.set_result(None)


class Bus:
    """Topic routing for every front end and for the nucleus itself."""

    def __init__(self, *, max_queue_bytes: int = 4 * 1024 * 1024) -> None:
        self._trie: TopicTrie[Subscription] = TopicTrie()
        self._match_cache: dict[str, list[Subscription]] = {}
        self._ids = itertools.count(1)
        self.published = 0
        self.delivered = 0
        self.max_queue_bytes = max_queue_bytes

    def __len__(self) -> int:
        return len(self._trie)

    def subscribe(self, topic_filter: str, sink: Sink, queue_size: int = 1024,
                  policy: Policy = "drop_oldest", *, owner: Any = None,
                  sub_id: int | None = None, max_queue_bytes: int | None = None) -> Subscription:
        validate_filter(topic_filter)
        if type(queue_size) is not int or not 1 <= queue_size <= MAX_QUEUE_SIZE:
            raise InvalidArguments(f"queue_size must be an integer in 1..{MAX_QUEUE_SIZE}",
                                   {"queue_size": repr(queue_size)})
        if policy not in POLICIES:
            raise InvalidArguments(f"policy must be one of {', '.join(POLICIES)}", {"policy": repr(policy)})
        sub = Subscription(sub_id if sub_id is not None else next(self._ids), topic_filter, sink,
                           queue_size, policy, owner, max_queue_bytes or self.max_queue_bytes)
        self._trie.add(topic_filter, sub)
        self._match_cache.clear()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.closed:
            return
        sub.closed = True
        self._trie.remove(sub.filter, sub)
        self._match_cache.clear()
        sub.queue.clear()
        sub.queued_bytes = 0
        sub._wake_room()
        sub.sink.pending(sub)  # lets an iterator-style sink notice the end

    def subscriptions(self) -> list[Subscription]:
        return list(self._trie.values())

    def match(self, topic: str) -> list[Subscription]:
        subs = self._match_cache.get(topic)
        if subs is None:
            subs = self._trie.match(topic)
            if len(self._match_cache) >= _MATCH_CACHE_MAX:
                self._match_cache.clear()
            self._match_cache[topic] = subs
        return subs

    def route(self, msg: BusMessage) -> tuple[int, list[Subscription] | None]:
        """Deliver or queue ``msg`` (topic already validated); returns (deliveries, full lossless subs)."""
        full: list[Subscription] | None = None
        subs = self.match(msg.topic)
        for sub in subs:
            q = sub.queue
            if not q:
                dropped = sub.dropped
                if sub.sink.offer(sub, msg, dropped):
                    sub.delivered += 1
                    if dropped:
                        sub.dropped = 0
                    continue
            size = len(msg.data)
            if q and (len(q) >= sub.queue_size or sub.queued_bytes + size > sub.max_bytes):
                if sub.policy == "drop_oldest":
                    while q and (len(q) >= sub.queue_size or sub.queued_bytes + size > sub.max_bytes):
                        sub.queued_bytes -= len(q.popleft().data)
                        sub.dropped += 1
                        sub.dropped_total += 1
                else:
                    if full is None:
                        full = []
                    full.append(sub)
            q.append(msg)
            sub.queued_bytes += size
            if len(q) == 1:
                sub.sink.pending(sub)
        n = len(subs)
        self.published += 1
        self.delivered += n
        return n, full

    def route_many(self, topic: str, msgs: list[BusMessage]) -> tuple[int, list[Subscription] | None]:
        """:meth:`route` for a run of messages to one ``topic``, with the same outcome per subscription.

        The topic is matched once, and a sink with ``offer_many(sub, msgs, dropped) -> accepted``
        takes the run in one call (accepting a prefix; the rest is queued in order under the
        policy), so a fan-out costs one Python call per subscriber per run, not per message.
        Subscribers see their messages in order; only the interleaving *between* subscribers
        differs from routing one message at a time, and nothing promises that.
        """
        full: list[Subscription] | None = None
        subs = self.match(topic)
        k = len(msgs)
        for sub in subs:
            q = sub.queue
            start = 0
            if not q:
                dropped = sub.dropped
                offer_many = getattr(sub.sink, "offer_many", None)
                if offer_many is not None:
                    start = offer_many(sub, msgs, dropped)
                else:
                    offer = sub.sink.offer
                    while start < k and offer(sub, msgs[start], dropped if not start else 0):
                        start += 1
                if start:
                    sub.delivered += start
                    if dropped:
                        sub.dropped = 0
                if start == k:
                    continue
            is_full = False
            for i in range(start, k):
                msg = msgs[i]
                size = len(msg.data)
                if q and (len(q) >= sub.queue_size or sub.queued_bytes + size > sub.max_bytes):
                    if sub.policy == "drop_oldest":
                        while q and (len(q) >= sub.queue_size or sub.queued_bytes + size > sub.max_bytes):
                            sub.queued_bytes -= len(q.popleft().data)
                            sub.dropped += 1
                            sub.dropped_total += 1
                    elif not is_full:
                        is_full = True
                        if full is None:
                            full = []
                        full.append(sub)
                q.append(msg)
                sub.queued_bytes += size
                if len(q) == 1:
                    sub.sink.pending(sub)
        n = len(subs)
        self.published += k
        self.delivered += n * k
        return n, full

    def publish(self, topic: str, payload: bytes, sender: str | None = None, *,
                reply_to: str | None = None) -> int:
        """Route codec-encoded ``payload``; never waits (lossless queues may overshoot their bound)."""
        validate_topic(topic)
        n, _ = self.route(BusMessage(topic, payload, sender, reply_to))
        return n

    async def publish_async(self, topic: str, payload: bytes, sender: str | None = None, *,
                            reply_to: str | None = None) -> int:
        """Like :meth:`publish`, then waits until every lossless subscriber it filled has room."""
        validate_topic(topic)
        n, full = self.route(BusMessage(topic, payload, sender, reply_to))
        if full:
            for sub in full:
                await sub.wait_room()
        return n
