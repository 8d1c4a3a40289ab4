"""The routing core without any socket: fast path, bounded queues, drop and block policies."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.bus import Bus, BusMessage, Subscription
from ipc.errors import InvalidArguments


class Sink:
    """A sink that can be switched between writable and full, like a socket."""

    def __init__(self) -> None:
        self.writable = True
        self.got: list[tuple[str, bytes, int]] = []
        self.pending_calls = 0

    def offer(self, sub: Subscription, msg: BusMessage, dropped: int) -> bool:
        if not self.writable:
            return False
        self.got.append((msg.topic, msg.data, dropped))
        return True

    def pending(self, sub: Subscription) -> None:
        self.pending_calls += 1

    def drain(self, sub: Subscription) -> None:
        while (item := sub.take()) is not None:
            msg, dropped = item
            self.got.append((msg.topic, msg.data, dropped))


def test_fast_path_delivers_in_order_and_counts() -> None:
    bus, sink = Bus(), Sink()
    bus.subscribe("a/+", sink)
    assert [bus.publish("a/x", bytes([i])) for i in range(5)] == [1] * 5
    assert bus.publish("b/x", b"") == 0
    assert sink.got == [("a/x", bytes([i]), 0) for i in range(5)]


def test_drop_oldest_counts_and_reports_with_next_message() -> None:
    bus, sink = Bus(), Sink()
    sub = bus.subscribe("t", sink, queue_size=3)
    sink.writable = False
    for i in range(10):
        bus.publish("t", bytes([i]))
    assert len(sub.queue) == 3 and sub.dropped == 7
    sink.writable = True
    sink.drain(sub)
    assert sink.got == [("t", b"\x07", 7), ("t", b"\x08", 0), ("t", b"\x09", 0)]
    bus.publish("t", b"\x0a")
    assert sink.got[-1] == ("t", b"\x0a", 0)
    assert sub.dropped_total == 7


def test_queued_messages_keep_order_ahead_of_new_ones() -> None:
    bus, sink = Bus(), Sink()
    sub = bus.subscribe("t", sink, queue_size=100)
    sink.writable = False
    bus.publish("t", b"1")
    bus.publish("t", b"2")
    sink.writable = True
    bus.publish("t", b"3")  # the queue is not empty, so this must not overtake 1 and 2
    assert sink.got == []
    sink.drain(sub)
    assert [d for _, d, _ in sink.got] == [b"1", b"2", b"3"]
    assert sink.pending_calls == 1


def test_one_full_subscriber_does_not_affect_another() -> None:
    bus, slow, fast = Bus(), Sink(), Sink()
    bus.subscribe("t", slow, queue_size=2)
    bus.subscribe("t", fast, queue_size=2)
    slow.writable = False
    for i in range(1000):
        bus.publish("t", str(i).encode())
    assert len(fast.got) == 1000
    assert [int(d) for _, d, _ in fast.got] == list(range(1000))


async def test_block_policy_reports_full_and_publisher_waits_for_room() -> None:
    bus, sink = Bus(), Sink()
    sub = bus.subscribe("t", sink, queue_size=2, policy="block")
    sink.writable = False
    assert bus.route(BusMessage("t", b"1"))[1] is None
    assert bus.route(BusMessage("t", b"2"))[1] is None
    n, full = bus.route(BusMessage("t", b"3"))
    assert n == 1 and full == [sub]
    assert sub.dropped == 0 and len(sub.queue) == 3  # lossless: accepted, never dropped

    waiter = asyncio.create_task(bus.publish_async("t", b"4"))
    await asyncio.sleep(0)
    assert not waiter.done()
    sink.writable = True
    sink.drain(sub)
    assert await asyncio.wait_for(waiter, 5) == 1
    sink.drain(sub)
    assert [d for _, d, _ in sink.got] == [b"1", b"2", b"3", b"4"]


async def test_unsubscribe_releases_blocked_publishers_and_stops_delivery() -> None:
    bus, sink = Bus(), Sink()
    sub = bus.subscribe("t", sink, queue_size=1, policy="block")
    sink.writable = False
    bus.publish("t", b"1")
    waiter = asyncio.create_task(bus.publish_async("t", b"2"))
    await asyncio.sleep(0)
    bus.unsubscribe(sub)
    await asyncio.wait_for(waiter, 5)
    assert bus.publish("t", b"3") == 0 and len(bus) == 0


@pytest.mark.parametrize(("queue_size", "policy"), [(0, "drop_oldest"), (True, "block"), (10, "newest"),
                                                      (10**7, "block"), ("5", "block")])
def test_bad_subscription_parameters(queue_size: object, policy: object) -> None:
    with pytest.raises(InvalidArguments):
        Bus().subscribe("t", Sink(), queue_size, policy)  # type: ignore[arg-type]


def test_match_cache_follows_subscription_changes() -> None:
    bus, a, b = Bus(), Sink(), Sink()
    bus.subscribe("x/#", a)
    assert bus.publish("x/1", b"") == 1
    sb = bus.subscribe("x/1", b)
    assert bus.publish("x/1", b"") == 2
    bus.unsubscribe(sb)
    assert bus.publish("x/1", b"") == 1


def test_queue_is_bounded_in_bytes_too() -> None:
    bus, sink = Bus(max_queue_bytes=10_000), Sink()
    sub = bus.subscribe("t", sink, queue_size=1000)
    sink.writable = False
    for i in range(100):
        bus.publish("t", bytes([i]) * 1000)
    assert len(sub.queue) == 10 and sub.queued_bytes == 10_000 and sub.dropped == 90
    sink.writable = True
    sink.drain(sub)
    assert sink.got[0][1][0] == 90 and sink.got[0][2] == 90
    assert sub.queued_bytes == 0


def test_one_message_larger_than_the_byte_bound_still_flows() -> None:
    bus, sink = Bus(max_queue_bytes=100), Sink()
    sub = bus.subscribe("t", sink, policy="block")
    sink.writable = False
    n, full = bus.route(BusMessage("t", b"x" * 1000))
    assert (n, full) == (1, None) and len(sub.queue) == 1  # accepted: the queue was empty
    assert bus.route(BusMessage("t", b"y"))[1] == [sub]  # now it is over its bound


def test_take_many_pops_in_order_with_the_gap_once_and_respects_limits() -> None:
    bus, sink = Bus(), Sink()
    sub = bus.subscribe("t", sink, queue_size=6)
    sink.writable = False
    for i in range(10):
        bus.publish("t", bytes([i]) * 10)
    assert sub.dropped == 4 and sub.queued_bytes == 60
    msgs, dropped = sub.take_many(2, 1 << 20)
    assert [m.data[0] for m in msgs] == [4, 5] and dropped == 4 and sub.dropped == 0
    msgs, dropped = sub.take_many(100, 15)  # stops once 15 bytes are taken: two messages of 10
    assert [m.data[0] for m in msgs] == [6, 7] and dropped == 0
    msgs, _ = sub.take_many(100, 1)  # at least one, whatever the byte budget
    assert [m.data[0] for m in msgs] == [8]
    assert sub.queued_bytes == 10 and sub.delivered == 5
    assert sub.take_many(0, 100) == ([], 0) and len(sub.queue) == 1


async def test_take_many_wakes_a_blocked_publisher_at_half_a_queue() -> None:
    bus, sink = Bus(), Sink()
    sub = bus.subscribe("t", sink, queue_size=4, policy="block")
    sink.writable = False
    for i in range(5):
        bus.publish("t", bytes([i]))
    waiter = asyncio.ensure_future(sub.wait_room())
    await asyncio.sleep(0)
    sub.take_many(2, 100)  # 3 left: above half a queue, still blocked
    await asyncio.sleep(0)
    assert not waiter.done()
    sub.take_many(1, 100)
    await asyncio.wait_for(waiter, 1)


class CreditSink:
    """Accepts while it has credit, like the native server; ``runs`` toggles offer_many support."""

    def __init__(self, credit: int, runs: bool) -> None:
        self.credit = credit
        self.got: list[tuple[bytes, int]] = []
        if runs:
            self.offer_many = self._offer_many

    def offer(self, sub: Subscription, msg: BusMessage, dropped: int) -> bool:
        if self.credit <= 0:
            return False
        self.credit -= 1
        self.got.append((msg.data, dropped))
        return True

    def _offer_many(self, sub: Subscription, msgs: list[BusMessage], dropped: int) -> int:
        k = min(self.credit, len(msgs))
        for i, msg in enumerate(msgs[:k]):
            self.got.append((msg.data, dropped if i == 0 else 0))
        self.credit -= k
        return k

    def pending(self, sub: Subscription) -> None:
        pass

    def drain(self, sub: Subscription, credit: int) -> None:
        self.credit += credit
        while self.credit > 0 and (item := sub.take()) is not None:
            self.credit -= 1
            self.got.append((item[0].data, item[1]))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 6)), min_size=1, max_size=12),
       st.sampled_from(["drop_oldest", "block"]), st.integers(1, 6), st.booleans())
def test_route_many_has_the_outcome_of_routing_one_by_one(runs: list[tuple[int, int]], policy: str,
                                                         queue_size: int, offer_many: bool) -> None:
    """Runs of k messages, then the reader returns some credit: per subscriber, same deliveries,
    same gaps, same queue and the same lossless subscribers reported full."""
    outcomes = []
    for batched in (False, True):
        bus = Bus()
        sinks = [CreditSink(2, offer_many), CreditSink(0, offer_many)]
        subs = [bus.subscribe("t/#", s, queue_size=queue_size, policy=policy) for s in sinks]  # type: ignore[arg-type]
        seq = 0
        fulls = []
        for k, credit in runs:
            msgs = [BusMessage("t/x", (seq + i).to_bytes(2, "big")) for i in range(k)]
            seq += k
            if batched:
                n, full = bus.route_many("t/x", msgs)
                fulls.append(sorted(s.id for s in full or []))
            else:
                full_ids: set[int] = set()
                for m in msgs:
                    n, full = bus.route(m)
                    full_ids.update(s.id for s in full or [])
                fulls.append(sorted(full_ids))
            assert n == 2
            for sink, sub in zip(sinks, subs, strict=True):
                sink.drain(sub, credit)
        outcomes.append(([s.got for s in sinks], [[m.data for m in sub.queue] for sub in subs],
                         [(sub.dropped, sub.dropped_total, sub.delivered, sub.queued_bytes) for sub in subs],
                         fulls, bus.published, bus.delivered))
    assert outcomes[0] == outcomes[1]
