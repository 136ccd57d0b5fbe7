"""The per-connection queue and writer in-process (SPEC §6): drop order, conflation, p0, backpressure, lagged.

EventQueue is pure; ClientConnection runs against a fake transport (tests/fakes.py), so a
backed-up socket, a slow consumer and the lagged notices are checked in milliseconds.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from fakes import FakeTransport, FakeWebSocket

from cluster.auth import Identity
from cluster.settings import Settings
from node.connection import WRITE_HIGH_WATER, ClientConnection
from node.queue import EventQueue, QueuedEvent, SlowConsumer

NOW = 1_000_000


def event(name: str, rank: int, *, expires_at: int | None = None, channel: str | None = None) -> QueuedEvent:
    return QueuedEvent(name.encode(), rank, expires_at, channel, None)


def drained(queue: EventQueue) -> list[bytes]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item.frame)
    return out


def full_queue(drops: list[tuple[str, int]]) -> EventQueue:
    return EventQueue(4, 1 << 20, lambda reason, n: drops.append((reason, n)))


def test_when_full_expired_events_go_first_then_the_lowest_priority_oldest_first() -> None:
    drops: list[tuple[str, int]] = []
    queue = full_queue(drops)
    for item in (event("old-p3", 3), event("p1", 1), event("stale", 1, expires_at=NOW - 1), event("new-p3", 3)):
        queue.push(item, NOW)
    queue.push(event("a", 2), NOW)  # the expired one makes room
    queue.push(event("b", 2), NOW)  # then the oldest p3
    queue.push(event("c", 0), NOW)  # then the next p3
    assert drops == [("expired", 1), ("queue_full", 1), ("queue_full", 1)]
    assert drained(queue) == [b"p1", b"a", b"b", b"c"]  # the rest leave in arrival order


def test_an_incoming_event_of_the_lowest_priority_is_the_one_dropped() -> None:
    drops: list[tuple[str, int]] = []
    queue = full_queue(drops)
    for name in ("a", "b", "c", "d"):
        queue.push(event(name, 1), NOW)
    queue.push(event("late-p3", 3), NOW)
    assert drops == [("queue_full", 1)]
    assert drained(queue) == [b"a", b"b", b"c", b"d"]


def test_a_p0_event_that_cannot_be_placed_is_a_slow_consumer() -> None:
    queue = full_queue([])
    for name in ("a", "b", "c", "d"):
        queue.push(event(name, 0), NOW)
    with pytest.raises(SlowConsumer):
        queue.push(event("e", 0), NOW)


def test_a_newer_ticker_replaces_the_queued_one_in_place() -> None:
    drops: list[tuple[str, int]] = []
    queue = full_queue(drops)
    queue.push(event("t1", 2, channel="market.ticker:BTC"), NOW)
    queue.push(event("x", 2), NOW)
    queue.push(event("t2", 2, channel="market.ticker:BTC"), NOW)
    assert drops == [("conflated", 1)]
    assert drained(queue) == [b"t2", b"x"]


@pytest.fixture
def settings() -> Settings:
    return replace(Settings(), lagged_interval=0.05, slow_consumer_seconds=0.5)


def connection(settings: Settings) -> tuple[ClientConnection, FakeTransport, FakeWebSocket]:
    transport = FakeTransport()
    ws = FakeWebSocket(transport)
    conn = ClientConnection("c1", Identity(None, frozenset()), ws, transport, settings, None)  # type: ignore[arg-type]
    return conn, transport, ws


async def test_a_backed_up_socket_queues_events_and_writes_them_in_one_batch_when_it_drains(settings) -> None:
    conn, transport, ws = connection(settings)
    assert conn.offer(b"first", 2, None, None, None, NOW)
    transport.buffered = WRITE_HIGH_WATER  # the client stopped reading
    for name in (b"a", b"b", b"c"):
        assert not conn.offer(name, 2, None, None, None, NOW)
    assert transport.frames == [b"first"]
    writes = transport.writes
    ws.drain()
    await asyncio.sleep(0.05)
    assert transport.frames == [b"first", b"a", b"b", b"c"]
    assert transport.writes == writes + 1, "the queued frames went out in one write"


async def test_drops_are_told_in_one_lagged_notice_per_reason(settings) -> None:
    settings = replace(settings, queue_size=2)
    conn, transport, ws = connection(settings)
    transport.buffered = WRITE_HIGH_WATER
    for i in range(5):
        conn.offer(f"e{i}".encode(), 3, None, None, None, NOW)
    ws.drain()
    await asyncio.sleep(0.2)
    notices = [doc for doc in transport.messages() if doc.get("action") == "lagged"]
    assert notices == [{"action": "lagged", "dropped": 3, "reason": "queue_full"}]


async def test_a_socket_that_never_drains_closes_the_slow_consumer_with_4008(settings) -> None:
    conn, transport, ws = connection(settings)
    transport.buffered = WRITE_HIGH_WATER
    conn.offer(b"stuck", 2, None, None, None, NOW)
    await asyncio.sleep(0.8)
    assert ws.close_codes == [4008]
