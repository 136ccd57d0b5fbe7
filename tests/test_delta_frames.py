"""Delta frames from a real node (issue 15, docs/DELTA.md), against a real Redis.

A subscription with ``options.delta: "fossil"`` gets a state channel's events with ``data``
as a JSON string: the exact envelope (``delta: false``) or the Fossil delta from the
envelope of ``seq - 1`` (``delta: true``). Rebuilt, they are byte for byte what a full
subscriber receives; after conflation, a snapshot or a replay the next frame is full.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
from conftest import async_wait_until, publish
from fossil_fixtures import next_book, order_book

from cluster import fossil
from cluster.client import PushClient


def book_payloads(count: int, seed: int = 15) -> list[dict[str, Any]]:
    """``count`` successive 50-level books (a few levels change each time), as payloads."""
    rng = random.Random(seed)
    books = [order_book(rng)]
    while len(books) < count:
        books.append(next_book(books[-1], rng))
    return [book["payload"] for book in books]


def publish_book(node: Any, key: str, payload: dict[str, Any]) -> dict[str, Any]:
    return publish(node.redis_url, "market.orderbook", payload, key=key)


async def raw_events(client: Any, count: int, timeout: float = 5.0) -> list[bytes]:
    """The next ``count`` event frames as the node sent them (bytes, not parsed)."""
    frames: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(frames) < count:
        msg = await client.ws.receive(timeout=max(0.01, deadline - loop.time()))
        data = msg.data.encode() if isinstance(msg.data, str) else msg.data
        if orjson.loads(data).get("action") == "event":
            frames.append(data)
    return frames


def envelope_bytes(frame: bytes) -> bytes:
    """The envelope a full subscriber's frame embeds, exactly as sent (``data`` is spliced in raw)."""
    start = frame.index(b',"data":') + len(b',"data":')
    return frame[start : frame.rindex(b',"cursor":')]


class DeltaReader:
    """Rebuilds a delta subscriber's envelopes the way the clients do, and counts what came how."""

    def __init__(self) -> None:
        self.base: tuple[int, bytes] | None = None
        self.kinds: list[bool] = []

    def apply(self, frame: bytes) -> bytes:
        doc = orjson.loads(frame)
        assert type(doc["data"]) is str, doc
        self.kinds.append(doc["delta"])
        if doc["delta"]:
            assert self.base is not None and self.base[0] == doc["seq"] - 1, "a delta on top of another base"
            raw = fossil.decode(self.base[1], doc["data"].encode())
        else:
            raw = doc["data"].encode()
        self.base = (doc["seq"], raw)
        return raw


async def test_a_delta_subscriber_ends_with_the_same_envelopes_as_a_full_subscriber_byte_for_byte(
    start_node, connect
) -> None:
    node = start_node("delta-1")
    full, delta = await connect(node), await connect(node)
    await full.subscribe(["market.orderbook:DF/1"])
    await delta.subscribe(["market.orderbook:DF/1"], delta="fossil")
    payloads = book_payloads(20)
    for payload in payloads:
        publish_book(node, "DF/1", payload)
    full_frames = await raw_events(full, len(payloads))
    delta_frames = await raw_events(delta, len(payloads))
    reader = DeltaReader()
    rebuilt = [reader.apply(frame) for frame in delta_frames]
    assert rebuilt == [envelope_bytes(frame) for frame in full_frames]
    assert [orjson.loads(raw)["payload"] for raw in rebuilt] == payloads
    assert reader.kinds == [False] + [True] * (len(payloads) - 1)  # the chain starts with a full event
    delta_bytes = sum(len(frame) for frame in delta_frames[1:])
    full_bytes = sum(len(frame) for frame in full_frames[1:])
    assert delta_bytes < full_bytes / 5
    for frame in delta_frames:  # the event message keeps its cursor and seq beside the string data
        doc = orjson.loads(frame)
        assert doc["cursor"] and doc["seq"] and doc["channel"] == "market.orderbook:DF/1"


