"""State channels (issue 15): the latest value on subscribe, per-channel sequence numbers, gap detection.

``market.ticker`` and ``market.orderbook`` are state channels by default: the SDK keeps
each channel's latest event and a sequence number in Redis; a subscribe gets the latest
value of every matching channel right after its ack (by default; ``options.snapshot: false``
turns it off per subscription, ``PUSH_SNAPSHOT_BY_DEFAULT=false`` per node), and events carry
``seq``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from conftest import async_wait_until, publish

from cluster.client import PushClient


def ticker(node: Any, key: str, price: float, **kwargs: Any) -> dict[str, Any]:
    return publish(node.redis_url, "market.ticker", {"price": price}, key=key, **kwargs)


def unique(prefix: str) -> str:
    """A channel key no other test publishes to (they share one Redis)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_a_plain_subscribe_after_three_publishes_gets_the_third_at_once(
    start_node, connect, private_redis
) -> None:
    """The issue's check from outside, literally: no option, ``market.ticker:BTC/USDT`` (on a Redis of its own)."""
    node = start_node("state-0", redis=private_redis)
    published = [ticker(node, "BTC/USDT", price) for price in (1.0, 2.0, 3.0)]
    client = await connect(node)
    await client.send({"action": "subscribe", "channels": ["market.ticker:BTC/USDT"], "id": "plain"})
    ack = await client.recv(timeout=2)
    assert ack["action"] == "ack" and ack["subscribed"] == ["market.ticker:BTC/USDT"]
    first = await client.recv(timeout=2)  # the very next message after the ack
    assert first["action"] == "event" and first["channel"] == "market.ticker:BTC/USDT"
    assert first["data"] == published[2] and first["data"]["id"] == published[2]["id"] and first["seq"] == 3
    assert first["snapshot"] is True, "marked: the latest value, not a live update"
    await client.no_event(0.5)  # only the latest, not the history


async def test_a_subscriber_gets_the_latest_value_at_once_then_live_events_in_sequence(start_node, connect) -> None:
    """By default (no option); ``snapshot: true`` asks for the same (it matters where the node's default is off)."""
    node = start_node("state-1")
    for options in ({}, {"snapshot": True}):
        key = unique("SNAP")
        channel = f"market.ticker:{key}"
        published = [ticker(node, key, price) for price in (1.0, 2.0, 3.0)]
        client = await connect(node)
        ack = await client.subscribe([channel], **options)
        assert ack["subscribed"] == [channel]
        [latest] = await client.events(1, timeout=2)
        assert latest["data"]["id"] == published[2]["id"] and latest["seq"] == 3
        await client.no_event(0.3)  # only the latest, not the history
        live = [ticker(node, key, price) for price in (4.0, 5.0)]
        events = await client.events(2)
        assert [e["data"]["id"] for e in events] == [e["id"] for e in live]
        assert [e["seq"] for e in events] == [4, 5]
        assert latest["snapshot"] is True and not any("snapshot" in e for e in events)


async def test_a_wildcard_gets_the_latest_value_of_every_key_and_snapshot_false_gets_none(
    start_node, connect, private_redis
) -> None:
    node = start_node("state-2", redis=private_redis)
    for key in ("W/A", "W/B", "W/C"):
        ticker(node, key, 1.0)
        ticker(node, key, 2.0)
    publish(node.redis_url, "market.trades", {"n": 1}, key="W/A")  # not a state channel
    for options in ({}, {"snapshot": True}):  # on by default (PUSH_SNAPSHOT_BY_DEFAULT, README)
        client = await connect(node)
        await client.subscribe(["market.ticker:*"], **options)
        latest = await client.events(3, timeout=2)
        assert sorted((e["channel"], e["seq"], e["data"]["payload"]["price"]) for e in latest) == [
            ("market.ticker:W/A", 2, 2.0),
            ("market.ticker:W/B", 2, 2.0),
            ("market.ticker:W/C", 2, 2.0),
        ]
        await client.no_event(0.3)
    quiet = await connect(node)
    ack = await quiet.subscribe(["market.ticker:*"], snapshot=False)  # off for this subscription
    assert ack["subscribed"] == ["market.ticker:*"]
    await quiet.no_event(0.5)


async def test_a_wildcard_on_a_shared_redis_gets_the_latest_value_of_each_of_its_keys(start_node, connect) -> None:
    """No option; other tests' keys may arrive too (up to PUSH_SNAPSHOT_MAX_CHANNELS): only ours are checked."""
    node = start_node("state-2b", PUSH_SNAPSHOT_MAX_CHANNELS="10000")
    keys = [unique("WS") for _ in range(3)]
    latest = {key: [ticker(node, key, price) for price in (1.0, 2.0)][-1] for key in keys}
    client = await connect(node)
    await client.send({"action": "subscribe", "channels": ["market.ticker:*"], "id": "all"})
    ack = await client.recv_action("ack")
    assert ack["subscribed"] == ["market.ticker:*"]
    ours: dict[str, list[dict[str, Any]]] = {}
    while True:  # the snapshot follows the ack; nothing is published live here
        try:
            doc = await client.recv(timeout=0.5)
        except TimeoutError:
            break
        assert doc["action"] == "event", doc  # no SNAPSHOT_LIMIT error with this limit
        key = doc["channel"].partition(":")[2]
        if key in latest:
            ours.setdefault(key, []).append(doc)
    assert {key: [(e["data"], e["seq"]) for e in events] for key, events in ours.items()} == {
        key: [(envelope, 2)] for key, envelope in latest.items()
    }


