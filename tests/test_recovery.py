"""SPEC §8 recovery: cursors with epochs, replay on subscribe with `since`, no gap, no duplicate."""

from __future__ import annotations

import asyncio
import threading

from conftest import publish, token


async def test_reconnect_with_since_gets_exactly_the_missed_events_then_live(start_node, connect):
    node = start_node("recover")
    user = token("ivy")
    first = await connect(node, token=user)
    await first.subscribe(["order.*"])
    publish(node.redis_url, "order.created", {"n": -1}, user_id="ivy")
    [seen] = await first.events(1)
    cursor = seen["cursor"]
    await first.close()

    missed = [publish(node.redis_url, "order.filled", {"n": i}, user_id="ivy") for i in range(20)]
    publish(node.redis_url, "order.filled", {"n": "other"}, user_id="someone-else")

    again = await connect(node, token=user)
    ack = await again.subscribe(["order.*"], since=cursor)
    assert ack["recovered"] == {"order.*": True}
    replayed = await again.events(20)
    assert [e["data"]["id"] for e in replayed] == [m["id"] for m in missed]
    live = publish(node.redis_url, "order.filled", {"n": "live"}, user_id="ivy")
    [after] = await again.events(1)
    assert after["data"]["id"] == live["id"]
    await again.no_event(0.3)


async def test_events_published_during_replay_arrive_once_in_order(start_node, connect):
    node = start_node("seam")
    first = await connect(node)
    await first.subscribe(["market.trades"])
    publish(node.redis_url, "market.trades", {"n": -1})
    cursor = (await first.events(1))[0]["cursor"]
    await first.close()
    for i in range(50):
        publish(node.redis_url, "market.trades", {"n": i})

    stop = threading.Event()
    published: list[int] = []

    def keep_publishing() -> None:
        i = 50
        while not stop.is_set() and i < 150:
            publish(node.redis_url, "market.trades", {"n": i})
            published.append(i)
            i += 1

    writer = threading.Thread(target=keep_publishing)
    writer.start()
    client = await connect(node)
    try:
        ack = await client.subscribe(["market.trades"], since=cursor)
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        writer.join()
    assert ack["recovered"] == {"market.trades": True}
    expected = list(range(50)) + published
    events = await client.events(len(expected), timeout=10)
    assert [e["data"]["payload"]["n"] for e in events] == expected
    await client.no_event(0.3)


async def test_pattern_subscription_recovers_across_channels(start_node, connect):
    node = start_node("pattern-recover")
    first = await connect(node)
    await first.subscribe(["market.*"])
    publish(node.redis_url, "market.ticker", {"n": 0}, key="BTC/USDT")
    cursor = (await first.events(1))[0]["cursor"]
    await first.close()
    order = [
        publish(node.redis_url, "market.trades", {"n": 1}, key="ETH/USDT"),
        publish(node.redis_url, "market.ticker", {"n": 2}, key="BTC/USDT"),
        publish(node.redis_url, "market.orderbook", {"n": 3}, key="ETH/USDT"),
    ]
    client = await connect(node)
    ack = await client.subscribe(["market.*"], since=cursor)
    assert ack["recovered"] == {"market.*": True}
    events = await client.events(3)
    assert [e["data"]["id"] for e in events] == [m["id"] for m in order]


async def test_history_lost_after_flush_gives_recovered_false(start_node, connect, private_redis):
    node = start_node("flush", redis=private_redis)
    first = await connect(node)
    await first.subscribe(["market.trades"])
    publish(node.redis_url, "market.trades", {"n": 0})
    cursor = (await first.events(1))[0]["cursor"]
    await first.close()
    private_redis.client().flushall()
    publish(node.redis_url, "market.trades", {"n": 1})
    client = await connect(node)
    ack = await client.subscribe(["market.trades"], since=cursor)
    assert ack["recovered"] == {"market.trades": False}
    live = publish(node.redis_url, "market.trades", {"n": 2})
    [event] = await client.events(1)
    assert event["data"]["id"] == live["id"], "the subscription is live even when history is lost"


async def test_unknown_cursor_gives_recovered_false(shared_node, connect):
    client = await connect(shared_node)
    ack = await client.subscribe(["market.trades", "market.ticker:BTC/USDT"], since="not-a-cursor")
    assert ack["recovered"] == {"market.trades": False, "market.ticker:BTC/USDT": False}


async def test_replay_applies_authorization(start_node, connect):
    node = start_node("recover-auth")
    user = token("jack")
    first = await connect(node, token=user)
    await first.subscribe(["risk.*"])
    publish(node.redis_url, "risk.alert", {"n": 0}, user_id="jack")
    cursor = (await first.events(1))[0]["cursor"]
    await first.close()
    publish(node.redis_url, "risk.alert", {"secret": True}, user_id="kate")
    mine = publish(node.redis_url, "risk.alert", {"n": 1}, user_id="jack")
    client = await connect(node, token=user)
    ack = await client.subscribe(["risk.*"], since=cursor)
    assert ack["recovered"] == {"risk.*": True}
    [event] = await client.events(1)
    assert event["data"]["id"] == mine["id"]
    await client.no_event(0.3)


async def test_expired_events_are_not_replayed(start_node, connect):
    node = start_node("recover-ttl")
    first = await connect(node)
    await first.subscribe(["market.trades"])
    publish(node.redis_url, "market.trades", {"n": 0})
    cursor = (await first.events(1))[0]["cursor"]
    await first.close()
    publish(node.redis_url, "market.trades", {"n": "short"}, ttl=50)
    kept = publish(node.redis_url, "market.trades", {"n": "kept"}, ttl=60_000)
    await asyncio.sleep(0.2)
    client = await connect(node)
    await client.subscribe(["market.trades"], since=cursor)
    [event] = await client.events(1)
    assert event["data"]["id"] == kept["id"]


async def test_ack_cursor_recovers_events_for_a_client_that_saw_none(start_node, connect):
    node = start_node("ack-cursor")
    first = await connect(node)
    ack = await first.subscribe(["backtest.progress:bt-1", "market.trades"])
    assert ack["cursor"]
    await first.close()
    user = token("lena")
    missed = publish(node.redis_url, "market.trades", {"n": 1})
    client = await connect(node, token=user)
    ack = await client.subscribe(["market.trades"], since=ack["cursor"])
    assert ack["recovered"] == {"market.trades": True}
    [event] = await client.events(1)
    assert event["data"]["id"] == missed["id"]