async def test_after_conflation_the_next_frame_is_full_then_deltas_resume(start_node, connect) -> None:
    node = start_node("delta-2")
    client = await connect(node)
    await client.subscribe(["market.orderbook:DC/1"], limit=1, delta="fossil")  # the rest of a burst is conflated
    payloads = book_payloads(7, seed=3)
    for payload in payloads[:6]:
        publish_book(node, "DC/1", payload)
    reader = DeltaReader()
    first, second = await raw_events(client, 2, timeout=4)
    assert orjson.loads(reader.apply(first))["seq"] == 1
    assert orjson.loads(reader.apply(second))["seq"] == 6  # 2..5 replaced in the queue: the chain broke
    assert reader.kinds == [False, False]
    await asyncio.sleep(1.1)  # a push token again: the next one goes straight out, on top of seq 6
    publish_book(node, "DC/1", payloads[6])
    [third] = await raw_events(client, 1, timeout=3)
    assert orjson.loads(reader.apply(third))["payload"] == payloads[6]
    assert reader.kinds == [False, False, True]


async def test_push_client_with_deltas_ends_with_the_right_book_after_conflation(start_node) -> None:
    node = start_node("delta-3")
    received: list[dict[str, Any]] = []
    gaps: list[tuple[str, int, int]] = []
    client = PushClient(node.url, on_gap=lambda *gap: gaps.append(gap))
    client.subscribe(["market.orderbook:DP/1"], received.append, limit=1, delta="fossil")
    async with client:
        await asyncio.wait_for(client.subscriptions[0].acked.wait(), 5)
        published = [publish_book(node, "DP/1", payload) for payload in book_payloads(8, seed=4)]
        await async_wait_until(
            lambda: received and received[-1]["data"] == published[-1], timeout=8, message="the latest book"
        )
    assert gaps  # conflation left a gap: the client resubscribed for a snapshot
    assert all("delta" not in event and isinstance(event["data"], dict) for event in received)


async def test_a_snapshot_is_full_and_the_next_live_event_a_delta_on_top_of_it(start_node, connect) -> None:
    node = start_node("delta-4")
    payloads = book_payloads(4, seed=5)
    for payload in payloads[:3]:
        publish_book(node, "DS/1", payload)
    client = await connect(node)
    await client.subscribe(["market.orderbook:DS/1"], snapshot=True, delta="fossil")
    reader = DeltaReader()
    [snapshot] = await raw_events(client, 1)
    assert orjson.loads(snapshot).get("snapshot") is True, "the latest value on subscribe says what it is"
    assert orjson.loads(reader.apply(snapshot))["seq"] == 3
    publish_book(node, "DS/1", payloads[3])
    [live] = await raw_events(client, 1)
    assert "snapshot" not in orjson.loads(live)
    assert orjson.loads(reader.apply(live))["payload"] == payloads[3]
    assert reader.kinds == [False, True]


async def test_other_events_a_delta_subscription_matches_stay_ordinary_events(start_node, connect) -> None:
    node = start_node("delta-5")
    client = await connect(node)
    await client.subscribe(["market.*"], delta="fossil")
    trade = publish(node.redis_url, "market.trades", {"price": 1.5}, key="DO/1")
    [event] = await client.events(1)
    assert event["data"] == trade and "delta" not in event
    book = publish_book(node, "DO/1", book_payloads(1)[0])
    [event] = await client.events(1)
    assert event["delta"] is False and orjson.loads(event["data"]) == book


async def test_a_malformed_delta_request_refuses_only_the_state_channels_it_applies_to(start_node, connect) -> None:
    node = start_node("delta-6")
    client = await connect(node)
    await client.send(
        {
            "action": "subscribe",
            "channels": ["market.orderbook:DM/1", "market.trades:DM/1"],
            "options": {"delta": "gzip"},
            "id": "bad-delta",
        }
    )
    ack = await client.recv_action("ack")
    assert ack["subscribed"] == ["market.trades:DM/1"] and ack["id"] == "bad-delta"
    error = await client.recv_action("error")
    assert error["code"] == "INVALID_MESSAGE" and error["channels"] == ["market.orderbook:DM/1"]
    assert error["id"] == "bad-delta"
    publish_book(node, "DM/1", book_payloads(1)[0])
    trade = publish(node.redis_url, "market.trades", {"price": 2.5}, key="DM/1")
    [event] = await client.events(1)
    assert event["data"] == trade  # the book's channel was not subscribed