async def test_a_wildcard_beyond_the_snapshot_limit_says_how_many_were_left_out(
    start_node, connect, private_redis
) -> None:
    node = start_node("state-3", redis=private_redis, PUSH_SNAPSHOT_MAX_CHANNELS="2")
    for key in ("L/A", "L/B", "L/C", "L/D"):
        ticker(node, key, 1.0)
    client = await connect(node)
    await client.send({"action": "subscribe", "channels": ["market.ticker:*"], "options": {"snapshot": True}, "id": "big"})
    ack = await client.recv_action("ack")
    assert ack["subscribed"] == ["market.ticker:*"]
    error = await client.recv_action("error")
    assert error["code"] == "SNAPSHOT_LIMIT" and error["channels"] == ["market.ticker:*"]
    assert "2 more" in error["message"]
    assert len(await client.events(2, timeout=2)) == 2
    await client.no_event(0.3)


async def test_an_expired_latest_value_is_not_sent(start_node, connect) -> None:
    node = start_node("state-4")
    ticker(node, "TTL/1", 1.0, ttl=200)
    await asyncio.sleep(0.4)
    client = await connect(node)
    await client.subscribe(["market.ticker:TTL/1"], snapshot=True)
    await client.no_event(0.5)


async def test_sequence_numbers_have_no_gap_in_a_quiet_stream_and_show_one_after_conflation(start_node, connect) -> None:
    node = start_node("state-5")
    client = await connect(node)
    await client.subscribe(["market.orderbook:GAP/1"], limit=1)  # one event per second: the rest is conflated
    for i in range(6):
        publish(node.redis_url, "market.orderbook", {"n": i}, key="GAP/1")
    first = await client.events(1, timeout=3)
    second = await client.events(1, timeout=3)
    assert first[0]["seq"] == 1
    assert second[0]["seq"] == 6  # 2..5 were replaced in the queue by newer books: a gap the client sees


async def test_push_client_resubscribes_for_a_fresh_snapshot_when_it_sees_a_gap(start_node) -> None:
    node = start_node("state-6")
    books: list[int] = []
    gaps: list[tuple[str, int, int]] = []
    client = PushClient(node.url, on_gap=lambda channel, expected, got: gaps.append((channel, expected, got)))
    client.subscribe(["market.orderbook:RS/1"], lambda e: books.append(e["seq"]), limit=1)
    async with client:
        await asyncio.wait_for(client.subscriptions[0].acked.wait(), 5)
        for i in range(6):
            publish(node.redis_url, "market.orderbook", {"n": i}, key="RS/1")
        await async_wait_until(lambda: gaps, timeout=5, message="a gap")
        await async_wait_until(lambda: books and books[-1] == 6, timeout=5, message="the latest book")
    assert gaps[0][0] == "market.orderbook:RS/1"
    assert gaps[0][1] < gaps[0][2]


async def test_with_snapshots_off_for_the_node_only_snapshot_true_gets_the_latest_value(start_node, connect) -> None:
    node = start_node("state-7", PUSH_SNAPSHOT_BY_DEFAULT="false")
    key = unique("DEF")
    channel = f"market.ticker:{key}"
    published = [ticker(node, key, price) for price in (1.0, 2.0, 3.0)]
    for options in ({}, {"snapshot": False}):
        quiet = await connect(node)
        ack = await quiet.subscribe([channel], **options)
        assert ack["subscribed"] == [channel]
        await quiet.no_event(0.5)
    client = await connect(node)
    await client.subscribe([channel], snapshot=True)
    [latest] = await client.events(1, timeout=2)
    assert latest["data"] == published[2] and latest["seq"] == 3
    await client.no_event(0.3)


async def test_the_bus_and_the_sdk_carry_the_seq_inside_a_plain_envelope(redis_server) -> None:
    """SPEC §3: events:<channel> carries a JSON envelope; a state channel's has "seq" as its last field."""
    import orjson

    bus = redis_server.client()
    listener = bus.pubsub(ignore_subscribe_messages=True)
    try:
        listener.subscribe("events:market.orderbook:BUS/1")
        listener.get_message(timeout=1)
        first = publish(redis_server.url, "market.orderbook", {"bids": []}, key="BUS/1")
        second = publish(redis_server.url, "market.orderbook", {"bids": [1]}, key="BUS/1")
        seen = []
        while len(seen) < 2:
            message = listener.get_message(timeout=2)
            assert message is not None
            seen.append(orjson.loads(message["data"]))
        assert seen == [first, second]
        assert second["seq"] == first["seq"] + 1
    finally:
        listener.close()
        bus.close()
