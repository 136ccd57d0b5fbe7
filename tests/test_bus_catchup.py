"""Events published while a node was away from the bus are delivered once it is back."""

from __future__ import annotations

import time

from conftest import async_wait_until, publish, token


async def test_events_published_before_the_node_resubscribes_are_caught_up(start_node, connect, private_redis):
    node = start_node("catch-up", redis=private_redis)
    client = await connect(node, token=token("olga"))
    await client.subscribe(["order.*"])
    first = publish(node.redis_url, "order.created", {"n": 0}, user_id="olga")
    assert (await client.events(1))[0]["data"]["id"] == first["id"]

    private_redis.kill()
    time.sleep(1.5)  # the node backs off while Redis is away
    private_redis.start()
    missed = [publish(node.redis_url, "order.filled", {"n": i}, user_id="olga") for i in range(30)]
    events = await client.events(30, timeout=15)
    assert [e["data"]["id"] for e in events] == [m["id"] for m in missed]
    await client.no_event(0.5)
    await async_wait_until(lambda: any(line.get("event") == "bus_catch_up" for line in node.log_lines()))


async def test_live_events_reusing_an_id_are_still_delivered(start_node, connect):
    """Ids are only compared around a catch-up: a publisher that reuses one is not silenced."""
    import orjson
    from conftest import publish_raw

    node = start_node("reused-id")
    client = await connect(node)
    await client.subscribe(["market.trades"])
    envelope = {
        "id": "00000000-0000-4000-8000-000000000001",
        "type": "market.trades",
        "source": "market-data-collector",
        "timestamp": int(time.time() * 1000),
        "version": "1.0",
        "payload": {},
    }
    for n in range(3):
        publish_raw(node.redis_url, "events:market.trades", orjson.dumps({**envelope, "payload": {"n": n}}))
    events = await client.events(3)
    assert [e["data"]["payload"]["n"] for e in events] == [0, 1, 2]
